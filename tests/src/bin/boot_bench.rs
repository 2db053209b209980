//! Boot benchmark: this project's VMM against QEMU's microvm machine on the
//! same fixture guest, in the same run.
//!
//! For each VMM it measures, over `--runs` runs (after warm-up):
//! * spawn -> the guest's first serial byte on the VMM's stdout;
//! * spawn -> process exit (the guest reboots right after printing), and
//!   apart from it the guest's last serial byte -> exit: the reset's
//!   handling and the VMM's teardown. (The fixture prints about 170 bytes
//!   at two VM exits each, which under PVM's emulation is most of
//!   spawn -> exit.)
//! * for an idle 128 MiB guest, the VMM's resident memory without the
//!   guest RAM mapping, and its peak RSS (VmHWM) with it.
//!
//! As root, it also boots this VMM through the jailer, as the worker does,
//! and reports what the jail adds to spawn -> first serial byte.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use host_services::data_plane::vmm_process::VMM_OVERHEAD_MIB;
use microvm_tests::{fixture, hypervisor, is_root, jailer_binary, vmm_binary};

const GUEST_MIB: u64 = 128;
const WARMUP: usize = 3;

struct Peer {
    name: &'static str,
    command: Box<dyn Fn(&Path) -> Command>,
    /// Exit status of a run that ended as the guest asked.
    clean_exit: i32,
    /// Whether the spawned process is the VMM, whose memory can be read.
    measure_rss: bool,
}

fn vmm_args(c: &mut Command) {
    c.args(["--mem-mib", &GUEST_MIB.to_string(), "--log-level", "warn"]);
}

fn ours() -> Peer {
    let bin = vmm_binary();
    Peer {
        name: "vmm (this project)",
        clean_exit: 0,
        measure_rss: true,
        command: Box::new(move |kernel| {
            let mut c = Command::new(&bin);
            c.arg("--kernel").arg(kernel);
            vmm_args(&mut c);
            c
        }),
    }
}

/// Where the jailer builds this run's jails; each is removed when its VMM
/// exits, so the directory is empty once the jailed runs are done.
fn jail_base() -> PathBuf {
    std::env::temp_dir().join(format!("boot-bench-jails-{}", std::process::id()))
}

/// This VMM through the jailer, with the limits the worker gives a
/// function of the guest's size.
fn jailed() -> Peer {
    let (jailer, vmm, base) = (jailer_binary(), vmm_binary(), jail_base());
    Peer {
        name: "jailed vmm",
        clean_exit: 0,
        measure_rss: false,
        command: Box::new(move |kernel| {
            let mut c = Command::new(&jailer);
            c.args(["--id", "boot-bench", "--uid", "100000", "--gid", "100000"])
                .arg("--exec-file")
                .arg(&vmm)
                .arg("--chroot-base")
                .arg(&base)
                .args(["--cgroup-parent", "lambda-microvm-bench", "--cpus", "1"])
                .args(["--memory-mib", &(GUEST_MIB + VMM_OVERHEAD_MIB).to_string()])
                .arg("--mount")
                .arg(format!("{}:/kernel:ro", kernel.display()))
                .args(["--", "--kernel", "/kernel"]);
            vmm_args(&mut c);
            c
        }),
    }
}

fn qemu(binary: PathBuf) -> Peer {
    Peer {
        name: "qemu microvm",
        // isa-debug-exit turns the guest's 0 into (0 << 1) | 1.
        clean_exit: 1,
        measure_rss: true,
        command: Box::new(move |kernel| {
            let mut c = Command::new(&binary);
            c.args([
                "-M",
                "microvm,x-option-roms=off,pit=off,pic=off,rtc=off,isa-serial=on",
                "-accel",
                "kvm",
                "-m",
                &format!("{GUEST_MIB}M"),
                "-nodefaults",
                "-no-user-config",
                "-nographic",
                "-display",
                "none",
                "-monitor",
                "none",
                "-serial",
                "stdio",
                "-no-reboot",
                "-device",
                "isa-debug-exit,iobase=0xf4,iosize=0x04",
                "-kernel",
            ])
            .arg(kernel);
            c
        }),
    }
}

struct BootSample {
    first_byte: Duration,
    exit: Duration,
    /// From the last serial byte to the exit.
    teardown: Duration,
}

fn spawn(peer: &Peer, kernel: &Path) -> (Instant, Child) {
    let mut cmd = (peer.command)(kernel);
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    let start = Instant::now();
    let child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {}: {e}", peer.name));
    (start, child)
}

