//! Conversions between the wire contract (`drover-proto`) and the domain types. The proto crate
//! holds only generated code, so the mapping lives here, once.

use chrono::{DateTime, Utc};
use drover_proto::v1 as pb;

use crate::inputs::{InputFile, MockBehavior};
use crate::repo::agents::AgentRecord;
use crate::repo::dead_letters::DeadLetterRecord;
use crate::repo::secrets::SecretInfo;
use crate::repo::waiting::{WaitCode, WaitReason};
use crate::repo::{EventRecord, RunRecord};
use crate::retry::RawRetryPolicy;
use crate::spec::{RawSpec, RunSpec};
use crate::state::RunState;

pub fn state_to_proto(s: RunState) -> pb::RunState {
    match s {
        RunState::PendingApproval => pb::RunState::PendingApproval,
        RunState::Queued => pb::RunState::Queued,
        RunState::Assigned => pb::RunState::Assigned,
        RunState::Running => pb::RunState::Running,
        RunState::Succeeded => pb::RunState::Succeeded,
        RunState::Failed => pb::RunState::Failed,
        RunState::Cancelled => pb::RunState::Cancelled,
        RunState::TimedOut => pb::RunState::TimedOut,
        RunState::Rejected => pb::RunState::Rejected,
        RunState::DeadLettered => pb::RunState::DeadLettered,
    }
}

/// `None` for UNSPECIFIED or a number this build does not know.
pub fn state_from_proto(v: i32) -> Option<RunState> {
    Some(match pb::RunState::try_from(v).ok()? {
        pb::RunState::Unspecified => return None,
        pb::RunState::PendingApproval => RunState::PendingApproval,
        pb::RunState::Queued => RunState::Queued,
        pb::RunState::Assigned => RunState::Assigned,
        pb::RunState::Running => RunState::Running,
        pb::RunState::Succeeded => RunState::Succeeded,
        pb::RunState::Failed => RunState::Failed,
        pb::RunState::Cancelled => RunState::Cancelled,
        pb::RunState::TimedOut => RunState::TimedOut,
        pb::RunState::Rejected => RunState::Rejected,
        pb::RunState::DeadLettered => RunState::DeadLettered,
    })
}

pub fn raw_spec_from_proto(spec: pb::RunSpec) -> RawSpec {
    let res = spec.resources.unwrap_or_default();
    RawSpec {
        image: spec.image,
        command: spec.command,
        env: spec.env.into_iter().collect(),
        cpus: res.cpus,
        memory_bytes: res.memory_bytes,
        pids: res.pids,
        timeout_secs: spec.timeout_seconds,
        pool: spec.pool,
        priority: spec.priority,
        max_attempts: spec.max_attempts,
        labels: spec.labels.into_iter().collect(),
        network: spec.network,
        metadata: spec.metadata.into_iter().collect(),
        retry: spec
            .retry
            .map(|r| RawRetryPolicy {
                initial_backoff_ms: r.initial_backoff_ms,
                multiplier: r.multiplier,
                max_backoff_ms: r.max_backoff_ms,
                jitter: r.jitter,
                retry_exit_codes: r.retry_exit_codes,
                retry_any_exit_code: r.retry_any_exit_code,
            })
            .unwrap_or_default(),
        queue_timeout_secs: spec.queue_timeout_seconds,
        cancel_grace_secs: spec.cancel_grace_seconds,
        secrets: spec.secrets,
        host_env: spec.host_env,
        inputs_from_run: spec.inputs_from_run,
        outputs: spec.outputs,
        executor: spec.executor,
        mock: spec.mock.map(|m| MockBehavior {
            duration_ms: m.duration_ms,
            exit_code: m.exit_code,
            stdout: m.stdout,
            stderr: m.stderr,
            files: m
                .files
                .into_iter()
                .map(|f| InputFile {
                    path: f.path,
                    content: f.content,
                    mode: 0,
                })
                .collect(),
        }),
        writable_rootfs: spec.writable_rootfs,
        image_pull_policy: spec.image_pull_policy,
        inputs: spec
            .inputs
            .into_iter()
            .map(|f| InputFile {
                path: f.path,
                content: f.content,
                mode: f.mode,
            })
            .collect(),
        requires_approval: spec.requires_approval,
        approval_timeout_secs: spec.approval_timeout_seconds,
    }
}

pub fn spec_to_proto(spec: &RunSpec) -> pb::RunSpec {
    pb::RunSpec {
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: spec.env.clone().into_iter().collect(),
        resources: Some(pb::Resources {
            cpus: spec.resources.cpus,
            memory_bytes: spec.resources.memory_bytes,
            pids: spec.resources.pids,
        }),
        timeout_seconds: spec.timeout_secs,
        pool: spec.pool.clone(),
        priority: spec.priority,
        max_attempts: spec.max_attempts,
        labels: spec.labels.clone().into_iter().collect(),
        network: spec.network.as_str().to_owned(),
        metadata: spec.metadata.clone().into_iter().collect(),
        retry: Some(pb::RetryPolicy {
            initial_backoff_ms: spec.retry.initial_backoff_ms,
            multiplier: spec.retry.multiplier,
            max_backoff_ms: spec.retry.max_backoff_ms,
            jitter: spec.retry.jitter,
            retry_exit_codes: spec.retry.retry_exit_codes.clone(),
            retry_any_exit_code: spec.retry.retry_any_exit_code,
        }),
        queue_timeout_seconds: spec.queue_timeout_secs,
        cancel_grace_seconds: spec.cancel_grace_secs,
        secrets: spec.secrets.clone(),
        host_env: spec.host_env.clone(),
        inputs_from_run: spec
            .inputs_from_run
            .map(|u| u.to_string())
            .unwrap_or_default(),
        outputs: spec.outputs.clone(),
        executor: spec
            .executor
            .map(|e| e.as_str().to_owned())
            .unwrap_or_default(),
        mock: spec.mock.as_ref().map(|m| pb::MockBehavior {
            duration_ms: m.duration_ms,
            exit_code: m.exit_code,
            stdout: m.stdout.clone(),
            stderr: m.stderr.clone(),
            files: m
                .files
                .iter()
                .map(|f| pb::MockFile {
                    path: f.path.clone(),
                    content: f.content.clone(),
                })
                .collect(),
        }),
        writable_rootfs: spec.writable_rootfs,
        image_pull_policy: spec.image_pull_policy.as_str().to_owned(),
        inputs: spec
            .inputs
            .iter()
            .map(|f| pb::InputFile {
                path: f.path.clone(),
                content: f.content.clone(),
                mode: f.mode,
            })
            .collect(),
        requires_approval: spec.requires_approval,
        approval_timeout_seconds: spec.approval_timeout_secs,
    }
}

