//! The fault script of each scenario, and the means to inject faults: signals by PID,
//! private service restarts, proxy faults, messages published straight to RabbitMQ, a tiny
//! tmpfs for the artifact store. Every fault a script injects is undone by the script itself
//! before it returns (restarted, thawed, healed), and noted on the timeline.

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use super::{Ctx, LEASE_TTL_MS, Scenario};
use crate::ledger::Pause;
use crate::verdict::History;

type Res = Result<(), String>;

fn e<E: std::fmt::Display>(what: &str) -> impl FnOnce(E) -> String + '_ {
    move |err| format!("{what}: {err}")
}

/// Runs the scenario's faults while the workload runs; returns once every fault is undone.
pub async fn inject(s: Scenario, ctx: &mut Ctx) -> Res {
    match s {
        Scenario::AgentKillRestart => agent_kill(ctx, true).await,
        Scenario::AgentKillTakeover => agent_kill(ctx, false).await,
        Scenario::AgentKillDocker => agent_kill(ctx, true).await,
        Scenario::DispatcherKill => dispatcher_kill(ctx).await,
        Scenario::ApiKill => api_kill(ctx).await,
        Scenario::RabbitmqRestart => rabbitmq_restart(ctx).await,
        Scenario::PostgresRestart => postgres_restart(ctx).await,
        Scenario::RedisRestart => redis_restart(ctx).await,
        Scenario::RedisFlushall => redis_flushall(ctx).await,
        Scenario::Network => network(ctx).await,
        Scenario::DuplicatePoison => duplicate_poison(ctx).await,
        Scenario::ZombieAgent => zombie(ctx).await,
        Scenario::DiskFull => disk_full(ctx).await,
    }
}

/// Scenario-specific checks once the history is in: did the fault do what it should have?
pub fn after(s: Scenario, ctx: &mut Ctx, h: &History) {
    match s {
        Scenario::DiskFull => {
            let honest = h
                .runs
                .iter()
                .filter(|r| r.state != "SUCCEEDED")
                .filter(|r| r.reason.as_deref().is_some_and(|x| x.contains("artifact")))
                .count();
            ctx.timeline.note(format!(
                "{honest} runs failed because their artifacts could not be stored"
            ));
            if honest == 0 {
                ctx.violations.push(
                    "disk-full: no run failed for lack of artifact space; the store never \
                     filled, so nothing was exercised"
                        .into(),
                );
            }
        }
        Scenario::AgentKillTakeover => {
            let Some(id) = ctx.stack.agent_id("agent-1") else {
                return;
            };
            let taken = h.journal.iter().filter(|j| j.agent_id == id).count();
            ctx.timeline
                .note(format!("agent-1 journaled {taken} execution events"));
        }
        _ => {}
    }
}

async fn agent_kill(ctx: &mut Ctx, restart: bool) -> Res {
    let rounds: &[f64] = if ctx.smoke || !restart {
        &[0.35]
    } else {
        &[0.3, 0.65]
    };
    for &at in rounds {
        let jitter = ctx.rng.f64() * 0.1;
        ctx.at(at + jitter).await;
        wait_for_running(ctx, "agent-0").await;
        ctx.stack.kill9("agent-0").await.map_err(e("kill -9"))?;
        ctx.timeline.note("kill -9 agent-0");
        if restart {
            let down = ctx.secs(1.0, 3.0);
            tokio::time::sleep(down).await;
            ctx.stack
                .restart("agent-0")
                .await
                .map_err(e("restart agent-0"))?;
            ctx.timeline.note("agent-0 restarted and re-registered");
        } else {
            ctx.timeline.note(format!(
                "agent-0 stays down; its leases expire after {} ms and agent-1 takes over",
                LEASE_TTL_MS
            ));
        }
    }
    ctx.at(1.0).await;
    Ok(())
}

