//! The local credential issuer: temporary credentials for a function's
//! execution role, as STS AssumeRole hands them to Lambda. They are cached
//! per account and role, shared by every environment with that role, and
//! replaced before they could expire inside an environment's lease.
//!
//! Issuing is stateless: the session token carries the account, role, key
//! id and expiry under an HMAC of the issuer's master key, and the secret
//! is derived from the same key. The worker's API accepts them like any
//! key (SigV4 plus `X-Amz-Security-Token`) until they expire, also across
//! restarts, since the master key lives in the data directory.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use hmac::{Hmac, KeyInit, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;

use crate::ids::AccountId;
use crate::security::key_file::hmac;
use crate::security::key_file::{self, KeyFileError, KEY_BYTES};

/// Temporary credentials, as the environment's variables carry them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleCredentials {
    pub access_key_id: String,
    pub secret_access_key: String,
    pub session_token: String,
    /// Seconds since the Unix epoch.
    pub expiration: u64,
}

/// What a session token vouches for.
#[derive(Serialize, Deserialize)]
struct Session {
    account: String,
    role: String,
    key: String,
    exp: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum IssuerError {
    #[error("the issuer's master key {0}")]
    MasterKey(#[from] KeyFileError),
}

pub struct RoleCredentialIssuer {
    master: [u8; KEY_BYTES],
    /// How long issued credentials last.
    lifetime: Duration,
    cache: Mutex<HashMap<(AccountId, String), RoleCredentials>>,
}

fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl RoleCredentialIssuer {
    /// The issuer whose master key is `key_file`, created (mode 0600) if
    /// it does not exist yet.
    pub fn open(key_file: &Path, lifetime: Duration) -> Result<Self, IssuerError> {
        let master = key_file::read_or_create(key_file)?;
        Ok(RoleCredentialIssuer {
            master,
            lifetime,
            cache: Mutex::new(HashMap::new()),
        })
    }

    /// Credentials for `role` of `account` that stay valid for at least
    /// `must_outlive`: the cached ones if they do, else fresh ones.
    pub fn credentials(
        &self,
        account: &AccountId,
        role: &str,
        must_outlive: Duration,
    ) -> RoleCredentials {
        let now = now_secs();
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let slot = (account.clone(), role.to_string());
        if let Some(cached) = cache.get(&slot) {
            if cached.expiration >= now + must_outlive.as_secs() {
                return cached.clone();
            }
        }
        let issued = self.issue(
            account,
            role,
            now + self.lifetime.max(must_outlive).as_secs(),
        );
        tracing::info!(
            "issued credentials {} for {role} of {account}, valid until {}",
            issued.access_key_id,
            issued.expiration
        );
        cache.insert(slot, issued.clone());
        issued
    }

    fn issue(&self, account: &AccountId, role: &str, expiration: u64) -> RoleCredentials {
        let mut id = [0u8; 10];
        // Without fresh randomness, a key id derived from the role and
        // expiry is still unique per issue.
        if getrandom::fill(&mut id).is_err() {
            let derived = hmac(
                &self.master,
                format!("{account}{role}{expiration}").as_bytes(),
            );
            id.copy_from_slice(&derived[..10]);
        }
        let key = format!("ASIA{}", hex::encode_upper(id));
        let session = Session {
            account: account.0.clone(),
            role: role.to_string(),
            key: key.clone(),
            exp: expiration,
        };
        let payload = URL_SAFE_NO_PAD.encode(serde_json::to_vec(&session).unwrap_or_default());
        let tag = URL_SAFE_NO_PAD.encode(hmac(&self.master, payload.as_bytes()));
        RoleCredentials {
            secret_access_key: self.secret_of(&key, expiration),
            access_key_id: key,
            session_token: format!("{payload}.{tag}"),
            expiration,
        }
    }

    fn secret_of(&self, key: &str, expiration: u64) -> String {
        STANDARD.encode(hmac(
            &self.master,
            format!("secret\0{key}\0{expiration}").as_bytes(),
        ))
    }

    /// The account and secret of `access_key_id` if `session_token` is one
    /// this issuer made for it and it has not expired.
    pub fn verify(&self, access_key_id: &str, session_token: &str) -> Option<(AccountId, String)> {
        let (payload, tag) = session_token.split_once('.')?;
        let tag = URL_SAFE_NO_PAD.decode(tag).ok()?;
        let mut mac = Hmac::<Sha256>::new_from_slice(&self.master).ok()?;
        mac.update(payload.as_bytes());
        mac.verify_slice(&tag).ok()?;
        let session: Session =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(payload).ok()?).ok()?;
        if session.key != access_key_id || session.exp <= now_secs() {
            return None;
        }
        Some((
            AccountId(session.account),
            self.secret_of(&session.key, session.exp),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn issuer(dir: &Path) -> RoleCredentialIssuer {
        RoleCredentialIssuer::open(&dir.join("issuer.key"), Duration::from_secs(3600)).unwrap()
    }

    fn temp_dir(name: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn credentials_are_cached_per_role_and_refreshed_when_they_would_expire_too_soon() {
        let dir = temp_dir("issuer-cache");
        let issuer = issuer(&dir);
        let a = AccountId("111111111111".into());
        let role = "arn:aws:iam::111111111111:role/r";
        let first = issuer.credentials(&a, role, Duration::from_secs(60));
        assert!(first.access_key_id.starts_with("ASIA"));
        assert_eq!(first, issuer.credentials(&a, role, Duration::from_secs(60)));
        let other_role = issuer.credentials(&a, "arn:aws:iam::111111111111:role/s", Duration::ZERO);
        assert_ne!(first.access_key_id, other_role.access_key_id);
        // Cached ones last an hour; an environment that lives two needs new
        // ones, which last as long as it does.
        let longer = issuer.credentials(&a, role, Duration::from_secs(7200));
        assert_ne!(first.access_key_id, longer.access_key_id);
        assert!(longer.expiration >= now_secs() + 7200);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn tokens_verify_across_restarts_and_forgeries_do_not() {
        let dir = temp_dir("issuer-verify");
        let a = AccountId("111111111111".into());
        let issued =
            issuer(&dir).credentials(&a, "arn:aws:iam::111111111111:role/r", Duration::ZERO);
        let reopened = issuer(&dir);
        assert_eq!(
            reopened.verify(&issued.access_key_id, &issued.session_token),
            Some((a.clone(), issued.secret_access_key.clone()))
        );
        assert_eq!(reopened.verify("ASIAOTHER", &issued.session_token), None);
        let (payload, tag) = issued.session_token.split_once('.').unwrap();
        let forged = URL_SAFE_NO_PAD.encode(
            String::from_utf8(URL_SAFE_NO_PAD.decode(payload).unwrap())
                .unwrap()
                .replace("111111111111", "222222222222"),
        );
        assert_eq!(
            reopened.verify(&issued.access_key_id, &format!("{forged}.{tag}")),
            None
        );
        assert_eq!(reopened.verify(&issued.access_key_id, "garbage"), None);
        let expired = reopened.issue(&a, "arn:aws:iam::111111111111:role/r", now_secs() - 1);
        assert_eq!(
            reopened.verify(&expired.access_key_id, &expired.session_token),
            None
        );
        let other_dir = temp_dir("issuer-other");
        let other = issuer(&other_dir);
        assert_eq!(
            other.verify(&issued.access_key_id, &issued.session_token),
            None
        );
        std::fs::remove_dir_all(&dir).unwrap();
        std::fs::remove_dir_all(&other_dir).unwrap();
    }
}
