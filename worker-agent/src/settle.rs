//! Settling an attempt with the API and cleaning up after it: the completion report (retried
//! while the API is unreachable), and killing and removing containers with a journal line for
//! every process that ends here.
//!
//! The rule that makes Docker the agent's journal: a container goes only once its result is
//! settled — accepted, or refused as stale (FAILED_PRECONDITION / NOT_FOUND: the lease is not
//! ours, so the container must go, fencing included).

use std::time::Duration;

use drover_core::convert::state_from_proto;
use drover_core::ids::{LeaseEpoch, RunId};
use drover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiError, epoch_to_wire};
use crate::execution::RunContext;
use crate::executor::{ExecHandle, Executor};
use crate::journal::JournalEntry;
use crate::outcome::Verdict;

/// After a kill, how long to wait for the exit code that goes into the journal.
const EXIT_AFTER_KILL: Duration = Duration::from_secs(2);

/// Which process a cleanup is about, for the journal.
#[derive(Debug, Clone, Copy)]
pub struct Execution<'a> {
    pub run_id: RunId,
    pub attempt: u32,
    pub epoch: LeaseEpoch,
    pub handle: &'a ExecHandle,
}

impl<'a> Execution<'a> {
    pub fn entry(&self, ctx: &'a RunContext) -> JournalEntry<'a> {
        JournalEntry {
            run_id: self.run_id,
            attempt: self.attempt,
            epoch: self.epoch,
            agent_id: &ctx.agent_id,
            handle: self.handle,
        }
    }
}

/// Reports an attempt that ended without a supervised execution. True when settled.
pub async fn report_verdict(
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
pub async fn report(
    ctx: &RunContext,
    request: pb::ReportCompletionRequest,
    stop: &CancellationToken,
) -> bool {
    match ctx.api.report_completion(request, stop).await {
        Ok(resp) => {
            let state = state_from_proto(resp.state);
            tracing::info!(?state, "completion accepted");
            true
        }
        Err(ApiError::Stale { code, message }) => {
            tracing::warn!(?code, %message, "completion refused as stale; dropping the lease");
            true
        }
        Err(ApiError::Cancelled) => {
            tracing::info!("lease revoked before the completion was accepted");
            true
        }
        Err(e) => {
            tracing::error!(error = %e, "completion refused; keeping the container");
            false
        }
    }
}

/// Kills and removes an execution that may still be running, journalling its end. Failures
/// are logged (a leftover container is labelled and found by the next reconcile).
pub async fn discard(ctx: &RunContext, execution: Execution<'_>) {
    let executor = ctx.executor.as_ref();
    let handle = execution.handle;
    if let Err(e) = executor.kill(handle).await {
        tracing::warn!(error = %e, container = %handle.name, "could not kill the container");
    }
    let code = tokio::time::timeout(EXIT_AFTER_KILL, executor.wait(handle))
        .await
        .ok()
        .and_then(Result::ok)
        .and_then(|s| s.code);
    ctx.journal.ended(execution.entry(ctx), code);
    remove(ctx, handle).await;
}

/// Removes an execution whose end is already journalled, and then its workspace (named like
/// the execution). A workspace goes only with its execution: while the execution stays as
/// the journal of an unreported result, so does its workspace.
pub async fn remove(ctx: &RunContext, handle: &ExecHandle) {
    if remove_execution(ctx.executor.as_ref(), handle).await {
        ctx.workspaces.remove(&handle.name).await;
    }
}

/// True when the execution is gone.
async fn remove_execution(executor: &dyn Executor, handle: &ExecHandle) -> bool {
    // A short retry: the daemon may still be tearing the process down.
    for attempt in 0..3u32 {
        match executor.remove(handle).await {
            Ok(()) => {
                tracing::info!(container = %handle.name, "container removed");
                return true;
            }
            Err(e) if attempt == 2 => {
                tracing::warn!(error = %e, container = %handle.name, "could not remove the container");
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(200 * u64::from(attempt + 1))).await,
        }
    }
    false
}
