//! One worker: the execution environments it hosts, within its capacity,
//! for as long as its lease lasts. When the lease nears its end the worker
//! drains: it takes no new invocations, lets the ones in flight finish,
//! stops its microVMs and exits. [`crate::data_plane::router::InvokeRouter`] decides
//! which worker serves what.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::Notify;

use crate::data_plane::environment::{
    EnvironmentError, ExecutionEnvironment, InitializationType, Launch, MicroVmImage,
};
use crate::data_plane::lifecycle::{CreateReason, DestroyReason, Lifecycle};
use crate::ids::VersionKey;

#[derive(Debug, Clone)]
pub struct HostLimits {
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
    /// Provisioned environments, idle or busy.
    provisioned: usize,
}

#[derive(Default)]
struct Pools {
    by_version: HashMap<VersionKey, Pool>,
    /// Environments, idle, busy or starting.
    total: usize,
    /// Environments taken out of `total` whose microVM is still being
    /// stopped: a drain waits for them too, or a worker that exits would
    /// drop their stop half done and leave their jails and cgroups behind.
    destroying: usize,
}

impl Pools {
    /// Moves `n` environments from the live count to the stopping one:
    /// [`WorkerHost::destroy`] takes each off when its microVM has stopped.
    fn begin_destroying(&mut self, n: usize) {
        self.total -= n;
        self.destroying += n;
    }

    /// Takes the least recently used idle on-demand environment of another
    /// version. Provisioned ones are not the worker's to give away.
    fn evict_lru(&mut self, except: &VersionKey) -> Option<ExecutionEnvironment> {
        let (key, index) = self
            .by_version
            .iter()
            .filter(|(k, _)| *k != except)
            .flat_map(|(k, p)| {
                p.idle
                    .iter()
                    .enumerate()
                    .filter(|(_, e)| !e.provisioned)
                    .map(move |(i, e)| (k, i, e.last_used))
            })
            .min_by_key(|(_, _, used)| *used)
            .map(|(k, i, _)| (k.clone(), i))?;
        let env = self.by_version.get_mut(&key)?.idle.swap_remove(index);
        self.begin_destroying(1);
        Some(env)
    }
}

/// A provisioned environment that went away and is owed a replacement.
pub struct Vacancy {
    pub key: VersionKey,
    pub reason: CreateReason,
}

pub struct WorkerHost {
    pub id: String,
    image: MicroVmImage,
    limits: HostLimits,
    lifecycle: Arc<Lifecycle>,
    started: Instant,
    lease: Duration,
    draining: AtomicBool,
    pools: Mutex<Pools>,
    vacancies: Mutex<Vec<Vacancy>>,
    next_environment: AtomicU64,
    /// Signalled whenever an environment stops being busy.
    released: Notify,
}

impl WorkerHost {
    pub fn new(
        id: String,
        image: MicroVmImage,
        limits: HostLimits,
        lease: Duration,
        lifecycle: Arc<Lifecycle>,
    ) -> Self {
        WorkerHost {
            image: MicroVmImage {
                run_dir: image.run_dir.join(&id),
                ..image
            },
            id,
            limits,
            lifecycle,
            started: Instant::now(),
            lease,
            draining: AtomicBool::new(false),
            pools: Mutex::new(Pools::default()),
            vacancies: Mutex::new(Vec::new()),
            next_environment: AtomicU64::new(1),
            released: Notify::new(),
        }
    }

