//! Sealed images: a disk image encrypted at rest with AES-256-GCM, in
//! fixed-size chunks that are decrypted on demand as the guest reads them.
//!
//! ```text
//! header (64 bytes): magic "LMSEALD1", version u32, chunk size u32,
//!                    image length u64, artifact id [16], zero padding
//! chunk i:           nonce [12] | ciphertext [chunk size, or the rest] | tag [16]
//! ```
//!
//! Each chunk has its own random nonce, and its associated data is the
//! whole header plus the chunk's index: a chunk moved to another index or
//! another artifact, a header edited to claim another length or id, or a
//! file cut short fails authentication. The artifact id comes from the
//! owner together with the key, so an older sealed version of the artifact
//! put in its place is refused before any read. Decrypted bytes stay in
//! memory, in a small cache of recent chunks.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::unix::fs::FileExt;

use sealing::Cipher;

use super::chunk_cache::{ChunkCache, ChunkSource};

const MAGIC: &[u8; 8] = b"LMSEALD1";
const VERSION: u32 = 1;
pub const HEADER_LEN: usize = 64;
pub use sealing::{NONCE_LEN, TAG_LEN};
/// What each chunk adds to its plaintext on disk.
pub const CHUNK_OVERHEAD: usize = NONCE_LEN + TAG_LEN;
const MIN_CHUNK: u32 = 4096;
const MAX_CHUNK: u32 = 4 << 20;
/// Decrypted chunks kept for reads that come back to them.
const CACHED_CHUNKS: usize = 16;

pub type ArtifactId = [u8; 16];
pub type DataKey = [u8; 32];

#[derive(Debug, thiserror::Error)]
pub enum SealedError {
    #[error("not a sealed image (bad magic)")]
    BadMagic,
    #[error("sealed image version {0} is not supported (this VMM reads version {VERSION})")]
    Version(u32),
    #[error("chunk size {0} is not a power of two between {MIN_CHUNK} and {MAX_CHUNK}")]
    ChunkSize(u32),
    #[error(
        "the image is artifact {found}, not {expected}: an older or another artifact was put in its place"
    )]
    WrongArtifact { expected: String, found: String },
    #[error(
        "the sealed file is {actual} bytes, which does not fit the {expected}-byte image its header describes: truncated or extended"
    )]
    Length { expected: u64, actual: u64 },
    #[error("{0}")]
    Io(#[from] io::Error),
}

/// The fixed header, as written.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Header {
    chunk_size: u32,
    len: u64,
    artifact: ArtifactId,
}

impl Header {
    fn encode(&self) -> [u8; HEADER_LEN] {
        let mut h = [0u8; HEADER_LEN];
        h[..8].copy_from_slice(MAGIC);
        h[8..12].copy_from_slice(&VERSION.to_le_bytes());
        h[12..16].copy_from_slice(&self.chunk_size.to_le_bytes());
        h[16..24].copy_from_slice(&self.len.to_le_bytes());
        h[24..40].copy_from_slice(&self.artifact);
        h
    }

    fn decode(h: &[u8; HEADER_LEN]) -> Result<Self, SealedError> {
        if &h[..8] != MAGIC {
            return Err(SealedError::BadMagic);
        }
        let word = |at: usize| u32::from_le_bytes([h[at], h[at + 1], h[at + 2], h[at + 3]]);
        let version = word(8);
        if version != VERSION {
            return Err(SealedError::Version(version));
        }
        let chunk_size = word(12);
        if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
            return Err(SealedError::ChunkSize(chunk_size));
        }
        let mut len = [0u8; 8];
        len.copy_from_slice(&h[16..24]);
        let mut artifact = [0u8; 16];
        artifact.copy_from_slice(&h[24..40]);
        Ok(Header {
            chunk_size,
            len: u64::from_le_bytes(len),
            artifact,
        })
    }

    fn chunks(&self) -> u64 {
        self.len.div_ceil(u64::from(self.chunk_size))
    }

    /// Where chunk `index` starts in the file, and its plaintext length.
    fn chunk_span(&self, index: u64) -> (u64, usize) {
        let size = u64::from(self.chunk_size);
        let offset = HEADER_LEN as u64 + index * (size + CHUNK_OVERHEAD as u64);
        let plain = (self.len - index * size).min(size) as usize;
        (offset, plain)
    }

    /// The file's length; None for a header no file can match.
    fn sealed_len(&self) -> Option<u64> {
        self.chunks()
            .checked_mul(CHUNK_OVERHEAD as u64)?
            .checked_add(self.len)?
            .checked_add(HEADER_LEN as u64)
    }
}

