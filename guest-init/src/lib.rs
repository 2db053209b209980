//! Code shared by the guest builds: the Runtime API client, the wire
//! formats and the configuration parsing. `no_std` with `alloc`.
#![cfg_attr(not(test), no_std)]

extern crate alloc;
