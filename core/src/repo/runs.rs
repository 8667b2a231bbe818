//! Runs and their events.

use std::sync::LazyLock;

use chrono::{DateTime, Utc};
use sqlx::postgres::PgRow;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use super::quota_locks;
use super::submit_statement::{self, Answer, FIRST_EVENT, INSERT_RUN, NewRun, RUN_VALUES};
use crate::audit;
use crate::error::{CoreError, Refusal};
use crate::ids::{RunId, TenantId};
use crate::messages::{self, RunMessage};
use crate::spec::RunSpec;
use crate::state::RunState;
use crate::topology;

#[derive(Debug, Clone)]
pub struct RunRecord {
    pub id: RunId,
    pub tenant_id: TenantId,
    pub state: RunState,
    pub spec: RunSpec,
    pub spec_hash: String,
    pub idempotency_key: Option<String>,
    pub attempt: i32,
    pub max_attempts: i32,
    pub lease_epoch: i64,
    pub agent_id: Option<String>,
    pub lease_expires_at: Option<DateTime<Utc>>,
    pub exit_code: Option<i32>,
    pub output: Vec<u8>,
    pub output_truncated: bool,
    pub reason: Option<String>,
    pub executor: Option<String>,
    pub created_at: DateTime<Utc>,
    pub updated_at: DateTime<Utc>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    /// Retry backoff: the current attempt is not dispatched before this.
    pub not_before: Option<DateTime<Utc>>,
    pub queue_deadline: Option<DateTime<Utc>>,
    pub cancel_requested_at: Option<DateTime<Utc>>,
    pub cancel_reason: Option<String>,
    /// W3C trace context of the run's root span (its SubmitRun), which retries and redrives
    /// continue.
    pub traceparent: Option<String>,
}

pub(crate) const RUN_COLUMNS: &str = "id, tenant_id, state, spec, spec_hash, idempotency_key, attempt, \
    max_attempts, lease_epoch, agent_id, lease_expires_at, exit_code, output, output_truncated, \
    reason, executor, created_at, updated_at, started_at, finished_at, not_before, queue_deadline, \
    cancel_requested_at, cancel_reason, traceparent";

pub(crate) fn parse_state(s: &str) -> Result<RunState, CoreError> {
    s.parse()
        .map_err(|e: crate::state::UnknownState| CoreError::Corrupt(e.to_string()))
}

impl RunRecord {
    pub(crate) fn from_row(row: &PgRow) -> Result<Self, CoreError> {
        let state: String = row.try_get("state")?;
        let Json(spec): Json<RunSpec> = row.try_get("spec")?;
        Ok(RunRecord {
            id: RunId(row.try_get("id")?),
            tenant_id: TenantId(row.try_get("tenant_id")?),
            state: parse_state(&state)?,
            spec,
            spec_hash: row.try_get("spec_hash")?,
            idempotency_key: row.try_get("idempotency_key")?,
            attempt: row.try_get("attempt")?,
            max_attempts: row.try_get("max_attempts")?,
            lease_epoch: row.try_get("lease_epoch")?,
            agent_id: row.try_get("agent_id")?,
            lease_expires_at: row.try_get("lease_expires_at")?,
            exit_code: row.try_get("exit_code")?,
            output: row.try_get("output")?,
            output_truncated: row.try_get("output_truncated")?,
            reason: row.try_get("reason")?,
            executor: row.try_get("executor")?,
            created_at: row.try_get("created_at")?,
            updated_at: row.try_get("updated_at")?,
            started_at: row.try_get("started_at")?,
            finished_at: row.try_get("finished_at")?,
            not_before: row.try_get("not_before")?,
            queue_deadline: row.try_get("queue_deadline")?,
            cancel_requested_at: row.try_get("cancel_requested_at")?,
            cancel_reason: row.try_get("cancel_reason")?,
            traceparent: row.try_get("traceparent")?,
        })
    }
}

#[derive(Debug, Clone)]
pub struct EventRecord {
    pub run_id: RunId,
    pub seq: i32,
    pub from_state: Option<RunState>,
    pub to_state: RunState,
    pub attempt: i32,
    pub lease_epoch: i64,
    pub reason: Option<String>,
    pub at: DateTime<Utc>,
}

