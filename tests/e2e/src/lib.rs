//! End-to-end tests that boot real VMs under QEMU (see tests/).
