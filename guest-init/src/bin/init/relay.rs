//! While the function runs: its output lines go to the log, and each
//! connection its runtime makes to 127.0.0.1:9001 is relayed to the
//! host's Runtime API over vsock, so that any unmodified Lambda runtime
//! client works. One poll loop; PID 1 has no threads.
//!
//! After a snapshot restore the VMM resets the vsock transport: every
//! vsock stream fails (Linux's driver closes it with ECONNRESET as its
//! pending error, and reads and writes on it fail with ENOTCONN, which a
//! stream the host closed in order never gives: its reads return 0), but
//! the runtime's TCP connections
//! inside the guest live on, one of them waiting in `/next`. The relay
//! then reconnects to the host and sends again what the runtime sent
//! since the host last answered (the pending request: the Runtime API is
//! one request at a time per connection), and has the kernel's random
//! generator reseeded, so that clones do not share its state.

use alloc::vec::Vec;

use crate::function::Lines;
use crate::host::{self, RUNTIME_API_PORT};
use crate::sys::{self, Errno, PollFd, AF_INET, POLLERR, POLLHUP, POLLIN, SOCK_STREAM};

const SOL_SOCKET: i32 = 1;
const SO_REUSEADDR: i32 = 2;

/// `struct sockaddr_in`.
#[repr(C)]
struct SockaddrIn {
    family: u16,
    port_be: u16,
    addr_be: u32,
    zero: [u8; 8],
}

/// Listens on 127.0.0.1:9001, where runtimes find the Runtime API.
pub fn listen_runtime_api() -> Result<i32, Errno> {
    let fd = sys::socket(AF_INET, SOCK_STREAM, 0)?;
    let addr = SockaddrIn {
        family: AF_INET as u16,
        port_be: (RUNTIME_API_PORT as u16).to_be(),
        addr_be: 0x7f00_0001u32.to_be(),
        zero: [0; 8],
    };
    let bound = sys::setsockopt_int(fd, SOL_SOCKET, SO_REUSEADDR, 1)
        // SAFETY: a sockaddr_in, 16 bytes.
        .and_then(|_| unsafe {
            sys::bind(
                fd,
                (&addr as *const SockaddrIn).cast(),
                core::mem::size_of::<SockaddrIn>(),
            )
        })
        .and_then(|_| sys::listen(fd, 16));
    match bound {
        Ok(()) => Ok(fd),
        Err(e) => {
            let _ = sys::close(fd);
            Err(e)
        }
    }
}

/// The most of a pending request kept for a replay: Lambda's 6 MB
/// payload limit and headers.
const MAX_UNANSWERED: usize = 7 << 20;
const ECONNRESET: i32 = 104;
const ENOTCONN: i32 = 107;

/// Whether an error on a vsock stream to the host means the transport
/// was reset (see the module's comment).
fn host_reset(e: Errno) -> bool {
    matches!(e, Errno(ECONNRESET) | Errno(ENOTCONN))
}

/// A runtime's connection and its vsock twin to the host.
struct Pair {
    local: i32,
    host: i32,
    /// What the runtime sent since the host last sent anything; None
    /// once it outgrew [`MAX_UNANSWERED`].
    unanswered: Option<Vec<u8>>,
}

/// How a copy between the two sides went.
enum Pumped {
    Open,
    Closed,
    /// The host's side was reset (a restored snapshot).
    HostReset,
}

impl Pair {
    fn close(self) {
        let _ = sys::close(self.local);
        let _ = sys::close(self.host);
    }
}

impl Pair {
    /// Copies what the runtime sent to the host, keeping it until the
    /// host answers.
    fn forward_to_host(&mut self, buf: &mut [u8]) -> Pumped {
        match sys::read(self.local, buf) {
            Ok(0) => Pumped::Closed,
            Ok(n) => {
                if let Some(kept) = &mut self.unanswered {
                    kept.extend_from_slice(&buf[..n]);
                    if kept.len() > MAX_UNANSWERED {
                        self.unanswered = None;
                    }
                }
                match sys::write_all(self.host, &buf[..n]) {
                    Ok(()) => Pumped::Open,
                    Err(e) if host_reset(e) => Pumped::HostReset,
                    Err(_) => Pumped::Closed,
                }
            }
            Err(Errno(4)) => Pumped::Open,
            Err(_) => Pumped::Closed,
        }
    }

