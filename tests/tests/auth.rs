//! Authentication, roles and tenant isolation, through the real API binary.
//!
//! - The role matrix: every RPC × {no token, garbage, revoked, each role, a non-operator
//!   admin, an agent token}: UNAUTHENTICATED, PERMISSION_DENIED, or through to the handler.
//! - The isolation matrix: every RPC that takes an id × another tenant's ids: NOT_FOUND
//!   (never PERMISSION_DENIED), and lists and counts never include the other tenant.
//! - Agent authority: an agent token acts for its own agent id only.

use std::collections::HashMap;

use drover_core::bearer::Bearer;
use drover_core::repo::tokens::Role;
use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};
use tonic::Code;
use tonic::transport::Channel;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Rpc {
    SubmitRun,
    GetRun,
    ListRuns,
    WatchRun,
    CancelRun,
    StreamLogs,
    ListArtifacts,
    GetArtifact,
    ApproveRun,
    RejectRun,
    ListDeadLetters,
    RedriveRun,
    ListAgents,
    DrainAgent,
    PutSecret,
    DeleteSecret,
    ListSecrets,
    GetStats,
    CreateToken,
    RevokeToken,
    ListTokens,
    VerifyAudit,
    GetTenantPolicy,
    SetTenantPolicy,
    Register,
    Heartbeat,
    GetAssignment,
    ReportStarted,
    PushLogs,
    ReportCompletion,
    SetDraining,
    Deregister,
    UploadArtifacts,
    DownloadInputs,
}

use Rpc::*;

const RUN_READS: [Rpc; 6] = [
    GetRun,
    ListRuns,
    WatchRun,
    StreamLogs,
    ListArtifacts,
    GetArtifact,
];
const ADMIN: [Rpc; 14] = [
    ListDeadLetters,
    RedriveRun,
    ListAgents,
    DrainAgent,
    PutSecret,
    DeleteSecret,
    ListSecrets,
    GetStats,
    CreateToken,
    RevokeToken,
    ListTokens,
    VerifyAudit,
    GetTenantPolicy,
    SetTenantPolicy,
];
const AGENT: [Rpc; 10] = [
    Register,
    Heartbeat,
    GetAssignment,
    ReportStarted,
    PushLogs,
    ReportCompletion,
    SetDraining,
    Deregister,
    UploadArtifacts,
    DownloadInputs,
];

fn all_rpcs() -> Vec<Rpc> {
    let mut v = vec![SubmitRun, CancelRun, ApproveRun, RejectRun];
    v.extend(RUN_READS);
    v.extend(ADMIN);
    v.extend(AGENT);
    v
}

/// The ids a call is aimed at.
#[derive(Debug, Clone, Default)]
struct Ids {
    run: String,
    pending: String,
    dead: String,
    secret: String,
    token_id: String,
    agent: String,
}

