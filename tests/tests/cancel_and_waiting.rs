//! Cancel (queued, running, racing completion), queue timeouts and "why is it still queued",
//! with scripted agents so the races are exact: the real API and dispatcher processes.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_chaos::ledger;
use drover_proto::v1 as pb;
use drover_tests::fake_agent::{FakeAgent, in_state, submit, wait_run};
use drover_tests::{Stack, StackOptions};

fn spec() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn no_agent_stack() -> Stack {
    Stack::start_with(StackOptions {
        agent: false,
        ..Default::default()
    })
    .await
}

async fn cancel(stack: &Stack, run: &str) -> Result<pb::Run, tonic::Status> {
    stack
        .client()
        .await
        .cancel_run(pb::CancelRunRequest {
            run_id: run.into(),
            reason: "test".into(),
        })
        .await
        .map(|r| r.into_inner().run.unwrap())
}

fn wait_code(run: &pb::Run) -> pb::WaitCode {
    run.wait
        .as_ref()
        .and_then(|w| pb::WaitCode::try_from(w.code).ok())
        .unwrap_or(pb::WaitCode::Unspecified)
}

#[tokio::test]
async fn why_is_it_still_queued() {
    let stack = no_agent_stack().await;
    let run = submit(&stack, spec()).await;
    let r = wait_run(&stack, &run, Duration::from_secs(10), |_| true).await;
    assert_eq!(wait_code(&r), pb::WaitCode::NoLiveAgent);
    assert_eq!(r.wait.unwrap().message, "no live agent in pool default");

    // A live agent without the run's labels.
    let mut plain = FakeAgent::register(&stack, "fake-plain", 1, &[]).await;
    let gpu_run = submit(
        &stack,
        pb::RunSpec {
            labels: [("gpu".to_string(), "true".to_string())].into(),
            ..spec()
        },
    )
    .await;
    // The label-less run is assigned to the plain agent, which is then full.
    let held = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    plain.heartbeat(&[(run.clone(), held.lease_epoch)]).await;
    let r = wait_run(&stack, &gpu_run, Duration::from_secs(10), |_| true).await;
    assert_eq!(wait_code(&r), pb::WaitCode::NoMatchingAgent, "{:?}", r.wait);

    let third = submit(&stack, spec()).await;
    let r = wait_run(&stack, &third, Duration::from_secs(10), |_| true).await;
    assert_eq!(wait_code(&r), pb::WaitCode::AllAgentsFull, "{:?}", r.wait);
    assert!(r.wait.unwrap().message.contains("1/1 slots busy"));

    // A failed attempt waiting for its backoff says until when.
    let retrying = submit(
        &stack,
        pb::RunSpec {
            max_attempts: 2,
            retry: Some(pb::RetryPolicy {
                initial_backoff_ms: 60_000,
                retry_exit_codes: vec![9],
                ..Default::default()
            }),
            ..spec()
        },
    )
    .await;
    // Free the slot for the retrying run (and only for it).
    cancel(&stack, &third).await.unwrap();
    let _alive = plain.keep_alive(stack.db.clone());
    plain.started(&run, held.lease_epoch).await.unwrap();
    plain
        .complete(&run, held.lease_epoch, pb::Outcome::Succeeded, Some(0))
        .await
        .unwrap();
    let assigned = wait_run(
        &stack,
        &retrying,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    plain
        .started(&retrying, assigned.lease_epoch)
        .await
        .unwrap();
    plain
        .complete(
            &retrying,
            assigned.lease_epoch,
            pb::Outcome::Failed,
            Some(9),
        )
        .await
        .unwrap();
    let r = wait_run(&stack, &retrying, Duration::from_secs(10), |_| true).await;
    assert_eq!(r.state, pb::RunState::Queued as i32);
    assert_eq!(wait_code(&r), pb::WaitCode::RetryBackoff, "{:?}", r.wait);
    assert!(r.wait.unwrap().until.is_some());
    stack.stop().await;
}

#[tokio::test]
async fn a_queue_timeout_ends_a_waiting_run() {
    let stack = Stack::start_with(
        StackOptions {
            agent: false,
            ..Default::default()
        }
        .short_leases(2_000),
    )
    .await;
    let run = submit(
        &stack,
        pb::RunSpec {
            queue_timeout_seconds: 1,
            ..spec()
        },
    )
    .await;
    let r = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::TimedOut),
    )
    .await;
    assert!(r.reason.starts_with("queue_timeout:"), "{}", r.reason);
    stack.stop().await;
}

