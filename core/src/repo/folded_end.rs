//! A run that succeeded inside the agent's fold window (its start reported with its end): the
//! start and the end in one update of the run's row, with both events.
//!
//! Each transition rewrites the row, and since the state is indexed none of those rewrites can
//! be a heap-only update: each new row version adds an entry to every index of `runs`. The
//! separate start, then end, cost a short run two of them; this costs one, and one statement
//! fewer. Only a success is folded here: it is the common case of a short run, and the only
//! end whose outcome does not depend on the run's row (a failure's retry decision and a
//! cancel's wording read it), so no read is needed first. Everything else takes the two
//! transitions ([`super::runs::transition`], [`super::attempts::end_attempt_with_artifacts`]).

use std::sync::LazyLock;

use sqlx::{PgConnection, Row};

use super::runs::{EventRecord, RunRecord, parse_state, run_columns_of};
use crate::audit;
use crate::error::CoreError;
use crate::ids::RunId;
use crate::state::RunState;

/// The lease holder's report of a run that started and succeeded.
pub struct FoldedSuccess<'a> {
    pub run_id: RunId,
    pub agent: &'a str,
    pub epoch: i64,
    pub executor: &'a str,
    pub start_reason: &'a str,
    pub exit_code: Option<i32>,
    pub output: &'a [u8],
    pub output_truncated: bool,
    pub reason: &'a str,
}

/// What [`super::runs::transition`] would do for ASSIGNED → RUNNING then RUNNING → SUCCEEDED
/// under the same guards (the lease's epoch and agent), in one UPDATE numbering two events.
static FOLDED_SQL: LazyLock<String> = LazyLock::new(|| {
    format!(
        "WITH prev AS (SELECT id, state AS prev_state FROM runs WHERE id = $1 FOR UPDATE), \
         upd AS (UPDATE runs r SET \
           state = 'SUCCEEDED', \
           last_seq = r.last_seq + 2, \
           lease_expires_at = NULL, \
           executor = $4, \
           exit_code = COALESCE($5, r.exit_code), \
           output = $6, \
           output_truncated = $7, \
           reason = $8, \
           started_at = now(), \
           finished_at = now(), \
           not_before = NULL, \
           queue_deadline = NULL, \
           parked_at = NULL, parked_quota = NULL, \
           updated_at = now() \
         FROM prev WHERE r.id = prev.id AND r.state = 'ASSIGNED' \
           AND r.lease_epoch = $2 AND r.agent_id = $3 \
         RETURNING prev.prev_state, r.last_seq, {RETURNED}), \
         ev AS (INSERT INTO run_events (run_id, seq, tenant_id, from_state, to_state, attempt, \
           lease_epoch, agent_id, reason, at, actor) \
           SELECT id, last_seq - 2 + s.n, tenant_id, \
             CASE s.n WHEN 1 THEN prev_state ELSE 'RUNNING' END, \
             CASE s.n WHEN 1 THEN 'RUNNING' ELSE state END, \
             attempt, lease_epoch, agent_id, CASE s.n WHEN 1 THEN $9 ELSE $8 END, $10, $11 \
           FROM upd, (VALUES (1), (2)) AS s(n) ORDER BY s.n \
           RETURNING seq, at), \
         cap AS (SELECT pg_notify($12, '') FROM upd) \
         SELECT upd.*, (SELECT min(at) FROM ev) AS event_at, \
           (SELECT count(*) FROM ev) AS events, (SELECT count(*) FROM cap) AS woke FROM upd",
        RETURNED = run_columns_of("r")
    )
});

/// Applies `s` if the run is still ASSIGNED under its lease: the run and its two events
/// (start, end). `None` when it is not (the start was reported after all, or the lease is
/// gone); nothing is written, and the two-transition path decides and explains.
pub async fn start_and_succeed(
    conn: &mut PgConnection,
    s: &FoldedSuccess<'_>,
) -> Result<Option<(RunRecord, EventRecord, EventRecord)>, CoreError> {
    let row = sqlx::query(&FOLDED_SQL)
        .bind(s.run_id.0)
        .bind(s.epoch)
        .bind(s.agent)
        .bind(s.executor)
        .bind(s.exit_code)
        .bind(s.output)
        .bind(s.output_truncated)
        .bind(s.reason)
        .bind(s.start_reason)
        .bind(audit::now())
        .bind(format!("agent:{}", s.agent))
        .bind(super::CAPACITY_CHANNEL)
        .fetch_optional(&mut *conn)
        .await?;
    let Some(row) = row else {
        return Ok(None);
    };
    let prev: String = row.try_get("prev_state")?;
    let run = RunRecord::from_row(&row)?;
    let at = row.try_get("event_at")?;
    let event = |seq: i32, from: RunState, to: RunState, reason: &str| EventRecord {
        run_id: run.id,
        seq,
        from_state: Some(from),
        to_state: to,
        attempt: run.attempt,
        lease_epoch: run.lease_epoch,
        reason: Some(reason.to_owned()),
        at,
    };
    let last: i32 = row.try_get("last_seq")?;
    let from = parse_state(&prev)?;
    let started = event(last - 1, from, RunState::Running, s.start_reason);
    let ended = event(last, RunState::Running, RunState::Succeeded, s.reason);
    Ok(Some((run, started, ended)))
}
