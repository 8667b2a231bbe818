//! The real agent binary under faults: kill -9 mid-run (restarted, and not), cancel of a
//! running container, drain on SIGTERM. Real API, dispatcher, agents, Docker.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_chaos::ledger;
use drover_proto::v1 as pb;
use drover_tests::fake_agent::{in_state, submit, wait_run};
use drover_tests::services::containers_for_run;
use drover_tests::{Stack, StackOptions};
use nix::sys::signal::Signal;

fn journal() -> PathBuf {
    std::env::temp_dir().join(format!("drover-journal-{}.jsonl", uuid::Uuid::now_v7()))
}

fn opts(journal: &Path, ttl_ms: u64) -> StackOptions {
    let mut o = StackOptions::default().short_leases(ttl_ms);
    o.env.push((
        "DROVER_EXECUTION_JOURNAL".into(),
        journal.display().to_string(),
    ));
    o
}

fn sh(script: &str) -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        timeout_seconds: 120,
        max_attempts: 3,
        ..Default::default()
    }
}

async fn count_events(stack: &Stack, run: &str, to: &str) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM run_events WHERE run_id = $1::uuid AND to_state = $2")
        .bind(run)
        .bind(to)
        .fetch_one(&stack.db)
        .await
        .unwrap()
}

/// Submits `spec`, kills the agent with SIGKILL once the run is RUNNING, starts it again
/// under the same id, and waits for the run to succeed.
async fn kill9_mid_run_and_restart(stack: &mut Stack, spec: pb::RunSpec) -> (String, pb::Run) {
    let run = submit(stack, spec).await;
    wait_run(
        stack,
        &run,
        Duration::from_secs(60),
        in_state(pb::RunState::Running),
    )
    .await;
    let agent = stack.agent_id.clone();
    stack.kill9(&agent).await;
    stack.start_agent_named(&agent).await;
    let done = wait_run(stack, &run, Duration::from_secs(90), |r| {
        r.state == pb::RunState::Succeeded as i32
    })
    .await;
    (run, done)
}

#[tokio::test]
async fn kill9_of_the_agent_then_restart_readopts_the_run_with_one_execution() {
    let journal = journal();
    let mut stack = Stack::start_with(opts(&journal, 8_000)).await;
    let (run, done) =
        kill9_mid_run_and_restart(&mut stack, sh("echo before; sleep 4; echo after")).await;
    let output = String::from_utf8_lossy(&done.output);
    assert!(
        output.contains("before") && output.contains("after"),
        "{output}"
    );
    assert_eq!(count_events(&stack, &run, "ASSIGNED").await, 1);
    let entries = ledger::read_journals(&[journal.as_path()]).unwrap();
    let started = entries
        .iter()
        .filter(|e| e.run_id == run && e.event == "started")
        .count();
    let adopted = entries
        .iter()
        .filter(|e| e.run_id == run && e.event == "adopted")
        .count();
    assert_eq!((started, adopted), (1, 1), "{entries:?}");
    assert!(ledger::check_executions(&entries).is_empty());
    let gone = stack
        .wait_for(Duration::from_secs(20), || async {
            containers_for_run(&run).is_empty()
        })
        .await;
    assert!(gone, "container left behind");
    stack.stop().await;
}

/// The mock executor's runs die with the agent, but their starts are recorded: a restarted
/// agent reports the lost execution at once (no wait for the lease, here 60 s) and never
/// starts that lease again, whatever command for it comes back.
#[tokio::test]
async fn kill9_of_a_mock_agent_then_restart_reports_the_lost_run_and_retries_it_once() {
    let journal = journal();
    let mut o = opts(&journal, 60_000);
    o.agent_executor = "mock".into();
    let mut stack = Stack::start_with(o).await;
    let spec = pb::RunSpec {
        image: "none".into(),
        command: vec!["true".into()],
        timeout_seconds: 120,
        max_attempts: 2,
        mock: Some(pb::MockBehavior {
            duration_ms: 3_000,
            stdout: vec!["hello".into()],
            ..Default::default()
        }),
        ..Default::default()
    };
    let (run, done) = kill9_mid_run_and_restart(&mut stack, spec).await;
    assert_eq!(done.attempt, 2);
    let reasons: Vec<Option<String>> =
        sqlx::query_scalar("SELECT reason FROM run_events WHERE run_id = $1::uuid ORDER BY seq")
            .bind(&run)
            .fetch_all(&stack.db)
            .await
            .unwrap();
    let reasons: Vec<String> = reasons.into_iter().flatten().collect();
    assert!(
        reasons
            .iter()
            .any(|r| r.contains("exit code could not be read"))
            && !reasons.iter().any(|r| r.contains("lost_lease")),
        "reported by the restarted agent, not reaped: {reasons:?}"
    );
    let entries = ledger::read_journals(&[journal.as_path()]).unwrap();
    let starts: Vec<i64> = entries
        .iter()
        .filter(|e| e.run_id == run && e.event == "started")
        .map(|e| e.epoch)
        .collect();
    assert_eq!(starts.len(), 2, "one start per attempt: {entries:?}");
    assert_ne!(starts[0], starts[1]);
    assert!(ledger::check_executions(&entries).is_empty(), "{entries:?}");
    stack.stop().await;
}