    fn pools(&self) -> MutexGuard<'_, Pools> {
        self.pools.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// How long is left of the worker's lease.
    pub fn lease_left(&self) -> Duration {
        self.lease.saturating_sub(self.started.elapsed())
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Acquire)
    }

    /// Environments that exist now, idle, busy, starting or stopping.
    pub fn environment_count(&self) -> usize {
        let pools = self.pools();
        pools.total + pools.destroying
    }

    /// Room for more environments, counting the idle on-demand ones that
    /// could be evicted.
    pub fn free_capacity(&self) -> usize {
        self.limits
            .max_environments
            .saturating_sub(self.pools().total)
    }

    /// Each version's provisioned environments, idle or busy.
    /// Idle environments of `key`.
    pub fn idle(&self, key: &VersionKey) -> usize {
        self.pools().by_version.get(key).map_or(0, |p| p.idle.len())
    }

    pub fn provisioned(&self) -> HashMap<VersionKey, usize> {
        self.pools()
            .by_version
            .iter()
            .filter(|(_, p)| p.provisioned > 0)
            .map(|(k, p)| (k.clone(), p.provisioned))
            .collect()
    }

    /// The provisioned environments that went away since the last call,
    /// with the reason each is to be replaced.
    pub fn take_vacancies(&self) -> Vec<Vacancy> {
        std::mem::take(&mut *self.vacancies.lock().unwrap_or_else(|e| e.into_inner()))
    }

    /// Takes an idle environment of `key`, a provisioned one first.
    pub fn take_idle(&self, key: &VersionKey) -> Option<ExecutionEnvironment> {
        if self.is_draining() {
            return None;
        }
        let mut pools = self.pools();
        let pool = pools.by_version.get_mut(key)?;
        let index = pool
            .idle
            .iter()
            .rposition(|e| e.provisioned)
            .or_else(|| pool.idle.len().checked_sub(1))?;
        let env = pool.idle.swap_remove(index);
        pool.busy += 1;
        Some(env)
    }

    /// Starts an environment for an invocation that found none idle. It
    /// is busy for the caller.
    pub async fn start_for_invocation(
        self: &Arc<Self>,
        launch: &Launch,
    ) -> Result<ExecutionEnvironment, StartError> {
        self.boot(launch, CreateReason::NewInvocation).await
    }

    /// Makes jails ahead for the next cold starts, in the background.
    /// Called once a cold start is over (its first event answered), since
    /// the kernel's work of making one slowed the event it overlapped.
    pub fn refill_jails(&self) {
        if let Some(jail) = &self.image.jail {
            let jail = jail.clone();
            tokio::spawn(async move { jail.refill() });
        }
    }

    /// Starts a provisioned environment for `launch`, idle and ready.
    pub async fn provision(
        self: &Arc<Self>,
        launch: &Launch,
        reason: CreateReason,
    ) -> Result<(), StartError> {
        let mut env = self.boot(launch, reason).await?;
        self.refill_jails();
        // Initialized ahead of any invocation, which therefore reports no
        // Init Duration.
        env.provisioned = true;
        env.fresh = false;
        // A drain that began while it booted waits for it: it is
        // destroyed, not kept (a drain kept waiting for it forever).
        let shut_out = {
            let mut pools = self.pools();
            let pool = pools.by_version.entry(launch.key.clone()).or_default();
            pool.provisioned += 1;
            match self.is_draining() {
                true => Some(env),
                false => {
                    pool.busy -= 1;
                    pool.idle.push(env);
                    None
                }
            }
        };
        match shut_out {
            Some(env) => self.destroy_busy(env, DestroyReason::WorkerShutdown).await,
            None => self.released.notify_waiters(),
        }
        Ok(())
    }

    /// Initializes a SnapStart version in an environment of its own and
    /// snapshots it at its first `/next`; the environment is gone when
    /// the snapshot is sealed. The error says why there is none.
    pub async fn snap_start(self: &Arc<Self>, launch: &Launch) -> Result<(), SnapStartError> {
        let mut env = self.boot(launch, CreateReason::SnapStart).await?;
        self.refill_jails();
        let sealed = match env.snapshot_sealing.take() {
            Some(sealing) => sealing.await.unwrap_or_else(|e| Err(e.to_string())),
            None => {
                Err("no snapshot was taken (snapshots are off, or another is being taken)".into())
            }
        };
        self.destroy_busy(env, DestroyReason::SnapshotTaken).await;
        sealed.map_err(SnapStartError::Snapshot)
    }

    /// Boots an environment in a slot of its own, busy. Evicts the least
    /// recently used idle environment of another version when the worker
    /// is full.
    async fn boot(
        self: &Arc<Self>,
        launch: &Launch,
        reason: CreateReason,
    ) -> Result<ExecutionEnvironment, StartError> {
        let evicted = {
            let mut pools = self.pools();
            if self.is_draining() {
                return Err(StartError::Full);
            }
            let evicted = if pools.total >= self.limits.max_environments {
                Some(pools.evict_lru(&launch.key).ok_or(StartError::Full)?)
            } else {
                None
            };
            pools.total += 1;
            pools.by_version.entry(launch.key.clone()).or_default().busy += 1;
            evicted
        };
        if let Some(old) = evicted {
            self.lifecycle
                .destroyed(&old.id, &self.id, &old.key, DestroyReason::Rebalancing);
            // Its microVM's teardown (KVM's destruction of the VM, the
            // jail's removal: milliseconds) goes on beside this start; it
            // counts as destroying until it ends, and a worker that stops
            // waits for it.
            let host = self.clone();
            tokio::spawn(async move { host.tear_down(old).await });
        }
        let id = format!(
            "{}-env-{}",
            self.id,
            self.next_environment.fetch_add(1, Ordering::Relaxed)
        );
        let initialization = match reason {
            CreateReason::SnapStart => InitializationType::SnapStart,
            CreateReason::NewInvocation if launch.snap_start => InitializationType::SnapStart,
            CreateReason::NewInvocation => InitializationType::OnDemand,
            _ => InitializationType::ProvisionedConcurrency,
        };
        match ExecutionEnvironment::start(&self.image, launch, id, initialization).await {
            Ok(env) => {
                self.lifecycle
                    .created(&env.id, &self.id, &env.key, reason, env.jail_id());
                Ok(env)
            }
            Err(e) => {
                let mut pools = self.pools();
                pools.total -= 1;
                if let Some(pool) = pools.by_version.get_mut(&launch.key) {
                    pool.busy -= 1;
                }
                drop(pools);
                self.released.notify_waiters();
                Err(StartError::Environment(e))
            }
        }
    }

    /// Gives a busy environment back: to its pool if it is healthy, within
    /// its lease and the worker is not draining; else it is destroyed.
    pub async fn release(&self, env: ExecutionEnvironment, healthy: bool) {
        let reason = if !healthy {
            Some(DestroyReason::InvocationFailed)
        } else if self.is_draining() {
            Some(DestroyReason::WorkerLeaseExpired)
        } else if env.created.elapsed() >= self.limits.environment_lease {
            Some(DestroyReason::LeaseExpired)
        } else {
            None
        };
        match reason {
            Some(reason) => self.destroy_busy(env, reason).await,
            None => {
                let mut pools = self.pools();
                let pool = pools.by_version.entry(env.key.clone()).or_default();
                pool.busy -= 1;
                pool.idle.push(env);
                drop(pools);
                self.released.notify_waiters();
            }
        }
    }

    /// Takes a busy environment out of its pool and the live count, and
    /// stops it.
    async fn destroy_busy(&self, env: ExecutionEnvironment, reason: DestroyReason) {
        {
            let mut pools = self.pools();
            let pool = pools.by_version.entry(env.key.clone()).or_default();
            pool.busy -= 1;
            if env.provisioned {
                pool.provisioned -= 1;
            }
            pools.begin_destroying(1);
        }
        self.destroy(env, reason).await;
    }

    async fn destroy(&self, env: ExecutionEnvironment, reason: DestroyReason) {
        self.lifecycle
            .destroyed(&env.id, &self.id, &env.key, reason);
        if env.provisioned {
            let replacement = match reason {
                DestroyReason::LeaseExpired => Some(CreateReason::EnvironmentLeaseExpired),
                DestroyReason::WorkerLeaseExpired => Some(CreateReason::WorkerLeaseExpired),
                DestroyReason::InvocationFailed => Some(CreateReason::EnvironmentFailed),
                _ => None,
            };
            if let Some(reason) = replacement {
                self.vacancies
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .push(Vacancy {
                        key: env.key.clone(),
                        reason,
                    });
            }
        }
        self.tear_down(env).await;
    }

    /// Stops an environment already counted as destroying.
    async fn tear_down(&self, env: ExecutionEnvironment) {
        env.destroy().await;
        self.pools().destroying -= 1;
        self.released.notify_waiters();
    }

    /// Destroys idle environments that `pick` selects, for `reason`.
    async fn remove_idle(
        &self,
        mut pick: impl FnMut(&ExecutionEnvironment) -> Option<DestroyReason>,
    ) {
        let doomed: Vec<(ExecutionEnvironment, DestroyReason)> = {
            let mut pools = self.pools();
            let mut doomed = Vec::new();
            for pool in pools.by_version.values_mut() {
                let mut i = 0;
                while i < pool.idle.len() {
                    match pick(&pool.idle[i]) {
                        Some(reason) => {
                            let env = pool.idle.swap_remove(i);
                            if env.provisioned {
                                pool.provisioned -= 1;
                            }
                            doomed.push((env, reason));
                        }
                        None => i += 1,
                    }
                }
            }
            pools.begin_destroying(doomed.len());
            pools
                .by_version
                .retain(|_, p| p.busy > 0 || p.provisioned > 0 || !p.idle.is_empty());
            doomed
        };
        for (env, reason) in doomed {
            self.destroy(env, reason).await;
        }
    }

    /// Destroys the idle environments of the versions `retire` picks.
    pub async fn retire(&self, retire: impl Fn(&VersionKey) -> bool, reason: DestroyReason) {
        self.remove_idle(|e| retire(&e.key).then_some(reason)).await;
    }

    /// Destroys idle provisioned environments above `keep` for each
    /// version.
    pub async fn trim_provisioned(&self, mut keep: HashMap<VersionKey, usize>) {
        self.remove_idle(|e| {
            if !e.provisioned {
                return None;
            }
            match keep.get_mut(&e.key) {
                Some(n) if *n > 0 => {
                    *n -= 1;
                    None
                }
                _ => Some(DestroyReason::ProvisionedConcurrencyChange),
            }
        })
        .await;
    }

    /// Destroys idle environments past their lease, and on-demand ones
    /// past their idle timeout. Provisioned ones are kept however idle.
    pub async fn reap(&self) {
        let limits = &self.limits;
        self.remove_idle(|e| {
            if e.created.elapsed() >= limits.environment_lease {
                Some(DestroyReason::LeaseExpired)
            } else if !e.provisioned && e.last_used.elapsed() >= limits.idle_timeout {
                Some(DestroyReason::IdleExpired)
            } else {
                None
            }
        })
        .await;
    }

    /// Stops taking invocations, lets the busy environments finish and
    /// stops every microVM, for `reason`.
    pub async fn drain(&self, reason: DestroyReason) {
        self.draining.store(true, Ordering::Release);
        loop {
            let released = self.released.notified();
            self.retire(|_| true, reason).await;
            if self.environment_count() == 0 {
                break;
            }
            released.await;
        }
        let _ = std::fs::remove_dir_all(&self.image.run_dir);
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("the worker has no room for another environment")]
    Full,
    #[error(transparent)]
    Environment(#[from] EnvironmentError),
}

#[derive(Debug, thiserror::Error)]
pub enum SnapStartError {
    #[error(transparent)]
    Start(#[from] StartError),
    #[error("its snapshot: {0}")]
    Snapshot(String),
    #[error("SnapStart is not served by a fleet yet (docs/fleet.md)")]
    NotInFleet,
}
