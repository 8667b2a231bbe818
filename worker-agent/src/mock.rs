//! [`Executor`] that runs nothing: a deterministic simulated run driven by the spec's
//! [`MockBehavior`] (duration, exit code, stdout/stderr lines, output files), for scale tests
//! with hundreds of agents and tens of thousands of runs. One tokio task and a few small
//! buffers per execution; no process, no container.
//!
//! The simulation: the `n` lines of a stream are printed at `duration * i / n` (stdout before
//! stderr at the same instant), the files are written into the workspace at the end (made
//! then if the run had none: a mock run without inputs starts with no directory), then
//! the "process" exits with the spec's code. SIGTERM (cancel) and SIGKILL end it at once with
//! 143 / 137 and no files, as a process that does not handle signals would. A spec without
//! `mock` simulates an instant, silent exit 0.
//!
//! The simulation lives in memory and dies with the agent, but each start is first recorded
//! (`<agent_root>/<name>.mock.json`, see [`crate::state_file`]), as the executor contract
//! asks: after a restart [`Executor::list`] and [`Executor::find`] report such an execution
//! exited with an unknown code (the agent reports an infrastructure error, retried while
//! attempts remain), and a redelivered or duplicated command for that lease never starts it
//! a second time. Without the record, a command redelivered because the agent was killed
//! between the start and the ack ran the same epoch twice (seen in the chaos smoke run).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::{DateTime, Utc};
use drover_core::ids::{AgentId, LeaseEpoch, RunId};
use drover_core::inputs::{InputFile, MockBehavior};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::executor::{
    ExecError, ExecHandle, Executor, ExitStatus, FoundExecution, FoundStatus, Job, OutputChunk,
    OutputSource, OutputStream, Started, Termination,
};
use crate::state_file::StateFiles;

/// The executor's name (settings, specs, `request.json`).
pub const MOCK_EXECUTOR: &str = "mock";

/// Output chunks buffered per execution.
const OUTPUT_BUFFER: usize = 64;
const SIGKILL_EXIT: i32 = 137;
const SIGTERM_EXIT: i32 = 143;

/// What a start records before the simulation begins.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct StartRecord {
    run_id: RunId,
    attempt: u32,
    lease_epoch: i64,
    agent_id: AgentId,
    started_at: DateTime<Utc>,
}

struct MockRun {
    run_id: RunId,
    attempt: u32,
    lease_epoch: LeaseEpoch,
    agent_id: AgentId,
    started: Instant,
    output: Mutex<Option<mpsc::Receiver<OutputChunk>>>,
    exit: watch::Receiver<Option<ExitStatus>>,
    /// The exit code a signal forces (143 TERM, 137 KILL).
    signal: watch::Sender<Option<i32>>,
}

impl MockRun {
    fn exited(&self) -> Option<ExitStatus> {
        *self.exit.borrow()
    }

    /// A run an earlier life of the agent started: it died with that life, code unknown.
    fn lost(record: &StartRecord) -> MockRun {
        let (_, exit) = watch::channel(Some(ExitStatus {
            code: None,
            oom_killed: false,
        }));
        let (signal, _) = watch::channel(None);
        let ago = (Utc::now() - record.started_at)
            .to_std()
            .unwrap_or_default();
        MockRun {
            run_id: record.run_id,
            attempt: record.attempt,
            lease_epoch: LeaseEpoch(record.lease_epoch),
            agent_id: record.agent_id.clone(),
            started: Instant::now().checked_sub(ago).unwrap_or_else(Instant::now),
            output: Mutex::new(None),
            exit,
            signal,
        }
    }
}

/// Simulates runs in memory, recording each start on disk.
pub struct MockExecutor {
    runs: Mutex<HashMap<String, Arc<MockRun>>>,
    records: StateFiles,
}

impl MockExecutor {
    /// `agent_root` is `<workspace_root>/<agent_id>`; the start records live there.
    pub fn new(agent_root: &Path) -> Self {
        Self {
            runs: Mutex::new(HashMap::new()),
            records: StateFiles::new(agent_root, ".mock.json"),
        }
    }

    fn get(&self, name: &str) -> Option<Arc<MockRun>> {
        self.runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(name)
            .cloned()
    }

    fn found(name: &str, run: &MockRun) -> FoundExecution {
        FoundExecution {
            handle: handle(name),
            run_id: run.run_id,
            attempt: run.attempt,
            lease_epoch: run.lease_epoch,
            status: if run.exited().is_some() {
                FoundStatus::Exited
            } else {
                FoundStatus::Running
            },
            running_for: run.started.elapsed(),
        }
    }

