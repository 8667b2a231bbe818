//! What a load run measured: HDR histograms of each latency, completions and errors per
//! second, and errors by code. One [`Recorder`] per system (drover or a baseline), fed by the
//! load driver with one [`Sample`] per finished operation.

use std::collections::BTreeMap;
use std::time::Duration;

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};

use super::cpu_share::CpuUse;

/// Histograms hold microseconds, 1 µs .. 1 h, 3 significant digits.
const MAX_US: u64 = 3_600_000_000;

fn histogram() -> Histogram<u64> {
    // The bounds are constants that hdrhistogram accepts; a failure here is a programming error.
    Histogram::new_with_bounds(1, MAX_US, 3).unwrap_or_else(|e| panic!("histogram bounds: {e}"))
}

fn us(d: Duration) -> u64 {
    u64::try_from(d.as_micros())
        .unwrap_or(MAX_US)
        .clamp(1, MAX_US)
}

/// One finished operation. Latencies a system cannot observe (e.g. queue wait of a bare
/// `docker run`) are `None`.
#[derive(Debug, Clone, Default)]
pub struct Sample {
    /// The submit call alone (SubmitRun RPC, `docker run` has none, Celery's `delay()`).
    pub submit: Option<Duration>,
    /// Accepted (QUEUED) → ASSIGNED, from the run's event timestamps.
    pub queue_wait: Option<Duration>,
    /// ASSIGNED → RUNNING (the agent fetched the assignment and started the container).
    pub dispatch: Option<Duration>,
    /// RUNNING → terminal (the process ran, exited, and the agent's report was accepted).
    pub execution: Option<Duration>,
    /// From the operation's start (its scheduled start in open loop) to its terminal state
    /// as the client saw it.
    pub end_to_end: Duration,
}

/// Outcome of one operation as the driver reports it.
pub type Outcome = Result<Sample, String>;

#[derive(Debug, Default)]
struct Second {
    completed: u64,
    errors: u64,
    e2e: Option<Histogram<u64>>,
}

/// Accumulates samples; cheap per sample, bounded memory (one histogram per second of run).
#[derive(Debug)]
pub struct Recorder {
    submit: Histogram<u64>,
    queue_wait: Histogram<u64>,
    dispatch: Histogram<u64>,
    execution: Histogram<u64>,
    e2e: Histogram<u64>,
    seconds: Vec<Second>,
    errors: BTreeMap<String, u64>,
    ok: u64,
    /// CPU time the whole host spent while this system ran (every process: the system, its
    /// services, the load generator), and how it split between processes.
    cpu: CpuUse,
}

impl Default for Recorder {
    fn default() -> Self {
        Self {
            submit: histogram(),
            queue_wait: histogram(),
            dispatch: histogram(),
            execution: histogram(),
            e2e: histogram(),
            seconds: Vec::new(),
            errors: BTreeMap::new(),
            ok: 0,
            cpu: CpuUse::default(),
        }
    }
}

impl Recorder {
    /// Records an outcome that finished `at` after the run's start.
    pub fn record(&mut self, at: Duration, outcome: &Outcome) {
        let idx = usize::try_from(at.as_secs())
            .unwrap_or(usize::MAX)
            .min(1 << 20);
        if self.seconds.len() <= idx {
            self.seconds.resize_with(idx + 1, Second::default);
        }
        let sec = &mut self.seconds[idx];
        match outcome {
            Ok(s) => {
                self.ok += 1;
                sec.completed += 1;
                let e2e = us(s.end_to_end);
                // Values are clamped into the bounds, so recording cannot fail.
                let _ = self.e2e.record(e2e);
                let _ = sec.e2e.get_or_insert_with(histogram).record(e2e);
                for (h, v) in [
                    (&mut self.submit, s.submit),
                    (&mut self.queue_wait, s.queue_wait),
                    (&mut self.dispatch, s.dispatch),
                    (&mut self.execution, s.execution),
                ] {
                    if let Some(v) = v {
                        let _ = h.record(us(v));
                    }
                }
            }
            Err(code) => {
                sec.errors += 1;
                *self.errors.entry(code.clone()).or_default() += 1;
            }
        }
    }

    pub fn ok(&self) -> u64 {
        self.ok
    }

    /// The host's CPU time over the run and its split (see
    /// [`SystemReport::host_cpu_ms_per_op`], [`SystemReport::cpu_ms_per_op_by_group`]).
    pub fn set_cpu(&mut self, cpu: CpuUse) {
        self.cpu = cpu;
    }

    pub fn error_count(&self) -> u64 {
        self.errors.values().sum()
    }

