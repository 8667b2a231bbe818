//! Tenant secrets and host pass-through end to end, through the real binaries and Docker:
//! the values reach the container's environment, and nothing drover stores or reports (run
//! logs, the run's output and reason, events, the agent's own log, the secrets table) holds a
//! value or its base64 / URL-encoded forms.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::fake_agent::{submit, wait_run};
use drover_tests::{Stack, StackOptions};
use sha2::{Digest, Sha256};
use sqlx::Row;
use tonic::Code;

const IMAGE: &str = "drover/busybox:latest";

/// An API-key shape with characters that URL encoding changes.
const API_TOKEN: &str = "sk-live-Te5t:Secret/Value@db?x=1+2";
/// A connection string.
const DB_URL: &str = "postgres://app_user:s3cr3t-pa55@db.internal:5432/prod";
/// A multi-line PEM private key (synthetic).
const PEM_KEY: &str = "-----BEGIN PRIVATE KEY-----\nMIIEvQIBADANBgkqhkiG9w0BAQEFAASCBKcwggSjAgEAAoIBAQC7\nVJTUt9Us8cKjMzEfYyjiWA4R4/M2bS1GB4t7NXp98C3SC6dVMvDu\n-----END PRIVATE KEY-----";
/// Set in the agent's environment; the run asks for it through `host_env`.
const HOST_NAME: &str = "DROVER_E2E_HOST_TOKEN";
const HOST_TOKEN: &str = "ghp_HostPassThrough0123456789abcdefXYZ";
/// Asked for through `host_env`, set nowhere.
const ABSENT_NAME: &str = "DROVER_E2E_NOT_ON_HOST";

