//! The chunk store for container images: each image's filesystem cut
//! into 512 KiB chunks, sealed with convergent encryption and stored once
//! by content address (see `vmm`'s `chunked` module for the format). A
//! chunk's key is the HMAC of its content's SHA-256 under the store's
//! convergence secret: identical chunks of any two images seal
//! identically, and nobody without the secret can confirm a guess of a
//! chunk's content from the store.

use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::{Digest, Sha256};
use vmm::devices::virtio::block::chunked::{
    chunk_path, seal_chunk, ChunkKey, ChunkManifest, ChunkRef, CHUNK_SIZE,
};

use crate::security::key_file::{self, KeyFileError};

#[derive(Debug, thiserror::Error)]
pub enum ChunkStoreError {
    #[error("chunk store {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Secret(#[from] KeyFileError),
}

/// One image put in the store.
#[derive(Debug, Clone)]
pub struct StoredImage {
    pub manifest: ChunkManifest,
    /// Chunks this image added; the others were stored already.
    pub new_chunks: usize,
}

pub struct ChunkStore {
    dir: PathBuf,
    secret: [u8; 32],
}

impl ChunkStore {
    /// The store in `dir`, with the convergence secret in `secret_file`
    /// (created on first use).
    pub fn open(dir: &Path, secret_file: &Path) -> Result<Self, ChunkStoreError> {
        std::fs::create_dir_all(dir).map_err(|source| ChunkStoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        if let Some(parent) = secret_file.parent() {
            std::fs::create_dir_all(parent).map_err(|source| ChunkStoreError::Io {
                path: parent.to_path_buf(),
                source,
            })?;
        }
        Ok(ChunkStore {
            dir: dir.to_path_buf(),
            secret: key_file::read_or_create(secret_file)?,
        })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn key_of(&self, plain: &[u8]) -> ChunkKey {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.secret).expect("any key length");
        mac.update(&Sha256::digest(plain));
        mac.finalize().into_bytes().into()
    }

    /// Cuts `image` into chunks and stores the ones not stored yet.
    pub fn put(&self, image: &[u8]) -> Result<StoredImage, ChunkStoreError> {
        let mut chunks = Vec::with_capacity(image.len().div_ceil(CHUNK_SIZE as usize));
        let mut new_chunks = 0;
        for plain in image.chunks(CHUNK_SIZE as usize) {
            let key = self.key_of(plain);
            let (address, sealed) = seal_chunk(plain, &key);
            let path = chunk_path(&self.dir, &address);
            if !path.exists() {
                let io_error = |source| ChunkStoreError::Io {
                    path: path.clone(),
                    source,
                };
                // Written aside and renamed: a reader never sees half a
                // chunk, and two writers of one chunk write the same bytes.
                let partial = path.with_extension(format!("{}.partial", std::process::id()));
                std::fs::write(&partial, &sealed)
                    .and_then(|_| std::fs::rename(&partial, &path))
                    .map_err(io_error)?;
                new_chunks += 1;
            }
            chunks.push(ChunkRef { address, key });
        }
        Ok(StoredImage {
            manifest: ChunkManifest {
                chunk_size: CHUNK_SIZE,
                len: image.len() as u64,
                chunks,
            },
            new_chunks,
        })
    }
}

/// Chunks stored against chunks referenced, over images put in one store:
/// 1.0 is no sharing, lower is better.
pub fn stored_fraction(images: &[&StoredImage]) -> f64 {
    let referenced: usize = images.iter().map(|i| i.manifest.chunks.len()).sum();
    let stored: usize = images.iter().map(|i| i.new_chunks).sum();
    stored as f64 / referenced.max(1) as f64
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::artifacts::erofs_image::tests::mkfs_present;
    use crate::artifacts::oci::tests::{layer_tar, scratch, write_layout, Entry};
    use vmm::devices::virtio::block::chunked::ChunkedImage;
    use vmm::devices::virtio::block::BlockBackend;

    /// Deterministic, incompressible bytes: SHA-256 in counter mode.
    fn noise(seed: u64, len: usize) -> Vec<u8> {
        (0..len.div_ceil(32) as u64)
            .flat_map(|block| Sha256::digest([seed.to_le_bytes(), block.to_le_bytes()].concat()))
            .take(len)
            .collect()
    }

    /// A container image: a shared base layer (a runtime's libraries) and
    /// an app layer of its own, flattened and made an EROFS image.
    fn container_image(dir: &Path, base: &[Vec<u8>], app: &[u8]) -> Vec<u8> {
        let names: Vec<String> = (0..base.len())
            .map(|i| format!("usr/lib/lib{i:02}.so"))
            .collect();
        let base_layer = layer_tar(
            &names
                .iter()
                .zip(base)
                .map(|(n, d)| Entry::File(n, d))
                .collect::<Vec<_>>(),
        );
        let app_layer = layer_tar(&[Entry::File("var/task/function.wasm", app)]);
        write_layout(&dir.join("layout"), &[base_layer, app_layer]);
        crate::artifacts::oci::filesystem_image(&dir.join("layout"))
            .unwrap()
            .0
    }

    #[test]
    fn images_that_share_a_base_layer_share_its_chunks() {
        if !mkfs_present() {
            return;
        }
        let dir = scratch("dedup");
        let base: Vec<Vec<u8>> = (0..8).map(|i| noise(i, 640 << 10)).collect();
        let one = container_image(&dir.join("one"), &base, &noise(100, 300 << 10));
        let two = container_image(&dir.join("two"), &base, &noise(200, 900 << 10));
        let store = ChunkStore::open(&dir.join("chunks"), &dir.join("convergence.key")).unwrap();
        let a = store.put(&one).unwrap();
        let b = store.put(&two).unwrap();
        let fraction = stored_fraction(&[&a, &b]);
        println!(
            "two images sharing a 5 MiB base layer: {} + {} chunks referenced, {} + {} stored ({:.0} % of the references, dedup ratio {:.2})",
            a.manifest.chunks.len(),
            b.manifest.chunks.len(),
            a.new_chunks,
            b.new_chunks,
            fraction * 100.0,
            1.0 / fraction
        );
        assert_eq!(
            a.new_chunks,
            a.manifest.chunks.len(),
            "the first image stores all"
        );
        assert!(
            b.new_chunks * 2 < b.manifest.chunks.len(),
            "the second image stored {} of {} chunks",
            b.new_chunks,
            b.manifest.chunks.len()
        );
        // Putting the same image again stores nothing.
        assert_eq!(store.put(&one).unwrap().new_chunks, 0);

        // Read back lazily: only the chunks a read touches are fetched.
        let mut image = ChunkedImage::open(store.dir(), b.manifest.clone()).unwrap();
        let mut head = vec![0u8; 4096];
        image.read_at(&mut head, 0).unwrap();
        assert_eq!(head, two[..4096]);
        assert_eq!(image.loaded(), 1);
        let mut all = vec![0u8; two.len()];
        image.read_at(&mut all, 0).unwrap();
        assert!(all == two, "the whole image reads back");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn another_secret_seals_the_same_chunk_differently() {
        let dir = scratch("secret");
        let a = ChunkStore::open(&dir.join("a"), &dir.join("a.key")).unwrap();
        let b = ChunkStore::open(&dir.join("b"), &dir.join("b.key")).unwrap();
        let data = noise(7, 1000);
        assert_ne!(
            a.put(&data).unwrap().manifest.chunks[0].address,
            b.put(&data).unwrap().manifest.chunks[0].address
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
