//! Devices run on queues whose every byte the input chooses, as a hostile
//! guest could write them: descriptor addresses, lengths, flags and
//! `next` links (loops, chains past the table, buffers outside guest
//! memory or wrapping the address space), and the bytes the buffers hold.
//! The cargo-fuzz targets in `fuzz/` and the property tests below drive
//! the same harnesses; the property is that nothing panics, and the
//! memory-safety of every access is vm-memory's bounds checks.

use virtio_queue::desc::{split::Descriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use virtio_queue::QueueT;
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};
use vmm_sys_util::eventfd::EventFd;

use super::block::{Block, BlockBackend};
use super::mmio::MmioTransport;
use super::vsock::packet::parse_tx;
use super::{Interrupt, VirtioDevice};
use crate::devices::bus::BusDevice;

const MEM_SIZE: u64 = 1 << 20;
/// Where the input's payload bytes land, for descriptors to point at.
const DATA: u64 = 0x8_0000;
const QUEUE_SIZE: u16 = 16;
const DESCRIPTOR_BYTES: usize = 16;

/// Splits `input` into descriptors (16 bytes each, up to the queue size,
/// after a count byte) and the bytes guest memory holds at [`DATA`].
fn layout(input: &[u8]) -> (Vec<RawDescriptor>, &[u8]) {
    let (&count, rest) = input.split_first().unwrap_or((&0, &[]));
    let count =
        (usize::from(count) % usize::from(QUEUE_SIZE) + 1).min(rest.len() / DESCRIPTOR_BYTES);
    let (table, data) = rest.split_at(count * DESCRIPTOR_BYTES);
    let descriptors = table
        .chunks_exact(DESCRIPTOR_BYTES)
        .map(|d| {
            let raw_addr = u64::from_le_bytes(d[0..8].try_into().unwrap_or_default());
            // Mostly inside guest memory, where the interesting bugs are;
            // the top bit keeps the raw value, out of range or wrapping.
            let addr = if raw_addr >> 63 == 1 {
                raw_addr
            } else {
                DATA + raw_addr % (MEM_SIZE - DATA)
            };
            let len = u32::from_le_bytes(d[8..12].try_into().unwrap_or_default());
            let flags = u16::from_le_bytes([d[12], d[13]]) & 0x7;
            let next = u16::from_le_bytes([d[14], d[15]]);
            RawDescriptor::from(Descriptor::new(addr, len, flags, next))
        })
        .collect();
    (descriptors, data)
}

/// Runs `device` on guest memory with `data` at [`DATA`] and the
/// descriptors in a queue.
fn with_guest(
    input: &[u8],
    device: impl FnOnce(&GuestMemoryMmap, &MockSplitQueue<GuestMemoryMmap>),
) {
    let (descriptors, data) = layout(input);
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) else {
        return;
    };
    let data = &data[..data.len().min((MEM_SIZE - DATA) as usize)];
    if mem.write_slice(data, GuestAddress(DATA)).is_err() {
        return;
    }
    let mock = MockSplitQueue::new(&mem, QUEUE_SIZE);
    if mock.add_desc_chains(&descriptors, 0).is_ok() {
        device(&mem, &mock);
    }
}

/// A block image in memory.
struct MemoryImage(Vec<u8>);

impl BlockBackend for MemoryImage {
    fn size(&self) -> u64 {
        self.0.len() as u64
    }

