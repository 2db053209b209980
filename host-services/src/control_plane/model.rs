//! Lambda's JSON shapes (PascalCase, as the REST API and the SDKs use
//! them) and the checks AWS applies to their values.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::ApiError;
use crate::ids::AccountId;

pub const REGION: &str = "local";
pub const LATEST: &str = "$LATEST";
pub const MIN_MEMORY_MIB: u32 = 128;
pub const MAX_MEMORY_MIB: u32 = 10_240;
pub const MAX_TIMEOUT_SECS: u32 = 900;
/// Lambda's limit on the total size of a function's environment variables.
pub const MAX_ENVIRONMENT_BYTES: usize = 4 * 1024;

/// The runtimes this worker can start.
pub mod runtime {
    /// A WebAssembly module (WASI preview1 command) named by the handler,
    /// run by the bare-metal guest.
    pub const WASI: &str = "wasi-preview1";
    /// Custom runtimes on Linux: `bootstrap` in the code or a layer.
    pub const PROVIDED: [&str; 2] = ["provided.al2023", "provided.al2"];
    /// Managed runtimes on Linux: the handler runs in a language runtime
    /// whose root file system image the worker is given.
    pub const MANAGED: [&str; 1] = ["python3.11"];

    /// Whether `runtime` runs in a Linux guest.
    pub fn on_linux(runtime: &str) -> bool {
        PROVIDED.contains(&runtime) || MANAGED.contains(&runtime)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct Environment {
    #[serde(default)]
    pub variables: BTreeMap<String, String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct LayerRef {
    pub arn: String,
    pub code_size: u64,
}

/// A function version's configuration, as GetFunctionConfiguration
/// returns it and as the store keeps it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionConfiguration {
    pub function_name: String,
    pub function_arn: String,
    /// Empty for a container image, which has none.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub runtime: String,
    pub role: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub handler: String,
    pub code_size: u64,
    pub description: String,
    pub timeout: u32,
    pub memory_size: u32,
    pub last_modified: String,
    pub code_sha256: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
    pub revision_id: String,
    pub state: String,
    pub last_update_status: String,
    pub package_type: String,
    pub architectures: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub layers: Vec<LayerRef>,
    #[serde(default)]
    pub snap_start: SnapStartResponse,
    /// A container image's overrides of its ENTRYPOINT, CMD and WORKDIR.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image_config_response: Option<ImageConfigResponse>,
    /// Why the version is `Pending` or `Failed`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state_reason_code: Option<String>,
}

impl FunctionConfiguration {
    /// Whether this version restores from its SnapStart snapshot.
    pub fn snap_start_on(&self) -> bool {
        self.snap_start.optimization_status == snap_start::ON
    }

    /// A version can be invoked once Active: a SnapStart version is
    /// Pending until its snapshot is taken, Failed if its init failed.
    pub fn check_invocable(&self) -> Result<(), ApiError> {
        match self.state.as_str() {
            "Pending" => Err(ApiError::SnapStartNotReady(format!(
                "Lambda is initializing {} for SnapStart. It can be invoked once its state is Active.",
                self.function_arn
            ))),
            "Failed" => Err(ApiError::ResourceConflict(format!(
                "The operation cannot be performed at this time. The function is currently in \
                 the following state: Failed ({})",
                self.state_reason.as_deref().unwrap_or("no reason recorded")
            ))),
            _ => Ok(()),
        }
    }
}

/// A container image function's `ImageConfig`: what replaces the image's
/// ENTRYPOINT, CMD and WORKDIR.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entry_point: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<Vec<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub working_directory: Option<String>,
}

impl ImageConfig {
    /// Lambda's limits: 1,500 entries and at most 1,000 characters for
    /// the working directory, which must be absolute.
    pub fn validated(self) -> Result<Self, ApiError> {
        for (what, list) in [
            ("EntryPoint", &self.entry_point),
            ("Command", &self.command),
        ] {
            if list
                .as_ref()
                .is_some_and(|l| l.len() > 1500 || l.iter().any(|a| a.contains('\0')))
            {
                return Err(ApiError::invalid(format!(
                    "ImageConfig.{what}: at most 1,500 entries, none with a NUL"
                )));
            }
        }
        if let Some(dir) = &self.working_directory {
            if !dir.starts_with('/') || dir.len() > 1000 || dir.contains('\0') {
                return Err(ApiError::invalid(format!(
                    "ImageConfig.WorkingDirectory {dir:?}: an absolute path of at most 1,000 characters"
                )));
            }
        }
        Ok(self)
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct ImageConfigResponse {
    pub image_config: ImageConfig,
}

/// SnapStart, as Lambda exposes it: on a function, `ApplyOn:
/// PublishedVersions` has each version snapshotted when it is published
/// (the version is `Pending` until then) and its cold starts restore that
/// snapshot; `$LATEST` and functions without it boot.
pub mod snap_start {
    pub const PUBLISHED_VERSIONS: &str = "PublishedVersions";
    pub const NONE: &str = "None";
    pub const ON: &str = "On";
    pub const OFF: &str = "Off";
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct SnapStart {
    pub apply_on: String,
}

impl SnapStart {
    pub fn validated(self) -> Result<Self, ApiError> {
        if [snap_start::PUBLISHED_VERSIONS, snap_start::NONE].contains(&self.apply_on.as_str()) {
            Ok(self)
        } else {
            Err(ApiError::invalid(format!(
                "SnapStart.ApplyOn {:?}: PublishedVersions or None",
                self.apply_on
            )))
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "PascalCase")]
pub struct SnapStartResponse {
    pub apply_on: String,
    pub optimization_status: String,
}

impl Default for SnapStartResponse {
    fn default() -> Self {
        SnapStartResponse {
            apply_on: snap_start::NONE.into(),
            optimization_status: snap_start::OFF.into(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct FunctionCode {
    /// Base64 in the JSON body, as the REST API carries it.
    pub zip_file: Option<String>,
    pub s3_bucket: Option<String>,
    pub image_uri: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateFunctionRequest {
    pub function_name: String,
    pub runtime: Option<String>,
    pub role: String,
    pub handler: Option<String>,
    pub code: FunctionCode,
    pub description: Option<String>,
    pub timeout: Option<u32>,
    pub memory_size: Option<u32>,
    #[serde(default)]
    pub publish: bool,
    pub environment: Option<Environment>,
    #[serde(default)]
    pub layers: Vec<String>,
    pub package_type: Option<String>,
    pub architectures: Option<Vec<String>>,
    #[serde(default)]
    pub tags: BTreeMap<String, String>,
    pub snap_start: Option<SnapStart>,
    pub image_config: Option<ImageConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateFunctionCodeRequest {
    pub zip_file: Option<String>,
    pub s3_bucket: Option<String>,
    pub image_uri: Option<String>,
    #[serde(default)]
    pub publish: bool,
    pub revision_id: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateFunctionConfigurationRequest {
    pub runtime: Option<String>,
    pub role: Option<String>,
    pub handler: Option<String>,
    pub description: Option<String>,
    pub timeout: Option<u32>,
    pub memory_size: Option<u32>,
    pub environment: Option<Environment>,
    pub layers: Option<Vec<String>>,
    pub revision_id: Option<String>,
    pub snap_start: Option<SnapStart>,
    pub image_config: Option<ImageConfig>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PublishVersionRequest {
    pub description: Option<String>,
    pub code_sha256: Option<String>,
    pub revision_id: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct AliasConfiguration {
    pub alias_arn: String,
    pub name: String,
    pub function_version: String,
    pub description: String,
    pub revision_id: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub routing_config: Option<AliasRoutingConfig>,
}

/// A weighted alias: this share of invocations runs the other version.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct AliasRoutingConfig {
    #[serde(default)]
    pub additional_version_weights: BTreeMap<String, f64>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct CreateAliasRequest {
    pub name: String,
    pub function_version: String,
    pub description: Option<String>,
    pub routing_config: Option<AliasRoutingConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct UpdateAliasRequest {
    pub function_version: Option<String>,
    pub description: Option<String>,
    pub revision_id: Option<String>,
    pub routing_config: Option<AliasRoutingConfig>,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PutConcurrencyRequest {
    pub reserved_concurrent_executions: u32,
}

#[derive(Debug, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct PutProvisionedConcurrencyRequest {
    pub provisioned_concurrent_executions: u32,
}

pub fn function_arn(account: &AccountId, name: &str) -> String {
    format!("arn:aws:lambda:{REGION}:{account}:function:{name}")
}

/// A function reference from a URL: a name, a partial ARN
/// (`ACCOUNT:function:NAME`) or a full ARN, each maybe with `:QUALIFIER`.
#[derive(Debug, PartialEq, Eq)]
pub struct FunctionRef {
    pub name: String,
    pub qualifier: Option<String>,
}

impl FunctionRef {
    /// Resolves `reference` for `account`; an ARN of another account or
    /// region is not found, never served.
    pub fn parse(reference: &str, account: &AccountId) -> Result<Self, ApiError> {
        let (owner, parsed) = Self::parse_owned(reference, account)?;
        if owner != *account {
            return Err(ApiError::not_found(function_arn(&owner, &parsed.name)));
        }
        Ok(parsed)
    }

    /// Resolves `reference` and the account that owns the function: the
    /// ARN's, or `account` for a bare name.
    pub fn parse_owned(
        reference: &str,
        account: &AccountId,
    ) -> Result<(AccountId, Self), ApiError> {
        let parts: Vec<&str> = reference.split(':').collect();
        let (owner, name, qualifier) = match parts.as_slice() {
            [name] => (None, *name, None),
            [name, q] => (None, *name, Some(*q)),
            [owner, "function", name] => (Some(*owner), *name, None),
            [owner, "function", name, q] => (Some(*owner), *name, Some(*q)),
            ["arn", "aws", "lambda", region, owner, "function", name] => {
                check_region(region, reference)?;
                (Some(*owner), *name, None)
            }
            ["arn", "aws", "lambda", region, owner, "function", name, q] => {
                check_region(region, reference)?;
                (Some(*owner), *name, Some(*q))
            }
            _ => {
                return Err(ApiError::invalid(format!(
                    "invalid function name {reference:?}"
                )))
            }
        };
        validate_name(name)?;
        if let Some(q) = qualifier {
            validate_qualifier(q)?;
        }
        let owner = owner.map_or_else(|| account.clone(), |o| AccountId(o.to_string()));
        Ok((
            owner,
            FunctionRef {
                name: name.to_string(),
                qualifier: qualifier.map(str::to_string),
            },
        ))
    }
}

fn check_region(region: &str, reference: &str) -> Result<(), ApiError> {
    if region == REGION {
        Ok(())
    } else {
        Err(ApiError::ResourceNotFound(format!(
            "Function not found: {reference} (this worker serves region {REGION})"
        )))
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || c == '-' || c == '_'
}

pub fn validate_name(name: &str) -> Result<(), ApiError> {
    if (1..=64).contains(&name.len()) && name.chars().all(is_name_char) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "invalid function name {name:?}: 1 to 64 letters, digits, '-' or '_'"
        )))
    }
}

/// `$LATEST`, a version number, or an alias name (which may not be all
/// digits).
pub fn validate_qualifier(q: &str) -> Result<(), ApiError> {
    let ok = q == LATEST || (!q.is_empty() && q.len() <= 128 && q.chars().all(is_name_char));
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!("invalid qualifier {q:?}")))
    }
}

pub fn validate_alias_name(name: &str) -> Result<(), ApiError> {
    let ok = (1..=128).contains(&name.len())
        && name.chars().all(is_name_char)
        && !name.chars().all(|c| c.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "invalid alias name {name:?}: letters, digits, '-' or '_', not all digits"
        )))
    }
}

pub fn validate_memory(mib: u32) -> Result<(), ApiError> {
    if (MIN_MEMORY_MIB..=MAX_MEMORY_MIB).contains(&mib) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "MemorySize {mib} is out of range: {MIN_MEMORY_MIB} to {MAX_MEMORY_MIB} MB"
        )))
    }
}

pub fn validate_timeout(secs: u32) -> Result<(), ApiError> {
    if (1..=MAX_TIMEOUT_SECS).contains(&secs) {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "Timeout {secs} is out of range: 1 to {MAX_TIMEOUT_SECS} seconds"
        )))
    }
}

