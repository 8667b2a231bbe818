//! `kill -9` of the real `drover-agent` binary mid-run, then a restart with the same agent id:
//! Docker is the agent's journal, so the new process finds the containers the old one left
//! and, asking the API about each lease,
//! - re-attaches to the one still running (it finishes once, its logs are not repeated),
//! - reports the one that exited while no agent watched,
//! - removes the one whose lease moved on meanwhile (fenced).
//!
//! The execution journal proves one container and one execution per run. A second test covers
//! the narrower windows: a container started but never reported, and one created but never
//! started.

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

mod support;

use std::process::Command;
use std::time::Duration;

use drover_agent::docker::{container_labels, container_name};
use drover_agent::{DockerExecutor, Executor, Job};
use drover_core::ids::{AgentId, LeaseEpoch};
use drover_core::repo::RunRecord;
use drover_core::spec::RawSpec;
use drover_core::state::RunState;
use nix::sys::signal::Signal;
use support::{
    EnvOptions, IMAGE, TestEnv, container_running, containers, events_of, eventually, read_journal,
    wait_until_no_container,
};
use tokio::time::Instant;

const LEASE_TTL_MS: u64 = 10_000;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill9_mid_run_and_restart_readopts_reports_and_fences() {
    let env = TestEnv::without_agent(EnvOptions {
        capacity: 4,
        lease_ttl_ms: LEASE_TTL_MS,
        ..EnvOptions::default()
    })
    .await;
    let first = env.spawn_agent("first").await;

    // Runs across the restart.
    let across = env
        .submit(IMAGE, &["sh", "-c", "echo begin; sleep 6; echo end"])
        .await;
    // Exits while no agent watches.
    let exits = env
        .submit_spec(RawSpec {
            image: IMAGE.into(),
            command: vec!["sh".into(), "-c".into(), "echo b; sleep 1; exit 3".into()],
            timeout_secs: 60,
            ..Default::default()
        })
        .await;
    // Its lease moves to another agent while no agent watches.
    let moves = env.submit(IMAGE, &["sleep", "60"]).await;
    for run in [across, exits, moves] {
        env.assign(run).await;
    }
    for run in [across, exits, moves] {
        env.wait_for_state(run, RunState::Running).await;
    }
    eventually("the first line to be shipped", async || {
        (env.logs(across).await.0 == b"begin\n").then_some(())
    })
    .await;

    first.kill9().await;
    let killed = Instant::now();
    assert!(
        container_running(across),
        "the container outlives its agent"
    );
    assert!(container_running(moves));
    env.steal_lease(moves, 1).await;
    eventually("the short run to exit unwatched", async || {
        (!container_running(exits)).then_some(())
    })
    .await;
    assert_eq!(containers(exits).len(), 1, "its result waits in Docker");

    let mut second = env.spawn_agent("second").await;
    let back_after = killed.elapsed();
    assert!(
        back_after < Duration::from_millis(LEASE_TTL_MS),
        "restarted within the lease TTL ({back_after:?})"
    );

    // Re-attached: it finishes, once, with its whole output, and its live logs are not
    // repeated by the second life.
    let done = env.wait_for_state(across, RunState::Succeeded).await;
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.output, b"begin\nend\n");
    assert_eq!(env.logs(across).await.0, b"begin\nend\n");
    assert_eq!(
        env.events(across).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]
    );
    // Reported: the exit that happened while no agent watched.
    let failed = env
        .wait_for_run(exits, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(
        failed.state,
        RunState::Failed,
        "reason: {:?}",
        failed.reason
    );
    assert_eq!(failed.exit_code, Some(3));
    assert_eq!(failed.output, b"b\n");
    // Fenced: removed, nothing reported.
    for run in [across, exits, moves] {
        wait_until_no_container(run).await;
    }
    let moved = env.run(moves).await;
    assert_eq!(moved.state, RunState::Assigned);
    assert_eq!(moved.lease_epoch, 2);
    assert_eq!(env.events(moves).await, ["QUEUED", "ASSIGNED", "RUNNING"]);

    // One container, one execution each: exactly one `started` per run, and the second life
    // adopted rather than started.
    let journal = env.journal_of(across);
    assert_eq!(events_of(&journal), ["started", "adopted", "ended"]);
    assert_eq!(journal[0]["container"], journal[1]["container"]);
    assert_eq!(journal[2]["exit_code"], 0);
    // It exited while no agent watched: found, reported, not journalled as running now.
    let journal = env.journal_of(exits);
    assert_eq!(events_of(&journal), ["started", "found_exited"]);
    let journal = env.journal_of(moves);
    assert_eq!(events_of(&journal), ["started", "ended"]);
    for line in read_journal(&env.journal) {
        assert_eq!(line["agent_id"], env.agent_id.as_str());
        assert_eq!(line["epoch"], 1);
    }

    // The second life drains cleanly.
    second.signal(Signal::SIGTERM);
    let status = second.exit_status(Duration::from_secs(30)).await;
    assert!(status.success(), "drover-agent exited with {status:?}");
    assert!(!env.agent_registered().await, "it deregistered");
    env.finish().await;
}

