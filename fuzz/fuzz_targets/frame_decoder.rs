//! libFuzzer entry of [`kiln_fuzz::targets::frame_decoder`] (its checks are documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::targets::frame_decoder::run(data));