impl EventRecord {
    /// From columns named with `prefix`, in a row that also holds a run's (whose names
    /// overlap).
    fn from_columns(row: &PgRow, prefix: &str) -> Result<Self, CoreError> {
        let col = |name: &str| format!("{prefix}{name}");
        let from: Option<String> = row.try_get(col("from_state").as_str())?;
        let to: String = row.try_get(col("to_state").as_str())?;
        Ok(EventRecord {
            run_id: RunId(row.try_get(col("run_id").as_str())?),
            seq: row.try_get(col("seq").as_str())?,
            from_state: from.as_deref().map(parse_state).transpose()?,
            to_state: parse_state(&to)?,
            attempt: row.try_get(col("attempt").as_str())?,
            lease_epoch: row.try_get(col("lease_epoch").as_str())?,
            reason: row.try_get(col("reason").as_str())?,
            at: row.try_get(col("at").as_str())?,
        })
    }
}

/// Who submits a run: the token (kept for the self-approval rule) and the audit actor.
#[derive(Debug, Clone)]
pub struct Submitter {
    pub token: Option<Uuid>,
    pub actor: String,
}

impl Submitter {
    /// A submit from inside the system (tests, tools), with no token behind it.
    pub fn system(actor: &str) -> Self {
        Self {
            token: None,
            actor: actor.to_owned(),
        }
    }
}

/// Result of a submit: the run, and whether it already existed under the idempotency key.
#[derive(Debug)]
pub struct Submitted {
    pub run: RunRecord,
    pub deduplicated: bool,
}

/// Stores a new run (QUEUED, or PENDING_APPROVAL when the spec requires approval), its first
/// event and, when queued, its outbox message in one transaction. With an idempotency key
/// already used: the same spec returns the stored run, another spec is
/// [`CoreError::IdempotencyConflict`].
pub async fn submit(
    pool: &PgPool,
    tenant: TenantId,
    spec: &RunSpec,
    idempotency_key: Option<&str>,
    by: &Submitter,
) -> Result<Submitted, CoreError> {
    submit_within(pool, tenant, spec, idempotency_key, by, None, None).await
}

/// [`submit`], refused with [`CoreError::OverQuota`] when the tenant already has
/// `max_queued` runs QUEUED or PENDING_APPROVAL. The count and the insert happen under the
/// tenant's queued-runs lock ([`super::quota_locks`]), so concurrent submits cannot overshoot.
/// A deduplicated submit is never refused: it adds nothing. With a `handoff`, the dispatch
/// message goes to that relay after the commit instead of waking every relay, and the common
/// case is one statement (`submit_statement`); this transaction is the full path.
pub async fn submit_within(
    pool: &PgPool,
    tenant: TenantId,
    spec: &RunSpec,
    idempotency_key: Option<&str>,
    by: &Submitter,
    max_queued: Option<i64>,
    handoff: Option<&super::outbox::Handoff>,
) -> Result<Submitted, CoreError> {
    let id = RunId::new();
    let hash = spec.canonical_hash();
    let state = if spec.requires_approval {
        RunState::PendingApproval
    } else {
        RunState::Queued
    };
    let new = NewRun {
        id,
        tenant,
        spec,
        hash: &hash,
        idempotency_key,
        state,
        token: by.token,
        actor: &by.actor,
        traceparent: crate::telemetry::current_traceparent(),
    };
    if let Some(h) = handoff
        && let Answer::Stored(run, message) =
            submit_statement::submit(pool, &new, max_queued, h.lease_ms()).await?
    {
        if let Some(row) = message {
            h.hand(row);
        }
        metrics::counter!(crate::observe::names::RUNS_SUBMITTED).increment(1);
        return Ok(Submitted {
            run: *run,
            deduplicated: false,
        });
    }
    let mut mode = quota_locks::Mode::Shared;
    let mut tx = loop {
        let mut tx = pool.begin().await?;
        let Some(max) = max_queued else { break tx };
        quota_locks::lock_waiting(&mut tx, tenant, mode).await?;
        let (waiting, in_flight) = quota_locks::count_waiting(&mut tx, tenant, max).await?;
        if mode == quota_locks::Mode::Shared && waiting.saturating_add(in_flight) >= max {
            // Near the limit: count again with no other submit of the tenant in flight.
            tx.rollback().await?;
            mode = quota_locks::Mode::Exclusive;
            continue;
        }
        if waiting >= max {
            let dup = match idempotency_key {
                Some(k) => sqlx::query_scalar::<_, bool>(
                    "SELECT EXISTS (SELECT 1 FROM runs WHERE tenant_id = $1 AND idempotency_key = $2)",
                )
                .bind(tenant.0)
                .bind(k)
                .fetch_one(&mut *tx)
                .await?,
                None => false,
            };
            if !dup {
                return Err(CoreError::OverQuota(format!(
                    "tenant quota max_queued_runs={max} reached: {waiting} runs are queued or \
                     waiting for approval; retry when some have started"
                )));
            }
        }
        break tx;
    };
    // The run and its first event, in one statement; an idempotency key already used
    // inserts neither.
    let inserted = new
        .bind(sqlx::query(&format!(
            "WITH r AS ({INSERT_RUN} VALUES ({RUN_VALUES}) \
             ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {RUN_COLUMNS}), \
             {FIRST_EVENT} SELECT * FROM r"
        )))
        .fetch_optional(&mut *tx)
        .await?;

    let Some(row) = inserted else {
        // The key exists (possibly committed by a concurrent submit we just waited for).
        let existing = sqlx::query(&format!(
            "SELECT {RUN_COLUMNS} FROM runs WHERE tenant_id = $1 AND idempotency_key = $2"
        ))
        .bind(tenant.0)
        .bind(idempotency_key)
        .fetch_one(&mut *tx)
        .await?;
        let run = RunRecord::from_row(&existing)?;
        tx.rollback().await?;
        if run.spec_hash == hash {
            return Ok(Submitted {
                run,
                deduplicated: true,
            });
        }
        return Err(CoreError::IdempotencyConflict {
            existing: run.id.to_string(),
        });
    };
    let run = RunRecord::from_row(&row)?;
    let mut handed = None;
    if run.state == RunState::Queued {
        match handoff {
            Some(h) => {
                handed = Some(enqueue_run_message_leased(&mut tx, &run, h.lease_ms()).await?);
            }
            None => enqueue_run_message(&mut tx, &run).await?,
        }
    }
    tx.commit().await?;
    if let (Some(h), Some(row)) = (handoff, handed) {
        h.hand(row);
    }
    metrics::counter!(crate::observe::names::RUNS_SUBMITTED).increment(1);
    Ok(Submitted {
        run,
        deduplicated: false,
    })
}

