//! `lambda-worker`: one process serving Lambda's API and running each
//! function in microVMs, with its state in a data directory; or one role
//! of a fleet on etcd: a front end (the API, placing invocations on worker
//! hosts) or a worker host (the microVMs).

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use host_services::api;
use host_services::control_plane::backup::spawn_backups;
use host_services::control_plane::functions::{chunk_store_dir, ControlPlane};
use host_services::control_plane::model::runtime;
use host_services::control_plane::shared_state::StateReplica;
use host_services::control_plane::store::Store;
use host_services::data_plane::environment::{LinuxGuest, MicroVmImage};
use host_services::data_plane::fleet_router::{front_end_endpoints, FleetRouter};
use host_services::data_plane::host::HostLimits;
use host_services::data_plane::host_service::{FleetKeys, HostService};
use host_services::data_plane::lifecycle::Lifecycle;
use host_services::data_plane::placement::Placement;
use host_services::data_plane::router::{FleetConfig, InvokeRouter};
use host_services::data_plane::snapshots::SnapshotStore;
use host_services::data_plane::vmm_process::{JailIds, JailPool, JailSettings};
use host_services::data_plane::worker::Worker;
use host_services::fleet::concurrency::FleetConcurrency;
use host_services::fleet::etcd as fleet_etcd;
use host_services::fleet::event_ledger::EventLedger;
use host_services::fleet::leadership::Leadership;
use host_services::fleet::membership::{HostRecord, Members, Registration, Role};
use host_services::fleet::peers::PeerSet;
use host_services::fleet::tls::FleetTls;
use host_services::fleet::transport as fleet_transport;
use host_services::security::auth::Credentials;
use host_services::security::key_service::{ArtifactKeys, KeyService};
use host_services::security::role_credentials::RoleCredentialIssuer;

/// `--role`: what this process is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum RoleArg {
    /// The API and the microVMs in one process, state in redb.
    All,
    /// A fleet's front end: the Lambda API, invocations placed on the
    /// fleet's worker hosts.
    FrontEnd,
    /// A fleet's worker host: runs the invocations front ends send it.
    WorkerHost,
}

/// `--snapshots`: which cold starts restore snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum SnapshotMode {
    SnapStart,
    EveryVersion,
    Off,
}

