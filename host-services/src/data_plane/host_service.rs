//! A worker host's side of the fleet: it runs the invocations front ends
//! send it on its own leased workers ([`InvokeRouter`]), fetches the
//! sealed artifacts a launch names from the front end that sent it (kept
//! sealed in a local cache), and gets their data keys from a front end
//! with the launch's grant ([`FleetKeys`]).

use std::future::Future;
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::StatusCode;
use axum::routing::post;
use bytes::Bytes;
use vmm::devices::virtio::block::sealed::{ArtifactId, DataKey};

use crate::artifacts::sealed::GrantedArtifact;
use crate::data_plane::environment::Launch;
use crate::data_plane::fleet_wire::{
    decode, encode, DataKeyRequest, InvokeAnswer, InvokeRequest, ProvisionAnswer, ProvisionRequest,
    Retire, WireFailure, WireLaunch, WireRouted, ARTIFACT, DATA_KEY, INVOKE, PROVISION, RETIRE,
};
use crate::data_plane::placement::retire_local;
use crate::data_plane::router::{InvokeRouter, RouteError};
use crate::error::ApiError;
use crate::fleet::membership::Role;
use crate::fleet::peers::PeerSet;
use crate::ids::VersionKey;
use crate::security::key_service::{ArtifactKeys, Grant, KeyError, WrappedKey};

pub struct HostService {
    router: Arc<InvokeRouter>,
    peers: Arc<PeerSet>,
    /// Sealed artifacts fetched from front ends, by artifact id.
    cache: PathBuf,
}

impl HostService {
    pub fn new(
        router: Arc<InvokeRouter>,
        peers: Arc<PeerSet>,
        cache: &Path,
    ) -> std::io::Result<Self> {
        std::fs::create_dir_all(cache)?;
        Ok(HostService {
            router,
            peers,
            cache: cache.to_path_buf(),
        })
    }

    /// The fleet endpoints a worker host serves.
    pub fn endpoints(self: Arc<Self>) -> axum::Router {
        axum::Router::new()
            .route(INVOKE, post(invoke))
            .route(RETIRE, post(retire))
            .route(PROVISION, post(provision))
            // A payload of Lambda's largest (6 MB) with room for the launch.
            .layer(axum::extract::DefaultBodyLimit::max(8 << 20))
            .with_state(self)
    }

    /// The launch `wire` describes, its artifacts in the local cache.
    async fn launch(
        &self,
        wire: WireLaunch,
        key: &VersionKey,
        front_end: &str,
    ) -> Result<Launch, String> {
        let code = self.localize(wire.code.clone(), front_end).await?;
        let layers = match wire.layers.clone() {
            Some(layers) => Some(self.localize(layers, front_end).await?),
            None => None,
        };
        Ok(WireLaunch {
            code,
            layers,
            ..wire
        }
        .into_launch(key.clone()))
    }

    /// `granted` with its sealed file in the local cache, fetched from
    /// `front_end` if it is not there yet.
    async fn localize(
        &self,
        granted: GrantedArtifact,
        front_end: &str,
    ) -> Result<GrantedArtifact, String> {
        let id = granted.artifact.id_bytes().map_err(|e| e.to_string())?;
        let local = self.cache.join(format!("{}.sealed", hex::encode(id)));
        if !local.exists() {
            let peer = self
                .peers
                .named(front_end)
                .ok_or_else(|| format!("front end {front_end} is not in the fleet"))?;
            // Written as it arrives, and in place only once whole.
            let partial = local.with_extension(format!("part-{}", uuid::Uuid::new_v4()));
            let fetched = async {
                let mut out = tokio::fs::File::create(&partial)
                    .await
                    .map_err(|e| format!("{}: {e}", partial.display()))?;
                peer.post_into(ARTIFACT, encode(&granted), &mut out)
                    .await
                    .map_err(|e| e.to_string())?;
                out.sync_all()
                    .await
                    .map_err(|e| format!("{}: {e}", partial.display()))?;
                tokio::fs::rename(&partial, &local)
                    .await
                    .map_err(|e| format!("{}: {e}", local.display()))
            }
            .await;
            if let Err(e) = fetched {
                let _ = tokio::fs::remove_file(&partial).await;
                return Err(e);
            }
        }
        let mut granted = granted;
        granted.artifact.path = local;
        Ok(granted)
    }
}

async fn invoke(State(host): State<Arc<HostService>>, body: Bytes) -> axum::response::Response {
    let request: InvokeRequest = match decode(&body) {
        Ok(request) => request,
        Err(e) => return crate::fleet::transport::answer(Err((StatusCode::BAD_REQUEST, e))),
    };
    let answered = run(&host, request).await;
    crate::fleet::transport::answer(Ok(encode(&answered)))
}

