//! Snapshot benchmark: the same function (the bare-metal guest with the
//! echo function), started two ways in one run, each from VMM spawn to the
//! response to its first event on the host's Runtime API:
//!
//! - cold: boot, read the environment, load and compile the module, then
//!   answer;
//! - restored: `--restore` a snapshot taken at the function's first
//!   `/next`, reconnect, answer.
//!
//! Also the VMM's own figure for restore -> first instruction (VMM start
//! to the vCPUs resuming, which it logs), and the pause a snapshot costs.
//!
//! usage: snapshot_bench [--runs N]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use guest_init::environ::encode;
use host_services::data_plane::runtime_api::Outcome;
use host_services::data_plane::vmm_process::request_snapshot;
use microvm_tests::guest_ports::{echo_code_disk, test_dir, GuestPorts};
use microvm_tests::load::percentile;
use microvm_tests::{baremetal_guest, hypervisor, vmm_binary};
use tokio::io::AsyncReadExt;

const WARMUP: usize = 3;
/// Firecracker's snapshot documentation: resume latency under 8 ms, 5 ms
/// p90, for 2 vCPUs, 512 MiB, a block and a net device, on m5d.metal.
const FIRECRACKER_RESUME_MS: f64 = 8.0;
const TARGET_FIRST_INSTRUCTION_MS: f64 = 2.0;
const TIMEOUT: Duration = Duration::from_secs(30);

struct Run {
    first_response: Duration,
    /// VMM start -> vCPUs resume, as the VMM logs it (restores only).
    resumed: Option<Duration>,
}