#[derive(Parser, Debug)]
#[command(about = "A Lambda-compatible worker that runs functions in microVMs")]
struct Args {
    /// Where functions, versions, code and logs are kept.
    #[arg(long)]
    data_dir: PathBuf,
    /// `all` (one process, the default), or a fleet's `front-end` or
    /// `worker-host` (docs/fleet.md).
    #[arg(long, value_enum, default_value_t = RoleArg::All)]
    role: RoleArg,
    /// The address the Lambda API listens on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// JSON array of {"AccessKeyId", "SecretAccessKey", "AccountId"}
    /// (not for a worker host).
    #[arg(long)]
    credentials: Option<PathBuf>,
    /// The `vmm` binary (not for a front end).
    #[arg(long)]
    vmm: Option<PathBuf>,
    /// The `jailer` that starts each VMM; by default the one beside --vmm.
    #[arg(long, value_name = "PATH")]
    jailer: Option<PathBuf>,
    /// Starts VMMs directly, without the jailer's namespaces, cgroup and
    /// unprivileged uid. For hosts where the worker cannot run as root.
    #[arg(long, conflicts_with = "jailer")]
    no_jail: bool,
    /// The first of the uids jailed VMMs run as: each runs as a uid, and a
    /// gid of the same number, of its own from the 65536 that start here.
    #[arg(long, default_value_t = 100_000)]
    jail_uid_base: u32,
    /// The cgroup jailed VMMs are grouped under.
    #[arg(long, default_value = "lambda-microvm")]
    cgroup_parent: String,
    /// How many VMMs wait on standby in their jails for a cold start
    /// (each jail built, its VMM exec'd and its VM made); 0 makes each
    /// jail and VMM at its cold start.
    #[arg(long, default_value_t = 2, value_name = "N")]
    jail_pool: usize,
    /// The guest the wasi-preview1 runtime boots (guest-init's baremetal;
    /// not for a front end).
    #[arg(long)]
    guest: Option<PathBuf>,
    /// The Linux kernel the provided.al2023 and provided.al2 runtimes
    /// boot (kernel-config/build.sh builds it); without it those runtimes
    /// are refused.
    #[arg(long, value_name = "VMLINUX", requires = "linux_init")]
    linux_kernel: Option<PathBuf>,
    /// The Linux guest's PID 1 (guest-init's `init`), which the worker
    /// packs into the guests' initramfs.
    #[arg(long, value_name = "PATH", requires = "linux_kernel")]
    linux_init: Option<PathBuf>,
    /// A Linux runtime's root file system image, as NAME=IMAGE (repeat
    /// for several): python3.11 runs only with its image
    /// (scripts/build-python-runtime.sh builds it); provided.al2023 and
    /// provided.al2 may take one, for bootstraps that load shared
    /// libraries.
    #[arg(
        long = "linux-runtime",
        value_name = "NAME=IMAGE",
        requires = "linux_kernel",
        value_parser = parse_linux_runtime
    )]
    linux_runtimes: Vec<(String, PathBuf)>,
    /// Environments on each worker, idle or busy.
    #[arg(long, default_value_t = 64)]
    max_environments: usize,
    /// Workers serving at once in this process.
    #[arg(long, default_value_t = 1)]
    workers: usize,
    /// A worker's lease, in seconds: near its end the worker drains, its
    /// in-flight invocations finish and a fresh worker takes over.
    #[arg(long, default_value_t = 14 * 3600)]
    worker_lease: u64,
    /// Seconds an idle environment is kept for reuse.
    #[arg(long, default_value_t = 300)]
    idle_timeout: u64,
    /// The longest an environment lives, in seconds.
    #[arg(long, default_value_t = 4 * 3600)]
    environment_lease: u64,
    /// Adds a master key version at start and rewraps every artifact's
    /// data key under it; the sealed code itself is not rewritten.
    #[arg(long)]
    rotate_master_key: bool,
    /// Seconds a runtime may take to reach its first /next.
    #[arg(long, default_value_t = 10)]
    init_timeout: u64,
    /// Which cold starts restore a snapshot taken at the runtime's first
    /// /next: `snap-start`, the published versions of functions with
    /// SnapStart (snapshotted when published), as on Lambda; `every-version`,
    /// those and every other version too (snapshotted by its first
    /// on-demand boot), for functions that keep no per-environment state
    /// from their init; `off`, none.
    #[arg(long, value_enum, default_value_t = SnapshotMode::SnapStart)]
    snapshots: SnapshotMode,
    /// Seconds in-flight requests get to finish after SIGINT; a second
    /// SIGINT ends the wait at once.
    #[arg(long, default_value_t = 30)]
    shutdown_grace: u64,
    /// Seconds between backups of the state and its keys into
    /// DIR/backups (the newest 3 are kept); 0 writes none.
    #[arg(long, default_value_t = 3600)]
    backup_every: u64,
    #[command(flatten)]
    fleet: FleetArgs,
}

/// What a front end or a worker host needs to join its fleet.
#[derive(clap::Args, Debug)]
struct FleetArgs {
    /// etcd's client endpoints, HOST:PORT (repeat for several), reached
    /// over the fleet's TLS; `http://HOST:PORT` reaches one without TLS.
    #[arg(long = "etcd", value_name = "HOST:PORT")]
    etcd: Vec<String>,
    /// This host's name in the fleet: its certificate's DNS name.
    #[arg(long, value_name = "NAME")]
    host_name: Option<String>,
    /// The fleet's certificates: ca.pem, NAME.pem and NAME.key
    /// (scripts/fleet-certs.sh makes them).
    #[arg(long, value_name = "DIR")]
    fleet_tls: Option<PathBuf>,
    /// Where this host serves the fleet's other hosts (mutual TLS).
    #[arg(long, value_name = "ADDR")]
    fleet_listen: Option<SocketAddr>,
    /// The address other hosts reach --fleet-listen at, if not that one.
    #[arg(long, value_name = "ADDR")]
    fleet_advertise: Option<SocketAddr>,
}

