//! The artifact store: function code images, optimized once and kept
//! sealed (AES-256-GCM in chunks, see `vmm`'s `sealed` module) under a data
//! key of their own that only the key service can unwrap. Nothing
//! decrypted is written to disk: a microVM's block device decrypts chunks
//! as its guest reads them.

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use serde::{Deserialize, Serialize};
use vmm::devices::virtio::block::sealed::{self, ArtifactId};

use crate::security::key_service::{random, ArtifactKeys, Grant, KeyError, KeyService, WrappedKey};

/// Chunks of 64 KiB: a guest's reads are rarely larger, and a chunk's 28
/// bytes of nonce and tag stay under 0.05 %.
const CHUNK_SIZE: u32 = 64 << 10;

/// How long a grant to read an artifact lasts: an environment starts well
/// within it, and a queued invocation waits no longer than a function may
/// run (15 minutes).
pub const GRANT_TTL: Duration = Duration::from_secs(15 * 60);

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error("artifact {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("artifact {path}: sealing failed: {source}")]
    Seal {
        path: PathBuf,
        source: sealed::SealedError,
    },
    #[error("artifact record {path}: {reason}")]
    Record { path: PathBuf, reason: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// One sealed artifact, as the store records it next to its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Artifact {
    /// Hex; a fresh random id for every sealing.
    pub id: String,
    pub path: PathBuf,
    pub key: WrappedKey,
}

impl Artifact {
    pub fn id_bytes(&self) -> Result<ArtifactId, ArtifactError> {
        hex::decode(&self.id)
            .ok()
            .and_then(|b| b.try_into().ok())
            .ok_or_else(|| ArtifactError::Record {
                path: self.path.clone(),
                reason: format!("bad artifact id {:?}", self.id),
            })
    }
}

/// What starting a microVM on an artifact takes: the artifact and a
/// grant to read it.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct GrantedArtifact {
    pub artifact: Artifact,
    pub grant: Grant,
}

impl GrantedArtifact {
    /// The line the VMM reads for a sealed drive: the artifact id and its
    /// data key, unwrapped by the key service for this grant.
    pub async fn drive_key(&self, keys: &dyn ArtifactKeys) -> Result<String, ArtifactError> {
        let id = self.artifact.id_bytes()?;
        let key = keys.data_key(&self.grant, &id, &self.artifact.key).await?;
        Ok(sealed::key_line(&id, &key))
    }
}

pub struct ArtifactStore {
    dir: PathBuf,
    keys: Arc<KeyService>,
}

impl ArtifactStore {
    pub fn open(dir: &Path, keys: Arc<KeyService>) -> Result<Self, ArtifactError> {
        std::fs::create_dir_all(dir).map_err(|source| ArtifactError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(ArtifactStore {
            dir: dir.to_path_buf(),
            keys,
        })
    }

    /// Where the sealed files are.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn record_path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}.json"))
    }

    /// The artifact stored as `name`, if there is one.
    pub fn get(&self, name: &str) -> Result<Option<Artifact>, ArtifactError> {
        let path = self.record_path(name);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(ArtifactError::Io { path, source }),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ArtifactError::Record {
                path,
                reason: e.to_string(),
            })
    }

    /// Seals `image` as `name`, replacing what was there. Environments
    /// that have the old file open keep reading it.
    pub fn put(&self, name: &str, image: &[u8]) -> Result<Artifact, ArtifactError> {
        let previous = self.get(name).ok().flatten();
        let id: ArtifactId = random();
        let (key, wrapped) = self.keys.new_data_key(&id);
        let path = self.dir.join(format!("{name}.{}.sealed", hex::encode(id)));
        let io = |source| ArtifactError::Io {
            path: path.clone(),
            source,
        };
        let mut out = Vec::with_capacity(image.len() + image.len() / 1000 + 128);
        sealed::seal(
            &mut &image[..],
            image.len() as u64,
            &mut out,
            id,
            &key,
            CHUNK_SIZE,
            random,
        )
        .map_err(|source| ArtifactError::Seal {
            path: path.clone(),
            source,
        })?;
        write_atomically(&path, &out).map_err(io)?;
        let artifact = Artifact {
            id: hex::encode(id),
            path,
            key: wrapped,
        };
        self.write_record(name, &artifact)?;
        if let Some(previous) = previous {
            let _ = std::fs::remove_file(previous.path);
        }
        Ok(artifact)
    }

    fn write_record(&self, name: &str, artifact: &Artifact) -> Result<(), ArtifactError> {
        let path = self.record_path(name);
        let json = serde_json::to_vec_pretty(artifact).expect("an artifact record serializes");
        write_atomically(&path, &json).map_err(|source| ArtifactError::Io { path, source })
    }

    /// A grant to read `artifact`, valid for [`GRANT_TTL`].
    pub fn grant(&self, artifact: Artifact) -> Result<GrantedArtifact, ArtifactError> {
        let grant = self.keys.grant(&artifact.id_bytes()?, GRANT_TTL);
        Ok(GrantedArtifact { artifact, grant })
    }

    /// Rewraps every artifact's data key under the key service's current
    /// master key, after a rotation; the sealed data stays as it is.
    pub fn rewrap_all(&self) -> Result<usize, ArtifactError> {
        let entries = std::fs::read_dir(&self.dir).map_err(|source| ArtifactError::Io {
            path: self.dir.clone(),
            source,
        })?;
        let current = self.keys.current_master();
        let mut moved = 0;
        for entry in entries.flatten() {
            let file_name = entry.file_name();
            let Some(name) = file_name.to_str().and_then(|n| n.strip_suffix(".json")) else {
                continue;
            };
            let Some(mut artifact) = self.get(name)? else {
                continue;
            };
            if artifact.key.master != current {
                artifact.key = self.keys.rewrap(&artifact.id_bytes()?, &artifact.key)?;
                self.write_record(name, &artifact)?;
                moved += 1;
            }
        }
        Ok(moved)
    }
}

