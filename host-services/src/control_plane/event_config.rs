//! Asynchronous invocation configs (Put/Get/Update/Delete/List
//! FunctionEventInvokeConfig): how often a failed event is retried, how
//! old an event may get, and where its record goes when it succeeds or
//! fails for good. Kept per qualifier in the function's record.

use crate::control_plane::functions::ControlPlane;
use crate::control_plane::model::{
    function_arn, EventInvokeConfig, EventInvokeConfigRequest, FunctionRef, LATEST,
    MAX_EVENT_AGE_SECS, MAX_RETRY_ATTEMPTS, MIN_EVENT_AGE_SECS,
};
use crate::error::ApiError;
use crate::ids::AccountId;

/// The error for a qualifier without a config.
pub fn no_event_invoke_config(account: &AccountId, name: &str, qualifier: &str) -> ApiError {
    ApiError::ResourceNotFound(format!(
        "The function {}:{qualifier} doesn't have an EventInvokeConfig",
        function_arn(account, name)
    ))
}

/// The qualifier an event's config is kept under: `$LATEST` for an
/// unqualified name, as on Lambda.
pub fn config_qualifier(reference: &FunctionRef) -> &str {
    reference.qualifier.as_deref().unwrap_or(LATEST)
}

fn check_request(account: &AccountId, req: &EventInvokeConfigRequest) -> Result<(), ApiError> {
    if let Some(n) = req.maximum_retry_attempts {
        if n > MAX_RETRY_ATTEMPTS {
            return Err(ApiError::invalid(format!(
                "MaximumRetryAttempts {n}: from 0 to {MAX_RETRY_ATTEMPTS}"
            )));
        }
    }
    if let Some(age) = req.maximum_event_age_in_seconds {
        if !(MIN_EVENT_AGE_SECS..=MAX_EVENT_AGE_SECS).contains(&age) {
            return Err(ApiError::invalid(format!(
                "MaximumEventAgeInSeconds {age}: from {MIN_EVENT_AGE_SECS} to {MAX_EVENT_AGE_SECS}"
            )));
        }
    }
    let destinations = req.destination_config.iter().flat_map(|d| {
        [&d.on_success, &d.on_failure]
            .into_iter()
            .flatten()
            .filter_map(|d| d.destination.as_deref())
    });
    for destination in destinations {
        destination_function(account, destination)?;
    }
    Ok(())
}

/// The function a destination ARN names: this worker delivers records
/// to functions of the same account only.
pub fn destination_function(account: &AccountId, arn: &str) -> Result<FunctionRef, ApiError> {
    if !arn.starts_with("arn:aws:lambda:") {
        return Err(ApiError::invalid(format!(
            "destination {arn:?}: this worker delivers to Lambda functions (arn:aws:lambda:...) only"
        )));
    }
    FunctionRef::parse(arn, account).map_err(|_| {
        ApiError::invalid(format!(
            "destination {arn:?} is not a function of account {account}"
        ))
    })
}

fn now_seconds() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

impl ControlPlane {
    /// Puts (`merge` false: what the request leaves out is unset) or
    /// updates (`merge` true: what it leaves out stays) a qualifier's
    /// config.
    pub fn put_event_invoke_config(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        req: EventInvokeConfigRequest,
        merge: bool,
    ) -> Result<EventInvokeConfig, ApiError> {
        check_request(account, &req)?;
        self.configuration(account, reference)?;
        let qualifier = config_qualifier(reference).to_string();
        self.update_record(account, &reference.name, |record| {
            let old = record.event_invoke_configs.get(&qualifier).cloned();
            if merge && old.is_none() {
                return Err(no_event_invoke_config(account, &reference.name, &qualifier));
            }
            let keep = old.filter(|_| merge);
            let config = EventInvokeConfig {
                function_arn: format!("{}:{qualifier}", function_arn(account, &reference.name)),
                last_modified: now_seconds(),
                maximum_retry_attempts: req
                    .maximum_retry_attempts
                    .or(keep.as_ref().and_then(|k| k.maximum_retry_attempts)),
                maximum_event_age_in_seconds: req
                    .maximum_event_age_in_seconds
                    .or(keep.as_ref().and_then(|k| k.maximum_event_age_in_seconds)),
                destination_config: req
                    .destination_config
                    .clone()
                    .or(keep.map(|k| k.destination_config))
                    .unwrap_or_default(),
            };
            record
                .event_invoke_configs
                .insert(qualifier.clone(), config.clone());
            Ok(config)
        })
    }

