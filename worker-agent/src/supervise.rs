//! Watching one started execution to its end: follow its output (keeping the tail, forwarding
//! every chunk for live logs), enforce the time limit, honour the lease's signals (stop,
//! cancel, hand back), and learn how it ended. Independent of the API, so it is exercised
//! directly against an executor in tests.

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use chrono::{DateTime, Utc};
use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::executor::{ExecError, ExecHandle, Executor, ExitStatus, OutputChunk, Termination};
use crate::output_tail::OutputTail;
use crate::redact::{Redactor, redact_output};
use crate::running::LeaseSignals;

/// After a kill, how long output already written may still be collected.
const OUTPUT_AFTER_KILL: Duration = Duration::from_secs(2);
/// After a kill, how long to wait for the backend to confirm the exit.
const EXIT_AFTER_KILL: Duration = Duration::from_secs(10);

/// Why supervision ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ending {
    /// The process exited by itself.
    Exited,
    /// It ran past its limit and was killed.
    TimedOut { limit: Duration },
    /// A client cancelled the run: it was asked to stop, and killed if it outlived `grace`.
    Cancelled {
        grace: Duration,
        termination: Termination,
    },
    /// The agent's drain timeout passed: it was killed so the run can be handed back.
    HandedBack,
    /// The lease was revoked (or a report refused as stale): it was killed; nothing is
    /// reported, the lease is not ours any more.
    Stopped,
}

/// How an execution ended, with the tail of its output.
#[derive(Debug, Clone)]
pub struct Finished {
    pub ending: Ending,
    /// How the process exited; for a kill, as the backend saw it (if it could tell in time).
    pub exit: Option<ExitStatus>,
    pub output: Vec<u8>,
    pub output_truncated: bool,
}

/// How to supervise one execution.
#[derive(Debug, Clone)]
pub struct Supervision {
    /// The execution time limit, counted from the process start.
    pub timeout: Duration,
    /// How much of it has been used already (an adopted execution, a slow start report).
    pub already_running: Duration,
    /// On cancel, how long between SIGTERM and SIGKILL.
    pub cancel_grace: Duration,
    /// Output written before this time is kept in the tail but not sent as live logs: an
    /// earlier life of the agent shipped it already (adoption). A gap of the last moments
    /// before that life died is possible; live logs are losable, duplicates would not be.
    pub live_logs_from: Option<DateTime<Utc>>,
    /// Masks the job's secret values in the output before it reaches the tail or the logs.
    pub redactor: Arc<Redactor>,
}

impl Supervision {
    fn is_live(&self, chunk: &OutputChunk) -> bool {
        match (self.live_logs_from, chunk.at) {
            (Some(from), Some(at)) => at >= from,
            _ => true,
        }
    }
}

enum Interrupt {
    Stop,
    Cancel,
    HandBack,
    Deadline,
}

/// Supervises `handle` until it ends. Every output chunk is sent on `logs`; a closed receiver
/// is not an error, and a full one applies back-pressure without delaying the timeout or a
/// signal.
pub async fn supervise(
    executor: &dyn Executor,
    handle: &ExecHandle,
    limits: Supervision,
    signals: &LeaseSignals,
    logs: mpsc::Sender<OutputChunk>,
) -> Result<Finished, ExecError> {
    let deadline = Instant::now() + limits.timeout.saturating_sub(limits.already_running);
    let mut tail = OutputTail::default();
    let mut output = redact_output(executor.output(handle), limits.redactor.clone());

    let watched = async {
        loop {
            match interruptible(output.next(), deadline, signals).await? {
                Some(Ok(chunk)) => {
                    tail.push(&chunk.data);
                    if limits.is_live(&chunk) {
                        // Err: nobody listens for live logs any more; the tail still counts.
                        let _ = interruptible(logs.send(chunk), deadline, signals).await?;
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "output stream broke; waiting for the exit without it");
                    break;
                }
                None => break,
            }
        }
        interruptible(executor.wait(handle), deadline, signals).await
    }
    .await;

    let interrupt = match watched {
        Ok(status) => {
            let (output, output_truncated) = tail.into_parts();
            return Ok(Finished {
                ending: Ending::Exited,
                exit: Some(status?),
                output,
                output_truncated,
            });
        }
        Err(interrupt) => interrupt,
    };

    let ending = match interrupt {
        Interrupt::Cancel => {
            let grace = limits.cancel_grace;
            tracing::info!(grace_s = grace.as_secs(), "cancel requested; terminating");
            // Keep reading while it shuts down: what it prints on SIGTERM belongs in the tail.
            let (termination, ()) = tokio::join!(
                executor.terminate(handle, grace),
                collect_rest(
                    &mut output,
                    &mut tail,
                    &logs,
                    &limits,
                    grace + OUTPUT_AFTER_KILL
                ),
            );
            Ending::Cancelled {
                grace,
                termination: termination?,
            }
        }
        Interrupt::Deadline | Interrupt::Stop | Interrupt::HandBack => {
            let ending = match interrupt {
                Interrupt::Deadline => {
                    tracing::info!(
                        limit_s = limits.timeout.as_secs(),
                        "time limit reached; killing"
                    );
                    Ending::TimedOut {
                        limit: limits.timeout,
                    }
                }
                Interrupt::HandBack => {
                    tracing::info!("drain timeout passed; killing to hand the run back");
                    Ending::HandedBack
                }
                _ => {
                    tracing::info!("stop requested; killing");
                    Ending::Stopped
                }
            };
            executor.kill(handle).await?;
            // Whatever was written before the kill still belongs in the tail and the log.
            collect_rest(&mut output, &mut tail, &logs, &limits, OUTPUT_AFTER_KILL).await;
            ending
        }
    };
    let exit = tokio::time::timeout(EXIT_AFTER_KILL, executor.wait(handle))
        .await
        .ok()
        .and_then(Result::ok);
    let (output, output_truncated) = tail.into_parts();
    Ok(Finished {
        ending,
        exit,
        output,
        output_truncated,
    })
}

