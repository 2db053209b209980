//! Mutual TLS between a fleet's hosts: TLS 1.3 only, AES-256-GCM only,
//! and both ends present a certificate of the fleet's own authority
//! (`scripts/fleet-certs.sh` makes them). A host without one completes no
//! handshake, so it reaches no endpoint.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::{aws_lc_rs, CryptoProvider};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::WebPkiClientVerifier;
use rustls::{ClientConfig, RootCertStore, ServerConfig};

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: {what}")]
    File { path: PathBuf, what: String },
    #[error("{path}: holds no certificate")]
    NoCertificate { path: PathBuf },
    #[error("the fleet's certificates do not fit together: {0}")]
    Config(#[from] rustls::Error),
    #[error("the fleet's authority {path} cannot verify clients: {what}")]
    Verifier { path: PathBuf, what: String },
    #[error("{0:?} is not a host name a certificate can carry")]
    BadName(String),
}

/// One host's side of the fleet's TLS: what it presents, what it trusts.
#[derive(Clone)]
pub struct FleetTls {
    pub server: Arc<ServerConfig>,
    pub client: Arc<ClientConfig>,
    /// This host's name, as its certificate carries it.
    pub name: String,
}

/// TLS 1.3's AES-256-GCM suite and nothing else: a peer that offers only
/// weaker suites fails the handshake rather than settling.
fn provider() -> Arc<CryptoProvider> {
    Arc::new(CryptoProvider {
        cipher_suites: vec![aws_lc_rs::cipher_suite::TLS13_AES_256_GCM_SHA384],
        ..aws_lc_rs::default_provider()
    })
}

fn file_error(path: &Path) -> impl Fn(rustls::pki_types::pem::Error) -> TlsError + '_ {
    move |e| TlsError::File {
        path: path.to_path_buf(),
        what: e.to_string(),
    }
}

fn certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = CertificateDer::pem_file_iter(path)
        .map_err(file_error(path))?
        .collect::<Result<Vec<_>, _>>()
        .map_err(file_error(path))?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

impl FleetTls {
    /// Reads `dir/ca.pem` (the fleet's authority) and this host's
    /// `dir/NAME.pem` and `dir/NAME.key`.
    pub fn load(dir: &Path, name: &str) -> Result<Self, TlsError> {
        server_name(name)?;
        let ca_path = dir.join("ca.pem");
        let mut roots = RootCertStore::empty();
        for ca in certificates(&ca_path)? {
            roots.add(ca)?;
        }
        let roots = Arc::new(roots);
        let chain = certificates(&dir.join(format!("{name}.pem")))?;
        let key_path = dir.join(format!("{name}.key"));
        let key = PrivateKeyDer::from_pem_file(&key_path).map_err(file_error(&key_path))?;
        let provider = provider();
        let verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .build()
            .map_err(|e| TlsError::Verifier {
                path: ca_path,
                what: e.to_string(),
            })?;
        let server = ServerConfig::builder_with_provider(provider.clone())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_client_cert_verifier(verifier)
            .with_single_cert(chain.clone(), key.clone_key())?;
        let client = ClientConfig::builder_with_provider(provider)
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots)
            .with_client_auth_cert(chain, key)?;
        Ok(FleetTls {
            server: Arc::new(server),
            client: Arc::new(client),
            name: name.to_string(),
        })
    }

    /// The client configuration with `protocols` offered by ALPN (gRPC to
    /// etcd wants `h2`).
    pub fn client_with_alpn(&self, protocols: &[&[u8]]) -> Arc<ClientConfig> {
        let mut client = (*self.client).clone();
        client.alpn_protocols = protocols.iter().map(|p| p.to_vec()).collect();
        Arc::new(client)
    }
}

