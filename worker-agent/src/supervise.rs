//! Watching one started execution to its end: follow its output (keeping the tail, forwarding
//! every chunk for live logs), enforce the time limit, honour a stop request, and learn how it
//! ended. Independent of the API, so it is exercised directly against an executor in tests.

use std::future::Future;
use std::time::Duration;

use futures::StreamExt;
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::executor::{ExecError, ExecHandle, Executor, ExitStatus, OutputChunk};
use crate::output_tail::OutputTail;

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
    /// The stop token fired (lease revoked, or the agent is stopping) and it was killed.
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

enum Interrupt {
    Deadline,
    Stop,
}

/// Supervises `handle` until it ends. `limit` counts from the process start, and
/// `already_running` is how much of it has been used (an adopted execution, a slow start
/// report). Every output chunk is sent on `logs`; a closed receiver is not an error, and a
/// full one applies back-pressure without delaying the timeout.
pub async fn supervise(
    executor: &dyn Executor,
    handle: &ExecHandle,
    limit: Duration,
    already_running: Duration,
    stop: &CancellationToken,
    logs: mpsc::Sender<OutputChunk>,
) -> Result<Finished, ExecError> {
    let deadline = Instant::now() + limit.saturating_sub(already_running);
    let mut tail = OutputTail::default();
    let mut output = executor.output(handle);

    let watched = async {
        loop {
            match interruptible(output.next(), deadline, stop).await? {
                Some(Ok(chunk)) => {
                    tail.push(&chunk.data);
                    // Err: nobody listens for live logs any more; the tail still counts.
                    let _ = interruptible(logs.send(chunk), deadline, stop).await?;
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "output stream broke; waiting for the exit without it");
                    break;
                }
                None => break,
            }
        }
        interruptible(executor.wait(handle), deadline, stop).await
    }
    .await;

    let (ending, exit) = match watched {
        Ok(status) => (Ending::Exited, Some(status?)),
        Err(interrupt) => {
            let ending = match interrupt {
                Interrupt::Deadline => {
                    tracing::info!(limit_s = limit.as_secs(), "time limit reached; killing");
                    Ending::TimedOut { limit }
                }
                Interrupt::Stop => {
                    tracing::info!("stop requested; killing");
                    Ending::Stopped
                }
            };
            executor.kill(handle).await?;
            // Whatever was written before the kill still belongs in the tail and the log.
            let _ = tokio::time::timeout(OUTPUT_AFTER_KILL, async {
                while let Some(Ok(chunk)) = output.next().await {
                    tail.push(&chunk.data);
                    let _ = logs.try_send(chunk);
                }
            })
            .await;
            let exit = tokio::time::timeout(EXIT_AFTER_KILL, executor.wait(handle))
                .await
                .ok()
                .and_then(Result::ok);
            (ending, exit)
        }
    };
    let (output, output_truncated) = tail.into_parts();
    Ok(Finished {
        ending,
        exit,
        output,
        output_truncated,
    })
}

async fn interruptible<F: Future>(
    fut: F,
    deadline: Instant,
    stop: &CancellationToken,
) -> Result<F::Output, Interrupt> {
    tokio::select! {
        biased;
        _ = stop.cancelled() => Err(Interrupt::Stop),
        _ = tokio::time::sleep_until(deadline) => Err(Interrupt::Deadline),
        out = fut => Ok(out),
    }
}

#[cfg(test)]
mod tests {
    //! Timer logic with a scripted in-memory executor and paused time.

    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    use futures::FutureExt;
    use futures::future::BoxFuture;

    use super::*;
    use crate::executor::{Job, OutputSource, OutputStream, Started};

    /// Prints two lines, then runs for `runs_for` unless killed, then exits with `code`.
    struct Scripted {
        runs_for: Duration,
        code: i32,
        killed: Arc<AtomicBool>,
        exited: Arc<tokio::sync::Notify>,
    }

    impl Scripted {
        fn new(runs_for: Duration, code: i32) -> Self {
            Self {
                runs_for,
                code,
                killed: Arc::new(AtomicBool::new(false)),
                exited: Arc::new(tokio::sync::Notify::new()),
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
                }),
                Ok(OutputChunk {
                    source: OutputSource::Stderr,
                    data: b"two\n".to_vec(),
                }),
            ];
            let (runs_for, exited) = (self.runs_for, self.exited.clone());
            let end = async move {
                tokio::select! {
                    _ = tokio::time::sleep(runs_for) => {},
                    _ = exited.notified() => {},
                }
            };
            futures::stream::iter(lines)
                .chain(end.into_stream().filter_map(|()| async { None }))
                .boxed()
        }
        fn wait<'a>(&'a self, _h: &'a ExecHandle) -> BoxFuture<'a, Result<ExitStatus, ExecError>> {
            async move {
                if !self.killed.load(Ordering::SeqCst) {
                    tokio::time::sleep(Duration::from_millis(1)).await;
                }
                let code = if self.killed.load(Ordering::SeqCst) {
                    137
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

    #[tokio::test(start_paused = true)]
    async fn exit_within_the_limit_keeps_output_and_code() {
        let exec = Scripted::new(Duration::from_secs(5), 3);
        let (tx, mut rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let f = supervise(
            &exec,
            &handle(),
            Duration::from_secs(60),
            Duration::ZERO,
            &stop,
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
        let stop = CancellationToken::new();
        let started = Instant::now();
        let f = supervise(
            &exec,
            &handle(),
            Duration::from_secs(10),
            Duration::from_secs(4),
            &stop,
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
        // The 4 s already used count against the limit.
        assert!(
            started.elapsed() < Duration::from_secs(7),
            "{:?}",
            started.elapsed()
        );
        assert_eq!(f.output, b"one\ntwo\n");
    }

    #[tokio::test(start_paused = true)]
    async fn stop_token_kills_without_a_timeout() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        let (tx, _rx) = mpsc::channel(8);
        let stop = CancellationToken::new();
        let stopper = stop.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_secs(2)).await;
            stopper.cancel();
        });
        let f = supervise(
            &exec,
            &handle(),
            Duration::from_secs(60),
            Duration::ZERO,
            &stop,
            tx,
        )
        .await
        .unwrap();
        assert_eq!(f.ending, Ending::Stopped);
        assert!(exec.killed.load(Ordering::SeqCst));
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_log_channel_does_not_delay_the_timeout() {
        let exec = Scripted::new(Duration::from_secs(3600), 0);
        // Capacity 1 and nobody reading: the second chunk blocks.
        let (tx, _rx) = mpsc::channel(1);
        let stop = CancellationToken::new();
        let f = supervise(
            &exec,
            &handle(),
            Duration::from_secs(5),
            Duration::ZERO,
            &stop,
            tx,
        )
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
