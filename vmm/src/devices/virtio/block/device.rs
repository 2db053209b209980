//! The virtio-blk device and its queue processing.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{DescriptorChain, Queue, QueueT, Reader, Writer};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::backend::BlockBackend;
use super::request::{
    checked_range, RequestHeader, RequestType, SECTOR_SIZE, VIRTIO_BLK_ID_BYTES,
    VIRTIO_BLK_S_IOERR, VIRTIO_BLK_S_OK, VIRTIO_BLK_S_UNSUPP,
};
use crate::devices::virtio::{
    read_config_bytes, Interrupt, VirtioDevice, INTERRUPT_USED_RING, TYPE_BLOCK, VIRTIO_F_VERSION_1,
};
use crate::devices::watch::watch;

const QUEUE_SIZE: u16 = 256;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;
/// Data moves through a bounce buffer of this size, so a request's size
/// never decides how much the VMM allocates.
const CHUNK: usize = 128 << 10;

pub struct Block {
    backend: Box<dyn BlockBackend>,
    read_only: bool,
    id: String,
    config: [u8; 8],
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    acked_features: u64,
    active: Option<(GuestMemoryMmap, Interrupt)>,
    bounce: Vec<u8>,
}

impl Block {
    pub fn new(backend: Box<dyn BlockBackend>, read_only: bool, id: &str) -> std::io::Result<Self> {
        let capacity_sectors = backend.size() / SECTOR_SIZE;
        Ok(Self {
            backend,
            read_only,
            id: id.chars().take(VIRTIO_BLK_ID_BYTES).collect(),
            config: capacity_sectors.to_le_bytes(),
            queues: vec![Queue::new(QUEUE_SIZE).map_err(|e| std::io::Error::other(e.to_string()))?],
            queue_events: vec![EventFd::new(libc::EFD_NONBLOCK)?],
            acked_features: 0,
            active: None,
            bounce: vec![0; CHUNK],
        })
    }

