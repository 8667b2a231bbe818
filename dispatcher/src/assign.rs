//! One assignment attempt: in a single transaction, check the run is still QUEUED for the
//! message's attempt, lock an agent with a free slot, move the run to ASSIGNED under a new
//! lease epoch and write the agent's command to the outbox. The caller acks only after this
//! commits; a duplicate message finds the run no longer QUEUED for that attempt and is dropped.

use drover_core::CoreError;
use drover_core::ids::LeaseEpoch;
use drover_core::messages::{self, AgentCommand, RunMessage};
use drover_core::observe;
use drover_core::repo::{Transition, TransitionPatch, agents, outbox, runs};
use drover_core::state::RunState;
use drover_core::topology;
use sqlx::PgPool;

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
    /// No live agent with a free slot fits; wait for capacity.
    NoCapacity,
}

pub async fn try_assign(
    pool: &PgPool,
    msg: &RunMessage,
    lease_ttl_ms: i64,
) -> Result<Outcome, CoreError> {
    // Cheap pre-check outside the transaction: duplicates (the common redelivery case) cost
    // one read. The conditional UPDATE below re-checks state and attempt under the lock.
    let Some(run) = runs::get(pool, msg.tenant_id, msg.run_id).await? else {
        return Ok(Outcome::UnknownRun);
    };
    if run.state != RunState::Queued || run.attempt != msg.attempt {
        return Ok(Outcome::Obsolete);
    }
    let queued = run;
    let mut tx = pool.begin().await?;
    let Some(agent_id) = agents::pick_and_lock(
        &mut tx,
        &queued.spec.pool,
        &queued.spec.labels,
        lease_ttl_ms,
    )
    .await?
    else {
        return Ok(Outcome::NoCapacity);
    };
    let t = Transition {
        tenant: Some(msg.tenant_id),
        expected_attempt: Some(msg.attempt),
        reason: Some(format!("assigned to {agent_id}")),
        patch: TransitionPatch::Assign {
            agent_id: agent_id.clone(),
            lease_ttl_ms,
        },
        ..Transition::new(msg.run_id, RunState::Assigned)
    };
    let (run, event) = match runs::transition(&mut tx, &t).await {
        Ok(done) => done,
        // Another dispatcher won the race for this attempt.
        Err(CoreError::Refused(_)) => return Ok(Outcome::Obsolete),
        Err(e) => return Err(e),
    };
    let cmd = AgentCommand::Execute {
        run_id: run.id,
        tenant_id: run.tenant_id,
        attempt: run.attempt,
        lease_epoch: LeaseEpoch(run.lease_epoch),
    };
    outbox::enqueue(
        &mut tx,
        run.tenant_id,
        topology::AGENTS_EXCHANGE,
        &agent_id,
        &messages::encode(&cmd),
    )
    .await?;
    tx.commit().await?;
    observe::record_transition(&event);
    metrics::counter!(observe::names::ASSIGNMENTS).increment(1);
    // Queue wait: from when the attempt became dispatchable (entered QUEUED, or its retry
    // backoff ended) to this commit. `queued` is the pre-check read of the same QUEUED row.
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
