//! Helpers for the end-to-end tests: where the fixture guests and the
//! `vmm` binary are, and running the VMM with a deadline.

pub mod fleet;
pub mod guest_ports;
pub mod l1_machine;
pub mod lambda_client;
pub mod load;
pub mod worker;

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use host_services::artifacts::cpio;

pub use vmm::vstate::vm::HypervisorKind;

/// A WASI function in WAT: echoes the event inside `{"echo":...}` and logs
/// a line to stderr. An event that is a JSON string starting with `t`
/// (`"trap"`) traps; one starting with `l` (`"loop"`) never ends; one
/// starting with `s` (`"spin"`) counts down from 20M first, about 100 ms
/// of work that holds its environment busy; one starting with `e`
/// (`"env"`) answers with its environment, a `KEY=VALUE` per line; one
/// starting with `r` (`"random"`) answers with 16 bytes from WASI
/// `random_get`, as a JSON string of hex.
pub const ECHO_WAT: &str = r#"
(module
  (import "wasi_snapshot_preview1" "fd_read" (func $fd_read (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $fd_write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_sizes_get" (func $environ_sizes_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "environ_get" (func $environ_get (param i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "random_get" (func $random_get (param i32 i32) (result i32)))
  (memory (export "memory") 3)
  (data (i32.const 160) "0123456789abcdef")
  (data (i32.const 0) "{\"echo\":")
  (data (i32.const 16) "}")
  (data (i32.const 32) "echo: handling an event\n")
  (func (export "_start")
    (local $n i32)
    (local $i i32)
    (i32.store (i32.const 64) (i32.const 1024))
    (i32.store (i32.const 68) (i32.const 60000))
    (drop (call $fd_read (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 72)))
    (local.set $n (i32.load (i32.const 72)))
    (i32.store (i32.const 120) (i32.const 32))
    (i32.store (i32.const 124) (i32.const 24))
    (drop (call $fd_write (i32.const 2) (i32.const 120) (i32.const 1) (i32.const 112)))
    (if (i32.eq (i32.load8_u (i32.const 1025)) (i32.const 116)) (then unreachable))
    (if (i32.eq (i32.load8_u (i32.const 1025)) (i32.const 101))
      (then
        (drop (call $environ_sizes_get (i32.const 200) (i32.const 204)))
        (drop (call $environ_get (i32.const 65536) (i32.const 73728)))
        (local.set $i (i32.const 0))
        (block $done
          (loop $nul
            (br_if $done (i32.ge_u (local.get $i) (i32.load (i32.const 204))))
            (if (i32.eqz (i32.load8_u (i32.add (i32.const 73728) (local.get $i))))
              (then (i32.store8 (i32.add (i32.const 73728) (local.get $i)) (i32.const 10))))
            (local.set $i (i32.add (local.get $i) (i32.const 1)))
            (br $nul)))
        (i32.store (i32.const 80) (i32.const 73728))
        (i32.store (i32.const 84) (i32.load (i32.const 204)))
        (drop (call $fd_write (i32.const 1) (i32.const 80) (i32.const 1) (i32.const 112)))
        (return)))
    (if (i32.eq (i32.load8_u (i32.const 1025)) (i32.const 108))
      (then (loop $forever (br $forever))))
    (if (i32.eq (i32.load8_u (i32.const 1025)) (i32.const 114))
      (then
        (if (call $random_get (i32.const 256) (i32.const 16)) (then unreachable))
        (i32.store8 (i32.const 287) (i32.const 34))
        (i32.store8 (i32.const 320) (i32.const 34))
        (local.set $i (i32.const 0))
        (loop $hex
          (i32.store8 (i32.add (i32.const 288) (i32.shl (local.get $i) (i32.const 1)))
            (i32.load8_u (i32.add (i32.const 160)
              (i32.shr_u (i32.load8_u (i32.add (i32.const 256) (local.get $i))) (i32.const 4)))))
          (i32.store8 (i32.add (i32.const 289) (i32.shl (local.get $i) (i32.const 1)))
            (i32.load8_u (i32.add (i32.const 160)
              (i32.and (i32.load8_u (i32.add (i32.const 256) (local.get $i))) (i32.const 15)))))
          (local.set $i (i32.add (local.get $i) (i32.const 1)))
          (br_if $hex (i32.lt_u (local.get $i) (i32.const 16))))
        (i32.store (i32.const 80) (i32.const 287))
        (i32.store (i32.const 84) (i32.const 34))
        (drop (call $fd_write (i32.const 1) (i32.const 80) (i32.const 1) (i32.const 112)))
        (return)))
    (if (i32.eq (i32.load8_u (i32.const 1025)) (i32.const 115))
      (then
        (local.set $i (i32.const 20000000))
        (loop $spin
          (local.set $i (i32.sub (local.get $i) (i32.const 1)))
          (br_if $spin (local.get $i)))))
    (i32.store (i32.const 80) (i32.const 0))
    (i32.store (i32.const 84) (i32.const 8))
    (i32.store (i32.const 88) (i32.const 1024))
    (i32.store (i32.const 92) (local.get $n))
    (i32.store (i32.const 96) (i32.const 16))
    (i32.store (i32.const 100) (i32.const 1))
    (drop (call $fd_write (i32.const 1) (i32.const 80) (i32.const 3) (i32.const 112)))))
"#;

/// Every file under `dir`, recursively; none if it does not exist.
pub fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut files = Vec::new();
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        if path.is_dir() {
            files.extend(files_under(&path));
        } else if path.is_file() {
            files.push(path);
        }
    }
    files
}

/// The boot timer's figures from a VMM's log: microseconds since the VMM
/// started, and the CLOCK_MONOTONIC time of the guest's write.
pub fn boot_time_logged(stderr: &str) -> Option<(u64, u64)> {
    let rest = stderr.split("guest boot time: ").nth(1)?;
    let (since_start, rest) = rest.split_once(" us since VMM start, at CLOCK_MONOTONIC ")?;
    let at = rest.split(' ').next()?;
    Some((since_start.parse().ok()?, at.parse().ok()?))
}

/// A benchmark's one argument, `--runs N` (N > 0; 30 when not given);
/// anything else ends the program with its usage.
pub fn runs_arg(bench: &str) -> usize {
    bench_args(bench, &[]).0
}

/// A benchmark's counts, each `--NAME N` with N > 0, in the order of
/// `counts` (name, default); anything else ends the program with its usage.
pub fn count_args(bench: &str, counts: &[(&str, usize)]) -> Vec<usize> {
    let mut values: Vec<usize> = counts.iter().map(|(_, n)| *n).collect();
    let usage = || -> ! {
        let flags: String = counts.iter().map(|(o, _)| format!(" [--{o} N]")).collect();
        eprintln!("usage: {bench}{flags} (N > 0)");
        std::process::exit(2);
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        let at = flag
            .strip_prefix("--")
            .and_then(|name| counts.iter().position(|(o, _)| *o == name))
            .unwrap_or_else(|| usage());
        values[at] = value
            .parse()
            .ok()
            .filter(|&n| n > 0)
            .unwrap_or_else(|| usage());
    }
    values
}

/// `--runs N` (30 when not given) and the values of the benchmark's own
/// `options`, each `--option VALUE`, in the order of `options`.
pub fn bench_args(bench: &str, options: &[&str]) -> (usize, Vec<Option<String>>) {
    let mut runs = 30usize;
    let mut values = vec![None; options.len()];
    let mut args = std::env::args().skip(1);
    let usage = || -> ! {
        let extra: String = options.iter().map(|o| format!(" [--{o} VALUE]")).collect();
        eprintln!("usage: {bench} [--runs N] (N > 0){extra}");
        std::process::exit(2);
    };
    while let Some(a) = args.next() {
        let value = args.next().unwrap_or_else(|| usage());
        match a.strip_prefix("--") {
            Some("runs") => match value.parse() {
                Ok(n) if n > 0 => runs = n,
                _ => usage(),
            },
            Some(name) => match options.iter().position(|o| *o == name) {
                Some(i) => values[i] = Some(value),
                None => usage(),
            },
            None => usage(),
        }
    }
    (runs, values)
}

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

/// A binary of this workspace in this build profile, brought up to date
/// once per test process: cargo does not rebuild another package's
/// binaries for this crate's tests.
fn workspace_binary(package: &str, bin: &str, features: &[&str]) -> PathBuf {
    static BUILT: Mutex<Vec<String>> = Mutex::new(Vec::new());
    let target = target_dir();
    let mut built = BUILT.lock().unwrap_or_else(|e| e.into_inner());
    // In the L1 machine the tree is read-only and was built before it
    // started (see on_hardware_kvm).
    if !in_l1_machine() && !built.iter().any(|b| b == bin) {
        let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
        let mut cmd = Command::new(cargo);
        cmd.args(["build", "--quiet", "-p", package, "--bin", bin]);
        if package == "host-services" {
            let flags =
                Path::new(env!("CARGO_MANIFEST_DIR")).join("../host-services/panic-unwind.toml");
            cmd.arg("--config").arg(flags);
        }
        for feature in features {
            cmd.args(["--features", feature]);
        }
        if target.ends_with("release") {
            cmd.arg("--release");
        }
        let status = cmd.status().expect("run cargo build");
        assert!(status.success(), "building {package}/{bin} failed");
        built.push(bin.to_string());
    }
    target.join(bin)
}

/// The `lambda_runtime` test function (`examples/rust-function`), a static
/// `bootstrap`.
pub fn rust_function_bootstrap() -> PathBuf {
    workspace_binary("rust-function", "bootstrap", &[])
}

/// Whether the tests run as root, as jailing takes.
pub fn is_root() -> bool {
    // SAFETY: geteuid cannot fail.
    unsafe { libc::geteuid() == 0 }
}

/// The VMM.
pub fn vmm_binary() -> PathBuf {
    workspace_binary("vmm", "vmm", &[])
}

/// The jailer from the vmm package.
pub fn jailer_binary() -> PathBuf {
    workspace_binary("vmm", "jailer", &[])
}

/// The Linux guest's PID 1 from guest-init.
pub fn linux_init_binary() -> PathBuf {
    workspace_binary("guest-init", "init", &["linux-init"])
}

/// The VMM's own boot benchmark, which a worker's benchmark runs beside
/// itself as the floor of a cold start.
pub fn runtime_boot_bench_binary() -> PathBuf {
    workspace_binary("microvm-tests", "runtime_boot_bench", &[])
}

/// The Lambda worker from host-services.
pub fn lambda_worker_binary() -> PathBuf {
    workspace_binary("host-services", "lambda-worker", &[])
}

/// The Python with boto3 that `scripts/setup.sh` prepares, or
/// `MICROVM_PYTHON`.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("MICROVM_PYTHON") {
        return p.into();
    }
    let home = std::env::var_os("HOME").expect("HOME is set");
    let venv = Path::new(&home).join(".cache/lambda-microvm/venv/bin/python");
    assert!(
        venv.exists(),
        "{} is missing: run scripts/setup-python.sh, which installs boto3 there, or set MICROVM_PYTHON",
        venv.display()
    );
    venv
}

