//! Routes invocations to execution environments across the workers: an
//! idle environment of the same version when one exists (warm), a new one
//! on the worker with the most room when none does (cold), within the
//! function's reserved concurrency. Workers hold leases; one nearing its
//! end is drained and replaced by a fresh one, and routing moves on to the
//! others while its in-flight invocations finish.

use std::cmp::Reverse;
use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;

use bytes::Bytes;

use crate::control_plane::model::MAX_TIMEOUT_SECS;
use crate::data_plane::environment::{
    ColdStart, EnvironmentError, ExecutionEnvironment, Invocation, Launch, MicroVmImage,
};
use crate::data_plane::host::{HostLimits, SnapStartError, StartError, WorkerHost};
use crate::data_plane::lifecycle::{CreateReason, DestroyReason, Lifecycle};
use crate::data_plane::runtime_api::InvokeError;
use crate::data_plane::start_trace::StartTrace;
use crate::error::ApiError;
use crate::ids::AccountId;
use crate::ids::VersionKey;

#[derive(Debug, Clone)]
pub struct FleetConfig {
    /// Workers serving at once; a draining one is replaced before it
    /// stops taking invocations.
    pub workers: usize,
    /// How long a worker lives.
    pub worker_lease: Duration,
    pub host: HostLimits,
}

/// How an invocation went, as the Invoke API reports it.
pub struct Routed {
    pub invocation: Invocation,
    pub environment: String,
    /// Set for the invocation that met a freshly started environment.
    pub cold_start: Option<ColdStart>,
    /// That environment's start, step by step.
    pub trace: Option<StartTrace>,
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error(transparent)]
    Api(#[from] ApiError),
    /// The runtime failed its init phase: a function error, not the
    /// worker's.
    #[error("the runtime failed to initialize: {error_type}")]
    InitFailed { error_type: String, body: String },
    #[error("Task timed out after {:.2} seconds", .0.as_secs_f64())]
    TimedOut(Duration),
    #[error("the execution environment stopped during the invocation")]
    EnvironmentFailed,
    /// What an environment of the version needs could not be put
    /// together (its code or its image record).
    #[error("{0}")]
    Launch(ApiError),
}

fn start_failure(key: &VersionKey, e: EnvironmentError) -> RouteError {
    match e {
        EnvironmentError::Runtime(InvokeError::InitFailed { error_type, body }) => {
            RouteError::InitFailed { error_type, body }
        }
        other => ApiError::Service(format!("starting an environment for {key}: {other}")).into(),
    }
}

pub fn too_many(reason: &'static str) -> ApiError {
    ApiError::TooManyRequests {
        message: "Rate Exceeded.".into(),
        reason,
    }
}

type FunctionKey = (AccountId, String);

/// Invocations in flight per function, against their reserved
/// concurrency.
#[derive(Default)]
struct ConcurrencyLimiter {
    busy: Arc<Mutex<HashMap<FunctionKey, u32>>>,
}

impl ConcurrencyLimiter {
    /// A slot for one invocation of `key`'s function, if fewer than
    /// `reserved` hold one.
    pub fn take(
        &self,
        key: &VersionKey,
        reserved: Option<u32>,
    ) -> Result<ConcurrencySlot, ApiError> {
        let function = (key.account.clone(), key.function.clone());
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        let n = busy.entry(function.clone()).or_default();
        if reserved.is_some_and(|limit| *n >= limit) {
            return Err(too_many(
                "ReservedFunctionConcurrentInvocationLimitExceeded",
            ));
        }
        *n += 1;
        Ok(ConcurrencySlot {
            busy: self.busy.clone(),
            function,
        })
    }
}

/// A function's share of its reserved concurrency, held for the length of
/// one invocation, which may outlast its caller's wait.
struct ConcurrencySlot {
    busy: Arc<Mutex<HashMap<FunctionKey, u32>>>,
    function: FunctionKey,
}

impl Drop for ConcurrencySlot {
    fn drop(&mut self) {
        let mut busy = self.busy.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = busy.get_mut(&self.function) {
            *n -= 1;
            if *n == 0 {
                busy.remove(&self.function);
            }
        }
    }
}

pub struct InvokeRouter {
    image: MicroVmImage,
    config: FleetConfig,
    lifecycle: Arc<Lifecycle>,
    hosts: RwLock<Vec<Arc<WorkerHost>>>,
    next_worker: AtomicU64,
    concurrency: ConcurrencyLimiter,
}

/// An environment and the worker it is on.
type Placed = (Arc<WorkerHost>, ExecutionEnvironment);

/// A new environment of `launch`, started on the worker of `hosts` with
/// the most room.
async fn start_on_the_emptiest(
    mut hosts: Vec<Arc<WorkerHost>>,
    launch: &Launch,
) -> Result<Placed, RouteError> {
    hosts.sort_by_key(|h| Reverse(h.free_capacity()));
    for host in hosts {
        match host.start_for_invocation(launch).await {
            Ok(env) => return Ok((host, env)),
            Err(StartError::Full) => continue,
            Err(StartError::Environment(e)) => return Err(start_failure(&launch.key, e)),
        }
    }
    Err(too_many("ConcurrentInvocationLimitExceeded").into())
}

