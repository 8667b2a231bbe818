//! The approval gate: PENDING_APPROVAL → QUEUED (approve) or REJECTED (reject, or the
//! approval deadline passing). The decision locks the run row, so of many concurrent
//! decisions exactly one applies; the rest find the run no longer waiting and are refused.

use sqlx::PgPool;
use uuid::Uuid;

use super::runs::{self, EventRecord, RunRecord, Transition};
use crate::error::{CoreError, Refusal};
use crate::ids::{RunId, TenantId};
use crate::state::RunState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Decision {
    Approve,
    Reject,
}

/// Who decides: the token (checked against the submitter) and whether the tenant allows
/// self-approval.
#[derive(Debug, Clone)]
pub struct Decider {
    pub token: Uuid,
    pub actor: String,
    pub allow_self_approval: bool,
}

/// Applies `decision` to a run of `tenant` waiting for approval.
pub async fn decide(
    pool: &PgPool,
    tenant: TenantId,
    run_id: RunId,
    decision: Decision,
    by: &Decider,
    reason: &str,
) -> Result<(RunRecord, EventRecord), CoreError> {
    let mut tx = pool.begin().await?;
    let run = runs::lock(&mut tx, run_id)
        .await?
        .filter(|r| r.tenant_id == tenant)
        .ok_or(CoreError::Refused(Refusal::NotFound))?;
    let to = match decision {
        Decision::Approve => RunState::Queued,
        Decision::Reject => RunState::Rejected,
    };
    if run.state != RunState::PendingApproval {
        return Err(Refusal::Illegal {
            from: run.state,
            to,
        }
        .into());
    }
    let submitted_by: Option<Uuid> =
        sqlx::query_scalar("SELECT submitted_by FROM runs WHERE id = $1")
            .bind(run_id.0)
            .fetch_one(&mut *tx)
            .await?;
    if decision == Decision::Approve && submitted_by == Some(by.token) && !by.allow_self_approval {
        return Err(CoreError::Forbidden(
            "a token cannot approve a run it submitted (the tenant does not allow \
             self-approval)"
                .into(),
        ));
    }
    let t = Transition {
        tenant: Some(tenant),
        reason: Some(reason.to_owned()),
        ..Transition::new(run_id, to).by(by.actor.clone())
    };
    let (run, event) = runs::transition(&mut tx, &t).await?;
    sqlx::query("UPDATE runs SET decided_by = $2 WHERE id = $1")
        .bind(run_id.0)
        .bind(by.token)
        .execute(&mut *tx)
        .await?;
    if to == RunState::Queued {
        runs::enqueue_run_message(&mut tx, &run).await?;
    }
    tx.commit().await?;
    crate::observe::record_transition(&event);
    Ok((run, event))
}

/// Runs waiting for approval past their deadline.
pub async fn overdue(pool: &PgPool, limit: i64) -> Result<Vec<RunId>, CoreError> {
    let ids: Vec<Uuid> = sqlx::query_scalar(
        "SELECT id FROM runs WHERE state = 'PENDING_APPROVAL' AND approval_deadline < now() \
         ORDER BY approval_deadline LIMIT $1",
    )
    .bind(limit)
    .fetch_all(pool)
    .await?;
    Ok(ids.into_iter().map(RunId).collect())
}

/// Ends a run whose approval deadline passed as REJECTED; `None` if it was decided meanwhile.
pub async fn expire(
    pool: &PgPool,
    run_id: RunId,
) -> Result<Option<(RunRecord, EventRecord)>, CoreError> {
    let mut tx = pool.begin().await?;
    let Some(run) = runs::lock(&mut tx, run_id)
        .await?
        .filter(|r| r.state == RunState::PendingApproval)
    else {
        return Ok(None);
    };
    let t = Transition {
        reason: Some(format!(
            "approval timed out: no decision within {} s",
            run.spec.approval_timeout_secs
        )),
        ..Transition::new(run_id, RunState::Rejected).by("reaper")
    };
    let (run, event) = runs::transition(&mut tx, &t).await?;
    tx.commit().await?;
    crate::observe::record_transition(&event);
    Ok(Some((run, event)))
}
