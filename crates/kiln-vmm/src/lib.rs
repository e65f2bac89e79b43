//! QEMU driver (stub).

pub mod agent;
