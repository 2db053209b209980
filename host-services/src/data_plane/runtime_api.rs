//! The AWS Lambda Runtime API, served to one execution environment.
//!
//! The runtime in the guest long-polls `GET /2018-06-01/runtime/invocation/next`,
//! then posts `/invocation/{id}/response` or `/invocation/{id}/error`; a
//! runtime that cannot start posts `/init/error`. The host side calls
//! [`RuntimeApi::invoke`] and gets the outcome. The server is axum on a
//! Unix socket: the path the VMM's vsock forwards the guest's port to.

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, Path as UrlPath, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::serve::Listener;
use axum::Router;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, oneshot, watch};

/// Lambda's synchronous payload limit, for events and responses alike.
pub const MAX_PAYLOAD: usize = 6 * 1024 * 1024;
const ERROR_TYPE_HEADER: &str = "lambda-runtime-function-error-type";

/// What the function made of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    Response(Bytes),
    /// The runtime reported an error: its type and JSON body.
    FunctionError {
        error_type: String,
        body: Bytes,
    },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum InvokeError {
    #[error("the function did not finish within {0:?}")]
    Timeout(Duration),
    #[error("the runtime failed to initialize: {error_type}: {body}")]
    InitFailed { error_type: String, body: String },
    #[error("the environment's runtime is gone")]
    EnvironmentGone,
}

struct Pending {
    request_id: String,
    payload: Bytes,
    deadline: SystemTime,
    reply: oneshot::Sender<Outcome>,
}

/// The runtime's reported init failure, if any.
type InitError = Option<(String, String)>;

struct Shared {
    queue: tokio::sync::Mutex<mpsc::Receiver<Pending>>,
    in_flight: Mutex<HashMap<String, oneshot::Sender<Outcome>>>,
    function_arn: String,
    init_error: watch::Sender<InitError>,
    /// Set by the runtime's first `/next`, or its `/restore/next`: the end
    /// of its init phase.
    ready: watch::Sender<bool>,
    /// Set once the environment's snapshot step is over: a runtime
    /// waiting in `/restore/next` goes on.
    resumed: watch::Receiver<bool>,
    /// When `/next` last handed out an event.
    handed_out: Arc<Mutex<Option<Instant>>>,
}

/// One environment's Runtime API: the server task and the invoking side.
pub struct RuntimeApi {
    sender: mpsc::Sender<Pending>,
    init_error: watch::Receiver<InitError>,
    ready: watch::Receiver<bool>,
    resumed: watch::Sender<bool>,
    handed_out: Arc<Mutex<Option<Instant>>>,
    server: tokio::task::JoinHandle<()>,
}

impl Drop for RuntimeApi {
    fn drop(&mut self) {
        self.server.abort();
    }
}

fn millis_since_epoch(t: SystemTime) -> u128 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_millis())
}

async fn next(State(shared): State<Arc<Shared>>) -> Response {
    shared.ready.send_replace(true);
    let pending = {
        let mut queue = shared.queue.lock().await;
        queue.recv().await
    };
    let Some(p) = pending else {
        return (StatusCode::GONE, "the environment is shutting down").into_response();
    };
    let remaining = p
        .deadline
        .duration_since(SystemTime::now())
        .unwrap_or_default()
        .as_millis();
    let mut headers = HeaderMap::new();
    let mut set = |name: &'static str, value: String| {
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(name, v);
        }
    };
    // As Lambda's: runtime clients (awslambdaric) decode the event as
    // JSON only when told it is.
    set("content-type", "application/json".into());
    set("lambda-runtime-aws-request-id", p.request_id.clone());
    set(
        "lambda-runtime-deadline-ms",
        millis_since_epoch(p.deadline).to_string(),
    );
    set(
        "lambda-runtime-invoked-function-arn",
        shared.function_arn.clone(),
    );
    set(
        "lambda-runtime-trace-id",
        format!("Root=1-{}", uuid::Uuid::new_v4().simple()),
    );
    // A guest without a wall clock cannot turn the deadline into a
    // duration; this project's guests read this instead.
    set("x-microvm-remaining-ms", remaining.to_string());
    *shared.handed_out.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
    shared
        .in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(p.request_id, p.reply);
    (StatusCode::OK, headers, p.payload).into_response()
}

