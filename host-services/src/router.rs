//! Routes invocations to execution environments: an idle environment of
//! the same version when there is one (warm), a new one when there is not
//! (cold), within the function's reserved concurrency and the worker's
//! capacity. Every environment's creation and destruction is recorded with
//! its reason.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use serde::Serialize;

use crate::api::error::ApiError;
use crate::auth::AccountId;
use crate::environment::{
    EnvironmentError, ExecutionEnvironment, Invocation, Launch, MicroVmImage, VersionKey,
};
use crate::runtime_api::InvokeError;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum CreateReason {
    /// An invocation found no idle environment: a cold start.
    NewInvocation,
    ProvisionedConcurrency,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum DestroyReason {
    /// Idle for longer than the idle timeout.
    IdleExpired,
    /// Older than the environment lease.
    LeaseExpired,
    /// The function's code or configuration changed, or it was deleted.
    FunctionUpdated,
    /// Its slot went to another version when the worker was full.
    Rebalancing,
    ProvisionedConcurrencyChange,
    /// An invocation timed out or the microVM failed.
    InvocationFailed,
    WorkerShutdown,
}

#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "PascalCase")]
pub struct LifecycleEvent {
    pub environment: String,
    pub account: String,
    pub function: String,
    pub version: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub created: Option<CreateReason>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub destroyed: Option<DestroyReason>,
    pub at_ms: u128,
}

#[derive(Debug, Clone)]
pub struct RouterLimits {
    /// Environments on this worker, idle or busy.
    pub max_environments: usize,
    pub idle_timeout: Duration,
    /// The longest an environment lives, however busy.
    pub environment_lease: Duration,
}

#[derive(Default)]
struct Pool {
    idle: Vec<ExecutionEnvironment>,
    busy: usize,
}

#[derive(Default)]
struct Pools {
    by_version: HashMap<VersionKey, Pool>,
    total: usize,
}

impl Pools {
    fn busy_for(&self, account: &AccountId, function: &str) -> usize {
        self.by_version
            .iter()
            .filter(|(k, _)| &k.account == account && k.function == function)
            .map(|(_, p)| p.busy)
            .sum()
    }

    /// Takes the least recently used idle environment of another version.
    fn evict_lru(&mut self, except: &VersionKey) -> Option<ExecutionEnvironment> {
        let (key, index) = self
            .by_version
            .iter()
            .filter(|(k, _)| *k != except)
            .flat_map(|(k, p)| {
                p.idle
                    .iter()
                    .enumerate()
                    .map(move |(i, e)| (k, i, e.last_used))
            })
            .min_by_key(|(_, _, used)| *used)
            .map(|(k, i, _)| (k.clone(), i))?;
        let env = self.by_version.get_mut(&key)?.idle.swap_remove(index);
        self.total -= 1;
        Some(env)
    }
}

/// How an invocation went, as the Invoke API reports it.
pub struct Routed {
    pub invocation: Invocation,
    pub environment: String,
    /// Set for the invocation that met a freshly initialized environment.
    pub init_duration: Option<Duration>,
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
}

pub struct InvokeRouter {
    image: MicroVmImage,
    limits: RouterLimits,
    pools: Mutex<Pools>,
    history: Mutex<VecDeque<LifecycleEvent>>,
    next_id: AtomicU64,
}

const HISTORY: usize = 10_000;

fn now_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis())
}

impl InvokeRouter {
    pub fn new(image: MicroVmImage, limits: RouterLimits) -> Arc<Self> {
        Arc::new(InvokeRouter {
            image,
            limits,
            pools: Mutex::new(Pools::default()),
            history: Mutex::new(VecDeque::new()),
            next_id: AtomicU64::new(1),
        })
    }