fn parse_linux_runtime(value: &str) -> Result<(String, PathBuf), String> {
    let (name, image) = value
        .split_once('=')
        .ok_or_else(|| format!("{value:?}: expected NAME=IMAGE"))?;
    if !runtime::on_linux(name) {
        return Err(format!(
            "{name:?} is not a Linux runtime ({}, {})",
            runtime::MANAGED.join(", "),
            runtime::PROVIDED.join(", ")
        ));
    }
    Ok((name.to_string(), PathBuf::from(image)))
}

fn existing_file(what: &str, path: &std::path::Path) -> Result<(), String> {
    if path.is_file() {
        Ok(())
    } else {
        Err(format!("--{what} {}: no such file", path.display()))
    }
}

/// How many uids jailed VMMs may take, from --jail-uid-base.
const JAIL_IDS: u32 = 65536;

/// How VMMs are jailed, from the flags; says so in the log.
fn jail_settings(args: &Args, vmm: &Path) -> Result<Option<JailSettings>, String> {
    if args.no_jail {
        tracing::warn!("--no-jail: environments start WITHOUT the jailer, as this worker's uid");
        return Ok(None);
    }
    let jailer = match &args.jailer {
        Some(path) => path.clone(),
        None => vmm.with_file_name("jailer"),
    };
    existing_file("jailer", &jailer)?;
    // SAFETY: geteuid cannot fail.
    let euid = unsafe { libc::geteuid() };
    if euid != 0 {
        return Err(format!(
            "environments start through the jailer, which needs root, and this is uid {euid}: \
             run as root, or pass --no-jail"
        ));
    }
    let ids =
        JailIds::new(args.jail_uid_base, JAIL_IDS).map_err(|e| format!("--jail-uid-base: {e}"))?;
    let settings = JailSettings {
        jailer,
        ids,
        chroot_base: args.data_dir.join("jails"),
        cgroup_parent: args.cgroup_parent.clone(),
        id_prefix: format!("{}-", std::process::id()),
        pool: JailPool::new(args.jail_pool, vmm),
        run_dir: args.data_dir.join("run").join("jails"),
        chunk_store: Some(chunk_store_dir(&args.data_dir)),
    };
    tracing::info!(
        "environments start through the jailer {}: each as a uid of its own in {:?}, roots under {}, cgroup {}",
        settings.jailer.display(),
        settings.ids.range(),
        settings.chroot_base.display(),
        settings.cgroup_parent
    );
    Ok(Some(settings))
}

/// A fleet host's connection to its fleet: its certificates, etcd, and
/// the hosts it sees.
struct FleetMember {
    tls: FleetTls,
    etcd: etcd_client::Client,
    peers: Arc<PeerSet>,
    listen: SocketAddr,
    advertise: SocketAddr,
}

async fn join_fleet(fleet: &FleetArgs) -> Result<FleetMember, String> {
    let name = fleet
        .host_name
        .as_deref()
        .ok_or("a fleet host needs --host-name")?;
    let dir = fleet
        .fleet_tls
        .as_deref()
        .ok_or("a fleet host needs --fleet-tls")?;
    let listen = fleet
        .fleet_listen
        .ok_or("a fleet host needs --fleet-listen")?;
    if fleet.etcd.is_empty() {
        return Err("a fleet host needs --etcd".into());
    }
    let tls = FleetTls::load(dir, name).map_err(|e| format!("--fleet-tls: {e}"))?;
    let plain = fleet.etcd.iter().all(|e| e.starts_with("http://"));
    if !plain && fleet.etcd.iter().any(|e| e.starts_with("http://")) {
        return Err("--etcd: all endpoints over TLS, or all (http://) without".into());
    }
    if plain {
        tracing::warn!("--etcd http://...: etcd is reached WITHOUT TLS");
    }
    let etcd = fleet_etcd::connect(&fleet.etcd, (!plain).then_some(&tls))
        .await
        .map_err(|e| format!("--etcd: {e}"))?;
    let members = Members::follow(&etcd)
        .await
        .map_err(|e| format!("--etcd {}: {e}", fleet.etcd.join(",")))?;
    tracing::info!(
        "fleet host {name}: etcd at {}, {} hosts in the fleet",
        fleet.etcd.join(","),
        members.hosts().len()
    );
    Ok(FleetMember {
        peers: Arc::new(PeerSet::new(tls.clone(), members)),
        tls,
        etcd,
        listen,
        advertise: fleet.fleet_advertise.unwrap_or(listen),
    })
}

