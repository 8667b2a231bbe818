//! Parked runs and the per-tenant concurrency quota, for fair dispatch.
//!
//! A pool's run queue is FIFO, so a dispatcher that held a message until capacity freed let
//! one tenant's backlog starve every run queued behind it. Instead, a run that cannot be
//! placed when its message arrives (no free agent, or its tenant at its concurrency quota) is
//! *parked*: `runs.parked_at` is set and the message acked, so the queue drains past the
//! backlog. The dispatchers' parked-run schedulers then pick parked runs in fair order
//! ([`parked_tenants`], [`lock_parked`]). The state lives in Postgres only: nothing is lost with
//! a dispatcher, and any transition clears it ([`super::runs::transition`]).
//!
//! The quota is counted under the tenant's concurrency-quota lock
//! ([`super::quota_locks::lock_active`]), so dispatchers assigning the same tenant's runs at
//! once cannot overshoot it.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};

use super::runs::{RUN_COLUMNS, RunRecord};
use crate::error::CoreError;
use crate::ids::{RunId, TenantId};

/// Locks the run for the caller's transaction if it is still QUEUED at `attempt` (else
/// `None`: a duplicate message, or another dispatcher got there first).
pub async fn lock_queued(
    conn: &mut PgConnection,
    tenant: TenantId,
    id: RunId,
    attempt: i32,
) -> Result<Option<RunRecord>, CoreError> {
    let row = sqlx::query(&format!(
        "SELECT {RUN_COLUMNS} FROM runs WHERE id = $1 AND tenant_id = $2 \
         AND state = 'QUEUED' AND attempt = $3 FOR UPDATE"
    ))
    .bind(id.0)
    .bind(tenant.0)
    .bind(attempt)
    .fetch_optional(conn)
    .await?;
    row.as_ref().map(RunRecord::from_row).transpose()
}

/// What the locking read of a batch found for one of its messages.
#[derive(Debug)]
pub enum BatchRead {
    /// QUEUED at the message's attempt and now locked; `behind_parked`: runs of its pool are
    /// parked, so it queues behind them.
    Queued {
        run: Box<RunRecord>,
        behind_parked: bool,
        /// The tenant's own concurrency limit (`tenants.max_concurrent_runs`), read by the
        /// same statement so that placing the batch need not ask again.
        own_limit: Option<i32>,
    },
    /// No longer QUEUED at that attempt: a duplicate, or another dispatcher got there first.
    Obsolete,
    /// No run with that id for that tenant.
    Unknown,
}

/// [`precheck`] and [`lock_queued`] for a batch of dispatch messages
/// (`(tenant, run, attempt)`), in one statement: locks, in id order (so two batches cannot
/// deadlock), every named run that is QUEUED, and says per message what it found: a run
/// named twice at its attempt is Queued once, its repeat Obsolete. A second read, of the runs
/// it did not find, tells a duplicate from an unknown run; it happens only when some message
/// was not dispatchable.
pub async fn lock_queued_batch(
    conn: &mut PgConnection,
    messages: &[(TenantId, RunId, i32)],
) -> Result<Vec<BatchRead>, CoreError> {
    let ids: Vec<uuid::Uuid> = messages.iter().map(|(_, r, _)| r.0).collect();
    let rows = sqlx::query(&format!(
        "SELECT {RUN_COLUMNS}, EXISTS (SELECT 1 FROM runs p WHERE p.pool = runs.pool \
           AND p.state = 'QUEUED' AND p.parked_at IS NOT NULL) AS behind_parked, \
           (SELECT t.max_concurrent_runs FROM tenants t WHERE t.id = runs.tenant_id) AS own_limit \
         FROM runs WHERE id = ANY($1) AND state = 'QUEUED' ORDER BY id FOR UPDATE OF runs"
    ))
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut found = std::collections::HashMap::with_capacity(rows.len());
    for row in &rows {
        let run = RunRecord::from_row(row)?;
        let behind: bool = row.try_get("behind_parked")?;
        let own_limit: Option<i32> = row.try_get("own_limit")?;
        found.insert(run.id, (run, behind, own_limit));
    }
    let mut out = Vec::with_capacity(messages.len());
    let mut missing = Vec::new();
    for (i, (tenant, id, attempt)) in messages.iter().enumerate() {
        let matches = found
            .get(id)
            .map(|(run, _, _)| (run.tenant_id == *tenant, run.attempt == *attempt));
        match matches {
            // Taken out: a repeat of this message later in the batch finds it gone and is
            // told Obsolete by the second read.
            Some((true, true)) => {
                if let Some((run, behind, own_limit)) = found.remove(id) {
                    out.push(BatchRead::Queued {
                        run: Box::new(run),
                        behind_parked: behind,
                        own_limit,
                    });
                }
            }
            Some((true, false)) => out.push(BatchRead::Obsolete),
            _ => {
                out.push(BatchRead::Unknown);
                missing.push((i, id.0, tenant.0));
            }
        }
    }
    if !missing.is_empty() {
        let ids: Vec<uuid::Uuid> = missing.iter().map(|(_, id, _)| *id).collect();
        let known: Vec<(uuid::Uuid, uuid::Uuid)> =
            sqlx::query_as("SELECT id, tenant_id FROM runs WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_all(&mut *conn)
                .await?;
        for (i, id, tenant) in missing {
            if known.contains(&(id, tenant)) {
                out[i] = BatchRead::Obsolete;
            }
        }
    }
    Ok(out)
}

/// Parks the run if it is still QUEUED at `attempt` (keeping the first parking time, so its
/// place among its tenant's runs is stable). `over_quota`: the concurrency limit its tenant
/// was found at. False when the run moved on meanwhile.
pub async fn park(
    pool: &PgPool,
    id: RunId,
    attempt: i32,
    over_quota: Option<i64>,
) -> Result<bool, CoreError> {
    let done = sqlx::query(
        "UPDATE runs SET parked_at = COALESCE(parked_at, now()), \
           parked_quota = COALESCE($3::int, parked_quota) \
         WHERE id = $1 AND state = 'QUEUED' AND attempt = $2",
    )
    .bind(id.0)
    .bind(attempt)
    .bind(over_quota.map(|q| i32::try_from(q).unwrap_or(i32::MAX)))
    .execute(pool)
    .await?;
    Ok(done.rows_affected() == 1)
}

/// Where a run's dispatch message stands before any lock is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Precheck {
    /// No such run of that tenant.
    Unknown,
    /// No longer QUEUED at that attempt: the message is a duplicate.
    Obsolete,
    /// Runs of its pool are parked: it queues behind them.
    BehindParked,
    Dispatchable,
}