/// An execution role in the caller's own account.
pub fn validate_role(role: &str, account: &AccountId) -> Result<(), ApiError> {
    let rest = role
        .strip_prefix("arn:aws:iam::")
        .and_then(|r| r.split_once(":role/"));
    match rest {
        Some((owner, name)) if owner == account.0 && !name.is_empty() => Ok(()),
        Some((owner, _)) if owner != account.0 => Err(ApiError::AccessDenied(format!(
            "role {role:?} belongs to another account"
        ))),
        _ => Err(ApiError::invalid(format!(
            "Role {role:?} is not an IAM role ARN (arn:aws:iam::ACCOUNT:role/NAME)"
        ))),
    }
}

/// Variables the runtime sets that a function may not override, beyond
/// every `AWS_` one.
const RESERVED_VARIABLES: [&str; 3] = ["LAMBDA_TASK_ROOT", "LAMBDA_RUNTIME_DIR", "TZ"];

pub fn validate_environment(env: &Environment) -> Result<(), ApiError> {
    let mut size = 0;
    for (k, v) in &env.variables {
        let key_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_');
        if !key_ok {
            return Err(ApiError::invalid(format!(
                "environment variable name {k:?} must start with a letter and hold only letters, digits and '_'"
            )));
        }
        if k.starts_with("AWS_") || RESERVED_VARIABLES.contains(&k.as_str()) {
            return Err(ApiError::invalid(format!(
                "environment variable {k:?} is reserved by Lambda"
            )));
        }
        size += k.len() + v.len();
    }
    if size > MAX_ENVIRONMENT_BYTES {
        return Err(ApiError::invalid(format!(
            "environment variables total {size} bytes, over Lambda's {MAX_ENVIRONMENT_BYTES}"
        )));
    }
    Ok(())
}

