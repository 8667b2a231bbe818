//! Issue 6 ("See inside"), metrics and health, through the real binaries: each service's
//! `/metrics` parses as Prometheus text (with `prometheus-parse`) and its counters move by
//! exactly what a handful of runs did; `/readyz` and `grpc.health.v1` flip when the agent
//! drains and when Postgres stops (a private instance), and come back with it.
//!
//! No timing is asserted; the limits only turn a hang into a failure.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::fake_agent::{in_state, submit, wait_run};
use drover_tests::private::PrivatePostgres;
use drover_tests::scrape::{Metrics, http_get, scrape};
use drover_tests::{Stack, StackOptions};
use tonic_health::pb::HealthCheckRequest;
use tonic_health::pb::health_check_response::ServingStatus;
use tonic_health::pb::health_client::HealthClient;

const IMAGE: &str = "drover/busybox:latest";
const LIMIT: Duration = Duration::from_secs(120);

fn spec(cmd: &[&str]) -> pb::RunSpec {
    pb::RunSpec {
        image: IMAGE.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout_seconds: 300,
        ..Default::default()
    }
}

/// `after - before` of a counter or gauge.
fn delta(before: &Metrics, after: &Metrics, name: &str, labels: &[(&str, &str)]) -> f64 {
    after.value(name, labels) - before.value(name, labels)
}

fn hist_delta(before: &Metrics, after: &Metrics, name: &str) -> f64 {
    after.histogram_count(name) - before.histogram_count(name)
}

