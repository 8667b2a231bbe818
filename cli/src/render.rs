//! How runs and events are shown: a few readable lines for people, JSON for machines; plus the
//! small pieces every table shares (times, ages, column alignment).

use drover_core::convert::state_from_proto;
use drover_proto::v1 as pb;
use serde_json::{Value, json};

pub fn state_name(v: i32) -> String {
    state_from_proto(v)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|| "UNSPECIFIED".into())
}

/// `WAIT_CODE_NO_LIVE_AGENT` as `NO_LIVE_AGENT`.
pub fn wait_code_name(v: i32) -> String {
    pb::WaitCode::try_from(v)
        .map(|c| c.as_str_name().trim_start_matches("WAIT_CODE_").to_owned())
        .unwrap_or_else(|_| "UNSPECIFIED".into())
}

pub fn time(t: &Option<prost_types::Timestamp>) -> Option<chrono::DateTime<chrono::Utc>> {
    t.as_ref().and_then(|t| {
        chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
    })
}

/// RFC 3339, or JSON null.
pub fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    time(t)
        .map(|d| Value::String(d.to_rfc3339()))
        .unwrap_or(Value::Null)
}

/// A time for a table cell, UTC to the second: `2025-06-01T12:00:03Z`; `-` when unset.
pub fn when(t: &Option<prost_types::Timestamp>) -> String {
    time(t)
        .map(|d| d.format("%Y-%m-%dT%H:%M:%SZ").to_string())
        .unwrap_or_else(|| "-".into())
}

/// How long ago (or, for a future time, how long until): `3s ago`, `in 2m`; `-` when unset.
pub fn age(t: &Option<prost_types::Timestamp>) -> String {
    let Some(t) = time(t) else {
        return "-".into();
    };
    let secs = (chrono::Utc::now() - t).num_seconds();
    let span = |s: i64| match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m", s / 60),
        3600..86400 => format!("{}h", s / 3600),
        _ => format!("{}d", s / 86400),
    };
    if secs >= 0 {
        format!("{} ago", span(secs))
    } else {
        format!("in {}", span(-secs))
    }
}

pub fn yes_no(b: bool) -> &'static str {
    if b { "yes" } else { "no" }
}

