//! Runtime boot benchmark: the bare-metal guest as a function runtime,
//! from VMM spawn to the VMM's start, to the guest's boot-timer write (the
//! VMM logs it, with the time on CLOCK_MONOTONIC) and to its first
//! `GET /2018-06-01/runtime/invocation/next` on the host's Runtime API
//! socket: the part of a cold start that is the microVM's. It also gives,
//! boot by boot, the time from the boot-timer write to that `/next`: the
//! guest's own part, which the host's process and VM set-up do not move.
//!
//! usage: runtime_boot_bench [--runs N] [--against DIR] [--idle K]
//!
//! Each boot is measured twice, in turn: the VMM spawned then, and a VMM
//! started ahead on standby (`--standby-fd`: exec'd, KVM opened and the
//! VM made, waiting), timed from the launch it is sent. The difference is
//! what a pool of VMMs on standby would take off a cold start.
//!
//! `--idle K` boots with K other microVMs alive, booted and waiting for
//! their first event, as a worker's warm environments wait between
//! invocations.
//!
//! `--against DIR` measures another build beside this one, spawned and on
//! standby, boot by boot in turn, so that both see the same host: DIR
//! holds its `vmm` and `baremetal` (a
//! target/x86_64-unknown-linux-gnu/release directory).
//! This host's medians drift by a millisecond from hour to hour; boots in
//! turn are the only fair comparison of two builds. Two medians of 40 runs
//! of the same binary differ by up to 0.3 ms here; a 300-run comparison of
//! two builds agrees with itself to a few hundredths in quiet hours, and
//! moves by up to 0.15 ms between runs in noisy ones, so the difference of
//! the two medians comes with its 95 % interval, from resampling the pairs
//! of boots. And copy both builds' binaries: one just written by the
//! linker started 0.1 ms slower than a copy of itself.

