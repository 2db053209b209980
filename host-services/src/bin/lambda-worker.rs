//! `lambda-worker`: one process serving Lambda's API and running each
//! function in microVMs, with its state in a data directory.

use std::collections::BTreeMap;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use clap::Parser;
use host_services::api;
use host_services::control_plane::backup::spawn_backups;
use host_services::control_plane::functions::ControlPlane;
use host_services::control_plane::model::runtime;
use host_services::control_plane::store::Store;
use host_services::data_plane::environment::{LinuxGuest, MicroVmImage};
use host_services::data_plane::host::HostLimits;
use host_services::data_plane::lifecycle::Lifecycle;
use host_services::data_plane::router::{FleetConfig, InvokeRouter};
use host_services::data_plane::snapshots::SnapshotStore;
use host_services::data_plane::vmm_process::{JailIds, JailPool, JailSettings};
use host_services::data_plane::worker::Worker;
use host_services::security::auth::Credentials;
use host_services::security::key_service::KeyService;
use host_services::security::role_credentials::RoleCredentialIssuer;

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
    /// The address the Lambda API listens on.
    #[arg(long, default_value = "127.0.0.1:9000")]
    listen: SocketAddr,
    /// JSON array of {"AccessKeyId", "SecretAccessKey", "AccountId"}.
    #[arg(long)]
    credentials: PathBuf,
    /// The `vmm` binary.
    #[arg(long)]
    vmm: PathBuf,
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
    /// How many jails wait, made ahead of time, for a cold start's VMM
    /// (each a jailer with its namespaces, cgroup and root built); 0
    /// makes each jail when its VMM starts.
    #[arg(long, default_value_t = 2, value_name = "N")]
    jail_pool: usize,
    /// The guest the wasi-preview1 runtime boots (guest-init's baremetal).
    #[arg(long)]
    guest: PathBuf,
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
fn jail_settings(args: &Args) -> Result<Option<JailSettings>, String> {
    if args.no_jail {
        tracing::warn!("--no-jail: environments start WITHOUT the jailer, as this worker's uid");
        return Ok(None);
    }
    let jailer = match &args.jailer {
        Some(path) => path.clone(),
        None => args.vmm.with_file_name("jailer"),
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
        pool: JailPool::new(args.jail_pool, &args.vmm),
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

async fn run(args: Args) -> Result<(), String> {
    existing_file("vmm", &args.vmm)?;
    existing_file("guest", &args.guest)?;
    if args.max_environments == 0 {
        return Err("--max-environments must be at least 1".into());
    }
    if args.workers == 0 {
        return Err("--workers must be at least 1".into());
    }
    if args.worker_lease == 0 {
        return Err("--worker-lease must be at least 1 second".into());
    }
    std::fs::create_dir_all(&args.data_dir)
        .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?;
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
    let credentials = Credentials::load(&args.credentials)
        .map_err(|e| e.to_string())?
        .with_issuer(roles.clone());
    let store = Store::open(&args.data_dir).map_err(|e| e.to_string())?;
    if args.backup_every > 0 {
        spawn_backups(
            store.clone(),
            args.data_dir.join("keys"),
            args.data_dir.join("backups"),
            Duration::from_secs(args.backup_every),
        );
    }
    let keys = Arc::new(
        KeyService::open(&args.data_dir.join("keys"))
            .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?,
    );
    let roots: BTreeMap<String, PathBuf> = args.linux_runtimes.iter().cloned().collect();
    for image in roots.values() {
        existing_file("linux-runtime", image)?;
    }
    // What CreateFunction accepts: the custom runtimes with a kernel, the
    // managed ones with their images too.
    let mut linux_runtimes: Vec<String> = Vec::new();
    if args.linux_kernel.is_some() {
        linux_runtimes.extend(runtime::PROVIDED.map(String::from));
        for name in roots.keys() {
            if !linux_runtimes.contains(name) {
                linux_runtimes.push(name.clone());
            }
        }
    }
    let control = ControlPlane::new(store, &args.data_dir, keys.clone(), linux_runtimes)
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
    let jail = jail_settings(&args)?;
    let jail_pool = jail.clone();
    let run_dir = args.data_dir.join("run");
    let _ = std::fs::remove_dir_all(&run_dir);
    if let Some(jail) = &jail {
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
        vmm: args.vmm.clone(),
        guest_kernel: args.guest.clone(),
        linux,
        run_dir,
        init_timeout: Duration::from_secs(args.init_timeout),
        jail,
        snapshots: if args.snapshots == SnapshotMode::Off {
            None
        } else {
            Some(Arc::new(
                SnapshotStore::open(&args.data_dir.join("snapshots"), keys.clone())
                    .map_err(|e| format!("--data-dir {}: {e}", args.data_dir.display()))?,
            ))
        },
        snapshot_every_version: args.snapshots == SnapshotMode::EveryVersion,
        keys,
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
                environment_lease,
            },
        },
        lifecycle,
    );
    router.spawn_maintenance(router.maintenance_period());
    let worker = Worker::new(
        control,
        credentials,
        router.clone(),
        roles,
        &args.data_dir,
        args.workers * args.max_environments,
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
    let (interrupted, mut interrupt) = tokio::sync::watch::channel(0u32);
    tokio::spawn(async move {
        while tokio::signal::ctrl_c().await.is_ok() {
            interrupted.send_modify(|n| *n += 1);
        }
    });
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
    router.shutdown().await;
    if let Some(jail) = jail_pool {
        jail.empty_pool().await;
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