/// SnapStart's hook point: a runtime initialized for a snapshot
/// (`AWS_LAMBDA_INITIALIZATION_TYPE=snap-start`, as awslambdaric does)
/// asks here once its before-snapshot hooks ran. The snapshot is taken
/// while it waits; the answer comes once the environment goes on (in a
/// clone, its replayed request is answered at once), and the runtime runs
/// its after-restore hooks before its first `/next`.
async fn restore_next(State(shared): State<Arc<Shared>>) -> Response {
    shared.ready.send_replace(true);
    let mut resumed = shared.resumed.clone();
    if resumed.wait_for(|r| *r).await.is_err() {
        return (StatusCode::GONE, "the environment is shutting down").into_response();
    }
    StatusCode::OK.into_response()
}

fn complete(shared: &Shared, id: &str, outcome: Outcome) -> Response {
    let reply = shared
        .in_flight
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .remove(id);
    match reply {
        Some(tx) => {
            let _ = tx.send(outcome);
            (StatusCode::ACCEPTED, "{\"status\":\"OK\"}").into_response()
        }
        None => (
            StatusCode::BAD_REQUEST,
            format!("{{\"errorMessage\":\"unknown request id {id:?}\",\"errorType\":\"InvalidRequestID\"}}"),
        )
            .into_response(),
    }
}

async fn response(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    complete(&shared, &id, Outcome::Response(body))
}

fn error_type(headers: &HeaderMap) -> String {
    headers
        .get(ERROR_TYPE_HEADER)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("Unhandled")
        .to_string()
}

async fn error(
    State(shared): State<Arc<Shared>>,
    UrlPath(id): UrlPath<String>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let outcome = Outcome::FunctionError {
        error_type: error_type(&headers),
        body,
    };
    complete(&shared, &id, outcome)
}

async fn init_error(
    State(shared): State<Arc<Shared>>,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    let reported = (
        error_type(&headers),
        String::from_utf8_lossy(&body).into_owned(),
    );
    shared.init_error.send_replace(Some(reported));
    (StatusCode::ACCEPTED, "{\"status\":\"OK\"}").into_response()
}

/// Serves `router` over HTTP/1.1 only, as Lambda's Runtime API is:
/// `axum::serve` also answers HTTP/2 once any crate in the build enables
/// hyper's (etcd's gRPC client does), and a guest has no use for a
/// second protocol parser on the host.
async fn serve_http1<L: Listener>(mut listener: L, router: Router) {
    loop {
        let (connection, _) = listener.accept().await;
        let service = hyper_util::service::TowerToHyperService::new(router.clone());
        tokio::spawn(async move {
            let served = hyper::server::conn::http1::Builder::new()
                .timer(hyper_util::rt::TokioTimer::new())
                .serve_connection(hyper_util::rt::TokioIo::new(connection), service)
                .await;
            if let Err(e) = served {
                tracing::debug!("runtime API connection: {e}");
            }
        });
    }
}

/// The Runtime API's connections: the guest's first, when it was made
/// ahead (the VMM hands it to the guest, and no accept wakes the host on
/// a cold start's path), then those a Unix socket accepts.
struct FirstThenAccepted {
    first: Option<UnixStream>,
    listener: UnixListener,
}

impl Listener for FirstThenAccepted {
    type Io = UnixStream;
    type Addr = ();

    async fn accept(&mut self) -> (UnixStream, ()) {
        match self.first.take() {
            Some(first) => (first, ()),
            None => (Listener::accept(&mut self.listener).await.0, ()),
        }
    }

    fn local_addr(&self) -> std::io::Result<()> {
        Ok(())
    }
}

/// A connected socket made with std, driven by tokio from now on.
pub fn tokio_stream(stream: std::os::unix::net::UnixStream) -> std::io::Result<UnixStream> {
    stream.set_nonblocking(true)?;
    UnixStream::from_std(stream)
}

