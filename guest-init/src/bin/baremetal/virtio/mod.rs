//! Polling virtio drivers: devices are found through the
//! `virtio_mmio.device=` entries of the command line, as Linux finds them,
//! and completions are polled, so no interrupt is ever needed.

pub mod blk;
pub mod mmio;
pub mod queue;
pub mod rng;
pub mod vsock;

use alloc::vec::Vec;

use mmio::Transport;

pub const DEVICE_BLOCK: u32 = 2;
pub const DEVICE_ENTROPY: u32 = 4;
pub const DEVICE_VSOCK: u32 = 19;

/// Every virtio-mmio device the command line declares, probed.
pub fn discover(cmdline: &str) -> Vec<Transport> {
    cmdline
        .split_ascii_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(parse_device_entry)
        .filter_map(Transport::probe)
        .collect()
}

/// `<size>@<base>:<irq>`, as Linux's virtio_mmio takes it; returns the base.
fn parse_device_entry(entry: &str) -> Option<u64> {
    let (_, rest) = entry.split_once('@')?;
    let base = rest.split(':').next()?;
    let base = base.strip_prefix("0x").unwrap_or(base);
    u64::from_str_radix(base, 16).ok()
}
