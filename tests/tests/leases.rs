//! Leases, the reaper and fencing, with a scripted agent so each report lands exactly when the
//! test wants: the real API and dispatcher processes, real Postgres and RabbitMQ.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_chaos::ledger;
use drover_proto::v1 as pb;
use drover_tests::fake_agent::{FakeAgent, in_state, submit, wait_run};
use drover_tests::{Stack, StackOptions};

fn spec(max_attempts: u32) -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        max_attempts,
        ..Default::default()
    }
}

async fn fake_stack() -> Stack {
    Stack::start_with(
        StackOptions {
            agent: false,
            ..Default::default()
        }
        .short_leases(2_000),
    )
    .await
}

#[tokio::test]
async fn an_expired_lease_is_requeued_then_dead_lettered_and_the_old_holder_is_fenced() {
    let stack = fake_stack().await;
    let mut agent = FakeAgent::register(&stack, "fake-lease", 4, &[]).await;
    let run = submit(&stack, spec(2)).await;
    let assigned = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    let first_epoch = assigned.lease_epoch;
    agent.started(&run, first_epoch).await.unwrap();

    // The agent goes silent: within TTL + a reaper interval the attempt is lost and retried
    // (the same fake agent re-registers below, so the retry is assigned to it again).
    let requeued = wait_run(&stack, &run, Duration::from_secs(30), |r| r.attempt == 2).await;
    assert!(
        requeued.lease_epoch > first_epoch,
        "reaping fences the old epoch"
    );
    assert!(
        requeued.reason.contains("lost_lease"),
        "{}",
        requeued.reason
    );

    // The old holder comes back with a late report: refused, nothing changes.
    let before = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    let late = agent
        .complete(&run, first_epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");
    let started = agent.started(&run, first_epoch).await.unwrap_err();
    assert_eq!(started.code(), tonic::Code::FailedPrecondition);
    let hb = agent.heartbeat(&[(run.clone(), first_epoch)]).await;
    assert_eq!(
        hb.revoked.len(),
        1,
        "the stale lease is revoked on heartbeat"
    );
    let after = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert_eq!(before.attempt, after.attempt);

    // Attempt 2 is lost as well: no attempts left, so DEAD_LETTERED.
    let dead = wait_run(
        &stack,
        &run,
        Duration::from_secs(60),
        in_state(pb::RunState::DeadLettered),
    )
    .await;
    assert_eq!(dead.attempt, 2);
    assert!(dead.reason.contains("all 2 attempts"), "{}", dead.reason);
    let violations = ledger::check_events(&stack.db, None).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    stack.stop().await;
}

#[tokio::test]
async fn a_late_completion_for_the_current_epoch_is_accepted_once() {
    let stack = fake_stack().await;
    let mut agent = FakeAgent::register(&stack, "fake-late", 4, &[]).await;
    let run = submit(&stack, spec(1)).await;
    let assigned = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    let epoch = assigned.lease_epoch;
    agent.heartbeat(&[(run.clone(), epoch)]).await;
    agent.started(&run, epoch).await.unwrap();
    // A repeated start report is a no-op.
    agent.started(&run, epoch).await.unwrap();
    // "Transient disconnect": the agent is quiet for a while, but less than the lease TTL.
    tokio::time::sleep(Duration::from_millis(1_000)).await;
    let first = agent
        .complete(&run, epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap();
    assert_eq!(first.state, pb::RunState::Succeeded as i32);
    // The answer was lost; the agent repeats the report: a harmless no-op.
    let again = agent
        .complete(&run, epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap();
    assert_eq!(again.state, pb::RunState::Succeeded as i32);
    let terminal: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE run_id = $1::uuid AND to_state = 'SUCCEEDED'",
    )
    .bind(&run)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(terminal, 1);
    // Another agent cannot report on it at all.
    let mut other = FakeAgent::register(&stack, "fake-other", 1, &[]).await;
    let foreign = other
        .complete(&run, epoch, pb::Outcome::Failed, Some(1))
        .await
        .unwrap_err();
    assert_eq!(foreign.code(), tonic::Code::FailedPrecondition);
    stack.stop().await;
}

#[tokio::test]
async fn a_duplicate_run_message_after_assignment_is_dropped() {
    // What a dispatcher killed between its commit and its ack leaves behind: the broker
    // redelivers the message of an attempt that is already assigned.
    let stack = fake_stack().await;
    let mut agent = FakeAgent::register(&stack, "fake-dup", 4, &[]).await;
    let run = submit(&stack, spec(1)).await;
    let assigned = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    agent
        .heartbeat(&[(run.clone(), assigned.lease_epoch)])
        .await;
    let tenant: uuid::Uuid = sqlx::query_scalar("SELECT tenant_id FROM runs WHERE id = $1::uuid")
        .bind(&run)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    let dup = serde_json::json!({"v": 1, "run_id": run, "tenant_id": tenant, "attempt": 1});
    drover_tests::services::publish(
        &stack.amqp_url,
        "drover.runs",
        "default",
        dup.to_string().as_bytes(),
    )
    .await;
    // Give the dispatcher time to see it, while the agent keeps the lease alive.
    for _ in 0..10 {
        agent
            .heartbeat(&[(run.clone(), assigned.lease_epoch)])
            .await;
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let assignments: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE run_id = $1::uuid AND to_state = 'ASSIGNED'",
    )
    .bind(&run)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(assignments, 1, "a redelivered message never assigns twice");
    let now = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert_eq!(now.lease_epoch, assigned.lease_epoch);
    stack.stop().await;
}

#[tokio::test]
async fn the_reaper_times_out_a_run_its_live_agent_never_reports() {
    let mut opts = StackOptions {
        agent: false,
        ..Default::default()
    }
    .short_leases(2_000);
    opts.env
        .push(("DROVER_REAPER__TIMEOUT_GRACE_MS".into(), "500".into()));
    let stack = Stack::start_with(opts).await;
    let mut agent = FakeAgent::register(&stack, "fake-hung", 1, &[]).await;
    let alive = agent.keep_alive(stack.db.clone());
    let run = submit(
        &stack,
        pb::RunSpec {
            timeout_seconds: 1,
            ..spec(3)
        },
    )
    .await;
    let a = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    agent.started(&run, a.lease_epoch).await.unwrap();
    // The agent keeps heartbeating (its lease stays valid) but never enforces the timeout.
    let r = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::TimedOut),
    )
    .await;
    assert!(r.reason.starts_with("timeout:"), "{}", r.reason);
    assert!(
        r.lease_epoch > a.lease_epoch,
        "the backstop fences the holder"
    );
    let late = agent
        .complete(&run, a.lease_epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition);
    alive.abort();
    stack.stop().await;
}

