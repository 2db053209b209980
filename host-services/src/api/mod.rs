//! The Lambda REST API over HTTP (axum): the control plane's calls and
//! Invoke, at the paths and with the shapes AWS's SDKs use.

mod invoke;
mod pagination;

use std::sync::Arc;

use axum::body::{Body, Bytes};
use axum::extract::{FromRequest, Path, Request};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post, put};
use axum::{Json, Router};
use serde::de::DeserializeOwned;
use serde_json::json;

use crate::artifacts::code;
use crate::control_plane::event_config::{config_qualifier, no_event_invoke_config};
use crate::control_plane::functions::{ProvisionedConfig, IMAGE};
use crate::control_plane::layers::LayerVersion;
use crate::control_plane::model::*;
use crate::data_plane::worker::Worker;
use crate::error::ApiError;
use crate::ids::AccountId;
use crate::security::auth::SignedRequest;
use pagination::{page, version_key, PageQuery, LONG_LISTS, SHORT_LISTS};

/// Room for a 50 MB ZIP as base64 in a JSON body.
const MAX_CONTROL_BODY: usize = 70 * 1024 * 1024;

/// An authenticated request: the caller's account and the body its
/// signature covers.
pub struct Caller {
    pub account: AccountId,
    pub body: Bytes,
}

impl FromRequest<Arc<Worker>> for Caller {
    type Rejection = ApiError;

    async fn from_request(req: Request, worker: &Arc<Worker>) -> Result<Self, ApiError> {
        let (parts, body) = req.into_parts();
        let limit = if parts.uri.path().ends_with("/invocations") {
            crate::data_plane::runtime_api::MAX_PAYLOAD
        } else {
            MAX_CONTROL_BODY
        };
        let body = axum::body::to_bytes(Body::new(body), limit)
            .await
            .map_err(|_| {
                ApiError::RequestTooLarge(format!(
                    "Request must be smaller than {limit} bytes for the {} operation",
                    if limit == MAX_CONTROL_BODY {
                        "control-plane"
                    } else {
                        "Invoke"
                    }
                ))
            })?;
        let account = worker.credentials.authenticate(&SignedRequest {
            method: &parts.method,
            raw_path: parts.uri.path(),
            raw_query: parts.uri.query(),
            headers: &parts.headers,
            body: &body,
        })?;
        Ok(Caller { account, body })
    }
}

/// The body as `T`; an empty body is `T::default()`'s job, not this one's.
fn parse<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(|e| {
        ApiError::InvalidRequestContent(format!("Could not parse the request body: {e}"))
    })
}

fn parse_or_default<T: DeserializeOwned + Default>(body: &[u8]) -> Result<T, ApiError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        Ok(T::default())
    } else {
        parse(body)
    }
}

type Shared = axum::extract::State<Arc<Worker>>;

fn function_ref(name: &str, caller: &Caller) -> Result<FunctionRef, ApiError> {
    FunctionRef::parse(name, &caller.account)
}

