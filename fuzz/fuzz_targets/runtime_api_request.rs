//! The Runtime API on any bytes a runtime sends on its connection, with
//! an invocation waiting.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    host_services::fuzzing::runtime_api_requests(input);
});
