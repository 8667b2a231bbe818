//! [`Executor`] that runs nothing: a deterministic simulated run driven by the spec's
//! [`MockBehavior`] (duration, exit code, stdout/stderr lines, output files), for scale tests
//! with hundreds of agents and tens of thousands of runs. One tokio task and a few small
//! buffers per execution; no process, no container.
//!
//! The simulation: the `n` lines of a stream are printed at `duration * i / n` (stdout before
//! stderr at the same instant), the files are written into the workspace at the end, then
//! the "process" exits with the spec's code. SIGTERM (cancel) and SIGKILL end it at once with
//! 143 / 137 and no files, as a process that does not handle signals would. A spec without
//! `mock` simulates an instant, silent exit 0.
//!
//! Executions live in memory only: after an agent restart [`Executor::list`] finds nothing,
//! and the API's lease expiry recovers the run (it was never real work).

use std::collections::HashMap;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use drover_core::ids::AgentId;
use drover_core::inputs::{InputFile, MockBehavior};
use futures::future::BoxFuture;
use futures::{FutureExt, StreamExt};
use tokio::sync::{mpsc, watch};
use tokio::time::Instant;

use crate::executor::{
    ExecError, ExecHandle, Executor, ExitStatus, FoundExecution, FoundStatus, Job, OutputChunk,
    OutputSource, OutputStream, Started, Termination,
};

/// Output chunks buffered per execution.
const OUTPUT_BUFFER: usize = 64;
const SIGKILL_EXIT: i32 = 137;
const SIGTERM_EXIT: i32 = 143;

struct MockRun {
    job: Job,
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
}

/// Simulates runs in memory.
#[derive(Default)]
pub struct MockExecutor {
    runs: Mutex<HashMap<String, Arc<MockRun>>>,
}

impl MockExecutor {
    pub fn new() -> Self {
        Self::default()
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
            run_id: run.job.run_id,
            attempt: run.job.attempt,
            lease_epoch: run.job.lease_epoch,
            status: if run.exited().is_some() {
                FoundStatus::Exited
            } else {
                FoundStatus::Running
            },
            running_for: run.started.elapsed(),
        }
    }

    fn start_job(&self, job: &Job) -> Started {
        let name = job.name();
        let mut runs = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Some(run) = runs.get(&name) {
            return Started {
                handle: handle(&name),
                running_for: run.started.elapsed(),
                adopted: true,
            };
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
                job: job.clone(),
                started,
                output: Mutex::new(Some(out_rx)),
                exit: exit_rx,
                signal: signal_tx,
            }),
        );
        Started {
            handle: handle(&name),
            running_for: Duration::ZERO,
            adopted: false,
        }
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
        "mock"
    }

    fn start<'a>(&'a self, job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>> {
        let started = self.start_job(job);
        async move { Ok(started) }.boxed()
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
        let found = self
            .runs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .filter(|(_, r)| &r.job.agent_id == agent)
            .map(|(name, r)| Self::found(name, r))
            .collect();
        async move { Ok(found) }.boxed()
    }

    fn find<'a>(
        &'a self,
        job: &'a Job,
    ) -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>> {
        let name = job.name();
        let found = self.get(&name).map(|r| Self::found(&name, &r));
        async move { Ok(found) }.boxed()
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
        async { Ok(()) }.boxed()
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
        let exec = MockExecutor::new();
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
        let exec = MockExecutor::new();
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

    #[tokio::test(start_paused = true)]
    async fn thousands_of_runs_are_cheap() {
        let tmp = tempfile::tempdir().unwrap();
        let exec = MockExecutor::new();
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
