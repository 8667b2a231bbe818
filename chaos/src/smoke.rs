//! Closed-loop smoke load: `concurrency` clients each submit a run, follow it to the end with
//! WatchRun, and repeat until `runs` runs are done. Reports submit→terminal latency percentiles
//! and throughput, then asks the oracle.

use std::time::{Duration, Instant};

use drover_proto::v1 as pb;
use futures::future::try_join_all;

use crate::client::{self, RunClient};
use crate::oracle::{self, Observed, Violation};

#[derive(Debug, Clone)]
pub struct SmokeConfig {
    pub runs: usize,
    pub concurrency: usize,
    pub image: String,
    pub command: Vec<String>,
}

#[derive(Debug)]
pub struct SmokeReport {
    pub runs: usize,
    pub elapsed: Duration,
    pub p50: Duration,
    pub p99: Duration,
    pub violations: Vec<Violation>,
}

impl std::fmt::Display for SmokeReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "runs={} elapsed={:.2}s throughput={:.1}/s submit_to_terminal_p50={}ms p99={}ms violations={}",
            self.runs,
            self.elapsed.as_secs_f64(),
            self.runs as f64 / self.elapsed.as_secs_f64().max(1e-9),
            self.p50.as_millis(),
            self.p99.as_millis(),
            self.violations.len()
        )
    }
}

async fn one_run(
    client: &mut RunClient,
    cfg: &SmokeConfig,
) -> Result<(Observed, Duration), tonic::Status> {
    let started = Instant::now();
    let run = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(pb::RunSpec {
                image: cfg.image.clone(),
                command: cfg.command.clone(),
                ..Default::default()
            }),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
        })
        .await?
        .into_inner()
        .run
        .ok_or_else(|| tonic::Status::internal("no run in response"))?;
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run.id.clone(),
        })
        .await?
        .into_inner();
    let mut events = Vec::new();
    while let Some(msg) = stream.message().await? {
        if let Some(ev) = msg.event {
            events.push(ev);
        }
    }
    Ok((
        Observed {
            run_id: run.id,
            events,
        },
        started.elapsed(),
    ))
}

pub async fn run(
    endpoint: &str,
    token: Option<&str>,
    cfg: SmokeConfig,
) -> anyhow::Result<SmokeReport> {
    let conn = client::connect(endpoint, token).await?;
    let started = Instant::now();
    let per_worker = cfg.runs.div_ceil(cfg.concurrency.max(1));
    let workers = (0..cfg.concurrency.max(1)).map(|w| {
        let mut client = conn.runs();
        let cfg = cfg.clone();
        let n = per_worker.min(cfg.runs.saturating_sub(w * per_worker));
        async move {
            let mut out = Vec::with_capacity(n);
            for _ in 0..n {
                out.push(one_run(&mut client, &cfg).await?);
            }
            Ok::<_, tonic::Status>(out)
        }
    });
    let results: Vec<(Observed, Duration)> =
        try_join_all(workers).await?.into_iter().flatten().collect();
    let elapsed = started.elapsed();
    let mut lat: Vec<Duration> = results.iter().map(|(_, d)| *d).collect();
    lat.sort();
    let pct = |p: f64| {
        lat.get(((lat.len() as f64 - 1.0) * p).round() as usize)
            .copied()
            .unwrap_or_default()
    };
    let observed: Vec<Observed> = results.into_iter().map(|(o, _)| o).collect();
    Ok(SmokeReport {
        runs: observed.len(),
        elapsed,
        p50: pct(0.5),
        p99: pct(0.99),
        violations: oracle::check(&observed),
    })
}
