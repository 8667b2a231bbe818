//! The agent's everyday loop against the real control plane (see `support` for the harness):
//! execute and report, stale and garbage commands, a missing image, a revoked lease, a drain
//! that lets a run finish. What the tests assert is what the system records: the `runs`,
//! `run_events` and `run_logs` rows, the RabbitMQ queues, and the containers Docker holds.

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

mod support;

use drover_core::repo::{Transition, runs};
use drover_core::spec::RawSpec;
use drover_core::state::RunState;
use drover_core::topology::{AGENTS_EXCHANGE, DEAD_QUEUE, agent_queue};
use lapin::BasicProperties;
use lapin::options::{BasicGetOptions, BasicPublishOptions};
use lapin::types::AMQPValue;
use support::{
    IMAGE, TestEnv, containers, enqueue_execute, eventually, lease, wait_until_no_container,
};

/// Publishes raw bytes to this agent's routing key, as a foreign producer would.
async fn publish_raw(env: &TestEnv, payload: &[u8]) {
    let ch = env.amqp.create_channel().await.unwrap();
    ch.basic_publish(
        AGENTS_EXCHANGE.into(),
        env.agent_id.as_str().into(),
        BasicPublishOptions {
            mandatory: true,
            ..Default::default()
        },
        payload,
        BasicProperties::default().with_delivery_mode(2),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    let _ = ch.close(200, "done".into()).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executes_stores_logs_reports_and_removes_the_container() {
    let env = TestEnv::start().await;
    let run = env
        .submit(IMAGE, &["sh", "-c", "echo hello; echo oops >&2"])
        .await;
    let assigned = env.assign(run).await;
    assert_eq!(assigned.lease_epoch, 1);

    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(done.state, RunState::Succeeded, "reason: {:?}", done.reason);
    assert_eq!(done.exit_code, Some(0));
    // The output tail interleaves both streams in arrival order; Docker does not order
    // stdout against stderr, so either interleaving is right (each stream is exact below).
    assert!(
        [&b"hello\noops\n"[..], &b"oops\nhello\n"[..]].contains(&done.output.as_slice()),
        "output: {:?}",
        String::from_utf8_lossy(&done.output)
    );
    assert!(!done.output_truncated);
    assert_eq!(done.reason.as_deref(), Some("exited with code 0"));
    assert_eq!(done.agent_id.as_deref(), Some(env.agent_id.as_str()));
    assert_eq!(done.lease_epoch, 1);
    assert_eq!(done.executor.as_deref(), Some("docker"));
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    assert_eq!(
        env.events(run).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]
    );
    // Logs were pushed before the completion report, so they are all stored by now.
    let (stdout, stderr) = env.logs(run).await;
    assert_eq!(stdout, b"hello\n");
    assert_eq!(stderr, b"oops\n");

    wait_until_no_container(run).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_command_is_dropped_and_the_agent_carries_on() {
    let mut env = TestEnv::start().await;

    // The stale run: leased at epoch 1, the lease lost and the run leased again at epoch 2
    // (no command for epoch 2 is sent, so nothing may run it). The epoch-1 command is still
    // in the outbox, as a late duplicate would be.
    let stale = env.submit(IMAGE, &["sh", "-c", "echo must not run"]).await;
    let mut tx = env.pool.begin().await.unwrap();
    let first = lease(&mut tx, stale, &env.agent_id, env.opts.lease_ttl_ms).await;
    let requeue = Transition {
        expected_epoch: Some(first.lease_epoch),
        reason: Some("lease lost".into()),
        ..Transition::new(stale, RunState::Queued)
    };
    runs::transition(&mut tx, &requeue).await.unwrap();
    let second = lease(&mut tx, stale, &env.agent_id, env.opts.lease_ttl_ms).await;
    assert_eq!((first.lease_epoch, second.lease_epoch), (1, 2));
    enqueue_execute(&mut tx, &env.agent_id, &second, first.lease_epoch).await;
    tx.commit().await.unwrap();

    // A valid command queued behind it is served.
    let valid = env.submit(IMAGE, &["sh", "-c", "echo fine"]).await;
    env.assign(valid).await;
    let done = env.wait_for_state(valid, RunState::Succeeded).await;
    assert_eq!(done.output, b"fine\n");
    wait_until_no_container(valid).await;

    env.stop_agent().await;
    // The API refused GetAssignment (FAILED_PRECONDITION: stale epoch); the agent acked and
    // dropped the command: it is neither back in the agent's queue nor dead-lettered.
    assert_eq!(env.ready_messages(&agent_queue(&env.agent_id)).await, 0);
    assert_eq!(env.ready_messages(DEAD_QUEUE).await, 0);
    // Nothing ran for it: no container, no start, no logs, no report.
    assert!(containers(stale).is_empty(), "a container was created");
    let rec = env.run(stale).await;
    assert_eq!(rec.state, RunState::Assigned);
    assert_eq!(rec.lease_epoch, 2);
    assert!(rec.started_at.is_none() && rec.executor.is_none());
    assert_eq!(
        env.events(stale).await,
        ["QUEUED", "ASSIGNED", "QUEUED", "ASSIGNED"]
    );
    assert_eq!(env.logs(stale).await, (Vec::new(), Vec::new()));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_command_is_dead_lettered_and_the_agent_carries_on() {
    let mut env = TestEnv::start().await;
    let garbage: &[u8] = b"{not a command";
    publish_raw(&env, garbage).await;

    let run = env.submit(IMAGE, &["sh", "-c", "echo still here"]).await;
    env.assign(run).await;
    let done = env.wait_for_state(run, RunState::Succeeded).await;
    assert_eq!(done.output, b"still here\n");
    wait_until_no_container(run).await;

    // Rejected without requeue, the queue's dead-letter exchange moved it to `drover.dead`.
    eventually("the garbage command in drover.dead", async || {
        (env.ready_messages(DEAD_QUEUE).await == 1).then_some(())
    })
    .await;
    let ch = env.amqp.create_channel().await.unwrap();
    let dead = ch
        .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead-lettered message");
    assert_eq!(dead.delivery.data, garbage);
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .expect("dead-letter headers");
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(header("x-first-death-reason"), "rejected");
    assert_eq!(header("x-first-death-queue"), agent_queue(&env.agent_id));
    let _ = ch.close(200, "done".into()).await;

    env.stop_agent().await;
    assert_eq!(env.ready_messages(&agent_queue(&env.agent_id)).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_is_an_infrastructure_failure_and_is_retried() {
    let env = TestEnv::start().await;
    // Two attempts, and no exit code is retryable: only an infrastructure error (reported
    // with `infrastructure_error = true`) sends it back to the queue.
    let run = env
        .submit_spec(RawSpec {
            image: "drover/not-here:never".into(),
            command: vec!["true".into()],
            max_attempts: 2,
            ..Default::default()
        })
        .await;
    env.assign(run).await;

    let requeued = env
        .wait_for_run(run, "back in the queue", |r| r.attempt == 2)
        .await;
    assert_eq!(requeued.state, RunState::Queued, "retried as attempt 2");
    let reason = requeued.reason.clone().unwrap_or_default();
    assert!(
        reason.starts_with(
            "image_unavailable: image drover/not-here:never is not present on this host"
        ),
        "reason: {reason}"
    );
    assert_eq!(requeued.exit_code, None);
    assert!(requeued.started_at.is_none(), "it never ran");
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "QUEUED"]);
    assert!(containers(run).is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_zero_exit_is_a_plain_failure() {
    let env = TestEnv::start().await;
    // Attempts left, but a non-zero exit is retried only when the spec asks: final FAILED.
    let run = env
        .submit_spec(RawSpec {
            image: IMAGE.into(),
            command: vec!["sh".into(), "-c".into(), "echo bad; exit 3".into()],
            max_attempts: 2,
            ..Default::default()
        })
        .await;
    env.assign(run).await;
    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(done.state, RunState::Failed, "reason: {:?}", done.reason);
    assert_eq!(done.exit_code, Some(3));
    assert_eq!(done.reason.as_deref(), Some("exited with code 3"));
    assert_eq!(done.attempt, 1);
    assert_eq!(done.output, b"bad\n");
    wait_until_no_container(run).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_stops_and_removes_the_container_without_a_report() {
    let mut env = TestEnv::start().await;
    let run = env.submit(IMAGE, &["sleep", "30"]).await;
    env.assign(run).await;
    let running = env.wait_for_state(run, RunState::Running).await;
    assert_eq!(containers(run).len(), 1, "one container runs it");

    // The agent's heartbeats renew the lease while it runs.
    let first_expiry = running.lease_expires_at.expect("a running run has a lease");
    env.wait_for_run(run, "renewed by a heartbeat", |r| {
        r.lease_expires_at.is_some_and(|t| t > first_expiry)
    })
    .await;

    // Simulate the reaper taking the lease and a dispatcher giving the run to another agent:
    // a direct UPDATE rather than their transitions (hence no run_events row for it).
    env.steal_lease(run, 1).await;

    // The next heartbeat answers with the lease revoked: the agent kills and removes the
    // container (the run had ~30 s left, so this is the agent's doing).
    wait_until_no_container(run).await;

    // Once the agent has stopped nothing more can come from it: the run is as the test left it.
    env.stop_agent().await;
    let rec = env.run(run).await;
    assert_eq!(rec.state, RunState::Assigned);
    assert_eq!(rec.lease_epoch, 2);
    assert_eq!(rec.agent_id.as_deref(), Some("some-other-agent"));
    assert_eq!(rec.reason.as_deref(), Some("reassigned by the test"));
    assert_eq!(rec.exit_code, None);
    assert!(rec.finished_at.is_none());
    assert!(rec.output.is_empty());
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "RUNNING"]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_execution_finish_and_report() {
    let mut env = TestEnv::start().await;
    let run = env
        .submit(IMAGE, &["sh", "-c", "sleep 2; echo drained"])
        .await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;
    assert_eq!(containers(run).len(), 1, "the run is executing");

    // Stop the agent mid-run: it stops intake, lets the run finish, reports it, removes the
    // container, and only then returns Ok.
    env.stop_agent().await;
    let rec = env.run(run).await;
    assert_eq!(rec.state, RunState::Succeeded, "reason: {:?}", rec.reason);
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.output, b"drained\n");
    assert_eq!(env.logs(run).await.0, b"drained\n");
    assert!(
        containers(run).is_empty(),
        "container removed before return"
    );
    env.finish().await;
}
