//! The key service: envelope encryption for artifacts. Each artifact has
//! its own data key, stored only wrapped (AES-256-GCM) under a master key.
//! Master keys are versioned: rotation adds a version that wraps from then
//! on, and [`KeyService::rewrap`] moves a wrapped key to it without
//! touching the artifact's data. A worker gets a data key only by showing
//! a grant: signed by the service, for one artifact, until a deadline.
//!
//! Master keys live in their own directory, readable by root only; a
//! deployment would keep them in an HSM or a KMS behind the same calls.

use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::RwLock;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use hmac::{Hmac, KeyInit, Mac};
use sealing::Cipher;
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use vmm::devices::virtio::block::sealed::{ArtifactId, DataKey, NONCE_LEN, TAG_LEN};

use crate::security::key_file::{self, KeyFileError};

/// Binds a wrapped key to its purpose and artifact.
const WRAP_CONTEXT: &[u8] = b"lambda-microvm data key v1";
/// Starts a sealed blob.
const BLOB_MAGIC: &[u8; 8] = b"LMBLOB01";
/// A wrapped data key's nonce, key and tag.
const WRAPPED_LEN: usize = NONCE_LEN + 32 + TAG_LEN;

#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    #[error("key directory {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    KeyFile(#[from] KeyFileError),
    #[error("no master key version {0}: the wrapped key cannot be opened")]
    UnknownMaster(u32),
    #[error("the wrapped key of artifact {0} failed authentication")]
    Unwrap(String),
    #[error("the grant for artifact {0} is forged or altered")]
    ForgedGrant(String),
    #[error("the grant for artifact {artifact} expired {ago_ms} ms ago")]
    ExpiredGrant { artifact: String, ago_ms: u64 },
    #[error("the grant is for artifact {granted}, not {wanted}")]
    WrongArtifact { granted: String, wanted: String },
    /// A worker host could not reach the key service that holds the key.
    #[error("the key service is unreachable: {0}")]
    Unreachable(String),
    #[error("the sealed blob at {0} is damaged, altered or not from here")]
    Blob(String),
}

/// A data key wrapped under master key `master`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WrappedKey {
    pub master: u32,
    /// Nonce, ciphertext and tag, in hex.
    pub sealed: String,
}

/// Permission to read one artifact until `expires_ms` (Unix time). It
/// travels with a launch to the worker host that starts the environment,
/// which shows it to get the artifact's data key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub artifact: ArtifactId,
    pub expires_ms: u64,
    signature: [u8; 32],
}

/// Where a worker host gets artifacts' data keys: its own key service in
/// one process, the front end's over the fleet's TLS in a fleet. Either
/// way the grant is checked where the master keys are.
pub trait ArtifactKeys: Send + Sync {
    fn data_key<'a>(
        &'a self,
        grant: &'a Grant,
        artifact: &'a ArtifactId,
        wrapped: &'a WrappedKey,
    ) -> Pin<Box<dyn Future<Output = Result<DataKey, KeyError>> + Send + 'a>>;
}

impl ArtifactKeys for KeyService {
    fn data_key<'a>(
        &'a self,
        grant: &'a Grant,
        artifact: &'a ArtifactId,
        wrapped: &'a WrappedKey,
    ) -> Pin<Box<dyn Future<Output = Result<DataKey, KeyError>> + Send + 'a>> {
        Box::pin(std::future::ready(KeyService::data_key(
            self, grant, artifact, wrapped,
        )))
    }
}

pub struct KeyService {
    dir: PathBuf,
    masters: RwLock<BTreeMap<u32, [u8; 32]>>,
    grant_key: [u8; 32],
}

