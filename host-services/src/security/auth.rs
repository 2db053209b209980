//! Who is calling: AWS Signature Version 4 checked against a static table
//! of credentials, each of which belongs to one account. Every resource the
//! API touches is keyed by the account this yields, so nothing crosses
//! accounts.

use std::collections::HashMap;
use std::path::Path;
use std::sync::Arc;

use axum::http::{HeaderMap, HeaderValue, Method};
use chrono::{NaiveDateTime, Utc};
use hmac::{Hmac, KeyInit, Mac};
use serde::Deserialize;
use sha2::{Digest, Sha256};

use crate::error::ApiError;
use crate::ids::AccountId;
use crate::security::key_file::hmac;
use crate::security::role_credentials::RoleCredentialIssuer;

type HmacSha256 = Hmac<Sha256>;

/// How far a request's `X-Amz-Date` may be from the worker's clock, as AWS
/// allows.
const MAX_CLOCK_SKEW_SECS: i64 = 15 * 60;
const ALGORITHM: &str = "AWS4-HMAC-SHA256";

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase", deny_unknown_fields)]
struct CredentialEntry {
    access_key_id: String,
    secret_access_key: String,
    account_id: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CredentialsError {
    #[error("cannot read the credentials file {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("credentials file {path}: {source}")]
    Parse {
        path: String,
        source: serde_json::Error,
    },
    #[error("credentials file {path}: account id {account:?} is not 12 digits")]
    BadAccount { path: String, account: String },
    #[error("credentials file {path}: access key {key:?} appears twice")]
    Duplicate { path: String, key: String },
}

/// The static credential table: access key id to secret and account;
/// plus, with an issuer, the temporary credentials of execution roles.
pub struct Credentials {
    keys: HashMap<String, (String, AccountId)>,
    issuer: Option<Arc<RoleCredentialIssuer>>,
}

/// The parts of a request that its signature covers.
pub struct SignedRequest<'a> {
    pub method: &'a Method,
    /// The path exactly as sent, still percent-encoded.
    pub raw_path: &'a str,
    pub raw_query: Option<&'a str>,
    pub headers: &'a HeaderMap,
    pub body: &'a [u8],
}

impl Credentials {
    /// Reads a JSON array of `{"AccessKeyId", "SecretAccessKey", "AccountId"}`.
    pub fn load(path: &Path) -> Result<Self, CredentialsError> {
        let name = path.display().to_string();
        let text = std::fs::read_to_string(path).map_err(|source| CredentialsError::Read {
            path: name.clone(),
            source,
        })?;
        let entries: Vec<CredentialEntry> =
            serde_json::from_str(&text).map_err(|source| CredentialsError::Parse {
                path: name.clone(),
                source,
            })?;
        let mut keys = HashMap::new();
        for e in entries {
            if e.account_id.len() != 12 || !e.account_id.bytes().all(|b| b.is_ascii_digit()) {
                return Err(CredentialsError::BadAccount {
                    path: name,
                    account: e.account_id,
                });
            }
            let account = AccountId(e.account_id);
            if keys
                .insert(e.access_key_id.clone(), (e.secret_access_key, account))
                .is_some()
            {
                return Err(CredentialsError::Duplicate {
                    path: name,
                    key: e.access_key_id,
                });
            }
        }
        Ok(Credentials { keys, issuer: None })
    }

    /// Also accepts the temporary credentials `issuer` hands out.
    pub fn with_issuer(self, issuer: Arc<RoleCredentialIssuer>) -> Self {
        Credentials {
            issuer: Some(issuer),
            ..self
        }
    }

    /// The secret and account of an access key id: a static key, or a
    /// temporary one with its session token.
    fn secret_of(&self, access_key: &str, headers: &HeaderMap) -> Option<(String, AccountId)> {
        if let Some(entry) = self.keys.get(access_key) {
            return Some(entry.clone());
        }
        let token = headers.get("x-amz-security-token")?.to_str().ok()?;
        self.issuer
            .as_ref()?
            .verify(access_key, token)
            .map(|(a, s)| (s, a))
    }