    /// The execution named `name`, as this life or an earlier one left it.
    async fn lookup(&self, name: &str) -> Result<Option<Arc<MockRun>>, ExecError> {
        if let Some(run) = self.get(name) {
            return Ok(Some(run));
        }
        let Some(record) = self.records.read::<StartRecord>(name).await? else {
            return Ok(None);
        };
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let run = runs
            .entry(name.to_owned())
            .or_insert_with(|| Arc::new(MockRun::lost(&record)));
        Ok(Some(run.clone()))
    }

    async fn start_job(&self, job: &Job) -> Result<Started, ExecError> {
        let name = job.name();
        let adopted = |run: &MockRun| Started {
            handle: handle(&name),
            running_for: run.started.elapsed(),
            adopted: true,
        };
        if let Some(run) = self.lookup(&name).await? {
            return Ok(adopted(&run));
        }
        // Recorded before it can have any effect: a restarted agent must know it started.
        let record = StartRecord {
            run_id: job.run_id,
            attempt: job.attempt,
            lease_epoch: job.lease_epoch.0,
            agent_id: job.agent_id.clone(),
            started_at: Utc::now(),
        };
        self.records.write(&name, &record).await?;
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(run) = runs.get(&name) {
            return Ok(adopted(run));
        }
        let behavior = job.spec.mock.clone().unwrap_or_default();
        let (out_tx, out_rx) = mpsc::channel(OUTPUT_BUFFER);
        let (exit_tx, exit_rx) = watch::channel(None);
        let (signal_tx, signal_rx) = watch::channel(None);
        let started = Instant::now();
        tokio::spawn(simulate(
            behavior,
            job.workspace.clone(),
            started,
            out_tx,
            signal_rx,
            exit_tx,
        ));
        runs.insert(
            name.clone(),
            Arc::new(MockRun {
                run_id: job.run_id,
                attempt: job.attempt,
                lease_epoch: job.lease_epoch,
                agent_id: job.agent_id.clone(),
                started,
                output: Mutex::new(Some(out_rx)),
                exit: exit_rx,
                signal: signal_tx,
            }),
        );
        Ok(Started {
            handle: handle(&name),
            running_for: Duration::ZERO,
            adopted: false,
        })
    }

    async fn wait_for(&self, handle: &ExecHandle) -> ExitStatus {
        let unknown = ExitStatus {
            code: None,
            oom_killed: false,
        };
        let Some(run) = self.get(&handle.name) else {
            return unknown;
        };
        let mut exit = run.exit.clone();
        match exit.wait_for(Option::is_some).await {
            Ok(s) => s.unwrap_or(unknown),
            Err(_) => unknown,
        }
    }

    fn signal(&self, handle: &ExecHandle, code: i32) {
        if let Some(run) = self.get(&handle.name) {
            run.signal.send_if_modified(|s| {
                if s.is_none() {
                    *s = Some(code);
                    true
                } else {
                    false
                }
            });
        }
    }
}

/// One line event of the schedule: when, which stream, what.
fn schedule(behavior: &MockBehavior) -> Vec<(Duration, OutputSource, Vec<u8>)> {
    let total = Duration::from_millis(behavior.duration_ms);
    let mut events = Vec::with_capacity(behavior.stdout.len() + behavior.stderr.len());
    for (source, lines) in [
        (OutputSource::Stdout, &behavior.stdout),
        (OutputSource::Stderr, &behavior.stderr),
    ] {
        let n = lines.len() as u32;
        for (i, line) in lines.iter().enumerate() {
            let at = total * (i as u32) / n.max(1);
            let mut data = line.clone().into_bytes();
            data.push(b'\n');
            events.push((at, source, data));
        }
    }
    // Stable: stdout before stderr at the same instant, lines in order.
    events.sort_by_key(|(at, source, _)| (*at, *source == OutputSource::Stderr));
    events
}

