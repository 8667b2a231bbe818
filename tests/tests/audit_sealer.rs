//! The audit chain off the commit path, against real Postgres: writers append unchained rows,
//! the sealer links them in transaction-id order once no earlier transaction can still add a
//! row, and the queued-runs quota (which no longer rides on the chain's lock) never overshoots.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::sync::Arc;

use drover_core::CoreError;
use drover_core::audit::{self, Wait};
use drover_core::ids::DEFAULT_TENANT;
use drover_core::repo::runs;
use drover_tests::services;
use sqlx::PgPool;

async fn fresh_db(connections: u32) -> (String, PgPool) {
    services::migrated_database(connections).await
}

fn spec() -> drover_core::spec::RunSpec {
    services::noop_spec()
}

async fn chain(pool: &PgPool) -> Vec<(i64, String)> {
    sqlx::query_as(
        "SELECT chain_seq, subject FROM audit_events WHERE tenant_id = $1 \
         AND chain_seq IS NOT NULL ORDER BY chain_seq",
    )
    .bind(DEFAULT_TENANT.0)
    .fetch_all(pool)
    .await
    .unwrap()
}

/// Verifies once every row is sealed: another test's write transaction (xids are
/// cluster-wide) may hold the horizon back for a moment.
async fn verify_once_sealed(pool: &PgPool) -> audit::Verdict {
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = audit::verify(pool, DEFAULT_TENANT).await.unwrap();
        assert!(v.broken.is_none(), "{v:?}");
        if v.unsealed == 0 || tokio::time::Instant::now() > deadline {
            assert_eq!(v.unsealed, 0, "rows still unsealed after 30 s: {v:?}");
            return v;
        }
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_row_waits_for_every_earlier_transaction_and_takes_its_place_in_xid_order() {
    let (name, pool) = fresh_db(5).await;
    audit::seal_tenant(&pool, DEFAULT_TENANT, Wait::Yes)
        .await
        .unwrap();
    let before = chain(&pool).await.len();

    // T1 writes first and stays open; T2 writes later and commits first.
    let mut t1 = pool.begin().await.unwrap();
    audit::record(&mut t1, DEFAULT_TENANT, "test.mark", "test", "first", "")
        .await
        .unwrap();
    let mut t2 = pool.begin().await.unwrap();
    audit::record(&mut t2, DEFAULT_TENANT, "test.mark", "test", "second", "")
        .await
        .unwrap();
    t2.commit().await.unwrap();

    // T2's row is committed, but T1 (an earlier transaction id) could still add a row that
    // belongs before it: nothing may be sealed yet.
    let sealed = audit::seal_tenant(&pool, DEFAULT_TENANT, Wait::Yes)
        .await
        .unwrap();
    assert_eq!(sealed, 0, "sealed past a running earlier transaction");
    let v = audit::verify(&pool, DEFAULT_TENANT).await.unwrap();
    assert!(v.broken.is_none(), "{v:?}");
    assert_eq!(
        v.unsealed, 1,
        "T2's row waits (T1's is not visible yet): {v:?}"
    );

    t1.commit().await.unwrap();
    // Both are sealable now, unless a write transaction of another test (xids are
    // cluster-wide) still holds the horizon back: then they follow as soon as it ends.
    let mut sealed = 0;
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(30);
    while sealed < 2 && tokio::time::Instant::now() < deadline {
        sealed += audit::seal_tenant(&pool, DEFAULT_TENANT, Wait::Yes)
            .await
            .unwrap();
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    assert_eq!(sealed, 2);
    let rows = chain(&pool).await;
    let tail: Vec<&str> = rows[before..].iter().map(|(_, s)| s.as_str()).collect();
    assert_eq!(
        tail,
        ["first", "second"],
        "transaction-id order, not commit order"
    );
    let v = verify_once_sealed(&pool).await;
    assert_eq!(v.checked, v.head_seq);

    // A rolled-back writer leaves nothing behind to seal.
    let mut t3 = pool.begin().await.unwrap();
    audit::record(&mut t3, DEFAULT_TENANT, "test.mark", "test", "never", "")
        .await
        .unwrap();
    t3.rollback().await.unwrap();
    assert_eq!(
        audit::seal_tenant(&pool, DEFAULT_TENANT, Wait::Yes)
            .await
            .unwrap(),
        0
    );
    pool.close().await;
    services::drop_database(&name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_transitions_with_sealers_running_beside_them_verify_whole() {
    let (name, pool) = fresh_db(20).await;
    let stop = tokio_util::sync::CancellationToken::new();
    // Two sealers, as with an API and a dispatcher.
    let sealers: Vec<_> = (0..2)
        .map(|_| {
            tokio::spawn(
                audit::Sealer {
                    pool: pool.clone(),
                    settings: audit::SealSettings {
                        interval_ms: 10,
                        batch_size: 7,
                    },
                }
                .run(stop.clone()),
            )
        })
        .collect();
    let submits: Vec<_> = (0..200)
        .map(|i| {
            let pool = pool.clone();
            tokio::spawn(async move {
                let key = format!("k{i}");
                runs::submit(
                    &pool,
                    DEFAULT_TENANT,
                    &spec(),
                    Some(&key),
                    &runs::Submitter::system("test"),
                )
                .await
                .unwrap()
            })
        })
        .collect();
    for s in submits {
        s.await.unwrap();
    }
    stop.cancel();
    for s in sealers {
        s.await.unwrap();
    }
    let v = verify_once_sealed(&pool).await;
    let events: i64 = sqlx::query_scalar("SELECT count(*) FROM run_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    let audits: i64 = sqlx::query_scalar("SELECT count(*) FROM audit_events")
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(events, 200);
    assert_eq!(
        v.checked,
        events + audits,
        "every row is linked exactly once"
    );
    pool.close().await;
    services::drop_database(&name).await;
}

/// 300 submits at once against `max_queued_runs = 150`: the first ones pass on the shared lock
/// (far from the limit, given the server's `max_connections`), the rest on the exclusive one.
/// Exactly 150 are accepted whatever the interleaving; a deduplicated submit is not refused.
#[tokio::test(flavor = "multi_thread")]
async fn the_queued_runs_quota_admits_exactly_its_limit_under_concurrent_submits() {
    admits_exactly_the_limit(false).await;
}

/// The same through the API's path: with a relay to hand messages to, a submit far from the
/// limit is one statement (`submit_statement`), the others take the transaction.
#[tokio::test(flavor = "multi_thread")]
async fn the_one_statement_submit_admits_exactly_the_queued_runs_limit() {
    admits_exactly_the_limit(true).await;
}

async fn admits_exactly_the_limit(with_relay: bool) {
    let (name, pool) = fresh_db(30).await;
    let max_connections: i64 =
        sqlx::query_scalar("SELECT current_setting('max_connections')::bigint")
            .fetch_one(&pool)
            .await
            .unwrap();
    let limit: i64 = max_connections + 50;
    let pool = Arc::new(pool);
    let (handoff, mut relay) =
        drover_core::repo::outbox::Handoff::channel(60_000, usize::try_from(limit * 2).unwrap());
    let handoff = Arc::new(with_relay.then_some(handoff));
    let tasks: Vec<_> = (0..limit * 2)
        .map(|i| {
            let pool = pool.clone();
            let handoff = handoff.clone();
            tokio::spawn(async move {
                let key = format!("q{i}");
                runs::submit_within(
                    &pool,
                    DEFAULT_TENANT,
                    &spec(),
                    Some(&key),
                    &runs::Submitter::system("test"),
                    Some(limit),
                    handoff.as_ref().as_ref(),
                )
                .await
            })
        })
        .collect();
    let (mut ok, mut refused) = (0, 0);
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => ok += 1,
            Err(CoreError::OverQuota(msg)) => {
                assert!(msg.contains("max_queued_runs"), "{msg}");
                refused += 1;
            }
            Err(e) => panic!("unexpected error: {e}"),
        }
    }
    assert_eq!(ok, limit, "accepted exactly the limit");
    assert_eq!(refused, limit);
    let queued: i64 = sqlx::query_scalar("SELECT count(*) FROM runs WHERE state = 'QUEUED'")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(queued, limit);
    // One dispatch message per accepted run, each handed to the relay when there is one.
    let messages: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&*pool)
        .await
        .unwrap();
    assert_eq!(messages, limit);
    let mut handed = 0;
    while relay.try_recv().is_ok() {
        handed += 1;
    }
    assert_eq!(handed, if with_relay { limit } else { 0 });
    // At the limit, an idempotent retry of an accepted submit still answers with its run.
    let accepted_key: String =
        sqlx::query_scalar("SELECT idempotency_key FROM runs ORDER BY created_at LIMIT 1")
            .fetch_one(&*pool)
            .await
            .unwrap();
    let again = runs::submit_within(
        &pool,
        DEFAULT_TENANT,
        &spec(),
        Some(&accepted_key),
        &runs::Submitter::system("test"),
        Some(limit),
        None,
    )
    .await
    .unwrap();
    assert!(again.deduplicated);
    pool.close().await;
    services::drop_database(&name).await;
}