    /// A qualifier's config, if it has one.
    pub fn event_invoke_config(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<Option<EventInvokeConfig>, ApiError> {
        let mut record = self.read_record(account, &reference.name)?;
        Ok(record
            .event_invoke_configs
            .remove(config_qualifier(reference)))
    }

    /// Every config of a function.
    pub fn event_invoke_configs(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<Vec<EventInvokeConfig>, ApiError> {
        let record = self.read_record(account, name)?;
        Ok(record.event_invoke_configs.into_values().collect())
    }

    pub fn delete_event_invoke_config(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<(), ApiError> {
        let qualifier = config_qualifier(reference).to_string();
        self.update_record(account, &reference.name, |record| {
            if record.event_invoke_configs.remove(&qualifier).is_none() {
                return Err(no_event_invoke_config(account, &reference.name, &qualifier));
            }
            Ok(())
        })
    }
}

/// How an asynchronous event ended, as its destination record says.
pub struct EventOutcome<'a> {
    pub request_id: &'a str,
    /// The ARN the event was sent to, with its qualifier.
    pub function_arn: &'a str,
    /// `Success`, `RetriesExhausted` or `EventAgeExceeded`.
    pub condition: &'a str,
    pub attempts: u32,
    pub payload: &'a [u8],
    /// The last invocation's version, function error and answer, if it
    /// ran at all.
    pub response: Option<(&'a str, Option<&'a str>, &'a [u8])>,
}

/// The record Lambda sends a destination function.
pub fn destination_record(outcome: &EventOutcome) -> serde_json::Value {
    // JSON payloads go in as JSON, anything else as a string.
    let as_json = |bytes: &[u8]| {
        serde_json::from_slice(bytes)
            .unwrap_or_else(|_| serde_json::Value::String(String::from_utf8_lossy(bytes).into()))
    };
    let mut record = serde_json::json!({
        "version": "1.0",
        "timestamp": chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.3fZ").to_string(),
        "requestContext": {
            "requestId": outcome.request_id,
            "functionArn": outcome.function_arn,
            "condition": outcome.condition,
            "approximateInvokeCount": outcome.attempts,
        },
        "requestPayload": as_json(outcome.payload),
    });
    if let Some((version, function_error, body)) = outcome.response {
        let mut context = serde_json::json!({ "statusCode": 200, "executedVersion": version });
        if let Some(error) = function_error {
            context["functionError"] = error.into();
        }
        record["responseContext"] = context;
        record["responsePayload"] = as_json(body);
    }
    record
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::control_plane::model::{Destination, DestinationConfig};

    #[test]
    fn requests_are_checked_against_lambdas_ranges_and_destinations() {
        let account = AccountId("111111111111".into());
        let ok = EventInvokeConfigRequest {
            maximum_retry_attempts: Some(0),
            maximum_event_age_in_seconds: Some(60),
            destination_config: Some(DestinationConfig {
                on_failure: Some(Destination {
                    destination: Some("arn:aws:lambda:local:111111111111:function:failures".into()),
                }),
                on_success: None,
            }),
        };
        assert!(check_request(&account, &ok).is_ok());
        let bad = |f: fn(&mut EventInvokeConfigRequest)| {
            let mut req = ok.clone();
            f(&mut req);
            check_request(&account, &req).unwrap_err().to_string()
        };
        assert!(bad(|r| r.maximum_retry_attempts = Some(3)).contains("MaximumRetryAttempts"));
        assert!(bad(|r| r.maximum_event_age_in_seconds = Some(59)).contains("MaximumEventAge"));
        assert!(bad(|r| r.maximum_event_age_in_seconds = Some(21_601)).contains("MaximumEventAge"));
        let other_account = bad(|r| {
            r.destination_config.as_mut().unwrap().on_failure = Some(Destination {
                destination: Some("arn:aws:lambda:local:222222222222:function:x".into()),
            })
        });
        assert!(
            other_account.contains("not a function of account"),
            "{other_account}"
        );
        let queue = bad(|r| {
            r.destination_config.as_mut().unwrap().on_failure = Some(Destination {
                destination: Some("arn:aws:sqs:local:111111111111:q".into()),
            })
        });
        assert!(queue.contains("Lambda functions"), "{queue}");
    }

    #[test]
    fn a_destination_record_has_lambdas_shape() {
        let record = destination_record(&EventOutcome {
            request_id: "r1",
            function_arn: "arn:aws:lambda:local:111111111111:function:f:$LATEST",
            condition: "RetriesExhausted",
            attempts: 3,
            payload: br#"{"n":1}"#,
            response: Some((
                "$LATEST",
                Some("Unhandled"),
                br#"{"errorType":"Runtime.Trap"}"#,
            )),
        });
        assert_eq!(record["version"], "1.0");
        assert_eq!(record["requestContext"]["condition"], "RetriesExhausted");
        assert_eq!(record["requestContext"]["approximateInvokeCount"], 3);
        assert_eq!(record["requestPayload"]["n"], 1);
        assert_eq!(record["responseContext"]["functionError"], "Unhandled");
        assert_eq!(record["responseContext"]["executedVersion"], "$LATEST");
        assert_eq!(record["responsePayload"]["errorType"], "Runtime.Trap");
        let aged = destination_record(&EventOutcome {
            condition: "EventAgeExceeded",
            response: None,
            payload: b"not json",
            ..EventOutcome {
                request_id: "r2",
                function_arn: "f",
                condition: "",
                attempts: 0,
                payload: b"",
                response: None,
            }
        });
        assert_eq!(aged["requestPayload"], "not json");
        assert!(aged.get("responseContext").is_none());
    }

    #[test]
    fn unset_limits_take_lambdas_defaults() {
        assert_eq!(EventInvokeConfig::attempts(None), 3);
        assert_eq!(EventInvokeConfig::max_age_secs(None), 21_600);
    }
}