impl FleetMember {
    /// Serves `endpoints` to the fleet and registers as `role`.
    async fn serve(
        &self,
        role: Role,
        capacity: usize,
        endpoints: axum::Router,
    ) -> Result<Registration, String> {
        let listener = tokio::net::TcpListener::bind(self.listen)
            .await
            .map_err(|e| format!("--fleet-listen {}: {e}", self.listen))?;
        fleet_transport::serve(listener, &self.tls, endpoints)
            .map_err(|e| format!("--fleet-listen {}: {e}", self.listen))?;
        let record = HostRecord {
            name: self.tls.name.clone(),
            role,
            address: self.advertise,
            capacity,
        };
        let registration = Registration::join(&self.etcd, record)
            .await
            .map_err(|e| format!("joining the fleet: {e}"))?;
        tracing::info!(
            "joined the fleet as {} ({role:?}), serving it on {}",
            self.tls.name,
            self.listen
        );
        Ok(registration)
    }
}

/// The microVM side: the VMM, guests, jails and leased workers.
struct Environments {
    router: Arc<InvokeRouter>,
    jail: Option<JailSettings>,
}

fn start_environments(
    args: &Args,
    keys: Arc<KeyService>,
    artifact_keys: Arc<dyn ArtifactKeys>,
) -> Result<Environments, String> {
    let vmm = args
        .vmm
        .as_deref()
        .ok_or("--vmm is needed to run microVMs")?;
    let guest = args
        .guest
        .as_deref()
        .ok_or("--guest is needed to run microVMs")?;
    existing_file("vmm", vmm)?;
    existing_file("guest", guest)?;
    if args.max_environments == 0 {
        return Err("--max-environments must be at least 1".into());
    }
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.worker_lease == 0 {
        return Err("--worker-lease must be at least 1 second".into());
    }
    let roots: BTreeMap<String, PathBuf> = args.linux_runtimes.iter().cloned().collect();
    for image in roots.values() {
        existing_file("linux-runtime", image)?;
    }
    let jail = jail_settings(args, vmm)?;
    let run_dir = args.data_dir.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    if let Some(jail) = &jail {
        jail.end_orphaned_jailers();
        // Jails left behind by a worker whose jailers were killed outright
        // and could not clean up.
        let _ = std::fs::remove_dir_all(&jail.chroot_base);
        jail.refill();
    }
    let linux = match (&args.linux_kernel, &args.linux_init) {
        (Some(kernel), Some(init)) => Some(
            LinuxGuest::prepare(kernel, init, roots, &run_dir)
                .map_err(|e| format!("--linux-init: {e}"))?,
        ),
        _ => None,
    };
    if args.snapshots == SnapshotMode::Off {
        tracing::info!("--snapshots off: every environment boots, SnapStart versions fail");
    }
    let image = MicroVmImage {
        vmm: vmm.to_path_buf(),
        guest_kernel: guest.to_path_buf(),
        linux,
        run_dir,
        init_timeout: Duration::from_secs(args.init_timeout),
        jail: jail.clone(),
        snapshots: if args.snapshots == SnapshotMode::Off {
            None
        } else {
            Some(Arc::new(
                SnapshotStore::open(&args.data_dir.join("snapshots"), keys)
                    .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?,
            ))
        },
        snapshot_every_version: args.snapshots == SnapshotMode::EveryVersion,
        keys: artifact_keys,
    };
    let logs = args.data_dir.join("logs");
    let lifecycle = std::fs::create_dir_all(&logs)
        .and_then(|()| Lifecycle::open(logs.join("environments.jsonl")))
        .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?;
    let router = InvokeRouter::new(
        image,
        FleetConfig {
            workers: args.workers,
            worker_lease: Duration::from_secs(args.worker_lease),
            host: HostLimits {
                max_environments: args.max_environments,
                idle_timeout: Duration::from_secs(args.idle_timeout),
                environment_lease: Duration::from_secs(args.environment_lease),
            },
        },
        lifecycle,
    );
    router.spawn_maintenance(router.maintenance_period());
    Ok(Environments { router, jail })
}