/// An agent that heartbeats but names no lease (its command has not arrived, e.g. the broker
/// is down) keeps its assignment past the lease TTL; one it never starts within the reaper's
/// assign timeout is lost like any other attempt, and the old epoch is fenced.
#[tokio::test]
async fn a_live_agent_keeps_an_unstarted_assignment_until_the_assign_timeout() {
    let mut opts = StackOptions {
        agent: false,
        ..Default::default()
    }
    .short_leases(1_000);
    opts.env
        .push(("DROVER_REAPER__ASSIGN_TIMEOUT_MS".into(), "6000".into()));
    let stack = Stack::start_with(opts).await;
    let mut agent = FakeAgent::register(&stack, "fake-unstarted", 4, &[]).await;
    let run = submit(&stack, spec(2)).await;
    let assigned = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    let epoch = assigned.lease_epoch;

    // Three lease TTLs of heartbeats that name nothing: the assignment stands.
    for _ in 0..10 {
        let hb = agent.heartbeat(&[]).await;
        assert!(hb.revoked.is_empty());
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let still = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert_eq!(still.state, pb::RunState::Assigned as i32, "{still:?}");
    assert_eq!(still.lease_epoch, epoch, "the same lease, renewed");

    // Never started: past the assign timeout the attempt is lost and retried, although the
    // agent keeps heartbeating.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let retried = loop {
        agent.heartbeat(&[]).await;
        let now = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
        if now.attempt == 2 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the unstarted assignment was never reaped: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(300)).await;
    };
    assert!(retried.lease_epoch > epoch, "reaping fences the old epoch");
    assert!(
        retried.reason.contains("did not start the run"),
        "{}",
        retried.reason
    );
    let late = agent.started(&run, epoch).await.unwrap_err();
    assert_eq!(late.code(), tonic::Code::FailedPrecondition, "{late:?}");

    // Attempt 2 runs normally, and the history holds exactly one end per attempt. The agent
    // keeps heartbeating through the retry backoff, so it is still live when the retry is
    // dispatched.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let second = loop {
        agent.heartbeat(&[]).await;
        let now = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
        if now.state == pb::RunState::Assigned as i32 && now.attempt == 2 {
            break now;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "attempt 2 was never assigned: {now:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    };
    agent.started(&run, second.lease_epoch).await.unwrap();
    let done = agent
        .complete(&run, second.lease_epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    let violations = ledger::check_events(&stack.db, None).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    stack.stop().await;
}

/// `(to_state, reason)` of every event of `run`, in order.
async fn history(stack: &Stack, run: &str) -> Vec<(String, String)> {
    sqlx::query_as(
        "SELECT to_state, COALESCE(reason, '') FROM run_events WHERE run_id = $1 ORDER BY seq",
    )
    .bind(uuid::Uuid::parse_str(run).unwrap())
    .fetch_all(&stack.db)
    .await
    .unwrap()
}

#[tokio::test]
async fn a_completion_carrying_its_start_records_running_then_the_end_once() {
    let stack = fake_stack().await;
    let mut agent = FakeAgent::register(&stack, "fake-fold", 4, &[]).await;
    // Live past the 2 s leases of this stack however slowly the steps below run.
    let alive = agent.keep_alive(stack.db.clone());
    let assigned = |run: String| {
        let stack = &stack;
        async move {
            let r = wait_run(
                stack,
                &run,
                Duration::from_secs(30),
                in_state(pb::RunState::Assigned),
            )
            .await;
            (run, r.lease_epoch)
        }
    };

    // Ended inside the fold window: RUNNING and SUCCEEDED in one report, both in the history.
    let (run, epoch) = assigned(submit(&stack, spec(1)).await).await;
    let stale = agent
        .complete_unreported_start(&run, epoch + 1, "mock")
        .await
        .unwrap_err();
    assert_eq!(stale.code(), tonic::Code::FailedPrecondition, "{stale:?}");
    assert_eq!(
        history(&stack, &run).await.len(),
        2,
        "a stale report changes nothing"
    );
    let done = agent
        .complete_unreported_start(&run, epoch, "mock")
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Succeeded as i32);
    // A repeat after a lost answer: says what stands, adds nothing.
    let again = agent
        .complete_unreported_start(&run, epoch, "mock")
        .await
        .unwrap();
    assert_eq!(again.state, pb::RunState::Succeeded as i32);
    let events = history(&stack, &run).await;
    let states: Vec<&str> = events.iter().map(|(s, _)| s.as_str()).collect();
    assert_eq!(states, ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]);
    assert!(
        events[2].1.contains("(mock); reported with its end"),
        "{:?}",
        events[2]
    );
    let (executor, started): (Option<String>, bool) =
        sqlx::query_as("SELECT executor, started_at IS NOT NULL FROM runs WHERE id = $1")
            .bind(uuid::Uuid::parse_str(&run).unwrap())
            .fetch_one(&stack.db)
            .await
            .unwrap();
    assert_eq!((executor.as_deref(), started), (Some("mock"), true));

    // The start was reported after all (the window had passed): the completion's copy of it
    // is ignored, and the history has one RUNNING.
    let (run, epoch) = assigned(submit(&stack, spec(1)).await).await;
    agent.started(&run, epoch).await.unwrap();
    agent
        .complete_unreported_start(&run, epoch, "mock")
        .await
        .unwrap();
    let states: Vec<String> = history(&stack, &run)
        .await
        .into_iter()
        .map(|e| e.0)
        .collect();
    assert_eq!(states, ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]);
    let violations = ledger::check_events(&stack.db, None).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    alive.abort();
    stack.stop().await;
}
