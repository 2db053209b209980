//! The vsock device: its three queues and the multiplexer between guest
//! packets and host Unix sockets.

use std::collections::{HashMap, VecDeque};
use std::io::{self, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::Path;

use event_manager::{EventOps, Events, MutEventSubscriber};
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::GuestMemoryMmap;
use vmm_sys_util::epoll::EventSet;
use vmm_sys_util::eventfd::EventFd;

use super::connection::{Connection, State};
use super::packet::{
    self, Header, MAX_PAYLOAD, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE, OP_REQUEST, OP_RESPONSE,
    OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND, TYPE_STREAM,
};
use super::HOST_CID;
use crate::devices::host_socket::HostSocket;
use crate::devices::virtio::{
    read_config_bytes, Interrupt, VirtioDevice, INTERRUPT_USED_RING, TYPE_VSOCK, VIRTIO_F_VERSION_1,
};
use crate::devices::watch::watch;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVT: usize = 2;
/// `VIRTIO_VSOCK_EVENT_TRANSPORT_RESET`.
const EVENT_TRANSPORT_RESET: u32 = 0;
/// Host ports handed to host-initiated connections start here.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
/// A `CONNECT <port>\n` line is never longer.
const MAX_CONNECT_LINE: usize = 32;
/// Control packets waiting for RX buffers; past this the guest is not
/// reading its queue and new ones are dropped with a log line.
const MAX_PENDING_CONTROL: usize = 4096;

/// A connection is named by (host port, guest port).
type Key = (u32, u32);

/// A host program that connected but has not finished its CONNECT line.
struct PendingConnect {
    stream: UnixStream,
    line: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("cannot create a vsock queue: {0}")]
    Queue(String),
    #[error("cannot create an eventfd: {0}")]
    EventFd(io::Error),
}

pub struct Vsock {
    guest_cid: u64,
    /// `uds_path`: host programs connect here, and guest connections to
    /// port P go to `<uds_path>_P`.
    listener: HostSocket,
    /// Host ends made ahead, by port, each for the guest's first
    /// connection to its port.
    connected: HashMap<u32, UnixStream>,
    queues: Vec<Queue>,
    queue_events: Vec<EventFd>,
    acked_features: u64,
    active: Option<(GuestMemoryMmap, Interrupt)>,
    connections: HashMap<Key, Connection>,
    by_fd: HashMap<RawFd, Key>,
    /// Event interest registered for each connection's socket.
    interest: HashMap<RawFd, EventSet>,
    pending: HashMap<RawFd, PendingConnect>,
    /// Connections the guest closed while their last bytes still waited
    /// for the host's reader, by socket.
    closing: HashMap<RawFd, Connection>,
    /// Control packets (op, flags) for a connection, waiting for RX buffers.
    control: VecDeque<(Key, u16, u32)>,
    next_local_port: u32,
    /// The last RX queue check found no buffer.
    rx_starved: bool,
    /// The listener is out of the epoll set: a host program that connects
    /// before the guest's driver is up waits in the kernel's backlog, where
    /// a driver reset cannot drop its connection.
    listener_paused: bool,
    /// A transport reset the guest has not been given yet, for want of
    /// an event buffer.
    reset_pending: bool,
    bounce: Vec<u8>,
}

