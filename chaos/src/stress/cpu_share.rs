//! Where the host's CPU went while one system ran: the whole machine's busy time over the
//! window (`/proc/stat`), and every process's CPU time over it (`/proc/<pid>/stat`), summed
//! into groups a reader can act on — each drover binary, Postgres, RabbitMQ, Redis, Docker,
//! Python (Celery), the load generator itself, kernel threads, anything else — plus what no
//! process was charged with (interrupts, and processes that ended between two samples).
//!
//! Per-process figures come from a background thread that reads every process twice a second
//! and keeps the last figure it saw of each: a process that starts during the window counts
//! from zero, one that ends keeps what it had used at its last sample. A process is keyed by
//! pid and start time, so a reused pid is a new process.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use super::procstat::TICKS_PER_S;

const SAMPLE_EVERY: Duration = Duration::from_millis(500);

/// The group for what no process was charged with.
pub const UNATTRIBUTED: &str = "unattributed (interrupts, processes that ended between samples)";

/// One group's CPU time over a window.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GroupCpu {
    pub group: String,
    pub cpu_s: f64,
}

/// What one window measured.
#[derive(Debug, Clone, PartialEq, Default)]
pub struct CpuUse {
    /// The host's busy time over the window, every CPU.
    pub host_busy: Option<Duration>,
    /// Groups by CPU time, largest first; empty where `/proc` cannot be read.
    pub groups: Vec<GroupCpu>,
}

/// One line of `/proc/<pid>/stat`, as much of it as grouping needs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProcStat {
    pub comm: String,
    pub ppid: u32,
    pub ticks: u64,
    pub start_time: u64,
}

/// Parses `/proc/<pid>/stat`. The command name sits between the first `(` and the last `)`,
/// since it may itself hold spaces or parentheses.
pub fn parse_stat(stat: &str) -> Option<ProcStat> {
    let open = stat.find('(')?;
    let close = stat.rfind(')')?;
    let comm = stat.get(open + 1..close)?.to_owned();
    let fields: Vec<&str> = stat.get(close + 1..)?.split_whitespace().collect();
    // After ")": state(3) ppid(4) … utime(14) stime(15) … starttime(22), numbered as proc(5).
    let field = |n: usize| fields.get(n - 3).and_then(|v| v.parse::<u64>().ok());
    Some(ProcStat {
        comm,
        ppid: u32::try_from(field(4)?).ok()?,
        ticks: field(14)? + field(15)?,
        start_time: field(22)?,
    })
}

/// The group a process's time is reported under.
pub fn group_of(pid: u32, p: &ProcStat, own_pid: u32) -> String {
    if pid == own_pid {
        return "load generator (drover-chaos)".to_owned();
    }
    let comm = p.comm.as_str();
    let group = match comm {
        "postgres" => "postgres",
        "beam.smp" | "erl_child_setup" | "epmd" | "inet_gethost" => "rabbitmq",
        "redis-server" => "redis",
        // `comm` holds at most 15 bytes.
        "drover-dispatch" => "drover-dispatcher",
        "dockerd" | "containerd" | "runc" | "docker-proxy" | "docker-init" | "docker" => "docker",
        _ if comm.starts_with("containerd-shim") => "docker",
        _ if comm.starts_with("drover-") => comm,
        _ if comm.starts_with("python") || comm.starts_with("celery") => "python (celery)",
        _ if pid == 2 || p.ppid == 2 => "kernel threads",
        _ => "other processes",
    };
    group.to_owned()
}

/// Every process now, by pid.
fn snapshot() -> HashMap<u32, ProcStat> {
    let mut out = HashMap::new();
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return out;
    };
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<u32>().ok())
        else {
            continue;
        };
        if let Some(p) = std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .ok()
            .as_deref()
            .and_then(parse_stat)
        {
            out.insert(pid, p);
        }
    }
    out
}

/// Each process's first and latest figure over a window.
#[derive(Default)]
struct Ledger {
    /// (pid, start time) → (group, ticks at the start or 0, latest ticks).
    seen: HashMap<(u32, u64), (String, u64, u64)>,
}

