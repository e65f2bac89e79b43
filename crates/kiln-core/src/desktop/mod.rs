//! Desktop sandboxes for computer-use agents: what the engine keeps beside the VM.
//!
//! Owns: the review recording of a desktop sandbox (`review`: its timeline, screenshots,
//! redaction, pinning and reclaiming; `bundle`: its export bundles). Knows nothing about QEMU
//! or the API: the engine calls it from the action path and the sandbox lifecycle.

pub mod bundle;
pub mod review;
