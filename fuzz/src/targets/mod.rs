//! The fuzz targets' checks, one module per target. Each `run(data)` checks one input and
//! panics on a finding; `fuzz_targets/<name>.rs` hands it to libFuzzer, and `tests/corpus.rs`
//! replays the committed seed corpus through it on a stable toolchain (CI does that).

pub mod api_request;
pub mod control_messages;
pub mod frame_decoder;
pub mod handshake;
pub mod qmp_reader;
pub mod snapshot_manifest;

/// A target's check of one input: returns, or panics on a finding.
pub type Check = fn(&[u8]);

/// Every target: its name (the directory of its seeds under `corpus/`) and its check.
pub const ALL: &[(&str, Check)] = &[
    ("api_request", api_request::run),
    ("control_messages", control_messages::run),
    ("frame_decoder", frame_decoder::run),
    ("handshake", handshake::run),
    ("qmp_reader", qmp_reader::run),
    ("snapshot_manifest", snapshot_manifest::run),
];