impl Ledger {
    fn note(&mut self, now: HashMap<u32, ProcStat>, first: bool, own_pid: u32) {
        for (pid, p) in now {
            let entry = self.seen.entry((pid, p.start_time)).or_insert_with(|| {
                (
                    group_of(pid, &p, own_pid),
                    if first { p.ticks } else { 0 },
                    0,
                )
            });
            entry.2 = entry.2.max(p.ticks);
        }
    }

    fn groups(&self, host_busy: Option<Duration>) -> Vec<GroupCpu> {
        let mut by_group: HashMap<&str, u64> = HashMap::new();
        for (group, first, last) in self.seen.values() {
            let used = last.saturating_sub(*first);
            if used > 0 {
                *by_group.entry(group.as_str()).or_default() += used;
            }
        }
        let mut groups: Vec<GroupCpu> = by_group
            .into_iter()
            .map(|(g, t)| GroupCpu {
                group: g.to_owned(),
                cpu_s: t as f64 / TICKS_PER_S,
            })
            .collect();
        if let Some(busy) = host_busy {
            let charged: f64 = groups.iter().map(|g| g.cpu_s).sum();
            let rest = busy.as_secs_f64() - charged;
            if rest > 0.0 {
                groups.push(GroupCpu {
                    group: UNATTRIBUTED.to_owned(),
                    cpu_s: rest,
                });
            }
        }
        groups.sort_by(|a, b| b.cpu_s.total_cmp(&a.cpu_s).then(a.group.cmp(&b.group)));
        groups
    }
}

/// A window being measured; [`CpuWindow::finish`] ends it.
pub struct CpuWindow {
    host_before: Option<Duration>,
    stop: Arc<AtomicBool>,
    sampler: Option<JoinHandle<Ledger>>,
}

impl CpuWindow {
    /// Starts measuring now.
    pub fn start() -> Self {
        let own_pid = std::process::id();
        let mut ledger = Ledger::default();
        ledger.note(snapshot(), true, own_pid);
        let host_before = super::procstat::host_busy();
        let stop = Arc::new(AtomicBool::new(false));
        let flag = Arc::clone(&stop);
        // A thread, not a task: reading /proc is blocking work and must not wait behind the
        // load's tasks to be sampled on time.
        let sampler = std::thread::Builder::new()
            .name("cpu-share".into())
            .spawn(move || {
                while !flag.load(Ordering::Relaxed) {
                    std::thread::park_timeout(SAMPLE_EVERY);
                    ledger.note(snapshot(), false, own_pid);
                }
                ledger
            })
            .ok();
        Self {
            host_before,
            stop,
            sampler,
        }
    }

    /// Ends the window: a last sample, then the host's busy time and the groups.
    pub fn finish(mut self) -> CpuUse {
        let host_busy = match (self.host_before, super::procstat::host_busy()) {
            (Some(before), Some(after)) => Some(after.saturating_sub(before)),
            _ => None,
        };
        self.stop.store(true, Ordering::Relaxed);
        let ledger = self.sampler.take().and_then(|t| {
            t.thread().unpark();
            t.join().ok()
        });
        CpuUse {
            host_busy,
            groups: ledger.map(|l| l.groups(host_busy)).unwrap_or_default(),
        }
    }
}

impl Drop for CpuWindow {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = &self.sampler {
            t.thread().unpark();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stat(comm: &str, ppid: u32, utime: u64, stime: u64, start: u64) -> String {
        // Fields 3..=22 of proc(5): state ppid pgrp session tty tpgid flags minflt cminflt
        // majflt cmajflt utime stime cutime cstime priority nice threads itrealvalue starttime.
        format!(
            "42 ({comm}) S {ppid} 42 42 0 -1 4194560 100 0 0 0 {utime} {stime} 7 7 20 0 4 0 {start} 1000 200"
        )
    }

    #[test]
    fn parses_names_with_spaces_and_parentheses() {
        let p = parse_stat(&stat("tokio (rt) x", 1, 30, 12, 9_000)).unwrap();
        assert_eq!(
            p,
            ProcStat {
                comm: "tokio (rt) x".into(),
                ppid: 1,
                ticks: 42,
                start_time: 9_000,
            }
        );
        assert_eq!(parse_stat("garbage"), None);
        assert_eq!(parse_stat("1 (x) S"), None);
    }

