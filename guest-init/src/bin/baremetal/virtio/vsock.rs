//! virtio-vsock stream sockets, driver side, polled. Honours the host's
//! credit and gives its own back as the application consumes data.

use alloc::collections::VecDeque;
use alloc::vec;
use alloc::vec::Vec;

use super::mmio::{InitError, Transport};
use super::queue::{Buffer, DeviceBuffers, VirtQueue};
use crate::cpu::Waiter;

pub const HOST_CID: u64 = 2;
const HEADER: usize = 44;
const RX_BUFFERS: usize = 16;
const RX_PAYLOAD: usize = 64 << 10;
/// Receive buffer offered to the host per stream.
const BUF_ALLOC: u32 = 256 << 10;
const TX_CHUNK: usize = 64 << 10;
const FIRST_LOCAL_PORT: u32 = 49152;
const EVENT_BUFFERS: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;

const TYPE_STREAM: u16 = 1;
const OP_REQUEST: u16 = 1;
const OP_RESPONSE: u16 = 2;
const OP_RST: u16 = 3;
const OP_SHUTDOWN: u16 = 4;
const OP_RW: u16 = 5;
const OP_CREDIT_UPDATE: u16 = 6;
const OP_CREDIT_REQUEST: u16 = 7;
const SHUTDOWN_BOTH: u32 = 3;
const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug)]
pub enum VsockError {
    Init(InitError),
    Refused,
    Closed,
}

impl core::fmt::Display for VsockError {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        match self {
            VsockError::Init(e) => write!(f, "initialization: {e}"),
            VsockError::Refused => f.write_str("connection refused"),
            VsockError::Closed => f.write_str("connection closed"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    Connecting,
    Connected,
    Closed,
}

struct Stream {
    local_port: u32,
    peer_port: u32,
    state: State,
    rx: VecDeque<u8>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    tx_cnt: u32,
    fwd_cnt: u32,
    last_fwd_sent: u32,
    peer_shutdown: u32,
    credit_requested: bool,
}

impl Stream {
    fn new(local_port: u32, peer_port: u32, state: State) -> Self {
        Stream {
            local_port,
            peer_port,
            state,
            rx: VecDeque::new(),
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_sent: 0,
            peer_shutdown: 0,
            credit_requested: false,
        }
    }

