//! virtio-entropy: random bytes from the host, one request at a time.
//! Nothing is kept or expanded in the guest, so a restored clone never
//! repeats what its snapshot's other clones drew.

use super::mmio::{InitError, Transport};
use super::queue::{Buffer, VirtQueue};
use super::{Devices, DEVICE_ENTROPY};
use crate::cpu::Waiter;

pub struct EntropyDevice {
    queue: VirtQueue,
}

/// The entropy device, found and set up when first used: most functions
/// never ask, and each register access of the search and set-up is a VM
/// exit.
pub enum Entropy {
    Unsought(&'static Devices),
    Ready(EntropyDevice),
    Absent,
    Failed,
}

/// Why [`Entropy::fill`] gave nothing.
pub enum EntropyError {
    /// The VM has no entropy device.
    Absent,
    /// It has one, which failed.
    Failed,
}

impl Entropy {
    /// Fills `buf` from the device.
    pub fn fill(&mut self, buf: &mut [u8]) -> Result<(), EntropyError> {
        if let Entropy::Unsought(devices) = self {
            *self = match devices.find(DEVICE_ENTROPY).map(EntropyDevice::new) {
                None => Entropy::Absent,
                Some(Ok(device)) => Entropy::Ready(device),
                Some(Err(e)) => {
                    println!("runtime: entropy device: {e}");
                    Entropy::Failed
                }
            };
        }
        match self {
            Entropy::Ready(device) => match device.fill(buf) {
                true => Ok(()),
                false => Err(EntropyError::Failed),
            },
            Entropy::Absent => Err(EntropyError::Absent),
            _ => Err(EntropyError::Failed),
        }
    }
}

impl EntropyDevice {
    pub fn new(transport: Transport) -> Result<Self, InitError> {
        transport.begin_init()?;
        let queue = transport.setup_queue(0, 4)?;
        transport.finish_init();
        Ok(EntropyDevice { queue })
    }

    /// Fills `buf`; `false` if the device stopped giving bytes.
    pub fn fill(&mut self, buf: &mut [u8]) -> bool {
        let mut filled = 0;
        while filled < buf.len() {
            let rest = &mut buf[filled..];
            let chain = [Buffer {
                addr: rest.as_mut_ptr() as u64,
                len: rest.len().min(u32::MAX as usize) as u32,
                writable: true,
            }];
            if self.queue.add(&chain).is_none() {
                return false;
            }
            self.queue.notify();
            let mut waiter = Waiter::new();
            let written = loop {
                if let Some((_, len)) = self.queue.pop_used() {
                    break len as usize;
                }
                waiter.wait();
            };
            if written == 0 {
                return false;
            }
            filled += written.min(rest.len());
        }
        true
    }
}
