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

use crate::api::{ApiError, Patience, epoch_to_wire};
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
    let request = if request.inline_artifacts.is_empty() {
        request
    } else {
        match ctx
            .api
            .report_completion_with(request.clone(), Patience::Retries(INLINE_RETRIES), stop)
            .await
        {
            answer @ (Ok(_) | Err(ApiError::Stale { .. } | ApiError::Cancelled)) => {
                return settled(answer);
            }
            Err(e) => {
                tracing::error!(error = %e, "could not store the artifacts with the completion; reporting without them");
                without_artifacts(request)
            }
        }
    };
    settled(ctx.api.report_completion(request, stop).await)
}

/// Tries of a completion carrying inline artifacts before it is sent without them (as an
/// upload is tried before the attempt is failed for want of its artifacts).
const INLINE_RETRIES: usize = 3;

/// The completion with its inline artifacts dropped: never SUCCEEDED without them; a failure
/// stays what it was.
fn without_artifacts(mut request: pb::ReportCompletionRequest) -> pb::ReportCompletionRequest {
    request.inline_artifacts.clear();
    if request.outcome == pb::Outcome::Succeeded as i32 {
        request.outcome = pb::Outcome::Failed as i32;
        request.infrastructure_error = true;
        request.reason = ARTIFACTS_LOST.to_owned();
    }
    request
}

/// The reason of an attempt failed because its files could not be stored.
pub const ARTIFACTS_LOST: &str = "artifact_upload_failed: the workspace could not be uploaded";

/// Whether a completion report's answer settles the attempt (see [`report`]).
fn settled(answer: Result<pb::ReportCompletionResponse, ApiError>) -> bool {
    match answer {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_success_without_its_artifacts_is_an_infrastructure_failure_and_a_failure_stays() {
        let file = pb::InlineArtifact {
            entry: Some(pb::ArtifactEntry {
                path: "out.txt".into(),
                ..Default::default()
            }),
            content: b"x".to_vec(),
        };
        let ok = pb::ReportCompletionRequest {
            outcome: pb::Outcome::Succeeded as i32,
            exit_code: Some(0),
            reason: "exited with code 0".into(),
            inline_artifacts: vec![file.clone()],
            ..Default::default()
        };
        let dropped = without_artifacts(ok);
        assert!(dropped.inline_artifacts.is_empty());
        assert_eq!(dropped.outcome, pb::Outcome::Failed as i32);
        assert!(
            dropped.infrastructure_error,
            "retried while attempts remain"
        );
        assert_eq!(dropped.reason, ARTIFACTS_LOST);
        assert_eq!(dropped.exit_code, Some(0), "what the process did is kept");

        let failed = pb::ReportCompletionRequest {
            outcome: pb::Outcome::Failed as i32,
            exit_code: Some(3),
            reason: "exited with code 3".into(),
            inline_artifacts: vec![file],
            ..Default::default()
        };
        let dropped = without_artifacts(failed);
        assert!(dropped.inline_artifacts.is_empty());
        assert_eq!(
            (
                dropped.outcome,
                dropped.reason.as_str(),
                dropped.infrastructure_error
            ),
            (pb::Outcome::Failed as i32, "exited with code 3", false)
        );
    }
}