    /// The summary of everything recorded, with throughput over `elapsed`.
    pub fn summarize(&self, name: &str, elapsed: Duration) -> SystemReport {
        SystemReport {
            name: name.to_owned(),
            ok: self.ok,
            errors: self.errors.clone(),
            elapsed_s: elapsed.as_secs_f64(),
            throughput_per_s: self.ok as f64 / elapsed.as_secs_f64().max(1e-9),
            submit: Percentiles::of(&self.submit),
            queue_wait: Percentiles::of(&self.queue_wait),
            dispatch: Percentiles::of(&self.dispatch),
            execution: Percentiles::of(&self.execution),
            end_to_end: Percentiles::of(&self.e2e),
            host_cpu_ms_per_op: self
                .cpu
                .host_busy
                .filter(|_| self.ok > 0)
                .map(|b| b.as_secs_f64() * 1000.0 / self.ok as f64),
            cpu_ms_per_op_by_group: if self.ok > 0 {
                self.cpu
                    .groups
                    .iter()
                    .map(|g| GroupCpuPerOp {
                        group: g.group.clone(),
                        ms_per_op: g.cpu_s * 1000.0 / self.ok as f64,
                    })
                    .collect()
            } else {
                Vec::new()
            },
            timeline: self
                .seconds
                .iter()
                .enumerate()
                .map(|(i, s)| SecondReport {
                    t_s: i as u64,
                    completed: s.completed,
                    errors: s.errors,
                    e2e_p50_ms: s.e2e.as_ref().map(|h| ms(h.value_at_quantile(0.5))),
                    e2e_p99_ms: s.e2e.as_ref().map(|h| ms(h.value_at_quantile(0.99))),
                })
                .collect(),
        }
    }
}

fn ms(us: u64) -> f64 {
    us as f64 / 1000.0
}

/// Percentiles of one latency, in milliseconds. `count` 0 means "not observed" (all zero).
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    pub count: u64,
    pub p50_ms: f64,
    pub p90_ms: f64,
    pub p99_ms: f64,
    pub max_ms: f64,
    pub mean_ms: f64,
}

impl Percentiles {
    pub fn of(h: &Histogram<u64>) -> Self {
        if h.is_empty() {
            return Self::default();
        }
        Self {
            count: h.len(),
            p50_ms: ms(h.value_at_quantile(0.5)),
            p90_ms: ms(h.value_at_quantile(0.9)),
            p99_ms: ms(h.value_at_quantile(0.99)),
            max_ms: ms(h.max()),
            mean_ms: h.mean() / 1000.0,
        }
    }
}

/// One second of a run: what finished in it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SecondReport {
    pub t_s: u64,
    pub completed: u64,
    pub errors: u64,
    pub e2e_p50_ms: Option<f64>,
    pub e2e_p99_ms: Option<f64>,
}

/// Everything measured of one system (drover or a baseline).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SystemReport {
    pub name: String,
    pub ok: u64,
    /// Failed operations by gRPC code (`Unavailable`, …) or outcome (`run_FAILED`, `exit_125`).
    pub errors: BTreeMap<String, u64>,
    pub elapsed_s: f64,
    /// Successful operations per second over the whole run.
    pub throughput_per_s: f64,
    pub submit: Percentiles,
    pub queue_wait: Percentiles,
    pub dispatch: Percentiles,
    pub execution: Percentiles,
    pub end_to_end: Percentiles,
    /// CPU the whole host spent per successful operation while this system ran (every
    /// process: the system itself, Postgres, RabbitMQ, Redis, the load generator). What one
    /// operation costs the machine: on a saturated host, throughput ≈ cores × 1000 / this.
    #[serde(default)]
    pub host_cpu_ms_per_op: Option<f64>,
    /// [`Self::host_cpu_ms_per_op`] split by process group (each drover binary, Postgres,
    /// RabbitMQ, Redis, the load generator, …), largest first: where an operation's cost goes.
    #[serde(default)]
    pub cpu_ms_per_op_by_group: Vec<GroupCpuPerOp>,
    pub timeline: Vec<SecondReport>,
}

/// One process group's CPU per successful operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupCpuPerOp {
    pub group: String,
    pub ms_per_op: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(e2e_ms: u64) -> Outcome {
        Ok(Sample {
            submit: Some(Duration::from_millis(1)),
            queue_wait: None,
            dispatch: None,
            execution: None,
            end_to_end: Duration::from_millis(e2e_ms),
        })
    }

    #[test]
    fn percentiles_errors_and_seconds() {
        let mut r = Recorder::default();
        for i in 1..=100u64 {
            r.record(Duration::from_millis(i * 15), &ok(i));
        }
        r.record(Duration::from_millis(10), &Err("Unavailable".into()));
        r.record(Duration::from_millis(1500), &Err("Unavailable".into()));
        let s = r.summarize("drover", Duration::from_secs(2));
        assert_eq!(s.ok, 100);
        assert_eq!(s.errors.get("Unavailable"), Some(&2));
        assert_eq!(s.throughput_per_s, 50.0);
        // 3 significant digits: within 0.1 %.
        assert!(
            (s.end_to_end.p50_ms - 50.0).abs() < 0.1,
            "{:?}",
            s.end_to_end
        );
        assert!(
            (s.end_to_end.p99_ms - 99.0).abs() < 0.1,
            "{:?}",
            s.end_to_end
        );
        assert!((s.end_to_end.max_ms - 100.0).abs() < 0.1);
        assert_eq!(s.submit.count, 100);
        assert_eq!(s.queue_wait, Percentiles::default());
        // 100 completions at 15 ms steps: seconds 0 (1..=66), 1 (67..=100).
        assert_eq!(s.timeline.len(), 2);
        assert_eq!(s.timeline[0].completed, 66);
        assert_eq!(s.timeline[0].errors, 1);
        assert_eq!(s.timeline[1].completed, 34);
        assert_eq!(s.timeline[1].errors, 1);
        assert!(s.timeline[1].e2e_p50_ms.is_some_and(|p| p > 80.0));
    }
}
