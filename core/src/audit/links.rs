//! Reading chain rows back: one query shape over `run_events` and `audit_events`, and the
//! conversion of a row into the [`Entry`] it hashes as. Shared by the sealer (which hashes a
//! row for the first time) and the verifier (which hashes it again), so the two cannot drift.

use sqlx::Row;
use sqlx::postgres::PgRow;
use uuid::Uuid;

use super::{Entry, run_event_fields};
use crate::error::CoreError;

/// The columns both tables contribute, as one row shape (`kind` is `run` for run events).
/// Followed by `FROM run_events` / `FROM audit_events` and the caller's conditions.
pub(super) const RUN_EVENT_COLUMNS: &str = "SELECT chain_seq, 'run' AS kind, actor, at, \
     prev_hash, hash, run_id::text AS run_id, seq, from_state, to_state, attempt, lease_epoch, \
     agent_id, reason, NULL AS subject, NULL AS detail, xid::text AS xid, audit_order";
pub(super) const AUDIT_EVENT_COLUMNS: &str = "SELECT chain_seq, kind, actor, at, prev_hash, \
     hash, NULL, NULL, NULL, NULL, NULL, NULL, NULL, NULL, subject, detail, xid::text, \
     audit_order";

/// A chain row: where it lives (for reports) and what it hashes as.
pub(super) struct ChainRow {
    pub location: String,
    pub entry: Entry,
}

/// Reads a row of the [`RUN_EVENT_COLUMNS`] / [`AUDIT_EVENT_COLUMNS`] shape; `chain_seq` is
/// the stored one, or 0 for a row not sealed yet (the sealer fills it in).
pub(super) fn chain_row(tenant: Uuid, row: &PgRow) -> Result<ChainRow, CoreError> {
    let kind: String = row.try_get("kind")?;
    let (location, fields) = if kind == "run" {
        let run: String = row.try_get("run_id")?;
        let ev_seq: i32 = row.try_get("seq")?;
        let run_uuid = Uuid::parse_str(&run).map_err(|e| CoreError::Corrupt(e.to_string()))?;
        let from: Option<String> = row.try_get("from_state")?;
        let to: String = row.try_get("to_state")?;
        let agent: Option<String> = row.try_get("agent_id")?;
        let reason: Option<String> = row.try_get("reason")?;
        (
            format!("run_events run={run} seq={ev_seq}"),
            run_event_fields(
                run_uuid,
                ev_seq,
                from.as_deref(),
                &to,
                row.try_get("attempt")?,
                row.try_get("lease_epoch")?,
                agent.as_deref(),
                reason.as_deref(),
            ),
        )
    } else {
        let subject: String = row.try_get("subject")?;
        (
            format!("audit_events {kind} {subject}"),
            vec![Some(subject), row.try_get("detail")?],
        )
    };
    let entry = Entry {
        tenant,
        chain_seq: row.try_get::<Option<i64>, _>("chain_seq")?.unwrap_or(0),
        actor: row
            .try_get::<Option<String>, _>("actor")?
            .unwrap_or_default(),
        kind,
        at: row.try_get("at")?,
        fields,
    };
    Ok(ChainRow { location, entry })
}