    fn read_at(&mut self, buf: &mut [u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        let source = self
            .0
            .get(start..start + buf.len())
            .ok_or_else(|| std::io::Error::other("read past the image"))?;
        buf.copy_from_slice(source);
        Ok(())
    }

    fn write_at(&mut self, buf: &[u8], offset: u64) -> std::io::Result<()> {
        let start = usize::try_from(offset).map_err(std::io::Error::other)?;
        self.0
            .get_mut(start..start + buf.len())
            .ok_or_else(|| std::io::Error::other("write past the image"))?
            .copy_from_slice(buf);
        Ok(())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

/// The block device serving whatever requests `input` lays out.
pub fn block_requests(input: &[u8]) {
    with_guest(input, |mem, mock| {
        let image = MemoryImage(vec![0x5a; 64 << 10]);
        let (Ok(mut block), Ok(queue), Ok(irqfd)) = (
            Block::new(Box::new(image), false, "fuzz"),
            mock.create_queue(),
            EventFd::new(libc::EFD_NONBLOCK),
        ) else {
            return;
        };
        block.queues_mut()[0] = queue;
        block.activate(mem.clone(), Interrupt::new(irqfd));
        block.process_queue();
    });
}

/// The vsock TX parser on every chain `input` lays out.
pub fn vsock_tx_packets(input: &[u8]) {
    with_guest(input, |mem, mock| {
        let Ok(mut queue) = mock.create_queue::<virtio_queue::Queue>() else {
            return;
        };
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            if let Ok(packet) = parse_tx(mem, chain) {
                assert_eq!(packet.payload.len(), packet.header.len as usize);
            }
        }
    });
}

/// Register accesses to the virtio-mmio transport of a block device, as a
/// driver (or a hostile guest) makes them: each 8 bytes of `input` is one
/// read, write or queue notification, at any offset and width, with any
/// value; the rest of the bytes are guest memory for the queues the
/// accesses set up.
pub fn mmio_register_accesses(input: &[u8]) {
    run_mmio_accesses(input);
}

const ACCESS_BYTES: usize = 8;

/// [`mmio_register_accesses`], handing back guest memory afterwards.
fn run_mmio_accesses(input: &[u8]) -> Option<GuestMemoryMmap> {
    let (&count, rest) = input.split_first().unwrap_or((&0, &[]));
    let count = usize::from(count).min(rest.len() / ACCESS_BYTES);
    let (accesses, data) = rest.split_at(count * ACCESS_BYTES);
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]).ok()?;
    let data = &data[..data.len().min((MEM_SIZE - DATA) as usize)];
    let (Ok(()), Ok(block), Ok(irqfd)) = (
        mem.write_slice(data, GuestAddress(DATA)),
        Block::new(Box::new(MemoryImage(vec![0x5a; 64 << 10])), false, "fuzz"),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return None;
    };
    let block = std::sync::Arc::new(std::sync::Mutex::new(block));
    let mut transport = MmioTransport::new(mem.clone(), block.clone(), Interrupt::new(irqfd));
    for access in accesses.chunks_exact(ACCESS_BYTES) {
        // Registers and the first bytes of the configuration space.
        let offset = u64::from(u16::from_le_bytes([access[1], access[2]]) % 0x180);
        let width = [1, 2, 4, 8][usize::from(access[3] & 3)];
        let mut value = [0u8; 8];
        value[..4].copy_from_slice(&access[4..8]);
        match access[0] % 3 {
            0 => transport.read(offset, &mut value[..width]),
            1 => transport.write(offset, &value[..width]),
            // What the queue's ioeventfd starts in the event loop.
            _ => {
                let mut block = block.lock().unwrap_or_else(|e| e.into_inner());
                if block.is_activated() {
                    block.process_queue();
                }
            }
        }
    }
    Some(mem)
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

    use std::path::Path;