impl Vsock {
    pub fn new(
        guest_cid: u64,
        uds_path: &Path,
        connected: HashMap<u32, UnixStream>,
    ) -> Result<Self, VsockError> {
        let queues = (0..3)
            .map(|_| Queue::new(QUEUE_SIZE).map_err(|e| VsockError::Queue(e.to_string())))
            .collect::<Result<Vec<_>, _>>()?;
        let queue_events = (0..3)
            .map(|_| EventFd::new(libc::EFD_NONBLOCK).map_err(VsockError::EventFd))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Self {
            guest_cid,
            listener: HostSocket::new(uds_path, "the vsock uds_path"),
            connected,
            queues,
            queue_events,
            acked_features: 0,
            active: None,
            connections: HashMap::new(),
            by_fd: HashMap::new(),
            interest: HashMap::new(),
            pending: HashMap::new(),
            closing: HashMap::new(),
            control: VecDeque::new(),
            next_local_port: FIRST_LOCAL_PORT,
            rx_starved: false,
            listener_paused: false,
            reset_pending: false,
            bounce: vec![0; MAX_PAYLOAD],
        })
    }

    fn queue_control(&mut self, key: Key, op: u16, flags: u32) {
        if self.control.len() >= MAX_PENDING_CONTROL {
            tracing::warn!("vsock: the guest is not reading its RX queue; control packet dropped");
            return;
        }
        self.control.push_back((key, op, flags));
    }

    fn header(&self, key: Key, op: u16, flags: u32, len: usize) -> Header {
        Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: key.0,
            dst_port: key.1,
            len: len as u32,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    fn remove_connection(&mut self, key: Key, ops: &mut EventOps) -> Option<Connection> {
        let conn = self.connections.remove(&key)?;
        let fd = conn.stream.as_raw_fd();
        self.by_fd.remove(&fd);
        if let Some(events) = self.interest.remove(&fd) {
            let _ = ops.remove(Events::new_raw(fd, events));
        }
        Some(conn)
    }

    /// The guest closed both directions: it gets its reset now, and the
    /// host socket closes once it has taken what the guest sent before.
    fn close_connection(&mut self, key: Key, ops: &mut EventOps) {
        if let Some(conn) = self.remove_connection(key, ops) {
            let fd = conn.stream.as_raw_fd();
            if conn.has_pending_tx() && ops.add(Events::new_raw(fd, EventSet::OUT)).is_ok() {
                self.closing.insert(fd, conn);
            }
        }
        self.queue_control(key, OP_RST, 0);
    }

    /// A closing connection's socket can take more of its last bytes.
    fn flush_closing(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(conn) = self.closing.get_mut(&fd) else {
            return;
        };
        if conn.flush_tx().is_err() || !conn.has_pending_tx() {
            let _ = ops.remove(Events::new_raw(fd, EventSet::OUT));
            self.closing.remove(&fd);
        }
    }

    /// Resets the connection on both sides.
    fn reset_connection(&mut self, key: Key, ops: &mut EventOps) {
        self.remove_connection(key, ops);
        self.queue_control(key, OP_RST, 0);
    }

    /// Takes every packet the guest queued for sending.
    fn process_tx(&mut self, ops: &mut EventOps) {
        let Some((mem, interrupt)) = self.active.clone() else {
            return;
        };
        let mut used_any = false;
        while let Some(chain) = self.queues[TX].pop_descriptor_chain(&mem) {
            let head = chain.head_index();
            match packet::parse_tx(&mem, chain) {
                Ok(pkt) => self.handle_guest_packet(pkt.header, &pkt.payload, ops),
                Err(e) => tracing::warn!("vsock: TX packet dropped: {e}"),
            }
            if let Err(e) = self.queues[TX].add_used(&mem, head, 0) {
                tracing::warn!("vsock: cannot return a TX buffer: {e}");
                break;
            }
            used_any = true;
        }
        if used_any && self.queues[TX].needs_notification(&mem).unwrap_or(true) {
            interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    fn handle_guest_packet(&mut self, header: Header, payload: &[u8], ops: &mut EventOps) {
        let key = (header.dst_port, header.src_port);
        if header.src_cid != self.guest_cid || header.dst_cid != HOST_CID {
            let (src, dst) = (header.src_cid, header.dst_cid);
            tracing::warn!("vsock: packet from CID {src} to CID {dst} dropped");
            return;
        }
        if header.type_ != TYPE_STREAM {
            self.queue_control(key, OP_RST, 0);
            return;
        }
        if header.op == OP_REQUEST {
            self.connect_to_host(key, &header, ops);
            return;
        }
        let Some(conn) = self.connections.get_mut(&key) else {
            if header.op != OP_RST {
                self.queue_control(key, OP_RST, 0);
            }
            return;
        };
        conn.update_peer_credit(&header);
        match header.op {
            OP_RESPONSE if conn.state == State::Connecting => {
                conn.state = State::Established;
                let ok = format!("OK {}\n", key.0);
                if conn.stream.write_all(ok.as_bytes()).is_err() {
                    self.reset_connection(key, ops);
                }
            }
            OP_RW if conn.state == State::Established => {
                let result = conn
                    .push_tx(payload)
                    .map_err(|_| ())
                    .and_then(|_| conn.flush_tx().map_err(|_| ()));
                if result.is_err() {
                    tracing::warn!(
                        "vsock: connection {key:?} reset (credit overrun or socket error)"
                    );
                    self.reset_connection(key, ops);
                } else if conn.needs_credit_update() {
                    // Without this, a guest that used up its credit while
                    // the host sends nothing back would wait forever.
                    self.queue_control(key, OP_CREDIT_UPDATE, 0);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => self.queue_control(key, OP_CREDIT_UPDATE, 0),
            OP_SHUTDOWN => {
                conn.peer_shutdown |= header.flags & (SHUTDOWN_RCV | SHUTDOWN_SEND);
                let _ = conn.flush_tx();
                if conn.peer_shutdown == SHUTDOWN_RCV | SHUTDOWN_SEND {
                    self.close_connection(key, ops);
                }
            }
            OP_RST => {
                self.remove_connection(key, ops);
            }
            op => {
                tracing::warn!("vsock: unexpected op {op} on {key:?}; reset");
                self.reset_connection(key, ops);
            }
        }
    }

    /// A guest connection request: given the port's stream made ahead,
    /// else forwarded to `<uds_path>_<port>`.
    fn connect_to_host(&mut self, key: Key, header: &Header, ops: &mut EventOps) {
        if self.connections.contains_key(&key) {
            self.reset_connection(key, ops);
            return;
        }
        let path = format!("{}_{}", self.listener.path().display(), key.0);
        let stream = match self.connected.remove(&key.0) {
            Some(stream) => Ok(stream),
            None => UnixStream::connect(&path).and_then(|s| s.set_nonblocking(true).map(|_| s)),
        };
        match stream {
            Ok(stream) => {
                let mut conn = Connection::new(stream, State::Established);
                conn.update_peer_credit(header);
                self.add_connection(key, conn, ops);
                self.queue_control(key, OP_RESPONSE, 0);
            }
            Err(e) => {
                tracing::debug!("vsock: guest connection to {path} refused: {e}");
                self.queue_control(key, OP_RST, 0);
            }
        }
    }

    fn add_connection(&mut self, key: Key, conn: Connection, ops: &mut EventOps) {
        let fd = conn.stream.as_raw_fd();
        // Registered with no interest; `refresh_interest` sets it.
        if ops.add(Events::new_raw(fd, EventSet::empty())).is_ok() {
            self.interest.insert(fd, EventSet::empty());
        }
        self.by_fd.insert(fd, key);
        self.connections.insert(key, conn);
    }

    fn accept_host_connections(&mut self, ops: &mut EventOps) {
        loop {
            match self.listener.accept() {
                Ok(stream) => {
                    if stream.set_nonblocking(true).is_err() {
                        continue;
                    }
                    let fd = stream.as_raw_fd();
                    if ops.add(Events::new_raw(fd, EventSet::IN)).is_ok() {
                        self.pending.insert(
                            fd,
                            PendingConnect {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) => {
                    tracing::warn!("vsock: accept: {e}");
                    break;
                }
            }
        }
    }

    /// Reads a host program's `CONNECT <port>\n` and asks the guest.
    fn read_connect_line(&mut self, fd: RawFd, ops: &mut EventOps) {
        let Some(pending) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut byte = [0u8; 1];
        // One byte at a time: data after the line belongs to the stream.
        let line_done = loop {
            match pending.stream.read(&mut byte) {
                Ok(0) => break Err(()),
                Ok(_) if byte[0] == b'\n' => break Ok(true),
                Ok(_) if pending.line.len() < MAX_CONNECT_LINE => pending.line.push(byte[0]),
                Ok(_) => break Err(()),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break Ok(false),
                Err(_) => break Err(()),
            }
        };
        match line_done {
            Ok(false) => {}
            Ok(true) => {
                let pending = self.pending.remove(&fd).expect("present above");
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
                let port = std::str::from_utf8(&pending.line)
                    .ok()
                    .and_then(|l| l.strip_prefix("CONNECT "))
                    .and_then(|p| p.trim().parse::<u32>().ok());
                match port {
                    Some(port) => {
                        let local = self.allocate_local_port();
                        let key = (local, port);
                        self.add_connection(
                            key,
                            Connection::new(pending.stream, State::Connecting),
                            ops,
                        );
                        self.queue_control(key, OP_REQUEST, 0);
                    }
                    None => tracing::warn!("vsock: malformed CONNECT line from the host; closed"),
                }
            }
            Err(()) => {
                self.pending.remove(&fd);
                let _ = ops.remove(Events::new_raw(fd, EventSet::IN));
            }
        }
    }

    fn allocate_local_port(&mut self) -> u32 {
        loop {
            let port = self.next_local_port;
            self.next_local_port = self
                .next_local_port
                .checked_add(1)
                .unwrap_or(FIRST_LOCAL_PORT);
            if !self.connections.keys().any(|(local, _)| *local == port) {
                return port;
            }
        }
    }

    /// Host socket events on an established connection.
    fn handle_socket(&mut self, key: Key, events: EventSet, ops: &mut EventOps) {
        let Some(conn) = self.connections.get_mut(&key) else {
            return;
        };
        if events.contains(EventSet::OUT) && conn.flush_tx().is_err() {
            self.reset_connection(key, ops);
            return;
        }
        if conn.needs_credit_update() {
            self.queue_control(key, OP_CREDIT_UPDATE, 0);
        }
        if events.intersects(EventSet::ERROR) {
            self.reset_connection(key, ops);
            return;
        }
        if events.contains(EventSet::HANG_UP) {
            // Level-triggered, it would wake the loop until the guest
            // closes its end. What is left to read is still pulled by
            // `deliver_rx`, which does not wait for readiness, and a write
            // to the closed socket fails and resets the connection.
            if let Some(conn) = self.connections.get_mut(&key) {
                conn.hung_up = true;
                let fd = conn.stream.as_raw_fd();
                if let Some(events) = self.interest.remove(&fd) {
                    let _ = ops.remove(Events::new_raw(fd, events));
                }
            }
        }
        // Readable data is pulled by `deliver_rx`, which knows the credit.
    }

    /// Fills the guest's RX buffers: control packets first, then host data
    /// for the connections with credit.
    fn deliver_rx(&mut self, ops: &mut EventOps) {
        let Some((mem, interrupt)) = self.active.clone() else {
            return;
        };
        let mut used_any = false;
        let mut readable: Vec<Key> = self
            .connections
            .iter()
            .filter(|(_, c)| c.wants_host_data())
            .map(|(k, _)| *k)
            .collect();
        readable.sort_unstable();
        let mut readable = readable.into_iter();
        self.rx_starved = false;
        loop {
            if self.control.is_empty() && readable.len() == 0 {
                break;
            }
            let Some(chain) = self.queues[RX].pop_descriptor_chain(&mem) else {
                self.rx_starved = true;
                break;
            };
            let head = chain.head_index();
            let capacity = match packet::rx_capacity(&mem, chain.clone()) {
                Ok(c) => c,
                Err(e) => {
                    tracing::warn!("vsock: RX buffer dropped: {e}");
                    let _ = self.queues[RX].add_used(&mem, head, 0);
                    used_any = true;
                    continue;
                }
            };
            let written = if let Some((key, op, flags)) = self.control.pop_front() {
                let mut header = self.header(key, op, flags, 0);
                if let Some(conn) = self.connections.get_mut(&key) {
                    conn.stamp(&mut header);
                }
                packet::write_rx(&mem, chain, &header, &[])
            } else {
                let Some(key) = readable.next() else {
                    // Nothing to send after all: put the buffer back.
                    self.queues[RX].go_to_previous_position();
                    break;
                };
                match self.read_for_guest(key, capacity) {
                    Some((header, len)) => {
                        let payload = &self.bounce[..len];
                        packet::write_rx(&mem, chain, &header, payload)
                    }
                    None => {
                        self.queues[RX].go_to_previous_position();
                        continue;
                    }
                }
            };
            let len = written.unwrap_or_else(|e| {
                tracing::warn!("vsock: RX write failed: {e}");
                0
            });
            if let Err(e) = self.queues[RX].add_used(&mem, head, len) {
                tracing::warn!("vsock: cannot return an RX buffer: {e}");
                break;
            }
            used_any = true;
        }
        // Connections whose host side ended and that are otherwise done.
        let finished: Vec<Key> = self
            .connections
            .iter()
            .filter(|(_, c)| c.finished())
            .map(|(k, _)| *k)
            .collect();
        for key in finished {
            self.reset_connection(key, ops);
        }
        if used_any && self.queues[RX].needs_notification(&mem).unwrap_or(true) {
            interrupt.signal(INTERRUPT_USED_RING);
        }
    }

    /// Reads host data for one RW packet into the bounce buffer. On end of
    /// file queues a SHUTDOWN instead. `None` when nothing was read.
    fn read_for_guest(&mut self, key: Key, capacity: usize) -> Option<(Header, usize)> {
        let conn = self.connections.get_mut(&key)?;
        let limit = capacity.min(conn.peer_credit() as usize).min(MAX_PAYLOAD);
        if limit == 0 {
            return None;
        }
        match conn.read_host(&mut self.bounce[..limit]) {
            Ok(0) => {
                conn.host_eof = true;
                self.queue_control(key, OP_SHUTDOWN, SHUTDOWN_SEND);
                None
            }
            Ok(n) => {
                let conn = self.connections.get_mut(&key)?;
                conn.record_sent(n);
                let mut header = Header {
                    src_cid: HOST_CID,
                    dst_cid: self.guest_cid,
                    src_port: key.0,
                    dst_port: key.1,
                    len: n as u32,
                    type_: TYPE_STREAM,
                    op: OP_RW,
                    ..Default::default()
                };
                conn.stamp(&mut header);
                Some((header, n))
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => None,
            Err(_) => {
                conn.host_eof = true;
                self.queue_control(key, OP_RST, 0);
                None
            }
        }
    }

    /// Tells the guest's driver that every connection is gone, once it has
    /// an event buffer for it.
    fn deliver_reset(&mut self) {
        let Some((mem, interrupt)) = self.active.clone().filter(|_| self.reset_pending) else {
            return;
        };
        let Some(chain) = self.queues[EVT].pop_descriptor_chain(&mem) else {
            return;
        };
        let head = chain.head_index();
        let len = packet::write_event(&mem, chain, EVENT_TRANSPORT_RESET).unwrap_or_else(|e| {
            tracing::warn!("vsock: event buffer unusable: {e}");
            0
        });
        if let Err(e) = self.queues[EVT].add_used(&mem, head, len) {
            tracing::warn!("vsock: cannot return an event buffer: {e}");
            return;
        }
        self.reset_pending = len == 0;
        interrupt.signal(INTERRUPT_USED_RING);
    }

    /// Sets each socket's epoll interest to what the connection can use
    /// now, so level-triggered readiness never spins: readable only with
    /// credit and RX buffers, writable only with data waiting.
    fn refresh_interest(&mut self, ops: &mut EventOps) {
        for conn in self.connections.values().filter(|c| !c.hung_up) {
            let fd = conn.stream.as_raw_fd();
            let mut want = EventSet::empty();
            if conn.wants_host_data() && !self.rx_starved {
                want |= EventSet::IN;
            }
            if conn.has_pending_tx() {
                want |= EventSet::OUT;
            }
            if self.interest.get(&fd) != Some(&want)
                && ops.modify(Events::new_raw(fd, want)).is_ok()
            {
                self.interest.insert(fd, want);
            }
        }
    }
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1
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
        read_config_bytes(&self.guest_cid.to_le_bytes(), offset, data);
    }

    fn write_config(&mut self, offset: u64, _data: &[u8]) {
        tracing::debug!("vsock: config write at {offset:#x} ignored");
    }

    fn activate(&mut self, mem: GuestMemoryMmap, interrupt: Interrupt) {
        self.active = Some((mem, interrupt));
    }

    fn is_activated(&self) -> bool {
        self.active.is_some()
    }

    fn reset(&mut self) {
        self.active = None;
        self.acked_features = 0;
        self.queues.iter_mut().for_each(|q| q.reset());
        // Connections are dropped with the driver; their sockets close and
        // the epoll set forgets them.
        self.connections.clear();
        self.by_fd.clear();
        self.interest.clear();
        self.control.clear();
        self.reset_pending = false;
    }

    /// The connections of the snapshotted VM had their host ends in
    /// another process; none are restored. As with Firecracker, the
    /// guest learns it from a transport reset: its driver drops every
    /// connection, reads its CID again (a clone may have a new one) and
    /// the programs reconnect.
    fn restored(&mut self) {
        self.reset_pending = true;
        self.deliver_reset();
    }

    fn has_undelivered_output(&self) -> bool {
        self.connections
            .values()
            .chain(self.closing.values())
            .any(Connection::has_pending_tx)
    }
}

impl MutEventSubscriber for Vsock {
    fn process(&mut self, events: Events, ops: &mut EventOps) {
        let fd = events.fd();
        let set = events.event_set();
        let listener = self.listener.fd();
        // Only a bound listener is ever paused.
        let to_resume = listener.filter(|_| self.active.is_some() && self.listener_paused);
        if let Some(listener) = to_resume {
            if ops.add(Events::new_raw(listener, EventSet::IN)).is_ok() {
                self.listener_paused = false;
            }
        } else if self.active.is_none() && listener == Some(fd) {
            if ops.remove(Events::new_raw(fd, EventSet::IN)).is_ok() {
                self.listener_paused = true;
            }
            return;
        }
        if fd == self.queue_events[TX].as_raw_fd() {
            let _ = self.queue_events[TX].read();
            self.process_tx(ops);
        } else if fd == self.queue_events[RX].as_raw_fd() {
            let _ = self.queue_events[RX].read();
        } else if fd == self.queue_events[EVT].as_raw_fd() {
            let _ = self.queue_events[EVT].read();
            self.deliver_reset();
        } else if listener == Some(fd) {
            self.accept_host_connections(ops);
        } else if self.pending.contains_key(&fd) {
            self.read_connect_line(fd, ops);
        } else if let Some(&key) = self.by_fd.get(&fd) {
            self.handle_socket(key, set, ops);
        } else if self.closing.contains_key(&fd) {
            self.flush_closing(fd, ops);
        }
        self.deliver_rx(ops);
        self.refresh_interest(ops);
    }

    fn init(&mut self, ops: &mut EventOps) {
        for event in &self.queue_events {
            watch(ops, Events::new(event, EventSet::IN), "a vsock queue");
        }
        self.listener.listen(ops);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixListener;
    use std::path::PathBuf;
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use event_manager::{EventManager, SubscriberOps};
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, Bytes, GuestAddress};

    const GUEST_CID: u64 = 3;
    const F_NEXT: u16 = 1;
    const F_WRITE: u16 = 2;

    type Subscriber = Arc<Mutex<dyn MutEventSubscriber + Send>>;

    /// A vsock device on mock queues, with the guest's side played by the
    /// test: it writes TX packets and RX buffers and reads the used rings.
    struct Guest<'a> {
        mem: &'a GuestMemoryMmap,
        rx: MockSplitQueue<'a, GuestMemoryMmap>,
        tx: MockSplitQueue<'a, GuestMemoryMmap>,
        device: Arc<Mutex<Vsock>>,
        manager: EventManager<Subscriber>,
        next_rx_desc: u16,
        next_tx_desc: u16,
        rx_seen: u16,
        buffers: u64,
        uds: PathBuf,
    }

    fn uds_path(tag: &str) -> PathBuf {
        std::env::temp_dir().join(format!("vsock-test-{}-{tag}", std::process::id()))
    }

    impl<'a> Guest<'a> {
        fn new(mem: &'a GuestMemoryMmap, tag: &str) -> Self {
            Self::with_connected(mem, tag, HashMap::new())
        }

        fn with_connected(
            mem: &'a GuestMemoryMmap,
            tag: &str,
            connected: HashMap<u32, UnixStream>,
        ) -> Self {
            let rx = MockSplitQueue::create(mem, GuestAddress(0), 64);
            let tx = MockSplitQueue::create(mem, GuestAddress(0x10000), 64);
            let uds = uds_path(tag);
            let mut vsock = Vsock::new(GUEST_CID, &uds, connected).unwrap();
            vsock.queues[RX] = rx.create_queue().unwrap();
            vsock.queues[TX] = tx.create_queue().unwrap();
            let irq = Interrupt::new(EventFd::new(libc::EFD_NONBLOCK).unwrap());
            vsock.activate(mem.clone(), irq);
            let device = Arc::new(Mutex::new(vsock));
            let mut manager = EventManager::<Subscriber>::new().unwrap();
            manager.add_subscriber(device.clone());
            Guest {
                mem,
                rx,
                tx,
                device,
                manager,
                next_rx_desc: 0,
                next_tx_desc: 0,
                rx_seen: 0,
                buffers: 0x20_0000,
                uds,
            }
        }

        fn alloc(&mut self, len: u64) -> u64 {
            let at = self.buffers;
            self.buffers += len.next_multiple_of(4096);
            at
        }

        /// Offers one RX buffer of `len` bytes.
        fn give_rx_buffer(&mut self, len: u32) {
            let addr = self.alloc(u64::from(len));
            let d = RawDescriptor::from(SplitDescriptor::new(addr, len, F_WRITE, 0));
            self.rx.add_desc_chains(&[d], self.next_rx_desc).unwrap();
            self.next_rx_desc += 1;
            self.device.lock().unwrap().queue_events[RX]
                .write(1)
                .unwrap();
        }

        /// Sends a packet as two descriptors: header, then payload.
        fn send_raw(&mut self, header: Header, payload: &[u8]) {
            let h = self.alloc(64);
            self.mem.write_obj(header, GuestAddress(h)).unwrap();
            let mut descs = vec![RawDescriptor::from(SplitDescriptor::new(
                h,
                packet::HEADER_SIZE as u32,
                if payload.is_empty() { 0 } else { F_NEXT },
                self.next_tx_desc + 1,
            ))];
            if !payload.is_empty() {
                let p = self.alloc(payload.len() as u64);
                self.mem.write_slice(payload, GuestAddress(p)).unwrap();
                descs.push(RawDescriptor::from(SplitDescriptor::new(
                    p,
                    payload.len() as u32,
                    0,
                    0,
                )));
            }
            self.tx.add_desc_chains(&descs, self.next_tx_desc).unwrap();
            self.next_tx_desc += descs.len() as u16;
            self.device.lock().unwrap().queue_events[TX]
                .write(1)
                .unwrap();
        }

        fn send(&mut self, op: u16, src_port: u32, dst_port: u32, flags: u32, payload: &[u8]) {
            self.send_raw(
                Header {
                    src_cid: GUEST_CID,
                    dst_cid: HOST_CID,
                    src_port,
                    dst_port,
                    len: payload.len() as u32,
                    type_: TYPE_STREAM,
                    op,
                    flags,
                    buf_alloc: 1 << 20,
                    fwd_cnt: 0,
                },
                payload,
            );
        }

        fn pump(&mut self) {
            for _ in 0..5 {
                let _ = self.manager.run_with_timeout(20);
            }
        }

        /// Packets the device put in the RX queue since the last call.
        fn received(&mut self) -> Vec<(Header, Vec<u8>)> {
            self.pump();
            let used = self.rx.used_addr();
            let idx: u16 = self.mem.read_obj(used.unchecked_add(2)).unwrap();
            let mut out = Vec::new();
            while self.rx_seen != idx {
                let slot = used.unchecked_add(4 + u64::from(self.rx_seen % 64) * 8);
                let id: u32 = self.mem.read_obj(slot).unwrap();
                let len: u32 = self.mem.read_obj(slot.unchecked_add(4)).unwrap();
                let desc = SplitDescriptor::from(self.rx.desc_table().load(id as u16).unwrap());
                let header: Header = self.mem.read_obj(desc.addr()).unwrap();
                let mut payload = vec![0u8; len as usize - packet::HEADER_SIZE];
                self.mem
                    .read_slice(&mut payload, desc.addr().unchecked_add(44))
                    .unwrap();
                out.push((header, payload));
                self.rx_seen = self.rx_seen.wrapping_add(1);
            }
            out
        }
    }

    fn memory() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 16 << 20)]).unwrap()
    }

    fn ops(packets: &[(Header, Vec<u8>)]) -> Vec<u16> {
        packets.iter().map(|(h, _)| h.op).collect()
    }

    #[test]
    fn guest_connects_to_a_host_socket_and_data_flows_both_ways() {
        let mem = memory();
        let mut g = Guest::new(&mem, "g2h");
        let host = UnixListener::bind(format!("{}_5000", g.uds.display())).unwrap();
        for _ in 0..4 {
            g.give_rx_buffer(4096);
        }
        g.send(OP_REQUEST, 1025, 5000, 0, &[]);
        let got = g.received();
        assert_eq!(ops(&got), vec![OP_RESPONSE]);
        let (h, _) = got[0];
        assert_eq!(
            ({ h.src_port }, { h.dst_port }, { h.dst_cid }),
            (5000, 1025, GUEST_CID)
        );
        assert_eq!({ h.buf_alloc }, super::super::connection::BUFFER_SIZE);
        let (mut server, _) = host.accept().unwrap();
        server
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();

        g.send(OP_RW, 1025, 5000, 0, b"hello host");
        g.pump();
        let mut buf = [0u8; 10];
        server.read_exact(&mut buf).unwrap();
        assert_eq!(&buf, b"hello host");

        server.write_all(b"hello guest").unwrap();
        let got = g.received();
        assert_eq!(ops(&got), vec![OP_RW]);
        assert_eq!(got[0].1, b"hello guest");

        // The host closes: the guest hears the host will send no more.
        drop(server);
        let got = g.received();
        assert_eq!(ops(&got), vec![OP_SHUTDOWN]);
        assert_eq!({ got[0].0.flags }, SHUTDOWN_SEND);
        // The hung-up socket, which epoll reports whatever the interest,
        // no longer wakes the event loop while the guest keeps its end.
        assert_eq!(g.manager.run_with_timeout(0).unwrap(), 0);
        let _ = std::fs::remove_file(format!("{}_5000", g.uds.display()));
    }

    #[test]
    fn a_guest_that_closes_before_the_host_reads_loses_nothing() {
        let mem = memory();
        let mut g = Guest::new(&mem, "close");
        let host = UnixListener::bind(format!("{}_5001", g.uds.display())).unwrap();
        for _ in 0..4 {
            g.give_rx_buffer(4096);
        }
        g.send(OP_REQUEST, 1026, 5001, 0, &[]);
        assert_eq!(ops(&g.received()), vec![OP_RESPONSE]);
        let (mut server, _) = host.accept().unwrap();
        // More than the socket holds: the rest waits in the device.
        let sent: Vec<u8> = (0..384 << 10).map(|i| (i % 251) as u8).collect();
        for chunk in sent.chunks(32 << 10) {
            g.send(OP_RW, 1026, 5001, 0, chunk);
        }
        g.send(OP_SHUTDOWN, 1026, 5001, SHUTDOWN_RCV | SHUTDOWN_SEND, &[]);
        g.pump();
        {
            // The guest is let go (its reset waits behind the credit
            // updates for RX buffers); the bytes are not.
            let device = g.device.lock().unwrap();
            assert!(device.connections.is_empty());
            assert!(device.control.contains(&((5001, 1026), OP_RST, 0)));
            assert!(device.has_undelivered_output());
        }
        let reader = std::thread::spawn(move || {
            server
                .set_read_timeout(Some(Duration::from_secs(2)))
                .unwrap();
            let mut got = Vec::new();
            server.read_to_end(&mut got).unwrap();
            got
        });
        while !reader.is_finished() {
            g.pump();
        }
        assert!(
            reader.join().unwrap() == sent,
            "every byte, then end of file"
        );
        assert!(!g.device.lock().unwrap().has_undelivered_output());
        let _ = std::fs::remove_file(format!("{}_5001", g.uds.display()));
    }

    #[test]
    fn a_refused_port_gets_a_reset() {
        let mem = memory();
        let mut g = Guest::new(&mem, "refused");
        g.give_rx_buffer(4096);
        g.send(OP_REQUEST, 1025, 6001, 0, &[]);
        assert_eq!(ops(&g.received()), vec![OP_RST]);
        // Data for a connection that does not exist is reset too.
        g.give_rx_buffer(4096);
        g.send(OP_RW, 1025, 6001, 0, b"x");
        assert_eq!(ops(&g.received()), vec![OP_RST]);
    }

    #[test]
    fn a_stream_made_ahead_serves_the_first_connection_to_its_port_only() {
        let mem = memory();
        let (host, ahead) = UnixStream::pair().unwrap();
        (&host).write_all(b"written ahead").unwrap();
        host.shutdown(std::net::Shutdown::Write).unwrap();
        let mut g = Guest::with_connected(&mem, "ahead", HashMap::from([(9003, ahead)]));
        for _ in 0..4 {
            g.give_rx_buffer(4096);
        }
        // No socket at <uds>_9003: the stream made ahead is the host's end.
        g.send(OP_REQUEST, 1025, 9003, 0, &[]);
        let got = g.received();
        assert_eq!(ops(&got), vec![OP_RESPONSE, OP_RW, OP_SHUTDOWN]);
        assert_eq!(got[1].1, b"written ahead");
        g.send(OP_RW, 1025, 9003, 0, b"reply");
        g.pump();
        host.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
        let mut reply = [0u8; 5];
        (&host).read_exact(&mut reply).unwrap();
        assert_eq!(&reply, b"reply");
        // A second connection to the port finds nobody there.
        g.give_rx_buffer(4096);
        g.send(OP_REQUEST, 1026, 9003, 0, &[]);
        assert_eq!(ops(&g.received()), vec![OP_RST]);
    }

    #[test]
    fn host_connects_with_connect_line_and_gets_ok_after_the_guest_accepts() {
        let mem = memory();
        let mut g = Guest::new(&mem, "h2g");
        g.give_rx_buffer(4096);
        g.give_rx_buffer(4096);
        let mut client = UnixStream::connect(&g.uds).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.write_all(b"CONNECT 1234\n").unwrap();
        let got = g.received();
        assert_eq!(ops(&got), vec![OP_REQUEST]);
        let local_port = got[0].0.src_port;
        assert_eq!({ got[0].0.dst_port }, 1234);
        g.send(OP_RESPONSE, 1234, local_port, 0, &[]);
        g.pump();
        let mut line = [0u8; 64];
        let n = client.read(&mut line).unwrap();
        assert_eq!(
            std::str::from_utf8(&line[..n]).unwrap(),
            format!("OK {local_port}\n")
        );
        client.write_all(b"ping").unwrap();
        let got = g.received();
        assert_eq!(got[0].1, b"ping");
    }

    #[test]
    fn malformed_connect_lines_are_closed() {
        let mem = memory();
        let mut g = Guest::new(&mem, "badline");
        g.give_rx_buffer(4096);
        let mut client = UnixStream::connect(&g.uds).unwrap();
        client
            .set_read_timeout(Some(Duration::from_secs(2)))
            .unwrap();
        client.write_all(b"HELLO THERE\n").unwrap();
        assert!(g.received().is_empty());
        let mut buf = [0u8; 8];
        assert_eq!(
            client.read(&mut buf).unwrap(),
            0,
            "the VMM closed the socket"
        );
    }

    #[test]
    fn host_data_waits_for_guest_credit() {
        let mem = memory();
        let mut g = Guest::new(&mem, "credit");
        let host = UnixListener::bind(format!("{}_5001", g.uds.display())).unwrap();
        for _ in 0..8 {
            g.give_rx_buffer(4096);
        }
        // The guest offers only 100 bytes of buffer.
        g.send_raw(
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: 2000,
                dst_port: 5001,
                type_: TYPE_STREAM,
                op: OP_REQUEST,
                buf_alloc: 100,
                ..Default::default()
            },
            &[],
        );
        assert_eq!(ops(&g.received()), vec![OP_RESPONSE]);
        let (mut server, _) = host.accept().unwrap();
        server.write_all(&[9u8; 1000]).unwrap();
        let got = g.received();
        let delivered: usize = got.iter().map(|(_, p)| p.len()).sum();
        assert_eq!(delivered, 100, "no more than the credit");
        // The guest consumes it and says so: the rest flows.
        g.send_raw(
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                src_port: 2000,
                dst_port: 5001,
                type_: TYPE_STREAM,
                op: OP_CREDIT_UPDATE,
                buf_alloc: 100,
                fwd_cnt: 100,
                ..Default::default()
            },
            &[],
        );
        let delivered: usize = g.received().iter().map(|(_, p)| p.len()).sum();
        assert_eq!(delivered, 100);
        let _ = std::fs::remove_file(format!("{}_5001", g.uds.display()));
    }

    #[test]
    fn hostile_packets_are_dropped_without_harm() {
        let mem = memory();
        let mut g = Guest::new(&mem, "hostile");
        g.give_rx_buffer(4096);
        // Declares a payload far larger than its buffers.
        g.send_raw(
            Header {
                src_cid: GUEST_CID,
                dst_cid: HOST_CID,
                len: u32::MAX,
                type_: TYPE_STREAM,
                op: OP_RW,
                ..Default::default()
            },
            b"tiny",
        );
        // Spoofs another CID.
        g.send_raw(
            Header {
                src_cid: 99,
                dst_cid: HOST_CID,
                type_: TYPE_STREAM,
                op: OP_REQUEST,
                ..Default::default()
            },
            &[],
        );
        // A header cut short.
        let h = g.alloc(64);
        let d = RawDescriptor::from(SplitDescriptor::new(h, 20, 0, 0));
        g.tx.add_desc_chains(&[d], g.next_tx_desc).unwrap();
        g.next_tx_desc += 1;
        g.device.lock().unwrap().queue_events[TX].write(1).unwrap();
        assert!(g.received().is_empty());
        // Every TX buffer was returned.
        let used: u16 = mem.read_obj(g.tx.used_addr().unchecked_add(2)).unwrap();
        assert_eq!(used, 3);
    }
}
