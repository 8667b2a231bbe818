//! Errors returned to clients carry no driver text, SQL, server paths, tokens or secret
//! values: database failures are forced for real (a trigger that raises, a table renamed away)
//! and the client gets a code, a plain message and a correlation id that the server log
//! holds next to the detail.

use drover_core::repo::tokens::Role;
use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};
use tonic::Code;

/// Words that would mean internals leaked.
const LEAKS: [&str; 12] = [
    "sqlx",
    "SELECT",
    "INSERT",
    "relation",
    "postgres",
    "run_logs",
    "api_tokens",
    "/var/",
    "/tmp/",
    "error returned from database",
    "drv_",
    "EXPLOSIVE",
];

fn assert_clean(s: &tonic::Status) {
    let text = format!("{} {:?}", s.message(), s.metadata());
    for word in LEAKS {
        assert!(
            !text.to_lowercase().contains(&word.to_lowercase()),
            "client-visible error leaks {word:?}: {text}"
        );
    }
}

/// The error's correlation id, which must appear in the message, in metadata and in the log.
fn error_ref(stack: &Stack, s: &tonic::Status) -> String {
    let r = s
        .metadata()
        .get("x-drover-error-ref")
        .and_then(|v| v.to_str().ok())
        .expect("x-drover-error-ref metadata")
        .to_owned();
    assert!(s.message().contains(&r), "{s:?}");
    let log = std::fs::read_to_string(stack.log_dir.join("api.log")).expect("api log");
    let line = log
        .lines()
        .find(|l| l.contains(&r))
        .unwrap_or_else(|| panic!("no log line with error_ref {r}"));
    assert!(line.contains("error"), "{line}");
    line.to_owned()
}

fn spec() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

#[tokio::test]
async fn database_failures_reach_the_client_as_a_code_and_a_reference_only() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let mut c = stack.client().await;
    let run = c
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec()),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run");

    // 1. A statement fails inside Postgres with text of its own (a trigger that raises).
    sqlx::raw_sql(
        "CREATE FUNCTION explode() RETURNS trigger LANGUAGE plpgsql AS $$ BEGIN \
           RAISE EXCEPTION 'EXPLOSIVE detail from /var/lib/postgresql about relation runs'; \
         END $$; \
         CREATE TRIGGER explode BEFORE INSERT ON runs FOR EACH ROW EXECUTE FUNCTION explode();",
    )
    .execute(&stack.db)
    .await
    .expect("install the trigger");
    let s = c
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec()),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("the insert fails");
    assert_eq!(s.code(), Code::Internal);
    assert_clean(&s);
    let line = error_ref(&stack, &s);
    assert!(
        line.contains("EXPLOSIVE"),
        "the detail is in the server log: {line}"
    );

    // 2. A table the call needs is gone.
    sqlx::raw_sql("ALTER TABLE run_logs RENAME TO run_logs_away")
        .execute(&stack.db)
        .await
        .expect("rename");
    let s = c
        .stream_logs(pb::StreamLogsRequest {
            run_id: run.id.clone(),
            follow: false,
            from_offset: 0,
        })
        .await
        .map(|_| ())
        .err();
    // The failure may surface on the call or as the stream's first item.
    let s = match s {
        Some(s) => s,
        None => {
            let mut stream = c
                .stream_logs(pb::StreamLogsRequest {
                    run_id: run.id.clone(),
                    follow: false,
                    from_offset: 0,
                })
                .await
                .expect("stream opens")
                .into_inner();
            stream.message().await.expect_err("the read fails")
        }
    };
    assert_eq!(s.code(), Code::Internal, "{s:?}");
    assert_clean(&s);
    error_ref(&stack, &s);

    // 3. Authentication's own table is gone: INTERNAL (not UNAUTHENTICATED: the token may well
    //    be valid), still without internals. A token the API has not seen yet, so the lookup
    //    goes to Postgres (a used one is served from the token cache for a second).
    let mut fresh = stack
        .client_as(&stack.token_with(&[Role::Submitter]).await)
        .await;
    sqlx::raw_sql("ALTER TABLE api_tokens RENAME TO api_tokens_away")
        .execute(&stack.db)
        .await
        .expect("rename");
    let s = fresh
        .get_run(pb::GetRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .expect_err("authentication cannot be checked");
    assert_eq!(s.code(), Code::Internal, "{s:?}");
    assert_clean(&s);
    error_ref(&stack, &s);
    stack.stop().await;
}

