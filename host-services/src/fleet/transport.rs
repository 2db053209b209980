//! HTTP between a fleet's hosts, over [`FleetTls`]: a host serves its
//! fleet endpoints (an axum router) to peers that complete the mutual TLS
//! handshake, and calls a peer's with [`Peer`], reusing connections.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Body;
use axum::http::{Request, Response, StatusCode};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_rustls::server::TlsStream;
use tokio_rustls::{TlsAcceptor, TlsConnector};

use crate::fleet::tls::{server_name, FleetTls};

/// How long a peer may take to accept a connection and finish the
/// handshake: a host that does not is treated as gone.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Connections whose handshake is done, in the order they finished: a
/// slow or hostile client holds up only its own handshake.
pub struct TlsListener {
    ready: mpsc::Receiver<(TlsStream<TcpStream>, SocketAddr)>,
    local: SocketAddr,
}

impl TlsListener {
    pub fn new(listener: TcpListener, tls: &FleetTls) -> std::io::Result<Self> {
        let local = listener.local_addr()?;
        let acceptor = TlsAcceptor::from(tls.server.clone());
        let (done, ready) = mpsc::channel(64);
        tokio::spawn(async move {
            loop {
                let accepted = tokio::select! {
                    accepted = listener.accept() => accepted,
                    // Nobody serves the connections any more.
                    () = done.closed() => return,
                };
                let (tcp, peer) = match accepted {
                    Ok(accepted) => accepted,
                    Err(e) => {
                        tracing::warn!("fleet listener: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                let _ = tcp.set_nodelay(true);
                let acceptor = acceptor.clone();
                let done = done.clone();
                tokio::spawn(async move {
                    match tokio::time::timeout(CONNECT_TIMEOUT, acceptor.accept(tcp)).await {
                        Ok(Ok(tls)) => {
                            let _ = done.send((tls, peer)).await;
                        }
                        Ok(Err(e)) => tracing::warn!("fleet: refused {peer}: {e}"),
                        Err(_) => tracing::warn!("fleet: {peer} did not finish its handshake"),
                    }
                });
            }
        });
        Ok(TlsListener { ready, local })
    }
}

impl axum::serve::Listener for TlsListener {
    type Io = TlsStream<TcpStream>;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, SocketAddr) {
        match self.ready.recv().await {
            Some(accepted) => accepted,
            // The accepting task only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<SocketAddr> {
        Ok(self.local)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PeerError {
    #[error("cannot reach {peer} at {address}: {what}")]
    Unreachable {
        peer: String,
        address: SocketAddr,
        what: String,
    },
    #[error("{peer} took the request but gave no answer: {what}")]
    Lost { peer: String, what: String },
    #[error("saving what {peer} answered: {what}")]
    Saving { peer: String, what: String },
    #[error("{peer} answered {status}: {body}")]
    Status {
        peer: String,
        status: StatusCode,
        body: String,
    },
}

impl PeerError {
    /// Whether the request was never sent (so nothing ran there).
    pub fn unreachable(&self) -> bool {
        matches!(self, PeerError::Unreachable { .. })
    }
}

/// Another host of the fleet, called over mutual TLS. Clones share its
/// idle connections.
#[derive(Clone)]
pub struct Peer {
    pub name: String,
    pub address: SocketAddr,
    connector: TlsConnector,
    idle: Arc<Mutex<Vec<SendRequest<Full<Bytes>>>>>,
}

impl Peer {
    pub fn new(name: &str, address: SocketAddr, tls: &FleetTls) -> Self {
        Peer {
            name: name.to_string(),
            address,
            connector: TlsConnector::from(tls.client.clone()),
            idle: Arc::default(),
        }
    }

    fn unreachable(&self, what: impl std::fmt::Display) -> PeerError {
        PeerError::Unreachable {
            peer: self.name.clone(),
            address: self.address,
            what: what.to_string(),
        }
    }

    async fn connect(&self) -> Result<SendRequest<Full<Bytes>>, PeerError> {
        let name = server_name(&self.name).map_err(|e| self.unreachable(e))?;
        let connected = async {
            let tcp = TcpStream::connect(self.address).await?;
            tcp.set_nodelay(true)?;
            self.connector.connect(name, tcp).await
        };
        let tls = tokio::time::timeout(CONNECT_TIMEOUT, connected)
            .await
            .map_err(|_| self.unreachable("timed out connecting"))?
            .map_err(|e| self.unreachable(e))?;
        let (sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| self.unreachable(e))?;
        tokio::spawn(connection);
        Ok(sender)
    }

    /// An idle connection that is still open, or a new one.
    async fn sender(&self) -> Result<SendRequest<Full<Bytes>>, PeerError> {
        loop {
            let idle = self.idle.lock().unwrap_or_else(|e| e.into_inner()).pop();
            match idle {
                Some(mut sender) => {
                    if sender.ready().await.is_ok() {
                        return Ok(sender);
                    }
                }
                None => return self.connect().await,
            }
        }
    }

    /// POSTs `body` to `path` and returns the answer's body; an answer
    /// other than 200 is [`PeerError::Status`]. [`PeerError::Unreachable`]
    /// means the request was not sent; [`PeerError::Lost`] that it was and
    /// no answer came, so the peer may have acted on it.
    pub async fn post(&self, path: &str, body: Bytes) -> Result<Bytes, PeerError> {
        let (sender, response) = self.exchange(path, body).await?;
        let (status, body) = self.whole_body(response).await?;
        self.keep(sender);
        if status != StatusCode::OK {
            return Err(self.refused(status, body));
        }
        Ok(body)
    }

    /// [`Peer::post`] for an answer too large to hold: its body goes
    /// into `out` as it arrives. Returns the bytes written.
    pub async fn post_into(
        &self,
        path: &str,
        body: Bytes,
        out: &mut tokio::fs::File,
    ) -> Result<u64, PeerError> {
        use tokio::io::AsyncWriteExt;
        let (sender, response) = self.exchange(path, body).await?;
        if response.status() != StatusCode::OK {
            let (status, body) = self.whole_body(response).await?;
            self.keep(sender);
            return Err(self.refused(status, body));
        }
        let mut body = response.into_body();
        let mut written = 0u64;
        while let Some(frame) = body.frame().await {
            let frame = frame.map_err(|e| self.lost(e))?;
            if let Ok(data) = frame.into_data() {
                out.write_all(&data).await.map_err(|e| PeerError::Saving {
                    peer: self.name.clone(),
                    what: e.to_string(),
                })?;
                written += data.len() as u64;
            }
        }
        self.keep(sender);
        Ok(written)
    }

    fn lost(&self, e: hyper::Error) -> PeerError {
        PeerError::Lost {
            peer: self.name.clone(),
            what: e.to_string(),
        }
    }

    async fn exchange(
        &self,
        path: &str,
        body: Bytes,
    ) -> Result<(SendRequest<Full<Bytes>>, Response<Incoming>), PeerError> {
        let mut sender = self.sender().await?;
        let request = Request::post(path)
            .header("host", &self.name)
            .body(Full::new(body))
            .expect("a path and a body make a request");
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| self.lost(e))?;
        Ok((sender, response))
    }

    /// An answer's status and whole body.
    async fn whole_body(
        &self,
        response: Response<Incoming>,
    ) -> Result<(StatusCode, Bytes), PeerError> {
        let status = response.status();
        let body = response
            .into_body()
            .collect()
            .await
            .map_err(|e| self.lost(e))?
            .to_bytes();
        Ok((status, body))
    }

    /// A non-200 answer as [`PeerError::Status`].
    fn refused(&self, status: StatusCode, body: Bytes) -> PeerError {
        PeerError::Status {
            peer: self.name.clone(),
            status,
            body: String::from_utf8_lossy(&body).into_owned(),
        }
    }

    /// A connection whose answer was read whole goes back to the idle ones.
    fn keep(&self, sender: SendRequest<Full<Bytes>>) {
        self.idle
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(sender);
    }
}

/// Serves `router` to the fleet's hosts on `listener` until the task is
/// dropped.
pub fn serve(
    listener: TcpListener,
    tls: &FleetTls,
    router: axum::Router,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TlsListener::new(listener, tls)?;
    Ok(tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, router).await {
            tracing::error!("fleet server: {e}");
        }
    }))
}

/// An answer a fleet endpoint gives a peer: 200 with `body`, or the
/// status and a line saying what was wrong.
pub fn answer(result: Result<Bytes, (StatusCode, String)>) -> axum::response::Response {
    match result {
        Ok(body) => axum::response::Response::new(Body::from(body)),
        Err((status, what)) => {
            let mut response = axum::response::Response::new(Body::from(what));
            *response.status_mut() = status;
            response
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testing::{fleet_certs, temp_dir};
    use axum::routing::post;

    #[tokio::test]
    async fn peers_call_each_other_and_strangers_get_nothing() {
        let dir = temp_dir("transport");
        fleet_certs(&dir.join("fleet"), &["fe", "h1"]);
        fleet_certs(&dir.join("other"), &["stranger"]);
        let fe = FleetTls::load(&dir.join("fleet"), "fe").unwrap();
        let h1 = FleetTls::load(&dir.join("fleet"), "h1").unwrap();
        let stranger = FleetTls::load(&dir.join("other"), "stranger").unwrap();

        let calls = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let counted = calls.clone();
        let big: Bytes = (0..3u32 << 20).map(|i| (i % 251) as u8).collect();
        let router = axum::Router::new()
            .route(
                "/echo",
                post(move |body: Bytes| async move {
                    counted.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                    let mut reversed = body.to_vec();
                    reversed.reverse();
                    answer(if body.is_empty() {
                        Err((StatusCode::BAD_REQUEST, "an empty body".into()))
                    } else {
                        Ok(reversed.into())
                    })
                }),
            )
            .route(
                "/big",
                post({
                    let big = big.clone();
                    move || async move { answer(Ok(big)) }
                }),
            );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let server = serve(listener, &h1, router).unwrap();

        let peer = Peer::new("h1", address, &fe);
        for _ in 0..3 {
            assert_eq!(&peer.post("/echo", "abc".into()).await.unwrap()[..], b"cba");
        }
        // One connection carried all three.
        assert_eq!(peer.idle.lock().unwrap().len(), 1);
        let error = peer.post("/echo", Bytes::new()).await.unwrap_err();
        assert!(
            matches!(&error, PeerError::Status { status, body, .. }
                if *status == StatusCode::BAD_REQUEST && body == "an empty body"),
            "{error}"
        );
        // A refusal is an answer: its connection serves the next call.
        assert_eq!(peer.idle.lock().unwrap().len(), 1);

        // A large answer streams into a file; a refusal writes nothing.
        let saved = dir.join("big");
        let mut out = tokio::fs::File::create(&saved).await.unwrap();
        let written = peer
            .post_into("/big", Bytes::new(), &mut out)
            .await
            .unwrap();
        assert_eq!(written, big.len() as u64);
        assert!(std::fs::read(&saved).unwrap() == big);
        let mut out = tokio::fs::File::create(&saved).await.unwrap();
        let error = peer
            .post_into("/echo", Bytes::new(), &mut out)
            .await
            .unwrap_err();
        assert!(matches!(error, PeerError::Status { .. }), "{error}");
        assert_eq!(std::fs::metadata(&saved).unwrap().len(), 0);

        let outsider = Peer::new("h1", address, &stranger);
        let error = outsider.post("/echo", "abc".into()).await.unwrap_err();
        assert!(error.unreachable(), "{error}");
        assert_eq!(calls.load(std::sync::atomic::Ordering::SeqCst), 5);

        // A peer that went away is unreachable, not a hang.
        server.abort();
        let _ = server.await;
        let gone = Peer::new("h1", address, &fe);
        assert!(gone
            .post("/echo", "abc".into())
            .await
            .unwrap_err()
            .unreachable());
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
