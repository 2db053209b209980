//! Tags on functions: TagResource, UntagResource, ListTags, and `Tags` on
//! CreateFunction, kept in the function's record.

use std::collections::BTreeMap;

use crate::control_plane::functions::{function_key, get_record, ControlPlane, FunctionRecord};
use crate::control_plane::model::{function_arn, FunctionRef};
use crate::control_plane::store::FUNCTIONS;
use crate::error::ApiError;
use crate::ids::AccountId;

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

/// The function a tagging call's resource ARN names: tags belong to the
/// function, not to a version or alias.
fn tagged_function(resource: &str, account: &AccountId) -> Result<String, ApiError> {
    let reference = FunctionRef::parse(resource, account)?;
    if reference.qualifier.is_some() {
        return Err(ApiError::invalid(format!(
            "{resource}: tags are set on a function's unqualified ARN"
        )));
    }
    Ok(reference.name)
}

impl ControlPlane {
    pub fn tag_resource(
        &self,
        account: &AccountId,
        resource: &str,
        tags: BTreeMap<String, String>,
    ) -> Result<(), ApiError> {
        let name = tagged_function(resource, account)?;
        validate_tags(&tags)?;
        self.store.write(|t| {
            let mut record = get_record(t, account, &name)?;
            record.tags.extend(tags.clone());
            validate_tags(&record.tags)?;
            t.put(FUNCTIONS, &function_key(account, &name), &record)?;
            Ok(())
        })
    }

    pub fn untag_resource(
        &self,
        account: &AccountId,
        resource: &str,
        keys: &[String],
    ) -> Result<(), ApiError> {
        let name = tagged_function(resource, account)?;
        self.store.write(|t| {
            let mut record = get_record(t, account, &name)?;
            for key in keys {
                record.tags.remove(key);
            }
            t.put(FUNCTIONS, &function_key(account, &name), &record)?;
            Ok(())
        })
    }

    pub fn list_tags(
        &self,
        account: &AccountId,
        resource: &str,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        let name = tagged_function(resource, account)?;
        self.function_tags(account, &name)
    }

    /// A function's tags, as GetFunction also shows them.
    pub fn function_tags(
        &self,
        account: &AccountId,
        name: &str,
    ) -> Result<BTreeMap<String, String>, ApiError> {
        let snap = self.store.read()?;
        let record: FunctionRecord = snap
            .get(FUNCTIONS, &function_key(account, name))?
            .ok_or_else(|| ApiError::not_found(function_arn(account, name)))?;
        Ok(record.tags)
    }
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
}