/// Lambda's ranges and defaults.
pub const MAX_RETRY_ATTEMPTS: u32 = 2;
pub const MIN_EVENT_AGE_SECS: u32 = 60;
pub const MAX_EVENT_AGE_SECS: u32 = 21_600;

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct Destination {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub destination: Option<String>,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct DestinationConfig {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_success: Option<Destination>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub on_failure: Option<Destination>,
}

/// What a Put or Update call sends.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct EventInvokeConfigRequest {
    pub maximum_retry_attempts: Option<u32>,
    pub maximum_event_age_in_seconds: Option<u32>,
    pub destination_config: Option<DestinationConfig>,
}

/// A qualifier's config, as the API returns it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(rename_all = "PascalCase")]
pub struct EventInvokeConfig {
    pub function_arn: String,
    /// Seconds since the epoch, as Lambda's timestamps go.
    pub last_modified: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_retry_attempts: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub maximum_event_age_in_seconds: Option<u32>,
    #[serde(default)]
    pub destination_config: DestinationConfig,
}

impl EventInvokeConfig {
    /// Attempts an event gets in all: the first and its retries.
    pub fn attempts(config: Option<&Self>) -> u32 {
        1 + config
            .and_then(|c| c.maximum_retry_attempts)
            .unwrap_or(MAX_RETRY_ATTEMPTS)
    }

