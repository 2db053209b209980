//! The L1 test machine: hardware KVM on a host that has only PVM.
//!
//! QEMU's TCG emulator implements AMD SVM with nested paging, so a Linux
//! VM under it (`-cpu max`) loads the upstream `kvm_amd` module and offers
//! a `/dev/kvm` that takes the hardware-KVM paths. This module boots such
//! a VM (Debian's cloud kernel, prepared by `scripts/setup-l1.sh`), shares
//! the host's root file system with it read-only over virtiofs, and runs
//! one shell command there as root with a fresh tmpfs on `/tmp`: the test
//! binaries, the VMM, the guest kernel and Python are all where the host
//! has them, and nothing is copied. Its console streams back line by line;
//! the command's exit status comes back as the last line of the init.
//!
//! Why virtiofs and not a hand-made initramfs with the files under test,
//! or 9p: Debian's cloud kernel has no 9p, and an initramfs of a debug
//! test binary (~100 MB) plus its libraries would be unpacked at TCG's
//! speed on every boot. QEMU 7.2 ships a virtiofsd, and the cloud kernel
//! has the virtiofs module. `virtme-ng` (PyPI) does the same with more
//! machinery (its own init, a kernel of its choosing) than a test needs.
//!
//! Everything in L1 runs emulated: its timings are never figures.
//!
//! The L1 machine itself sometimes fails: about one boot in a dozen never
//! reaches its init, and, rarely, its kernel reports a CPU stuck in KVM
//! for minutes (a soft lockup) or the whole machine stops. Whether QEMU's
//! SVM emulation or L1's 6.1 kernel is at fault is not known; neither a
//! user process nor its guest can do that to a correct host kernel, so
//! such a run says nothing about the code under test. The harness tells
//! it from a test failure (no init, a missing heartbeat, L1's own lockup
//! report), says so, and boots the machine once more. A test that fails is
//! never retried.

use std::io::{BufRead, BufReader};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use host_services::artifacts::cpio;

const QEMU: &str = "/usr/bin/qemu-system-x86_64";
const VIRTIOFSD: &str = "/usr/lib/qemu/virtiofsd";
const BUSYBOX: &str = "/bin/busybox";

/// The line the init prints once the shared root is mounted.
const READY: &str = "l1: root mounted";
/// The line the init ends with: the command's exit status follows.
const EXIT_STATUS: &str = "l1: exit status ";
/// What L1's kernel says when one of its CPUs or RCU stops making progress.
const LOCKUP_REPORTS: [&str; 3] = [
    "soft lockup - CPU",
    "rcu_sched detected stalls",
    "rcu_preempt detected stalls",
];
/// The init writes a heartbeat to its second serial port this often; a
/// machine silent on it for [`FROZEN_AFTER`] has stopped.
const HEARTBEAT_SECONDS: u32 = 5;
const FROZEN_AFTER: Duration = Duration::from_secs(90);

/// The L1 VM's first steps, as root of its initramfs (busybox `sh`).
/// `/cmd` is the command as a script; it runs chrooted into the shared
/// root with L1's own /proc, /sys, /dev and a tmpfs /tmp.
const INIT: &str = r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
for m in $(cat /modules/order); do
    insmod /modules/$m.ko || echo "l1: cannot load module $m"
done
[ -c /dev/kvm ] || echo "l1: no /dev/kvm: kvm_amd did not load"
# The worker's tests talk to it on 127.0.0.1.
ip link set lo up
if ! mount -t virtiofs -o ro root /host; then
    echo "l1: cannot mount the host's root over virtiofs"
    poweroff -f
fi
# The fresh /tmp would hide what the command needs from the host's /tmp
# (a clone of the project there): /keep names those directories.
mkdir /hosttmp
mount --bind /host/tmp /hosttmp
mount -t tmpfs -o mode=1777 tmp /host/tmp
while read -r d; do
    mkdir -p "/host/tmp/$d"
    mount --bind "/hosttmp/$d" "/host/tmp/$d"
