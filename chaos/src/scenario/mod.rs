//! `drover-chaos run`: fault scenarios against a real stack, each judged by the oracle
//! ([`crate::verdict`]).
//!
//! One scenario: start its own stack ([`crate::stack`]; private Redis always, private
//! Postgres / RabbitMQ when the scenario restarts them, proxies when it degrades links) →
//! clients submit mock (or Docker) runs at a steady rate with idempotency keys
//! ([`workload`]) while the fault script ([`faults`]) injects its faults at times drawn from
//! a seeded RNG → every fault is undone → the recovery window: wait until every run is
//! terminal and `drover.dead` is drained (bounded) → collect every witness and judge →
//! stop the stack by PID → the report ([`report`]). A scenario has a hard time bound and
//! stops by itself; its result is `passed` only with no violation and no error.

pub mod faults;
pub mod report;
pub mod timeline;
pub mod workload;

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::client;
use crate::ledger::Pause;
use crate::stack::{Backing, Proxied, SharedServices, Stack, StackConfig};
use crate::verdict::{self, Expectations, Sources};
use report::{RunReport, ScenarioReport, SubmissionCounts};
use timeline::Timeline;
use workload::{RunKind, WorkloadConfig};

/// Lease timing of every scenario's stack: a lost agent's runs come back within seconds.
pub const LEASE_TTL_MS: u64 = 3_000;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, clap::ValueEnum)]
pub enum Scenario {
    AgentKillRestart,
    AgentKillTakeover,
    AgentKillDocker,
    DispatcherKill,
    ApiKill,
    RabbitmqRestart,
    PostgresRestart,
    RedisRestart,
    RedisFlushall,
    Network,
    DuplicatePoison,
    ZombieAgent,
    DiskFull,
}

impl Scenario {
    pub const ALL: [Scenario; 13] = [
        Scenario::AgentKillRestart,
        Scenario::AgentKillTakeover,
        Scenario::AgentKillDocker,
        Scenario::DispatcherKill,
        Scenario::ApiKill,
        Scenario::RabbitmqRestart,
        Scenario::PostgresRestart,
        Scenario::RedisRestart,
        Scenario::RedisFlushall,
        Scenario::Network,
        Scenario::DuplicatePoison,
        Scenario::ZombieAgent,
        Scenario::DiskFull,
    ];

