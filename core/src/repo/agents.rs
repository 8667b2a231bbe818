//! Worker agents as the control plane knows them: registration, heartbeats (which renew the
//! leases of their runs) and the capacity-safe choice of an agent for a run.

use std::collections::BTreeMap;

use sqlx::types::Json;
use sqlx::{PgConnection, PgPool, Row};

use crate::error::CoreError;
use crate::ids::RunId;

#[derive(Debug, Clone)]
pub struct AgentRegistration {
    pub id: String,
    pub hostname: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: i32,
    pub executor: String,
    pub version: String,
}

/// Inserts or refreshes an agent (a restarted agent keeps its id) and wakes dispatchers.
pub async fn register(pool: &PgPool, a: &AgentRegistration) -> Result<(), CoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "INSERT INTO agents (id, hostname, pool, labels, capacity, executor, version) \
         VALUES ($1, $2, $3, $4, $5, $6, $7) \
         ON CONFLICT (id) DO UPDATE SET hostname = EXCLUDED.hostname, pool = EXCLUDED.pool, \
           labels = EXCLUDED.labels, capacity = EXCLUDED.capacity, executor = EXCLUDED.executor, \
           version = EXCLUDED.version, registered_at = now(), last_heartbeat_at = now(), \
           draining = false",
    )
    .bind(&a.id)
    .bind(&a.hostname)
    .bind(&a.pool)
    .bind(Json(&a.labels))
    .bind(a.capacity)
    .bind(&a.executor)
    .bind(&a.version)
    .execute(&mut *tx)
    .await?;
    super::runs::notify_capacity(&mut tx).await?;
    tx.commit().await?;
    Ok(())
}

/// Records a heartbeat and renews the leases the agent names, if they are still its own.
/// Returns the named leases that are not (the agent must stop those runs), or
/// [`CoreError::NotFound`] if the agent is unknown (it must register again).
pub async fn heartbeat(
    pool: &PgPool,
    agent_id: &str,
    running: &[(RunId, i64)],
    lease_ttl_ms: i64,
) -> Result<Vec<(RunId, i64)>, CoreError> {
    let mut tx = pool.begin().await?;
    let updated = sqlx::query("UPDATE agents SET last_heartbeat_at = now() WHERE id = $1")
        .bind(agent_id)
        .execute(&mut *tx)
        .await?;
    if updated.rows_affected() == 0 {
        return Err(CoreError::NotFound);
    }
    let ids: Vec<uuid::Uuid> = running.iter().map(|(r, _)| r.0).collect();
    let epochs: Vec<i64> = running.iter().map(|(_, e)| *e).collect();
    let renewed = sqlx::query(
        "UPDATE runs r SET lease_expires_at = now() + $2::bigint * interval '1 millisecond' \
         FROM unnest($3::uuid[], $4::bigint[]) AS l(id, epoch) \
         WHERE r.id = l.id AND r.lease_epoch = l.epoch AND r.agent_id = $1 \
           AND r.state IN ('ASSIGNED', 'RUNNING') \
         RETURNING r.id, r.lease_epoch",
    )
    .bind(agent_id)
    .bind(lease_ttl_ms)
    .bind(&ids)
    .bind(&epochs)
    .fetch_all(&mut *tx)
    .await?;
    tx.commit().await?;
    let mut kept = Vec::with_capacity(renewed.len());
    for row in &renewed {
        kept.push((
            RunId(row.try_get("id")?),
            row.try_get::<i64, _>("lease_epoch")?,
        ));
    }
    Ok(running
        .iter()
        .filter(|l| !kept.contains(l))
        .copied()
        .collect())
}

/// Picks a live, non-draining agent of `pool` whose labels include `labels` and which has a
/// free slot, and locks its row for the caller's transaction.
///
/// Capacity is re-counted after the lock is held: every assigner to an agent holds that lock,
/// so the count cannot be stale and two dispatchers never overfill one agent.
pub async fn pick_and_lock(
    conn: &mut PgConnection,
    pool: &str,
    labels: &BTreeMap<String, String>,
    liveness_ms: i64,
) -> Result<Option<String>, CoreError> {
    let mut skipped: Vec<String> = Vec::new();
    for _ in 0..8 {
        let candidate = sqlx::query(
            "SELECT a.id, a.capacity FROM agents a \
             WHERE a.pool = $1 AND NOT a.draining \
               AND a.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond' \
               AND a.labels @> $3::jsonb AND NOT (a.id = ANY($4)) \
               AND a.capacity > (SELECT count(*) FROM runs r WHERE r.agent_id = a.id \
                                 AND r.state IN ('ASSIGNED', 'RUNNING')) \
             ORDER BY (SELECT count(*) FROM runs r WHERE r.agent_id = a.id \
                       AND r.state IN ('ASSIGNED', 'RUNNING'))::float8 / a.capacity, a.id \
             LIMIT 1 FOR UPDATE OF a SKIP LOCKED",
        )
        .bind(pool)
        .bind(liveness_ms)
        .bind(Json(labels))
        .bind(&skipped)
        .fetch_optional(&mut *conn)
        .await?;
        let Some(row) = candidate else {
            return Ok(None);
        };
        let id: String = row.try_get("id")?;
        let capacity: i32 = row.try_get("capacity")?;
        let active: i64 = sqlx::query_scalar(
            "SELECT count(*) FROM runs WHERE agent_id = $1 AND state IN ('ASSIGNED', 'RUNNING')",
        )
        .bind(&id)
        .fetch_one(&mut *conn)
        .await?;
        if active < i64::from(capacity) {
            return Ok(Some(id));
        }
        skipped.push(id);
    }
    Ok(None)
}
