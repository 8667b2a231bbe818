//! The API, dispatchers and agents survive RabbitMQ, Postgres and Redis restarts (issue 3,
//! items 2 and 12): they reconnect, re-declare topology, resume consuming, and lose nothing.
//!
//! Each test starts a private instance of the service it breaks ([`drover_tests::private`]) on
//! its own port and data directory, the real `drover-api`, `drover-dispatcher` and
//! `drover-agent` binaries against it (the other services are the shared ones, isolated per
//! test as usual), and runs real containers in Docker. The oracle is the shared ledger
//! (`drover_chaos::ledger`): every run terminal exactly once with gap-free events, one
//! ASSIGNED event per attempt, and — from the agent's execution journal — one execution per
//! lease epoch with no overlaps. No timing is asserted; the limits are only there so a hang
//! fails instead of running forever.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use drover_chaos::ledger;
use drover_proto::v1 as pb;
use drover_tests::private::{PrivatePostgres, PrivateRabbit, PrivateRedis};
use drover_tests::{Stack, StackOptions, services};
use uuid::Uuid;

const IMAGE: &str = "drover/busybox:latest";
const TERMINAL: [&str; 6] = [
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "TIMED_OUT",
    "REJECTED",
    "DEAD_LETTERED",
];

fn spec(cmd: &[&str]) -> pb::RunSpec {
    pb::RunSpec {
        image: IMAGE.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout_seconds: 300,
        ..Default::default()
    }
}

/// Options that turn on the agent's execution journal, in a directory of its own that
/// outlives a failed test (like the process logs) and is removed once the oracle passed.
fn with_journal(mut opts: StackOptions) -> (StackOptions, PathBuf) {
    let dir = std::env::temp_dir().join(format!("drover-restarts-{}", Uuid::now_v7().simple()));
    std::fs::create_dir_all(&dir).unwrap();
    let journal = dir.join("executions.jsonl");
    opts.env.push((
        "DROVER_EXECUTION_JOURNAL".into(),
        journal.display().to_string(),
    ));
    (opts, journal)
}

async fn submit_with(
    stack: &Stack,
    client: &mut drover_tests::stack::RunClient,
    s: pb::RunSpec,
) -> pb::Run {
    match client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(s),
            idempotency_key: String::new(),
        })
        .await
    {
        Ok(resp) => resp.into_inner().run.expect("run"),
        Err(e) => {
            stack.dump_logs();
            panic!("SubmitRun failed: {e:?}");
        }
    }
}

async fn submit(stack: &Stack, s: pb::RunSpec) -> pb::Run {
    let mut client = stack.client().await;
    submit_with(stack, &mut client, s).await
}

fn uuids(ids: &[String]) -> Vec<Uuid> {
    ids.iter().map(|id| Uuid::parse_str(id).unwrap()).collect()
}

/// The states of `ids` once every one is terminal; fails (with the logs) after `limit`.
/// Query errors count as "not yet": Postgres may be restarting.
async fn wait_terminal(stack: &Stack, ids: &[String], limit: Duration) -> HashMap<String, String> {
    wait_states(stack, ids, limit, "terminal", |s| TERMINAL.contains(&s)).await
}

