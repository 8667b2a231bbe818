//! Per-tenant locks for the two quotas, now that no tenant-wide row is locked by every
//! transition (the audit chain is sealed after commit, [`crate::audit`]).
//!
//! Queued-runs quota, at submit. Counting and inserting must not overshoot, yet a tenant's
//! submits must not run one commit at a time. Every submit takes the tenant's lock *shared*
//! and counts. A submit that is admitted without the exclusive lock needs
//! `waiting + max_connections < max_queued_runs`: every submit still in flight beside it holds
//! a Postgres connection, so at most `max_connections` runs the count did not see can commit,
//! and the limit holds. Near the limit, the submit starts again holding the lock *exclusively*
//! (no other submit is then in flight) and counts exactly. With the default limit (100,000)
//! the shared path is the only one a tenant normally takes.
//!
//! Concurrency quota, at dispatch: counted under the tenant's exclusive lock, taken only when
//! a limit applies.
//!
//! Transaction-scoped advisory locks: released at commit or rollback, and nothing is written.

use sqlx::PgConnection;

use crate::error::CoreError;
use crate::ids::TenantId;

/// Advisory-lock classes (the first key of the two-key form), one per purpose.
pub(crate) const WAITING_CLASS: i32 = 0x6472_7601;
const ACTIVE_CLASS: i32 = 0x6472_7602;

/// How [`lock_waiting`] takes the queued-runs lock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Shared,
    Exclusive,
}

/// Takes the tenant's queued-runs lock until the transaction ends.
pub async fn lock_waiting(
    conn: &mut PgConnection,
    tenant: TenantId,
    mode: Mode,
) -> Result<(), CoreError> {
    let f = match mode {
        Mode::Shared => "pg_advisory_xact_lock_shared",
        Mode::Exclusive => "pg_advisory_xact_lock",
    };
    sqlx::query(&format!("SELECT {f}($1, hashtext($2::text))"))
        .bind(WAITING_CLASS)
        .bind(tenant.0)
        .execute(conn)
        .await?;
    Ok(())
}

/// The tenant's waiting runs (QUEUED or PENDING_APPROVAL, counted up to `max`), and how many
/// more uncounted ones could be committing beside this transaction (`max_connections`).
pub async fn count_waiting(
    conn: &mut PgConnection,
    tenant: TenantId,
    max: i64,
) -> Result<(i64, i64), CoreError> {
    let (waiting, slack): (i64, i64) = sqlx::query_as(
        "SELECT (SELECT count(*) FROM (SELECT 1 FROM runs WHERE tenant_id = $1 \
           AND state IN ('QUEUED', 'PENDING_APPROVAL') LIMIT $2) w), \
         current_setting('max_connections')::bigint",
    )
    .bind(tenant.0)
    .bind(max)
    .fetch_one(conn)
    .await?;
    Ok((waiting, slack))
}

/// Takes the tenant's concurrency-quota lock until the transaction ends.
pub async fn lock_active(conn: &mut PgConnection, tenant: TenantId) -> Result<(), CoreError> {
    sqlx::query("SELECT pg_advisory_xact_lock($1, hashtext($2::text))")
        .bind(ACTIVE_CLASS)
        .bind(tenant.0)
        .execute(conn)
        .await?;
    Ok(())
}