    fn forward_to_runtime(&mut self, buf: &mut [u8]) -> Pumped {
        match sys::read(self.host, buf) {
            Ok(0) => Pumped::Closed,
            Ok(n) => {
                if let Some(kept) = &mut self.unanswered {
                    kept.clear();
                }
                match sys::write_all(self.local, &buf[..n]) {
                    Ok(()) => Pumped::Open,
                    Err(_) => Pumped::Closed,
                }
            }
            Err(Errno(4)) => Pumped::Open,
            Err(e) if host_reset(e) => Pumped::HostReset,
            Err(_) => Pumped::Closed,
        }
    }

    /// After a reset: a new stream to the host, and the pending request
    /// sent again. False when the pair cannot go on.
    fn reconnect(&mut self) -> bool {
        let Some(pending) = &self.unanswered else {
            return false;
        };
        let Ok(host) = host::connect(RUNTIME_API_PORT) else {
            return false;
        };
        let _ = sys::close(self.host);
        self.host = host;
        sys::write_all(host, pending).is_ok()
    }
}

/// Serves until the function's output closes (it exited): each output
/// line goes to `line`, each connection to `listener` is relayed, and
/// `on_reset` runs once per transport reset.
pub fn serve(
    output: i32,
    listener: Option<i32>,
    mut line: impl FnMut(&[u8]),
    mut on_reset: impl FnMut(),
) {
    let mut lines = Lines::default();
    let mut pairs: Vec<Pair> = Vec::new();
    let mut buf = alloc::vec![0u8; 64 << 10];
    loop {
        let mut fds: Vec<PollFd> = [Some(output), listener]
            .into_iter()
            .flatten()
            .chain(pairs.iter().flat_map(|p| [p.local, p.host]))
            .map(|fd| PollFd {
                fd,
                events: POLLIN,
                revents: 0,
            })
            .collect();
        match sys::poll(&mut fds, -1) {
            Ok(_) | Err(Errno(4)) => {}
            Err(_) => break,
        }
        let mut reseeded = false;
        let ready = |fd: i32| {
            fds.iter()
                .any(|p| p.fd == fd && p.revents & (POLLIN | POLLHUP | POLLERR) != 0)
        };
        if ready(output) {
            match sys::read(output, &mut buf) {
                Ok(0) => break,
                Ok(n) => lines.feed(&buf[..n], &mut line),
                Err(Errno(4)) => {}
                Err(_) => break,
            }
        }
        if let Some(listener) = listener.filter(|&l| ready(l)) {
            if let Ok(local) = sys::accept(listener) {
                match host::connect(RUNTIME_API_PORT) {
                    Ok(host) => pairs.push(Pair {
                        local,
                        host,
                        unanswered: Some(Vec::new()),
                    }),
                    Err(_) => {
                        let _ = sys::close(local);
                    }
                }
            }
        }
        let mut open = Vec::with_capacity(pairs.len());
        for mut pair in pairs.drain(..) {
            let mut state = Pumped::Open;
            if ready(pair.local) {
                state = pair.forward_to_host(&mut buf);
            }
            if matches!(state, Pumped::Open) && ready(pair.host) {
                state = pair.forward_to_runtime(&mut buf);
            }
            if let Pumped::HostReset = state {
                if !reseeded {
                    reseeded = true;
                    on_reset();
                }
                state = if pair.reconnect() {
                    Pumped::Open
                } else {
                    Pumped::Closed
                };
            }
            match state {
                Pumped::Open => open.push(pair),
                _ => pair.close(),
            }
        }
        pairs = open;
    }
    lines.finish(&mut line);
    pairs.into_iter().for_each(Pair::close);
    let _ = sys::close(output);
}
