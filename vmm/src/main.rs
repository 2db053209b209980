//! `vmm`: boot a microVM from the command line or a JSON config file.
//!
//! The process starts at C's `main`, not Rust's: Rust's start-up reads
//! /proc/self/maps to place the main thread's stack guard and sets up
//! signal stacks for stack-overflow messages, about 0.1 ms of every spawn
//! on a PVM host. Of what it does, the VMM needs only SIGPIPE ignored and
//! stdout flushed at the end, which `main` does itself.
#![no_main]

use std::io::Write;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::time::Instant;

use clap::Parser;
use vmm::builder::{restore_microvm, KvmStart, PreparedVm};
use vmm::standby::{wait_for_launch, LowFds};
use vmm::vstate::vcpu_thread::{EarlyVcpuThread, VcpuThread};
use vmm::{build_microvm, BuildError, VmConfigInput};

/// A KVM microVM monitor: boots a kernel with a serial console, an i8042
/// reset line and a boot timer, or restores a snapshot of one.
#[derive(Debug, Parser)]
#[command(name = "vmm", version)]
struct Cli {
    /// Kernel: ELF vmlinux (PVH entry when it has one) or bzImage; a path,
    /// or fd:N for an inherited descriptor.
    #[arg(long, value_name = "PATH|fd:N")]
    kernel: Option<vmm::config::FileSource>,
    /// Initial ramdisk (a path or fd:N).
    #[arg(long, value_name = "PATH|fd:N")]
    initrd: Option<vmm::config::FileSource>,
    /// Kernel command line.
    #[arg(long, value_name = "STR")]
    cmdline: Option<String>,
    /// Guest memory in MiB [default: 128].
    #[arg(long, value_name = "N")]
    mem_mib: Option<u64>,
    /// Number of vCPUs [default: 1].
    #[arg(long, value_name = "N")]
    vcpus: Option<u64>,
    /// Serial console: stdout, file:PATH or off [default: stdout].
    #[arg(long, value_name = "DEST")]
    serial: Option<String>,
    /// A virtio-blk drive backed by a raw image; `,ro` makes it read-only.
    /// Repeat for more drives; the first is the guest's first disk.
    #[arg(long = "drive", value_name = "PATH[,ro]")]
    drives: Vec<vmm::config::DriveConfig>,
    /// A virtio-vsock device: the guest's CID and the host Unix socket
    /// (guest connections to port P go to PATH_P). Each
    /// connected=PORT:fd:N gives a connected stream socket, inherited at
    /// descriptor N, to the guest's first connection to PORT instead.
    #[arg(long, value_name = "cid=N,uds=PATH[,connected=PORT:fd:N]")]
    vsock: Option<vmm::config::VsockConfig>,
    /// A Unix socket for control requests, one JSON line each:
    /// {"action":"snapshot","state":PATH,"memory":PATH} pauses the VM,
    /// writes a snapshot and resumes it.
    #[arg(long, value_name = "PATH")]
    control_sock: Option<PathBuf>,
    /// Restore the snapshot in this state file (a path, or fd:N for an
    /// inherited descriptor) instead of booting; the drives and vsock are
    /// given again, new, in the same order.
    #[arg(long, value_name = "PATH|fd:N", requires = "restore_memory")]
    restore: Option<vmm::config::FileSource>,
    /// The memory file of the snapshot to restore (a path or fd:N); mapped
    /// copy-on-write, never written.
    #[arg(long, value_name = "PATH|fd:N", requires = "restore")]
    restore_memory: Option<vmm::config::FileSource>,
    /// JSON file with the same fields (kernel, initrd, cmdline, mem_mib,
    /// vcpus, serial, drives: [{path, read_only, key_fd, manifest}],
    /// vsock: {guest_cid, uds_path}, control_sock); flags given on the
    /// command line take precedence.
    #[arg(long, value_name = "FILE.json")]
    config: Option<PathBuf>,
    /// An open /dev/kvm to use, inherited from a jailer.
    #[arg(long, value_name = "FD")]
    kvm_fd: Option<i32>,
    /// pvm or hardware; detected from /sys/module when not given.
    #[arg(long, value_name = "KIND")]
    hypervisor: Option<vmm::vstate::vm::HypervisorKind>,
    /// Start on standby: open KVM and make the VM, then wait on this
    /// inherited SOCK_SEQPACKET socket for the launch (a jailer's launch
    /// message: the remaining arguments, and descriptors at the numbers
    /// they name) and build the microVM it describes.
    #[arg(long, value_name = "FD")]
    standby_fd: Option<i32>,
    /// Run without the seccomp filters (for debugging only).
    #[arg(long)]
    no_seccomp: bool,
    /// Log level: error, warn, info, debug or trace.
    #[arg(long, default_value = "info", value_name = "LEVEL")]
    log_level: tracing::Level,
}

