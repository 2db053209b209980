//! The fleet's connection to etcd. With the fleet's TLS every gRPC
//! connection to etcd is mutual TLS 1.3 with AES-256-GCM, dialled by this
//! module (tonic's own TLS cannot be held to one cipher suite); endpoints
//! are tried in turn when one does not answer.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use etcd_client::{
    Channel, Client, Compare, CompareOp, ConnectOptions, PutOptions, Txn, TxnOp, TxnOpResponse,
};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tonic::transport::{Endpoint, Uri};

use crate::fleet::tls::{server_name, FleetTls};

/// Where the fleet keeps its records in etcd.
pub const ROOT: &str = "/lambda-microvm/";

#[derive(Debug, thiserror::Error)]
pub enum EtcdError {
    #[error("etcd endpoint {0:?} is not HOST:PORT")]
    BadEndpoint(String),
    #[error("etcd: {0}")]
    Client(#[from] etcd_client::Error),
    #[error("etcd ({0}): {1}")]
    Transport(String, tonic::transport::Error),
}

/// An etcd endpoint: `HOST:PORT`, where HOST is also the name its
/// certificate carries when the fleet uses TLS.
#[derive(Debug, Clone)]
struct EtcdEndpoint {
    host: String,
    port: u16,
}

fn parse(endpoint: &str) -> Result<EtcdEndpoint, EtcdError> {
    let bad = || EtcdError::BadEndpoint(endpoint.to_string());
    let bare = endpoint
        .strip_prefix("http://")
        .or_else(|| endpoint.strip_prefix("https://"))
        .unwrap_or(endpoint);
    let (host, port) = bare.rsplit_once(':').ok_or_else(bad)?;
    if host.is_empty() {
        return Err(bad());
    }
    Ok(EtcdEndpoint {
        host: host.to_string(),
        port: port.parse().map_err(|_| bad())?,
    })
}

/// How long etcd may take to answer one call before the fleet counts it
/// as unreachable.
const CALL_TIMEOUT: Duration = Duration::from_secs(3);

/// Connects to etcd at `endpoints` (`HOST:PORT`, the first that answers),
/// over the fleet's TLS when `tls` is given. The connection is made at
/// the first call and made again after a failure.
pub async fn connect(endpoints: &[String], tls: Option<&FleetTls>) -> Result<Client, EtcdError> {
    let endpoints: Arc<Vec<EtcdEndpoint>> = Arc::new(
        endpoints
            .iter()
            .map(|e| parse(e))
            .collect::<Result<_, _>>()?,
    );
    let Some(first) = endpoints.first() else {
        return Err(EtcdError::BadEndpoint(String::new()));
    };
    let uri = format!("http://{}:{}", first.host, first.port);
    let endpoint = Endpoint::from_shared(uri.clone())
        .map_err(|e| EtcdError::Transport(uri.clone(), e))?
        .connect_timeout(CALL_TIMEOUT)
        .timeout(CALL_TIMEOUT)
        .tcp_nodelay(true);
    let connector = tls.map(|tls| TlsConnector::from(tls.client_with_alpn(&[b"h2"])));
    let next = Arc::new(AtomicUsize::new(0));
    // The URI tonic passes is the first endpoint's; the dialler picks
    // the endpoint itself, moving on to the next after each failure.
    let dial = tower::service_fn(move |_: Uri| {
        let endpoints = endpoints.clone();
        let connector = connector.clone();
        let next = next.clone();
        async move {
            let mut last = None;
            for _ in 0..endpoints.len() {
                let at = next.load(Ordering::Relaxed) % endpoints.len();
                let endpoint = &endpoints[at];
                match dial_one(endpoint, connector.as_ref()).await {
                    Ok(io) => return Ok(io),
                    Err(e) => {
                        tracing::warn!("etcd {}:{}: {e}", endpoint.host, endpoint.port);
                        next.store(at + 1, Ordering::Relaxed);
                        last = Some(e);
                    }
                }
            }
            Err(last.unwrap_or_else(|| std::io::Error::other("no etcd endpoint")))
        }
    });
    let channel = endpoint.connect_with_connector_lazy(dial);
    Ok(Client::from_channel(Channel::Tonic(channel), Some(ConnectOptions::new())).await?)
}

/// Who holds a key another writer put first.
pub struct Held {
    pub value: Vec<u8>,
    pub lease: i64,
}

/// Puts `value` at `key` (under `lease`, if given) unless the key exists,
/// in one transaction. `None`: this call put it; otherwise who has it.
pub async fn put_if_absent(
    client: &Client,
    key: &str,
    value: &[u8],
    lease: Option<i64>,
) -> Result<Option<Held>, EtcdError> {
    let claim = Txn::new()
        .when([Compare::create_revision(key, CompareOp::Equal, 0)])
        .and_then([TxnOp::put(
            key,
            value,
            lease.map(|id| PutOptions::new().with_lease(id)),
        )])
        .or_else([TxnOp::get(key, None)]);
    let done = client.clone().txn(claim).await?;
    if done.succeeded() {
        return Ok(None);
    }
    Ok(done.op_responses().into_iter().find_map(|op| match op {
        TxnOpResponse::Get(get) => get.kvs().first().map(|kv| Held {
            value: kv.value().to_vec(),
            lease: kv.lease(),
        }),
        _ => None,
    }))
}

/// How long an optimistic transaction that other writers keep beating
/// is tried again before its caller is told.
const CONTENTION_PATIENCE: Duration = Duration::from_secs(10);

/// The longest pause between two tries of a beaten transaction.
const MAX_PAUSE: Duration = Duration::from_millis(50);

/// Paces the tries of an optimistic transaction (compare a revision,
/// then write). Writers that retry at once collide again in step, and a
/// slower one can lose every round; a random pause under a bound that
/// doubles with each refusal spreads them out.
pub struct Contention {
    since: Instant,
    refusals: u32,
}

impl Default for Contention {
    fn default() -> Self {
        Contention {
            since: Instant::now(),
            refusals: 0,
        }
    }
}

impl Contention {
    /// The pause before the next try after a refusal, or `None` when
    /// the patience is spent.
    pub fn refused(&mut self) -> Option<Duration> {
        self.refusals += 1;
        if self.since.elapsed() >= CONTENTION_PATIENCE {
            return None;
        }
        let bound = Duration::from_micros(250 << self.refusals.min(8)).min(MAX_PAUSE);
        let draw = getrandom::u64().unwrap_or(u64::MAX / 2);
        Some(bound.mul_f64((draw >> 11) as f64 / (1u64 << 53) as f64))
    }

