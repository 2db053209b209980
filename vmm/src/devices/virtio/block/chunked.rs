//! Chunked images: a filesystem image cut into fixed-size chunks, each
//! stored once in a content-addressed store that every image shares, and
//! fetched only when the guest first reads it.
//!
//! Chunks are sealed with convergent encryption: a chunk's key comes from
//! its content (the host derives it, keyed with a secret of its own), so
//! identical chunks of different images seal to identical bytes, which
//! are stored once under the SHA-256 of those bytes. AES-256-GCM with a
//! fixed nonce is sound here: a key only ever seals the one plaintext it
//! was derived from. Reading a chunk checks both its address (the bytes
//! are the ones named) and its tag (they decrypt under the key).
//!
//! The manifest, the image's list of chunks with their keys, is the
//! secret: the host keeps it sealed and hands it to the VMM on a
//! descriptor.
//!
//! ```text
//! manifest: "LMCHUNK1" | chunk size u32 | image length u64 | count u32
//!           | count x (address [32] | key [32])
//! ```

use std::fs::File;
use std::io::{self, Read};
use std::path::{Path, PathBuf};

use sealing::{Cipher, NONCE_LEN, TAG_LEN};
use sha2::{Digest, Sha256};

use super::chunk_cache::{ChunkCache, ChunkSource};

const MAGIC: &[u8; 8] = b"LMCHUNK1";
/// Lambda's on-demand container loading cuts images into 512 KiB chunks.
pub const CHUNK_SIZE: u32 = 512 << 10;
const AAD: &[u8] = b"lambda-microvm chunk v1";
/// Decrypted chunks kept: 16 MiB.
const CACHED_CHUNKS: usize = 32;
/// Far above any real image's chunk count; bounds a hostile manifest.
const MAX_CHUNKS: u32 = 1 << 20;

