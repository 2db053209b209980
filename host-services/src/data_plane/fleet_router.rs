//! A front end's placement across the fleet's worker hosts: an invocation
//! goes to a host known to hold an idle environment of its version, else
//! to the host with the most room, which starts one. A host that cannot
//! be reached is passed over before anything ran there; a host lost while
//! it ran an invocation fails that invocation, which is never run twice by
//! the front end. The front end also serves what worker hosts fetch from
//! it: sealed artifacts and, for a valid grant, their data keys; and to
//! other front ends the code it took.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;

use crate::artifacts::sealed::GrantedArtifact;
use crate::control_plane::shared_state::STORED_CODE;
use crate::control_plane::store::{Store, CODE};
use crate::data_plane::environment::Launch;
use crate::data_plane::fleet_wire::{
    decode, encode, DataKeyRequest, InvokeAnswer, InvokeRequest, ProvisionAnswer, ProvisionRequest,
    Retire, WireLaunch, ARTIFACT, DATA_KEY, INVOKE, PROVISION, RETIRE,
};
use crate::data_plane::router::{too_many, RouteError, Routed};
use crate::error::ApiError;
use crate::fleet::concurrency::{ConcurrencySlot, FleetConcurrency};
use crate::fleet::event_ledger::EventLedger;
use crate::fleet::leadership::Leadership;
use crate::fleet::membership::{HostRecord, Role};
use crate::fleet::peers::PeerSet;
use crate::fleet::transport::{answer, PeerError};
use crate::ids::VersionKey;
use crate::security::key_service::KeyService;

/// How long past an invocation's timeout a worker host may take to
/// answer before the front end counts it lost.
const LOST_AFTER: Duration = Duration::from_secs(5);

pub struct FleetRouter {
    peers: Arc<PeerSet>,
    /// Idle environments each host reported per version, as this front
    /// end last heard.
    warm: Mutex<HashMap<VersionKey, HashMap<String, u32>>>,
    /// Invocations this front end has in flight on each host.
    in_flight: Mutex<HashMap<String, usize>>,
    /// Reserved concurrency, counted with the other front ends.
    concurrency: FleetConcurrency,
    /// Whether this front end provisions for the fleet; the others only
    /// read what the hosts hold.
    provisioner: Leadership,
    /// The Event invocations this front end holds, mirrored in etcd.
    events: EventLedger,
    /// Provisioned environments per version across the hosts, as the
    /// last reconciliation found them.
    provisioned: Mutex<HashMap<VersionKey, usize>>,
}

/// One invocation counted against a host while it runs there.
struct InFlight<'a> {
    counts: &'a Mutex<HashMap<String, usize>>,
    host: String,
}

impl Drop for InFlight<'_> {
    fn drop(&mut self) {
        let mut counts = self.counts.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = counts.get_mut(&self.host) {
            *n = n.saturating_sub(1);
        }
    }
}

impl FleetRouter {
    pub fn new(
        peers: Arc<PeerSet>,
        concurrency: FleetConcurrency,
        provisioner: Leadership,
        events: EventLedger,
    ) -> Self {
        FleetRouter {
            peers,
            warm: Mutex::default(),
            in_flight: Mutex::default(),
            concurrency,
            provisioner,
            events,
            provisioned: Mutex::default(),
        }
    }

    /// The Event invocations this front end holds, mirrored in etcd.
    pub fn events(&self) -> &EventLedger {
        &self.events
    }

    /// Environments the fleet's worker hosts can hold.
    pub fn capacity(&self) -> usize {
        self.peers
            .hosts(Role::WorkerHost)
            .iter()
            .map(|h| h.capacity)
            .sum()
    }

    /// Provisioned environments of `key` across the hosts.
    pub fn provisioned(&self, key: &VersionKey) -> usize {
        self.provisioned
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
            .unwrap_or(0)
    }

    /// Whether this front end provisions for the fleet now; the others
    /// only learn what the hosts hold, for the configs' status.
    pub async fn leads_provisioning(&self) -> bool {
        self.provisioner.held().await.unwrap_or_else(|e| {
            tracing::warn!("provisioned concurrency: who leads it: {e}");
            false
        })
    }

