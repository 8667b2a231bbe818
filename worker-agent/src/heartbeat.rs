//! Proves the agent alive and renews the leases of its running executions, every interval the
//! API asked for at registration. The API answers with the leases that are no longer ours
//! (their executions are stopped: container killed and removed, nothing reported), the leases
//! whose run a client cancelled (terminated and reported CANCELLED; the command queue carries
//! the same cancel faster, and cancelling twice is harmless), and whether an operator asked the
//! agent to drain. An API that forgot the agent (NOT_FOUND, e.g. after losing its live-agent
//! records) gets a fresh registration.

use std::time::Duration;

use drover_core::ids::{LeaseEpoch, RunId};
use drover_core::observe::{Health, names};
use drover_proto::v1 as pb;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::api::{ApiClient, ApiError, Patience};
use crate::running::{RunningRuns, Signalled};

/// Used when the API sends 0; and the floor, so a misconfigured API cannot make us spin.
const DEFAULT_INTERVAL: Duration = Duration::from_secs(2);
const MIN_INTERVAL: Duration = Duration::from_millis(100);

/// The interval to heartbeat at, from the registration answer.
pub fn interval_from(resp: &pb::RegisterAgentResponse) -> Duration {
    match resp.heartbeat_interval_ms {
        0 => DEFAULT_INTERVAL,
        ms => Duration::from_millis(ms).max(MIN_INTERVAL),
    }
}

fn ticker(every: Duration) -> Interval {
    let mut t = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    t.set_missed_tick_behavior(MissedTickBehavior::Delay);
    t
}

/// Heartbeats until `stop` fires. Keep it running while executions drain: their leases must
/// stay renewed until they report. A drain request from the API fires `drain`.
pub async fn run(
    api: ApiClient,
    registration: pb::RegisterAgentRequest,
    every: Duration,
    runs: RunningRuns,
    drain: CancellationToken,
    stop: CancellationToken,
    health: Health,
) {
    let mut every = every;
    let mut tick = ticker(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        metrics::gauge!(names::AGENT_RUNNING).set(runs.len() as f64);
        match api.heartbeat(runs.leases(), &stop).await {
            Ok(resp) => {
                health.set("api", Ok(()));
                stop_revoked(&runs, &resp.revoked);
                cancel_requested(&runs, &resp.cancel);
                if resp.drain && !drain.is_cancelled() {
                    tracing::info!("the api asked this agent to drain");
                    drain.cancel();
                }
            }
            Err(ApiError::Cancelled) => return,
            Err(e) if e.code() == Some(Code::NotFound) => {
                tracing::warn!("the api does not know this agent; registering again");
                match api
                    .register(registration.clone(), Patience::Retries(2), &stop)
                    .await
                {
                    Ok(resp) => {
                        tracing::info!("registered again");
                        let asked = interval_from(&resp);
                        if asked != every {
                            every = asked;
                            tick = ticker(every);
                        }
                    }
                    Err(e) => tracing::warn!(error = %e, "registering again failed; will retry"),
                }
            }
            Err(e) => {
                health.set("api", Err(format!("heartbeat failed: {e}")));
                tracing::warn!(error = %e, "heartbeat failed");
            }
        }
    }
}

fn parse_lease(lease: &pb::LeaseRef) -> Option<(RunId, LeaseEpoch)> {
    let parsed = lease
        .run_id
        .parse::<RunId>()
        .ok()
        .zip(i64::try_from(lease.lease_epoch).ok().map(LeaseEpoch));
    if parsed.is_none() {
        tracing::warn!(run_id = %lease.run_id, epoch = lease.lease_epoch, "unreadable lease in a heartbeat answer");
    }
    parsed
}

fn stop_revoked(runs: &RunningRuns, revoked: &[pb::LeaseRef]) {
    for (run_id, epoch) in revoked.iter().filter_map(parse_lease) {
        if runs.revoke(run_id, epoch) == Signalled::Now {
            tracing::warn!(%run_id, %epoch, "lease revoked; stopping the execution");
        }
    }
}

fn cancel_requested(runs: &RunningRuns, cancel: &[pb::LeaseRef]) {
    for (run_id, epoch) in cancel.iter().filter_map(parse_lease) {
        if runs.cancel(run_id, epoch) == Signalled::Now {
            tracing::info!(%run_id, %epoch, "run cancelled (heartbeat); cancelling the execution");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interval_comes_from_the_api_with_a_floor() {
        let resp = |ms| pb::RegisterAgentResponse {
            heartbeat_interval_ms: ms,
            lease_ttl_ms: 10_000,
        };
        assert_eq!(interval_from(&resp(0)), DEFAULT_INTERVAL);
        assert_eq!(interval_from(&resp(1)), MIN_INTERVAL);
        assert_eq!(interval_from(&resp(1500)), Duration::from_millis(1500));
    }

    fn lease(run: RunId, epoch: u64) -> pb::LeaseRef {
        pb::LeaseRef {
            run_id: run.to_string(),
            lease_epoch: epoch,
        }
    }

    #[test]
    fn revoked_leases_stop_only_matching_executions() {
        let runs = RunningRuns::default();
        let agent = CancellationToken::new();
        let run = RunId::new();
        let claim = runs.claim(run, LeaseEpoch(3), &agent).unwrap();
        let other = RunId::new();
        let other_claim = runs.claim(other, LeaseEpoch(1), &agent).unwrap();
        stop_revoked(
            &runs,
            &[
                lease(run, 3),
                lease(other, 2),
                pb::LeaseRef {
                    run_id: "not-a-uuid".into(),
                    lease_epoch: 1,
                },
            ],
        );
        assert!(claim.signals().stop.is_cancelled());
        assert!(!claim.signals().cancel.is_cancelled());
        assert!(!other_claim.signals().stop.is_cancelled());
    }

    #[test]
    fn cancelled_leases_are_cancelled_not_stopped() {
        let runs = RunningRuns::default();
        let agent = CancellationToken::new();
        let run = RunId::new();
        let claim = runs.claim(run, LeaseEpoch(2), &agent).unwrap();
        cancel_requested(&runs, &[lease(run, 2), lease(RunId::new(), 1)]);
        cancel_requested(&runs, &[lease(run, 2)]);
        assert!(claim.signals().cancel.is_cancelled());
        assert!(!claim.signals().stop.is_cancelled());
    }
}
