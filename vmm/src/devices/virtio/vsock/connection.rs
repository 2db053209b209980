//! One vsock stream connection between the guest and a host Unix socket,
//! with virtio-vsock's credit-based flow control.
//!
//! Guest-to-host bytes wait in a buffer no larger than the credit the
//! device advertises (`BUFFER_SIZE`); the guest may only send what that
//! credit allows, and the credit comes back only as bytes reach the host
//! socket. A slow host reader therefore stalls the guest instead of growing
//! the buffer. Host-to-guest bytes are read from the socket only while the
//! guest has credit for them.

use std::collections::VecDeque;
use std::io::{self, Read, Write};
use std::net::Shutdown;
use std::num::Wrapping;
use std::os::unix::net::UnixStream;

use super::packet::{Header, SHUTDOWN_RCV, SHUTDOWN_SEND};

/// The credit each connection offers the guest, and so the most it buffers.
pub const BUFFER_SIZE: u32 = 256 << 10;
/// Credit returned without being asked once this much was forwarded.
const CREDIT_UPDATE_THRESHOLD: u32 = BUFFER_SIZE / 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Host-initiated: REQUEST sent, waiting for the guest's RESPONSE.
    Connecting,
    Established,
}

pub struct Connection {
    pub stream: UnixStream,
    pub state: State,
    /// Guest-to-host bytes not yet written to the socket.
    tx_buf: VecDeque<u8>,
    /// Bytes forwarded to the host socket, as the guest sees our credit.
    fwd_cnt: Wrapping<u32>,
    last_fwd_cnt_sent: Wrapping<u32>,
    /// Bytes sent to the guest.
    rx_cnt: Wrapping<u32>,
    peer_buf_alloc: u32,
    peer_fwd_cnt: Wrapping<u32>,
    /// SHUTDOWN flags the guest sent.
    pub peer_shutdown: u32,
    /// The host socket reached end of file.
    pub host_eof: bool,
    /// The host closed both directions: epoll reports that whatever the
    /// interest, so the socket is off the event loop from then on.
    pub hung_up: bool,
    write_shut: bool,
}

/// The guest broke the credit rules: it sent more than it was allowed.
#[derive(Debug, PartialEq, Eq)]
pub struct CreditViolation;

impl Connection {
    pub fn new(stream: UnixStream, state: State) -> Self {
        Self {
            stream,
            state,
            tx_buf: VecDeque::new(),
            fwd_cnt: Wrapping(0),
            last_fwd_cnt_sent: Wrapping(0),
            rx_cnt: Wrapping(0),
            peer_buf_alloc: 0,
            peer_fwd_cnt: Wrapping(0),
            peer_shutdown: 0,
            host_eof: false,
            hung_up: false,
            write_shut: false,
        }
    }

    /// Takes the guest's view of its receive buffer from any header.
    pub fn update_peer_credit(&mut self, header: &Header) {
        self.peer_buf_alloc = header.buf_alloc;
        self.peer_fwd_cnt = Wrapping(header.fwd_cnt);
    }

    /// Bytes the guest can still take.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = (self.rx_cnt - self.peer_fwd_cnt).0;
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Fills in the credit fields of a header about to go to the guest.
    pub fn stamp(&mut self, header: &mut Header) {
        header.buf_alloc = BUFFER_SIZE;
        header.fwd_cnt = self.fwd_cnt.0;
        self.last_fwd_cnt_sent = self.fwd_cnt;
    }

    pub fn record_sent(&mut self, bytes: usize) {
        self.rx_cnt += Wrapping(bytes as u32);
    }

    /// Queues guest data for the host socket.
    pub fn push_tx(&mut self, data: &[u8]) -> Result<(), CreditViolation> {
        if self.tx_buf.len() + data.len() > BUFFER_SIZE as usize {
            return Err(CreditViolation);
        }
        self.tx_buf.extend(data);
        Ok(())
    }

    pub fn has_pending_tx(&self) -> bool {
        !self.tx_buf.is_empty()
    }

