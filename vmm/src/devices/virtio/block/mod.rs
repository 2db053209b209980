//! virtio-blk: a raw image, read-only or read-write, a sealed (encrypted)
//! read-only image, or a chunked one (content-addressed, encrypted chunks
//! fetched as the guest reads them), with flush and get-id. Every request is bounds-checked against the image; a request
//! the device cannot make sense of is completed with an error status, or
//! dropped with a log line when it has nowhere to put one.

mod backend;
pub mod chunk_cache;
pub mod chunked;
mod device;
mod request;
pub mod sealed;

pub use backend::{BlockBackend, RawFile};
pub use device::Block;
pub use request::{RequestHeader, RequestType, SECTOR_SIZE};
