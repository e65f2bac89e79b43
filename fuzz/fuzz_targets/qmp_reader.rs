//! libFuzzer entry of [`kiln_fuzz::targets::qmp_reader`] (its checks are documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::targets::qmp_reader::run(data));
