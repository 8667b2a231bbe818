//! Output chunks pushed by agents, kept per run attempt.

use chrono::{DateTime, Utc};
use sqlx::{PgPool, Row};

use crate::error::CoreError;
use crate::ids::{RunId, TenantId};

pub async fn append(
    pool: &PgPool,
    tenant: TenantId,
    run: RunId,
    attempt: i32,
    chunks: &[(i16, Vec<u8>)],
) -> Result<(), CoreError> {
    if chunks.is_empty() {
        return Ok(());
    }
    let streams: Vec<i16> = chunks.iter().map(|(s, _)| *s).collect();
    let data: Vec<Vec<u8>> = chunks.iter().map(|(_, d)| d.clone()).collect();
    sqlx::query(
        "INSERT INTO run_logs (run_id, tenant_id, attempt, stream, data) \
         SELECT $1, $2, $3, s, d FROM unnest($4::smallint[], $5::bytea[]) AS c(s, d)",
    )
    .bind(run.0)
    .bind(tenant.0)
    .bind(attempt)
    .bind(&streams)
    .bind(&data)
    .execute(pool)
    .await?;
    Ok(())
}

/// One stored chunk, as [`read_after`] returns it.
#[derive(Debug, Clone)]
pub struct LogRecord {
    /// The row id: increases along a run's log (one agent pushes a run's chunks in order).
    pub offset: i64,
    pub attempt: i32,
    pub stream: i16,
    pub data: Vec<u8>,
    pub at: DateTime<Utc>,
}

/// Up to `limit` chunks of the run after `offset`, oldest first.
pub async fn read_after(
    pool: &PgPool,
    tenant: TenantId,
    run: RunId,
    offset: i64,
    limit: i64,
) -> Result<Vec<LogRecord>, CoreError> {
    let rows = sqlx::query(
        "SELECT id, attempt, stream, data, at FROM run_logs \
         WHERE run_id = $1 AND tenant_id = $2 AND id > $3 ORDER BY id LIMIT $4",
    )
    .bind(run.0)
    .bind(tenant.0)
    .bind(offset)
    .bind(limit)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(LogRecord {
                offset: r.try_get("id")?,
                attempt: r.try_get("attempt")?,
                stream: r.try_get("stream")?,
                data: r.try_get("data")?,
                at: r.try_get("at")?,
            })
        })
        .collect()
}
