//! Code shared by the guest builds: the AWS Lambda Runtime API client, its
//! HTTP/1.1 framing, the start-up message that carries the function's
//! environment, and what a Linux guest's disks hold. `no_std` with `alloc`; the transport (vsock in the
//! bare-metal guest) is the caller's.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod disks;
pub mod environ;
pub mod http;
pub mod runtime_api;