use std::io::{Read, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixListener;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use guest_init::environ::{encode, ENVIRON_PORT};
use host_services::artifacts::wasm_image;
use microvm_tests::load::percentile;
use microvm_tests::{baremetal_guest, boot_time_logged, hypervisor, vmm_binary, ECHO_WAT};
use vmm::devices::boot_timer::monotonic_us;
use vmm::jail::{inheritable, seqpacket_pair, Launch};
use vmm::standby::await_ready;

const WARMUP: usize = 3;
/// pvm.md: Firecracker 1.16, spawn -> first guest output, on these
/// machines.
const FIRECRACKER_FIRST_OUTPUT_MS: f64 = 8.2;
const TARGET_MS: f64 = 3.0;

struct Sample {
    vmm_start: Duration,
    boot_timer: Duration,
    first_next: Duration,
}

/// Accepts one connection on `listener` in a thread of its own and hands
/// it to `serve`.
fn serve_once(
    listener: UnixListener,
    serve: impl FnOnce(std::os::unix::net::UnixStream) + Send + 'static,
) {
    std::thread::spawn(move || {
        if let Ok((stream, _)) = listener.accept() {
            serve(stream);
        }
    });
}

/// The binaries one build boots with.
struct Build {
    name: String,
    /// Started ahead, and timed from its launch rather than its spawn.
    standby: bool,
    vmm: PathBuf,
    guest: PathBuf,
    vmm_start: Vec<Duration>,
    boot_timer: Vec<Duration>,
    first_next: Vec<Duration>,
    /// The guest's own part, per boot: free of the host's process and VM
    /// set-up, which move the other figures most.
    in_guest: Vec<Duration>,
}

impl Build {
    fn new(name: String, vmm: PathBuf, guest: PathBuf) -> Build {
        Build {
            name,
            standby: false,
            vmm,
            guest,
            vmm_start: Vec::new(),
            boot_timer: Vec::new(),
            first_next: Vec::new(),
            in_guest: Vec::new(),
        }
    }

    fn record(&mut self, s: Sample) {
        self.vmm_start.push(s.vmm_start);
        self.boot_timer.push(s.boot_timer);
        self.first_next.push(s.first_next);
        self.in_guest
            .push(s.first_next.saturating_sub(s.boot_timer));
    }

    /// Prints the figures.
    fn report(&self) {
        println!("{}:", self.name);
        let from = if self.standby { "launch" } else { "spawn " };
        for (what, samples) in [
            (format!("{from} -> VMM start:       "), &self.vmm_start),
            (format!("{from} -> boot-timer write:"), &self.boot_timer),
            (format!("{from} -> first /next:     "), &self.first_next),
            ("boot-timer write -> /next:  ".to_string(), &self.in_guest),
        ] {
            println!(
                "  {what} median {:.2} ms, p90 {:.2} ms, min {:.2} ms",
                percentile_ms(samples, 50.0),
                percentile_ms(samples, 90.0),
                percentile_ms(samples, 0.0)
            );
        }
    }
}

/// A booted microVM waiting for its first event, which never comes: what
/// a warm environment is between invocations.
struct IdleVm {
    vmm: std::process::Child,
    _api: std::os::unix::net::UnixStream,
}

impl Drop for IdleVm {
    fn drop(&mut self) {
        let _ = self.vmm.kill();
        let _ = self.vmm.wait();
    }
}

/// A microVM of `build` spawned in `dir`, once its guest asked for its
/// first event: the VMM, its Runtime API connection (open), and when it
/// was spawned (the clock then, and on CLOCK_MONOTONIC) and asked.
struct Booted {
    vmm: std::process::Child,
    api: std::os::unix::net::UnixStream,
    spawned_at: u64,
    first_next: Duration,
}

fn boot_once(dir: &Path, image: &Path, build: &Build) -> Result<Sample, String> {
    let Booted {
        mut vmm,
        api,
        spawned_at,
        first_next,
    } = boot(dir, image, build)?;
    drop(api);
    let _ = vmm.kill();
    let mut stderr = String::new();
    if let Some(mut e) = vmm.stderr.take() {
        let _ = e.read_to_string(&mut stderr);
    }
    let _ = vmm.wait();
    let (since_start, at) = boot_time_logged(&stderr)
        .ok_or_else(|| format!("the VMM logged no boot time:\n{stderr}"))?;
    let precedes = || format!("the boot timer's clock reading {at} precedes the spawn");
    let to_timer = at.checked_sub(spawned_at).ok_or_else(precedes)?;
    let to_start = to_timer.checked_sub(since_start).ok_or_else(precedes)?;
    Ok(Sample {
        vmm_start: Duration::from_micros(to_start),
        boot_timer: Duration::from_micros(to_timer),
        first_next,
    })
}

fn boot(dir: &Path, image: &Path, build: &Build) -> Result<Booted, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let uds = dir.join("vsock");
    let bind = |port: u32| {
        UnixListener::bind(format!("{}_{port}", uds.display())).map_err(|e| e.to_string())
    };
    let api = bind(9001)?;
    serve_once(bind(9002)?, |mut log| {
        let _ = std::io::copy(&mut log, &mut std::io::sink());
    });
    let environ = encode([]).map_err(|e| e.to_string())?;
    serve_once(bind(ENVIRON_PORT)?, move |mut s| {
        let _ = s.write_all(&environ);
    });

    let guest_args: Vec<String> = vec![
        "--kernel".into(),
        build.guest.display().to_string(),
        "--drive".into(),
        format!("{},ro", image.display()),
        "--vsock".into(),
        format!("cid=3,uds={}", uds.display()),
        "--cmdline".into(),
        "quiet".into(),
        "--log-level".into(),
        "info".into(),
        "--serial".into(),
        "off".into(),
    ];
    let mut command = Command::new(&build.vmm);
    command
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let spawn_error = |e| format!("spawn the VMM: {e}");
    let (vmm, started, spawned_at) = if build.standby {
        let (launch, theirs) = seqpacket_pair().map_err(spawn_error)?;
        inheritable(&theirs).map_err(spawn_error)?;
        let vmm = command
            .arg("--standby-fd")
            .arg(theirs.as_raw_fd().to_string())
            .spawn()
            .map_err(spawn_error)?;
        drop(theirs);
        // Its VM made, it says so.
        await_ready(&launch, Duration::from_secs(5))
            .map_err(|e| format!("the VMM on standby: {e}"))?;
        let (started, spawned_at) = (Instant::now(), monotonic_us());
        Launch {
            vmm_args: guest_args,
            ..Launch::default()
        }
        .send(&launch, &[])
        .map_err(|e| format!("launch the VMM on standby: {e}"))?;
        (vmm, started, spawned_at)
    } else {
        let (started, spawned_at) = (Instant::now(), monotonic_us());
        let vmm = command.args(guest_args).spawn().map_err(spawn_error)?;
        (vmm, started, spawned_at)
    };
    let (mut stream, _) = api.accept().map_err(|e| e.to_string())?;
    let mut request = Vec::new();
    let mut buf = [0u8; 1024];
    let first_next = loop {
        let n = stream.read(&mut buf).map_err(|e| e.to_string())?;
        if n == 0 {
            return Err("the guest closed the Runtime API before /next".into());
        }
        request.extend_from_slice(&buf[..n]);
        if request.windows(16).any(|w| w == b"invocation/next ") {
            break started.elapsed();
        }
    };
    Ok(Booted {
        vmm,
        api: stream,
        spawned_at,
        first_next,
    })
}