fn boot_once(peer: &Peer, kernel: &Path) -> Result<BootSample, String> {
    let (start, mut child) = spawn(peer, kernel);
    let mut stdout = child.stdout.take().unwrap();
    let mut first = [0u8; 1];
    stdout
        .read_exact(&mut first)
        .map_err(|e| format!("{}: no serial output: {e}", peer.name))?;
    let first_byte = start.elapsed();
    let mut last_byte = first_byte;
    let mut rest = [0u8; 4096];
    while let Ok(1..) = stdout.read(&mut rest) {
        last_byte = start.elapsed();
    }
    let status = child.wait().map_err(|e| e.to_string())?;
    let exit = start.elapsed();
    if status.code() != Some(peer.clean_exit) {
        return Err(format!("{} exited with {status}", peer.name));
    }
    Ok(BootSample {
        first_byte,
        exit,
        teardown: exit - last_byte,
    })
}

/// RSS of a process in KiB: all of it, the part that is not guest RAM, and
/// the peak (VmHWM).
struct Rss {
    total_kib: u64,
    without_guest_kib: u64,
    peak_kib: u64,
}

fn measure_idle_rss(peer: &Peer, kernel: &Path) -> Result<Rss, String> {
    let (_, mut child) = spawn(peer, kernel);
    let mut stdout = child.stdout.take().unwrap();
    let mut line = [0u8; 14];
    let read = stdout.read_exact(&mut line);
    // Let the VMM settle into its idle loop.
    std::thread::sleep(Duration::from_millis(200));
    let pid = child.id();
    let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps"));
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"));
    let _ = child.kill();
    let _ = child.wait();
    read.map_err(|e| format!("{}: idle guest printed nothing: {e}", peer.name))?;
    let smaps = smaps.map_err(|e| e.to_string())?;
    let status = status.map_err(|e| e.to_string())?;

    // Guest RAM is the run of adjacent anonymous mappings of (about) the
    // guest's size: one mapping, or several where the VMM asked for huge
    // pages over part of it.
    let guest_bytes = GUEST_MIB << 20;
    let mut total = 0u64;
    // (start, end, RSS in KiB) of each run of adjacent anonymous mappings,
    // in address order, and whether the mapping being read is in the last.
    let mut runs: Vec<(u64, u64, u64)> = Vec::new();
    let mut in_run = false;
    for l in smaps.lines() {
        let mut fields = l.split_whitespace();
        let first = fields.next().unwrap_or("");
        if let Some((lo, hi)) = first.split_once('-') {
            if let (Ok(lo), Ok(hi)) = (u64::from_str_radix(lo, 16), u64::from_str_radix(hi, 16)) {
                in_run = l.split_whitespace().nth(5).is_none();
                match runs.last_mut() {
                    Some(run) if in_run && run.1 == lo => run.1 = hi,
                    _ if in_run => runs.push((lo, hi, 0)),
                    _ => {}
                }
                continue;
            }
        }
        if first == "Rss:" {
            let kib: u64 = fields.next().and_then(|v| v.parse().ok()).unwrap_or(0);
            total += kib;
            if let Some(run) = runs.last_mut().filter(|_| in_run) {
                run.2 += kib;
            }
        }
    }
    let guest: u64 = runs
        .iter()
        .filter(|(lo, hi, _)| hi - lo >= guest_bytes && hi - lo <= guest_bytes + (4 << 20))
        .map(|run| run.2)
        .sum();
    let peak_kib = status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
        .unwrap_or(0);
    Ok(Rss {
        total_kib: total,
        without_guest_kib: total - guest,
        peak_kib,
    })
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let idx = ((sorted.len() - 1) as f64 * p).round() as usize;
    sorted[idx]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

struct Summary {
    first_byte: Vec<Duration>,
    exit: Vec<Duration>,
    teardown: Vec<Duration>,
    rss: Option<Rss>,
}

fn bench(
    peer: &Peer,
    runs: usize,
    boot_kernel: &Path,
    idle_kernel: &Path,
) -> Result<Summary, String> {
    for _ in 0..WARMUP {
        boot_once(peer, boot_kernel)?;
    }
    let mut first_byte = Vec::with_capacity(runs);
    let mut exit = Vec::with_capacity(runs);
    let mut teardown = Vec::with_capacity(runs);
    for _ in 0..runs {
        let s = boot_once(peer, boot_kernel)?;
        first_byte.push(s.first_byte);
        exit.push(s.exit);
        teardown.push(s.teardown);
    }
    first_byte.sort();
    exit.sort();
    teardown.sort();
    let rss = if peer.measure_rss {
        Some(measure_idle_rss(peer, idle_kernel)?)
    } else {
        None
    };
    Ok(Summary {
        first_byte,
        exit,
        teardown,
        rss,
    })
}

fn print_summary(name: &str, s: &Summary) {
    println!(
        "{name:<20} spawn->first serial byte: median {:7.2} ms  p90 {:7.2} ms  min {:7.2} ms",
        ms(percentile(&s.first_byte, 0.5)),
        ms(percentile(&s.first_byte, 0.9)),
        ms(s.first_byte[0]),
    );
    println!(
        "{name:<20} spawn->exit:              median {:7.2} ms  p90 {:7.2} ms  min {:7.2} ms",
        ms(percentile(&s.exit, 0.5)),
        ms(percentile(&s.exit, 0.9)),
        ms(s.exit[0]),
    );
    println!(
        "{name:<20} last serial byte->exit:   median {:7.2} ms  p90 {:7.2} ms  min {:7.2} ms",
        ms(percentile(&s.teardown, 0.5)),
        ms(percentile(&s.teardown, 0.9)),
        ms(s.teardown[0]),
    );
    if let Some(rss) = &s.rss {
        println!(
            "{name:<20} idle {GUEST_MIB} MiB guest RSS: {:6} KiB without guest RAM, {:6} KiB total, peak (VmHWM) {:6} KiB",
            rss.without_guest_kib, rss.total_kib, rss.peak_kib
        );
    }
}

fn main() {
    let mut runs = 30usize;
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match a.as_str() {
            "--runs" => {
                runs = args
                    .next()
                    .and_then(|v| v.parse().ok())
                    .filter(|&n| n >= 1)
                    .unwrap_or_else(|| {
                        eprintln!("--runs needs a positive number");
                        std::process::exit(2)
                    })
            }
            other => {
                eprintln!("unknown argument {other:?}; usage: boot_bench [--runs N]");
                std::process::exit(2);
            }
        }
    }

    let boot_kernel = fixture("pvh.elf");
    let idle_kernel = fixture("idle.elf");
    println!(
        "boot benchmark: {runs} runs after {WARMUP} warm-up runs, guest {GUEST_MIB} MiB, 1 vCPU, host: {}",
        hypervisor()
    );
    println!(
        "guest: {} (PVH entry, prints, reboots)",
        boot_kernel.display()
    );

    let ours = bench(&ours(), runs, &boot_kernel, &idle_kernel).unwrap_or_else(|e| {
        eprintln!("benchmark of this VMM failed: {e}");
        std::process::exit(1)
    });
    print_summary("vmm", &ours);
    if is_root() {
        let jailed_runs = bench(&jailed(), runs, &boot_kernel, &idle_kernel);
        let removed = std::fs::remove_dir(jail_base());
        if let Some(e) = removed
            .err()
            .filter(|e| e.kind() != std::io::ErrorKind::NotFound)
        {
            eprintln!(
                "jailed vmm: cannot remove {} (a jail left behind?): {e}",
                jail_base().display()
            );
            std::process::exit(1);
        }
        match jailed_runs {
            Ok(j) => {
                print_summary("jailed vmm", &j);
                let added = |a: &[Duration], b: &[Duration]| {
                    ms(percentile(b, 0.5)) - ms(percentile(a, 0.5))
                };
                println!(
                    "the jailer adds (medians): first serial byte {:+.2} ms, exit {:+.2} ms",
                    added(&ours.first_byte, &j.first_byte),
                    added(&ours.exit, &j.exit),
                );
            }
            Err(e) => println!("jailed vmm: failed: {e}"),
        }
    } else {
        println!("jailed vmm: SKIPPED: the jailer needs root");
    }

    let qemu_bin = PathBuf::from("/usr/bin/qemu-system-x86_64");
    if !qemu_bin.exists() {
        println!(
            "qemu microvm: not installed (run scripts/bench.sh, which installs qemu-system-x86)"
        );
        return;
    }
    match bench(&qemu(qemu_bin), runs, &boot_kernel, &idle_kernel) {
        Ok(q) => {
            print_summary("qemu microvm", &q);
            let ratio =
                |a: &[Duration], b: &[Duration]| ms(percentile(b, 0.5)) / ms(percentile(a, 0.5));
            println!(
                "ratio (qemu / vmm, medians): first serial byte {:.1}x, exit {:.1}x, last serial byte->exit {:.1}x",
                ratio(&ours.first_byte, &q.first_byte),
                ratio(&ours.exit, &q.exit),
                ratio(&ours.teardown, &q.teardown),
            );
            if let (Some(a), Some(b)) = (&ours.rss, &q.rss) {
                println!(
                    "ratio (qemu / vmm): RSS without guest RAM {:.1}x",
                    b.without_guest_kib as f64 / a.without_guest_kib as f64
                );
            }
        }
        Err(e) => println!("qemu microvm: failed: {e}"),
    }
    let median_first = ms(percentile(&ours.first_byte, 0.5));
    let median_exit = ms(percentile(&ours.exit, 0.5));
    let without_guest_mib = ours
        .rss
        .as_ref()
        .map_or(0.0, |r| r.without_guest_kib as f64 / 1024.0);
    let met = |yes: bool| if yes { "met" } else { "NOT met" };
    println!(
        "targets: spawn->first serial byte median {median_first:.2} ms (target <= 3 ms: {}), spawn->exit median {median_exit:.2} ms (target <= 3 ms: {}), RSS without guest RAM {without_guest_mib:.2} MiB (target < 4 MiB: {})",
        met(median_first <= 3.0),
        met(median_exit <= 3.0),
        met(without_guest_mib < 4.0),
    );
}
