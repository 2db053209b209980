//! Layers: versioned ZIPs a function adds to its code, as Lambda extracts
//! them into `/opt`. Each version is immutable once published. A function
//! names up to five, in order; a file in a later layer shadows the same
//! file in an earlier one, and the function's own code comes first.

use serde::{Deserialize, Serialize};

use crate::control_plane::functions::{
    code_key, code_sha256, decode_zip, now_string, ControlPlane,
};
use crate::control_plane::model::{LayerRef, REGION};
use crate::control_plane::store::{numbered, Txn, DELETED_LAYERS, LAYERS};
use crate::error::ApiError;
use crate::ids::AccountId;

/// Lambda's limit on layers per function.
pub const MAX_LAYERS: usize = 5;

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PublishLayerVersionRequest {
    pub content: LayerContent,
    pub description: Option<String>,
    #[serde(default)]
    pub compatible_runtimes: Vec<String>,
    #[serde(default)]
    pub compatible_architectures: Vec<String>,
    pub license_info: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LayerContent {
    pub zip_file: Option<String>,
    #[serde(rename = "S3Bucket")]
    pub s3_bucket: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LayerVersionContent {
    pub location: String,
    pub code_sha256: String,
    pub code_size: u64,
}

/// A published layer version, as GetLayerVersion returns it.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LayerVersion {
    pub content: LayerVersionContent,
    pub layer_arn: String,
    pub layer_version_arn: String,
    pub description: String,
    pub created_date: String,
    pub version: u64,
    pub compatible_runtimes: Vec<String>,
    pub compatible_architectures: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub license_info: Option<String>,
}

fn layer_arn(account: &AccountId, name: &str) -> String {
    format!("arn:aws:lambda:{REGION}:{account}:layer:{name}")
}

fn layer_key(account: &AccountId, name: &str) -> String {
    format!("{account}/{name}")
}

pub fn validate_layer_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=140).contains(&name.len())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_');
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "invalid layer name {name:?}: 1 to 140 letters, digits, '-' or '_'"
        )))
    }
}

/// The name and version a layer version ARN of `account` names.
fn parse_version_arn(account: &AccountId, arn: &str) -> Result<(String, u64), ApiError> {
    let prefix = format!("arn:aws:lambda:{REGION}:");
    let bad = || {
        ApiError::invalid(format!(
            "{arn:?} is not a layer version ARN (arn:aws:lambda:{REGION}:ACCOUNT:layer:NAME:VERSION)"
        ))
    };
    let rest = arn.strip_prefix(&prefix).ok_or_else(bad)?;
    let [owner, "layer", name, version] = rest.split(':').collect::<Vec<_>>()[..] else {
        return Err(bad());
    };
    if owner != account.0 {
        return Err(ApiError::AccessDenied(format!(
            "layer {arn} belongs to another account"
        )));
    }
    validate_layer_name(name)?;
    let version = version.parse().map_err(|_| bad())?;
    Ok((name.to_string(), version))
}

