//! Why a run is still waiting, worked out when a client asks (GetRun), from the same facts
//! the dispatcher uses: retry backoff, approval, the tenant's concurrency quota, and the live
//! agents of the run's pool. An
//! honest answer to "why is it still queued" without the dispatcher having to record one.

use chrono::{DateTime, Utc};
use sqlx::types::Json;
use sqlx::{PgPool, Row};

use super::runs::RunRecord;
use crate::error::CoreError;
use crate::state::RunState;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitCode {
    /// Placeable now; a dispatcher is about to assign it.
    Dispatching,
    NoLiveAgent,
    NoMatchingAgent,
    AllAgentsFull,
    /// The tenant has as many runs assigned or running as its concurrency quota allows.
    TenantOverQuota,
    RetryBackoff,
    PendingApproval,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WaitReason {
    pub code: WaitCode,
    pub message: String,
    pub until: Option<DateTime<Utc>>,
}

/// Why `run` waits; `None` when it is not waiting (not QUEUED or PENDING_APPROVAL).
/// `liveness_ms` is the lease TTL: an agent silent for longer is not live.
pub async fn why_waiting(
    pool: &PgPool,
    run: &RunRecord,
    liveness_ms: i64,
) -> Result<Option<WaitReason>, CoreError> {
    match run.state {
        RunState::PendingApproval => {
            return Ok(Some(WaitReason {
                code: WaitCode::PendingApproval,
                message: "waiting for approval".into(),
                until: None,
            }));
        }
        RunState::Queued => {}
        _ => return Ok(None),
    }
    if let Some(until) = run.not_before.filter(|t| *t > Utc::now()) {
        return Ok(Some(WaitReason {
            code: WaitCode::RetryBackoff,
            message: format!(
                "attempt {} waits for its retry backoff until {}",
                run.attempt,
                until.to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
            ),
            until: Some(until),
        }));
    }
    if let Some(q) = super::parking::over_quota(pool, run.id).await? {
        return Ok(Some(WaitReason {
            code: WaitCode::TenantOverQuota,
            message: format!(
                "tenant over concurrency quota ({}/{} running)",
                q.active, q.limit
            ),
            until: None,
        }));
    }
    let row = sqlx::query(
        "WITH a AS ( \
           SELECT a.capacity, a.draining, a.labels @> $3::jsonb AS matches, \
                  (SELECT count(*) FROM runs r WHERE r.agent_id = a.id \
                     AND r.state IN ('ASSIGNED', 'RUNNING')) AS busy \
           FROM agents a WHERE a.pool = $1 \
             AND a.last_heartbeat_at > now() - $2::bigint * interval '1 millisecond') \
         SELECT count(*) AS live, \
                count(*) FILTER (WHERE matches) AS matching, \
                count(*) FILTER (WHERE matches AND NOT draining AND busy < capacity) AS free, \
                COALESCE(sum(capacity) FILTER (WHERE matches), 0)::bigint AS slots, \
                COALESCE(sum(busy) FILTER (WHERE matches), 0)::bigint AS used \
         FROM a",
    )
    .bind(&run.spec.pool)
    .bind(liveness_ms)
    .bind(Json(&run.spec.labels))
    .fetch_one(pool)
    .await?;
    let live: i64 = row.try_get("live")?;
    let matching: i64 = row.try_get("matching")?;
    let free: i64 = row.try_get("free")?;
    let slots: i64 = row.try_get("slots")?;
    let used: i64 = row.try_get("used")?;
    let pool_name = &run.spec.pool;
    let (code, message) = if live == 0 {
        (
            WaitCode::NoLiveAgent,
            format!("no live agent in pool {pool_name}"),
        )
    } else if matching == 0 {
        let labels: Vec<String> = run
            .spec
            .labels
            .iter()
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        (
            WaitCode::NoMatchingAgent,
            format!(
                "none of the {live} live agents in pool {pool_name} has the labels {}",
                labels.join(",")
            ),
        )
    } else if free == 0 {
        (
            WaitCode::AllAgentsFull,
            format!(
                "all {matching} matching agents in pool {pool_name} are full or draining \
                 ({used}/{slots} slots busy)"
            ),
        )
    } else {
        (
            WaitCode::Dispatching,
            format!("{free} matching agents have free slots; waiting for a dispatcher"),
        )
    };
    Ok(Some(WaitReason {
        code,
        message,
        until: None,
    }))
}
