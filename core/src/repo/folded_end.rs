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
//!
//! A folded success whose files Postgres keeps (a completion report's small inline artifacts,
//! see [`super::artifacts`]) goes further: [`start_and_succeed_with_artifacts`] writes the
//! run, its two events, the upload (committed), its bytes and its manifest in one statement,
//! outside any transaction. Before, that was five statements: the upload's row, BEGIN, this
//! update, the manifest's commit, COMMIT. The statement writes nothing unless the run is
//! still ASSIGNED under the lease and has no committed manifest yet (a redriven run's second
//! end replaces one, which the checked path does), so the caller falls back to the separate
//! steps, which decide and explain, whenever it returns `None`.

use std::sync::LazyLock;

use sqlx::{PgConnection, Row};
use uuid::Uuid;

use super::artifacts::{KeptBytes, StagedEntry, manifest_of};
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

/// A folded success's files, when Postgres keeps their bytes: the upload id to give them,
/// the verified entries, their total size and the bytes.
pub struct FoldedArtifacts<'a> {
    pub upload_id: Uuid,
    pub entries: &'a [StagedEntry],
    pub bytes: i64,
    pub kept: &'a KeptBytes,
}

/// What [`super::runs::transition`] would do for ASSIGNED → RUNNING then RUNNING → SUCCEEDED
/// under the same guards (the lease's epoch and agent), in one UPDATE numbering two events;
/// `with_artifacts`, also the upload, its bytes and its manifest, committed. The UPDATE names
/// the run by `$1` for the primary key, as the transition's does (see there why).
fn folded_sql(with_artifacts: bool) -> String {
    let (guard, artifacts) = if with_artifacts {
        (
            " AND NOT EXISTS (SELECT 1 FROM artifact_uploads o WHERE o.run_id = $1 \
               AND o.committed_at IS NOT NULL)",
            ", up AS (INSERT INTO artifact_uploads (id, tenant_id, run_id, attempt, lease_epoch, \
               agent_id, manifest, files, bytes, completed_at, committed_at) \
               SELECT $13, tenant_id, id, attempt, lease_epoch, agent_id, $14, $15, $16, now(), \
               now() FROM upd RETURNING id, run_id, tenant_id, attempt, manifest), \
             kept AS (INSERT INTO artifact_blobs (upload_id, blob, content) \
               SELECT up.id, b.blob, b.content FROM up, \
               unnest($17::integer[], $18::bytea[]) AS b(blob, content)), \
             manifest AS (INSERT INTO artifacts (run_id, path, tenant_id, attempt, upload_id, \
               blob, size, sha256, mode, is_symlink, link_target) \
               SELECT up.run_id, e.path, up.tenant_id, up.attempt, up.id, e.blob, e.size, \
               e.sha256, e.mode, e.is_symlink, e.link_target \
               FROM up, jsonb_to_recordset(up.manifest) AS e(path text, blob integer, \
               size bigint, sha256 text, mode integer, is_symlink boolean, link_target text))",
        )
    } else {
        ("", "")
    };
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
         FROM prev WHERE r.id = $1 AND r.id = prev.id AND r.state = 'ASSIGNED' \
           AND r.lease_epoch = $2 AND r.agent_id = $3{guard} \
         RETURNING prev.prev_state, r.last_seq, {RETURNED}), \
         ev AS (INSERT INTO run_events (run_id, seq, tenant_id, from_state, to_state, attempt, \
           lease_epoch, agent_id, reason, at, actor) \
           SELECT id, last_seq - 2 + s.n, tenant_id, \
             CASE s.n WHEN 1 THEN prev_state ELSE 'RUNNING' END, \
             CASE s.n WHEN 1 THEN 'RUNNING' ELSE state END, \
             attempt, lease_epoch, agent_id, CASE s.n WHEN 1 THEN $9 ELSE $8 END, $10, $11 \
           FROM upd, (VALUES (1), (2)) AS s(n) ORDER BY s.n \
           RETURNING seq, at), \
         cap AS (SELECT pg_notify($12, '') FROM upd){artifacts} \
         SELECT upd.*, (SELECT min(at) FROM ev) AS event_at, \
           (SELECT count(*) FROM ev) AS events, (SELECT count(*) FROM cap) AS woke FROM upd",
        RETURNED = run_columns_of("r")
    )
}

static FOLDED_SQL: LazyLock<String> = LazyLock::new(|| folded_sql(false));
static FOLDED_WITH_ARTIFACTS_SQL: LazyLock<String> = LazyLock::new(|| folded_sql(true));

/// The statement's binds shared by both forms, `$1` to `$12`.
fn bind_folded<'q>(
    sql: &'q str,
    s: &'q FoldedSuccess<'_>,
) -> sqlx::query::Query<'q, sqlx::Postgres, sqlx::postgres::PgArguments> {
    sqlx::query(sql)
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
}

/// Applies `s` if the run is still ASSIGNED under its lease: the run and its two events
/// (start, end). `None` when it is not (the start was reported after all, or the lease is
/// gone); nothing is written, and the two-transition path decides and explains.
pub async fn start_and_succeed(
    conn: &mut PgConnection,
    s: &FoldedSuccess<'_>,
) -> Result<Option<Folded>, CoreError> {
    let row = bind_folded(&FOLDED_SQL, s)
        .fetch_optional(&mut *conn)
        .await?;
    folded_from(row, s)
}

/// [`start_and_succeed`] with the run's files, whose bytes Postgres keeps: the upload is
/// written committed, with its bytes and manifest, by the same statement (see the module
/// doc). Runs alone, outside a transaction. `None`: nothing written (the lease is not
/// ASSIGNED any more, or the run already has a manifest); take the separate steps.
pub async fn start_and_succeed_with_artifacts(
    conn: &mut PgConnection,
    s: &FoldedSuccess<'_>,
    a: &FoldedArtifacts<'_>,
) -> Result<Option<Folded>, CoreError> {
    let (manifest, files) = manifest_of(a.entries)?;
    let row = bind_folded(&FOLDED_WITH_ARTIFACTS_SQL, s)
        .bind(a.upload_id)
        .bind(manifest)
        .bind(files)
        .bind(a.bytes)
        .bind(&a.kept.indexes)
        .bind(&a.kept.contents)
        .fetch_optional(&mut *conn)
        .await?;
    folded_from(row, s)
}

type Folded = (RunRecord, EventRecord, EventRecord);

/// The run and its two events from the statement's row.
fn folded_from(
    row: Option<sqlx::postgres::PgRow>,
    s: &FoldedSuccess<'_>,
) -> Result<Option<Folded>, CoreError> {
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
