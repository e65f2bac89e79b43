//! libFuzzer entry of [`kiln_fuzz::targets::snapshot_manifest`] (its checks are documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::targets::snapshot_manifest::run(data));
