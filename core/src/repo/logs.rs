//! Output chunks pushed by agents, kept per run attempt.

use sqlx::PgPool;

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