    /// The CI-sized set (`--smoke`).
    pub const SMOKE: [Scenario; 4] = [
        Scenario::AgentKillRestart,
        Scenario::DispatcherKill,
        Scenario::DuplicatePoison,
        Scenario::RedisFlushall,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Scenario::AgentKillRestart => "agent-kill-restart",
            Scenario::AgentKillTakeover => "agent-kill-takeover",
            Scenario::AgentKillDocker => "agent-kill-docker",
            Scenario::DispatcherKill => "dispatcher-kill",
            Scenario::ApiKill => "api-kill",
            Scenario::RabbitmqRestart => "rabbitmq-restart",
            Scenario::PostgresRestart => "postgres-restart",
            Scenario::RedisRestart => "redis-restart",
            Scenario::RedisFlushall => "redis-flushall",
            Scenario::Network => "network",
            Scenario::DuplicatePoison => "duplicate-poison",
            Scenario::ZombieAgent => "zombie-agent",
            Scenario::DiskFull => "disk-full",
        }
    }

    pub fn description(self) -> &'static str {
        match self {
            Scenario::AgentKillRestart => {
                "kill -9 of an agent with runs in flight, restarted seconds later; its lost \
                 mock runs are reported by its next life and retried, and none executes twice \
                 per epoch"
            }
            Scenario::AgentKillTakeover => {
                "kill -9 of an agent that stays down; the other agent takes its runs over \
                 after lease expiry"
            }
            Scenario::AgentKillDocker => {
                "kill -9 of the only agent while Docker containers run, restarted: the \
                 containers are re-adopted or reported, never run twice"
            }
            Scenario::DispatcherKill => {
                "kill -9 of each of two dispatchers in turn, restarted; no run lost or \
                 assigned twice"
            }
            Scenario::ApiKill => {
                "kill -9 of the API during submits, restarted on the same address; clients \
                 retry with their idempotency keys and every key is exactly one run"
            }
            Scenario::RabbitmqRestart => {
                "a private RabbitMQ stopped and started while runs flow; submits keep \
                 succeeding (outbox) and nothing is lost or duplicated"
            }
            Scenario::PostgresRestart => {
                "a private Postgres shut down (fast) and, in the full run, crashed (SIGKILL), \
                 then started; clients retry, nothing lost"
            }
            Scenario::RedisRestart => {
                "a private Redis crashed (SIGKILL, no persistence) and started empty"
            }
            Scenario::RedisFlushall => "FLUSHALL on the stack's private Redis, twice",
            Scenario::Network => {
                "every link (API, Postgres, RabbitMQ, Redis) through a fault proxy: added \
                 latency, connection resets, refused connections and stalls"
            }
            Scenario::DuplicatePoison => {
                "duplicates of real run messages, garbage bytes and an unknown-run message \
                 published to drover.runs: poison lands in drover.dead, valid runs do not, \
                 duplicates change nothing"
            }
            Scenario::ZombieAgent => {
                "an agent frozen (SIGSTOP) past its lease, then thawed (SIGCONT): its \
                 stale-epoch reports are refused, no double effect"
            }
            Scenario::DiskFull => {
                "the API's artifact store on a tiny tmpfs that fills up: runs that cannot \
                 store their files fail with an infrastructure error, never SUCCEED without \
                 them"
            }
        }
    }

    fn plan(self, smoke: bool) -> Plan {
        let base = Plan {
            postgres: Backing::Shared,
            rabbit: Backing::Shared,
            proxied: Proxied::default(),
            agents: 2,
            dispatchers: 1,
            executor: "mock",
            kind: RunKind::Mock { file_bytes: 64 },
            max_attempts: 5,
            rate: if smoke { 2.0 } else { 3.0 },
            workload: Duration::from_secs(if smoke { 12 } else { 25 }),
            recovery: Duration::from_secs(if smoke { 45 } else { 90 }),
            artifact_tmpfs_bytes: None,
        };
        match self {
            Scenario::AgentKillDocker => Plan {
                agents: 1,
                executor: "docker",
                kind: RunKind::Docker,
                rate: 1.0,
                ..base
            },
            Scenario::DispatcherKill => Plan {
                dispatchers: 2,
                ..base
            },
            Scenario::RabbitmqRestart => Plan {
                rabbit: Backing::Private,
                ..base
            },
            Scenario::PostgresRestart => Plan {
                postgres: Backing::Private,
                ..base
            },
            Scenario::Network => Plan {
                proxied: Proxied {
                    postgres: true,
                    amqp: true,
                    redis: true,
                    api: true,
                },
                ..base
            },
            Scenario::ZombieAgent => Plan {
                workload: base.workload.max(Duration::from_secs(25)),
                ..base
            },
            Scenario::DiskFull => Plan {
                kind: RunKind::Mock {
                    file_bytes: 96 * 1024,
                },
                max_attempts: 2,
                rate: 2.0,
                artifact_tmpfs_bytes: Some(1024 * 1024),
                ..base
            },
            _ => base,
        }
    }
}

/// How one scenario's stack and workload are shaped.
#[derive(Debug, Clone)]
pub struct Plan {
    pub postgres: Backing,
    pub rabbit: Backing,
    pub proxied: Proxied,
    pub agents: usize,
    pub dispatchers: usize,
    pub executor: &'static str,
    pub kind: RunKind,
    pub max_attempts: u32,
    pub rate: f64,
    pub workload: Duration,
    pub recovery: Duration,
    /// Mount a tmpfs of this size as the API's artifact store.
    pub artifact_tmpfs_bytes: Option<u64>,
}

#[derive(Debug, Clone)]
pub struct RunConfig {
    pub bin_dir: PathBuf,
    pub shared: SharedServices,
    pub out: PathBuf,
    pub seed: u64,
    pub scenarios: Vec<Scenario>,
    /// Shorter workloads and recovery windows (CI).
    pub smoke: bool,
    pub token: Option<String>,
    pub rust_log: String,
    /// Ctrl-C: the scenario in progress stops and is reported as interrupted.
    pub cancel: CancellationToken,
}

