//! What a front end and a worker host say to each other (postcard over
//! the fleet's TLS): an invocation and, when the host must start an
//! environment for it, the launch; the invocation's outcome; artifacts and
//! data keys fetched with a grant.

use std::time::{Duration, Instant};

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use vmm::devices::virtio::block::sealed::ArtifactId;

use crate::artifacts::sealed::GrantedArtifact;
use crate::control_plane::functions::CodeDrive;
use crate::data_plane::environment::{ColdStart, Invocation, Launch};
use crate::data_plane::router::{RouteError, Routed};
use crate::data_plane::runtime_api::Outcome;
use crate::error::ApiError;
use crate::ids::{AccountId, VersionKey};
use crate::security::key_service::{Grant, WrappedKey};

pub const INVOKE: &str = "/fleet/v1/invoke";
pub const RETIRE: &str = "/fleet/v1/retire";
pub const PROVISION: &str = "/fleet/v1/provision";
pub const ARTIFACT: &str = "/fleet/v1/artifact";
pub const DATA_KEY: &str = "/fleet/v1/data-key";

/// A [`Launch`] as it travels: only sealed code disks do (their bytes are
/// fetched by the worker host, still sealed, with the grant).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct WireLaunch {
    pub function_arn: String,
    pub memory_mib: u32,
    pub code: GrantedArtifact,
    pub layers: Option<GrantedArtifact>,
    pub variables: Vec<(String, String)>,
    pub runtime: String,
    pub snap_start: bool,
}

impl WireLaunch {
    pub fn from_launch(launch: Launch) -> Result<Self, ApiError> {
        let CodeDrive::Sealed(code) = launch.code else {
            return Err(ApiError::InvalidParameterValue(
                "container image functions do not run in a fleet yet (docs/fleet.md)".into(),
            ));
        };
        Ok(WireLaunch {
            function_arn: launch.function_arn,
            memory_mib: launch.memory_mib,
            code,
            layers: launch.layers,
            variables: launch.variables,
            runtime: launch.runtime,
            snap_start: launch.snap_start,
        })
    }

