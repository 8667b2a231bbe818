//! The tamper-evident audit chain. Every run event and every audit event (tokens, secrets,
//! cancels, tenant policy) of a tenant takes the next `chain_seq` of that tenant and stores
//! `hash = SHA-256(prev_hash || canonical(row))`. Editing a row changes its hash; deleting one
//! leaves a gap; reordering rows breaks the link to the previous hash. [`verify`] walks the
//! chain and names the first broken link.
//!
//! The canonical encoding is a fixed field order, each field length-prefixed (u32 big-endian,
//! `u32::MAX` for NULL), timestamps as microseconds since the epoch: no JSON, no locale, no
//! float, so the same row always hashes the same on any host.
//!
//! Appending locks the tenant's row in `audit_heads` until the transaction commits, so one
//! tenant's transitions serialise on that row (per tenant, not globally). The limit of the
//! scheme: someone able to rewrite every row from the break onward, and the head, can forge a
//! consistent chain; `drover audit verify` prints the head hash so it can be recorded
//! elsewhere and compared later.

use chrono::{DateTime, SubsecRound, Utc};
use futures::TryStreamExt;
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::error::CoreError;
use crate::ids::TenantId;

const DOMAIN: &[u8] = b"drover-audit-v1";

/// One link's content, in canonical field order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    pub tenant: Uuid,
    pub chain_seq: i64,
    /// `run` for run_events rows, else the audit event kind (`token.create`, …).
    pub kind: String,
    pub actor: String,
    pub at: DateTime<Utc>,
    /// The kind's own fields, in a fixed order.
    pub fields: Vec<Option<String>>,
}

impl Entry {
    fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(256);
        out.extend_from_slice(DOMAIN);
        field(&mut out, Some(self.tenant.as_bytes()));
        out.extend_from_slice(&self.chain_seq.to_be_bytes());
        field(&mut out, Some(self.kind.as_bytes()));
        field(&mut out, Some(self.actor.as_bytes()));
        out.extend_from_slice(&self.at.timestamp_micros().to_be_bytes());
        out.extend_from_slice(&(self.fields.len() as u32).to_be_bytes());
        for f in &self.fields {
            field(&mut out, f.as_deref().map(str::as_bytes));
        }
        out
    }

    /// SHA-256 over the previous hash and this entry.
    pub fn hash(&self, prev: &[u8]) -> Vec<u8> {
        let mut h = Sha256::new();
        field_digest(&mut h, prev);
        h.update(self.encode());
        h.finalize().to_vec()
    }
}

fn field(out: &mut Vec<u8>, value: Option<&[u8]>) {
    match value {
        Some(v) => {
            out.extend_from_slice(&(v.len() as u32).to_be_bytes());
            out.extend_from_slice(v);
        }
        None => out.extend_from_slice(&u32::MAX.to_be_bytes()),
    }
}

fn field_digest(h: &mut Sha256, v: &[u8]) {
    h.update((v.len() as u32).to_be_bytes());
    h.update(v);
}

/// A timestamp as stored: Postgres keeps microseconds, so hash exactly what it will return.
pub fn now() -> DateTime<Utc> {
    Utc::now().trunc_subsecs(6)
}

/// The next link of `tenant`'s chain: locks the head until the caller's transaction ends.
#[derive(Debug)]
pub struct Link {
    pub chain_seq: i64,
    pub prev_hash: Vec<u8>,
    pub hash: Vec<u8>,
}

/// Takes the tenant's chain lock early (the next [`append`] in the transaction would take
/// it anyway), for callers that must decide something under it (the queued-runs quota).
pub async fn lock_chain(conn: &mut PgConnection, tenant: TenantId) -> Result<(), CoreError> {
    sqlx::query(
        "INSERT INTO audit_heads (tenant_id) VALUES ($1) ON CONFLICT (tenant_id) \
         DO UPDATE SET seq = audit_heads.seq",
    )
    .bind(tenant.0)
    .execute(conn)
    .await?;
    Ok(())
}

/// Reserves the next chain position for `entry` (whose `chain_seq` is filled in here) and
/// advances the tenant's head. The caller inserts the row with the returned link in the same
/// transaction.
pub async fn append(conn: &mut PgConnection, entry: &mut Entry) -> Result<Link, CoreError> {
    let row = sqlx::query(
        "INSERT INTO audit_heads (tenant_id) VALUES ($1) ON CONFLICT (tenant_id) \
         DO UPDATE SET seq = audit_heads.seq RETURNING seq, hash",
    )
    .bind(entry.tenant)
    .fetch_one(&mut *conn)
    .await?;
    let seq: i64 = row.try_get("seq")?;
    let prev_hash: Vec<u8> = row.try_get("hash")?;
    entry.chain_seq = seq + 1;
    let hash = entry.hash(&prev_hash);
    sqlx::query("UPDATE audit_heads SET seq = $2, hash = $3 WHERE tenant_id = $1")
        .bind(entry.tenant)
        .bind(entry.chain_seq)
        .bind(&hash)
        .execute(&mut *conn)
        .await?;
    Ok(Link {
        chain_seq: entry.chain_seq,
        prev_hash,
        hash,
    })
}

/// Appends a non-transition audit event (token, secret, policy, cancel request).
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: &str,
    actor: &str,
    subject: &str,
    detail: &str,
) -> Result<(), CoreError> {
    let mut entry = Entry {
        tenant: tenant.0,
        chain_seq: 0,
        kind: kind.to_owned(),
        actor: actor.to_owned(),
        at: now(),
        fields: vec![Some(subject.to_owned()), Some(detail.to_owned())],
    };
    let link = append(conn, &mut entry).await?;
    sqlx::query(
        "INSERT INTO audit_events (tenant_id, chain_seq, kind, actor, subject, detail, at, \
         prev_hash, hash) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
    )
    .bind(tenant.0)
    .bind(link.chain_seq)
    .bind(kind)
    .bind(actor)
    .bind(subject)
    .bind(detail)
    .bind(entry.at)
    .bind(&link.prev_hash)
    .bind(&link.hash)
    .execute(conn)
    .await?;
    Ok(())
}

