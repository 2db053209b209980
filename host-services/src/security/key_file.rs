//! Secret keys kept in files: 32 random bytes, created once with mode 0600
//! (never overwritten) and read back as they are; and the HMAC-SHA256
//! every key derivation here is built from.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use hmac::{Hmac, KeyInit, Mac};
use sha2::Sha256;

pub const KEY_BYTES: usize = 32;

pub(crate) fn hmac(key: &[u8], data: &[u8]) -> Vec<u8> {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC takes any key length");
    mac.update(data);
    mac.finalize().into_bytes().to_vec()
}

#[derive(Debug, thiserror::Error)]
pub enum KeyFileError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not {KEY_BYTES} bytes")]
    Length { path: PathBuf },
    #[error("no randomness for a new key {path}: {reason}")]
    Random { path: PathBuf, reason: String },
}

/// The key in `path`; None if there is no such file.
pub fn read(path: &Path) -> Result<Option<[u8; KEY_BYTES]>, KeyFileError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => {
            return Err(KeyFileError::Io {
                path: path.to_path_buf(),
                source,
            })
        }
    };
    bytes
        .try_into()
        .map(Some)
        .map_err(|_| KeyFileError::Length {
            path: path.to_path_buf(),
        })
}

/// A fresh random key, written to `path`, which must not exist yet.
pub fn create(path: &Path) -> Result<[u8; KEY_BYTES], KeyFileError> {
    let mut key = [0u8; KEY_BYTES];
    getrandom::fill(&mut key).map_err(|e| KeyFileError::Random {
        path: path.to_path_buf(),
        reason: e.to_string(),
    })?;
    std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .open(path)
        .and_then(|mut f| f.write_all(&key).and_then(|()| f.sync_all()))
        .map_err(|source| KeyFileError::Io {
            path: path.to_path_buf(),
            source,
        })?;
    Ok(key)
}

/// The key in `path`, created if there is none yet.
pub fn read_or_create(path: &Path) -> Result<[u8; KEY_BYTES], KeyFileError> {
    match read(path)? {
        Some(key) => Ok(key),
        None => create(path),
    }
}