/// Writes the dispatch message of the run's current attempt to the outbox.
pub async fn enqueue_run_message(
    conn: &mut PgConnection,
    run: &RunRecord,
) -> Result<(), CoreError> {
    enqueue_run_message_after(conn, run, 0).await
}

/// As [`enqueue_run_message`], published no sooner than `delay_ms` from now (retry backoff:
/// the relay picks the row up when it is due, so nothing spins meanwhile).
///
/// The message continues the run's trace: from the caller's span when that span is in it (a
/// submit, a completion report, the reaper's span for this run), else from the run's root
/// span (e.g. an operator's redrive, made in the operator's own trace).
pub async fn enqueue_run_message_after(
    conn: &mut PgConnection,
    run: &RunRecord,
    delay_ms: i64,
) -> Result<(), CoreError> {
    let parts = RunMessageParts::of(run);
    super::outbox::enqueue_message(conn, run.tenant_id, parts.message(run), delay_ms).await
}

/// As [`enqueue_run_message`], leased to the caller's relay ([`super::outbox::enqueue_leased`]):
/// hand the row to it once the transaction commits.
pub async fn enqueue_run_message_leased(
    conn: &mut PgConnection,
    run: &RunRecord,
    lease_ms: i64,
) -> Result<super::outbox::OutboxRow, CoreError> {
    let parts = RunMessageParts::of(run);
    super::outbox::enqueue_leased(conn, run.tenant_id, parts.message(run), lease_ms).await
}

/// The dispatch message of the run's current attempt, and the trace it continues.
struct RunMessageParts {
    payload: Vec<u8>,
    traceparent: Option<String>,
}

impl RunMessageParts {
    fn of(run: &RunRecord) -> Self {
        let msg = RunMessage {
            v: 1,
            run_id: run.id,
            tenant_id: run.tenant_id,
            attempt: run.attempt,
        };
        let current = crate::telemetry::current_traceparent();
        let in_run_trace = |tp: &String| {
            run.traceparent
                .as_deref()
                .and_then(crate::telemetry::trace_id_of)
                == crate::telemetry::trace_id_of(tp)
        };
        let traceparent = match current {
            Some(tp) if run.traceparent.is_none() || in_run_trace(&tp) => Some(tp),
            _ => run.traceparent.clone(),
        };
        Self {
            payload: messages::encode(&msg),
            traceparent,
        }
    }

