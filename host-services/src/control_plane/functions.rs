//! The control plane: functions, versions, aliases and concurrency settings
//! of each account, kept in the [`Store`]. HTTP lives in [`crate::api`];
//! this module holds the rules.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use base64::Engine as _;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::artifacts::chunk_store::{ChunkStore, ChunkStoreError};
use crate::artifacts::code;
use crate::artifacts::erofs_image;
use crate::artifacts::sealed::{ArtifactError, ArtifactStore, GrantedArtifact};
use crate::artifacts::wasm_image;
use crate::control_plane::model::*;
use crate::control_plane::store::{
    numbered, Store, Txn, ALIASES, CODE, FUNCTIONS, PROVISIONED, VERSIONS,
};
use crate::error::ApiError;
use crate::ids::AccountId;
use crate::ids::VersionKey;
use crate::security::key_service::KeyService;

/// A function as stored: its `$LATEST` configuration and its settings.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct FunctionRecord {
    pub latest: FunctionConfiguration,
    pub last_version: u64,
    pub reserved_concurrency: Option<u32>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    /// Asynchronous invocation configs, by qualifier.
    #[serde(default)]
    pub event_invoke_configs: BTreeMap<String, EventInvokeConfig>,
    /// The resource-based policy's statements.
    #[serde(default)]
    pub policy: Vec<PolicyStatement>,
}

/// A provisioned concurrency config as stored.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProvisionedConfig {
    pub account: String,
    pub function_name: String,
    pub qualifier: String,
    pub requested: u32,
    pub last_modified: String,
}

impl ProvisionedConfig {
    /// `ACCOUNT/NAME:QUALIFIER`, for logs and status.
    pub fn id(&self) -> String {
        format!("{}/{}:{}", self.account, self.function_name, self.qualifier)
    }
}

/// What an invocation of a function reference resolves to.
#[derive(Debug, Clone)]
pub struct Resolved {
    pub config: FunctionConfiguration,
    pub reserved_concurrency: Option<u32>,
    pub key: VersionKey,
}

/// The disks of a version's code, and what reads them.
pub struct CodeDisks {
    pub code: CodeDrive,
    /// The function's layers, merged, for a Linux guest's /opt.
    pub layers: Option<GrantedArtifact>,
}

/// A version's code disk.
#[derive(Clone)]
pub enum CodeDrive {
    /// A sealed disk, and a grant to read it.
    Sealed(GrantedArtifact),
    /// A container image: the chunk store, the image's chunk manifest
    /// (which holds the chunks' keys) and what the image runs.
    Image {
        store: std::path::PathBuf,
        launch: crate::artifacts::container_image::ImageLaunch,
    },
}

pub struct ControlPlane {
    pub store: Store,
    artifacts: ArtifactStore,
    /// Container images' chunks.
    pub(crate) chunks: ChunkStore,
    /// Seals uploaded code in the store.
    keys: Arc<KeyService>,
    /// The Linux runtimes this worker can start: `provided.*` with a
    /// Linux guest, managed ones with their runtime images too.
    linux_runtimes: Vec<String>,
    /// One lock per code disk being built: concurrent first cold starts
    /// wait for one build instead of each sealing its own, where a later
    /// one would replace (and delete) the artifact an earlier one's launch
    /// names.
    building: Mutex<HashMap<String, Arc<Mutex<()>>>>,
}

#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    #[error(transparent)]
    Artifacts(#[from] ArtifactError),
    #[error(transparent)]
    Chunks(#[from] ChunkStoreError),
}

fn function_key(account: &AccountId, name: &str) -> String {
    format!("{account}/{name}")
}

pub(crate) fn now_string() -> String {
    chrono::Utc::now()
        .format("%Y-%m-%dT%H:%M:%S%.3f%z")
        .to_string()
}

fn revision() -> String {
    uuid::Uuid::new_v4().to_string()
}

pub(crate) fn decode_zip(base64_zip: &str) -> Result<Vec<u8>, ApiError> {
    let zip = base64::engine::general_purpose::STANDARD
        .decode(base64_zip)
        .map_err(|e| ApiError::invalid(format!("ZipFile is not base64: {e}")))?;
    code::check_zip(&zip)?;
    Ok(zip)
}

pub(crate) fn code_sha256(zip: &[u8]) -> String {
    base64::engine::general_purpose::STANDARD.encode(Sha256::digest(zip))
}

pub(crate) fn code_key(account: &AccountId, sha: &str) -> String {
    format!("{account}/{}", hex::encode(sha.as_bytes()))
}

fn no_s3_code(s3: &Option<String>) -> Result<(), ApiError> {
    if s3.is_some() {
        return Err(ApiError::invalid(
            "S3 code locations are not supported by this worker; send ZipFile, or ImageUri for an image",
        ));
    }
    Ok(())
}

/// The code a function gets: a ZIP, or a container image read from its
/// URI (slow: done before the store's transaction).
enum NewCode {
    Zip(Vec<u8>),
    Image(crate::artifacts::container_image::ImportedImage),
}

impl NewCode {
    fn sha256(&self) -> String {
        match self {
            NewCode::Zip(zip) => code_sha256(zip),
            NewCode::Image(image) => image.digest.clone(),
        }
    }

    /// Lambda reports no size for an image.
    fn size(&self) -> u64 {
        match self {
            NewCode::Zip(zip) => zip.len() as u64,
            NewCode::Image(_) => 0,
        }
    }
}

pub const ZIP: &str = "Zip";
pub const IMAGE: &str = "Image";

/// What a package type's function cannot take: an image no Runtime,
/// Handler or Layers (the image has them), a ZIP no ImageConfig.
fn check_package_fields(
    package_type: &str,
    zip_fields: bool,
    image_config: bool,
) -> Result<(), ApiError> {
    match package_type {
        IMAGE if zip_fields => Err(ApiError::invalid(
            "an Image function takes no Runtime, Handler or Layers: the image has them",
        )),
        ZIP if image_config => Err(ApiError::invalid("ImageConfig is for PackageType Image")),
        _ => Ok(()),
    }
}

/// Provisioned concurrency applies to a published version or an alias.
fn provisioned_qualifier(reference: &FunctionRef) -> Result<&str, ApiError> {
    match reference.qualifier.as_deref() {
        None => Err(ApiError::invalid(
            "Qualifier is required: a version number or an alias",
        )),
        Some(LATEST) => Err(ApiError::invalid(
            "Provisioned Concurrency Configs cannot be applied to unpublished function versions.",
        )),
        Some(q) => Ok(q),
    }
}

fn get_record(t: &Txn, account: &AccountId, name: &str) -> Result<FunctionRecord, ApiError> {
    t.get(FUNCTIONS, &function_key(account, name))?
        .ok_or_else(|| ApiError::not_found(function_arn(account, name)))
}

/// Lambda's own limit on published versions is far above this worker's
/// needs; this one keeps the key space and listings bounded.
const MAX_VERSIONS: u64 = 100_000;

/// Where the container images' chunks are kept, under `data_dir`.
pub fn chunk_store_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images").join("chunks")
}

