//! virtio-vsock with a host backend on Unix sockets, compatible with
//! Firecracker's "hybrid vsock":
//!
//! * host to guest: a host program connects to the VM's socket, writes
//!   `CONNECT <port>\n` and, once the guest accepts, reads `OK <port>\n`;
//! * guest to host: a guest connection to CID 2, port P, is forwarded to
//!   the Unix socket `<path>_<P>`.

mod connection;
mod device;
pub mod packet;

pub use device::{Vsock, VsockError};

/// The host's CID, as the guest addresses it.
pub const HOST_CID: u64 = 2;