    /// Spreads each version's provisioned environments over the worker
    /// hosts there are now, evenly, and has each host keep its share: a
    /// host that left (crashed, cut off) has its share spread over the
    /// others at the next pass. Returns the versions that fell short.
    /// For the front end that leads provisioning.
    pub async fn reconcile_provisioned(
        &self,
        targets: &[(Launch, usize)],
    ) -> Vec<(VersionKey, RouteError)> {
        let mut failures: HashMap<VersionKey, RouteError> = HashMap::new();
        let mut wires = Vec::new();
        for (launch, n) in targets {
            match WireLaunch::from_launch(launch.clone()) {
                Ok(wire) => wires.push((launch.key.clone(), wire, *n)),
                Err(e) => {
                    failures.insert(launch.key.clone(), RouteError::Launch(e));
                }
            }
        }
        let front_end = &self.peers.tls.name;
        let answers = self
            .ask_provisioning_hosts(|host, hosts| {
                // Host i takes n / hosts, and one more while i < n % hosts.
                let share = |n: usize| n / hosts + usize::from(host < n % hosts);
                ProvisionRequest::Keep {
                    front_end: front_end.clone(),
                    targets: wires
                        .iter()
                        .map(|(key, wire, n)| (key.clone(), wire.clone(), share(*n)))
                        .collect(),
                }
            })
            .await;
        for (host, answer) in answers {
            for (key, failure) in answer.failures {
                let error = match failure {
                    Some(failure) => failure.into_route_error(&host),
                    None => too_many("ConcurrentInvocationLimitExceeded").into(),
                };
                failures.entry(key).or_insert(error);
            }
        }
        // A version short of its target with no failure named: the hosts
        // that should hold the rest were not reached, or there are none.
        for (key, _, n) in &wires {
            if self.provisioned(key) < *n && !failures.contains_key(key) {
                failures.insert(
                    key.clone(),
                    too_many("ConcurrentInvocationLimitExceeded").into(),
                );
            }
        }
        failures.into_iter().collect()
    }

    /// Learns what the hosts hold of `keys`, changing nothing: for a
    /// front end that does not lead provisioning.
    pub async fn observe_provisioned(&self, keys: &[VersionKey]) {
        self.ask_provisioning_hosts(|_, _| ProvisionRequest::Observe(keys.to_vec()))
            .await;
    }

    /// Sends each worker host the request `request(i, hosts)` makes for
    /// it, and keeps what the answers report (provisioned and idle
    /// environments); returns the answers by host.
    async fn ask_provisioning_hosts(
        &self,
        request: impl Fn(usize, usize) -> ProvisionRequest,
    ) -> Vec<(String, ProvisionAnswer)> {
        let hosts = self.peers.hosts(Role::WorkerHost);
        let mut provisioned: HashMap<VersionKey, usize> = HashMap::new();
        let mut answers = Vec::new();
        for (i, host) in hosts.iter().enumerate() {
            let answered = self
                .peers
                .peer(host)
                .post(PROVISION, encode(&request(i, hosts.len())))
                .await
                .map_err(|e| e.to_string())
                .and_then(|bytes| decode::<ProvisionAnswer>(&bytes));
            let answer = match answered {
                Ok(answer) => answer,
                Err(e) => {
                    tracing::warn!("provisioned concurrency on {}: {e}", host.name);
                    continue;
                }
            };
            for (key, n) in &answer.provisioned {
                *provisioned.entry(key.clone()).or_default() += n;
            }
            for (key, idle) in &answer.idle {
                self.set_warm(key, &host.name, *idle);
            }
            answers.push((host.name.clone(), answer));
        }
        *self.provisioned.lock().unwrap_or_else(|e| e.into_inner()) = provisioned;
        answers
    }

    fn warm_on(&self, key: &VersionKey) -> HashMap<String, u32> {
        self.warm
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .cloned()
            .unwrap_or_default()
    }

    fn set_warm(&self, key: &VersionKey, host: &str, idle: u32) {
        let mut warm = self.warm.lock().unwrap_or_else(|e| e.into_inner());
        let hosts = warm.entry(key.clone()).or_default();
        if idle == 0 {
            hosts.remove(host);
        } else {
            hosts.insert(host.to_string(), idle);
        }
    }

