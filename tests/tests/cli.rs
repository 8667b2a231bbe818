//! The `drover` command against a real stack: `submit --wait` prints the output and exits with
//! the run's status, `get --json` is machine-readable, `list` shows the runs; `cancel`, `get`
//! of a waiting run, `agents ls|drain` and `dlq ls|redrive` (with a scripted agent where the
//! timing of reports matters). Failures exit non-zero with one line naming what went wrong.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::fake_agent::{FakeAgent, in_state, wait_run};
use drover_tests::{Stack, StackOptions};

const IMAGE: &str = "drover/busybox:latest";

async fn drover(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let (code, out, err) = stack.cli(args).await;
    (code, String::from_utf8_lossy(&out).into_owned(), err)
}

#[tokio::test(flavor = "multi_thread")]
async fn submit_wait_get_list() {
    let stack = Stack::start().await;
    let image = "drover/busybox:latest";

    let (code, out, err) = drover(
        &stack,
        &[
            "submit",
            "--wait",
            "--image",
            image,
            "--env",
            "WHO=drover",
            "--",
            "sh",
            "-c",
            "echo hi $WHO",
        ],
    )
    .await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "hi drover\n");
    assert!(
        err.contains("RUNNING -> SUCCEEDED"),
        "events on stderr: {err}"
    );

    let (code, _, err) = drover(
        &stack,
        &[
            "submit", "--wait", "--image", image, "--", "sh", "-c", "exit 3",
        ],
    )
    .await;
    assert_eq!(
        code, 3,
        "exit code of the run is the exit code of the command: {err}"
    );
    assert!(err.contains("FAILED (exit code 3)"), "{err}");

    let (code, id, _) = drover(&stack, &["submit", "--image", image, "--", "true"]).await;
    assert_eq!(code, 0);
    let id = id.trim().to_owned();
    assert_eq!(id.len(), 36, "prints the run id: {id:?}");

    let (code, json, _) = drover(&stack, &["get", &id, "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).expect("get --json is JSON");
    assert_eq!(v["id"], id.as_str());
    assert_eq!(v["spec"]["image"], image);

    let (code, table, _) = drover(&stack, &["list", "--limit", "10"]).await;
    assert_eq!(code, 0);
    assert_eq!(
        table.lines().count(),
        1 + 3,
        "header and three runs:\n{table}"
    );

    let (code, _, err) = drover(&stack, &["get", "not-a-uuid"]).await;
    assert_ne!(code, 0);
    assert!(
        err.contains("cannot get run not-a-uuid: invalid request"),
        "{err}"
    );
    let (code, _, err) = drover(&stack, &["submit", "--image", "", "--", "true"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("spec.image"), "{err}");
    stack.stop().await;
}

/// API and dispatcher, no agent: runs stay QUEUED.
async fn stack_without_agent() -> Stack {
    Stack::start_with(StackOptions {
        agent: false,
        ..Default::default()
    })
    .await
}

/// Runs `drover args` until `pred(stdout)` holds; panics after `limit`.
async fn drover_until(
    stack: &Stack,
    args: &[&str],
    limit: Duration,
    pred: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let (code, out, err) = drover(stack, args).await;
        assert_eq!(code, 0, "drover {args:?}: {err}");
        if pred(&out) {
            return out;
        }
        if tokio::time::Instant::now() > deadline {
            stack.dump_logs();
            panic!("drover {args:?} never showed what was expected; last output:\n{out}");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn json_lines(out: &str) -> Vec<serde_json::Value> {
    out.lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect()
}

/// The table line that mentions `needle`.
fn line_with<'a>(table: &'a str, needle: &str) -> &'a str {
    table
        .lines()
        .find(|l| l.contains(needle))
        .unwrap_or_else(|| panic!("no line with {needle} in:\n{table}"))
}

#[tokio::test(flavor = "multi_thread")]
async fn cancel_a_queued_run_and_say_why_it_waits() {
    let stack = stack_without_agent().await;
    let (code, id, err) = drover(
        &stack,
        &[
            "submit",
            "--image",
            IMAGE,
            "--max-attempts",
            "3",
            "--retry-exit-code",
            "3",
            "--retry-exit-code",
            "4",
            "--backoff-initial-ms",
            "500",
            "--backoff-multiplier",
            "1.5",
            "--backoff-max-ms",
            "5000",
            "--backoff-jitter",
            "0.1",
            "--queue-timeout",
            "600",
            "--cancel-grace",
            "5",
            "--",
            "true",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let id = id.trim().to_owned();

    // No agent: it waits, and says why.
    let (code, text, err) = drover(&stack, &["get", &id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(text.contains("state     QUEUED\n"), "{text}");
    assert!(
        text.contains("waiting: no live agent in pool default\n"),
        "{text}"
    );
    assert!(text.contains("attempt   1 of 3\n"), "{text}");
    assert!(!text.contains("cancel requested"), "{text}");

    let (code, json, err) = drover(&stack, &["get", &id, "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["wait"]["code"], "NO_LIVE_AGENT", "{v}");
    assert_eq!(v["wait"]["message"], "no live agent in pool default");
    assert_eq!(v["wait"]["until"], serde_json::Value::Null);
    assert_eq!(
        (v["attempt"].as_u64(), v["max_attempts"].as_u64()),
        (Some(1), Some(3))
    );
    assert_eq!(v["cancel_requested"], false);
    let retry = &v["spec"]["retry"];
    assert_eq!(retry["retry_exit_codes"], serde_json::json!([3, 4]), "{v}");
    assert_eq!(retry["retry_any_exit_code"], false);
    assert_eq!(retry["initial_backoff_ms"], 500);
    assert_eq!(retry["multiplier"], 1.5);
    assert_eq!(retry["max_backoff_ms"], 5000);
    assert_eq!(retry["jitter"], 0.1);
    assert_eq!(v["spec"]["queue_timeout_seconds"], 600);
    assert_eq!(v["spec"]["cancel_grace_seconds"], 5);

    // Cancel: a waiting run ends at once.
    let (code, out, err) = drover(&stack, &["cancel", &id, "--reason", "changed my mind"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, format!("run {id}: cancelled (state CANCELLED)\n"));
    let (code, json, _) = drover(&stack, &["get", &id, "--json"]).await;
    assert_eq!(code, 0);
    let v: serde_json::Value = serde_json::from_str(&json).unwrap();
    assert_eq!(v["state"], "CANCELLED");
    assert_eq!(
        v["wait"],
        serde_json::Value::Null,
        "an ended run waits for nothing"
    );
    assert!(
        v["reason"].as_str().unwrap().contains("changed my mind"),
        "{v}"
    );

    // Again: it already ended.
    let (code, out, err) = drover(&stack, &["cancel", &id]).await;
    assert_ne!(code, 0, "second cancel must fail: {out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!("error: cannot cancel run {id}: ")),
        "{err}"
    );
    assert!(err.contains("already ended CANCELLED"), "{err}");

    // Nonexistent runs are named as such.
    let missing = uuid::Uuid::now_v7().to_string();
    let (code, _, err) = drover(&stack, &["cancel", &missing]).await;
    assert_ne!(code, 0);
    assert_eq!(
        err,
        format!("error: cannot cancel run {missing}: no such run\n")
    );
    let (code, _, err) = drover(&stack, &["get", &missing]).await;
    assert_ne!(code, 0);
    assert_eq!(
        err,
        format!("error: cannot get run {missing}: no such run\n")
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn agents_ls_drain_and_cancel_of_a_running_run() {
    let stack = stack_without_agent().await;
    let (code, out, err) = drover(&stack, &["agents", "ls"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "no agents registered\n");

    let agent_id = format!("cli-{}", stack.tag);
    let mut agent = FakeAgent::register(&stack, &agent_id, 2, &[("gpu", "true")]).await;
    let (code, table, err) = drover(&stack, &["agents", "ls"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        table.starts_with("ID ") && table.contains("HEARTBEAT") && table.contains("VERSION"),
        "header: {table}"
    );
    let row: Vec<&str> = line_with(&table, &agent_id).split_whitespace().collect();
    assert_eq!(
        row[1..6],
        ["default", "mock", "0/2", "yes", "no"],
        "pool, executor, running/capacity, live, draining: {table}"
    );
    assert!(
        row[6].ends_with('s') && row[7] == "ago",
        "heartbeat age: {table}"
    );
    assert_eq!(row[8..], ["gpu=true", "test"], "labels, version: {table}");

    // A run leased to it and started: cancel is requested from the agent.
    let (code, run, err) = drover(&stack, &["submit", "--image", IMAGE, "--", "sleep", "60"]).await;
    assert_eq!(code, 0, "{err}");
    let run = run.trim().to_owned();
    let assigned = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    assert_eq!(assigned.agent_id, agent_id);
    agent.started(&run, assigned.lease_epoch).await.unwrap();
    agent
        .heartbeat(&[(run.clone(), assigned.lease_epoch)])
        .await;
    let (code, json, _) = drover(&stack, &["agents", "ls", "--json"]).await;
    assert_eq!(code, 0);
    let agents = json_lines(&json);
    assert_eq!(agents.len(), 1, "{json}");
    assert_eq!(
        (
            agents[0]["running"].as_u64(),
            agents[0]["capacity"].as_u64()
        ),
        (Some(1), Some(2))
    );
    assert_eq!(agents[0]["labels"]["gpu"], "true");

    let (code, out, err) = drover(&stack, &["cancel", &run]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!(
            "run {run}: cancel requested; the agent is stopping it \
             (state RUNNING on agent {agent_id})\n"
        )
    );
    let (code, text, _) = drover(&stack, &["get", &run]).await;
    assert_eq!(code, 0);
    assert!(text.contains("\ncancel requested\n"), "{text}");
    assert!(
        !text.contains("waiting:"),
        "a running run is not waiting: {text}"
    );
    agent
        .complete(
            &run,
            assigned.lease_epoch,
            pb::Outcome::Cancelled,
            Some(143),
        )
        .await
        .unwrap();
    wait_run(
        &stack,
        &run,
        Duration::from_secs(10),
        in_state(pb::RunState::Cancelled),
    )
    .await;

    // Drain: it is marked draining at once.
    let (code, out, err) = drover(&stack, &["agents", "drain", &agent_id]).await;
    assert_eq!(code, 0, "{err}");
    assert!(
        out.starts_with(&format!("agent {agent_id}: drain requested")),
        "{out}"
    );
    let row: Vec<&str> = out.lines().last().unwrap().split_whitespace().collect();
    assert_eq!(
        (row[0], row[5]),
        (agent_id.as_str(), "yes"),
        "draining: {out}"
    );
    let (code, json, _) = drover(&stack, &["agents", "ls", "--json"]).await;
    assert_eq!(code, 0);
    assert_eq!(json_lines(&json)[0]["draining"], true, "{json}");

    let (code, _, err) = drover(&stack, &["agents", "drain", "no-such-agent"]).await;
    assert_ne!(code, 0);
    assert_eq!(
        err,
        "error: cannot drain agent no-such-agent: no such agent\n"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn dlq_ls_and_redrive() {
    let stack = stack_without_agent().await;
    let (code, out, err) = drover(&stack, &["dlq", "ls"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "no dead letters\n");
    let (code, out, _) = drover(&stack, &["dlq", "ls", "--json"]).await;
    assert_eq!((code, out.as_str()), (0, ""));

    // One attempt; exit 3 is retryable, so failing it exhausts the run: DEAD_LETTERED.
    let (code, run, err) = drover(
        &stack,
        &[
            "submit",
            "--image",
            IMAGE,
            "--max-attempts",
            "1",
            "--retry-exit-code",
            "3",
            "--",
            "sh",
            "-c",
            "exit 3",
        ],
    )
    .await;
    assert_eq!(code, 0, "{err}");
    let run = run.trim().to_owned();

    // Not dead-lettered (it is queued): refused, clearly.
    let (code, out, err) = drover(&stack, &["dlq", "redrive", &run]).await;
    assert_ne!(code, 0, "{out}");
    assert_eq!(err.lines().count(), 1, "one line: {err}");
    assert!(
        err.starts_with(&format!("error: cannot redrive run {run}: ")),
        "{err}"
    );
    assert!(
        err.contains("only a DEAD_LETTERED run can be redriven; this one is QUEUED"),
        "{err}"
    );
    let missing = uuid::Uuid::now_v7().to_string();
    let (code, _, err) = drover(&stack, &["dlq", "redrive", &missing]).await;
    assert_ne!(code, 0);
    assert_eq!(
        err,
        format!("error: cannot redrive run {missing}: no such run\n")
    );

    let mut agent = FakeAgent::register(&stack, &format!("cli-{}", stack.tag), 1, &[]).await;
    let assigned = wait_run(
        &stack,
        &run,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    agent.started(&run, assigned.lease_epoch).await.unwrap();
    agent
        .complete(&run, assigned.lease_epoch, pb::Outcome::Failed, Some(3))
        .await
        .unwrap();
    wait_run(
        &stack,
        &run,
        Duration::from_secs(10),
        in_state(pb::RunState::DeadLettered),
    )
    .await;

    let json = drover_until(
        &stack,
        &["dlq", "ls", "--json"],
        Duration::from_secs(30),
        |o| !o.is_empty(),
    )
    .await;
    let letters = json_lines(&json);
    assert_eq!(letters.len(), 1, "{json}");
    assert_eq!(letters[0]["kind"], "run_exhausted");
    assert_eq!(letters[0]["run_id"], run.as_str());
    assert_eq!(letters[0]["redriven_at"], serde_json::Value::Null);
    let (code, table, _) = drover(&stack, &["dlq", "ls"]).await;
    assert_eq!(code, 0);
    assert!(
        table.starts_with("ID ") && table.contains("REDRIVEN") && table.contains("REASON"),
        "header: {table}"
    );
    let row: Vec<&str> = line_with(&table, &run).split_whitespace().collect();
    assert_eq!(
        row[1..4],
        ["run_exhausted", run.as_str(), "drover.dlx"],
        "{table}"
    );
    assert_eq!(row[5], "no", "not redriven yet: {table}");

    let (code, out, err) = drover(&stack, &["dlq", "redrive", &run, "--reason", "fixed"]).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        format!("run {run}: redriven; attempt 2 of 2, state QUEUED\n")
    );
    let json = drover_until(
        &stack,
        &["dlq", "ls", "--json"],
        Duration::from_secs(10),
        |o| {
            json_lines(o)
                .first()
                .is_some_and(|d| !d["redriven_at"].is_null())
        },
    )
    .await;
    assert_eq!(json_lines(&json).len(), 1);
    let (code, table, _) = drover(&stack, &["dlq", "ls"]).await;
    assert_eq!(code, 0);
    assert!(line_with(&table, &run).contains("yes, "), "{table}");
    stack.stop().await;
}

/// `submit --input LOCAL=REMOTE --executor E`: the file reaches the run's workspace; a path
/// the server refuses is one line naming the field.
#[tokio::test(flavor = "multi_thread")]
async fn submit_with_inputs_and_an_executor() {
    let stack = Stack::start_with(StackOptions {
        agent_executor: "process".into(),
        ..StackOptions::default()
    })
    .await;
    let dir = tempfile::tempdir().unwrap();
    let local = dir.path().join("local.txt");
    std::fs::write(&local, "hello from a file\n").unwrap();
    let input = format!("{}=data/in.txt", local.display());
    let (code, out, err) = drover(
        &stack,
        &[
            "submit",
            "--wait",
            "--executor",
            "process",
            "--input",
            &input,
            "--image",
            IMAGE,
            "--",
            "cat",
            "data/in.txt",
        ],
    )
    .await;
    assert_eq!(code, 0, "stderr: {err}");
    assert_eq!(out, "hello from a file\n");
    assert!(
        err.contains("(process)"),
        "the start names the executor: {err}"
    );

    let bad = format!("{}=../escape.txt", local.display());
    let (code, _, err) = drover(
        &stack,
        &["submit", "--input", &bad, "--image", IMAGE, "--", "true"],
    )
    .await;
    assert_ne!(code, 0);
    assert!(err.contains("spec.inputs"), "{err}");
    stack.stop().await;
}