    fn pools(&self) -> std::sync::MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(
        &self,
        env: &str,
        key: &VersionKey,
        created: Option<CreateReason>,
        destroyed: Option<DestroyReason>,
    ) {
        match (created, destroyed) {
            (Some(r), _) => tracing::info!("environment {env} for {key} created: {r:?}"),
            (_, Some(r)) => tracing::info!("environment {env} for {key} destroyed: {r:?}"),
            _ => {}
        }
        let mut history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        if history.len() == HISTORY {
            history.pop_front();
        }
        history.push_back(LifecycleEvent {
            environment: env.to_string(),
            account: key.account.0.clone(),
            function: key.function.clone(),
            version: key.version.clone(),
            created,
            destroyed,
            at_ms: now_ms(),
        });
    }

    /// The recorded creations and destructions, oldest first.
    pub fn history(&self) -> Vec<LifecycleEvent> {
        let history = self.history.lock().unwrap_or_else(|e| e.into_inner());
        history.iter().cloned().collect()
    }

    async fn destroy(&self, env: ExecutionEnvironment, reason: DestroyReason) {
        self.record(&env.id, &env.key, None, Some(reason));
        env.destroy().await;
    }

    async fn create(
        &self,
        launch: &Launch,
        reason: CreateReason,
    ) -> Result<ExecutionEnvironment, EnvironmentError> {
        let id = format!(
            "env-{}-{}",
            std::process::id(),
            self.next_id.fetch_add(1, Ordering::Relaxed)
        );
        let env = ExecutionEnvironment::start(&self.image, launch, id).await?;
        self.record(&env.id, &env.key, Some(reason), None);
        Ok(env)
    }

    /// Takes an idle environment of `launch.key`, or a slot for a new one.
    async fn acquire(
        &self,
        launch: &Launch,
        reserved: Option<u32>,
    ) -> Result<ExecutionEnvironment, RouteError> {
        let key = &launch.key;
        let evicted = {
            let mut pools = self.pools();
            if let Some(limit) = reserved {
                if pools.busy_for(&key.account, &key.function) >= limit as usize {
                    return Err(ApiError::TooManyRequests {
                        message: "Rate Exceeded.".into(),
                        reason: "ReservedFunctionConcurrentInvocationLimitExceeded",
                    }
                    .into());
                }
            }
            let pool = pools.by_version.entry(key.clone()).or_default();
            if let Some(env) = pool.idle.pop() {
                pool.busy += 1;
                return Ok(env);
            }
            let evicted = if pools.total >= self.limits.max_environments {
                Some(
                    pools
                        .evict_lru(key)
                        .ok_or_else(|| ApiError::TooManyRequests {
                            message: "Rate Exceeded.".into(),
                            reason: "ConcurrentInvocationLimitExceeded",
                        })?,
                )
            } else {
                None
            };
            pools.total += 1;
            pools.by_version.entry(key.clone()).or_default().busy += 1;
            evicted
        };
        if let Some(old) = evicted {
            self.destroy(old, DestroyReason::Rebalancing).await;
        }
        match self.create(launch, CreateReason::NewInvocation).await {
            Ok(env) => Ok(env),
            Err(e) => {
                let mut pools = self.pools();
                pools.total -= 1;
                if let Some(pool) = pools.by_version.get_mut(key) {
                    pool.busy -= 1;
                }
                drop(pools);
                Err(match e {
                    EnvironmentError::Runtime(InvokeError::InitFailed { error_type, body }) => {
                        RouteError::InitFailed { error_type, body }
                    }
                    other => {
                        ApiError::Service(format!("starting an environment for {key}: {other}"))
                            .into()
                    }
                })
            }
        }
    }

    /// Gives a busy environment back: to its pool if it is healthy and
    /// within its lease, else to be destroyed.
    async fn release(&self, env: ExecutionEnvironment, healthy: bool) {
        let reason = if !healthy {
            Some(DestroyReason::InvocationFailed)
        } else if env.created.elapsed() >= self.limits.environment_lease {
            Some(DestroyReason::LeaseExpired)
        } else {
            None
        };
        {
            let mut pools = self.pools();
            let pool = pools.by_version.entry(env.key.clone()).or_default();
            pool.busy -= 1;
            if reason.is_none() {
                pool.idle.push(env);
                return;
            }
            pools.total -= 1;
        }
        if let Some(reason) = reason {
            self.destroy(env, reason).await;
        }
    }

