//! The worker: control plane, credentials and invoke router together, plus
//! the per-invocation log (START/END/REPORT) and the durable queue of
//! asynchronous events.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use base64::Engine as _;
use bytes::Bytes;
use guest_init::environ;
use serde::{Deserialize, Serialize};

use crate::control_plane::event_config::{destination_function, destination_record, EventOutcome};
use crate::control_plane::functions::{
    split_by_share, CodeDrive, ControlPlane, ProvisionedConfig, Resolved,
};
use crate::control_plane::model::{function_arn, EventInvokeConfig, FunctionRef, LATEST, REGION};
use crate::control_plane::store::EVENTS;
use crate::data_plane::environment::{ColdStart, Launch};
use crate::data_plane::fleet_wire::Retire;
use crate::data_plane::host::{SnapStartError, StartError};
use crate::data_plane::placement::Placement;
use crate::data_plane::router::RouteError;
use crate::data_plane::runtime_api::Outcome;
use crate::error::ApiError;
use crate::ids::{AccountId, VersionKey};
use crate::security::auth::Credentials;
use crate::security::role_credentials::RoleCredentialIssuer;

/// Lambda retries a failed asynchronous event twice.
const EVENT_RETRY_DELAY: Duration = Duration::from_millis(500);

/// How often a fleet's front end looks for the Event invocations of front
/// ends that left, to run them.
const ADOPT_EVERY: Duration = Duration::from_secs(2);

/// Where the runtime finds the Runtime API, inside the guest.
const RUNTIME_API_ADDRESS: &str = "127.0.0.1:9001";

pub struct Worker {
    pub control: ControlPlane,
    pub credentials: Credentials,
    pub placement: Placement,
    roles: Arc<RoleCredentialIssuer>,
    /// How long an environment may live: its credentials must last as
    /// long.
    environment_lease: Duration,
    logs: PathBuf,
    capacity: usize,
    events: tokio::sync::mpsc::UnboundedSender<String>,
    /// Wakes the provisioner when a config changes.
    provisioner: tokio::sync::Notify,
    /// Wakes the SnapStart task when a version may have been published.
    snap_starter: tokio::sync::Notify,
    /// Provisioned concurrency configs whose environments failed to
    /// start, with the reason; retried when the config is put again.
    provisioning_failures: std::sync::Mutex<HashMap<String, String>>,
}

/// How often provisioned concurrency is reconciled without a change: it
/// replaces environments whose lease ran out and follows moved aliases.
const PROVISIONER_PERIOD: Duration = Duration::from_secs(1);

/// A provisioned concurrency config's state, as Lambda reports it.
pub struct ProvisionedStatus {
    pub allocated: u32,
    pub status: &'static str,
    pub reason: Option<String>,
}

/// What Invoke answers: the body, and `X-Amz-Function-Error` if the
/// function failed.
pub struct InvokeResult {
    pub status_error: Option<&'static str>,
    pub body: Bytes,
    pub log: String,
}

#[derive(Debug, Serialize, Deserialize)]
struct QueuedEvent {
    account: String,
    function: String,
    qualifier: Option<String>,
    payload: String,
    attempts: u32,
    /// When it was accepted, in ms since the epoch (none in events queued
    /// before the field existed: their age is not known).
    #[serde(default)]
    accepted_ms: Option<u64>,
    /// Taken over from a fleet's front end that left.
    #[serde(default)]
    adopted: bool,
}

fn epoch_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

fn error_body(error_type: &str, message: &str) -> Bytes {
    serde_json::json!({ "errorMessage": message, "errorType": error_type })
        .to_string()
        .into()
}

impl Worker {
    pub fn new(
        control: ControlPlane,
        credentials: Credentials,
        placement: Placement,
        roles: Arc<RoleCredentialIssuer>,
        data_dir: &std::path::Path,
        capacity: usize,
        environment_lease: Duration,
    ) -> std::io::Result<Arc<Self>> {
        let logs = data_dir.join("logs");
        std::fs::create_dir_all(&logs)?;
        let (events, queue) = tokio::sync::mpsc::unbounded_channel();
        let worker = Arc::new(Worker {
            control,
            credentials,
            placement,
            roles,
            environment_lease,
            logs,
            capacity,
            events,
            provisioner: tokio::sync::Notify::new(),
            snap_starter: tokio::sync::Notify::new(),
            provisioning_failures: Default::default(),
        });
        worker.clone().spawn_event_processor(queue);
        worker.clone().spawn_provisioner();
        worker.clone().spawn_snap_starter();
        Ok(worker)
    }

