//! The second half of every attempt, whether the process was just started or adopted after a
//! restart: report the start (if the API has not seen it), supervise it while shipping its
//! logs, journal its end, report the verdict, and remove the container once the API settled.
//!
//! Fencing: a start, log or completion report refused as stale means the lease is gone; the
//! container is stopped and removed and the lease forgotten (the claim is dropped).

use std::sync::Arc;

use drover_core::spec::MIN_SECRET_VALUE_BYTES;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tracing::Instrument;

use drover_core::state::RunState;
use drover_proto::v1 as pb;

use crate::api::{ApiError, epoch_to_wire};
use crate::execution::RunContext;
use crate::executor::{ExecHandle, Job, OutputChunk, OutputSource, Started};
use crate::log_files::LogFiles;
use crate::log_shipper::ship_logs;
use crate::outcome::Verdict;
use crate::redact::Redactor;
use crate::running::{LeaseSignals, RunClaim};
use crate::settle::{self, Execution};
use crate::supervise::{Ending, Supervision, supervise};
use crate::transfer;
use crate::workspace::{Ended, Record, Workspaces};

/// Output chunks buffered between the container and the log shipper.
const LOG_CHANNEL_CAPACITY: usize = 256;

/// Follows a started (or adopted) execution of `job` to its settled end. `state` is the run's
/// state as the API last said (ASSIGNED: the start is not reported yet). `started_at` is when
/// `started` was learnt, so the time spent reporting counts against the timeout. `live` is
/// false for a process found already exited: its end happened before now, so the journal
/// gets no `ended` line stamped now.
pub async fn follow(
    ctx: &RunContext,
    claim: RunClaim,
    job: Job,
    started: Started,
    started_at: Instant,
    state: Option<RunState>,
    live: bool,
) {
    let adopted_at = chrono::Utc::now();
    let signals = claim.signals().clone();
    let (run_id, epoch) = (job.run_id, job.lease_epoch);
    let handle = started.handle;
    let execution = Execution {
        run_id,
        attempt: job.attempt,
        epoch,
        handle: &handle,
    };

    let (logs_tx, logs_rx) = mpsc::channel(LOG_CHANNEL_CAPACITY);
    let Some(redactor) = redactor_of(&job, started.adopted, &logs_tx).await else {
        // Never let output past an unusable redactor: fail the attempt and stop it.
        if settle::report_verdict(ctx, run_id, epoch, Verdict::start_failed(), &signals.stop).await
        {
            settle::discard(ctx, execution).await;
        }
        return;
    };
    let limits = Supervision {
        timeout: job.timeout(),
        already_running: started.running_for + started_at.elapsed(),
        cancel_grace: job.cancel_grace(),
        live_logs_from: started.adopted.then_some(adopted_at),
        redactor: redactor.clone(),
    };
    let log_files = LogFiles::new(&Workspaces::logs_dir(&job));
    let supervision = async {
        tokio::join!(
            supervise(ctx.executor.as_ref(), &handle, limits, &signals, logs_tx),
            ship_logs(
                ctx.api.clone(),
                run_id,
                epoch,
                logs_rx,
                signals.stop.clone(),
                log_files,
            ),
        )
    }
    .instrument(tracing::info_span!("agent.wait", container = %handle.name));
    let ((finished, ()), start) = if state == Some(RunState::Running) {
        (supervision.await, StartReport::Reported)
    } else {
        reporting_start(ctx, &job, &handle, &signals, supervision).await
    };
    let finished = match finished {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %e, "lost track of the execution; failing the attempt");
            if settle::report_verdict(ctx, run_id, epoch, Verdict::lost_track(), &signals.stop)
                .await
            {
                settle::discard(ctx, execution).await;
            }
            return;
        }
    };
    if live {
        ctx.journal
            .ended(execution.entry(ctx), finished.exit.and_then(|s| s.code));
    }
    let Some(mut verdict) = Verdict::of(&finished) else {
        debug_assert_eq!(finished.ending, Ending::Stopped);
        tracing::info!(
            "execution stopped (lease revoked or refused as stale); removing the container"
        );
        settle::remove(ctx, &handle).await;
        return;
    };
    verdict.reason = redactor.redact_str(&verdict.reason);
    let executor = ctx.executor.name_for(&handle).to_owned();
    let in_directory = ctx.workspaces.needs_directory(&job, &executor);
    let ended = Ended {
        success: verdict.outcome == pb::Outcome::Succeeded,
        exit_code: verdict.exit_code,
        summary: verdict.reason.clone(),
        started_at: adopted_at
            - chrono::Duration::from_std(started.running_for).unwrap_or_default(),
        finished_at: chrono::Utc::now(),
        executor: executor.clone(),
    };
    let mut records = Vec::new();
    match ctx
        .workspaces
        .write_result(job.workspace.clone(), ended)
        .await
    {
        Ok((result, record)) => {
            tracing::info!(
                created = result.created_files.len(),
                modified = result.modified_files.len(),
                "result.json made"
            );
            records.push(record);
        }
        Err(e) => tracing::warn!(error = %e, "could not make result.json"),
    }
    if !in_directory {
        match Workspaces::request_record(&job, &executor) {
            Ok(record) => records.push(record),
            Err(e) => tracing::warn!(error = %e, "could not make request.json"),
        }
    }
    let artifacts = if verdict.outcome == pb::Outcome::HandedBack {
        // A hand-back re-queues the run: nothing of this attempt is kept.
        Artifacts::None
    } else {
        let span = tracing::info_span!("agent.upload_artifacts");
        match upload_workspace(ctx, &job, in_directory, records, &signals.stop)
            .instrument(span)
            .await
        {
            Ok(id) => id,
            Err(ApiError::Stale { code, message }) => {
                tracing::warn!(?code, %message, "artifact upload refused as stale; the lease is gone");
                settle::remove(ctx, &handle).await;
                return;
            }
            Err(e) => {
                tracing::error!(error = %e, "could not upload the artifacts");
                // Never SUCCEEDED without its artifacts; a failure stays what it was.
                if verdict.outcome == pb::Outcome::Succeeded {
                    verdict = Verdict::infrastructure(settle::ARTIFACTS_LOST);
                }
                Artifacts::None
            }
        }
    };
    tracing::info!(
        outcome = verdict.outcome.as_str_name(),
        exit_code = ?verdict.exit_code,
        reason = %verdict.reason,
        infrastructure_error = verdict.infrastructure_error,
        output_bytes = finished.output.len(),
        artifacts = %artifacts,
        "execution finished; reporting"
    );
    let mut request = verdict.into_request(
        run_id.to_string(),
        epoch_to_wire(epoch),
        finished.output,
        finished.output_truncated,
    );
    match artifacts {
        Artifacts::None => {}
        Artifacts::Uploaded(id) => request.artifact_upload_id = id,
        Artifacts::Inline(files) => request.inline_artifacts = files,
    }
    if start == StartReport::Folded {
        request.started_executor = ctx.executor.name_for(&handle).to_owned();
    }
    if settle::report(ctx, request, &signals.stop).await {
        settle::remove(ctx, &handle).await;
    }
    drop(claim);
}