    /// Runs one invocation of `launch.key` in an environment of its own.
    pub async fn invoke(
        &self,
        launch: &Launch,
        reserved: Option<u32>,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Routed, RouteError> {
        let mut env = self.acquire(launch, reserved).await?;
        let init_duration = env.fresh.then_some(env.init_duration);
        env.fresh = false;
        tracing::debug!("invocation {request_id} begins in {}", env.id);
        let result = env.invoke(request_id, payload, timeout).await;
        tracing::debug!("invocation {request_id} ends in {}", env.id);
        let environment = env.id.clone();
        match result {
            Ok(invocation) => {
                self.release(env, true).await;
                Ok(Routed {
                    invocation,
                    environment,
                    init_duration,
                })
            }
            Err(e) => {
                tracing::warn!(
                    "invocation {request_id} in {environment} failed: {e}; VMM: {}",
                    env.vmm_log_tail()
                );
                self.release(env, false).await;
                Err(match e {
                    InvokeError::Timeout(t) => RouteError::TimedOut(t),
                    InvokeError::InitFailed { error_type, body } => {
                        RouteError::InitFailed { error_type, body }
                    }
                    InvokeError::EnvironmentGone => RouteError::EnvironmentFailed,
                })
            }
        }
    }

    /// Destroys the idle environments `retire` picks, for `reason`.
    pub async fn retire(&self, retire: impl Fn(&VersionKey) -> bool, reason: DestroyReason) {
        let doomed: Vec<ExecutionEnvironment> = {
            let mut pools = self.pools();
            let mut doomed = Vec::new();
            for (key, pool) in pools.by_version.iter_mut() {
                if retire(key) {
                    doomed.append(&mut pool.idle);
                }
            }
            pools.total -= doomed.len();
            doomed
        };
        for env in doomed {
            self.destroy(env, reason).await;
        }
    }

    /// Destroys idle environments past their idle timeout or lease.
    pub async fn reap(&self) {
        let doomed: Vec<(ExecutionEnvironment, DestroyReason)> = {
            let mut pools = self.pools();
            let mut doomed = Vec::new();
            for pool in pools.by_version.values_mut() {
                let mut i = 0;
                while i < pool.idle.len() {
                    let env = &pool.idle[i];
                    let reason = if env.created.elapsed() >= self.limits.environment_lease {
                        Some(DestroyReason::LeaseExpired)
                    } else if env.last_used.elapsed() >= self.limits.idle_timeout {
                        Some(DestroyReason::IdleExpired)
                    } else {
                        None
                    };
                    match reason {
                        Some(r) => doomed.push((pool.idle.swap_remove(i), r)),
                        None => i += 1,
                    }
                }
            }
            pools.total -= doomed.len();
            pools
                .by_version
                .retain(|_, p| p.busy > 0 || !p.idle.is_empty());
            doomed
        };
        for (env, reason) in doomed {
            self.destroy(env, reason).await;
        }
    }

    /// Reaps every `period` until the router is dropped.
    pub fn spawn_reaper(self: &Arc<Self>, period: Duration) {
        let router = Arc::downgrade(self);
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(period).await;
                let Some(router) = router.upgrade() else {
                    return;
                };
                router.reap().await;
            }
        });
    }

    /// Environments that exist now, idle or busy.
    pub fn environment_count(&self) -> usize {
        self.pools().total
    }

    /// Stops every idle environment; busy ones stop when they finish.
    pub async fn shutdown(&self) {
        self.retire(|_| true, DestroyReason::WorkerShutdown).await;
    }
}
