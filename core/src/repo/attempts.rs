//! How an attempt ends, and what follows from it, decided in one place for every path that
//! ends one: the agent's completion report (API), an expired lease or a backstop timeout
//! (dispatcher reaper), a draining agent handing a run back. Each call locks the run row,
//! decides (retry with backoff, fail, dead-letter, cancel), applies one guarded transition and
//! writes its consequences — the next attempt's delayed dispatch message, the dead-letter
//! record — in the caller's transaction, so no end is half-applied.

use sqlx::PgConnection;

use super::runs::{self, EventRecord, RunRecord, Transition, TransitionPatch};
use crate::error::{CoreError, Refusal};
use crate::ids::RunId;
use crate::messages::{self, DeadRunRecord};
use crate::retry::{self, Decision, Failure};
use crate::state::RunState;
use crate::topology;

/// How the attempt ended, as reported or observed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EndKind {
    Succeeded,
    Failed(Failure),
    /// Stopped on a client's cancel.
    Cancelled,
    /// Killed at its execution timeout.
    TimedOut,
    /// A draining agent gave the lease back without a result: re-queued as the same
    /// attempt, not counted against `max_attempts`.
    HandedBack,
}

/// The end of one attempt.
#[derive(Debug, Clone)]
pub struct AttemptEnd {
    pub kind: EndKind,
    pub exit_code: Option<i32>,
    /// Output tail and whether it is truncated; `None` keeps what is stored.
    pub output: Option<(Vec<u8>, bool)>,
    pub reason: String,
}

/// Who may end the attempt: the lease holder (agent + epoch), or the reaper (epoch only).
#[derive(Debug, Clone)]
pub struct Holder {
    pub agent: Option<String>,
    pub epoch: i64,
    /// Set when the holder did not report the end itself (lease expired, backstop timeout):
    /// the epoch is bumped so anything the old holder still sends is refused as stale.
    pub fence: bool,
}

/// Locks the run, decides what the end means, applies it. Refusals (stale epoch, wrong agent,
/// already ended) change nothing and come back as [`CoreError::Refused`].
pub async fn end_attempt(
    conn: &mut PgConnection,
    run_id: RunId,
    holder: &Holder,
    end: AttemptEnd,
) -> Result<(RunRecord, EventRecord), CoreError> {
    end_attempt_with_artifacts(conn, run_id, holder, end, None, None).await
}

/// [`end_attempt`] plus the holder's artifact upload: it must be this run's, this agent's,
/// this epoch's and complete, or the whole end is refused ([`Refusal::Upload`]); when the end
/// is terminal its manifest is committed in this same transaction (an end that re-queues
/// commits nothing and leaves the upload to the garbage collector).
/// `locked`: the run as this transaction already holds it locked (a start folded into the
/// same report just updated it), so it is not read again.
pub async fn end_attempt_with_artifacts(
    conn: &mut PgConnection,
    run_id: RunId,
    holder: &Holder,
    end: AttemptEnd,
    upload: Option<uuid::Uuid>,
    locked: Option<RunRecord>,
) -> Result<(RunRecord, EventRecord), CoreError> {
    let run = match locked {
        Some(run) if run.id == run_id => run,
        _ => runs::lock(conn, run_id)
            .await?
            .ok_or(CoreError::Refused(Refusal::NotFound))?,
    };
    let (to, patch, reason, delay_ms) = decide(&run, &end);
    let t = Transition {
        expected_epoch: Some(holder.epoch),
        expected_agent: holder.agent.clone(),
        expected_attempt: Some(run.attempt),
        reason: Some(reason),
        patch,
        fence: holder.fence,
        frees_capacity: to.is_terminal() || to == RunState::Queued,
        ..Transition::new(run_id, to)
    };
    let (run, event) = runs::transition(conn, &t).await?;
    if let Some(upload) = upload {
        let agent = holder.agent.as_deref();
        let terminal = run.state.is_terminal();
        super::artifacts::commit_upload(conn, run_id, upload, agent, holder.epoch, terminal)
            .await?;
    }
    match run.state {
        RunState::Queued => runs::enqueue_run_message_after(conn, &run, delay_ms).await?,
        RunState::DeadLettered => publish_dead_record(conn, &run).await?,
        _ => {}
    }
    // Counted once the end's last statement succeeded, before the caller's commit: a commit
    // that fails after this (connection lost at that instant) over-counts one retry.
    if matches!(
        t.patch,
        TransitionPatch::Requeue {
            next_attempt: true,
            ..
        }
    ) {
        metrics::counter!(crate::observe::names::RETRIES).increment(1);
    }
    Ok((run, event))
}

