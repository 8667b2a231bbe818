//! The load driver, the same for drover and every baseline: closed loop (`concurrency`
//! operations always in flight, each starting when one ends) or open loop (operations start
//! at a fixed rate whatever the system does), until `runs` operations or `duration` passed.
//!
//! In open loop the end-to-end latency counts from the operation's *scheduled* start, so a
//! system that falls behind shows it in its latency rather than hiding it (no coordinated
//! omission).

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use futures::stream::FuturesUnordered;
use indicatif::ProgressBar;
use tokio::time::Instant;

use super::metrics::{Outcome, Recorder};

/// How operations are started.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Mode {
    Closed {
        concurrency: usize,
    },
    /// Operations per second; `max_in_flight` bounds memory if the system stalls.
    Open {
        rate: f64,
        max_in_flight: usize,
    },
}

/// When to stop starting operations (those in flight are always awaited).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    Runs(u64),
    Duration(Duration),
}

impl Stop {
    fn more(&self, started: u64, since: Duration) -> bool {
        match *self {
            Stop::Runs(n) => started < n,
            Stop::Duration(d) => since < d,
        }
    }
}

/// Runs `op(i, scheduled_start)` under `mode` until `stop`; returns what was recorded and
/// the wall time from the first start to the last end.
pub async fn drive<F, Fut>(
    mode: Mode,
    stop: Stop,
    op: F,
    progress: &ProgressBar,
) -> (Recorder, Duration)
where
    F: Fn(u64, Instant) -> Fut,
    Fut: Future<Output = Outcome>,
{
    let op = Arc::new(op);
    let start = Instant::now();
    let cpu = super::cpu_share::CpuWindow::start();
    let mut rec = Recorder::default();
    let mut in_flight = FuturesUnordered::new();
    let mut started = 0u64;
    let launch = |i: u64, at: Instant| {
        let op = Arc::clone(&op);
        async move { op(i, at).await }
    };
    let finish = |rec: &mut Recorder, outcome: Outcome| {
        rec.record(start.elapsed(), &outcome);
        progress.inc(1);
        if outcome.is_err() {
            progress.set_message(format!("{} errors", rec.error_count()));
        }
    };
    match mode {
        Mode::Closed { concurrency } => {
            let c = concurrency.max(1);
            loop {
                while in_flight.len() < c && stop.more(started, start.elapsed()) {
                    in_flight.push(launch(started, Instant::now()));
                    started += 1;
                }
                match in_flight.next().await {
                    Some(outcome) => finish(&mut rec, outcome),
                    None => break,
                }
            }
        }
        Mode::Open {
            rate,
            max_in_flight,
        } => {
            let period = Duration::from_secs_f64(1.0 / rate.max(1e-3));
            let mut next = start;
            loop {
                let more = stop.more(started, next - start);
                tokio::select! {
                    () = tokio::time::sleep_until(next), if more && in_flight.len() < max_in_flight => {
                        in_flight.push(launch(started, next));
                        started += 1;
                        next += period;
                    }
                    Some(outcome) = in_flight.next(), if !in_flight.is_empty() => {
                        finish(&mut rec, outcome);
                    }
                    else => {
                        if !more && in_flight.is_empty() {
                            break;
                        }
                        // Stalled at max_in_flight with nothing finishing cannot happen:
                        // in_flight is non-empty then, so the branch above is enabled.
                    }
                }
            }
        }
    }
    rec.set_cpu(cpu.finish());
    (rec, start.elapsed())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stress::metrics::Sample;

    #[tokio::test]
    async fn closed_loop_runs_exactly_n_and_open_loop_keeps_its_rate() {
        let bar = ProgressBar::hidden();
        let peak = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let now = Arc::new(std::sync::atomic::AtomicUsize::new(0));
        let (rec, _) = drive(
            Mode::Closed { concurrency: 3 },
            Stop::Runs(10),
            |i, at| {
                let (peak, now) = (Arc::clone(&peak), Arc::clone(&now));
                async move {
                    use std::sync::atomic::Ordering::SeqCst;
                    let n = now.fetch_add(1, SeqCst) + 1;
                    peak.fetch_max(n, SeqCst);
                    tokio::time::sleep(Duration::from_millis(5)).await;
                    now.fetch_sub(1, SeqCst);
                    if i == 4 {
                        Err("boom".to_owned())
                    } else {
                        Ok(Sample {
                            end_to_end: at.elapsed(),
                            ..Sample::default()
                        })
                    }
                }
            },
            &bar,
        )
        .await;
        assert_eq!(rec.ok(), 9);
        assert_eq!(rec.error_count(), 1);
        assert_eq!(peak.load(std::sync::atomic::Ordering::SeqCst), 3);
        assert_eq!(bar.position(), 10);

        let (rec, _) = drive(
            Mode::Open {
                rate: 200.0,
                max_in_flight: 100,
            },
            Stop::Runs(20),
            |_, at| async move {
                Ok(Sample {
                    end_to_end: at.elapsed(),
                    ..Sample::default()
                })
            },
            &ProgressBar::hidden(),
        )
        .await;
        assert_eq!(rec.ok(), 20);
    }
}