fn spec() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Calls `rpc` with `token` (none when `None`) aimed at `ids`; the gRPC code it answered.
async fn call(channel: &Channel, token: Option<&str>, rpc: Rpc, ids: &Ids) -> Code {
    let bearer = match token {
        Some(t) => Bearer::new(t).expect("token"),
        None => Bearer::none(),
    };
    let mut runs =
        pb::run_service_client::RunServiceClient::with_interceptor(channel.clone(), bearer.clone());
    let mut admin = pb::admin_service_client::AdminServiceClient::with_interceptor(
        channel.clone(),
        bearer.clone(),
    );
    let mut agent =
        pb::agent_service_client::AgentServiceClient::with_interceptor(channel.clone(), bearer);
    let run_id = ids.run.clone();
    match rpc {
        SubmitRun => code(
            runs.submit_run(pb::SubmitRunRequest {
                spec: Some(spec()),
                idempotency_key: String::new(),
            })
            .await,
        ),
        GetRun => code(runs.get_run(pb::GetRunRequest { run_id }).await),
        ListRuns => code(runs.list_runs(pb::ListRunsRequest::default()).await),
        WatchRun => code(runs.watch_run(pb::WatchRunRequest { run_id }).await),
        CancelRun => code(
            runs.cancel_run(pb::CancelRunRequest {
                run_id,
                reason: String::new(),
            })
            .await,
        ),
        StreamLogs => code(
            runs.stream_logs(pb::StreamLogsRequest {
                run_id,
                follow: false,
                from_offset: 0,
            })
            .await,
        ),
        ListArtifacts => code(
            runs.list_artifacts(pb::ListArtifactsRequest { run_id })
                .await,
        ),
        GetArtifact => code(
            runs.get_artifact(pb::GetArtifactRequest {
                run_id,
                path: "out.txt".into(),
            })
            .await,
        ),
        ApproveRun => code(
            runs.approve_run(pb::ApproveRunRequest {
                run_id: ids.pending.clone(),
                comment: String::new(),
            })
            .await,
        ),
        RejectRun => code(
            runs.reject_run(pb::RejectRunRequest {
                run_id: ids.pending.clone(),
                reason: String::new(),
            })
            .await,
        ),
        ListDeadLetters => code(
            admin
                .list_dead_letters(pb::ListDeadLettersRequest::default())
                .await,
        ),
        RedriveRun => code(
            admin
                .redrive_run(pb::RedriveRunRequest {
                    run_id: ids.dead.clone(),
                    reason: String::new(),
                })
                .await,
        ),
        ListAgents => code(admin.list_agents(pb::ListAgentsRequest {}).await),
        DrainAgent => code(
            admin
                .drain_agent(pb::DrainAgentRequest {
                    agent_id: "no-such-agent".into(),
                })
                .await,
        ),
        PutSecret => code(
            admin
                .put_secret(pb::PutSecretRequest {
                    name: "MATRIX_SECRET".into(),
                    value: "a-matrix-secret-value".into(),
                })
                .await,
        ),
        DeleteSecret => code(
            admin
                .delete_secret(pb::DeleteSecretRequest {
                    name: ids.secret.clone(),
                })
                .await,
        ),
        ListSecrets => code(admin.list_secrets(pb::ListSecretsRequest {}).await),
        GetStats => code(admin.get_stats(pb::GetStatsRequest {}).await),
        CreateToken => code(
            admin
                .create_token(pb::CreateTokenRequest {
                    name: "matrix".into(),
                    roles: vec!["submitter".into()],
                    agent_id: String::new(),
                })
                .await,
        ),
        RevokeToken => code(
            admin
                .revoke_token(pb::RevokeTokenRequest {
                    id: ids.token_id.clone(),
                })
                .await,
        ),
        ListTokens => code(admin.list_tokens(pb::ListTokensRequest {}).await),
        VerifyAudit => code(admin.verify_audit(pb::VerifyAuditRequest {}).await),
        GetTenantPolicy => code(admin.get_tenant_policy(pb::GetTenantPolicyRequest {}).await),
        SetTenantPolicy => code(admin.set_tenant_policy(pb::TenantPolicy::default()).await),
        Register => code(
            agent
                .register(pb::RegisterAgentRequest {
                    agent_id: ids.agent.clone(),
                    hostname: "matrix".into(),
                    pool: "matrix".into(),
                    capacity: 1,
                    executor: "mock".into(),
                    version: "test".into(),
                    ..Default::default()
                })
                .await,
        ),
        Heartbeat => code(
            agent
                .heartbeat(pb::HeartbeatRequest {
                    agent_id: ids.agent.clone(),
                    running: Vec::new(),
                })
                .await,
        ),
        GetAssignment => code(
            agent
                .get_assignment(pb::GetAssignmentRequest {
                    agent_id: ids.agent.clone(),
                    run_id,
                    lease_epoch: 1,
                })
                .await,
        ),
        ReportStarted => code(
            agent
                .report_started(pb::ReportStartedRequest {
                    agent_id: ids.agent.clone(),
                    run_id,
                    lease_epoch: 1,
                    container_id: "c".into(),
                    executor: "mock".into(),
                })
                .await,
        ),
        PushLogs => code(
            agent
                .push_logs(pb::PushLogsRequest {
                    agent_id: ids.agent.clone(),
                    run_id,
                    lease_epoch: 1,
                    chunks: Vec::new(),
                })
                .await,
        ),
        ReportCompletion => code(
            agent
                .report_completion(pb::ReportCompletionRequest {
                    agent_id: ids.agent.clone(),
                    run_id,
                    lease_epoch: 1,
                    ..Default::default()
                })
                .await,
        ),
        SetDraining => code(
            agent
                .set_draining(pb::SetDrainingRequest {
                    agent_id: ids.agent.clone(),
                })
                .await,
        ),
        Deregister => code(
            agent
                .deregister(pb::DeregisterRequest {
                    agent_id: ids.agent.clone(),
                })
                .await,
        ),
        UploadArtifacts => {
            let start = pb::UploadArtifactsRequest {
                item: Some(pb::upload_artifacts_request::Item::Start(pb::UploadStart {
                    agent_id: ids.agent.clone(),
                    run_id,
                    lease_epoch: 1,
                })),
            };
            code(
                agent
                    .upload_artifacts(futures::stream::iter(vec![start]))
                    .await,
            )
        }
        DownloadInputs => code(
            agent
                .download_inputs(pb::DownloadInputsRequest {
                    agent_id: ids.agent.clone(),
                    run_id,
                    lease_epoch: 1,
                })
                .await,
        ),
    }
}

