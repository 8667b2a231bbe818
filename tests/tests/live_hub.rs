//! The API's shared Redis pub/sub connection (`drover_api::live`), against the real Redis:
//! watchers of a channel share one subscription, the channel is unsubscribed when its last
//! watcher goes, and a lost connection ends every subscription (the watchers fall back to
//! Postgres) and the next subscribe connects again.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_api::live::LiveHub;
use drover_tests::services::redis_url;

async fn publish(conn: &mut redis::aio::MultiplexedConnection, channel: &str) {
    let _: i64 = redis::cmd("PUBLISH")
        .arg(channel)
        .arg("1")
        .query_async(conn)
        .await
        .unwrap();
}

async fn numsub(conn: &mut redis::aio::MultiplexedConnection, channel: &str) -> i64 {
    let v: (String, i64) = redis::cmd("PUBSUB")
        .arg("NUMSUB")
        .arg(channel)
        .query_async(conn)
        .await
        .unwrap();
    v.1
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watchers_share_one_subscription_that_ends_with_the_last_or_the_connection() {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (a, b, c) = (format!("{tag}:a"), format!("{tag}:b"), format!("{tag}:c"));
    let hub = LiveHub::new(client);
    let wait = Duration::from_secs(5);

    let mut first = hub.subscribe(std::slice::from_ref(&a)).await.unwrap();
    let mut second = hub.subscribe(&[a.clone(), b.clone()]).await.unwrap();
    assert_eq!(hub.subscribed(), 2);
    assert_eq!(
        numsub(&mut conn, &a).await,
        1,
        "one connection for both watchers"
    );

    publish(&mut conn, &a).await;
    assert!(tokio::time::timeout(wait, first.changed()).await.unwrap());
    assert!(tokio::time::timeout(wait, second.changed()).await.unwrap());
    // A message that came while nobody was waiting is not lost: `b`'s message is in before
    // `a`'s (one connection delivers in order), and `second` only looks after both.
    publish(&mut conn, &b).await;
    publish(&mut conn, &a).await;
    assert!(tokio::time::timeout(wait, first.changed()).await.unwrap());
    assert!(tokio::time::timeout(wait, second.changed()).await.unwrap());

    drop(first);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(
        numsub(&mut conn, &a).await,
        1,
        "still watched by the second"
    );
    drop(second);
    let mut left = 1;
    for _ in 0..50 {
        left = numsub(&mut conn, &a).await + numsub(&mut conn, &b).await;
        if left == 0 && hub.subscribed() == 0 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert_eq!(
        (left, hub.subscribed()),
        (0, 0),
        "unsubscribed after the last watcher"
    );

    // The connection is killed: the subscription ends; the next subscribe reconnects. (This
    // kills every pub/sub client of the server: the watchers of tests running alongside fall
    // back to polling and subscribe again, which is what they are built to do.)
    let mut third = hub.subscribe(std::slice::from_ref(&c)).await.unwrap();
    let _: i64 = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("TYPE")
        .arg("pubsub")
        .query_async(&mut conn)
        .await
        .unwrap();
    assert!(!tokio::time::timeout(wait, third.changed()).await.unwrap());
    drop(third);
    let mut again = hub.subscribe(std::slice::from_ref(&c)).await.unwrap();
    publish(&mut conn, &c).await;
    assert!(tokio::time::timeout(wait, again.changed()).await.unwrap());
}

/// What a WatchRun skips a read by: the highest number announced on its channels, whatever
/// order the messages came in, and only numbers (a log channel's bytes are not one).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_subscription_knows_the_highest_seq_announced() {
    let client = redis::Client::open(redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let channel = format!("{}:events", uuid::Uuid::now_v7().simple());
    let hub = LiveHub::new(client);
    let wait = Duration::from_secs(5);
    let mut sub = hub.subscribe(std::slice::from_ref(&channel)).await.unwrap();
    assert_eq!(sub.hinted(), 0, "nothing announced yet");
    for (payload, expect) in [("4", 4), ("2", 4), ("not a number", 4), ("7", 7)] {
        let _: i64 = redis::cmd("PUBLISH")
            .arg(&channel)
            .arg(payload)
            .query_async(&mut conn)
            .await
            .unwrap();
        assert!(tokio::time::timeout(wait, sub.changed()).await.unwrap());
        assert_eq!(sub.hinted(), expect, "after {payload:?}");
    }
    // A later watcher of the same channel starts from what was announced before it.
    let late = hub.subscribe(std::slice::from_ref(&channel)).await.unwrap();
    assert_eq!(late.hinted(), 7);
}
