//! RSS and CPU of the drover processes, sampled once a second from `/proc/<pid>/status`
//! (`VmRSS`) and `/proc/<pid>/stat` (`utime + stime`). CPU is the share of one core used
//! between two samples (100 % = one full core). Clock ticks are taken as 100 per second:
//! Linux fixes `USER_HZ` at 100 on every architecture it exposes `/proc` stat times for.

use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub(super) const TICKS_PER_S: f64 = 100.0;

/// A process to watch: a name for the report and its pid.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Watched {
    pub name: String,
    pub pid: u32,
}

impl std::str::FromStr for Watched {
    type Err = String;
    /// `NAME=PID`, as `--pid api=1234` gives it.
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, pid) = s
            .split_once('=')
            .ok_or_else(|| format!("expected NAME=PID, got {s:?}"))?;
        let pid = pid
            .trim()
            .parse()
            .map_err(|e| format!("bad pid in {s:?}: {e}"))?;
        if name.is_empty() {
            return Err(format!("empty name in {s:?}"));
        }
        Ok(Self {
            name: name.to_owned(),
            pid,
        })
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct ProcSample {
    pub t_s: f64,
    pub rss_kib: u64,
    /// Percent of one core since the previous sample (absent on the first).
    pub cpu_pct: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ProcessReport {
    pub name: String,
    pub pid: u32,
    pub peak_rss_kib: u64,
    pub mean_cpu_pct: f64,
    pub peak_cpu_pct: f64,
    /// False if the process vanished while being watched.
    pub alive_at_end: bool,
    /// Least-squares slope of RSS over the second half of the samples, in MiB per hour: a
    /// soak run's leak shows as a slope that stays positive once the caches are warm.
    #[serde(default)]
    pub rss_slope_mib_per_hour: Option<f64>,
    pub samples: Vec<ProcSample>,
}

/// The least-squares slope of `(t_s, rss)` over the later half of `samples`, in MiB per hour;
/// `None` with fewer than 10 points there.
pub fn rss_slope_mib_per_hour(samples: &[ProcSample]) -> Option<f64> {
    let tail = &samples[samples.len() / 2..];
    if tail.len() < 10 {
        return None;
    }
    let n = tail.len() as f64;
    let mean_t = tail.iter().map(|s| s.t_s).sum::<f64>() / n;
    let mean_r = tail.iter().map(|s| s.rss_kib as f64).sum::<f64>() / n;
    let (mut cov, mut var) = (0.0, 0.0);
    for s in tail {
        let dt = s.t_s - mean_t;
        cov += dt * (s.rss_kib as f64 - mean_r);
        var += dt * dt;
    }
    (var > 0.0).then(|| cov / var * 3600.0 / 1024.0)
}

/// `VmRSS` in KiB from the text of `/proc/<pid>/status`.
pub fn parse_rss_kib(status: &str) -> Option<u64> {
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.split_whitespace().next())
        .and_then(|v| v.parse().ok())
}

/// `utime + stime` in clock ticks from the text of `/proc/<pid>/stat`
/// ([`super::cpu_share::parse_stat`] reads the line).
pub fn parse_cpu_ticks(stat: &str) -> Option<u64> {
    super::cpu_share::parse_stat(stat).map(|p| p.ticks)
}

/// Busy clock ticks of the whole host, all CPUs, from the text of `/proc/stat` (its `cpu` line):
/// user, nice, system, irq, softirq and steal; idle and iowait are not busy.
pub fn parse_host_busy_ticks(stat: &str) -> Option<u64> {
    let line = stat.lines().find(|l| l.starts_with("cpu "))?;
    let v: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .map(str::parse)
        .collect::<Result<_, _>>()
        .ok()?;
    // user nice system idle iowait irq softirq steal [guest guest_nice: already in user]
    let at = |i: usize| v.get(i).copied().unwrap_or(0);
    (v.len() >= 4).then(|| at(0) + at(1) + at(2) + at(5) + at(6) + at(7))
}

/// The host's busy time so far, for CPU spent per operation (`None` off Linux).
pub fn host_busy() -> Option<std::time::Duration> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let ticks = parse_host_busy_ticks(&stat)?;
    Some(std::time::Duration::from_secs_f64(
        ticks as f64 / TICKS_PER_S,
    ))
}

fn read(pid: u32) -> Option<(u64, u64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    Some((parse_rss_kib(&status)?, parse_cpu_ticks(&stat)?))
}

