//! The clients of a scenario: runs submitted at a steady rate, each under its own idempotency
//! key, retried with the same key until acknowledged (as a careful client does when the API
//! is down or an answer is lost), sometimes submitted again after the acknowledgement (a
//! client that never saw the answer). What they were told becomes
//! [`crate::verdict::Submission`]s for the oracle.

use std::time::Duration;

use drover_proto::v1 as pb;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tonic::Code;

use super::timeline::Timeline;
use crate::client::Connection;
use crate::verdict::Submission;

/// What each run does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RunKind {
    /// The agents' mock executor: `duration` of simulated work, exit 0, writes
    /// [`MOCK_FILE`] with `file_bytes` bytes.
    Mock { file_bytes: usize },
    /// A real container: `sh -c 'sleep 2'` in the busybox test image.
    Docker,
}

/// The file every mock run writes, which every SUCCEEDED mock run must have as an artifact.
pub const MOCK_FILE: &str = "out.txt";

#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    pub kind: RunKind,
    /// Submissions started per second.
    pub rate: f64,
    /// How long new submissions start.
    pub duration: Duration,
    pub max_attempts: u32,
    /// Prefix of every idempotency key (scenario name and seed).
    pub key_prefix: String,
    /// How long one key is retried before the client gives up.
    pub give_up_after: Duration,
}

fn spec(kind: RunKind, max_attempts: u32, rng: &mut fastrand::Rng, key: &str) -> pb::RunSpec {
    let retry = Some(pb::RetryPolicy {
        initial_backoff_ms: 300,
        multiplier: 2.0,
        max_backoff_ms: 2_000,
        ..Default::default()
    });
    match kind {
        RunKind::Mock { file_bytes } => {
            let mut content = key.as_bytes().to_vec();
            content.resize(file_bytes.max(content.len()), b'.');
            pb::RunSpec {
                image: "drover/busybox:latest".into(),
                command: vec!["true".into()],
                executor: "mock".into(),
                mock: Some(pb::MockBehavior {
                    duration_ms: rng.u64(300..2_000),
                    exit_code: 0,
                    stdout: vec![format!("run {key}")],
                    files: vec![pb::MockFile {
                        path: MOCK_FILE.into(),
                        content,
                    }],
                    ..Default::default()
                }),
                max_attempts,
                retry,
                timeout_seconds: 120,
                ..Default::default()
            }
        }
        RunKind::Docker => pb::RunSpec {
            image: "drover/busybox:latest".into(),
            command: vec!["sh".into(), "-c".into(), "sleep 2".into()],
            executor: "docker".into(),
            max_attempts,
            retry,
            timeout_seconds: 120,
            ..Default::default()
        },
    }
}

/// Worth retrying with the same key: the API was down, slow, or failed inside.
fn retryable(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable
            | Code::DeadlineExceeded
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled
            | Code::Aborted
            | Code::ResourceExhausted
    )
}

async fn submit_once(
    conn: &Connection,
    spec: &pb::RunSpec,
    key: &str,
) -> Result<String, tonic::Status> {
    conn.runs()
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec.clone()),
            idempotency_key: key.to_owned(),
        })
        .await?
        .into_inner()
        .run
        .map(|r| r.id)
        .ok_or_else(|| tonic::Status::internal("no run in the answer"))
}

/// One key: submit until acknowledged (or given up), then maybe once more.
async fn one_key(
    conn: Connection,
    spec: pb::RunSpec,
    key: String,
    resubmit: bool,
    give_up_after: Duration,
    timeline: Timeline,
) -> Submission {
    let mut sub = Submission {
        key: key.clone(),
        acked: Vec::new(),
        tries: 0,
        errors: 0,
    };
    let deadline = Instant::now() + give_up_after;
    let mut backoff = Duration::from_millis(200);
    loop {
        sub.tries += 1;
        match submit_once(&conn, &spec, &key).await {
            Ok(id) => {
                sub.acked.push(id);
                break;
            }
            Err(s) if retryable(s.code()) && Instant::now() < deadline => {
                sub.errors += 1;
                if sub.tries == 1 {
                    timeline.note(format!(
                        "submit {key}: {:?}; retrying with the same key",
                        s.code()
                    ));
                }
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(Duration::from_secs(2));
            }
            Err(s) => {
                sub.errors += 1;
                timeline.note(format!(
                    "submit {key}: giving up after {} tries: {:?} {}",
                    sub.tries,
                    s.code(),
                    s.message()
                ));
                return sub;
            }
        }
    }
    if resubmit {
        // A client that lost the answer submits again; it must get the same run.
        sub.tries += 1;
        match submit_once(&conn, &spec, &key).await {
            Ok(id) => sub.acked.push(id),
            Err(_) => sub.errors += 1,
        }
    }
    sub
}

/// Submits `rate` runs per second for `duration` (or until `stop`), then waits for every
/// key to be acknowledged or given up.
pub async fn drive(
    conn: Connection,
    cfg: WorkloadConfig,
    seed: u64,
    timeline: Timeline,
    stop: CancellationToken,
) -> Vec<Submission> {
    let mut rng = fastrand::Rng::with_seed(seed);
    let period = Duration::from_secs_f64(1.0 / cfg.rate.max(0.01));
    let start = Instant::now();
    let mut next = start;
    let mut in_flight = FuturesUnordered::new();
    let mut out = Vec::new();
    let mut i = 0u64;
    timeline.note(format!(
        "workload: {:.1} runs/s for {:.0} s",
        cfg.rate,
        cfg.duration.as_secs_f64()
    ));
    loop {
        let more = next - start < cfg.duration && !stop.is_cancelled();
        tokio::select! {
            () = tokio::time::sleep_until(next), if more => {
                let key = format!("{}-{i}", cfg.key_prefix);
                let spec = spec(cfg.kind, cfg.max_attempts, &mut rng, &key);
                let resubmit = rng.u8(..10) == 0;
                in_flight.push(one_key(
                    conn.clone(),
                    spec,
                    key,
                    resubmit,
                    cfg.give_up_after,
                    timeline.clone(),
                ));
                i += 1;
                next += period;
            }
            Some(sub) = in_flight.next(), if !in_flight.is_empty() => out.push(sub),
            () = stop.cancelled(), if more => {}
            else => break,
        }
    }
    timeline.note(format!("workload: {} keys submitted", out.len()));
    out
}
