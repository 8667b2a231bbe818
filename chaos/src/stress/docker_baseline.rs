//! The `docker` baseline: the same no-op container drover runs, launched directly with
//! `docker run --rm` and the sandbox flags drover's agent applies (see
//! `worker-agent/src/docker/container_config.rs`: no network, every capability dropped, no
//! new privileges, pids 256, memory 512 MiB without swap, one CPU). This is the physical floor
//! of a container run on this machine: drover can only add to it.
//!
//! Only submit→terminal is observable (the process's whole life); a non-zero exit counts as
//! an error `exit_<code>`.

use tokio::process::Command;
use tokio::time::Instant;

use super::metrics::{Outcome, Sample};
use super::workload::{NOOP_COMMAND, NOOP_IMAGE};

/// `docker run` arguments matching drover's defaults for a spec with no resources set.
pub fn args() -> Vec<String> {
    let mut a: Vec<String> = [
        "run",
        "--rm",
        "--network",
        "none",
        "--cap-drop",
        "ALL",
        "--security-opt",
        "no-new-privileges",
        "--pids-limit",
        "256",
        "--memory",
        "512m",
        "--memory-swap",
        "512m",
        "--cpus",
        "1",
        NOOP_IMAGE,
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    a.extend(NOOP_COMMAND.iter().map(|s| (*s).to_owned()));
    a
}

pub async fn one(scheduled: Instant) -> Outcome {
    let out = Command::new("docker")
        .args(args())
        .stdin(std::process::Stdio::null())
        .output()
        .await
        .map_err(|e| format!("spawn_docker: {}", e.kind()))?;
    if out.status.success() {
        Ok(Sample {
            end_to_end: scheduled.elapsed(),
            ..Sample::default()
        })
    } else {
        Err(match out.status.code() {
            Some(c) => format!("exit_{c}"),
            None => "killed".to_owned(),
        })
    }
}