    fn peer_credit(&self) -> u32 {
        self.peer_buf_alloc
            .saturating_sub(self.tx_cnt.wrapping_sub(self.peer_fwd_cnt))
    }
}

/// A parsed packet header.
struct Header {
    src_cid: u64,
    src_port: u32,
    dst_port: u32,
    len: u32,
    type_: u16,
    op: u16,
    flags: u32,
    buf_alloc: u32,
    fwd_cnt: u32,
}

fn le_u32(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes([b[at], b[at + 1], b[at + 2], b[at + 3]])
}

impl Header {
    fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HEADER {
            return None;
        }
        Some(Header {
            src_cid: u64::from(le_u32(b, 0)) | (u64::from(le_u32(b, 4)) << 32),
            src_port: le_u32(b, 16),
            dst_port: le_u32(b, 20),
            len: le_u32(b, 24),
            type_: u16::from_le_bytes([b[28], b[29]]),
            op: u16::from_le_bytes([b[30], b[31]]),
            flags: le_u32(b, 32),
            buf_alloc: le_u32(b, 36),
            fwd_cnt: le_u32(b, 40),
        })
    }
}

/// The guest's CID from the config space: only its low half, since the
/// specification reserves the upper 32 bits (zero), and each register
/// read is a VM exit.
fn read_guest_cid(transport: &Transport) -> u64 {
    u64::from(transport.config_u32(0))
}

pub struct VsockDriver {
    transport: Transport,
    rx: VirtQueue,
    tx: VirtQueue,
    event: VirtQueue,
    event_buffers: DeviceBuffers,
    event_by_head: Vec<usize>,
    /// Transport resets seen: each one ended every stream.
    resets: u32,
    guest_cid: u64,
    rx_buffers: DeviceBuffers,
    /// Which RX buffer each in-flight head is.
    rx_by_head: Vec<usize>,
    tx_in_flight: Vec<Option<Vec<u8>>>,
    streams: Vec<Stream>,
    listening: Vec<u32>,
    accepted: VecDeque<usize>,
    next_port: u32,
}

impl VsockDriver {
    pub fn new(transport: Transport) -> Result<Self, VsockError> {
        transport.begin_init().map_err(VsockError::Init)?;
        let mut rx = transport.setup_queue(0, 64).map_err(VsockError::Init)?;
        let tx = transport.setup_queue(1, 64).map_err(VsockError::Init)?;
        let mut event = transport.setup_queue(2, 8).map_err(VsockError::Init)?;
        let guest_cid = read_guest_cid(&transport);
        transport.finish_init();
        let event_buffers = DeviceBuffers::new(EVENT_BUFFERS, 4);
        let mut event_by_head = vec![usize::MAX; 8];
        for i in 0..event_buffers.count() {
            if let Some(head) = event.add(&[event_buffers.writable(i)]) {
                event_by_head[usize::from(head)] = i;
            }
        }
        event.notify();
        let rx_buffers = DeviceBuffers::new(RX_BUFFERS, HEADER + RX_PAYLOAD);
        let mut rx_by_head = vec![usize::MAX; 64];
        for i in 0..rx_buffers.count() {
            if let Some(head) = rx.add(&[rx_buffers.writable(i)]) {
                rx_by_head[usize::from(head)] = i;
            }
        }
        rx.notify();
        Ok(VsockDriver {
            transport,
            rx,
            tx,
            event,
            event_buffers,
            event_by_head,
            resets: 0,
            guest_cid,
            rx_buffers,
            rx_by_head,
            tx_in_flight: (0..64).map(|_| None).collect(),
            streams: Vec::new(),
            listening: Vec::new(),
            accepted: VecDeque::new(),
            next_port: FIRST_LOCAL_PORT,
        })
    }

    pub fn guest_cid(&self) -> u64 {
        self.guest_cid
    }

    /// How many transport resets the device has sent. The VMM sends one
    /// when it restores the VM from a snapshot: the host ends of all
    /// streams are gone, and the CID may be new.
    pub fn resets(&self) -> u32 {
        self.resets
    }

    fn handle_events(&mut self) {
        let mut returned = false;
        while let Some((head, len)) = self.event.pop_used() {
            let Some(&index) = self.event_by_head.get(usize::from(head)) else {
                continue;
            };
            if index == usize::MAX {
                continue;
            }
            let id = self.event_buffers.written(index, len as usize);
            if id.len() == 4 && le_u32(id, 0) == EVENT_TRANSPORT_RESET {
                self.resets = self.resets.wrapping_add(1);
                self.guest_cid = read_guest_cid(&self.transport);
                for stream in &mut self.streams {
                    stream.state = State::Closed;
                }
                self.accepted.clear();
            }
            if let Some(head) = self.event.add(&[self.event_buffers.writable(index)]) {
                self.event_by_head[usize::from(head)] = index;
            }
            returned = true;
        }
        if returned {
            self.event.notify();
        }
    }

    fn send_packet(&mut self, local: u32, peer: u32, op: u16, flags: u32, payload: &[u8]) {
        let fwd_cnt = self
            .streams
            .iter_mut()
            .find(|s| s.local_port == local && s.peer_port == peer)
            .map_or(0, |s| {
                s.last_fwd_sent = s.fwd_cnt;
                s.fwd_cnt
            });
        let mut pkt = Vec::with_capacity(HEADER + payload.len());
        pkt.extend_from_slice(&self.guest_cid.to_le_bytes());
        pkt.extend_from_slice(&HOST_CID.to_le_bytes());
        pkt.extend_from_slice(&local.to_le_bytes());
        pkt.extend_from_slice(&peer.to_le_bytes());
        pkt.extend_from_slice(&(payload.len() as u32).to_le_bytes());
        pkt.extend_from_slice(&TYPE_STREAM.to_le_bytes());
        pkt.extend_from_slice(&op.to_le_bytes());
        pkt.extend_from_slice(&flags.to_le_bytes());
        pkt.extend_from_slice(&BUF_ALLOC.to_le_bytes());
        pkt.extend_from_slice(&fwd_cnt.to_le_bytes());
        pkt.extend_from_slice(payload);
        let mut waiter = Waiter::new();
        loop {
            let buffer = Buffer {
                addr: pkt.as_ptr() as u64,
                len: pkt.len() as u32,
                writable: false,
            };
            if let Some(head) = self.tx.add(&[buffer]) {
                self.tx_in_flight[usize::from(head)] = Some(pkt);
                self.tx.notify();
                return;
            }
            // The TX ring is full: wait for the device to take some.
            self.poll();
            waiter.wait();
        }
    }

