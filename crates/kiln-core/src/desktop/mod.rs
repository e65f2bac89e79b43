//! Desktop sandboxes, host side. QEMU shows the screen and feeds the input devices; the
//! guest is asked for nothing but text a US keyboard cannot type.
//!
//! - [`frame`], [`keys`]: the pure, VM-free pieces (PPM frames → PNG, settle detection, key
//!   combinations, typing plans, pointer events); no I/O, no clock.
//! - `ops`: the engine's desktop operations (screenshot, actions with receipts, the VNC
//!   socket), through the sandbox's owner.

pub mod frame;
pub mod keys;
mod ops;

pub use ops::{DEFAULT_SETTLE_MS, Screenshot};