/// What a caller should get from a call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Expect {
    Unauthenticated,
    Denied,
    /// Through authentication and authorisation (whatever the handler then answers).
    Allowed,
}

fn check(got: Code, want: Expect) -> bool {
    match want {
        Expect::Unauthenticated => got == Code::Unauthenticated,
        Expect::Denied => got == Code::PermissionDenied,
        Expect::Allowed => !matches!(got, Code::Unauthenticated | Code::PermissionDenied),
    }
}

#[tokio::test]
async fn every_rpc_checks_the_token_and_the_role() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        // The matrix makes ~100 unauthenticated calls in a second from one address; the
        // per-address limit on them has its own test (rate_limits.rs).
        env: vec![(
            "DROVER_RATE_LIMIT__UNAUTHENTICATED_BURST".into(),
            "1000".into(),
        )],
        ..Default::default()
    })
    .await;
    let channel = stack.channel().await;
    let submitter = stack.token_with(&[Role::Submitter]).await;
    let approver = stack.token_with(&[Role::Approver]).await;
    let admin = stack.token_with(&[Role::Admin]).await;
    let tenant_admin = stack.tenant_token("matrix-other", &[Role::Admin]).await;
    let revoked = stack.token_with(&Role::USER).await;
    let mut a = stack.admin().await;
    let tokens = a
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("ListTokens")
        .into_inner()
        .tokens;
    // The newest token of the tenant is the one made last: `revoked`.
    let revoked_id = tokens.first().expect("tokens").id.clone();
    a.revoke_token(pb::RevokeTokenRequest {
        id: revoked_id.clone(),
    })
    .await
    .expect("RevokeToken");
    let agent_id = "matrix-agent";
    let agent_token = drover_core::repo::tokens::create_agent(&stack.db, agent_id, "m", "t", None)
        .await
        .expect("agent token")
        .token;
    let ids = Ids {
        run: uuid::Uuid::now_v7().to_string(),
        pending: uuid::Uuid::now_v7().to_string(),
        dead: uuid::Uuid::now_v7().to_string(),
        secret: "NO_SUCH_SECRET".into(),
        token_id: uuid::Uuid::now_v7().to_string(),
        agent: agent_id.into(),
    };

    let callers: Vec<(&str, Option<&str>)> = vec![
        ("no token", None),
        ("garbage", Some("drv_not-a-real-token")),
        ("revoked", Some(revoked.as_str())),
        ("submitter", Some(submitter.as_str())),
        ("approver", Some(approver.as_str())),
        ("operator admin", Some(admin.as_str())),
        ("tenant admin", Some(tenant_admin.as_str())),
        ("agent", Some(agent_token.as_str())),
    ];
    let mut failures = Vec::new();
    let mut cells = 0;
    for (who, token) in &callers {
        for rpc in all_rpcs() {
            let want = expected(who, rpc);
            let got = call(&channel, *token, rpc, &ids).await;
            cells += 1;
            if !check(got, want) {
                failures.push(format!("{who} × {rpc:?}: got {got:?}, want {want:?}"));
            }
        }
    }
    eprintln!("role matrix: {cells} cells checked");
    assert!(failures.is_empty(), "role matrix:\n{}", failures.join("\n"));
    stack.stop().await;
}

