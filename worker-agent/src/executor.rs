//! The seam between *what* to run (a leased attempt of a run) and *how* (Docker, a local
//! process, or a simulated mock run). The agent's lifecycle code only talks to [`Executor`],
//! so a new backend is one more implementation, not a change to leasing or reporting.
//!
//! Contract every implementation keeps:
//! - [`Executor::start`] is idempotent per (run, attempt, epoch): a redelivered command finds
//!   the existing execution and adopts it instead of starting a second one, and an execution
//!   that already finished is never restarted. The backend is the agent's durable journal.
//! - Images are pulled only as the spec's pull policy allows; an image that cannot be had is
//!   [`ExecError::ImageUnavailable`].
//! - The job's workspace directory ([`Job::workspace`]) exists, holds the inputs and
//!   `.drover/request.json` before [`Executor::start`] is called; the executor runs the
//!   process in it (Docker: bind-mounted at `/workspace`). The one exception is a mock job
//!   with no inputs (`Workspaces::needs_directory`): it may have no directory, and the mock
//!   creates one only if it writes files there.
//! - Errors carry backend text for the agent's logs only; what the API (and so clients) sees is
//!   chosen by the caller.
//! - [`Executor::list`] finds every execution this agent left on the host (labelled with its
//!   agent id), so a restarted agent re-adopts, reports or removes them instead of running
//!   anything twice.

use std::fmt;
use std::path::PathBuf;
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_core::ids::{AgentId, LeaseEpoch, RunId};
use drover_core::spec::RunSpec;
use futures::future::BoxFuture;
use futures::stream::BoxStream;

use crate::secret_env::SecretEnv;

/// One leased attempt of a run, with its validated spec: everything an executor needs.
#[derive(Debug, Clone)]
pub struct Job {
    pub run_id: RunId,
    pub attempt: u32,
    pub lease_epoch: LeaseEpoch,
    /// As the API sent it; used for labels only.
    pub tenant_id: String,
    pub agent_id: AgentId,
    pub spec: RunSpec,
    /// Tenant secrets and host pass-through variables for the process environment only
    /// (added to `spec.env`); its `Debug` shows names only.
    pub secret_env: SecretEnv,
    /// The attempt's host directory (see [`crate::workspace`]).
    pub workspace: PathBuf,
}

/// `drover-<run_id>-<attempt>-<epoch>`: the one name of a lease's execution in every backend
/// (container name, workspace directory, state files), so a redelivery or a restarted agent
/// finds it instead of starting a second one.
pub fn execution_name(run_id: RunId, attempt: u32, epoch: LeaseEpoch) -> String {
    format!("drover-{run_id}-{attempt}-{epoch}")
}

impl Job {
    /// See [`execution_name`].
    pub fn name(&self) -> String {
        execution_name(self.run_id, self.attempt, self.lease_epoch)
    }

    /// The execution time limit, counted from the process start.
    pub fn timeout(&self) -> Duration {
        Duration::from_secs(u64::from(self.spec.timeout_secs))
    }

    /// On cancel, how long the process gets between SIGTERM and SIGKILL.
    pub fn cancel_grace(&self) -> Duration {
        Duration::from_secs(u64::from(self.spec.cancel_grace_secs))
    }
}

/// Identifies a started execution (a container id and name, a process id, …).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ExecHandle {
    /// Backend id reported to the API as `container_id`.
    pub id: String,
    /// Human-readable, deterministic name.
    pub name: String,
}

/// What [`Executor::start`] found or did.
#[derive(Debug, Clone)]
pub struct Started {
    pub handle: ExecHandle,
    /// How long the process has been running already: zero when just started, more when an
    /// existing execution was adopted after a redelivery. The timeout budget is reduced by it.
    pub running_for: Duration,
    /// True when the process had been started before this call (it is running or has
    /// exited): this call adopted it. False when this call started the process, which is
    /// what the execution journal records as a new execution.
    pub adopted: bool,
}

/// Where a found execution stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FoundStatus {
    /// Created but never started (the agent died between create and start).
    Created,
    Running,
    /// Exited (or dead); its exit code and output are still there.
    Exited,
}

/// An execution the backend already holds for this agent, as [`Executor::list`] finds it.
#[derive(Debug, Clone)]
pub struct FoundExecution {
    pub handle: ExecHandle,
    pub run_id: RunId,
    pub attempt: u32,
    pub lease_epoch: LeaseEpoch,
    pub status: FoundStatus,
    /// How long the process has been running (or ran, if exited); zero if never started.
    pub running_for: Duration,
}

impl FoundExecution {
    /// The [`Started`] of adopting it (running or exited; never for [`FoundStatus::Created`]).
    pub fn adopted(&self) -> Started {
        Started {
            handle: self.handle.clone(),
            running_for: self.running_for,
            adopted: true,
        }
    }
}

/// How [`Executor::terminate`] ended the process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Termination {
    /// It exited within the grace period (or was not running any more).
    Exited,
    /// It outlived the grace period and was killed.
    Killed,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputSource {
    Stdout,
    Stderr,
}

