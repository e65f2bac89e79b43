//! Desktop sandboxes, host side: the pure, VM-free pieces that turn QEMU's screen and input
//! into what an agent needs (screenshots, settle detection, key combinations, typing plans,
//! pointer events). Nothing here performs I/O or reads a clock.

pub mod frame;
pub mod keys;
