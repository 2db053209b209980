//! Invoke benchmark: a real `lambda-worker` on loopback, the echo Wasm
//! function in real microVMs. Reports sequential cold starts (of new
//! functions; and of one version, restored from its snapshot or booted),
//! sequential warm invokes, and a load run at a fixed concurrency. Run as
//! root it also compares jailed and unjailed cold starts, sets the jailed
//! Init Duration beside the VMM's own boot (`runtime_boot_bench`, run
//! here as the floor), and times a burst of cold starts at once on a
//! worker whose pool holds a VMM on standby for each.
//!
//! usage: invoke_bench [--cold N] [--warm N] [--total N] [--concurrency N]

use std::sync::Arc;
use std::time::Duration;

use microvm_tests::lambda_client::LambdaClient;
use microvm_tests::load::{self, percentile};
use microvm_tests::worker::{data_dir, RunningWorker, ACCOUNT_A};
use microvm_tests::ECHO_WAT;
use microvm_tests::{count_args, is_root, runtime_boot_bench_binary};

struct Args {
    cold: usize,
    warm: usize,
    total: usize,
    concurrency: usize,
}

fn parse_args() -> Args {
    let counts = count_args(
        "invoke_bench",
        &[
            ("cold", 20),
            ("warm", 200),
            ("total", 10_000),
            ("concurrency", 32),
        ],
    );
    Args {
        cold: counts[0],
        warm: counts[1],
        total: counts[2],
        concurrency: counts[3],
    }
}

/// The workers' log filter: warnings, and each cold start's trace.
const LOG_FILTER: &str = "warn,cold_start=info";

/// Where cold starts' time goes, from the traces in a worker's `log`:
/// each step's end (ms after the Invoke handler began) and its own time
/// (from the step before), medians, for boots and restores apart.
fn breakdown(what: &str, log: &str) {
    let traces: Vec<Vec<(&str, f64)>> = log
        .lines()
        .filter(|line| line.contains(" cold_start: "))
        .filter_map(|line| {
            let steps = line.splitn(3, ": ").nth(2)?;
            steps
                .split(", ")
                .map(|step| {
                    let (name, ms) = step.rsplit_once(' ')?;
                    Some((name, ms.parse().ok()?))
                })
                .collect()
        })
        .collect();
    for (kind, restored) in [("boot", false), ("restore", true)] {
        let of_kind: Vec<&Vec<(&str, f64)>> = traces
            .iter()
            .filter(|t| {
                t.iter()
                    .all(|(name, _)| *name != "start-up message written")
                    == restored
            })
            .collect();
        if of_kind.is_empty() {
            continue;
        }
        let mut names: Vec<&str> = Vec::new();
        let mut ends: std::collections::HashMap<&str, (Vec<f64>, Vec<f64>)> = Default::default();
        for trace in &of_kind {
            let mut previous = 0.0;
            for (name, ms) in trace.iter() {
                if !names.contains(name) {
                    names.push(name);
                }
                let (at, took) = ends.entry(name).or_default();
                at.push(*ms);
                took.push(ms - previous);
                previous = *ms;
            }
        }
        let median = |v: &[f64]| {
            let mut v = v.to_vec();
            v.sort_by(f64::total_cmp);
            v[v.len() / 2]
        };
        names.sort_by(|a, b| median(&ends[a].0).total_cmp(&median(&ends[b].0)));
        println!(
            "{what}, {kind}: where the time goes ({} cold starts; ms after the Invoke handler began, medians)",
            of_kind.len()
        );
        println!("  | step | ends at | takes |");
        for name in names {
            let (at, took) = &ends[name];
            println!("  | {name} | {:.3} | {:.3} |", median(at), median(took));
        }
    }
}

fn summary(what: &str, samples: &[Duration]) {
    println!(
        "{what}: {} invokes, p50 {:.2} ms, p99 {:.2} ms",
        samples.len(),
        percentile(samples, 50.0).as_secs_f64() * 1e3,
        percentile(samples, 99.0).as_secs_f64() * 1e3
    );
}

/// `n` cold starts one at a time, each of a function of its own: the
/// Invoke -> answer latencies and the Init Durations.
async fn cold_starts(
    client: &LambdaClient,
    n: usize,
) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
    let mut cold = Vec::new();
    let mut init = Vec::new();
    for i in 0..n {
        let name = format!("cold-{i}");
        client.create_wasm_function(&name, &wasm, 5).await?;
        let r = client.invoke(&name, "{}".into()).await?;
        let ms = r
            .init_duration_ms()
            .ok_or(format!("{name}: no cold start"))?;
        init.push(Duration::from_secs_f64(ms / 1e3));
        cold.push(r.latency);
    }
    Ok((cold, init))
}