fn sha256_hex(s: &str) -> String {
    Sha256::digest(s.as_bytes())
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Every form of `value` that must never be stored: the value, its base64 (standard and
/// URL-safe, padded or not), its URL encodings, and each line of at least 8 bytes.
fn forbidden_forms(value: &str) -> Vec<String> {
    use base64::Engine;
    use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
    let mut forms = vec![
        value.to_owned(),
        STANDARD.encode(value),
        STANDARD.encode(value).trim_end_matches('=').to_owned(),
        URL_SAFE_NO_PAD.encode(value),
        value.bytes().map(|b| format!("%{b:02x}")).collect(),
        value.bytes().map(|b| format!("%{b:02X}")).collect(),
        percent_encoding::utf8_percent_encode(value, percent_encoding::NON_ALPHANUMERIC)
            .to_string(),
    ];
    forms.extend(value.lines().filter(|l| l.len() >= 8).map(str::to_owned));
    forms
}

fn assert_clean(what: &str, text: &[u8]) {
    for value in [API_TOKEN, DB_URL, PEM_KEY, HOST_TOKEN] {
        for form in forbidden_forms(value) {
            assert!(
                !text.windows(form.len()).any(|w| w == form.as_bytes()),
                "{what} contains {form:?}:\n{}",
                String::from_utf8_lossy(text)
            );
        }
    }
}

async fn put(
    stack: &Stack,
    name: &str,
    value: &str,
) -> Result<pb::PutSecretResponse, tonic::Status> {
    stack
        .admin()
        .await
        .put_secret(pb::PutSecretRequest {
            name: name.into(),
            value: value.into(),
        })
        .await
        .map(tonic::Response::into_inner)
}

/// The script prints each value plainly and in encoded forms (for redaction to catch), and
/// digests that prove the real values arrived.
const SCRIPT: &str = r#"
set -e
echo "token=$API_TOKEN"
printf %s "$API_TOKEN" | base64 -w0; echo
printf %s "$API_TOKEN" | base64 -w0 | tr '+/' '-_' | tr -d '='; echo
printf %s "$API_TOKEN" | od -An -tx1 | tr -d ' \n' | sed 's/../%&/g'; echo
printf %s "$API_TOKEN" | sed -e 's/:/%3A/g' -e 's|/|%2F|g' -e 's/@/%40/g' -e 's/?/%3F/g' -e 's/=/%3D/g' -e 's/+/%2B/g'; echo
echo "db=$DB_URL" >&2
printf %s "$DB_URL" | base64 -w0 >&2; echo >&2
echo "$PEM_KEY"
echo "$PEM_KEY" | sed -n 2p >&2
echo "host=$DROVER_E2E_HOST_TOKEN" >&2
echo "sha_api=$(printf %s "$API_TOKEN" | sha256sum | cut -d' ' -f1)"
echo "sha_db=$(printf %s "$DB_URL" | sha256sum | cut -d' ' -f1)"
echo "sha_pem=$(printf %s "$PEM_KEY" | sha256sum | cut -d' ' -f1)"
echo "sha_host=$(printf %s "$DROVER_E2E_HOST_TOKEN" | sha256sum | cut -d' ' -f1)"
if [ -z "${DROVER_E2E_NOT_ON_HOST+set}" ]; then echo "absent_is_unset"; fi
echo "innocent: port 5432 ok true sk-live"
"#;

#[tokio::test(flavor = "multi_thread")]
async fn secrets_reach_the_container_and_never_the_stored_logs() {
    let stack = Stack::start_with(StackOptions {
        env: vec![(HOST_NAME.into(), HOST_TOKEN.into())],
        ..Default::default()
    })
    .await;

    // Put, replace, list (names only), refuse bad input.
    let first = put(&stack, "API_TOKEN", "placeholder-value-1")
        .await
        .unwrap();
    assert!(first.created);
    let replaced = put(&stack, "API_TOKEN", API_TOKEN).await.unwrap();
    assert!(!replaced.created);
    put(&stack, "DB_URL", DB_URL).await.unwrap();
    put(&stack, "PEM_KEY", PEM_KEY).await.unwrap();
    let short = put(&stack, "SHORT", "1234567").await.unwrap_err();
    assert_eq!(short.code(), Code::InvalidArgument, "{short:?}");
    assert!(short.message().contains("at least 8 bytes"), "{short:?}");
    let bad_name = put(&stack, "1-BAD", "long enough value").await.unwrap_err();
    assert_eq!(bad_name.code(), Code::InvalidArgument);
    let huge = put(&stack, "HUGE", &"x".repeat(16 * 1024 + 1))
        .await
        .unwrap_err();
    assert_eq!(huge.code(), Code::InvalidArgument);

    let mut admin = stack.admin().await;
    let listed = admin
        .list_secrets(pb::ListSecretsRequest {})
        .await
        .unwrap()
        .into_inner();
    let names: Vec<&str> = listed.secrets.iter().map(|s| s.name.as_str()).collect();
    assert_eq!(names, vec!["API_TOKEN", "DB_URL", "PEM_KEY"]);
    assert!(listed.secrets.iter().all(|s| s.key_id == "test1"));
    assert!(listed.secrets.iter().all(|s| s.created_at.is_some()));
    assert_clean("ListSecrets", format!("{listed:?}").as_bytes());

    // At rest: sealed, with the key id, never the value.
    let rows = sqlx::query("SELECT name, key_id, nonce, ciphertext FROM secrets")
        .fetch_all(&stack.db)
        .await
        .unwrap();
    assert_eq!(rows.len(), 3);
    for row in &rows {
        let nonce: Vec<u8> = row.get("nonce");
        let ciphertext: Vec<u8> = row.get("ciphertext");
        assert_eq!(nonce.len(), 24);
        assert_clean("secrets.ciphertext", &ciphertext);
    }
    let table: Vec<String> = sqlx::query_scalar("SELECT s::text FROM secrets s")
        .fetch_all(&stack.db)
        .await
        .unwrap();
    assert_clean("secrets table", table.join("\n").as_bytes());

    // Unknown secrets are refused at submit.
    let mut client = stack.client().await;
    let unknown = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(pb::RunSpec {
                image: IMAGE.into(),
                command: vec!["true".into()],
                secrets: vec!["API_TOKEN".into(), "NOPE".into()],
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(unknown.code(), Code::FailedPrecondition, "{unknown:?}");
    assert!(unknown.message().contains("NOPE"), "{unknown:?}");
    // A name in both env and secrets is a client error.
    let clash = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(pb::RunSpec {
                image: IMAGE.into(),
                command: vec!["true".into()],
                env: [("API_TOKEN".to_owned(), "x".to_owned())].into(),
                secrets: vec!["API_TOKEN".into()],
                ..Default::default()
            }),
            idempotency_key: String::new(),
        })
        .await
        .unwrap_err();
    assert_eq!(clash.code(), Code::InvalidArgument, "{clash:?}");

    // The run.
    let run_id = submit(
        &stack,
        pb::RunSpec {
            image: IMAGE.into(),
            command: vec!["sh".into(), "-c".into(), SCRIPT.into()],
            secrets: vec!["API_TOKEN".into(), "DB_URL".into(), "PEM_KEY".into()],
            host_env: vec![HOST_NAME.into(), ABSENT_NAME.into()],
            timeout_seconds: 120,
            ..Default::default()
        },
    )
    .await;
    let run = wait_run(&stack, &run_id, Duration::from_secs(120), |r| {
        r.state == pb::RunState::Succeeded as i32 || r.state == pb::RunState::Failed as i32
    })
    .await;
    let output = String::from_utf8_lossy(&run.output).into_owned();
    assert_eq!(
        run.state,
        pb::RunState::Succeeded as i32,
        "{} / {output}",
        run.reason
    );

    // The real values arrived: their digests match.
    for (label, value) in [
        ("sha_api", API_TOKEN),
        ("sha_db", DB_URL),
        ("sha_pem", PEM_KEY),
        ("sha_host", HOST_TOKEN),
    ] {
        let line = format!("{label}={}", sha256_hex(value));
        assert!(output.contains(&line), "missing {line} in {output}");
    }
    assert!(output.contains("absent_is_unset"), "{output}");
    assert!(output.contains("token=[REDACTED]"), "{output}");
    assert!(
        output.contains("innocent: port 5432 ok true sk-live"),
        "innocent text stays: {output}"
    );
    assert_clean("run output", &run.output);
    assert_clean("run reason", run.reason.as_bytes());

    // Stored logs: clean, and they say which names were present or absent.
    let logs: Vec<Vec<u8>> =
        sqlx::query_scalar("SELECT data FROM run_logs WHERE run_id = $1 ORDER BY id")
            .bind(uuid::Uuid::parse_str(&run_id).unwrap())
            .fetch_all(&stack.db)
            .await
            .unwrap();
    let logs = logs.concat();
    assert_clean("run_logs", &logs);
    let logs_text = String::from_utf8_lossy(&logs);
    for expected in [
        "API_TOKEN=present",
        "DB_URL=present",
        "PEM_KEY=present",
        &format!("{HOST_NAME}=present"),
        &format!("{ABSENT_NAME}=absent"),
        "sha_api=",
        "db=[REDACTED]",
        "host=[REDACTED]",
    ] {
        assert!(
            logs_text.contains(expected),
            "missing {expected:?} in {logs_text}"
        );
    }

    // Events, the run row, and every process's own log.
    let events: Vec<String> = sqlx::query_scalar("SELECT e::text FROM run_events e")
        .fetch_all(&stack.db)
        .await
        .unwrap();
    assert_clean("run_events", events.join("\n").as_bytes());
    let row: String = sqlx::query_scalar("SELECT r::text FROM runs r WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&run_id).unwrap())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_clean("runs row", row.as_bytes());
    for entry in std::fs::read_dir(&stack.log_dir).unwrap() {
        let path = entry.unwrap().path();
        let text = std::fs::read(&path).unwrap();
        assert_clean(&path.display().to_string(), &text);
    }

    // Delete: gone from the list; deleting again is NOT_FOUND.
    admin
        .delete_secret(pb::DeleteSecretRequest {
            name: "DB_URL".into(),
        })
        .await
        .unwrap();
    let again = admin
        .delete_secret(pb::DeleteSecretRequest {
            name: "DB_URL".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(again.code(), Code::NotFound);
    let listed = admin
        .list_secrets(pb::ListSecretsRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(listed.secrets.len(), 2);
    stack.stop().await;
}

/// A secret deleted after submit fails the attempt with `secret_missing` (not retried), and
/// an API without a key refuses the secret RPCs.
#[tokio::test(flavor = "multi_thread")]
async fn a_secret_deleted_after_submit_fails_the_attempt_and_no_key_disables_secrets() {
    let mut stack = Stack::start_with(StackOptions {
        agent: false,
        ..Default::default()
    })
    .await;
    put(&stack, "GONE_SOON", "value-that-will-go")
        .await
        .unwrap();
    let run_id = submit(
        &stack,
        pb::RunSpec {
            image: IMAGE.into(),
            command: vec!["true".into()],
            secrets: vec!["GONE_SOON".into()],
            max_attempts: 3,
            timeout_seconds: 60,
            ..Default::default()
        },
    )
    .await;
    stack
        .admin()
        .await
        .delete_secret(pb::DeleteSecretRequest {
            name: "GONE_SOON".into(),
        })
        .await
        .unwrap();
    stack.start_agent().await;
    let run = wait_run(&stack, &run_id, Duration::from_secs(120), |r| {
        r.state == pb::RunState::Failed as i32
    })
    .await;
    assert!(
        run.reason.starts_with("secret_missing: GONE_SOON"),
        "{}",
        run.reason
    );
    assert_eq!(run.attempt, 1, "a missing secret is not retried");
    stack.stop().await;

    let keyless = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        env: vec![("DROVER_SECRETS__KEYS".into(), String::new())],
        ..Default::default()
    })
    .await;
    let refused = put(&keyless, "ANY_NAME", "long enough value")
        .await
        .unwrap_err();
    assert_eq!(refused.code(), Code::FailedPrecondition, "{refused:?}");
    assert!(
        refused.message().contains("DROVER_SECRETS__KEYS"),
        "{refused:?}"
    );
    let listed = keyless
        .admin()
        .await
        .list_secrets(pb::ListSecretsRequest {})
        .await
        .unwrap_err();
    assert_eq!(listed.code(), Code::FailedPrecondition);
    keyless.stop().await;
}

/// Rotation against the real table: values sealed with the old key still open once a new key
/// is active; re-putting re-seals with the active key; a configuration without the sealing key
/// reports the secret unavailable (what becomes `secret_missing`) instead of failing.
#[tokio::test(flavor = "multi_thread")]
async fn key_rotation_keeps_old_values_readable() {
    use drover_core::ids::DEFAULT_TENANT;
    use drover_core::repo::secrets;
    use drover_core::secrets_crypto::SecretKeys;

    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let k1 = format!("k1:{}", "11".repeat(32));
    let k2 = format!("k2:{}", "22".repeat(32));
    let old = SecretKeys::parse(&k1, "k1").unwrap().unwrap();
    let rotated = SecretKeys::parse(&format!("{k1},{k2}"), "k2")
        .unwrap()
        .unwrap();
    let only_new = SecretKeys::parse(&k2, "k2").unwrap().unwrap();
    let names = vec!["ROTATED".to_owned()];

    let (info, created) = secrets::put(
        &stack.db,
        &old,
        DEFAULT_TENANT,
        "ROTATED",
        API_TOKEN,
        "test",
    )
    .await
    .unwrap();
    assert!(created);
    assert_eq!(info.key_id, "k1");
    let opened = secrets::reveal(&stack.db, Some(&rotated), DEFAULT_TENANT, &names)
        .await
        .unwrap();
    assert_eq!(opened.values["ROTATED"], API_TOKEN);

    let gone = secrets::reveal(&stack.db, Some(&only_new), DEFAULT_TENANT, &names)
        .await
        .unwrap();
    assert!(gone.values.is_empty());
    assert_eq!(gone.unavailable[0].0, "ROTATED");
    assert!(
        gone.unavailable[0].1.contains("k1"),
        "{:?}",
        gone.unavailable
    );

    let (info, created) = secrets::put(
        &stack.db,
        &rotated,
        DEFAULT_TENANT,
        "ROTATED",
        API_TOKEN,
        "test",
    )
    .await
    .unwrap();
    assert!(!created);
    assert_eq!(info.key_id, "k2");
    let opened = secrets::reveal(&stack.db, Some(&only_new), DEFAULT_TENANT, &names)
        .await
        .unwrap();
    assert_eq!(opened.values["ROTATED"], API_TOKEN);
    assert!(opened.unavailable.is_empty());
    let missing = secrets::reveal(&stack.db, Some(&only_new), DEFAULT_TENANT, &["NONE".into()])
        .await
        .unwrap();
    assert_eq!(
        missing.unavailable,
        vec![("NONE".to_owned(), "no such secret".to_owned())]
    );
    stack.stop().await;
}

/// `drover secrets put NAME` with the value on stdin, `secrets ls` (names only, never the
/// value), `secrets rm`, through the real CLI binary.
#[tokio::test(flavor = "multi_thread")]
async fn the_cli_puts_lists_and_removes_secrets_without_printing_values() {
    use tokio::io::AsyncWriteExt;
    let stack = Stack::start().await;
    let value = "cli-secret-value-7c1e94d2";
    let put = |name: &'static str, stdin: String| {
        let endpoint = stack.endpoint.clone();
        async move {
            let mut child = tokio::process::Command::new(drover_tests::stack::bin_path("drover"))
                .args(["secrets", "put", name])
                .env("DROVER_ENDPOINT", endpoint)
                .stdin(std::process::Stdio::piped())
                .stdout(std::process::Stdio::piped())
                .stderr(std::process::Stdio::piped())
                .spawn()
                .unwrap();
            let mut input = child.stdin.take().unwrap();
            input.write_all(stdin.as_bytes()).await.unwrap();
            drop(input);
            let out = child.wait_with_output().await.unwrap();
            (
                out.status.code().unwrap_or(-1),
                String::from_utf8_lossy(&out.stdout).into_owned(),
                String::from_utf8_lossy(&out.stderr).into_owned(),
            )
        }
    };
    let (code, out, err) = put("CLI_TOKEN", format!("{value}\n")).await;
    assert_eq!(code, 0, "{err}");
    assert_eq!(out, "secret CLI_TOKEN created\n");
    let (code, out, _) = put("CLI_TOKEN", format!("{value}\n")).await;
    assert_eq!(code, 0);
    assert_eq!(out, "secret CLI_TOKEN replaced\n");
    let (code, _, err) = put("SHORT", "abc\n".into()).await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot store secret SHORT"), "{err}");

    // The trailing newline was dropped: the stored value is exactly `value`.
    let mut client = stack.client().await;
    let mut spec = pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec![
            "sh".into(),
            "-c".into(),
            format!("test \"$CLI_TOKEN\" = '{value}' && echo same"),
        ],
        ..Default::default()
    };
    spec.secrets = vec!["CLI_TOKEN".into()];
    let run = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    let done = wait_run(&stack, &run.id, Duration::from_secs(60), |r| {
        r.state == pb::RunState::Succeeded as i32 || r.state == pb::RunState::Failed as i32
    })
    .await;
    assert_eq!(done.output, b"same\n", "{done:?}");

    let (code, out, err) = stack.cli(&["secrets", "ls", "--json"]).await;
    assert_eq!(code, 0, "{err}");
    let out = String::from_utf8_lossy(&out).into_owned();
    assert!(out.contains("\"name\":\"CLI_TOKEN\""), "{out}");
    assert!(!out.contains(value), "a value was printed: {out}");
    let (code, out, _) = stack.cli(&["secrets", "rm", "CLI_TOKEN"]).await;
    assert_eq!(code, 0);
    assert_eq!(String::from_utf8_lossy(&out), "secret CLI_TOKEN deleted\n");
    let (code, out, _) = stack.cli(&["secrets", "ls"]).await;
    assert_eq!(code, 0);
    assert!(out.is_empty(), "{}", String::from_utf8_lossy(&out));
    let (code, _, err) = stack.cli(&["secrets", "rm", "CLI_TOKEN"]).await;
    assert_ne!(code, 0);
    assert!(err.contains("cannot delete secret CLI_TOKEN"), "{err}");
    stack.stop().await;
}