    fn message<'a>(&'a self, run: &'a RunRecord) -> super::outbox::Message<'a> {
        super::outbox::Message {
            exchange: topology::RUNS_EXCHANGE,
            routing_key: &run.spec.pool,
            payload: &self.payload,
            traceparent: self.traceparent.as_deref(),
        }
    }
}

pub async fn get(
    pool: &PgPool,
    tenant: TenantId,
    id: RunId,
) -> Result<Option<RunRecord>, CoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND tenant_id = $2"
    ))
    .bind(id.0)
    .bind(tenant.0)
    .fetch_optional(pool)
    .await?;
    row.as_ref().map(RunRecord::from_row).transpose()
}

/// Newest first; `before` is the last id of the previous page.
pub async fn list(
    pool: &PgPool,
    tenant: TenantId,
    states: &[RunState],
    limit: i64,
    before: Option<RunId>,
) -> Result<Vec<RunRecord>, CoreError> {
    let rows = sqlx::query(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE tenant_id = $1 \
         AND (cardinality($2::text[]) = 0 OR state = ANY($2)) \
         AND ($3::uuid IS NULL OR id < $3) ORDER BY id DESC LIMIT $4"
    ))
    .bind(tenant.0)
    .bind(RunState::names(states))
    .bind(before.map(|r| r.0))
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter().map(RunRecord::from_row).collect()
}

/// The run's events after `after`, in order, and the run as it stands when one of them is
/// terminal: what a watcher sends last, read in the same statement as the events.
pub async fn events_after_with_end(
    pool: &PgPool,
    tenant: TenantId,
    run: RunId,
    after: i32,
) -> Result<(Vec<EventRecord>, Option<RunRecord>), CoreError> {
    static SQL: LazyLock<String> = LazyLock::new(|| {
        let run_columns = run_columns_of("r");
        format!(
            "SELECT e.run_id AS ev_run_id, e.seq AS ev_seq, e.from_state AS ev_from_state, \
             e.to_state AS ev_to_state, e.attempt AS ev_attempt, \
             e.lease_epoch AS ev_lease_epoch, e.reason AS ev_reason, e.at AS ev_at, \
             r.id IS NOT NULL AS ended, {run_columns} \
             FROM run_events e \
             LEFT JOIN runs r ON r.id = e.run_id AND e.to_state = ANY($4) \
             WHERE e.run_id = $1 AND e.tenant_id = $2 AND e.seq > $3 ORDER BY e.seq"
        )
    });
    let rows = sqlx::query(&SQL)
        .bind(run.0)
        .bind(tenant.0)
        .bind(after)
        .bind(&*TERMINAL_NAMES)
        .fetch_all(pool)
        .await?;
    let mut events = Vec::with_capacity(rows.len());
    let mut end = None;
    for row in &rows {
        events.push(EventRecord::from_columns(row, "ev_")?);
        if end.is_none() && row.try_get::<bool, _>("ended")? {
            end = Some(RunRecord::from_row(row)?);
        }
    }
    Ok((events, end))
}

/// Columns a transition sets besides `state`.
#[derive(Debug, Clone, Default)]
pub enum TransitionPatch {
    #[default]
    None,
    /// New lease: bump the epoch, record the agent, set the expiry.
    Assign { agent_id: String, lease_ttl_ms: i64 },
    /// The container started.
    Start { executor: String },
    /// The attempt ended; the output tail (and its truncation flag) is replaced when given.
    Finish {
        exit_code: Option<i32>,
        output: Option<(Vec<u8>, bool)>,
    },
    /// Back to QUEUED: as the next attempt (a failure) or the same one (handed back), not
    /// dispatchable for `delay_ms`; the ended attempt's result is kept when given.
    Requeue {
        next_attempt: bool,
        delay_ms: i64,
        exit_code: Option<i32>,
        output: Option<(Vec<u8>, bool)>,
    },
    /// An operator redrives a dead-lettered run: next attempt, one more allowed.
    Redrive,
}

