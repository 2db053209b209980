//! What an account stores and reserves on this worker, for
//! GetAccountSettings.

use crate::control_plane::functions::{ControlPlane, FunctionRecord};
use crate::control_plane::layers::LayerVersion;
use crate::control_plane::model::FunctionConfiguration;
use crate::control_plane::store::{FUNCTIONS, LAYERS, VERSIONS};
use crate::error::ApiError;
use crate::ids::AccountId;

/// An account's use of the worker, as GetAccountSettings reports it.
#[derive(Debug, Default, Clone, Copy)]
pub struct AccountUsage {
    pub function_count: u64,
    /// Bytes of code in functions, their versions and layers.
    pub total_code_size: u64,
    pub reserved_concurrency: u64,
}

impl ControlPlane {
    /// What `account` stores and reserves, for GetAccountSettings.
    pub fn account_usage(&self, account: &AccountId) -> Result<AccountUsage, ApiError> {
        let snap = self.store.read()?;
        let records: Vec<(String, FunctionRecord)> = snap.scan(FUNCTIONS, &account.0)?;
        let mut usage = AccountUsage {
            function_count: records.len() as u64,
            ..AccountUsage::default()
        };
        for (key, record) in &records {
            usage.total_code_size += record.latest.code_size;
            usage.reserved_concurrency += u64::from(record.reserved_concurrency.unwrap_or(0));
            for (_, version) in snap.scan::<FunctionConfiguration>(VERSIONS, key)? {
                usage.total_code_size += version.code_size;
            }
        }
        for (_, layer) in snap.scan::<LayerVersion>(LAYERS, &account.0)? {
            usage.total_code_size += layer.content.code_size;
        }
        Ok(usage)
    }
}
