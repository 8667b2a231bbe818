//! The common submit in one statement: the tenant's queued-runs lock taken shared, the count,
//! the run, its first event and its dispatch message, in Postgres's implicit transaction.
//! The transaction [`super::runs::submit_within`] runs otherwise took six round trips (BEGIN,
//! lock, count, insert, outbox insert, COMMIT), and on loopback every round trip costs both
//! processes a system call and the kernel's TCP path, which dominated the API's CPU.
//!
//! It answers only the common case. Near the queued-runs limit (the shared lock's count is
//! not enough to admit, see [`super::quota_locks`]) or with the idempotency key already
//! used, it writes nothing and says so; the caller takes the full path, which counts under
//! the exclusive lock or reads the run holding the key.
//!
//! Why the single statement keeps the quota's guarantee: its snapshot is taken before the lock
//! is granted, so the count can miss runs committed in between; each of those was in flight
//! (holding a connection) when the snapshot was taken, which is what the `max_connections`
//! slack already covers. The insert runs after the lock is held (it reads the count, which
//! reads the lock), so an exclusive counter never misses it.

use sqlx::postgres::PgArguments;
use sqlx::query::Query;
use sqlx::types::Json;
use sqlx::{PgPool, Postgres, Row};

use super::outbox::OutboxRow;
use super::quota_locks;
use super::runs::{RUN_COLUMNS, RunRecord};
use crate::audit;
use crate::error::CoreError;
use crate::ids::{RunId, TenantId};
use crate::messages::{self, RunMessage};
use crate::spec::RunSpec;
use crate::state::RunState;
use crate::topology;

/// What the one statement did.
pub(crate) enum Answer {
    /// Stored; the dispatch message (QUEUED runs) is to be handed to the relay.
    Stored(Box<RunRecord>, Option<OutboxRow>),
    /// Nothing written: the key is taken, or the count alone could not admit the run.
    FullPath,
}

/// The new run's fields, as [`super::runs::submit_within`] works them out.
pub(crate) struct NewRun<'a> {
    pub id: RunId,
    pub tenant: TenantId,
    pub spec: &'a RunSpec,
    pub hash: &'a str,
    pub idempotency_key: Option<&'a str>,
    pub state: RunState,
    pub token: Option<uuid::Uuid>,
    pub actor: &'a str,
    pub traceparent: Option<String>,
}

/// The new run's row, shared by both submit statements: the column list...
pub(crate) const INSERT_RUN: &str = "INSERT INTO runs (id, tenant_id, state, spec, spec_hash, \
     idempotency_key, pool, priority, attempt, max_attempts, queue_deadline, submitted_by, \
     approval_deadline, traceparent, last_seq)";
/// ...its values, as a select list of [`NewRun::bind`]'s $1–$13...
pub(crate) const RUN_VALUES: &str = "$1, $2, $10, $3, $4, $5, $6, $7, 1, $8, \
     CASE WHEN $9 > 0 AND $10 = 'QUEUED' THEN now() + $9 * interval '1 second' END, $11, \
     CASE WHEN $12 > 0 THEN now() + $12 * interval '1 second' END, $13, 1";
/// ...and its first event, a CTE over the inserted run `r` ($14, $15).
pub(crate) const FIRST_EVENT: &str = "ev AS (INSERT INTO run_events (run_id, seq, tenant_id, \
     from_state, to_state, attempt, lease_epoch, agent_id, reason, at, actor) \
     SELECT id, 1, tenant_id, NULL, state, attempt, lease_epoch, agent_id, 'submitted', \
     $14, $15 FROM r)";

impl NewRun<'_> {
    /// Binds $1–$15 of [`RUN_VALUES`] and [`FIRST_EVENT`].
    pub(crate) fn bind<'q>(
        &'q self,
        q: Query<'q, Postgres, PgArguments>,
    ) -> Query<'q, Postgres, PgArguments> {
        q.bind(self.id.0)
            .bind(self.tenant.0)
            .bind(Json(self.spec))
            .bind(self.hash)
            .bind(self.idempotency_key)
            .bind(&self.spec.pool)
            .bind(self.spec.priority)
            .bind(i32::try_from(self.spec.max_attempts).unwrap_or(i32::MAX))
            .bind(i64::from(self.spec.queue_timeout_secs))
            .bind(self.state.as_str())
            .bind(self.token)
            .bind(i64::from(self.spec.approval_timeout_secs))
            .bind(&self.traceparent)
            .bind(audit::now())
            .bind(self.actor)
    }
}

/// The one statement, for a run not over `max_queued`, its dispatch message leased to the
/// caller's relay for `lease_ms`.
pub(crate) async fn submit(
    pool: &PgPool,
    new: &NewRun<'_>,
    max_queued: Option<i64>,
    lease_ms: i64,
) -> Result<Answer, CoreError> {
    let payload = messages::encode(&RunMessage {
        v: 1,
        run_id: new.id,
        tenant_id: new.tenant,
        attempt: 1,
    });
    let statement = format!(
        "WITH lk AS MATERIALIZED (SELECT pg_advisory_xact_lock_shared($16, hashtext($2::text)) \
           IS NULL AS l WHERE $17::bigint IS NOT NULL), \
         cnt AS MATERIALIZED (SELECT CASE WHEN $17::bigint IS NULL THEN 0 ELSE \
             (SELECT count(*) FROM (SELECT 1 FROM runs WHERE tenant_id = $2 \
                AND state IN ('QUEUED', 'PENDING_APPROVAL') LIMIT $17) w) END AS waiting, \
           current_setting('max_connections')::bigint AS slack \
           FROM (SELECT 1) one LEFT JOIN lk ON true), \
         r AS ({INSERT_RUN} SELECT {RUN_VALUES} \
           FROM cnt WHERE $17::bigint IS NULL OR cnt.waiting + cnt.slack < $17 \
           ON CONFLICT (tenant_id, idempotency_key) DO NOTHING RETURNING {RUN_COLUMNS}), \
         {FIRST_EVENT}, \
         ob AS (INSERT INTO outbox (tenant_id, exchange, routing_key, payload, available_at, \
           traceparent) \
           SELECT tenant_id, $18, $6, $19, now() + $20::bigint * interval '1 millisecond', $13 \
           FROM r WHERE state = 'QUEUED' RETURNING id) \
         SELECT (SELECT id FROM ob) AS outbox_id, r.* FROM cnt LEFT JOIN r ON true"
    );
    let row = new
        .bind(sqlx::query(&statement))
        .bind(quota_locks::WAITING_CLASS)
        .bind(max_queued)
        .bind(topology::RUNS_EXCHANGE)
        .bind(&payload)
        .bind(lease_ms.max(1))
        .fetch_one(pool)
        .await?;
    let inserted: Option<uuid::Uuid> = row.try_get("id")?;
    if inserted.is_none() {
        return Ok(Answer::FullPath);
    }
    let run = RunRecord::from_row(&row)?;
    let outbox_id: Option<i64> = row.try_get("outbox_id")?;
    let message = outbox_id.map(|id| OutboxRow {
        id,
        exchange: topology::RUNS_EXCHANGE.to_owned(),
        routing_key: new.spec.pool.clone(),
        payload,
        traceparent: new.traceparent.clone(),
    });
    Ok(Answer::Stored(Box::new(run), message))
}
