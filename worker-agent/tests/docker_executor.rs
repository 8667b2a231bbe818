//! The Docker executor against the local daemon with the locally built `drover/busybox:latest`
//! (no image can be pulled on build machines). These tests fail, never skip, when the daemon
//! does not answer: a silent skip would hide that the executor went untested.

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_agent::docker::container_name;
use drover_agent::executor::{OutputChunk, OutputSource};
use drover_agent::outcome::Verdict;
use drover_agent::running::LeaseSignals;
use drover_agent::supervise::{Ending, Finished, Supervision, supervise};
use drover_agent::{DockerExecutor, ExecError, Executor, Job};
use drover_core::ids::{AgentId, DEFAULT_TENANT, LeaseEpoch, RunId};
use drover_core::spec::{PullPolicy, RawSpec};
use drover_proto::v1 as pb;
use tokio::sync::mpsc;

const IMAGE: &str = "drover/busybox:latest";

async fn docker() -> DockerExecutor {
    match DockerExecutor::connect().await {
        Ok(d) => d,
        Err(e) => panic!("these tests need a running Docker daemon: {e}"),
    }
}

fn job(image: &str, command: &[&str], timeout_secs: u32) -> Job {
    let spec = RawSpec {
        image: image.into(),
        command: command.iter().map(|s| (*s).to_owned()).collect(),
        env: vec![("GREETING".into(), "hi".into())],
        memory_bytes: 64 * 1024 * 1024,
        pids: 64,
        timeout_secs,
        ..Default::default()
    }
    .validate()
    .expect("valid spec");
    Job {
        run_id: RunId::new(),
        attempt: 1,
        lease_epoch: LeaseEpoch(1),
        tenant_id: DEFAULT_TENANT.to_string(),
        agent_id: AgentId::parse("test-agent").unwrap(),
        spec,
        secret_env: Default::default(),
        workspace: std::env::temp_dir()
            .join("drover-workspaces-docker-executor-test")
            .join(RunId::new().to_string()),
    }
}

fn limits(job: &Job, already_running: Duration) -> Supervision {
    Supervision {
        timeout: job.timeout(),
        already_running,
        cancel_grace: job.cancel_grace(),
        live_logs_from: None,
        redactor: Default::default(),
    }
}

/// Starts, supervises to the end and removes; returns how it finished and the forwarded logs.
async fn run_to_end(exec: &DockerExecutor, job: &Job) -> (Finished, Vec<(OutputSource, Vec<u8>)>) {
    let started = exec.start(job).await.expect("container starts");
    assert!(!started.adopted);
    let (tx, mut rx) = mpsc::channel::<OutputChunk>(64);
    let collector = tokio::spawn(async move {
        let mut got = Vec::new();
        while let Some(c) = rx.recv().await {
            got.push((c.source, c.data));
        }
        got
    });
    let finished = supervise(
        exec,
        &started.handle,
        limits(job, started.running_for),
        &LeaseSignals::default(),
        tx,
    )
    .await
    .expect("supervised to the end");
    let logs = collector.await.unwrap();
    exec.remove(&started.handle).await.expect("removed");
    (finished, logs)
}

#[tokio::test]
async fn echo_hello_exits_zero_with_its_output() {
    let exec = docker().await;
    let job = job(IMAGE, &["echo", "hello"], 60);
    let (finished, logs) = run_to_end(&exec, &job).await;
    assert_eq!(finished.ending, Ending::Exited);
    assert_eq!(finished.exit.unwrap().code, Some(0));
    assert_eq!(finished.output, b"hello\n");
    assert!(!finished.output_truncated);
    assert_eq!(logs, vec![(OutputSource::Stdout, b"hello\n".to_vec())]);
    let verdict = Verdict::of(&finished).unwrap();
    assert_eq!(verdict.outcome, pb::Outcome::Succeeded);
    assert_eq!(verdict.exit_code, Some(0));
}

#[tokio::test]
async fn non_zero_exit_is_reported_with_stderr() {
    let exec = docker().await;
    let job = job(IMAGE, &["sh", "-c", "echo oops >&2; exit 3"], 60);
    let (finished, logs) = run_to_end(&exec, &job).await;
    assert_eq!(finished.ending, Ending::Exited);
    assert_eq!(finished.exit.unwrap().code, Some(3));
    assert_eq!(finished.output, b"oops\n");
    assert_eq!(logs, vec![(OutputSource::Stderr, b"oops\n".to_vec())]);
    let verdict = Verdict::of(&finished).unwrap();
    assert_eq!(verdict.outcome, pb::Outcome::Failed);
    assert_eq!(verdict.exit_code, Some(3));
    assert_eq!(verdict.reason, "exited with code 3");
}

#[tokio::test]
async fn env_is_passed_and_argv_is_not_a_shell_string() {
    let exec = docker().await;
    // `echo` gets "$GREETING" literally: no shell expands it unless the argv asks for one.
    let job = job(IMAGE, &["echo", "$GREETING"], 60);
    let (finished, _) = run_to_end(&exec, &job).await;
    assert_eq!(finished.output, b"$GREETING\n");
    let job = self::job(IMAGE, &["sh", "-c", "echo $GREETING"], 60);
    let (finished, _) = run_to_end(&exec, &job).await;
    assert_eq!(finished.output, b"hi\n");
}

