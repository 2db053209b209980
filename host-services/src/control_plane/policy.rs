//! Resource-based policies on functions: AddPermission, GetPolicy and
//! RemovePermission, and the check that lets another account invoke a
//! function whose policy allows it.

use serde_json::json;

use crate::control_plane::functions::ControlPlane;
use crate::control_plane::model::{
    function_arn, AddPermissionRequest, FunctionRef, PolicyStatement, LATEST,
};
use crate::error::ApiError;
use crate::ids::AccountId;

const MAX_STATEMENT_ID: usize = 100;

fn check_request(req: &AddPermissionRequest) -> Result<(), ApiError> {
    let sid = &req.statement_id;
    if sid.is_empty()
        || sid.len() > MAX_STATEMENT_ID
        || !sid
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    {
        return Err(ApiError::invalid(format!(
            "StatementId {sid:?}: 1 to {MAX_STATEMENT_ID} of a-z, A-Z, 0-9, '-', '_', '.'"
        )));
    }
    let action_ok = req.action == "*"
        || req.action.strip_prefix("lambda:").is_some_and(|a| {
            a == "*" || (!a.is_empty() && a.chars().all(|c| c.is_ascii_alphabetic()))
        });
    if !action_ok {
        return Err(ApiError::invalid(format!(
            "Action {:?}: expected lambda:ACTION, such as lambda:InvokeFunction",
            req.action
        )));
    }
    if req.principal.is_empty() {
        return Err(ApiError::invalid("Principal is required"));
    }
    Ok(())
}

/// The statement Lambda writes for an AddPermission call.
fn statement(req: &AddPermissionRequest, resource: &str) -> serde_json::Value {
    let p = &req.principal;
    let principal = if p == "*" {
        json!("*")
    } else if p.ends_with(".amazonaws.com") {
        json!({ "Service": p })
    } else if p.len() == 12 && p.chars().all(|c| c.is_ascii_digit()) {
        json!({ "AWS": format!("arn:aws:iam::{p}:root") })
    } else {
        json!({ "AWS": p })
    };
    let mut statement = json!({
        "Sid": req.statement_id,
        "Effect": "Allow",
        "Principal": principal,
        "Action": req.action,
        "Resource": resource,
    });
    let mut condition = serde_json::Map::new();
    if let Some(arn) = &req.source_arn {
        condition.insert("ArnLike".into(), json!({ "AWS:SourceArn": arn }));
    }
    let mut equals = serde_json::Map::new();
    if let Some(account) = &req.source_account {
        equals.insert("AWS:SourceAccount".into(), json!(account));
    }
    if let Some(org) = &req.principal_org_id {
        equals.insert("aws:PrincipalOrgID".into(), json!(org));
    }
    if !equals.is_empty() {
        condition.insert("StringEquals".into(), equals.into());
    }
    if !condition.is_empty() {
        statement["Condition"] = condition.into();
    }
    statement
}

/// Whether `statement` lets `caller` invoke: an invoke action, the
/// caller's account (or anyone) as principal, and no condition a direct
/// call from an account cannot meet (a source resource, an organization;
/// a source account must be the caller's).
fn allows_invoke(statement: &serde_json::Value, caller: &AccountId) -> bool {
    let action = statement["Action"].as_str().unwrap_or_default();
    if !matches!(action, "lambda:InvokeFunction" | "lambda:*" | "*") {
        return false;
    }
    let principal = &statement["Principal"];
    let account_arn = format!("arn:aws:iam::{caller}:");
    let principal_ok = principal == "*"
        || principal["AWS"] == "*"
        || principal["AWS"]
            .as_str()
            .is_some_and(|p| p.starts_with(&account_arn) || p == caller.0);
    if !principal_ok {
        return false;
    }
    let condition = &statement["Condition"];
    let source_account_ok = condition["StringEquals"]["AWS:SourceAccount"]
        .as_str()
        .is_none_or(|a| a == caller.0);
    condition["ArnLike"].is_null()
        && condition["StringEquals"]["aws:PrincipalOrgID"].is_null()
        && source_account_ok
}

impl ControlPlane {
    pub fn add_permission(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        req: AddPermissionRequest,
    ) -> Result<serde_json::Value, ApiError> {
        check_request(&req)?;
        if reference.qualifier.as_deref() == Some(LATEST) {
            return Err(ApiError::invalid(
                "Lambda does not support adding policies to version $LATEST",
            ));
        }
        self.configuration(account, reference)?;
        let mut resource = function_arn(account, &reference.name);
        if let Some(q) = &reference.qualifier {
            resource = format!("{resource}:{q}");
        }
        let statement = statement(&req, &resource);
        self.update_record(account, &reference.name, |record| {
            if record.policy.iter().any(|s| {
                s.qualifier == reference.qualifier && s.statement["Sid"] == req.statement_id
            }) {
                return Err(ApiError::ResourceConflict(format!(
                    "The statement id ({}) provided already exists. Please provide a new statement id, or remove the existing statement.",
                    req.statement_id
                )));
            }
            record.policy.push(PolicyStatement {
                qualifier: reference.qualifier.clone(),
                statement: statement.clone(),
            });
            Ok(statement.clone())
        })
    }