    pub fn max_age_secs(config: Option<&Self>) -> u32 {
        config
            .and_then(|c| c.maximum_event_age_in_seconds)
            .unwrap_or(MAX_EVENT_AGE_SECS)
    }
}

/// Lambda's limits: 50 tags, keys of 1-128 characters, values of at most
/// 256, and no key of AWS's own `aws:` prefix.
const MAX_TAGS: usize = 50;
const MAX_KEY: usize = 128;
const MAX_VALUE: usize = 256;

pub fn validate_tags(tags: &BTreeMap<String, String>) -> Result<(), ApiError> {
    if tags.len() > MAX_TAGS {
        return Err(ApiError::invalid(format!(
            "{} tags; a function may have at most {MAX_TAGS}",
            tags.len()
        )));
    }
    for (key, value) in tags {
        if key.is_empty() || key.chars().count() > MAX_KEY {
            return Err(ApiError::invalid(format!(
                "tag key {key:?}: 1 to {MAX_KEY} characters"
            )));
        }
        if key.to_ascii_lowercase().starts_with("aws:") {
            return Err(ApiError::invalid(format!(
                "tag key {key:?}: the aws: prefix is AWS's own"
            )));
        }
        if value.chars().count() > MAX_VALUE {
            return Err(ApiError::invalid(format!(
                "the value of tag {key:?}: at most {MAX_VALUE} characters"
            )));
        }
    }
    Ok(())
}