/// Prints how `a`'s medians differ from `b`'s, to the first `/next` and
/// in the guest, each with its 95 % interval.
fn compare(what: &str, a: &Build, b: &Build) {
    let median = |samples: &[Duration]| percentile_ms(samples, 50.0);
    let (next_low, next_high) = median_difference_interval(&a.first_next, &b.first_next);
    let (guest_low, guest_high) = median_difference_interval(&a.in_guest, &b.in_guest);
    println!(
        "{what}, first /next: {:+.2} ms ({:.2}x; 95 % interval {next_low:+.2} to {next_high:+.2}); boot-timer write -> /next: {:+.2} ms ({guest_low:+.2} to {guest_high:+.2})",
        median(&a.first_next) - median(&b.first_next),
        median(&a.first_next) / median(&b.first_next),
        median(&a.in_guest) - median(&b.in_guest),
    );
}

/// The `p`th percentile of `samples`, in ms.
fn percentile_ms(samples: &[Duration], p: f64) -> f64 {
    percentile(samples, p).as_secs_f64() * 1e3
}

/// The 95 % interval of `median(a) - median(b)`, in ms, from resampling
/// the boots in pairs (the two builds' i-th boots ran back to back): how
/// far a difference of two medians holds on a host this noisy.
fn median_difference_interval(a: &[Duration], b: &[Duration]) -> (f64, f64) {
    const RESAMPLES: usize = 2000;
    let n = a.len().min(b.len());
    if n == 0 {
        return (0.0, 0.0);
    }
    // xorshift64 with a fixed seed: the same boots give the same interval.
    let mut state: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut pick = || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        (state % n as u64) as usize
    };
    let mut differences: Vec<f64> = (0..RESAMPLES)
        .map(|_| {
            let (resampled_a, resampled_b): (Vec<Duration>, Vec<Duration>) =
                (0..n).map(|_| pick()).map(|i| (a[i], b[i])).unzip();
            percentile_ms(&resampled_a, 50.0) - percentile_ms(&resampled_b, 50.0)
        })
        .collect();
    differences.sort_by(f64::total_cmp);
    (
        differences[RESAMPLES * 25 / 1000],
        differences[RESAMPLES * 975 / 1000],
    )
}