    /// The policy document of a function or one of its qualifiers, and
    /// the function's revision.
    pub fn get_policy(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
    ) -> Result<(serde_json::Value, String), ApiError> {
        let record = self.read_record(account, &reference.name)?;
        let statements: Vec<&serde_json::Value> = record
            .policy
            .iter()
            .filter(|s| s.qualifier == reference.qualifier)
            .map(|s| &s.statement)
            .collect();
        if statements.is_empty() {
            return Err(ApiError::ResourceNotFound(
                "The resource you requested does not exist.".into(),
            ));
        }
        Ok((
            json!({ "Version": "2012-10-17", "Id": "default", "Statement": statements }),
            record.latest.revision_id,
        ))
    }

    pub fn remove_permission(
        &self,
        account: &AccountId,
        reference: &FunctionRef,
        sid: &str,
    ) -> Result<(), ApiError> {
        self.update_record(account, &reference.name, |record| {
            let before = record.policy.len();
            record
                .policy
                .retain(|s| !(s.qualifier == reference.qualifier && s.statement["Sid"] == sid));
            if record.policy.len() == before {
                return Err(ApiError::ResourceNotFound(format!(
                    "Statement {sid} is not found in resource policy."
                )));
            }
            Ok(())
        })
    }

    /// Lets `caller` invoke `owner`'s function only when a statement of
    /// its policy, on the function or on the qualifier invoked, allows
    /// it. A function that is not there is denied the same way, so that
    /// another account learns nothing of what exists.
    pub fn check_invoke_permission(
        &self,
        owner: &AccountId,
        reference: &FunctionRef,
        caller: &AccountId,
    ) -> Result<(), ApiError> {
        let mut resource = function_arn(owner, &reference.name);
        if let Some(q) = &reference.qualifier {
            resource = format!("{resource}:{q}");
        }
        let allowed = self
            .read_record(owner, &reference.name)
            .is_ok_and(|record| {
                record.policy.iter().any(|s| {
                    (s.qualifier.is_none() || s.qualifier == reference.qualifier)
                        && allows_invoke(&s.statement, caller)
                })
            });
        if allowed {
            Ok(())
        } else {
            Err(ApiError::AccessDenied(format!(
                "User: arn:aws:iam::{caller}:root is not authorized to perform: \
                 lambda:InvokeFunction on resource: {resource} because no resource-based \
                 policy allows the lambda:InvokeFunction action"
            )))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn request(principal: &str) -> AddPermissionRequest {
        AddPermissionRequest {
            statement_id: "s1".into(),
            action: "lambda:InvokeFunction".into(),
            principal: principal.into(),
            source_arn: None,
            source_account: None,
            principal_org_id: None,
        }
    }

    #[test]
    fn statements_let_their_principal_invoke_and_no_one_else() {
        let b = AccountId("222222222222".into());
        let c = AccountId("333333333333".into());
        let resource = "arn:aws:lambda:local:111111111111:function:f";
        let for_b = statement(&request("222222222222"), resource);
        assert_eq!(for_b["Principal"]["AWS"], "arn:aws:iam::222222222222:root");
        assert!(allows_invoke(&for_b, &b));
        assert!(!allows_invoke(&for_b, &c));
        assert!(allows_invoke(&statement(&request("*"), resource), &c));
        assert!(!allows_invoke(
            &statement(&request("s3.amazonaws.com"), resource),
            &b
        ));
        let mut other_action = request("222222222222");
        other_action.action = "lambda:GetFunction".into();
        assert!(!allows_invoke(&statement(&other_action, resource), &b));
        let mut from_bucket = request("222222222222");
        from_bucket.source_arn = Some("arn:aws:s3:::bucket".into());
        assert!(!allows_invoke(&statement(&from_bucket, resource), &b));
    }

    #[test]
    fn requests_are_checked() {
        assert!(check_request(&request("222222222222")).is_ok());
        let mut bad = request("222222222222");
        bad.statement_id = "has space".into();
        assert!(check_request(&bad).is_err());
        let mut bad = request("222222222222");
        bad.action = "s3:GetObject".into();
        assert!(check_request(&bad).is_err());
        assert!(check_request(&request("")).is_err());
    }
}
