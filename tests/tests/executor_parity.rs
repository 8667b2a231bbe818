//! The executor parity suite: one set of scenarios run end to end (API, dispatcher and an
//! agent started with `DROVER_EXECUTOR=<executor>`, all real binaries) against the docker,
//! process and mock executors. Each scenario is one test per executor
//! (`docker::exit_codes`, `process::exit_codes`, `mock::exit_codes`, …), so a failure names
//! the executor.
//!
//! The mock executor simulates: where a scenario checks what the program saw (env, inputs),
//! the mock run is given the output the program would have printed, and the scenario checks
//! what the agent made of it (output, exit code, result.json) — the same result shape.
//!
//! Workspaces are kept (`DROVER_KEEP_WORKSPACES`) under a per-test root so `result.json` and
//! `request.json` can be read from the host directory.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::fake_agent::{collect_artifacts, in_state, sha256_hex, submit, wait_run};
use drover_tests::{Stack, StackOptions};
use serde_json::Value;

const IMAGE: &str = "drover/busybox:latest";
const LIMIT: Duration = Duration::from_secs(120);
const HOST_VAR: &str = "PARITY_HOST_TOKEN";
const HOST_VALUE: &str = "host-token-4f9a2c7e1b";
const SECRET_VALUE: &str = "sk-live-parity-8d3f61a0c2e94b57";

/// One executor's stack and where its agent keeps workspaces.
struct Parity {
    executor: &'static str,
    stack: Stack,
    workspaces: PathBuf,
}

impl Parity {
    async fn start(executor: &'static str) -> Parity {
        Self::start_allowing(executor, "").await
    }

    async fn start_allowing(executor: &'static str, allowed: &str) -> Parity {
        let workspaces =
            std::env::temp_dir().join(format!("drover-parity-{}", uuid::Uuid::now_v7().simple()));
        let stack = Stack::start_with(StackOptions {
            agent_executor: executor.to_owned(),
            agent_env: vec![
                (
                    "DROVER_WORKSPACE_ROOT".into(),
                    workspaces.to_string_lossy().into_owned(),
                ),
                ("DROVER_KEEP_WORKSPACES".into(), "true".into()),
                ("DROVER_ALLOWED_EXECUTORS".into(), allowed.into()),
                // For the secrets scenario: a host pass-through value on this agent's host.
                (HOST_VAR.into(), HOST_VALUE.into()),
            ],
            ..StackOptions::default()
        })
        .await;
        Parity {
            executor,
            stack,
            workspaces,
        }
    }

    /// A spec for this executor: `script` under `sh -c` for docker and process, `mock` for
    /// the mock executor.
    fn spec(&self, script: &str, mock: pb::MockBehavior) -> pb::RunSpec {
        pb::RunSpec {
            image: IMAGE.into(),
            command: vec!["sh".into(), "-c".into(), script.into()],
            timeout_seconds: 60,
            cancel_grace_seconds: 2,
            mock: (self.executor == "mock").then_some(mock),
            ..Default::default()
        }
    }

    async fn run(&self, spec: pb::RunSpec, end: pb::RunState) -> pb::Run {
        let id = submit(&self.stack, spec).await;
        let run = wait_run(&self.stack, &id, LIMIT, |r| is_terminal(r.state)).await;
        assert_eq!(
            run.state,
            end as i32,
            "[{}] run {id} ended {:?} ({}), expected {end:?}",
            self.executor,
            pb::RunState::try_from(run.state),
            run.reason
        );
        run
    }

    fn workspace(&self, run: &pb::Run) -> PathBuf {
        self.workspaces.join(&self.stack.agent_id).join(format!(
            "drover-{}-{}-{}",
            run.id, run.attempt, run.lease_epoch
        ))
    }

    /// `.drover/<file>` of the run's workspace, waiting a moment: the agent writes
    /// result.json just before reporting, so it is there once the run is terminal.
    fn drover_file(&self, run: &pb::Run, file: &str) -> Value {
        let path = self.workspace(run).join(".drover").join(file);
        let text = std::fs::read(&path).unwrap_or_else(|e| {
            self.stack.dump_logs();
            panic!("[{}] {}: {e}", self.executor, path.display())
        });
        serde_json::from_slice(&text).unwrap()
    }

    async fn finish(self) {
        let workspaces = self.workspaces.clone();
        self.stack.stop().await;
        remove_tree(&workspaces);
    }
}

