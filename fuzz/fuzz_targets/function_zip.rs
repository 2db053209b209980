//! A function's ZIP as a caller uploads it.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    host_services::fuzzing::function_zip(input);
});