/// One unlocked read deciding whether a dispatch message is worth a transaction: duplicates
/// (the common redelivery case) and runs that must queue behind parked ones cost this read
/// alone. The locking read re-checks state and attempt.
pub async fn precheck(
    pool: &PgPool,
    tenant: TenantId,
    id: RunId,
    attempt: i32,
) -> Result<Precheck, CoreError> {
    let row: Option<(bool, Option<bool>)> = sqlx::query_as(
        "SELECT r.state = 'QUEUED' AND r.attempt = $3, \
           CASE WHEN r.state = 'QUEUED' AND r.attempt = $3 THEN EXISTS (SELECT 1 FROM runs p \
             WHERE p.pool = r.pool AND p.state = 'QUEUED' AND p.parked_at IS NOT NULL) END \
         FROM runs r WHERE r.id = $1 AND r.tenant_id = $2",
    )
    .bind(id.0)
    .bind(tenant.0)
    .bind(attempt)
    .fetch_optional(pool)
    .await?;
    Ok(match row {
        None => Precheck::Unknown,
        Some((false, _)) => Precheck::Obsolete,
        Some((true, Some(true))) => Precheck::BehindParked,
        Some((true, _)) => Precheck::Dispatchable,
    })
}

/// A tenant with parked runs in a pool, with what the fair order needs.
#[derive(Debug, Clone)]
pub struct ParkedTenant {
    pub tenant: TenantId,
    /// Its ASSIGNED + RUNNING runs in this pool (fewest first).
    pub active_in_pool: i64,
    /// Its ASSIGNED + RUNNING runs in every pool (what the quota counts).
    pub active: i64,
    /// Its own `max_concurrent_runs`; `None` = the dispatcher default.
    pub max_concurrent: Option<i32>,
    /// Its best parked run's priority and age.
    pub head_priority: i32,
    pub head_created_at: DateTime<Utc>,
    /// Its parked runs in the pool, counted up to [`PARKED_COUNT_CAP`].
    pub parked: i64,
}

/// The most parked runs [`parked_tenants`] counts per tenant: a scheduler places no more than
/// this many in one look, and counting a long backlog in full would cost a scan per look.
pub const PARKED_COUNT_CAP: i64 = 64;

/// What a look at a pool's parked runs found.
#[derive(Debug, Default)]
pub struct ParkedPool {
    pub tenants: Vec<ParkedTenant>,
    /// Free slots on the pool's live, non-draining agents, counted without locks (an
    /// estimate of how many parked runs one pass can place).
    pub free_slots: i64,
}

