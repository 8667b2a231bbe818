//! Proves the agent alive and renews the leases of its running executions, every interval the
//! API asked for at registration. The API answers with the leases that are no longer ours;
//! their executions are stopped (container killed and removed). An API that forgot the agent
//! (NOT_FOUND, e.g. after losing its live-agent records) gets a fresh registration.

use std::time::Duration;

use drover_core::ids::{LeaseEpoch, RunId};
use drover_proto::v1 as pb;
use tokio::time::{Interval, MissedTickBehavior};
use tokio_util::sync::CancellationToken;
use tonic::Code;

use crate::api::{ApiClient, ApiError, Patience};
use crate::running::RunningRuns;

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
/// stay renewed until they report.
pub async fn run(
    api: ApiClient,
    registration: pb::RegisterAgentRequest,
    every: Duration,
    runs: RunningRuns,
    stop: CancellationToken,
) {
    let mut every = every;
    let mut tick = ticker(every);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
        match api.heartbeat(runs.leases(), &stop).await {
            Ok(resp) => stop_revoked(&runs, &resp.revoked),
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
            Err(e) => tracing::warn!(error = %e, "heartbeat failed"),
        }
    }
}

fn stop_revoked(runs: &RunningRuns, revoked: &[pb::LeaseRef]) {
    for lease in revoked {
        let parsed = lease
            .run_id
            .parse::<RunId>()
            .ok()
            .zip(i64::try_from(lease.lease_epoch).ok().map(LeaseEpoch));
        let Some((run_id, epoch)) = parsed else {
            tracing::warn!(run_id = %lease.run_id, epoch = lease.lease_epoch, "unreadable revoked lease");
            continue;
        };
        if runs.revoke(run_id, epoch) {
            tracing::warn!(%run_id, %epoch, "lease revoked; stopping the execution");
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

    #[test]
    fn revoked_leases_stop_only_matching_executions() {
        let runs = RunningRuns::default();
        let run = RunId::new();
        let claim = runs
            .claim(run, LeaseEpoch(3), CancellationToken::new())
            .unwrap();
        let other = RunId::new();
        let other_claim = runs
            .claim(other, LeaseEpoch(1), CancellationToken::new())
            .unwrap();
        stop_revoked(
            &runs,
            &[
                pb::LeaseRef {
                    run_id: run.to_string(),
                    lease_epoch: 3,
                },
                pb::LeaseRef {
                    run_id: other.to_string(),
                    lease_epoch: 2,
                },
                pb::LeaseRef {
                    run_id: "not-a-uuid".into(),
                    lease_epoch: 1,
                },
            ],
        );
        assert!(claim.stop_token().is_cancelled());
        assert!(!other_claim.stop_token().is_cancelled());
    }
}
