//! Dead letters: poison and unknown-run messages and messages over the delivery limit land in
//! `drover.dead`, are archived for operators, and never block the queue; runs that exhaust
//! their attempts are dead-lettered and can be redriven.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_chaos::ledger;
use drover_proto::v1 as pb;
use drover_tests::fake_agent::{FakeAgent, in_state, submit, wait_run};
use drover_tests::{Stack, StackOptions, services};
use lapin::options::{BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::FieldTable;

async fn dead_letter_kinds(stack: &Stack) -> Vec<(String, String)> {
    let mut admin = stack.admin().await;
    admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .unwrap()
        .into_inner()
        .dead_letters
        .into_iter()
        .map(|d| (d.kind, d.source_queue))
        .collect()
}

async fn wait_dead_letters(stack: &Stack, n: usize) -> Vec<(String, String)> {
    let ok = stack
        .wait_for(Duration::from_secs(30), || async {
            dead_letter_kinds(stack).await.len() >= n
        })
        .await;
    let kinds = dead_letter_kinds(stack).await;
    if !ok {
        stack.dump_logs();
        panic!("expected {n} dead letters, have {kinds:?}");
    }
    kinds
}

#[tokio::test]
async fn poison_and_unknown_run_messages_are_archived_and_the_queue_keeps_flowing() {
    let stack = Stack::start_with(StackOptions {
        agent: false,
        ..Default::default()
    })
    .await;
    let mut agent = FakeAgent::register(&stack, "fake-dlq", 4, &[]).await;
    // The pool queue exists once the dispatcher consumes it.
    let declared = stack
        .wait_for(Duration::from_secs(30), || async {
            services::queue_exists(&stack.vhost, "drover.runs.default")
        })
        .await;
    assert!(declared, "dispatcher never declared drover.runs.default");
    services::publish(&stack.amqp_url, "drover.runs", "default", b"{not json").await;
    let unknown = serde_json::json!({
        "v": 1,
        "run_id": uuid::Uuid::now_v7(),
        "tenant_id": "00000000-0000-0000-0000-000000000001",
        "attempt": 1
    });
    services::publish(
        &stack.amqp_url,
        "drover.runs",
        "default",
        unknown.to_string().as_bytes(),
    )
    .await;

    // The queue keeps flowing: a real run behind the poison is assigned.
    let run = submit(
        &stack,
        pb::RunSpec {
            image: "drover/busybox:latest".into(),
            command: vec!["true".into()],
            ..Default::default()
        },
    )
    .await;
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

    let mut kinds = wait_dead_letters(&stack, 2).await;
    kinds.sort();
    assert_eq!(
        kinds,
        vec![
            ("unknown_run".into(), "drover.runs.default".into()),
            ("unparseable".into(), "drover.runs.default".into()),
        ]
    );
    stack.stop().await;
}

#[tokio::test]
async fn a_message_over_the_delivery_limit_dead_letters_its_run() {
    let stack = Stack::start_with(StackOptions {
        agent: false,
        ..Default::default()
    })
    .await;
    // No dispatcher consumes pool "nobody"; this test plays a consumer that keeps failing.
    let run = submit(
        &stack,
        pb::RunSpec {
            image: "drover/busybox:latest".into(),
            command: vec!["true".into()],
            pool: "nobody".into(),
            ..Default::default()
        },
    )
    .await;
    let conn = lapin::Connection::connect(&stack.amqp_url, lapin::ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.basic_qos(1, BasicQosOptions::default()).await.unwrap();
    let declared = stack
        .wait_for(Duration::from_secs(30), || async {
            services::queue_exists(&stack.vhost, "drover.runs.nobody")
        })
        .await;
    assert!(declared, "the relay never declared drover.runs.nobody");
    let mut consumer = ch
        .basic_consume(
            "drover.runs.nobody".into(),
            "failing-consumer".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    use futures::StreamExt;
    let mut deliveries = 0;
    let dead = tokio::time::timeout(Duration::from_secs(60), async {
        loop {
            tokio::select! {
                d = consumer.next() => {
                    let d = d.unwrap().unwrap();
                    deliveries += 1;
                    d.nack(BasicNackOptions { requeue: true, ..Default::default() }).await.unwrap();
                }
                _ = tokio::time::sleep(Duration::from_millis(300)) => {
                    let state: String = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1::uuid")
                        .bind(&run).fetch_one(&stack.db).await.unwrap();
                    if state == "DEAD_LETTERED" { return; }
                }
            }
        }
    })
    .await;
    if dead.is_err() {
        stack.dump_logs();
        panic!("run not dead-lettered after {deliveries} deliveries");
    }
    // The default limit is 10 redeliveries: the 11th failure dead-letters it.
    assert!(
        deliveries >= 10,
        "dead-lettered after only {deliveries} deliveries"
    );
    let kinds = wait_dead_letters(&stack, 1).await;
    assert_eq!(
        kinds,
        vec![("delivery_limit".into(), "drover.runs.nobody".into())]
    );
    let r = wait_run(&stack, &run, Duration::from_secs(5), |_| true).await;
    assert!(r.reason.contains("delivery limit"), "{}", r.reason);
    let _ = conn.close(200, "done".into()).await;
    stack.stop().await;
}

/// Gaps between each retry's QUEUED event and the next ASSIGNED one, in ms.
async fn retry_gaps(stack: &Stack, run: &str) -> Vec<i64> {
    let rows: Vec<(String, Option<String>, chrono::DateTime<chrono::Utc>)> = sqlx::query_as(
        "SELECT to_state, from_state, at FROM run_events WHERE run_id = $1::uuid ORDER BY seq",
    )
    .bind(run)
    .fetch_all(&stack.db)
    .await
    .unwrap();
    let mut gaps = Vec::new();
    let mut requeued_at = None;
    for (to, from, at) in rows {
        if to == "QUEUED" && from.as_deref() == Some("RUNNING") {
            requeued_at = Some(at);
        } else if to == "ASSIGNED"
            && let Some(q) = requeued_at.take()
        {
            gaps.push((at - q).num_milliseconds());
        }
    }
    gaps
}

#[tokio::test]
async fn retries_follow_the_backoff_schedule_then_dead_letter_and_redrive_runs_again() {
    let stack = Stack::start().await;
    let failing = pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["sh".into(), "-c".into(), "echo failing; exit 3".into()],
        max_attempts: 3,
        retry: Some(pb::RetryPolicy {
            initial_backoff_ms: 1_000,
            multiplier: 2.0,
            max_backoff_ms: 10_000,
            retry_exit_codes: vec![3],
            ..Default::default()
        }),
        ..Default::default()
    };
    let run = submit(&stack, failing.clone()).await;
    // A code not listed is final at once.
    let final_run = submit(
        &stack,
        pb::RunSpec {
            command: vec!["sh".into(), "-c".into(), "exit 4".into()],
            ..failing
        },
    )
    .await;

    let dead = wait_run(
        &stack,
        &run,
        Duration::from_secs(120),
        in_state(pb::RunState::DeadLettered),
    )
    .await;
    assert_eq!((dead.attempt, dead.exit_code), (3, Some(3)));
    let gaps = retry_gaps(&stack, &run).await;
    eprintln!("retry gaps (ms): {gaps:?} for backoff 1000, 2000");
    assert_eq!(gaps.len(), 2, "{gaps:?}");
    for (gap, want) in gaps.iter().zip([1_000i64, 2_000]) {
        assert!(
            *gap >= want - 50,
            "retried after {gap} ms, before its {want} ms backoff"
        );
        assert!(
            *gap < want + 5_000,
            "retried {gap} ms after failing; backoff was {want} ms"
        );
    }
    let failed = wait_run(
        &stack,
        &final_run,
        Duration::from_secs(60),
        in_state(pb::RunState::Failed),
    )
    .await;
    assert_eq!((failed.attempt, failed.exit_code), (1, Some(4)));

    // The exhausted run's record lands in drover.dead and the archive.
    let kinds = wait_dead_letters(&stack, 1).await;
    assert_eq!(kinds, vec![("run_exhausted".into(), "drover.dlx".into())]);

    // Redrive: one more attempt, recorded, executed.
    let mut admin = stack.admin().await;
    let redriven = admin
        .redrive_run(pb::RedriveRunRequest {
            run_id: run.clone(),
            reason: "fixed the flake".into(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!((redriven.attempt, redriven.max_attempts), (4, 4));
    let again = wait_run(&stack, &run, Duration::from_secs(60), |r| {
        r.attempt == 4 && r.state == pb::RunState::DeadLettered as i32
    })
    .await;
    assert_eq!(again.exit_code, Some(3));
    let not_dead = admin
        .redrive_run(pb::RedriveRunRequest {
            run_id: final_run.clone(),
            reason: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(not_dead.code(), tonic::Code::FailedPrecondition);
    let violations = ledger::check_events(&stack.db, None).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    stack.stop().await;
}