async fn run(host: &HostService, request: InvokeRequest) -> InvokeAnswer {
    let launch = match request.launch {
        Some(wire) => match host.launch(wire, &request.key, &request.front_end).await {
            Ok(launch) => Some(launch),
            Err(e) => {
                return InvokeAnswer::Failed(WireFailure::Service(format!(
                    "fetching the code: {e}"
                )))
            }
        },
        None => None,
    };
    let needs_launch = AtomicBool::new(false);
    let routed = host
        .router
        .invoke(
            &request.key,
            || {
                launch.ok_or_else(|| {
                    needs_launch.store(true, Ordering::Relaxed);
                    ApiError::Service("no launch".into())
                })
            },
            // The front end counts reserved concurrency.
            None,
            &request.request_id,
            Bytes::from(request.payload),
            Duration::from_millis(request.timeout_ms),
        )
        .await;
    match routed {
        Ok(routed) => InvokeAnswer::Done(WireRouted::new(routed, host.router.idle(&request.key))),
        Err(_) if needs_launch.load(Ordering::Relaxed) => InvokeAnswer::NeedsLaunch,
        Err(RouteError::Api(ApiError::TooManyRequests { .. })) => InvokeAnswer::Full,
        Err(e) => InvokeAnswer::Failed(WireFailure::new(e)),
    }
}

async fn provision(State(host): State<Arc<HostService>>, body: Bytes) -> axum::response::Response {
    let request: ProvisionRequest = match decode(&body) {
        Ok(request) => request,
        Err(e) => return crate::fleet::transport::answer(Err((StatusCode::BAD_REQUEST, e))),
    };
    let mut answer = ProvisionAnswer::default();
    let (front_end, wanted) = match request {
        ProvisionRequest::Keep { front_end, targets } => (front_end, targets),
        ProvisionRequest::Observe(keys) => {
            for key in keys {
                report(&mut answer, &host.router, key);
            }
            return crate::fleet::transport::answer(Ok(encode(&answer)));
        }
    };
    let mut targets = Vec::new();
    for (key, wire, n) in wanted {
        match host.launch(wire, &key, &front_end).await {
            Ok(launch) => targets.push((launch, n)),
            Err(e) => answer.failures.push((
                key,
                Some(WireFailure::Service(format!("fetching the code: {e}"))),
            )),
        }
    }
    for (key, error) in host.router.reconcile_provisioned(&targets).await {
        let failure = match error {
            RouteError::Api(ApiError::TooManyRequests { .. }) => None,
            other => Some(WireFailure::new(other)),
        };
        answer.failures.push((key, failure));
    }
    for (launch, _) in targets {
        report(&mut answer, &host.router, launch.key);
    }
    crate::fleet::transport::answer(Ok(encode(&answer)))
}

/// Adds what this host holds of `key` (provisioned, idle) to `answer`.
fn report(answer: &mut ProvisionAnswer, router: &InvokeRouter, key: VersionKey) {
    answer
        .provisioned
        .push((key.clone(), router.provisioned(&key)));
    let idle = router.idle(&key).min(u32::MAX as usize) as u32;
    answer.idle.push((key, idle));
}

async fn retire(State(host): State<Arc<HostService>>, body: Bytes) -> axum::response::Response {
    let result = match decode::<Retire>(&body) {
        Ok(retire) => {
            retire_local(&host.router, &retire).await;
            Ok(Bytes::new())
        }
        Err(e) => Err((StatusCode::BAD_REQUEST, e)),
    };
    crate::fleet::transport::answer(result)
}

/// Data keys from the fleet's front ends, which hold the master keys.
pub struct FleetKeys {
    peers: Arc<PeerSet>,
}

impl FleetKeys {
    pub fn new(peers: Arc<PeerSet>) -> Self {
        FleetKeys { peers }
    }

    async fn fetch(
        &self,
        grant: &Grant,
        artifact: &ArtifactId,
        wrapped: &WrappedKey,
    ) -> Result<DataKey, KeyError> {
        let request = encode(&DataKeyRequest {
            grant: grant.clone(),
            artifact: *artifact,
            wrapped: wrapped.clone(),
        });
        let mut last = String::from("the fleet has no front end");
        for front_end in self.peers.hosts(Role::FrontEnd) {
            match self
                .peers
                .peer(&front_end)
                .post(DATA_KEY, request.clone())
                .await
            {
                Ok(key) => {
                    return key.as_ref().try_into().map_err(|_| {
                        KeyError::Unreachable(format!(
                            "{} sent a key of {} bytes",
                            front_end.name,
                            key.len()
                        ))
                    })
                }
                Err(e) => last = e.to_string(),
            }
        }
        Err(KeyError::Unreachable(last))
    }
}

impl ArtifactKeys for FleetKeys {
    fn data_key<'a>(
        &'a self,
        grant: &'a Grant,
        artifact: &'a ArtifactId,
        wrapped: &'a WrappedKey,
    ) -> Pin<Box<dyn Future<Output = Result<DataKey, KeyError>> + Send + 'a>> {
        Box::pin(self.fetch(grant, artifact, wrapped))
    }
}