/// N bytes from the OS's random number generator.
pub(crate) fn random<const N: usize>() -> [u8; N] {
    let mut bytes = [0u8; N];
    getrandom::fill(&mut bytes).expect("the OS random number generator");
    bytes
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

impl KeyService {
    /// Opens the service's keys in `dir`, creating the first master key
    /// and the grant-signing key if there are none.
    pub fn open(dir: &Path) -> Result<Self, KeyError> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| KeyError::Io { path, source }
        };
        std::fs::create_dir_all(dir).map_err(io(dir))?;
        let mut masters = BTreeMap::new();
        for entry in std::fs::read_dir(dir).map_err(io(dir))? {
            let path = entry.map_err(io(dir))?.path();
            let version = path
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_prefix("master-"))
                .and_then(|n| n.strip_suffix(".key"))
                .and_then(|v| v.parse::<u32>().ok());
            if let (Some(version), Some(key)) = (version, key_file::read(&path)?) {
                masters.insert(version, key);
            }
        }
        let service = KeyService {
            dir: dir.to_path_buf(),
            masters: RwLock::new(masters),
            grant_key: key_file::read_or_create(&dir.join("grant.key"))?,
        };
        if service.current().is_none() {
            service.rotate()?;
        }
        Ok(service)
    }

    fn current(&self) -> Option<(u32, [u8; 32])> {
        let masters = self.masters.read().unwrap_or_else(|e| e.into_inner());
        masters.last_key_value().map(|(v, k)| (*v, *k))
    }

    /// The master key version that wraps new keys.
    pub fn current_master(&self) -> u32 {
        self.current().map_or(0, |(v, _)| v)
    }

    /// Adds a master key version; it wraps every key from now on.
    pub fn rotate(&self) -> Result<u32, KeyError> {
        let mut masters = self.masters.write().unwrap_or_else(|e| e.into_inner());
        let version = masters.last_key_value().map_or(1, |(v, _)| v + 1);
        let key = key_file::create(&self.dir.join(format!("master-{version}.key")))?;
        masters.insert(version, key);
        tracing::info!("key service: master key version {version} now wraps new data keys");
        Ok(version)
    }

    /// A fresh data key for `artifact`, and the same key wrapped.
    pub fn new_data_key(&self, artifact: &ArtifactId) -> (DataKey, WrappedKey) {
        let key = random();
        let wrapped = self.wrap(artifact, &key);
        (key, wrapped)
    }

    fn wrap(&self, artifact: &ArtifactId, key: &DataKey) -> WrappedKey {
        let (master, sealed) = self.wrap_bytes(artifact, key);
        WrappedKey {
            master,
            sealed: hex::encode(sealed),
        }
    }

    /// `key` sealed under the current master key: its version, and the
    /// nonce, ciphertext and tag.
    fn wrap_bytes(&self, artifact: &ArtifactId, key: &DataKey) -> (u32, Vec<u8>) {
        let (master, master_key) = self.current().expect("a master key since open");
        (master, seal(&master_key, &wrap_aad(artifact, master), key))
    }

    fn unwrap_key(&self, artifact: &ArtifactId, wrapped: &WrappedKey) -> Result<DataKey, KeyError> {
        let bytes =
            hex::decode(&wrapped.sealed).map_err(|_| KeyError::Unwrap(hex::encode(artifact)))?;
        self.unwrap_bytes(artifact, wrapped.master, &bytes)
    }

    fn unwrap_bytes(
        &self,
        artifact: &ArtifactId,
        master: u32,
        sealed: &[u8],
    ) -> Result<DataKey, KeyError> {
        let master_key = *self
            .masters
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .get(&master)
            .ok_or(KeyError::UnknownMaster(master))?;
        open(&master_key, &wrap_aad(artifact, master), sealed)
            .and_then(|key| key.try_into().ok())
            .ok_or_else(|| KeyError::Unwrap(hex::encode(artifact)))
    }

    /// `wrapped` under the current master key; the artifact's data is not
    /// touched.
    pub fn rewrap(
        &self,
        artifact: &ArtifactId,
        wrapped: &WrappedKey,
    ) -> Result<WrappedKey, KeyError> {
        let key = self.unwrap_key(artifact, wrapped)?;
        Ok(self.wrap(artifact, &key))
    }

    /// Names this service's grant key and first master key without
    /// revealing them: a fleet's front ends must all hold the same ones.
    pub fn fingerprint(&self) -> String {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.grant_key).expect("any key length");
        mac.update(b"lambda-microvm key fingerprint v1\0");
        let masters = self.masters.read().unwrap_or_else(|e| e.into_inner());
        if let Some((version, key)) = masters.first_key_value() {
            mac.update(&version.to_le_bytes());
            mac.update(key);
        }
        hex::encode(&mac.finalize().into_bytes()[..16])
    }

    fn grant_mac(&self, artifact: &ArtifactId, expires_ms: u64) -> Hmac<Sha256> {
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.grant_key).expect("any key length");
        mac.update(b"lambda-microvm grant v1\0");
        mac.update(artifact);
        mac.update(&expires_ms.to_le_bytes());
        mac
    }

    /// A grant to read `artifact` for `ttl`.
    pub fn grant(&self, artifact: &ArtifactId, ttl: Duration) -> Grant {
        let expires_ms = now_ms() + ttl.as_millis() as u64;
        Grant {
            artifact: *artifact,
            expires_ms,
            signature: self
                .grant_mac(artifact, expires_ms)
                .finalize()
                .into_bytes()
                .into(),
        }
    }

    /// The data key of `artifact`, for the holder of a valid grant to it.
    pub fn data_key(
        &self,
        grant: &Grant,
        artifact: &ArtifactId,
        wrapped: &WrappedKey,
    ) -> Result<DataKey, KeyError> {
        self.data_key_at(grant, artifact, wrapped, now_ms())
    }

    fn data_key_at(
        &self,
        grant: &Grant,
        artifact: &ArtifactId,
        wrapped: &WrappedKey,
        now_ms: u64,
    ) -> Result<DataKey, KeyError> {
        self.grant_mac(&grant.artifact, grant.expires_ms)
            .verify_slice(&grant.signature)
            .map_err(|_| KeyError::ForgedGrant(hex::encode(grant.artifact)))?;
        if &grant.artifact != artifact {
            return Err(KeyError::WrongArtifact {
                granted: hex::encode(grant.artifact),
                wanted: hex::encode(artifact),
            });
        }
        if now_ms >= grant.expires_ms {
            return Err(KeyError::ExpiredGrant {
                artifact: hex::encode(artifact),
                ago_ms: now_ms - grant.expires_ms,
            });
        }
        self.unwrap_key(artifact, wrapped)
    }
}