pub type ChunkAddress = [u8; 32];
pub type ChunkKey = [u8; 32];

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ChunkRef {
    pub address: ChunkAddress,
    pub key: ChunkKey,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ChunkManifest {
    pub chunk_size: u32,
    pub len: u64,
    pub chunks: Vec<ChunkRef>,
}

#[derive(Debug, thiserror::Error)]
pub enum ChunkedError {
    #[error("not a chunk manifest (bad magic)")]
    BadMagic,
    #[error("the manifest is cut short or has trailing bytes")]
    Length,
    #[error("the manifest lists {found} chunks of {chunk_size} bytes for a {len}-byte image")]
    Count {
        found: u64,
        chunk_size: u32,
        len: u64,
    },
    #[error("chunk size {0} is not a power of two between 4 KiB and 4 MiB")]
    ChunkSize(u32),
    #[error("the chunk store {0:?} is not a directory")]
    Store(PathBuf),
    #[error("{0}")]
    Io(#[from] io::Error),
}

impl ChunkManifest {
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(24 + self.chunks.len() * 64);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&self.chunk_size.to_le_bytes());
        out.extend_from_slice(&self.len.to_le_bytes());
        out.extend_from_slice(&(self.chunks.len() as u32).to_le_bytes());
        for chunk in &self.chunks {
            out.extend_from_slice(&chunk.address);
            out.extend_from_slice(&chunk.key);
        }
        out
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, ChunkedError> {
        if bytes.len() < 24 {
            return Err(ChunkedError::Length);
        }
        if &bytes[..8] != MAGIC {
            return Err(ChunkedError::BadMagic);
        }
        let chunk_size = u32::from_le_bytes(bytes[8..12].try_into().expect("4 bytes"));
        let len = u64::from_le_bytes(bytes[12..20].try_into().expect("8 bytes"));
        let count = u32::from_le_bytes(bytes[20..24].try_into().expect("4 bytes"));
        if !chunk_size.is_power_of_two() || !(4096..=4 << 20).contains(&chunk_size) {
            return Err(ChunkedError::ChunkSize(chunk_size));
        }
        if count > MAX_CHUNKS || u64::from(count) != len.div_ceil(u64::from(chunk_size)) {
            return Err(ChunkedError::Count {
                found: u64::from(count),
                chunk_size,
                len,
            });
        }
        let body = &bytes[24..];
        if body.len() != count as usize * 64 {
            return Err(ChunkedError::Length);
        }
        let chunks = body
            .chunks_exact(64)
            .map(|c| ChunkRef {
                address: c[..32].try_into().expect("32 bytes"),
                key: c[32..].try_into().expect("32 bytes"),
            })
            .collect();
        Ok(ChunkManifest {
            chunk_size,
            len,
            chunks,
        })
    }

    /// Reads a manifest from `file` (a descriptor or a path's file).
    pub fn read_from(file: File) -> Result<Self, ChunkedError> {
        let mut bytes = Vec::new();
        file.take(24 + u64::from(MAX_CHUNKS) * 64)
            .read_to_end(&mut bytes)?;
        Self::decode(&bytes)
    }
}

/// Seals one chunk under `key`: its address and the bytes to store.
pub fn seal_chunk(plain: &[u8], key: &ChunkKey) -> (ChunkAddress, Vec<u8>) {
    let mut sealed = plain.to_vec();
    let tag = Cipher::new(key)
        .seal_in_place(&[0; NONCE_LEN], AAD, &mut sealed)
        .expect("AES-GCM seals any chunk up to 64 GiB");
    sealed.extend_from_slice(&tag);
    (Sha256::digest(&sealed).into(), sealed)
}

/// Where chunk `address` is in a store.
pub fn chunk_path(store: &Path, address: &ChunkAddress) -> PathBuf {
    store.join(hex::encode(address))
}

/// A chunked image's chunks, fetched from the store as they are read.
pub struct ChunkedImage {
    store: PathBuf,
    manifest: ChunkManifest,
    fetched: u64,
}

impl ChunkedImage {
    pub fn open(store: &Path, manifest: ChunkManifest) -> Result<ChunkCache<Self>, ChunkedError> {
        if !store.is_dir() {
            return Err(ChunkedError::Store(store.to_path_buf()));
        }
        let image = ChunkedImage {
            store: store.to_path_buf(),
            manifest,
            fetched: 0,
        };
        Ok(ChunkCache::new(image, CACHED_CHUNKS))
    }

    fn fail(&self, index: u64, what: &str) -> io::Error {
        let message = format!(
            "chunk {index} ({}) of the image {what}",
            hex::encode(self.manifest.chunks[index as usize].address)
        );
        tracing::error!("{message}");
        io::Error::new(io::ErrorKind::InvalidData, message)
    }
}

impl ChunkSource for ChunkedImage {
    fn chunk_size(&self) -> u64 {
        u64::from(self.manifest.chunk_size)
    }

    fn image_len(&self) -> u64 {
        self.manifest.len
    }

    fn load(&mut self, index: u64) -> io::Result<Vec<u8>> {
        let chunk = self.manifest.chunks[index as usize];
        let size = u64::from(self.manifest.chunk_size);
        let expected = (self.manifest.len - index * size).min(size) as usize;
        let mut sealed = Vec::with_capacity(expected + TAG_LEN);
        File::open(chunk_path(&self.store, &chunk.address))
            .and_then(|f| {
                f.take((expected + TAG_LEN + 1) as u64)
                    .read_to_end(&mut sealed)
            })
            .map_err(|e| self.fail(index, &format!("cannot be read: {e}")))?;
        self.fetched += 1;
        if Sha256::digest(&sealed).as_slice() != chunk.address {
            return Err(self.fail(
                index,
                "is not the chunk its address names: altered or swapped",
            ));
        }
        if sealed.len() != expected + TAG_LEN {
            return Err(self.fail(index, "has the wrong length"));
        }
        let tag: [u8; TAG_LEN] = sealed[expected..].try_into().expect("a 16-byte tag");
        sealed.truncate(expected);
        Cipher::new(&chunk.key)
            .open_in_place(&[0; NONCE_LEN], AAD, &mut sealed, &tag)
            .map_err(|_| self.fail(index, "failed authentication"))?;
        Ok(sealed)
    }
}

impl Drop for ChunkedImage {
    fn drop(&mut self) {
        tracing::info!(
            "chunked image: {} of its {} chunks fetched from the store",
            self.fetched,
            self.manifest.chunks.len()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::block::BlockBackend;

    const SIZE: u32 = 4096;

    fn store(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("chunks-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// Stores `image` chunk by chunk (keys from the content, as the host
    /// derives them) and returns its manifest.
    fn put(store: &Path, image: &[u8]) -> ChunkManifest {
        let chunks = image
            .chunks(SIZE as usize)
            .map(|plain| {
                let key: ChunkKey = Sha256::digest(plain).into();
                let (address, sealed) = seal_chunk(plain, &key);
                std::fs::write(chunk_path(store, &address), sealed).unwrap();
                ChunkRef { address, key }
            })
            .collect();
        ChunkManifest {
            chunk_size: SIZE,
            len: image.len() as u64,
            chunks,
        }
    }

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i / 4096 * 7 + i % 13) as u8).collect()
    }

    #[test]
    fn reads_fetch_only_the_chunks_they_touch() {
        let dir = store("lazy");
        let plain = image(10 * SIZE as usize + 100);
        let manifest = ChunkManifest::decode(&put(&dir, &plain).encode()).unwrap();
        let mut img = ChunkedImage::open(&dir, manifest).unwrap();
        let mut buf = vec![0u8; 200];
        img.read_at(&mut buf, 3 * u64::from(SIZE) - 100).unwrap();
        assert_eq!(buf, plain[3 * SIZE as usize - 100..3 * SIZE as usize + 100]);
        assert_eq!(img.loaded(), 2, "chunks 2 and 3 only");
        img.read_at(&mut buf[..50], 3 * u64::from(SIZE)).unwrap();
        assert_eq!(img.loaded(), 2, "a cached chunk is not fetched again");
        let mut tail = vec![0u8; 100];
        img.read_at(&mut tail, 10 * u64::from(SIZE)).unwrap();
        assert_eq!(tail, plain[10 * SIZE as usize..]);
        assert_eq!((img.loaded(), img.chunks()), (3, 11));
        assert!(img.read_at(&mut [0u8; 2], img.size() - 1).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn identical_chunks_are_stored_once() {
        let dir = store("dedup");
        let mut plain = vec![5u8; 4 * SIZE as usize];
        plain[3 * SIZE as usize] = 6;
        let manifest = put(&dir, &plain);
        assert_eq!(manifest.chunks[0], manifest.chunks[2]);
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 2);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn altered_swapped_or_missing_chunks_are_errors_not_wrong_bytes() {
        let dir = store("tamper");
        let plain = image(4 * SIZE as usize);
        let manifest = put(&dir, &plain);
        let path = |i: usize| chunk_path(&dir, &manifest.chunks[i].address);
        let read_chunk = |m: &ChunkManifest, i: u64| {
            let mut img = ChunkedImage::open(&dir, m.clone()).unwrap();
            let mut buf = vec![0u8; 10];
            img.read_at(&mut buf, i * u64::from(SIZE)).map(|_| buf)
        };
        let mut bytes = std::fs::read(path(0)).unwrap();
        bytes[100] ^= 1;
        std::fs::write(path(0), &bytes).unwrap();
        let err = read_chunk(&manifest, 0).unwrap_err().to_string();
        assert!(err.contains("altered or swapped"), "{err}");
        assert_eq!(
            read_chunk(&manifest, 1).unwrap(),
            plain[SIZE as usize..SIZE as usize + 10]
        );

        // Chunk 2's bytes under chunk 1's name: the address check catches it.
        std::fs::copy(path(2), path(1)).unwrap();
        assert!(read_chunk(&manifest, 1).is_err());
        // The right bytes but a wrong key: authentication fails.
        let mut wrong_key = manifest.clone();
        wrong_key.chunks[3].key[0] ^= 1;
        let err = read_chunk(&wrong_key, 3).unwrap_err().to_string();
        assert!(err.contains("failed authentication"), "{err}");
        std::fs::remove_file(path(3)).unwrap();
        assert!(read_chunk(&manifest, 3)
            .unwrap_err()
            .to_string()
            .contains("cannot be read"));
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn malformed_manifests_are_named() {
        let manifest = ChunkManifest {
            chunk_size: SIZE,
            len: 3 * u64::from(SIZE),
            chunks: vec![
                ChunkRef {
                    address: [1; 32],
                    key: [2; 32]
                };
                3
            ],
        };
        let bytes = manifest.encode();
        assert_eq!(ChunkManifest::decode(&bytes).unwrap(), manifest);
        assert!(matches!(
            ChunkManifest::decode(&bytes[..100]),
            Err(ChunkedError::Length)
        ));
        assert!(matches!(
            ChunkManifest::decode(b"garbage garbage garbage!"),
            Err(ChunkedError::BadMagic)
        ));
        let mut longer = manifest.clone();
        longer.len += 1;
        assert!(matches!(
            ChunkManifest::decode(&longer.encode()),
            Err(ChunkedError::Count { .. })
        ));
        let mut odd = bytes.clone();
        odd[8..12].copy_from_slice(&1000u32.to_le_bytes());
        assert!(matches!(
            ChunkManifest::decode(&odd),
            Err(ChunkedError::ChunkSize(1000))
        ));
    }
}
