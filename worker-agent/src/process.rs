//! [`Executor`] as a local child process: for hosts without Docker (and `drover dev` when no
//! daemon answers). No sandbox: the process runs as the agent's user.
//!
//! - The spec's argv is executed directly (no shell), in the attempt's workspace directory,
//!   with the spec's env on an empty environment plus `PATH` (the agent's) and
//!   `DROVER_WORKSPACE`. Resource limits and network isolation are not applied.
//! - The child leads its own process group: SIGTERM/SIGKILL go to the group, so whatever it
//!   spawned stops with it; when the child exits by itself the rest of its group is killed,
//!   as a container's processes die with its init.
//! - stdout and stderr are pipes to the agent, read in chunks stamped with the time they
//!   were read (the Docker executor's output stream, chunk for chunk).
//! - Re-adoption: before returning from a start, `<workspace_root>/<agent>/<name>.process.json`
//!   records the pid and its kernel start time. The agent is the child's parent, so after an
//!   agent restart the exit code of a process started by an earlier life cannot be read. Such
//!   a process is therefore never re-attached: [`Executor::list`] / [`Executor::find`] kill
//!   it (its group; only if the pid still has the recorded start time, so a reused pid is
//!   never hit) and report it exited with an unknown code, which the agent reports as an
//!   infrastructure error (retried while attempts remain). It never runs twice at once, and
//!   a lease whose state file exists is never started again.

use std::collections::HashMap;
use std::path::Path;
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_core::ids::{AgentId, LeaseEpoch, RunId};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use nix::sys::signal::{Signal, killpg};
use nix::unistd::Pid;
use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncReadExt};
use tokio::sync::{mpsc, watch};

use crate::executor::{
    ExecError, ExecHandle, Executor, ExitStatus, FoundExecution, FoundStatus, Job, OutputChunk,
    OutputSource, OutputStream, Started, Termination, execution_name,
};
use crate::state_file::StateFiles;

/// Output chunks buffered per execution between the pipes and the supervisor.
const OUTPUT_BUFFER: usize = 64;
/// Largest chunk read from a pipe at once.
const READ_CHUNK: usize = 64 * 1024;
/// After the child exits, how long what is left in its pipes may still be read (a
/// grandchild holding a pipe open must not keep the stream open forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_secs(2);

/// The per-execution state file, outside the workspace (it is not the run's output).
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateFile {
    pid: i32,
    /// Field 22 of `/proc/<pid>/stat`: tells the process from a later one with the same pid.
    start_ticks: u64,
    run_id: RunId,
    attempt: u32,
    lease_epoch: i64,
    started_at: DateTime<Utc>,
}

struct Proc {
    pid: i32,
    started_at: DateTime<Utc>,
    output: Mutex<Option<mpsc::Receiver<OutputChunk>>>,
    exit: watch::Receiver<Option<ExitStatus>>,
}

impl Proc {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// A process of an earlier life of the agent: gone (killed), exit code unknown.
    fn lost(pid: i32, started_at: DateTime<Utc>) -> Proc {
        let (_tx, exit) = watch::channel(Some(ExitStatus {
            code: None,
            oom_killed: false,
        }));
        Proc {
            pid,
            started_at,
            output: Mutex::new(None),
            exit,
        }
    }
}

/// Runs each job as a child process of the agent.
pub struct ProcessExecutor {
    /// In `<workspace_root>/<agent_id>`, next to the workspaces.
    states: StateFiles,
    procs: Mutex<HashMap<String, Arc<Proc>>>,
}

impl ProcessExecutor {
    pub fn new(agent_root: &Path) -> Self {
        Self {
            states: StateFiles::new(agent_root, ".process.json"),
            procs: Mutex::new(HashMap::new()),
        }
    }

    fn get(&self, name: &str) -> Option<Arc<Proc>> {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn insert(&self, name: &str, proc: Arc<Proc>) {
        self.procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.to_owned(), proc);
    }

