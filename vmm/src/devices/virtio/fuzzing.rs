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
    const ACCESS_BYTES: usize = 8;
    let (&count, rest) = input.split_first().unwrap_or((&0, &[]));
    let count = usize::from(count).min(rest.len() / ACCESS_BYTES);
    let (accesses, data) = rest.split_at(count * ACCESS_BYTES);
    let Ok(mem) = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_SIZE as usize)]) else {
        return;
    };
    let data = &data[..data.len().min((MEM_SIZE - DATA) as usize)];
    let (Ok(()), Ok(block), Ok(irqfd)) = (
        mem.write_slice(data, GuestAddress(DATA)),
        Block::new(Box::new(MemoryImage(vec![0x5a; 64 << 10])), false, "fuzz"),
        EventFd::new(libc::EFD_NONBLOCK),
    ) else {
        return;
    };
    let block = std::sync::Arc::new(std::sync::Mutex::new(block));
    let mut transport = MmioTransport::new(mem, block.clone(), Interrupt::new(irqfd));
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
}

#[cfg(test)]
mod tests {
    use proptest::collection::vec;
    use proptest::prelude::*;

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
