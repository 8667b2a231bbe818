//! Walking a tenant's chain and naming its first broken link.

use futures::TryStreamExt;
use sqlx::{PgPool, Row};

use super::links::{AUDIT_EVENT_COLUMNS, ChainRow, RUN_EVENT_COLUMNS, chain_row};
use crate::error::CoreError;
use crate::ids::TenantId;

/// What [`verify`] found for one tenant.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Verdict {
    pub tenant: TenantId,
    /// Links checked.
    pub checked: i64,
    /// The head's position and hash (hex), to record elsewhere.
    pub head_seq: i64,
    pub head_hash: String,
    pub broken: Option<BrokenLink>,
    /// Rows not linked yet because their transactions were still running.
    pub unsealed: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub chain_seq: i64,
    /// Where the row lives: `run_events run=<id> seq=<n>` or `audit_events <kind>`.
    pub location: String,
    pub problem: String,
}

/// Seals what can be sealed of `tenant`'s chain (waiting for a sealer already at work), then
/// recomputes the chain from its first link, in one snapshot, and reports the first broken
/// link. Rows whose transactions are still running cannot be sealed yet and are counted in
/// [`Verdict::unsealed`].
pub async fn verify(pool: &PgPool, tenant: TenantId) -> Result<Verdict, CoreError> {
    super::seal_tenant(pool, tenant, super::Wait::Yes).await?;
    // One snapshot for the head and the rows: a seal committing in between must not look like
    // a chain running past its head.
    let mut tx = pool.begin().await?;
    sqlx::query("SET TRANSACTION ISOLATION LEVEL REPEATABLE READ READ ONLY")
        .execute(&mut *tx)
        .await?;
    let head = sqlx::query("SELECT seq, hash FROM audit_heads WHERE tenant_id = $1")
        .bind(tenant.0)
        .fetch_optional(&mut *tx)
        .await?;
    let (head_seq, head_hash): (i64, Vec<u8>) = match head {
        Some(r) => (r.try_get("seq")?, r.try_get("hash")?),
        None => (0, Vec::new()),
    };
    let unsealed: i64 = sqlx::query_scalar(
        "SELECT (SELECT count(*) FROM run_events WHERE tenant_id = $1 AND chain_seq IS NULL \
           AND xid IS NOT NULL) \
         + (SELECT count(*) FROM audit_events WHERE tenant_id = $1 AND chain_seq IS NULL \
           AND xid IS NOT NULL)",
    )
    .bind(tenant.0)
    .fetch_one(&mut *tx)
    .await?;
    let sql = format!(
        "{RUN_EVENT_COLUMNS} FROM run_events WHERE tenant_id = $1 AND chain_seq IS NOT NULL \
         UNION ALL {AUDIT_EVENT_COLUMNS} FROM audit_events WHERE tenant_id = $1 \
           AND chain_seq IS NOT NULL \
         ORDER BY chain_seq"
    );
    let mut rows = sqlx::query(&sql).bind(tenant.0).fetch(&mut *tx);
    let mut prev: Vec<u8> = Vec::new();
    let mut expected = 1i64;
    let mut broken = None;
    let mut checked = 0i64;
    while let Some(row) = rows.try_next().await? {
        let seq: i64 = row.try_get("chain_seq")?;
        let stored_prev: Option<Vec<u8>> = row.try_get("prev_hash")?;
        let stored: Option<Vec<u8>> = row.try_get("hash")?;
        let ChainRow { location, entry } = chain_row(tenant.0, &row)?;
        let problem = if seq != expected {
            Some(if seq > expected {
                format!("links {expected}..{} are missing (deleted?)", seq - 1)
            } else {
                format!("link {seq} appears twice")
            })
        } else if stored_prev.as_deref() != Some(prev.as_slice()) {
            Some("does not point at the previous link (reordered or edited)".to_owned())
        } else if stored.as_deref() != Some(entry.hash(&prev).as_slice()) {
            Some("content does not match its hash (edited)".to_owned())
        } else {
            None
        };
        if let Some(problem) = problem {
            broken = Some(BrokenLink {
                chain_seq: seq,
                location,
                problem,
            });
            break;
        }
        prev = stored.unwrap_or_default();
        expected += 1;
        checked += 1;
    }
    drop(rows);
    tx.rollback().await?;
    if broken.is_none() && (expected - 1 != head_seq || prev != head_hash) {
        broken = Some(BrokenLink {
            chain_seq: expected,
            location: "audit_heads".to_owned(),
            problem: format!(
                "the chain ends at link {} but its head is at link {head_seq} (tail deleted?)",
                expected - 1
            ),
        });
    }
    Ok(Verdict {
        tenant,
        checked,
        head_seq,
        head_hash: hex::encode(&head_hash),
        broken,
        unsealed,
    })
}