    /// Why the transaction was given up.
    pub fn exhausted(&self) -> String {
        format!(
            "other writers' changes came first {} times in {:.1} s",
            self.refusals,
            self.since.elapsed().as_secs_f64()
        )
    }
}

/// A TCP (or TLS over TCP) connection to one etcd endpoint.
async fn dial_one(
    endpoint: &EtcdEndpoint,
    tls: Option<&TlsConnector>,
) -> std::io::Result<TokioIo<Box<dyn Stream>>> {
    let tcp = tokio::time::timeout(
        CALL_TIMEOUT,
        TcpStream::connect((endpoint.host.as_str(), endpoint.port)),
    )
    .await
    .map_err(|_| std::io::Error::new(std::io::ErrorKind::TimedOut, "connecting"))??;
    tcp.set_nodelay(true)?;
    let stream: Box<dyn Stream> = match tls {
        None => Box::new(tcp),
        Some(tls) => {
            let name = server_name(&endpoint.host).map_err(std::io::Error::other)?;
            Box::new(tls.connect(name, tcp).await?)
        }
    };
    Ok(TokioIo::new(stream))
}

/// A byte stream to etcd, plain or TLS.
trait Stream: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin {}
impl<T: tokio::io::AsyncRead + tokio::io::AsyncWrite + Send + Unpin> Stream for T {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_are_host_and_port() {
        assert_eq!(parse("http://10.0.0.1:2379").unwrap().port, 2379);
        assert_eq!(parse("etcd:2379").unwrap().host, "etcd");
        for bad in ["10.0.0.1", ":2379", "etcd:port", "etcd:99999"] {
            let error = parse(bad).err().unwrap().to_string();
            assert!(error.contains(&format!("{bad:?}")), "{error}");
        }
    }
}