/// The agent died after Docker started a container but before the API heard of it (the run is
/// still ASSIGNED), and another died between creating a container and starting it. The next
/// start reports the first as started and follows it; it starts the second (that lease's one
/// execution) and follows it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreported_and_unstarted_containers_are_taken_up_on_start() {
    let mut env = TestEnv::without_agent(EnvOptions::default()).await;
    let docker = DockerExecutor::connect().await.expect("docker answers");

    // Started behind the API's back, as the dead agent left it.
    let unreported = env
        .submit(IMAGE, &["sh", "-c", "echo started; sleep 2; echo done"])
        .await;
    let rec = env.lease_only(unreported).await;
    let job = job_of(&env, &rec);
    let started = docker.start(&job).await.expect("container starts");
    assert!(!started.adopted);
    assert_eq!(started.handle.name, container_name(&job));

    // Created, never started.
    let unstarted = env.submit(IMAGE, &["echo", "created only"]).await;
    let rec = env.lease_only(unstarted).await;
    let job = job_of(&env, &rec);
    let labels = container_labels(&job);
    let mut create = Command::new("docker");
    create.args(["create", "--name", &container_name(&job)]);
    for (k, v) in &labels {
        create.args(["--label", &format!("{k}={v}")]);
    }
    let out = create
        .args([IMAGE, "echo", "created only"])
        .output()
        .expect("docker create");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    env.start_agent().await;
    let done = env.wait_for_state(unreported, RunState::Succeeded).await;
    assert_eq!(done.output, b"started\ndone\n");
    assert_eq!(
        env.events(unreported).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]
    );
    assert_eq!(events_of(&env.journal_of(unreported)), ["adopted", "ended"]);

    let done = env.wait_for_state(unstarted, RunState::Succeeded).await;
    assert_eq!(done.output, b"created only\n");
    assert_eq!(events_of(&env.journal_of(unstarted)), ["started", "ended"]);
    for run in [unreported, unstarted] {
        wait_until_no_container(run).await;
    }
    env.finish().await;
}

/// The job the dispatcher's `Execute` command would have led the agent to.
fn job_of(env: &TestEnv, rec: &RunRecord) -> Job {
    Job {
        run_id: rec.id,
        attempt: u32::try_from(rec.attempt).unwrap(),
        lease_epoch: LeaseEpoch(rec.lease_epoch),
        tenant_id: rec.tenant_id.to_string(),
        agent_id: AgentId::parse(&env.agent_id).unwrap(),
        spec: rec.spec.clone(),
        secret_env: Default::default(),
        // Where the agent's default settings put it.
        workspace: std::env::temp_dir()
            .join("drover-workspaces")
            .join(&env.agent_id)
            .join(drover_agent::executor::execution_name(
                rec.id,
                u32::try_from(rec.attempt).unwrap(),
                LeaseEpoch(rec.lease_epoch),
            )),
    }
}