impl ControlPlane {
    pub fn new(
        store: Store,
        data_dir: &Path,
        keys: Arc<KeyService>,
        linux_runtimes: Vec<String>,
    ) -> Result<Self, OpenError> {
        Ok(ControlPlane {
            store,
            artifacts: ArtifactStore::open(&data_dir.join("artifacts"), keys.clone())?,
            chunks: ChunkStore::open(
                &chunk_store_dir(data_dir),
                &data_dir.join("images").join("convergence.key"),
            )?,
            keys,
            linux_runtimes,
            building: Mutex::default(),
        })
    }

    /// An image runs in the Linux guest.
    fn check_image_support(&self) -> Result<(), ApiError> {
        if self
            .linux_runtimes
            .iter()
            .any(|r| runtime::PROVIDED.contains(&r.as_str()))
        {
            Ok(())
        } else {
            Err(ApiError::invalid(
                "PackageType Image needs a Linux guest, and this worker has none configured \
                 (lambda-worker --linux-kernel)",
            ))
        }
    }

    /// The code a ZIP or an image URI gives, whichever the package type
    /// takes; `field` prefixes the request's field names in errors.
    fn new_code(
        &self,
        package_type: &str,
        zip: Option<&str>,
        image_uri: Option<&str>,
        field: &str,
    ) -> Result<NewCode, ApiError> {
        match (package_type == IMAGE, zip, image_uri) {
            (false, Some(zip), None) => Ok(NewCode::Zip(decode_zip(zip)?)),
            (true, None, Some(uri)) => Ok(NewCode::Image(self.import_image(uri)?)),
            (false, _, _) => Err(ApiError::invalid(format!(
                "a Zip function takes {field}ZipFile and no {field}ImageUri"
            ))),
            (true, _, _) => Err(ApiError::invalid(format!(
                "an Image function takes {field}ImageUri and no {field}ZipFile"
            ))),
        }
    }

    fn store_code(&self, t: &Txn, account: &AccountId, code: &NewCode) -> Result<(), ApiError> {
        match code {
            NewCode::Zip(zip) => self.put_code(t, &code_key(account, &code_sha256(zip)), zip),
            NewCode::Image(image) => self.put_image(t, account, image),
        }
    }

    fn check_runtime(&self, runtime: &str, handler: &str) -> Result<(), ApiError> {
        if runtime == runtime::WASI {
            if !handler.ends_with(".wasm") {
                return Err(ApiError::invalid(format!(
                    "Handler {handler:?}: the {} runtime runs the .wasm file the handler names",
                    runtime::WASI
                )));
            }
            return Ok(());
        }
        if self.linux_runtimes.iter().any(|r| r == runtime) {
            return Ok(());
        }
        if runtime::PROVIDED.contains(&runtime) {
            return Err(ApiError::invalid(format!(
                "runtime {runtime} needs a Linux guest, and this worker has none configured"
            )));
        }
        if runtime::MANAGED.contains(&runtime) {
            return Err(ApiError::invalid(format!(
                "runtime {runtime} needs a Linux guest and its runtime image, and this worker \
                 has no such image (lambda-worker --linux-runtime {runtime}=IMAGE)"
            )));
        }
        let mut runs = vec![runtime::WASI.to_string()];
        runs.extend(self.linux_runtimes.iter().cloned());
        Err(ApiError::invalid(format!(
            "unsupported runtime {runtime:?}: this worker runs {}",
            runs.join(", ")
        )))
    }

