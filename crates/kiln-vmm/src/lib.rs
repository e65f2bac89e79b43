//! QEMU driver (stub).