    /// Processes everything the device completed.
    pub fn poll(&mut self) {
        self.handle_events();
        while let Some((head, _)) = self.tx.pop_used() {
            self.tx_in_flight[usize::from(head)] = None;
        }
        let mut returned = false;
        while let Some((head, len)) = self.rx.pop_used() {
            let index = self.rx_by_head[usize::from(head)];
            if index == usize::MAX {
                continue;
            }
            let packet: Vec<u8> = self.rx_buffers.written(index, len as usize).to_vec();
            self.handle_packet(&packet);
            if let Some(head) = self.rx.add(&[self.rx_buffers.writable(index)]) {
                self.rx_by_head[usize::from(head)] = index;
            }
            returned = true;
        }
        if returned {
            self.rx.notify();
        }
    }

    fn handle_packet(&mut self, packet: &[u8]) {
        let Some(h) = Header::parse(packet) else {
            return;
        };
        let payload_end = HEADER.saturating_add(h.len as usize);
        if h.src_cid != HOST_CID || h.type_ != TYPE_STREAM || payload_end > packet.len() {
            return;
        }
        let payload = &packet[HEADER..payload_end];
        let found = self
            .streams
            .iter()
            .position(|s| s.local_port == h.dst_port && s.peer_port == h.src_port);
        if h.op == OP_REQUEST {
            if found.is_none() && self.listening.contains(&h.dst_port) {
                let mut s = Stream::new(h.dst_port, h.src_port, State::Connected);
                s.peer_buf_alloc = h.buf_alloc;
                s.peer_fwd_cnt = h.fwd_cnt;
                self.streams.push(s);
                self.accepted.push_back(self.streams.len() - 1);
                self.send_packet(h.dst_port, h.src_port, OP_RESPONSE, 0, &[]);
            } else {
                self.send_packet(h.dst_port, h.src_port, OP_RST, 0, &[]);
            }
            return;
        }
        let Some(i) = found else {
            if h.op != OP_RST {
                self.send_packet(h.dst_port, h.src_port, OP_RST, 0, &[]);
            }
            return;
        };
        let s = &mut self.streams[i];
        s.peer_buf_alloc = h.buf_alloc;
        s.peer_fwd_cnt = h.fwd_cnt;
        s.credit_requested = false;
        match h.op {
            OP_RESPONSE if s.state == State::Connecting => s.state = State::Connected,
            OP_RW => {
                if s.rx.len() + payload.len() > BUF_ALLOC as usize {
                    // The host overran our credit.
                    s.state = State::Closed;
                    let (l, p) = (s.local_port, s.peer_port);
                    self.send_packet(l, p, OP_RST, 0, &[]);
                } else {
                    s.rx.extend(payload);
                }
            }
            OP_CREDIT_REQUEST => {
                let (l, p) = (s.local_port, s.peer_port);
                self.send_packet(l, p, OP_CREDIT_UPDATE, 0, &[]);
            }
            OP_SHUTDOWN => s.peer_shutdown |= h.flags & SHUTDOWN_BOTH,
            OP_RST => s.state = State::Closed,
            _ => {}
        }
    }

    /// Connects to the host's `port`.
    pub fn connect(&mut self, port: u32) -> Result<usize, VsockError> {
        let id = self.open(port);
        self.established(id)
    }