    fn found(name: &str, state: &StateFile, proc: &Proc) -> FoundExecution {
        FoundExecution {
            handle: handle(name, proc.pid),
            run_id: state.run_id,
            attempt: state.attempt,
            lease_epoch: LeaseEpoch(state.lease_epoch),
            status: if proc.exited().is_some() {
                FoundStatus::Exited
            } else {
                FoundStatus::Running
            },
            running_for: since(proc.started_at),
        }
    }

    /// The execution named `name` as this life or an earlier one left it. A process of an
    /// earlier life is killed and remembered as lost.
    async fn lookup(&self, name: &str) -> Result<Option<(StateFile, Arc<Proc>)>, ExecError> {
        let Some(state) = self.states.read::<StateFile>(name).await? else {
            return Ok(None);
        };
        if let Some(proc) = self.get(name) {
            return Ok(Some((state, proc)));
        }
        if start_ticks(state.pid) == Some(state.start_ticks) {
            tracing::warn!(
                pid = state.pid,
                execution = name,
                "a process started by an earlier life of this agent is still running; killing it (its exit code could not be read)"
            );
            signal_group(state.pid, Signal::SIGKILL);
        }
        let proc = Arc::new(Proc::lost(state.pid, state.started_at));
        self.insert(name, proc.clone());
        Ok(Some((state, proc)))
    }

    async fn start_job(&self, job: &Job) -> Result<Started, ExecError> {
        let name = job.name();
        if let Some((_, proc)) = self.lookup(&name).await? {
            return Ok(Started {
                handle: handle(&name, proc.pid),
                running_for: since(proc.started_at),
                adopted: true,
            });
        }
        let argv = &job.spec.command;
        let mut cmd = tokio::process::Command::new(&argv[0]);
        cmd.args(&argv[1..]).env_clear();
        if let Some(path) = std::env::var_os("PATH") {
            cmd.env("PATH", path);
        }
        cmd.envs(&job.spec.env)
            .envs(job.secret_env.iter())
            .env("DROVER_WORKSPACE", &job.workspace)
            .current_dir(&job.workspace)
            .process_group(0)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(false);
        let started_at = Utc::now();
        let mut child = cmd
            .spawn()
            .map_err(|e| ExecError::backend("start process", e))?;
        let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) else {
            return Err(ExecError::backend("start process", "no pid"));
        };
        let state = StateFile {
            pid,
            start_ticks: start_ticks(pid).unwrap_or(0),
            run_id: job.run_id,
            attempt: job.attempt,
            lease_epoch: job.lease_epoch.0,
            started_at,
        };
        if let Err(e) = self.states.write(&name, &state).await {
            // Without the state file a restarted agent could not find it: do not run it.
            signal_group(pid, Signal::SIGKILL);
            let _ = child.wait().await;
            return Err(e);
        }