    /// Checks the request's SigV4 signature and returns the caller's
    /// account.
    pub fn authenticate(&self, request: &SignedRequest<'_>) -> Result<AccountId, ApiError> {
        let header = request
            .headers
            .get("authorization")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| {
                ApiError::InvalidSignature("the request is not signed (no Authorization)".into())
            })?;
        let auth = Authorization::parse(header)?;
        let (secret, account) = self
            .secret_of(auth.access_key, request.headers)
            .ok_or_else(|| {
                ApiError::UnrecognizedClient(
                    "The security token included in the request is invalid.".into(),
                )
            })?;
        let amz_date = request
            .headers
            .get("x-amz-date")
            .and_then(|v| v.to_str().ok())
            .ok_or_else(|| ApiError::InvalidSignature("no X-Amz-Date header".into()))?;
        let signed_at = NaiveDateTime::parse_from_str(amz_date, "%Y%m%dT%H%M%SZ")
            .map_err(|_| ApiError::InvalidSignature(format!("bad X-Amz-Date {amz_date:?}")))?;
        let skew = (Utc::now().naive_utc() - signed_at).num_seconds().abs();
        if skew > MAX_CLOCK_SKEW_SECS {
            return Err(ApiError::InvalidSignature(format!(
                "Signature expired: {amz_date} is more than 15 minutes from the worker's time"
            )));
        }
        if !amz_date.starts_with(auth.date) {
            return Err(ApiError::InvalidSignature(
                "the credential scope's date is not the X-Amz-Date".into(),
            ));
        }
        let canonical = canonical_request(request, &auth.signed_headers)?;
        let scope = Scope {
            date: auth.date,
            region: auth.region,
            service: auth.service,
        };
        let string_to_sign = scope.string_to_sign(amz_date, &canonical);
        let key = scope.signing_key(&secret);
        let signature = hex::decode(auth.signature)
            .map_err(|_| ApiError::InvalidSignature("the signature is not hex".into()))?;
        let mut mac = HmacSha256::new_from_slice(&key).expect("HMAC takes any key length");
        mac.update(string_to_sign.as_bytes());
        mac.verify_slice(&signature).map_err(|_| {
            ApiError::InvalidSignature(
                "The request signature we calculated does not match the signature you provided."
                    .into(),
            )
        })?;
        Ok(account)
    }
}

/// A signature's credential scope: `DATE/REGION/SERVICE/aws4_request`.
struct Scope<'a> {
    date: &'a str,
    region: &'a str,
    service: &'a str,
}

impl Scope<'_> {
    fn string_to_sign(&self, amz_date: &str, canonical_request: &str) -> String {
        format!(
            "{ALGORITHM}\n{amz_date}\n{}/{}/{}/aws4_request\n{}",
            self.date,
            self.region,
            self.service,
            hex::encode(Sha256::digest(canonical_request.as_bytes()))
        )
    }

    fn signing_key(&self, secret: &str) -> Vec<u8> {
        let mut key = format!("AWS4{secret}").into_bytes();
        for part in [self.date, self.region, self.service, "aws4_request"] {
            key = hmac(&key, part.as_bytes());
        }
        key
    }
}

/// A caller's long-term key, for signing requests to the worker.
pub struct AccessKey<'a> {
    pub id: &'a str,
    pub secret: &'a str,
    pub region: &'a str,
}

/// Signs a Lambda API request as the AWS SDKs do: sets `X-Amz-Date` and
/// `Authorization` over `host`, `x-amz-date` and the body. `headers` must
/// already hold `host`.
pub fn sign(
    key: &AccessKey<'_>,
    method: &Method,
    raw_path: &str,
    raw_query: Option<&str>,
    headers: &mut HeaderMap,
    body: &[u8],
) {
    let now = Utc::now();
    let amz_date = now.format("%Y%m%dT%H%M%SZ").to_string();
    let date = now.format("%Y%m%d").to_string();
    headers.insert(
        "x-amz-date",
        HeaderValue::from_str(&amz_date).expect("a date is a valid header"),
    );
    let signed_headers = ["host", "x-amz-date"];
    let canonical = canonical_request(
        &SignedRequest {
            method,
            raw_path,
            raw_query,
            headers,
            body,
        },
        &signed_headers,
    )
    .unwrap_or_default();
    let scope = Scope {
        date: &date,
        region: key.region,
        service: "lambda",
    };
    let signature = hex::encode(hmac(
        &scope.signing_key(key.secret),
        scope.string_to_sign(&amz_date, &canonical).as_bytes(),
    ));
    let authorization = format!(
        "{ALGORITHM} Credential={}/{date}/{}/lambda/aws4_request, SignedHeaders={}, Signature={signature}",
        key.id,
        key.region,
        signed_headers.join(";")
    );
    if let Ok(value) = HeaderValue::from_str(&authorization) {
        headers.insert("authorization", value);
    }
}