fn associated_data(header: &[u8; HEADER_LEN], index: u64) -> [u8; HEADER_LEN + 8] {
    let mut aad = [0u8; HEADER_LEN + 8];
    aad[..HEADER_LEN].copy_from_slice(header);
    aad[HEADER_LEN..].copy_from_slice(&index.to_le_bytes());
    aad
}

/// What the owner hands the VMM for a sealed drive: `ARTIFACT_ID_HEX
/// KEY_HEX`, one line.
pub fn key_line(artifact: &ArtifactId, key: &DataKey) -> String {
    format!("{} {}\n", hex::encode(artifact), hex::encode(key))
}

fn unhex<const N: usize>(s: &str) -> Option<[u8; N]> {
    let mut out = [0u8; N];
    hex::decode_to_slice(s, &mut out).ok()?;
    Some(out)
}

/// Parses [`key_line`]'s output.
pub fn parse_key_line(line: &str) -> Result<(ArtifactId, DataKey), String> {
    let mut words = line.split_whitespace();
    match (words.next(), words.next(), words.next()) {
        (Some(id), Some(key), None) => Ok((
            unhex(id).ok_or("the artifact id is not 32 hex digits")?,
            unhex(key).ok_or("the key is not 64 hex digits")?,
        )),
        _ => Err("expected ARTIFACT_ID_HEX KEY_HEX".into()),
    }
}

/// Seals the `len` bytes `plain` yields into `out`, under `key`, as
/// `artifact`. `nonce` must give a fresh random value on every call.
pub fn seal(
    plain: &mut impl Read,
    len: u64,
    out: &mut impl Write,
    artifact: ArtifactId,
    key: &DataKey,
    chunk_size: u32,
    mut nonce: impl FnMut() -> [u8; NONCE_LEN],
) -> Result<(), SealedError> {
    let header = Header {
        chunk_size,
        len,
        artifact,
    };
    if !chunk_size.is_power_of_two() || !(MIN_CHUNK..=MAX_CHUNK).contains(&chunk_size) {
        return Err(SealedError::ChunkSize(chunk_size));
    }
    let encoded = header.encode();
    out.write_all(&encoded)?;
    let cipher = Cipher::new(key);
    let mut buf = vec![0u8; chunk_size as usize];
    for index in 0..header.chunks() {
        let (_, n) = header.chunk_span(index);
        let chunk = &mut buf[..n];
        plain.read_exact(chunk)?;
        let nonce_bytes = nonce();
        let tag = cipher
            .seal_in_place(&nonce_bytes, &associated_data(&encoded, index), chunk)
            .map_err(|_| io::Error::other("AES-GCM refused a chunk"))?;
        out.write_all(&nonce_bytes)?;
        out.write_all(chunk)?;
        out.write_all(&tag)?;
    }
    Ok(())
}

/// A sealed image's chunks, for a [`ChunkCache`].
pub struct SealedImage {
    file: File,
    header: Header,
    encoded: [u8; HEADER_LEN],
    cipher: Cipher,
    sealed: Vec<u8>,
}

impl SealedImage {
    /// Opens `file`, which must be sealed as `artifact`, to be read with
    /// `key`, as a block device that keeps the last few chunks it read.
    pub fn open(
        file: File,
        artifact: &ArtifactId,
        key: &DataKey,
    ) -> Result<ChunkCache<Self>, SealedError> {
        let mut encoded = [0u8; HEADER_LEN];
        file.read_exact_at(&mut encoded, 0)?;
        let header = Header::decode(&encoded)?;
        if &header.artifact != artifact {
            return Err(SealedError::WrongArtifact {
                expected: hex::encode(artifact),
                found: hex::encode(header.artifact),
            });
        }
        let actual = file.metadata()?.len();
        if header.sealed_len() != Some(actual) {
            return Err(SealedError::Length {
                expected: header.len,
                actual,
            });
        }
        let image = SealedImage {
            file,
            header,
            encoded,
            cipher: Cipher::new(key),
            sealed: vec![0u8; header.chunk_size as usize + CHUNK_OVERHEAD],
        };
        Ok(ChunkCache::new(image, CACHED_CHUNKS))
    }
}

impl ChunkSource for SealedImage {
    fn chunk_size(&self) -> u64 {
        u64::from(self.header.chunk_size)
    }

    fn image_len(&self) -> u64 {
        self.header.len
    }