    fn count(&self, host: &str) -> InFlight<'_> {
        *self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(host.to_string())
            .or_default() += 1;
        InFlight {
            counts: &self.in_flight,
            host: host.to_string(),
        }
    }

    /// The worker hosts to try for `key`, best first: those with idle
    /// environments of it (most first), then the others by free room.
    fn candidates(&self, key: &VersionKey) -> Vec<(HostRecord, u32)> {
        let warm = self.warm_on(key);
        let in_flight = self
            .in_flight
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        let mut hosts: Vec<(HostRecord, u32)> = self
            .peers
            .hosts(Role::WorkerHost)
            .into_iter()
            .map(|h| {
                let idle = warm.get(&h.name).copied().unwrap_or(0);
                (h, idle)
            })
            .collect();
        let room = |h: &HostRecord| {
            h.capacity as i64 - in_flight.get(&h.name).copied().unwrap_or(0) as i64
        };
        hosts.sort_by_key(|(h, idle)| (std::cmp::Reverse(*idle), std::cmp::Reverse(room(h))));
        hosts
    }

    pub async fn invoke(
        &self,
        key: &VersionKey,
        launch: impl FnOnce() -> Result<Launch, ApiError>,
        reserved: Option<u32>,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Routed, RouteError> {
        let slot = match reserved {
            None => None,
            Some(limit) => Some(
                self.concurrency
                    .take(&key.account.0, &key.function, limit)
                    .await
                    .map_err(|e| ApiError::Service(format!("counting reserved concurrency: {e}")))?
                    .ok_or_else(|| too_many("ReservedFunctionConcurrentInvocationLimitExceeded"))?,
            ),
        };
        let slot = slot.map(Arc::new);
        let routed = self
            .place(key, launch, request_id, payload, timeout, &slot)
            .await;
        // Each exchange with a host held a share while it ran, and has
        // ended: the slot is this call's alone again.
        if let Some(slot) = slot.and_then(Arc::into_inner) {
            slot.free().await;
        }
        routed
    }

    /// Runs one invocation on the best worker host that takes it. Each
    /// exchange with a host holds a share of `slot` until it ends, even if
    /// the caller stops waiting: the host runs the invocation to its end
    /// regardless, and until then it counts against the reservation.
    async fn place(
        &self,
        key: &VersionKey,
        launch: impl FnOnce() -> Result<Launch, ApiError>,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
        slot: &Option<Arc<ConcurrencySlot>>,
    ) -> Result<Routed, RouteError> {
        let mut launch = Some(launch);
        let mut wire: Option<WireLaunch> = None;
        let mut make_wire = |wire: &mut Option<WireLaunch>| -> Result<(), RouteError> {
            if wire.is_none() {
                let build = launch.take().expect("a launch is built once");
                let built = build().map_err(RouteError::Launch)?;
                *wire = Some(WireLaunch::from_launch(built).map_err(RouteError::Launch)?);
            }
            Ok(())
        };
        let candidates = self.candidates(key);
        if candidates.is_empty() {
            return Err(ApiError::Service("the fleet has no worker host".into()).into());
        }
        let mut full = false;
        let mut unreachable = Vec::new();
        for (host, idle) in candidates {
            // A host with no idle environment of the version will start
            // one: the launch goes with the first request.
            if idle == 0 {
                make_wire(&mut wire)?;
            }
            let peer = self.peers.peer(&host);
            let _counted = self.count(&host.name);
            loop {
                let request = InvokeRequest {
                    key: key.clone(),
                    launch: wire.clone(),
                    front_end: self.peers.tls.name.clone(),
                    request_id: request_id.to_string(),
                    payload: payload.to_vec(),
                    timeout_ms: timeout.as_millis() as u64,
                };
                // A host cut off mid-invocation answers nothing: past the
                // function's own timeout, it is counted lost.
                let (peer, body, share) = (peer.clone(), encode(&request), slot.clone());
                let sent = tokio::spawn(async move {
                    let _share = share;
                    tokio::time::timeout(timeout + LOST_AFTER, peer.post(INVOKE, body)).await
                });
                let lost = || PeerError::Lost {
                    peer: host.name.clone(),
                    what: format!(
                        "no answer within {:?} of the function's timeout",
                        LOST_AFTER
                    ),
                };
                let answered = match sent
                    .await
                    .map_err(|e| ApiError::Service(format!("an exchange with {}: {e}", host.name)))?
                    .unwrap_or_else(|_| Err(lost()))
                {
                    Ok(bytes) => decode::<InvokeAnswer>(&bytes).map_err(|e| {
                        ApiError::Service(format!("worker host {}: {e}", host.name))
                    })?,
                    Err(e) if e.unreachable() => {
                        tracing::warn!("invocation {request_id}: {e}; trying another host");
                        self.set_warm(key, &host.name, 0);
                        unreachable.push(host.name.clone());
                        break;
                    }
                    Err(PeerError::Lost { .. }) => {
                        // The host may have run it: it is not run again.
                        tracing::warn!(
                            "invocation {request_id}: worker host {} was lost during it",
                            host.name
                        );
                        self.set_warm(key, &host.name, 0);
                        return Err(RouteError::EnvironmentFailed);
                    }
                    Err(e) => return Err(ApiError::Service(e.to_string()).into()),
                };
                match answered {
                    InvokeAnswer::Done(routed) => {
                        self.set_warm(key, &host.name, routed.idle_after);
                        return Ok(routed.into_routed(&host.name));
                    }
                    InvokeAnswer::NeedsLaunch if wire.is_none() => {
                        make_wire(&mut wire)?;
                        continue;
                    }
                    InvokeAnswer::NeedsLaunch => {
                        return Err(ApiError::Service(format!(
                            "worker host {} asked again for a launch it was given",
                            host.name
                        ))
                        .into())
                    }
                    InvokeAnswer::Full => {
                        full = true;
                        self.set_warm(key, &host.name, 0);
                        break;
                    }
                    InvokeAnswer::Failed(failure) => {
                        return Err(failure.into_route_error(&host.name))
                    }
                }
            }
        }
        if full {
            return Err(too_many("ConcurrentInvocationLimitExceeded").into());
        }
        Err(ApiError::Service(format!(
            "no worker host could be reached ({})",
            unreachable.join(", ")
        ))
        .into())
    }

    /// Retires on every worker host; one that cannot be reached retires
    /// nothing now, and its environments of the old code are never used
    /// (a version's key names its revision).
    pub async fn retire(&self, retire: Retire) {
        let message = encode(&retire);
        for host in self.peers.hosts(Role::WorkerHost) {
            if let Err(e) = self.peers.peer(&host).post(RETIRE, message.clone()).await {
                tracing::warn!("retiring {}/{}: {e}", retire.account, retire.function);
            }
        }
    }
}

