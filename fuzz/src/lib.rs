//! Shared harness for kiln's fuzz targets (`fuzz_targets/*.rs`).
//!
//! Owns: the global allocator of every target ([`alloc::CappedAlloc`]), the per-input
//! memory [`Budget`] it enforces, and the targets' checks ([`targets`]: one `run(data)` per
//! target, shared by the libFuzzer entries in `fuzz_targets/` and the corpus replay in
//! `tests/corpus.rs`).
//!
//! Why an allocator: the protocol's first rule for hostile input is "never reserve memory from
//! a peer-supplied length before checking it against a cap" (`docs/protocol.md`). A decoder
//! that breaks it does not panic, it just allocates, so a panic-only fuzz target would miss it.
//! Every allocation a target makes while a [`Budget`] is open is therefore bounded by a
//! multiple of the input length: a header announcing 1 MiB (or 8 KiB) in a short input cannot
//! be satisfied honestly, so an allocation that size is a finding.

pub mod alloc;
pub mod targets;

pub use alloc::Budget;

#[global_allocator]
static ALLOC: alloc::CappedAlloc = alloc::CappedAlloc;
