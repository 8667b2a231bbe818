//! The sealer: links committed, unchained rows into their tenant's chain.
//!
//! Order is (transaction id, insertion order). A row is sealed only once its transaction id is
//! below `pg_snapshot_xmin` of a snapshot taken before the sealer touches anything: every
//! transaction below that is over, and any transaction still to commit has a larger id, so no
//! row can later appear before a sealed one. Several sealers (each API and dispatcher runs
//! one) are safe: a tenant's head row is locked for the batch, and a sealer that finds it
//! locked moves on to the next tenant.

use std::time::Duration;

use serde::Deserialize;
use sqlx::{PgPool, Row};
use tokio_util::sync::CancellationToken;
use uuid::Uuid;

use super::links::{AUDIT_EVENT_COLUMNS, RUN_EVENT_COLUMNS, chain_row};
use crate::error::CoreError;
use crate::ids::TenantId;

/// The sealer's timing (`DROVER_AUDIT__…`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct SealSettings {
    /// How often pending rows are looked for: the longest a committed event stays unlinked
    /// under normal running.
    pub interval_ms: u64,
    /// Rows linked per transaction.
    pub batch_size: i64,
}

impl Default for SealSettings {
    fn default() -> Self {
        Self {
            interval_ms: 200,
            batch_size: 5_000,
        }
    }
}

/// Whether to wait for a tenant whose head another sealer holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// Wait: the caller needs everything sealable sealed now (verification).
    Yes,
    /// Skip the tenant: the holder is sealing it.
    No,
}

/// Seals `tenant`'s pending rows whose transactions have ended; returns how many it linked.
pub async fn seal_tenant(pool: &PgPool, tenant: TenantId, wait: Wait) -> Result<u64, CoreError> {
    seal_tenant_in_batches(pool, tenant, wait, SealSettings::default().batch_size).await
}

async fn seal_tenant_in_batches(
    pool: &PgPool,
    tenant: TenantId,
    wait: Wait,
    batch: i64,
) -> Result<u64, CoreError> {
    let batch = batch.max(1);
    let mut total = 0;
    loop {
        let n = seal_batch(pool, tenant, wait, batch).await?;
        total += n;
        if n < batch as u64 {
            return Ok(total);
        }
    }
}

/// One transaction: take the head, link up to `batch` rows after it, move the head.
async fn seal_batch(
    pool: &PgPool,
    tenant: TenantId,
    wait: Wait,
    batch: i64,
) -> Result<u64, CoreError> {
    let mut tx = pool.begin().await?;
    // First statement, before this transaction has an id of its own.
    let horizon: i64 =
        sqlx::query_scalar("SELECT pg_snapshot_xmin(pg_current_snapshot())::text::bigint")
            .fetch_one(&mut *tx)
            .await?;
    sqlx::query("INSERT INTO audit_heads (tenant_id) VALUES ($1) ON CONFLICT DO NOTHING")
        .bind(tenant.0)
        .execute(&mut *tx)
        .await?;
    let lock = match wait {
        Wait::Yes => "FOR UPDATE",
        Wait::No => "FOR UPDATE SKIP LOCKED",
    };
    let head = sqlx::query(&format!(
        "SELECT seq, hash FROM audit_heads WHERE tenant_id = $1 {lock}"
    ))
    .bind(tenant.0)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(head) = head else {
        return Ok(0);
    };
    let mut seq: i64 = head.try_get("seq")?;
    let mut prev: Vec<u8> = head.try_get("hash")?;
    let pending = "tenant_id = $1 AND chain_seq IS NULL AND xid IS NOT NULL \
                   AND xid < $2::bigint::text::xid8";
    let rows = sqlx::query(&format!(
        "{RUN_EVENT_COLUMNS} FROM run_events WHERE {pending} \
         UNION ALL {AUDIT_EVENT_COLUMNS} FROM audit_events WHERE {pending} \
         ORDER BY 17, 18 LIMIT $3"
    ))
    .bind(tenant.0)
    .bind(horizon)
    .bind(batch)
    .fetch_all(&mut *tx)
    .await?;
    if rows.is_empty() {
        return Ok(0);
    }
    let mut run_links = Links::default();
    let mut audit_links = Links::default();
    for row in &rows {
        let mut link = chain_row(tenant.0, row)?;
        seq += 1;
        link.entry.chain_seq = seq;
        let hash = link.entry.hash(&prev);
        let target = if link.entry.kind == "run" {
            &mut run_links
        } else {
            &mut audit_links
        };
        target.order.push(row.try_get("audit_order")?);
        target.seq.push(seq);
        target.prev.push(std::mem::replace(&mut prev, hash.clone()));
        target.hash.push(hash);
    }
    run_links.write(&mut tx, "run_events", tenant).await?;
    audit_links.write(&mut tx, "audit_events", tenant).await?;
    sqlx::query("UPDATE audit_heads SET seq = $2, hash = $3 WHERE tenant_id = $1")
        .bind(tenant.0)
        .bind(seq)
        .bind(&prev)
        .execute(&mut *tx)
        .await?;
    tx.commit().await?;
    let n = rows.len() as u64;
    metrics::counter!(crate::observe::names::AUDIT_SEALED).increment(n);
    Ok(n)
}