/// Removes a kept workspace tree (the Docker executor hands workspaces to an unprivileged
/// uid; the test runs as the agent's user, which can remove them).
fn remove_tree(dir: &Path) {
    if let Err(e) = std::fs::remove_dir_all(dir)
        && e.kind() != std::io::ErrorKind::NotFound
    {
        eprintln!("could not remove {}: {e}", dir.display());
    }
}

fn is_terminal(state: i32) -> bool {
    use pb::RunState as S;
    [
        S::Succeeded,
        S::Failed,
        S::Cancelled,
        S::TimedOut,
        S::Rejected,
        S::DeadLettered,
    ]
    .iter()
    .any(|s| *s as i32 == state)
}

fn lines(v: &[&str]) -> Vec<String> {
    v.iter().map(|s| (*s).to_owned()).collect()
}

fn strings(v: &Value) -> Vec<String> {
    v.as_array()
        .unwrap_or_else(|| panic!("not an array: {v}"))
        .iter()
        .map(|s| s.as_str().unwrap().to_owned())
        .collect()
}

/// The result.json every executor writes: same keys, same meaning.
fn assert_result_shape(p: &Parity, run: &pb::Run, status: &str, exit_code: Option<i32>) -> Value {
    let result = p.drover_file(run, "result.json");
    let who = p.executor;
    assert_eq!(result["status"], status, "[{who}] {result}");
    assert_eq!(
        result["exit_code"].as_i64().map(|c| c as i32),
        exit_code,
        "[{who}] {result}"
    );
    // The executor that ran it (the agent's own unless the spec named another).
    assert_eq!(
        result["executor"],
        run.executor.as_str(),
        "[{who}] {result}"
    );
    assert_eq!(result["summary"], run.reason.as_str(), "[{who}] {result}");
    let errors = strings(&result["errors"]);
    if status == "success" {
        assert!(errors.is_empty(), "[{who}] {result}");
    } else {
        assert_eq!(errors, vec![run.reason.clone()], "[{who}] {result}");
    }
    for key in ["created_files", "modified_files", "deleted_files"] {
        assert!(result[key].is_array(), "[{who}] {key} in {result}");
    }
    for key in ["started_at", "finished_at"] {
        assert!(result[key].is_string(), "[{who}] {key} in {result}");
    }
    assert!(result["duration_ms"].is_u64(), "[{who}] {result}");
    result
}

async fn env_reaches_the_program(executor: &'static str) {
    let p = Parity::start(executor).await;
    let mut spec = p.spec(
        "echo \"greeting=$GREETING\"",
        pb::MockBehavior {
            stdout: lines(&["greeting=hello parity"]),
            ..Default::default()
        },
    );
    spec.env = [("GREETING".to_owned(), "hello parity".to_owned())].into();
    let run = p.run(spec, pb::RunState::Succeeded).await;
    assert_eq!(run.output, b"greeting=hello parity\n", "[{executor}]");
    assert_eq!(run.executor, executor);
    assert_eq!(run.exit_code, Some(0), "[{executor}]");
    // request.json names the env, never its value.
    let request = p.drover_file(&run, "request.json");
    assert_eq!(
        request["env"]["GREETING"], "present",
        "[{executor}] {request}"
    );
    assert!(
        !request.to_string().contains("hello parity"),
        "[{executor}] {request}"
    );
    assert_eq!(request["executor"], executor, "[{executor}] {request}");
    assert_result_shape(&p, &run, "success", Some(0));
    p.finish().await;
}

async fn exit_codes(executor: &'static str) {
    let p = Parity::start(executor).await;
    let ok = p.spec("exit 0", pb::MockBehavior::default());
    let run = p.run(ok, pb::RunState::Succeeded).await;
    assert_eq!(run.exit_code, Some(0), "[{executor}]");
    assert_eq!(run.executor, executor);
    assert_result_shape(&p, &run, "success", Some(0));

    let three = p.spec(
        "exit 3",
        pb::MockBehavior {
            exit_code: 3,
            ..Default::default()
        },
    );
    let run = p.run(three, pb::RunState::Failed).await;
    assert_eq!(run.exit_code, Some(3), "[{executor}]");
    assert_eq!(run.reason, "exited with code 3", "[{executor}]");
    assert_result_shape(&p, &run, "error", Some(3));
    p.finish().await;
}