/// The bare-metal guest from guest-init.
pub fn baremetal_guest() -> PathBuf {
    workspace_binary("guest-init", "baremetal", &["baremetal"])
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
    run_binary(&vmm_binary(), args, deadline)
}

/// Runs `binary` with `args`, killing it if it outlives `deadline`.
pub fn run_binary(binary: &Path, args: &[&str], deadline: Duration) -> VmmRun {
    let start = Instant::now();
    let mut child = Command::new(binary)
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
                "{} {args:?} still running after {deadline:?}; stdout so far:\n{}\nstderr so far:\n{}",
                binary.display(),
                out_reader.join().unwrap_or_default(),
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

/// Marks `test` as not run here, for `reason`: the line the test prints,
/// and a line in the file `MICROVM_SKIP_LOG` names (the test script sets
/// it and counts those lines as skipped, not passed, in its summary).
pub fn skip(test: &str, reason: &str) {
    println!("SKIPPED: {reason} ({test})");
    record("MICROVM_SKIP_LOG", &format!("{test}: {reason}"));
}

/// Appends `line` to the file the variable `log` names, if it is set.
fn record(log: &str, line: &str) {
    if let Some(path) = std::env::var_os(log) {
        use std::io::Write;
        let written = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)
            .and_then(|mut f| writeln!(f, "{line}"));
        if let Err(e) = written {
            panic!("cannot record in {}: {e}", Path::new(&path).display());
        }
    }
}