/// The links computed for one table's rows, written in one statement.
#[derive(Default)]
struct Links {
    order: Vec<i64>,
    seq: Vec<i64>,
    prev: Vec<Vec<u8>>,
    hash: Vec<Vec<u8>>,
}

impl Links {
    async fn write(
        &self,
        tx: &mut sqlx::PgConnection,
        table: &str,
        tenant: TenantId,
    ) -> Result<(), CoreError> {
        if self.order.is_empty() {
            return Ok(());
        }
        let done = sqlx::query(&format!(
            "UPDATE {table} t SET chain_seq = u.c, prev_hash = u.p, hash = u.h \
             FROM unnest($2::bigint[], $3::bigint[], $4::bytea[], $5::bytea[]) AS u(o, c, p, h) \
             WHERE t.tenant_id = $1 AND t.chain_seq IS NULL AND t.xid IS NOT NULL \
               AND t.audit_order = u.o"
        ))
        .bind(tenant.0)
        .bind(&self.order)
        .bind(&self.seq)
        .bind(&self.prev)
        .bind(&self.hash)
        .execute(&mut *tx)
        .await?;
        if done.rows_affected() != self.order.len() as u64 {
            // Another writer changed the rows under the head lock: nothing is applied.
            return Err(CoreError::Corrupt(format!(
                "sealing {table}: {} of {} pending rows updated",
                done.rows_affected(),
                self.order.len()
            )));
        }
        Ok(())
    }
}

/// Runs [`seal_all`] every `interval_ms` until cancelled.
pub struct Sealer {
    pub pool: PgPool,
    pub settings: SealSettings,
}

impl Sealer {
    pub async fn run(self, cancel: CancellationToken) {
        let mut tick =
            tokio::time::interval(Duration::from_millis(self.settings.interval_ms.max(10)));
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            if let Err(e) = seal_all(&self.pool, self.settings.batch_size).await {
                tracing::warn!(error = %e, "audit sealer: will retry");
            }
        }
    }
}

/// Seals every tenant's pending rows, `batch` rows per transaction; returns how many it linked.
pub async fn seal_all(pool: &PgPool, batch: i64) -> Result<u64, CoreError> {
    let tenants: Vec<Uuid> = sqlx::query_scalar(
        "SELECT tenant_id FROM run_events WHERE chain_seq IS NULL AND xid IS NOT NULL \
         UNION SELECT tenant_id FROM audit_events WHERE chain_seq IS NULL AND xid IS NOT NULL",
    )
    .fetch_all(pool)
    .await?;
    let mut sealed = 0;
    for tenant in tenants {
        sealed += seal_tenant_in_batches(pool, TenantId(tenant), Wait::No, batch).await?;
    }
    Ok(sealed)
}
