//! Desktop sandboxes, host side.
//!
//! Owns: the pure, VM-free pieces that turn QEMU's screen and input into what an agent needs
//! (`frame`: screenshots, settle detection; `keys`: key combinations, typing plans, pointer
//! events), which perform no I/O and read no clock; and the review recording of a desktop
//! sandbox, which owns `recordings/<id>/` and writes export bundles (`review`: its timeline,
//! screenshots and meta; `redact`: the secrets it must never contain; `retention`: pinning,
//! removal and the janitor's sweep; `bundle`: export bundles; `timestamp`: its RFC 3339
//! times). Knows nothing about QEMU's protocols or the API: the engine calls it from the
//! action path and the sandbox lifecycle.

pub mod bundle;
pub mod frame;
pub mod keys;
pub mod redact;
pub mod retention;
pub mod review;
pub mod timestamp;
