//! `drover-chaos stress`: load against a drover stack, side by side with baselines on the same
//! machine, reported as JSON, Markdown and SVG (see [`report`]).
//!
//! Order: (optionally spawn a stack) → warm-up → drover load while its processes are sampled →
//! stop the spawned stack → each baseline at the same mode and stop condition → report.
//! Warm-up operations (drover and `docker` only) are not recorded: they pay for connection
//! set-up and cold caches, which a steady-state figure should not include.

pub mod celery;
pub mod cpu_share;
pub mod docker_baseline;
pub mod drover;
pub mod load;
pub mod metrics;
pub mod procstat;
pub mod report;
pub mod services;
pub mod spawn;
pub mod svg;
pub mod workload;

use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use tokio_util::sync::CancellationToken;

use load::{Mode, Stop};
use procstat::Watched;
use report::{Report, RunSetup};
use workload::Workload;

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    Docker,
    Celery,
}

#[derive(Debug, Clone)]
pub struct StressConfig {
    /// A running stack's API; ignored when `spawn` is set.
    pub endpoint: String,
    pub spawn: Option<spawn::SpawnConfig>,
    pub workload: Workload,
    pub mode: Mode,
    pub stop: Stop,
    pub warmup: u64,
    pub baselines: Vec<Baseline>,
    pub celery: celery::CeleryConfig,
    pub pids: Vec<Watched>,
    pub out: PathBuf,
    /// Draw progress bars (only when stdout is a terminal in the binary).
    pub progress: bool,
    /// Bearer token for the API's calls (none: an API without authentication).
    pub token: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum StressError {
    #[error("spawning the stack: {0}")]
    Spawn(#[from] spawn::SpawnError),
    #[error("connecting to {0}")]
    Connect(String, #[source] crate::client::ClientError),
    #[error("warm-up run failed: {0}")]
    Warmup(String),
    #[error("writing the report: {0}")]
    Write(#[from] std::io::Error),
}

fn bar(cfg: &StressConfig, name: &str) -> ProgressBar {
    let len = match cfg.stop {
        Stop::Runs(n) => Some(n),
        Stop::Duration(_) => None,
    };
    let pb = match len {
        Some(n) => ProgressBar::new(n),
        None => ProgressBar::no_length(),
    };
    if !cfg.progress {
        pb.set_draw_target(ProgressDrawTarget::hidden());
    }
    let template = if len.is_some() {
        "{prefix:>8} [{bar:30}] {pos}/{len} {per_sec} {elapsed} {msg}"
    } else {
        "{prefix:>8} {spinner} {pos} done {per_sec} {elapsed} {msg}"
    };
    if let Ok(style) = ProgressStyle::with_template(template) {
        pb.set_style(style.progress_chars("=> "));
    }
    pb.set_prefix(name.to_owned());
    pb
}

fn describe(mode: Mode, stop: Stop) -> (String, String) {
    (
        match mode {
            Mode::Closed { concurrency } => format!("closed loop, concurrency {concurrency}"),
            Mode::Open { rate, .. } => format!("open loop, {rate}/s"),
        },
        match stop {
            Stop::Runs(n) => format!("{n} runs"),
            Stop::Duration(d) => format!("{} s", d.as_secs_f64()),
        },
    )
}

/// Runs everything the config asks and writes the report; returns it.
pub async fn run(cfg: StressConfig) -> Result<Report, StressError> {
    let spec = cfg.workload.spec();
    let started_at = chrono::Utc::now().to_rfc3339();
    let mut pids = cfg.pids.clone();
    let stack = match &cfg.spawn {
        Some(s) => Some(spawn::SpawnedStack::start(s).await?),
        None => None,
    };
    let endpoint = stack
        .as_ref()
        .map_or_else(|| cfg.endpoint.clone(), |s| s.endpoint.clone());
    if let Some(s) = &stack {
        pids.extend(s.watched());
    }
    // A spawned stack brings its own token; otherwise the one given (--token).
    let token = stack
        .as_ref()
        .map(|s| s.token.clone())
        .or_else(|| cfg.token.clone());
    let drover_result = run_drover(&cfg, &endpoint, token.as_deref(), spec, pids).await;
    if let Some(s) = stack {
        s.stop().await;
    }
    let (drover_sys, processes, violations) = drover_result?;

    let mut systems = vec![drover_sys];
    let mut failed_baselines = Vec::new();
    for b in &cfg.baselines {
        match b {
            Baseline::Docker => {
                let mut warm = Ok(());
                for _ in 0..cfg.warmup {
                    if warm.is_ok() {
                        warm = docker_baseline::one(tokio::time::Instant::now())
                            .await
                            .map(drop);
                    }
                }
                if let Err(e) = warm {
                    failed_baselines.push(format!("docker: warm-up run failed: {e}"));
                    continue;
                }
                let pb = bar(&cfg, "docker");
                let (rec, elapsed) =
                    load::drive(cfg.mode, cfg.stop, |_, at| docker_baseline::one(at), &pb).await;
                pb.finish();
                systems.push(rec.summarize("docker", elapsed));
            }
            Baseline::Celery => {
                let pb = bar(&cfg, "celery");
                match celery::run(&cfg.celery, cfg.mode, cfg.stop, &pb).await {
                    Ok((rec, elapsed)) => {
                        pb.finish();
                        let name = format!("celery-{}", celery_task_name(cfg.celery.task));
                        systems.push(rec.summarize(&name, elapsed));
                    }
                    // The drover figures are still worth writing; the failure goes in the report.
                    Err(e) => {
                        pb.abandon();
                        failed_baselines.push(format!("celery: {e}"));
                    }
                }
            }
        }
    }
    let (mode, stop) = describe(cfg.mode, cfg.stop);
    let mut report = Report {
        setup: RunSetup {
            workload: cfg.workload.name().to_owned(),
            mode,
            stop,
            endpoint: if let Some(spawn) = &cfg.spawn {
                let workspaces = spawn.workspace_root.as_ref().map_or_else(
                    || "the agents' default".to_owned(),
                    |r| r.display().to_string(),
                );
                format!("spawned ({endpoint}; workspaces under {workspaces})")
            } else {
                endpoint
            },
            started_at,
            host_cpus: std::thread::available_parallelism().map_or(0, usize::from),
        },
        systems,
        ratios: Vec::new(),
        processes,
        violations,
        failed_baselines,
    };
    report.compute_ratios();
    report.write(&cfg.out)?;
    Ok(report)
}

fn celery_task_name(t: celery::CeleryTask) -> &'static str {
    match t {
        celery::CeleryTask::Noop => "noop",
        celery::CeleryTask::Docker => "docker",
    }
}

type DroverResult = (
    metrics::SystemReport,
    Vec<procstat::ProcessReport>,
    Vec<String>,
);

async fn run_drover(
    cfg: &StressConfig,
    endpoint: &str,
    token: Option<&str>,
    spec: drover_proto::v1::RunSpec,
    pids: Vec<Watched>,
) -> Result<DroverResult, StressError> {
    let client = crate::client::connect(endpoint, token)
        .await
        .map_err(|e| StressError::Connect(endpoint.to_owned(), e))?
        .runs();
    for _ in 0..cfg.warmup {
        let (outcome, _) =
            drover::one(client.clone(), spec.clone(), tokio::time::Instant::now()).await;
        outcome.map_err(StressError::Warmup)?;
    }
    let cancel = CancellationToken::new();
    let sampler = tokio::spawn(procstat::sample(
        pids,
        Duration::from_secs(1),
        cancel.clone(),
    ));
    let violations = Arc::new(Mutex::new(Vec::new()));
    let pb = bar(cfg, "drover");
    let (rec, elapsed) = load::drive(
        cfg.mode,
        cfg.stop,
        |_, at| {
            let (client, spec, violations) =
                (client.clone(), spec.clone(), Arc::clone(&violations));
            async move {
                let (outcome, found) = drover::one(client, spec, at).await;
                if !found.is_empty()
                    && let Ok(mut v) = violations.lock()
                {
                    v.extend(found);
                }
                outcome
            }
        },
        &pb,
    )
    .await;
    pb.finish();
    cancel.cancel();
    let processes = sampler.await.unwrap_or_default();
    let violations = violations.lock().map(|v| v.clone()).unwrap_or_default();
    Ok((rec.summarize("drover", elapsed), processes, violations))
}
