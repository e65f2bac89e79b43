//! libFuzzer entry of [`kiln_fuzz::targets::control_messages`] (its checks are documented there).

#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| kiln_fuzz::targets::control_messages::run(data));