/// Writes `bytes` to `path` through a temporary file and a rename, so a
/// reader sees the old file or the new one, never half of one.
fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp-{}", uuid::Uuid::new_v4()));
    std::fs::write(&tmp, bytes)
        .and_then(|()| std::fs::rename(&tmp, path))
        .inspect_err(|_| {
            let _ = std::fs::remove_file(&tmp);
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use vmm::devices::virtio::block::sealed::{parse_key_line, SealedImage};
    use vmm::devices::virtio::block::BlockBackend;

    fn store(name: &str) -> (ArtifactStore, Arc<KeyService>, PathBuf) {
        let dir = std::env::temp_dir().join(format!("artifacts-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let keys = Arc::new(KeyService::open(&dir.join("keys")).unwrap());
        let store = ArtifactStore::open(&dir.join("artifacts"), keys.clone()).unwrap();
        (store, keys, dir)
    }

    /// The VMM's key line for `granted`, from the local key service.
    fn drive_key(granted: &GrantedArtifact, keys: &KeyService) -> String {
        tokio::runtime::Builder::new_current_thread()
            .build()
            .unwrap()
            .block_on(granted.drive_key(keys))
            .unwrap()
    }

    /// The whole image, read through the VMM's sealed backend with the
    /// key `granted` unwraps.
    fn read_back(granted: &GrantedArtifact, keys: &KeyService) -> Vec<u8> {
        let (id, key) = parse_key_line(&drive_key(granted, keys)).unwrap();
        let file = std::fs::File::open(&granted.artifact.path).unwrap();
        let mut img = SealedImage::open(file, &id, &key).unwrap();
        let mut back = vec![0u8; img.size() as usize];
        img.read_at(&mut back, 0).unwrap();
        back
    }

    #[test]
    fn a_stored_image_reads_back_through_a_grant_and_is_not_on_disk_in_the_clear() {
        let (store, keys, dir) = store("roundtrip");
        let image: Vec<u8> = (0..200_000u32).map(|i| (i % 241) as u8).collect();
        let artifact = store.put("code", &image).unwrap();
        assert_eq!(store.get("code").unwrap(), Some(artifact.clone()));
        let on_disk = std::fs::read(&artifact.path).unwrap();
        assert!(
            !on_disk.windows(64).any(|w| w == &image[1000..1064]),
            "plaintext on disk"
        );
        assert_eq!(read_back(&store.grant(artifact).unwrap(), &keys), image);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotation_rewraps_records_without_resealing_data() {
        let (store, keys, dir) = store("rotation");
        let image = vec![42u8; 70_000];
        let artifact = store.put("code", &image).unwrap();
        let sealed_before = std::fs::read(&artifact.path).unwrap();
        keys.rotate().unwrap();
        assert_eq!(store.rewrap_all().unwrap(), 1);
        assert_eq!(store.rewrap_all().unwrap(), 0);
        let after = store.get("code").unwrap().unwrap();
        assert_eq!(after.key.master, 2);
        assert_eq!(std::fs::read(&after.path).unwrap(), sealed_before);
        assert_eq!(read_back(&store.grant(after).unwrap(), &keys), image);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn an_older_version_put_in_place_of_the_current_one_is_refused() {
        let (store, keys, dir) = store("replay");
        let old = store.put("old", &[1u8; 5000]).unwrap();
        let current = store.put("code", &[2u8; 5000]).unwrap();
        std::fs::copy(&old.path, &current.path).unwrap();
        let granted = store.grant(current).unwrap();
        let (id, key) = parse_key_line(&drive_key(&granted, &keys)).unwrap();
        let file = std::fs::File::open(&granted.artifact.path).unwrap();
        let err = SealedImage::open(file, &id, &key).err().unwrap();
        assert!(
            err.to_string().contains("older or another artifact"),
            "{err}"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