/// One guarded state change. Guards left `None` are not checked.
#[derive(Debug, Clone)]
pub struct Transition {
    pub run_id: RunId,
    pub to: RunState,
    pub tenant: Option<TenantId>,
    pub expected_epoch: Option<i64>,
    pub expected_attempt: Option<i32>,
    pub expected_agent: Option<String>,
    pub reason: Option<String>,
    pub patch: TransitionPatch,
    /// Bump the lease epoch without a new lease: the transition ends the lease without its
    /// holder's report (lease expired, backstop timeout), so anything the holder still sends
    /// is refused as stale.
    pub fence: bool,
    /// Who made the change, for the audit chain (`token:<id>`, `agent:<id>`, `reaper`, …).
    /// `None`: the agent named by `expected_agent`, the dispatcher for an assignment, else
    /// `system`.
    pub actor: Option<String>,
    /// The transition frees capacity (an agent slot, a tenant's quota): wake the dispatchers'
    /// parked-run schedulers when it commits ([`notify_capacity`]), from the same statement.
    pub frees_capacity: bool,
}

impl Transition {
    pub fn new(run_id: RunId, to: RunState) -> Self {
        Self {
            run_id,
            to,
            tenant: None,
            expected_epoch: None,
            expected_attempt: None,
            expected_agent: None,
            reason: None,
            patch: TransitionPatch::None,
            fence: false,
            actor: None,
            frees_capacity: false,
        }
    }

    /// Sets the audit actor.
    pub fn by(mut self, actor: impl Into<String>) -> Self {
        self.actor = Some(actor.into());
        self
    }

    fn actor(&self) -> String {
        if let Some(a) = &self.actor {
            return a.clone();
        }
        match (&self.patch, &self.expected_agent) {
            (TransitionPatch::Assign { .. }, _) => "dispatcher".to_owned(),
            (_, Some(agent)) => format!("agent:{agent}"),
            // Ending a lease without its holder's report is the reaper's (or a dead-letter
            // consumer's) doing.
            _ if self.fence => "reaper".to_owned(),
            _ => "system".to_owned(),
        }
    }
}

/// The transition, built once: it is on every state change's path. One statement: the
/// conditional UPDATE, which also numbers the run's next event from the row it holds locked
/// (`last_seq`), and the INSERT of that event, fed by the UPDATE's result. A refused
/// transition updates no row and so inserts no event. `woke` is unused: counting `cap` is what
/// makes Postgres run the capacity NOTIFY (a plain SELECT CTE runs only when referenced).
/// The UPDATE names the run by `$1` as well as through `prev`: joined only to the CTE, the
/// prepared statement's generic plan on a young table was a sequential scan of `runs` (seen
/// with `auto_explain` under load: 0.85 ms a transition, 8 ms at worst, where the primary key
/// takes microseconds).
static TRANSITION_SQL: LazyLock<String> = LazyLock::new(|| transition_sql("", ""));

/// [`TRANSITION_SQL`] that also writes one outbox row when, and only when, the run changed:
/// the dispatcher's assignment and its command to the agent in one statement (they were two
/// round trips of every assignment's transaction).
static TRANSITION_ENQUEUE_SQL: LazyLock<String> = LazyLock::new(|| {
    transition_sql(
        ", ob AS (INSERT INTO outbox (tenant_id, exchange, routing_key, payload, available_at, \
           traceparent) \
           SELECT tenant_id, $25, $26, $27, now() + $28::bigint * interval '1 millisecond', $29 \
           FROM upd RETURNING id AS outbox_id)",
        ", (SELECT outbox_id FROM ob) AS outbox_id",
    )
});

