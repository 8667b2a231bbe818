//! The dispatcher's batch assignment against real Postgres: one transaction for the messages
//! that arrived together, with the same answers the one-run path gives — duplicates and stale
//! attempts dropped, unknown runs flagged, agents' slots shared least loaded first and never
//! overfilled, tenants' quotas counted with the batch's own assignments, and a pool held back
//! once one of its runs could not be placed.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;

use drover_core::ids::{DEFAULT_TENANT, RunId, TenantId};
use drover_core::messages::{self, AgentCommand, RunMessage};
use drover_core::repo::agents::{self, AgentRegistration};
use drover_core::repo::{outbox, parking, runs};
use drover_core::state::RunState;
use drover_dispatcher::assign::{BatchItem, Limits, Outcome, assign_batch};
use drover_tests::services;
use sqlx::PgPool;

const LIMITS: Limits = Limits {
    lease_ttl_ms: 60_000,
    default_max_concurrent: 0,
};

async fn agent(pool: &PgPool, id: &str, capacity: i32) {
    let reg = AgentRegistration {
        id: id.into(),
        hostname: "test".into(),
        pool: "default".into(),
        labels: BTreeMap::new(),
        capacity,
        executor: "mock".into(),
        version: "test".into(),
    };
    agents::register(pool, &reg).await.unwrap();
}

async fn submit(pool: &PgPool, tenant: TenantId) -> RunId {
    runs::submit(
        pool,
        tenant,
        &services::noop_spec(),
        None,
        &runs::Submitter::system("test"),
    )
    .await
    .unwrap()
    .run
    .id
}

fn item(tenant: TenantId, run: RunId, attempt: i32) -> BatchItem {
    BatchItem {
        msg: RunMessage {
            v: 1,
            run_id: run,
            tenant_id: tenant,
            attempt,
        },
        span: tracing::Span::none(),
    }
}

fn agent_of(o: &Outcome) -> &str {
    match o {
        Outcome::Assigned { agent_id, .. } => agent_id,
        other => panic!("not assigned: {other:?}"),
    }
}