    pub fn create_function(
        &self,
        account: &AccountId,
        req: CreateFunctionRequest,
    ) -> Result<FunctionConfiguration, ApiError> {
        validate_name(&req.function_name)?;
        let package_type = req.package_type.clone().unwrap_or_else(|| ZIP.into());
        if package_type != ZIP && package_type != IMAGE {
            return Err(ApiError::invalid(format!(
                "PackageType {package_type:?}: Zip or Image"
            )));
        }
        if let Some(archs) = &req.architectures {
            if archs.iter().any(|a| a != "x86_64") {
                return Err(ApiError::invalid(format!(
                    "Architectures {archs:?}: this worker runs x86_64"
                )));
            }
        }
        check_package_fields(
            &package_type,
            req.runtime.is_some() || req.handler.is_some() || !req.layers.is_empty(),
            req.image_config.is_some(),
        )?;
        let (runtime, handler) = if package_type == IMAGE {
            self.check_image_support()?;
            (String::new(), String::new())
        } else {
            let runtime = req
                .runtime
                .ok_or_else(|| ApiError::invalid("Runtime is required for a Zip function"))?;
            let handler = req
                .handler
                .ok_or_else(|| ApiError::invalid("Handler is required for a Zip function"))?;
            self.check_runtime(&runtime, &handler)?;
            (runtime, handler)
        };
        let image_config = req.image_config.map(ImageConfig::validated).transpose()?;
        validate_role(&req.role, account)?;
        validate_tags(&req.tags)?;
        let memory_size = req.memory_size.unwrap_or(128);
        validate_memory(memory_size)?;
        let timeout = req.timeout.unwrap_or(3);
        validate_timeout(timeout)?;
        if let Some(env) = &req.environment {
            validate_environment(env)?;
        }
        no_s3_code(&req.code.s3_bucket)?;
        let snap_start = req.snap_start.map_or(
            Ok(SnapStart {
                apply_on: snap_start::NONE.into(),
            }),
            SnapStart::validated,
        )?;
        let code = self.new_code(
            &package_type,
            req.code.zip_file.as_deref(),
            req.code.image_uri.as_deref(),
            "Code.",
        )?;
        let sha = code.sha256();
        let mut config = FunctionConfiguration {
            function_name: req.function_name.clone(),
            function_arn: function_arn(account, &req.function_name),
            runtime,
            role: req.role,
            handler,
            code_size: code.size(),
            description: req.description.unwrap_or_default(),
            timeout,
            memory_size,
            last_modified: now_string(),
            code_sha256: sha.clone(),
            version: LATEST.into(),
            environment: req.environment,
            revision_id: revision(),
            state: "Active".into(),
            last_update_status: "Successful".into(),
            package_type,
            architectures: vec!["x86_64".into()],
            layers: Vec::new(),
            snap_start: SnapStartResponse {
                apply_on: snap_start.apply_on,
                optimization_status: snap_start::OFF.into(),
            },
            state_reason: None,
            state_reason_code: None,
            image_config_response: image_config
                .map(|image_config| ImageConfigResponse { image_config }),
        };
        self.store
            .write(|t| {
                let key = function_key(account, &req.function_name);
                if t.get::<FunctionRecord>(FUNCTIONS, &key)?.is_some() {
                    return Err(ApiError::ResourceConflict(format!(
                        "Function already exist: {}",
                        req.function_name
                    )));
                }
                config.layers = self.resolve_layers(t, account, &req.layers)?;
                self.store_code(t, account, &code)?;
                let mut record = FunctionRecord {
                    latest: config.clone(),
                    last_version: 0,
                    reserved_concurrency: None,
                    tags: req.tags.clone(),
                    event_invoke_configs: BTreeMap::new(),
                    policy: Vec::new(),
                };
                let out = if req.publish {
                    publish(t, &mut record, account, None)?
                } else {
                    config.clone()
                };
                t.put(FUNCTIONS, &key, &record)?;
                Ok(out)
            })
            .inspect(|config| self.optimize(account, config))
    }