impl KeyService {
    /// Seals `plain` for storage at `place` (its key in a store): a data
    /// key of its own, wrapped in the blob, and `place` bound in, so a
    /// blob copied elsewhere does not open.
    pub fn seal_blob(&self, place: &str, plain: &[u8]) -> Vec<u8> {
        let id: ArtifactId = random();
        let key = random();
        let (master, wrapped) = self.wrap_bytes(&id, &key);
        let mut out = BLOB_MAGIC.to_vec();
        out.extend_from_slice(&id);
        out.extend_from_slice(&master.to_le_bytes());
        out.extend_from_slice(&wrapped);
        out.extend_from_slice(&seal(&key, &blob_aad(place, &id), plain));
        out
    }

    /// Opens a blob [`Self::seal_blob`] sealed for `place`.
    pub fn open_blob(&self, place: &str, blob: &[u8]) -> Result<Vec<u8>, KeyError> {
        let damaged = || KeyError::Blob(place.to_string());
        let head = BLOB_MAGIC.len() + 16 + 4 + WRAPPED_LEN;
        if blob.len() < head || !blob.starts_with(BLOB_MAGIC) {
            return Err(damaged());
        }
        let (header, body) = blob.split_at(head);
        let id: ArtifactId = header[8..24].try_into().map_err(|_| damaged())?;
        let master = u32::from_le_bytes(header[24..28].try_into().map_err(|_| damaged())?);
        let key = self
            .unwrap_bytes(&id, master, &header[28..])
            .map_err(|_| damaged())?;
        open(&key, &blob_aad(place, &id), body).ok_or_else(damaged)
    }
}

/// `plain` under `key` with a fresh random nonce: nonce, ciphertext, tag.
fn seal(key: &[u8; 32], aad: &[u8], plain: &[u8]) -> Vec<u8> {
    let nonce = random::<NONCE_LEN>();
    let mut out = nonce.to_vec();
    out.extend_from_slice(plain);
    let tag = Cipher::new(key)
        .seal_in_place(&nonce, aad, &mut out[NONCE_LEN..])
        .expect("AES-GCM seals anything under 64 GiB");
    out.extend_from_slice(&tag);
    out
}

/// What [`seal`] made, opened; None if it is too short or fails
/// authentication.
fn open(key: &[u8; 32], aad: &[u8], sealed: &[u8]) -> Option<Vec<u8>> {
    if sealed.len() < NONCE_LEN + TAG_LEN {
        return None;
    }
    let (nonce, rest) = sealed.split_at(NONCE_LEN);
    let (body, tag) = rest.split_at(rest.len() - TAG_LEN);
    let mut plain = body.to_vec();
    Cipher::new(key)
        .open_in_place(
            nonce.try_into().ok()?,
            aad,
            &mut plain,
            tag.try_into().ok()?,
        )
        .ok()?;
    Some(plain)
}

fn blob_aad(place: &str, id: &ArtifactId) -> Vec<u8> {
    let mut aad = BLOB_MAGIC.to_vec();
    aad.extend_from_slice(id);
    aad.extend_from_slice(place.as_bytes());
    aad
}

fn wrap_aad(artifact: &ArtifactId, master: u32) -> Vec<u8> {
    let mut aad = WRAP_CONTEXT.to_vec();
    aad.extend_from_slice(artifact);
    aad.extend_from_slice(&master.to_le_bytes());
    aad
}

#[cfg(test)]
mod tests {
    use super::*;

