//! The virtio-mmio transport's registers, read and written in any order,
//! at any width, with any value, driving a block device.
#![no_main]

libfuzzer_sys::fuzz_target!(|input: &[u8]| {
    vmm::devices::virtio::fuzzing::mmio_register_accesses(input);
});
