//! One `Execute` command, from delivery to removed container:
//!
//! 1. claim the lease locally (a duplicate of a lease already executing is acked and dropped);
//! 2. `GetAssignment` — stale or unknown leases are acked and dropped;
//! 3. start (or adopt) the execution, then ack: from here Docker is the journal;
//! 4. `ReportStarted` — refused as stale: stop and remove, done;
//! 5. supervise it, streaming logs, enforcing the time limit;
//! 6. `ReportCompletion`, retried while the API is unreachable;
//! 7. remove the container only once the report was accepted or refused as stale.
//!
//! Every failure here ends this run's attempt (reported, or left to lease expiry); none of
//! them stops the agent.

use std::sync::Arc;
use std::time::Duration;

use drover_core::convert::{raw_spec_from_proto, state_from_proto};
use drover_core::ids::{AgentId, LeaseEpoch, RunId, TenantId};
use drover_core::state::RunState;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::{ApiClient, ApiError, Patience, epoch_to_wire};
use crate::consumer::CommandAck;
use crate::executor::{ExecError, ExecHandle, Executor, Job};
use crate::log_shipper::ship_logs;
use crate::outcome::Verdict;
use crate::running::RunningRuns;
use crate::supervise::{Ending, supervise};

/// Output chunks buffered between the container and the log shipper.
const LOG_CHANNEL_CAPACITY: usize = 256;
/// Retries of `GetAssignment` before the command goes back to the queue.
const ASSIGNMENT_RETRIES: usize = 8;

/// What every execution shares.
pub struct RunContext {
    pub api: ApiClient,
    pub executor: Arc<dyn Executor>,
    pub agent_id: AgentId,
    pub runs: RunningRuns,
    /// Fires once the drain timeout has passed: executions still running are stopped.
    pub hard_stop: CancellationToken,
}

/// A decoded `AgentCommand::Execute`.
#[derive(Debug, Clone)]
pub struct ExecuteCommand {
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub attempt: i32,
    pub lease_epoch: LeaseEpoch,
}

pub async fn execute(ctx: Arc<RunContext>, cmd: ExecuteCommand, ack: CommandAck) {
    let span = tracing::info_span!(
        "run",
        run_id = %cmd.run_id,
        attempt = cmd.attempt,
        epoch = %cmd.lease_epoch,
        agent_id = %ctx.agent_id,
    );
    execute_inner(&ctx, cmd, ack).instrument(span).await;
}

