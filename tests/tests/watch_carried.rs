//! WatchRun and the events a Redis message carries (`drover_core::announce`), against the
//! real API binary, Postgres and Redis: events that follow what the watcher sent without a
//! gap go out as the message carried them, with no read; a message whose events leave a gap
//! is only a hint, and the watcher reads Postgres instead. Runs stay QUEUED here (no
//! dispatcher, no agent), so the only way an event that Postgres does not hold reaches the
//! client is the carried path: Redis is trusted like Postgres, and these tests publish on
//! the API's own channel to tell the two paths apart.

#![allow(
    clippy::unwrap_used,
    clippy::expect_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_core::announce;
use drover_proto::v1 as pb;
use drover_tests::fake_agent::submit;
use drover_tests::services::redis_url;
use drover_tests::stack::{Stack, StackOptions};
use futures::StreamExt;

const WAIT: Duration = Duration::from_secs(10);

fn spec() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn api_only() -> Stack {
    Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await
}

type Watch = tonic::Streaming<pb::WatchRunResponse>;

/// A stack of the API alone, a run that stays QUEUED, and its watch past the first event.
async fn watched_queued_run() -> (Stack, String, Watch) {
    let stack = api_only().await;
    let run = submit(&stack, spec()).await;
    let mut w = watch(&stack, &run).await;
    assert_eq!(
        seq_and_state(&next(&mut w).await),
        (1, pb::RunState::Queued)
    );
    (stack, run, w)
}

async fn watch(stack: &Stack, run: &str) -> Watch {
    stack
        .client()
        .await
        .watch_run(pb::WatchRunRequest { run_id: run.into() })
        .await
        .unwrap()
        .into_inner()
}

async fn next(w: &mut Watch) -> pb::WatchRunResponse {
    tokio::time::timeout(WAIT, w.next())
        .await
        .expect("an event in time")
        .expect("the stream goes on")
        .expect("no error")
}

async fn assert_ended(w: &mut Watch) {
    let over = tokio::time::timeout(WAIT, w.next()).await.expect("ends");
    assert!(over.is_none(), "a terminal event ends the stream");
}

fn seq_and_state(m: &pb::WatchRunResponse) -> (u64, pb::RunState) {
    let e = m.event.as_ref().unwrap();
    (e.seq, pb::RunState::try_from(e.to_state).unwrap())
}

/// Publishes on `run`'s events channel a message announcing `newest` and carrying `msgs`.
async fn publish(stack: &Stack, run: &str, newest: i32, msgs: &[pb::WatchRunResponse]) {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}run:{run}:events", stack.redis_prefix);
    let payload = announce::encode(newest, msgs).unwrap();
    let heard: i64 = redis::cmd("PUBLISH")
        .arg(&channel)
        .arg(payload)
        .query_async(&mut conn)
        .await
        .unwrap();
    assert_eq!(heard, 1, "the API's hub is subscribed to {channel}");
}

fn carried(run: &str, seq: u64, to: pb::RunState, reason: &str) -> pb::WatchRunResponse {
    pb::WatchRunResponse {
        event: Some(pb::RunEvent {
            run_id: run.into(),
            seq,
            from_state: pb::RunState::Queued.into(),
            to_state: to.into(),
            reason: reason.into(),
            ..Default::default()
        }),
        run: None,
    }
}

#[tokio::test]
async fn a_watcher_sends_carried_events_that_follow_on_without_reading_them() {
    let (stack, run, mut w) = watched_queued_run().await;

    // Postgres holds no event 2 of this run: only the message can deliver it.
    let mut end = carried(&run, 2, pb::RunState::Cancelled, "carried by the message");
    end.run = Some(pb::Run {
        id: run.clone(),
        state: pb::RunState::Cancelled.into(),
        ..Default::default()
    });
    publish(&stack, &run, 2, &[end.clone()]).await;
    let got = next(&mut w).await;
    assert_eq!(got, end, "the carried event and run, as published");
    assert_ended(&mut w).await;
    stack.stop().await;
}

#[tokio::test]
async fn carried_events_after_a_gap_are_a_hint_and_postgres_is_read() {
    let (stack, run, mut w) = watched_queued_run().await;

    // Event 3 without event 2: a gap. The watcher reads Postgres (nothing new) and sends
    // nothing; event 3 never goes out.
    let stray = carried(&run, 3, pb::RunState::Assigned, "after a gap");
    publish(&stack, &run, 3, &[stray]).await;
    let quiet = tokio::time::timeout(Duration::from_millis(500), w.next()).await;
    assert!(quiet.is_err(), "nothing sent for a gap: {quiet:?}");

    // A real cancel: its event 2 comes from Postgres, with the run.
    stack
        .client()
        .await
        .cancel_run(pb::CancelRunRequest {
            run_id: run.clone(),
            reason: "from postgres".into(),
        })
        .await
        .unwrap();
    let got = next(&mut w).await;
    assert_eq!(seq_and_state(&got), (2, pb::RunState::Cancelled));
    let reason = &got.event.as_ref().unwrap().reason;
    assert!(reason.contains("from postgres"), "{reason}");
    assert_eq!(got.run.as_ref().unwrap().id, run);
    assert_ended(&mut w).await;
    stack.stop().await;
}