/// The target state, its patch, the event reason and the dispatch delay (for QUEUED).
fn decide(run: &RunRecord, end: &AttemptEnd) -> (RunState, TransitionPatch, String, i64) {
    let finish = || TransitionPatch::Finish {
        exit_code: end.exit_code,
        output: end.output.clone(),
    };
    let cancelling = run.cancel_requested_at.is_some();
    match end.kind {
        EndKind::Succeeded => (RunState::Succeeded, finish(), end.reason.clone(), 0),
        EndKind::Cancelled => (RunState::Cancelled, finish(), end.reason.clone(), 0),
        EndKind::TimedOut => (RunState::TimedOut, finish(), end.reason.clone(), 0),
        EndKind::HandedBack if cancelling => (
            RunState::Cancelled,
            finish(),
            format!("cancelled ({}); handed back before finishing", end.reason),
            0,
        ),
        EndKind::HandedBack => (
            RunState::Queued,
            TransitionPatch::Requeue {
                next_attempt: false,
                delay_ms: 0,
                exit_code: None,
                output: None,
            },
            format!("{}; re-queued, not counted as a failed attempt", end.reason),
            0,
        ),
        EndKind::Failed(Failure::LostLease) if cancelling => (
            RunState::Cancelled,
            finish(),
            format!(
                "cancelled; {} before the agent confirmed the cancel",
                end.reason
            ),
            0,
        ),
        EndKind::Failed(failure) => {
            let decision = retry::decide(
                &run.spec.retry,
                failure,
                run.attempt,
                run.max_attempts,
                fastrand::f64(),
            );
            match decision {
                Decision::Retry { delay } => {
                    let ms = i64::try_from(delay.as_millis()).unwrap_or(i64::MAX);
                    let reason = format!(
                        "{}; attempt {} of {} failed, attempt {} in {:.1} s",
                        end.reason,
                        run.attempt,
                        run.max_attempts,
                        run.attempt + 1,
                        delay.as_secs_f64()
                    );
                    let patch = TransitionPatch::Requeue {
                        next_attempt: true,
                        delay_ms: ms,
                        exit_code: end.exit_code,
                        output: end.output.clone(),
                    };
                    (RunState::Queued, patch, reason, ms)
                }
                Decision::Exhausted => (
                    RunState::DeadLettered,
                    finish(),
                    format!(
                        "{}; all {} attempts used, dead-lettered",
                        end.reason, run.max_attempts
                    ),
                    0,
                ),
                Decision::Final => (RunState::Failed, finish(), end.reason.clone(), 0),
            }
        }
    }
}

/// Sends the exhausted run's record to `drover.dead` (through `drover.dlx`) with the
/// transition, so operators find it beside the messages the broker dead-lettered.
async fn publish_dead_record(conn: &mut PgConnection, run: &RunRecord) -> Result<(), CoreError> {
    let record = DeadRunRecord {
        v: 1,
        kind: "run_exhausted".into(),
        run_id: run.id,
        tenant_id: run.tenant_id,
        attempt: run.attempt,
        reason: run.reason.clone().unwrap_or_default(),
    };
    super::outbox::enqueue(
        conn,
        run.tenant_id,
        topology::DEAD_LETTER_EXCHANGE,
        "",
        &messages::encode(&record),
    )
    .await
}
