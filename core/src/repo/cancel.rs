//! A client's cancel. A run still waiting (QUEUED, PENDING_APPROVAL) ends CANCELLED at once.
//! A run with an agent (ASSIGNED, RUNNING) is marked and the agent is told through its command
//! queue (fast) and its heartbeat answers (the backstop when the broker is down); the agent
//! stops the process and reports CANCELLED. If the run finishes first, that result stands:
//! every end is a guarded transition, so exactly one terminal state wins.

use sqlx::PgPool;

use super::runs::{self, EventRecord, RunRecord, Transition};
use crate::error::{CoreError, Refusal};
use crate::ids::{LeaseEpoch, RunId, TenantId};
use crate::messages::{self, AgentCommand};
use crate::state::RunState;
use crate::topology;

#[derive(Debug)]
pub enum Cancelled {
    /// It was waiting and is now CANCELLED.
    Now(RunRecord, EventRecord),
    /// Its agent has been asked to stop it.
    Requested(RunRecord),
}

pub async fn cancel(
    pool: &PgPool,
    tenant: TenantId,
    run_id: RunId,
    reason: &str,
    actor: &str,
) -> Result<Cancelled, CoreError> {
    let mut tx = pool.begin().await?;
    let run = runs::lock(&mut tx, run_id)
        .await?
        .filter(|r| r.tenant_id == tenant)
        .ok_or(CoreError::Refused(Refusal::NotFound))?;
    match run.state {
        RunState::Queued | RunState::PendingApproval => {
            let t = Transition {
                tenant: Some(tenant),
                reason: Some(reason.to_owned()),
                frees_capacity: true,
                ..Transition::new(run_id, RunState::Cancelled).by(actor)
            };
            let (run, event) = runs::transition(&mut tx, &t).await?;
            tx.commit().await?;
            crate::observe::record_transition(&event);
            Ok(Cancelled::Now(run, event))
        }
        RunState::Assigned | RunState::Running => {
            if run.cancel_requested_at.is_some() {
                // Already on its way; repeating it is harmless.
                tx.rollback().await?;
                return Ok(Cancelled::Requested(run));
            }
            let run = runs::mark_cancel_requested(&mut tx, run_id, reason).await?;
            crate::audit::record(
                &mut tx,
                tenant,
                "run.cancel_requested",
                actor,
                &run_id.to_string(),
                reason,
            )
            .await?;
            if let Some(agent) = run.agent_id.as_deref() {
                let cmd = AgentCommand::Cancel {
                    run_id,
                    lease_epoch: LeaseEpoch(run.lease_epoch),
                    grace_secs: run.spec.cancel_grace_secs,
                };
                super::outbox::enqueue(
                    &mut tx,
                    tenant,
                    topology::AGENTS_EXCHANGE,
                    agent,
                    &messages::encode(&cmd),
                )
                .await?;
            }
            tx.commit().await?;
            Ok(Cancelled::Requested(run))
        }
        from => Err(Refusal::Illegal {
            from,
            to: RunState::Cancelled,
        }
        .into()),
    }
}
