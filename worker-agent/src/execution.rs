//! The first half of an attempt: from an `Execute` command (or a container found at start-up,
//! see [`crate::reconcile`]) to a started or adopted process.
//!
//! 1. claim the lease locally (a duplicate of a lease already executing is acked and dropped);
//! 2. `GetAssignment` — stale or unknown leases are acked and dropped; a cancelled run is
//!    flagged;
//! 3. if a process for this lease already exists here, adopt it; otherwise, unless the run
//!    was cancelled (report CANCELLED, "cancelled before start") or the agent is draining
//!    (report HANDED_BACK), start it — then ack: from here Docker is the journal;
//! 4. [`crate::attempt::follow`] does the rest.
//!
//! Every failure here ends this run's attempt (reported, or left to lease expiry); none of
//! them stops the agent.

use std::sync::Arc;

use drover_core::convert::{raw_spec_from_proto, state_from_proto};
use drover_core::ids::{AgentId, LeaseEpoch, RunId, TenantId};
use drover_core::observe::names;
use drover_core::spec::{PullPolicy, RunSpec};
use drover_core::state::RunState;
use drover_proto::v1 as pb;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::api::{ApiClient, ApiError, Patience};
use crate::attempt::follow;
use crate::consumer::CommandAck;
use crate::executor::{ExecError, Executor, FoundExecution, FoundStatus, Job, execution_name};
use crate::journal::ExecutionJournal;
use crate::outcome::Verdict;
use crate::running::{RunClaim, RunningRuns};
use crate::secret_env::{SecretEnv, host_var};
use crate::settle::{self, Execution};
use crate::transfer;
use crate::workspace::Workspaces;

/// Retries of `GetAssignment` before the command goes back to the queue.
const ASSIGNMENT_RETRIES: usize = 8;

/// What every execution shares.
pub struct RunContext {
    pub api: ApiClient,
    pub executor: Arc<dyn Executor>,
    pub agent_id: AgentId,
    pub runs: RunningRuns,
    /// Fires when the agent starts draining: nothing new is started from then on; leases
    /// not yet started are handed back.
    pub draining: CancellationToken,
    /// Fires once the drain timeout has passed: executions still running are killed and
    /// handed back. Every lease's hand-back signal descends from it.
    pub hand_back: CancellationToken,
    pub journal: ExecutionJournal,
    /// Per-attempt workspace directories.
    pub workspaces: Workspaces,
    /// How long a start waits to be reported (`start_fold_ms`): a run ending sooner reports
    /// it with its completion.
    pub start_fold: std::time::Duration,
}

/// A decoded `AgentCommand::Execute`.
#[derive(Debug, Clone)]
pub struct ExecuteCommand {
    pub run_id: RunId,
    pub tenant_id: TenantId,
    pub attempt: i32,
    pub lease_epoch: LeaseEpoch,
    /// The W3C trace context the command arrived with (the dispatcher's assignment).
    pub traceparent: Option<String>,
}

pub async fn execute(ctx: Arc<RunContext>, cmd: ExecuteCommand, ack: CommandAck) {
    let span = tracing::info_span!(
        "run",
        otel.name = "agent.execute",
        run_id = %cmd.run_id,
        attempt = cmd.attempt,
        epoch = cmd.lease_epoch.0,
        agent_id = %ctx.agent_id,
        tenant = %cmd.tenant_id,
        trace_id = tracing::field::Empty,
    );
    drover_core::telemetry::adopt(&span, cmd.traceparent.as_deref());
    execute_inner(&ctx, cmd, ack).instrument(span).await;
}

async fn execute_inner(ctx: &RunContext, cmd: ExecuteCommand, ack: CommandAck) {
    let (run_id, epoch) = (cmd.run_id, cmd.lease_epoch);
    let Some(claim) = ctx.runs.claim(run_id, epoch, &ctx.hand_back) else {
        tracing::info!("this lease is already executing here; dropping the duplicate command");
        ack.ack().await;
        return;
    };
    let stop = claim.signals().stop.clone();

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
    let fallback_tenant = cmd.tenant_id.to_string();
    let Some(assigned) = Assigned::read(ctx, assignment, &fallback_tenant, &claim).await else {
        ack.ack().await;
        return;
    };
    let found = match ctx.executor.find(&assigned.job).await {
        Ok(found) => found,
        Err(e) => {
            tracing::error!(error = %e, "could not look for an existing execution; failing the attempt");
            settle::report_verdict(ctx, run_id, epoch, Verdict::start_failed(), &stop).await;
            ack.ack().await;
            return;
        }
    };
    proceed(ctx, claim, assigned, found, Some(ack)).await;
}

/// A current assignment, read and checked.
pub struct Assigned {
    pub job: Job,
    pub state: Option<RunState>,
}