#[tokio::test]
async fn a_batch_assigns_spreads_and_holds_back_like_single_assignments() {
    let (name, pool) = services::migrated_database(4).await;
    agent(&pool, "agent-a", 2).await;
    agent(&pool, "agent-b", 2).await;
    let r: Vec<RunId> = {
        let mut v = Vec::new();
        for _ in 0..6 {
            v.push(submit(&pool, DEFAULT_TENANT).await);
        }
        v
    };
    let t = DEFAULT_TENANT;
    let items = vec![
        item(t, r[0], 1),
        item(t, r[1], 1),
        item(t, r[0], 1),         // the same message twice in one batch
        item(t, RunId::new(), 1), // no such run
        item(t, r[2], 2),         // an attempt the run is not at
        item(t, r[3], 1),
        item(t, r[4], 1),
        item(t, r[5], 1), // no slot left: the four went to the two agents
        item(t, r[2], 1), // after a run of its pool was held back
    ];
    let (handoff, mut relay) = outbox::Handoff::channel(60_000, 64);
    let outcomes = assign_batch(&pool, &items, LIMITS, &handoff).await.unwrap();
    assert_eq!(outcomes.len(), items.len());
    // Least loaded first: the agents take turns.
    let placed: Vec<&str> = [0, 1, 5, 6]
        .iter()
        .map(|&i| agent_of(&outcomes[i]))
        .collect();
    assert_eq!(placed, ["agent-a", "agent-b", "agent-a", "agent-b"]);
    assert_eq!(outcomes[2], Outcome::Obsolete);
    assert_eq!(outcomes[3], Outcome::UnknownRun);
    assert_eq!(outcomes[4], Outcome::Obsolete);
    assert_eq!(outcomes[7], Outcome::NoCapacity);
    assert_eq!(outcomes[8], Outcome::BehindParked);

    // Each assignment is a committed ASSIGNED run with its own epoch and one agent command,
    // handed to the relay in the batch's order.
    let mut handed = Vec::new();
    while let Ok(row) = relay.try_recv() {
        handed.push(row);
    }
    assert_eq!(handed.len(), 4);
    for (row, &i) in handed.iter().zip(&[0usize, 1, 5, 6]) {
        let run = runs::get_unscoped(&pool, items[i].msg.run_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(run.state, RunState::Assigned);
        assert_eq!(run.agent_id.as_deref(), Some(agent_of(&outcomes[i])));
        assert_eq!(row.routing_key, agent_of(&outcomes[i]));
        let AgentCommand::Execute {
            run_id,
            lease_epoch,
            attempt,
            ..
        } = messages::decode(&row.payload).unwrap()
        else {
            panic!("not an Execute command");
        };
        assert_eq!(
            (run_id, lease_epoch.0, attempt),
            (run.id, run.lease_epoch, 1)
        );
        let stored: Vec<u8> = sqlx::query_scalar("SELECT payload FROM outbox WHERE id = $1")
            .bind(row.id)
            .fetch_one(&pool)
            .await
            .unwrap();
        assert_eq!(stored, row.payload, "row id and content belong together");
    }
    for &i in &[7usize, 8] {
        let run = runs::get_unscoped(&pool, items[i].msg.run_id)
            .await
            .unwrap()
            .unwrap();
        assert_eq!(run.state, RunState::Queued, "held back, not assigned");
    }

    // A message for a run already assigned is a duplicate; nothing is locked or written.
    let again = assign_batch(&pool, &[item(t, r[0], 1)], LIMITS, &handoff)
        .await
        .unwrap();
    assert_eq!(again, [Outcome::Obsolete]);
    assert!(relay.try_recv().is_err());

    // With a run parked in the pool, a new one queues behind it even though a slot is free.
    sqlx::query("UPDATE agents SET capacity = 3 WHERE id = 'agent-a'")
        .execute(&pool)
        .await
        .unwrap();
    assert!(parking::park(&pool, r[5], 1, None).await.unwrap());
    let fresh = submit(&pool, t).await;
    let behind = assign_batch(&pool, &[item(t, fresh, 1)], LIMITS, &handoff)
        .await
        .unwrap();
    assert_eq!(behind, [Outcome::BehindParked]);
    pool.close().await;
    services::drop_database(&name).await;
}

#[tokio::test]
async fn a_batch_counts_its_own_assignments_against_the_tenant_quota() {
    let (name, pool) = services::migrated_database(4).await;
    agent(&pool, "agent-a", 10).await;
    let capped = TenantId(uuid::Uuid::now_v7());
    sqlx::query("INSERT INTO tenants (id, name, max_concurrent_runs) VALUES ($1, 'capped', 2)")
        .bind(capped.0)
        .execute(&pool)
        .await
        .unwrap();
    let mut mine = Vec::new();
    for _ in 0..3 {
        mine.push(submit(&pool, capped).await);
    }
    let other = submit(&pool, DEFAULT_TENANT).await;
    let items = vec![
        item(capped, mine[0], 1),
        item(capped, mine[1], 1),
        item(capped, mine[2], 1),
        item(DEFAULT_TENANT, other, 1),
    ];
    let (handoff, _relay) = outbox::Handoff::channel(60_000, 64);
    let outcomes = assign_batch(&pool, &items, LIMITS, &handoff).await.unwrap();
    assert!(matches!(outcomes[0], Outcome::Assigned { .. }));
    assert!(matches!(outcomes[1], Outcome::Assigned { .. }));
    assert_eq!(
        outcomes[2],
        Outcome::OverQuota(parking::OverQuota {
            active: 2,
            limit: 2
        })
    );
    // Behind the held-back run, as behind a parked one: the parked-run scheduler places it.
    assert_eq!(outcomes[3], Outcome::BehindParked);
    let active: i64 =
        sqlx::query_scalar("SELECT count(*) FROM runs WHERE tenant_id = $1 AND state = 'ASSIGNED'")
            .bind(capped.0)
            .fetch_one(&pool)
            .await
            .unwrap();
    assert_eq!(active, 2);
    pool.close().await;
    services::drop_database(&name).await;
}

/// Submits a run of `tenant` (with `labels`) and parks it, as the consumer does when no
/// agent has room.
async fn parked_run(pool: &PgPool, tenant: TenantId, labels: &[(&str, &str)]) -> RunId {
    let mut spec = services::noop_spec();
    spec.labels = labels
        .iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect();
    let id = runs::submit(pool, tenant, &spec, None, &runs::Submitter::system("test"))
        .await
        .unwrap()
        .run
        .id;
    assert!(parking::park(pool, id, 1, None).await.unwrap());
    id
}

async fn state_of(pool: &PgPool, id: RunId) -> (RunState, Option<String>) {
    let run = runs::get_unscoped(pool, id).await.unwrap().unwrap();
    (run.state, run.agent_id)
}

#[tokio::test]
async fn the_parked_scheduler_places_a_backlog_in_batches_fairly_past_full_labels() {
    let (name, pool) = services::migrated_database(4).await;
    agent(&pool, "plain", 3).await;
    let gpu = AgentRegistration {
        id: "gpu".into(),
        hostname: "test".into(),
        pool: "default".into(),
        labels: BTreeMap::from([("gpu".to_owned(), "1".to_owned())]),
        capacity: 1,
        executor: "mock".into(),
        version: "test".into(),
    };
    agents::register(&pool, &gpu).await.unwrap();
    let other = TenantId(uuid::Uuid::now_v7());
    sqlx::query("INSERT INTO tenants (id, name) VALUES ($1, 'other')")
        .bind(other.0)
        .execute(&pool)
        .await
        .unwrap();
    // The default tenant's backlog is older; the other tenant's GPU runs are older than its
    // plain ones. Four slots in all, one of them on the GPU agent; seven runs parked.
    let mut a = Vec::new();
    for _ in 0..3 {
        a.push(parked_run(&pool, DEFAULT_TENANT, &[]).await);
    }
    let g1 = parked_run(&pool, other, &[("gpu", "1")]).await;
    let g2 = parked_run(&pool, other, &[("gpu", "1")]).await;
    let p1 = parked_run(&pool, other, &[]).await;
    let p2 = parked_run(&pool, other, &[]).await;

    let (handoff, mut relay) = outbox::Handoff::channel(60_000, 64);
    let scheduler = drover_dispatcher::parked::ParkedScheduler {
        pool_name: "default".into(),
        db: pool.clone(),
        bus: std::sync::Arc::new(
            drover_core::events::EventBus::new(
                &secrecy::SecretString::from(services::redis_url()),
                &format!("{name}:"),
            )
            .unwrap(),
        ),
        limits: LIMITS,
        recheck: std::time::Duration::from_secs(60),
        capacity: std::sync::Arc::new(tokio::sync::Notify::new()),
        parked: std::sync::Arc::new(tokio::sync::Notify::new()),
        outbox: handoff,
    };
    let cancel = tokio_util::sync::CancellationToken::new();
    let task = tokio::spawn(scheduler.run(cancel.clone()));
    let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(20);
    let mut handed = Vec::new();
    while handed.len() < 4 && tokio::time::Instant::now() < deadline {
        match tokio::time::timeout(std::time::Duration::from_millis(200), relay.recv()).await {
            Ok(Some(row)) => handed.push(row),
            Ok(None) => break,
            Err(_) => {}
        }
    }
    // Every slot is taken now: give the scheduler a moment to (wrongly) place more, then stop.
    tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    cancel.cancel();
    task.await.unwrap();
    while let Ok(row) = relay.try_recv() {
        handed.push(row);
    }

    // First look, four picks in fair order (the default tenant's head is older, then they
    // alternate): a0, g1, a1, g2. An unlabelled run fits every agent, and least loaded first
    // with ties by id puts a0 on the GPU agent; its one slot is then taken, so g1 and g2 find
    // no room. That held back neither tenant's plain runs: a1 went to the plain agent. The
    // second look (the GPU label set skipped) gives the other tenant, now with fewer runs,
    // the two slots left: p1 and p2.
    assert_eq!(
        state_of(&pool, a[0]).await,
        (RunState::Assigned, Some("gpu".into()))
    );
    for id in [a[1], p1, p2] {
        assert_eq!(
            state_of(&pool, id).await,
            (RunState::Assigned, Some("plain".into())),
            "{id}"
        );
    }
    for id in [a[2], g1, g2] {
        assert_eq!(state_of(&pool, id).await.0, RunState::Queued, "{id}");
    }
    // No agent holds more than its capacity, though the GPU agent served two selectors.
    let over: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM agents a WHERE a.capacity < (SELECT count(*) FROM runs r \
           WHERE r.agent_id = a.id AND r.state = 'ASSIGNED')",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(over, 0);
    // One command per assignment, to the agent it was assigned to.
    assert_eq!(handed.len(), 4);
    for row in &handed {
        let AgentCommand::Execute { run_id, .. } = messages::decode(&row.payload).unwrap() else {
            panic!("not an Execute command");
        };
        assert_eq!(
            state_of(&pool, run_id).await.1.as_deref(),
            Some(row.routing_key.as_str())
        );
    }
    // The held runs are still parked for the next look.
    let parked: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE state = 'QUEUED' AND parked_at IS NOT NULL",
    )
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(parked, 3);
    pool.close().await;
    services::drop_database(&name).await;
}
