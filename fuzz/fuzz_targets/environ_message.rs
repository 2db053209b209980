//! The start-up message as the guest's init decodes it.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    host_services::fuzzing::start_up_message(input);
});
