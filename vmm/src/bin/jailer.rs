//! `jailer`: runs the VMM in its own namespaces, root, cgroup and uid.
//! See `vmm::jail` for what it does, in order.

use std::ffi::OsString;
use std::os::fd::{FromRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::ExitCode;

use clap::Parser;
use vmm::jail::cgroup::CgroupLimits;
use vmm::jail::{Jail, JailConfig, JailMount, Launch, LaunchSource};

#[derive(Debug, Parser)]
#[command(name = "jailer", version, about = "Runs the VMM in a jail")]
struct Cli {
    /// The jail's name: its directory under --chroot-base and its cgroup.
    #[arg(long)]
    id: String,
    /// The VMM binary (statically linked: nothing else enters the jail).
    #[arg(long, value_name = "PATH")]
    exec_file: PathBuf,
    #[arg(long, value_name = "DIR", default_value = "/srv/jailer")]
    chroot_base: PathBuf,
    /// The unprivileged user the VMM runs as.
    #[arg(long)]
    uid: u32,
    #[arg(long)]
    gid: u32,
    /// SOURCE:TARGET[:ro]: a host file or directory the VMM sees at
    /// TARGET. Nothing else of the host is visible.
    #[arg(long = "mount", value_name = "SRC:DEST[:ro]")]
    mounts: Vec<JailMount>,
    /// Builds the jail now and waits for its launch (mounts, memory, the
    /// VMM's arguments and descriptors, as `vmm::jail::Launch` sends it)
    /// on this `SOCK_SEQPACKET` socket, so that a VMM starts in a jail
    /// made ahead of time. The jail has the memory controller.
    #[arg(long, value_name = "FD", conflicts_with_all = ["mounts", "memory_mib", "vmm_args"])]
    launch_fd: Option<RawFd>,
    /// The parent cgroup.
    #[arg(long, default_value = "lambda-microvm")]
    cgroup_parent: String,
    /// Memory limit in MiB, guest memory included.
    #[arg(long, value_name = "MIB")]
    memory_mib: Option<u64>,
    /// CPU limit in cores (1.5 is one and a half).
    #[arg(long, value_name = "CORES")]
    cpus: Option<f64>,
    #[arg(long, default_value_t = 64)]
    pids_max: u64,
    #[arg(long, default_value_t = 256)]
    max_open_files: u64,
    #[arg(long, default_value_t = 64)]
    max_processes: u64,
    /// The VMM's own arguments (after `--`); the jailer adds --kvm-fd and
    /// --hypervisor.
    #[arg(last = true)]
    vmm_args: Vec<OsString>,
}

const CPU_PERIOD_US: u64 = 100_000;

fn run(cli: Cli) -> Result<i32, String> {
    let cpu_max = match cli.cpus {
        Some(c) if c.is_finite() && c > 0.0 => {
            Some(((c * CPU_PERIOD_US as f64).round() as u64, CPU_PERIOD_US))
        }
        Some(c) => return Err(format!("--cpus {c}: must be a positive number of cores")),
        None => None,
    };
    let launch = match cli.launch_fd {
        Some(fd) => LaunchSource::Socket(launch_socket(fd)?),
        None => LaunchSource::Given(Launch {
            mounts: cli.mounts,
            memory_max: cli.memory_mib.map(|m| m << 20),
            vmm_args: cli
                .vmm_args
                .into_iter()
                .map(|a| {
                    a.into_string()
                        .map_err(|a| format!("the VMM argument {a:?} is not UTF-8"))
                })
                .collect::<Result<_, _>>()?,
            ..Launch::default()
        }),
    };
    let jail = Jail::new(JailConfig {
        id: cli.id,
        exec_file: cli.exec_file,
        chroot_base: cli.chroot_base,
        uid: cli.uid,
        gid: cli.gid,
        cgroup_parent: cli.cgroup_parent,
        limits: CgroupLimits {
            memory: cli.memory_mib.is_some() || cli.launch_fd.is_some(),
            cpu_max,
            pids_max: Some(cli.pids_max),
        },
        max_open_files: cli.max_open_files,
        max_processes: cli.max_processes,
        launch,
    })
    .map_err(|e| e.to_string())?;
    let exit = jail.run().map_err(|e| e.to_string())?;
    if exit != vmm::jail::VmmExit::Code(0) {
        eprintln!("jailer: the VMM {exit}");
    }
    Ok(exit.code())
}

/// Takes `--launch-fd`, which the VMM must not inherit.
fn launch_socket(fd: RawFd) -> Result<UnixStream, String> {
    // SAFETY: F_GETFD then F_SETFD on a number; a closed one is refused.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFD) };
    if flags < 0 || unsafe { libc::fcntl(fd, libc::F_SETFD, flags | libc::FD_CLOEXEC) } < 0 {
        return Err(format!(
            "--launch-fd {fd}: {}",
            std::io::Error::last_os_error()
        ));
    }
    // SAFETY: an open descriptor the jailer's owner handed over for this.
    Ok(unsafe { UnixStream::from_raw_fd(fd) })
}

fn main() -> ExitCode {
    // What the jail's clean-up could not undo (a cgroup, the jail's
    // directory) is logged here; the VMM's own log follows on the same
    // stderr.
    vmm::log::log_to_stderr(tracing::Level::INFO);
    match run(Cli::parse()) {
        Ok(code) => ExitCode::from(code.clamp(0, 255) as u8),
        Err(e) => {
            eprintln!("jailer: {e}");
            ExitCode::from(125)
        }
    }
}