    /// Asks the host for a connection to `port` without waiting for the
    /// answer, so that several requests, and other work, overlap the host's
    /// round trips; [`established`](Self::established) waits.
    pub fn open(&mut self, port: u32) -> usize {
        let local = self.next_port;
        self.next_port = self.next_port.wrapping_add(1).max(FIRST_LOCAL_PORT);
        self.streams
            .push(Stream::new(local, port, State::Connecting));
        self.send_packet(local, port, OP_REQUEST, 0, &[]);
        self.streams.len() - 1
    }

    /// Waits until the stream that [`open`](Self::open) asked for is
    /// connected or refused.
    pub fn established(&mut self, id: usize) -> Result<usize, VsockError> {
        let mut waiter = Waiter::new();
        loop {
            self.poll();
            match self.streams[id].state {
                State::Connected => return Ok(id),
                State::Closed => return Err(VsockError::Refused),
                State::Connecting => waiter.wait(),
            }
        }
    }

    pub fn listen(&mut self, port: u32) {
        self.listening.push(port);
    }

    /// Waits for a host connection to a listened port.
    pub fn accept(&mut self) -> usize {
        let mut waiter = Waiter::new();
        loop {
            self.poll();
            if let Some(id) = self.accepted.pop_front() {
                return id;
            }
            waiter.wait();
        }
    }

    /// Sends all of `data`, waiting for credit as needed.
    pub fn send(&mut self, id: usize, mut data: &[u8]) -> Result<(), VsockError> {
        let mut waiter = Waiter::new();
        while !data.is_empty() {
            let s = &self.streams[id];
            if s.state == State::Closed {
                return Err(VsockError::Closed);
            }
            let credit = s.peer_credit() as usize;
            if credit == 0 {
                // Ask once; the answer refreshes the credit.
                if !s.credit_requested {
                    let (l, p) = (s.local_port, s.peer_port);
                    self.streams[id].credit_requested = true;
                    self.send_packet(l, p, OP_CREDIT_REQUEST, 0, &[]);
                }
                self.poll();
                waiter.wait();
                continue;
            }
            let n = credit.min(data.len()).min(TX_CHUNK);
            let (l, p) = (s.local_port, s.peer_port);
            self.send_packet(l, p, OP_RW, 0, &data[..n]);
            self.streams[id].tx_cnt = self.streams[id].tx_cnt.wrapping_add(n as u32);
            data = &data[n..];
        }
        Ok(())
    }

    /// Receives up to `buf.len()` bytes; 0 when the host will send no more.
    pub fn recv(&mut self, id: usize, buf: &mut [u8]) -> usize {
        let mut waiter = Waiter::new();
        loop {
            let s = &mut self.streams[id];
            if !s.rx.is_empty() {
                let n = buf.len().min(s.rx.len());
                for (dst, src) in buf.iter_mut().zip(s.rx.drain(..n)) {
                    *dst = src;
                }
                s.fwd_cnt = s.fwd_cnt.wrapping_add(n as u32);
                if s.fwd_cnt.wrapping_sub(s.last_fwd_sent) >= BUF_ALLOC / 4 {
                    let (l, p) = (s.local_port, s.peer_port);
                    self.send_packet(l, p, OP_CREDIT_UPDATE, 0, &[]);
                }
                return n;
            }
            if s.state == State::Closed || s.peer_shutdown & SHUTDOWN_SEND != 0 {
                return 0;
            }
            self.poll();
            waiter.wait();
        }
    }

    /// Ends the stream in both directions.
    pub fn close(&mut self, id: usize) {
        let s = &mut self.streams[id];
        if s.state != State::Closed {
            s.state = State::Closed;
            let (l, p) = (s.local_port, s.peer_port);
            self.send_packet(l, p, OP_SHUTDOWN, SHUTDOWN_BOTH, &[]);
        }
        // Let the device take the packet before the caller moves on.
        let mut waiter = Waiter::new();
        while self.tx.free_descriptors() < 64 {
            self.poll();
            waiter.wait();
        }
    }
}