fn client_of(worker: &RunningWorker) -> Arc<LambdaClient> {
    Arc::new(LambdaClient::new(&worker.address, ACCOUNT_A.0, ACCOUNT_A.1))
}

/// The worker's own runs; returns the median Init Duration of the new
/// functions' cold starts, in milliseconds.
async fn bench(worker: &RunningWorker, args: &Args) -> Result<f64, String> {
    let client = client_of(worker);
    let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
    let (cold, init) = cold_starts(&client, args.cold).await?;
    breakdown("cold start of a new function", &worker.log());
    summary("cold start of a new function, Invoke -> answer", &cold);
    summary(
        "cold start of a new function, Init Duration (VMM spawn -> first /next)",
        &init,
    );
    println!(
        "cold starts of one version, each after its idle environment was reaped (--idle-timeout 0):"
    );
    restore_vs_boot(args.cold, is_root()).await?;
    if is_root() {
        restore_vs_boot(args.cold, false).await?;
    }
    client.create_wasm_function("echo", &wasm, 5).await?;
    let mut warm = Vec::new();
    for i in 0..=args.warm {
        let r = client
            .invoke("echo", format!(r#"{{"i":{i}}}"#).into())
            .await?;
        if i > 0 {
            warm.push(r.latency);
        }
    }
    summary("warm, one at a time", &warm);
    full_worker_cold_starts(args.cold).await?;
    let report = load::run(client, "echo", args.total, args.concurrency).await;
    report.print();
    report.all_answered_once()?;
    Ok(percentile(&init, 50.0).as_secs_f64() * 1e3)
}

/// `n` cold starts of one version, one at a time, on a worker (with
/// `extra` flags) whose idle timeout of 0 reaps each environment once it
/// is idle: Invoke -> answer latencies and the REPORT line's Init or
/// Restore Durations. With snapshots on, these restore the snapshot the
/// version's first cold start took.
async fn cold_starts_after_reaping(
    n: usize,
    extra: &[&str],
) -> Result<(Vec<Duration>, Vec<Duration>), String> {
    let data = data_dir("invoke-bench-reaped");
    let flags: Vec<&str> = ["--idle-timeout", "0"]
        .iter()
        .chain(extra)
        .copied()
        .collect();
    let worker = RunningWorker::start(&data, &flags, LOG_FILTER);
    let restores = extra.contains(&"every-version");
    let result = async {
        let client = client_of(&worker);
        let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
        client.create_wasm_function("reaped", &wasm, 5).await?;
        client.invoke("reaped", "{}".into()).await?;
        let (mut cold, mut start) = (Vec::new(), Vec::new());
        for _ in 0..2 * n + 20 {
            if cold.len() == n {
                breakdown(&format!("cold starts with {extra:?}"), &worker.log());
                return Ok((cold, start));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
            let r = client.invoke("reaped", "{}".into()).await?;
            // Until the first snapshot is sealed, cold starts boot.
            let ms = match restores {
                true => r.restore_duration_ms(),
                false => r.init_duration_ms(),
            };
            if let Some(ms) = ms {
                start.push(Duration::from_secs_f64(ms / 1e3));
                cold.push(r.latency);
            }
        }
        Err(format!(
            "{flags:?}: too few cold starts of the kind measured"
        ))
    }
    .await;
    worker.stop();
    let _ = std::fs::remove_dir_all(&data);
    result
}

/// Restore against boot, jailed or not, each after a reaped environment.
async fn restore_vs_boot(n: usize, jailed: bool) -> Result<(), String> {
    let p50 = |v: &[Duration]| percentile(v, 50.0).as_secs_f64() * 1e3;
    let jail: &[&str] = if jailed { &[] } else { &["--no-jail"] };
    let label = if jailed { "jailed" } else { "unjailed" };
    let with = |mode| -> Vec<&str> { jail.iter().chain(&["--snapshots", mode]).copied().collect() };
    let (restored, restore) = cold_starts_after_reaping(n, &with("every-version")).await?;
    let boot_flags = with("off");
    let (booted, init) = cold_starts_after_reaping(n, &boot_flags).await?;
    summary(
        &format!("{label} cold start, snapshot restore, Invoke -> answer"),
        &restored,
    );
    summary(
        &format!("{label} cold start, boot (--snapshots off), Invoke -> answer"),
        &booted,
    );
    println!(
        "{label}: Restore Duration p50 {:.2} ms vs Init Duration p50 {:.2} ms ({:.1}x); Invoke -> answer p50 {:.2} vs {:.2} ms ({:.1}x)",
        p50(&restore),
        p50(&init),
        p50(&init) / p50(&restore),
        p50(&restored),
        p50(&booted),
        p50(&booted) / p50(&restored)
    );
    Ok(())
}

/// Cold starts on a full worker (`--max-environments 1`), two functions
/// in turn, so that each start evicts the other's environment: Invoke ->
/// answer p50, to set beside a new function's cold start on a worker
/// with room.
async fn full_worker_cold_starts(n: usize) -> Result<(), String> {
    let data = data_dir("invoke-bench-full");
    let worker = RunningWorker::start(&data, &["--max-environments", "1"], LOG_FILTER);
    let result = async {
        let client = client_of(&worker);
        let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
        for name in ["full-a", "full-b"] {
            client.create_wasm_function(name, &wasm, 5).await?;
        }
        let mut cold = Vec::new();
        for i in 0..n + 1 {
            let name = ["full-a", "full-b"][i % 2];
            let r = client.invoke(name, "{}".into()).await?;
            r.init_duration_ms().ok_or(format!("{name}: no cold start"))?;
            // The first found the worker empty.
            if i > 0 {
                cold.push(r.latency);
            }
        }
        summary(
            "cold start on a full worker (each evicts the other function's environment), Invoke -> answer",
            &cold,
        );
        Ok(())
    }
    .await;
    worker.stop();
    let _ = std::fs::remove_dir_all(&data);
    result
}

/// The VMM's own boot on standby, launch -> first `/next`
/// (`runtime_boot_bench`, this many runs), against median Init Durations
/// of jailed cold starts from the pool: what the worker adds to the VMM.
const FLOOR_RUNS: &str = "60";
/// Issue 29's bound on what the worker adds.
const FLOOR_TARGET_MS: f64 = 1.5;

fn against_the_floor(inits: &[(&str, f64)]) -> Result<(), String> {
    let out = std::process::Command::new(runtime_boot_bench_binary())
        .args(["--runs", FLOOR_RUNS])
        .output()
        .map_err(|e| format!("runtime_boot_bench: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout);
    let floor = text
        .split("started ahead on standby:")
        .nth(1)
        .and_then(|standby| {
            standby
                .lines()
                .find(|l| l.contains("launch -> first /next"))
        })
        .and_then(|line| line.split("median ").nth(1))
        .and_then(|rest| rest.split(" ms").next())
        .and_then(|ms| ms.parse::<f64>().ok())
        .ok_or_else(|| {
            format!(
                "runtime_boot_bench printed no standby median:\n{text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        })?;
    println!(
        "the floor, the VMM's own boot on standby (runtime_boot_bench, {FLOOR_RUNS} runs): launch -> first /next median {floor:.2} ms"
    );
    for (what, init) in inits {
        let added = init - floor;
        println!(
            "  {what}, jailed from the pool: Init Duration p50 {init:.2} ms, the worker adds {added:+.2} ms (target at most {FLOOR_TARGET_MS} ms: {})",
            if added <= FLOOR_TARGET_MS { "met" } else { "NOT met" }
        );
    }
    Ok(())
}

/// `n` cold starts at once on a worker whose pool holds `n` VMMs on
/// standby, once the pool is full: a burst of a function's first
/// invocations, as when a function's traffic jumps. Its own worker:
/// the default pool of 2 leaves the rest of a burst to jails made at
/// their cold starts, which the load run above shows.
async fn burst_from_a_full_pool(n: usize) -> Result<(), String> {
    let data = data_dir("invoke-bench-burst");
    let pool = n.to_string();
    let worker = RunningWorker::start(&data, &["--jail-pool", &pool], LOG_FILTER);
    let result = async {
        let client = client_of(&worker);
        let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
        client.create_wasm_function("burst", &wasm, 5).await?;
        // The pool fills at SCHED_IDLE, a few ms of kernel work a jail.
        tokio::time::sleep(BURST_POOL_FILL).await;
        let report = load::run(client, "burst", n, n).await;
        println!("{n} cold starts at once, from a full pool of {n} (--jail-pool {n}):");
        report.print();
        report.all_answered_once()
    }
    .await;
    worker.stop();
    let _ = std::fs::remove_dir_all(&data);
    result
}

/// Time for a worker's pool of VMMs on standby to fill.
const BURST_POOL_FILL: Duration = Duration::from_secs(5);

/// Cold starts of new functions on workers that differ in how they jail
/// their VMMs, taken in turn so that the host's slow spells fall on all
/// of them alike: Invoke -> answer and Init Duration p50 of each, and the
/// breakdown of its traces. Returns the pooled worker's median Init
/// Duration, in milliseconds.
async fn jail_comparison(n: usize) -> Result<f64, String> {
    let kinds: [(&str, &[&str]); 3] = [
        (
            "jailed, from the pool of VMMs on standby in their jails",
            &[],
        ),
        (
            "jailed, each jail and VMM started at its cold start (--jail-pool 0)",
            &["--jail-pool", "0"],
        ),
        ("unjailed (--no-jail)", &["--no-jail"]),
    ];
    let workers: Vec<(RunningWorker, std::path::PathBuf)> = kinds
        .iter()
        .enumerate()
        .map(|(i, (_, flags))| {
            let data = data_dir(&format!("invoke-bench-jail-{i}"));
            (RunningWorker::start(&data, flags, LOG_FILTER), data)
        })
        .collect();
    let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
    let clients: Vec<_> = workers.iter().map(|(w, _)| client_of(w)).collect();
    let mut cold = vec![Vec::new(); kinds.len()];
    let mut init = vec![Vec::new(); kinds.len()];
    let result = async {
        for i in 0..n {
            for (k, client) in clients.iter().enumerate() {
                let name = format!("jail-{i}");
                client.create_wasm_function(&name, &wasm, 5).await?;
                // The pool refills after a cold start, off its path, as it
                // would between a real worker's cold starts.
                tokio::time::sleep(Duration::from_millis(50)).await;
                let r = client.invoke(&name, "{}".into()).await?;
                let ms = r
                    .init_duration_ms()
                    .ok_or(format!("{name}: no cold start"))?;
                init[k].push(Duration::from_secs_f64(ms / 1e3));
                cold[k].push(r.latency);
            }
        }
        Ok::<(), String>(())
    }
    .await;
    for (k, (label, _)) in kinds.iter().enumerate() {
        if result.is_ok() {
            breakdown(
                &format!("cold start of a new function, {label}"),
                &workers[k].0.log(),
            );
            summary(&format!("{label}: Invoke -> answer"), &cold[k]);
            summary(&format!("{label}: Init Duration"), &init[k]);
        }
    }
    for (worker, data) in workers {
        worker.stop();
        let _ = std::fs::remove_dir_all(&data);
    }
    result?;
    let p50 = |v: &[Duration]| percentile(v, 50.0).as_secs_f64() * 1e3;
    println!(
        "the jail adds {:+.2} ms to the median Init Duration with the pool, {:+.2} ms without ({:.2} / {:.2} / {:.2} ms)",
        p50(&init[0]) - p50(&init[2]),
        p50(&init[1]) - p50(&init[2]),
        p50(&init[0]),
        p50(&init[1]),
        p50(&init[2])
    );
    Ok(p50(&init[0]))
}

fn main() {
    let args = parse_args();
    let data = data_dir("invoke-bench");
    let worker = RunningWorker::start(&data, &[], LOG_FILTER);
    let result = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .map_err(|e| e.to_string())
        .and_then(|rt| {
            let new_functions_init = rt.block_on(bench(&worker, &args))?;
            if !is_root() {
                println!("jail comparison: SKIPPED: the worker above ran unjailed (not root)");
                return Ok(());
            }
            let compared = rt.block_on(jail_comparison(args.cold))?;
            against_the_floor(&[
                (
                    "new functions one after another, one worker",
                    new_functions_init,
                ),
                ("the same, three workers in turn", compared),
            ])?;
            rt.block_on(burst_from_a_full_pool(args.concurrency))?;
            Ok(())
        });
    worker.stop();
    let _ = std::fs::remove_dir_all(&data);
    if let Err(e) = result {
        eprintln!("invoke_bench: {e}");
        std::process::exit(1);
    }
}