/// A statement of a function's resource-based policy, on the function
/// (no qualifier) or on one of its versions or aliases.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct PolicyStatement {
    pub qualifier: Option<String>,
    /// The statement as GetPolicy shows it.
    pub statement: serde_json::Value,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct AddPermissionRequest {
    pub statement_id: String,
    pub action: String,
    pub principal: String,
    pub source_arn: Option<String>,
    pub source_account: Option<String>,
    #[serde(rename = "PrincipalOrgID")]
    pub principal_org_id: Option<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_are_checked_against_lambdas_limits() {
        let one = |k: &str, v: &str| BTreeMap::from([(k.to_string(), v.to_string())]);
        assert!(validate_tags(&one("team", "lambda")).is_ok());
        assert!(validate_tags(&one("", "x")).is_err());
        assert!(validate_tags(&one(&"k".repeat(129), "x")).is_err());
        assert!(validate_tags(&one("AWS:owner", "x")).is_err());
        assert!(validate_tags(&one("k", &"v".repeat(257))).is_err());
        let many: BTreeMap<String, String> =
            (0..51).map(|i| (format!("k{i}"), String::new())).collect();
        assert!(validate_tags(&many).is_err());
    }

    fn account() -> AccountId {
        AccountId("111111111111".into())
    }

    #[test]
    fn names_partial_and_full_arns_resolve_within_the_account() {
        let a = account();
        assert_eq!(
            FunctionRef::parse("echo", &a).unwrap(),
            FunctionRef {
                name: "echo".into(),
                qualifier: None
            }
        );
        assert_eq!(
            FunctionRef::parse("echo:prod", &a).unwrap().qualifier,
            Some("prod".into())
        );
        assert_eq!(
            FunctionRef::parse("arn:aws:lambda:local:111111111111:function:echo:7", &a).unwrap(),
            FunctionRef {
                name: "echo".into(),
                qualifier: Some("7".into())
            }
        );
        assert_eq!(
            FunctionRef::parse("111111111111:function:echo", &a)
                .unwrap()
                .name,
            "echo"
        );
    }

    #[test]
    fn another_accounts_arn_is_not_found() {
        let err = FunctionRef::parse(
            "arn:aws:lambda:local:222222222222:function:echo",
            &account(),
        )
        .unwrap_err();
        assert!(matches!(err, ApiError::ResourceNotFound(_)), "{err:?}");
    }

    #[test]
    fn bad_values_name_what_is_wrong() {
        let a = account();
        assert!(FunctionRef::parse("bad name", &a)
            .unwrap_err()
            .to_string()
            .contains("\"bad name\""));
        assert!(validate_memory(64)
            .unwrap_err()
            .to_string()
            .contains("MemorySize 64"));
        assert!(validate_timeout(0)
            .unwrap_err()
            .to_string()
            .contains("Timeout 0"));
        assert!(matches!(
            validate_role("arn:aws:iam::222222222222:role/x", &a),
            Err(ApiError::AccessDenied(_))
        ));
        assert!(validate_role("admin", &a).is_err());
        assert!(validate_alias_name("123").is_err());
        let mut env = Environment::default();
        env.variables.insert("AWS_REGION".into(), "x".into());
        assert!(validate_environment(&env)
            .unwrap_err()
            .to_string()
            .contains("reserved"));
        env.variables.clear();
        env.variables.insert("BIG".into(), "x".repeat(5000));
        assert!(validate_environment(&env).is_err());
    }
}