impl RuntimeApi {
    /// Serves the API on `first`, a connection made ahead, if any, and on
    /// a new Unix socket at `path`.
    pub async fn bind(
        path: &Path,
        first: Option<std::os::unix::net::UnixStream>,
        function_arn: &str,
    ) -> std::io::Result<Self> {
        let _ = std::fs::remove_file(path);
        let listener = FirstThenAccepted {
            first: first.map(tokio_stream).transpose()?,
            listener: UnixListener::bind(path)?,
        };
        Ok(Self::serve(listener, function_arn))
    }

    /// Serves the API on the connections `listener` accepts.
    pub fn serve<L>(listener: L, function_arn: &str) -> Self
    where
        L: Listener,
        L::Addr: std::fmt::Debug,
    {
        let (sender, receiver) = mpsc::channel(64);
        let (init_tx, init_rx) = watch::channel(None);
        let (ready_tx, ready_rx) = watch::channel(false);
        let (resumed_tx, resumed_rx) = watch::channel(false);
        let handed_out = Arc::new(Mutex::new(None));
        let shared = Arc::new(Shared {
            queue: tokio::sync::Mutex::new(receiver),
            in_flight: Mutex::new(HashMap::new()),
            function_arn: function_arn.to_string(),
            init_error: init_tx,
            ready: ready_tx,
            resumed: resumed_rx,
            handed_out: handed_out.clone(),
        });
        let router = Router::new()
            .route("/2018-06-01/runtime/invocation/next", get(next))
            .route(
                "/2018-06-01/runtime/invocation/{id}/response",
                post(response),
            )
            .route("/2018-06-01/runtime/invocation/{id}/error", post(error))
            .route("/2018-06-01/runtime/init/error", post(init_error))
            .route("/2018-06-01/runtime/restore/next", get(restore_next))
            // A failed after-restore hook ends the environment as a
            // failed init does.
            .route("/2018-06-01/runtime/restore/error", post(init_error))
            .layer(DefaultBodyLimit::max(MAX_PAYLOAD))
            .with_state(shared);
        let server = tokio::spawn(serve_http1(listener, router));
        RuntimeApi {
            sender,
            init_error: init_rx,
            ready: ready_rx,
            resumed: resumed_tx,
            handed_out,
            server,
        }
    }

    /// When `/next` last handed out an event.
    pub fn handed_out(&self) -> Option<Instant> {
        *self.handed_out.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Lets a runtime waiting in `/restore/next` go on: the environment's
    /// snapshot, if it takes one, is taken.
    pub fn resume(&self) {
        self.resumed.send_replace(true);
    }

    /// Waits until the runtime has finished its init phase and asks for
    /// work, or reports that it failed to.
    pub async fn ready(&self) -> Result<(), InvokeError> {
        let mut ready = self.ready.clone();
        let mut init_error = self.init_error.clone();
        tokio::select! {
            _ = ready.wait_for(|r| *r) => Ok(()),
            _ = init_error.wait_for(Option::is_some) => Err(self.reported_init_error()),
        }
    }

    fn reported_init_error(&self) -> InvokeError {
        let (error_type, body) = self.init_error.borrow().clone().unwrap_or_default();
        InvokeError::InitFailed { error_type, body }
    }

    /// Hands `payload` to the runtime as request `request_id` and waits
    /// for its outcome, at most `timeout`.
    pub async fn invoke(
        &self,
        request_id: &str,
        payload: Bytes,
        timeout: Duration,
    ) -> Result<Outcome, InvokeError> {
        let (reply, outcome) = oneshot::channel();
        let pending = Pending {
            request_id: request_id.to_string(),
            payload,
            deadline: SystemTime::now() + timeout,
            reply,
        };
        self.sender
            .send(pending)
            .await
            .map_err(|_| InvokeError::EnvironmentGone)?;
        let mut init_error = self.init_error.clone();
        tokio::select! {
            result = outcome => result.map_err(|_| InvokeError::EnvironmentGone),
            _ = tokio::time::sleep(timeout) => Err(InvokeError::Timeout(timeout)),
            _ = init_error.wait_for(Option::is_some) => Err(self.reported_init_error()),
        }
    }
}
