//! A run that prints 50 MiB (issue 4, tests): the stored log is complete byte for byte, line
//! by line in order (that it streams live is `logs.rs`'s test), and the agent's memory stays bounded — its peak
//! RSS (VmHWM) is printed for the record, and checked against a bound far below the output
//! size, so an agent that buffered the whole output would fail.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::Stack;
use drover_tests::fake_agent::{in_state, submit, wait_run};

const MIB: u64 = 1024 * 1024;
const LINE: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcde";
const OUTPUT: u64 = 50 * MIB;
/// Well below the output (the agent also uploads the 50 MiB stored log, in 1 MiB chunks):
/// buffering the output, or the upload, would exceed this.
const AGENT_RSS_BOUND: u64 = 64 * MIB;

fn kib_field(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find_map(|l| l.strip_prefix(field))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap()
        * 1024
}

#[tokio::test(flavor = "multi_thread")]
async fn fifty_mib_of_output_stream_live_are_stored_whole_and_the_agent_stays_small() {
    let stack = Stack::start().await;
    let agent_pid = stack.pid(&stack.agent_id).expect("the stack's agent runs");
    let status = |pid: u32| std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
    let rss_before = kib_field(&status(agent_pid), "VmRSS:");

    // 50 MiB of identical lines, half to stdout, half to stderr.
    let script = format!(
        "yes {LINE} | head -c {h}; yes {LINE} | head -c {h} >&2",
        h = OUTPUT / 2
    );
    let run = submit(
        &stack,
        pb::RunSpec {
            image: "drover/busybox:latest".into(),
            command: vec!["sh".into(), "-c".into(), script],
            timeout_seconds: 600,
            ..Default::default()
        },
    )
    .await;
    let done = wait_run(
        &stack,
        &run,
        Duration::from_secs(600),
        in_state(pb::RunState::Succeeded),
    )
    .await;
    let peak = kib_field(&status(agent_pid), "VmHWM:");

    let mut client = stack.client().await;
    let mut stream = client
        .stream_logs(pb::StreamLogsRequest {
            run_id: run.clone(),
            follow: false,
            from_offset: 0,
        })
        .await
        .unwrap()
        .into_inner();
    let (mut out, mut err, mut entries) = (0u64, 0u64, 0u64);
    let mut bad_lines = 0;
    let mut carry = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        for e in msg.entries {
            entries += 1;
            if e.stream == pb::LogStream::Stderr as i32 {
                err += e.data.len() as u64;
            } else {
                out += e.data.len() as u64;
                carry.extend_from_slice(&e.data);
                let end = carry.iter().rposition(|b| *b == b'\n').map_or(0, |i| i + 1);
                bad_lines += carry[..end]
                    .split(|b| *b == b'\n')
                    .filter(|l| !l.is_empty() && *l != LINE.as_bytes())
                    .count();
                carry.drain(..end);
            }
        }
    }
    eprintln!(
        "50 MiB run: stored {out} B stdout + {err} B stderr in {entries} entries; agent RSS \
         {} MiB before, peak (VmHWM) {} MiB; run took {:?}",
        rss_before / MIB,
        peak / MIB,
        done.updated_at
            .zip(done.created_at)
            .map(|(a, b)| Duration::from_secs(u64::try_from(a.seconds - b.seconds).unwrap_or(0)))
    );
    assert_eq!(out, OUTPUT / 2, "stdout stored whole");
    assert_eq!(err, OUTPUT / 2, "stderr stored whole");
    assert_eq!(bad_lines, 0, "lines arrive intact and in order");
    assert!(carry.is_empty(), "stdout ends with a whole line");
    assert!(
        peak < AGENT_RSS_BOUND,
        "agent peak RSS {} MiB for 50 MiB of output",
        peak / MIB
    );
    stack.stop().await;
}
