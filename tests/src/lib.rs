//! Helpers for the end-to-end tests: where the fixture guests and the
//! `vmm` binary are, and running the VMM with a deadline.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

pub use vmm::vstate::vm::HypervisorKind;

/// A fixture guest built by this crate's build script.
pub fn fixture(name: &str) -> PathBuf {
    Path::new(env!("OUT_DIR")).join(name)
}

/// The workspace's target directory for the running profile: the test
/// binaries live in `target/<profile>/deps`, the bench binaries in
/// `target/<profile>`.
fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("executable path");
    let dir = exe.parent().expect("executable directory");
    if dir.ends_with("deps") {
        dir.parent().expect("profile directory").to_path_buf()
    } else {
        dir.to_path_buf()
    }
}

/// The `vmm` binary of this build profile, brought up to date once per
/// test process: cargo does not rebuild another package's binaries for
/// this crate's tests.
pub fn vmm_binary() -> PathBuf {
    static BUILT: OnceLock<PathBuf> = OnceLock::new();
    BUILT
        .get_or_init(|| {
            let target = target_dir();
            let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
            let mut cmd = Command::new(cargo);
            cmd.args(["build", "--quiet", "-p", "vmm", "--bin", "vmm"]);
            if target.ends_with("release") {
                cmd.arg("--release");
            }
            let status = cmd.status().expect("run cargo build for the vmm binary");
            assert!(status.success(), "building the vmm binary failed");
            target.join("vmm")
        })
        .clone()
}

/// What a VMM run left behind.
#[derive(Debug)]
pub struct VmmRun {
    pub code: Option<i32>,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

/// Runs `vmm` with `args`, killing it if it outlives `deadline`.
pub fn run_vmm(args: &[&str], deadline: Duration) -> VmmRun {
    let start = Instant::now();
    let mut child = Command::new(vmm_binary())
        .args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("spawn vmm");
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stdout.read_to_string(&mut s);
        s
    });
    let err_reader = std::thread::spawn(move || {
        let mut s = String::new();
        let _ = stderr.read_to_string(&mut s);
        s
    });
    let code = loop {
        if let Some(status) = child.try_wait().expect("wait for vmm") {
            break status.code();
        }
        if start.elapsed() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "vmm {args:?} still running after {deadline:?}; stderr so far: {}",
                err_reader.join().unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    VmmRun {
        code,
        stdout: out_reader.join().unwrap_or_default(),
        stderr: err_reader.join().unwrap_or_default(),
        elapsed: start.elapsed(),
    }
}

/// The host's hypervisor, as the VMM itself detects it.
pub fn hypervisor() -> HypervisorKind {
    HypervisorKind::detect()
}

/// Prints the line that marks a test as not run on this host, and returns
/// true when the host cannot run it.
pub fn skip_unless_hardware_kvm(test: &str) -> bool {
    if hypervisor() == HypervisorKind::Pvm {
        println!("SKIPPED: needs hardware KVM ({test})");
        true
    } else {
        false
    }
}