fn expected(who: &str, rpc: Rpc) -> Expect {
    use Expect::*;
    let is_agent_rpc = AGENT.contains(&rpc);
    match who {
        "no token" | "garbage" | "revoked" => Unauthenticated,
        "agent" => {
            if is_agent_rpc {
                Allowed
            } else {
                Denied
            }
        }
        _ if is_agent_rpc => Denied,
        _ if RUN_READS.contains(&rpc) => Allowed,
        "submitter" => {
            if matches!(rpc, SubmitRun | CancelRun) {
                Allowed
            } else {
                Denied
            }
        }
        "approver" => {
            if matches!(rpc, ApproveRun | RejectRun) {
                Allowed
            } else {
                Denied
            }
        }
        "operator admin" => {
            if ADMIN.contains(&rpc) {
                Allowed
            } else {
                Denied
            }
        }
        "tenant admin" => {
            if ADMIN.contains(&rpc) && !matches!(rpc, ListAgents | DrainAgent) {
                Allowed
            } else {
                Denied
            }
        }
        other => panic!("unknown caller {other}"),
    }
}

/// Tenant A's objects, as seen by tenant B.
#[tokio::test]
async fn another_tenants_runs_logs_artifacts_secrets_and_tokens_are_not_found() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let channel = stack.channel().await;
    // Tenant A = the stack's default tenant: a queued run, a run waiting for approval, a
    // dead-lettered run, a secret and a token.
    let mut a = stack.client().await;
    let mut a_admin = stack.admin().await;
    let submit = |s: pb::RunSpec, key: &str| pb::SubmitRunRequest {
        spec: Some(s),
        idempotency_key: key.into(),
    };
    let run_a = a
        .submit_run(submit(spec(), "shared-key"))
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run");
    let pending_a = a
        .submit_run(submit(
            pb::RunSpec {
                requires_approval: true,
                ..spec()
            },
            "",
        ))
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run");
    let dead_a = a
        .submit_run(submit(spec(), ""))
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run");
    // A fixture, not a transition under test: the run is parked in DEAD_LETTERED directly.
    sqlx::query("UPDATE runs SET state = 'DEAD_LETTERED' WHERE id = $1::uuid")
        .bind(&dead_a.id)
        .execute(&stack.db)
        .await
        .expect("fixture");
    a_admin
        .put_secret(pb::PutSecretRequest {
            name: "A_SECRET".into(),
            value: "tenant-a-secret-value".into(),
        })
        .await
        .expect("PutSecret");
    let a_token = a_admin
        .create_token(pb::CreateTokenRequest {
            name: "a-ci".into(),
            roles: vec!["submitter".into()],
            agent_id: String::new(),
        })
        .await
        .expect("CreateToken")
        .into_inner();
    let a_token_id = a_token.info.expect("info").id;

    // Tenant B: every user role.
    let b = stack.tenant_token("tenant-b", &Role::USER).await;
    let ids = Ids {
        run: run_a.id.clone(),
        pending: pending_a.id.clone(),
        dead: dead_a.id.clone(),
        secret: "A_SECRET".into(),
        token_id: a_token_id.clone(),
        agent: String::new(),
    };
    let targeted = [
        GetRun,
        WatchRun,
        CancelRun,
        StreamLogs,
        ListArtifacts,
        GetArtifact,
        ApproveRun,
        RejectRun,
        RedriveRun,
        DeleteSecret,
        RevokeToken,
    ];
    let mut failures = Vec::new();
    for rpc in targeted {
        let got = call(&channel, Some(&b), rpc, &ids).await;
        if got != Code::NotFound {
            failures.push(format!(
                "{rpc:?} on tenant A's id: got {got:?}, want NotFound"
            ));
        }
    }
    // inputs_from_run cannot reach across tenants either.
    let mut b_runs = stack.client_as(&b).await;
    let across = b_runs
        .submit_run(submit(
            pb::RunSpec {
                inputs_from_run: run_a.id.clone(),
                ..spec()
            },
            "",
        ))
        .await;
    if across.as_ref().map_err(|s| s.code()).err() != Some(Code::NotFound) {
        failures.push(format!(
            "SubmitRun with inputs_from_run of tenant A: {across:?}"
        ));
    }
    assert!(failures.is_empty(), "isolation:\n{}", failures.join("\n"));

    // Lists and counts hold only B's own things.
    let b_run = b_runs
        .submit_run(submit(spec(), "shared-key"))
        .await
        .expect("B may reuse A's idempotency key: keys are per tenant")
        .into_inner();
    assert!(!b_run.deduplicated);
    let listed = b_runs
        .list_runs(pb::ListRunsRequest::default())
        .await
        .expect("ListRuns")
        .into_inner()
        .runs;
    assert_eq!(
        listed.iter().map(|r| r.id.clone()).collect::<Vec<_>>(),
        vec![b_run.run.expect("run").id],
        "B lists only its own run"
    );
    let mut b_admin = stack.admin_as(&b).await;
    let dl = b_admin
        .list_dead_letters(pb::ListDeadLettersRequest::default())
        .await
        .expect("ListDeadLetters")
        .into_inner();
    assert!(dl.dead_letters.is_empty());
    let secrets = b_admin
        .list_secrets(pb::ListSecretsRequest {})
        .await
        .expect("ListSecrets")
        .into_inner()
        .secrets;
    assert!(secrets.is_empty(), "{secrets:?}");
    let tokens = b_admin
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("ListTokens")
        .into_inner()
        .tokens;
    assert!(tokens.iter().all(|t| t.id != a_token_id));
    let stats = b_admin
        .get_stats(pb::GetStatsRequest {})
        .await
        .expect("GetStats")
        .into_inner();
    let counted: u64 = stats.runs_by_state.iter().map(|c| c.count).sum();
    assert_eq!(counted, 1, "B counts only its own run: {stats:?}");
    assert_eq!(stats.dead_letters, 0);
    assert!(
        stats.queues.is_empty(),
        "queue depths are fleet-wide: operators only"
    );
    // B's secret of the same name is its own.
    let put = b_admin
        .put_secret(pb::PutSecretRequest {
            name: "A_SECRET".into(),
            value: "tenant-b-own-value".into(),
        })
        .await
        .expect("PutSecret")
        .into_inner();
    assert!(put.created, "B's secret is new, not A's replaced");

    // A's things are untouched.
    let still = a
        .get_run(pb::GetRunRequest {
            run_id: run_a.id.clone(),
        })
        .await
        .expect("GetRun")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(still.state, pb::RunState::Queued as i32);
    let pending = a
        .get_run(pb::GetRunRequest {
            run_id: pending_a.id.clone(),
        })
        .await
        .expect("GetRun")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(pending.state, pb::RunState::PendingApproval as i32);
    let a_secrets: HashMap<String, String> = a_admin
        .list_secrets(pb::ListSecretsRequest {})
        .await
        .expect("ListSecrets")
        .into_inner()
        .secrets
        .into_iter()
        .map(|s| (s.name, s.key_id))
        .collect();
    assert!(a_secrets.contains_key("A_SECRET"));
    let mut a_ci = stack.client_as(&a_token.token).await;
    a_ci.list_runs(pb::ListRunsRequest::default())
        .await
        .expect("A's token still works");
    stack.stop().await;
}

