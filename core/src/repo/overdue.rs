//! What the reaper looks for: leases that expired, runs that overran their execution
//! timeout without the agent reporting, queued runs past their queue deadline, assignments
//! a live agent never started. Plain indexed
//! scans; the reaper then ends each run with a guarded transition, so several reapers (one
//! per dispatcher) may find the same run and only one changes it.

use sqlx::{PgPool, Row};

use crate::error::CoreError;
use crate::ids::RunId;

/// A run and the lease epoch it was found under.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found {
    pub run_id: RunId,
    pub epoch: i64,
    /// The run's trace, which what the reaper does to it continues.
    pub traceparent: Option<String>,
}

async fn scan(pool: &PgPool, sql: &str, arg: i64, limit: i64) -> Result<Vec<Found>, CoreError> {
    let rows = sqlx::query(sql)
        .bind(arg)
        .bind(limit)
        .fetch_all(pool)
        .await?;
    rows.iter()
        .map(|r| {
            Ok(Found {
                run_id: RunId(r.try_get("id")?),
                epoch: r.try_get("lease_epoch")?,
                traceparent: r.try_get("traceparent")?,
            })
        })
        .collect()
}

/// ASSIGNED/RUNNING runs whose lease ran out: their agent stopped heartbeating.
pub async fn expired_leases(pool: &PgPool, limit: i64) -> Result<Vec<Found>, CoreError> {
    scan(
        pool,
        "SELECT id, lease_epoch, traceparent FROM runs WHERE state IN ('ASSIGNED', 'RUNNING') \
         AND lease_expires_at < now() - $1 * interval '1 millisecond' \
         ORDER BY lease_expires_at LIMIT $2",
        0,
        limit,
    )
    .await
}

/// RUNNING runs past their execution timeout by more than `grace_ms`: the agent is alive
/// (it renews the lease) but did not enforce the timeout.
pub async fn overran_timeout(
    pool: &PgPool,
    grace_ms: i64,
    limit: i64,
) -> Result<Vec<Found>, CoreError> {
    scan(
        pool,
        "SELECT id, lease_epoch, traceparent FROM runs WHERE state = 'RUNNING' \
         AND started_at + (spec->>'timeout_secs')::bigint * interval '1 second' \
             + $1 * interval '1 millisecond' < now() \
         ORDER BY started_at LIMIT $2",
        grace_ms,
        limit,
    )
    .await
}

/// QUEUED runs whose queue deadline passed.
pub async fn past_queue_deadline(pool: &PgPool, limit: i64) -> Result<Vec<Found>, CoreError> {
    scan(
        pool,
        "SELECT id, lease_epoch, traceparent FROM runs WHERE state = 'QUEUED' \
         AND queue_deadline < now() - $1 * interval '1 millisecond' \
         ORDER BY queue_deadline LIMIT $2",
        0,
        limit,
    )
    .await
}

/// ASSIGNED runs not started `timeout_ms` after their assignment although their agent keeps
/// the lease alive. `updated_at` is the assignment time: nothing else touches an ASSIGNED run
/// but a cancel request, which only restarts the clock.
pub async fn stale_assignments(
    pool: &PgPool,
    timeout_ms: i64,
    limit: i64,
) -> Result<Vec<Found>, CoreError> {
    scan(
        pool,
        "SELECT id, lease_epoch, traceparent FROM runs WHERE state = 'ASSIGNED' \
         AND updated_at < now() - $1 * interval '1 millisecond' \
         ORDER BY updated_at LIMIT $2",
        timeout_ms,
        limit,
    )
    .await
}