fn transition_sql(extra_cte: &str, extra_column: &str) -> String {
    format!(
        "WITH prev AS (SELECT id, state AS prev_state FROM runs WHERE id = $1 FOR UPDATE), \
         upd AS (UPDATE runs r SET \
           state = $2, \
           last_seq = r.last_seq + 1, \
           lease_epoch = r.lease_epoch + CASE WHEN $3 OR $17 THEN 1 ELSE 0 END, \
           attempt = r.attempt + CASE WHEN $18 OR $20 THEN 1 ELSE 0 END, \
           max_attempts = CASE WHEN $20 THEN GREATEST(r.max_attempts, r.attempt + 1) \
               ELSE r.max_attempts END, \
           agent_id = COALESCE($4, r.agent_id), \
           lease_expires_at = CASE WHEN $5::bigint IS NOT NULL \
               THEN now() + $5::bigint * interval '1 millisecond' \
               WHEN $2 IN ('ASSIGNED', 'RUNNING') THEN r.lease_expires_at ELSE NULL END, \
           executor = COALESCE($6, r.executor), \
           exit_code = CASE WHEN $3 OR $20 THEN NULL ELSE COALESCE($7, r.exit_code) END, \
           output = COALESCE($8, r.output), \
           output_truncated = COALESCE($9, r.output_truncated), \
           reason = $10, \
           started_at = CASE WHEN $2 = 'RUNNING' THEN now() ELSE r.started_at END, \
           finished_at = CASE WHEN $2 = ANY($11) THEN now() WHEN $2 = 'QUEUED' THEN NULL \
               ELSE r.finished_at END, \
           not_before = CASE WHEN $2 = 'QUEUED' AND COALESCE($19::bigint, 0) > 0 \
               THEN now() + $19::bigint * interval '1 millisecond' ELSE NULL END, \
           queue_deadline = CASE WHEN $2 = 'QUEUED' \
               AND COALESCE((r.spec->>'queue_timeout_secs')::bigint, 0) > 0 \
               THEN now() + COALESCE($19::bigint, 0) * interval '1 millisecond' \
                    + (r.spec->>'queue_timeout_secs')::bigint * interval '1 second' \
               ELSE NULL END, \
           cancel_requested_at = CASE WHEN $2 = 'QUEUED' THEN NULL ELSE r.cancel_requested_at END, \
           cancel_reason = CASE WHEN $2 = 'QUEUED' THEN NULL ELSE r.cancel_reason END, \
           parked_at = NULL, parked_quota = NULL, \
           updated_at = now() \
         FROM prev WHERE r.id = $1 AND r.id = prev.id AND r.state = ANY($12) \
           AND ($13::bigint IS NULL OR r.lease_epoch = $13) \
           AND ($14::int IS NULL OR r.attempt = $14) \
           AND ($15::text IS NULL OR r.agent_id = $15) \
           AND ($16::uuid IS NULL OR r.tenant_id = $16) \
         RETURNING prev.prev_state, r.last_seq, {RETURNED}), \
         ev AS (INSERT INTO run_events (run_id, seq, tenant_id, from_state, to_state, attempt, \
           lease_epoch, agent_id, reason, at, actor) \
           SELECT id, last_seq, tenant_id, prev_state, state, attempt, lease_epoch, agent_id, \
             $10, $21, $22 FROM upd \
           RETURNING seq AS event_seq, at AS event_at), \
         cap AS (SELECT pg_notify($23, '') FROM upd WHERE $24){extra_cte} \
         SELECT upd.*, ev.event_seq, ev.event_at, (SELECT count(*) FROM cap) AS woke{extra_column} \
         FROM upd, ev",
        RETURNED = run_columns_of("r")
    )
}

/// [`RUN_COLUMNS`] qualified by a table alias, for statements that join or update `runs`.
pub(crate) fn run_columns_of(alias: &str) -> String {
    RUN_COLUMNS
        .split(", ")
        .map(|c| format!("{alias}.{}", c.trim()))
        .collect::<Vec<_>>()
        .join(", ")
}

static TERMINAL_NAMES: LazyLock<Vec<String>> = LazyLock::new(|| {
    RunState::names(
        &RunState::ALL
            .into_iter()
            .filter(|s| s.is_terminal())
            .collect::<Vec<_>>(),
    )
});

/// The optional columns of [`TRANSITION_SQL`], from a [`TransitionPatch`].
#[derive(Default)]
struct Binds<'a> {
    new_lease: bool,
    agent: Option<&'a str>,
    lease_ms: Option<i64>,
    executor: Option<&'a str>,
    exit_code: Option<i32>,
    output: Option<&'a [u8]>,
    truncated: Option<bool>,
    next_attempt: bool,
    delay_ms: Option<i64>,
    redrive: bool,
}

/// Applies `t` as one conditional UPDATE (guarded by the state table's sources for `t.to`,
/// and by epoch, attempt, agent and tenant when given) plus its event row, inside the
/// caller's transaction. Zero rows updated means refused: the reason is worked out from the
/// current row and returned as [`CoreError::Refused`]; nothing changed.
pub async fn transition(
    conn: &mut PgConnection,
    t: &Transition,
) -> Result<(RunRecord, EventRecord), CoreError> {
    let (run, event, _) = apply(conn, t, None).await?;
    Ok((run, event))
}

