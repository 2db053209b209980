//! virtio-entropy: random bytes from the host, one request at a time.
//! Nothing is kept or expanded in the guest, so a restored clone never
//! repeats what its snapshot's other clones drew.

use super::mmio::{InitError, Transport};
use super::queue::{Buffer, VirtQueue};
use crate::cpu::Waiter;

pub struct EntropyDevice {
    queue: VirtQueue,
}

/// The entropy device, set up when first used.
pub enum Entropy {
    Unready(Transport),
    Ready(EntropyDevice),
    Failed,
}

impl Entropy {
    /// Fills `buf` from the device; false if it cannot.
    pub fn fill(&mut self, buf: &mut [u8]) -> bool {
        if let Entropy::Unready(transport) = self {
            *self = match EntropyDevice::new(*transport) {
                Ok(device) => Entropy::Ready(device),
                Err(e) => {
                    println!("runtime: entropy device: {e}");
                    Entropy::Failed
                }
            };
        }
        match self {
            Entropy::Ready(device) => device.fill(buf),
            _ => false,
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
