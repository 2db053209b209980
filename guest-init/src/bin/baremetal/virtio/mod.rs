//! Polling virtio drivers: devices are found through the
//! `virtio_mmio.device=` entries of the command line, as Linux finds them,
//! and completions are polled, so no interrupt is ever needed.

pub mod blk;
pub mod mmio;
pub mod queue;
pub mod rng;
pub mod vsock;

use alloc::vec::Vec;
use core::cell::Cell;

use mmio::Transport;

pub const DEVICE_BLOCK: u32 = 2;
pub const DEVICE_ENTROPY: u32 = 4;
pub const DEVICE_VSOCK: u32 = 19;

/// The virtio-mmio devices the command line declares, each probed only
/// when a search reaches it: reading a device's ID is a VM exit (about
/// 26 us on a PVM host), and the entropy device, last, is rarely used.
pub struct Devices {
    /// Base address, and what was found there once probed.
    windows: Vec<(u64, Cell<Option<Option<Transport>>>)>,
}

impl Devices {
    pub fn discover(cmdline: &str) -> Self {
        let windows = cmdline
            .split_ascii_whitespace()
            .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
            .filter_map(parse_device_entry)
            .map(|base| (base, Cell::new(None)))
            .collect();
        Devices { windows }
    }

    /// The first device of type `id`, in command-line order.
    pub fn find(&self, id: u32) -> Option<Transport> {
        self.windows.iter().find_map(|(base, found)| {
            let transport = found.get().unwrap_or_else(|| {
                let probed = Transport::probe(*base);
                found.set(Some(probed));
                probed
            });
            transport.filter(|t| t.device_id() == id)
        })
    }
}

/// `<size>@<base>:<irq>`, as Linux's virtio_mmio takes it; returns the base.
fn parse_device_entry(entry: &str) -> Option<u64> {
    let (_, rest) = entry.split_once('@')?;
    let base = rest.split(':').next()?;
    let base = base.strip_prefix("0x").unwrap_or(base);
    u64::from_str_radix(base, 16).ok()
}