/// Tenants with parked runs in `pool_name`. Distinct tenants come from a loose index scan of
/// `runs_parked` (one probe per tenant, however long a tenant's backlog), so the cost does not
/// grow with the backlog.
pub async fn parked_tenants(
    pool: &PgPool,
    pool_name: &str,
    liveness_ms: i64,
) -> Result<ParkedPool, CoreError> {
    let rows = sqlx::query(
        "WITH RECURSIVE t(tenant_id) AS ( \
           (SELECT tenant_id FROM runs WHERE pool = $1 AND state = 'QUEUED' \
              AND parked_at IS NOT NULL ORDER BY tenant_id LIMIT 1) \
           UNION ALL \
           SELECT (SELECT r.tenant_id FROM runs r WHERE r.pool = $1 AND r.state = 'QUEUED' \
                     AND r.parked_at IS NOT NULL AND r.tenant_id > t.tenant_id \
                   ORDER BY r.tenant_id LIMIT 1) \
           FROM t WHERE t.tenant_id IS NOT NULL) \
         SELECT t.tenant_id, tn.max_concurrent_runs, h.priority, h.created_at, \
           (SELECT count(*) FROM runs a WHERE a.tenant_id = t.tenant_id AND a.pool = $1 \
              AND a.state IN ('ASSIGNED', 'RUNNING')) AS active_in_pool, \
           (SELECT count(*) FROM runs a WHERE a.tenant_id = t.tenant_id \
              AND a.state IN ('ASSIGNED', 'RUNNING')) AS active, \
           (SELECT count(*) FROM (SELECT 1 FROM runs p WHERE p.pool = $1 \
              AND p.tenant_id = t.tenant_id AND p.state = 'QUEUED' AND p.parked_at IS NOT NULL \
              LIMIT $3) c) AS parked, \
           (SELECT COALESCE(sum(GREATEST(g.capacity - (SELECT count(*) FROM runs r \
                WHERE r.agent_id = g.id AND r.state IN ('ASSIGNED', 'RUNNING')), 0)), 0) \
              FROM agents g WHERE g.pool = $1 AND NOT g.draining \
                AND g.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond' \
           )::bigint AS free_slots \
         FROM t JOIN tenants tn ON tn.id = t.tenant_id \
         CROSS JOIN LATERAL (SELECT priority, created_at FROM runs h \
           WHERE h.pool = $1 AND h.tenant_id = t.tenant_id AND h.state = 'QUEUED' \
             AND h.parked_at IS NOT NULL \
           ORDER BY h.priority DESC, h.created_at LIMIT 1) h \
         WHERE t.tenant_id IS NOT NULL",
    )
    .bind(pool_name)
    .bind(liveness_ms)
    .bind(PARKED_COUNT_CAP)
    .fetch_all(pool)
    .await?;
    let mut out = ParkedPool::default();
    for r in &rows {
        out.free_slots = r.try_get("free_slots")?;
        out.tenants.push(ParkedTenant {
            tenant: TenantId(r.try_get("tenant_id")?),
            active_in_pool: r.try_get("active_in_pool")?,
            active: r.try_get("active")?,
            max_concurrent: r.try_get("max_concurrent_runs")?,
            head_priority: r.try_get("priority")?,
            head_created_at: r.try_get("created_at")?,
            parked: r.try_get("parked")?,
        });
    }
    Ok(out)
}

/// Locks, for each `(tenant, n)` of `picks`, the tenant's `n` best parked runs in the pool
/// (highest priority, then oldest) that are dispatchable now (past any retry backoff) and
/// whose labels are not among `skip_labels` (label sets no agent had room for in this look).
/// Rows other dispatchers hold are skipped, so this never waits. Each tenant's runs come in
/// its order, tenants in the order of `picks`.
pub async fn lock_parked(
    conn: &mut PgConnection,
    pool_name: &str,
    picks: &[(TenantId, i64)],
    skip_labels: &[serde_json::Value],
) -> Result<Vec<RunRecord>, CoreError> {
    let tenants: Vec<uuid::Uuid> = picks.iter().map(|(t, _)| t.0).collect();
    let counts: Vec<i64> = picks.iter().map(|(_, n)| *n).collect();
    let columns = super::runs::run_columns_of("r");
    let rows = sqlx::query(&format!(
        "SELECT {columns} FROM unnest($2::uuid[], $3::bigint[]) WITH ORDINALITY \
           AS p(tenant_id, n, ord) \
         CROSS JOIN LATERAL (SELECT {RUN_COLUMNS}, priority, created_at AS parked_order \
           FROM runs WHERE pool = $1 AND tenant_id = p.tenant_id \
             AND state = 'QUEUED' AND parked_at IS NOT NULL \
             AND (not_before IS NULL OR not_before <= now()) \
             AND NOT (COALESCE(spec->'labels', '{{}}'::jsonb) \
                   = ANY(ARRAY(SELECT jsonb_array_elements($4::jsonb)))) \
           ORDER BY priority DESC, created_at LIMIT p.n FOR UPDATE SKIP LOCKED) r \
         ORDER BY p.ord, r.priority DESC, r.parked_order"
    ))
    .bind(pool_name)
    .bind(&tenants)
    .bind(&counts)
    .bind(Json(skip_labels))
    .fetch_all(conn)
    .await?;
    rows.iter().map(RunRecord::from_row).collect()
}