    fn service(name: &str) -> (KeyService, PathBuf) {
        let dir = std::env::temp_dir().join(format!("keys-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        (KeyService::open(&dir).unwrap(), dir)
    }

    const ARTIFACT: ArtifactId = [3; 16];

    #[test]
    fn a_granted_key_unwraps_and_survives_rotation_and_reopening() {
        let (keys, dir) = service("rotate");
        let (key, wrapped) = keys.new_data_key(&ARTIFACT);
        assert_eq!(wrapped.master, 1);
        let grant = keys.grant(&ARTIFACT, Duration::from_secs(60));
        assert_eq!(keys.data_key(&grant, &ARTIFACT, &wrapped).unwrap(), key);

        assert_eq!(keys.rotate().unwrap(), 2);
        // Old wraps still open; a rewrap moves to the new master.
        assert_eq!(keys.data_key(&grant, &ARTIFACT, &wrapped).unwrap(), key);
        let rewrapped = keys.rewrap(&ARTIFACT, &wrapped).unwrap();
        assert_eq!(rewrapped.master, 2);
        assert_ne!(rewrapped, wrapped);
        assert_eq!(keys.data_key(&grant, &ARTIFACT, &rewrapped).unwrap(), key);

        let reopened = KeyService::open(&dir).unwrap();
        assert_eq!(reopened.current_master(), 2);
        assert_eq!(
            reopened.data_key(&grant, &ARTIFACT, &rewrapped).unwrap(),
            key
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn forged_expired_and_misdirected_grants_are_refused() {
        let (keys, dir) = service("grants");
        let (_, wrapped) = keys.new_data_key(&ARTIFACT);
        let grant = keys.grant(&ARTIFACT, Duration::from_secs(60));

        let mut longer = grant.clone();
        longer.expires_ms += 3_600_000;
        assert!(matches!(
            keys.data_key(&longer, &ARTIFACT, &wrapped),
            Err(KeyError::ForgedGrant(_))
        ));
        let mut other = grant.clone();
        other.artifact = [4; 16];
        assert!(matches!(
            keys.data_key(&other, &ARTIFACT, &wrapped),
            Err(KeyError::ForgedGrant(_))
        ));
        let for_other = keys.grant(&[4; 16], Duration::from_secs(60));
        assert!(matches!(
            keys.data_key(&for_other, &ARTIFACT, &wrapped),
            Err(KeyError::WrongArtifact { .. })
        ));
        // Another service's grant, for the same artifact.
        let (stranger, stranger_dir) = service("stranger");
        let foreign = stranger.grant(&ARTIFACT, Duration::from_secs(60));
        assert!(matches!(
            keys.data_key(&foreign, &ARTIFACT, &wrapped),
            Err(KeyError::ForgedGrant(_))
        ));
        // Valid until its deadline, refused from then on.
        let at = grant.expires_ms;
        assert!(keys
            .data_key_at(&grant, &ARTIFACT, &wrapped, at - 1)
            .is_ok());
        let err = keys
            .data_key_at(&grant, &ARTIFACT, &wrapped, at + 5)
            .unwrap_err();
        assert!(err.to_string().contains("expired 5 ms ago"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&stranger_dir).unwrap();
    }

    #[test]
    fn blobs_open_only_where_they_were_sealed_and_only_unaltered() {
        let (keys, dir) = service("blobs");
        let zip = b"PK\x03\x04 a function's code".repeat(100);
        let blob = keys.seal_blob("code/1/abc", &zip);
        assert!(!blob.windows(20).any(|w| w == &zip[..20]), "in the clear");
        assert_eq!(keys.open_blob("code/1/abc", &blob).unwrap(), zip);
        assert!(keys.open_blob("code/2/abc", &blob).is_err());
        for at in [3, 10, 30, 100, blob.len() - 1] {
            let mut bad = blob.clone();
            bad[at] ^= 1;
            assert!(keys.open_blob("code/1/abc", &bad).is_err(), "flip at {at}");
        }
        assert!(keys
            .open_blob("code/1/abc", &blob[..blob.len() - 1])
            .is_err());
        assert!(keys.open_blob("code/1/abc", b"short").is_err());
        keys.rotate().unwrap();
        assert_eq!(keys.open_blob("code/1/abc", &blob).unwrap(), zip);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_tampered_or_moved_wrapped_key_is_refused() {
        let (keys, dir) = service("tamper");
        let (_, wrapped) = keys.new_data_key(&ARTIFACT);
        let grant = keys.grant(&[5; 16], Duration::from_secs(60));
        // The wrapped key of one artifact, presented for another.
        assert!(matches!(
            keys.data_key(&grant, &[5; 16], &wrapped),
            Err(KeyError::Unwrap(_))
        ));
        let grant = keys.grant(&ARTIFACT, Duration::from_secs(60));
        let mut flipped = wrapped.clone();
        let last = if flipped.sealed.ends_with('0') {
            "1"
        } else {
            "0"
        };
        flipped
            .sealed
            .replace_range(flipped.sealed.len() - 1.., last);
        assert!(keys.data_key(&grant, &ARTIFACT, &flipped).is_err());
        let unknown = WrappedKey {
            master: 9,
            ..wrapped
        };
        assert!(matches!(
            keys.data_key(&grant, &ARTIFACT, &unknown),
            Err(KeyError::UnknownMaster(9))
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
