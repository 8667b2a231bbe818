//! The `drover` command against a real stack: `submit --wait` prints the output and exits with
//! the run's status, `get --json` is machine-readable, `list` shows the runs.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use drover_tests::Stack;
use drover_tests::stack::bin_path;
use tokio::process::Command;

async fn drover(stack: &Stack, args: &[&str]) -> (i32, String, String) {
    let out = Command::new(bin_path("drover"))
        .args(args)
        .env("DROVER_ENDPOINT", &stack.endpoint)
        .output()
        .await
        .expect("run drover");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    assert!(err.contains("InvalidArgument"), "{err}");
    let (code, _, err) = drover(&stack, &["submit", "--image", "", "--", "true"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("spec.image"), "{err}");
    stack.stop().await;
}