/// The canonical fields of a run event, shared by the writer and [`verify`].
#[allow(clippy::too_many_arguments, reason = "one argument per hashed column")]
pub fn run_event_fields(
    run_id: Uuid,
    seq: i32,
    from: Option<&str>,
    to: &str,
    attempt: i32,
    epoch: i64,
    agent: Option<&str>,
    reason: Option<&str>,
) -> Vec<Option<String>> {
    vec![
        Some(run_id.to_string()),
        Some(seq.to_string()),
        from.map(str::to_owned),
        Some(to.to_owned()),
        Some(attempt.to_string()),
        Some(epoch.to_string()),
        agent.map(str::to_owned),
        reason.map(str::to_owned),
    ]
}

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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BrokenLink {
    pub chain_seq: i64,
    /// Where the row lives: `run_events run=<id> seq=<n>` or `audit_events <kind>`.
    pub location: String,
    pub problem: String,
}

/// Recomputes `tenant`'s chain from the first link and reports the first broken one.
pub async fn verify(pool: &PgPool, tenant: TenantId) -> Result<Verdict, CoreError> {
    let head = sqlx::query("SELECT seq, hash FROM audit_heads WHERE tenant_id = $1")
        .bind(tenant.0)
        .fetch_optional(pool)
        .await?;
    let (head_seq, head_hash): (i64, Vec<u8>) = match head {
        Some(r) => (r.try_get("seq")?, r.try_get("hash")?),
        None => (0, Vec::new()),
    };
    let mut rows = sqlx::query(
        "SELECT chain_seq, 'run' AS kind, actor, at, prev_hash, hash, run_id::text AS run_id, seq, \
           from_state, to_state, attempt, lease_epoch, agent_id, reason, NULL AS subject, \
           NULL AS detail \
         FROM run_events WHERE tenant_id = $1 AND chain_seq IS NOT NULL \
         UNION ALL \
         SELECT chain_seq, kind, actor, at, prev_hash, hash, NULL, NULL, NULL, NULL, NULL, NULL, \
           NULL, NULL, subject, detail \
         FROM audit_events WHERE tenant_id = $1 \
         ORDER BY chain_seq",
    )
    .bind(tenant.0)
    .fetch(pool);
    let mut prev: Vec<u8> = Vec::new();
    let mut expected = 1i64;
    let mut broken = None;
    let mut checked = 0i64;
    while let Some(row) = rows.try_next().await? {
        let seq: i64 = row.try_get("chain_seq")?;
        let kind: String = row.try_get("kind")?;
        let stored_prev: Option<Vec<u8>> = row.try_get("prev_hash")?;
        let stored: Option<Vec<u8>> = row.try_get("hash")?;
        let (location, fields) = if kind == "run" {
            let run: String = row.try_get("run_id")?;
            let ev_seq: i32 = row.try_get("seq")?;
            let run_uuid = Uuid::parse_str(&run).map_err(|e| CoreError::Corrupt(e.to_string()))?;
            let from: Option<String> = row.try_get("from_state")?;
            let to: String = row.try_get("to_state")?;
            let agent: Option<String> = row.try_get("agent_id")?;
            let reason: Option<String> = row.try_get("reason")?;
            (
                format!("run_events run={run} seq={ev_seq}"),
                run_event_fields(
                    run_uuid,
                    ev_seq,
                    from.as_deref(),
                    &to,
                    row.try_get("attempt")?,
                    row.try_get("lease_epoch")?,
                    agent.as_deref(),
                    reason.as_deref(),
                ),
            )
        } else {
            let subject: String = row.try_get("subject")?;
            (
                format!("audit_events {kind} {subject}"),
                vec![Some(subject), row.try_get("detail")?],
            )
        };
        let entry = Entry {
            tenant: tenant.0,
            chain_seq: seq,
            actor: row
                .try_get::<Option<String>, _>("actor")?
                .unwrap_or_default(),
            kind,
            at: row.try_get("at")?,
            fields,
        };
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
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(actor: &str) -> Entry {
        Entry {
            tenant: Uuid::from_u128(7),
            chain_seq: 3,
            kind: "run".into(),
            actor: actor.into(),
            at: DateTime::from_timestamp_micros(1_700_000_000_123_456).expect("valid"),
            fields: vec![Some("a".into()), None, Some(String::new())],
        }
    }

    #[test]
    fn a_changed_field_or_link_changes_the_hash() {
        let base = entry("token:x").hash(b"prev");
        assert_eq!(base, entry("token:x").hash(b"prev"), "deterministic");
        assert_ne!(base, entry("token:y").hash(b"prev"));
        assert_ne!(base, entry("token:x").hash(b"prex"));
        let mut moved = entry("token:x");
        moved.chain_seq = 4;
        assert_ne!(base, moved.hash(b"prev"));
    }

    #[test]
    fn null_and_empty_and_shifted_boundaries_differ() {
        let mut a = entry("x");
        a.fields = vec![None];
        let mut b = entry("x");
        b.fields = vec![Some(String::new())];
        assert_ne!(a.hash(b""), b.hash(b""));
        let mut c = entry("x");
        c.fields = vec![Some("ab".into()), Some("c".into())];
        let mut d = entry("x");
        d.fields = vec![Some("a".into()), Some("bc".into())];
        assert_ne!(c.hash(b""), d.hash(b""));
    }
}
