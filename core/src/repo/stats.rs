//! The numbers behind `AdminService.GetStats`: one read each, no locks, for operators.

use sqlx::PgPool;

use crate::error::CoreError;
use crate::ids::{RunId, TenantId};
use crate::state::RunState;

#[derive(Debug, Clone, Default)]
pub struct Stats {
    /// Every state, zeros included, in [`RunState::ALL`] order.
    pub runs_by_state: Vec<(RunState, u64)>,
    /// The run QUEUED longest (since it last entered QUEUED), and for how long.
    pub oldest_queued: Option<(RunId, f64)>,
    /// Archived dead letters not yet redriven (the tenant's and unattributed ones).
    pub dead_letters: u64,
    pub outbox_backlog: u64,
    pub outbox_oldest_age_secs: f64,
    /// Pools with queued runs or registered agents: the run queues worth measuring.
    pub pools: Vec<String>,
}

pub async fn read(pool: &PgPool, tenant: TenantId) -> Result<Stats, CoreError> {
    let counts: Vec<(String, i64)> =
        sqlx::query_as("SELECT state, count(*) FROM runs WHERE tenant_id = $1 GROUP BY state")
            .bind(tenant.0)
            .fetch_all(pool)
            .await?;
    let runs_by_state = RunState::ALL
        .into_iter()
        .map(|s| {
            let n = counts
                .iter()
                .find(|(name, _)| name == s.as_str())
                .map_or(0, |(_, n)| *n);
            (s, u64::try_from(n).unwrap_or(0))
        })
        .collect();
    let oldest: Option<(uuid::Uuid, f64)> = sqlx::query_as(
        "SELECT id, EXTRACT(EPOCH FROM now() - updated_at)::float8 FROM runs \
         WHERE tenant_id = $1 AND state = 'QUEUED' ORDER BY updated_at LIMIT 1",
    )
    .bind(tenant.0)
    .fetch_optional(pool)
    .await?;
    let dead: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM dead_letters \
         WHERE (tenant_id = $1 OR tenant_id IS NULL) AND redriven_at IS NULL",
    )
    .bind(tenant.0)
    .fetch_one(pool)
    .await?;
    let (backlog, age): (i64, Option<f64>) = sqlx::query_as(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(available_at))::float8 \
         FROM outbox WHERE published_at IS NULL AND available_at <= now()",
    )
    .fetch_one(pool)
    .await?;
    let pools: Vec<String> = sqlx::query_scalar(
        "SELECT pool FROM runs WHERE tenant_id = $1 AND state = 'QUEUED' \
         UNION SELECT pool FROM agents ORDER BY 1",
    )
    .bind(tenant.0)
    .fetch_all(pool)
    .await?;
    Ok(Stats {
        runs_by_state,
        oldest_queued: oldest.map(|(id, age)| (RunId(id), age.max(0.0))),
        dead_letters: u64::try_from(dead).unwrap_or(0),
        outbox_backlog: u64::try_from(backlog).unwrap_or(0),
        outbox_oldest_age_secs: age.unwrap_or(0.0).max(0.0),
        pools,
    })
}
