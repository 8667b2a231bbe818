//! Live logs (issue 4, item 7): StreamLogs serves a run's stdout and stderr in order, live
//! while it runs, resumable from an offset, and complete once it ended; `drover logs` and
//! `drover submit --follow` print them through the real CLI binary. Real API, dispatcher and
//! agent processes, real containers.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::Stack;
use drover_tests::fake_agent::{in_state, submit, wait_run};

const IMAGE: &str = "drover/busybox:latest";

fn spec(script: &str) -> pb::RunSpec {
    pb::RunSpec {
        image: IMAGE.into(),
        command: vec!["sh".into(), "-c".into(), script.into()],
        timeout_seconds: 120,
        ..Default::default()
    }
}

async fn collect(stack: &Stack, run: &str, follow: bool, from: u64) -> Vec<pb::LogEntry> {
    let mut client = stack.client().await;
    let mut stream = client
        .stream_logs(pb::StreamLogsRequest {
            run_id: run.into(),
            follow,
            from_offset: from,
        })
        .await
        .unwrap()
        .into_inner();
    let mut entries = Vec::new();
    while let Some(msg) = stream.message().await.unwrap() {
        entries.extend(msg.entries);
    }
    entries
}

fn text(entries: &[pb::LogEntry], stream: pb::LogStream) -> String {
    let bytes: Vec<u8> = entries
        .iter()
        .filter(|e| e.stream == stream as i32)
        .flat_map(|e| e.data.clone())
        .collect();
    String::from_utf8(bytes).unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn logs_stream_live_resume_from_an_offset_and_are_complete_at_the_end() {
    let stack = Stack::start().await;
    // Output, then a pause that lasts until the test has seen the first line live (the test
    // touches nothing inside the container, so the pause is a generous fixed one).
    let script = "for i in 1 2 3; do echo out $i; echo err $i >&2; done; sleep 4; \
                  for i in 4 5 6; do echo out $i; echo err $i >&2; done";
    let run = submit(&stack, spec(script)).await;

    // Follow from the start, in its own task, noting the run's state whenever entries arrive.
    let follower = {
        let mut client = stack.client().await;
        let mut runs = stack.client().await;
        let run = run.clone();
        tokio::spawn(async move {
            let mut stream = client
                .stream_logs(pb::StreamLogsRequest {
                    run_id: run.clone(),
                    follow: true,
                    from_offset: 0,
                })
                .await
                .unwrap()
                .into_inner();
            let mut entries = Vec::new();
            let mut seen_while_running = false;
            while let Some(msg) = stream.message().await.unwrap() {
                entries.extend(msg.entries);
                let now = runs
                    .get_run(pb::GetRunRequest {
                        run_id: run.clone(),
                    })
                    .await
                    .unwrap()
                    .into_inner()
                    .run
                    .unwrap();
                if now.state == pb::RunState::Running as i32 {
                    seen_while_running = true;
                }
            }
            (entries, seen_while_running)
        })
    };
    let done = wait_run(
        &stack,
        &run,
        Duration::from_secs(120),
        in_state(pb::RunState::Succeeded),
    )
    .await;
    let (live, seen_while_running) = tokio::time::timeout(Duration::from_secs(60), follower)
        .await
        .expect("the followed stream ends once the run is terminal")
        .unwrap();
    assert!(
        seen_while_running,
        "output arrived while the run was still RUNNING (live, not at the end)"
    );
    let want_out = "out 1\nout 2\nout 3\nout 4\nout 5\nout 6\n";
    let want_err = "err 1\nerr 2\nerr 3\nerr 4\nerr 5\nerr 6\n";
    assert_eq!(text(&live, pb::LogStream::Stdout), want_out);
    assert_eq!(text(&live, pb::LogStream::Stderr), want_err);
    assert!(
        live.iter()
            .all(|e| e.attempt == done.attempt && e.at.is_some())
    );
    let offsets: Vec<u64> = live.iter().map(|e| e.offset).collect();
    assert!(
        offsets.windows(2).all(|w| w[0] < w[1]),
        "offsets increase: {offsets:?}"
    );

    // After the end, without follow: the same log, and a resume from any offset returns
    // exactly the rest.
    let all = collect(&stack, &run, false, 0).await;
    assert_eq!(all, live);
    for (i, entry) in all.iter().enumerate() {
        let rest = collect(&stack, &run, false, entry.offset).await;
        assert_eq!(
            rest,
            all[i + 1..].to_vec(),
            "resume after offset {}",
            entry.offset
        );
    }
    // Following a finished run ends at once with everything.
    let followed_late = collect(&stack, &run, true, 0).await;
    assert_eq!(followed_late, all);

    let mut client = stack.client().await;
    let missing = client
        .stream_logs(pb::StreamLogsRequest {
            run_id: uuid::Uuid::now_v7().to_string(),
            follow: false,
            from_offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(missing.code(), tonic::Code::NotFound);
    let bad = client
        .stream_logs(pb::StreamLogsRequest {
            run_id: "../etc".into(),
            follow: false,
            from_offset: 0,
        })
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::InvalidArgument);
    stack.stop().await;
}

async fn drover(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let (code, out, err) = stack.cli(args).await;
    (code, String::from_utf8_lossy(&out).into_owned(), err)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_cli_prints_logs_and_follows_a_submitted_run() {
    let stack = Stack::start().await;
    let (code, out, err) = drover(
        &stack,
        &[
            "submit",
            "--follow",
            "--image",
            IMAGE,
            "--",
            "sh",
            "-c",
            "echo to-out; echo to-err >&2; exit 3",
        ],
    )
    .await;
    assert_eq!(code, 3, "the run's exit code; stderr: {err}");
    assert_eq!(out, "to-out\n");
    assert!(err.contains("to-err\n"), "{err}");
    assert!(err.contains("FAILED (exit code 3)"), "{err}");
    let run_id = err
        .lines()
        .find_map(|l| l.strip_prefix("submitted "))
        .unwrap()
        .to_owned();

    let (code, out, err) = drover(&stack, &["logs", &run_id]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "to-out\n");
    assert_eq!(err, "to-err\n");
    let (code, _, err) = drover(&stack, &["logs", &uuid::Uuid::now_v7().to_string()]).await;
    assert_ne!(code, 0);
    assert!(err.contains("no such run"), "{err}");
    stack.stop().await;
}
