//! The outbox hand-off, against the real Postgres and RabbitMQ: a row written leased to its
//! process's relay and handed over after the commit is published without waiting for its
//! lease, and only once; a leased row whose writer never handed it over (the process died
//! between commit and publish) is published by a relay once its lease ends, not before.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_core::config::RelaySettings;
use drover_core::ids::DEFAULT_TENANT;
use drover_core::outbox_relay::OutboxRelay;
use drover_core::repo::outbox;
use drover_core::topology;
use drover_tests::services;
use lapin::options::BasicGetOptions;
use secrecy::SecretString;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

const AGENT: &str = "handoff-test-agent";

/// Writes one leased row in its own committed transaction.
async fn write_leased(pool: &PgPool, body: &[u8], lease_ms: i64) -> outbox::OutboxRow {
    let mut tx = pool.begin().await.unwrap();
    let message = outbox::Message {
        exchange: topology::AGENTS_EXCHANGE,
        routing_key: AGENT,
        payload: body,
        traceparent: None,
    };
    let row = outbox::enqueue_leased(&mut tx, DEFAULT_TENANT, message, lease_ms)
        .await
        .unwrap();
    tx.commit().await.unwrap();
    row
}

/// Every message waiting in the agent's queue, taken off it.
async fn take_all(ch: &lapin::Channel, queue: &str) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    while let Some(m) = ch
        .basic_get(queue.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
    {
        got.push(m.delivery.data.clone());
    }
    got
}

/// Takes messages until `want` has arrived (panics after 20 s); returns all taken.
async fn wait_for(ch: &lapin::Channel, queue: &str, want: &[u8]) -> Vec<Vec<u8>> {
    let mut got = Vec::new();
    for _ in 0..200 {
        got.extend(take_all(ch, queue).await);
        if got.iter().any(|m| m == want) {
            return got;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!(
        "{:?} was not published within 20 s",
        String::from_utf8_lossy(want)
    );
}

async fn published(pool: &PgPool, id: i64) -> bool {
    sqlx::query_scalar("SELECT published_at IS NOT NULL FROM outbox WHERE id = $1")
        .bind(id)
        .fetch_one(pool)
        .await
        .unwrap()
}

/// A fresh database and vhost with the test agent's queue declared, and a relay on them whose
/// own lease is ten minutes: a row handed to it can only reach the queue within the tests'
/// waits through the hand-off.
struct Fixture {
    db_name: String,
    pool: PgPool,
    vhost: String,
    conn: lapin::Connection,
    ch: lapin::Channel,
    queue: String,
    handoff: outbox::Handoff,
    cancel: CancellationToken,
    relay: Option<tokio::task::JoinHandle<()>>,
}

impl Fixture {
    async fn start() -> Self {
        let (db_name, pool) = services::migrated_database(4).await;
        let vhost = format!("drover-handoff-{}", uuid::Uuid::now_v7().simple());
        let amqp_url = services::create_vhost(&vhost);
        let conn = lapin::Connection::connect(&amqp_url, lapin::ConnectionProperties::default())
            .await
            .unwrap();
        let ch = conn.create_channel().await.unwrap();
        topology::declare_base(&ch).await.unwrap();
        let queue = topology::declare_agent_queue(&ch, AGENT, 10).await.unwrap();
        let relay = OutboxRelay::new(
            pool.clone(),
            SecretString::from(amqp_url),
            10,
            RelaySettings {
                poll_interval_ms: 100,
                batch_size: 200,
                claim_lease_ms: 600_000,
            },
            "handoff-test",
        );
        let handoff = relay.handoff();
        let cancel = CancellationToken::new();
        let relay = Some(tokio::spawn(relay.run(cancel.clone())));
        Self {
            db_name,
            pool,
            vhost,
            conn,
            ch,
            queue,
            handoff,
            cancel,
            relay,
        }
    }

    /// Stops the relay (it flushes what it was handed).
    async fn stop_relay(&mut self) {
        self.cancel.cancel();
        if let Some(relay) = self.relay.take() {
            relay.await.unwrap();
        }
    }

    async fn finish(mut self) {
        self.stop_relay().await;
        let _ = self.conn.close(200, "done".into()).await;
        self.pool.close().await;
        services::delete_vhost(&self.vhost);
        services::drop_database(&self.db_name).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_handed_row_goes_out_at_once_and_an_unhanded_one_after_its_lease() {
    let f = Fixture::start().await;
    assert_eq!(f.handoff.lease_ms(), 600_000);

    // Handed over after the commit: published long before its ten-minute lease, and marked.
    let handed = write_leased(&f.pool, b"handed", f.handoff.lease_ms()).await;
    f.handoff.hand(handed.clone());
    let got = wait_for(&f.ch, &f.queue, b"handed").await;
    assert_eq!(got, vec![b"handed".to_vec()]);
    for _ in 0..50 {
        if published(&f.pool, handed.id).await {
            break;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    assert!(
        published(&f.pool, handed.id).await,
        "a published row is marked"
    );

    // Never handed over, as when its writer died after the commit: nobody publishes it while
    // its lease (3 s) runs, and the running relay's drain does once it has ended.
    let orphan = write_leased(&f.pool, b"orphan", 3_000).await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(
        take_all(&f.ch, &f.queue).await.is_empty(),
        "a leased row was published before its lease ended"
    );
    assert!(!published(&f.pool, orphan.id).await);
    let got = wait_for(&f.ch, &f.queue, b"orphan").await;
    assert_eq!(
        got,
        vec![b"orphan".to_vec()],
        "the orphan once, nothing else"
    );

    // The handed row was never published a second time by a drain.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert!(take_all(&f.ch, &f.queue).await.is_empty());
    f.finish().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn rows_handed_to_a_stopping_relay_are_flushed_not_left_to_their_lease() {
    let mut f = Fixture::start().await;
    // Let it connect, so the rows below are handed to a live relay that is then stopped.
    let first = write_leased(&f.pool, b"first", f.handoff.lease_ms()).await;
    f.handoff.hand(first);
    wait_for(&f.ch, &f.queue, b"first").await;

    let mut ids = Vec::new();
    for i in 0..20 {
        let body = format!("last-{i}");
        let row = write_leased(&f.pool, body.as_bytes(), f.handoff.lease_ms()).await;
        ids.push(row.id);
        f.handoff.hand(row);
    }
    f.stop_relay().await;

    let mut got = take_all(&f.ch, &f.queue).await;
    got.sort();
    let mut want: Vec<Vec<u8>> = (0..20).map(|i| format!("last-{i}").into_bytes()).collect();
    want.sort();
    assert_eq!(
        got, want,
        "every handed row went out once before the relay stopped"
    );
    for id in ids {
        assert!(published(&f.pool, id).await);
    }
    f.finish().await;
}
