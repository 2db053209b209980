//! The snapshot store: one snapshot per function version, taken by its
//! first on-demand environment at the runtime's first `/next`, and
//! restored by the version's later cold starts.
//!
//! At rest a snapshot is one blob sealed by the key service (AES-256-GCM
//! under a data key of its own, wrapped by the master key), bound to its
//! place: the account, function, version and revision. A snapshot copied
//! to another version's or another account's place does not open. Inside
//! it is the fingerprint of what the guest was initialized with (its
//! environment, credentials included): a restore needs the same, so a
//! clone never runs with variables or credentials the version no longer
//! has.
//!
//! Opened, a snapshot lives in two sealed memfds (state and memory),
//! decrypted once per worker and kept: every clone maps the same memory
//! pages copy-on-write through a read-only descriptor, so clones share
//! what they only read and none can change another's.

use std::collections::{HashSet, VecDeque};
use std::fs::File;
use std::io::Write;
use std::os::fd::{AsRawFd, FromRawFd};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::ids::AccountId;
use crate::ids::VersionKey;
use crate::security::key_service::{KeyError, KeyService};

/// Opened snapshots kept in memory; each holds only the pages its guest
/// had touched.
const MAX_OPENED: usize = 64;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotStoreError {
    #[error("snapshot {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("snapshot {path}: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error(transparent)]
    Key(#[from] KeyError),
}

/// What a snapshot blob holds. Its byte buffers are serialized as
/// slices: serde's default, byte by byte, took seconds per 64 MiB
/// unoptimized and was most of a snapshot's cost in the emulated L1
/// machine. The encoding is the same either way.
#[derive(Serialize, Deserialize)]
struct Contents {
    fingerprint: [u8; 32],
    #[serde(with = "serde_bytes")]
    state: Vec<u8>,
    memory_len: u64,
    /// The memory file's data; everything else is zero.
    extents: Vec<Extent>,
}

#[derive(Serialize, Deserialize)]
struct Extent {
    offset: u64,
    #[serde(with = "serde_bytes")]
    data: Vec<u8>,
}

/// A snapshot decrypted into memory, ready for VMMs to restore.
pub struct OpenedSnapshot {
    fingerprint: [u8; 32],
    state: File,
    memory: File,
}

impl OpenedSnapshot {
    /// Read-only descriptors of the state and the memory for one VMM: it
    /// can map and read them, never write them.
    pub fn read_only(&self) -> std::io::Result<(File, File)> {
        let reopen = |file: &File| File::open(format!("/proc/self/fd/{}", file.as_raw_fd()));
        Ok((reopen(&self.state)?, reopen(&self.memory)?))
    }
}

pub struct SnapshotStore {
    dir: PathBuf,
    keys: Arc<KeyService>,
    opened: Mutex<VecDeque<(VersionKey, Arc<OpenedSnapshot>)>>,
    /// Versions whose snapshot is being taken. Environments of a version
    /// that boot together would otherwise each pause, dump and seal the
    /// same snapshot, and race to rename it into place.
    taking: Mutex<HashSet<VersionKey>>,
}

/// The right to take a version's snapshot, held until it is sealed.
pub struct SnapshotClaim {
    store: Arc<SnapshotStore>,
    key: VersionKey,
}

impl Drop for SnapshotClaim {
    fn drop(&mut self) {
        let mut taking = self.store.taking.lock().unwrap_or_else(|e| e.into_inner());
        taking.remove(&self.key);
    }
}

/// The fingerprint of an environment's start-up variables.
pub fn fingerprint(variables: &[(String, String)]) -> [u8; 32] {
    let mut hash = Sha256::new();
    for (key, value) in variables {
        hash.update(key.as_bytes());
        hash.update([0]);
        hash.update(value.as_bytes());
        hash.update([0]);
    }
    hash.finalize().into()
}

impl SnapshotStore {
    pub fn open(dir: &Path, keys: Arc<KeyService>) -> Result<Self, SnapshotStoreError> {
        // Files a worker staged but did not get to seal are plaintext.
        let _ = std::fs::remove_dir_all(dir.join("staging"));
        std::fs::create_dir_all(dir).map_err(|source| SnapshotStoreError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        Ok(SnapshotStore {
            dir: dir.to_path_buf(),
            keys,
            opened: Mutex::new(VecDeque::new()),
            taking: Mutex::new(HashSet::new()),
        })
    }

    /// Claims the taking of `key`'s snapshot; `None` while another
    /// environment's is being taken.
    pub fn claim(self: &Arc<Self>, key: &VersionKey) -> Option<SnapshotClaim> {
        let mut taking = self.taking.lock().unwrap_or_else(|e| e.into_inner());
        taking.insert(key.clone()).then(|| SnapshotClaim {
            store: self.clone(),
            key: key.clone(),
        })
    }

    fn place(key: &VersionKey) -> String {
        format!(
            "snapshot\0{}\0{}\0{}\0{}",
            key.account, key.function, key.version, key.revision
        )
    }

    /// Where a function's snapshots are, or one version's.
    fn function_dir(&self, account: &AccountId, function: &str, version: Option<&str>) -> PathBuf {
        let dir = self.dir.join(&account.0).join(function);
        match version {
            Some(v) => dir.join(v.replace('$', "")),
            None => dir,
        }
    }

    fn path(&self, key: &VersionKey) -> PathBuf {
        let name = hex::encode(Sha256::digest(Self::place(key).as_bytes()));
        self.function_dir(&key.account, &key.function, Some(&key.version))
            .join(format!("{name}.sealed"))
    }

    fn cached(&self, key: &VersionKey) -> Option<Arc<OpenedSnapshot>> {
        let opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, s)| s.clone())
    }

    fn remember(&self, key: &VersionKey, snapshot: Arc<OpenedSnapshot>) {
        let mut opened = self.opened.lock().unwrap_or_else(|e| e.into_inner());
        opened.retain(|(k, _)| k != key);
        if opened.len() == MAX_OPENED {
            opened.pop_front();
        }
        opened.push_back((key.clone(), snapshot));
    }

    /// The snapshot of `key`, if there is one taken from a guest started
    /// with the variables of `fingerprint`.
    pub fn get(
        &self,
        key: &VersionKey,
        fingerprint: &[u8; 32],
    ) -> Result<Option<Arc<OpenedSnapshot>>, SnapshotStoreError> {
        if let Some(s) = self.cached(key) {
            return Ok((s.fingerprint == *fingerprint).then_some(s));
        }
        let path = self.path(key);
        let blob = match std::fs::read(&path) {
            Ok(blob) => blob,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(source) => return Err(SnapshotStoreError::Io { path, source }),
        };
        let plain = self.keys.open_blob(&Self::place(key), &blob)?;
        let format = |reason: String| SnapshotStoreError::Format {
            path: path.clone(),
            reason,
        };
        let contents: Contents = postcard::from_bytes(&plain).map_err(|e| format(e.to_string()))?;
        if contents.fingerprint != *fingerprint {
            return Ok(None);
        }
        let snapshot =
            Arc::new(
                into_memory(&contents).map_err(|source| SnapshotStoreError::Io {
                    path: path.clone(),
                    source,
                })?,
            );
        self.remember(key, snapshot.clone());
        Ok(Some(snapshot))
    }

    /// Moves a VMM's snapshot files out of its directory, which may go
    /// with its environment, to a place of the store's until `put`.
    pub fn stage(
        &self,
        state: &Path,
        memory: &Path,
    ) -> Result<(PathBuf, PathBuf), SnapshotStoreError> {
        let staging = self.dir.join("staging");
        let name: [u8; 8] = crate::security::key_service::random();
        let name = hex::encode(name);
        let staged = (
            staging.join(format!("{name}.state")),
            staging.join(format!("{name}.mem")),
        );
        let io_error = |source| SnapshotStoreError::Io {
            path: staging.clone(),
            source,
        };
        std::fs::create_dir_all(&staging).map_err(io_error)?;
        std::fs::rename(state, &staged.0)
            .and_then(|_| std::fs::rename(memory, &staged.1))
            .map_err(io_error)?;
        Ok(staged)
    }

    /// Seals the snapshot a VMM wrote to `state` and `memory` as `key`'s,
    /// replacing any older one, and removes the two files.
    pub fn put(
        &self,
        key: &VersionKey,
        fingerprint: [u8; 32],
        state: &Path,
        memory: &Path,
    ) -> Result<(), SnapshotStoreError> {
        let read = || -> std::io::Result<Contents> {
            let memory_file = File::open(memory)?;
            Ok(Contents {
                fingerprint,
                state: std::fs::read(state)?,
                memory_len: memory_file.metadata()?.len(),
                extents: data_extents(&memory_file)?,
            })
        };
        let contents = read();
        let _ = std::fs::remove_file(state);
        let _ = std::fs::remove_file(memory);
        let path = self.path(key);
        let io_error = |source| SnapshotStoreError::Io {
            path: path.clone(),
            source,
        };
        let contents = contents.map_err(io_error)?;
        let plain = postcard::to_stdvec(&contents).map_err(|e| SnapshotStoreError::Format {
            path: path.clone(),
            reason: e.to_string(),
        })?;
        let blob = self.keys.seal_blob(&Self::place(key), &plain);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_error)?;
        }
        let partial = path.with_extension("partial");
        std::fs::File::create(&partial)
            .and_then(|mut f| f.write_all(&blob))
            .and_then(|_| std::fs::rename(&partial, &path))
            .map_err(io_error)?;
        let opened = into_memory(&contents).map_err(io_error)?;
        self.remember(key, Arc::new(opened));
        Ok(())
    }

    /// Forgets the snapshots of a function's `version`, or of all its
    /// versions, on disk and in memory.
    pub fn remove(&self, account: &AccountId, function: &str, version: Option<&str>) {
        self.opened
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|(k, _)| {
                !(k.account == *account
                    && k.function == function
                    && version.is_none_or(|v| k.version == v))
            });
        let _ = std::fs::remove_dir_all(self.function_dir(account, function, version));
    }
}