    /// Environments the whole fleet can hold.
    pub fn capacity(&self) -> usize {
        self.placement.fleet_capacity().unwrap_or(self.capacity)
    }

    /// What starting an environment for `resolved` takes.
    fn launch(&self, resolved: &Resolved) -> Result<Launch, ApiError> {
        let config = &resolved.config;
        let disks = self.control.code_disks(&resolved.key.account, config)?;
        let image = match &disks.code {
            CodeDrive::Image { launch, .. } => Some(launch),
            CodeDrive::Sealed(_) => None,
        };
        let role =
            self.roles
                .credentials(&resolved.key.account, &config.role, self.environment_lease);
        let handler = image.map_or(config.handler.clone(), |i| i.handler.clone());
        let ours: Vec<(String, String)> = [
            ("AWS_LAMBDA_FUNCTION_NAME", config.function_name.clone()),
            ("AWS_LAMBDA_FUNCTION_VERSION", config.version.clone()),
            (
                "AWS_LAMBDA_FUNCTION_MEMORY_SIZE",
                config.memory_size.to_string(),
            ),
            (
                "AWS_LAMBDA_LOG_GROUP_NAME",
                format!("/aws/lambda/{}", config.function_name),
            ),
            ("AWS_REGION", REGION.into()),
            ("AWS_DEFAULT_REGION", REGION.into()),
            (
                "AWS_EXECUTION_ENV",
                format!("AWS_Lambda_{}", config.runtime),
            ),
            ("AWS_LAMBDA_RUNTIME_API", RUNTIME_API_ADDRESS.into()),
            ("_HANDLER", handler),
            ("LAMBDA_TASK_ROOT", "/var/task".into()),
            ("LAMBDA_RUNTIME_DIR", "/var/runtime".into()),
            ("TZ", ":UTC".into()),
            ("AWS_ACCESS_KEY_ID", role.access_key_id),
            ("AWS_SECRET_ACCESS_KEY", role.secret_access_key),
            ("AWS_SESSION_TOKEN", role.session_token),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        // Lambda names no runtime for an image.
        let ours = ours
            .into_iter()
            .filter(|(k, _)| k != "AWS_EXECUTION_ENV" || !config.runtime.is_empty());
        // An image's ENV first: Lambda's variables and then the user's
        // replace what it sets.
        let mut variables: Vec<(String, String)> = image.map(|i| i.env.clone()).unwrap_or_default();
        let user = config.environment.iter().flat_map(|e| e.variables.clone());
        for (k, v) in ours.into_iter().chain(user) {
            variables.retain(|(key, _)| *key != k);
            variables.push((k, v));
        }
        if let Some(image) = image {
            variables.push((environ::IMAGE_WORKDIR.into(), image.working_dir.clone()));
            variables.extend(
                image
                    .argv
                    .iter()
                    .enumerate()
                    .map(|(i, arg)| (format!("{}{i}", environ::IMAGE_ARG), arg.clone())),
            );
        }
        Ok(Launch {
            key: resolved.key.clone(),
            function_arn: config.function_arn.clone(),
            memory_mib: config.memory_size,
            code: disks.code,
            layers: disks.layers,
            variables,
            runtime: config.runtime.clone(),
            snap_start: config.snap_start_on(),
        })
    }

    /// Runs one synchronous invocation of `resolved`, whose request
    /// `arrived` then (the origin of a cold start's trace).
    pub async fn invoke(
        &self,
        resolved: &Resolved,
        request_id: &str,
        payload: Bytes,
        arrived: Instant,
    ) -> Result<InvokeResult, ApiError> {
        let config = &resolved.config;
        config.check_invocable()?;
        let timeout = Duration::from_secs(config.timeout.into());
        let routed = self
            .placement
            .invoke(
                &resolved.key,
                || self.launch(resolved),
                resolved.reserved_concurrency,
                request_id,
                payload,
                timeout,
            )
            .await;
        let (status_error, body, lines, report) = match routed {
            Ok(mut r) => {
                if let Some(trace) = &mut r.trace {
                    if let Some(delivered) = r.invocation.delivered {
                        trace.mark_at("event delivered", delivered);
                    }
                    trace.mark_at("answered", r.invocation.answered);
                    tracing::info!(
                        target: "cold_start",
                        "{request_id} in {}: {}",
                        r.environment,
                        trace.line(arrived)
                    );
                }
                let report = Report {
                    duration: r.invocation.duration,
                    max_memory_mib: r.invocation.max_memory_mib,
                    cold_start: r.cold_start,
                };
                match r.invocation.outcome {
                    Outcome::Response(body) => (None, body, r.invocation.log, Some(report)),
                    Outcome::FunctionError { body, .. } => {
                        (Some("Unhandled"), body, r.invocation.log, Some(report))
                    }
                }
            }
            Err(RouteError::Launch(
                ApiError::InvalidParameterValue(m) | ApiError::InvalidZipFile(m),
            )) => {
                let log = self.log(
                    resolved,
                    request_id,
                    &[format!("Runtime.InvalidEntrypoint: {m}")],
                    None,
                );
                return Ok(InvokeResult {
                    status_error: Some("Unhandled"),
                    body: error_body("Runtime.InvalidEntrypoint", &m),
                    log,
                });
            }
            Err(RouteError::Api(e) | RouteError::Launch(e)) => return Err(e),
            Err(RouteError::TimedOut(t)) => {
                let message = format!(
                    "{request_id} Task timed out after {:.2} seconds",
                    t.as_secs_f64()
                );
                (
                    Some("Unhandled"),
                    error_body("Sandbox.Timedout", &message),
                    vec![message],
                    None,
                )
            }
            Err(RouteError::InitFailed { error_type, body }) => {
                let line = format!("INIT_REPORT Status: error Error Type: {error_type}");
                (Some("Unhandled"), body.into(), vec![line], None)
            }
            Err(e @ RouteError::EnvironmentFailed) => (
                Some("Unhandled"),
                error_body("Runtime.ExitError", &e.to_string()),
                vec![e.to_string()],
                None,
            ),
        };
        let log = self.log(resolved, request_id, &lines, report);
        Ok(InvokeResult {
            status_error,
            body,
            log,
        })
    }

    /// Writes the invocation's log, framed as Lambda frames it, to the
    /// version's log file, and returns it.
    fn log(
        &self,
        resolved: &Resolved,
        request_id: &str,
        lines: &[String],
        report: Option<Report>,
    ) -> String {
        let config = &resolved.config;
        let mut log = format!(
            "START RequestId: {request_id} Version: {}\n",
            config.version
        );
        for line in lines {
            log.push_str(line);
            log.push('\n');
        }
        log.push_str(&format!("END RequestId: {request_id}\n"));
        if let Some(r) = report {
            let ms = r.duration.as_secs_f64() * 1000.0;
            log.push_str(&format!(
                "REPORT RequestId: {request_id}\tDuration: {ms:.2} ms\tBilled Duration: {} ms\tMemory Size: {} MB",
                ms.ceil() as u64,
                config.memory_size
            ));
            if let Some(m) = r.max_memory_mib {
                log.push_str(&format!("\tMax Memory Used: {m} MB"));
            }
            let cold_start = match r.cold_start {
                Some(ColdStart::Init(d)) => Some(("Init", d)),
                Some(ColdStart::Restore(d)) => Some(("Restore", d)),
                None => None,
            };
            if let Some((what, d)) = cold_start {
                log.push_str(&format!(
                    "\t{what} Duration: {:.2} ms",
                    d.as_secs_f64() * 1000.0
                ));
            }
            log.push('\n');
        }
        let dir = self
            .logs
            .join(&resolved.key.account.0)
            .join(&config.function_name);
        let file = dir.join(format!("{}.log", config.version.replace('$', "")));
        let written = std::fs::create_dir_all(&dir).and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&file)?
                .write_all(log.as_bytes())
        });
        if let Err(e) = written {
            tracing::warn!("cannot write the log {}: {e}", file.display());
        }
        log
    }

    /// Stops the idle environments of a function whose `$LATEST` changed,
    /// or of every version when `name` is deleted, and forgets their
    /// snapshots.
    pub async fn retire_function(&self, account: &AccountId, name: &str) {
        let deleted = self
            .control
            .configuration(
                account,
                &FunctionRef {
                    name: name.into(),
                    qualifier: None,
                },
            )
            .is_err();
        self.placement
            .retire(Retire {
                account: account.clone(),
                function: name.to_string(),
                deleted,
            })
            .await;
    }

    /// Tells the SnapStart task that a version may have been published.
    pub fn published(&self) {
        self.snap_starter.notify_one();
    }

    /// Takes the snapshot of each SnapStart version waiting for one (also
    /// those a previous run of the worker left waiting).
    fn spawn_snap_starter(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                if self.snap_start_pending().await {
                    let _ = tokio::time::timeout(PROVISIONER_PERIOD, self.snap_starter.notified())
                        .await;
                } else {
                    self.snap_starter.notified().await;
                }
            }
        });
    }

    /// Snapshots the pending SnapStart versions, one at a time; each
    /// becomes Active, or Failed with the reason. Returns whether some
    /// are left to retry (the workers were full).
    async fn snap_start_pending(&self) -> bool {
        let pending = match self.control.pending_snap_starts() {
            Ok(pending) => pending,
            Err(e) => {
                tracing::error!("cannot read the versions waiting for SnapStart: {e}");
                return true;
            }
        };
        let mut retry = false;
        for (account, name, version) in pending {
            let reference = FunctionRef {
                name: name.clone(),
                qualifier: Some(version.clone()),
            };
            let launch = self
                .control
                .resolve(&account, &reference)
                .and_then(|resolved| self.launch(&resolved));
            let result = match launch {
                Ok(launch) => match self.placement.snap_start(&launch).await {
                    Ok(()) => Ok(()),
                    Err(SnapStartError::Start(StartError::Full)) => {
                        retry = true;
                        continue;
                    }
                    Err(e @ SnapStartError::NotInFleet) => Err(e.to_string()),
                    Err(e) => Err(format!("the version's init failed: {e}")),
                },
                Err(e) => Err(e.to_string()),
            };
            match &result {
                Ok(()) => {
                    tracing::info!("{account}/{name}:{version}: SnapStart snapshot taken; Active")
                }
                Err(e) => tracing::warn!("{account}/{name}:{version}: SnapStart failed: {e}"),
            }
            if let Err(e) = self
                .control
                .finish_snap_start(&account, &name, &version, result)
            {
                tracing::error!("{account}/{name}:{version}: cannot record its SnapStart: {e}");
                retry = true;
            }
        }
        retry
    }

    /// Reconciles provisioned concurrency at start (configs survive a
    /// restart), on every change and every [`PROVISIONER_PERIOD`].
    fn spawn_provisioner(self: Arc<Self>) {
        tokio::spawn(async move {
            loop {
                self.reconcile_provisioned().await;
                let _ = tokio::time::timeout(PROVISIONER_PERIOD, self.provisioner.notified()).await;
            }
        });
    }

    fn failures(&self) -> std::sync::MutexGuard<'_, HashMap<String, String>> {
        self.provisioning_failures
            .lock()
            .unwrap_or_else(|e| e.into_inner())
    }

    async fn reconcile_provisioned(&self) {
        let configs = match self.control.all_provisioned() {
            Ok(c) => c,
            Err(e) => return tracing::error!("cannot read provisioned concurrency configs: {e}"),
        };
        // A front end that does not lead provisioning only learns what
        // the hosts hold: it needs the versions, not their launches.
        let leading = self.placement.leads_provisioning().await;
        let mut observed: Vec<VersionKey> = Vec::new();
        let mut targets: HashMap<VersionKey, (Launch, usize)> = HashMap::new();
        let mut configs_of: HashMap<VersionKey, Vec<String>> = HashMap::new();
        for config in configs {
            let id = config.id();
            if self.failures().contains_key(&id) {
                continue;
            }
            let launches = self.provisioned_targets(&config).and_then(|versions| {
                if !leading {
                    observed.extend(versions.into_iter().map(|(resolved, _)| resolved.key));
                    return Ok(Vec::new());
                }
                versions
                    .iter()
                    .map(|(resolved, n)| Ok((self.launch(resolved)?, *n)))
                    .collect::<Result<Vec<_>, ApiError>>()
            });
            match launches {
                Ok(launches) => {
                    for (launch, n) in launches {
                        configs_of
                            .entry(launch.key.clone())
                            .or_default()
                            .push(id.clone());
                        targets.entry(launch.key.clone()).or_insert((launch, 0)).1 += n;
                    }
                }
                Err(e) => {
                    tracing::warn!("provisioned concurrency for {id}: {e}");
                    self.failures().insert(id, e.to_string());
                }
            }
        }
        if !leading {
            return self.placement.observe_provisioned(&observed).await;
        }
        let targets: Vec<(Launch, usize)> = targets.into_values().collect();
        for (key, error) in self.placement.reconcile_provisioned(&targets).await {
            if matches!(error, RouteError::Api(ApiError::TooManyRequests { .. })) {
                // The fleet is full for now; a later pass retries.
                continue;
            }
            tracing::warn!("provisioned concurrency for {key}: {error}");
            for id in configs_of.remove(&key).unwrap_or_default() {
                self.failures().insert(id, error.to_string());
            }
        }
    }

    /// The versions a provisioned config keeps environments of, and how
    /// many of each: a weighted alias's split by its weights.
    fn provisioned_targets(
        &self,
        config: &ProvisionedConfig,
    ) -> Result<Vec<(Resolved, usize)>, ApiError> {
        let reference = FunctionRef {
            name: config.function_name.clone(),
            qualifier: Some(config.qualifier.clone()),
        };
        let versions = self
            .control
            .resolve_weighted(&AccountId(config.account.clone()), &reference)?;
        let shares: Vec<f64> = versions.iter().map(|(_, share)| *share).collect();
        let split = split_by_share(config.requested, &shares);
        Ok(versions
            .into_iter()
            .zip(split)
            .map(|((resolved, _), n)| (resolved, n as usize))
            .collect())
    }

    /// Wakes the provisioner after a config changed; a config put again
    /// gets a fresh try.
    pub fn provisioned_changed(&self, config: &ProvisionedConfig) {
        self.failures().remove(&config.id());
        self.provisioner.notify_one();
    }

    pub fn provisioned_status(&self, config: &ProvisionedConfig) -> ProvisionedStatus {
        if let Some(reason) = self.failures().get(&config.id()) {
            return ProvisionedStatus {
                allocated: 0,
                status: "FAILED",
                reason: Some(reason.clone()),
            };
        }
        let allocated = self.provisioned_targets(config).map_or(0, |versions| {
            versions
                .iter()
                .map(|(resolved, n)| self.placement.provisioned(&resolved.key).min(*n))
                .sum::<usize>()
        }) as u32;
        ProvisionedStatus {
            allocated,
            status: if allocated >= config.requested {
                "READY"
            } else {
                "IN_PROGRESS"
            },
            reason: None,
        }
    }

    /// Accepts an asynchronous event: stored before this returns, so a
    /// restart does not lose it.
    pub fn enqueue_event(
        &self,
        id: &str,
        account: &AccountId,
        reference: &FunctionRef,
        payload: &[u8],
    ) -> Result<(), ApiError> {
        let event = QueuedEvent {
            account: account.0.clone(),
            function: reference.name.clone(),
            qualifier: reference.qualifier.clone(),
            payload: base64::engine::general_purpose::STANDARD.encode(payload),
            attempts: 0,
            accepted_ms: Some(epoch_ms()),
            adopted: false,
        };
        self.control.store.write(|t| t.put(EVENTS, id, &event))?;
        self.mirror_event(id, &event);
        let _ = self.events.send(id.to_string());
        Ok(())
    }

    fn spawn_event_processor(
        self: Arc<Self>,
        mut queue: tokio::sync::mpsc::UnboundedReceiver<String>,
    ) {
        tokio::spawn(async move {
            self.resume_events().await;
            tokio::spawn(self.clone().adopt_events());
            while let Some(id) = queue.recv().await {
                let worker = self.clone();
                tokio::spawn(async move { worker.run_event(id).await });
            }
        });
    }

    async fn run_event(self: Arc<Self>, id: String) {
        let event: QueuedEvent = match self.control.store.read().and_then(|s| s.get(EVENTS, &id)) {
            Ok(Some(e)) => e,
            Ok(None) => return,
            Err(e) => return tracing::error!("event {id}: {e}"),
        };
        let account = AccountId(event.account.clone());
        let reference = FunctionRef {
            name: event.function.clone(),
            qualifier: event.qualifier.clone(),
        };
        let payload = base64::engine::general_purpose::STANDARD
            .decode(&event.payload)
            .unwrap_or_default();
        let config = self
            .control
            .event_invoke_config(&account, &reference)
            .unwrap_or(None);
        let age_ms = event
            .accepted_ms
            .map_or(0, |at| epoch_ms().saturating_sub(at));
        if age_ms > u64::from(EventInvokeConfig::max_age_secs(config.as_ref())) * 1000 {
            self.finish_event(
                &id,
                &event,
                &payload,
                config.as_ref(),
                "EventAgeExceeded",
                None,
            );
            return;
        }
        let (executed, result) = match self.control.resolve(&account, &reference) {
            Ok(resolved) => (
                resolved.config.version.clone(),
                self.invoke(&resolved, &id, payload.clone().into(), Instant::now())
                    .await,
            ),
            Err(e) => (String::new(), Err(e)),
        };
        let attempts = event.attempts + 1;
        let done = match &result {
            Ok(r) if r.status_error.is_none() => true,
            // The function is gone: nothing left to retry against.
            Err(ApiError::ResourceNotFound(_)) => true,
            // Throttles and the worker's own failures (a fleet's host lost
            // or unreachable) are not the function's attempts: retried
            // until the event is too old, as Lambda retries them.
            Err(ApiError::TooManyRequests { .. } | ApiError::Service(_)) => false,
            _ => attempts >= EventInvokeConfig::attempts(config.as_ref()),
        };
        if done {
            let event = QueuedEvent { attempts, ..event };
            let (condition, response) = match &result {
                Ok(r) => (
                    if r.status_error.is_none() {
                        "Success"
                    } else {
                        "RetriesExhausted"
                    },
                    Some((executed.as_str(), r.status_error, &r.body[..])),
                ),
                Err(_) => ("RetriesExhausted", None),
            };
            if condition != "Success" {
                tracing::warn!("event {id} failed after {attempts} attempts");
            }
            self.finish_event(&id, &event, &payload, config.as_ref(), condition, response);
            return;
        }
        let retry = QueuedEvent {
            attempts: if matches!(
                result,
                Err(ApiError::TooManyRequests { .. } | ApiError::Service(_))
            ) {
                event.attempts
            } else {
                attempts
            },
            ..event
        };
        if let Err(e) = self.control.store.write(|t| t.put(EVENTS, &id, &retry)) {
            return tracing::error!("event {id}: {e}");
        }
        self.mirror_event(&id, &retry);
        tokio::time::sleep(EVENT_RETRY_DELAY).await;
        let _ = self.events.send(id);
    }

    /// Ends an event: its record goes to the destination its config
    /// names for how it ended, as a new event, in the same write that
    /// takes the event off the queue, so that a restart neither loses nor
    /// repeats it.
    fn finish_event(
        &self,
        id: &str,
        event: &QueuedEvent,
        payload: &[u8],
        config: Option<&EventInvokeConfig>,
        condition: &str,
        response: Option<(&str, Option<&str>, &[u8])>,
    ) {
        let account = AccountId(event.account.clone());
        let destinations = config.map(|c| &c.destination_config);
        let destination = if condition == "Success" {
            destinations.and_then(|d| d.on_success.as_ref())
        } else {
            destinations.and_then(|d| d.on_failure.as_ref())
        }
        .and_then(|d| d.destination.as_deref());
        let delivery = destination.map(|arn| {
            let function_arn = format!(
                "{}:{}",
                function_arn(&account, &event.function),
                event.qualifier.as_deref().unwrap_or(LATEST)
            );
            let record = destination_record(&EventOutcome {
                request_id: id,
                function_arn: &function_arn,
                condition,
                attempts: event.attempts,
                payload,
                response,
            });
            (arn, record)
        });
        let delivered = self.control.store.write(|t| {
            t.remove(EVENTS, id)?;
            let Some((arn, record)) = &delivery else {
                return Ok(None);
            };
            let target = destination_function(&account, arn)?;
            let record_id = uuid::Uuid::new_v4().to_string();
            let record_event = QueuedEvent {
                account: account.0.clone(),
                function: target.name,
                qualifier: target.qualifier,
                payload: base64::engine::general_purpose::STANDARD.encode(record.to_string()),
                attempts: 0,
                accepted_ms: Some(epoch_ms()),
                adopted: false,
            };
            t.put(EVENTS, &record_id, &record_event)?;
            Ok::<_, ApiError>(Some((arn, record_id, record_event)))
        });
        match delivered {
            Ok(Some((arn, record_id, record_event))) => {
                tracing::info!(
                    "event {id}: {condition}; its record went to {arn} as event {record_id}"
                );
                self.mirror_event(&record_id, &record_event);
                let _ = self.events.send(record_id);
            }
            Ok(None) => {}
            Err(e) => return tracing::error!("event {id}: {e}"),
        }
        if let Some(ledger) = self.placement.event_ledger() {
            ledger.done(id, event.adopted);
        }
    }

    /// Mirrors event `id` for the fleet's other front ends to take over
    /// (in a fleet), once this front end's store has it.
    fn mirror_event(&self, id: &str, event: &QueuedEvent) {
        if let Some(ledger) = self.placement.event_ledger() {
            ledger.keep(id, serde_json::to_vec(event).expect("events serialize"));
        }
    }

    /// Queues the events accepted before a restart, but those another
    /// front end adopted meanwhile (it runs them).
    async fn resume_events(&self) {
        let pending = match self
            .control
            .store
            .read()
            .and_then(|s| s.all::<QueuedEvent>(EVENTS))
        {
            Ok(pending) => pending,
            Err(e) => return tracing::error!("cannot read the event queue: {e}"),
        };
        let mut elsewhere = Vec::new();
        if let Some(ledger) = self.placement.event_ledger() {
            let ids: Vec<String> = pending.iter().map(|(id, _)| id.clone()).collect();
            match ledger.taken_over(&ids).await {
                Ok(ids) => elsewhere = ids,
                // Run all of them: at least once.
                Err(e) => tracing::warn!("events queued here: who took them over: {e}"),
            }
        }
        let mut dropped = Vec::new();
        for (id, event) in pending {
            if elsewhere.contains(&id) {
                tracing::info!("event {id}: another front end took it over; not run here");
                match self.control.store.write(|t| t.remove(EVENTS, &id)) {
                    Ok(()) => dropped.push(id),
                    Err(e) => tracing::error!("event {id}: {e}"),
                }
                continue;
            }
            self.mirror_event(&id, &event);
            let _ = self.events.send(id);
        }
        if let Some(ledger) = self.placement.event_ledger() {
            ledger.forget(&dropped);
        }
    }

    /// Takes over, every [`ADOPT_EVERY`], the events of front ends that
    /// left the fleet (in a fleet).
    async fn adopt_events(self: Arc<Self>) {
        let Some(ledger) = self.placement.event_ledger() else {
            return;
        };
        loop {
            tokio::time::sleep(ADOPT_EVERY).await;
            let adopted = match ledger.adopt_orphans().await {
                Ok(adopted) => adopted,
                Err(e) => {
                    tracing::warn!("events of front ends that left: {e}");
                    continue;
                }
            };
            for (id, record) in adopted {
                // This front end's own, its holder key lapsed while it was
                // cut off: queued here already.
                match self
                    .control
                    .store
                    .read()
                    .and_then(|s| s.get_bytes(EVENTS, &id))
                {
                    Ok(None) => {}
                    Ok(Some(_)) => continue,
                    Err(e) => {
                        tracing::error!("event {id}: {e}");
                        continue;
                    }
                }
                let event = match serde_json::from_slice::<QueuedEvent>(&record) {
                    Ok(event) => QueuedEvent {
                        adopted: true,
                        ..event
                    },
                    Err(e) => {
                        tracing::error!("event {id} in etcd is not one ({e}); dropped");
                        ledger.done(&id, true);
                        continue;
                    }
                };
                match self.control.store.write(|t| t.put(EVENTS, &id, &event)) {
                    Ok(()) => {
                        tracing::info!("event {id}: taken over from a front end that left");
                        let _ = self.events.send(id);
                    }
                    Err(e) => tracing::error!("event {id}: {e}"),
                }
            }
        }
    }
}

struct Report {
    duration: Duration,
    max_memory_mib: Option<u64>,
    cold_start: Option<ColdStart>,
}
