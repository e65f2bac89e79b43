//! SQLite state store (stub).
