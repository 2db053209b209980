//! The guest's log stream cut into lines, however its reads fall.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    host_services::fuzzing::log_stream(input);
});