/// Left-aligned columns two spaces apart, widths from the widest cell; the last column is
/// not padded.
pub fn table(headers: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = headers.iter().map(|h| h.chars().count()).collect();
    for row in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    let header: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
    for row in std::iter::once(&header).chain(rows) {
        let last = row.len().saturating_sub(1);
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            if i == last {
                line.push_str(cell);
            } else {
                let pad = widths[i].saturating_sub(cell.chars().count()) + 2;
                line.push_str(cell);
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Attempts allowed: the run's own count (raised by redrives), else the spec's.
pub fn max_attempts(r: &pb::Run) -> u32 {
    if r.max_attempts > 0 {
        r.max_attempts
    } else {
        r.spec.as_ref().map_or(1, |s| s.max_attempts.max(1))
    }
}

pub fn run_json(r: &pb::Run) -> Value {
    let spec = r.spec.clone().unwrap_or_default();
    let retry = spec.retry.clone().unwrap_or_default();
    json!({
        "id": r.id,
        "state": state_name(r.state),
        "attempt": r.attempt,
        "max_attempts": max_attempts(r),
        "lease_epoch": r.lease_epoch,
        "agent_id": r.agent_id,
        "exit_code": r.exit_code,
        "reason": r.reason,
        "executor": r.executor,
        "cancel_requested": r.cancel_requested,
        "wait": r.wait.as_ref().map(|w| json!({
            "code": wait_code_name(w.code),
            "message": w.message,
            "until": ts(&w.until),
        })),
        "output": String::from_utf8_lossy(&r.output),
        "output_truncated": r.output_truncated,
        "idempotency_key": r.idempotency_key,
        "spec": {
            "image": spec.image,
            "command": spec.command,
            "env": spec.env,
            "pool": spec.pool,
            "timeout_seconds": spec.timeout_seconds,
            "max_attempts": spec.max_attempts,
            "network": spec.network,
            "labels": spec.labels,
            "metadata": spec.metadata,
            "retry": {
                "initial_backoff_ms": retry.initial_backoff_ms,
                "multiplier": retry.multiplier,
                "max_backoff_ms": retry.max_backoff_ms,
                "jitter": retry.jitter,
                "retry_exit_codes": retry.retry_exit_codes,
                "retry_any_exit_code": retry.retry_any_exit_code,
            },
            "queue_timeout_seconds": spec.queue_timeout_seconds,
            "cancel_grace_seconds": spec.cancel_grace_seconds,
        },
        "created_at": ts(&r.created_at),
        "updated_at": ts(&r.updated_at),
        "started_at": ts(&r.started_at),
        "finished_at": ts(&r.finished_at),
    })
}

pub fn run_text(r: &pb::Run) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let mut out = format!("run       {}\nstate     {}\n", r.id, state_name(r.state));
    if let Some(w) = &r.wait {
        out.push_str(&format!("waiting: {}\n", w.message));
        if w.until.is_some() {
            out.push_str(&format!(
                "until     {} ({})\n",
                when(&w.until),
                age(&w.until)
            ));
        }
    }
    if r.cancel_requested {
        out.push_str("cancel requested\n");
    }
    out.push_str(&format!(
        "image     {}\ncommand   {:?}\nattempt   {} of {}\n",
        spec.image,
        spec.command,
        r.attempt,
        max_attempts(r)
    ));
    if !r.agent_id.is_empty() {
        out.push_str(&format!(
            "agent     {} (epoch {})\n",
            r.agent_id, r.lease_epoch
        ));
    }
    if let Some(code) = r.exit_code {
        out.push_str(&format!("exit code {code}\n"));
    }
    if !r.reason.is_empty() {
        out.push_str(&format!("reason    {}\n", r.reason));
    }
    if !r.output.is_empty() {
        let note = if r.output_truncated {
            " (last 64 KiB)"
        } else {
            ""
        };
        out.push_str(&format!(
            "output{note}:\n{}",
            String::from_utf8_lossy(&r.output)
        ));
        if !r.output.ends_with(b"\n") {
            out.push('\n');
        }
    }
    out
}

pub fn event_line(e: &pb::RunEvent) -> String {
    let from = if e.from_state == 0 {
        "-".to_owned()
    } else {
        state_name(e.from_state)
    };
    format!(
        "#{:<3} {} -> {}  attempt {} epoch {}  {}",
        e.seq,
        from,
        state_name(e.to_state),
        e.attempt,
        e.lease_epoch,
        e.reason
    )
}

/// `run ID STATE (exit code N)`: how a waited-for run ended.
pub fn outcome_line(run: &pb::Run) -> String {
    format!(
        "run {} {}{}",
        run.id,
        state_name(run.state),
        run.exit_code
            .map(|c| format!(" (exit code {c})"))
            .unwrap_or_default()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table_aligns_columns_and_leaves_the_last_unpadded() {
        let t = table(
            &["ID", "STATE", "REASON"],
            &[
                vec!["a".into(), "QUEUED".into(), "x".into()],
                vec!["longer".into(), "-".into(), "".into()],
            ],
        );
        assert_eq!(t, "ID      STATE   REASON\na       QUEUED  x\nlonger  -\n");
    }

    #[test]
    fn waiting_run_says_why_and_counts_attempts() {
        let run = pb::Run {
            id: "r".into(),
            state: pb::RunState::Queued.into(),
            attempt: 1,
            max_attempts: 3,
            cancel_requested: true,
            wait: Some(pb::WaitReason {
                code: pb::WaitCode::NoLiveAgent.into(),
                message: "no live agent in pool default".into(),
                until: None,
            }),
            ..Default::default()
        };
        let text = run_text(&run);
        assert!(
            text.contains("waiting: no live agent in pool default\n"),
            "{text}"
        );
        assert!(text.contains("attempt   1 of 3\n"), "{text}");
        assert!(text.contains("cancel requested\n"), "{text}");
        assert!(!text.contains("until"), "{text}");
        let v = run_json(&run);
        assert_eq!(v["wait"]["code"], "NO_LIVE_AGENT");
        assert_eq!(v["max_attempts"], 3);
        assert_eq!(v["cancel_requested"], true);
    }

    #[test]
    fn a_retry_backoff_says_until_when() {
        let until = chrono::Utc::now() + chrono::Duration::seconds(90);
        let run = pb::Run {
            state: pb::RunState::Queued.into(),
            attempt: 2,
            max_attempts: 3,
            wait: Some(pb::WaitReason {
                code: pb::WaitCode::RetryBackoff.into(),
                message: "attempt 2 waits for its retry backoff".into(),
                until: Some(prost_types::Timestamp {
                    seconds: until.timestamp(),
                    nanos: 0,
                }),
            }),
            ..Default::default()
        };
        let text = run_text(&run);
        let line = format!("until     {} (in 1m)\n", until.format("%Y-%m-%dT%H:%M:%SZ"));
        assert!(text.contains(&line), "{text}");
        assert!(text.contains("attempt   2 of 3\n"), "{text}");
        assert_eq!(run_json(&run)["wait"]["code"], "RETRY_BACKOFF");
    }
}