/// Whether this process is the test run inside the L1 machine.
fn in_l1_machine() -> bool {
    std::env::var_os("MICROVM_L1_INSIDE").is_some()
}

/// Runs `body`, the test named `test` (its path in this test binary), on
/// hardware KVM: here if `/dev/kvm` is hardware KVM, else this very test
/// again in the L1 test machine ([`l1_machine`]), where it is. Without an
/// L1 machine the test is skipped, and says so.
pub fn on_hardware_kvm(test: &str, body: impl FnOnce()) {
    if hypervisor() == HypervisorKind::Hardware {
        return body();
    }
    let machine = match l1_machine::L1Machine::find() {
        Ok(machine) => machine,
        Err(why) => return skip(test, &format!("needs hardware KVM; {why}")),
    };
    // L1 sees the host's files read-only: what the test runs must be built
    // here first.
    let kernel = guest_kernel().unwrap_or_else(|e| panic!("{e}"));
    let python = python_runtime_image().unwrap_or_else(|e| panic!("{e}"));
    for binary in [
        vmm_binary(),
        linux_init_binary(),
        rust_function_bootstrap(),
        lambda_worker_binary(),
        baremetal_guest(),
    ] {
        assert!(binary.exists(), "{}", binary.display());
    }
    let exe = std::env::current_exe().expect("this test binary's path");
    let mut env = vec![
        ("MICROVM_L1_INSIDE", "1".to_string()),
        ("MICROVM_GUEST_KERNEL", kernel.display().to_string()),
        ("MICROVM_PYTHON_RUNTIME", python.display().to_string()),
        ("RUST_BACKTRACE", "1".to_string()),
    ];
    for name in ["PATH", "HOME", "MICROVM_PYTHON"] {
        if let Ok(value) = std::env::var(name) {
            env.push((name, value));
        }
    }
    let script = format!(
        "exec '{}' --exact '{test}' --nocapture --test-threads=1",
        exe.display()
    );
    println!("{test}: running in the L1 test machine (hardware KVM on emulated AMD SVM)");
    // An L1 machine that failed (reset without a word, its own kernel's
    // oops) on both its boots is a failed run like a failed test.
    let passed = || match machine.run(&script, &env, Duration::from_secs(900)) {
        Ok(run) if run.code == 0 && run.output.contains("test result: ok. 1 passed") => Ok(()),
        Ok(run) => Err(format!("exit status {}", run.code)),
        Err(e) => Err(e.to_string()),
    };
    // The emulator also fails inside L2 now and then (a triple fault or a
    // hang during SMP bring-up, in about one Linux boot of ten, measured in
    // docs/test-machine.md), which the harness cannot tell from a bug: such
    // a test runs again, up to three runs in all, and a pass on a later run
    // is counted apart (MICROVM_RETRY_LOG), so it shows in the summary. A
    // bug that fails every run still fails.
    const RUNS: u32 = 3;
    for attempt in 1..=RUNS {
        match passed() {
            Ok(()) if attempt == 1 => return,
            Ok(()) => {
                record(
                    "MICROVM_RETRY_LOG",
                    &format!("{test}: passed on run {attempt} of {RUNS} in L1"),
                );
                return;
            }
            Err(why) if attempt < RUNS => println!(
                "l1: {test} failed in the emulated machine (run {attempt}: {why}); running it again"
            ),
            Err(why) => panic!(
                "{test} failed {RUNS} times in the L1 machine (last: {why}); its output is above"
            ),
        }
    }
}

