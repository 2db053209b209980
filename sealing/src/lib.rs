//! AES-256-GCM for the VMM's sealed disks and the worker's sealed
//! artifacts, keys and snapshots: RustCrypto's `aes-gcm`, behind
//! functions that are not generic.
//!
//! Why a crate of its own: `aes-gcm`'s encryption loop is generic, so it
//! is compiled in the crate that names `Aes256Gcm`, at that crate's
//! optimization level. In test builds that left it unoptimized, at about
//! 3 MB/s: a 32 MiB snapshot took 10 s to seal on this machine and close
//! to 4 minutes in the emulated L1 machine. Instantiated here, it is
//! optimized in every profile (the workspace's `Cargo.toml` says so).

use aes_gcm::aead::{AeadInOut, KeyInit};
use aes_gcm::{Aes256Gcm, Nonce, Tag};

pub const KEY_LEN: usize = 32;
pub const NONCE_LEN: usize = 12;
pub const TAG_LEN: usize = 16;

/// AES-GCM refused: a message over its 64 GiB limit when sealing, a
/// failed authentication when opening.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Refused;

impl std::fmt::Display for Refused {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AES-GCM refused the message")
    }
}

impl std::error::Error for Refused {}

/// An AES-256-GCM key, its schedule computed once.
#[derive(Clone)]
pub struct Cipher(Aes256Gcm);

impl Cipher {
    pub fn new(key: &[u8; KEY_LEN]) -> Self {
        Cipher(Aes256Gcm::new(key.into()))
    }

    /// Encrypts `data` in place; returns the tag over it and `aad`.
    pub fn seal_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        data: &mut [u8],
    ) -> Result<[u8; TAG_LEN], Refused> {
        self.0
            .encrypt_inout_detached(&Nonce::from(*nonce), aad, data.into())
            .map(Into::into)
            .map_err(|_| Refused)
    }

    /// Decrypts `data` in place if `tag` authenticates it and `aad`;
    /// otherwise leaves it as it was and refuses.
    pub fn open_in_place(
        &self,
        nonce: &[u8; NONCE_LEN],
        aad: &[u8],
        data: &mut [u8],
        tag: &[u8; TAG_LEN],
    ) -> Result<(), Refused> {
        self.0
            .decrypt_inout_detached(&Nonce::from(*nonce), aad, data.into(), &Tag::from(*tag))
            .map_err(|_| Refused)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn what_is_sealed_opens_and_any_change_is_refused() {
        let cipher = Cipher::new(&[3; KEY_LEN]);
        let nonce = [5; NONCE_LEN];
        let mut data = b"the function's code".to_vec();
        let tag = cipher.seal_in_place(&nonce, b"aad", &mut data).unwrap();
        assert_ne!(&data[..], b"the function's code");
        let sealed = data.clone();
        cipher
            .open_in_place(&nonce, b"aad", &mut data, &tag)
            .unwrap();
        assert_eq!(&data[..], b"the function's code");

        let mut flipped = sealed.clone();
        flipped[3] ^= 1;
        assert_eq!(
            cipher.open_in_place(&nonce, b"aad", &mut flipped, &tag),
            Err(Refused)
        );
        let mut other_aad = sealed.clone();
        assert_eq!(
            cipher.open_in_place(&nonce, b"aae", &mut other_aad, &tag),
            Err(Refused)
        );
        let mut other_key = sealed;
        assert_eq!(
            Cipher::new(&[4; KEY_LEN]).open_in_place(&nonce, b"aad", &mut other_key, &tag),
            Err(Refused)
        );
    }
}
