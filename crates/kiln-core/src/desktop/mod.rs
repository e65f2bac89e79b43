//! Desktop sandboxes for computer-use agents: what the engine keeps beside the VM.
//!
//! Owns: the review recording of a desktop sandbox (`review`: its timeline, screenshots and
//! meta; `redact`: the secrets it must never contain; `retention`: pinning, removal and the
//! janitor's sweep; `bundle`: export bundles; `timestamp`: its RFC 3339 times). Knows nothing
//! about QEMU or the API: the engine calls it from the action path and the sandbox lifecycle.

pub mod bundle;
pub mod redact;
pub mod retention;
pub mod review;
pub mod timestamp;