/// Samples every process each `every` until `cancel`, then returns one report per process.
pub async fn sample(
    procs: Vec<Watched>,
    every: Duration,
    cancel: CancellationToken,
) -> Vec<ProcessReport> {
    let start = Instant::now();
    let mut reports: Vec<ProcessReport> = procs
        .iter()
        .map(|p| ProcessReport {
            name: p.name.clone(),
            pid: p.pid,
            peak_rss_kib: 0,
            mean_cpu_pct: 0.0,
            peak_cpu_pct: 0.0,
            alive_at_end: true,
            rss_slope_mib_per_hour: None,
            samples: Vec::new(),
        })
        .collect();
    let mut last: Vec<Option<(Instant, u64)>> = vec![None; procs.len()];
    loop {
        let now = Instant::now();
        for (i, p) in procs.iter().enumerate() {
            let Some((rss, ticks)) = read(p.pid) else {
                reports[i].alive_at_end = false;
                continue;
            };
            reports[i].alive_at_end = true;
            let cpu = last[i].map(|(t, prev)| {
                let dt = now.duration_since(t).as_secs_f64().max(1e-3);
                ticks.saturating_sub(prev) as f64 / TICKS_PER_S / dt * 100.0
            });
            last[i] = Some((now, ticks));
            reports[i].samples.push(ProcSample {
                t_s: now.duration_since(start).as_secs_f64(),
                rss_kib: rss,
                cpu_pct: cpu,
            });
        }
        tokio::select! {
            () = cancel.cancelled() => break,
            () = tokio::time::sleep(every) => {}
        }
    }
    for r in &mut reports {
        r.peak_rss_kib = r.samples.iter().map(|s| s.rss_kib).max().unwrap_or(0);
        r.rss_slope_mib_per_hour = rss_slope_mib_per_hour(&r.samples);
        let cpus: Vec<f64> = r.samples.iter().filter_map(|s| s.cpu_pct).collect();
        r.peak_cpu_pct = cpus.iter().copied().fold(0.0, f64::max);
        r.mean_cpu_pct = if cpus.is_empty() {
            0.0
        } else {
            cpus.iter().sum::<f64>() / cpus.len() as f64
        };
    }
    reports
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_proc_files() {
        let status = "Name:\tdrover-api\nVmPeak:\t  9000 kB\nVmRSS:\t   12345 kB\nThreads:\t4\n";
        assert_eq!(parse_rss_kib(status), Some(12345));
        // 1 MiB every 36 s is 100 MiB per hour; a flat line has no slope.
        let growing: Vec<ProcSample> = (0..40)
            .map(|i| ProcSample {
                t_s: f64::from(i) * 36.0,
                rss_kib: 50_000 + 1024 * i as u64,
                cpu_pct: None,
            })
            .collect();
        let slope = rss_slope_mib_per_hour(&growing).expect("enough samples");
        assert!((slope - 100.0).abs() < 1e-6, "{slope}");
        let flat: Vec<ProcSample> = growing
            .iter()
            .map(|s| ProcSample {
                rss_kib: 50_000,
                ..*s
            })
            .collect();
        assert_eq!(rss_slope_mib_per_hour(&flat), Some(0.0));
        assert_eq!(rss_slope_mib_per_hour(&growing[..8]), None);
        assert_eq!(parse_rss_kib("Name: x\n"), None);
        let stat = "42 (drover (x) y) S 1 42 42 0 -1 4194560 100 0 0 0 250 50 0 0 20 0 4 0 1 2 3";
        assert_eq!(parse_cpu_ticks(stat), Some(300));
        assert_eq!(parse_cpu_ticks("garbage"), None);
        let host = "cpu  100 5 50 1000 20 3 2 1 0 0\ncpu0 50 2 25 500 10 1 1 0 0 0\n";
        assert_eq!(parse_host_busy_ticks(host), Some(100 + 5 + 50 + 3 + 2 + 1));
        assert_eq!(parse_host_busy_ticks("intr 1 2 3"), None);
        assert_eq!(
            "api=12".parse(),
            Ok(Watched {
                name: "api".into(),
                pid: 12
            })
        );
        assert!("api".parse::<Watched>().is_err());
        assert!("=3".parse::<Watched>().is_err());
    }

    #[tokio::test]
    async fn samples_this_process() {
        let cancel = CancellationToken::new();
        let me = Watched {
            name: "self".into(),
            pid: std::process::id(),
        };
        let task = tokio::spawn(sample(vec![me], Duration::from_millis(20), cancel.clone()));
        tokio::time::sleep(Duration::from_millis(100)).await;
        cancel.cancel();
        let reports = task.await.expect("sampler");
        assert_eq!(reports.len(), 1);
        assert!(reports[0].samples.len() >= 2);
        assert!(reports[0].peak_rss_kib > 0);
        assert!(reports[0].alive_at_end);
    }
}