/// A piece of the process's output, in the order it was written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputChunk {
    pub source: OutputSource,
    pub data: Vec<u8>,
    /// When the process wrote it, if the backend records that. Lets an adopted execution
    /// skip, in its live logs, what an earlier life of the agent already shipped.
    pub at: Option<DateTime<Utc>>,
}

/// How the process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ExitStatus {
    /// `None` when the backend could not tell (e.g. the execution vanished).
    pub code: Option<i32>,
    /// The kernel killed it for exceeding its memory limit.
    pub oom_killed: bool,
}

#[derive(Debug, Clone, thiserror::Error)]
pub enum ExecError {
    /// The image is not on this host and the pull policy forbids pulling it, or the pull
    /// failed. `reason` is for logs and the run's reason.
    #[error("image {image} is unavailable: {reason}")]
    ImageUnavailable { image: String, reason: String },
    /// The spec names an executor this agent does not run.
    #[error("executor {requested} is not allowed on this agent (allowed: {allowed})")]
    ExecutorUnavailable { requested: String, allowed: String },
    /// The workspace could not be prepared (inputs, request file, ownership).
    #[error("workspace: {0}")]
    Workspace(String),
    /// `inputs_from_run` could not be seeded into the workspace. `infrastructure`: the API
    /// or this host failed, so another attempt may do better.
    #[error("inputs_from_run: {reason}")]
    InputsUnavailable {
        reason: String,
        infrastructure: bool,
    },
    /// The backend failed an operation; `message` is backend text, for logs only.
    #[error("{operation} failed: {message}")]
    Backend {
        operation: &'static str,
        message: String,
    },
}

impl ExecError {
    pub fn backend(operation: &'static str, err: impl fmt::Display) -> Self {
        ExecError::Backend {
            operation,
            message: err.to_string(),
        }
    }
}

/// Output of an execution, ending when the process has exited (or the stream broke).
pub type OutputStream = BoxStream<'static, Result<OutputChunk, ExecError>>;

/// Runs jobs on this host. Object-safe (boxed futures) so the agent can pick a backend at
/// run time and hold it as `Arc<dyn Executor>`.
pub trait Executor: Send + Sync + 'static {
    /// Reported to the API at registration and in `ReportStarted` ("docker", "process", "mock").
    fn name(&self) -> &'static str;

    /// The executor that runs `handle`: [`Executor::name`] except for the agent's selector
    /// over several backends.
    fn name_for(&self, _handle: &ExecHandle) -> &'static str {
        self.name()
    }

    /// The backend that would run `job` (its spec's executor, or this agent's own), or why
    /// it cannot be run here.
    fn name_of_job(&self, _job: &Job) -> Result<&'static str, ExecError> {
        Ok(self.name())
    }

    /// Creates and starts the job's execution, or adopts the one that already exists.
    fn start<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>>;

    /// Follows stdout and stderr from the beginning until the process exits, with the time
    /// each chunk was written when the backend knows it.
    fn output(&self, handle: &ExecHandle) -> OutputStream;

    /// Waits for the process to exit and says how it ended.
    fn wait<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>>;

    /// Kills the process at once. Killing one that already exited is not an error.
    fn kill<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>>;

    /// Asks the process to stop (SIGTERM), waits up to `grace` for it to exit, then kills it
    /// (SIGKILL). Returns once it is no longer running. One that already exited is not an
    /// error ([`Termination::Exited`]).
    fn terminate<'a>(
        &'a self,
        handle: &'a ExecHandle,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Termination, ExecError>>;

    /// Every execution on this host that belongs to `agent` (created, running or exited).
    /// Executions whose labels cannot be read are skipped with a warning, for operators.
    fn list<'a>(
        &'a self,
        agent: &'a AgentId,
    ) -> BoxFuture<'a, Result<Vec<FoundExecution>, ExecError>>;

    /// The job's existing execution, if any, without creating or starting anything.
    fn find<'a>(&'a self, job: &'a Job)
    -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>>;

    /// Deletes every trace of the execution. Removing one that is gone is not an error.
    fn remove<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>>;
}

/// A job of `spec` for unit tests, with a fresh run id (attempt 1, epoch 1) and its workspace
/// created under `root`.
#[cfg(test)]
pub(crate) fn test_job(root: &std::path::Path, spec: RunSpec) -> Job {
    #[allow(clippy::unwrap_used, reason = "test helper: fixed valid input")]
    let agent_id = AgentId::parse("a1").unwrap();
    let (run_id, attempt, epoch) = (RunId::new(), 1, LeaseEpoch(1));
    let workspace = root.join(execution_name(run_id, attempt, epoch));
    #[allow(clippy::unwrap_used, reason = "test helper: a temp dir")]
    std::fs::create_dir_all(&workspace).unwrap();
    Job {
        secret_env: Default::default(),
        run_id,
        attempt,
        lease_epoch: epoch,
        tenant_id: "t".into(),
        agent_id,
        spec,
        workspace,
    }
}