/// How the start of an execution reached the API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StartReport {
    Reported,
    /// The execution ended inside the fold window: the completion carries the start.
    Folded,
    /// Refused as stale, or the lease was revoked before it was accepted: the lease's stop
    /// signal has fired, so the supervision ends Stopped and the container goes.
    Refused,
}

/// Runs `supervision` while the start report waits out `ctx.start_fold`: an execution that
/// ends inside the window has its start folded into the completion report; a longer one has
/// it reported while it runs (logs may be shipped before: the API takes them from an ASSIGNED
/// lease too).
async fn reporting_start<T>(
    ctx: &RunContext,
    job: &Job,
    handle: &ExecHandle,
    signals: &LeaseSignals,
    supervision: impl Future<Output = T>,
) -> (T, StartReport) {
    let mut supervision = std::pin::pin!(supervision);
    if !ctx.start_fold.is_zero() {
        tokio::select! {
            biased;
            out = &mut supervision => return (out, StartReport::Folded),
            () = tokio::time::sleep(ctx.start_fold) => {}
        }
    }
    let report = async {
        let reported = ctx
            .api
            .report_started(
                job.run_id,
                job.lease_epoch,
                &handle.id,
                ctx.executor.name_for(handle),
                &signals.stop,
            )
            .await;
        match reported {
            Ok(()) => {
                tracing::info!("start reported");
                StartReport::Reported
            }
            Err(e) => {
                tracing::warn!(error = %e, "start report not accepted; stopping the execution");
                signals.stop.cancel();
                StartReport::Refused
            }
        }
    };
    let (start, out) = tokio::join!(report, supervision);
    (out, start)
}

