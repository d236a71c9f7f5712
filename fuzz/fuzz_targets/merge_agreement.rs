#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| imgfs::fuzz_entry::merge_agreement(data));