/// What a front end serves its fleet: sealed artifacts and, to the
/// holders of valid grants, their data keys; to other front ends, the
/// code it took (sealed under the front ends' master keys, which no
/// worker host has).
pub fn front_end_endpoints(
    keys: Arc<KeyService>,
    artifacts: PathBuf,
    store: Store,
) -> axum::Router {
    axum::Router::new()
        .route(ARTIFACT, post(artifact))
        .route(DATA_KEY, post(data_key))
        .route(STORED_CODE, post(stored_code))
        .with_state(Arc::new(FrontEndState {
            keys,
            artifacts,
            store,
        }))
}

struct FrontEndState {
    keys: Arc<KeyService>,
    /// The artifact store's directory: no file outside it is served.
    artifacts: PathBuf,
    store: Store,
}

fn bad_request(what: String) -> (StatusCode, String) {
    (StatusCode::BAD_REQUEST, what)
}

async fn artifact(
    State(state): State<Arc<FrontEndState>>,
    body: Bytes,
) -> axum::response::Response {
    let result = async {
        let granted: GrantedArtifact = decode(&body).map_err(bad_request)?;
        let id = granted
            .artifact
            .id_bytes()
            .map_err(|e| bad_request(e.to_string()))?;
        state
            .keys
            .data_key(&granted.grant, &id, &granted.artifact.key)
            .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))?;
        let path = &granted.artifact.path;
        let named_for_it = path
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.ends_with(&format!(".{}.sealed", granted.artifact.id)));
        if path.parent() != Some(state.artifacts.as_path()) || !named_for_it {
            return Err((
                StatusCode::FORBIDDEN,
                format!(
                    "{} is not the sealed file of artifact {}",
                    path.display(),
                    granted.artifact.id
                ),
            ));
        }
        // Streamed: a container image's disk can be hundreds of MB.
        tokio::fs::File::open(path).await.map_err(|e| {
            (
                StatusCode::NOT_FOUND,
                format!("artifact {}: {e}", granted.artifact.id),
            )
        })
    }
    .await;
    match result {
        Ok(file) => axum::response::Response::new(axum::body::Body::from_stream(
            tokio_util::io::ReaderStream::new(file),
        )),
        Err(refused) => answer(Err(refused)),
    }
}

async fn stored_code(
    State(state): State<Arc<FrontEndState>>,
    body: Bytes,
) -> axum::response::Response {
    let result = std::str::from_utf8(&body)
        .map_err(|_| bad_request("a code key is text".into()))
        .and_then(|key| {
            match state
                .store
                .read()
                .and_then(|read| read.get_bytes(CODE, key))
            {
                Ok(Some(code)) => Ok(Bytes::from(code)),
                Ok(None) => Err((StatusCode::NOT_FOUND, format!("no code {key:?} here"))),
                Err(e) => Err((StatusCode::INTERNAL_SERVER_ERROR, e.to_string())),
            }
        });
    answer(result)
}

async fn data_key(
    State(state): State<Arc<FrontEndState>>,
    body: Bytes,
) -> axum::response::Response {
    let result = decode::<DataKeyRequest>(&body)
        .map_err(bad_request)
        .and_then(|request| {
            state
                .keys
                .data_key(&request.grant, &request.artifact, &request.wrapped)
                .map(|key| Bytes::copy_from_slice(&key))
                .map_err(|e| (StatusCode::FORBIDDEN, e.to_string()))
        });
    answer(result)
}