/// [`transition`] that, in the same statement and only if it applies, writes `message` to the
/// outbox leased to the caller's relay for `lease_ms` (as [`super::outbox::enqueue_leased`]
/// does); returns the row's id with the run and event.
pub async fn transition_and_enqueue(
    conn: &mut PgConnection,
    t: &Transition,
    message: &super::outbox::Message<'_>,
    lease_ms: i64,
) -> Result<(RunRecord, EventRecord, i64), CoreError> {
    let (run, event, id) = apply(conn, t, Some((message, lease_ms))).await?;
    let id = id.ok_or_else(|| CoreError::Corrupt("transition wrote no outbox row".into()))?;
    Ok((run, event, id))
}

async fn apply(
    conn: &mut PgConnection,
    t: &Transition,
    enqueue: Option<(&super::outbox::Message<'_>, i64)>,
) -> Result<(RunRecord, EventRecord, Option<i64>), CoreError> {
    let allowed = RunState::names(&RunState::sources_of(t.to));
    let mut b = Binds::default();
    match &t.patch {
        TransitionPatch::None => {}
        TransitionPatch::Assign {
            agent_id,
            lease_ttl_ms,
        } => {
            b.new_lease = true;
            b.agent = Some(agent_id.as_str());
            b.lease_ms = Some(*lease_ttl_ms);
        }
        TransitionPatch::Start { executor } => b.executor = Some(executor.as_str()),
        TransitionPatch::Finish { exit_code, output } => {
            b.exit_code = *exit_code;
            if let Some((bytes, truncated)) = output {
                b.output = Some(bytes.as_slice());
                b.truncated = Some(*truncated);
            }
        }
        TransitionPatch::Requeue {
            next_attempt,
            delay_ms,
            exit_code,
            output,
        } => {
            b.next_attempt = *next_attempt;
            b.delay_ms = Some(*delay_ms);
            b.exit_code = *exit_code;
            if let Some((bytes, truncated)) = output {
                b.output = Some(bytes.as_slice());
                b.truncated = Some(*truncated);
            }
        }
        TransitionPatch::Redrive => b.redrive = true,
    }
    let sql: &str = if enqueue.is_some() {
        &TRANSITION_ENQUEUE_SQL
    } else {
        &TRANSITION_SQL
    };
    let mut query = sqlx::query(sql)
        .bind(t.run_id.0)
        .bind(t.to.as_str())
        .bind(b.new_lease)
        .bind(b.agent)
        .bind(b.lease_ms)
        .bind(b.executor)
        .bind(b.exit_code)
        .bind(b.output)
        .bind(b.truncated)
        .bind(t.reason.as_deref())
        .bind(&*TERMINAL_NAMES)
        .bind(&allowed)
        .bind(t.expected_epoch)
        .bind(t.expected_attempt)
        .bind(t.expected_agent.as_deref())
        .bind(t.tenant.map(|x| x.0))
        .bind(t.fence)
        .bind(b.next_attempt)
        .bind(b.delay_ms)
        .bind(b.redrive)
        .bind(audit::now())
        .bind(t.actor())
        .bind(super::CAPACITY_CHANNEL)
        .bind(t.frees_capacity);
    if let Some((m, lease_ms)) = enqueue {
        query = query
            .bind(m.exchange)
            .bind(m.routing_key)
            .bind(m.payload)
            .bind(lease_ms.max(1))
            .bind(m.traceparent);
    }
    let row = query.fetch_optional(&mut *conn).await?;

    let Some(row) = row else {
        return Err(explain_refusal(conn, t).await);
    };
    let outbox_id: Option<i64> = if enqueue.is_some() {
        row.try_get("outbox_id")?
    } else {
        None
    };
    let prev: String = row.try_get("prev_state")?;
    let run = RunRecord::from_row(&row)?;
    let event = EventRecord {
        run_id: run.id,
        seq: row.try_get("event_seq")?,
        from_state: Some(parse_state(&prev)?),
        to_state: run.state,
        attempt: run.attempt,
        lease_epoch: run.lease_epoch,
        reason: t.reason.clone(),
        at: row.try_get("event_at")?,
    };
    Ok((run, event, outbox_id))
}

async fn explain_refusal(conn: &mut PgConnection, t: &Transition) -> CoreError {
    let row = sqlx::query(
        "SELECT state, lease_epoch, attempt, agent_id, tenant_id FROM runs WHERE id = $1",
    )
    .bind(t.run_id.0)
    .fetch_optional(conn)
    .await;
    let row = match row {
        Ok(Some(row)) => row,
        Ok(None) => return Refusal::NotFound.into(),
        Err(e) => return e.into(),
    };
    let get = || -> Result<Refusal, sqlx::Error> {
        let tenant: Uuid = row.try_get("tenant_id")?;
        if t.tenant.is_some_and(|x| x.0 != tenant) {
            return Ok(Refusal::NotFound);
        }
        let state: String = row.try_get("state")?;
        let epoch: i64 = row.try_get("lease_epoch")?;
        let attempt: i32 = row.try_get("attempt")?;
        let agent: Option<String> = row.try_get("agent_id")?;
        if let Some(given) = t.expected_epoch.filter(|&g| g != epoch) {
            return Ok(Refusal::StaleEpoch {
                given,
                current: epoch,
            });
        }
        if let Some(given) = t.expected_attempt.filter(|&g| g != attempt) {
            return Ok(Refusal::StaleAttempt {
                given,
                current: attempt,
            });
        }
        if t.expected_agent.is_some() && t.expected_agent != agent {
            return Ok(Refusal::WrongAgent);
        }
        Ok(Refusal::Illegal {
            from: state.parse().unwrap_or(t.to),
            to: t.to,
        })
    };
    match get() {
        Ok(r) => r.into(),
        Err(e) => e.into(),
    }
}

/// Capacity notification for dispatchers waiting on capacity, inside the transaction (sent
/// at commit). A transition that frees capacity says so instead
/// ([`Transition::frees_capacity`]), and its statement sends it.
pub async fn notify_capacity(conn: &mut PgConnection) -> Result<(), CoreError> {
    sqlx::query("SELECT pg_notify($1, '')")
        .bind(super::CAPACITY_CHANNEL)
        .execute(conn)
        .await?;
    Ok(())
}

/// Whether a run id belongs to the tenant; used before attaching to logs or events.
pub async fn exists(pool: &PgPool, tenant: TenantId, id: RunId) -> Result<bool, CoreError> {
    let row = sqlx::query("SELECT 1 FROM runs WHERE id = $1 AND tenant_id = $2")
        .bind(id.0)
        .bind(tenant.0)
        .fetch_optional(pool)
        .await?;
    Ok(row.is_some())
}

/// Records a cancel request on a run with an agent (the caller holds the row lock).
pub async fn mark_cancel_requested(
    conn: &mut PgConnection,
    id: RunId,
    reason: &str,
) -> Result<RunRecord, CoreError> {
    let row = sqlx::query(&format!(
        "UPDATE runs SET cancel_requested_at = now(), cancel_reason = $2, updated_at = now() \
         WHERE id = $1 RETURNING {RUN_COLUMNS}"
    ))
    .bind(id.0)
    .bind(reason)
    .fetch_one(conn)
    .await?;
    RunRecord::from_row(&row)
}

/// Leases of `agent` among `leases` whose run a client asked to cancel.
pub async fn cancel_requested_among(
    conn: &mut PgConnection,
    agent: &str,
    leases: &[(RunId, i64)],
) -> Result<Vec<(RunId, i64)>, CoreError> {
    let ids: Vec<Uuid> = leases.iter().map(|(r, _)| r.0).collect();
    let epochs: Vec<i64> = leases.iter().map(|(_, e)| *e).collect();
    let rows = sqlx::query(
        "SELECT r.id, r.lease_epoch FROM runs r \
         JOIN unnest($2::uuid[], $3::bigint[]) AS l(id, epoch) \
           ON r.id = l.id AND r.lease_epoch = l.epoch \
         WHERE r.agent_id = $1 AND r.cancel_requested_at IS NOT NULL \
           AND r.state IN ('ASSIGNED', 'RUNNING')",
    )
    .bind(agent)
    .bind(&ids)
    .bind(&epochs)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| Ok((RunId(r.try_get("id")?), r.try_get("lease_epoch")?)))
        .collect()
}

/// Loads and locks a run row for the caller's transaction, whatever its tenant.
pub async fn lock(conn: &mut PgConnection, id: RunId) -> Result<Option<RunRecord>, CoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 FOR UPDATE"
    ))
    .bind(id.0)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(RunRecord::from_row).transpose()
}

/// Loads a run whatever its tenant. Only for agent-facing calls, which are authorised by the
/// lease (agent id + epoch), not by tenant.
pub async fn get_unscoped(pool: &PgPool, id: RunId) -> Result<Option<RunRecord>, CoreError> {
    let row = sqlx::query(&format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = $1"))
        .bind(id.0)
        .fetch_optional(pool)
        .await?;
    row.as_ref().map(RunRecord::from_row).transpose()
}