        let (tx, rx) = mpsc::channel(OUTPUT_BUFFER);
        let mut readers = Vec::new();
        if let Some(out) = child.stdout.take() {
            readers.push(tokio::spawn(read_pipe(
                out,
                OutputSource::Stdout,
                tx.clone(),
            )));
        }
        if let Some(err) = child.stderr.take() {
            readers.push(tokio::spawn(read_pipe(err, OutputSource::Stderr, tx)));
        }
        let (exit_tx, exit_rx) = watch::channel(None);
        tokio::spawn(async move {
            let status = child.wait().await;
            // What the child spawned dies with it, as in a container.
            signal_group(pid, Signal::SIGKILL);
            let status = match status {
                Ok(s) => ExitStatus {
                    code: exit_code(s),
                    oom_killed: false,
                },
                Err(e) => {
                    tracing::warn!(error = %e, pid, "could not read the exit status");
                    ExitStatus {
                        code: None,
                        oom_killed: false,
                    }
                }
            };
            let drain = futures::future::join_all(readers.iter_mut());
            if tokio::time::timeout(DRAIN_AFTER_EXIT, drain).await.is_err() {
                readers.iter().for_each(tokio::task::JoinHandle::abort);
            }
            let _ = exit_tx.send(Some(status));
        });
        let proc = Arc::new(Proc {
            pid,
            started_at,
            output: Mutex::new(Some(rx)),
            exit: exit_rx,
        });
        self.insert(&name, proc);
        tracing::info!(pid, execution = %name, "process started");
        Ok(Started {
            handle: handle(&name, pid),
            running_for: Duration::ZERO,
            adopted: false,
        })
    }

    async fn wait_for(&self, handle: &ExecHandle) -> ExitStatus {
        let Some(proc) = self.get(&handle.name) else {
            return ExitStatus {
                code: None,
                oom_killed: false,
            };
        };
        let mut exit = proc.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(status) => status.unwrap_or(ExitStatus {
                code: None,
                oom_killed: false,
            }),
            Err(_) => ExitStatus {
                code: None,
                oom_killed: false,
            },
        }
    }

    async fn terminate_proc(&self, handle: &ExecHandle, grace: Duration) -> Termination {
        let Some(proc) = self.get(&handle.name) else {
            return Termination::Exited;
        };
        if proc.exited().is_some() {
            return Termination::Exited;
        }
        signal_group(proc.pid, Signal::SIGTERM);
        tracing::info!(
            pid = proc.pid,
            grace_s = grace.as_secs(),
            "asked the process group to stop"
        );
        if tokio::time::timeout(grace, self.wait_for(handle))
            .await
            .is_ok()
        {
            return Termination::Exited;
        }
        signal_group(proc.pid, Signal::SIGKILL);
        tracing::info!(
            pid = proc.pid,
            "grace period over; killed the process group"
        );
        Termination::Killed
    }

    async fn list_all(&self) -> Result<Vec<FoundExecution>, ExecError> {
        let mut found = Vec::new();
        for name in self.states.names().await? {
            let name = name.as_str();
            match self.lookup(name).await {
                Ok(Some((state, proc))) => {
                    if execution_name(state.run_id, state.attempt, LeaseEpoch(state.lease_epoch))
                        == name
                    {
                        found.push(Self::found(name, &state, &proc));
                    } else {
                        tracing::warn!(
                            execution = name,
                            "process state does not match its name; leaving it to operators"
                        );
                    }
                }
                Ok(None) => {}
                Err(e) => {
                    tracing::warn!(error = %e, execution = name, "unreadable process state; leaving it to operators")
                }
            }
        }
        Ok(found)
    }
}

impl Executor for ProcessExecutor {
    fn name(&self) -> &'static str {
        "process"
    }

    fn start<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>> {
        self.start_job(job).boxed()
    }

    fn output(&self, handle: &ExecHandle) -> OutputStream {
        let rx = self
            .get(&handle.name)
            .and_then(|p| p.output.lock().ok().and_then(|mut o| o.take()));
        match rx {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (Ok(chunk), rx))
            })
            .boxed(),
            // Adopted from an earlier life, or followed already: nothing to read.
            None => futures::stream::empty().boxed(),
        }
    }

    fn wait<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
        async move { Ok(self.wait_for(handle).await) }.boxed()
    }

    fn kill<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        async move {
            if let Some(proc) = self.get(&handle.name)
                && proc.exited().is_none()
            {
                signal_group(proc.pid, Signal::SIGKILL);
            }
            Ok(())
        }
        .boxed()
    }

    fn terminate<'a>(
        &'a self,
        handle: &'a ExecHandle,
        grace: Duration,
    ) -> BoxFuture<'a, Result<Termination, ExecError>> {
        async move { Ok(self.terminate_proc(handle, grace).await) }.boxed()
    }

    fn list<'a>(
        &'a self,
        _agent: &'a AgentId,
    ) -> BoxFuture<'a, Result<Vec<FoundExecution>, ExecError>> {
        // The state directory is this agent's own (`<root>/<agent_id>`).
        self.list_all().boxed()
    }

    fn find<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>> {
        async move {
            let name = job.name();
            Ok(self
                .lookup(&name)
                .await?
                .map(|(state, proc)| Self::found(&name, &state, &proc)))
        }
        .boxed()
    }

    fn remove<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        async move {
            let proc = self
                .procs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .remove(&handle.name);
            if let Some(proc) = proc
                && proc.exited().is_none()
            {
                signal_group(proc.pid, Signal::SIGKILL);
            }
            self.states.remove(&handle.name).await
        }
        .boxed()
    }
}