/// Waits (at most 10 s) until the agent holds a RUNNING run, so a kill hits work in flight;
/// returns how many it holds.
async fn wait_for_running(ctx: &Ctx, name: &str) -> i64 {
    let (Ok(db), Some(id)) = (ctx.stack.db(), ctx.stack.agent_id(name)) else {
        return 0;
    };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while tokio::time::Instant::now() < deadline {
        let n: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE agent_id = $1 AND state = 'RUNNING'",
        )
        .bind(id)
        .fetch_one(db)
        .await
        .unwrap_or(0);
        if n > 0 {
            ctx.timeline.note(format!("{name} holds {n} running runs"));
            return n;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    0
}

async fn dispatcher_kill(ctx: &mut Ctx) -> Res {
    for (i, at) in [0.25, 0.6].into_iter().enumerate() {
        let jitter = ctx.rng.f64() * 0.1;
        ctx.at(at + jitter).await;
        let name = format!("dispatcher-{i}");
        ctx.stack.kill9(&name).await.map_err(e("kill -9"))?;
        ctx.timeline.note(format!("kill -9 {name}"));
        let down = ctx.secs(1.0, 3.0);
        tokio::time::sleep(down).await;
        ctx.stack.restart(&name).await.map_err(e("restart"))?;
        ctx.timeline.note(format!("{name} restarted"));
    }
    ctx.at(1.0).await;
    Ok(())
}

async fn api_kill(ctx: &mut Ctx) -> Res {
    let rounds: &[f64] = if ctx.smoke { &[0.35] } else { &[0.3, 0.65] };
    for &at in rounds {
        let jitter = ctx.rng.f64() * 0.1;
        ctx.at(at + jitter).await;
        ctx.stack.kill9("api").await.map_err(e("kill -9"))?;
        ctx.timeline.note("kill -9 api (clients keep submitting)");
        let down = ctx.secs(1.0, 2.5);
        tokio::time::sleep(down).await;
        ctx.stack.restart("api").await.map_err(e("restart api"))?;
        ctx.timeline
            .note(format!("api restarted on {}", ctx.stack.endpoint));
    }
    ctx.at(1.0).await;
    Ok(())
}

async fn rabbitmq_restart(ctx: &mut Ctx) -> Res {
    let jitter = ctx.rng.f64() * 0.1;
    ctx.at(0.3 + jitter).await;
    let down = ctx.secs(2.0, 4.0);
    let rabbit = ctx
        .stack
        .private_rabbit
        .as_mut()
        .ok_or("the stack has no private RabbitMQ")?;
    rabbit.stop().await;
    ctx.timeline.note("rabbitmq stopped");
    tokio::time::sleep(down).await;
    let rabbit = ctx
        .stack
        .private_rabbit
        .as_mut()
        .ok_or("the stack has no private RabbitMQ")?;
    rabbit.start().await.map_err(e("start rabbitmq"))?;
    ctx.timeline.note("rabbitmq started again (same port)");
    ctx.at(1.0).await;
    Ok(())
}

async fn postgres_restart(ctx: &mut Ctx) -> Res {
    let rounds: &[(f64, bool)] = if ctx.smoke {
        &[(0.3, false)]
    } else {
        &[(0.25, false), (0.6, true)]
    };
    for &(at, crash) in rounds {
        let jitter = ctx.rng.f64() * 0.1;
        ctx.at(at + jitter).await;
        let down = ctx.secs(1.5, 3.0);
        let pg = ctx
            .stack
            .private_pg
            .as_mut()
            .ok_or("the stack has no private Postgres")?;
        if crash {
            pg.kill();
            ctx.timeline
                .note("postgres crashed (SIGKILL of its process group)");
        } else {
            pg.stop().await;
            ctx.timeline.note("postgres shut down (fast)");
        }
        tokio::time::sleep(down).await;
        let pg = ctx
            .stack
            .private_pg
            .as_mut()
            .ok_or("the stack has no private Postgres")?;
        pg.start().await.map_err(e("start postgres"))?;
        ctx.timeline.note("postgres started again");
    }
    ctx.at(1.0).await;
    Ok(())
}

async fn redis_restart(ctx: &mut Ctx) -> Res {
    let jitter = ctx.rng.f64() * 0.1;
    ctx.at(0.3 + jitter).await;
    let down = ctx.secs(1.0, 3.0);
    let redis = ctx
        .stack
        .private_redis
        .as_mut()
        .ok_or("the stack has no private Redis")?;
    redis.kill();
    ctx.timeline.note("redis crashed (SIGKILL; no persistence)");
    tokio::time::sleep(down).await;
    let redis = ctx
        .stack
        .private_redis
        .as_mut()
        .ok_or("the stack has no private Redis")?;
    redis.start().await.map_err(e("start redis"))?;
    ctx.timeline.note("redis started again, empty");
    ctx.at(1.0).await;
    Ok(())
}

async fn redis_flushall(ctx: &mut Ctx) -> Res {
    for at in [0.3, 0.6] {
        let jitter = ctx.rng.f64() * 0.1;
        ctx.at(at + jitter).await;
        ctx.stack
            .private_redis
            .as_ref()
            .ok_or("the stack has no private Redis")?
            .flushall()
            .await
            .map_err(e("FLUSHALL"))?;
        ctx.timeline.note("redis FLUSHALL");
    }
    ctx.at(1.0).await;
    Ok(())
}

#[derive(Debug, Clone, Copy)]
enum LinkFault {
    Latency(u64),
    Reset,
    Refuse,
    Stall,
}

async fn network(ctx: &mut Ctx) -> Res {
    let mut faults: Vec<(&str, LinkFault)> = vec![
        ("api", LinkFault::Latency(200)),
        ("postgres", LinkFault::Reset),
        ("amqp", LinkFault::Stall),
        ("redis", LinkFault::Refuse),
        ("api", LinkFault::Reset),
        ("postgres", LinkFault::Latency(100)),
        ("api", LinkFault::Stall),
        ("amqp", LinkFault::Reset),
        ("redis", LinkFault::Stall),
        ("postgres", LinkFault::Refuse),
    ];
    ctx.rng.shuffle(&mut faults);
    let n = if ctx.smoke { 4 } else { 8 };
    for (i, (link, fault)) in faults.into_iter().take(n).enumerate() {
        let at = 0.1 + 0.8 * i as f64 / n as f64;
        ctx.at(at).await;
        let hold = ctx.secs(1.0, 3.0);
        let proxy = ctx
            .stack
            .proxy(link)
            .ok_or_else(|| format!("no proxy on the {link} link"))?;
        match fault {
            LinkFault::Latency(ms) => {
                proxy.set_latency(Duration::from_millis(ms));
                ctx.timeline.note(format!(
                    "{link}: +{ms} ms latency for {:.1} s",
                    hold.as_secs_f64()
                ));
                tokio::time::sleep(hold).await;
            }
            LinkFault::Reset => {
                proxy.reset_all();
                ctx.timeline.note(format!("{link}: every connection reset"));
            }
            LinkFault::Refuse => {
                proxy.set_refuse(true);
                proxy.reset_all();
                ctx.timeline.note(format!(
                    "{link}: connections reset and new ones refused for {:.1} s",
                    hold.as_secs_f64()
                ));
                tokio::time::sleep(hold).await;
            }
            LinkFault::Stall => {
                proxy.set_stalled(true);
                ctx.timeline.note(format!(
                    "{link}: stalled (no byte moves) for {:.1} s",
                    hold.as_secs_f64()
                ));
                tokio::time::sleep(hold).await;
            }
        }
        if let Some(p) = ctx.stack.proxy(link) {
            p.heal();
        }
        ctx.timeline.note(format!("{link}: healed"));
    }
    ctx.at(1.0).await;
    Ok(())
}

/// Publishes one persistent message to `drover.runs` with publisher confirms.
async fn publish(amqp_url: &str, routing_key: &str, body: &[u8]) -> Res {
    use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default())
        .await
        .map_err(e("connect to rabbitmq"))?;
    let ch = conn.create_channel().await.map_err(e("channel"))?;
    ch.confirm_select(ConfirmSelectOptions::default())
        .await
        .map_err(e("confirms"))?;
    let confirm = ch
        .basic_publish(
            drover_core::topology::RUNS_EXCHANGE.into(),
            routing_key.into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            body,
            lapin::BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .map_err(e("publish"))?
        .await
        .map_err(e("confirm"))?;
    let _ = conn.close(200, "done".into()).await;
    match confirm {
        lapin::Confirmation::Ack(None) => Ok(()),
        other => Err(format!(
            "message to drover.runs/{routing_key} not routed: {other:?}"
        )),
    }
}

async fn duplicate_poison(ctx: &mut Ctx) -> Res {
    let amqp = ctx.stack.amqp_direct_url.clone();
    for (round, at) in [0.3, 0.6].into_iter().enumerate() {
        let jitter = ctx.rng.f64() * 0.1;
        ctx.at(at + jitter).await;
        let db = ctx.stack.db().map_err(e("db"))?;
        // Real runs, whatever their state now: queued, running or already finished.
        let rows: Vec<(String, String, i32)> = sqlx::query_as(
            "SELECT id::text, tenant_id::text, attempt FROM runs ORDER BY random() LIMIT 5",
        )
        .fetch_all(db)
        .await
        .map_err(e("pick runs"))?;
        for (run, tenant, attempt) in &rows {
            let body = serde_json::json!({
                "v": 1, "run_id": run, "tenant_id": tenant, "attempt": attempt
            });
            publish(&amqp, "default", body.to_string().as_bytes()).await?;
        }
        ctx.timeline.note(format!(
            "published duplicates of {} real run messages",
            rows.len()
        ));
        let poison = if round == 0 { 3 } else { 2 };
        for _ in 0..poison {
            let len = ctx.rng.usize(8..200);
            let mut garbage: Vec<u8> = std::iter::repeat_with(|| ctx.rng.u8(..))
                .take(len)
                .collect();
            // Never valid JSON, and distinct (the archive de-duplicates identical bodies).
            garbage.insert(0, b'\xff');
            publish(&amqp, "default", &garbage).await?;
            ctx.expect.poison += 1;
        }
        ctx.timeline
            .note(format!("published {poison} garbage messages (poison)"));
        if round == 0 {
            let body = serde_json::json!({
                "v": 1,
                "run_id": uuid::Uuid::now_v7(),
                "tenant_id": "00000000-0000-0000-0000-000000000001",
                "attempt": 1
            });
            publish(&amqp, "default", body.to_string().as_bytes()).await?;
            ctx.expect.unknown_run += 1;
            ctx.timeline.note("published a message naming no run");
        }
    }
    ctx.at(1.0).await;
    Ok(())
}

async fn zombie(ctx: &mut Ctx) -> Res {
    let jitter = ctx.rng.f64() * 0.1;
    ctx.at(0.25 + jitter).await;
    let held = wait_for_running(ctx, "agent-0").await;
    let id = ctx
        .stack
        .agent_id("agent-0")
        .ok_or("no agent-0")?
        .to_owned();
    let fenced_before = fenced_reports(&ctx.stack.api_metrics).await;
    let from_ms = ctx.timeline.unix_ms();
    ctx.stack
        .signal("agent-0", Signal::SIGSTOP)
        .map_err(e("SIGSTOP"))?;
    ctx.timeline.note("SIGSTOP agent-0 (zombie)");
    // Past its lease, and long enough for another agent to finish its runs.
    let hold = Duration::from_millis(LEASE_TTL_MS * 3) + ctx.secs(0.0, 2.0);
    tokio::time::sleep(hold).await;
    ctx.stack
        .signal("agent-0", Signal::SIGCONT)
        .map_err(e("SIGCONT"))?;
    let to_ms = ctx.timeline.unix_ms();
    ctx.pauses.push(Pause {
        agent_id: id,
        from_ms,
        to_ms,
    });
    ctx.timeline
        .note(format!("SIGCONT agent-0 after {:.1} s", hold.as_secs_f64()));
    ctx.at(1.0).await;
    let fenced_after = fenced_reports(&ctx.stack.api_metrics).await;
    if let (Some(a), Some(b)) = (fenced_before, fenced_after) {
        ctx.timeline.note(format!(
            "api refused {} calls from an agent that lost the lease (drover_fenced_reports_total)",
            b - a
        ));
    }
    // The zombie's own record of what the API refused it once it woke up: uploads and
    // reports under its old epoch, and assignments that had moved on.
    let log = std::fs::read_to_string(ctx.stack.log_path("agent-0")).unwrap_or_default();
    let refused = log.lines().filter(|l| l.contains("stale")).count();
    ctx.timeline.note(format!(
        "agent-0 logged {refused} stale-epoch calls refused or dropped after waking"
    ));
    if held > 0 && refused == 0 {
        ctx.violations.push(format!(
            "zombie-agent: agent-0 held {held} running runs when frozen but logged no refused \
             stale-epoch call; fencing was not exercised"
        ));
    }
    Ok(())
}

/// `drover_fenced_reports_total` from the API's `/metrics` (a plain HTTP/1.0 GET).
async fn fenced_reports(metrics_url: &str) -> Option<f64> {
    let addr = metrics_url.strip_prefix("http://")?;
    let mut s = tokio::net::TcpStream::connect(addr).await.ok()?;
    s.write_all(format!("GET /metrics HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await
        .ok()?;
    let mut body = String::new();
    tokio::time::timeout(Duration::from_secs(5), s.read_to_string(&mut body))
        .await
        .ok()?
        .ok()?;
    Some(
        body.lines()
            .filter(|l| l.starts_with(drover_core::observe::names::FENCED_REPORTS))
            .filter_map(|l| l.split_whitespace().last()?.parse::<f64>().ok())
            .sum(),
    )
}

async fn disk_full(ctx: &mut Ctx) -> Res {
    // The workload itself fills the store; nothing else to inject.
    ctx.at(1.0).await;
    Ok(())
}

/// A size-limited tmpfs (needs root or CAP_SYS_ADMIN), unmounted at the end.
#[derive(Debug)]
pub struct Tmpfs {
    pub path: PathBuf,
}

impl Tmpfs {
    pub async fn mount(path: &Path, bytes: u64) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(e("create the mount point"))?;
        let out = tokio::process::Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={bytes}")])
            .arg("tmpfs")
            .arg(path)
            .output()
            .await
            .map_err(e("run mount"))?;
        if !out.status.success() {
            return Err(format!(
                "cannot mount a tmpfs at {} (needs root or CAP_SYS_ADMIN): {}",
                path.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            ));
        }
        Ok(Tmpfs {
            path: path.to_owned(),
        })
    }

    pub async fn unmount(self) {
        let _ = tokio::process::Command::new("umount")
            .arg(&self.path)
            .status()
            .await;
    }
}

/// Docker answers and has the test image (built by the end-to-end tests' helpers).
pub async fn require_docker_image(image: &str) -> Res {
    let out = tokio::process::Command::new("docker")
        .args(["image", "inspect", "--format", "{{.Id}}", image])
        .output()
        .await
        .map_err(e("run docker"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "docker image {image} missing or the daemon does not answer: {} (the end-to-end \
             tests build it; see tests/src/services.rs)",
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}