/// `AWS4-HMAC-SHA256 Credential=AKID/DATE/REGION/SERVICE/aws4_request,
/// SignedHeaders=a;b, Signature=HEX`
struct Authorization<'a> {
    access_key: &'a str,
    date: &'a str,
    region: &'a str,
    service: &'a str,
    signed_headers: Vec<&'a str>,
    signature: &'a str,
}

impl<'a> Authorization<'a> {
    fn parse(header: &'a str) -> Result<Self, ApiError> {
        let bad = |what: &str| ApiError::InvalidSignature(format!("Authorization header: {what}"));
        let rest = header
            .strip_prefix(ALGORITHM)
            .ok_or_else(|| bad("only AWS4-HMAC-SHA256 is supported"))?;
        let mut credential = None;
        let mut signed_headers = None;
        let mut signature = None;
        for part in rest.split(',') {
            match part.trim().split_once('=') {
                Some(("Credential", v)) => credential = Some(v),
                Some(("SignedHeaders", v)) => signed_headers = Some(v),
                Some(("Signature", v)) => signature = Some(v),
                _ => return Err(bad(&format!("unexpected part {:?}", part.trim()))),
            }
        }
        let credential = credential.ok_or_else(|| bad("no Credential"))?;
        let mut scope = credential.split('/');
        let (Some(access_key), Some(date), Some(region), Some(service), Some("aws4_request"), None) = (
            scope.next(),
            scope.next(),
            scope.next(),
            scope.next(),
            scope.next(),
            scope.next(),
        ) else {
            return Err(bad("malformed Credential scope"));
        };
        let signed_headers: Vec<&str> = signed_headers
            .ok_or_else(|| bad("no SignedHeaders"))?
            .split(';')
            .collect();
        if !signed_headers.contains(&"host") {
            return Err(bad("the host header must be signed"));
        }
        Ok(Authorization {
            access_key,
            date,
            region,
            service,
            signed_headers,
            signature: signature.ok_or_else(|| bad("no Signature"))?,
        })
    }
}

