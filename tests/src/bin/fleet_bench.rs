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
use microvm_tests::{is_root, ECHO_WAT};

/// Warnings only: the load must not wait on log lines.
const LOG_FILTER: &str = "warn";

fn parse_args() -> Result<(usize, usize), String> {
    let (mut total, mut concurrency) = (5000, 32);
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        let value = it.next().ok_or(format!("{flag} needs a value"))?;
        let n: usize = value
            .parse()
            .map_err(|_| format!("{flag} {value:?}: not a number"))?;
        match flag.as_str() {
            "--total" if n > 0 => total = n,
            "--concurrency" if n > 0 => concurrency = n,
            _ => return Err(format!("unknown flag or bad value: {flag} {value}")),
        }
    }
    Ok((total, concurrency))
}

/// Creates the echo function, starts `concurrency` environments of it,
/// then runs the load.
async fn measure(
    client: Arc<LambdaClient>,
    total: usize,
    concurrency: usize,
) -> Result<LoadReport, String> {
    let wasm = wat::parse_str(ECHO_WAT).map_err(|e| e.to_string())?;
    client.create_wasm_function("echo", &wasm, 10).await?;
    // Warm-up: as many environments as the load keeps busy.
    load::run(client.clone(), "echo", concurrency * 4, concurrency).await;
    client.invoke("echo", Bytes::from_static(b"{}")).await?;
    let report = load::run(client, "echo", total, concurrency).await;
    if !report.failures.is_empty() || !report.not_exactly_once.is_empty() {
        return Err(format!(
            "{} failures ({:?}), {} not answered exactly once",
            report.failures.len(),
            report.failures.first(),
            report.not_exactly_once.len()
        ));
    }
    Ok(report)
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn main() {
    let (total, concurrency) = match parse_args() {
        Ok(args) => args,
        Err(e) => {
            eprintln!("fleet_bench: {e}");
            std::process::exit(2);
        }
    };
    if !is_root() {
        eprintln!("fleet_bench: network namespaces need root");
        std::process::exit(2);
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("a runtime");
    let mut rows: Vec<(String, LoadReport)> = Vec::new();
    let data = data_dir("fleet-bench");
    {
        println!("single-process worker ...");
        let worker = RunningWorker::start(&data, &[], LOG_FILTER);
        match runtime.block_on(measure(worker.client(), total, concurrency)) {
            Ok(report) => rows.push(("single-process worker".into(), report)),
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
            Ok(report) => rows.push((format!("fleet, {hosts} worker host(s)"), report)),
            Err(e) => {
                eprintln!("fleet_bench: {hosts} hosts: {e}");
                std::process::exit(1);
            }
        }
    }
    let _ = std::fs::remove_dir_all(&data);
    let base = rows[0].1.total as f64 / rows[0].1.wall.as_secs_f64();
    println!("\n{total} warm invokes at concurrency {concurrency}, echo Wasm function:");
    println!(
        "| {:<28} | {:>9} | {:>8} | {:>8} | {:>16} |",
        "", "invokes/s", "p50 ms", "p99 ms", "vs single-process"
    );
    println!(
        "|{:-<30}|{:->11}|{:->10}|{:->10}|{:->18}|",
        "", "", "", "", ""
    );
    for (name, report) in &rows {
        let rate = report.total as f64 / report.wall.as_secs_f64();
        let latencies: Vec<Duration> = report.warm.iter().chain(&report.cold).copied().collect();
        println!(
            "| {name:<28} | {rate:>9.0} | {:>8.2} | {:>8.2} | {:>16.2}x |",
            ms(percentile(&latencies, 50.0)),
            ms(percentile(&latencies, 99.0)),
            rate / base
        );
    }
}
