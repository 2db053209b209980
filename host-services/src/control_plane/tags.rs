//! Tags on functions: TagResource, UntagResource, ListTags, and `Tags` on
//! CreateFunction, kept in the function's record.

use std::collections::BTreeMap;

use crate::control_plane::functions::ControlPlane;
use crate::control_plane::model::{validate_tags, FunctionRef};
use crate::error::ApiError;
use crate::ids::AccountId;

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
        self.update_record(account, &name, |record| {
            record.tags.extend(tags.clone());
            validate_tags(&record.tags)
        })
    }

    pub fn untag_resource(
        &self,
        account: &AccountId,
        resource: &str,
        keys: &[String],
    ) -> Result<(), ApiError> {
        let name = tagged_function(resource, account)?;
        self.update_record(account, &name, |record| {
            for key in keys {
                record.tags.remove(key);
            }
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
        let record = self.read_record(account, name)?;
        Ok(record.tags)
    }
}