/// A tenant at (or over) its concurrency limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OverQuota {
    pub active: i64,
    pub limit: i64,
}

/// A tenant's own concurrency limit as far as the caller knows it: read in its transaction
/// already (a statement spared per batch, on every run's way to an agent), or not yet.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OwnLimit {
    Read(Option<i32>),
    Unknown,
}

/// The tenant's effective concurrency limit: its own, else `default_limit`; `None` = none.
pub fn effective_limit(own: Option<i32>, default_limit: u32) -> Option<i64> {
    let limit = own.map_or(i64::from(default_limit), i64::from);
    (limit > 0).then_some(limit)
}

/// Checks the tenant's concurrency quota for one more assignment inside the caller's
/// transaction: when a limit applies, takes the tenant's concurrency-quota lock first, so the count
/// cannot change until the transaction ends. `Some` = at the limit, do not assign.
pub async fn check_quota(
    conn: &mut PgConnection,
    tenant: TenantId,
    default_limit: u32,
) -> Result<Option<OverQuota>, CoreError> {
    Ok(quota_room(conn, tenant, default_limit, OwnLimit::Unknown)
        .await?
        .filter(|(active, limit)| active >= limit)
        .map(|(active, limit)| OverQuota { active, limit }))
}

/// The tenant's runs ASSIGNED or RUNNING and its limit, `(active, limit)`, counted under its
/// concurrency-quota lock, which the caller's transaction then holds; `None` when no limit
/// applies (and no lock is taken). A batch of assignments counts its own on top.
pub async fn quota_room(
    conn: &mut PgConnection,
    tenant: TenantId,
    default_limit: u32,
    own: OwnLimit,
) -> Result<Option<(i64, i64)>, CoreError> {
    let own = match own {
        OwnLimit::Read(own) => own,
        OwnLimit::Unknown => sqlx::query_scalar::<_, Option<i32>>(
            "SELECT max_concurrent_runs FROM tenants WHERE id = $1",
        )
        .bind(tenant.0)
        .fetch_optional(&mut *conn)
        .await?
        .flatten(),
    };
    let Some(limit) = effective_limit(own, default_limit) else {
        return Ok(None);
    };
    super::quota_locks::lock_active(conn, tenant).await?;
    let active: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM runs WHERE tenant_id = $1 AND state IN ('ASSIGNED', 'RUNNING')",
    )
    .bind(tenant.0)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Some((active, limit)))
}

/// Records on the tenant's parked runs in the pool the limit it is held at, for GetRun's
/// wait reason. Writes only rows that do not say so already.
pub async fn mark_over_quota(
    pool: &PgPool,
    pool_name: &str,
    tenant: TenantId,
    limit: i64,
) -> Result<(), CoreError> {
    sqlx::query(
        "UPDATE runs SET parked_quota = $3 WHERE pool = $1 AND tenant_id = $2 \
         AND state = 'QUEUED' AND parked_at IS NOT NULL AND parked_quota IS DISTINCT FROM $3",
    )
    .bind(pool_name)
    .bind(tenant.0)
    .bind(i32::try_from(limit).unwrap_or(i32::MAX))
    .execute(pool)
    .await?;
    Ok(())
}

/// For GetRun: whether the run's tenant is at its concurrency limit — its own, or the one a
/// dispatcher recorded when it held the run back (the dispatcher default is the
/// dispatchers' setting, not the API's).
pub async fn over_quota(pool: &PgPool, run: RunId) -> Result<Option<OverQuota>, CoreError> {
    let row = sqlx::query(
        "SELECT COALESCE(t.max_concurrent_runs, r.parked_quota) AS lim, \
           (SELECT count(*) FROM runs a WHERE a.tenant_id = r.tenant_id \
              AND a.state IN ('ASSIGNED', 'RUNNING')) AS active \
         FROM runs r JOIN tenants t ON t.id = r.tenant_id WHERE r.id = $1",
    )
    .bind(run.0)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    let limit: Option<i32> = row.try_get("lim")?;
    let active: i64 = row.try_get("active")?;
    Ok(limit
        .map(i64::from)
        .filter(|&l| l > 0 && active >= l)
        .map(|limit| OverQuota { active, limit }))
}

#[cfg(test)]
mod tests {
    use super::effective_limit;

    #[test]
    fn a_tenant_limit_overrides_the_default_and_zero_means_none() {
        assert_eq!(effective_limit(Some(3), 10), Some(3));
        assert_eq!(effective_limit(None, 10), Some(10));
        assert_eq!(effective_limit(None, 0), None);
    }
}
