//! The report of one `drover-chaos run`: `report.json` (everything) and `report.md` (a table
//! of scenarios, then each scenario's timeline, outcomes and violations).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::Path;

use serde::{Deserialize, Serialize};

use super::timeline::Entry;
use crate::verdict::Expectations;

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SubmissionCounts {
    /// Idempotency keys the clients used.
    pub keys: usize,
    /// Keys acknowledged (a run id came back).
    pub acknowledged: usize,
    /// Keys with at least one failed SubmitRun call, retried with the same key.
    pub retried: usize,
    /// Keys submitted again after their acknowledgement (a client that lost the answer).
    pub resubmitted: usize,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ScenarioReport {
    pub name: String,
    pub description: String,
    pub seed: u64,
    /// No violation and no error.
    pub passed: bool,
    pub duration_s: f64,
    pub timeline: Vec<Entry>,
    pub submissions: SubmissionCounts,
    /// Runs in Postgres by final state.
    pub outcomes: BTreeMap<String, usize>,
    /// Runs assigned more than once (their first lease was lost to a fault, or retried).
    pub reassigned: usize,
    /// Reasons of runs that did not succeed, with counts.
    pub failure_reasons: BTreeMap<String, usize>,
    /// Dead letters archived, by kind.
    pub dead_letters: BTreeMap<String, usize>,
    pub expectations: Expectations,
    pub violations: Vec<String>,
    /// The scenario could not be carried out (set-up failed, a fault could not be injected,
    /// it overran its time bound); it did not pass.
    pub error: Option<String>,
    /// Where the stack's process logs and journals are.
    pub logs: String,
}

#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RunReport {
    pub seed: u64,
    pub started_at: String,
    pub scenarios: Vec<ScenarioReport>,
}

impl RunReport {
    pub fn passed(&self) -> bool {
        self.scenarios.iter().all(|s| s.passed)
    }

    pub fn violation_count(&self) -> usize {
        self.scenarios.iter().map(|s| s.violations.len()).sum()
    }

    pub fn one_line(&self) -> String {
        let failed: Vec<&str> = self
            .scenarios
            .iter()
            .filter(|s| !s.passed)
            .map(|s| s.name.as_str())
            .collect();
        format!(
            "{} scenarios, {} passed, {} violations{}",
            self.scenarios.len(),
            self.scenarios.len() - failed.len(),
            self.violation_count(),
            if failed.is_empty() {
                String::new()
            } else {
                format!("; failed: {}", failed.join(", "))
            }
        )
    }

    pub fn markdown(&self) -> String {
        let mut md = String::new();
        let _ = writeln!(md, "# drover chaos run\n");
        let _ = writeln!(
            md,
            "Seed {} · started {} · {}\n",
            self.seed,
            self.started_at,
            self.one_line()
        );
        let _ = writeln!(
            md,
            "| scenario | result | runs | outcomes | reassigned | keys (retried) | violations | time |"
        );
        let _ = writeln!(md, "|---|---|---|---|---|---|---|---|");
        for s in &self.scenarios {
            let runs: usize = s.outcomes.values().sum();
            let outcomes = s
                .outcomes
                .iter()
                .map(|(k, v)| format!("{k} {v}"))
                .collect::<Vec<_>>()
                .join(", ");
            let _ = writeln!(
                md,
                "| {} | {} | {} | {} | {} | {} ({}) | {} | {:.0} s |",
                s.name,
                if s.passed {
                    "pass"
                } else if s.error.is_some() {
                    "ERROR"
                } else {
                    "FAIL"
                },
                runs,
                outcomes,
                s.reassigned,
                s.submissions.keys,
                s.submissions.retried,
                s.violations.len(),
                s.duration_s
            );
        }
        for s in &self.scenarios {
            let _ = writeln!(md, "\n## {}\n\n{}\n", s.name, s.description);
            let _ = writeln!(md, "Seed {} · logs `{}`\n", s.seed, s.logs);
            if let Some(e) = &s.error {
                let _ = writeln!(md, "**Error:** {e}\n");
            }
            let _ = writeln!(md, "Timeline:\n\n```text");
            for e in &s.timeline {
                let _ = writeln!(md, "{e}");
            }
            let _ = writeln!(md, "```\n");
            if !s.failure_reasons.is_empty() {
                let _ = writeln!(md, "Runs that did not succeed, by reason:\n");
                for (r, n) in &s.failure_reasons {
                    let _ = writeln!(md, "- {n} × {r}");
                }
                let _ = writeln!(md);
            }
            if !s.dead_letters.is_empty() {
                let dl = s
                    .dead_letters
                    .iter()
                    .map(|(k, v)| format!("{k} {v}"))
                    .collect::<Vec<_>>()
                    .join(", ");
                let _ = writeln!(md, "Dead letters archived: {dl}\n");
            }
            if s.violations.is_empty() {
                let _ = writeln!(md, "Violations: none");
            } else {
                let _ = writeln!(md, "Violations ({}):\n", s.violations.len());
                for v in s.violations.iter().take(50) {
                    let _ = writeln!(md, "- {v}");
                }
                if s.violations.len() > 50 {
                    let _ = writeln!(md, "- … {} more in report.json", s.violations.len() - 50);
                }
            }
        }
        md
    }

    /// Writes `report.json` and `report.md` into `dir` (created).
    pub fn write(&self, dir: &Path) -> std::io::Result<()> {
        std::fs::create_dir_all(dir)?;
        let json = serde_json::to_string_pretty(self).map_err(std::io::Error::other)?;
        std::fs::write(dir.join("report.json"), json)?;
        std::fs::write(dir.join("report.md"), self.markdown())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_round_trips_and_renders() {
        let r = RunReport {
            seed: 7,
            started_at: "now".into(),
            scenarios: vec![ScenarioReport {
                name: "agent-kill-restart".into(),
                passed: false,
                timeline: vec![Entry {
                    t_s: 3.2,
                    what: "kill -9 agent-0".into(),
                }],
                outcomes: BTreeMap::from([("SUCCEEDED".into(), 3)]),
                violations: vec!["run x is stuck in RUNNING".into()],
                ..Default::default()
            }],
        };
        let dir = tempfile::tempdir().expect("temp dir");
        r.write(dir.path()).expect("write");
        let back: RunReport = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join("report.json")).expect("read"),
        )
        .expect("parse");
        assert_eq!(back, r);
        let md = r.markdown();
        assert!(md.contains("t=3.2s kill -9 agent-0"), "{md}");
        assert!(md.contains("| agent-kill-restart | FAIL | 3 |"), "{md}");
        assert!(!r.passed());
        assert_eq!(r.violation_count(), 1);
    }
}
