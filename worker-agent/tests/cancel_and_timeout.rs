//! Cancels and timeouts end a run in the right terminal state, and the container is gone
//! within the grace (plus a little): a process that traps SIGTERM exits on it; one that
//! ignores it is killed once the grace has passed; a run cancelled before the agent starts it
//! never starts; a run past its execution timeout is killed and TIMED_OUT. The cancels go
//! through the real `CancelRun`, which reaches the agent by its command queue (and
//! heartbeats).

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

mod support;

use std::time::Duration;

use drover_core::ids::RunId;
use drover_core::spec::RawSpec;
use drover_core::state::RunState;
use drover_proto::v1 as pb;
use support::{IMAGE, TestEnv, containers, events_of, wait_until_no_container};
use tokio::time::Instant;

/// Answers SIGTERM by saying so and exiting 143.
const TRAPS_TERM: &str =
    r#"trap "echo got TERM; exit 143" TERM; echo ready; while true; do sleep 0.1; done"#;
/// Ignores SIGTERM: only SIGKILL ends it.
const IGNORES_TERM: &str = r#"trap "" TERM; echo ready; while true; do sleep 0.1; done"#;

fn shell(script: &str, grace_secs: u32) -> RawSpec {
    RawSpec {
        image: IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        timeout_secs: 120,
        cancel_grace_secs: grace_secs,
        ..Default::default()
    }
}

/// Submits, assigns and waits until the process has printed "ready" (its trap is set).
async fn running(env: &TestEnv, spec: RawSpec) -> RunId {
    let run = env.submit_spec(spec).await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;
    support::eventually("the process to be ready", async || {
        (env.logs(run).await.0 == b"ready\n").then_some(())
    })
    .await;
    run
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_that_traps_sigterm_ends_cancelled_at_once() {
    let env = TestEnv::start().await;
    let run = running(&env, shell(TRAPS_TERM, 10)).await;

    let asked = Instant::now();
    let after = env.cancel(run).await;
    assert_eq!(after.state, i32::from(pb::RunState::Running));
    assert!(after.cancel_requested);

    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    wait_until_no_container(run).await;
    let took = asked.elapsed();
    assert_eq!(done.state, RunState::Cancelled, "reason: {:?}", done.reason);
    assert_eq!(done.exit_code, Some(143));
    assert_eq!(
        done.reason.as_deref(),
        Some("cancelled: stopped on request, exited with code 143")
    );
    assert_eq!(
        done.output, b"ready\ngot TERM\n",
        "the tail has its last words"
    );
    // It exits on SIGTERM: far sooner than the 10 s grace.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert_eq!(
        env.events(run).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "CANCELLED"]
    );
    // A second cancel of the finished run changes nothing, whatever the API answers.
    let mut client = env.runs_client().await;
    let _ = client
        .cancel_run(pb::CancelRunRequest {
            run_id: run.to_string(),
            reason: String::new(),
        })
        .await;
    assert_eq!(env.run(run).await.state, RunState::Cancelled);
    assert_eq!(env.events(run).await.len(), 4);
    assert_eq!(
        events_of(&env.journal_of(run)),
        ["started", "ended"],
        "one execution, ended once"
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cancelling_a_run_that_ignores_sigterm_kills_it_after_the_grace() {
    let env = TestEnv::start().await;
    let grace = Duration::from_secs(2);
    let run = running(&env, shell(IGNORES_TERM, 2)).await;

    let asked = Instant::now();
    env.cancel(run).await;
    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    wait_until_no_container(run).await;
    let took = asked.elapsed();
    assert_eq!(done.state, RunState::Cancelled, "reason: {:?}", done.reason);
    assert_eq!(done.exit_code, Some(137), "SIGKILL");
    assert_eq!(
        done.reason.as_deref(),
        Some("cancelled: killed after ignoring SIGTERM for 2 s, exited with code 137")
    );
    // Not before the grace, and not much after it.
    assert!(took >= grace, "killed before the grace passed: {took:?}");
    assert!(took < grace + Duration::from_secs(4), "took {took:?}");
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_cancelled_before_start_never_starts() {
    let env = TestEnv::start().await;
    let run = env.submit(IMAGE, &["sh", "-c", "echo must not run"]).await;
    // Leased, then cancelled (the Cancel command reaches an agent that does not execute the
    // lease yet: ignored), then the Execute command arrives: GetAssignment says the run was
    // cancelled, so the agent reports CANCELLED without creating a container.
    let rec = env.lease_only(run).await;
    let after = env.cancel(run).await;
    assert_eq!(after.state, i32::from(pb::RunState::Assigned));
    assert!(after.cancel_requested);
    env.send_execute(&rec, rec.lease_epoch).await;

    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(done.state, RunState::Cancelled, "reason: {:?}", done.reason);
    assert_eq!(done.reason.as_deref(), Some("cancelled before start"));
    assert_eq!(done.exit_code, None);
    assert!(done.started_at.is_none(), "it never started");
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "CANCELLED"]);
    assert!(containers(run).is_empty());
    assert!(env.journal_of(run).is_empty(), "no execution at all");
    assert_eq!(env.logs(run).await, (Vec::new(), Vec::new()));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn overrunning_the_timeout_is_timed_out() {
    let env = TestEnv::start().await;
    let run = env
        .submit_spec(RawSpec {
            image: IMAGE.into(),
            command: vec!["sh".into(), "-c".into(), "echo working; sleep 30".into()],
            timeout_secs: 2,
            max_attempts: 3,
            ..Default::default()
        })
        .await;
    let begun = Instant::now();
    env.assign(run).await;
    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    wait_until_no_container(run).await;
    assert_eq!(done.state, RunState::TimedOut, "reason: {:?}", done.reason);
    assert_eq!(done.reason.as_deref(), Some("timeout: exceeded 2 s"));
    assert_eq!(done.exit_code, Some(137), "killed");
    assert_eq!(done.output, b"working\n");
    assert_eq!(done.attempt, 1, "a timeout is final, not retried");
    let took = begun.elapsed();
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(
        env.events(run).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "TIMED_OUT"]
    );
    assert_eq!(events_of(&env.journal_of(run)), ["started", "ended"]);
    env.finish().await;
}