impl Assigned {
    /// The job of a current assignment. `None` when there is nothing to execute: the run is
    /// already finished, or its spec is unusable (then the attempt is reported failed). A
    /// cancel the API already knows of is signalled on the claim.
    pub async fn read(
        ctx: &RunContext,
        assignment: pb::GetAssignmentResponse,
        fallback_tenant: &str,
        claim: &RunClaim,
    ) -> Option<Assigned> {
        let (run_id, epoch) = claim.lease();
        let state = state_from_proto(assignment.state);
        if state.is_some_and(RunState::is_terminal) {
            tracing::info!(?state, "run already finished; nothing to execute");
            return None;
        }
        if assignment.cancel_requested {
            tracing::info!("the run was cancelled");
            claim.signals().cancel.cancel();
        }
        let spec = match parse_spec(assignment.spec) {
            Ok(s) => s,
            Err(msg) => {
                tracing::error!(error = %msg, "assignment spec is unusable; failing the attempt");
                let verdict = Verdict::failed(format!("invalid_spec: {msg}"));
                settle::report_verdict(ctx, run_id, epoch, verdict, &claim.signals().stop).await;
                return None;
            }
        };
        let secret_env = match SecretEnv::build(&spec, assignment.secret_env, host_var) {
            Ok(env) => env,
            Err(missing) => {
                tracing::error!(reason = %missing, "secrets of the run were not delivered; failing the attempt");
                let verdict = Verdict::failed(missing.to_string());
                settle::report_verdict(ctx, run_id, epoch, verdict, &claim.signals().stop).await;
                return None;
            }
        };
        let job = Job {
            secret_env,
            run_id,
            attempt: assignment.attempt,
            lease_epoch: epoch,
            // The API's word wins; the caller's copy covers an API that leaves it out.
            tenant_id: if assignment.tenant_id.is_empty() {
                fallback_tenant.to_owned()
            } else {
                assignment.tenant_id
            },
            agent_id: ctx.agent_id.clone(),
            spec,
            workspace: ctx
                .workspaces
                .dir(&execution_name(run_id, assignment.attempt, epoch)),
        };
        Some(Assigned { job, state })
    }
}

fn parse_spec(spec: Option<pb::RunSpec>) -> Result<RunSpec, String> {
    let raw = raw_spec_from_proto(spec.ok_or("the assignment has no spec")?);
    raw.validate().map_err(|e| e.to_string())
}