fn main() {
    let (runs, options) = microvm_tests::bench_args("runtime_boot_bench", &["against", "idle"]);
    let idle: usize = match options[1].as_deref().map(str::parse) {
        None => 0,
        Some(Ok(n)) => n,
        Some(Err(_)) => {
            eprintln!("runtime_boot_bench: --idle: not a number of microVMs");
            std::process::exit(2);
        }
    };
    // Each build is measured spawned and on standby.
    let both_ways = |name: &str, vmm: PathBuf, guest: PathBuf| {
        [
            Build::new(name.into(), vmm.clone(), guest.clone()),
            Build {
                standby: true,
                ..Build::new(format!("{name}, started ahead on standby"), vmm, guest)
            },
        ]
    };
    let mut builds = Vec::from(both_ways("this build", vmm_binary(), baremetal_guest()));
    if let Some(other) = &options[0] {
        let other = PathBuf::from(other);
        let (vmm, guest) = (other.join("vmm"), other.join("baremetal"));
        for binary in [&vmm, &guest] {
            if !binary.is_file() {
                eprintln!("runtime_boot_bench: --against: no {}", binary.display());
                std::process::exit(2);
            }
        }
        builds.extend(both_ways(
            &format!("against {}", other.display()),
            vmm,
            guest,
        ));
    }
    let dir = std::env::temp_dir().join(format!("runtime-boot-bench-{}", std::process::id()));
    let image = std::env::temp_dir().join(format!("runtime-boot-bench-{}.img", std::process::id()));
    let module = wat::parse_str(ECHO_WAT).expect("the echo function assembles");
    std::fs::write(&image, wasm_image::build(&module, 0).expect("a code disk"))
        .expect("write the code disk");
    println!(
        "runtime boot benchmark: {runs} runs after {WARMUP} warm-up runs{}, the bare-metal guest (quiet) with the echo function, serial off, host: {}",
        if builds.len() > 1 { " of each build, in turn" } else { "" },
        hypervisor()
    );
    // Warm environments stay alive between invocations: boots with K of
    // them on the host show what they cost the next cold start.
    let idle_vms: Vec<IdleVm> = (0..idle)
        .map(|k| {
            let booted = boot(&dir.with_extension(format!("idle-{k}")), &image, &builds[0])
                .unwrap_or_else(|e| {
                    eprintln!("idle microVM {k}: {e}");
                    std::process::exit(1);
                });
            IdleVm {
                vmm: booted.vmm,
                _api: booted.api,
            }
        })
        .collect();
    if idle > 0 {
        println!("{idle} idle microVMs alive (booted, waiting for their first event)");
    }
    for i in 0..WARMUP + runs {
        // Neither build always boots first.
        let order: Vec<usize> = match i % 2 {
            0 => (0..builds.len()).collect(),
            _ => (0..builds.len()).rev().collect(),
        };
        for b in order {
            let build = &mut builds[b];
            match boot_once(&dir, &image, build) {
                Ok(s) if i >= WARMUP => build.record(s),
                Ok(_) => {}
                Err(e) => {
                    eprintln!("run {i} of {} failed: {e}", build.name);
                    std::process::exit(1);
                }
            }
        }
    }
    drop(idle_vms);
    let _ = std::fs::remove_dir_all(&dir);
    for k in 0..idle {
        let _ = std::fs::remove_dir_all(dir.with_extension(format!("idle-{k}")));
    }
    let _ = std::fs::remove_file(&image);
    builds.iter().for_each(Build::report);
    let next = percentile_ms(&builds[0].first_next, 50.0);
    compare("on standby against spawned", &builds[1], &builds[0]);
    if let [this, this_standby, other, other_standby] = &builds[..] {
        compare("this build against the other", this, other);
        compare(
            "this build against the other, on standby",
            this_standby,
            other_standby,
        );
    }
    println!(
        "for reference, Firecracker's tiny guest, spawn -> first output (pvm.md): {FIRECRACKER_FIRST_OUTPUT_MS} ms median; ratio {:.1}x",
        FIRECRACKER_FIRST_OUTPUT_MS / next
    );
    println!(
        "target: spawn -> first /next median under {TARGET_MS} ms: {}",
        if next < TARGET_MS { "met" } else { "NOT met" }
    );
}