/// The data of a sparse file, extent by extent.
fn data_extents(file: &File) -> std::io::Result<Vec<Extent>> {
    let fd = file.as_raw_fd();
    let len = file.metadata()?.len() as i64;
    let mut extents = Vec::new();
    let mut at = 0i64;
    while at < len {
        // SAFETY: lseek on an open descriptor; positioned reads follow.
        let data = unsafe { libc::lseek(fd, at, libc::SEEK_DATA) };
        if data < 0 {
            break; // ENXIO: no data past `at`.
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(fd, data, libc::SEEK_HOLE) };
        let end = if hole < data { len } else { hole.min(len) };
        let mut bytes = vec![0u8; (end - data) as usize];
        file.read_exact_at(&mut bytes, data as u64)?;
        extents.push(Extent {
            offset: data as u64,
            data: bytes,
        });
        at = end;
    }
    Ok(extents)
}

/// Decrypted contents into two sealed memfds.
fn into_memory(contents: &Contents) -> std::io::Result<OpenedSnapshot> {
    let memfd = |name: &std::ffi::CStr| -> std::io::Result<File> {
        // SAFETY: a static name; the new descriptor is owned below.
        let fd = unsafe {
            libc::memfd_create(name.as_ptr(), libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING)
        };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        // SAFETY: a descriptor just created and owned by nothing else.
        Ok(unsafe { File::from_raw_fd(fd) })
    };
    let seal = |file: &File| -> std::io::Result<()> {
        let seals =
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_WRITE | libc::F_SEAL_SEAL;
        // SAFETY: F_ADD_SEALS on a memfd this function created.
        match unsafe { libc::fcntl(file.as_raw_fd(), libc::F_ADD_SEALS, seals) } {
            0 => Ok(()),
            _ => Err(std::io::Error::last_os_error()),
        }
    };
    let state = memfd(c"lambda-snapshot-state")?;
    state.write_all_at(&contents.state, 0)?;
    seal(&state)?;
    let memory = memfd(c"lambda-snapshot-memory")?;
    memory.set_len(contents.memory_len)?;
    for extent in &contents.extents {
        memory.write_all_at(&extent.data, extent.offset)?;
    }
    seal(&memory)?;
    Ok(OpenedSnapshot {
        fingerprint: contents.fingerprint,
        state,
        memory,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    fn key(version: &str) -> VersionKey {
        VersionKey {
            account: AccountId("111111111111".into()),
            function: "f".into(),
            version: version.into(),
            revision: "r1".into(),
        }
    }

    fn dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("snapshots-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    /// A VMM's output: a state file and a sparse memory file.
    fn vmm_files(dir: &Path) -> (PathBuf, PathBuf) {
        let (state, memory) = (dir.join("s"), dir.join("m"));
        std::fs::write(&state, b"vcpu state").unwrap();
        let m = File::create(&memory).unwrap();
        m.set_len(64 << 20).unwrap();
        m.write_all_at(b"page one", 4096).unwrap();
        m.write_all_at(b"far page", 40 << 20).unwrap();
        (state, memory)
    }

    fn read_all(mut f: File) -> Vec<u8> {
        let mut v = Vec::new();
        f.read_to_end(&mut v).unwrap();
        v
    }

    #[test]
    fn one_environment_at_a_time_takes_a_versions_snapshot() {
        let dir = dir("claims");
        let keys = Arc::new(KeyService::open(&dir.join("keys")).unwrap());
        let store = Arc::new(SnapshotStore::open(&dir.join("snapshots"), keys).unwrap());
        let first = store.claim(&key("1")).expect("the first claim");
        assert!(
            store.claim(&key("1")).is_none(),
            "a second while the first holds"
        );
        assert!(
            store.claim(&key("2")).is_some(),
            "another version's is free"
        );
        drop(first);
        assert!(store.claim(&key("1")).is_some(), "free again once sealed");
    }

    #[test]
    fn a_snapshot_opens_for_its_version_and_variables_only_and_is_sealed_at_rest() {
        let dir = dir("roundtrip");
        let keys = Arc::new(KeyService::open(&dir.join("keys")).unwrap());
        let store = SnapshotStore::open(&dir.join("snapshots"), keys.clone()).unwrap();
        let vars = vec![("AWS_SESSION_TOKEN".to_string(), "t1".to_string())];
        let (state, memory) = vmm_files(&dir);
        store
            .put(&key("1"), fingerprint(&vars), &state, &memory)
            .unwrap();
        assert!(
            !state.exists() && !memory.exists(),
            "the plain files are gone"
        );

        // A fresh store (a new worker) reads it back from disk.
        let store = SnapshotStore::open(&dir.join("snapshots"), keys.clone()).unwrap();
        let opened = store.get(&key("1"), &fingerprint(&vars)).unwrap().unwrap();
        let (s, m) = opened.read_only().unwrap();
        assert_eq!(read_all(s), b"vcpu state");
        let mut page = [0u8; 8];
        m.read_exact_at(&mut page, 40 << 20).unwrap();
        assert_eq!(&page, b"far page");
        assert_eq!(m.metadata().unwrap().len(), 64 << 20);
        assert!(
            m.write_at(b"x", 0).is_err(),
            "a VMM's descriptor cannot write"
        );

        let other_vars = vec![("AWS_SESSION_TOKEN".to_string(), "t2".to_string())];
        assert!(store
            .get(&key("1"), &fingerprint(&other_vars))
            .unwrap()
            .is_none());
        assert!(store.get(&key("2"), &fingerprint(&vars)).unwrap().is_none());

        // On disk: no plaintext, and moved to another version's place it
        // does not open.
        let sealed = std::fs::read(store.path(&key("1"))).unwrap();
        assert!(!sealed.windows(10).any(|w| w == b"vcpu state"));
        let moved = store.path(&key("2"));
        std::fs::create_dir_all(moved.parent().unwrap()).unwrap();
        std::fs::write(&moved, &sealed).unwrap();
        let fresh = SnapshotStore::open(&dir.join("snapshots"), keys).unwrap();
        assert!(fresh.get(&key("2"), &fingerprint(&vars)).is_err());

        fresh.remove(&key("1").account, "f", Some("1"));
        assert!(fresh.get(&key("1"), &fingerprint(&vars)).unwrap().is_none());
        assert!(fresh.path(&key("2")).exists(), "other versions stay");
        fresh.remove(&key("1").account, "f", None);
        assert!(!fresh.path(&key("2")).exists());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