#[tokio::test]
async fn an_agent_token_speaks_only_for_its_own_agent_id() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let mut agent = stack.agent_client("agent-x").await;
    let as_other = agent
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "agent-y".into(),
            running: Vec::new(),
        })
        .await
        .expect_err("another agent's id");
    assert_eq!(as_other.code(), Code::PermissionDenied);
    let register = agent
        .register(pb::RegisterAgentRequest {
            agent_id: "agent-x".into(),
            hostname: "h".into(),
            pool: "default".into(),
            capacity: 1,
            executor: "mock".into(),
            version: "test".into(),
            ..Default::default()
        })
        .await;
    assert!(register.is_ok(), "{register:?}");
    // A run of some tenant that is not leased to agent-x: its reports are refused.
    let run = stack
        .client()
        .await
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec()),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run");
    let started = agent
        .report_started(pb::ReportStartedRequest {
            agent_id: "agent-x".into(),
            run_id: run.id.clone(),
            lease_epoch: 0,
            container_id: "c".into(),
            executor: "mock".into(),
        })
        .await
        .expect_err("not leased to agent-x");
    assert_eq!(started.code(), Code::FailedPrecondition, "{started:?}");
    let assignment = agent
        .get_assignment(pb::GetAssignmentRequest {
            agent_id: "agent-x".into(),
            run_id: run.id.clone(),
            lease_epoch: 0,
        })
        .await
        .expect_err("not leased to agent-x");
    assert_ne!(assignment.code(), Code::Ok);
    let unchanged: String = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1::uuid")
        .bind(&run.id)
        .fetch_one(&stack.db)
        .await
        .expect("state");
    assert_eq!(unchanged, "QUEUED");
    stack.stop().await;
}

