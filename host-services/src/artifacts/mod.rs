//! Function code at rest: ZIPs checked on upload, the code disks guests
//! boot with (EROFS for Linux, a Wasm image for the bare-metal guest), the
//! Linux guest's initramfs (cpio),
//! sealed artifacts (AES-256-GCM chunks under wrapped data keys), and OCI
//! images flattened and cut into convergently sealed chunks.

pub mod chunk_store;
pub mod code;
pub mod container_image;
pub mod cpio;
pub mod erofs_image;
pub mod oci;
pub mod sealed;
pub mod wasm_image;