/// The guest kernel built by `kernel-config/build.sh`: from
/// `MICROVM_GUEST_KERNEL` (set by the test script), or the build cache.
pub fn guest_kernel() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("MICROVM_GUEST_KERNEL") {
        return Ok(PathBuf::from(path));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../kernel-config/build.sh");
    let out = Command::new(&script)
        .arg("--path")
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!(
            "the guest kernel is not built: run {} (scripts/test.sh does)",
            script.display()
        ));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// The python3.11 runtime image (scripts/build-python-runtime.sh builds
/// it, cached; scripts/test.sh exports its path).
pub fn python_runtime_image() -> Result<PathBuf, String> {
    if let Ok(path) = std::env::var("MICROVM_PYTHON_RUNTIME") {
        return Ok(PathBuf::from(path));
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/build-python-runtime.sh");
    let out = Command::new(&script)
        .stderr(Stdio::inherit())
        .output()
        .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
    if !out.status.success() {
        return Err(format!("{} failed", script.display()));
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// An initramfs whose /init is the fixture that prints a marker and
/// reboots. Written to a temporary file named after `tag`.
pub fn marker_initramfs(tag: &str) -> PathBuf {
    let init = std::fs::read(fixture("init")).expect("init fixture");
    let archive = cpio::archive(&[cpio::Entry::File {
        path: "init",
        mode: 0o755,
        data: &init,
    }]);
    let path = std::env::temp_dir().join(format!("microvm-initramfs-{tag}-{}", std::process::id()));
    std::fs::write(&path, archive).expect("write initramfs");
    path
}

/// An initramfs whose /init is `script`, run by Debian's static busybox
/// (`busybox-static`, which scripts/setup-l1.sh installs) with every
/// applet on the PATH and /proc, /sys and /dev mounted. Written to a
/// temporary file named after `tag`.
pub fn busybox_initramfs(tag: &str, script: &str) -> PathBuf {
    let busybox = std::fs::read("/bin/busybox")
        .expect("/bin/busybox: install busybox-static (scripts/setup-l1.sh does)");
    let init = format!(
        "#!/bin/busybox sh\n/bin/busybox --install -s /bin\n\
         mount -t proc proc /proc\nmount -t sysfs sys /sys\nmount -t devtmpfs dev /dev\n{script}"
    );
    let mut entries = vec![];
    for dir in ["bin", "proc", "sys", "dev"] {
        entries.push(cpio::Entry::Dir {
            path: dir,
            mode: 0o755,
        });
    }
    entries.push(cpio::Entry::File {
        path: "bin/busybox",
        mode: 0o755,
        data: &busybox,
    });
    entries.push(cpio::Entry::File {
        path: "init",
        mode: 0o755,
        data: init.as_bytes(),
    });
    let path = std::env::temp_dir().join(format!("busybox-initramfs-{tag}-{}", std::process::id()));
    std::fs::write(&path, cpio::archive(&entries)).expect("write initramfs");
    path
}

/// The line the marker init prints.
pub const INIT_MARKER: &str = "init: hello from the initramfs";
