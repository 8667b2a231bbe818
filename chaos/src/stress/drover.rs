//! One drover operation: SubmitRun, then WatchRun to the terminal event.
//!
//! Queue wait and dispatch latency come from the run's own events as WatchRun streams them
//! (their `at` timestamps, stamped by drover on this machine's clock): queue wait is
//! QUEUED → ASSIGNED, dispatch is ASSIGNED → RUNNING (the agent fetched the assignment and
//! the container started), execution is RUNNING → terminal (the process ran and exited, and the
//! agent's report was accepted). Submit latency and submit→terminal are timed by the client. A run
//! ending in any state but SUCCEEDED counts as an error named `run_<STATE>`.

use std::time::Duration;

use drover_core::convert::state_from_proto;
use drover_core::state::RunState;
use drover_proto::v1 as pb;
use tokio::time::Instant;

use super::metrics::{Outcome, Sample};
use crate::client::RunClient;
use crate::oracle::{self, Observed};

fn code(s: &tonic::Status) -> String {
    format!("{:?}", s.code())
}

fn at(ev: &pb::RunEvent) -> Option<Duration> {
    let t = ev.at.as_ref()?;
    let secs = u64::try_from(t.seconds).ok()?;
    Some(Duration::new(secs, u32::try_from(t.nanos).ok()?))
}

/// Time between the first event entering `from` and the first entering `to`.
fn between(events: &[pb::RunEvent], from: pb::RunState, to: pb::RunState) -> Option<Duration> {
    let first = |s: pb::RunState| events.iter().find(|e| e.to_state == s as i32).and_then(at);
    first(to)?.checked_sub(first(from)?)
}

/// Runs one operation; the second value is the oracle's findings for this run.
pub async fn one(
    mut client: RunClient,
    spec: pb::RunSpec,
    scheduled: Instant,
) -> (Outcome, Vec<String>) {
    let t0 = Instant::now();
    let submitted = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            idempotency_key: uuid::Uuid::now_v7().to_string(),
        })
        .await;
    let submit = t0.elapsed();
    let run = match submitted {
        Ok(r) => match r.into_inner().run {
            Some(run) => run,
            None => return (Err("no_run_in_response".into()), Vec::new()),
        },
        Err(s) => return (Err(code(&s)), Vec::new()),
    };
    let mut stream = match client
        .watch_run(pb::WatchRunRequest {
            run_id: run.id.clone(),
        })
        .await
    {
        Ok(s) => s.into_inner(),
        Err(s) => return (Err(format!("watch_{}", code(&s))), Vec::new()),
    };
    let mut events = Vec::new();
    loop {
        match stream.message().await {
            Ok(Some(msg)) => events.extend(msg.event),
            Ok(None) => break,
            Err(s) => return (Err(format!("watch_{}", code(&s))), Vec::new()),
        }
    }
    let end_to_end = scheduled.elapsed();
    let terminal = events
        .iter()
        .rev()
        .find_map(|e| state_from_proto(e.to_state).filter(|s| s.is_terminal()));
    let violations: Vec<String> = oracle::check(&[Observed {
        run_id: run.id,
        events: events.clone(),
    }])
    .iter()
    .map(ToString::to_string)
    .collect();
    let outcome = match terminal {
        Some(RunState::Succeeded) => Ok(Sample {
            submit: Some(submit),
            queue_wait: between(&events, pb::RunState::Queued, pb::RunState::Assigned),
            dispatch: between(&events, pb::RunState::Assigned, pb::RunState::Running),
            execution: between(&events, pb::RunState::Running, pb::RunState::Succeeded),
            end_to_end,
        }),
        Some(other) => Err(format!("run_{other:?}")),
        None => Err("watch_ended_without_terminal".into()),
    };
    (outcome, violations)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, to: pb::RunState, ms: i64) -> pb::RunEvent {
        pb::RunEvent {
            seq,
            to_state: to as i32,
            at: Some(prost_types::Timestamp {
                seconds: 1_700_000_000 + ms / 1000,
                nanos: i32::try_from((ms % 1000) * 1_000_000).expect("nanos"),
            }),
            ..Default::default()
        }
    }

    #[test]
    fn phases_from_event_timestamps() {
        use pb::RunState as S;
        let events = vec![
            ev(1, S::Queued, 0),
            ev(2, S::Assigned, 1500),
            ev(3, S::Running, 1750),
            ev(4, S::Succeeded, 2000),
        ];
        assert_eq!(
            between(&events, S::Queued, S::Assigned),
            Some(Duration::from_millis(1500))
        );
        assert_eq!(
            between(&events, S::Assigned, S::Running),
            Some(Duration::from_millis(250))
        );
        assert_eq!(between(&events, S::Running, S::Failed), None);
    }
}
