//! Idempotent submit against the real API: one key, one run, one message — even when 50
//! clients race — and a different spec under a used key is ALREADY_EXISTS naming the run.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};
use tonic::Code;

fn spec(cmd: &str) -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["echo".into(), cmd.into()],
        env: [
            ("A".to_string(), "1".to_string()),
            ("B".to_string(), "2".to_string()),
        ]
        .into_iter()
        .collect(),
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_concurrent_submits_with_one_key_make_one_run() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let channel = stack.channel().await;
    let mut tasks = Vec::new();
    for _ in 0..50 {
        let mut client = stack.client_on(channel.clone());
        tasks.push(tokio::spawn(async move {
            client
                .submit_run(pb::SubmitRunRequest {
                    spec: Some(spec("once")),
                    idempotency_key: "build-42".into(),
                })
                .await
                .map(|r| r.into_inner())
        }));
    }
    let mut ids = Vec::new();
    let mut fresh = 0;
    for t in tasks {
        let resp = t.await.unwrap().expect("every racing submit succeeds");
        fresh += usize::from(!resp.deduplicated);
        ids.push(resp.run.unwrap().id);
    }
    ids.dedup();
    assert_eq!(ids.len(), 1, "one run id for all 50");
    assert_eq!(
        fresh, 1,
        "exactly one submit created it; 49 were told deduplicated"
    );
    let (runs, outbox, events): (i64, i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM runs), (SELECT count(*) FROM outbox), \
                (SELECT count(*) FROM run_events)",
    )
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(
        (runs, outbox, events),
        (1, 1, 1),
        "one run, one message, one event"
    );

    let mut client = stack.client().await;
    // Same key, same spec with maps in another order: the same run.
    let again = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec("once")),
            idempotency_key: "build-42".into(),
        })
        .await
        .unwrap()
        .into_inner();
    assert!(again.deduplicated);
    assert_eq!(again.run.unwrap().id, ids[0]);
    // Same key, different spec: ALREADY_EXISTS naming the existing run, nothing stored.
    let err = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec("different")),
            idempotency_key: "build-42".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::AlreadyExists);
    assert!(err.message().contains(&ids[0]), "{}", err.message());
    let runs: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(runs, 1);
    stack.stop().await;
}
