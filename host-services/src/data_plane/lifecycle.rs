//! Why each execution environment was created and destroyed: logged, and
//! appended as JSON lines to `logs/environments.jsonl` in the data
//! directory, so that placement can be audited after the fact.

use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

use crate::ids::VersionKey;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum CreateReason {
    /// An invocation found no idle environment: a cold start.
    NewInvocation,
    /// A provisioned concurrency config asked for more environments.
    ProvisionedConcurrency,
    /// Replaces a provisioned environment whose own lease ran out.
    EnvironmentLeaseExpired,
    /// Replaces a provisioned environment on a worker that is draining.
    WorkerLeaseExpired,
    /// Replaces a provisioned environment that failed an invocation.
    EnvironmentFailed,
    /// Initializes a SnapStart version when it is published, to snapshot
    /// it.
    SnapStart,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum DestroyReason {
    /// Idle for longer than the idle timeout.
    IdleExpired,
    /// Older than the environment lease.
    LeaseExpired,
    /// Its worker's lease is ending: the worker drains and exits.
    WorkerLeaseExpired,
    /// The function's code or configuration changed, or it was deleted.
    FunctionUpdated,
    /// Its slot went to another version when the worker was full.
    Rebalancing,
    ProvisionedConcurrencyChange,
    /// An invocation timed out or the microVM failed.
    InvocationFailed,
    WorkerShutdown,
    /// Its SnapStart snapshot is taken; cold starts restore that.
    SnapshotTaken,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct LifecycleEvent {
    pub environment: String,
    pub worker: String,
    pub account: String,
    pub function: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<CreateReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<DestroyReason>,
    /// The jail the environment's VMM runs in; absent when it runs
    /// unjailed (`--no-jail`) and on destruction.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub jail: Option<String>,
    pub at_ms: u128,
}

/// The record of environment creations and destructions.
pub struct Lifecycle {
    file: Mutex<std::fs::File>,
}

impl Lifecycle {
    /// Appends to `path`.
    pub fn open(path: PathBuf) -> std::io::Result<Self> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Lifecycle {
            file: Mutex::new(file),
        })
    }

    pub fn created(
        &self,
        environment: &str,
        worker: &str,
        key: &VersionKey,
        why: CreateReason,
        jail: Option<&str>,
    ) {
        let how = match jail {
            Some(jail) => format!("through the jailer, in jail {jail}"),
            None => "UNJAILED".to_string(),
        };
        tracing::info!("environment {environment} for {key} created on {worker} {how}: {why:?}");
        self.append(environment, worker, key, Some(why), None, jail);
    }

    pub fn destroyed(&self, environment: &str, worker: &str, key: &VersionKey, why: DestroyReason) {
        tracing::info!("environment {environment} for {key} destroyed on {worker}: {why:?}");
        self.append(environment, worker, key, None, Some(why), None);
    }

    fn append(
        &self,
        environment: &str,
        worker: &str,
        key: &VersionKey,
        created: Option<CreateReason>,
        destroyed: Option<DestroyReason>,
        jail: Option<&str>,
    ) {
        let event = LifecycleEvent {
            environment: environment.to_string(),
            worker: worker.to_string(),
            account: key.account.0.clone(),
            function: key.function.clone(),
            version: key.version.clone(),
            created,
            destroyed,
            jail: jail.map(str::to_string),
            at_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
        };
        let Ok(mut line) = serde_json::to_vec(&event) else {
            return;
        };
        line.push(b'\n');
        let mut file = self.file.lock().unwrap_or_else(|e| e.into_inner());
        if let Err(e) = file.write_all(&line) {
            tracing::warn!("cannot record an environment event: {e}");
        }
    }
}
