//! Sandbox engine (stub).