/// The name a peer's certificate must carry.
pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_string()).map_err(|_| TlsError::BadName(name.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::fleet::testing::{fleet_certs, temp_dir};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio_rustls::{TlsAcceptor, TlsConnector};

    /// One handshake of `client` with `server` (which presents as
    /// `server_as`) and one byte echoed; what each side saw.
    async fn handshake(
        server: &FleetTls,
        client: Arc<ClientConfig>,
        server_as: &str,
    ) -> (Result<(), String>, Result<(), String>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let address = listener.local_addr().unwrap();
        let acceptor = TlsAcceptor::from(server.server.clone());
        let served = tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.map_err(|e| e.to_string())?;
            let (_, session) = tls.get_ref();
            assert_eq!(
                session.protocol_version(),
                Some(rustls::ProtocolVersion::TLSv1_3)
            );
            assert_eq!(
                session.negotiated_cipher_suite().map(|s| s.suite()),
                Some(rustls::CipherSuite::TLS13_AES_256_GCM_SHA384)
            );
            let mut byte = [0u8];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            tls.write_all(&byte).await.map_err(|e| e.to_string())?;
            tls.flush().await.map_err(|e| e.to_string())
        });
        let tcp = TcpStream::connect(address).await.unwrap();
        let connected = async {
            let mut tls = TlsConnector::from(client)
                .connect(server_name(server_as).unwrap(), tcp)
                .await
                .map_err(|e| e.to_string())?;
            tls.write_all(b"x").await.map_err(|e| e.to_string())?;
            let mut byte = [0u8];
            tls.read_exact(&mut byte).await.map_err(|e| e.to_string())?;
            Ok(())
        }
        .await;
        (served.await.unwrap(), connected)
    }

    #[tokio::test]
    async fn fleet_hosts_meet_on_tls13_aes256_and_strangers_do_not() {
        let dir = temp_dir("tls");
        fleet_certs(&dir.join("fleet"), &["fe", "h1"]);
        fleet_certs(&dir.join("other"), &["h1", "stranger"]);
        let fe = FleetTls::load(&dir.join("fleet"), "fe").unwrap();
        let h1 = FleetTls::load(&dir.join("fleet"), "h1").unwrap();
        let stranger = FleetTls::load(&dir.join("other"), "stranger").unwrap();
        let other_h1 = FleetTls::load(&dir.join("other"), "h1").unwrap();

        let (served, connected) = handshake(&h1, fe.client.clone(), "h1").await;
        assert_eq!((served, connected), (Ok(()), Ok(())));

        // A client of another authority, even one that trusts the fleet's:
        // the server refuses its certificate.
        let other = dir.join("other");
        let impostor = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates((*roots_of(&dir.join("fleet"))).clone())
            .with_client_auth_cert(
                certificates(&other.join("stranger.pem")).unwrap(),
                PrivateKeyDer::from_pem_file(other.join("stranger.key")).unwrap(),
            )
            .unwrap();
        let (served, connected) = handshake(&h1, Arc::new(impostor), "h1").await;
        // (Both authorities are named alike, so webpki finds the fleet's
        // and the signature fails.)
        let refused = served.unwrap_err();
        assert!(refused.contains("invalid peer certificate"), "{refused}");
        assert!(connected.is_err());
        // One that trusts only its own authority gives up on the server.
        let (served, connected) = handshake(&h1, stranger.client.clone(), "h1").await;
        assert!(served.is_err());
        let gave_up = connected.unwrap_err();
        assert!(gave_up.contains("invalid peer certificate"), "{gave_up}");

        // A client with no certificate at all.
        let anonymous = ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates((*roots_of(&dir.join("fleet"))).clone())
            .with_no_client_auth();
        let (served, _) = handshake(&h1, Arc::new(anonymous), "h1").await;
        let refused = served.unwrap_err();
        assert!(refused.contains("peer sent no certificates"), "{refused}");

        // A server of another authority with the name the client wants.
        let (_, connected) = handshake(&other_h1, fe.client.clone(), "h1").await;
        let gave_up = connected.unwrap_err();
        assert!(gave_up.contains("invalid peer certificate"), "{gave_up}");

        // The right authority but another host's name.
        let (_, connected) = handshake(&h1, fe.client.clone(), "fe").await;
        let gave_up = connected.unwrap_err();
        assert!(gave_up.contains("not valid for name \"fe\""), "{gave_up}");

        // A client that offers only AES-128-GCM.
        let weak = ClientConfig::builder_with_provider(Arc::new(CryptoProvider {
            cipher_suites: vec![aws_lc_rs::cipher_suite::TLS13_AES_128_GCM_SHA256],
            ..aws_lc_rs::default_provider()
        }))
        .with_protocol_versions(&[&rustls::version::TLS13])
        .unwrap()
        .with_root_certificates((*roots_of(&dir.join("fleet"))).clone())
        .with_no_client_auth();
        let (served, _) = handshake(&h1, Arc::new(weak), "h1").await;
        let refused = served.unwrap_err();
        assert!(refused.contains("NoCipherSuitesInCommon"), "{refused}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn missing_or_wrong_files_are_named() {
        let dir = temp_dir("tls-files");
        let error = FleetTls::load(&dir, "h1").err().unwrap().to_string();
        assert!(error.contains("ca.pem"), "{error}");
        fleet_certs(&dir, &["h1"]);
        let error = FleetTls::load(&dir, "h2").err().unwrap().to_string();
        assert!(error.contains("h2.pem"), "{error}");
        std::fs::write(dir.join("h1.pem"), "not a certificate").unwrap();
        let error = FleetTls::load(&dir, "h1").err().unwrap().to_string();
        assert!(error.contains("h1.pem: holds no certificate"), "{error}");
        let error = FleetTls::load(&dir, "bad name").err().unwrap().to_string();
        assert!(error.contains("\"bad name\""), "{error}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    fn roots_of(dir: &Path) -> Arc<RootCertStore> {
        let mut roots = RootCertStore::empty();
        for ca in certificates(&dir.join("ca.pem")).unwrap() {
            roots.add(ca).unwrap();
        }
        Arc::new(roots)
    }
}
