//! libFuzzer entry of [`kiln_fuzz::targets::handshake`] (its checks are documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::targets::handshake::run(data));
