//! The block device on guest-chosen queue contents.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    vmm::devices::virtio::fuzzing::block_requests(input);
});