/// What a fault script works with.
pub struct Ctx {
    pub stack: Stack,
    pub rng: fastrand::Rng,
    pub timeline: Timeline,
    pub plan: Plan,
    pub smoke: bool,
    pub pauses: Vec<Pause>,
    pub expect: Expectations,
    /// Scenario-specific findings (e.g. a fault that had no effect).
    pub violations: Vec<String>,
    pub dir: PathBuf,
    /// When the workload started, in seconds on the timeline.
    pub t0: f64,
}

impl Ctx {
    /// Sleeps until `frac` of the workload duration has passed since the workload started.
    pub async fn at(&self, frac: f64) {
        let t = self.t0 + self.plan.workload.as_secs_f64() * frac;
        let now = self.timeline.elapsed_s();
        if t > now {
            tokio::time::sleep(Duration::from_secs_f64(t - now)).await;
        }
    }

    /// A seeded duration in `lo..hi` seconds.
    pub fn secs(&mut self, lo: f64, hi: f64) -> Duration {
        Duration::from_secs_f64(lo + self.rng.f64() * (hi - lo))
    }
}

/// A stable per-scenario seed, so one scenario's fault times do not depend on which others
/// ran before it.
fn scenario_seed(seed: u64, name: &str) -> u64 {
    name.bytes().fold(seed ^ 0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// Runs the scenarios one after the other and writes the report; returns it.
pub async fn run(cfg: RunConfig) -> std::io::Result<RunReport> {
    let mut report = RunReport {
        seed: cfg.seed,
        started_at: chrono::Utc::now().to_rfc3339(),
        scenarios: Vec::new(),
    };
    for &s in &cfg.scenarios {
        if cfg.cancel.is_cancelled() {
            break;
        }
        eprintln!("== {} (seed {})", s.name(), cfg.seed);
        let r = run_one(&cfg, s).await;
        eprintln!(
            "== {}: {} ({} violations{})",
            s.name(),
            if r.passed { "pass" } else { "FAIL" },
            r.violations.len(),
            r.error
                .as_deref()
                .map(|e| format!("; error: {e}"))
                .unwrap_or_default()
        );
        report.scenarios.push(r);
        report.write(&cfg.out)?;
    }
    report.write(&cfg.out)?;
    Ok(report)
}

async fn run_one(cfg: &RunConfig, s: Scenario) -> ScenarioReport {
    let plan = s.plan(cfg.smoke);
    let seed = scenario_seed(cfg.seed, s.name());
    let dir = cfg.out.join(s.name());
    let timeline = Timeline::new();
    let mut rep = ScenarioReport {
        name: s.name().to_owned(),
        description: s.description().to_owned(),
        seed,
        logs: dir.display().to_string(),
        ..Default::default()
    };
    let mut mount = None;
    let result = async {
        std::fs::create_dir_all(&dir).map_err(|e| format!("create {}: {e}", dir.display()))?;
        let mut api_env = Vec::new();
        if let Some(bytes) = plan.artifact_tmpfs_bytes {
            let m = faults::Tmpfs::mount(&dir.join("artifacts"), bytes).await?;
            timeline.note(format!(
                "artifact store on a {} KiB tmpfs at {}",
                bytes / 1024,
                m.path.display()
            ));
            api_env.push((
                "DROVER_ARTIFACTS__ROOT".into(),
                m.path.display().to_string(),
            ));
            mount = Some(m);
        }
        if plan.executor == "docker" {
            faults::require_docker_image("drover/busybox:latest").await?;
        }
        let stack = Stack::start(stack_config(cfg, &plan, &dir, api_env))
            .await
            .map_err(|e| format!("starting the stack: {e}"))?;
        timeline.note(format!(
            "stack up: api {}, {} dispatcher(s), {} agent(s) ({} executor)",
            stack.endpoint, plan.dispatchers, plan.agents, plan.executor
        ));
        let mut ctx = Ctx {
            stack,
            rng: fastrand::Rng::with_seed(seed),
            timeline: timeline.clone(),
            plan: plan.clone(),
            smoke: cfg.smoke,
            pauses: Vec::new(),
            expect: Expectations::default(),
            violations: Vec::new(),
            dir: dir.clone(),
            t0: 0.0,
        };
        if let RunKind::Mock { .. } = plan.kind {
            ctx.expect.artifacts = vec![workload::MOCK_FILE.to_owned()];
        }
        let body = exercise(cfg, s, &mut ctx, seed, &mut rep);
        // Hard bound: faults + workload + recovery + set-up slack.
        let bound = plan.workload + plan.recovery + Duration::from_secs(180);
        let outcome = tokio::select! {
            r = tokio::time::timeout(bound, body) => r.unwrap_or_else(|_| {
                Err(format!("overran its bound of {} s", bound.as_secs()))
            }),
            () = cfg.cancel.cancelled() => Err("interrupted".to_owned()),
        };
        timeline.note("stopping the stack");
        let violations = std::mem::take(&mut ctx.violations);
        ctx.stack.stop().await;
        timeline.note("stack stopped");
        rep.violations.extend(violations);
        outcome
    }
    .await;
    if let Some(m) = mount {
        m.unmount().await;
    }
    if let Err(e) = result {
        timeline.note(format!("error: {e}"));
        rep.error = Some(e);
    }
    rep.timeline = timeline.entries();
    rep.duration_s = timeline.elapsed_s();
    rep.passed = rep.error.is_none() && rep.violations.is_empty();
    rep
}

fn stack_config(
    cfg: &RunConfig,
    plan: &Plan,
    dir: &Path,
    api_env: Vec<(String, String)>,
) -> StackConfig {
    StackConfig {
        bin_dir: cfg.bin_dir.clone(),
        shared: cfg.shared.clone(),
        postgres: plan.postgres,
        rabbit: plan.rabbit,
        // Always private: FLUSHALL and restarts must never reach the shared Redis.
        redis: Backing::Private,
        proxied: plan.proxied,
        dispatchers: plan.dispatchers,
        agents: plan.agents,
        agent_capacity: 8,
        agent_executor: plan.executor.to_owned(),
        allowed_executors: if plan.executor == "mock" {
            String::new()
        } else {
            "mock".into()
        },
        env: vec![
            (
                "DROVER_LEASE__LEASE_TTL_MS".into(),
                LEASE_TTL_MS.to_string(),
            ),
            (
                "DROVER_LEASE__HEARTBEAT_INTERVAL_MS".into(),
                (LEASE_TTL_MS / 5).to_string(),
            ),
            ("DROVER_REAPER__INTERVAL_MS".into(), "500".into()),
        ],
        api_env,
        journal_dir: Some(dir.join("journals")),
        log_dir: dir.join("logs"),
        rust_log: cfg.rust_log.clone(),
    }
}

/// Workload and faults, recovery, judgement. Fills `rep`; `Err` when the scenario could not
/// be carried out.
async fn exercise(
    cfg: &RunConfig,
    s: Scenario,
    ctx: &mut Ctx,
    seed: u64,
    rep: &mut ScenarioReport,
) -> Result<(), String> {
    // The scenario's own stack brings its token; --token overrides it.
    let token = cfg.token.clone().unwrap_or_else(|| ctx.stack.token.clone());
    let conn = client::connect_lazy(&ctx.stack.endpoint, Some(&token), Duration::from_secs(10))
        .map_err(|e| e.to_string())?;
    let stop = CancellationToken::new();
    ctx.t0 = ctx.timeline.elapsed_s();
    let workload = tokio::spawn(workload::drive(
        conn,
        WorkloadConfig {
            kind: ctx.plan.kind,
            rate: ctx.plan.rate,
            duration: ctx.plan.workload,
            max_attempts: ctx.plan.max_attempts,
            key_prefix: format!("{}-{seed}", s.name()),
            give_up_after: Duration::from_secs(90),
        },
        seed,
        ctx.timeline.clone(),
        stop.clone(),
    ));
    let injected = faults::inject(s, ctx).await;
    if injected.is_err() {
        stop.cancel();
    }
    let submissions = workload
        .await
        .map_err(|e| format!("the workload task failed: {e}"))?;
    injected?;
    ctx.timeline.note("faults over; recovery window starts");
    recover(ctx).await.map_err(|e| format!("recovery: {e}"))?;

    let db = ctx.stack.db().map_err(|e| e.to_string())?.clone();
    let (history, problems) = verdict::collect(
        &Sources {
            db: &db,
            amqp_url: &ctx.stack.amqp_direct_url,
            journals: ctx.stack.journals(),
        },
        submissions,
        ctx.pauses.clone(),
    )
    .await
    .map_err(|e| format!("collecting the history: {e}"))?;
    faults::after(s, ctx, &history);
    let mut violations: Vec<String> = problems.iter().map(ToString::to_string).collect();
    violations.extend(
        verdict::judge(&history, &ctx.expect)
            .iter()
            .map(ToString::to_string),
    );
    rep.submissions = SubmissionCounts {
        keys: history.submissions.len(),
        acknowledged: history
            .submissions
            .iter()
            .filter(|s| !s.acked.is_empty())
            .count(),
        retried: history.submissions.iter().filter(|s| s.errors > 0).count(),
        resubmitted: history
            .submissions
            .iter()
            .filter(|s| s.tries > s.errors + 1)
            .count(),
    };
    rep.reassigned = history
        .runs
        .iter()
        .filter(|r| r.events.iter().filter(|e| e.to_state == "ASSIGNED").count() > 1)
        .count();
    let mut outcomes = BTreeMap::new();
    let mut reasons = BTreeMap::new();
    for r in &history.runs {
        *outcomes.entry(r.state.clone()).or_default() += 1;
        if r.state != "SUCCEEDED" {
            let reason = r.reason.clone().unwrap_or_else(|| "(none)".into());
            *reasons.entry(reason).or_default() += 1;
        }
    }
    let mut dead = BTreeMap::new();
    for d in &history.dead_letters {
        *dead.entry(d.kind.clone()).or_default() += 1;
    }
    ctx.timeline.note(format!(
        "oracle: {} runs, {} violations",
        history.runs.len(),
        violations.len() + ctx.violations.len()
    ));
    rep.outcomes = outcomes;
    rep.failure_reasons = reasons;
    rep.dead_letters = dead;
    rep.expectations = ctx.expect.clone();
    rep.violations = violations;
    Ok(())
}

/// Waits (bounded by the plan's recovery window) until no run is left non-terminal, every
/// expected dead letter is archived, `drover.dead` is drained and the outbox is published.
async fn recover(ctx: &Ctx) -> Result<(), String> {
    let db = ctx.stack.db().map_err(|e| e.to_string())?;
    let deadline = tokio::time::Instant::now() + ctx.plan.recovery;
    let expected_dead = i64::try_from(ctx.expect.poison + ctx.expect.unknown_run).unwrap_or(0);
    loop {
        let open: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE state NOT IN \
             ('SUCCEEDED','FAILED','CANCELLED','TIMED_OUT','REJECTED','DEAD_LETTERED')",
        )
        .fetch_one(db)
        .await
        .unwrap_or(-1);
        let archived: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM dead_letters WHERE kind IN ('unparseable', 'unknown_run')",
        )
        .fetch_one(db)
        .await
        .unwrap_or(-1);
        let depth = verdict::dead_queue_depth(&ctx.stack.amqp_direct_url)
            .await
            .ok();
        let outbox = verdict::unpublished_outbox(db).await.unwrap_or(-1);
        if open == 0 && archived >= expected_dead && depth == Some(0) && outbox == 0 {
            ctx.timeline
                .note("recovered: every run terminal, drover.dead drained, outbox published");
            return Ok(());
        }
        if tokio::time::Instant::now() >= deadline {
            ctx.timeline.note(format!(
                "recovery window ({} s) over: {open} runs not terminal, {archived}/{expected_dead} \
                 injected dead letters archived, drover.dead depth {depth:?}, {outbox} outbox \
                 rows due",
                ctx.plan.recovery.as_secs()
            ));
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
}