/// `drover admin bootstrap` and `drover admin agent-token` (straight to Postgres), then
/// `drover tokens create / ls / revoke` with the bootstrapped token, through the binary.
#[tokio::test]
async fn the_cli_bootstraps_a_tenant_and_manages_its_tokens() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let admin_cli = |args: Vec<String>| {
        let url = stack.database_url.clone();
        async move {
            let out = tokio::process::Command::new(drover_tests::stack::bin_path("drover"))
                .args(&args)
                .env("DROVER_DATABASE__URL", url)
                .output()
                .await
                .expect("drover admin");
            assert!(
                out.status.success(),
                "{args:?}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).trim().to_owned()
        }
    };
    let token = admin_cli(vec![
        "admin".into(),
        "bootstrap".into(),
        "--tenant".into(),
        "cli-tenant".into(),
        "-q".into(),
    ])
    .await;
    assert!(token.starts_with("drv_"), "{token}");
    let agent_token = admin_cli(vec![
        "admin".into(),
        "agent-token".into(),
        "--agent-id".into(),
        "cli-agent".into(),
        "-q".into(),
    ])
    .await;
    let hb = stack
        .agent_client("unused")
        .await
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "cli-agent".into(),
            running: Vec::new(),
        })
        .await;
    assert_eq!(hb.map(|_| ()).unwrap_err().code(), Code::PermissionDenied);
    let mut with_cli_agent = pb::agent_service_client::AgentServiceClient::with_interceptor(
        stack.channel().await,
        Bearer::new(&agent_token).expect("token"),
    );
    let hb = with_cli_agent
        .heartbeat(pb::HeartbeatRequest {
            agent_id: "cli-agent".into(),
            running: Vec::new(),
        })
        .await;
    assert!(
        !matches!(
            hb.as_ref().map_err(|s| s.code()),
            Err(Code::Unauthenticated | Code::PermissionDenied)
        ),
        "{hb:?}"
    );

    let (code, out, err) = stack
        .cli(&[
            "--token",
            &token,
            "tokens",
            "create",
            "--name",
            "ci",
            "--role",
            "submitter",
            "-q",
        ])
        .await;
    assert_eq!(code, 0, "{err}");
    let ci = String::from_utf8_lossy(&out).trim().to_owned();
    let (code, out, err) = stack
        .cli(&["--token", &token, "tokens", "ls", "--json"])
        .await;
    assert_eq!(code, 0, "{err}");
    let listed: Vec<serde_json::Value> = String::from_utf8_lossy(&out)
        .lines()
        .map(|l| serde_json::from_str(l).expect("json line"))
        .collect();
    assert_eq!(listed.len(), 2, "bootstrap and ci: {listed:?}");
    assert!(
        !String::from_utf8_lossy(&out).contains("drv_"),
        "never the tokens"
    );
    let ci_id = listed
        .iter()
        .find(|t| t["name"] == "ci")
        .and_then(|t| t["id"].as_str())
        .expect("ci token listed")
        .to_owned();
    let (code, _, err) = stack.cli(&["--token", &ci, "list"]).await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = stack
        .cli(&["--token", &token, "tokens", "revoke", &ci_id])
        .await;
    assert_eq!(code, 0, "{err}");
    let (code, _, err) = stack.cli(&["--token", &ci, "list"]).await;
    assert_eq!(code, 1);
    assert!(err.contains("not authenticated"), "{err}");
    stack.stop().await;
}