fn qualified(mut reference: FunctionRef, query: &Query) -> Result<FunctionRef, ApiError> {
    if let Some(q) = &query.qualifier {
        validate_qualifier(q)?;
        if reference.qualifier.as_ref().is_some_and(|r| r != q) {
            return Err(ApiError::invalid(format!(
                "the qualifier {q:?} conflicts with the one in the function name"
            )));
        }
        reference.qualifier = Some(q.clone());
    }
    Ok(reference)
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct Query {
    qualifier: Option<String>,
    /// `ALL` lists a function's provisioned concurrency configs.
    list: Option<String>,
    /// ListAliases: only the aliases of this version.
    function_version: Option<String>,
    /// ListLayers: only layers with a version compatible with it.
    compatible_runtime: Option<String>,
    /// `LayerVersion` with `Arn`: GetLayerVersionByArn, which shares
    /// ListLayers' path.
    #[serde(rename = "find")]
    find: Option<String>,
    arn: Option<String>,
    #[serde(flatten)]
    page: PageQuery,
}

/// A List call's answer: the page under `field`, and `NextMarker` while
/// more remain.
fn listed<T: serde::Serialize>(field: &str, (items, next): (Vec<T>, Option<String>)) -> Response {
    let mut body = json!({ field: items });
    if let Some(next) = next {
        body["NextMarker"] = json!(next);
    }
    Json(body).into_response()
}

/// The listing key of a function version: `$LATEST` first, then by
/// number.
fn version_order(config: &FunctionConfiguration) -> String {
    version_key(config.version.parse().unwrap_or(0))
}

type QueryParams = axum::extract::Query<Query>;

async fn create_function(state: Shared, caller: Caller) -> Result<Response, ApiError> {
    let req: CreateFunctionRequest = parse(&caller.body)?;
    let config = state.control.create_function(&caller.account, req)?;
    state.published();
    Ok((StatusCode::CREATED, Json(config)).into_response())
}

async fn list_functions(
    state: Shared,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let functions = state.control.list_functions(&caller.account)?;
    let key = |f: &FunctionConfiguration| f.function_name.clone();
    Ok(listed(
        "Functions",
        page(functions, key, &query.page, LONG_LISTS)?,
    ))
}

async fn get_function(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    let (config, reserved) = state.control.configuration(&caller.account, &reference)?;
    let tags = state
        .control
        .function_tags(&caller.account, &reference.name)?;
    let code = if config.package_type == IMAGE {
        let uri = state.control.image_uri(&caller.account, &config)?;
        json!({
            "RepositoryType": "ECR",
            "ImageUri": uri,
            "ResolvedImageUri": format!("{uri}@sha256:{}", config.code_sha256),
        })
    } else {
        json!({ "RepositoryType": "Local", "Location": format!("worker://{}", config.code_sha256) })
    };
    let mut body = json!({
        "Configuration": config,
        "Code": code,
        "Tags": tags,
    });
    if let Some(r) = reserved {
        body["Concurrency"] = json!({ "ReservedConcurrentExecutions": r });
    }
    Ok(Json(body).into_response())
}

async fn get_configuration(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    let (config, _) = state.control.configuration(&caller.account, &reference)?;
    Ok(Json(config).into_response())
}

async fn delete_function(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    state.control.delete_function(&caller.account, &reference)?;
    state
        .retire_function(&caller.account, &reference.name)
        .await;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn update_code(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let config = state
        .control
        .update_code(&caller.account, &reference, parse(&caller.body)?)?;
    state.published();
    state
        .retire_function(&caller.account, &reference.name)
        .await;
    Ok(Json(config).into_response())
}

async fn update_configuration(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let config =
        state
            .control
            .update_configuration(&caller.account, &reference, parse(&caller.body)?)?;
    state
        .retire_function(&caller.account, &reference.name)
        .await;
    Ok(Json(config).into_response())
}

async fn publish_version(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let config = state.control.publish_version(
        &caller.account,
        &reference,
        parse_or_default(&caller.body)?,
    )?;
    state.published();
    Ok((StatusCode::CREATED, Json(config)).into_response())
}

async fn list_versions(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let versions = state.control.list_versions(&caller.account, &reference)?;
    Ok(listed(
        "Versions",
        page(versions, version_order, &query.page, LONG_LISTS)?,
    ))
}

async fn list_aliases(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let aliases = state.control.list_aliases(
        &caller.account,
        &reference,
        query.function_version.as_deref(),
    )?;
    let key = |a: &AliasConfiguration| a.name.clone();
    Ok(listed(
        "Aliases",
        page(aliases, key, &query.page, LONG_LISTS)?,
    ))
}

async fn delete_alias(
    state: Shared,
    Path((name, alias)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    if let Some(provisioned) = state
        .control
        .delete_alias(&caller.account, &reference, &alias)?
    {
        state.provisioned_changed(&provisioned);
    }
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn create_alias(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let alias = state
        .control
        .create_alias(&caller.account, &reference, parse(&caller.body)?)?;
    Ok((StatusCode::CREATED, Json(alias)).into_response())
}

async fn get_alias(
    state: Shared,
    Path((name, alias)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    Ok(Json(
        state
            .control
            .get_alias(&caller.account, &reference, &alias)?,
    )
    .into_response())
}

async fn update_alias(
    state: Shared,
    Path((name, alias)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let updated =
        state
            .control
            .update_alias(&caller.account, &reference, &alias, parse(&caller.body)?)?;
    Ok(Json(updated).into_response())
}

async fn put_concurrency(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let req: PutConcurrencyRequest = parse(&caller.body)?;
    check_capacity(
        &state,
        "ReservedConcurrentExecutions",
        req.reserved_concurrent_executions,
    )?;
    state.control.put_reserved_concurrency(
        &caller.account,
        &reference,
        Some(req.reserved_concurrent_executions),
    )?;
    Ok(
        Json(json!({ "ReservedConcurrentExecutions": req.reserved_concurrent_executions }))
            .into_response(),
    )
}

async fn get_concurrency(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let body = match state
        .control
        .reserved_concurrency(&caller.account, &reference)?
    {
        Some(n) => json!({ "ReservedConcurrentExecutions": n }),
        None => json!({}),
    };
    Ok(Json(body).into_response())
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "PascalCase")]
struct TagResourceRequest {
    tags: std::collections::BTreeMap<String, String>,
}

async fn tag_resource(
    state: Shared,
    Path(resource): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let req: TagResourceRequest = parse(&caller.body)?;
    state
        .control
        .tag_resource(&caller.account, &resource, req.tags)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn untag_resource(
    state: Shared,
    Path(resource): Path<String>,
    axum::extract::Query(query): axum::extract::Query<Vec<(String, String)>>,
    caller: Caller,
) -> Result<Response, ApiError> {
    // `tagKeys` repeats, once per key.
    let keys: Vec<String> = query
        .into_iter()
        .filter(|(name, _)| name == "tagKeys")
        .map(|(_, key)| key)
        .collect();
    state
        .control
        .untag_resource(&caller.account, &resource, &keys)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_tags(
    state: Shared,
    Path(resource): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let tags = state.control.list_tags(&caller.account, &resource)?;
    Ok(Json(json!({ "Tags": tags })).into_response())
}

async fn put_event_invoke_config(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    save_event_invoke_config(&state, &name, &query, &caller, false)
}

async fn update_event_invoke_config(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    save_event_invoke_config(&state, &name, &query, &caller, true)
}

fn save_event_invoke_config(
    state: &Worker,
    name: &str,
    query: &Query,
    caller: &Caller,
    merge: bool,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(name, caller)?, query)?;
    let config = state.control.put_event_invoke_config(
        &caller.account,
        &reference,
        parse_or_default(&caller.body)?,
        merge,
    )?;
    Ok(Json(config).into_response())
}

async fn get_event_invoke_config(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    match state
        .control
        .event_invoke_config(&caller.account, &reference)?
    {
        Some(config) => Ok(Json(config).into_response()),
        None => Err(no_event_invoke_config(
            &caller.account,
            &reference.name,
            config_qualifier(&reference),
        )),
    }
}

async fn delete_event_invoke_config(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    state
        .control
        .delete_event_invoke_config(&caller.account, &reference)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn list_event_invoke_configs(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    let configs = state
        .control
        .event_invoke_configs(&caller.account, &reference.name)?;
    let key = |c: &EventInvokeConfig| c.function_arn.clone();
    Ok(listed(
        "FunctionEventInvokeConfigs",
        page(configs, key, &query.page, SHORT_LISTS)?,
    ))
}

async fn add_permission(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    let statement =
        state
            .control
            .add_permission(&caller.account, &reference, parse(&caller.body)?)?;
    Ok((
        StatusCode::CREATED,
        Json(json!({ "Statement": statement.to_string() })),
    )
        .into_response())
}

async fn get_policy(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    let (policy, revision) = state.control.get_policy(&caller.account, &reference)?;
    Ok(Json(json!({ "Policy": policy.to_string(), "RevisionId": revision })).into_response())
}

async fn remove_permission(
    state: Shared,
    Path((name, sid)): Path<(String, String)>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    state
        .control
        .remove_permission(&caller.account, &reference, &sid)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn get_account_settings(state: Shared, caller: Caller) -> Result<Response, ApiError> {
    let usage = state.control.account_usage(&caller.account)?;
    let capacity = state.capacity() as u64;
    Ok(Json(json!({
        "AccountLimit": {
            // Lambda's default quota for code storage, 75 GB.
            "TotalCodeSize": 80_530_636_800u64,
            "CodeSizeUnzipped": code::MAX_UNZIPPED_BYTES,
            "CodeSizeZipped": code::MAX_ZIP_BYTES,
            "ConcurrentExecutions": capacity,
            "UnreservedConcurrentExecutions": capacity.saturating_sub(usage.reserved_concurrency),
        },
        "AccountUsage": {
            "TotalCodeSize": usage.total_code_size,
            "FunctionCount": usage.function_count,
        },
    }))
    .into_response())
}

async fn delete_concurrency(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = function_ref(&name, &caller)?;
    state
        .control
        .put_reserved_concurrency(&caller.account, &reference, None)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn check_capacity(worker: &Worker, field: &str, n: u32) -> Result<(), ApiError> {
    if n as usize > worker.capacity() {
        return Err(ApiError::invalid(format!(
            "{field} {n} is over this worker's {} environments",
            worker.capacity()
        )));
    }
    Ok(())
}

fn provisioned_json(worker: &Worker, config: &ProvisionedConfig) -> serde_json::Value {
    let status = worker.provisioned_status(config);
    let mut body = json!({
        "RequestedProvisionedConcurrentExecutions": config.requested,
        "AvailableProvisionedConcurrentExecutions": status.allocated,
        "AllocatedProvisionedConcurrentExecutions": status.allocated,
        "Status": status.status,
        "LastModified": config.last_modified,
    });
    if let Some(reason) = status.reason {
        body["StatusReason"] = json!(reason);
    }
    body
}

async fn put_provisioned(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    let req: PutProvisionedConcurrencyRequest = parse(&caller.body)?;
    check_capacity(
        &state,
        "ProvisionedConcurrentExecutions",
        req.provisioned_concurrent_executions,
    )?;
    let config = state.control.put_provisioned(
        &caller.account,
        &reference,
        req.provisioned_concurrent_executions,
    )?;
    state.provisioned_changed(&config);
    Ok((
        StatusCode::ACCEPTED,
        Json(provisioned_json(&state, &config)),
    )
        .into_response())
}

async fn get_provisioned(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    if query.list.as_deref() == Some("ALL") {
        let configs = state
            .control
            .list_provisioned(&caller.account, &reference.name)?;
        let listed_configs: Vec<serde_json::Value> = configs
            .iter()
            .map(|c| {
                let mut body = provisioned_json(&state, c);
                body["FunctionArn"] = json!(format!(
                    "{}:{}",
                    function_arn(&caller.account, &c.function_name),
                    c.qualifier
                ));
                body
            })
            .collect();
        let key = |c: &serde_json::Value| c["FunctionArn"].as_str().unwrap_or_default().to_string();
        return Ok(listed(
            "ProvisionedConcurrencyConfigs",
            page(listed_configs, key, &query.page, SHORT_LISTS)?,
        ));
    }
    let config = state.control.get_provisioned(&caller.account, &reference)?;
    Ok(Json(provisioned_json(&state, &config)).into_response())
}

async fn delete_provisioned(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let reference = qualified(function_ref(&name, &caller)?, &query)?;
    let config = state.control.get_provisioned(&caller.account, &reference)?;
    state
        .control
        .delete_provisioned(&caller.account, &reference)?;
    state.provisioned_changed(&config);
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn publish_layer_version(
    state: Shared,
    Path(name): Path<String>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let layer =
        state
            .control
            .publish_layer_version(&caller.account, &name, parse(&caller.body)?)?;
    Ok((StatusCode::CREATED, Json(layer)).into_response())
}

async fn list_layer_versions(
    state: Shared,
    Path(name): Path<String>,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    let versions = state.control.list_layer_versions(&caller.account, &name)?;
    // Newest first.
    let key = |v: &LayerVersion| version_key(u64::MAX - v.version);
    Ok(listed(
        "LayerVersions",
        page(versions, key, &query.page, SHORT_LISTS)?,
    ))
}

async fn list_layers(
    state: Shared,
    query: QueryParams,
    caller: Caller,
) -> Result<Response, ApiError> {
    if query.find.as_deref() == Some("LayerVersion") {
        let arn = query
            .arn
            .as_deref()
            .ok_or_else(|| ApiError::invalid("GetLayerVersionByArn needs Arn"))?;
        return Ok(Json(
            state
                .control
                .get_layer_version_by_arn(&caller.account, arn)?,
        )
        .into_response());
    }
    let layers = state
        .control
        .list_layers(&caller.account, query.compatible_runtime.as_deref())?;
    let items: Vec<serde_json::Value> = layers
        .into_iter()
        .map(|(name, newest)| {
            let mut latest = json!({
                "LayerVersionArn": newest.layer_version_arn,
                "Version": newest.version,
                "Description": newest.description,
                "CreatedDate": newest.created_date,
                "CompatibleRuntimes": newest.compatible_runtimes,
                "CompatibleArchitectures": newest.compatible_architectures,
            });
            if let Some(license) = newest.license_info {
                latest["LicenseInfo"] = json!(license);
            }
            json!({
                "LayerName": name,
                "LayerArn": newest.layer_arn,
                "LatestMatchingVersion": latest,
            })
        })
        .collect();
    let key = |l: &serde_json::Value| l["LayerName"].as_str().unwrap_or_default().to_string();
    Ok(listed(
        "Layers",
        page(items, key, &query.page, SHORT_LISTS)?,
    ))
}

fn layer_version_number(version: &str) -> Result<u64, ApiError> {
    version
        .parse()
        .map_err(|_| ApiError::invalid(format!("invalid layer version {version:?}")))
}

async fn get_layer_version(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let version = layer_version_number(&version)?;
    Ok(Json(
        state
            .control
            .get_layer_version(&caller.account, &name, version)?,
    )
    .into_response())
}

async fn delete_layer_version(
    state: Shared,
    Path((name, version)): Path<(String, String)>,
    caller: Caller,
) -> Result<Response, ApiError> {
    let version = layer_version_number(&version)?;
    state
        .control
        .delete_layer_version(&caller.account, &name, version)?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

async fn unknown_operation(method: axum::http::Method, uri: axum::http::Uri) -> ApiError {
    ApiError::UnknownOperation(format!(
        "{method} {}: no operation of the Lambda API this worker serves",
        uri.path()
    ))
}

/// Lambda's routes.
pub fn router(worker: Arc<Worker>) -> Router {
    let f = "/2015-03-31/functions";
    Router::new()
        .route(f, post(create_function).get(list_functions))
        .route(&format!("{f}/"), post(create_function).get(list_functions))
        .route(
            &format!("{f}/{{name}}"),
            get(get_function).delete(delete_function),
        )
        .route(&format!("{f}/{{name}}/code"), put(update_code))
        .route(
            &format!("{f}/{{name}}/configuration"),
            get(get_configuration).put(update_configuration),
        )
        .route(
            &format!("{f}/{{name}}/versions"),
            post(publish_version).get(list_versions),
        )
        .route(
            &format!("{f}/{{name}}/aliases"),
            post(create_alias).get(list_aliases),
        )
        .route(
            &format!("{f}/{{name}}/aliases/{{alias}}"),
            get(get_alias).put(update_alias).delete(delete_alias),
        )
        .route(&format!("{f}/{{name}}/invocations"), post(invoke::invoke))
        .route(
            &format!("{f}/{{name}}/policy"),
            post(add_permission).get(get_policy),
        )
        .route(
            &format!("{f}/{{name}}/policy/{{sid}}"),
            axum::routing::delete(remove_permission),
        )
        .route(
            "/2017-10-31/functions/{name}/concurrency",
            put(put_concurrency).delete(delete_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/concurrency",
            get(get_concurrency),
        )
        .route(
            "/2019-09-30/functions/{name}/provisioned-concurrency",
            put(put_provisioned)
                .get(get_provisioned)
                .delete(delete_provisioned),
        )
        .route("/2018-10-31/layers", get(list_layers))
        .route(
            "/2018-10-31/layers/{name}/versions",
            post(publish_layer_version).get(list_layer_versions),
        )
        .route(
            "/2018-10-31/layers/{name}/versions/{version}",
            get(get_layer_version).delete(delete_layer_version),
        )
        .route(
            "/2017-03-31/tags/{resource}",
            post(tag_resource).get(list_tags).delete(untag_resource),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config",
            put(put_event_invoke_config)
                .post(update_event_invoke_config)
                .get(get_event_invoke_config)
                .delete(delete_event_invoke_config),
        )
        .route(
            "/2019-09-25/functions/{name}/event-invoke-config/list",
            get(list_event_invoke_configs),
        )
        .route("/2016-08-19/account-settings", get(get_account_settings))
        .route("/2016-08-19/account-settings/", get(get_account_settings))
        .fallback(unknown_operation)
        .method_not_allowed_fallback(unknown_operation)
        .with_state(worker)
}
