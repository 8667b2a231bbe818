//! `drover-chaos run --smoke` through the real binary, as CI and `deploy/nightly.sh --smoke`
//! run it: four fault scenarios (agent kill -9 with restart, dispatcher kill -9, duplicate and
//! poison messages, Redis FLUSHALL), each against its own stack of the real binaries with a
//! private Redis, judged by the oracle. The run must exit 0 with a report that shows every
//! fault was injected and no invariant was violated.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use drover_chaos::scenario::report::RunReport;
use drover_tests::stack::bin_path;

#[tokio::test]
async fn chaos_smoke_passes_with_every_fault_injected_and_no_violation() {
    let out = tempfile::tempdir().unwrap();
    let chaos = bin_path("drover-chaos");
    let bin_dir = chaos.parent().unwrap().to_path_buf();
    let run = tokio::process::Command::new(&chaos)
        .args(["run", "--smoke", "--seed", "7", "--out"])
        .arg(out.path())
        .arg("--bin-dir")
        .arg(&bin_dir)
        .kill_on_drop(true)
        .output()
        .await
        .unwrap();
    let stderr = String::from_utf8_lossy(&run.stderr);
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "drover-chaos run --smoke failed ({}):\n{stdout}\n{stderr}",
        run.status
    );
    let report: RunReport =
        serde_json::from_str(&std::fs::read_to_string(out.path().join("report.json")).unwrap())
            .unwrap();
    let names: Vec<&str> = report.scenarios.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(
        names,
        [
            "agent-kill-restart",
            "dispatcher-kill",
            "duplicate-poison",
            "redis-flushall"
        ]
    );
    assert_eq!(report.violation_count(), 0, "{stderr}");
    for s in &report.scenarios {
        assert!(s.passed, "{}: {:?} {:?}", s.name, s.error, s.violations);
        let runs: usize = s.outcomes.values().sum();
        assert!(runs > 0, "{}: no runs", s.name);
        assert_eq!(s.submissions.acknowledged, s.submissions.keys, "{}", s.name);
    }
    let timeline = |name: &str| -> Vec<String> {
        report
            .scenarios
            .iter()
            .find(|s| s.name == name)
            .unwrap()
            .timeline
            .iter()
            .map(|e| e.what.clone())
            .collect()
    };
    let has = |name: &str, what: &str| {
        let t = timeline(name);
        assert!(
            t.iter().any(|e| e.contains(what)),
            "{name}: no {what:?} in {t:#?}"
        );
    };
    has("agent-kill-restart", "kill -9 agent-0");
    has("agent-kill-restart", "agent-0 restarted");
    has("dispatcher-kill", "kill -9 dispatcher-0");
    has("dispatcher-kill", "kill -9 dispatcher-1");
    has("redis-flushall", "redis FLUSHALL");
    has("duplicate-poison", "garbage messages");
    // Every poison message was archived once, and nothing else was dead-lettered.
    let poison = report
        .scenarios
        .iter()
        .find(|s| s.name == "duplicate-poison")
        .unwrap();
    assert_eq!(poison.expectations.poison, 5);
    assert_eq!(poison.dead_letters.get("unparseable"), Some(&5));
    assert_eq!(poison.dead_letters.get("unknown_run"), Some(&1));
    assert_eq!(poison.dead_letters.len(), 2, "{:?}", poison.dead_letters);
    let md = std::fs::read_to_string(out.path().join("report.md")).unwrap();
    assert!(md.contains("| duplicate-poison | pass |"), "{md}");
}