    #[test]
    fn groups_processes_by_what_they_are() {
        let g = |comm: &str, pid: u32, ppid: u32| {
            group_of(pid, &parse_stat(&stat(comm, ppid, 0, 0, 1)).unwrap(), 999)
        };
        assert_eq!(g("postgres", 10, 1), "postgres");
        assert_eq!(g("beam.smp", 10, 1), "rabbitmq");
        assert_eq!(g("redis-server", 10, 1), "redis");
        assert_eq!(g("drover-api", 10, 1), "drover-api");
        assert_eq!(g("drover-dispatch", 10, 1), "drover-dispatcher");
        assert_eq!(g("drover-chaos", 999, 1), "load generator (drover-chaos)");
        assert_eq!(g("containerd-shim-runc-v2", 10, 1), "docker");
        assert_eq!(g("python3.11", 10, 1), "python (celery)");
        assert_eq!(g("kworker/0:1", 10, 2), "kernel threads");
        assert_eq!(g("sshd", 10, 1), "other processes");
    }

    #[test]
    fn a_window_counts_what_each_process_used_inside_it() {
        let mut ledger = Ledger::default();
        let p = |comm: &str, ticks: u64, start: u64| ProcStat {
            comm: comm.into(),
            ppid: 1,
            ticks,
            start_time: start,
        };
        // At the start: postgres had used 5 s already; redis 1 s.
        ledger.note(
            HashMap::from([(10, p("postgres", 500, 1)), (11, p("redis-server", 100, 1))]),
            true,
            999,
        );
        // Later: a postgres backend starts (counts from zero); pid 11 ends (keeps 0.5 s).
        ledger.note(
            HashMap::from([
                (10, p("postgres", 650, 1)),
                (11, p("redis-server", 150, 1)),
                (12, p("postgres", 30, 80)),
            ]),
            false,
            999,
        );
        // The end: pid 11 is gone and pid 12 was reused by another process.
        ledger.note(
            HashMap::from([(10, p("postgres", 700, 1)), (12, p("drover-api", 20, 90))]),
            false,
            999,
        );
        let groups = ledger.groups(Some(Duration::from_secs(4)));
        let got: Vec<(&str, f64)> = groups.iter().map(|g| (g.group.as_str(), g.cpu_s)).collect();
        let want = [
            ("postgres", 2.3),
            (UNATTRIBUTED, 1.0),
            ("redis", 0.5),
            ("drover-api", 0.2),
        ];
        assert_eq!(got.len(), want.len(), "{got:?}");
        for ((g, s), (wg, ws)) in got.iter().zip(want) {
            assert_eq!(*g, wg, "{got:?}");
            assert!((s - ws).abs() < 1e-9, "{got:?}");
        }
    }

    #[test]
    fn a_real_window_charges_this_process_for_its_own_work() {
        let own_ticks = || {
            std::fs::read_to_string("/proc/self/stat")
                .ok()
                .as_deref()
                .and_then(parse_stat)
                .expect("/proc/self/stat")
                .ticks
        };
        let window = CpuWindow::start();
        // Work until this process has used 0.3 s of CPU, however busy the machine is.
        let (from, give_up) = (
            own_ticks(),
            std::time::Instant::now() + Duration::from_secs(60),
        );
        let mut x = 0u64;
        while own_ticks() < from + 30 {
            for _ in 0..100_000 {
                x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
            }
            assert!(std::time::Instant::now() < give_up, "no CPU time in 60 s");
        }
        std::hint::black_box(x);
        let used = window.finish();
        assert!(
            used.host_busy
                .is_some_and(|b| b >= Duration::from_millis(200))
        );
        let own = used
            .groups
            .iter()
            .find(|g| g.group == "load generator (drover-chaos)")
            .expect("this process is in its own window");
        assert!(own.cpu_s >= 0.29, "{used:?}");
    }
}