async fn stdout_and_stderr_are_captured(executor: &'static str) {
    let p = Parity::start(executor).await;
    let spec = p.spec(
        "echo to-stdout; sleep 0.2; echo to-stderr >&2",
        pb::MockBehavior {
            duration_ms: 200,
            stdout: lines(&["to-stdout"]),
            stderr: lines(&["to-stderr"]),
            ..Default::default()
        },
    );
    let run = p.run(spec, pb::RunState::Succeeded).await;
    assert_eq!(run.output, b"to-stdout\nto-stderr\n", "[{executor}]");
    assert!(!run.output_truncated, "[{executor}]");
    p.finish().await;
}

async fn inputs_are_visible_and_result_lists_files(executor: &'static str) {
    let p = Parity::start(executor).await;
    let mut spec = p.spec(
        "cat data/in.txt; echo v2 > app.py; mkdir -p out; echo new > out/created.txt; rm gone.txt",
        pb::MockBehavior {
            stdout: lines(&["hello input"]),
            files: vec![
                pb::MockFile {
                    path: "app.py".into(),
                    content: b"v2\n".to_vec(),
                },
                pb::MockFile {
                    path: "out/created.txt".into(),
                    content: b"new\n".to_vec(),
                },
            ],
            ..Default::default()
        },
    );
    spec.inputs = vec![
        pb::InputFile {
            path: "data/in.txt".into(),
            content: b"hello input\n".to_vec(),
            mode: 0,
        },
        pb::InputFile {
            path: "app.py".into(),
            content: b"v1\n".to_vec(),
            mode: 0o644,
        },
        pb::InputFile {
            path: "README.md".into(),
            content: b"# unchanged\n".to_vec(),
            mode: 0,
        },
        pb::InputFile {
            path: "gone.txt".into(),
            content: b"bye\n".to_vec(),
            mode: 0,
        },
    ];
    let run = p.run(spec, pb::RunState::Succeeded).await;
    assert_eq!(run.output, b"hello input\n", "[{executor}]");
    let result = assert_result_shape(&p, &run, "success", Some(0));
    assert_eq!(
        strings(&result["created_files"]),
        ["out/created.txt"],
        "[{executor}] {result}"
    );
    assert_eq!(
        strings(&result["modified_files"]),
        ["app.py"],
        "[{executor}] {result}"
    );
    if executor != "mock" {
        // The mock simulates writes, not deletions.
        assert_eq!(
            strings(&result["deleted_files"]),
            ["gone.txt"],
            "[{executor}] {result}"
        );
    }
    let ws = p.workspace(&run);
    assert_eq!(
        std::fs::read(ws.join("app.py")).unwrap(),
        b"v2\n",
        "[{executor}]"
    );
    assert_eq!(
        std::fs::read(ws.join("README.md")).unwrap(),
        b"# unchanged\n",
        "[{executor}]"
    );
    let request = p.drover_file(&run, "request.json");
    assert_eq!(
        request["inputs"].as_array().unwrap().len(),
        4,
        "[{executor}]"
    );
    p.finish().await;
}

async fn timeout(executor: &'static str) {
    let p = Parity::start(executor).await;
    let mut spec = p.spec(
        "echo started; sleep 60",
        pb::MockBehavior {
            duration_ms: 60_000,
            stdout: lines(&["started"]),
            ..Default::default()
        },
    );
    spec.timeout_seconds = 2;
    let run = p.run(spec, pb::RunState::TimedOut).await;
    assert_eq!(run.reason, "timeout: exceeded 2 s", "[{executor}]");
    assert_eq!(run.output, b"started\n", "[{executor}]");
    let result = p.drover_file(&run, "result.json");
    assert_eq!(result["status"], "error", "[{executor}] {result}");
    p.finish().await;
}

async fn cancel(executor: &'static str) {
    let p = Parity::start(executor).await;
    let spec = p.spec(
        "echo started; sleep 60",
        pb::MockBehavior {
            duration_ms: 60_000,
            stdout: lines(&["started"]),
            ..Default::default()
        },
    );
    let id = submit(&p.stack, spec).await;
    wait_run(&p.stack, &id, LIMIT, in_state(pb::RunState::Running)).await;
    p.stack
        .client()
        .await
        .cancel_run(pb::CancelRunRequest {
            run_id: id.clone(),
            reason: "parity".into(),
        })
        .await
        .unwrap();
    let run = wait_run(&p.stack, &id, LIMIT, |r| is_terminal(r.state)).await;
    assert_eq!(
        run.state,
        pb::RunState::Cancelled as i32,
        "[{executor}] {}",
        run.reason
    );
    let result = p.drover_file(&run, "result.json");
    assert_eq!(result["status"], "error", "[{executor}] {result}");
    assert_eq!(result["executor"], executor, "[{executor}] {result}");
    p.finish().await;
}

