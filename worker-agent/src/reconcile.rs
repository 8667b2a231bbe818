//! Re-adoption after a restart: Docker is the agent's journal. Before consuming commands, the
//! agent lists the containers labelled with its own agent id (`drover.agent`, plus
//! `drover.run`), claims each one's lease, and asks the API about it:
//!
//! - lease current, process running → re-attach: supervise (the time already used counts
//!   against the timeout), ship logs, report; if the API still says ASSIGNED (the start report
//!   never landed), report the start first;
//! - lease current, process exited → report its result (exit code, output tail) and remove it;
//! - lease current, never started → start it now (it is that lease's one execution) unless the
//!   run was cancelled or the agent is draining;
//! - stale or unknown (FAILED_PRECONDITION / NOT_FOUND), or the run already finished → remove.
//!
//! A `kill -9` leaves the `Execute` command acked, so this is the only way back to the run.
//! Workspaces that no found execution holds (a start that never happened) are removed.
//! Only containers of this agent id are touched: several agents may share one Docker daemon.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::{ApiError, Patience};
use crate::execution::{Assigned, RunContext, proceed};
use crate::executor::FoundExecution;
use crate::running::RunClaim;
use crate::settle::{self, Execution};

/// Pause between attempts to list containers while the daemon does not answer.
const LIST_RETRY: Duration = Duration::from_secs(1);

/// Claims and spawns the re-adoption of every execution this agent left behind. Returns how
/// many were found, or `None` when `cancel` fired before the daemon answered. Claims are taken
/// before returning, so the first heartbeat already renews the adopted leases.
pub async fn adopt_leftovers(
    ctx: &Arc<RunContext>,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Option<usize> {
    let found = loop {
        match ctx.executor.list(&ctx.agent_id).await {
            Ok(found) => break found,
            Err(e) => {
                tracing::warn!(error = %e, "could not list existing executions; retrying");
                tokio::select! {
                    _ = cancel.cancelled() => return None,
                    _ = tokio::time::sleep(LIST_RETRY) => {}
                }
            }
        }
    };
    let live = found.iter().map(|f| f.handle.name.clone()).collect();
    let swept = ctx.workspaces.sweep(live).await;
    if swept > 0 {
        tracing::info!(swept, "removed workspaces no execution holds any more");
    }
    if found.is_empty() {
        tracing::info!("no executions left from an earlier run of this agent");
        return Some(0);
    }
    tracing::info!(
        count = found.len(),
        "found executions left from an earlier run of this agent; reconciling"
    );
    let count = found.len();
    for f in found {
        let Some(claim) = ctx.runs.claim(f.run_id, f.lease_epoch, &ctx.hand_back) else {
            tracing::warn!(run_id = %f.run_id, epoch = %f.lease_epoch, container = %f.handle.name, "two containers for one lease; leaving this one");
            continue;
        };
        let span = tracing::info_span!(
            "run",
            run_id = %f.run_id,
            attempt = f.attempt,
            epoch = %f.lease_epoch,
            agent_id = %ctx.agent_id,
        );
        tracker.spawn(readopt(ctx.clone(), f, claim).instrument(span));
    }
    Some(count)
}

async fn readopt(ctx: Arc<RunContext>, found: FoundExecution, claim: RunClaim) {
    let ctx = ctx.as_ref();
    let execution = Execution {
        run_id: found.run_id,
        attempt: found.attempt,
        epoch: found.lease_epoch,
        handle: &found.handle,
    };
    tracing::info!(container = %found.handle.name, status = ?found.status, "asking the api about an existing execution");
    let stop = claim.signals().stop.clone();
    let asked = ctx.api.get_assignment(
        found.run_id,
        found.lease_epoch,
        Patience::UntilCancelled,
        &stop,
    );
    // Past the drain timeout nobody waits for an API that does not answer; the container
    // stays for the next start.
    let assignment = tokio::select! {
        res = asked => res,
        _ = ctx.hand_back.cancelled() => {
            tracing::warn!("drain timeout passed before the api answered; leaving the container");
            return;
        }
    };
    let assignment = match assignment {
        Ok(a) => a,
        Err(ApiError::Stale { code, message }) => {
            tracing::info!(?code, %message, "lease is stale or unknown; removing the container");
            settle::discard(ctx, execution).await;
            return;
        }
        // A heartbeat answered first that the lease is not ours.
        Err(ApiError::Cancelled) => {
            tracing::info!("lease revoked; removing the container");
            settle::discard(ctx, execution).await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not reconcile the execution; leaving the container");
            return;
        }
    };
    let fallback_tenant = String::new();
    let Some(assigned) = Assigned::read(ctx, assignment, &fallback_tenant, &claim).await else {
        settle::discard(ctx, execution).await;
        return;
    };
    if assigned.job.attempt != found.attempt {
        tracing::warn!(
            api_attempt = assigned.job.attempt,
            "the api names another attempt for this lease; removing the container"
        );
        settle::discard(ctx, execution).await;
        return;
    }
    proceed(ctx, claim, assigned, Some(found.clone()), None).await;
}