impl InvokeRouter {
    pub fn new(image: MicroVmImage, config: FleetConfig, lifecycle: Lifecycle) -> Arc<Self> {
        let router = Arc::new(InvokeRouter {
            image,
            config,
            lifecycle: Arc::new(lifecycle),
            hosts: RwLock::new(Vec::new()),
            next_worker: AtomicU64::new(1),
            concurrency: ConcurrencyLimiter::default(),
        });
        for _ in 0..router.config.workers {
            router.add_worker();
        }
        router
    }

    fn add_worker(&self) -> Arc<WorkerHost> {
        let id = format!(
            "worker-{}",
            self.next_worker.fetch_add(1, Ordering::Relaxed)
        );
        let host = Arc::new(WorkerHost::new(
            id,
            self.image.clone(),
            self.config.host.clone(),
            self.config.worker_lease,
            self.lifecycle.clone(),
        ));
        tracing::info!("{} started, lease {:?}", host.id, self.config.worker_lease);
        self.hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .push(host.clone());
        host
    }

    fn all_hosts(&self) -> Vec<Arc<WorkerHost>> {
        self.hosts.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// The workers that take invocations: not draining.
    fn active_hosts(&self) -> Vec<Arc<WorkerHost>> {
        let mut hosts = self.all_hosts();
        hosts.retain(|h| !h.is_draining());
        hosts
    }

    /// An idle environment of `key` on any worker, taken, and the
    /// workers taking invocations now.
    fn take_idle(&self, key: &VersionKey) -> (Option<Placed>, Vec<Arc<WorkerHost>>) {
        let hosts = self.active_hosts();
        let idle = hosts
            .iter()
            .find_map(|host| Some((host.clone(), host.take_idle(key)?)));
        (idle, hosts)
    }

    /// Runs one invocation of `key` in an environment of its own; one
    /// started for it is made of what `launch` puts together.
    pub async fn invoke(
        &self,
        key: &VersionKey,
        launch: impl FnOnce() -> Result<Launch, ApiError>,
        reserved: Option<u32>,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Routed, RouteError> {
        let slot = self.concurrency.take(key, reserved)?;
        let (idle, hosts) = self.take_idle(key);
        // What a new environment is made of, only when none is idle.
        let launch = match idle {
            Some(_) => None,
            None => Some(launch().map_err(RouteError::Launch)?),
        };
        // Once begun, an invocation (and the start of its environment)
        // runs to its end and its environment goes back to its worker even
        // if the caller stops waiting (a client or a fleet's front end that
        // went away): dropped halfway, the environment would be lost to its
        // worker's count for good. Its reserved-concurrency slot is held
        // until then too.
        let request_id = request_id.to_string();
        let running = tokio::spawn(async move {
            let _slot = slot;
            let (host, mut env) = match (idle, launch) {
                (Some(found), _) => found,
                (None, Some(launch)) => start_on_the_emptiest(hosts, &launch).await?,
                (None, None) => unreachable!("a launch is made when nothing is idle"),
            };
            let cold_start = env.fresh.then_some(env.cold_start);
            let trace = env.fresh.then(|| env.trace.clone());
            env.fresh = false;
            tracing::debug!("invocation {request_id} begins in {}", env.id);
            let result = env.invoke(&request_id, payload, timeout).await;
            if cold_start.is_some() {
                host.refill_jails();
            }
            tracing::debug!("invocation {request_id} ends in {}", env.id);
            let environment = env.id.clone();
            if let Err(e) = &result {
                tracing::warn!(
                    "invocation {request_id} in {environment} failed: {e}; VMM: {}",
                    env.vmm_log_tail()
                );
            }
            host.release(env, result.is_ok()).await;
            Ok::<_, RouteError>((result, environment, cold_start, trace))
        });
        let (result, environment, cold_start, trace) = running
            .await
            .map_err(|e| RouteError::Api(ApiError::Service(format!("an invocation: {e}"))))??;
        match result {
            Ok(invocation) => Ok(Routed {
                invocation,
                environment,
                cold_start,
                trace,
            }),
            Err(e) => Err(match e {
                InvokeError::Timeout(t) => RouteError::TimedOut(t),
                InvokeError::InitFailed { error_type, body } => {
                    RouteError::InitFailed { error_type, body }
                }
                InvokeError::EnvironmentGone => RouteError::EnvironmentFailed,
            }),
        }
    }

    /// Destroys the idle environments `retire` picks, on every worker.
    /// The snapshots environments restore, if snapshots are on.
    pub fn snapshots(&self) -> Option<&Arc<crate::data_plane::snapshots::SnapshotStore>> {
        self.image.snapshots.as_ref()
    }

    pub async fn retire(&self, retire: impl Fn(&VersionKey) -> bool, reason: DestroyReason) {
        for host in self.all_hosts() {
            host.retire(&retire, reason).await;
        }
    }

    /// Idle environments of `key` on the workers taking invocations.
    pub fn idle(&self, key: &VersionKey) -> usize {
        self.active_hosts().iter().map(|h| h.idle(key)).sum()
    }

    /// Provisioned environments of `key` on the workers taking
    /// invocations.
    pub fn provisioned(&self, key: &VersionKey) -> usize {
        self.active_hosts()
            .iter()
            .map(|h| h.provisioned().get(key).copied().unwrap_or(0))
            .sum()
    }

    /// Brings each version's provisioned environments to its target:
    /// trims idle ones above it and starts missing ones, one at a time, on
    /// the workers with the most room. Versions not in `targets` keep
    /// none. Returns the versions whose environments failed to start.
    pub async fn reconcile_provisioned(
        &self,
        targets: &[(Launch, usize)],
    ) -> Vec<(VersionKey, RouteError)> {
        let mut reasons: HashMap<VersionKey, Vec<CreateReason>> = HashMap::new();
        for host in self.all_hosts() {
            for vacancy in host.take_vacancies() {
                reasons.entry(vacancy.key).or_default().push(vacancy.reason);
            }
        }
        let wanted: HashMap<VersionKey, usize> =
            targets.iter().map(|(l, n)| (l.key.clone(), *n)).collect();
        let mut have: HashMap<VersionKey, usize> = HashMap::new();
        let mut left = wanted.clone();
        for host in self.active_hosts() {
            let mut keep = HashMap::new();
            for (key, n) in host.provisioned() {
                let quota = left.entry(key.clone()).or_default();
                let kept = n.min(*quota);
                *quota -= kept;
                *have.entry(key.clone()).or_default() += kept;
                keep.insert(key, kept);
            }
            host.trim_provisioned(keep).await;
        }
        let mut failures = Vec::new();
        for (launch, n) in targets {
            let mut count = have.get(&launch.key).copied().unwrap_or(0);
            'fill: while count < *n {
                let reason = reasons
                    .get_mut(&launch.key)
                    .and_then(Vec::pop)
                    .unwrap_or(CreateReason::ProvisionedConcurrency);
                let mut hosts = self.active_hosts();
                hosts.sort_by_key(|h| Reverse(h.free_capacity()));
                for host in hosts {
                    match host.provision(launch, reason).await {
                        Ok(()) => {
                            count += 1;
                            continue 'fill;
                        }
                        Err(StartError::Full) => continue,
                        Err(StartError::Environment(e)) => {
                            failures.push((launch.key.clone(), start_failure(&launch.key, e)));
                            break 'fill;
                        }
                    }
                }
                failures.push((
                    launch.key.clone(),
                    too_many("ConcurrentInvocationLimitExceeded").into(),
                ));
                break;
            }
        }
        failures
    }

    /// Initializes and snapshots a SnapStart version on the worker with
    /// the most room.
    pub async fn snap_start(&self, launch: &Launch) -> Result<(), SnapStartError> {
        let mut hosts = self.active_hosts();
        hosts.sort_by_key(|h| Reverse(h.free_capacity()));
        for host in hosts {
            match host.snap_start(launch).await {
                Err(SnapStartError::Start(StartError::Full)) => continue,
                done => return done,
            }
        }
        Err(StartError::Full.into())
    }

    /// Reaps idle environments, and drains each worker whose lease is
    /// near its end, after starting its replacement.
    async fn maintain(self: &Arc<Self>) {
        // An invocation that starts just before draining begins may run
        // for the longest timeout; it must finish within the lease.
        let margin =
            (self.config.worker_lease / 4).min(Duration::from_secs(MAX_TIMEOUT_SECS.into()));
        for host in self.active_hosts() {
            if host.lease_left() <= margin {
                self.add_worker();
                let router = self.clone();
                tokio::spawn(async move { router.drain(host).await });
            } else {
                host.reap().await;
            }
        }
    }

    async fn drain(&self, host: Arc<WorkerHost>) {
        tracing::info!(
            "{} lease ends in {:?}: draining",
            host.id,
            host.lease_left()
        );
        host.drain(DestroyReason::WorkerLeaseExpired).await;
        self.hosts
            .write()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|h| !Arc::ptr_eq(h, &host));
        tracing::info!("{} drained and exited", host.id);
    }

    /// Maintains the fleet every `period` until the router is dropped.
    pub fn spawn_maintenance(self: &Arc<Self>, period: Duration) {
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(router) = router.upgrade() else {
                    return;
                };
                router.maintain().await;
            }
        });
    }

    /// A period short enough for the idle timeout and the worker lease.
    pub fn maintenance_period(&self) -> Duration {
        (self
            .config
            .host
            .idle_timeout
            .min(self.config.worker_lease / 20))
        .clamp(Duration::from_millis(100), Duration::from_secs(10))
    }

    /// Environments that exist now, idle, busy or starting.
    pub fn environment_count(&self) -> usize {
        self.all_hosts().iter().map(|h| h.environment_count()).sum()
    }

    /// Drains every worker.
    pub async fn shutdown(&self) {
        for host in self.all_hosts() {
            host.drain(DestroyReason::WorkerShutdown).await;
        }
    }
}
