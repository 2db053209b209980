//! While the function runs: its output lines go to the log, and each
//! connection its runtime makes to 127.0.0.1:9001 is relayed to the
//! host's Runtime API over vsock, so that any unmodified Lambda runtime
//! client works. One poll loop; PID 1 has no threads.

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

/// A runtime's connection and its vsock twin to the host.
struct Pair {
    local: i32,
    host: i32,
}

impl Pair {
    fn close(self) {
        let _ = sys::close(self.local);
        let _ = sys::close(self.host);
    }
}

/// Copies what `from` has to `to`; false once either side is done.
fn pump(from: i32, to: i32, buf: &mut [u8]) -> bool {
    match sys::read(from, buf) {
        Ok(0) => false,
        Ok(n) => sys::write_all(to, &buf[..n]).is_ok(),
        Err(Errno(4)) => true,
        Err(_) => false,
    }
}

/// Serves until the function's output closes (it exited): each output
/// line goes to `line`, each connection to `listener` is relayed.
pub fn serve(output: i32, listener: Option<i32>, mut line: impl FnMut(&[u8])) {
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
                    Ok(host) => pairs.push(Pair { local, host }),
                    Err(_) => {
                        let _ = sys::close(local);
                    }
                }
            }
        }
        let mut open = Vec::with_capacity(pairs.len());
        for pair in pairs.drain(..) {
            let alive = (!ready(pair.local) || pump(pair.local, pair.host, &mut buf))
                && (!ready(pair.host) || pump(pair.host, pair.local, &mut buf));
            if alive {
                open.push(pair);
            } else {
                pair.close();
            }
        }
        pairs = open;
    }
    lines.finish(&mut line);
    pairs.into_iter().for_each(Pair::close);
    let _ = sys::close(output);
}