impl Environments {
    async fn stop(self) {
        self.router.shutdown().await;
        if let Some(jail) = self.jail {
            jail.empty_pool().await;
        }
    }
}

/// SIGINTs so far.
fn interrupts() -> tokio::sync::watch::Receiver<u32> {
    let (interrupted, interrupt) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            interrupted.send_modify(|n| *n += 1);
        }
    });
    interrupt
}

async fn run(args: Args) -> Result<(), String> {
    if args.role != RoleArg::All && args.fleet.etcd.is_empty() {
        return Err(format!(
            "--role {:?} joins a fleet: it needs --etcd, --host-name, --fleet-tls and --fleet-listen",
            args.role
        ));
    }
    if args.role == RoleArg::All && !args.fleet.etcd.is_empty() {
        return Err("--etcd is for a fleet's hosts: pass --role front-end or worker-host".into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?;
    let keys = Arc::new(
        KeyService::open(&args.data_dir.join("keys"))
            .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?,
    );
    let fleet = match args.role {
        RoleArg::All => None,
        _ => Some(join_fleet(&args.fleet).await?),
    };
    if args.role == RoleArg::WorkerHost {
        let fleet = fleet.expect("joined above");
        let environments =
            start_environments(&args, keys, Arc::new(FleetKeys::new(fleet.peers.clone())))?;
        let service = Arc::new(
            HostService::new(
                environments.router.clone(),
                fleet.peers.clone(),
                &args.data_dir.join("fleet-artifacts"),
            )
            .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?,
        );
        let registration = fleet
            .serve(
                Role::WorkerHost,
                args.workers * args.max_environments,
                service.endpoints(),
            )
            .await?;
        let mut interrupt = interrupts();
        let _ = interrupt.wait_for(|&n| n >= 1).await;
        tracing::info!("SIGINT: leaving the fleet; stopping the environments");
        if let Err(e) = registration.leave().await {
            tracing::warn!("leaving the fleet: {e}");
        }
        environments.stop().await;
        return Ok(());
    }
    let environment_lease = Duration::from_secs(args.environment_lease);
    // Role credentials last an hour beyond the longest environment, so
    // that one set serves every environment started within that hour.
    let roles = Arc::new(
        RoleCredentialIssuer::open(
            &args.data_dir.join("issuer.key"),
            environment_lease + Duration::from_secs(3600),
        )
        .map_err(|e| e.to_string())?,
    );
    let credentials_file = args
        .credentials
        .as_deref()
        .ok_or("--credentials is needed to serve the Lambda API")?;
    let credentials = Credentials::load(credentials_file)
        .map_err(|e| e.to_string())?
        .with_issuer(roles.clone());
    let store = Store::open(&args.data_dir).map_err(|e| e.to_string())?;
    // A front end's functions are the fleet's: its store replicates them.
    let store = match &fleet {
        Some(fleet) => {
            let replica = StateReplica::start(
                fleet.etcd.clone(),
                store.clone(),
                &fleet.tls.name,
                fleet.peers.clone(),
                &keys.fingerprint(),
            )
            .await
            .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?;
            store.replicated(replica)
        }
        None => store,
    };
    if args.backup_every > 0 {
        spawn_backups(
            store.clone(),
            args.data_dir.join("keys"),
            args.data_dir.join("backups"),
            Duration::from_secs(args.backup_every),
        );
    }
    // What CreateFunction accepts: the custom runtimes with a kernel, the
    // managed ones with their images too. A front end takes the runtimes
    // every worker host runs: the bare-metal one.
    let mut linux_runtimes: Vec<String> = Vec::new();
    if args.linux_kernel.is_some() && args.role == RoleArg::All {
        linux_runtimes.extend(runtime::PROVIDED.map(String::from));
        for (name, _) in &args.linux_runtimes {
            if !linux_runtimes.contains(name) {
                linux_runtimes.push(name.clone());
            }
        }
    }
    let control = ControlPlane::new(store.clone(), &args.data_dir, keys.clone(), linux_runtimes)
        .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?;
    if args.rotate_master_key {
        keys.rotate().map_err(|e| e.to_string())?;
        let moved = control
            .artifacts()
            .rewrap_all()
            .map_err(|e| e.to_string())?;
        tracing::info!(
            "master key rotated to version {}: {moved} artifact keys rewrapped",
            keys.current_master()
        );
    }
    let artifacts_dir = control.artifacts().dir().to_path_buf();
    let (placement, environments, registration, capacity) = match fleet {
        None => {
            let environments = start_environments(&args, keys.clone(), keys.clone())?;
            let capacity = args.workers * args.max_environments;
            (
                Placement::Local(environments.router.clone()),
                Some(environments),
                None,
                capacity,
            )
        }
        Some(fleet) => {
            let registration = fleet
                .serve(
                    Role::FrontEnd,
                    0,
                    front_end_endpoints(keys.clone(), artifacts_dir, store),
                )
                .await?;
            let concurrency =
                FleetConcurrency::new(fleet.etcd.clone(), registration.lease(), &fleet.tls.name);
            let provisioner = Leadership::new(
                fleet.etcd.clone(),
                registration.lease(),
                &fleet.tls.name,
                "provisioner",
            );
            let events =
                EventLedger::start(fleet.etcd.clone(), registration.lease(), &fleet.tls.name);
            let router = Arc::new(FleetRouter::new(
                fleet.peers.clone(),
                concurrency,
                provisioner,
                events,
            ));
            (
                Placement::Fleet(router),
                None,
                Some(registration),
                args.workers * args.max_environments,
            )
        }
    };
    let worker = Worker::new(
        control,
        credentials,
        placement,
        roles,
        &args.data_dir,
        capacity,
        environment_lease,
    )
    .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?;
    let listener = tokio::net::TcpListener::bind(args.listen)
        .await
        .map_err(|e| format!("--listen {}: {e}", args.listen))?;
    tracing::info!(
        "Lambda API on http://{}",
        listener.local_addr().map_err(|e| e.to_string())?
    );
    let mut interrupt = interrupts();
    let mut on_first = interrupt.clone();
    let server = axum::serve(listener, api::router(worker)).with_graceful_shutdown(async move {
        let _ = on_first.wait_for(|&n| n >= 1).await;
        tracing::info!("SIGINT: no new requests; waiting for those in flight");
    });
    // In-flight requests are waited for, but not forever: a request stuck
    // on a broken environment must not keep the worker from stopping.
    let grace = Duration::from_secs(args.shutdown_grace);
    tokio::select! {
        served = server => served.map_err(|e| e.to_string())?,
        _ = async {
            let _ = interrupt.wait_for(|&n| n >= 1).await;
            tokio::select! {
                _ = tokio::time::sleep(grace) => {}
                _ = interrupt.wait_for(|&n| n >= 2) => {}
            }
        } => tracing::warn!("stopping with requests still in flight"),
    }
    if let Some(registration) = registration {
        if let Err(e) = registration.leave().await {
            tracing::warn!("leaving the fleet: {e}");
        }
    }
    if let Some(environments) = environments {
        environments.stop().await;
    }
    Ok(())
}

fn main() {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        // A reader that went away must not take the process with it: the
        // subscriber would otherwise report the failed write with
        // `eprintln!`, which panics on a closed stderr.
        .log_internal_errors(false)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("lambda-worker: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let result = runtime.block_on(run(Args::parse()));
    // A snapshot still being sealed in the background (a minute and more
    // of a large guest's memory on a slow host) is abandoned, not waited
    // for: the next start discards what it staged.
    runtime.shutdown_timeout(Duration::from_secs(1));
    if let Err(e) = result {
        eprintln!("lambda-worker: {e}");
        std::process::exit(1);
    }
}