async fn simulate(
    behavior: MockBehavior,
    workspace: std::path::PathBuf,
    started: Instant,
    out: mpsc::Sender<OutputChunk>,
    mut signal: watch::Receiver<Option<i32>>,
    exit: watch::Sender<Option<ExitStatus>>,
) {
    let run = async {
        for (at, source, data) in schedule(&behavior) {
            tokio::time::sleep_until(started + at).await;
            let chunk = OutputChunk {
                source,
                data,
                at: Some(Utc::now()),
            };
            // Back-pressure like a pipe; a reader that went away is not an error.
            let _ = out.send(chunk).await;
        }
        tokio::time::sleep_until(started + Duration::from_millis(behavior.duration_ms)).await;
    };
    let code = tokio::select! {
        () = run => None,
        forced = signal.wait_for(Option::is_some) => forced.ok().and_then(|s| *s),
    };
    drop(out);
    let code = match code {
        Some(forced) => forced,
        None => {
            let files = behavior.files.clone();
            let written = tokio::task::spawn_blocking(move || write_files(&workspace, &files))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match written {
                Ok(()) => behavior.exit_code,
                Err(e) => {
                    tracing::warn!(error = %e, "mock run could not write its output files");
                    1
                }
            }
        }
    };
    let _ = exit.send(Some(ExitStatus {
        code: Some(code),
        oom_killed: false,
    }));
}

/// Writes the simulated output files (paths validated with the spec), replacing what is
/// there without following symlinks.
fn write_files(workspace: &Path, files: &[InputFile]) -> std::io::Result<()> {
    for f in files {
        let path = workspace.join(&f.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path)?,
            Ok(_) => std::fs::remove_file(&path)?,
            Err(_) => {}
        }
        std::fs::write(&path, &f.content)?;
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(f.mode))?;
    }
    Ok(())
}

fn handle(name: &str) -> ExecHandle {
    ExecHandle {
        id: format!("mock-{name}"),
        name: name.to_owned(),
    }
}

