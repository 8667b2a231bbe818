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
           draining = false, drain_requested = false",
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

/// Records a heartbeat and renews the leases the agent names, if they are still its own, and
/// every assignment of the agent not started yet (named or not).
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
    // Assignments whose command has not reached the agent yet (it sits in the agent's durable
    // queue, e.g. across a broker outage) live as long as the agent does; the reaper bounds
    // how long one may stay unstarted.
    sqlx::query(
        "UPDATE runs SET lease_expires_at = now() + $2::bigint * interval '1 millisecond' \
         WHERE agent_id = $1 AND state = 'ASSIGNED' \
           AND lease_expires_at < now() + $2::bigint * interval '1 millisecond'",
    )
    .bind(agent_id)
    .bind(lease_ttl_ms)
    .execute(&mut *tx)
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

/// What a heartbeat answers besides the leases that are no longer the agent's.
#[derive(Debug, Default)]
pub struct HeartbeatAnswer {
    pub revoked: Vec<(RunId, i64)>,
    /// Held leases whose run a client cancelled.
    pub cancel: Vec<(RunId, i64)>,
    /// An operator asked the agent to drain.
    pub drain: bool,
}

/// [`heartbeat`] plus the cancels and drain request the agent must learn about.
pub async fn heartbeat_answer(
    pool: &PgPool,
    agent_id: &str,
    running: &[(RunId, i64)],
    lease_ttl_ms: i64,
) -> Result<HeartbeatAnswer, CoreError> {
    let revoked = heartbeat(pool, agent_id, running, lease_ttl_ms).await?;
    let mut conn = pool.acquire().await?;
    let cancel = super::runs::cancel_requested_among(&mut conn, agent_id, running).await?;
    let drain: bool = sqlx::query_scalar("SELECT drain_requested FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_optional(&mut *conn)
        .await?
        .unwrap_or(false);
    Ok(HeartbeatAnswer {
        revoked,
        cancel,
        drain,
    })
}

/// The agent takes no new work: dispatchers skip draining agents.
pub async fn set_draining(pool: &PgPool, agent_id: &str) -> Result<(), CoreError> {
    let done = sqlx::query("UPDATE agents SET draining = true WHERE id = $1")
        .bind(agent_id)
        .execute(pool)
        .await?;
    if done.rows_affected() == 0 {
        return Err(CoreError::NotFound);
    }
    Ok(())
}

/// An operator's drain request: the agent stops taking work at once and learns it should
/// drain from its command queue or its next heartbeat.
pub async fn request_drain(
    conn: &mut PgConnection,
    agent_id: &str,
    liveness_ms: i64,
) -> Result<Option<AgentRecord>, CoreError> {
    let done =
        sqlx::query("UPDATE agents SET draining = true, drain_requested = true WHERE id = $1")
            .bind(agent_id)
            .execute(&mut *conn)
            .await?;
    if done.rows_affected() == 0 {
        return Ok(None);
    }
    let rows = list_where(conn, Some(agent_id), liveness_ms).await?;
    Ok(rows.into_iter().next())
}

/// Removes an agent that holds no lease any more. False if it still holds one.
pub async fn deregister(pool: &PgPool, agent_id: &str) -> Result<bool, CoreError> {
    let done = sqlx::query(
        "DELETE FROM agents WHERE id = $1 AND NOT EXISTS (SELECT 1 FROM runs \
         WHERE agent_id = $1 AND state IN ('ASSIGNED', 'RUNNING'))",
    )
    .bind(agent_id)
    .execute(pool)
    .await?;
    if done.rows_affected() == 1 {
        return Ok(true);
    }
    let known: Option<i32> = sqlx::query_scalar("SELECT 1 FROM agents WHERE id = $1")
        .bind(agent_id)
        .fetch_optional(pool)
        .await?;
    if known.is_none() {
        // Already gone: deregistering twice is harmless.
        return Ok(true);
    }
    Ok(false)
}

/// An agent as operators see it.
#[derive(Debug, Clone)]
pub struct AgentRecord {
    pub id: String,
    pub hostname: String,
    pub pool: String,
    pub labels: BTreeMap<String, String>,
    pub capacity: i32,
    pub running: i64,
    pub executor: String,
    pub version: String,
    pub last_heartbeat_at: chrono::DateTime<chrono::Utc>,
    pub draining: bool,
    pub live: bool,
}

async fn list_where(
    conn: &mut PgConnection,
    id: Option<&str>,
    liveness_ms: i64,
) -> Result<Vec<AgentRecord>, CoreError> {
    let rows = sqlx::query(
        "SELECT a.id, a.hostname, a.pool, a.labels, a.capacity, a.executor, a.version, \
                a.last_heartbeat_at, a.draining, \
                a.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond' AS live, \
                (SELECT count(*) FROM runs r WHERE r.agent_id = a.id \
                   AND r.state IN ('ASSIGNED', 'RUNNING')) AS running \
         FROM agents a WHERE ($1::text IS NULL OR a.id = $1) ORDER BY a.pool, a.id",
    )
    .bind(id)
    .bind(liveness_ms)
    .fetch_all(conn)
    .await?;
    rows.iter()
        .map(|r| {
            let Json(labels): Json<BTreeMap<String, String>> = r.try_get("labels")?;
            Ok(AgentRecord {
                id: r.try_get("id")?,
                hostname: r.try_get("hostname")?,
                pool: r.try_get("pool")?,
                labels,
                capacity: r.try_get("capacity")?,
                running: r.try_get("running")?,
                executor: r.try_get("executor")?,
                version: r.try_get("version")?,
                last_heartbeat_at: r.try_get("last_heartbeat_at")?,
                draining: r.try_get("draining")?,
                live: r.try_get("live")?,
            })
        })
        .collect()
}

/// Every known agent; `live` means it heartbeated within `liveness_ms`.
pub async fn list(pool: &PgPool, liveness_ms: i64) -> Result<Vec<AgentRecord>, CoreError> {
    let mut conn = pool.acquire().await?;
    list_where(&mut conn, None, liveness_ms).await
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
    // First look past agents other assigners hold (spreads a burst over the fleet); when
    // every candidate is held, wait for one instead of reporting "no capacity": the holders'
    // transactions are short, and a burst for one agent must not sleep until a recheck.
    let mut wait_for_lock = false;
    for _ in 0..8 {
        let sql = if wait_for_lock {
            PICK_SQL.replace("SKIP LOCKED", "")
        } else {
            PICK_SQL.to_owned()
        };
        let candidate = sqlx::query(&sql)
            .bind(pool)
            .bind(liveness_ms)
            .bind(Json(labels))
            .bind(&skipped)
            .fetch_optional(&mut *conn)
            .await?;
        let Some(row) = candidate else {
            if wait_for_lock {
                return Ok(None);
            }
            wait_for_lock = true;
            continue;
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

/// An agent locked for the caller's transaction, with its slots counted under the lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockedAgent {
    pub id: String,
    pub capacity: i64,
    /// Its runs ASSIGNED or RUNNING, counted after the lock was held.
    pub active: i64,
}

/// For a batch of `wanted` runs with one selector: locks up to `wanted` live, non-draining
/// agents of `pool` whose labels include `labels` and which have a free slot, least loaded
/// first, skipping agents other assigners hold; when every candidate is held and `may_wait`,
/// waits for the least loaded one, as [`pick_and_lock`] does. Their active runs are counted again once the
/// locks are held (the first count is from before), so the slots are exact. Empty: no agent
/// fits or has a free slot.
///
/// `wanted` agents are enough, since each has a free slot; locking no more leaves the rest of
/// the fleet to other dispatchers.
pub async fn lock_for_batch(
    conn: &mut PgConnection,
    pool: &str,
    labels: &BTreeMap<String, String>,
    liveness_ms: i64,
    wanted: usize,
    may_wait: bool,
) -> Result<Vec<LockedAgent>, CoreError> {
    let none: Vec<String> = Vec::new();
    let limit = i64::try_from(wanted.max(1)).unwrap_or(i64::MAX);
    let skip = PICK_SQL.replace("LIMIT 1", "LIMIT $5");
    let mut ids: Vec<String> = sqlx::query_scalar(&skip.replace("a.id, a.capacity", "a.id"))
        .bind(pool)
        .bind(liveness_ms)
        .bind(Json(labels))
        .bind(&none)
        .bind(limit)
        .fetch_all(&mut *conn)
        .await?;
    if ids.is_empty() && may_wait {
        let wait = PICK_SQL.replace("SKIP LOCKED", "");
        ids = sqlx::query_scalar(&wait.replace("a.id, a.capacity", "a.id"))
            .bind(pool)
            .bind(liveness_ms)
            .bind(Json(labels))
            .bind(&none)
            .fetch_all(&mut *conn)
            .await?;
    }
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let rows = sqlx::query(
        "SELECT a.id, a.capacity::bigint AS capacity, (SELECT count(*) FROM runs r \
           WHERE r.agent_id = a.id AND r.state IN ('ASSIGNED', 'RUNNING')) AS active \
         FROM agents a WHERE a.id = ANY($1) ORDER BY a.id",
    )
    .bind(&ids)
    .fetch_all(&mut *conn)
    .await?;
    let mut locked = Vec::with_capacity(rows.len());
    for row in rows {
        let agent = LockedAgent {
            id: row.try_get("id")?,
            capacity: row.try_get("capacity")?,
            active: row.try_get("active")?,
        };
        if agent.active < agent.capacity {
            locked.push(agent);
        }
    }
    Ok(locked)
}

const PICK_SQL: &str = "SELECT a.id, a.capacity FROM agents a \
     WHERE a.pool = $1 AND NOT a.draining \
       AND a.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond' \
       AND a.labels @> $3::jsonb AND NOT (a.id = ANY($4)) \
       AND a.capacity > (SELECT count(*) FROM runs r WHERE r.agent_id = a.id \
                         AND r.state IN ('ASSIGNED', 'RUNNING')) \
     ORDER BY (SELECT count(*) FROM runs r WHERE r.agent_id = a.id \
               AND r.state IN ('ASSIGNED', 'RUNNING'))::float8 / a.capacity, a.id \
     LIMIT 1 FOR UPDATE OF a SKIP LOCKED";
