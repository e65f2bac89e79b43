//! HTTP API types (stub).