    use super::*;

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(512))]

        #[test]
        fn block_survives_any_queue(input in vec(any::<u8>(), 0..512)) {
            block_requests(&input);
        }

        #[test]
        fn vsock_tx_survives_any_queue(input in vec(any::<u8>(), 0..512)) {
            vsock_tx_packets(&input);
        }

        #[test]
        fn the_mmio_transport_survives_any_register_accesses(input in vec(any::<u8>(), 0..1024)) {
            mmio_register_accesses(&input);
        }
    }

    /// A driver's whole set-up and one read, as accesses the harness
    /// takes: the fuzzer's inputs can reach the device's data path (this
    /// input is also a good seed for its corpus).
    #[test]
    fn a_driver_set_up_through_the_registers_reads_the_disk() {
        const QUEUE: u64 = DATA;
        const AVAIL: u64 = DATA + 0x1000;
        const USED: u64 = DATA + 0x2000;
        const HEADER: u64 = DATA + 0x3000;
        const BUFFER: u64 = DATA + 0x4000;
        const STATUS: u64 = DATA + 0x5000;
        let (write, notify) = (1u8, 2u8);
        let accesses: &[(u8, u16, u32)] = &[
            (write, 0x070, 1),
            (write, 0x070, 3),
            (write, 0x024, 1),
            (write, 0x020, 1), // VIRTIO_F_VERSION_1, bit 32
            (write, 0x070, 11),
            (write, 0x030, 0),
            (write, 0x038, 16),
            (write, 0x080, QUEUE as u32),
            (write, 0x090, AVAIL as u32),
            (write, 0x0a0, USED as u32),
            (write, 0x044, 1),
            (write, 0x070, 15),
            (notify, 0x050, 0),
        ];
        let mut input = vec![accesses.len() as u8];
        for &(kind, offset, value) in accesses {
            input.push(kind);
            input.extend_from_slice(&offset.to_le_bytes());
            input.push(2); // 4 bytes wide
            input.extend_from_slice(&value.to_le_bytes());
        }
        let mut memory = vec![0u8; 0x5001];
        let mut put = |at: u64, bytes: &[u8]| {
            let at = (at - DATA) as usize;
            memory[at..at + bytes.len()].copy_from_slice(bytes);
        };
        // A read of sector 0: header (device-readable), 512 bytes and a
        // status byte (device-writable), chained.
        for (i, (addr, len, flags)) in [(HEADER, 16u32, 1u16), (BUFFER, 512, 3), (STATUS, 1, 2)]
            .into_iter()
            .enumerate()
        {
            let mut descriptor = addr.to_le_bytes().to_vec();
            descriptor.extend_from_slice(&len.to_le_bytes());
            descriptor.extend_from_slice(&flags.to_le_bytes());
            descriptor.extend_from_slice(&(i as u16 + 1).to_le_bytes());
            put(QUEUE + 16 * i as u64, &descriptor);
        }
        put(AVAIL, &[0, 0, 1, 0, 0, 0]); // flags, idx 1, ring[0] = 0
        put(HEADER, &[0; 16]); // VIRTIO_BLK_T_IN, sector 0
        put(STATUS, &[0xff]);
        input.extend_from_slice(&memory);
        let mem = run_mmio_accesses(&input).unwrap();
        let read = |at: u64, len: usize| {
            let mut bytes = vec![0u8; len];
            mem.read_slice(&mut bytes, GuestAddress(at)).unwrap();
            bytes
        };
        assert_eq!(read(USED + 2, 2), [1, 0], "one request used");
        assert_eq!(read(STATUS, 1), [0], "VIRTIO_BLK_S_OK");
        assert_eq!(read(BUFFER, 512), vec![0x5a; 512], "the image's bytes");
        if let Ok(dir) = std::env::var("MICROVM_FUZZ_SEED_DIR") {
            let dir = Path::new(&dir).join("mmio_transport");
            std::fs::create_dir_all(&dir).unwrap();
            std::fs::write(dir.join("driver-read"), &input).unwrap();
        }
    }

    #[test]
    fn a_well_formed_request_is_laid_out_as_given() {
        let mut input = vec![2u8];
        for (addr, len, flags, next) in [(0u64, 16u32, 1u16, 1u16), (16, 1, 2, 0)] {
            input.extend_from_slice(&addr.to_le_bytes());
            input.extend_from_slice(&len.to_le_bytes());
            input.extend_from_slice(&flags.to_le_bytes());
            input.extend_from_slice(&next.to_le_bytes());
        }
        input.extend_from_slice(b"payload");
        let (descriptors, data) = layout(&input);
        assert_eq!(descriptors.len(), 2);
        assert_eq!(data, b"payload");
    }
}
