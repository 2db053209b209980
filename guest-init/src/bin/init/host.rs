//! The host, over AF_VSOCK (CID 2): the start-up message on port 9003,
//! the function's log stream on 9002, and the Runtime API on 9001, which
//! the relay forwards to and the init itself uses to report failures.

use alloc::format;
use alloc::string::String;
use alloc::vec::Vec;

use guest_init::environ::{self, ENVIRON_PORT, MAX_MESSAGE};
use guest_init::http::{ByteStream, StreamError};
use guest_init::runtime_api::RuntimeClient;

use crate::sys::{self, Errno, AF_VSOCK, SOCK_STREAM};

pub const RUNTIME_API_PORT: u32 = 9001;
pub const LOG_PORT: u32 = 9002;
const HOST_CID: u32 = 2;

/// `struct sockaddr_vm`.
#[repr(C)]
struct SockaddrVm {
    family: u16,
    reserved: u16,
    port: u32,
    cid: u32,
    flags: u8,
    zero: [u8; 3],
}

/// A stream to the host's `port`.
pub fn connect(port: u32) -> Result<i32, Errno> {
    let fd = sys::socket(AF_VSOCK, SOCK_STREAM, 0)?;
    let addr = SockaddrVm {
        family: AF_VSOCK as u16,
        reserved: 0,
        port,
        cid: HOST_CID,
        flags: 0,
        zero: [0; 3],
    };
    // SAFETY: a sockaddr_vm, 16 bytes.
    let connected = unsafe {
        sys::connect(
            fd,
            (&addr as *const SockaddrVm).cast(),
            core::mem::size_of::<SockaddrVm>(),
        )
    };
    match connected {
        Ok(()) => Ok(fd),
        Err(e) => {
            let _ = sys::close(fd);
            Err(e)
        }
    }
}

/// A descriptor as the Runtime API client's byte stream.
pub struct FdStream(pub i32);

impl ByteStream for FdStream {
    fn read(&mut self, buf: &mut [u8]) -> Result<usize, StreamError> {
        sys::read(self.0, buf).map_err(|e| StreamError(format!("read: errno {}", e.0)))
    }

    fn write_all(&mut self, data: &[u8]) -> Result<(), StreamError> {
        sys::write_all(self.0, data).map_err(|e| StreamError(format!("write: errno {}", e.0)))
    }
}

/// Why the start-up message could not be had.
pub enum EnvironFailure {
    /// No host over vsock (no device, or nobody listening).
    Unreachable(Errno),
    /// The host sent something the init refuses.
    Malformed(String),
}

/// The function's variables, from the host's start-up message.
pub fn read_environ() -> Result<Vec<(String, String)>, EnvironFailure> {
    let fd = connect(ENVIRON_PORT).map_err(EnvironFailure::Unreachable)?;
    let mut message = Vec::new();
    let mut buf = [0u8; 4096];
    let result = loop {
        match sys::read(fd, &mut buf) {
            Ok(0) => {
                break environ::decode(&message)
                    .map_err(|e| EnvironFailure::Malformed(format!("{e}")))
            }
            Ok(n) if message.len() + n > MAX_MESSAGE => {
                break Err(EnvironFailure::Malformed(format!(
                    "the environment message is over {MAX_MESSAGE} bytes"
                )))
            }
            Ok(n) => message.extend_from_slice(&buf[..n]),
            Err(Errno(4)) => continue,
            Err(e) => break Err(EnvironFailure::Unreachable(e)),
        }
    };
    let _ = sys::close(fd);
    result
}

/// Tells the host's Runtime API that the function cannot run, as Lambda
/// reports an init failure.
pub fn report_failure(error_type: &str, message: &str) -> Result<(), String> {
    let fd = connect(RUNTIME_API_PORT).map_err(|e| format!("errno {}", e.0))?;
    let result = RuntimeClient::new(FdStream(fd))
        .init_error(error_type, message)
        .map_err(|e| format!("{e}"));
    let _ = sys::close(fd);
    result
}
