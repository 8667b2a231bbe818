//! The `celery` baseline: what users would pick instead of drover. Celery from PyPI in a
//! virtualenv the harness creates once and caches (`~/.cache/drover-chaos/celery-venv`), a
//! fresh vhost on the local RabbitMQ as broker, a spare Redis database as result backend,
//! `acks_late` with prefetch 1 (each task acknowledged after it ran, like drover's durable
//! runs), and a prefork worker with `--concurrency C` started here and stopped by PID.
//!
//! The load is driven by a small Python driver (`celery/driver.py`, the same closed/open loop
//! as the Rust driver) because Celery's client is Python; it reports one JSON line per task.
//! Tasks:
//! - `noop` returns at once: Celery's control plane alone (broker round trip, result backend),
//!   to compare with drover's mock-executor workload.
//! - `docker` runs the same `docker run --rm` no-op as the `docker` baseline, to compare with
//!   drover's `noop-docker` workload.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use indicatif::ProgressBar;
use serde::Deserialize;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::load::{Mode, Stop};
use super::metrics::{Recorder, Sample};
use super::services;

/// Pinned so every machine measures the same Celery.
pub const REQUIREMENTS: &[&str] = &["celery==5.5.3", "redis==5.2.1"];

const TASKS_PY: &str = include_str!("celery/tasks.py");
const DRIVER_PY: &str = include_str!("celery/driver.py");

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum CeleryTask {
    /// Returns at once: control plane only.
    Noop,
    /// Runs the `docker` baseline's `docker run --rm` no-op.
    Docker,
}

impl CeleryTask {
    fn name(self) -> &'static str {
        match self {
            CeleryTask::Noop => "noop",
            CeleryTask::Docker => "docker",
        }
    }
}

#[derive(Debug, Clone)]
pub struct CeleryConfig {
    pub task: CeleryTask,
    pub venv: PathBuf,
    pub python: String,
    /// Redis URL without a database number.
    pub redis_url: String,
    pub redis_db: u32,
    pub rabbit_host: String,
}

#[derive(Debug, thiserror::Error)]
pub enum CeleryError {
    #[error("{0}")]
    Setup(String),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
    #[error("celery driver: {0}")]
    Driver(String),
}

impl Default for CeleryConfig {
    /// The local services as `deploy/local-services.sh` starts them, Redis database 13.
    fn default() -> Self {
        Self {
            task: CeleryTask::Docker,
            venv: default_venv(),
            python: "python3".to_owned(),
            redis_url: "redis://127.0.0.1:6379".to_owned(),
            redis_db: 13,
            rabbit_host: "127.0.0.1:5672".to_owned(),
        }
    }
}

/// `$XDG_CACHE_HOME/drover-chaos/celery-venv`, else `~/.cache/…`.
pub fn default_venv() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("drover-chaos").join("celery-venv")
}

async fn check(cmd: &mut Command, what: &str) -> Result<(), CeleryError> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .await
        .map_err(|e| CeleryError::Setup(format!("{what}: {e}")))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CeleryError::Setup(format!(
            "{what} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )))
    }
}

/// Creates the virtualenv and installs [`REQUIREMENTS`] unless a previous run did.
pub async fn ensure_venv(venv: &Path, python: &str) -> Result<(), CeleryError> {
    let marker = venv.join(".drover-chaos-requirements");
    let want = REQUIREMENTS.join("\n");
    if std::fs::read_to_string(&marker).ok().as_deref() == Some(want.as_str()) {
        return Ok(());
    }
    if let Some(parent) = venv.parent() {
        std::fs::create_dir_all(parent)?;
    }
    check(
        Command::new(python).arg("-m").arg("venv").arg(venv),
        "python3 -m venv",
    )
    .await?;
    check(
        Command::new(venv.join("bin/pip"))
            .args(["install", "--quiet", "--disable-pip-version-check"])
            .args(REQUIREMENTS),
        "pip install (needs PyPI)",
    )
    .await?;
    std::fs::write(marker, want)?;
    Ok(())
}

#[derive(Deserialize)]
struct Line {
    t: Option<f64>,
    submit_ms: Option<f64>,
    e2e_ms: Option<f64>,
    err: Option<String>,
    elapsed: Option<f64>,
    fatal: Option<String>,
}

/// Stops the worker by PID: SIGTERM (warm shutdown), then SIGKILL after 20 s.
async fn stop(mut worker: Child) {
    if let Some(pid) = worker.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(pid),
            nix::sys::signal::Signal::SIGTERM,
        );
    }
    if tokio::time::timeout(Duration::from_secs(20), worker.wait())
        .await
        .is_err()
    {
        let _ = worker.kill().await;
    }
}

