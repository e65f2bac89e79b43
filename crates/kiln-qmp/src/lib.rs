//! QMP client (stub).
