//! Draining: the agent takes no new work (SetDraining, intake stopped), lets running runs
//! finish up to its drain timeout, hands back the rest (HANDED_BACK: re-queued, the attempt
//! not counted), deregisters and exits 0. A second SIGTERM exits at once and leaves the
//! containers for the next start to re-adopt. An operator's `DrainAgent` does the same as
//! SIGTERM, through the agent's command queue and heartbeats.

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

mod support;

use std::time::Duration;

use drover_core::state::RunState;
use drover_proto::v1 as pb;
use nix::sys::signal::Signal;
use support::{
    EnvOptions, IMAGE, TestEnv, container_running, containers, events_of, eventually,
    wait_until_no_container,
};
use tokio::time::Instant;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_hands_back_what_outlives_the_drain_timeout_and_deregisters() {
    let env = TestEnv::without_agent(EnvOptions {
        drain_secs: 1,
        ..EnvOptions::default()
    })
    .await;
    let mut agent = env.spawn_agent("only").await;
    let long = env
        .submit(IMAGE, &["sh", "-c", "echo working; sleep 60"])
        .await;
    env.assign(long).await;
    env.wait_for_state(long, RunState::Running).await;

    agent.signal(Signal::SIGTERM);
    eventually("the agent to be marked draining", async || {
        (env.agent_draining().await == Some(true)).then_some(())
    })
    .await;
    // A dispatcher that picked the agent just before it drained: the command is handed back,
    // never started.
    let late = env.submit(IMAGE, &["echo", "must not run here"]).await;
    env.assign(late).await;

    let status = agent.exit_status(Duration::from_secs(40)).await;
    assert!(status.success(), "drover-agent exited with {status:?}");

    let handed = env.run(long).await;
    assert_eq!(
        handed.state,
        RunState::Queued,
        "reason: {:?}",
        handed.reason
    );
    assert_eq!(
        handed.attempt, 1,
        "a hand-back does not count as an attempt"
    );
    let reason = handed.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("handed_back:"), "reason: {reason}");
    assert_eq!(
        env.events(long).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "QUEUED"]
    );
    assert!(containers(long).is_empty(), "removed before exiting");
    assert_eq!(events_of(&env.journal_of(long)), ["started", "ended"]);

    let late_rec = env.run(late).await;
    assert_eq!(
        late_rec.state,
        RunState::Queued,
        "reason: {:?}",
        late_rec.reason
    );
    assert_eq!(late_rec.attempt, 1);
    assert!(late_rec.started_at.is_none());
    assert!(containers(late).is_empty());
    assert!(env.journal_of(late).is_empty(), "never started");

    assert!(!env.agent_registered().await, "it deregistered");
    let log = agent.log_text();
    for step in [
        "draining: taking no new work",
        "the api marked this agent as draining",
        "stopped consuming commands",
        "drain timeout passed; handing back the remaining executions",
        "deregistered",
    ] {
        assert!(log.contains(step), "the agent's log lacks {step:?}:\n{log}");
    }
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_sigterm_exits_at_once_and_the_next_start_readopts() {
    let env = TestEnv::without_agent(EnvOptions {
        drain_secs: 60,
        ..EnvOptions::default()
    })
    .await;
    let mut agent = env.spawn_agent("first").await;
    let run = env.submit(IMAGE, &["sleep", "60"]).await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;

    agent.signal(Signal::SIGTERM);
    eventually("the agent to be marked draining", async || {
        (env.agent_draining().await == Some(true)).then_some(())
    })
    .await;
    let second_signal = Instant::now();
    agent.signal(Signal::SIGTERM);
    let status = agent.exit_status(Duration::from_secs(10)).await;
    assert_eq!(status.code(), Some(130), "exits at once, non-zero");
    assert!(
        second_signal.elapsed() < Duration::from_secs(5),
        "took {:?}",
        second_signal.elapsed()
    );
    assert!(container_running(run), "the container is left to re-adopt");
    assert_eq!(env.run(run).await.state, RunState::Running);

    // The next start re-adopts it; a cancel then ends it.
    let _next = env.spawn_agent("second").await;
    eventually("the re-adoption", async || {
        (events_of(&env.journal_of(run)) == ["started", "adopted"]).then_some(())
    })
    .await;
    env.cancel(run).await;
    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(done.state, RunState::Cancelled, "reason: {:?}", done.reason);
    wait_until_no_container(run).await;
    assert_eq!(
        events_of(&env.journal_of(run)),
        ["started", "adopted", "ended"]
    );
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_operator_drain_lets_running_runs_finish_then_deregisters() {
    let mut env = TestEnv::start().await;
    let run = env
        .submit(IMAGE, &["sh", "-c", "sleep 2; echo finished"])
        .await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;

    let mut admin = env.admin_client().await;
    admin
        .drain_agent(pb::DrainAgentRequest {
            agent_id: env.agent_id.clone(),
        })
        .await
        .expect("DrainAgent");

    // Nobody cancels the agent's token: the drain request alone ends it, after the run.
    env.agent_returns().await;
    let done = env.run(run).await;
    assert_eq!(done.state, RunState::Succeeded, "reason: {:?}", done.reason);
    assert_eq!(done.output, b"finished\n");
    assert!(containers(run).is_empty());
    assert!(!env.agent_registered().await, "it deregistered");
    env.finish().await;
}