    /// Writes buffered guest data to the socket until it would block.
    pub fn flush_tx(&mut self) -> io::Result<()> {
        while !self.tx_buf.is_empty() {
            let (front, _) = self.tx_buf.as_slices();
            match self.stream.write(front) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.tx_buf.drain(..n);
                    self.fwd_cnt += Wrapping(n as u32);
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        if self.tx_buf.is_empty() && self.peer_shutdown & SHUTDOWN_SEND != 0 && !self.write_shut {
            // The guest will send no more and all it sent is delivered.
            self.write_shut = true;
            let _ = self.stream.shutdown(Shutdown::Write);
        }
        Ok(())
    }

    /// The guest should hear about freed credit without asking.
    pub fn needs_credit_update(&self) -> bool {
        (self.fwd_cnt - self.last_fwd_cnt_sent).0 >= CREDIT_UPDATE_THRESHOLD
    }

    /// Reads host data for the guest, at most `limit` bytes. `Ok(0)` is end
    /// of file.
    pub fn read_host(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.stream.read(buf)
    }

    /// Whether host data may be read now.
    pub fn wants_host_data(&self) -> bool {
        self.state == State::Established
            && !self.host_eof
            && self.peer_shutdown & SHUTDOWN_RCV == 0
            && self.peer_credit() > 0
    }

    /// Both sides are done: the connection can go.
    pub fn finished(&self) -> bool {
        self.peer_shutdown & SHUTDOWN_SEND != 0
            && self.tx_buf.is_empty()
            && (self.host_eof || self.peer_shutdown & SHUTDOWN_RCV != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(buf_alloc: u32, fwd_cnt: u32) -> Header {
        Header {
            buf_alloc,
            fwd_cnt,
            ..Default::default()
        }
    }

    #[test]
    fn credit_follows_what_the_guest_reported_and_what_was_sent() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established);
        assert_eq!(c.peer_credit(), 0, "no credit before the guest says so");
        c.update_peer_credit(&header(1000, 0));
        c.record_sent(600);
        assert_eq!(c.peer_credit(), 400);
        c.update_peer_credit(&header(1000, 500));
        assert_eq!(c.peer_credit(), 900);
        // Counters wrap.
        c.rx_cnt = Wrapping(u32::MAX - 10);
        c.update_peer_credit(&header(1000, u32::MAX - 20));
        c.record_sent(20);
        assert_eq!(c.peer_credit(), 970);
    }

    #[test]
    fn the_guest_cannot_overrun_the_buffer_it_was_offered() {
        let (a, _b) = UnixStream::pair().unwrap();
        let mut c = Connection::new(a, State::Established);
        c.push_tx(&vec![0; BUFFER_SIZE as usize]).unwrap();
        assert_eq!(c.push_tx(&[1]), Err(CreditViolation));
    }

    #[test]
    fn a_stalled_host_reader_holds_back_the_credit() {
        let (a, mut b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Connection::new(a, State::Established);
        // Fill the socket until it blocks: fwd_cnt counts only what left.
        let chunk = vec![7u8; 64 << 10];
        let mut pushed = 0usize;
        while c.push_tx(&chunk).is_ok() {
            pushed += chunk.len();
            c.flush_tx().unwrap();
        }
        let forwarded = c.fwd_cnt.0 as usize;
        assert!(forwarded < pushed, "the socket must have pushed back");
        assert!(c.has_pending_tx());
        // Draining the reader frees it.
        let mut sink = vec![0u8; pushed];
        b.set_nonblocking(true).unwrap();
        let mut got = 0;
        while got < forwarded {
            got += b.read(&mut sink).unwrap_or(0);
        }
        c.flush_tx().unwrap();
        assert!(c.fwd_cnt.0 as usize > forwarded);
        assert!(c.needs_credit_update());
        let mut h = Header::default();
        c.stamp(&mut h);
        assert!(!c.needs_credit_update());
        assert_eq!({ h.buf_alloc }, BUFFER_SIZE);
    }
}
