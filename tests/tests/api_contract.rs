//! RunService contract checks against the real `drover-api` binary: validation errors name the
//! field and store nothing; lookups, listing and paging; health and reflection are served.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};
use tonic::Code;

fn api_only() -> StackOptions {
    StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    }
}

fn valid() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

async fn run_count(stack: &Stack) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM runs")
        .fetch_one(&stack.db)
        .await
        .unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn invalid_specs_are_refused_naming_the_field_and_nothing_is_stored() {
    let stack = Stack::start_with(api_only()).await;
    let mut client = stack.client().await;
    let big_env = [("BIG".to_string(), "x".repeat(70 * 1024))]
        .into_iter()
        .collect();
    let cases: Vec<(Option<pb::RunSpec>, &str)> = vec![
        (None, "spec"),
        (
            Some(pb::RunSpec {
                image: "".into(),
                ..valid()
            }),
            "spec.image",
        ),
        (
            Some(pb::RunSpec {
                command: vec![],
                ..valid()
            }),
            "spec.command",
        ),
        (
            Some(pb::RunSpec {
                env: big_env,
                ..valid()
            }),
            "spec.env",
        ),
        (
            Some(pb::RunSpec {
                env: [("9BAD".to_string(), "v".to_string())]
                    .into_iter()
                    .collect(),
                ..valid()
            }),
            "spec.env",
        ),
        (
            Some(pb::RunSpec {
                pool: "No Such Pool!".into(),
                ..valid()
            }),
            "spec.pool",
        ),
        (
            Some(pb::RunSpec {
                network: "host".into(),
                ..valid()
            }),
            "spec.network",
        ),
        (
            Some(pb::RunSpec {
                timeout_seconds: 1_000_000,
                ..valid()
            }),
            "spec.timeout_seconds",
        ),
    ];
    for (spec, field) in cases {
        let err = client
            .submit_run(pb::SubmitRunRequest {
                spec,
                idempotency_key: String::new(),
            })
            .await
            .expect_err("invalid spec must be refused");
        assert_eq!(err.code(), Code::InvalidArgument, "{field}: {err:?}");
        assert!(
            err.message().contains(field),
            "message {:?} names {field}",
            err.message()
        );
    }
    let err = client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(valid()),
            idempotency_key: "k".repeat(300),
        })
        .await
        .expect_err("oversized key");
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("idempotency_key"));

    assert_eq!(run_count(&stack).await, 0, "nothing stored");
    let outbox: i64 = sqlx::query_scalar("SELECT count(*) FROM outbox")
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert_eq!(outbox, 0, "nothing enqueued");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn get_list_and_paging() {
    let stack = Stack::start_with(api_only()).await;
    let mut client = stack.client().await;
    let mut ids = Vec::new();
    for i in 0..5 {
        let run = client
            .submit_run(pb::SubmitRunRequest {
                spec: Some(pb::RunSpec {
                    command: vec!["echo".into(), i.to_string()],
                    ..valid()
                }),
                idempotency_key: String::new(),
            })
            .await
            .unwrap()
            .into_inner()
            .run
            .unwrap();
        ids.push(run.id);
    }
    // The relay published all five (no dispatcher here, so they wait in the queue).
    let published = stack
        .wait_for(std::time::Duration::from_secs(20), || async {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE published_at IS NULL")
                .fetch_one(&stack.db)
                .await
                .map(|n| n == 0)
                .unwrap_or(false)
        })
        .await;
    assert!(published, "outbox relay published every submitted run");

    let got = client
        .get_run(pb::GetRunRequest {
            run_id: ids[2].clone(),
        })
        .await
        .unwrap()
        .into_inner()
        .run
        .unwrap();
    assert_eq!(got.spec.unwrap().command, vec!["echo", "2"]);

    let err = client
        .get_run(pb::GetRunRequest {
            run_id: uuid::Uuid::now_v7().to_string(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::NotFound);
    let err = client
        .get_run(pb::GetRunRequest {
            run_id: "not-a-uuid".into(),
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    assert!(err.message().contains("run_id"));

    // Paging newest first, two at a time, covers all five exactly once.
    let mut seen = Vec::new();
    let mut token = String::new();
    loop {
        let page = client
            .list_runs(pb::ListRunsRequest {
                states: vec![pb::RunState::Queued as i32],
                page_size: 2,
                page_token: token.clone(),
            })
            .await
            .unwrap()
            .into_inner();
        assert!(page.runs.len() <= 2);
        seen.extend(page.runs.into_iter().map(|r| r.id));
        if page.next_page_token.is_empty() {
            break;
        }
        token = page.next_page_token;
    }
    let mut newest_first = ids.clone();
    newest_first.reverse();
    assert_eq!(seen, newest_first);

    let none = client
        .list_runs(pb::ListRunsRequest {
            states: vec![pb::RunState::Succeeded as i32],
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    assert!(none.runs.is_empty());
    let err = client
        .list_runs(pb::ListRunsRequest {
            page_size: 5000,
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(err.code(), Code::InvalidArgument);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn health_is_served() {
    use tonic_health::pb::health_check_response::ServingStatus;
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};

    let stack = Stack::start_with(api_only()).await;
    let mut health = HealthClient::new(stack.channel().await);
    for service in ["", "drover.v1.RunService", "drover.v1.AgentService"] {
        let resp = health
            .check(HealthCheckRequest {
                service: service.into(),
            })
            .await
            .unwrap()
            .into_inner();
        assert_eq!(resp.status, ServingStatus::Serving as i32, "{service:?}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn reflection_lists_the_services() {
    use tonic_reflection::pb::v1::ServerReflectionRequest;
    use tonic_reflection::pb::v1::server_reflection_client::ServerReflectionClient;
    use tonic_reflection::pb::v1::server_reflection_request::MessageRequest;
    use tonic_reflection::pb::v1::server_reflection_response::MessageResponse;

    let stack = Stack::start_with(api_only()).await;
    let mut client = ServerReflectionClient::new(stack.channel().await);
    let req = ServerReflectionRequest {
        host: String::new(),
        message_request: Some(MessageRequest::ListServices(String::new())),
    };
    let mut stream = client
        .server_reflection_info(futures::stream::iter([req]))
        .await
        .unwrap()
        .into_inner();
    let resp = stream.message().await.unwrap().expect("one response");
    let Some(MessageResponse::ListServicesResponse(list)) = resp.message_response else {
        panic!("unexpected reflection response {resp:?}");
    };
    let names: Vec<String> = list.service.into_iter().map(|s| s.name).collect();
    for want in [
        "drover.v1.RunService",
        "drover.v1.AgentService",
        "grpc.health.v1.Health",
    ] {
        assert!(names.iter().any(|n| n == want), "{want} in {names:?}");
    }
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_subcommand_applies_the_schema() {
    let tag = uuid::Uuid::now_v7().simple().to_string();
    let (name, url) = drover_tests::services::create_database(&tag).await;
    let status = tokio::process::Command::new(drover_tests::stack::bin_path("drover-api"))
        .arg("migrate")
        .env("DROVER_DATABASE__URL", &url)
        .status()
        .await
        .unwrap();
    assert!(status.success());
    let pool = sqlx::PgPool::connect(&url).await.unwrap();
    let tables: Vec<String> = sqlx::query_scalar(
        "SELECT table_name::text FROM information_schema.tables \
         WHERE table_schema = 'public' ORDER BY 1",
    )
    .fetch_all(&pool)
    .await
    .unwrap();
    for t in [
        "agents",
        "outbox",
        "run_events",
        "run_logs",
        "runs",
        "tenants",
    ] {
        assert!(tables.iter().any(|x| x == t), "{t} in {tables:?}");
    }
    pool.close().await;
    drover_tests::services::drop_database(&name).await;
}
