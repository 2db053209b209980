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
    command: Vec<String>,
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
    /// Starts etcd on free local ports; with `tls` (a directory of
    /// `scripts/fleet-certs.sh` holding `etcd.pem`), clients must present
    /// the fleet's certificates.
    pub fn start(tls: Option<&Path>) -> Self {
        Self::start_at("127.0.0.1", free_port(), free_port(), &[], tls)
    }

    /// Starts etcd on `ip`, its command run through `wrapper` (`ip netns
    /// exec NAME` for a network namespace of its own).
    pub fn start_at(
        ip: &str,
        client_port: u16,
        peer_port: u16,
        wrapper: &[&str],
        tls: Option<&Path>,
    ) -> Self {
        let dir = temp_dir("etcd");
        let scheme = if tls.is_some() { "https" } else { "http" };
        let client_url = format!("{scheme}://{ip}:{client_port}");
        let peer_url = format!("http://{ip}:{peer_port}");
        let mut command: Vec<String> = wrapper.iter().map(|s| s.to_string()).collect();
        command.extend([
            "etcd".to_string(),
            "--name=test".into(),
            format!("--data-dir={}", dir.join("data").display()),
            format!("--listen-client-urls={client_url}"),
            format!("--advertise-client-urls={client_url}"),
            format!("--listen-peer-urls={peer_url}"),
            format!("--initial-advertise-peer-urls={peer_url}"),
            format!("--initial-cluster=test={peer_url}"),
        ]);
        if let Some(certs) = tls {
            command.extend([
                format!("--cert-file={}", certs.join("etcd.pem").display()),
                format!("--key-file={}", certs.join("etcd.key").display()),
                format!("--trusted-ca-file={}", certs.join("ca.pem").display()),
                "--client-cert-auth".into(),
            ]);
        }
        let child = spawn(&command, &dir);
        EtcdServer {
            child,
            dir,
            command,
            endpoint: format!("{ip}:{client_port}"),
        }
    }

    /// Kills etcd outright and starts it again on the same data.
    pub fn restart(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.child = spawn(&self.command, &self.dir);
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

fn spawn(command: &[String], dir: &Path) -> Child {
    let log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(dir.join("etcd.log"))
        .unwrap();
    Command::new(&command[0])
        .args(&command[1..])
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("etcd (Debian's etcd-server; scripts/test.sh installs it)")
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