#[tokio::test]
async fn cancel_a_queued_run_at_once_and_only_once() {
    let stack = no_agent_stack().await;
    let run = submit(&stack, spec()).await;
    let r = cancel(&stack, &run).await.unwrap();
    assert_eq!(r.state, pb::RunState::Cancelled as i32);
    let again = cancel(&stack, &run).await.unwrap_err();
    assert_eq!(again.code(), tonic::Code::FailedPrecondition);
    let missing = cancel(&stack, &uuid::Uuid::now_v7().to_string())
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    // An agent that registers later never gets it.
    let _agent = FakeAgent::register(&stack, "fake-late", 1, &[]).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let r = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert_eq!(r.state, pb::RunState::Cancelled as i32);
    assert!(r.agent_id.is_empty());
    stack.stop().await;
}

#[tokio::test]
async fn cancel_a_running_run_reaches_the_agent() {
    let stack = no_agent_stack().await;
    let mut agent = FakeAgent::register(&stack, "fake-cancel", 2, &[]).await;
    let run = submit(&stack, spec()).await;
    let a = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    agent.started(&run, a.lease_epoch).await.unwrap();
    let r = cancel(&stack, &run).await.unwrap();
    assert_eq!(r.state, pb::RunState::Running as i32);
    assert!(r.cancel_requested);
    // A second cancel while the agent works on it is harmless.
    assert!(cancel(&stack, &run).await.unwrap().cancel_requested);
    // The heartbeat answer carries it (the backstop when the broker is down).
    let hb = agent.heartbeat(&[(run.clone(), a.lease_epoch)]).await;
    assert_eq!(hb.cancel.len(), 1);
    assert_eq!(hb.cancel[0].run_id, run);
    // So does the agent's command queue.
    let queued: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE routing_key = $1 AND convert_from(payload, 'UTF8') LIKE '%\"kind\":\"cancel\"%'",
    )
    .bind("fake-cancel")
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(queued, 1);
    let done = agent
        .complete(&run, a.lease_epoch, pb::Outcome::Cancelled, Some(143))
        .await
        .unwrap();
    assert_eq!(done.state, pb::RunState::Cancelled as i32);
    stack.stop().await;
}

#[tokio::test]
async fn cancel_racing_completion_ends_in_exactly_one_terminal_state() {
    let stack = no_agent_stack().await;
    let mut agent = FakeAgent::register(&stack, "fake-race", 64, &[]).await;
    let alive = agent.keep_alive(stack.db.clone());
    let mut runs = Vec::new();
    for _ in 0..20 {
        runs.push(submit(&stack, spec()).await);
    }
    let mut leases = Vec::new();
    for run in &runs {
        let a = wait_run(
            &stack,
            run,
            Duration::from_secs(60),
            in_state(pb::RunState::Assigned),
        )
        .await;
        agent.started(run, a.lease_epoch).await.unwrap();
        leases.push((run.clone(), a.lease_epoch));
    }
    let mut races = Vec::new();
    for (run, epoch) in leases {
        let mut agent = FakeAgent {
            id: agent.id.clone(),
            client: agent.client.clone(),
        };
        let client_stack_endpoint = stack.client().await;
        races.push(tokio::spawn(async move {
            let mut client = client_stack_endpoint;
            let (c, d) = tokio::join!(
                client.cancel_run(pb::CancelRunRequest {
                    run_id: run.clone(),
                    reason: "race".into()
                }),
                agent.complete(&run, epoch, pb::Outcome::Succeeded, Some(0)),
            );
            (c.map(|_| ()), d.map(|_| ()))
        }));
    }
    for race in races {
        let (c, d) = race.await.unwrap();
        // The completion always lands (the agent holds the lease); the cancel either arrived
        // first (requested, then superseded by the completion) or found the run ended.
        d.unwrap();
        if let Err(status) = c {
            assert_eq!(status.code(), tonic::Code::FailedPrecondition);
        }
    }
    for run in &runs {
        let r = wait_run(&stack, run, Duration::from_secs(10), |_| true).await;
        assert_eq!(r.state, pb::RunState::Succeeded as i32);
    }
    alive.abort();
    let ids: Vec<uuid::Uuid> = runs.iter().map(|r| r.parse().unwrap()).collect();
    let violations = ledger::check_events(&stack.db, Some(&ids)).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    stack.stop().await;
}
