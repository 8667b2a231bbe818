//! Fencing through reports: when the API refuses a report as stale (FAILED_PRECONDITION: the
//! lease moved to another epoch), the agent stops and removes the container and forgets the
//! lease — without waiting for a heartbeat to tell it. Heartbeats are 30 s apart here, so
//! nothing but the refused report can be what stopped it.

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

mod support;

use std::time::Duration;

use drover_core::state::RunState;
use support::{EnvOptions, IMAGE, TestEnv, containers, events_of, wait_until_no_container};
use tokio::time::Instant;

async fn env_with_slow_heartbeats() -> TestEnv {
    let mut env = TestEnv::without_agent(EnvOptions {
        heartbeat_ms: 30_000,
        lease_ttl_ms: 120_000,
        ..EnvOptions::default()
    })
    .await;
    env.start_agent().await;
    env
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_refused_as_stale_stop_and_remove_the_container() {
    let mut env = env_with_slow_heartbeats().await;
    let run = env
        .submit(
            IMAGE,
            &["sh", "-c", "while true; do echo tick; sleep 0.2; done"],
        )
        .await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;
    support::eventually("some output to be stored", async || {
        (!env.logs(run).await.0.is_empty()).then_some(())
    })
    .await;

    // The lease moves on (the reaper and a dispatcher, behind the agent's back).
    let moved = Instant::now();
    env.steal_lease(run, 1).await;
    // The next PushLogs is refused: the agent kills and removes the container.
    wait_until_no_container(run).await;
    let took = moved.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");

    let journal = env.journal_of(run);
    assert_eq!(events_of(&journal), ["started", "ended"]);
    // Nothing was reported for the stale lease: the run is as the test left it.
    let rec = env.run(run).await;
    assert_eq!(rec.state, RunState::Assigned);
    assert_eq!(rec.lease_epoch, 2);
    assert_eq!(rec.agent_id.as_deref(), Some("some-other-agent"));
    assert_eq!(rec.exit_code, None);
    assert!(rec.finished_at.is_none());
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "RUNNING"]);

    // The agent carries on with other work.
    let next = env.submit(IMAGE, &["echo", "still here"]).await;
    env.assign(next).await;
    let done = env.wait_for_state(next, RunState::Succeeded).await;
    assert_eq!(done.output, b"still here\n");
    wait_until_no_container(next).await;
    env.stop_agent().await;
    assert!(containers(run).is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_completion_refused_as_stale_removes_the_container() {
    let mut env = env_with_slow_heartbeats().await;
    // No output: the completion report is the first report after the start.
    let run = env.submit(IMAGE, &["sleep", "2"]).await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;
    env.steal_lease(run, 1).await;

    wait_until_no_container(run).await;
    let journal = env.journal_of(run);
    assert_eq!(events_of(&journal), ["started", "ended"]);
    assert_eq!(journal[1]["exit_code"], 0, "it ran to its end");
    env.stop_agent().await;
    let rec = env.run(run).await;
    assert_eq!(
        rec.state,
        RunState::Assigned,
        "the refused report changed nothing"
    );
    assert_eq!(rec.lease_epoch, 2);
    assert_eq!(rec.exit_code, None);
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "RUNNING"]);
    env.finish().await;
}