    fn load(&mut self, index: u64) -> io::Result<Vec<u8>> {
        let (offset, n) = self.header.chunk_span(index);
        let sealed = &mut self.sealed[..n + CHUNK_OVERHEAD];
        self.file.read_exact_at(sealed, offset)?;
        let (nonce, rest) = sealed.split_at_mut(NONCE_LEN);
        let (data, tag) = rest.split_at_mut(n);
        let nonce: &[u8; NONCE_LEN] = (&*nonce).try_into().expect("a 12-byte nonce");
        let tag: &[u8; TAG_LEN] = (&*tag).try_into().expect("a 16-byte tag");
        let mut plain = data.to_vec();
        self.cipher
            .open_in_place(
                nonce,
                &associated_data(&self.encoded, index),
                &mut plain,
                tag,
            )
            .map_err(|_| {
                let message = format!(
                    "chunk {index} of artifact {} failed authentication: the image was altered",
                    hex::encode(self.header.artifact)
                );
                tracing::error!("{message}");
                io::Error::new(io::ErrorKind::InvalidData, message)
            })?;
        Ok(plain)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const ARTIFACT: ArtifactId = [7; 16];
    const KEY: DataKey = [9; 32];
    const CHUNK: u32 = 4096;

    fn image(len: usize) -> Vec<u8> {
        (0..len).map(|i| (i * 31 % 251) as u8).collect()
    }

    fn sealed(plain: &[u8], artifact: ArtifactId, key: &DataKey) -> Vec<u8> {
        let mut counter = 0u8;
        let mut out = Vec::new();
        seal(
            &mut &plain[..],
            plain.len() as u64,
            &mut out,
            artifact,
            key,
            CHUNK,
            || {
                counter += 1;
                [counter; NONCE_LEN]
            },
        )
        .unwrap();
        out
    }

    fn file_of(bytes: &[u8]) -> File {
        let path = std::env::temp_dir().join(format!(
            "sealed-test-{}-{}",
            std::process::id(),
            rand_suffix()
        ));
        std::fs::write(&path, bytes).unwrap();
        let file = File::open(&path).unwrap();
        std::fs::remove_file(&path).unwrap();
        file
    }

    fn rand_suffix() -> u64 {
        use std::sync::atomic::{AtomicU64, Ordering};
        static N: AtomicU64 = AtomicU64::new(0);
        N.fetch_add(1, Ordering::Relaxed)
    }

    use crate::devices::virtio::block::BlockBackend;

    fn read_all(img: &mut ChunkCache<SealedImage>) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; img.size() as usize];
        img.read_at(&mut out, 0)?;
        Ok(out)
    }

    #[test]
    fn reads_at_any_offset_return_the_plain_bytes() {
        let plain = image(3 * CHUNK as usize + 1000);
        let mut img =
            SealedImage::open(file_of(&sealed(&plain, ARTIFACT, &KEY)), &ARTIFACT, &KEY).unwrap();
        assert_eq!(img.size(), plain.len() as u64);
        assert_eq!(read_all(&mut img).unwrap(), plain);
        for (offset, len) in [(0, 1), (4095, 2), (5000, 8288), (12288, 1000)] {
            let mut buf = vec![0u8; len];
            img.read_at(&mut buf, offset as u64).unwrap();
            assert_eq!(buf, plain[offset..offset + len]);
        }
        assert!(img.write_at(&[0], 0).is_err());
        let mut past = [0u8; 2];
        assert!(img.read_at(&mut past, plain.len() as u64 - 1).is_err());
    }

    #[test]
    fn a_flipped_bit_is_an_error_for_that_chunk_only() {
        let plain = image(3 * CHUNK as usize);
        let mut bytes = sealed(&plain, ARTIFACT, &KEY);
        // A bit inside the second chunk's ciphertext.
        let at = HEADER_LEN + (CHUNK as usize + CHUNK_OVERHEAD) + NONCE_LEN + 100;
        bytes[at] ^= 0x10;
        let mut img = SealedImage::open(file_of(&bytes), &ARTIFACT, &KEY).unwrap();
        let mut first = vec![0u8; CHUNK as usize];
        img.read_at(&mut first, 0).unwrap();
        assert_eq!(first, plain[..CHUNK as usize]);
        let err = img.read_at(&mut first, u64::from(CHUNK)).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
        assert!(err.to_string().contains("chunk 1"), "{err}");
        // The tag and the nonce are covered too.
        for at in [HEADER_LEN + 3, HEADER_LEN + NONCE_LEN + CHUNK as usize + 1] {
            let mut bytes = sealed(&plain, ARTIFACT, &KEY);
            bytes[at] ^= 1;
            let mut img = SealedImage::open(file_of(&bytes), &ARTIFACT, &KEY).unwrap();
            assert!(read_all(&mut img).is_err(), "flip at {at} went unnoticed");
        }
    }

    #[test]
    fn swapped_chunks_are_detected() {
        let plain = image(2 * CHUNK as usize);
        let bytes = sealed(&plain, ARTIFACT, &KEY);
        let span = CHUNK as usize + CHUNK_OVERHEAD;
        let mut swapped = bytes[..HEADER_LEN].to_vec();
        swapped.extend_from_slice(&bytes[HEADER_LEN + span..]);
        swapped.extend_from_slice(&bytes[HEADER_LEN..HEADER_LEN + span]);
        let mut img = SealedImage::open(file_of(&swapped), &ARTIFACT, &KEY).unwrap();
        assert!(read_all(&mut img).is_err());
        // The same chunk from another artifact, sealed with the same key.
        let other = sealed(&plain, [8; 16], &KEY);
        let mut mixed = bytes.clone();
        mixed[HEADER_LEN..HEADER_LEN + span].copy_from_slice(&other[HEADER_LEN..HEADER_LEN + span]);
        let mut img = SealedImage::open(file_of(&mixed), &ARTIFACT, &KEY).unwrap();
        assert!(read_all(&mut img).is_err());
    }

    #[test]
    fn truncated_or_extended_files_are_refused_at_open() {
        let bytes = sealed(&image(2 * CHUNK as usize), ARTIFACT, &KEY);
        for len in [
            bytes.len() - 1,
            bytes.len() - CHUNK as usize - CHUNK_OVERHEAD,
            10,
        ] {
            let err = SealedImage::open(file_of(&bytes[..len]), &ARTIFACT, &KEY)
                .err()
                .unwrap();
            assert!(
                matches!(err, SealedError::Length { .. } | SealedError::Io(_)),
                "{err}"
            );
        }
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(SealedImage::open(file_of(&longer), &ARTIFACT, &KEY).is_err());
        // A header edited to match the shorter file fails every chunk.
        let cut = &bytes[..bytes.len() - CHUNK as usize - CHUNK_OVERHEAD];
        let mut edited = cut.to_vec();
        edited[16..24].copy_from_slice(&u64::from(CHUNK).to_le_bytes());
        let mut img = SealedImage::open(file_of(&edited), &ARTIFACT, &KEY).unwrap();
        assert!(read_all(&mut img).is_err());
    }

    #[test]
    fn a_replayed_older_version_is_refused() {
        let old = sealed(&image(CHUNK as usize), [1; 16], &KEY);
        let err = SealedImage::open(file_of(&old), &ARTIFACT, &KEY)
            .err()
            .unwrap();
        assert!(matches!(err, SealedError::WrongArtifact { .. }), "{err}");
        // Its header rewritten to claim the expected id: every chunk fails.
        let mut forged = old.clone();
        forged[24..40].copy_from_slice(&ARTIFACT);
        let mut img = SealedImage::open(file_of(&forged), &ARTIFACT, &KEY).unwrap();
        assert!(read_all(&mut img).is_err());
    }

    #[test]
    fn key_lines_round_trip_and_garbage_is_named() {
        assert_eq!(
            parse_key_line(&key_line(&ARTIFACT, &KEY)),
            Ok((ARTIFACT, KEY))
        );
        assert!(parse_key_line("").is_err());
        assert!(parse_key_line("00 11").unwrap_err().contains("artifact id"));
        let id = hex::encode(ARTIFACT);
        assert!(parse_key_line(&format!("{id} zz"))
            .unwrap_err()
            .contains("key"));
        assert!(parse_key_line(&format!("{id} {} extra", hex::encode(KEY))).is_err());
        assert!(parse_key_line(&format!("{id} {}", "é".repeat(32))).is_err());
    }

    #[test]
    fn a_wrong_key_or_garbage_is_an_error_not_wrong_bytes() {
        let bytes = sealed(&image(CHUNK as usize), ARTIFACT, &KEY);
        let mut img = SealedImage::open(file_of(&bytes), &ARTIFACT, &[1; 32]).unwrap();
        assert!(read_all(&mut img).is_err());
        let garbage = vec![0xa5u8; 500];
        assert!(matches!(
            SealedImage::open(file_of(&garbage), &ARTIFACT, &KEY),
            Err(SealedError::BadMagic)
        ));
        let mut bad_chunk = bytes.clone();
        bad_chunk[12..16].copy_from_slice(&3u32.to_le_bytes());
        assert!(matches!(
            SealedImage::open(file_of(&bad_chunk), &ARTIFACT, &KEY),
            Err(SealedError::ChunkSize(3))
        ));
    }
}