/// The job's redactor. Once per execution (not again on adoption), the run's log gets the
/// presence line of its secret environment (`NAME=present` / `NAME=absent`), never values.
async fn redactor_of(
    job: &Job,
    adopted: bool,
    logs: &mpsc::Sender<OutputChunk>,
) -> Option<Arc<Redactor>> {
    let env = &job.secret_env;
    let redactor = match Redactor::new(env.values()) {
        Ok(r) => Arc::new(r),
        Err(e) => {
            tracing::error!(error = %e, "cannot mask this run's secrets; not following its output");
            return None;
        }
    };
    if !env.is_empty() {
        tracing::info!(env = %env, "secret environment");
        for (name, value) in env.iter() {
            if value.len() < MIN_SECRET_VALUE_BYTES {
                tracing::warn!(
                    name,
                    "value shorter than {MIN_SECRET_VALUE_BYTES} bytes: delivered but not masked in logs"
                );
            }
        }
        if !adopted {
            let line = format!("[drover] {env}\n");
            // A closed channel only means nobody ships logs any more.
            let _ = logs
                .send(OutputChunk {
                    source: OutputSource::Stderr,
                    data: line.into_bytes(),
                    at: None,
                })
                .await;
        }
    }
    Some(redactor)
}

/// Inline artifacts: at most this many bytes in all (well under the API's 1 MiB)...
const INLINE_BYTES: u64 = 256 * 1024;
/// ...and this many files; more go through UploadArtifacts.
const INLINE_FILES: usize = 64;

/// What the completion report says of the attempt's files.
#[derive(Debug)]
enum Artifacts {
    /// None kept (a hand-back, no workspace, or the upload failed).
    None,
    /// Streamed through UploadArtifacts: the upload id.
    Uploaded(String),
    /// Small enough to ride in the report itself: one call and fewer statements, and the
    /// API stores them in one step (most runs: the four `.drover/` records and a few
    /// outputs).
    Inline(Vec<pb::InlineArtifact>),
}

impl std::fmt::Display for Artifacts {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Artifacts::None => f.write_str("none"),
            Artifacts::Uploaded(id) => write!(f, "upload {id}"),
            Artifacts::Inline(files) => write!(f, "{} inline", files.len()),
        }
    }
}

/// Collects the workspace's files (the spec's `outputs`, plus `.drover/`) and the `records`
/// made in memory: inline when they are small, else uploaded. [`Artifacts::None`] when a
/// workspace that should exist (`in_directory`) is gone (a re-adopted execution whose
/// workspace was lost); a mock run without one sends its records and whatever it wrote.
async fn upload_workspace(
    ctx: &RunContext,
    job: &Job,
    in_directory: bool,
    records: Vec<Record>,
    stop: &tokio_util::sync::CancellationToken,
) -> Result<Artifacts, ApiError> {
    if in_directory && tokio::fs::metadata(&job.workspace).await.is_err() {
        tracing::warn!(workspace = %job.workspace.display(), "no workspace to upload");
        return Ok(Artifacts::None);
    }
    let mut collected = transfer::collect(&job.workspace, &job.spec.outputs, INLINE_BYTES)
        .await
        .map_err(|e| ApiError::Permanent {
            code: tonic::Code::Internal,
            message: e.to_string(),
        })?;
    collected.add_records(&job.workspace, records);
    for (path, why) in &collected.skipped {
        tracing::warn!(%path, %why, "workspace file not uploaded");
    }
    let files = collected.files.len();
    let bytes: u64 = collected.files.iter().map(|f| f.entry.size).sum();
    let collected = if files <= INLINE_FILES {
        match collected.into_inline() {
            Ok(inline) => {
                tracing::debug!(files, bytes, "artifacts go inline with the completion");
                return Ok(Artifacts::Inline(inline));
            }
            Err(collected) => collected,
        }
    } else {
        collected
    };
    let uploaded = ctx
        .api
        .upload_artifacts(job.run_id, job.lease_epoch, collected.files, stop)
        .await?;
    tracing::info!(files, bytes, upload_id = %uploaded.upload_id, "artifacts uploaded");
    Ok(Artifacts::Uploaded(uploaded.upload_id))
}
