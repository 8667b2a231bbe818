//! `drover-chaos run [--scenario NAME ...|--all|--smoke] --seed N --out DIR`
//! `drover-chaos smoke --endpoint URL [--runs N] [--concurrency C]`
//! `drover-chaos stress [--spawn-stack] [--concurrency C | --rate R] [--runs N | --duration D]
//!  [--baseline docker] [--baseline celery] --out DIR`

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use clap::{Args, Parser, Subcommand};
use drover_chaos::scenario::{self, RunConfig, Scenario};
use drover_chaos::smoke::{self, SmokeConfig};
use drover_chaos::stack::SharedServices;
use drover_chaos::stress::celery::{self, CeleryConfig, CeleryTask};
use drover_chaos::stress::load::{Mode, Stop};
use drover_chaos::stress::procstat::Watched;
use drover_chaos::stress::spawn::{self, SpawnConfig};
use drover_chaos::stress::workload::Workload;
use drover_chaos::stress::{self, Baseline, StressConfig};

#[derive(Parser)]
#[command(name = "drover-chaos", version, about = "drover load and chaos runs")]
struct Cli {
    #[arg(
        long,
        global = true,
        env = "DROVER_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Bearer token for the API (none: an API without authentication).
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop load; checks every run ended exactly once. Exit code 1 on a violation.
    Smoke {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "drover/busybox:latest")]
        image: String,
        /// The argv of each run.
        #[arg(last = true, default_values_t = ["true".to_string()])]
        command: Vec<String>,
    },
    /// Load with latency histograms, process RSS/CPU and side-by-side baselines; writes
    /// report.json, summary.md, latency.svg and throughput.svg to --out. Exit code 1 if the
    /// oracle found a violation or a baseline could not be measured.
    Stress(Box<StressArgs>),
    /// Fault scenarios against stacks of the real binaries, judged by the oracle; writes
    /// report.json and report.md to --out. Exit code 1 on any violation or scenario error.
    Run(Box<RunArgs>),
}

#[derive(Args)]
struct RunArgs {
    /// A scenario to run; repeatable.
    #[arg(long = "scenario", value_enum)]
    scenarios: Vec<Scenario>,
    /// Every scenario.
    #[arg(long, conflicts_with = "scenarios")]
    all: bool,
    /// Short workloads and recovery windows; without --scenario/--all, the CI set
    /// (agent-kill-restart, dispatcher-kill, duplicate-poison, redis-flushall).
    #[arg(long)]
    smoke: bool,
    /// Seeds fault timing and workload; the same seed gives the same fault schedule.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Report directory (created); each scenario's logs and journals go below it.
    #[arg(long, default_value = "chaos-report")]
    out: PathBuf,
    /// Where the drover binaries are (default: next to drover-chaos).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    /// `RUST_LOG` of the stack's processes; keep `info` or more verbose: zombie-agent reads
    /// the agent's log for the stale-epoch calls it had refused.
    #[arg(long, default_value = "info")]
    stack_log: String,
    #[command(flatten)]
    services: ServiceArgs,
}