/// Spawns a VMM with `args` plus the guest's devices in `dir`, invokes one
/// event, and kills the VMM.
async fn run_once(dir: &Path, image: &Path, args: &[String], environ: bool) -> Result<Run, String> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let environ = environ.then(|| encode([("AWS_REGION", "local")]).unwrap_or_default());
    let ports = GuestPorts::bind(dir, environ).await;
    let started = Instant::now();
    let mut vmm = tokio::process::Command::new(vmm_binary())
        .args(args)
        .arg("--drive")
        .arg(format!("{},ro", image.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", ports.uds.display()))
        .args(["--serial", "off", "--log-level", "info"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn the VMM: {e}"))?;
    let outcome = ports
        .api
        .invoke("bench", "{\"n\":1}".into(), TIMEOUT)
        .await
        .map_err(|e| format!("invoke: {e:?}"))?;
    let first_response = started.elapsed();
    if outcome != Outcome::Response("{\"echo\":{\"n\":1}}".into()) {
        return Err(format!("unexpected answer {outcome:?}"));
    }
    let _ = vmm.start_kill();
    let mut stderr = String::new();
    if let Some(mut e) = vmm.stderr.take() {
        let _ = e.read_to_string(&mut stderr).await;
    }
    let _ = vmm.wait().await;
    let resumed = stderr
        .split("vCPUs resume ")
        .nth(1)
        .and_then(|rest| rest.split(' ').next())
        .and_then(|us| us.parse().ok())
        .map(Duration::from_micros);
    Ok(Run {
        first_response,
        resumed,
    })
}

/// Boots the function once and snapshots it at its first `/next`.
async fn take_snapshot(dir: &Path, image: &Path) -> Result<(PathBuf, PathBuf, u64), String> {
    std::fs::create_dir_all(dir).map_err(|e| e.to_string())?;
    let environ = encode([("AWS_REGION", "local")]).map_err(|e| e.to_string())?;
    let ports = GuestPorts::bind(dir, Some(environ)).await;
    let control = dir.join("control");
    let mut vmm = tokio::process::Command::new(vmm_binary())
        .arg("--kernel")
        .arg(baremetal_guest())
        .arg("--drive")
        .arg(format!("{},ro", image.display()))
        .arg("--vsock")
        .arg(format!("cid=3,uds={}", ports.uds.display()))
        .arg("--control-sock")
        .arg(&control)
        .args(["--serial", "off", "--cmdline", "quiet"])
        .stderr(std::process::Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| format!("spawn the VMM: {e}"))?;
    tokio::time::timeout(TIMEOUT, ports.api.ready())
        .await
        .map_err(|_| "the guest never asked for an event".to_string())?
        .map_err(|e| format!("{e:?}"))?;
    let (state, memory) = (dir.join("vm.snap"), dir.join("vm.mem"));
    let reply = request_snapshot(&control, &state, &memory).await?;
    let _ = vmm.kill().await;
    Ok((state, memory, reply["paused_us"].as_u64().unwrap_or(0)))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn summary(name: &str, samples: &[Duration]) -> f64 {
    let p50 = ms(percentile(samples, 50.0));
    println!(
        "{name}: median {p50:.2} ms, p90 {:.2} ms, min {:.2} ms",
        ms(percentile(samples, 90.0)),
        ms(percentile(samples, 0.0))
    );
    p50
}

async fn bench(runs: usize) -> Result<(), String> {
    let dir = test_dir("snapshot-bench");
    let image = echo_code_disk(&dir, 0);
    let (state, memory, paused_us) = take_snapshot(&dir.join("original"), &image).await?;
    let memory_bytes = std::fs::metadata(&memory).map_err(|e| e.to_string())?;
    println!(
        "snapshot at the first /next: the vCPUs paused {:.2} ms; state {} bytes, memory file {} MiB ({} KiB written)",
        paused_us as f64 / 1e3,
        std::fs::metadata(&state).map_err(|e| e.to_string())?.len(),
        memory_bytes.len() >> 20,
        std::os::unix::fs::MetadataExt::blocks(&memory_bytes) / 2
    );
    let cold_args = vec![
        "--kernel".to_string(),
        baremetal_guest().display().to_string(),
        "--cmdline".into(),
        "quiet".into(),
    ];
    let restore_args = vec![
        "--restore".to_string(),
        state.display().to_string(),
        "--restore-memory".into(),
        memory.display().to_string(),
    ];
    let (mut cold, mut restored, mut resumed) = (Vec::new(), Vec::new(), Vec::new());
    // Interleaved, so both see the same machine.
    for i in 0..WARMUP + runs {
        let c = run_once(&dir.join("cold"), &image, &cold_args, true).await?;
        let r = run_once(&dir.join("restored"), &image, &restore_args, false).await?;
        if i >= WARMUP {
            cold.push(c.first_response);
            restored.push(r.first_response);
            resumed.push(r.resumed.ok_or("the restored VMM logged no resume time")?);
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    let cold = summary("cold boot,  spawn -> first response      ", &cold);
    let warm = summary("restored,   spawn -> first response      ", &restored);
    let first = summary("restored,   VMM start -> vCPUs resume    ", &resumed);
    println!(
        "restore vs cold boot, first response: {:.1}x faster",
        cold / warm
    );
    println!(
        "for reference, Firecracker's published snapshot resume target: under {FIRECRACKER_RESUME_MS} ms (m5d.metal); ours {first:.2} ms here"
    );
    println!(
        "target: restore -> first instruction median under {TARGET_FIRST_INSTRUCTION_MS} ms: {}",
        if first < TARGET_FIRST_INSTRUCTION_MS {
            "met"
        } else {
            "NOT met"
        }
    );
    Ok(())
}

fn main() {
    let runs = microvm_tests::runs_arg("snapshot_bench");
    println!(
        "snapshot benchmark: {runs} runs of each after {WARMUP} warm-up runs, the bare-metal guest with the echo function, serial off, host: {}",
        hypervisor()
    );
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a tokio runtime");
    if let Err(e) = runtime.block_on(bench(runs)) {
        eprintln!("snapshot_bench: {e}");
        std::process::exit(1);
    }
}