#[tokio::test]
async fn kill9_without_restart_reassigns_after_the_lease_and_fences_the_old_container() {
    let journal = journal();
    let mut stack = Stack::start_with(opts(&journal, 3_000)).await;
    let run = submit(&stack, sh("sleep 6; echo finished")).await;
    let first = wait_run(
        &stack,
        &run,
        Duration::from_secs(60),
        in_state(pb::RunState::Running),
    )
    .await;
    let first_agent = stack.agent_id.clone();
    stack.kill9(&first_agent).await;
    // Its container keeps running on the "lost" host. A second agent takes over once the
    // lease expires.
    let second_agent = format!("{first_agent}-b");
    stack.start_agent_named(&second_agent).await;
    let done = wait_run(
        &stack,
        &run,
        Duration::from_secs(120),
        in_state(pb::RunState::Succeeded),
    )
    .await;
    assert_eq!(done.agent_id, second_agent);
    assert_eq!(done.attempt, 2, "a lost lease uses an attempt");
    assert!(done.lease_epoch > first.lease_epoch);
    assert_eq!(count_events(&stack, &run, "SUCCEEDED").await, 1);
    // The first host comes back: its agent finds the old container, learns its lease is
    // stale, and removes it without reporting anything.
    stack.start_agent_named(&first_agent).await;
    let gone = stack
        .wait_for(Duration::from_secs(30), || async {
            containers_for_run(&run).is_empty()
        })
        .await;
    assert!(gone, "the fenced container was not removed");
    let after = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert_eq!(after.state, pb::RunState::Succeeded as i32);
    assert_eq!(after.lease_epoch, done.lease_epoch);
    let violations = ledger::check_events(&stack.db, None).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    stack.stop().await;
}

#[tokio::test]
async fn cancel_of_a_running_container_terminates_it_within_the_grace() {
    let journal = journal();
    let stack = Stack::start_with(opts(&journal, 10_000)).await;
    let polite = submit(
        &stack,
        pb::RunSpec {
            cancel_grace_seconds: 5,
            ..sh("trap 'echo got TERM; exit 143' TERM; while true; do sleep 0.1; done")
        },
    )
    .await;
    let stubborn = submit(
        &stack,
        pb::RunSpec {
            cancel_grace_seconds: 2,
            ..sh("trap '' TERM; while true; do sleep 0.1; done")
        },
    )
    .await;
    for run in [&polite, &stubborn] {
        wait_run(
            &stack,
            run,
            Duration::from_secs(60),
            in_state(pb::RunState::Running),
        )
        .await;
    }
    let mut client = stack.client().await;
    for run in [&polite, &stubborn] {
        client
            .cancel_run(pb::CancelRunRequest {
                run_id: run.to_string(),
                reason: "test".into(),
            })
            .await
            .unwrap();
    }
    let p = wait_run(
        &stack,
        &polite,
        Duration::from_secs(30),
        in_state(pb::RunState::Cancelled),
    )
    .await;
    assert!(String::from_utf8_lossy(&p.output).contains("got TERM"));
    let s = wait_run(
        &stack,
        &stubborn,
        Duration::from_secs(30),
        in_state(pb::RunState::Cancelled),
    )
    .await;
    // Ignoring SIGTERM earns a SIGKILL after the grace.
    assert_eq!(s.exit_code, Some(137), "{}", s.reason);
    for run in [&polite, &stubborn] {
        let gone = stack
            .wait_for(Duration::from_secs(10), || async {
                containers_for_run(run).is_empty()
            })
            .await;
        assert!(gone, "container of {run} left behind");
    }
    stack.stop().await;
}

#[tokio::test]
async fn sigterm_drains_finishing_the_run_in_flight_then_deregisters() {
    let journal = journal();
    let mut o = opts(&journal, 10_000);
    o.env
        .push(("DROVER_DRAIN_TIMEOUT_SECS".into(), "60".into()));
    let mut stack = Stack::start_with(o).await;
    let run = submit(&stack, sh("sleep 3; echo drained fine")).await;
    wait_run(
        &stack,
        &run,
        Duration::from_secs(60),
        in_state(pb::RunState::Running),
    )
    .await;
    let agent = stack.agent_id.clone();
    stack.signal(&agent, Signal::SIGTERM);
    // It takes no new work meanwhile.
    let later = submit(&stack, sh("echo later")).await;
    let status = stack
        .wait_exit(&agent, Duration::from_secs(60))
        .await
        .expect("agent did not exit after draining");
    assert!(status.success(), "agent exited with {status}");
    let done = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert_eq!(
        done.state,
        pb::RunState::Succeeded as i32,
        "{}",
        done.reason
    );
    let l = wait_run(&stack, &later, Duration::from_secs(5), |_| true).await;
    assert_eq!(l.state, pb::RunState::Queued as i32);
    let known: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE id = $1")
        .bind(&agent)
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(known, 0, "a drained agent deregisters");
    stack.stop().await;
}

#[tokio::test]
async fn a_drain_timeout_hands_the_run_back_without_using_an_attempt() {
    let journal = journal();
    let mut o = opts(&journal, 10_000);
    o.env.push(("DROVER_DRAIN_TIMEOUT_SECS".into(), "1".into()));
    let mut stack = Stack::start_with(o).await;
    let run = submit(&stack, sh("sleep 60")).await;
    wait_run(
        &stack,
        &run,
        Duration::from_secs(60),
        in_state(pb::RunState::Running),
    )
    .await;
    let agent = stack.agent_id.clone();
    let mut admin = stack.admin().await;
    admin
        .drain_agent(pb::DrainAgentRequest {
            agent_id: agent.clone(),
        })
        .await
        .unwrap();
    let status = stack
        .wait_exit(&agent, Duration::from_secs(60))
        .await
        .expect("agent did not exit after a remote drain");
    assert!(status.success(), "agent exited with {status}");
    let r = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Queued),
    )
    .await;
    assert_eq!(r.attempt, 1, "handing back does not use an attempt");
    assert!(r.reason.starts_with("handed_back"), "{}", r.reason);
    let gone = stack
        .wait_for(Duration::from_secs(10), || async {
            containers_for_run(&run).is_empty()
        })
        .await;
    assert!(gone, "handed-back container left behind");
    stack.stop().await;
}
