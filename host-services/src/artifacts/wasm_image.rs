//! The code disk of a WebAssembly function, as the bare-metal guest reads
//! it: one 512-byte header sector (`b"LMBDWASM"`, the module length and the
//! fuel per invocation, both u64 little-endian), then the module, padded to
//! whole sectors.

const MAGIC: &[u8; 8] = b"LMBDWASM";
const SECTOR: usize = 512;
const WASM_MAGIC: &[u8; 4] = b"\0asm";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ImageError {
    #[error("not a WebAssembly module (no \\0asm magic)")]
    NotWasm,
}

/// The disk image for `module`; `fuel` 0 means the guest's default.
pub fn build(module: &[u8], fuel: u64) -> Result<Vec<u8>, ImageError> {
    if !module.starts_with(WASM_MAGIC) {
        return Err(ImageError::NotWasm);
    }
    let mut image = vec![0u8; SECTOR];
    image[..8].copy_from_slice(MAGIC);
    image[8..16].copy_from_slice(&(module.len() as u64).to_le_bytes());
    image[16..24].copy_from_slice(&fuel.to_le_bytes());
    image.extend_from_slice(module);
    image.resize(image.len().next_multiple_of(SECTOR), 0);
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_then_module_in_whole_sectors() {
        let module = b"\0asm\x01\0\0\0";
        let image = build(module, 77).unwrap();
        assert_eq!(image.len(), 1024);
        assert_eq!(&image[..8], b"LMBDWASM");
        assert_eq!(u64::from_le_bytes(image[8..16].try_into().unwrap()), 8);
        assert_eq!(u64::from_le_bytes(image[16..24].try_into().unwrap()), 77);
        assert_eq!(&image[512..520], module);
        assert_eq!(build(b"ELF", 0), Err(ImageError::NotWasm));
    }
}