/// The artifacts of a run, path → (entry, content), through ListArtifacts and GetArtifact.
async fn artifacts(
    p: &Parity,
    run: &pb::Run,
) -> std::collections::BTreeMap<String, (pb::ArtifactEntry, Vec<u8>)> {
    let mut client = p.stack.client().await;
    let listed = client
        .list_artifacts(pb::ListArtifactsRequest {
            run_id: run.id.clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .entries;
    let mut out = std::collections::BTreeMap::new();
    for entry in listed {
        let stream = client
            .get_artifact(pb::GetArtifactRequest {
                run_id: run.id.clone(),
                path: entry.path.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        let mut got = collect_artifacts(stream).await.unwrap();
        assert_eq!(got.len(), 1, "[{}] {}", p.executor, entry.path);
        let (served, data) = got.remove(0);
        assert_eq!(served.sha256, entry.sha256);
        assert_eq!(
            sha256_hex(&data),
            entry.sha256,
            "[{}] {}",
            p.executor,
            entry.path
        );
        out.insert(entry.path.clone(), (entry, data));
    }
    out
}

/// The "edit job": run 1 creates a small project; run 2 starts from run 1's artifacts
/// (`inputs_from_run`), appends a line to `app.py`. Run 2's artifacts hold the edited
/// `app.py` and the untouched files byte for byte, its result.json lists `app.py` as the only
/// modified file, and each run's stored log is among its artifacts.
async fn a_follow_up_run_edits_the_workspace_of_an_earlier_one(executor: &'static str) {
    let p = Parity::start(executor).await;
    let readme = b"# demo\n".to_vec();
    let app = b"print('hello')\n".to_vec();
    let test = b"def test_cli():\n    assert True\n".to_vec();
    let first = p.spec(
        "mkdir -p tests && printf '# demo\\n' > README.md && printf \"print('hello')\\n\" > app.py \
         && printf 'def test_cli():\\n    assert True\\n' > tests/test_cli.py && echo run 1 done",
        pb::MockBehavior {
            stdout: lines(&["run 1 done"]),
            files: vec![
                pb::MockFile {
                    path: "README.md".into(),
                    content: readme.clone(),
                },
                pb::MockFile {
                    path: "app.py".into(),
                    content: app.clone(),
                },
                pb::MockFile {
                    path: "tests/test_cli.py".into(),
                    content: test.clone(),
                },
            ],
            ..Default::default()
        },
    );
    let run1 = p.run(first, pb::RunState::Succeeded).await;
    let a1 = artifacts(&p, &run1).await;
    let who = executor;
    for (path, want) in [
        ("README.md", &readme),
        ("app.py", &app),
        ("tests/test_cli.py", &test),
    ] {
        assert_eq!(&a1[path].1, want, "[{who}] run 1 {path}");
    }
    assert_eq!(a1[".drover/logs/stdout.log"].1, b"run 1 done\n", "[{who}]");
    let r1: Value = serde_json::from_slice(&a1[".drover/result.json"].1).unwrap();
    assert_eq!(
        strings(&r1["created_files"]),
        ["README.md", "app.py", "tests/test_cli.py"],
        "[{who}] {r1}"
    );

    let mut edited = app.clone();
    edited.extend_from_slice(b"# a comment\n");
    let mut second = p.spec(
        "echo '# a comment' >> app.py && echo run 2 done",
        pb::MockBehavior {
            stdout: lines(&["run 2 done"]),
            files: vec![pb::MockFile {
                path: "app.py".into(),
                content: edited.clone(),
            }],
            ..Default::default()
        },
    );
    second.inputs_from_run = run1.id.clone();
    let run2 = p.run(second, pb::RunState::Succeeded).await;
    let a2 = artifacts(&p, &run2).await;
    assert_eq!(a2["app.py"].1, edited, "[{who}] the edit");
    for path in ["README.md", "tests/test_cli.py"] {
        assert_eq!(
            a2[path].0.sha256, a1[path].0.sha256,
            "[{who}] {path} unchanged"
        );
    }
    assert_eq!(a2[".drover/logs/stdout.log"].1, b"run 2 done\n", "[{who}]");
    let r2: Value = serde_json::from_slice(&a2[".drover/result.json"].1).unwrap();
    assert_eq!(strings(&r2["modified_files"]), ["app.py"], "[{who}] {r2}");
    assert!(strings(&r2["created_files"]).is_empty(), "[{who}] {r2}");
    assert!(strings(&r2["deleted_files"]).is_empty(), "[{who}] {r2}");
    let req: Value = serde_json::from_slice(&a2[".drover/request.json"].1).unwrap();
    let given: Vec<&str> = req["inputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["path"].as_str().unwrap())
        .collect();
    assert_eq!(
        given,
        ["README.md", "app.py", "tests/test_cli.py"],
        "[{who}] {req}"
    );
    p.finish().await;
}

/// A tenant secret and a host pass-through variable reach the program's environment (the
/// mock, which runs nothing, prints the values as a program would); every place the values
/// could leak to — the output tail, the live log in Postgres, the stored log artifact,
/// request.json — has them masked or names them only (`present` / `absent`).
async fn secrets_reach_the_program_and_never_its_logs(executor: &'static str) {
    let p = Parity::start(executor).await;
    let who = executor;
    p.stack
        .admin()
        .await
        .put_secret(pb::PutSecretRequest {
            name: "API_TOKEN".into(),
            value: SECRET_VALUE.into(),
        })
        .await
        .unwrap();
    let mut spec = p.spec(
        "echo \"token=$API_TOKEN\"; echo \"host=$PARITY_HOST_TOKEN\"; echo \"missing=${PARITY_ABSENT:-unset}\"",
        pb::MockBehavior {
            stdout: vec![
                format!("token={SECRET_VALUE}"),
                format!("host={HOST_VALUE}"),
                "missing=unset".into(),
            ],
            ..Default::default()
        },
    );
    spec.secrets = vec!["API_TOKEN".into()];
    spec.host_env = vec![HOST_VAR.into(), "PARITY_ABSENT".into()];
    let run = p.run(spec, pb::RunState::Succeeded).await;
    let want = "token=[REDACTED]\nhost=[REDACTED]\nmissing=unset\n";
    assert_eq!(String::from_utf8_lossy(&run.output), want, "[{who}]");

    let logged: Vec<Vec<u8>> = sqlx::query_scalar("SELECT data FROM run_logs ORDER BY id")
        .fetch_all(&p.stack.db)
        .await
        .unwrap();
    let logged = String::from_utf8_lossy(&logged.concat()).into_owned();
    assert!(logged.contains(want), "[{who}] live log: {logged}");
    assert!(
        logged.contains(
            "secrets: API_TOKEN=present; host_env: PARITY_ABSENT=absent, PARITY_HOST_TOKEN=present"
        ),
        "[{who}] presence line: {logged}"
    );
    let files = artifacts(&p, &run).await;
    let stored = String::from_utf8_lossy(&files[".drover/logs/stdout.log"].1).into_owned();
    assert_eq!(stored, want, "[{who}] stored log");
    let req: Value = serde_json::from_slice(&files[".drover/request.json"].1).unwrap();
    assert_eq!(req["secrets"]["API_TOKEN"], "present", "[{who}] {req}");
    assert_eq!(req["host_env"][HOST_VAR], "present", "[{who}] {req}");
    assert_eq!(req["host_env"]["PARITY_ABSENT"], "absent", "[{who}] {req}");
    for (path, (_, data)) in &files {
        let text = String::from_utf8_lossy(data);
        assert!(
            !text.contains(SECRET_VALUE) && !text.contains(HOST_VALUE),
            "[{who}] a value leaked into artifact {path}"
        );
    }
    assert!(
        !logged.contains(SECRET_VALUE) && !logged.contains(HOST_VALUE),
        "[{who}]"
    );
    p.finish().await;
}

macro_rules! parity {
    ($executor:ident: $($scenario:ident),* $(,)?) => {
        mod $executor {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
                async fn $scenario() {
                    super::$scenario(stringify!($executor)).await;
                }
            )*
        }
    };
}

parity!(docker: env_reaches_the_program, exit_codes, stdout_and_stderr_are_captured,
    inputs_are_visible_and_result_lists_files, timeout, cancel,
    a_follow_up_run_edits_the_workspace_of_an_earlier_one,
    secrets_reach_the_program_and_never_its_logs);
parity!(process: env_reaches_the_program, exit_codes, stdout_and_stderr_are_captured,
    inputs_are_visible_and_result_lists_files, timeout, cancel,
    a_follow_up_run_edits_the_workspace_of_an_earlier_one,
    secrets_reach_the_program_and_never_its_logs);
parity!(mock: env_reaches_the_program, exit_codes, stdout_and_stderr_are_captured,
    inputs_are_visible_and_result_lists_files, timeout, cancel,
    a_follow_up_run_edits_the_workspace_of_an_earlier_one,
    secrets_reach_the_program_and_never_its_logs);

/// A spec may name another executor than the agent's own only if the agent allows it; the
/// run records the executor that actually ran it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spec_runs_on_the_executor_it_names_only_where_allowed() {
    let p = Parity::start_allowing("mock", "process").await;
    let mut on_process = p.spec("echo from-process", pb::MockBehavior::default());
    on_process.executor = "process".into();
    let run = p.run(on_process, pb::RunState::Succeeded).await;
    assert_eq!(run.executor, "process");
    assert_eq!(run.output, b"from-process\n");
    assert_result_shape(&p, &run, "success", Some(0));

    let mut on_docker = p.spec("true", pb::MockBehavior::default());
    on_docker.executor = "docker".into();
    let run = p.run(on_docker, pb::RunState::Failed).await;
    assert!(
        run.reason
            .starts_with("executor_unavailable: executor docker is not allowed on this agent"),
        "{}",
        run.reason
    );
    p.finish().await;
}

/// Inline inputs and the new spec fields are checked at submit: INVALID_ARGUMENT naming the
/// field, nothing stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_inputs_and_executor_fields_are_refused_at_submit() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..StackOptions::default()
    })
    .await;
    let mut client = stack.client().await;
    let input = |path: &str, size: usize| pb::InputFile {
        path: path.into(),
        content: vec![b'x'; size],
        mode: 0,
    };
    let valid = || pb::RunSpec {
        image: IMAGE.into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let long = "a/".repeat(600) + "b";
    let mut cases: Vec<(pb::RunSpec, &str)> = [
        "../etc/passwd",
        "a/../../etc/passwd",
        "/etc/passwd",
        "%2e%2e%2fetc%2fpasswd",
        "..\\..\\windows",
        "a\0b",
        ".drover/result.json",
        "./a",
        "",
        long.as_str(),
    ]
    .into_iter()
    .map(|path| {
        (
            pb::RunSpec {
                inputs: vec![input(path, 1)],
                ..valid()
            },
            "spec.inputs",
        )
    })
    .collect();
    cases.push((
        pb::RunSpec {
            inputs: vec![
                input("big.bin", 2 * 1024 * 1024),
                input("big2.bin", 1024 * 1024 + 1),
            ],
            ..valid()
        },
        "spec.inputs",
    ));
    cases.push((
        pb::RunSpec {
            executor: "podman".into(),
            ..valid()
        },
        "spec.executor",
    ));
    cases.push((
        pb::RunSpec {
            image_pull_policy: "sometimes".into(),
            ..valid()
        },
        "spec.image_pull_policy",
    ));
    cases.push((
        pb::RunSpec {
            mock: Some(pb::MockBehavior {
                files: vec![pb::MockFile {
                    path: "../escape".into(),
                    content: Vec::new(),
                }],
                ..Default::default()
            }),
            ..valid()
        },
        "spec.mock.files",
    ));
    for (spec, field) in cases {
        let what = format!("{:?}", spec.inputs.first().map(|i| &i.path));
        let err = client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .expect_err("invalid spec must be refused");
        assert_eq!(
            err.code(),
            tonic::Code::InvalidArgument,
            "{field} {what}: {err:?}"
        );
        assert!(
            err.message().contains(field),
            "message {:?} names {field} ({what})",
            err.message()
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(stored, 0, "nothing stored");
    stack.stop().await;
}

/// An input at the size bound travels SubmitRun, GetAssignment and the workspace intact.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_input_at_the_size_bound_reaches_the_program() {
    let p = Parity::start("process").await;
    let size = 3 * 1024 * 1024;
    let content: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    let mut spec = p.spec("wc -c < big.bin", pb::MockBehavior::default());
    spec.inputs = vec![pb::InputFile {
        path: "big.bin".into(),
        content: content.clone(),
        mode: 0,
    }];
    let run = p.run(spec, pb::RunState::Succeeded).await;
    assert_eq!(
        String::from_utf8_lossy(&run.output).trim(),
        size.to_string()
    );
    assert_eq!(
        std::fs::read(p.workspace(&run).join("big.bin")).unwrap(),
        content
    );
    p.finish().await;
}
