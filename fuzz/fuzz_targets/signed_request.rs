//! SigV4 and execution-role session tokens on any request a caller sends.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    host_services::fuzzing::signed_request(input);
});