/// Percent-encodes everything but SigV4's unreserved characters (and `/`
/// where `keep_slash`), as the signer did to the already-encoded path.
fn uri_encode(raw: &str, keep_slash: bool) -> String {
    let mut out = String::with_capacity(raw.len());
    for b in raw.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) || (keep_slash && b == b'/') {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

fn canonical_request(
    request: &SignedRequest<'_>,
    signed_headers: &[&str],
) -> Result<String, ApiError> {
    // Non-S3 services sign the path encoded once more on top of the
    // encoding it travels with.
    let path = if request.raw_path.is_empty() {
        "/".to_string()
    } else {
        uri_encode(request.raw_path, true)
    };
    let mut query: Vec<(&str, &str)> = request
        .raw_query
        .unwrap_or("")
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|p| p.split_once('=').unwrap_or((p, "")))
        .collect();
    query.sort_unstable();
    let query: Vec<String> = query.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let mut headers = String::new();
    for name in signed_headers {
        let values: Vec<String> = request
            .headers
            .get_all(*name)
            .iter()
            .map(|v| {
                let v = String::from_utf8_lossy(v.as_bytes());
                v.split_whitespace().collect::<Vec<_>>().join(" ")
            })
            .collect();
        if values.is_empty() {
            return Err(ApiError::InvalidSignature(format!(
                "signed header {name:?} is missing from the request"
            )));
        }
        headers.push_str(&format!("{name}:{}\n", values.join(",")));
    }
    Ok(format!(
        "{}\n{path}\n{}\n{headers}\n{}\n{}",
        request.method,
        query.join("&"),
        signed_headers.join(";"),
        hex::encode(Sha256::digest(request.body))
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn table() -> Credentials {
        let mut keys = HashMap::new();
        keys.insert(
            "AKIDEXAMPLE".to_string(),
            (
                "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY".to_string(),
                AccountId("111111111111".into()),
            ),
        );
        Credentials { keys, issuer: None }
    }

    fn signed(path: &str, query: Option<&str>, body: &[u8], secret: &str) -> HeaderMap {
        let mut headers = HeaderMap::new();
        headers.insert("host", HeaderValue::from_static("localhost:9000"));
        let key = AccessKey {
            id: "AKIDEXAMPLE",
            secret,
            region: "us-east-1",
        };
        sign(&key, &Method::POST, path, query, &mut headers, body);
        headers
    }

    fn check(headers: &HeaderMap, path: &str, body: &[u8]) -> Result<AccountId, ApiError> {
        table().authenticate(&SignedRequest {
            method: &Method::POST,
            raw_path: path,
            raw_query: Some("Qualifier=1"),
            headers,
            body,
        })
    }

    const SECRET: &str = "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY";
    const PATH: &str = "/2015-03-31/functions/arn%3Aaws%3Alambda/invocations";

    #[test]
    fn a_correct_signature_names_the_account() {
        let headers = signed(PATH, Some("Qualifier=1"), b"{}", SECRET);
        assert_eq!(
            check(&headers, PATH, b"{}").unwrap(),
            AccountId("111111111111".into())
        );
    }

    #[test]
    fn a_changed_body_path_or_secret_is_refused() {
        let headers = signed(PATH, Some("Qualifier=1"), b"{}", SECRET);
        assert!(matches!(
            check(&headers, PATH, b"{ }"),
            Err(ApiError::InvalidSignature(_))
        ));
        assert!(matches!(
            check(&headers, "/2015-03-31/functions/other/invocations", b"{}"),
            Err(ApiError::InvalidSignature(_))
        ));
        let headers = signed(PATH, Some("Qualifier=1"), b"{}", "not-the-secret");
        assert!(matches!(
            check(&headers, PATH, b"{}"),
            Err(ApiError::InvalidSignature(_))
        ));
    }

    #[test]
    fn unknown_keys_and_garbage_headers_are_named() {
        let mut headers = signed(PATH, Some("Qualifier=1"), b"{}", SECRET);
        let auth = headers["authorization"]
            .to_str()
            .unwrap()
            .replace("AKIDEXAMPLE", "AKIDOTHER");
        headers.insert("authorization", HeaderValue::from_str(&auth).unwrap());
        assert!(matches!(
            check(&headers, PATH, b"{}"),
            Err(ApiError::UnrecognizedClient(_))
        ));
        headers.insert("authorization", HeaderValue::from_static("Basic Zm9v"));
        let err = check(&headers, PATH, b"{}").unwrap_err();
        assert!(err.to_string().contains("AWS4-HMAC-SHA256"), "{err}");
        headers.remove("authorization");
        let err = check(&headers, PATH, b"{}").unwrap_err();
        assert!(err.to_string().contains("not signed"), "{err}");
    }

    #[test]
    fn stale_signatures_are_refused() {
        let mut headers = signed(PATH, Some("Qualifier=1"), b"{}", SECRET);
        headers.insert("x-amz-date", HeaderValue::from_static("20200101T000000Z"));
        let err = check(&headers, PATH, b"{}").unwrap_err();
        assert!(err.to_string().contains("expired"), "{err}");
    }

    #[test]
    fn the_table_refuses_bad_accounts_and_duplicates() {
        let dir = std::env::temp_dir().join(format!("creds-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.json");
        std::fs::write(
            &file,
            r#"[{"AccessKeyId":"A","SecretAccessKey":"s","AccountId":"12"}]"#,
        )
        .unwrap();
        let err = Credentials::load(&file).err().unwrap().to_string();
        assert!(err.contains("\"12\" is not 12 digits"), "{err}");
        std::fs::write(&file, r#"[{"AccessKeyId":"A","SecretAccessKey":"s","AccountId":"111111111111"},{"AccessKeyId":"A","SecretAccessKey":"t","AccountId":"222222222222"}]"#).unwrap();
        let err = Credentials::load(&file).err().unwrap().to_string();
        assert!(err.contains("\"A\" appears twice"), "{err}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