async fn execute_inner(ctx: &RunContext, cmd: ExecuteCommand, ack: CommandAck) {
    let (run_id, epoch) = (cmd.run_id, cmd.lease_epoch);
    let Some(claim) = ctx.runs.claim(run_id, epoch, ctx.hard_stop.child_token()) else {
        tracing::info!("this lease is already executing here; dropping the duplicate command");
        ack.ack().await;
        return;
    };
    let stop = claim.stop_token().clone();

    let patience = Patience::Retries(ASSIGNMENT_RETRIES);
    let assignment = match ctx.api.get_assignment(run_id, epoch, patience, &stop).await {
        Ok(a) => a,
        Err(ApiError::Stale { code, message }) => {
            tracing::info!(?code, %message, "assignment is stale or unknown; dropping the command");
            ack.ack().await;
            return;
        }
        Err(ApiError::Permanent { code, message }) => {
            tracing::error!(?code, %message, "assignment refused; dead-lettering the command");
            ack.dead_letter().await;
            return;
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not fetch the assignment; requeueing the command");
            ack.requeue().await;
            return;
        }
    };
    let state = state_from_proto(assignment.state);
    if state.is_some_and(RunState::is_terminal) {
        tracing::info!(?state, "run already finished; dropping the command");
        ack.ack().await;
        return;
    }

    let spec = assignment
        .spec
        .map(raw_spec_from_proto)
        .ok_or_else(|| "the assignment has no spec".to_owned())
        .and_then(|raw| raw.validate().map_err(|e| e.to_string()));
    let spec = match spec {
        Ok(s) => s,
        Err(msg) => {
            tracing::error!(error = %msg, "assignment spec is unusable; failing the attempt");
            report_failure(
                ctx,
                run_id,
                epoch,
                Verdict::failed(format!("invalid_spec: {msg}")),
                &stop,
            )
            .await;
            ack.ack().await;
            return;
        }
    };
    let job = Job {
        run_id,
        attempt: assignment.attempt,
        lease_epoch: epoch,
        // The API's word wins; the command's copy covers an API that leaves it out.
        tenant_id: if assignment.tenant_id.is_empty() {
            cmd.tenant_id.to_string()
        } else {
            assignment.tenant_id
        },
        agent_id: ctx.agent_id.clone(),
        spec,
    };

    let started = match ctx.executor.start(&job).await {
        Ok(s) => s,
        Err(ExecError::ImageUnavailable { image }) => {
            tracing::warn!(%image, "image not present on this host; failing the attempt");
            report_failure(
                ctx,
                run_id,
                epoch,
                Verdict::image_unavailable(&image),
                &stop,
            )
            .await;
            ack.ack().await;
            return;
        }
        Err(e) => {
            tracing::error!(error = %e, "could not start the execution; failing the attempt");
            let verdict =
                Verdict::failed("start_failed: the container could not be started on this host");
            report_failure(ctx, run_id, epoch, verdict, &stop).await;
            ack.ack().await;
            return;
        }
    };
    let started_at = Instant::now();
    ack.ack().await;
    let handle = started.handle;
    tracing::info!(container = %handle.name, container_id = %handle.id, adopted = started.adopted, "execution started");

    // A redelivery of a run already reported RUNNING needs no second start report.
    if state != Some(RunState::Running) {
        let executor = ctx.executor.name();
        match ctx
            .api
            .report_started(run_id, epoch, &handle.id, executor, &stop)
            .await
        {
            Ok(()) => {}
            Err(e @ (ApiError::Stale { .. } | ApiError::Permanent { .. })) => {
                tracing::warn!(error = %e, "start report refused; stopping and removing the container");
                discard(ctx.executor.as_ref(), &handle).await;
                return;
            }
            Err(ApiError::Cancelled | ApiError::Transient { .. }) => {
                tracing::info!("stopped before the start was reported; removing the container");
                discard(ctx.executor.as_ref(), &handle).await;
                return;
            }
        }
    }

    let (logs_tx, logs_rx) = mpsc::channel(LOG_CHANNEL_CAPACITY);
    let already_running = started.running_for + started_at.elapsed();
    let (finished, ()) = tokio::join!(
        supervise(
            ctx.executor.as_ref(),
            &handle,
            job.timeout(),
            already_running,
            &stop,
            logs_tx
        ),
        ship_logs(ctx.api.clone(), run_id, epoch, logs_rx, stop.clone()),
    );
    let finished = match finished {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "lost track of the execution; failing the attempt");
            let verdict = Verdict::failed("executor_error: the agent lost track of the container");
            if report_failure(ctx, run_id, epoch, verdict, &stop).await {
                discard(ctx.executor.as_ref(), &handle).await;
            }
            return;
        }
    };
    let Some(verdict) = Verdict::of(&finished) else {
        debug_assert_eq!(finished.ending, Ending::Stopped);
        tracing::info!(
            "execution stopped (lease revoked or agent stopping); removing the container"
        );
        discard(ctx.executor.as_ref(), &handle).await;
        return;
    };
    tracing::info!(
        outcome = verdict.outcome.as_str_name(),
        exit_code = ?verdict.exit_code,
        reason = %verdict.reason,
        output_bytes = finished.output.len(),
        "execution finished; reporting"
    );
    let request = verdict.into_request(
        run_id.to_string(),
        epoch_to_wire(epoch),
        finished.output,
        finished.output_truncated,
    );
    if report(ctx, request, &stop).await {
        discard(ctx.executor.as_ref(), &handle).await;
    }
    drop(claim);
}

/// Reports an attempt that ended without a supervised execution. True when settled.
async fn report_failure(
    ctx: &RunContext,
    run_id: RunId,
    epoch: LeaseEpoch,
    verdict: Verdict,
    stop: &CancellationToken,
) -> bool {
    let request = verdict.into_request(run_id.to_string(), epoch_to_wire(epoch), Vec::new(), false);
    report(ctx, request, stop).await
}

/// Sends the completion report. True when the API settled it (accepted, or refused as stale,
/// or we stopped caring because the lease was revoked): the container may then go. False
/// leaves the container as the journal of an unreported result.
async fn report(
    ctx: &RunContext,
    request: drover_proto::v1::ReportCompletionRequest,
    stop: &CancellationToken,
) -> bool {
    match ctx.api.report_completion(request, stop).await {
        Ok(resp) => {
            let state = state_from_proto(resp.state);
            tracing::info!(?state, "completion accepted");
            true
        }
        Err(ApiError::Stale { code, message }) => {
            tracing::info!(?code, %message, "completion refused as stale");
            true
        }
        Err(ApiError::Cancelled) => {
            tracing::info!("stopped before the completion was accepted");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "completion refused; keeping the container");
            false
        }
    }
}

/// Kills and removes an execution; failures are logged (a leftover container is labelled and
/// found by operators or a later reconcile).
async fn discard(executor: &dyn Executor, handle: &ExecHandle) {
    if let Err(e) = executor.kill(handle).await {
        tracing::warn!(error = %e, container = %handle.name, "could not kill the container");
    }
    remove(executor, handle).await;
}

async fn remove(executor: &dyn Executor, handle: &ExecHandle) {
    // A short retry: the daemon may still be tearing the process down.
    for attempt in 0..3u32 {
        match executor.remove(handle).await {
            Ok(()) => {
                tracing::debug!(container = %handle.name, "container removed");
                return;
            }
            Err(e) if attempt == 2 => {
                tracing::warn!(error = %e, container = %handle.name, "could not remove the container");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await,
        }
    }
}