/// Adopts `found` if its process was started, else starts the job (unless cancelled or
/// draining), then follows the execution to its end. `ack` is the command to settle once
/// Docker holds the execution (none for a container found at start-up).
pub async fn proceed(
    ctx: &RunContext,
    claim: RunClaim,
    assigned: Assigned,
    found: Option<FoundExecution>,
    ack: Option<CommandAck>,
) {
    let Assigned { job, state } = assigned;
    let signals = claim.signals().clone();
    let (run_id, epoch) = (job.run_id, job.lease_epoch);

    if let Some(found) = found.as_ref().filter(|f| f.status != FoundStatus::Created) {
        if let Some(ack) = ack {
            ack.ack().await;
        }
        let started = found.adopted();
        tracing::info!(container = %started.handle.name, status = ?found.status, running_for_s = found.running_for.as_secs(), "adopting the existing execution");
        let execution = Execution {
            run_id,
            attempt: job.attempt,
            epoch,
            handle: &started.handle,
        };
        let live = found.status == FoundStatus::Running;
        if live {
            ctx.journal.adopted(execution.entry(ctx));
        } else {
            ctx.journal.found_exited(execution.entry(ctx));
        }
        follow(ctx, claim, job, started, Instant::now(), state, live).await;
        return;
    }

    // Nothing started yet: a created-but-never-started container may be there.
    let unstarted = if signals.cancel.is_cancelled() {
        Some(Verdict::cancelled_before_start())
    } else if ctx.draining.is_cancelled() {
        Some(Verdict::handed_back_before_start())
    } else if state == Some(RunState::Running) && found.is_none() {
        // The API saw it start under this lease, but no container is left here.
        tracing::error!("the run started under this lease but its container is gone");
        Some(Verdict::lost_track())
    } else {
        None
    };
    if let Some(verdict) = unstarted {
        tracing::info!(reason = %verdict.reason, "not starting the execution");
        if let Some(created) = &found {
            settle::remove(ctx, &created.handle).await;
        }
        settle::report_verdict(ctx, run_id, epoch, verdict, &signals.stop).await;
        if let Some(ack) = ack {
            ack.ack().await;
        }
        return;
    }

    // The workspace (inputs, request.json) is made before the start, on the backend's word
    // that it can run the job at all.
    let prepared = match ctx.executor.name_of_job(&job) {
        Ok(executor) => prepare_workspace(ctx, &job, executor, &signals.stop).await,
        Err(e) => Err(e),
    };
    let start_call = Instant::now();
    let started = match prepared {
        Ok(()) => {
            let span = tracing::info_span!("agent.start", executor = ctx.executor.name());
            ctx.executor.start(&job).instrument(span).await
        }
        Err(e) => Err(e),
    };
    let started = match started {
        Ok(s) => s,
        Err(e) => {
            let verdict = match e {
                ExecError::ImageUnavailable { image, reason } => {
                    tracing::warn!(%image, %reason, "image unavailable on this host; failing the attempt");
                    if job.spec.image_pull_policy == PullPolicy::Always {
                        Verdict::image_pull_failed(&image)
                    } else {
                        Verdict::image_unavailable(&image)
                    }
                }
                ExecError::ExecutorUnavailable { requested, allowed } => {
                    tracing::warn!(%requested, %allowed, "the spec asks for an executor this agent does not allow; failing the attempt");
                    Verdict::executor_unavailable(&requested, &allowed)
                }
                ExecError::InputsUnavailable {
                    reason,
                    infrastructure,
                } => {
                    tracing::warn!(%reason, "could not seed the workspace from inputs_from_run; failing the attempt");
                    Verdict::inputs_unavailable(&reason, infrastructure)
                }
                ExecError::Workspace(e) => {
                    tracing::error!(error = %e, "could not prepare the workspace; failing the attempt");
                    Verdict::workspace_failed()
                }
                e => {
                    tracing::error!(error = %e, "could not start the execution; failing the attempt");
                    Verdict::start_failed()
                }
            };
            if settle::report_verdict(ctx, run_id, epoch, verdict, &signals.stop).await {
                ctx.workspaces.remove(&job.name()).await;
            }
            if let Some(ack) = ack {
                ack.ack().await;
            }
            return;
        }
    };
    let started_at = Instant::now();
    metrics::histogram!(names::CONTAINER_START).record((started_at - start_call).as_secs_f64());
    metrics::counter!(names::EXECUTIONS_STARTED).increment(1);
    let execution = Execution {
        run_id,
        attempt: job.attempt,
        epoch,
        handle: &started.handle,
    };
    if started.adopted {
        ctx.journal.adopted(execution.entry(ctx));
    } else {
        ctx.journal.started(execution.entry(ctx));
    }
    if let Some(ack) = ack {
        ack.ack().await;
    }
    tracing::info!(container = %started.handle.name, container_id = %started.handle.id, adopted = started.adopted, "execution started");
    follow(ctx, claim, job, started, started_at, state, true).await;
    metrics::histogram!(names::EXECUTION_DURATION).record(started_at.elapsed().as_secs_f64());
}

/// Makes the job's workspace: seeded from `inputs_from_run` when the spec names one (its
/// `.drover/` records describe that run and are left out), then the inline inputs and
/// `request.json`; nothing for a job that needs no directory
/// ([`crate::workspace::Workspaces::needs_directory`]).
async fn prepare_workspace(
    ctx: &RunContext,
    job: &Job,
    executor: &str,
    stop: &CancellationToken,
) -> Result<(), ExecError> {
    let workspace = |e: crate::workspace::WorkspaceError| ExecError::Workspace(e.to_string());
    if !ctx.workspaces.needs_directory(job, executor) {
        // Nothing to put there before the start (its request.json is made at the end, in
        // memory). A leftover of a start of this lease that never happened must not be
        // taken for this run's files.
        if std::fs::symlink_metadata(&job.workspace).is_ok() {
            ctx.workspaces.remove(&job.name()).await;
        }
        return Ok(());
    }
    if job.spec.inputs_from_run.is_none() {
        return ctx
            .workspaces
            .prepare(job, executor)
            .await
            .map_err(workspace);
    }
    ctx.workspaces.create(job).await.map_err(workspace)?;
    let seeded = match ctx
        .api
        .download_inputs(job.run_id, job.lease_epoch, stop)
        .await
    {
        Ok(stream) => transfer::seed(&job.workspace, stream).await,
        Err(e) => Err(e.into()),
    };
    match seeded {
        Ok(paths) => tracing::info!(files = paths.len(), "workspace seeded from inputs_from_run"),
        Err(e) => {
            // Transient API trouble is the host's problem (retried); anything else (the source
            // run gone or unfinished, a corrupt or unsafe file) will not change on a retry.
            let infrastructure = matches!(
                e,
                transfer::TransferError::Api(ApiError::Transient { .. })
                    | transfer::TransferError::Io { .. }
            );
            return Err(ExecError::InputsUnavailable {
                reason: e.to_string(),
                infrastructure,
            });
        }
    }
    ctx.workspaces
        .write_inputs(job, executor)
        .await
        .map_err(workspace)
}
