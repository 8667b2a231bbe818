//! The report of one `stress` invocation: `report.json` (everything, serde), `summary.md` (a
//! Markdown table), SVG charts, and a one-line summary for stdout.
//!
//! Ratios are drover / baseline: above 1 for throughput means drover did more per second; above
//! 1 for a latency means drover was slower.

use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::metrics::{SecondReport, SystemReport};
use super::procstat::ProcessReport;
use super::svg;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Ratio {
    pub baseline: String,
    pub throughput: f64,
    pub e2e_p50: f64,
    pub e2e_p99: f64,
}

/// How the invocation was set up, echoed so a report says what produced it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct RunSetup {
    pub workload: String,
    /// `closed c=8` or `open 100/s`.
    pub mode: String,
    /// `200 runs` or `60s`.
    pub stop: String,
    pub endpoint: String,
    pub started_at: String,
    pub host_cpus: usize,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub setup: RunSetup,
    /// drover first, then each baseline in the order given.
    pub systems: Vec<SystemReport>,
    pub ratios: Vec<Ratio>,
    pub processes: Vec<ProcessReport>,
    /// Oracle findings over what the drover clients observed (see [`crate::oracle`]).
    pub violations: Vec<String>,
    /// Baselines that could not be measured, and why (the others are still reported).
    #[serde(default)]
    pub failed_baselines: Vec<String>,
}

fn ratio(a: f64, b: f64) -> f64 {
    if b > 0.0 { a / b } else { 0.0 }
}

impl Report {
    /// Fills `ratios` from `systems[0]` (drover) against every other system.
    pub fn compute_ratios(&mut self) {
        self.ratios.clear();
        let Some((d, rest)) = self.systems.split_first() else {
            return;
        };
        for b in rest {
            self.ratios.push(Ratio {
                baseline: b.name.clone(),
                throughput: ratio(d.throughput_per_s, b.throughput_per_s),
                e2e_p50: ratio(d.end_to_end.p50_ms, b.end_to_end.p50_ms),
                e2e_p99: ratio(d.end_to_end.p99_ms, b.end_to_end.p99_ms),
            });
        }
    }

    /// `drover: 200 ok 0 err 7.9/s e2e p50 812ms p99 1430ms | docker: … | ratios …`
    pub fn one_line(&self) -> String {
        let mut out = String::new();
        for (i, s) in self.systems.iter().enumerate() {
            if i > 0 {
                out.push_str(" | ");
            }
            let _ = write!(
                out,
                "{}: {} ok {} err {:.1}/s e2e p50 {:.0}ms p99 {:.0}ms",
                s.name,
                s.ok,
                s.errors.values().sum::<u64>(),
                s.throughput_per_s,
                s.end_to_end.p50_ms,
                s.end_to_end.p99_ms
            );
            if let Some(cpu) = s.host_cpu_ms_per_op {
                let _ = write!(out, " cpu {cpu:.1}ms/op");
            }
        }
        for r in &self.ratios {
            let _ = write!(
                out,
                " | drover/{}: throughput x{:.2} p50 x{:.2} p99 x{:.2}",
                r.baseline, r.throughput, r.e2e_p50, r.e2e_p99
            );
        }
        if !self.violations.is_empty() {
            let _ = write!(out, " | VIOLATIONS {}", self.violations.len());
        }
        for f in &self.failed_baselines {
            let _ = write!(out, " | FAILED {f}");
        }
        out
    }

