//! Desktop sandboxes, host side. QEMU shows the screen and feeds the input devices; the
//! guest is asked for nothing but text a US keyboard cannot type.
//!
//! - [`frame`], [`keys`]: the pure, VM-free pieces (PPM frames → PNG, settle detection, key
//!   combinations, typing plans, pointer events); no I/O, no clock.
//! - `ops`: the engine's desktop operations (screenshot, actions with receipts and the settle
//!   wait, the VNC socket), through the sandbox's owner; `plan`: each action's input frames
//!   and pointer masks (pure); `guest_type`: what the guest types or clicks itself (text a
//!   US keyboard lacks, the horizontal wheel).
//! - The review recording of a desktop sandbox, which owns `recordings/<id>/` and writes
//!   export bundles: [`review`] (its timeline, screenshots and meta), [`redact`] (the
//!   secrets it must never contain), [`retention`] (pinning, removal and the janitor's
//!   sweep), [`bundle`] (export bundles), [`timestamp`] (its RFC 3339 times). It knows
//!   nothing about QEMU or the API: the action path and the sandbox lifecycle call it.

pub mod bundle;
pub mod frame;
mod guest_type;
pub mod keys;
mod ops;
mod plan;
pub(crate) mod record;
pub mod redact;
pub mod retention;
pub mod review;
pub mod timestamp;

pub use ops::{DEFAULT_SETTLE_MS, Screenshot};
