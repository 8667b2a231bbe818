//! The archive of `drover.dead`: every dead-lettered message, recorded by the dispatchers
//! that consume that queue, and the operator's redrive of a dead-lettered run.

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::{PgConnection, PgPool, Row};

use super::runs::{self, EventRecord, RunRecord, Transition, TransitionPatch};
use crate::error::CoreError;
use crate::ids::{RunId, TenantId};
use crate::state::RunState;

/// Bodies are kept up to this size; operators need to recognise a message, not replay it.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeadKind {
    /// A run used all its attempts (published by drover itself).
    RunExhausted,
    /// The body could not be parsed.
    Unparseable,
    /// The message named a run that does not exist.
    UnknownRun,
    /// The queue's `x-delivery-limit` was exceeded.
    DeliveryLimit,
    /// A consumer rejected it for another reason.
    Rejected,
}

impl DeadKind {
    pub fn as_str(self) -> &'static str {
        match self {
            DeadKind::RunExhausted => "run_exhausted",
            DeadKind::Unparseable => "unparseable",
            DeadKind::UnknownRun => "unknown_run",
            DeadKind::DeliveryLimit => "delivery_limit",
            DeadKind::Rejected => "rejected",
        }
    }
}

/// One message taken off `drover.dead`.
#[derive(Debug, Clone)]
pub struct NewDeadLetter {
    pub tenant_id: Option<TenantId>,
    pub run_id: Option<RunId>,
    pub kind: DeadKind,
    pub reason: String,
    pub source_queue: String,
    pub payload: Vec<u8>,
    /// Identical for a redelivery of the same dead letter, so it is archived once.
    pub fingerprint: String,
}

#[derive(Debug, Clone)]
pub struct DeadLetterRecord {
    pub id: i64,
    pub tenant_id: Option<TenantId>,
    pub run_id: Option<RunId>,
    pub kind: String,
    pub reason: String,
    pub source_queue: String,
    pub payload: Vec<u8>,
    pub at: DateTime<Utc>,
    pub redriven_at: Option<DateTime<Utc>>,
}

impl DeadLetterRecord {
    fn from_row(row: &PgRow) -> Result<Self, CoreError> {
        let tenant: Option<uuid::Uuid> = row.try_get("tenant_id")?;
        let run: Option<uuid::Uuid> = row.try_get("run_id")?;
        Ok(Self {
            id: row.try_get("id")?,
            tenant_id: tenant.map(TenantId),
            run_id: run.map(RunId),
            kind: row.try_get("kind")?,
            reason: row.try_get("reason")?,
            source_queue: row.try_get("source_queue")?,
            payload: row.try_get("payload")?,
            at: row.try_get("at")?,
            redriven_at: row.try_get("redriven_at")?,
        })
    }
}

/// Archives one dead letter; a repeat (same fingerprint) is a no-op. True when inserted.
pub async fn record(conn: &mut PgConnection, d: &NewDeadLetter) -> Result<bool, CoreError> {
    let body = &d.payload[..d.payload.len().min(MAX_PAYLOAD_BYTES)];
    let done = sqlx::query(
        "INSERT INTO dead_letters (tenant_id, run_id, kind, reason, source_queue, payload, \
         fingerprint) VALUES ($1, $2, $3, $4, $5, $6, $7) ON CONFLICT (fingerprint) DO NOTHING",
    )
    .bind(d.tenant_id.map(|t| t.0))
    .bind(d.run_id.map(|r| r.0))
    .bind(d.kind.as_str())
    .bind(&d.reason)
    .bind(&d.source_queue)
    .bind(body)
    .bind(&d.fingerprint)
    .execute(conn)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Newest first. A tenant sees its own runs' dead letters and those that named no known run
/// (fleet-level; restricted to operators once roles exist).
pub async fn list(
    pool: &PgPool,
    tenant: TenantId,
    limit: i64,
    before: Option<i64>,
) -> Result<Vec<DeadLetterRecord>, CoreError> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, run_id, kind, reason, source_queue, payload, at, redriven_at \
         FROM dead_letters WHERE (tenant_id = $1 OR tenant_id IS NULL) \
         AND ($2::bigint IS NULL OR id < $2) ORDER BY id DESC LIMIT $3",
    )
    .bind(tenant.0)
    .bind(before)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(DeadLetterRecord::from_row).collect()
}

/// DEAD_LETTERED -> QUEUED as the next attempt, with one more attempt allowed, its dispatch
/// message, and the archive rows marked redriven — one transaction.
pub async fn redrive(
    pool: &PgPool,
    tenant: TenantId,
    run_id: RunId,
    reason: &str,
    actor: &str,
) -> Result<(RunRecord, EventRecord), CoreError> {
    let mut tx = pool.begin().await?;
    let t = Transition {
        tenant: Some(tenant),
        reason: Some(reason.to_owned()),
        patch: TransitionPatch::Redrive,
        ..Transition::new(run_id, RunState::Queued).by(actor)
    };
    let (run, event) = runs::transition(&mut tx, &t).await?;
    runs::enqueue_run_message(&mut tx, &run).await?;
    sqlx::query(
        "UPDATE dead_letters SET redriven_at = now() WHERE run_id = $1 AND redriven_at IS NULL",
    )
    .bind(run_id.0)
    .execute(&mut *tx)
    .await?;
    tx.commit().await?;
    crate::observe::record_transition(&event);
    Ok((run, event))
}
