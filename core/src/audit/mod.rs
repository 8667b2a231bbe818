//! The tamper-evident audit chain. Every run event and every audit event (tokens, secrets,
//! cancels, tenant policy) of a tenant gets the next `chain_seq` of that tenant and stores
//! `hash = SHA-256(prev_hash || canonical(row))`. Editing a row changes its hash; deleting one
//! leaves a gap; reordering rows breaks the link to the previous hash. [`verify()`] walks the
//! chain and names the first broken link.
//!
//! The canonical encoding is a fixed field order, each field length-prefixed (u32 big-endian,
//! `u32::MAX` for NULL), timestamps as microseconds since the epoch: no JSON, no locale, no
//! float, so the same row always hashes the same on any host.
//!
//! Writers do not link: they insert their rows unchained ([`record`], the run repository's
//! event insert), so a transition holds no tenant-wide lock and one tenant's transitions
//! commit in parallel. The `seal`er links rows shortly after they commit, in transaction-id
//! order, and only rows whose transaction id is below the oldest running one: no transaction
//! still running can add a row that sorts before them, so the order it fixes never changes.
//! Until it is sealed (a fraction of a second under normal running) a row is not yet
//! protected; [`verify()`] seals what it can first. The limit of the scheme: someone able to
//! rewrite every row from the break onward, and the head, can forge a consistent chain;
//! `drover audit verify` prints the head hash so it can be recorded elsewhere and compared
//! later.

mod links;
mod seal;
mod verify;

pub use seal::{SealSettings, Sealer, Wait, seal_all, seal_tenant};
pub use verify::{BrokenLink, Verdict, verify};

use chrono::{DateTime, SubsecRound, Utc};
use sha2::{Digest, Sha256};
use sqlx::PgConnection;
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

/// Appends a non-transition audit event (token, secret, policy, cancel request), unchained:
/// the `seal`er links it after the caller's transaction has committed.
pub async fn record(
    conn: &mut PgConnection,
    tenant: TenantId,
    kind: &str,
    actor: &str,
    subject: &str,
    detail: &str,
) -> Result<(), CoreError> {
    sqlx::query(
        "INSERT INTO audit_events (tenant_id, kind, actor, subject, detail, at) \
         VALUES ($1, $2, $3, $4, $5, $6)",
    )
    .bind(tenant.0)
    .bind(kind)
    .bind(actor)
    .bind(subject)
    .bind(detail)
    .bind(now())
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
