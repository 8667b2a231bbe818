//! One assignment attempt: in a single transaction, lock the run while it is still QUEUED
//! for its attempt, lock an agent with a free slot, check its tenant's concurrency quota,
//! move the run to ASSIGNED under a new lease epoch and write the agent's command to the
//! outbox. A duplicate message finds the run no longer QUEUED for that attempt and is dropped.
//!
//! Locks are taken in one order on every path — run row, agent row, tenant chain (the quota
//! count, then the transition's event) — and the run row comes first as it does for cancels
//! and reports (run, then chain), so assignments do not deadlock with them. Used for a run
//! whose message just arrived ([`try_assign`]) and for parked runs ([`crate::parked`]).

use drover_core::CoreError;
use drover_core::ids::LeaseEpoch;
use drover_core::messages::{self, AgentCommand, RunMessage};
use drover_core::observe;
use drover_core::repo::parking::{self, OverQuota, Precheck};
use drover_core::repo::{RunRecord, Transition, TransitionPatch, agents, outbox, runs};
use drover_core::state::RunState;
use drover_core::topology;
use sqlx::{PgPool, Postgres, Transaction};

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Assigned {
        agent_id: String,
        epoch: i64,
        seq: i32,
    },
    /// Already assigned, finished or superseded: the message is a duplicate.
    Obsolete,
    /// No run with that id for that tenant.
    UnknownRun,
    /// No live agent with a free slot fits; park it.
    NoCapacity,
    /// Its tenant has as many runs assigned or running as its quota allows; park it.
    OverQuota(OverQuota),
    /// Runs of its pool are parked already: it queues behind them (parked too) instead of
    /// taking a slot they have waited longer for.
    BehindParked,
}

/// What every assignment needs from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub lease_ttl_ms: i64,
    /// `quota.max_concurrent_runs`: the tenants' default concurrency limit (0 = none).
    pub default_max_concurrent: u32,
}

/// The path of a run whose message just arrived.
pub async fn try_assign(
    pool: &PgPool,
    msg: &RunMessage,
    limits: Limits,
    handoff: &outbox::Handoff,
) -> Result<Outcome, CoreError> {
    match parking::precheck(pool, msg.tenant_id, msg.run_id, msg.attempt).await? {
        Precheck::Unknown => return Ok(Outcome::UnknownRun),
        Precheck::Obsolete => return Ok(Outcome::Obsolete),
        Precheck::BehindParked => return Ok(Outcome::BehindParked),
        Precheck::Dispatchable => {}
    }
    let mut tx = pool.begin().await?;
    let Some(queued) =
        parking::lock_queued(&mut tx, msg.tenant_id, msg.run_id, msg.attempt).await?
    else {
        return Ok(Outcome::Obsolete);
    };
    assign_locked(tx, queued, limits, handoff).await
}

/// Assigns `queued`, whose row the transaction holds locked while QUEUED at its attempt, and
/// commits; on any other outcome the transaction is dropped (rolled back). The agent's command
/// is written leased to this process's relay and handed to it after the commit.
pub async fn assign_locked(
    mut tx: Transaction<'static, Postgres>,
    queued: RunRecord,
    limits: Limits,
    handoff: &outbox::Handoff,
) -> Result<Outcome, CoreError> {
    let Some(agent_id) = agents::pick_and_lock(
        &mut tx,
        &queued.spec.pool,
        &queued.spec.labels,
        limits.lease_ttl_ms,
    )
    .await?
    else {
        return Ok(Outcome::NoCapacity);
    };
    if let Some(over) =
        parking::check_quota(&mut tx, queued.tenant_id, limits.default_max_concurrent).await?
    {
        return Ok(Outcome::OverQuota(over));
    }
    let t = Transition {
        tenant: Some(queued.tenant_id),
        expected_attempt: Some(queued.attempt),
        reason: Some(format!("assigned to {agent_id}")),
        patch: TransitionPatch::Assign {
            agent_id: agent_id.clone(),
            lease_ttl_ms: limits.lease_ttl_ms,
        },
        ..Transition::new(queued.id, RunState::Assigned)
    };
    let (run, event) = match runs::transition(&mut tx, &t).await {
        Ok(done) => done,
        // Cannot happen while the row lock is held; kept as the compare-and-set's answer.
        Err(CoreError::Refused(_)) => return Ok(Outcome::Obsolete),
        Err(e) => return Err(e),
    };
    let cmd = AgentCommand::Execute {
        run_id: run.id,
        tenant_id: run.tenant_id,
        attempt: run.attempt,
        lease_epoch: LeaseEpoch(run.lease_epoch),
    };
    let traceparent = drover_core::telemetry::current_traceparent();
    let message = outbox::Message {
        exchange: topology::AGENTS_EXCHANGE,
        routing_key: &agent_id,
        payload: &messages::encode(&cmd),
        traceparent: traceparent.as_deref(),
    };
    let row = outbox::enqueue_leased(&mut tx, run.tenant_id, message, handoff.lease_ms()).await?;
    tx.commit().await?;
    handoff.hand(row);
    observe::record_transition(&event);
    metrics::counter!(observe::names::ASSIGNMENTS).increment(1);
    // Queue wait: from when the attempt became dispatchable (entered QUEUED, or its retry
    // backoff ended) to this commit. `queued` is the locked read of the same QUEUED row.
    let dispatchable = queued
        .not_before
        .map_or(queued.updated_at, |nb| nb.max(queued.updated_at));
    let waited = (chrono::Utc::now() - dispatchable)
        .num_milliseconds()
        .max(0) as f64
        / 1000.0;
    metrics::histogram!(observe::names::QUEUE_WAIT).record(waited);
    Ok(Outcome::Assigned {
        agent_id,
        epoch: run.lease_epoch,
        seq: event.seq,
    })
}