#[tokio::test]
async fn refusals_never_echo_tokens_or_secret_values() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let bad = stack.client_as("drv_this-token-must-not-come-back").await;
    let s = bad
        .clone()
        .list_runs(pb::ListRunsRequest::default())
        .await
        .expect_err("unknown token");
    assert_eq!(s.code(), Code::Unauthenticated);
    assert!(!s.message().contains("this-token"), "{s:?}");
    assert_clean(&s);

    let mut admin = stack.admin().await;
    for value in ["qz7Kx", "contains\0nul-and-EXPLOSIVE-value"] {
        let s = admin
            .put_secret(pb::PutSecretRequest {
                name: "LEAKY".into(),
                value: value.into(),
            })
            .await
            .expect_err("refused");
        assert_eq!(s.code(), Code::InvalidArgument);
        assert!(!s.message().contains(value), "{s:?}");
        assert_clean(&s);
    }
    stack.stop().await;
}

#[tokio::test]
async fn oversized_messages_and_unbounded_fields_are_refused_naming_the_limit() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let mut c = stack.client().await;
    // 5 MiB of inline input: over the 4 MiB message limit of RunService.
    let big = pb::RunSpec {
        inputs: vec![pb::InputFile {
            path: "big.bin".into(),
            content: vec![b'x'; 5 * 1024 * 1024],
            mode: 0,
        }],
        ..spec()
    };
    let s = c
        .submit_run(pb::SubmitRunRequest {
            spec: Some(big),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("too large");
    assert_eq!(s.code(), Code::ResourceExhausted, "{s:?}");
    assert!(s.message().contains("limit"), "{s:?}");

    let cases: Vec<(pb::RunSpec, &str)> = vec![
        (
            pb::RunSpec {
                env: (0..200).map(|i| (format!("V{i}"), "x".into())).collect(),
                ..spec()
            },
            "spec.env",
        ),
        (
            pb::RunSpec {
                command: vec!["x".repeat(20 * 1024)],
                ..spec()
            },
            "spec.command",
        ),
        (
            pb::RunSpec {
                labels: (0..40).map(|i| (format!("l{i}"), "v".into())).collect(),
                ..spec()
            },
            "spec.labels",
        ),
        (
            pb::RunSpec {
                inputs: vec![pb::InputFile {
                    path: "a.bin".into(),
                    content: vec![0; 3 * 1024 * 1024 + 1],
                    mode: 0,
                }],
                ..spec()
            },
            "spec.inputs",
        ),
        (
            pb::RunSpec {
                metadata: (0..70).map(|i| (format!("m{i}"), "v".into())).collect(),
                ..spec()
            },
            "spec.metadata",
        ),
    ];
    for (spec, field) in cases {
        let s = c
            .submit_run(pb::SubmitRunRequest {
                spec: Some(spec),
                idempotency_key: String::new(),
            })
            .await
            .expect_err("over a bound");
        assert!(
            matches!(s.code(), Code::InvalidArgument | Code::ResourceExhausted),
            "{field}: {s:?}"
        );
        assert!(s.message().contains(field), "{field}: {s:?}");
        assert!(
            s.message().chars().any(|ch| ch.is_ascii_digit()),
            "the message names the bound: {s:?}"
        );
    }
    let stored: i64 = sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&stack.db)
        .await
        .expect("count");
    assert_eq!(stored, 0, "nothing refused was stored");
    stack.stop().await;
}