fn run(
    cli: Cli,
    start: Instant,
    vcpu0: std::io::Result<EarlyVcpuThread>,
    kvm: KvmStart,
) -> Result<i32, String> {
    let vcpu0 = vcpu0
        .map_err(BuildError::VcpuThread)
        .map_err(|e| e.to_string())?;
    let file = match &cli.config {
        Some(path) => VmConfigInput::from_json_file(path).map_err(|e| e.to_string())?,
        None => VmConfigInput::default(),
    };
    let config = file.overridden_by(VmConfigInput {
        kernel: cli.kernel,
        initrd: cli.initrd,
        cmdline: cli.cmdline,
        mem_mib: cli.mem_mib,
        vcpus: cli.vcpus,
        serial: cli.serial,
        drives: (!cli.drives.is_empty()).then_some(cli.drives),
        vsock: cli.vsock,
        control_sock: cli.control_sock,
    });
    let microvm = match (cli.restore, cli.restore_memory) {
        (Some(state), Some(memory)) => {
            let config = config
                .validate_restore(state, memory)
                .map_err(|e| e.to_string())?;
            restore_microvm(&config, kvm, start, !cli.no_seccomp, vcpu0)
        }
        _ => build_microvm(
            &config.validate().map_err(|e| e.to_string())?,
            kvm,
            start,
            !cli.no_seccomp,
            vcpu0,
        ),
    }
    .map_err(|e| e.to_string())?;
    tracing::info!("running on {}", microvm.hypervisor());
    if cli.no_seccomp {
        tracing::warn!("seccomp filters are off (--no-seccomp)");
    }
    // Open past the microVM's end, for the helper that frees it.
    let vm = microvm.vm_fd();
    let outcome = microvm.run().map_err(|e| e.to_string())?;
    match outcome.exit_code() {
        0 => tracing::info!("{outcome}"),
        _ => tracing::error!("{outcome}"),
    }
    if let Err(e) = vmm::vstate::release::after_process_exit(vm.as_raw_fd()) {
        tracing::warn!("the VM is freed before the exit, without a helper: {e}");
    }
    Ok(outcome.exit_code())
}

#[unsafe(no_mangle)]
extern "C" fn main(_argc: libc::c_int, _argv: *const *const libc::c_char) -> libc::c_int {
    let start = Instant::now();
    // SAFETY: sets a signal's disposition, before any thread starts. A
    // write to a host socket whose peer left must fail, not kill the VMM.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    let code = vmm_main(start);
    // The serial console may have left a partial line in stdout's buffer.
    let _ = std::io::stdout().flush();
    code
}

fn kvm_access(cli: &Cli) -> vmm::vstate::vm::KvmAccess {
    vmm::vstate::vm::KvmAccess {
        fd: cli.kvm_fd,
        kind: cli.hypervisor,
    }
}

/// Makes the VM, waits for the launch on `socket` and returns the whole
/// command line it completes, with the time the launch came; `None` when
/// the VMM was dismissed without one.
fn on_standby(cli: &Cli, socket: i32) -> Result<Option<(KvmStart, Cli, Instant)>, String> {
    // Before KVM's descriptors are opened: they go above the numbers a
    // launch may name.
    let low = LowFds::hold().map_err(|e| e.to_string())?;
    let prepared = PreparedVm::make(kvm_access(cli)).map_err(|e| e.to_string())?;
    let Some(launched) = wait_for_launch(socket, low).map_err(|e| e.to_string())? else {
        return Ok(None);
    };
    let start = Instant::now();
    let whole =
        Cli::try_parse_from(std::env::args_os().chain(launched.into_iter().map(Into::into)))
            .map_err(|e| format!("the launch's arguments: {e}"))?;
    if (whole.kvm_fd, whole.hypervisor) != (cli.kvm_fd, cli.hypervisor) {
        return Err("the launch's arguments: --kvm-fd and --hypervisor belong to the VMM's start, before its VM was made".into());
    }
    Ok(Some((KvmStart::Prepared(prepared), whole, start)))
}

fn vmm_main(start: Instant) -> libc::c_int {
    // Before the command line is parsed: see EarlyVcpuThread.
    let vcpu0 = VcpuThread::spawn_early(0);
    let cli = Cli::parse();
    vmm::log::log_to_stderr(cli.log_level);
    let launched = match cli.standby_fd {
        None => Ok(Some((KvmStart::Open(kvm_access(&cli)), cli, start))),
        Some(socket) => on_standby(&cli, socket),
    };
    let ran = launched.and_then(|launched| match launched {
        Some((kvm, cli, start)) => run(cli, start, vcpu0, kvm),
        None => Ok(0),
    });
    match ran {
        Ok(code) => libc::c_int::from(code as u8),
        Err(e) => {
            eprintln!("vmm: error: {e}");
            1
        }
    }
}
