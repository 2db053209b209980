//! The invoke load test: many echo invocations at a fixed concurrency,
//! each with a payload of its own, so that every answer can be matched to
//! exactly one request.

use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::lambda_client::LambdaClient;

#[derive(Debug, Default)]
pub struct LoadReport {
    pub total: usize,
    pub concurrency: usize,
    pub wall: Duration,
    /// Latencies of invocations that met a warm environment.
    pub warm: Vec<Duration>,
    /// Latencies of invocations that started an environment.
    pub cold: Vec<Duration>,
    /// Requests whose answer was missing, wrong, or not a 200.
    pub failures: Vec<String>,
    /// Requests answered more than once, or never.
    pub not_exactly_once: Vec<usize>,
}

/// The `p`th percentile (0-100) of `samples`, nearest rank.
pub fn percentile(samples: &[Duration], p: f64) -> Duration {
    if samples.is_empty() {
        return Duration::ZERO;
    }
    let mut sorted = samples.to_vec();
    sorted.sort_unstable();
    let rank = ((p / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

impl LoadReport {
    /// An error naming what went wrong if any request failed or was not
    /// answered exactly once.
    pub fn all_answered_once(&self) -> Result<(), String> {
        match (self.failures.first(), self.not_exactly_once.len()) {
            (None, 0) => Ok(()),
            (first, not_once) => Err(format!(
                "{} failures (first {first:?}), {not_once} not answered exactly once",
                self.failures.len()
            )),
        }
    }

    pub fn print(&self) {
        println!(
            "{} invokes at concurrency {} in {:.2} s ({:.0}/s); {} failed, {} not answered exactly once",
            self.total,
            self.concurrency,
            self.wall.as_secs_f64(),
            self.total as f64 / self.wall.as_secs_f64(),
            self.failures.len(),
            self.not_exactly_once.len()
        );
        for (what, samples) in [("warm", &self.warm), ("cold", &self.cold)] {
            println!(
                "  {what:4}: {:5} invokes, p50 {:7.2} ms, p99 {:7.2} ms, max {:7.2} ms",
                samples.len(),
                ms(percentile(samples, 50.0)),
                ms(percentile(samples, 99.0)),
                ms(percentile(samples, 100.0)),
            );
        }
    }
}

/// Invokes `function` `total` times from `concurrency` tasks. Request `i`
/// sends `{"i":i}` and must get `{"echo":{"i":i}}` back.
pub async fn run(
    client: Arc<LambdaClient>,
    function: &str,
    total: usize,
    concurrency: usize,
) -> LoadReport {
    let next = Arc::new(AtomicUsize::new(0));
    let answers: Arc<Vec<AtomicU32>> = Arc::new((0..total).map(|_| AtomicU32::new(0)).collect());
    let started = Instant::now();
    let tasks: Vec<_> = (0..concurrency)
        .map(|_| {
            let (client, next, answers) = (client.clone(), next.clone(), answers.clone());
            let function = function.to_string();
            tokio::spawn(async move {
                let mut report = LoadReport::default();
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= total {
                        return report;
                    }
                    let payload = format!(r#"{{"i":{i}}}"#);
                    let expected = format!(r#"{{"echo":{payload}}}"#);
                    match client.invoke(&function, payload.into()).await {
                        Ok(r) if r.status == 200 && r.function_error.is_none() => {
                            if r.body == expected.as_bytes() {
                                answers[i].fetch_add(1, Ordering::Relaxed);
                            } else {
                                report.failures.push(format!(
                                    "request {i}: answered {:?}",
                                    String::from_utf8_lossy(&r.body)
                                ));
                            }
                            if r.cold_start_ms().is_some() {
                                report.cold.push(r.latency);
                            } else {
                                report.warm.push(r.latency);
                            }
                        }
                        Ok(r) => report.failures.push(format!(
                            "request {i}: status {} {:?}: {}",
                            r.status,
                            r.function_error,
                            String::from_utf8_lossy(&r.body)
                        )),
                        Err(e) => report.failures.push(format!("request {i}: {e}")),
                    }
                }
            })
        })
        .collect();
    let mut report = LoadReport {
        total,
        concurrency,
        ..LoadReport::default()
    };
    for task in tasks {
        match task.await {
            Ok(part) => {
                report.warm.extend(part.warm);
                report.cold.extend(part.cold);
                report.failures.extend(part.failures);
            }
            Err(e) => report.failures.push(format!("a client task failed: {e}")),
        }
    }
    report.wall = started.elapsed();
    report.not_exactly_once = answers
        .iter()
        .enumerate()
        .filter(|(_, n)| n.load(Ordering::Relaxed) != 1)
        .map(|(i, _)| i)
        .collect();
    report
}