#[tokio::test]
async fn missing_image_is_image_unavailable_whatever_the_pull_policy() {
    let exec = docker().await;
    let image = "drover/never-built-here:nope";
    for policy in [
        PullPolicy::Never,
        PullPolicy::IfNotPresent,
        PullPolicy::Always,
    ] {
        let mut job = job(image, &["true"], 60);
        job.spec.image_pull_policy = policy;
        match exec.start(&job).await {
            Err(ExecError::ImageUnavailable { image: got, reason }) => {
                assert_eq!(got, image);
                if policy == PullPolicy::Never {
                    assert!(reason.contains("pull policy is never"), "{reason}");
                } else {
                    assert!(reason.contains("pull"), "{reason}");
                }
            }
            other => panic!("expected image_unavailable with {policy:?}, got {other:?}"),
        }
    }
    assert_eq!(
        Verdict::image_unavailable(image).reason,
        "image_unavailable: image drover/never-built-here:nope is not present on this host"
    );
}

#[tokio::test]
async fn timeout_kills_the_container() {
    let exec = docker().await;
    let job = job(IMAGE, &["sh", "-c", "echo started; sleep 30"], 1);
    let begun = std::time::Instant::now();
    let (finished, _) = run_to_end(&exec, &job).await;
    assert_eq!(
        finished.ending,
        Ending::TimedOut {
            limit: Duration::from_secs(1)
        }
    );
    assert!(
        begun.elapsed() < Duration::from_secs(20),
        "{:?}",
        begun.elapsed()
    );
    assert_eq!(finished.output, b"started\n");
    assert_eq!(
        Verdict::of(&finished).unwrap().reason,
        "timeout: exceeded 1 s"
    );
}

#[tokio::test]
async fn redelivery_adopts_the_same_container_and_never_reruns_it() {
    let exec = docker().await;
    let job = job(IMAGE, &["sh", "-c", "echo once"], 60);
    let first = exec.start(&job).await.expect("first start");
    assert_eq!(first.handle.name, container_name(&job));
    let status = exec.wait(&first.handle).await.expect("exits");
    assert_eq!(status.code, Some(0));

    // The same command again: same container, adopted, not started a second time.
    let second = exec.start(&job).await.expect("second start adopts");
    assert!(second.adopted);
    assert_eq!(second.handle, first.handle);
    let (tx, _rx) = mpsc::channel(8);
    let finished = supervise(
        &exec,
        &second.handle,
        limits(&job, second.running_for),
        &LeaseSignals::default(),
        tx,
    )
    .await
    .unwrap();
    assert_eq!(finished.ending, Ending::Exited);
    assert_eq!(finished.output, b"once\n", "ran more than once");
    exec.remove(&second.handle).await.unwrap();
    // Removing twice is fine.
    exec.remove(&second.handle).await.unwrap();
}

/// The sandbox defaults as the program sees them: non-root user, no capabilities, read-only
/// root filesystem, writable /tmp and /workspace (the working directory), no network but
/// loopback.
#[tokio::test]
async fn the_sandbox_defaults_hold_inside_the_container() {
    let exec = docker().await;
    let script = "id -u; id -g; pwd; echo $DROVER_WORKSPACE; grep CapEff /proc/self/status; \
        touch /rootfs-probe 2>/dev/null && echo rootfs-writable || echo rootfs-readonly; \
        touch /tmp/probe && echo tmp-writable; \
        touch /workspace/probe && echo workspace-writable; \
        ls /sys/class/net";
    let job = job(IMAGE, &["sh", "-c", script], 60);
    let (finished, _) = run_to_end(&exec, &job).await;
    assert_eq!(
        finished.exit.unwrap().code,
        Some(0),
        "{:?}",
        String::from_utf8_lossy(&finished.output)
    );
    assert_eq!(
        String::from_utf8_lossy(&finished.output),
        "65534\n65534\n/workspace\n/workspace\nCapEff:\t0000000000000000\nrootfs-readonly\n\
         tmp-writable\nworkspace-writable\nlo\n"
    );
    assert!(
        job.workspace.join("probe").exists(),
        "written through the bind mount"
    );
    let _ = std::fs::remove_dir_all(&job.workspace);
}

/// A container killed by its memory limit is reported `oom_killed`.
#[tokio::test]
async fn the_memory_limit_is_enforced_and_reported_as_oom() {
    let exec = docker().await;
    // 64 MiB limit (see `job`); the shell tries to hold 256 MB in a variable.
    let job = job(
        IMAGE,
        &[
            "sh",
            "-c",
            "x=$(head -c 268435456 /dev/zero | tr '\\0' a); echo ${#x}",
        ],
        60,
    );
    let (finished, _) = run_to_end(&exec, &job).await;
    let exit = finished.exit.unwrap();
    assert!(exit.oom_killed, "{exit:?}");
    let verdict = Verdict::of(&finished).unwrap();
    assert_eq!(verdict.outcome, pb::Outcome::Failed);
    assert!(
        verdict.reason.starts_with("oom_killed: "),
        "{}",
        verdict.reason
    );
    let _ = std::fs::remove_dir_all(&job.workspace);
}
