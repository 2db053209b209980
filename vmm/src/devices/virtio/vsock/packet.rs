//! virtio-vsock packets: a 44-byte little-endian header and, for data, a
//! payload. Parsing bounds every length by what the guest's buffers hold
//! and by [`MAX_PAYLOAD`], so a hostile header cannot make the device read
//! or allocate more than that.

use std::io::{Read, Write};

use virtio_queue::{DescriptorChain, Reader, Writer};
use vm_memory::{ByteValued, GuestMemoryMmap};

pub const HEADER_SIZE: usize = 44;
/// The largest payload the device takes or gives in one packet.
pub const MAX_PAYLOAD: usize = 64 << 10;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[repr(C, packed)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

// SAFETY: plain integers, packed, no padding.
unsafe impl ByteValued for Header {}

const _: () = assert!(std::mem::size_of::<Header>() == HEADER_SIZE);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PacketError {
    #[error("descriptor chain: {0}")]
    Chain(String),
    #[error("chain shorter than a packet header")]
    ShortHeader,
    #[error("payload length {0} exceeds the {MAX_PAYLOAD}-byte limit")]
    PayloadTooLong(u32),
    #[error("payload length {declared} but the chain holds {available} bytes")]
    PayloadTruncated { declared: u32, available: usize },
    #[error("RX buffer of {0} bytes cannot hold a packet header")]
    RxBufferTooSmall(usize),
}

/// A packet taken from the TX queue.
#[derive(Debug)]
pub struct TxPacket {
    pub header: Header,
    pub payload: Vec<u8>,
}

/// Reads one packet from a TX descriptor chain.
pub fn parse_tx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<TxPacket, PacketError> {
    let mut reader = Reader::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
    let header: Header = reader.read_obj().map_err(|_| PacketError::ShortHeader)?;
    let declared = header.len;
    if declared as usize > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLong(declared));
    }
    let available = reader.available_bytes();
    if available < declared as usize {
        return Err(PacketError::PayloadTruncated {
            declared,
            available,
        });
    }
    let mut payload = vec![0u8; declared as usize];
    reader
        .read_exact(&mut payload)
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    Ok(TxPacket { header, payload })
}

/// An RX buffer the guest offered: how many payload bytes it can take.
pub fn rx_capacity(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
) -> Result<usize, PacketError> {
    let writer = Writer::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
    let total = writer.available_bytes();
    total
        .checked_sub(HEADER_SIZE)
        .map(|room| room.min(MAX_PAYLOAD))
        .ok_or(PacketError::RxBufferTooSmall(total))
}

/// Writes a packet into an RX descriptor chain; returns the bytes written.
/// The payload must fit: callers size it with [`rx_capacity`].
/// Writes a 4-byte event (`struct virtio_vsock_event`) into an event
/// queue buffer.
pub fn write_event(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    id: u32,
) -> Result<u32, PacketError> {
    let mut writer = Writer::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
    writer
        .write_obj(id.to_le())
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    Ok(4)
}

pub fn write_rx(
    mem: &GuestMemoryMmap,
    chain: DescriptorChain<&GuestMemoryMmap>,
    header: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let mut writer = Writer::new(mem, chain).map_err(|e| PacketError::Chain(e.to_string()))?;
    writer
        .write_obj(*header)
        .and_then(|_| writer.write_all(payload))
        .map_err(|e| PacketError::Chain(e.to_string()))?;
    Ok((HEADER_SIZE + payload.len()) as u32)
}
