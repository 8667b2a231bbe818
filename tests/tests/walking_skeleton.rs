//! One real run end to end: client → API → Postgres → outbox → RabbitMQ → dispatcher →
//! agent → Docker → back through Postgres and Redis — every component a separate process.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};

const IMAGE: &str = "drover/busybox:latest";

fn spec(cmd: &[&str]) -> pb::RunSpec {
    pb::RunSpec {
        image: IMAGE.into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout_seconds: 120,
        ..Default::default()
    }
}

/// Submits, then follows WatchRun to the end; returns the events' (from, to) states and the
/// terminal run.
async fn submit_and_watch(stack: &Stack, s: pb::RunSpec) -> (Vec<(i32, i32)>, pb::Run) {
    let mut client = stack.client().await;
    let run = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(s),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(run.state, pb::RunState::Queued as i32);
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .expect("watch")
        .into_inner();
    let mut events = Vec::new();
    let mut last = None;
    let deadline = tokio::time::sleep(Duration::from_secs(120));
    tokio::pin!(deadline);
    loop {
        tokio::select! {
            _ = &mut deadline => { stack.dump_logs(); panic!("run {} did not finish in 120 s; events {events:?}", run.id) }
            msg = stream.message() => match msg.expect("watch stream") {
                Some(m) => {
                    let ev = m.event.expect("event");
                    assert_eq!(ev.seq as usize, events.len() + 1, "events arrive in order, gap-free");
                    events.push((ev.from_state, ev.to_state));
                    if m.run.is_some() { last = m.run; }
                }
                None => break,
            }
        }
    }
    (events, last.expect("terminal event carries the run"))
}

use pb::RunState as S;

fn states(events: &[(i32, i32)]) -> Vec<i32> {
    events.iter().map(|&(_, to)| to).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn echo_hello_succeeds_and_fails_with_exit_code() {
    let stack = Stack::start().await;

    let (events, run) = submit_and_watch(&stack, spec(&["echo", "hello"])).await;
    assert_eq!(
        states(&events),
        vec![
            S::Queued as i32,
            S::Assigned as i32,
            S::Running as i32,
            S::Succeeded as i32
        ],
        "WatchRun streams QUEUED → ASSIGNED → RUNNING → SUCCEEDED"
    );
    assert_eq!(
        events[0].0,
        S::Unspecified as i32,
        "first event has no previous state"
    );
    assert_eq!(run.state, S::Succeeded as i32);
    assert_eq!(run.exit_code, Some(0));
    assert_eq!(String::from_utf8_lossy(&run.output), "hello\n");
    assert_eq!(run.agent_id, stack.agent_id);
    assert_eq!(run.executor, "docker");
    assert_eq!(run.lease_epoch, 1);

    let (events, run) =
        submit_and_watch(&stack, spec(&["sh", "-c", "echo oops >&2; exit 3"])).await;
    assert_eq!(
        states(&events),
        vec![
            S::Queued as i32,
            S::Assigned as i32,
            S::Running as i32,
            S::Failed as i32
        ]
    );
    assert_eq!(run.exit_code, Some(3));
    assert!(String::from_utf8_lossy(&run.output).contains("oops"));

    // GetRun agrees with the stream; the containers are gone after the final report.
    let mut client = stack.client().await;
    let got = client
        .get_run(pb::GetRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(got.state, S::Failed as i32);
    assert_eq!(got.exit_code, Some(3));
    let gone = stack
        .wait_for(Duration::from_secs(10), || async {
            drover_tests::services::containers_for_run(&run.id).is_empty()
        })
        .await;
    assert!(gone, "container removed after the final report");

    // Logs pushed by the agent were stored.
    let logged: i64 = sqlx::query_scalar("SELECT count(*) FROM run_logs")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert!(logged >= 2, "log chunks of both runs stored, got {logged}");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn duplicate_deliveries_are_harmless() {
    use lapin::options::BasicPublishOptions;
    use lapin::{BasicProperties, Connection, ConnectionProperties};

    let stack = Stack::start().await;
    let (_, run) = submit_and_watch(&stack, spec(&["echo", "once"])).await;
    assert_eq!(run.state, S::Succeeded as i32);

    // Publish the run's dispatch message twice more by hand, as a redelivery would.
    let msg = format!(
        r#"{{"v":1,"run_id":"{}","tenant_id":"00000000-0000-0000-0000-000000000001","attempt":1}}"#,
        run.id
    );
    let conn = Connection::connect(&stack.amqp_url, ConnectionProperties::default())
        .await
        .unwrap();
    let ch = conn.create_channel().await.unwrap();
    ch.confirm_select(Default::default()).await.unwrap();
    for _ in 0..2 {
        ch.basic_publish(
            "drover.runs".into(),
            "default".into(),
            BasicPublishOptions::default(),
            msg.as_bytes(),
            BasicProperties::default(),
        )
        .await
        .unwrap()
        .await
        .unwrap();
    }
    // The dispatcher drains them (queue empty) without touching the finished run.
    let drained = stack
        .wait_for(Duration::from_secs(20), || async {
            ch.queue_declare(
                "drover.runs.default".into(),
                lapin::options::QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                Default::default(),
            )
            .await
            .map(|q| q.message_count() == 0)
            .unwrap_or(false)
        })
        .await;
    assert!(drained, "duplicates consumed");
    let (events, epoch): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM run_events WHERE run_id = $1), \
                (SELECT lease_epoch FROM runs WHERE id = $1)",
    )
    .bind(uuid::Uuid::parse_str(&run.id).unwrap())
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(events, 4, "no event added by the duplicates");
    assert_eq!(epoch, 1, "never assigned again");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn watch_falls_back_to_postgres_when_redis_is_down() {
    // A port nothing listens on: every Redis operation fails.
    let stack = Stack::start_with(StackOptions {
        redis_url: "redis://127.0.0.1:1".into(),
        ..Default::default()
    })
    .await;
    let (events, run) = submit_and_watch(&stack, spec(&["echo", "no redis"])).await;
    assert_eq!(run.state, S::Succeeded as i32);
    assert_eq!(states(&events).len(), 4, "every transition still streamed");
    assert_eq!(String::from_utf8_lossy(&run.output), "no redis\n");
    stack.stop().await;
}
