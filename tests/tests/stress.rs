//! `drover-chaos stress` end to end: a small closed-loop load against a real stack, side by
//! side with the bare `docker run` baseline and the Celery baseline (Celery from PyPI into the
//! harness's cached virtualenv, a fresh vhost, Redis database 13), then the report files.

use std::path::Path;

use drover_chaos::stress::celery::{CeleryConfig, CeleryTask};
use drover_chaos::stress::load::{Mode, Stop};
use drover_chaos::stress::procstat::Watched;
use drover_chaos::stress::report::Report;
use drover_chaos::stress::svg;
use drover_chaos::stress::workload::Workload;
use drover_chaos::stress::{self, Baseline, StressConfig};
use drover_tests::Stack;

fn config(stack: &Stack, out: &Path, baselines: Vec<Baseline>) -> StressConfig {
    let pids = ["api", "dispatcher", stack.agent_id.as_str()]
        .iter()
        .map(|name| Watched {
            name: (*name).to_owned(),
            pid: stack.pid(name).expect("stack process running"),
        })
        .collect();
    StressConfig {
        endpoint: stack.endpoint.clone(),
        spawn: None,
        workload: Workload::NoopDocker,
        mode: Mode::Closed { concurrency: 4 },
        stop: Stop::Runs(20),
        warmup: 1,
        baselines,
        celery: CeleryConfig::default(),
        pids,
        out: out.to_path_buf(),
        progress: false,
        token: Some(stack.token.clone()),
    }
}

fn check_files(out: &Path, report: &Report) {
    for f in ["report.json", "summary.md", "latency.svg", "throughput.svg"] {
        let text = std::fs::read_to_string(out.join(f)).unwrap_or_else(|e| panic!("{f}: {e}"));
        assert!(!text.is_empty(), "{f} is empty");
        if f.ends_with(".svg") {
            svg::well_formed(&text).unwrap_or_else(|e| panic!("{f}: {e}"));
        }
    }
    let on_disk: Report = serde_json::from_str(
        &std::fs::read_to_string(out.join("report.json")).expect("report.json"),
    )
    .expect("report.json parses");
    // Floats round-trip through JSON to the last bit or so; compare what is shown.
    assert_eq!(on_disk.one_line(), report.one_line());
    assert_eq!(on_disk.summary_markdown(), report.summary_markdown());
    assert!(report.violations.is_empty(), "{:?}", report.violations);
    assert!(
        report.failed_baselines.is_empty(),
        "{:?}",
        report.failed_baselines
    );
    let drover = &report.systems[0];
    assert_eq!(drover.name, "drover");
    assert_eq!(drover.ok, 20, "errors: {:?}", drover.errors);
    for p in [
        &drover.submit,
        &drover.queue_wait,
        &drover.dispatch,
        &drover.end_to_end,
    ] {
        assert_eq!(p.count, 20);
        assert!(p.p50_ms > 0.0 && p.p99_ms >= p.p50_ms, "{p:?}");
    }
    assert_eq!(report.processes.len(), 3);
    for p in &report.processes {
        assert!(p.peak_rss_kib > 0 && p.alive_at_end, "{p:?}");
    }
    // Where the host's CPU went while drover ran: its binaries and its Postgres among it.
    let cpu = |group: &str| {
        drover
            .cpu_ms_per_op_by_group
            .iter()
            .find(|g| g.group == group)
            .map_or(0.0, |g| g.ms_per_op)
    };
    for group in ["drover-api", "postgres"] {
        assert!(
            cpu(group) > 0.0,
            "{group}: {:?}",
            drover.cpu_ms_per_op_by_group
        );
    }
    let md = std::fs::read_to_string(out.join("summary.md")).expect("summary.md");
    assert!(md.contains("| drover | submit→terminal | 20 |"), "{md}");
    assert!(md.contains("## Where the CPU went"), "{md}");
}

#[tokio::test(flavor = "multi_thread")]
async fn stress_against_a_stack_with_the_docker_baseline() {
    let stack = Stack::start().await;
    let out = stack.log_dir.join("stress");
    let report = stress::run(config(&stack, &out, vec![Baseline::Docker]))
        .await
        .expect("stress run");
    check_files(&out, &report);
    assert_eq!(report.systems.len(), 2);
    assert_eq!(report.systems[1].name, "docker");
    assert_eq!(report.systems[1].ok, 20, "{:?}", report.systems[1].errors);
    assert_eq!(report.ratios.len(), 1);
    let r = &report.ratios[0];
    assert_eq!(r.baseline, "docker");
    assert!(
        r.throughput > 0.0 && r.e2e_p50 > 0.0 && r.e2e_p99 > 0.0,
        "{r:?}"
    );
    assert!(report.one_line().contains("drover/docker: throughput x"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn stress_with_the_celery_baseline() {
    let stack = Stack::start().await;
    let out = stack.log_dir.join("stress-celery");
    let mut cfg = config(&stack, &out, vec![Baseline::Celery]);
    cfg.celery.task = CeleryTask::Noop;
    let report = stress::run(cfg).await.expect("stress run");
    check_files(&out, &report);
    assert_eq!(report.systems.len(), 2);
    let celery = &report.systems[1];
    assert_eq!(celery.name, "celery-noop");
    assert_eq!(celery.ok, 20, "{:?}", celery.errors);
    assert_eq!(celery.submit.count, 20);
    // Celery's worker and driver are Python processes, measured over Celery's own window.
    assert!(
        celery
            .cpu_ms_per_op_by_group
            .iter()
            .any(|g| g.group == "python (celery)" && g.ms_per_op > 0.0),
        "{:?}",
        celery.cpu_ms_per_op_by_group
    );
    let r = &report.ratios[0];
    assert!(
        r.throughput > 0.0 && r.e2e_p50 > 0.0 && r.e2e_p99 > 0.0,
        "{r:?}"
    );
    // The harness cleans up after itself: the result database is empty again.
    let dbsize = std::process::Command::new("redis-cli")
        .args(["-n", "13", "dbsize"])
        .output()
        .expect("redis-cli");
    assert_eq!(String::from_utf8_lossy(&dbsize.stdout).trim(), "0");
    stack.stop().await;
}
