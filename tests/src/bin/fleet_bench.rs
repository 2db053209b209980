//! Fleet benchmark: invokes per second and latencies through a fleet's
//! front end with 1 and 3 worker hosts (each host, the front end and etcd
//! in network namespaces of their own on this machine, mutual TLS between
//! them), against the single-process worker in the same run. The echo Wasm
//! function, warmed up first, then a load at a fixed concurrency.
//!
//! usage: fleet_bench [--total N] [--concurrency N]    (as root)

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use microvm_tests::fleet::TestFleet;
use microvm_tests::lambda_client::LambdaClient;
use microvm_tests::load::{self, percentile, LoadReport};
use microvm_tests::worker::{data_dir, RunningWorker};
use microvm_tests::{count_args, is_root, ECHO_WAT};

/// Warnings only: the load must not wait on log lines.
const LOG_FILTER: &str = "warn";

/// How many warm invokes, one after another, give the latency of one.
const SEQUENTIAL: usize = 300;

/// Creates the echo function, starts `concurrency` environments of it,
/// runs the load, then invokes one at a time.
async fn measure(
    client: Arc<LambdaClient>,
    total: usize,
    concurrency: usize,
) -> Result<(LoadReport, Vec<Duration>), String> {
    let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
    client.create_wasm_function("echo", &wasm, 10).await?;
    // Warm-up: as many environments as the load keeps busy.
    load::run(client.clone(), "echo", concurrency * 4, concurrency).await;
    client.invoke("echo", Bytes::from_static(b"{}")).await?;
    let report = load::run(client.clone(), "echo", total, concurrency).await;
    report.all_answered_once()?;
    let mut one_at_a_time = Vec::with_capacity(SEQUENTIAL);
    for _ in 0..SEQUENTIAL {
        one_at_a_time.push(
            client
                .invoke("echo", Bytes::from_static(b"{}"))
                .await?
                .latency,
        );
    }
    Ok((report, one_at_a_time))
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let counts = count_args("fleet_bench", &[("total", 5000), ("concurrency", 32)]);
    let (total, concurrency) = (counts[0], counts[1]);
    if !is_root() {
        eprintln!("fleet_bench: network namespaces need root");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut rows: Vec<(String, (LoadReport, Vec<Duration>))> = Vec::new();
    let data = data_dir("fleet-bench");
    {
        println!("single-process worker ...");
        let worker = RunningWorker::start(&data, &[], LOG_FILTER);
        match runtime.block_on(measure(worker.client(), total, concurrency)) {
            Ok(measured) => rows.push(("single-process worker".into(), measured)),
            Err(e) => {
                eprintln!("fleet_bench: single-process worker: {e}");
                std::process::exit(1);
            }
        }
        worker.stop();
    }
    for hosts in [1, 3] {
        println!("fleet with {hosts} worker host(s) ...");
        let fleet = TestFleet::start(hosts, &[], LOG_FILTER);
        match runtime.block_on(measure(fleet.client(), total, concurrency)) {
            Ok(measured) => rows.push((format!("fleet, {hosts} worker host(s)"), measured)),
            Err(e) => {
                eprintln!("fleet_bench: {hosts} hosts: {e}");
                std::process::exit(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    let rate = |r: &LoadReport| r.total as f64 / r.wall.as_secs_f64();
    let base_rate = rate(&rows[0].1 .0);
    let base_one = percentile(&rows[0].1 .1, 50.0);
    println!(
        "\necho Wasm function, warm: {total} invokes at concurrency {concurrency}, then {SEQUENTIAL} one at a time"
    );
    println!(
        "| {:<25} | {:>9} | {:>7} | {:>7} | {:>9} | {:>11} | {:>9} |",
        "", "invokes/s", "p50 ms", "p99 ms", "vs single", "one: p50 ms", "vs single"
    );
    println!(
        "|{:-<27}|{:->11}|{:->9}|{:->9}|{:->11}|{:->13}|{:->11}|",
        "", "", "", "", "", "", ""
    );
    for (name, (report, one_at_a_time)) in &rows {
        let latencies: Vec<Duration> = report.warm.iter().chain(&report.cold).copied().collect();
        let one = percentile(one_at_a_time, 50.0);
        println!(
            "| {name:<25} | {:>9.0} | {:>7.2} | {:>7.2} | {:>8.2}x | {:>11.2} | {:>8.2}x |",
            rate(report),
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
            rate(report) / base_rate,
            ms(one),
            one.as_secs_f64() / base_one.as_secs_f64()
        );
    }
}