/// Reads the rest of the output into the tail (and, without waiting, the live log) until the
/// stream ends or `limit` passes.
async fn collect_rest(
    output: &mut crate::executor::OutputStream,
    tail: &mut OutputTail,
    logs: &mpsc::Sender<OutputChunk>,
    supervision: &Supervision,
    limit: Duration,
) {
    let _ = tokio::time::timeout(limit, async {
        while let Some(Ok(chunk)) = output.next().await {
            tail.push(&chunk.data);
            if supervision.is_live(&chunk) {
                let _ = logs.try_send(chunk);
            }
        }
    })
    .await;
}

/// Runs `fut` unless a signal or the deadline comes first. A stop outranks a cancel, which
/// outranks a hand-back, which outranks the deadline: the strongest reason wins a tie.
async fn interruptible<F: Future>(
    fut: F,
    deadline: Instant,
    signals: &LeaseSignals,
) -> Result<F::Output, Interrupt> {
    tokio::select! {
        biased;
        _ = signals.stop.cancelled() => Err(Interrupt::Stop),
        _ = signals.cancel.cancelled() => Err(Interrupt::Cancel),
        _ = signals.hand_back.cancelled() => Err(Interrupt::HandBack),
        _ = tokio::time::sleep_until(deadline) => Err(Interrupt::Deadline),
        out = fut => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    //! Timer and signal logic with a scripted in-memory executor and paused time.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use drover_core::ids::AgentId;
    use futures::FutureExt;
    use futures::future::BoxFuture;

    use super::*;
    use crate::executor::{FoundExecution, Job, OutputSource, OutputStream, Started};

    /// Prints two lines, then runs for `runs_for` unless killed, then exits with `code`. On
    /// SIGTERM it prints "bye" and exits 143 unless it `ignores_term`.
    struct Scripted {
        runs_for: Duration,
        code: i32,
        ignores_term: bool,
        killed: Arc<AtomicBool>,
        termed: Arc<AtomicBool>,
        exited: Arc<tokio::sync::Notify>,
        said_bye: Arc<tokio::sync::Notify>,
    }

    impl Scripted {
        fn new(runs_for: Duration, code: i32) -> Self {
            Self {
                runs_for,
                code,
                ignores_term: false,
                killed: Arc::new(AtomicBool::new(false)),
                termed: Arc::new(AtomicBool::new(false)),
                exited: Arc::new(tokio::sync::Notify::new()),
                said_bye: Arc::new(tokio::sync::Notify::new()),
            }
        }
    }

    impl Executor for Scripted {
        fn name(&self) -> &'static str {
            "scripted"
        }
        fn start<'a>(&'a self, _job: &'a Job) -> BoxFuture<'a, Result<Started, ExecError>> {
            async { Err(ExecError::backend("start", "not used")) }.boxed()
        }
        fn output(&self, _handle: &ExecHandle) -> OutputStream {
            let lines = vec![
                Ok(OutputChunk {
                    source: OutputSource::Stdout,
                    data: b"one\n".to_vec(),
                    at: None,
                }),
                Ok(OutputChunk {
                    source: OutputSource::Stderr,
                    data: b"two\n".to_vec(),
                    at: None,
                }),
            ];
            let (runs_for, exited, bye) =
                (self.runs_for, self.exited.clone(), self.said_bye.clone());
            let end = async move {
                tokio::select! {
                    _ = tokio::time::sleep(runs_for) => None,
                    _ = exited.notified() => None,
                    _ = bye.notified() => Some(Ok(OutputChunk {
                        source: OutputSource::Stdout,
                        data: b"bye\n".to_vec(),
                    at: None,
                    })),
                }
            };
            futures::stream::iter(lines)
                .chain(end.into_stream().filter_map(|c| async { c }))
                .boxed()
        }
        fn wait<'a>(&'a self, _h: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
            async move {
                if !self.killed.load(Ordering::SeqCst) && !self.termed.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let code = if self.killed.load(Ordering::SeqCst) {
                    137
                } else if self.termed.load(Ordering::SeqCst) {
                    143
                } else {
                    self.code
                };
                Ok(ExitStatus {
                    code: Some(code),
                    oom_killed: false,
                })
            }
            .boxed()
        }
        fn kill<'a>(&'a self, _h: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
            self.killed.store(true, Ordering::SeqCst);
            self.exited.notify_one();
            async { Ok(()) }.boxed()
        }
        fn terminate<'a>(
            &'a self,
            _h: &'a ExecHandle,
            grace: Duration,
        ) -> BoxFuture<'a, Result<Termination, ExecError>> {
            async move {
                if self.ignores_term {
                    tokio::time::sleep(grace).await;
                    self.killed.store(true, Ordering::SeqCst);
                    self.exited.notify_one();
                    Ok(Termination::Killed)
                } else {
                    self.termed.store(true, Ordering::SeqCst);
                    self.said_bye.notify_one();
                    Ok(Termination::Exited)
                }
            }
            .boxed()
        }
        fn list<'a>(
            &'a self,
            _agent: &'a AgentId,
        ) -> BoxFuture<'a, Result<Vec<FoundExecution>, ExecError>> {
            async { Ok(Vec::new()) }.boxed()
        }
        fn find<'a>(
            &'a self,
            _job: &'a Job,
        ) -> BoxFuture<'a, Result<Option<FoundExecution>, ExecError>> {
            async { Ok(None) }.boxed()
        }
        fn remove<'a>(&'a self, _h: &'a ExecHandle) -> BoxFuture<'a, Result<(), ExecError>> {
            async { Ok(()) }.boxed()
        }
    }

    fn handle() -> ExecHandle {
        ExecHandle {
            id: "id".into(),
            name: "name".into(),
        }
    }

    fn limits(timeout_s: u64, used_s: u64) -> Supervision {
        Supervision {
            timeout: Duration::from_secs(timeout_s),
            already_running: Duration::from_secs(used_s),
            cancel_grace: Duration::from_secs(3),
            live_logs_from: None,
            redactor: Arc::new(Redactor::none()),
        }
    }

    /// Fires `which` of fresh signals after `after`.
    fn signal_after(
        after: Duration,
        which: fn(&LeaseSignals) -> &tokio_util::sync::CancellationToken,
    ) -> LeaseSignals {
        let signals = LeaseSignals::default();
        let token = which(&signals).clone();
        tokio::spawn(async move {
            tokio::time::sleep(after).await;
            token.cancel();
        });
        signals
    }

    #[tokio::test(start_paused = true)]
    async fn exit_within_the_limit_keeps_output_and_code() {
        let exec = Scripted::new(Duration::from_secs(5), 3);
        let (tx, mut rx) = mpsc::channel(8);
        let f = supervise(
            &exec,
            &handle(),
            limits(60, 0),
            &LeaseSignals::default(),
            tx,
        )
        .await
        .unwrap();
        assert_eq!(f.ending, Ending::Exited);
        assert_eq!(f.exit.unwrap().code, Some(3));
        assert_eq!(f.output, b"one\ntwo\n");
        assert!(!f.output_truncated);
        assert_eq!(rx.recv().await.unwrap().source, OutputSource::Stdout);
        assert_eq!(rx.recv().await.unwrap().source, OutputSource::Stderr);
        assert!(!exec.killed.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn overrunning_the_limit_kills() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        let (tx, _rx) = mpsc::channel(8);
        let started = Instant::now();
        let f = supervise(
            &exec,
            &handle(),
            limits(10, 4),
            &LeaseSignals::default(),
            tx,
        )
        .await
        .unwrap();
        assert_eq!(
            f.ending,
            Ending::TimedOut {
                limit: Duration::from_secs(10)
            }
        );
        assert!(exec.killed.load(Ordering::SeqCst));
        assert_eq!(f.exit.unwrap().code, Some(137));
        // The 4 s already used count against the limit.
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(f.output, b"one\ntwo\n");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_kills_without_terminating() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        let (tx, _rx) = mpsc::channel(8);
        let signals = signal_after(Duration::from_secs(2), |s| &s.stop);
        let f = supervise(&exec, &handle(), limits(60, 0), &signals, tx)
            .await
            .unwrap();
        assert_eq!(f.ending, Ending::Stopped);
        assert!(exec.killed.load(Ordering::SeqCst));
        assert!(!exec.termed.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_terminates_and_keeps_what_it_printed_on_the_way_out() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        let (tx, _rx) = mpsc::channel(8);
        let signals = signal_after(Duration::from_secs(2), |s| &s.cancel);
        let f = supervise(&exec, &handle(), limits(60, 0), &signals, tx)
            .await
            .unwrap();
        assert_eq!(
            f.ending,
            Ending::Cancelled {
                grace: Duration::from_secs(3),
                termination: Termination::Exited
            }
        );
        assert!(!exec.killed.load(Ordering::SeqCst));
        assert_eq!(f.exit.unwrap().code, Some(143));
        assert_eq!(f.output, b"one\ntwo\nbye\n");
    }

    #[tokio::test(start_paused = true)]
    async fn cancel_kills_what_ignores_sigterm_after_the_grace() {
        let mut exec = Scripted::new(Duration::from_secs(3600), 0);
        exec.ignores_term = true;
        let (tx, _rx) = mpsc::channel(8);
        let signals = signal_after(Duration::from_secs(1), |s| &s.cancel);
        let begun = Instant::now();
        let f = supervise(&exec, &handle(), limits(60, 0), &signals, tx)
            .await
            .unwrap();
        assert_eq!(
            f.ending,
            Ending::Cancelled {
                grace: Duration::from_secs(3),
                termination: Termination::Killed
            }
        );
        assert_eq!(f.exit.unwrap().code, Some(137));
        let took = begun.elapsed();
        assert!(
            took >= Duration::from_secs(4) && took < Duration::from_secs(7),
            "{took:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn hand_back_kills() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        let (tx, _rx) = mpsc::channel(8);
        let signals = signal_after(Duration::from_secs(1), |s| &s.hand_back);
        let f = supervise(&exec, &handle(), limits(60, 0), &signals, tx)
            .await
            .unwrap();
        assert_eq!(f.ending, Ending::HandedBack);
        assert!(exec.killed.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_stop_outranks_a_cancel() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        let (tx, _rx) = mpsc::channel(8);
        let signals = LeaseSignals::default();
        signals.cancel.cancel();
        signals.stop.cancel();
        let f = supervise(&exec, &handle(), limits(60, 0), &signals, tx)
            .await
            .unwrap();
        assert_eq!(f.ending, Ending::Stopped);
    }

    #[test]
    fn only_output_from_the_live_point_on_is_shipped() {
        let from = Utc::now();
        let sup = Supervision {
            live_logs_from: Some(from),
            ..limits(60, 0)
        };
        let chunk = |at| OutputChunk {
            source: OutputSource::Stdout,
            data: b"x".to_vec(),
            at,
        };
        assert!(!sup.is_live(&chunk(Some(from - chrono::Duration::seconds(1)))));
        assert!(sup.is_live(&chunk(Some(from))));
        assert!(sup.is_live(&chunk(None)), "unknown times are shipped");
        assert!(limits(60, 0).is_live(&chunk(Some(from - chrono::Duration::seconds(1)))));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_log_channel_does_not_delay_the_timeout() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        // Capacity 1 and nobody reading: the second chunk blocks.
        let (tx, _rx) = mpsc::channel(1);
        let f = supervise(&exec, &handle(), limits(5, 0), &LeaseSignals::default(), tx)
            .await
            .unwrap();
        assert_eq!(
            f.ending,
            Ending::TimedOut {
                limit: Duration::from_secs(5)
            }
        );
    }
}