    /// The configuration a function reference names: `$LATEST`, a version
    /// or an alias's version.
    pub fn configuration(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<(FunctionConfiguration, Option<u32>), ApiError> {
        let snap = self.store.read()?;
        let record: FunctionRecord = snap
            .get(FUNCTIONS, &function_key(account, &reference.name))?
            .ok_or_else(|| ApiError::not_found(function_arn(account, &reference.name)))?;
        let version = match reference.qualifier.as_deref() {
            None | Some(LATEST) => return Ok((record.latest, record.reserved_concurrency)),
            Some(q) if is_version_number(q) => q.to_string(),
            Some(alias) => {
                let a: AliasConfiguration = snap
                    .get(
                        ALIASES,
                        &format!("{}/{alias}", function_key(account, &reference.name)),
                    )?
                    .ok_or_else(|| {
                        ApiError::ResourceNotFound(format!(
                            "Function not found: {}:{alias}",
                            function_arn(account, &reference.name)
                        ))
                    })?;
                if a.function_version == LATEST {
                    return Ok((record.latest, record.reserved_concurrency));
                }
                a.function_version
            }
        };
        let n: u64 = version
            .parse()
            .map_err(|_| ApiError::invalid(format!("invalid version {version:?}")))?;
        let config = snap
            .get(
                VERSIONS,
                &numbered(&function_key(account, &reference.name), n),
            )?
            .ok_or_else(|| {
                ApiError::ResourceNotFound(format!(
                    "Function not found: {}:{version}",
                    function_arn(account, &reference.name)
                ))
            })?;
        Ok((config, record.reserved_concurrency))
    }

    /// What an invocation of `reference` runs: the version it names, or
    /// for a weighted alias one of its two versions, drawn by weight.
    pub fn resolve(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<Resolved, ApiError> {
        let targets = self.resolve_weighted(account, reference)?;
        let mut draw = unit_draw();
        let count = targets.len();
        for (i, (resolved, share)) in targets.into_iter().enumerate() {
            if draw < share || i + 1 == count {
                return Ok(resolved);
            }
            draw -= share;
        }
        Err(ApiError::Service(format!(
            "{} resolves to no version",
            reference.name
        )))
    }

    /// The versions invocations of `reference` run, each with its share:
    /// one version at 1.0, or a weighted alias's version and its
    /// additional one.
    pub fn resolve_weighted(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<Vec<(Resolved, f64)>, ApiError> {
        let primary = self.resolve_version(account, reference)?;
        let routing = match reference.qualifier.as_deref() {
            Some(alias) if alias != LATEST && !is_version_number(alias) => {
                self.get_alias(account, reference, alias)?.routing_config
            }
            _ => None,
        };
        let Some((version, weight)) =
            routing.and_then(|r| r.additional_version_weights.into_iter().next())
        else {
            return Ok(vec![(primary, 1.0)]);
        };
        let additional = self.resolve_version(
            account,
            &FunctionRef {
                name: reference.name.clone(),
                qualifier: Some(version),
            },
        )?;
        Ok(vec![(primary, 1.0 - weight), (additional, weight)])
    }

    /// The version `reference` names itself (an alias's primary one).
    fn resolve_version(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<Resolved, ApiError> {
        let (config, reserved_concurrency) = self.configuration(account, reference)?;
        if reserved_concurrency == Some(0) {
            return Err(ApiError::TooManyRequests {
                message: "Rate Exceeded.".into(),
                reason: "ReservedFunctionConcurrentInvocationLimitExceeded",
            });
        }
        Ok(Resolved {
            key: VersionKey {
                account: account.clone(),
                function: config.function_name.clone(),
                version: config.version.clone(),
                revision: config.revision_id.clone(),
            },
            config,
            reserved_concurrency,
        })
    }

    pub fn list_functions(
        &self,
        account: &AccountId,
    ) -> Result<Vec<FunctionConfiguration>, ApiError> {
        let records: Vec<(String, FunctionRecord)> =
            self.store.read()?.scan(FUNCTIONS, &account.0)?;
        Ok(records.into_iter().map(|(_, r)| r.latest).collect())
    }

    pub fn delete_function(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<(), ApiError> {
        if let Some(q) = &reference.qualifier {
            return Err(ApiError::invalid(format!(
                "deleting a single version ({q}) is not supported; delete the function"
            )));
        }
        self.store.write(|t| {
            let key = function_key(account, &reference.name);
            get_record(t, account, &reference.name)?;
            t.remove(FUNCTIONS, &key)?;
            t.remove_prefix(VERSIONS, &key)?;
            t.remove_prefix(ALIASES, &key)?;
            t.remove_prefix(PROVISIONED, &key)?;
            Ok(())
        })
    }

    pub fn update_code(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        req: UpdateFunctionCodeRequest,
    ) -> Result<FunctionConfiguration, ApiError> {
        no_s3_code(&req.s3_bucket)?;
        let (current, _) = self.configuration(account, reference)?;
        let code = self.new_code(
            &current.package_type,
            req.zip_file.as_deref(),
            req.image_uri.as_deref(),
            "",
        )?;
        let sha = code.sha256();
        self.update_latest(
            account,
            reference,
            req.revision_id.as_deref(),
            req.publish,
            |t, latest| {
                if latest.package_type != current.package_type {
                    return Err(ApiError::ResourceConflict(
                        "the function's package type changed during the update".into(),
                    ));
                }
                self.store_code(t, account, &code)?;
                latest.code_sha256 = sha.clone();
                latest.code_size = code.size();
                Ok(())
            },
        )
        .inspect(|config| self.optimize(account, config))
    }

    pub fn update_configuration(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        req: UpdateFunctionConfigurationRequest,
    ) -> Result<FunctionConfiguration, ApiError> {
        if let Some(m) = req.memory_size {
            validate_memory(m)?;
        }
        if let Some(s) = req.timeout {
            validate_timeout(s)?;
        }
        if let Some(role) = &req.role {
            validate_role(role, account)?;
        }
        if let Some(env) = &req.environment {
            validate_environment(env)?;
        }
        let snap_start = req
            .snap_start
            .clone()
            .map(SnapStart::validated)
            .transpose()?;
        let image_config = req
            .image_config
            .clone()
            .map(ImageConfig::validated)
            .transpose()?;
        self.update_latest(
            account,
            reference,
            req.revision_id.as_deref(),
            false,
            |t, latest| {
                check_package_fields(
                    &latest.package_type,
                    req.runtime.is_some() || req.handler.is_some() || req.layers.is_some(),
                    image_config.is_some(),
                )?;
                if let Some(image_config) = &image_config {
                    latest.image_config_response = Some(ImageConfigResponse {
                        image_config: image_config.clone(),
                    });
                }
                if latest.package_type != IMAGE {
                    if let Some(arns) = &req.layers {
                        latest.layers = self.resolve_layers(t, account, arns)?;
                    }
                    let runtime = req
                        .runtime
                        .clone()
                        .unwrap_or_else(|| latest.runtime.clone());
                    let handler = req
                        .handler
                        .clone()
                        .unwrap_or_else(|| latest.handler.clone());
                    self.check_runtime(&runtime, &handler)?;
                    latest.runtime = runtime;
                    latest.handler = handler;
                }
                if let Some(role) = &req.role {
                    latest.role = role.clone();
                }
                if let Some(d) = &req.description {
                    latest.description = d.clone();
                }
                latest.memory_size = req.memory_size.unwrap_or(latest.memory_size);
                latest.timeout = req.timeout.unwrap_or(latest.timeout);
                if let Some(env) = &req.environment {
                    latest.environment = Some(env.clone());
                }
                if let Some(s) = &snap_start {
                    latest.snap_start.apply_on = s.apply_on.clone();
                }
                Ok(())
            },
        )
    }

    fn update_latest(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        expected_revision: Option<&str>,
        publish_after: bool,
        mut change: impl FnMut(&Txn, &mut FunctionConfiguration) -> Result<(), ApiError>,
    ) -> Result<FunctionConfiguration, ApiError> {
        if reference.qualifier.as_deref().is_some_and(|q| q != LATEST) {
            return Err(ApiError::invalid("only $LATEST can be updated"));
        }
        self.store.write(|t| {
            let mut record = get_record(t, account, &reference.name)?;
            check_revision(expected_revision, &record.latest.revision_id)?;
            change(t, &mut record.latest)?;
            record.latest.revision_id = revision();
            record.latest.last_modified = now_string();
            let out = if publish_after {
                publish(t, &mut record, account, None)?
            } else {
                record.latest.clone()
            };
            t.put(FUNCTIONS, &function_key(account, &reference.name), &record)?;
            Ok(out)
        })
    }

    pub fn publish_version(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        req: PublishVersionRequest,
    ) -> Result<FunctionConfiguration, ApiError> {
        self.store.write(|t| {
            let mut record = get_record(t, account, &reference.name)?;
            check_revision(req.revision_id.as_deref(), &record.latest.revision_id)?;
            if let Some(sha) = &req.code_sha256 {
                if sha != &record.latest.code_sha256 {
                    return Err(ApiError::invalid(format!(
                        "CodeSha256 {sha} does not match the function's code {}",
                        record.latest.code_sha256
                    )));
                }
            }
            let out = publish(t, &mut record, account, req.description.clone())?;
            t.put(FUNCTIONS, &function_key(account, &reference.name), &record)?;
            Ok(out)
        })
    }

    /// The published versions waiting for their SnapStart snapshot, in
    /// every account: (account, function, version).
    pub fn pending_snap_starts(&self) -> Result<Vec<(AccountId, String, String)>, ApiError> {
        Ok(self
            .store
            .read()?
            .all::<FunctionConfiguration>(VERSIONS)?
            .into_iter()
            .filter(|(_, c)| c.snap_start_on() && c.state == "Pending")
            .filter_map(|(key, c)| {
                let account = key.split('/').next()?.to_string();
                Some((AccountId(account), c.function_name, c.version))
            })
            .collect())
    }

    /// Ends a version's SnapStart optimization: Active with its snapshot
    /// taken, or Failed with the reason its init failed.
    pub fn finish_snap_start(
        &self,
        account: &AccountId,
        name: &str,
        version: &str,
        result: Result<(), String>,
    ) -> Result<(), ApiError> {
        let n: u64 = version.parse().map_err(|_| {
            ApiError::Service(format!("SnapStart of {name}:{version}: not a version"))
        })?;
        let key = numbered(&function_key(account, name), n);
        self.store.write(|t| {
            // A version deleted with its function meanwhile has nothing to end.
            let Some(mut config) = t.get::<FunctionConfiguration>(VERSIONS, &key)? else {
                return Ok(());
            };
            match &result {
                Ok(()) => {
                    config.state = "Active".into();
                    config.state_reason = None;
                    config.state_reason_code = None;
                }
                Err(reason) => {
                    config.state = "Failed".into();
                    config.state_reason = Some(reason.clone());
                    config.state_reason_code = Some("FunctionError".into());
                }
            }
            t.put(VERSIONS, &key, &config)?;
            Ok(())
        })
    }

    pub fn list_versions(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<Vec<FunctionConfiguration>, ApiError> {
        let snap = self.store.read()?;
        let key = function_key(account, &reference.name);
        let record: FunctionRecord = snap
            .get(FUNCTIONS, &key)?
            .ok_or_else(|| ApiError::not_found(function_arn(account, &reference.name)))?;
        let mut out = vec![record.latest];
        out.extend(
            snap.scan::<FunctionConfiguration>(VERSIONS, &key)?
                .into_iter()
                .map(|(_, c)| c),
        );
        Ok(out)
    }

    fn check_alias_target(
        &self,
        t: &Txn,
        account: &AccountId,
        name: &str,
        version: &str,
    ) -> Result<(), ApiError> {
        if version == LATEST {
            return Ok(());
        }
        let n: u64 = version.parse().map_err(|_| {
            ApiError::invalid(format!("FunctionVersion {version:?} is not a version"))
        })?;
        if t.get::<FunctionConfiguration>(VERSIONS, &numbered(&function_key(account, name), n))?
            .is_none()
        {
            return Err(ApiError::ResourceNotFound(format!(
                "Function not found: {}:{version}",
                function_arn(account, name)
            )));
        }
        Ok(())
    }

    /// An alias's routing config, checked as Lambda checks it: at most
    /// one additional version, published, other than the alias's own
    /// (which must be published too), with a weight from 0 to 1. An
    /// empty one is none.
    fn check_routing(
        &self,
        t: &Txn,
        account: &AccountId,
        name: &str,
        version: &str,
        routing: Option<AliasRoutingConfig>,
    ) -> Result<Option<AliasRoutingConfig>, ApiError> {
        let Some(routing) = routing.filter(|r| !r.additional_version_weights.is_empty()) else {
            return Ok(None);
        };
        let weights = &routing.additional_version_weights;
        if weights.len() > 1 {
            return Err(ApiError::invalid(
                "RoutingConfig: an alias routes to at most one additional version",
            ));
        }
        if version == LATEST {
            return Err(ApiError::invalid(
                "RoutingConfig: an alias of $LATEST cannot route to other versions",
            ));
        }
        for (other, weight) in weights {
            if other == version || !is_version_number(other) {
                return Err(ApiError::invalid(format!(
                    "RoutingConfig: {other:?} must be a published version other than {version}"
                )));
            }
            if !(0.0..=1.0).contains(weight) {
                return Err(ApiError::invalid(format!(
                    "RoutingConfig: the weight of version {other}, {weight}, is not from 0.0 to 1.0"
                )));
            }
            self.check_alias_target(t, account, name, other)?;
        }
        Ok(Some(routing))
    }

    pub fn create_alias(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        req: CreateAliasRequest,
    ) -> Result<AliasConfiguration, ApiError> {
        validate_alias_name(&req.name)?;
        self.store.write(|t| {
            get_record(t, account, &reference.name)?;
            self.check_alias_target(t, account, &reference.name, &req.function_version)?;
            let key = format!("{}/{}", function_key(account, &reference.name), req.name);
            if t.get::<AliasConfiguration>(ALIASES, &key)?.is_some() {
                return Err(ApiError::ResourceConflict(format!(
                    "Alias already exists: {}",
                    req.name
                )));
            }
            let routing_config = self.check_routing(
                t,
                account,
                &reference.name,
                &req.function_version,
                req.routing_config.clone(),
            )?;
            let alias = AliasConfiguration {
                alias_arn: format!("{}:{}", function_arn(account, &reference.name), req.name),
                name: req.name.clone(),
                function_version: req.function_version.clone(),
                description: req.description.clone().unwrap_or_default(),
                revision_id: revision(),
                routing_config,
            };
            t.put(ALIASES, &key, &alias)?;
            Ok(alias)
        })
    }

    pub fn get_alias(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        alias: &str,
    ) -> Result<AliasConfiguration, ApiError> {
        self.store
            .read()?
            .get(
                ALIASES,
                &format!("{}/{alias}", function_key(account, &reference.name)),
            )?
            .ok_or_else(|| {
                ApiError::ResourceNotFound(format!(
                    "Alias not found: {}:{alias}",
                    function_arn(account, &reference.name)
                ))
            })
    }

    pub fn update_alias(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        alias: &str,
        req: UpdateAliasRequest,
    ) -> Result<AliasConfiguration, ApiError> {
        self.store.write(|t| {
            let key = format!("{}/{alias}", function_key(account, &reference.name));
            let mut a: AliasConfiguration = t.get(ALIASES, &key)?.ok_or_else(|| {
                ApiError::ResourceNotFound(format!(
                    "Alias not found: {}:{alias}",
                    function_arn(account, &reference.name)
                ))
            })?;
            check_revision(req.revision_id.as_deref(), &a.revision_id)?;
            if let Some(v) = &req.function_version {
                self.check_alias_target(t, account, &reference.name, v)?;
                a.function_version = v.clone();
            }
            if let Some(d) = &req.description {
                a.description = d.clone();
            }
            let routing = req.routing_config.clone().or(a.routing_config.take());
            a.routing_config =
                self.check_routing(t, account, &reference.name, &a.function_version, routing)?;
            a.revision_id = revision();
            t.put(ALIASES, &key, &a)?;
            Ok(a)
        })
    }

    /// A function's aliases, by name; with `version`, only those that
    /// point at it.
    pub fn list_aliases(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        version: Option<&str>,
    ) -> Result<Vec<AliasConfiguration>, ApiError> {
        let snap = self.store.read()?;
        let key = function_key(account, &reference.name);
        if snap.get::<FunctionRecord>(FUNCTIONS, &key)?.is_none() {
            return Err(ApiError::not_found(function_arn(account, &reference.name)));
        }
        Ok(snap
            .scan::<AliasConfiguration>(ALIASES, &key)?
            .into_iter()
            .map(|(_, a)| a)
            .filter(|a| version.is_none_or(|v| a.function_version == v))
            .collect())
    }

    /// Deletes an alias, and the provisioned concurrency config on it,
    /// which is returned. Deleting an alias that is not there succeeds,
    /// as on Lambda.
    pub fn delete_alias(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        alias: &str,
    ) -> Result<Option<ProvisionedConfig>, ApiError> {
        validate_alias_name(alias)?;
        let key = format!("{}/{alias}", function_key(account, &reference.name));
        self.store.write(|t| {
            get_record(t, account, &reference.name)?;
            t.remove(ALIASES, &key)?;
            let provisioned = t.get::<ProvisionedConfig>(PROVISIONED, &key)?;
            t.remove(PROVISIONED, &key)?;
            Ok(provisioned)
        })
    }

    /// A function's reserved concurrency, if it has one.
    pub fn reserved_concurrency(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<Option<u32>, ApiError> {
        Ok(self
            .read_record(account, &reference.name)?
            .reserved_concurrency)
    }

    /// A function's record, read outside a write.
    pub(crate) fn read_record(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<FunctionRecord, ApiError> {
        self.store
            .read()?
            .get(FUNCTIONS, &function_key(account, name))?
            .ok_or_else(|| ApiError::not_found(function_arn(account, name)))
    }

    pub fn put_reserved_concurrency(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        reserved: Option<u32>,
    ) -> Result<(), ApiError> {
        self.update_record(account, &reference.name, |record| {
            record.reserved_concurrency = reserved;
            Ok(())
        })
    }

    /// Changes a function's record in one write; `change` may refuse, and
    /// then nothing is written.
    pub(crate) fn update_record<T>(
        &self,
        account: &AccountId,
        name: &str,
        mut change: impl FnMut(&mut FunctionRecord) -> Result<T, ApiError>,
    ) -> Result<T, ApiError> {
        self.store.write(|t| {
            let mut record = get_record(t, account, name)?;
            let out = change(&mut record)?;
            t.put(FUNCTIONS, &function_key(account, name), &record)?;
            Ok(out)
        })
    }

    /// Sets how many environments of a published version (or an alias's
    /// version) are kept initialized.
    pub fn put_provisioned(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        requested: u32,
    ) -> Result<ProvisionedConfig, ApiError> {
        let qualifier = provisioned_qualifier(reference)?;
        if requested == 0 {
            return Err(ApiError::invalid(
                "ProvisionedConcurrentExecutions must be at least 1",
            ));
        }
        let (config, _) = self.configuration(account, reference)?;
        if config.snap_start_on() {
            // As on Lambda: a SnapStart version's cold starts restore; it
            // keeps no environments initialized ahead.
            return Err(ApiError::invalid(format!(
                "{}: provisioned concurrency is not supported on a version with SnapStart",
                config.function_arn
            )));
        }
        let key = function_key(account, &reference.name);
        self.store.write(|t| {
            let record = get_record(t, account, &reference.name)?;
            let others: u32 = t
                .scan::<ProvisionedConfig>(PROVISIONED, &key)?
                .into_iter()
                .filter(|(_, c)| c.qualifier != qualifier)
                .map(|(_, c)| c.requested)
                .sum();
            if let Some(reserved) = record.reserved_concurrency {
                if others + requested > reserved {
                    return Err(ApiError::invalid(format!(
                        "ProvisionedConcurrentExecutions {requested} plus the {others} provisioned \
                         for other qualifiers exceeds the function's reserved concurrency {reserved}"
                    )));
                }
            }
            let config = ProvisionedConfig {
                account: account.0.clone(),
                function_name: reference.name.clone(),
                qualifier: qualifier.to_string(),
                requested,
                last_modified: now_string(),
            };
            t.put(PROVISIONED, &format!("{key}/{qualifier}"), &config)?;
            Ok(config)
        })
    }

    pub fn get_provisioned(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<ProvisionedConfig, ApiError> {
        let qualifier = provisioned_qualifier(reference)?;
        self.configuration(account, reference)?;
        let key = format!("{}/{qualifier}", function_key(account, &reference.name));
        self.store.read()?.get(PROVISIONED, &key)?.ok_or_else(|| {
            ApiError::ProvisionedConcurrencyConfigNotFound(
                "No Provisioned Concurrency Config found for this function".into(),
            )
        })
    }

    pub fn delete_provisioned(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<(), ApiError> {
        let qualifier = provisioned_qualifier(reference)?;
        let key = format!("{}/{qualifier}", function_key(account, &reference.name));
        self.store.write(|t| Ok(t.remove(PROVISIONED, &key)?))
    }

    /// A function's provisioned concurrency configs.
    pub fn list_provisioned(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<Vec<ProvisionedConfig>, ApiError> {
        let function = FunctionRef {
            name: name.to_string(),
            qualifier: None,
        };
        self.configuration(account, &function)?;
        let configs = self
            .store
            .read()?
            .scan(PROVISIONED, &function_key(account, name))?;
        Ok(configs.into_iter().map(|(_, c)| c).collect())
    }

    /// Every account's provisioned concurrency configs.
    pub fn all_provisioned(&self) -> Result<Vec<ProvisionedConfig>, ApiError> {
        let configs = self.store.read()?.all(PROVISIONED)?;
        Ok(configs.into_iter().map(|(_, c)| c).collect())
    }

    /// The disks a version's environments read its code from, sealed and
    /// granted: for `wasi-preview1` one image of the handler's module (from
    /// the code or a layer) and its fuel; for Linux runtimes the code as
    /// EROFS for /var/task and, with layers, their merge for /opt. Each is
    /// built once and kept.
    pub fn code_disks(
        &self,
        account: &AccountId,
        config: &FunctionConfiguration,
    ) -> Result<CodeDisks, ApiError> {
        if config.package_type == IMAGE {
            return Ok(CodeDisks {
                code: CodeDrive::Image {
                    store: self.chunks.dir().to_path_buf(),
                    launch: self.image_launch(account, config)?,
                },
                layers: None,
            });
        }
        let layer_shas = self.layer_shas(account, &config.layers)?;
        // Stored code is decrypted only to build a disk that is not built
        // yet, not at every cold start.
        let stored_zip = |sha: &str| self.stored_code(account, sha);
        let layer_zips = || -> Result<Vec<Vec<u8>>, ApiError> {
            layer_shas.iter().map(|sha| stored_zip(sha)).collect()
        };
        let erofs_error =
            |e: erofs_image::ErofsError| ApiError::Service(format!("a code disk: {e}"));
        if !runtime::on_linux(&config.runtime) {
            let identity = format!(
                "{}\0{}\0{}\0{}",
                config.code_sha256,
                config.handler,
                config.timeout,
                layer_shas.join(",")
            );
            let code = self.sealed_disk(&identity, || {
                let module = code::extract_with_layers(
                    &stored_zip(&config.code_sha256)?,
                    &layer_zips()?,
                    &config.handler,
                )?;
                // A budget no function needs within its timeout; the
                // deadline is what stops it first.
                let fuel = u64::from(config.timeout) * 2_000_000_000;
                wasm_image::build(&module, fuel)
                    .map_err(|e| ApiError::invalid(format!("handler {:?}: {e}", config.handler)))
            })?;
            return Ok(CodeDisks {
                code: CodeDrive::Sealed(code),
                layers: None,
            });
        }
        // A Linux code disk is the ZIP's files whatever the handler.
        let code = self.sealed_disk(&format!("erofs\0{}", config.code_sha256), || {
            let zip = stored_zip(&config.code_sha256)?;
            if runtime::PROVIDED.contains(&config.runtime.as_str()) {
                code::check_bootstrap(&zip, &layer_zips()?)?;
            }
            erofs_image::build(&zip).map_err(erofs_error)
        })?;
        let layers = if layer_shas.is_empty() {
            None
        } else {
            Some(
                self.sealed_disk(&format!("erofs-layers\0{}", layer_shas.join(",")), || {
                    erofs_image::build_layers(&layer_zips()?).map_err(erofs_error)
                })?,
            )
        };
        Ok(CodeDisks {
            code: CodeDrive::Sealed(code),
            layers,
        })
    }

    /// The artifact `identity` names, built by `build` if there is none
    /// yet, and a grant to read it.
    fn sealed_disk(
        &self,
        identity: &str,
        build: impl FnOnce() -> Result<Vec<u8>, ApiError>,
    ) -> Result<GrantedArtifact, ApiError> {
        let id = hex::encode(Sha256::digest(identity.as_bytes()));
        let name = &id[..32];
        let artifact_error = |e: ArtifactError| ApiError::Service(e.to_string());
        let lock = self
            .building
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(name.to_string())
            .or_default()
            .clone();
        let _building = lock.lock().unwrap_or_else(|e| e.into_inner());
        let artifact = match self.artifacts.get(name).map_err(artifact_error)? {
            Some(artifact) => artifact,
            None => self
                .artifacts
                .put(name, &build()?)
                .map_err(artifact_error)?,
        };
        self.artifacts.grant(artifact).map_err(artifact_error)
    }

    /// Stores uploaded code sealed, bound to its key.
    pub(crate) fn put_code(&self, t: &Txn, key: &str, zip: &[u8]) -> Result<(), ApiError> {
        Ok(t.put_bytes(CODE, key, &self.keys.seal_blob(key, zip))?)
    }

    /// The code (or image record) `account` stored under `sha`, opened.
    pub(crate) fn stored_code(&self, account: &AccountId, sha: &str) -> Result<Vec<u8>, ApiError> {
        let key = code_key(account, sha);
        let sealed = self
            .store
            .code(&key)?
            .ok_or_else(|| ApiError::Service(format!("code {sha} is missing")))?;
        self.open_code(&key, &sealed)
    }

    /// Code [`Self::put_code`] stored; an altered record is an error.
    pub(crate) fn open_code(&self, key: &str, sealed: &[u8]) -> Result<Vec<u8>, ApiError> {
        self.keys.open_blob(key, sealed).map_err(|e| {
            tracing::error!("stored code: {e}");
            ApiError::Service(e.to_string())
        })
    }

    pub fn artifacts(&self) -> &ArtifactStore {
        &self.artifacts
    }

    /// Optimizes new code into its artifact right away, so that the first
    /// invocation does not pay for it. A handler that cannot run is not an
    /// error here: as on Lambda, the invocation reports it.
    fn optimize(&self, account: &AccountId, config: &FunctionConfiguration) {
        if let Err(e) = self.code_disks(account, config) {
            tracing::debug!("{}: code not optimized ahead: {e}", config.function_arn);
        }
    }
}

fn is_version_number(qualifier: &str) -> bool {
    qualifier.chars().all(|c| c.is_ascii_digit())
}

/// A uniform draw from [0, 1).
fn unit_draw() -> f64 {
    // 53 random bits, as many as an f64's mantissa holds. Without the
    // OS generator every draw is 0: the primary version runs.
    (getrandom::u64().unwrap_or(0) >> 11) as f64 / (1u64 << 53) as f64
}

/// How `requested` environments split across versions by their shares:
/// each additional version its rounded share, the first one the rest.
pub fn split_by_share(requested: u32, shares: &[f64]) -> Vec<u32> {
    let mut split: Vec<u32> = shares
        .iter()
        .map(|share| (f64::from(requested) * share).round() as u32)
        .collect();
    if let Some((first, rest)) = split.split_first_mut() {
        *first = requested.saturating_sub(rest.iter().sum());
    }
    split
}

fn check_revision(expected: Option<&str>, actual: &str) -> Result<(), ApiError> {
    match expected {
        Some(e) if e != actual => Err(ApiError::invalid(format!(
            "RevisionId {e} does not match the current revision {actual}"
        ))),
        _ => Ok(()),
    }
}

/// Publishes `$LATEST` as a new version, unless the newest version already
/// has the same code and configuration (then that one is returned, as
/// Lambda does).
fn publish(
    t: &Txn,
    record: &mut FunctionRecord,
    account: &AccountId,
    description: Option<String>,
) -> Result<FunctionConfiguration, ApiError> {
    let name = record.latest.function_name.clone();
    let key = function_key(account, &name);
    if record.last_version > 0 {
        let last: Option<FunctionConfiguration> =
            t.get(VERSIONS, &numbered(&key, record.last_version))?;
        if let Some(last) = last {
            if same_function(&last, &record.latest) {
                return Ok(last);
            }
        }
    }
    if record.last_version >= MAX_VERSIONS {
        return Err(ApiError::invalid(format!(
            "{name} has {MAX_VERSIONS} versions, the limit"
        )));
    }
    record.last_version += 1;
    let n = record.last_version;
    let mut version = record.latest.clone();
    version.version = n.to_string();
    version.function_arn = format!("{}:{n}", function_arn(account, &name));
    version.revision_id = revision();
    if let Some(d) = description {
        version.description = d;
    }
    if version.snap_start.apply_on == snap_start::PUBLISHED_VERSIONS {
        // Lambda runs the new version's init and snapshots it before the
        // version can be invoked; the worker's SnapStart task does that
        // and makes it Active.
        version.snap_start.optimization_status = snap_start::ON.into();
        version.state = "Pending".into();
        version.state_reason = Some(
            "Lambda is creating a snapshot of the version's initialized execution environment."
                .into(),
        );
        version.state_reason_code = Some("Creating".into());
    }
    t.put(VERSIONS, &numbered(&key, n), &version)?;
    Ok(version)
}

fn same_function(a: &FunctionConfiguration, b: &FunctionConfiguration) -> bool {
    a.code_sha256 == b.code_sha256
        && a.runtime == b.runtime
        && a.handler == b.handler
        && a.memory_size == b.memory_size
        && a.timeout == b.timeout
        && a.role == b.role
        && a.environment == b.environment
        && a.layers == b.layers
        && a.snap_start.apply_on == b.snap_start.apply_on
        && a.image_config_response == b.image_config_response
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn provisioned_environments_split_by_weight_and_add_up() {
        assert_eq!(split_by_share(2, &[1.0]), vec![2]);
        assert_eq!(split_by_share(2, &[0.5, 0.5]), vec![1, 1]);
        assert_eq!(split_by_share(10, &[0.9, 0.1]), vec![9, 1]);
        assert_eq!(split_by_share(3, &[0.75, 0.25]), vec![2, 1]);
        assert_eq!(split_by_share(1, &[1.0, 0.0]), vec![1, 0]);
        for requested in 0..20 {
            for tenth in 0..=10 {
                let w = f64::from(tenth) / 10.0;
                let split = split_by_share(requested, &[1.0 - w, w]);
                assert_eq!(split.iter().sum::<u32>(), requested, "{requested} at {w}");
            }
        }
    }

    #[test]
    fn draws_are_in_the_unit_interval() {
        for _ in 0..1000 {
            let d = unit_draw();
            assert!((0.0..1.0).contains(&d), "{d}");
        }
    }
}