    pub fn summary_markdown(&self) -> String {
        let s = &self.setup;
        let mut md = format!(
            "# drover-chaos stress\n\nworkload `{}`, {}, {}, endpoint `{}`, started {}, {} CPUs\n\n",
            s.workload, s.mode, s.stop, s.endpoint, s.started_at, s.host_cpus
        );
        md.push_str("## Latency (ms)\n\n| system | measure | n | p50 | p90 | p99 | max |\n|---|---|---:|---:|---:|---:|---:|\n");
        for sys in &self.systems {
            for (label, p) in [
                ("submit", &sys.submit),
                ("queue wait", &sys.queue_wait),
                ("dispatch", &sys.dispatch),
                ("execution", &sys.execution),
                ("submit→terminal", &sys.end_to_end),
            ] {
                if p.count == 0 {
                    continue;
                }
                let _ = writeln!(
                    md,
                    "| {} | {} | {} | {} | {} | {} | {} |",
                    sys.name,
                    label,
                    p.count,
                    f(p.p50_ms),
                    f(p.p90_ms),
                    f(p.p99_ms),
                    f(p.max_ms)
                );
            }
        }
        md.push_str("\n## Throughput and errors\n\nHost CPU per operation: the whole machine's CPU time (every process) while the system ran, per successful operation.\n\n| system | ok | errors | elapsed (s) | throughput (/s) | host CPU per op (ms) |\n|---|---:|---|---:|---:|---:|\n");
        for sys in &self.systems {
            let errors = if sys.errors.is_empty() {
                "0".to_owned()
            } else {
                sys.errors
                    .iter()
                    .map(|(k, v)| format!("{k}: {v}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            };
            let _ = writeln!(
                md,
                "| {} | {} | {} | {:.1} | {:.2} | {} |",
                sys.name,
                sys.ok,
                errors,
                sys.elapsed_s,
                sys.throughput_per_s,
                sys.host_cpu_ms_per_op
                    .map_or("-".to_owned(), |c| format!("{c:.2}"))
            );
        }
        self.cpu_by_group_markdown(&mut md);
        if !self.ratios.is_empty() {
            md.push_str("\n## drover / baseline\n\nThroughput above 1: drover did more per second. Latency above 1: drover was slower.\n\n| baseline | throughput | e2e p50 | e2e p99 |\n|---|---:|---:|---:|\n");
            for r in &self.ratios {
                let _ = writeln!(
                    md,
                    "| {} | {:.2} | {:.2} | {:.2} |",
                    r.baseline, r.throughput, r.e2e_p50, r.e2e_p99
                );
            }
        }
        if !self.processes.is_empty() {
            md.push_str("\n## drover processes\n\n| process | pid | peak RSS (MiB) | RSS slope, 2nd half (MiB/h) | mean CPU (% of a core) | peak CPU |\n|---|---:|---:|---:|---:|---:|\n");
            for p in &self.processes {
                let slope = p
                    .rss_slope_mib_per_hour
                    .map_or_else(|| "-".to_owned(), |s| format!("{s:+.1}"));
                let _ = writeln!(
                    md,
                    "| {} | {} | {:.1} | {} | {:.1} | {:.1} |",
                    p.name,
                    p.pid,
                    p.peak_rss_kib as f64 / 1024.0,
                    slope,
                    p.mean_cpu_pct,
                    p.peak_cpu_pct
                );
            }
        }
        if !self.failed_baselines.is_empty() {
            md.push_str("\n## Baselines that failed\n\n");
            for f in &self.failed_baselines {
                let _ = writeln!(md, "- {f}");
            }
        }
        let _ = writeln!(
            md,
            "\n## Oracle\n\n{} violation(s){}",
            self.violations.len(),
            self.violations
                .iter()
                .map(|v| format!("\n- {v}"))
                .collect::<String>()
        );
        md
    }

    /// The table of where each system's host CPU went, per successful operation: one row
    /// per process group, one column per system, groups in the order of the first system's
    /// cost.
    fn cpu_by_group_markdown(&self, md: &mut String) {
        let systems: Vec<&SystemReport> = self
            .systems
            .iter()
            .filter(|s| !s.cpu_ms_per_op_by_group.is_empty())
            .collect();
        if systems.is_empty() {
            return;
        }
        let mut groups: Vec<&str> = Vec::new();
        for s in &systems {
            for g in &s.cpu_ms_per_op_by_group {
                if !groups.contains(&g.group.as_str()) {
                    groups.push(&g.group);
                }
            }
        }
        md.push_str("\n## Where the CPU went (ms per successful operation)\n\nEvery process's CPU time while the system ran, by group; the rows add up to the host CPU per op above.\n\n| process group |");
        for s in &systems {
            let _ = write!(md, " {} |", s.name);
        }
        md.push_str("\n|---|");
        md.push_str(&"---:|".repeat(systems.len()));
        md.push('\n');
        for group in groups {
            let _ = write!(md, "| {group} |");
            for s in &systems {
                let cell = s
                    .cpu_ms_per_op_by_group
                    .iter()
                    .find(|g| g.group == group)
                    .map_or_else(|| "-".to_owned(), |g| format!("{:.3}", g.ms_per_op));
                let _ = write!(md, " {cell} |");
            }
            md.push('\n');
        }
    }

    /// Writes `report.json`, `summary.md`, `latency.svg` and `throughput.svg` into `dir`.
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)?;
        std::fs::write(dir.join("summary.md"), self.summary_markdown())?;
        std::fs::write(dir.join("latency.svg"), self.latency_chart())?;
        std::fs::write(dir.join("throughput.svg"), self.throughput_chart())?;
        Ok(())
    }

    /// Per-second p50 (solid) and p99 (dashed) of submit→terminal, one colour per system;
    /// each system's time axis starts at its own start (they ran one after another).
    pub fn latency_chart(&self) -> String {
        let mut series = Vec::new();
        for (i, sys) in self.systems.iter().enumerate() {
            let picks: [(&str, bool, Pick); 2] = [
                ("p50", false, |s| s.e2e_p50_ms),
                ("p99", true, |s| s.e2e_p99_ms),
            ];
            for (label, dashed, pick) in picks {
                series.push(svg::Series {
                    label: format!("{} {label}", sys.name),
                    colour: i,
                    dashed,
                    points: sys
                        .timeline
                        .iter()
                        .filter_map(|s| pick(s).map(|v| (s.t_s as f64, v)))
                        .collect(),
                });
            }
        }
        svg::line_chart(
            "submit→terminal latency per second",
            "seconds since start",
            "ms",
            &series,
        )
    }

    /// Completions per second, one colour per system.
    pub fn throughput_chart(&self) -> String {
        let series: Vec<svg::Series> = self
            .systems
            .iter()
            .enumerate()
            .map(|(i, sys)| svg::Series {
                label: sys.name.clone(),
                colour: i,
                dashed: false,
                points: sys
                    .timeline
                    .iter()
                    .map(|s| (s.t_s as f64, s.completed as f64))
                    .collect(),
            })
            .collect();
        svg::line_chart(
            "throughput",
            "seconds since start",
            "completed / s",
            &series,
        )
    }
}

/// Picks one per-second value of a system's timeline.
type Pick = fn(&SecondReport) -> Option<f64>;

fn f(v: f64) -> String {
    if v >= 100.0 {
        format!("{v:.0}")
    } else {
        format!("{v:.1}")
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::stress::cpu_share::{CpuUse, GroupCpu};
    use crate::stress::metrics::{Recorder, Sample};
    use crate::stress::procstat::ProcSample;

    fn system(name: &str, e2e_ms: &[u64], elapsed_s: u64) -> SystemReport {
        let mut r = Recorder::default();
        for (i, ms) in e2e_ms.iter().enumerate() {
            r.record(
                Duration::from_millis(i as u64 * 400),
                &Ok(Sample {
                    submit: Some(Duration::from_millis(2)),
                    queue_wait: Some(Duration::from_millis(5)),
                    dispatch: Some(Duration::from_millis(7)),
                    execution: None,
                    end_to_end: Duration::from_millis(*ms),
                }),
            );
        }
        r.record(Duration::from_millis(100), &Err("Unavailable".into()));
        let group = |group: &str, cpu_s: f64| GroupCpu {
            group: group.into(),
            cpu_s,
        };
        r.set_cpu(CpuUse {
            host_busy: None,
            groups: if name == "drover" {
                vec![group("postgres", 1.0), group("drover-api", 0.5)]
            } else {
                vec![group("docker", 2.0)]
            },
        });
        r.summarize(name, Duration::from_secs(elapsed_s))
    }

    fn report() -> Report {
        let mut r = Report {
            setup: RunSetup {
                workload: "noop-docker".into(),
                mode: "closed loop, concurrency 4".into(),
                stop: "10 runs".into(),
                endpoint: "http://127.0.0.1:1".into(),
                started_at: "2026-11-21T00:00:00Z".into(),
                host_cpus: 2,
            },
            systems: vec![
                system("drover", &[100, 200, 300, 400, 500], 2),
                system("docker", &[50, 100, 150, 200, 250], 1),
            ],
            ratios: Vec::new(),
            processes: vec![ProcessReport {
                name: "api".into(),
                pid: 7,
                peak_rss_kib: 20480,
                mean_cpu_pct: 12.5,
                peak_cpu_pct: 40.0,
                alive_at_end: true,
                rss_slope_mib_per_hour: None,
                samples: vec![ProcSample {
                    t_s: 0.0,
                    rss_kib: 20480,
                    cpu_pct: None,
                }],
            }],
            violations: Vec::new(),
            failed_baselines: Vec::new(),
        };
        r.compute_ratios();
        r
    }

    #[test]
    fn ratios_json_markdown_and_charts() {
        let r = report();
        assert_eq!(r.ratios.len(), 1);
        let ratio = &r.ratios[0];
        assert_eq!(ratio.baseline, "docker");
        assert!((ratio.throughput - 0.5).abs() < 1e-9, "{ratio:?}");
        assert!((ratio.e2e_p50 - 2.0).abs() < 0.01, "{ratio:?}");
        assert!((ratio.e2e_p99 - 2.0).abs() < 0.01, "{ratio:?}");

        // JSON round-trips and carries the percentiles.
        let json = serde_json::to_value(&r).expect("json");
        assert!(
            (json["systems"][0]["end_to_end"]["p50_ms"]
                .as_f64()
                .expect("p50")
                - 300.0)
                .abs()
                < 0.5
        );
        assert_eq!(json["systems"][0]["errors"]["Unavailable"], 1);
        let back: Report = serde_json::from_value(json).expect("round trip");
        assert_eq!(back.summary_markdown(), r.summary_markdown());

        let md = r.summary_markdown();
        assert!(
            md.contains("| drover | submit→terminal | 5 | 300 | 500 | 500 | 500 |"),
            "{md}"
        );
        assert!(md.contains("| drover | queue wait | 5 | 5.0 |"), "{md}");
        assert!(
            md.contains("| docker | 5 | Unavailable: 1 | 1.0 | 5.00 |"),
            "{md}"
        );
        assert!(md.contains("| docker | 0.50 | 2.00 | 2.00 |"), "{md}");
        assert!(md.contains("| api | 7 | 20.0 | - | 12.5 | 40.0 |"), "{md}");
        // Where the CPU went: per op (5 ok each), one column per system.
        assert!(md.contains("| process group | drover | docker |"), "{md}");
        assert!(md.contains("| postgres | 200.000 | - |"), "{md}");
        assert!(md.contains("| drover-api | 100.000 | - |"), "{md}");
        assert!(md.contains("| docker | - | 400.000 |"), "{md}");
        assert!(md.contains("0 violation(s)"));

        let line = r.one_line();
        assert!(
            line.starts_with("drover: 5 ok 1 err 2.5/s e2e p50 300ms p99 500ms | docker:"),
            "{line}"
        );
        assert!(
            line.contains("drover/docker: throughput x0.50 p50 x2.00 p99 x2.00"),
            "{line}"
        );

        for chart in [r.latency_chart(), r.throughput_chart()] {
            svg::well_formed(&chart).expect("well-formed svg");
        }
        // Two systems × (p50, p99) lines; one throughput line each.
        assert_eq!(r.latency_chart().matches("<polyline").count(), 4);
        assert_eq!(r.throughput_chart().matches("<polyline").count(), 2);
    }

    #[test]
    fn writes_the_four_files() {
        let dir = std::env::temp_dir().join(format!("drover-report-{}", uuid::Uuid::now_v7()));
        report().write(&dir).expect("write");
        for f in ["report.json", "summary.md", "latency.svg", "throughput.svg"] {
            let meta = std::fs::metadata(dir.join(f)).expect(f);
            assert!(meta.len() > 0, "{f} empty");
        }
        let parsed: Report =
            serde_json::from_str(&std::fs::read_to_string(dir.join("report.json")).expect("read"))
                .expect("parse");
        assert_eq!(parsed.systems.len(), 2);
        std::fs::remove_dir_all(&dir).expect("cleanup");
    }
}