done < /keep
mount -t proc proc /host/proc
mount -t sysfs sys /host/sys
# The jailer's cgroups (v2: memory, cpu, pids).
mount -t cgroup2 cgroup2 /host/sys/fs/cgroup
mount -t devtmpfs dev /host/dev
mkdir -p /host/dev/shm /host/dev/pts
mount -t tmpfs shm /host/dev/shm
mount -t devpts pts /host/dev/pts
mount -t tmpfs run /host/run
cp /cmd /host/tmp/l1-command
(while :; do echo beat > /dev/ttyS1; sleep HEARTBEAT; done) &
echo "l1: root mounted"
chroot /host /bin/sh /tmp/l1-command
status=$?
# A process killed by its seccomp filter leaves an audit record naming
# the system call; without auditd the kernel log has it.
dmesg | grep 'type=1326' | sed 's/^/l1: seccomp: /'
echo "l1: exit status $status"
poweroff -f
"#;

/// What a command in L1 printed (the whole console: the init's lines and
/// the command's stdout and stderr) and its exit status.
#[derive(Debug)]
pub struct L1Run {
    pub code: i32,
    pub output: String,
}

/// A prepared L1 machine: the cloud kernel and the modules its init loads.
pub struct L1Machine {
    dir: PathBuf,
}

/// A process that is killed when dropped.
struct Killed(Child);

impl Drop for Killed {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl L1Machine {
    /// The machine `scripts/setup-l1.sh` prepared (`MICROVM_L1` names its
    /// directory, as the test script sets it), or why there is none.
    pub fn find() -> Result<Self, String> {
        let dir = match std::env::var_os("MICROVM_L1") {
            Some(dir) => PathBuf::from(dir),
            None => {
                let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../scripts/setup-l1.sh");
                let out = Command::new(&script)
                    .arg("--path")
                    .output()
                    .map_err(|e| format!("cannot run {}: {e}", script.display()))?;
                if !out.status.success() {
                    return Err(format!(
                        "the L1 test machine is not prepared: run {} (scripts/test.sh does)",
                        script.display()
                    ));
                }
                PathBuf::from(String::from_utf8_lossy(&out.stdout).trim())
            }
        };
        for needed in [dir.join("vmlinuz"), dir.join("modules/order")] {
            if !needed.exists() {
                return Err(format!(
                    "{} is missing: run scripts/setup-l1.sh",
                    needed.display()
                ));
            }
        }
        for tool in [QEMU, VIRTIOFSD, BUSYBOX] {
            if !Path::new(tool).exists() {
                return Err(format!("{tool} is missing: run scripts/setup-l1.sh"));
            }
        }
        // virtiofsd serves the whole root: it needs to be root to chroot
        // into it and to read every file as its owner.
        // SAFETY: geteuid cannot fail.
        if unsafe { libc::geteuid() } != 0 {
            return Err("the L1 machine's virtiofsd needs root".into());
        }
        Ok(Self { dir })
    }

