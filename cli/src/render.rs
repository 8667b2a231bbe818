//! How runs and events are shown: a few readable lines for people, JSON for machines.

use drover_core::convert::state_from_proto;
use drover_proto::v1 as pb;
use serde_json::{Value, json};

pub fn state_name(v: i32) -> String {
    state_from_proto(v)
        .map(|s| s.as_str().to_owned())
        .unwrap_or_else(|| "UNSPECIFIED".into())
}

fn ts(t: &Option<prost_types::Timestamp>) -> Value {
    match t {
        Some(t) => chrono::DateTime::from_timestamp(t.seconds, u32::try_from(t.nanos).unwrap_or(0))
            .map(|d| Value::String(d.to_rfc3339()))
            .unwrap_or(Value::Null),
        None => Value::Null,
    }
}

pub fn run_json(r: &pb::Run) -> Value {
    let spec = r.spec.clone().unwrap_or_default();
    json!({
        "id": r.id,
        "state": state_name(r.state),
        "attempt": r.attempt,
        "lease_epoch": r.lease_epoch,
        "agent_id": r.agent_id,
        "exit_code": r.exit_code,
        "reason": r.reason,
        "executor": r.executor,
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
        },
        "created_at": ts(&r.created_at),
        "started_at": ts(&r.started_at),
        "finished_at": ts(&r.finished_at),
    })
}

pub fn run_text(r: &pb::Run) -> String {
    let spec = r.spec.clone().unwrap_or_default();
    let mut out = format!(
        "run       {}\nstate     {}\nimage     {}\ncommand   {:?}\nattempt   {}\n",
        r.id,
        state_name(r.state),
        spec.image,
        spec.command,
        r.attempt
    );
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