    pub fn into_launch(self, key: VersionKey) -> Launch {
        Launch {
            key,
            function_arn: self.function_arn,
            memory_mib: self.memory_mib,
            code: CodeDrive::Sealed(self.code),
            layers: self.layers,
            variables: self.variables,
            runtime: self.runtime,
            snap_start: self.snap_start,
        }
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct InvokeRequest {
    pub key: VersionKey,
    /// Given when the front end expects a cold start, or was told one is
    /// needed.
    pub launch: Option<WireLaunch>,
    /// The front end the artifacts and keys come from.
    pub front_end: String,
    pub request_id: String,
    #[serde(with = "serde_bytes")]
    pub payload: Vec<u8>,
    pub timeout_ms: u64,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum InvokeAnswer {
    Done(WireRouted),
    /// No idle environment of the version, and no launch to start one.
    NeedsLaunch,
    /// The host has no room for another environment.
    Full,
    Failed(WireFailure),
}

#[derive(Debug, Serialize, Deserialize)]
pub struct WireRouted {
    #[serde(with = "serde_bytes")]
    pub response: Vec<u8>,
    /// The function's error type, when it failed.
    pub error_type: Option<String>,
    pub log: Vec<String>,
    pub duration_us: u64,
    pub max_memory_mib: Option<u64>,
    pub environment: String,
    /// Init (false) or Restore (true) duration, for a cold start.
    pub cold_start: Option<(bool, u64)>,
    /// The host's idle environments of the version once this one was
    /// released.
    pub idle_after: u32,
}

#[derive(Debug, Serialize, Deserialize)]
pub enum WireFailure {
    Service(String),
    /// What the launch named could not be started (a bad entry point).
    Launch(String),
    InitFailed {
        error_type: String,
        body: String,
    },
    TimedOut(u64),
    EnvironmentFailed,
}

impl WireRouted {
    pub fn new(routed: Routed, idle_after: usize) -> Self {
        let (response, error_type) = match routed.invocation.outcome {
            Outcome::Response(body) => (body.to_vec(), None),
            Outcome::FunctionError { error_type, body } => (body.to_vec(), Some(error_type)),
        };
        WireRouted {
            response,
            error_type,
            log: routed.invocation.log,
            duration_us: routed.invocation.duration.as_micros() as u64,
            max_memory_mib: routed.invocation.max_memory_mib,
            environment: routed.environment,
            cold_start: routed.cold_start.map(|c| match c {
                ColdStart::Init(d) => (false, d.as_micros() as u64),
                ColdStart::Restore(d) => (true, d.as_micros() as u64),
            }),
            idle_after: idle_after.min(u32::MAX as usize) as u32,
        }
    }

    /// The invocation as the front end's worker reports it; the cold
    /// start's step-by-step trace stays in the worker host's log.
    pub fn into_routed(self, host: &str) -> Routed {
        let body = Bytes::from(self.response);
        let answered = Instant::now();
        Routed {
            invocation: Invocation {
                outcome: match self.error_type {
                    None => Outcome::Response(body),
                    Some(error_type) => Outcome::FunctionError { error_type, body },
                },
                log: self.log,
                duration: Duration::from_micros(self.duration_us),
                max_memory_mib: self.max_memory_mib,
                delivered: None,
                answered,
            },
            environment: format!("{host}/{}", self.environment),
            cold_start: self.cold_start.map(|(restore, us)| {
                let d = Duration::from_micros(us);
                if restore {
                    ColdStart::Restore(d)
                } else {
                    ColdStart::Init(d)
                }
            }),
            trace: None,
        }
    }
}

impl WireFailure {
    pub fn new(error: RouteError) -> Self {
        match error {
            RouteError::Api(e) => WireFailure::Service(e.to_string()),
            RouteError::Launch(e) => WireFailure::Launch(e.to_string()),
            RouteError::InitFailed { error_type, body } => {
                WireFailure::InitFailed { error_type, body }
            }
            RouteError::TimedOut(t) => WireFailure::TimedOut(t.as_millis() as u64),
            RouteError::EnvironmentFailed => WireFailure::EnvironmentFailed,
        }
    }

    pub fn into_route_error(self, host: &str) -> RouteError {
        match self {
            WireFailure::Service(m) => ApiError::Service(format!("worker host {host}: {m}")).into(),
            WireFailure::Launch(m) => RouteError::Launch(ApiError::InvalidParameterValue(m)),
            WireFailure::InitFailed { error_type, body } => {
                RouteError::InitFailed { error_type, body }
            }
            WireFailure::TimedOut(ms) => RouteError::TimedOut(Duration::from_millis(ms)),
            WireFailure::EnvironmentFailed => RouteError::EnvironmentFailed,
        }
    }
}

/// What a front end asks a worker host about provisioned concurrency.
#[derive(Debug, Serialize, Deserialize)]
pub enum ProvisionRequest {
    /// The host's share, from the front end that leads provisioning:
    /// every version it is to keep environments of, and how many;
    /// versions not listed keep none there.
    Keep {
        front_end: String,
        targets: Vec<(VersionKey, WireLaunch, usize)>,
    },
    /// Only what the host holds of these versions, changing nothing: from
    /// a front end that does not lead provisioning.
    Observe(Vec<VersionKey>),
}

#[derive(Debug, Default, Serialize, Deserialize)]
pub struct ProvisionAnswer {
    /// Provisioned environments per version, after the pass.
    pub provisioned: Vec<(VersionKey, usize)>,
    /// Idle environments per version, after the pass.
    pub idle: Vec<(VersionKey, u32)>,
    /// Versions whose environments failed to start; `None` when the host
    /// was full.
    pub failures: Vec<(VersionKey, Option<WireFailure>)>,
}

/// Stop the idle environments of a function: every version of a deleted
/// one, `$LATEST` of an updated one.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Retire {
    pub account: AccountId,
    pub function: String,
    pub deleted: bool,
}

impl Retire {
    pub fn covers(&self, key: &VersionKey) -> bool {
        key.account == self.account
            && key.function == self.function
            && (self.deleted || key.version == crate::control_plane::model::LATEST)
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct DataKeyRequest {
    pub grant: Grant,
    pub artifact: ArtifactId,
    pub wrapped: WrappedKey,
}

pub fn encode<T: Serialize>(message: &T) -> Bytes {
    postcard::to_allocvec(message)
        .expect("fleet messages serialize")
        .into()
}

pub fn decode<'a, T: Deserialize<'a>>(bytes: &'a [u8]) -> Result<T, String> {
    postcard::from_bytes(bytes).map_err(|e| format!("a malformed fleet message: {e}"))
}
