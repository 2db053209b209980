//! A test fleet on one machine: etcd and each `lambda-worker` host in a
//! network namespace of its own, with its own address on a bridge the test
//! (in the root namespace) reaches them all through; the fleet's
//! certificates from the project's script. Everything is removed when the
//! fleet is dropped.

use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use host_services::fleet::test_etcd::EtcdServer;
use host_services::fleet::testing::fleet_certs;

use crate::lambda_client::LambdaClient;
use crate::worker::{data_dir, RunningWorker, ACCOUNT_A};

/// Where hosts serve each other, in every namespace.
const FLEET_PORT: u16 = 7443;
/// Where a front end serves the Lambda API.
pub const API_PORT: u16 = 9000;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("iproute2's ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A bridge in the root namespace, and a namespace per host joined to it
/// by a veth pair.
pub struct TestNetwork {
    /// Names are short: interface names take 15 bytes.
    tag: String,
    bridge: String,
    /// `10.X.Y` of the /24 the hosts get addresses in.
    subnet: String,
    namespaces: Vec<String>,
}

static NETWORKS: AtomicU32 = AtomicU32::new(0);

impl TestNetwork {
    pub fn new() -> Self {
        let n = NETWORKS.fetch_add(1, Ordering::Relaxed);
        let pid = std::process::id();
        let tag = format!("lf{}{n}", pid % 100_000);
        let subnet = format!("10.{}.{}", 100 + (pid % 100), n % 250);
        let bridge = format!("{tag}br");
        ip(&["link", "add", &bridge, "type", "bridge"]);
        ip(&["addr", "add", &format!("{subnet}.1/24"), "dev", &bridge]);
        ip(&["link", "set", &bridge, "up"]);
        TestNetwork {
            tag,
            bridge,
            subnet,
            namespaces: Vec::new(),
        }
    }

    /// A new namespace on the bridge; returns its address.
    pub fn namespace(&mut self) -> Namespace {
        let n = self.namespaces.len() + 2;
        let name = format!("{}n{n}", self.tag);
        let outside = format!("{}v{n}", self.tag);
        let inside = format!("{}i{n}", self.tag);
        let address = format!("{}.{n}", self.subnet);
        ip(&["netns", "add", &name]);
        self.namespaces.push(name.clone());
        ip(&[
            "link", "add", &outside, "type", "veth", "peer", "name", &inside,
        ]);
        ip(&["link", "set", &inside, "netns", &name]);
        ip(&["link", "set", &outside, "master", &self.bridge]);
        ip(&["link", "set", &outside, "up"]);
        let netns = |args: &[&str]| {
            let mut all = vec!["-n", &name];
            all.extend_from_slice(args);
            ip(&all);
        };
        netns(&["link", "set", "lo", "up"]);
        netns(&["addr", "add", &format!("{address}/24"), "dev", &inside]);
        netns(&["link", "set", &inside, "up"]);
        Namespace {
            name,
            outside,
            address,
        }
    }
}

impl Default for TestNetwork {
    fn default() -> Self {
        Self::new()
    }
}

impl Drop for TestNetwork {
    fn drop(&mut self) {
        for name in &self.namespaces {
            // Deleting the namespace deletes its end of the veth pair, and
            // with it the other end.
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
        let _ = Command::new("ip")
            .args(["link", "del", &self.bridge])
            .output();
    }
}

#[derive(Debug, Clone)]
pub struct Namespace {
    pub name: String,
    /// Its veth's end on the bridge: down, the namespace is cut off.
    outside: String,
    pub address: String,
}

impl Namespace {
    /// Runs a command inside: `nsenter --net=...`, which enters only the
    /// network namespace (`ip netns exec` also remounts /sys, and the
    /// jailer's cgroups with it).
    pub fn wrapper(&self) -> Vec<String> {
        vec!["nsenter".into(), format!("--net=/run/netns/{}", self.name)]
    }

    /// Cuts the namespace off the network (`false`), or joins it again.
    pub fn connect(&self, up: bool) {
        ip(&["link", "set", &self.outside, if up { "up" } else { "down" }]);
    }
}

/// etcd, front ends and worker hosts, each in its namespace.
pub struct TestFleet {
    pub worker_hosts: Vec<FleetHost>,
    /// fe, then fe2, fe3...
    pub front_ends: Vec<FleetHost>,
    pub etcd: EtcdServer,
    pub etcd_namespace: Namespace,
    pub certs: PathBuf,
    // Dropped after the processes above, which run in its namespaces and
    // write to the directories.
    pub network: TestNetwork,
    _directories: Directories,
}

/// The fleet's data directories, removed when it is dropped.
struct Directories(Vec<PathBuf>);

impl Drop for Directories {
    fn drop(&mut self) {
        for dir in &self.0 {
            let _ = std::fs::remove_dir_all(dir);
        }
    }
}

pub struct FleetHost {
    pub name: String,
    pub data: PathBuf,
    pub namespace: Namespace,
    pub process: RunningWorker,
    flags: Vec<String>,
}

impl FleetHost {
    fn start(
        name: &str,
        data: PathBuf,
        namespace: Namespace,
        flags: Vec<String>,
        log_filter: &str,
    ) -> Result<Self, String> {
        let process = Self::spawn(&data, &namespace, &flags, log_filter)?;
        Ok(FleetHost {
            name: name.to_string(),
            data,
            namespace,
            process,
            flags,
        })
    }

    fn spawn(
        data: &std::path::Path,
        namespace: &Namespace,
        flags: &[String],
        log_filter: &str,
    ) -> Result<RunningWorker, String> {
        let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
        let wrapper = namespace.wrapper();
        let wrapper: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        RunningWorker::try_start_wrapped(data, &flags, log_filter, &wrapper)
    }

    /// Starts the host again, on the same data and flags, after it was
    /// stopped or killed.
    pub fn restart(&mut self, log_filter: &str) {
        self.process.kill();
        self.process = Self::spawn(&self.data, &self.namespace, &self.flags, log_filter)
            .unwrap_or_else(|log| panic!("{} did not start again:\n{log}", self.name));
    }
}

/// Copies a front end's key service (its `keys` directory and its role
/// credential issuer's key) into the data directory `to`.
fn share_keys(from: &std::path::Path, to: &std::path::Path) {
    let keys = to.join("keys");
    std::fs::create_dir_all(&keys).unwrap();
    for entry in std::fs::read_dir(from.join("keys")).unwrap() {
        let entry = entry.unwrap();
        std::fs::copy(entry.path(), keys.join(entry.file_name())).unwrap();
    }
    std::fs::copy(from.join("issuer.key"), to.join("issuer.key")).unwrap();
}

fn fleet_flags(
    role: &str,
    name: &str,
    etcd: &str,
    certs: &std::path::Path,
    at: &str,
) -> Vec<String> {
    [
        "--role",
        role,
        "--etcd",
        etcd,
        "--host-name",
        name,
        "--fleet-tls",
        certs.to_str().unwrap(),
        "--fleet-listen",
        &format!("{at}:{FLEET_PORT}"),
    ]
    .map(String::from)
    .to_vec()
}

impl TestFleet {
    /// etcd, `hosts` worker hosts (named h1, h2, ...) with `host_flags`,
    /// and a front end (fe).
    pub fn start(hosts: usize, host_flags: &[&str], log_filter: &str) -> Self {
        Self::start_with_front_ends(hosts, 1, host_flags, log_filter)
    }

    /// [`TestFleet::start`] with `front_ends` front ends: fe, fe2, fe3...
    pub fn start_with_front_ends(
        hosts: usize,
        front_ends: usize,
        host_flags: &[&str],
        log_filter: &str,
    ) -> Self {
        let mut network = TestNetwork::new();
        // Tests run side by side in one process: each fleet's files are
        // its own.
        let tag = network.tag.clone();
        let dir = |what: &str| data_dir(&format!("fleet-{tag}-{what}"));
        let certs = dir("certs");
        let etcd_namespace = network.namespace();
        let front_end_names: Vec<String> = (1..=front_ends)
            .map(|i| match i {
                1 => "fe".to_string(),
                _ => format!("fe{i}"),
            })
            .collect();
        let mut names = vec![format!("etcd={}", etcd_namespace.address)];
        names.extend(front_end_names.iter().cloned());
        names.extend((1..=hosts).map(|i| format!("h{i}")));
        let names: Vec<&str> = names.iter().map(String::as_str).collect();
        fleet_certs(&certs, &names);
        let etcd = EtcdServer::start_at(
            &etcd_namespace.address,
            2379,
            2380,
            &etcd_namespace
                .wrapper()
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
            Some(&certs),
        );
        // Hosts refuse to start without etcd.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::net::TcpStream::connect(&etcd.endpoint).is_err() {
            assert!(std::time::Instant::now() < deadline, "etcd never listened");
            std::thread::sleep(std::time::Duration::from_millis(50));
        }
        let mut worker_hosts = Vec::new();
        for i in 1..=hosts {
            let name = format!("h{i}");
            let namespace = network.namespace();
            let mut flags = fleet_flags(
                "worker-host",
                &name,
                &etcd.endpoint,
                &certs,
                &namespace.address,
            );
            // Each host's VMMs run as uids of their own.
            flags.extend([
                "--jail-uid-base".to_string(),
                (100_000 + 65_536 * i as u32).to_string(),
            ]);
            flags.extend(host_flags.iter().map(|f| f.to_string()));
            let host = FleetHost::start(&name, dir(&name), namespace, flags, log_filter)
                .unwrap_or_else(|log| panic!("{name} did not start:\n{log}"));
            worker_hosts.push(host);
        }
        let mut started: Vec<FleetHost> = Vec::new();
        for name in &front_end_names {
            // A fleet's front ends share one key service (docs/fleet.md):
            // the second and later ones start with copies of the first's
            // keys.
            let data = dir(name);
            if let Some(first) = started.first() {
                share_keys(&first.data, &data);
            }
            let namespace = network.namespace();
            let mut flags = fleet_flags(
                "front-end",
                name,
                &etcd.endpoint,
                &certs,
                &namespace.address,
            );
            flags.extend([
                "--listen".to_string(),
                format!("{}:{API_PORT}", namespace.address),
            ]);
            let front_end = FleetHost::start(name, data, namespace, flags, log_filter)
                .unwrap_or_else(|log| panic!("front end {name} did not start:\n{log}"));
            started.push(front_end);
        }
        TestFleet {
            _directories: Directories(
                std::iter::once(certs.clone())
                    .chain(worker_hosts.iter().map(|h| h.data.clone()))
                    .chain(started.iter().map(|h| h.data.clone()))
                    .collect(),
            ),
            worker_hosts,
            front_ends: started,
            etcd,
            etcd_namespace,
            certs,
            network,
        }
    }

    /// The first front end (fe).
    pub fn front_end(&self) -> &FleetHost {
        &self.front_ends[0]
    }

    /// A client of the first front end's Lambda API, as account A.
    pub fn client(&self) -> Arc<LambdaClient> {
        self.client_of(0)
    }

    /// A client of front end `i`'s Lambda API, as account A.
    pub fn client_of(&self, i: usize) -> Arc<LambdaClient> {
        Arc::new(LambdaClient::new(
            &format!("{}:{API_PORT}", self.front_ends[i].namespace.address),
            ACCOUNT_A.0,
            ACCOUNT_A.1,
        ))
    }

    /// The first front end's API endpoint, for boto3.
    pub fn endpoint(&self) -> String {
        format!("http://{}:{API_PORT}", self.front_end().namespace.address)
    }
}
