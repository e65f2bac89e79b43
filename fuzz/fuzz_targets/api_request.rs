//! libFuzzer entry of [`kiln_fuzz::targets::api_request`] (its checks are documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::targets::api_request::run(data));
