//! The vsock TX packet parser on guest-chosen queue contents.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    vmm::devices::virtio::fuzzing::vsock_tx_packets(input);
});
