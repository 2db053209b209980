//! Code shared by the guest builds: the AWS Lambda Runtime API client and
//! its HTTP/1.1 framing. `no_std` with `alloc`; the transport (vsock in the
//! bare-metal guest) is the caller's.
#![cfg_attr(not(test), no_std)]

extern crate alloc;

pub mod http;
pub mod runtime_api;