async fn chaos_run(token: Option<String>, a: RunArgs) -> anyhow::Result<ExitCode> {
    let scenarios = if a.all {
        Scenario::ALL.to_vec()
    } else if !a.scenarios.is_empty() {
        a.scenarios
    } else if a.smoke {
        Scenario::SMOKE.to_vec()
    } else {
        anyhow::bail!("name scenarios with --scenario, or pass --all or --smoke");
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let on_signal = cancel.clone();
    tokio::spawn(async move {
        if tokio::signal::ctrl_c().await.is_ok() {
            eprintln!("interrupted; stopping the scenario in progress");
            on_signal.cancel();
        }
    });
    let report = scenario::run(RunConfig {
        bin_dir: a.bin_dir.unwrap_or_else(spawn::default_bin_dir),
        shared: SharedServices {
            pg_admin_url: a.services.pg_admin_url,
            redis_url: a.services.redis_url,
            rabbit_host: a.services.rabbit_host,
        },
        out: a.out.clone(),
        seed: a.seed,
        scenarios,
        smoke: a.smoke,
        token,
        rust_log: a.stack_log,
        cancel,
    })
    .await?;
    for s in &report.scenarios {
        for v in &s.violations {
            eprintln!("VIOLATION [{}]: {v}", s.name);
        }
        if let Some(e) = &s.error {
            eprintln!("ERROR [{}]: {e}", s.name);
        }
    }
    println!("{}", report.one_line());
    eprintln!("report: {}", a.out.join("report.md").display());
    Ok(if report.passed() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

#[derive(Args)]
struct StressArgs {
    #[arg(long, value_enum, default_value = "noop-docker")]
    workload: Workload,
    /// Closed loop: this many operations always in flight.
    #[arg(long, default_value_t = 8, conflicts_with = "rate")]
    concurrency: usize,
    /// Open loop: start this many operations per second whatever the system does.
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most operations in flight (bounds memory if the system stalls).
    #[arg(long, default_value_t = 10_000)]
    max_in_flight: usize,
    /// Stop after this many operations (per system).
    #[arg(long, conflicts_with = "duration")]
    runs: Option<u64>,
    /// Stop starting operations after this long, e.g. `90s`, `5m`, `1h` (per system).
    #[arg(long, value_parser = parse_duration)]
    duration: Option<Duration>,
    /// Unrecorded operations before each measured one (drover and docker).
    #[arg(long, default_value_t = 2)]
    warmup: u64,
    /// Also measure a baseline, with the same mode and stop condition; repeatable.
    #[arg(long = "baseline", value_enum)]
    baselines: Vec<Baseline>,
    /// Watch this drover process's RSS and CPU; repeatable (`--pid api=1234`).
    #[arg(long = "pid")]
    pids: Vec<Watched>,
    /// Report directory (created).
    #[arg(long, default_value = "stress-report")]
    out: PathBuf,
    /// Start a throwaway stack (api, dispatcher, agents) instead of using --endpoint.
    #[arg(long)]
    spawn_stack: bool,
    /// Where the drover binaries are for --spawn-stack (default: next to drover-chaos).
    #[arg(long)]
    bin_dir: Option<PathBuf>,
    #[arg(long, default_value_t = 1)]
    agents: usize,
    /// Slots per agent; default: concurrency / agents rounded up (at least 1), so drover
    /// can run as many containers at once as the docker baseline.
    #[arg(long)]
    agent_capacity: Option<u32>,
    #[arg(long, default_value = "warn")]
    stack_log: String,
    /// With --spawn-stack: the agents' workspace root (`DROVER_WORKSPACE_ROOT`; default: the
    /// agent's, under the temp dir). Each run creates and removes a few files there, which
    /// costs far more on some filesystems than others (see the README's performance notes).
    #[arg(long)]
    workspace_root: Option<PathBuf>,
    #[command(flatten)]
    services: ServiceArgs,
    /// What each Celery task does: `noop` (control plane) or `docker` (the same container).
    #[arg(long, value_enum, default_value = "docker")]
    celery_task: CeleryTask,
    /// Redis database for Celery results; must be empty (it is flushed afterwards).
    #[arg(long, default_value_t = 13)]
    celery_redis_db: u32,
    #[arg(long)]
    celery_venv: Option<PathBuf>,
    #[arg(long, default_value = "python3")]
    python: String,
}

/// `250ms`, `90s`, `5m`, `1h`, or plain seconds.
fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    let (num, unit) = s
        .find(|c: char| !c.is_ascii_digit() && c != '.')
        .map_or((s, "s"), |i| s.split_at(i));
    let v: f64 = num
        .parse()
        .map_err(|e| format!("bad duration {s:?}: {e}"))?;
    let secs = match unit {
        "ms" => v / 1000.0,
        "s" => v,
        "m" => v * 60.0,
        "h" => v * 3600.0,
        _ => return Err(format!("bad unit in {s:?} (ms, s, m, h)")),
    };
    Duration::try_from_secs_f64(secs).map_err(|e| format!("bad duration {s:?}: {e}"))
}

async fn stress(
    endpoint: String,
    token: Option<String>,
    a: StressArgs,
) -> anyhow::Result<ExitCode> {
    let mode = match a.rate {
        Some(rate) if rate > 0.0 => Mode::Open {
            rate,
            max_in_flight: a.max_in_flight.max(1),
        },
        Some(rate) => anyhow::bail!("--rate must be positive, got {rate}"),
        None => Mode::Closed {
            concurrency: a.concurrency.max(1),
        },
    };
    let stop = match (a.runs, a.duration) {
        (_, Some(d)) => Stop::Duration(d),
        (Some(n), None) => Stop::Runs(n),
        (None, None) => Stop::Runs(200),
    };
    let agents = a.agents.max(1);
    let capacity = a.agent_capacity.unwrap_or_else(|| {
        u32::try_from(a.concurrency.div_ceil(agents).max(1)).unwrap_or(u32::MAX)
    });
    let spawn = a.spawn_stack.then(|| SpawnConfig {
        bin_dir: a.bin_dir.clone().unwrap_or_else(spawn::default_bin_dir),
        agents,
        agent_capacity: capacity,
        pg_admin_url: a.services.pg_admin_url.clone(),
        redis_url: a.services.redis_url.clone(),
        rabbit_host: a.services.rabbit_host.clone(),
        log_dir: a.out.join("logs"),
        rust_log: a.stack_log.clone(),
        workspace_root: a.workspace_root.clone(),
    });
    let cfg = StressConfig {
        endpoint,
        spawn,
        workload: a.workload,
        mode,
        stop,
        warmup: a.warmup,
        baselines: a.baselines,
        celery: CeleryConfig {
            task: a.celery_task,
            venv: a.celery_venv.unwrap_or_else(celery::default_venv),
            python: a.python,
            redis_url: a.services.redis_url,
            redis_db: a.celery_redis_db,
            rabbit_host: a.services.rabbit_host,
        },
        pids: a.pids,
        out: a.out.clone(),
        progress: std::io::stdout().is_terminal(),
        token,
    };
    let report = stress::run(cfg).await?;
    for v in &report.violations {
        eprintln!("VIOLATION: {v}");
    }
    for f in &report.failed_baselines {
        eprintln!("BASELINE FAILED: {f}");
    }
    println!("{}", report.one_line());
    eprintln!("report: {}", a.out.display());
    Ok(
        if report.violations.is_empty() && report.failed_baselines.is_empty() {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        },
    )
}

/// The machine's shared services a spawned stack uses (fresh database, vhost, key prefix).
#[derive(Args)]
struct ServiceArgs {
    #[arg(
        long,
        env = "DROVER_TEST_PG_URL",
        default_value = "postgres://drover:drover@127.0.0.1:5432/drover"
    )]
    pg_admin_url: String,
    #[arg(
        long,
        env = "DROVER_TEST_REDIS_URL",
        default_value = "redis://127.0.0.1:6379"
    )]
    redis_url: String,
    #[arg(long, default_value = "127.0.0.1:5672")]
    rabbit_host: String,
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Smoke {
            runs,
            concurrency,
            image,
            command,
        } => {
            let report = smoke::run(
                &cli.endpoint,
                cli.token.as_deref(),
                SmokeConfig {
                    runs,
                    concurrency,
                    image,
                    command,
                },
            )
            .await?;
            for v in &report.violations {
                eprintln!("VIOLATION: {v}");
            }
            println!("{report}");
            Ok(if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
        Command::Stress(args) => stress(cli.endpoint, cli.token, *args).await,
        Command::Run(args) => chaos_run(cli.token, *args).await,
    }
}
