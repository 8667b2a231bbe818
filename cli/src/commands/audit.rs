//! `drover audit verify [--json]`: recompute the caller's tenant's audit chain on the server
//! and name the first broken link. Exit code 1 when the chain is broken.

use drover_core::audit::Verdict;
use drover_proto::v1 as pb;
use serde_json::json;

use crate::client::{self, AdminClient, Subject};

/// The figures both `drover audit verify` and `drover admin audit-verify` print.
#[derive(Debug)]
pub struct Shown {
    pub ok: bool,
    pub checked: u64,
    pub head_seq: u64,
    pub head_hash: String,
    pub broken: Option<(u64, String, String)>,
}

impl From<Verdict> for Shown {
    fn from(v: Verdict) -> Self {
        Shown {
            ok: v.broken.is_none(),
            checked: u64::try_from(v.checked).unwrap_or(0),
            head_seq: u64::try_from(v.head_seq).unwrap_or(0),
            head_hash: v.head_hash,
            broken: v.broken.map(|b| {
                (
                    u64::try_from(b.chain_seq).unwrap_or(0),
                    b.location,
                    b.problem,
                )
            }),
        }
    }
}

impl From<pb::VerifyAuditResponse> for Shown {
    fn from(r: pb::VerifyAuditResponse) -> Self {
        Shown {
            ok: r.ok,
            checked: r.checked,
            head_seq: r.head_seq,
            head_hash: r.head_hash,
            broken: (!r.ok).then_some((r.broken_seq, r.broken_location, r.broken_problem)),
        }
    }
}

pub fn verdict_line(tenant: &str, s: &Shown) -> String {
    match &s.broken {
        None => format!(
            "audit chain of {tenant}: ok, {} links verified, head {} {}",
            s.checked, s.head_seq, s.head_hash
        ),
        Some((seq, location, problem)) => format!(
            "audit chain of {tenant}: BROKEN at link {seq} ({location}): {problem}; {} links \
             before it verified",
            s.checked
        ),
    }
}

pub async fn verify(admin: &mut AdminClient, as_json: bool) -> anyhow::Result<bool> {
    let resp = admin
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .map_err(|s| client::failed("cannot verify the audit chain", Subject::Other, &s))?
        .into_inner();
    let shown = Shown::from(resp);
    if as_json {
        let (seq, location, problem) = shown.broken.clone().unwrap_or_default();
        println!(
            "{}",
            json!({
                "ok": shown.ok,
                "checked": shown.checked,
                "head_seq": shown.head_seq,
                "head_hash": shown.head_hash,
                "broken_seq": seq,
                "broken_location": location,
                "broken_problem": problem,
            })
        );
    } else {
        println!("{}", verdict_line("this tenant", &shown));
    }
    Ok(shown.ok)
}