pub fn wait_to_proto(w: &WaitReason) -> pb::WaitReason {
    let code = match w.code {
        WaitCode::Dispatching => pb::WaitCode::Dispatching,
        WaitCode::NoLiveAgent => pb::WaitCode::NoLiveAgent,
        WaitCode::NoMatchingAgent => pb::WaitCode::NoMatchingAgent,
        WaitCode::AllAgentsFull => pb::WaitCode::AllAgentsFull,
        WaitCode::TenantOverQuota => pb::WaitCode::TenantOverQuota,
        WaitCode::RetryBackoff => pb::WaitCode::RetryBackoff,
        WaitCode::PendingApproval => pb::WaitCode::PendingApproval,
    };
    pb::WaitReason {
        code: code.into(),
        message: w.message.clone(),
        until: w.until.map(timestamp),
    }
}

pub fn agent_to_proto(a: &AgentRecord) -> pb::Agent {
    pb::Agent {
        id: a.id.clone(),
        hostname: a.hostname.clone(),
        pool: a.pool.clone(),
        labels: a.labels.clone().into_iter().collect(),
        capacity: u32::try_from(a.capacity).unwrap_or(0),
        running: u32::try_from(a.running).unwrap_or(0),
        executor: a.executor.clone(),
        version: a.version.clone(),
        last_heartbeat_at: Some(timestamp(a.last_heartbeat_at)),
        draining: a.draining,
        live: a.live,
    }
}

/// Names, key id and times: a secret's value never has a proto form outside GetAssignment.
pub fn secret_info_to_proto(s: &SecretInfo) -> pb::SecretInfo {
    pb::SecretInfo {
        name: s.name.clone(),
        key_id: s.key_id.clone(),
        created_at: Some(timestamp(s.created_at)),
        updated_at: Some(timestamp(s.updated_at)),
    }
}

pub fn dead_letter_to_proto(d: &DeadLetterRecord) -> pb::DeadLetter {
    pb::DeadLetter {
        id: non_negative(d.id),
        kind: d.kind.clone(),
        run_id: d.run_id.map(|r| r.to_string()).unwrap_or_default(),
        reason: d.reason.clone(),
        source_queue: d.source_queue.clone(),
        payload: d.payload.clone(),
        at: Some(timestamp(d.at)),
        redriven_at: d.redriven_at.map(timestamp),
    }
}

pub fn timestamp(t: DateTime<Utc>) -> prost_types::Timestamp {
    prost_types::Timestamp {
        seconds: t.timestamp(),
        nanos: i32::try_from(t.timestamp_subsec_nanos()).unwrap_or(0),
    }
}

fn non_negative(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

pub fn run_to_proto(r: &RunRecord) -> pb::Run {
    pb::Run {
        id: r.id.to_string(),
        state: state_to_proto(r.state).into(),
        spec: Some(spec_to_proto(&r.spec)),
        attempt: u32::try_from(r.attempt).unwrap_or(0),
        lease_epoch: non_negative(r.lease_epoch),
        agent_id: r.agent_id.clone().unwrap_or_default(),
        exit_code: r.exit_code,
        output: r.output.clone(),
        output_truncated: r.output_truncated,
        reason: r.reason.clone().unwrap_or_default(),
        executor: r.executor.clone().unwrap_or_default(),
        idempotency_key: r.idempotency_key.clone().unwrap_or_default(),
        created_at: Some(timestamp(r.created_at)),
        updated_at: Some(timestamp(r.updated_at)),
        started_at: r.started_at.map(timestamp),
        finished_at: r.finished_at.map(timestamp),
        wait: None,
        max_attempts: u32::try_from(r.max_attempts).unwrap_or(0),
        cancel_requested: r.cancel_requested_at.is_some(),
    }
}

pub fn event_to_proto(e: &EventRecord) -> pb::RunEvent {
    pb::RunEvent {
        run_id: e.run_id.to_string(),
        seq: u64::try_from(e.seq).unwrap_or(0),
        from_state: e
            .from_state
            .map(state_to_proto)
            .unwrap_or(pb::RunState::Unspecified)
            .into(),
        to_state: state_to_proto(e.to_state).into(),
        attempt: u32::try_from(e.attempt).unwrap_or(0),
        lease_epoch: non_negative(e.lease_epoch),
        reason: e.reason.clone().unwrap_or_default(),
        at: Some(timestamp(e.at)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn states_round_trip_through_proto() {
        for s in RunState::ALL {
            let n: i32 = state_to_proto(s).into();
            assert_eq!(state_from_proto(n), Some(s));
        }
        assert_eq!(state_from_proto(0), None);
        assert_eq!(state_from_proto(999), None);
    }
}
