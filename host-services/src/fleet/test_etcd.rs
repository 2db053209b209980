//! A throwaway etcd (Debian's `etcd-server`) for the fleet's tests, on
//! free local ports, with or without the fleet's TLS; killed and its data
//! removed when dropped.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use etcd_client::Client;

use crate::fleet::testing::temp_dir;
use crate::fleet::tls::FleetTls;

pub struct EtcdServer {
    child: Child,
    dir: PathBuf,
    pub endpoint: String,
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

impl EtcdServer {
    /// Starts etcd; with `tls` (a directory of `scripts/fleet-certs.sh`
    /// holding `etcd.pem`), clients must present the fleet's certificates.
    pub fn start(tls: Option<&Path>) -> Self {
        let dir = temp_dir("etcd");
        let (client_port, peer_port) = (free_port(), free_port());
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://127.0.0.1:{client_port}");
        let peer_url = format!("http://127.0.0.1:{peer_port}");
        let mut command = Command::new("etcd");
        command
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("data").display()))
            .arg(format!("--listen-client-urls={client_url}"))
            .arg(format!("--advertise-client-urls={client_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).unwrap());
        if let Some(certs) = tls {
            command
                .arg(format!("--cert-file={}", certs.join("etcd.pem").display()))
                .arg(format!("--key-file={}", certs.join("etcd.key").display()))
                .arg(format!(
                    "--trusted-ca-file={}",
                    certs.join("ca.pem").display()
                ))
                .arg("--client-cert-auth");
        }
        let child = command
            .spawn()
            .expect("etcd (Debian's etcd-server; scripts/test.sh installs it)");
        EtcdServer {
            child,
            dir,
            endpoint: format!("127.0.0.1:{client_port}"),
        }
    }

    /// A client, once etcd answers.
    pub async fn client(&self, tls: Option<&FleetTls>) -> Client {
        let started = Instant::now();
        loop {
            let mut client = crate::fleet::etcd::connect(std::slice::from_ref(&self.endpoint), tls)
                .await
                .unwrap();
            match client.status().await {
                Ok(_) => return client,
                Err(e) if started.elapsed() > Duration::from_secs(20) => panic!(
                    "etcd did not answer: {e}; its log: {}",
                    std::fs::read_to_string(self.dir.join("etcd.log")).unwrap_or_default()
                ),
                Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
            }
        }
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