    /// Serves every available request and interrupts the driver if it asked.
    pub fn process_queue(&mut self) {
        let Some((mem, interrupt)) = self.active.clone() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = self.queues[0].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            let written = self.handle(&mem, chain).unwrap_or(0);
            if let Err(e) = self.queues[0].add_used(&mem, head, written) {
                tracing::warn!("virtio-blk: cannot return a used buffer: {e}");
                break;
            }
            used_any = true;
        }
        if used_any && self.queues[0].needs_notification(&mem).unwrap_or(true) {
            interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    /// Serves one request; returns the bytes written into the guest's
    /// buffers, status byte included. `None` when the chain has no room for
    /// a status byte: the request is dropped and logged.
    fn handle(
        &mut self,
        mem: &GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
    ) -> Option<u32> {
        let reader = Reader::new(mem, chain.clone());
        let writer = Writer::new(mem, chain);
        let (mut reader, mut writer) = match (reader, writer) {
            (Ok(r), Ok(w)) => (r, w),
            (Err(e), _) | (_, Err(e)) => {
                tracing::warn!("virtio-blk: malformed descriptor chain dropped: {e}");
                return None;
            }
        };
        let Some(status_at) = writer.available_bytes().checked_sub(1) else {
            tracing::warn!("virtio-blk: request without a writable status byte dropped");
            return None;
        };
        let Ok(mut status_writer) = writer.split_at(status_at) else {
            return None;
        };
        let (status, data_written) = match reader.read_obj::<RequestHeader>() {
            Ok(header) => self.execute(header, &mut reader, &mut writer),
            Err(_) => {
                tracing::warn!("virtio-blk: request without a full header");
                (VIRTIO_BLK_S_IOERR, 0)
            }
        };
        if status_writer.write_all(&[status]).is_err() {
            return None;
        }
        Some(data_written + 1)
    }

    /// Runs a parsed request; returns its status and the data bytes written
    /// to the guest.
    fn execute(
        &mut self,
        header: RequestHeader,
        reader: &mut Reader,
        writer: &mut Writer,
    ) -> (u8, u32) {
        let capacity = self.backend.size();
        match RequestType::from(header.request_type) {
            RequestType::In => {
                let len = writer.available_bytes() as u64;
                let mut offset = match checked_range(header.sector, len, capacity) {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!("virtio-blk: read refused: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                };
                let mut written = 0u32;
                while writer.available_bytes() > 0 {
                    let n = writer.available_bytes().min(CHUNK);
                    let buf = &mut self.bounce[..n];
                    if let Err(e) = self.backend.read_at(buf, offset) {
                        tracing::warn!("virtio-blk: read at {offset}: {e}");
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    if writer.write_all(buf).is_err() {
                        return (VIRTIO_BLK_S_IOERR, written);
                    }
                    offset += n as u64;
                    written += n as u32;
                }
                (VIRTIO_BLK_S_OK, written)
            }
            RequestType::Out => {
                if self.read_only {
                    return (VIRTIO_BLK_S_IOERR, 0);
                }
                let len = reader.available_bytes() as u64;
                let mut offset = match checked_range(header.sector, len, capacity) {
                    Ok(o) => o,
                    Err(e) => {
                        tracing::warn!("virtio-blk: write refused: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                };
                while reader.available_bytes() > 0 {
                    let n = reader.available_bytes().min(CHUNK);
                    let buf = &mut self.bounce[..n];
                    if reader.read_exact(buf).is_err() {
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    if let Err(e) = self.backend.write_at(buf, offset) {
                        tracing::warn!("virtio-blk: write at {offset}: {e}");
                        return (VIRTIO_BLK_S_IOERR, 0);
                    }
                    offset += n as u64;
                }
                (VIRTIO_BLK_S_OK, 0)
            }
            RequestType::Flush => match self.backend.flush() {
                Ok(()) => (VIRTIO_BLK_S_OK, 0),
                Err(e) => {
                    tracing::warn!("virtio-blk: flush: {e}");
                    (VIRTIO_BLK_S_IOERR, 0)
                }
            },
            RequestType::GetId => {
                let id = self.id.as_bytes();
                let n = writer.available_bytes().min(id.len());
                match writer.write_all(&id[..n]) {
                    Ok(()) => (VIRTIO_BLK_S_OK, n as u32),
                    Err(_) => (VIRTIO_BLK_S_IOERR, 0),
                }
            }
            RequestType::Unsupported(kind) => {
                tracing::debug!("virtio-blk: unsupported request type {kind}");
                (VIRTIO_BLK_S_UNSUPP, 0)
            }
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | if self.read_only { VIRTIO_BLK_F_RO } else { 0 }
    }

    fn ack_features(&mut self, features: u64) {
        self.acked_features = features;
    }

    fn queues(&self) -> &[Queue] {
        &self.queues
    }

    fn queues_mut(&mut self) -> &mut [Queue] {
        &mut self.queues
    }

    fn queue_events(&self) -> &[EventFd] {
        &self.queue_events
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("virtio-blk: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Interrupt) {
        self.active = Some((mem, interrupt));
        // Requests the driver queued before DRIVER_OK are served as if it
        // had notified them, by the event loop: a vCPU thread may be the
        // one starting the device, and its filter allows no file I/O.
        let _ = self.queue_events[0].write(1);
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.queues.iter_mut().for_each(|q| q.reset());
    }
}

impl MutEventSubscriber for Block {
    fn process(&mut self, events: Events, _ops: &mut EventOps) {
        if events.fd() == self.queue_events[0].as_raw_fd() {
            let _ = self.queue_events[0].read();
            self.process_queue();
        }
    }

    fn init(&mut self, ops: &mut EventOps) {
        let queue = Events::new(&self.queue_events[0], EventSet::IN);
        watch(ops, queue, "the virtio-blk queue");
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    /// An in-memory image shared with the test.
    #[derive(Clone)]
    struct MemImage(Arc<Mutex<Vec<u8>>>);

    impl BlockBackend for MemImage {
        fn size(&self) -> u64 {
            self.0.lock().unwrap().len() as u64
        }
        fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
            let img = self.0.lock().unwrap();
            buf.copy_from_slice(&img[offset as usize..offset as usize + buf.len()]);
            Ok(())
        }
        fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
            let mut img = self.0.lock().unwrap();
            img[offset as usize..offset as usize + buf.len()].copy_from_slice(buf);
            Ok(())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    struct Harness {
        mem: GuestMemoryMmap,
        image: MemImage,
        block: Block,
    }

    const HEADER: u64 = 0x10_0000;
    const DATA: u64 = 0x10_1000;
    const STATUS: u64 = 0x10_3000;

    fn harness(read_only: bool) -> Harness {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 4 << 20)]).unwrap();
        let pattern: Vec<u8> = (0..8192u32).map(|i| (i % 251) as u8).collect();
        let image = MemImage(Arc::new(Mutex::new(pattern)));
        let block = Block::new(Box::new(image.clone()), read_only, "test-disk").unwrap();
        Harness { mem, image, block }
    }

    fn desc(addr: u64, len: u32, flags: u16, next: u16) -> RawDescriptor {
        RawDescriptor::from(SplitDescriptor::new(addr, len, flags, next))
    }

    /// Submits `descs` as the first chain of a fresh queue, runs the device,
    /// and returns the used length and the status byte.
    fn submit(h: &mut Harness, header: RequestHeader, descs: &[RawDescriptor]) -> (u32, u8) {
        let mock = MockSplitQueue::new(&h.mem, 16);
        h.mem.write_obj(header, GuestAddress(HEADER)).unwrap();
        h.mem.write_obj(0xffu8, GuestAddress(STATUS)).unwrap();
        mock.add_desc_chains(descs, 0).unwrap();
        h.block.queues[0] = mock.create_queue().unwrap();
        let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
        h.block.activate(h.mem.clone(), irq);
        // Activation leaves the pending requests to the event loop.
        assert_eq!(h.block.queue_events[0].read().unwrap(), 1);
        h.block.process_queue();
        let used_len: u32 = h
            .mem
            .read_obj(mock.used_addr().unchecked_add(4 + 4))
            .unwrap();
        let used_idx: u16 = h.mem.read_obj(mock.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used_idx, 1, "exactly one request completed");
        (used_len, h.mem.read_obj(GuestAddress(STATUS)).unwrap())
    }

    fn header(kind: u32, sector: u64) -> RequestHeader {
        RequestHeader {
            request_type: kind,
            reserved: 0,
            sector,
        }
    }

    fn request(data_len: u32, data_flags: u16) -> Vec<RawDescriptor> {
        vec![
            desc(HEADER, 16, F_NEXT, 1),
            desc(DATA, data_len, F_NEXT | data_flags, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ]
    }

    use vm_memory::Address;

    #[test]
    fn reads_return_the_image_bytes() {
        let mut h = harness(true);
        let (len, status) = submit(&mut h, header(0, 2), &request(1024, F_WRITE));
        assert_eq!((len, status), (1025, VIRTIO_BLK_S_OK));
        let mut got = vec![0u8; 1024];
        h.mem.read_slice(&mut got, GuestAddress(DATA)).unwrap();
        assert_eq!(got, h.image.0.lock().unwrap()[1024..2048]);
    }

    #[test]
    fn writes_reach_the_image_and_flush_succeeds() {
        let mut h = harness(false);
        h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let (_, status) = submit(&mut h, header(1, 3), &request(512, 0));
        assert_eq!(status, VIRTIO_BLK_S_OK);
        assert_eq!(h.image.0.lock().unwrap()[1536..2048], [0xab; 512]);
        let flush = [desc(HEADER, 16, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(submit(&mut h, header(4, 0), &flush).1, VIRTIO_BLK_S_OK);
    }

    #[test]
    fn read_only_images_refuse_writes_untouched() {
        let mut h = harness(true);
        let before = h.image.0.lock().unwrap().clone();
        h.mem.write_slice(&[0xab; 512], GuestAddress(DATA)).unwrap();
        let (_, status) = submit(&mut h, header(1, 0), &request(512, 0));
        assert_eq!(status, VIRTIO_BLK_S_IOERR);
        assert_eq!(*h.image.0.lock().unwrap(), before);
    }

    #[test]
    fn out_of_bounds_and_unaligned_requests_fail() {
        let mut h = harness(false);
        assert_eq!(
            submit(&mut h, header(0, 16), &request(512, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            submit(&mut h, header(0, 15), &request(1024, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            submit(&mut h, header(0, u64::MAX), &request(512, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
        assert_eq!(
            submit(&mut h, header(0, 0), &request(100, F_WRITE)).1,
            VIRTIO_BLK_S_IOERR
        );
    }

    #[test]
    fn get_id_and_unknown_types() {
        let mut h = harness(true);
        let (len, status) = submit(&mut h, header(8, 0), &request(20, F_WRITE));
        assert_eq!((len, status), (10, VIRTIO_BLK_S_OK));
        let mut id = [0u8; 9];
        h.mem.read_slice(&mut id, GuestAddress(DATA)).unwrap();
        assert_eq!(&id, b"test-disk");
        assert_eq!(
            submit(&mut h, header(77, 0), &request(512, F_WRITE)).1,
            VIRTIO_BLK_S_UNSUPP
        );
    }

    #[test]
    fn hostile_chains_are_completed_or_dropped_without_touching_other_memory() {
        let mut h = harness(false);
        // A short header.
        let short = [desc(HEADER, 8, F_NEXT, 1), desc(STATUS, 1, F_WRITE, 0)];
        assert_eq!(submit(&mut h, header(0, 0), &short).1, VIRTIO_BLK_S_IOERR);
        // No writable byte for the status: dropped, used length 0.
        let no_status = [desc(HEADER, 16, 0, 0)];
        assert_eq!(submit(&mut h, header(0, 0), &no_status).0, 0);
        // A buffer outside guest memory: dropped, nothing written.
        let outside = [
            desc(HEADER, 16, F_NEXT, 1),
            desc(1 << 40, 512, F_NEXT | F_WRITE, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        let (len, status) = submit(&mut h, header(0, 0), &outside);
        assert_eq!((len, status), (0, 0xff));
        // A length that wraps the address space.
        let wrapping = [
            desc(HEADER, 16, F_NEXT, 1),
            desc(u64::MAX - 10, 512, F_NEXT | F_WRITE, 2),
            desc(STATUS, 1, F_WRITE, 0),
        ];
        assert_eq!(submit(&mut h, header(0, 0), &wrapping).0, 0);
        // A chain that loops back on itself ends at the queue size.
        let looping = [
            desc(HEADER, 16, F_NEXT, 1),
            desc(DATA, 512, F_NEXT | F_WRITE, 0),
        ];
        let _ = submit(&mut h, header(0, 0), &looping);
    }
}