impl Executor for MockExecutor {
    fn name(&self) -> &'static str {
        MOCK_EXECUTOR
    }

    fn start<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>> {
        self.start_job(job).boxed()
    }

    fn output(&self, handle: &ExecHandle) -> OutputStream {
        let rx = self
            .get(&handle.name)
            .and_then(|r| r.output.lock().ok().and_then(|mut o| o.take()));
        match rx {
            Some(rx) => futures::stream::unfold(rx, |mut rx| async move {
                rx.recv().await.map(|chunk| (Ok(chunk), rx))
            })
            .boxed(),
            None => futures::stream::empty().boxed(),
        }
    }

    fn wait<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
        async move { Ok(self.wait_for(handle).await) }.boxed()
    }

    fn kill<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        self.signal(handle, SIGKILL_EXIT);
        async { Ok(()) }.boxed()
    }

    fn terminate<'a>(
        &'a self,
        handle: &'a ExecHandle,
        _grace: Duration,
    ) -> BoxFuture<'a, Result<Termination, ExecError>> {
        async move {
            self.signal(handle, SIGTERM_EXIT);
            self.wait_for(handle).await;
            Ok(Termination::Exited)
        }
        .boxed()
    }

    fn list<'a>(
        &'a self,
        agent: &'a AgentId,
    ) -> BoxFuture<'a, Result<Vec<FoundExecution>, ExecError>> {
        async move {
            // The record directory is this agent's own; an unreadable record is left to
            // operators, as the process executor does.
            for name in self.records.names().await? {
                if let Err(e) = self.lookup(&name).await {
                    tracing::warn!(error = %e, execution = %name, "unreadable mock start record; leaving it to operators");
                }
            }
            Ok(self
                .runs
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .filter(|(_, r)| &r.agent_id == agent)
                .map(|(name, r)| Self::found(name, r))
                .collect())
        }
        .boxed()
    }

    fn find<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>> {
        async move {
            let name = job.name();
            Ok(self.lookup(&name).await?.map(|r| Self::found(&name, &r)))
        }
        .boxed()
    }

    fn remove<'a>(&'a self, handle: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
        let run = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&handle.name);
        if let Some(run) = run {
            let _ = run.signal.send(Some(SIGKILL_EXIT));
        }
        self.records.remove(&handle.name).boxed()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::spec::RawSpec;

    fn job(root: &Path, mock: MockBehavior) -> Job {
        let spec = RawSpec {
            image: "none".into(),
            command: vec!["true".into()],
            mock: Some(mock),
            ..Default::default()
        }
        .validate()
        .unwrap();
        crate::executor::test_job(root, spec)
    }

    fn behavior() -> MockBehavior {
        MockBehavior {
            duration_ms: 10_000,
            exit_code: 4,
            stdout: vec!["one".into(), "two".into()],
            stderr: vec!["warn".into()],
            files: vec![InputFile {
                path: "out/report.txt".into(),
                content: b"done".to_vec(),
                mode: 0o644,
            }],
        }
    }

    #[test]
    fn the_schedule_spreads_lines_over_the_duration() {
        let s = schedule(&behavior());
        let got: Vec<(u64, OutputSource, &[u8])> = s
            .iter()
            .map(|(at, src, d)| (at.as_millis() as u64, *src, d.as_slice()))
            .collect();
        assert_eq!(
            got,
            vec![
                (0, OutputSource::Stdout, b"one\n".as_slice()),
                (0, OutputSource::Stderr, b"warn\n".as_slice()),
                (5000, OutputSource::Stdout, b"two\n".as_slice()),
            ]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_simulated_run_prints_writes_and_exits_with_its_code() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = MockExecutor::new(tmp.path());
        let j = job(tmp.path(), behavior());
        let started = exec.start(&j).await.unwrap();
        assert!(!started.adopted);
        assert!(exec.start(&j).await.unwrap().adopted, "never started twice");
        let chunks: Vec<OutputChunk> = exec
            .output(&started.handle)
            .filter_map(|c| async { c.ok() })
            .collect()
            .await;
        let text: Vec<&[u8]> = chunks.iter().map(|c| c.data.as_slice()).collect();
        assert_eq!(text, vec![b"one\n".as_slice(), b"warn\n", b"two\n"]);
        let status = exec.wait(&started.handle).await.unwrap();
        assert_eq!(status.code, Some(4));
        assert_eq!(
            std::fs::read(j.workspace.join("out/report.txt")).unwrap(),
            b"done"
        );
        let found = exec.find(&j).await.unwrap().unwrap();
        assert_eq!(found.status, FoundStatus::Exited);
        exec.remove(&started.handle).await.unwrap();
        assert!(exec.list(&j.agent_id).await.unwrap().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn terminate_ends_it_at_once_without_files() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = MockExecutor::new(tmp.path());
        let j = job(tmp.path(), behavior());
        let started = exec.start(&j).await.unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let t = exec
            .terminate(&started.handle, Duration::from_secs(10))
            .await
            .unwrap();
        assert_eq!(t, Termination::Exited);
        assert_eq!(
            exec.wait(&started.handle).await.unwrap().code,
            Some(SIGTERM_EXIT)
        );
        assert!(!j.workspace.join("out/report.txt").exists());
    }

    #[tokio::test]
    async fn a_restarted_agent_reports_what_an_earlier_life_started_and_never_starts_it_again() {
        let tmp = tempfile::tempdir().unwrap();
        let first = MockExecutor::new(tmp.path());
        let j = job(tmp.path(), behavior());
        first.start(&j).await.unwrap();
        // A new life of the agent: same directory, nothing in memory. Before the record
        // existed, this life found nothing, and a redelivered command started the lease again.
        let second = MockExecutor::new(tmp.path());
        let found = second.find(&j).await.unwrap().expect("found by name");
        assert_eq!(
            (found.run_id, found.attempt, found.lease_epoch),
            (j.run_id, j.attempt, j.lease_epoch)
        );
        assert_eq!(found.status, FoundStatus::Exited);
        let listed = second.list(&j.agent_id).await.unwrap();
        assert_eq!(listed.len(), 1);
        assert_eq!(
            second.wait(&listed[0].handle).await.unwrap().code,
            None,
            "the exit code of a run lost with its agent is unknown"
        );
        let again = second.start(&j).await.unwrap();
        assert!(again.adopted, "a recorded lease is never started twice");
        assert!(
            second.output(&again.handle).next().await.is_none(),
            "nothing of the lost run is replayed"
        );
        second.remove(&listed[0].handle).await.unwrap();
        assert!(second.list(&j.agent_id).await.unwrap().is_empty());
        assert!(
            MockExecutor::new(tmp.path())
                .list(&j.agent_id)
                .await
                .unwrap()
                .is_empty(),
            "removal takes the record with it"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn thousands_of_runs_are_cheap() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = MockExecutor::new(tmp.path());
        let quick = MockBehavior {
            duration_ms: 50,
            stdout: vec!["x".into()],
            ..Default::default()
        };
        let jobs: Vec<Job> = (0..2000).map(|_| job(tmp.path(), quick.clone())).collect();
        let mut handles = Vec::new();
        for j in &jobs {
            handles.push(exec.start(j).await.unwrap().handle);
        }
        for h in &handles {
            assert_eq!(exec.wait(h).await.unwrap().code, Some(0));
            exec.remove(h).await.unwrap();
        }
        assert!(exec.runs.lock().unwrap().is_empty());
    }
}
