//! `POST /2015-03-31/functions/{name}/invocations`: RequestResponse, Event
//! and DryRun, with Lambda's headers.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;

use super::{qualified, Caller, QueryParams};
use crate::control_plane::model::FunctionRef;
use crate::data_plane::worker::{InvokeResult, Worker};
use crate::error::ApiError;

/// Lambda's limit on an asynchronous event.
pub const MAX_EVENT_PAYLOAD: usize = 1024 * 1024;
/// `X-Amz-Log-Result` carries the last 4 KB of the log.
const LOG_TAIL: usize = 4 * 1024;

#[derive(Debug, PartialEq, Eq)]
enum InvocationType {
    RequestResponse,
    Event,
    DryRun,
}

fn header<'a>(headers: &'a HeaderMap, name: &str) -> Result<Option<&'a str>, ApiError> {
    headers
        .get(name)
        .map(|v| {
            v.to_str()
                .map_err(|_| ApiError::invalid(format!("header {name} is not ASCII")))
        })
        .transpose()
}

fn log_tail(log: &str) -> String {
    let mut start = log.len().saturating_sub(LOG_TAIL);
    while !log.is_char_boundary(start) {
        start += 1;
    }
    base64::engine::general_purpose::STANDARD.encode(&log[start..])
}

pub async fn invoke(
    State(worker): State<Arc<Worker>>,
    Path(name): Path<String>,
    query: QueryParams,
    headers: HeaderMap,
    caller: Caller,
) -> Result<Response, ApiError> {
    let arrived = std::time::Instant::now();
    // Another account's function runs, in its owner's environments and
    // with its owner's role, when its policy lets the caller invoke it.
    let (owner, reference) = FunctionRef::parse_owned(&name, &caller.account)?;
    let reference = qualified(reference, &query)?;
    if owner != caller.account {
        worker
            .control
            .check_invoke_permission(&owner, &reference, &caller.account)?;
    }
    let kind = match header(&headers, "x-amz-invocation-type")? {
        None | Some("RequestResponse") => InvocationType::RequestResponse,
        Some("Event") => InvocationType::Event,
        Some("DryRun") => InvocationType::DryRun,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "X-Amz-Invocation-Type {other:?}: expected RequestResponse, Event or DryRun"
            )))
        }
    };
    let tail = match header(&headers, "x-amz-log-type")? {
        None | Some("None") => false,
        Some("Tail") => true,
        Some(other) => {
            return Err(ApiError::invalid(format!(
                "X-Amz-Log-Type {other:?}: expected None or Tail"
            )))
        }
    };
    if !caller.body.is_empty()
        && serde_json::from_slice::<serde::de::IgnoredAny>(&caller.body).is_err()
    {
        return Err(ApiError::InvalidRequestContent(
            "Could not parse request body into json: the payload is not JSON".into(),
        ));
    }
    let resolved = worker.control.resolve(&owner, &reference)?;
    let request_id = uuid::Uuid::new_v4().to_string();
    let mut response = match kind {
        InvocationType::DryRun => StatusCode::NO_CONTENT.into_response(),
        InvocationType::Event => {
            if caller.body.len() > MAX_EVENT_PAYLOAD {
                return Err(ApiError::RequestTooLarge(format!(
                    "the event is {} bytes, over the {MAX_EVENT_PAYLOAD}-byte limit for asynchronous invocation",
                    caller.body.len()
                )));
            }
            worker.enqueue_event(&request_id, &owner, &reference, &caller.body)?;
            StatusCode::ACCEPTED.into_response()
        }
        InvocationType::RequestResponse => {
            let InvokeResult {
                status_error,
                body,
                log,
            } = worker
                .invoke(&resolved, &request_id, caller.body.clone(), arrived)
                .await?;
            let mut response = (StatusCode::OK, body).into_response();
            let h = response.headers_mut();
            if let Some(kind) = status_error {
                h.insert("x-amz-function-error", HeaderValue::from_static(kind));
            }
            if tail {
                if let Ok(v) = HeaderValue::from_str(&log_tail(&log)) {
                    h.insert("x-amz-log-result", v);
                }
            }
            response
        }
    };
    let h = response.headers_mut();
    if let Ok(v) = HeaderValue::from_str(&request_id) {
        h.insert("x-amzn-requestid", v);
    }
    if kind != InvocationType::Event {
        if let Ok(v) = HeaderValue::from_str(&resolved.config.version) {
            h.insert("x-amz-executed-version", v);
        }
    }
    Ok(response)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_log_tail_is_the_last_4k_on_a_character_boundary() {
        let log = format!("{}é{}", "a".repeat(10), "b".repeat(LOG_TAIL - 1));
        let tail = base64::engine::general_purpose::STANDARD
            .decode(log_tail(&log))
            .unwrap();
        assert_eq!(tail.len(), LOG_TAIL - 1);
        assert!(String::from_utf8(tail).is_ok());
        assert_eq!(
            base64::engine::general_purpose::STANDARD
                .decode(log_tail("short"))
                .unwrap(),
            b"short"
        );
    }
}