/// Sets up broker and backend, starts a worker, runs the load, tears everything down.
pub async fn run(
    cfg: &CeleryConfig,
    mode: Mode,
    stop_at: Stop,
    progress: &ProgressBar,
) -> Result<(Recorder, Duration), CeleryError> {
    ensure_venv(&cfg.venv, &cfg.python).await?;
    let dir = std::env::temp_dir().join(format!("drover-chaos-celery-{}", uuid::Uuid::now_v7()));
    std::fs::create_dir_all(&dir)?;
    std::fs::write(dir.join("tasks.py"), TASKS_PY)?;
    std::fs::write(dir.join("driver.py"), DRIVER_PY)?;
    let vhost = services::Vhost::create(
        &format!("drover-chaos-celery-{}", uuid::Uuid::now_v7()),
        &cfg.rabbit_host,
    )
    .map_err(CeleryError::Setup)?;
    let backend = format!("{}/{}", cfg.redis_url.trim_end_matches('/'), cfg.redis_db);
    let result = run_in(cfg, &dir, &vhost.url, &backend, mode, stop_at, progress).await;
    drop(vhost);
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    cfg: &CeleryConfig,
    dir: &Path,
    broker: &str,
    backend: &str,
    mode: Mode,
    stop_at: Stop,
    progress: &ProgressBar,
) -> Result<(Recorder, Duration), CeleryError> {
    let bin = cfg.venv.join("bin");
    let concurrency = match mode {
        Mode::Closed { concurrency } => concurrency,
        Mode::Open { max_in_flight, .. } => max_in_flight.min(64),
    };
    // The result database must be ours alone: we flush it afterwards.
    let probe = Command::new(bin.join("python"))
        .args([
            "-c",
            "import redis,sys; r=redis.Redis.from_url(sys.argv[1]); print(r.dbsize())",
            backend,
        ])
        .output()
        .await?;
    let size = String::from_utf8_lossy(&probe.stdout).trim().to_owned();
    if !probe.status.success() || size != "0" {
        // The last line of a Python traceback is the error itself.
        let stderr = String::from_utf8_lossy(&probe.stderr);
        let why = stderr.lines().last().unwrap_or_default();
        return Err(CeleryError::Setup(format!(
            "redis result database {backend} must exist and be empty (dbsize {size:?} {why}); \
             pick another with --celery-redis-db"
        )));
    }
    let env = |cmd: &mut Command| {
        cmd.current_dir(dir)
            .env("PYTHONPATH", dir)
            .env("DROVER_CHAOS_BROKER", broker)
            .env("DROVER_CHAOS_BACKEND", backend)
            .env(
                "DROVER_CHAOS_DOCKER_ARGS",
                super::docker_baseline::args().join("\x1f"),
            )
            .stdin(Stdio::null())
            .kill_on_drop(true);
    };
    let mut worker = Command::new(bin.join("celery"));
    worker.args([
        "-A",
        "tasks",
        "worker",
        "--pool",
        "prefork",
        "--concurrency",
        &concurrency.to_string(),
        "-Q",
        "drover_chaos",
        "--without-gossip",
        "--without-mingle",
        "--loglevel",
        "WARNING",
    ]);
    env(&mut worker);
    let log = std::fs::File::create(dir.join("worker.log"))?;
    worker
        .stdout(Stdio::from(log.try_clone()?))
        .stderr(Stdio::from(log));
    let worker = worker.spawn()?;

    let (runs, duration) = match stop_at {
        Stop::Runs(n) => (n, 0.0),
        Stop::Duration(d) => (0, d.as_secs_f64()),
    };
    let (mode_s, rate) = match mode {
        Mode::Closed { .. } => ("closed", 0.0),
        Mode::Open { rate, .. } => ("open", rate),
    };
    let mut driver = Command::new(bin.join("python"));
    driver.args([
        "driver.py",
        cfg.task.name(),
        mode_s,
        &concurrency.to_string(),
        &rate.to_string(),
        &runs.to_string(),
        &duration.to_string(),
    ]);
    env(&mut driver);
    // stderr to a file: a pipe nobody reads until the end could fill and stall the driver.
    driver
        .stdout(Stdio::piped())
        .stderr(Stdio::from(std::fs::File::create(dir.join("driver.log"))?));
    let cpu = super::cpu_share::CpuWindow::start();
    let mut outcome = drive(driver, progress).await;
    let cpu = cpu.finish();
    if let Ok((rec, _)) = &mut outcome {
        // Includes the Python driver's start-up, a fraction of a second.
        rec.set_cpu(cpu);
    }
    stop(worker).await;
    // Flush our result keys from the spare database.
    let _ = Command::new(bin.join("python"))
        .args([
            "-c",
            "import redis,sys; redis.Redis.from_url(sys.argv[1]).flushdb()",
            backend,
        ])
        .output()
        .await;
    if outcome.is_err() {
        for f in ["driver.log", "worker.log"] {
            let log = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
            eprintln!("celery {f}:\n{log}");
        }
    }
    outcome
}

async fn drive(
    mut driver: Command,
    progress: &ProgressBar,
) -> Result<(Recorder, Duration), CeleryError> {
    let mut child = driver.spawn()?;
    let stdout = child
        .stdout
        .take()
        .ok_or_else(|| CeleryError::Driver("no stdout".into()))?;
    let mut lines = BufReader::new(stdout).lines();
    let mut rec = Recorder::default();
    let mut elapsed = None;
    while let Some(line) = lines.next_line().await? {
        let l: Line = serde_json::from_str(&line)
            .map_err(|e| CeleryError::Driver(format!("bad line {line:?}: {e}")))?;
        if let Some(f) = l.fatal {
            return Err(CeleryError::Driver(f));
        }
        if let Some(e) = l.elapsed {
            elapsed = Some(Duration::from_secs_f64(e.max(0.0)));
            continue;
        }
        let at = Duration::from_secs_f64(l.t.unwrap_or(0.0).max(0.0));
        let outcome = match (l.err, l.e2e_ms) {
            (None, Some(e2e)) => Ok(Sample {
                submit: l
                    .submit_ms
                    .map(|m| Duration::from_secs_f64(m.max(0.0) / 1e3)),
                end_to_end: Duration::from_secs_f64(e2e.max(0.0) / 1e3),
                ..Sample::default()
            }),
            (Some(e), _) => Err(e),
            (None, None) => Err("no_latency".into()),
        };
        rec.record(at, &outcome);
        progress.inc(1);
    }
    let status = child.wait().await?;
    match elapsed {
        Some(el) if status.success() => Ok((rec, el)),
        _ => Err(CeleryError::Driver(format!(
            "exited {status} (its log follows)"
        ))),
    }
}
