//! virtio-rng: fills the guest's buffers from the host's getrandom(2), so
//! the guest's entropy pool starts full.

use std::io::Write;
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueT, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::{Interrupt, VirtioDevice, INTERRUPT_USED_RING, TYPE_RNG, VIRTIO_F_VERSION_1};
use crate::devices::watch::watch;

const QUEUE_SIZE: u16 = 64;
/// Bytes served per request at most, however large the buffer.
const MAX_REQUEST: usize = 64 << 10;

pub struct Rng {
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    active: Option<(GuestMemoryMmap, Interrupt)>,
    buf: Vec<u8>,
}

fn getrandom(buf: &mut [u8]) -> std::io::Result<()> {
    let mut filled = 0;
    while filled < buf.len() {
        // SAFETY: the kernel writes at most `len` bytes into the slice.
        let n =
            unsafe { libc::getrandom(buf[filled..].as_mut_ptr().cast(), buf.len() - filled, 0) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() != std::io::ErrorKind::Interrupted {
                return Err(e);
            }
        } else {
            filled += n as usize;
        }
    }
    Ok(())
}

impl Rng {
    pub fn new() -> std::io::Result<Self> {
        Ok(Self {
            queues: vec![Queue::new(QUEUE_SIZE).map_err(|e| std::io::Error::other(e.to_string()))?],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            active: None,
            buf: vec![0; MAX_REQUEST],
        })
    }

    pub fn process_queue(&mut self) {
        let Some((mem, interrupt)) = self.active.clone() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = self.queues[0].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let written = match Writer::new(&mem, chain) {
                Ok(mut writer) => {
                    let n = writer.available_bytes().min(MAX_REQUEST);
                    let buf = &mut self.buf[..n];
                    match getrandom(buf).and_then(|_| writer.write_all(buf)) {
                        Ok(()) => n as u32,
                        Err(e) => {
                            tracing::warn!("virtio-rng: {e}");
                            0
                        }
                    }
                }
                Err(e) => {
                    tracing::warn!("virtio-rng: malformed request dropped: {e}");
                    0
                }
            };
            if self.queues[0].add_used(&mem, head, written).is_err() {
                break;
            }
            used_any = true;
        }
        if used_any && self.queues[0].needs_notification(&mem).unwrap_or(true) {
            interrupt.signal(INTERRUPT_USED_RING);
        }
    }
}

impl VirtioDevice for Rng {
    fn device_type(&self) -> u32 {
        TYPE_RNG
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
    }

    fn ack_features(&mut self, _features: u64) {}

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Interrupt) {
        self.active = Some((mem, interrupt));
        // As with virtio-blk: buffers offered before DRIVER_OK are filled
        // by the event loop, not by the vCPU thread starting the device.
        let _ = self.queue_events[0].write(1);
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.queues.iter_mut().for_each(|q| q.reset());
    }
}

impl MutEventSubscriber for Rng {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_events[0].as_raw_fd() {
            let _ = self.queue_events[0].read();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let queue = Events::new(&self.queue_events[0], EventSet::IN);
        watch(ops, queue, "the virtio-rng queue");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    #[test]
    fn fills_buffers_with_fresh_randomness_and_caps_large_ones() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let mock = MockSplitQueue::new(&mem, 16);
        let d = |addr, len| RawDescriptor::from(SplitDescriptor::new(addr, len, 2, 0));
        mock.add_desc_chains(&[d(0x10_0000, 64), d(0x20_0000, 1 << 20)], 0)
            .unwrap();
        let mut rng = Rng::new().unwrap();
        rng.queues[0] = mock.create_queue().unwrap();
        rng.activate(
            mem.clone(),
            Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap()),
        );
        // Activation leaves the offered buffers to the event loop.
        assert_eq!(rng.queue_events[0].read().unwrap(), 1);
        rng.process_queue();
        let used = mock.used_addr();
        let len0: u32 = mem.read_obj(used.unchecked_add(8)).unwrap();
        let len1: u32 = mem.read_obj(used.unchecked_add(16)).unwrap();
        assert_eq!((len0, len1), (64, MAX_REQUEST as u32));
        let mut bytes = [0u8; 64];
        mem.read_slice(&mut bytes, GuestAddress(0x10_0000)).unwrap();
        assert!(
            bytes.iter().any(|&b| b != 0),
            "64 zero bytes from getrandom"
        );
    }
}