async fn wait_states(
    stack: &Stack,
    ids: &[String],
    limit: Duration,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> HashMap<String, String> {
    let wanted = uuids(ids);
    let deadline = Instant::now() + limit;
    let mut last: HashMap<String, String> = HashMap::new();
    loop {
        let rows =
            sqlx::query_as::<_, (Uuid, String)>("SELECT id, state FROM runs WHERE id = ANY($1)")
                .bind(&wanted)
                .fetch_all(&stack.db)
                .await;
        match rows {
            Ok(rows) => {
                last = rows
                    .into_iter()
                    .map(|(id, s)| (id.to_string(), s))
                    .collect();
                if last.len() == ids.len() && last.values().all(|s| done(s)) {
                    return last;
                }
            }
            Err(e) => eprintln!("polling run states: {e}"),
        }
        if Instant::now() >= deadline {
            stack.dump_logs();
            let open: Vec<String> = ids
                .iter()
                .filter(|id| !last.get(*id).is_some_and(|s| done(s)))
                .cloned()
                .collect();
            panic!(
                "{} of {} runs not {what} after {limit:?}:{}",
                open.len(),
                ids.len(),
                describe(stack, &open).await
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// RUNNING, or already past it: the container was started.
fn started(state: &str) -> bool {
    state == "RUNNING" || TERMINAL.contains(&state)
}

/// Each run's state, events and containers, for failure messages.
async fn describe(stack: &Stack, ids: &[String]) -> String {
    let mut report = String::new();
    for id in ids {
        let state: Option<String> = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1")
            .bind(Uuid::parse_str(id).unwrap())
            .fetch_optional(&stack.db)
            .await
            .ok()
            .flatten();
        let events: Vec<String> = sqlx::query_scalar(
            "SELECT format('#%s -> %s, attempt %s, epoch %s, at %s: %s', \
                           seq, to_state, attempt, lease_epoch, at, reason) \
             FROM run_events WHERE run_id = $1 ORDER BY seq",
        )
        .bind(Uuid::parse_str(id).unwrap())
        .fetch_all(&stack.db)
        .await
        .unwrap_or_default();
        let containers = services::containers_for_run(id);
        report.push_str(&format!(
            "\nrun {id} ({state:?}), containers {containers:?}:"
        ));
        for e in events {
            report.push_str(&format!("\n  {e}"));
        }
    }
    report
}

/// Every run SUCCEEDED; otherwise fails with each other run's events (and the logs).
async fn assert_all_succeeded(stack: &Stack, states: &HashMap<String, String>) {
    let failed: Vec<String> = states
        .iter()
        .filter(|(_, s)| *s != "SUCCEEDED")
        .map(|(id, _)| id.clone())
        .collect();
    if failed.is_empty() {
        return;
    }
    stack.dump_logs();
    let report = describe(stack, &failed).await;
    panic!(
        "{} of {} runs did not succeed:{report}",
        failed.len(),
        states.len()
    );
}

/// The oracle over `ids`: the ledger of events, one ASSIGNED event per attempt, and the
/// agent's execution journal (one execution per RUNNING event, none overlapping).
async fn check_ledger(stack: &Stack, ids: &[String], journal: &Path) {
    let wanted = uuids(ids);
    let violations = ledger::check_events(&stack.db, Some(&wanted))
        .await
        .unwrap();
    assert!(violations.is_empty(), "event ledger: {violations:?}");

    let assigned: Vec<(Uuid, i32, i64)> = sqlx::query_as(
        "SELECT r.id, a.n, (SELECT count(*) FROM run_events e \
                             WHERE e.run_id = r.id AND e.attempt = a.n AND e.to_state = 'ASSIGNED') \
         FROM runs r CROSS JOIN LATERAL generate_series(1, r.attempt) AS a(n) \
         WHERE r.id = ANY($1)",
    )
    .bind(&wanted)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    let wrong: Vec<_> = assigned.iter().filter(|(_, _, n)| *n != 1).collect();
    assert!(
        wrong.is_empty(),
        "(run, attempt, ASSIGNED events) that are not exactly one: {wrong:?}"
    );

    let entries = ledger::read_journals(&[journal]).unwrap();
    let overlaps = ledger::check_executions(&entries);
    assert!(overlaps.is_empty(), "executions: {overlaps:?}");
    let running: Vec<(Uuid, i64)> = sqlx::query_as(
        "SELECT r.id, (SELECT count(*) FROM run_events e \
                       WHERE e.run_id = r.id AND e.to_state = 'RUNNING') \
         FROM runs r WHERE r.id = ANY($1)",
    )
    .bind(&wanted)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    for (id, runs) in running {
        let id = id.to_string();
        let started = entries
            .iter()
            .filter(|e| e.run_id == id && e.event == "started")
            .count();
        assert_eq!(
            started as i64, runs,
            "run {id}: containers started per the agent's journal vs RUNNING events"
        );
    }
    if let Some(dir) = journal.parent() {
        let _ = std::fs::remove_dir_all(dir);
    }
}

async fn pending_outbox(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM outbox WHERE published_at IS NULL")
        .fetch_one(&stack.db)
        .await
        .unwrap()
}

/// A run through the whole pipeline: proves every consumer is (still) live.
async fn one_run_succeeds(stack: &Stack, label: &str) {
    let run = submit(stack, spec(&["echo", label])).await;
    let states = wait_terminal(stack, &[run.id], Duration::from_secs(120)).await;
    assert_all_succeeded(stack, &states).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn submits_succeed_while_rabbitmq_is_down_and_run_when_it_returns() {
    let t0 = Instant::now();
    let mut rabbit = PrivateRabbit::launch().await;
    let (opts, journal) = with_journal(StackOptions {
        amqp_url: Some(rabbit.url()),
        ..Default::default()
    });
    let stack = Stack::start_with(opts).await;
    eprintln!(
        "process logs in {}, execution journal {}",
        stack.log_dir.display(),
        journal.display()
    );
    one_run_succeeds(&stack, "before the outage").await;
    eprintln!("[{:?}] stack warm", t0.elapsed());

    rabbit.stop().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let run = submit(
            &stack,
            spec(&["echo", &format!("submitted while down {i}")]),
        )
        .await;
        assert_eq!(run.state, pb::RunState::Queued as i32, "accepted as QUEUED");
        ids.push(run.id);
    }
    // Give the relays time to try (and fail) to publish: nothing moves, nothing is lost.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let states = wait_states(&stack, &ids, Duration::from_secs(5), "QUEUED", |s| {
        s == "QUEUED"
    })
    .await;
    assert_eq!(states.len(), 5);
    let pending = pending_outbox(&stack).await;
    assert!(
        pending >= 5,
        "one unpublished outbox row per run submitted while RabbitMQ is down, got {pending}"
    );
    eprintln!(
        "[{:?}] 5 runs QUEUED, {pending} outbox rows pending",
        t0.elapsed()
    );

    rabbit.start().await;
    let states = wait_terminal(&stack, &ids, Duration::from_secs(120)).await;
    assert_all_succeeded(&stack, &states).await;
    eprintln!(
        "[{:?}] all runs succeeded after RabbitMQ returned",
        t0.elapsed()
    );
    let drained = stack
        .wait_for(Duration::from_secs(30), || async {
            pending_outbox(&stack).await == 0
        })
        .await;
    assert!(
        drained,
        "every outbox row published after RabbitMQ returned"
    );
    check_ledger(&stack, &ids, &journal).await;
    stack.stop().await;
    eprintln!("[{:?}] done", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rabbitmq_restart_during_a_stream_of_submits_loses_and_duplicates_nothing() {
    let t0 = Instant::now();
    let mut rabbit = PrivateRabbit::launch().await;
    let (opts, journal) = with_journal(StackOptions {
        amqp_url: Some(rabbit.url()),
        ..Default::default()
    });
    let stack = Stack::start_with(opts).await;
    eprintln!("process logs in {}", stack.log_dir.display());
    one_run_succeeds(&stack, "before the restart").await;
    eprintln!("[{:?}] stack warm", t0.elapsed());

    // 30 submits, one every 300 ms, from their own task; RabbitMQ restarts after the 10th.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
    let mut client = stack.client().await;
    let submitter = tokio::spawn(async move {
        for i in 0..30 {
            let res = client
                .submit_run(pb::SubmitRunRequest {
                    spec: Some(spec(&["echo", &format!("stream {i}")])),
                    idempotency_key: String::new(),
                })
                .await
                .map(|r| r.into_inner().run.expect("run"));
            let failed = res.is_err();
            let _ = tx.send(res);
            if failed {
                return;
            }
            tokio::time::sleep(Duration::from_millis(300)).await;
        }
    });
    let mut ids = Vec::new();
    let mut receive = async |ids: &mut Vec<String>| match rx.recv().await {
        Some(Ok(run)) => {
            ids.push(run.id);
            true
        }
        Some(Err(e)) => {
            stack.dump_logs();
            panic!("SubmitRun failed around the RabbitMQ restart: {e:?}");
        }
        None => false,
    };
    while ids.len() < 10 {
        assert!(receive(&mut ids).await, "submitter ended early");
    }
    eprintln!(
        "[{:?}] restarting RabbitMQ after {} submits",
        t0.elapsed(),
        ids.len()
    );
    rabbit.restart().await;
    eprintln!(
        "[{:?}] RabbitMQ back after {} submits",
        t0.elapsed(),
        ids.len()
    );
    while receive(&mut ids).await {}
    submitter.await.unwrap();
    assert_eq!(ids.len(), 30, "every submit accepted");

    let states = wait_terminal(&stack, &ids, Duration::from_secs(300)).await;
    assert_all_succeeded(&stack, &states).await;
    eprintln!("[{:?}] all 30 runs succeeded", t0.elapsed());

    // The consumers resumed: a run submitted now, after everything settled, still executes.
    one_run_succeeds(&stack, "after the restart").await;
    eprintln!("[{:?}] a new run succeeded after the restart", t0.elapsed());
    check_ledger(&stack, &ids, &journal).await;
    stack.stop().await;
    eprintln!("[{:?}] done", t0.elapsed());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_postgres_restart_while_runs_execute_loses_nothing() {
    let t0 = Instant::now();
    let mut pg = PrivatePostgres::launch().await;
    // Leases of 30 s: this test is about reconnecting, so an outage longer than the pools'
    // 5 s acquire timeout (calls fail and must be retried) must not also expire leases.
    let (mut opts, journal) = with_journal(StackOptions {
        database_url: Some(pg.url()),
        ..Default::default()
    });
    opts.env
        .push(("DROVER_LEASE__LEASE_TTL_MS".into(), "30000".into()));
    let stack = Stack::start_with(opts).await;
    eprintln!(
        "process logs in {}, execution journal {}",
        stack.log_dir.display(),
        journal.display()
    );
    eprintln!("[{:?}] stack up", t0.elapsed());

    // As many runs as the agent has slots, all executing when Postgres goes away.
    let mut ids = Vec::new();
    for i in 0..4 {
        let run = submit(
            &stack,
            spec(&["sh", "-c", &format!("sleep 3; echo pg {i}")]),
        )
        .await;
        ids.push(run.id);
    }
    wait_states(&stack, &ids, Duration::from_secs(120), "started", started).await;
    eprintln!("[{:?}] 4 runs started; restarting Postgres", t0.elapsed());
    // Down for 8 s: the runs end while it is away, and calls waiting for a connection time
    // out (5 s) and must be retried.
    pg.stop().await;
    tokio::time::sleep(Duration::from_secs(8)).await;
    pg.start().await;
    eprintln!("[{:?}] Postgres back", t0.elapsed());

    // New work after the restart goes through the API, the dispatcher and the agent too.
    for i in 0..2 {
        let run = submit(&stack, spec(&["echo", &format!("after pg restart {i}")])).await;
        ids.push(run.id);
    }
    let states = wait_terminal(&stack, &ids, Duration::from_secs(120)).await;
    assert_all_succeeded(&stack, &states).await;
    eprintln!("[{:?}] all 6 runs succeeded", t0.elapsed());
    check_ledger(&stack, &ids, &journal).await;
    stack.stop().await;
    eprintln!("[{:?}] done", t0.elapsed());
}

/// Follows WatchRun to its end; every event it delivered.
async fn watch(
    endpoint: String,
    token: String,
    run_id: String,
) -> Result<Vec<pb::RunEvent>, String> {
    let channel = tonic::transport::Channel::from_shared(endpoint)
        .map_err(|e| format!("endpoint: {e}"))?
        .connect()
        .await
        .map_err(|e| format!("connect: {e}"))?;
    let bearer = drover_core::bearer::Bearer::new(&token).map_err(|e| e.to_string())?;
    let mut client = pb::run_service_client::RunServiceClient::with_interceptor(channel, bearer);
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.clone(),
        })
        .await
        .map_err(|e| format!("WatchRun {run_id}: {e:?}"))?
        .into_inner();
    let mut events = Vec::new();
    let follow = async {
        loop {
            match stream.message().await {
                Ok(Some(m)) => events.push(m.event.ok_or("message without event")?),
                Ok(None) => return Ok::<_, String>(()),
                Err(e) => return Err(format!("WatchRun {run_id} broke: {e:?}")),
            }
        }
    };
    tokio::time::timeout(Duration::from_secs(120), follow)
        .await
        .map_err(|_| format!("WatchRun {run_id} did not end within 120 s"))??;
    Ok(events)
}

/// The watcher saw exactly the run's events in Postgres, gap-free, ending in SUCCEEDED.
async fn assert_watched_everything(stack: &Stack, run_id: &str, events: &[pb::RunEvent]) {
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM run_events WHERE run_id = $1")
        .bind(Uuid::parse_str(run_id).unwrap())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    let seqs: Vec<u64> = events.iter().map(|e| e.seq).collect();
    assert_eq!(
        seqs,
        (1..=stored as u64).collect::<Vec<_>>(),
        "run {run_id}: the watcher got every stored event once, in order"
    );
    assert_eq!(
        events.last().map(|e| e.to_state),
        Some(pb::RunState::Succeeded as i32),
        "run {run_id}: the stream ends with SUCCEEDED"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_flush_and_restart_mid_run_lose_no_watch_event() {
    let t0 = Instant::now();
    let mut redis = PrivateRedis::launch().await;
    let (opts, journal) = with_journal(StackOptions {
        redis_url: redis.url(),
        ..Default::default()
    });
    let stack = Stack::start_with(opts).await;
    eprintln!(
        "process logs in {}, execution journal {}",
        stack.log_dir.display(),
        journal.display()
    );
    eprintln!("[{:?}] stack up", t0.elapsed());

    let mut ids = Vec::new();
    let mut watchers = Vec::new();
    for i in 0..3 {
        let run = submit(
            &stack,
            spec(&["sh", "-c", &format!("sleep 4; echo redis {i}")]),
        )
        .await;
        watchers.push(tokio::spawn(watch(
            stack.endpoint.clone(),
            stack.token.clone(),
            run.id.clone(),
        )));
        ids.push(run.id);
    }
    wait_states(&stack, &ids, Duration::from_secs(120), "started", started).await;
    eprintln!("[{:?}] 3 runs started; FLUSHALL", t0.elapsed());
    redis.flushall().await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    redis.stop().await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    redis.start().await;
    eprintln!("[{:?}] Redis restarted (down 2 s)", t0.elapsed());

    for (id, watcher) in ids.iter().zip(watchers) {
        let events = match watcher.await.unwrap() {
            Ok(events) => events,
            Err(e) => {
                stack.dump_logs();
                panic!("{e}");
            }
        };
        assert_watched_everything(&stack, id, &events).await;
    }
    let states = wait_terminal(&stack, &ids, Duration::from_secs(30)).await;
    assert_all_succeeded(&stack, &states).await;
    eprintln!("[{:?}] 3 runs succeeded, every event watched", t0.elapsed());

    // After the restart, a new run is watched from submit to end as well.
    let run = submit(&stack, spec(&["echo", "after the redis restart"])).await;
    let events = watch(stack.endpoint.clone(), stack.token.clone(), run.id.clone())
        .await
        .unwrap_or_else(|e| {
            stack.dump_logs();
            panic!("{e}")
        });
    assert_watched_everything(&stack, &run.id, &events).await;
    ids.push(run.id);
    check_ledger(&stack, &ids, &journal).await;
    stack.stop().await;
    eprintln!("[{:?}] done", t0.elapsed());
}