    /// Runs `script` (a POSIX shell script) in L1, in the host's current
    /// directory with `env` set, and waits at most `timeout` for it. One
    /// boot in about a dozen hangs before L1's init runs (TCG); such a
    /// boot is retried once. Only one L1 machine runs at a time on this
    /// host, across test processes: each wants both CPUs.
    pub fn run(
        &self,
        script: &str,
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<L1Run, String> {
        let _lock = HostLock::take(&std::env::temp_dir().join("lambda-microvm-l1.lock"))?;
        match self.boot(script, env, timeout)? {
            Boot::Ran(run) => Ok(run),
            Boot::MachineFailed { why, output } => {
                println!("l1: {why}: the L1 machine failed, which says nothing of the test; booting it again");
                match self.boot(script, env, timeout)? {
                    Boot::Ran(run) => Ok(run),
                    Boot::MachineFailed { why: again, output: second } => Err(format!(
                        "the L1 machine failed twice ({why}; {again}); first boot:\n{output}\nsecond:\n{second}"
                    )),
                }
            }
        }
    }

    fn boot(
        &self,
        script: &str,
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Boot, String> {
        static RUNS: AtomicUsize = AtomicUsize::new(0);
        let work = std::env::temp_dir().join(format!(
            "l1-{}-{}",
            std::process::id(),
            RUNS.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&work);
        std::fs::create_dir_all(&work).map_err(|e| format!("{}: {e}", work.display()))?;
        let result = self.boot_in(&work, script, env, timeout);
        let _ = std::fs::remove_dir_all(&work);
        result
    }

    fn boot_in(
        &self,
        work: &Path,
        script: &str,
        env: &[(&str, String)],
        timeout: Duration,
    ) -> Result<Boot, String> {
        // The cache directory is named by the kernel's release.
        let l1_release = self
            .dir
            .file_name()
            .map_or(String::new(), |n| n.to_string_lossy().into_owned());
        let initrd = work.join("initrd.cpio");
        let keep = kept_tmp_dirs(command_paths(env)?);
        std::fs::write(&initrd, self.initramfs(&command_file(script, env)?, &keep)?)
            .map_err(|e| format!("{}: {e}", initrd.display()))?;
        let heartbeat = work.join("heartbeat");
        let socket = work.join("virtiofs.sock");
        let _virtiofsd = Killed(
            Command::new(VIRTIOFSD)
                .arg(format!("--socket-path={}", socket.display()))
                .args([
                    "-o",
                    "source=/",
                    "-o",
                    "cache=always",
                    "-o",
                    "sandbox=chroot",
                ])
                .args(["-o", "log_level=err"])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .spawn()
                .map_err(|e| format!("cannot start {VIRTIOFSD}: {e}"))?,
        );
        let start = Instant::now();
        while !socket.exists() {
            if start.elapsed() > Duration::from_secs(10) {
                return Err(format!("{VIRTIOFSD} made no socket in 10 s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        // No XSAVE in L1: QEMU 7.2's nested SVM does not give L1 the
        // XSETBV of an L2 guest, so L2's extended state went out of step
        // with KVM's (an L2 Linux warns "XSAVE consistency problem", then
        // faults at random, or L1 crashes). Without XSAVE, L2 uses FXSAVE
        // and half the emulator's failures here are gone (docs/test-machine.md).
        let mut qemu = Killed(
            Command::new(QEMU)
                .args([
                    "-accel",
                    "tcg",
                    "-cpu",
                    "max,-xsave",
                    "-M",
                    "q35",
                    "-smp",
                    "2",
                ])
                .args(["-m", "2G", "-object"])
                .arg("memory-backend-memfd,id=mem,size=2G,share=on")
                .args(["-numa", "node,memdev=mem"])
                .args(["-nodefaults", "-no-user-config", "-display", "none"])
                .args(["-serial", "stdio", "-monitor", "none", "-no-reboot"])
                .arg("-serial")
                .arg(format!("file:{}", heartbeat.display()))
                .arg("-kernel")
                .arg(self.dir.join("vmlinuz"))
                .arg("-initrd")
                .arg(&initrd)
                .args(["-append", "console=ttyS0 quiet panic=-1"])
                .arg("-chardev")
                .arg(format!("socket,id=root,path={}", socket.display()))
                .args(["-device", "vhost-user-fs-pci,chardev=root,tag=root"])
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .spawn()
                .map_err(|e| format!("cannot start {QEMU}: {e}"))?,
        );
        let console = qemu.0.stdout.take().expect("piped stdout");
        let stderr = qemu.0.stderr.take().expect("piped stderr");
        let (lines_tx, lines) = std::sync::mpsc::channel::<String>();
        std::thread::spawn(move || {
            for line in BufReader::new(console).split(b'\n').map_while(Result::ok) {
                let line = String::from_utf8_lossy(&line).trim_end().to_string();
                if lines_tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = std::thread::spawn(move || {
            let mut s = String::new();
            let _ = std::io::Read::read_to_string(&mut { stderr }, &mut s);
            s
        });
        let mut output = String::new();
        let mut ready = false;
        let mut code = None;
        let mut beats = Heartbeat::new(heartbeat);
        loop {
            let tick = Duration::from_secs(u64::from(HEARTBEAT_SECONDS));
            match lines.recv_timeout(tick) {
                Ok(line) => {
                    // Streamed as it comes, so a slow run shows where it is.
                    println!("l1| {line}");
                    ready |= line.contains(READY);
                    if let Some(status) = line.split(EXIT_STATUS).nth(1) {
                        code = status.trim().parse().ok();
                    }
                    output.push_str(&line);
                    output.push('\n');
                    // Only the kernel's own lines, which start with its
                    // timestamp: "[   12.345678] ...".
                    let kernel = line.starts_with('[');
                    if let Some(report) =
                        LOCKUP_REPORTS.iter().find(|r| kernel && line.contains(*r))
                    {
                        let why = format!("L1's kernel reported a stall ({report:?})");
                        return Ok(Boot::MachineFailed { why, output });
                    }
                    // An oops names the kernel it happened in; L2's are
                    // another release and only reach this console through
                    // a test's own output.
                    if kernel
                        && !l1_release.is_empty()
                        && line.contains("ainted")
                        && line.contains(&l1_release)
                    {
                        let why =
                            "L1's own kernel crashed (seen here only as the emulator's fault; \
                                   a KVM bug would crash it twice)"
                                .to_string();
                        return Ok(Boot::MachineFailed { why, output });
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => break,
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            }
            if !ready && start.elapsed() > NOT_READY_AFTER {
                let why = format!("no init after {NOT_READY_AFTER:?}");
                return Ok(Boot::MachineFailed { why, output });
            }
            if ready && beats.silent_for() > FROZEN_AFTER {
                let why = format!("no heartbeat for {FROZEN_AFTER:?}");
                return Ok(Boot::MachineFailed { why, output });
            }
            if start.elapsed() > timeout {
                return Err(format!(
                    "the L1 command was still running after {timeout:?}; its output:\n{output}"
                ));
            }
        }
        let status = qemu.0.wait().map_err(|e| format!("wait for QEMU: {e}"))?;
        match code {
            Some(code) => Ok(Boot::Ran(L1Run { code, output })),
            None if !ready => Ok(Boot::MachineFailed {
                why: format!("it ended ({status}) before its init ran"),
                output,
            }),
            // The init always prints the status before it powers off, and
            // L1's kernel says why when it panics; a machine that just
            // stops has reset under TCG (-no-reboot), an emulated triple
            // fault that nothing in L2 can cause on a correct host.
            None if !output.contains("Kernel panic") => Ok(Boot::MachineFailed {
                why: format!("it reset without a word ({status}) while the command ran"),
                output,
            }),
            None => Err(format!(
                "the L1 machine's kernel panicked ({status}); QEMU said:\n{}\noutput:\n{output}",
                stderr.join().unwrap_or_default()
            )),
        }
    }

    /// busybox, the modules, the init, the command and the directories of
    /// the host's /tmp to keep, as a newc archive.
    fn initramfs(&self, command: &str, keep: &[String]) -> Result<Vec<u8>, String> {
        let read = |p: &Path| std::fs::read(p).map_err(|e| format!("{}: {e}", p.display()));
        let busybox = read(Path::new(BUSYBOX))?;
        let init = INIT.replace("HEARTBEAT", &HEARTBEAT_SECONDS.to_string());
        let order = String::from_utf8_lossy(&read(&self.dir.join("modules/order"))?).to_string();
        let modules = order
            .lines()
            .map(|m| {
                Ok((
                    format!("modules/{m}.ko"),
                    read(&self.dir.join(format!("modules/{m}.ko")))?,
                ))
            })
            .collect::<Result<Vec<_>, String>>()?;
        let mut entries = vec![
            cpio::Entry::Dir {
                path: "bin",
                mode: 0o755,
            },
            cpio::Entry::Dir {
                path: "modules",
                mode: 0o755,
            },
        ];
        for dir in ["proc", "sys", "dev", "host"] {
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
        let keep: String = keep.iter().map(|d| format!("{d}\n")).collect();
        entries.push(cpio::Entry::File {
            path: "keep",
            mode: 0o644,
            data: keep.as_bytes(),
        });
        entries.push(cpio::Entry::File {
            path: "modules/order",
            mode: 0o644,
            data: order.as_bytes(),
        });
        for (path, data) in &modules {
            entries.push(cpio::Entry::File {
                path,
                mode: 0o644,
                data,
            });
        }
        entries.push(cpio::Entry::File {
            path: "init",
            mode: 0o755,
            data: init.as_bytes(),
        });
        entries.push(cpio::Entry::File {
            path: "cmd",
            mode: 0o755,
            data: command.as_bytes(),
        });
        Ok(cpio::archive(&entries))
    }
}

/// How a boot ended: the command ran, or the emulated machine failed
/// (why, and what it printed).
enum Boot {
    Ran(L1Run),
    MachineFailed { why: String, output: String },
}

/// A healthy machine mounts the shared root within this (about 6 s).
const NOT_READY_AFTER: Duration = Duration::from_secs(120);

/// The heartbeat file the machine's second serial port writes.
struct Heartbeat {
    path: PathBuf,
    size: u64,
    since: Instant,
}

impl Heartbeat {
    fn new(path: PathBuf) -> Self {
        Self {
            path,
            size: 0,
            since: Instant::now(),
        }
    }

    /// How long the file has not grown.
    fn silent_for(&mut self) -> Duration {
        let size = std::fs::metadata(&self.path).map_or(0, |m| m.len());
        if size != self.size {
            self.size = size;
            self.since = Instant::now();
        }
        self.since.elapsed()
    }
}

/// `script` run from the host's current directory with `env` exported.
fn command_file(script: &str, env: &[(&str, String)]) -> Result<String, String> {
    let cwd = std::env::current_dir().map_err(|e| format!("current directory: {e}"))?;
    let mut out = String::from("set -e\n");
    for (name, value) in env {
        out.push_str(&format!("export {name}={}\n", shell_quote(value)));
    }
    out.push_str(&format!(
        "cd {}\nset +e\n{script}\n",
        shell_quote(&cwd.to_string_lossy())
    ));
    Ok(out)
}

/// The host paths a command run by this process needs: its directory, the
/// running test binary, and the paths among its variables.
fn command_paths(env: &[(&str, String)]) -> Result<Vec<PathBuf>, String> {
    let mut paths = vec![
        std::env::current_dir().map_err(|e| format!("current directory: {e}"))?,
        std::env::current_exe().map_err(|e| format!("current executable: {e}"))?,
    ];
    paths.extend(env.iter().map(|(_, v)| PathBuf::from(v)));
    Ok(paths)
}

/// The top-level directories of the host's /tmp that `paths` lie in,
/// relative to /tmp.
fn kept_tmp_dirs(paths: Vec<PathBuf>) -> Vec<String> {
    let mut dirs: Vec<String> = paths
        .iter()
        .filter_map(|p| p.strip_prefix("/tmp").ok()?.components().next())
        .map(|c| c.as_os_str().to_string_lossy().into_owned())
        .collect();
    dirs.sort();
    dirs.dedup();
    dirs
}

/// `value` as one shell word.
fn shell_quote(value: &str) -> String {
    format!("'{}'", value.replace('\'', r"'\''"))
}

/// An exclusive `flock` on a file, held until dropped (closed).
struct HostLock {
    _file: std::fs::File,
}

impl HostLock {
    fn take(path: &Path) -> Result<Self, String> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(path)
            .map_err(|e| format!("{}: {e}", path.display()))?;
        // SAFETY: flock on a descriptor this function owns.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } != 0 {
            return Err(format!(
                "flock {}: {}",
                path.display(),
                std::io::Error::last_os_error()
            ));
        }
        Ok(Self { _file: file })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn directories_under_the_hosts_tmp_are_kept_once_each() {
        let paths = [
            "/tmp/ci",
            "/tmp/ci/target/debug/linux-1",
            "/root/x",
            "/tmp",
            "/tmpx/y",
            "/tmp/b/c",
        ];
        assert_eq!(
            kept_tmp_dirs(paths.iter().map(PathBuf::from).collect()),
            ["b", "ci"]
        );
    }

    #[test]
    fn a_value_is_one_shell_word() {
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
    }
}