impl ControlPlane {
    pub fn publish_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        req: PublishLayerVersionRequest,
    ) -> Result<LayerVersion, ApiError> {
        validate_layer_name(name)?;
        if req.content.s3_bucket.is_some() {
            return Err(ApiError::invalid(
                "S3 code locations are not supported by this worker; send ZipFile",
            ));
        }
        if req.description.as_ref().is_some_and(|d| d.len() > 256) {
            return Err(ApiError::invalid(
                "Description is over Lambda's 256 characters",
            ));
        }
        if req.compatible_architectures.iter().any(|a| a != "x86_64") {
            return Err(ApiError::invalid(format!(
                "CompatibleArchitectures {:?}: this worker runs x86_64",
                req.compatible_architectures
            )));
        }
        let zip = decode_zip(
            req.content
                .zip_file
                .as_deref()
                .ok_or_else(|| ApiError::invalid("Content.ZipFile is required"))?,
        )?;
        let sha = code_sha256(&zip);
        let key = layer_key(account, name);
        self.store.write(|t| {
            // Version numbers are never reused, deleted ones included.
            let mut last = 0;
            for table in [LAYERS, DELETED_LAYERS] {
                if let Some((_, v)) = t.scan::<LayerVersion>(table, &key)?.last() {
                    last = last.max(v.version);
                }
            }
            let version = last + 1;
            let arn = layer_arn(account, name);
            let layer = LayerVersion {
                content: LayerVersionContent {
                    location: format!("worker://{sha}"),
                    code_sha256: sha.clone(),
                    code_size: zip.len() as u64,
                },
                layer_version_arn: format!("{arn}:{version}"),
                layer_arn: arn,
                description: req.description.clone().unwrap_or_default(),
                created_date: now_string(),
                version,
                compatible_runtimes: req.compatible_runtimes.clone(),
                compatible_architectures: req.compatible_architectures.clone(),
                license_info: req.license_info.clone(),
            };
            self.put_code(t, &code_key(account, &sha), &zip)?;
            t.put(LAYERS, &numbered(&key, version), &layer)?;
            Ok(layer)
        })
    }

    pub fn get_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u64,
    ) -> Result<LayerVersion, ApiError> {
        validate_layer_name(name)?;
        self.store
            .read()?
            .get(LAYERS, &numbered(&layer_key(account, name), version))?
            .ok_or_else(|| {
                ApiError::ResourceNotFound(format!(
                    "Layer version {}:{version} does not exist",
                    layer_arn(account, name)
                ))
            })
    }

    /// The layer version a version ARN names.
    pub fn get_layer_version_by_arn(
        &self,
        account: &AccountId,
        arn: &str,
    ) -> Result<LayerVersion, ApiError> {
        let (name, version) = parse_version_arn(account, arn)?;
        self.get_layer_version(account, &name, version)
    }

    /// Deletes a layer version: it can no longer be read, listed or
    /// added to a function, and its number is not given again. Functions
    /// that use it keep working, as on Lambda, so its record moves aside
    /// with its code. Deleting a version that is not there does nothing.
    pub fn delete_layer_version(
        &self,
        account: &AccountId,
        name: &str,
        version: u64,
    ) -> Result<(), ApiError> {
        validate_layer_name(name)?;
        let key = numbered(&layer_key(account, name), version);
        self.store.write(|t| {
            if let Some(layer) = t.get::<LayerVersion>(LAYERS, &key)? {
                t.put(DELETED_LAYERS, &key, &layer)?;
                t.remove(LAYERS, &key)?;
            }
            Ok(())
        })
    }

    /// The account's layers by name, each with its newest version (of
    /// those compatible with `runtime`, if given), as ListLayers
    /// returns them.
    pub fn list_layers(
        &self,
        account: &AccountId,
        runtime: Option<&str>,
    ) -> Result<Vec<(String, LayerVersion)>, ApiError> {
        let versions = self
            .store
            .read()?
            .scan::<LayerVersion>(LAYERS, &account.0)?;
        let mut layers: Vec<(String, LayerVersion)> = Vec::new();
        // Keys sort by layer name, then by version number.
        for (key, version) in versions {
            if runtime.is_some_and(|r| !version.compatible_runtimes.iter().any(|c| c == r)) {
                continue;
            }
            let name = key.split('/').nth(1).unwrap_or_default().to_string();
            match layers.last_mut() {
                Some((last, newest)) if *last == name => *newest = version,
                _ => layers.push((name, version)),
            }
        }
        Ok(layers)
    }

    /// A layer's versions, newest first, as ListLayerVersions orders them.
    pub fn list_layer_versions(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<Vec<LayerVersion>, ApiError> {
        validate_layer_name(name)?;
        let versions = self
            .store
            .read()?
            .scan::<LayerVersion>(LAYERS, &layer_key(account, name))?;
        Ok(versions.into_iter().rev().map(|(_, v)| v).collect())
    }

    /// The function configuration's view of the layer versions `arns`
    /// names, each checked to exist in `account`.
    pub(crate) fn resolve_layers(
        &self,
        t: &Txn,
        account: &AccountId,
        arns: &[String],
    ) -> Result<Vec<LayerRef>, ApiError> {
        if arns.len() > MAX_LAYERS {
            return Err(ApiError::invalid(format!(
                "{} layers; a function may use at most {MAX_LAYERS}",
                arns.len()
            )));
        }
        arns.iter()
            .map(|arn| {
                let (name, version) = parse_version_arn(account, arn)?;
                let layer: LayerVersion = t
                    .get(LAYERS, &numbered(&layer_key(account, &name), version))?
                    .ok_or_else(|| {
                        ApiError::invalid(format!("Layer version {arn} does not exist"))
                    })?;
                Ok(LayerRef {
                    arn: arn.clone(),
                    code_size: layer.content.code_size,
                })
            })
            .collect()
    }

    /// The code SHA-256 of each layer a function names, read from the
    /// metadata: a cold start with an optimized artifact needs no more.
    pub(crate) fn layer_shas(
        &self,
        account: &AccountId,
        layers: &[LayerRef],
    ) -> Result<Vec<String>, ApiError> {
        let snap = self.store.read()?;
        layers
            .iter()
            .map(|l| {
                let (name, version) = parse_version_arn(account, &l.arn)?;
                let key = numbered(&layer_key(account, &name), version);
                let layer: LayerVersion = match snap.get(LAYERS, &key)? {
                    Some(layer) => layer,
                    None => snap
                        .get(DELETED_LAYERS, &key)?
                        .ok_or_else(|| ApiError::Service(format!("layer {} is missing", l.arn)))?,
                };
                Ok(layer.content.code_sha256)
            })
            .collect()
    }
}