/// Scrapes `base` until `cond` holds on the result; panics with the last scrape after LIMIT.
async fn scrape_until(
    stack: &Stack,
    base: &str,
    what: &str,
    cond: impl Fn(&Metrics) -> bool,
) -> Metrics {
    let deadline = tokio::time::Instant::now() + LIMIT;
    loop {
        let m = scrape(base).await;
        if cond(&m) {
            return m;
        }
        if tokio::time::Instant::now() > deadline {
            stack.dump_logs();
            panic!("{what}: not reached; last scrape of {base}:\n{}", m.text);
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Polls `GET base/readyz` until it answers `want`; returns the body.
async fn readyz_becomes(stack: &Stack, base: &str, want: u16) -> String {
    let deadline = tokio::time::Instant::now() + LIMIT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match http_get(base, "/readyz").await {
            Ok((status, body)) if status == want => return body,
            Ok((status, body)) => last = format!("{status} {body}"),
            Err(e) => last = e.to_string(),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    stack.dump_logs();
    panic!("{base}/readyz never answered {want}; last: {last}");
}

async fn grpc_status(stack: &Stack, service: &str) -> Option<ServingStatus> {
    let mut client = HealthClient::new(stack.channel().await);
    let resp = client
        .check(HealthCheckRequest {
            service: service.into(),
        })
        .await
        .ok()?;
    ServingStatus::try_from(resp.into_inner().status).ok()
}

async fn grpc_becomes(stack: &Stack, want: ServingStatus) {
    let ok = stack
        .wait_for(LIMIT, || async {
            grpc_status(stack, "").await == Some(want)
                && grpc_status(stack, "drover.v1.RunService").await == Some(want)
                && grpc_status(stack, "drover.v1.AgentService").await == Some(want)
        })
        .await;
    if !ok {
        stack.dump_logs();
        panic!("grpc health never became {want:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn counters_move_by_what_the_runs_did() {
    let stack = Stack::start().await;
    let api = stack.metrics_url("api").await;
    let dispatcher = stack.metrics_url("dispatcher").await;
    let agent = stack.metrics_url(&stack.agent_id).await;
    let (api0, disp0, agent0) = (
        scrape(&api).await,
        scrape(&dispatcher).await,
        scrape(&agent).await,
    );

    // 3 succeed, 1 fails for good, 1 fails, is retried once and is dead-lettered.
    let mut ids = Vec::new();
    for i in 0..3 {
        ids.push(
            submit(
                &stack,
                spec(&["sh", "-c", &format!("echo metrics run {i}")]),
            )
            .await,
        );
    }
    let failing = submit(&stack, spec(&["sh", "-c", "echo failing >&2; exit 3"])).await;
    let mut retried = spec(&["sh", "-c", "exit 4"]);
    retried.max_attempts = 2;
    retried.retry = Some(pb::RetryPolicy {
        initial_backoff_ms: 100,
        retry_exit_codes: vec![4],
        ..Default::default()
    });
    let dead = submit(&stack, retried).await;
    for id in &ids {
        wait_run(&stack, id, LIMIT, in_state(pb::RunState::Succeeded)).await;
    }
    wait_run(&stack, &failing, LIMIT, in_state(pb::RunState::Failed)).await;
    wait_run(&stack, &dead, LIMIT, in_state(pb::RunState::DeadLettered)).await;

    // API: submissions, ends by state, the retry, and every byte of output it stored.
    let api1 = scrape(&api).await;
    assert_eq!(
        delta(&api0, &api1, "drover_runs_submitted_total", &[]),
        5.0,
        "{}",
        api1.text
    );
    assert_eq!(
        delta(
            &api0,
            &api1,
            "drover_runs_ended_total",
            &[("state", "SUCCEEDED")]
        ),
        3.0
    );
    assert_eq!(
        delta(
            &api0,
            &api1,
            "drover_runs_ended_total",
            &[("state", "FAILED")]
        ),
        1.0
    );
    assert_eq!(
        delta(
            &api0,
            &api1,
            "drover_runs_ended_total",
            &[("state", "DEAD_LETTERED")]
        ),
        1.0
    );
    assert_eq!(delta(&api0, &api1, "drover_runs_ended_total", &[]), 5.0);
    assert_eq!(delta(&api0, &api1, "drover_run_retries_total", &[]), 1.0);
    assert_eq!(
        delta(
            &api0,
            &api1,
            "drover_run_transitions_total",
            &[("from", "ASSIGNED"), ("to", "RUNNING")]
        ),
        6.0,
        "6 attempts started"
    );
    let stored: i64 =
        sqlx::query_scalar("SELECT COALESCE(sum(length(data)), 0)::bigint FROM run_logs")
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert!(stored > 0);
    assert_eq!(
        delta(&api0, &api1, "drover_log_bytes_received_total", &[]),
        stored as f64
    );
    assert!(api1.has("drover_pg_pool_connections"), "{}", api1.text);
    assert!(api1.has("drover_outbox_backlog"));
    assert_eq!(api1.value("drover_ready", &[]), 1.0);

    // Dispatcher: six assignments, each with its queue wait and dispatch latency; the
    // exhausted run's record archived from drover.dead.
    let disp1 = scrape_until(&stack, &dispatcher, "dead letter archived", |m| {
        delta(
            &disp0,
            m,
            "drover_dead_letters_archived_total",
            &[("kind", "run_exhausted")],
        ) >= 1.0
    })
    .await;
    assert_eq!(
        delta(&disp0, &disp1, "drover_dead_letters_archived_total", &[]),
        1.0
    );
    assert_eq!(
        delta(&disp0, &disp1, "drover_assignments_total", &[]),
        6.0,
        "{}",
        disp1.text
    );
    assert_eq!(
        delta(
            &disp0,
            &disp1,
            "drover_run_transitions_total",
            &[("from", "QUEUED"), ("to", "ASSIGNED")]
        ),
        6.0
    );
    assert_eq!(hist_delta(&disp0, &disp1, "drover_queue_wait_seconds"), 6.0);
    // Dispatch latency covers runs assigned on arrival; a run that found no free slot is
    // parked and assigned later by the parked-run scheduler. Each run is one or the other.
    assert_eq!(
        hist_delta(&disp0, &disp1, "drover_dispatch_latency_seconds")
            + delta(&disp0, &disp1, "drover_runs_parked_total", &[]),
        6.0,
        "{}",
        disp1.text
    );
    assert_eq!(
        delta(&disp0, &disp1, "drover_runs_ended_total", &[]),
        0.0,
        "agents end runs through the API"
    );
    // Both relays publish from the same outbox (SKIP LOCKED): together, at least the 5
    // submits, the retry, the dead-run record and the 6 agent commands. A relay counts a row
    // when its confirm is back, which can be after the scrapes above (the dead run's record
    // archived, or the run seen DEAD_LETTERED, before its publisher heard the confirm).
    let published_by_both = || async {
        delta(
            &api0,
            &scrape(&api).await,
            "drover_outbox_published_total",
            &[],
        ) + delta(
            &disp0,
            &scrape(&dispatcher).await,
            "drover_outbox_published_total",
            &[],
        )
    };
    stack
        .wait_for(LIMIT, || async { published_by_both().await >= 13.0 })
        .await;
    let published = published_by_both().await;
    assert!(published >= 13.0, "published {published}");
    let confirmed = hist_delta(&api0, &api1, "drover_amqp_publish_confirm_seconds")
        + hist_delta(&disp0, &disp1, "drover_amqp_publish_confirm_seconds");
    assert!(confirmed >= 1.0);
    assert!(disp1.has("drover_pg_pool_idle_connections"));

    // Agent: six containers started and followed to their end, capacity as configured.
    let agent1 = scrape_until(&stack, &agent, "six executions ended", |m| {
        hist_delta(&agent0, m, "drover_execution_duration_seconds") >= 6.0
    })
    .await;
    assert_eq!(
        hist_delta(&agent0, &agent1, "drover_execution_duration_seconds"),
        6.0
    );
    assert_eq!(
        delta(&agent0, &agent1, "drover_executions_started_total", &[]),
        6.0
    );
    assert_eq!(
        hist_delta(&agent0, &agent1, "drover_container_start_seconds"),
        6.0
    );
    assert_eq!(agent1.value("drover_agent_capacity", &[]), 4.0);

    // Labels stay bounded: no run id appears anywhere in any scrape.
    for m in [&api1, &disp1, &agent1] {
        for id in ids.iter().chain([&failing, &dead]) {
            assert!(!m.text.contains(id.as_str()), "run id {id} in metrics");
        }
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn agent_not_ready_while_draining() {
    let mut stack = Stack::start().await;
    let api = stack.metrics_url("api").await;
    let agent = stack.metrics_url(&stack.agent_id).await;
    assert_eq!(http_get(&api, "/healthz").await.unwrap().0, 200);
    readyz_becomes(&stack, &api, 200).await;
    let body = readyz_becomes(&stack, &agent, 200).await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], true, "{body}");
    assert_eq!(report["checks"]["api"], "ok", "{body}");

    // A run that keeps the draining agent alive for a few seconds.
    let run = submit(&stack, spec(&["sh", "-c", "sleep 5; echo done"])).await;
    wait_run(&stack, &run, LIMIT, in_state(pb::RunState::Running)).await;
    stack
        .admin()
        .await
        .drain_agent(pb::DrainAgentRequest {
            agent_id: stack.agent_id.clone(),
        })
        .await
        .unwrap();
    let body = readyz_becomes(&stack, &agent, 503).await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_eq!(report["ready"], false, "{body}");
    assert!(
        report["checks"]["draining"]
            .as_str()
            .unwrap()
            .contains("draining"),
        "{body}"
    );
    assert_eq!(
        http_get(&agent, "/healthz").await.unwrap().0,
        200,
        "alive while draining"
    );

    // The run finishes, the agent leaves; the API stays ready throughout.
    wait_run(&stack, &run, LIMIT, in_state(pb::RunState::Succeeded)).await;
    let agent_id = stack.agent_id.clone();
    let exit = stack.wait_exit(&agent_id, LIMIT).await;
    assert!(exit.is_some_and(|s| s.success()), "agent exit: {exit:?}");
    assert_eq!(http_get(&api, "/readyz").await.unwrap().0, 200);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn health_follows_postgres() {
    let mut pg = PrivatePostgres::launch().await;
    let stack = Stack::start_with(StackOptions {
        database_url: Some(pg.url()),
        agent: false,
        ..Default::default()
    })
    .await;
    let api = stack.metrics_url("api").await;
    let dispatcher = stack.metrics_url("dispatcher").await;
    grpc_becomes(&stack, ServingStatus::Serving).await;
    let body = readyz_becomes(&stack, &api, 200).await;
    assert!(body.contains(r#""migrations":"ok""#), "{body}");
    readyz_becomes(&stack, &dispatcher, 200).await;

    pg.stop().await;
    grpc_becomes(&stack, ServingStatus::NotServing).await;
    let body = readyz_becomes(&stack, &api, 503).await;
    let report: serde_json::Value = serde_json::from_str(&body).unwrap();
    assert_ne!(report["checks"]["postgres"], "ok", "{body}");
    let body = readyz_becomes(&stack, &dispatcher, 503).await;
    assert!(body.contains("postgres"), "{body}");
    // Alive all the same: a restart would not help.
    assert_eq!(http_get(&api, "/healthz").await.unwrap().0, 200);
    assert_eq!(http_get(&dispatcher, "/healthz").await.unwrap().0, 200);
    let m = scrape(&api).await;
    assert_eq!(m.value("drover_ready", &[]), 0.0);

    pg.start().await;
    grpc_becomes(&stack, ServingStatus::Serving).await;
    readyz_becomes(&stack, &api, 200).await;
    readyz_becomes(&stack, &dispatcher, 200).await;
    // And it serves again.
    let run = submit(&stack, spec(&["true"])).await;
    wait_run(&stack, &run, LIMIT, in_state(pb::RunState::Queued)).await;
    stack.stop().await;
}

/// `drover stats --json` through the CLI binary.
async fn stats_json(stack: &Stack) -> serde_json::Value {
    let out = tokio::process::Command::new(drover_tests::stack::bin_path("drover"))
        .args(["stats", "--json"])
        .env("DROVER_ENDPOINT", &stack.endpoint)
        .env("DROVER_TOKEN", &stack.token)
        .output()
        .await
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "drover stats: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_str(stdout.trim()).unwrap_or_else(|e| panic!("{e}: {stdout}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn drover_stats_shows_queued_runs_and_queue_depth() {
    // No dispatcher and no agent: submitted runs stay QUEUED, their messages ready in the
    // pool's queue.
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let first = submit(&stack, spec(&["true"])).await;
    let _second = submit(&stack, spec(&["true"])).await;
    let deadline = tokio::time::Instant::now() + LIMIT;
    let s = loop {
        let s = stats_json(&stack).await;
        if s["queues"][0]["messages"] == 2 {
            break s;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "queue depth never reached 2: {s}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(s["runs"]["QUEUED"], 2, "{s}");
    assert_eq!(s["runs"]["SUCCEEDED"], 0, "{s}");
    assert_eq!(s["oldest_queued"]["run_id"], first.as_str(), "{s}");
    assert!(s["oldest_queued"]["age_seconds"].as_f64().unwrap() >= 0.0);
    assert_eq!(s["dead_letters"], 0);
    assert_eq!(s["agents"]["live"], 0);
    assert_eq!(s["agents"]["capacity"], 0);
    assert_eq!(s["queues"][0]["pool"], "default");
    assert_eq!(s["queues"][0]["queue"], "drover.runs.default");
    assert_eq!(s["queues"][0]["consumers"], 0);
    assert_eq!(s["queues_error"], serde_json::Value::Null, "{s}");

    // The table form says the same for people.
    let out = tokio::process::Command::new(drover_tests::stack::bin_path("drover"))
        .arg("stats")
        .env("DROVER_ENDPOINT", &stack.endpoint)
        .env("DROVER_TOKEN", &stack.token)
        .output()
        .await
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("oldest queued: {first}")), "{text}");
    assert!(text.contains("drover.runs.default"), "{text}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn lease_expiry_and_fenced_reports_are_counted() {
    // A scripted agent that starts a run and goes silent: the reaper (dispatcher) expires
    // its lease and retries the run; the old holder's late reports are refused (API).
    let stack = Stack::start_with(
        StackOptions {
            agent: false,
            ..Default::default()
        }
        .short_leases(2_000),
    )
    .await;
    let api = stack.metrics_url("api").await;
    let dispatcher = stack.metrics_url("dispatcher").await;
    let (api0, disp0) = (scrape(&api).await, scrape(&dispatcher).await);
    let mut agent =
        drover_tests::fake_agent::FakeAgent::register(&stack, "fake-metrics", 1, &[]).await;
    let mut s = spec(&["true"]);
    s.max_attempts = 2;
    let run = submit(&stack, s).await;
    let assigned = wait_run(&stack, &run, LIMIT, in_state(pb::RunState::Assigned)).await;
    let old = assigned.lease_epoch;
    agent.started(&run, old).await.unwrap();
    wait_run(&stack, &run, LIMIT, |r| r.attempt == 2).await;

    let late = agent
        .complete(&run, old, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    let started = agent.started(&run, old).await.unwrap_err();
    assert_eq!(started.code(), tonic::Code::FailedPrecondition);
    // An artifact upload under the lost lease is fenced (and counted) the same way.
    let upload = agent
        .upload(
            &run,
            old,
            &[drover_tests::fake_agent::UploadFile::file(
                "late.txt", b"late",
            )],
        )
        .await
        .unwrap_err();
    assert_eq!(upload.code(), tonic::Code::FailedPrecondition);

    let disp1 = scrape_until(&stack, &dispatcher, "lease expiry counted", |m| {
        delta(&disp0, m, "drover_lease_expiries_total", &[]) >= 1.0
    })
    .await;
    assert!(delta(&disp0, &disp1, "drover_run_retries_total", &[]) >= 1.0);
    assert!(
        delta(
            &disp0,
            &disp1,
            "drover_run_transitions_total",
            &[("from", "RUNNING"), ("to", "QUEUED")]
        ) >= 1.0
    );
    let api1 = scrape(&api).await;
    assert_eq!(
        delta(&api0, &api1, "drover_fenced_reports_total", &[]),
        3.0,
        "{}",
        api1.text
    );
    stack.stop().await;
}