fn handle(name: &str, pid: i32) -> ExecHandle {
    ExecHandle {
        id: format!("pid-{pid}"),
        name: name.to_owned(),
    }
}

fn since(t: DateTime<Utc>) -> Duration {
    (Utc::now() - t).to_std().unwrap_or(Duration::ZERO)
}

/// The exit code as Docker reports it: the code, or 128 + the signal that killed it.
fn exit_code(status: std::process::ExitStatus) -> Option<i32> {
    use std::os::unix::process::ExitStatusExt;
    status.code().or_else(|| status.signal().map(|s| 128 + s))
}

/// Signals the process group led by `pid`; one that is gone already is not an error.
fn signal_group(pid: i32, signal: Signal) {
    if let Err(e) = killpg(Pid::from_raw(pid), signal)
        && e != nix::errno::Errno::ESRCH
    {
        tracing::warn!(pid, %signal, error = %e, "could not signal the process group");
    }
}

/// The kernel start time of `pid` (clock ticks since boot), if it is alive.
fn start_ticks(pid: i32) -> Option<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // `comm` (field 2) may hold spaces and parentheses: count from the last ')'.
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_whitespace().nth(19)?.parse().ok()
}

async fn read_pipe(
    mut pipe: impl AsyncRead + Unpin,
    source: OutputSource,
    tx: mpsc::Sender<OutputChunk>,
) {
    let mut buf = vec![0u8; READ_CHUNK];
    loop {
        match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => {
                let chunk = OutputChunk {
                    source,
                    data: buf[..n].to_vec(),
                    at: Some(Utc::now()),
                };
                if tx.send(chunk).await.is_err() {
                    // Nobody follows the output any more; keep draining so the child never
                    // blocks on a full pipe.
                    while matches!(pipe.read(&mut buf).await, Ok(n) if n > 0) {}
                    return;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::spec::RawSpec;

    fn job(root: &Path, command: &[&str], env: &[(&str, &str)]) -> Job {
        let spec = RawSpec {
            image: "none".into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            ..Default::default()
        }
        .validate()
        .unwrap();
        crate::executor::test_job(root, spec)
    }

    async fn collect(exec: &ProcessExecutor, handle: &ExecHandle) -> (String, String) {
        let mut out = exec.output(handle);
        let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
        while let Some(Ok(chunk)) = out.next().await {
            match chunk.source {
                OutputSource::Stdout => stdout.extend(chunk.data),
                OutputSource::Stderr => stderr.extend(chunk.data),
            }
        }
        (
            String::from_utf8(stdout).unwrap(),
            String::from_utf8(stderr).unwrap(),
        )
    }

    #[tokio::test]
    async fn runs_argv_in_the_workspace_with_only_the_spec_env() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = ProcessExecutor::new(tmp.path());
        let j = job(
            tmp.path(),
            &[
                "sh",
                "-c",
                "echo \"$GREETING|$HOME|$DROVER_WORKSPACE\"; pwd; echo oops >&2; exit 3",
            ],
            &[("GREETING", "hi there")],
        );
        let started = exec.start(&j).await.unwrap();
        assert!(!started.adopted);
        let (stdout, stderr) = collect(&exec, &started.handle).await;
        let ws = j.workspace.to_string_lossy().into_owned();
        assert_eq!(stdout, format!("hi there||{ws}\n{ws}\n"));
        assert_eq!(stderr, "oops\n");
        let status = exec.wait(&started.handle).await.unwrap();
        assert_eq!(status.code, Some(3));

        // The same lease again is adopted, never started twice.
        let again = exec.start(&j).await.unwrap();
        assert!(again.adopted);
        let found = exec.find(&j).await.unwrap().unwrap();
        assert_eq!(found.status, FoundStatus::Exited);
        exec.remove(&started.handle).await.unwrap();
        assert!(exec.find(&j).await.unwrap().is_none());
    }

    #[tokio::test]
    async fn terminate_reaches_the_whole_group_and_kills_after_grace() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = ProcessExecutor::new(tmp.path());
        // A child that ignores TERM, with a grandchild that would outlive it.
        let j = job(
            tmp.path(),
            &[
                "sh",
                "-c",
                "trap '' TERM; sleep 300 & echo $! > grandchild; wait",
            ],
            &[],
        );
        let started = exec.start(&j).await.unwrap();
        let pidfile = j.workspace.join("grandchild");
        let grandchild = loop {
            if let Ok(text) = std::fs::read_to_string(&pidfile)
                && let Ok(pid) = text.trim().parse::<i32>()
            {
                break pid;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        };
        let termination = exec
            .terminate(&started.handle, Duration::from_millis(300))
            .await
            .unwrap();
        assert_eq!(termination, Termination::Killed);
        let status = exec.wait(&started.handle).await.unwrap();
        assert_eq!(status.code, Some(137));
        // The grandchild got the group's SIGKILL too (it may linger as a zombie until init
        // reaps it, so look at its state, not its existence).
        let mut gone = false;
        for _ in 0..100 {
            let alive = std::fs::read_to_string(format!("/proc/{grandchild}/stat"))
                .map(|s| !s.contains(") Z"))
                .unwrap_or(false);
            if !alive {
                gone = true;
                break;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        assert!(gone, "grandchild {grandchild} survived");
        exec.remove(&started.handle).await.unwrap();
    }

    #[tokio::test]
    async fn a_restarted_agent_kills_and_reports_what_an_earlier_life_started() {
        let tmp = tempfile::tempdir().unwrap();
        let first = ProcessExecutor::new(tmp.path());
        let j = job(tmp.path(), &["sleep", "300"], &[]);
        let started = first.start(&j).await.unwrap();
        let pid: i32 = started
            .handle
            .id
            .trim_start_matches("pid-")
            .parse()
            .unwrap();
        // A new life of the agent: same state directory, no memory.
        let second = ProcessExecutor::new(tmp.path());
        let found = second.list(&j.agent_id).await.unwrap();
        assert_eq!(found.len(), 1);
        assert_eq!(found[0].run_id, j.run_id);
        assert_eq!(found[0].status, FoundStatus::Exited);
        let status = second.wait(&found[0].handle).await.unwrap();
        assert_eq!(
            status.code, None,
            "the exit code of a lost process is unknown"
        );
        // Starting the lease again adopts it instead of running it twice.
        assert!(second.start(&j).await.unwrap().adopted);
        // The first life's child got SIGKILL.
        let status = first.wait(&started.handle).await.unwrap();
        assert_eq!(status.code, Some(137), "pid {pid}");
        second.remove(&found[0].handle).await.unwrap();
        assert!(second.list(&j.agent_id).await.unwrap().is_empty());
    }

    #[tokio::test]
    async fn a_missing_program_fails_the_start() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = ProcessExecutor::new(tmp.path());
        let j = job(tmp.path(), &["/nonexistent/program"], &[]);
        assert!(matches!(
            exec.start(&j).await,
            Err(ExecError::Backend { .. })
        ));
    }
}
