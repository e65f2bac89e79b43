//! Guest image builder (stub).
