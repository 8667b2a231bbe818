//! The approval gate through the real binaries: PENDING_APPROVAL until an approver decides,
//! no self-approval unless the tenant allows it, exactly one of many concurrent decisions
//! wins, an approval deadline rejects, and the CLI's `drover approve` / `drover reject`.

use std::time::Duration;

use drover_core::repo::tokens::Role;
use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};
use tonic::Code;

fn gated(timeout_secs: u32) -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        requires_approval: true,
        approval_timeout_seconds: timeout_secs,
        ..Default::default()
    }
}

use drover_tests::fake_agent::submit_run as submit;

async fn state_of(stack: &Stack, id: &str) -> (String, Option<String>) {
    let row: (String, Option<String>) =
        sqlx::query_as("SELECT state, reason FROM runs WHERE id = $1::uuid")
            .bind(id)
            .fetch_one(&stack.db)
            .await
            .expect("run row");
    row
}

async fn wait_state(stack: &Stack, id: &str, want: &str) -> bool {
    stack
        .wait_for(Duration::from_secs(60), || async {
            state_of(stack, id).await.0 == want
        })
        .await
}

#[tokio::test]
async fn a_gated_run_waits_for_another_approver_then_runs() {
    let stack = Stack::start().await;
    // The stack's token has every role, so it is both the submitter and an approver.
    let mut own = stack.client().await;
    let run = submit(&mut own, gated(0)).await;
    assert_eq!(run.state, pb::RunState::PendingApproval as i32);
    let got = stack
        .client()
        .await
        .get_run(pb::GetRunRequest {
            run_id: run.id.clone(),
        })
        .await
        .expect("GetRun")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(
        got.wait.map(|w| w.code),
        Some(pb::WaitCode::PendingApproval as i32)
    );
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(state_of(&stack, &run.id).await.0, "PENDING_APPROVAL");

    let self_approval = own
        .approve_run(pb::ApproveRunRequest {
            run_id: run.id.clone(),
            comment: String::new(),
        })
        .await
        .expect_err("the submitting token may not approve its own run");
    assert_eq!(
        self_approval.code(),
        Code::PermissionDenied,
        "{self_approval:?}"
    );
    assert_eq!(state_of(&stack, &run.id).await.0, "PENDING_APPROVAL");

    let approver = stack.token_with(&[Role::Approver]).await;
    let approved = stack
        .client_as(&approver)
        .await
        .approve_run(pb::ApproveRunRequest {
            run_id: run.id.clone(),
            comment: "looks fine".into(),
        })
        .await
        .expect("another approver approves")
        .into_inner()
        .run
        .expect("run");
    assert_eq!(approved.state, pb::RunState::Queued as i32);
    assert!(wait_state(&stack, &run.id, "SUCCEEDED").await);
    let actor: Option<String> = sqlx::query_scalar(
        "SELECT actor FROM run_events WHERE run_id = $1::uuid AND to_state = 'QUEUED'",
    )
    .bind(&run.id)
    .fetch_one(&stack.db)
    .await
    .expect("approval event");
    assert!(
        actor.is_some_and(|a| a.starts_with("token:")),
        "the approval names the approving token"
    );

    // With self-approval allowed by the tenant, the submitter may approve its own run.
    stack
        .admin()
        .await
        .set_tenant_policy(pb::TenantPolicy {
            allow_self_approval: true,
            ..Default::default()
        })
        .await
        .expect("SetTenantPolicy");
    let second = submit(&mut own, gated(0)).await;
    own.approve_run(pb::ApproveRunRequest {
        run_id: second.id.clone(),
        comment: String::new(),
    })
    .await
    .expect("self-approval once the tenant allows it");
    assert!(wait_state(&stack, &second.id, "SUCCEEDED").await);
    stack.stop().await;
}

#[tokio::test]
async fn of_twenty_concurrent_decisions_exactly_one_wins() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let mut submitter = stack
        .client_as(&stack.token_with(&[Role::Submitter]).await)
        .await;
    let run = submit(&mut submitter, gated(0)).await;
    let approver = stack.token_with(&[Role::Approver]).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let mut c = stack.client_as(&approver).await;
        let id = run.id.clone();
        tasks.push(tokio::spawn(async move {
            if i % 2 == 0 {
                c.approve_run(pb::ApproveRunRequest {
                    run_id: id,
                    comment: format!("approver {i}"),
                })
                .await
                .map(|_| "approved")
            } else {
                c.reject_run(pb::RejectRunRequest {
                    run_id: id,
                    reason: format!("rejecter {i}"),
                })
                .await
                .map(|_| "rejected")
            }
        }));
    }
    let mut wins = Vec::new();
    let mut refused = 0;
    for t in tasks {
        match t.await.expect("task") {
            Ok(what) => wins.push(what),
            Err(s) => {
                assert_eq!(s.code(), Code::FailedPrecondition, "{s:?}");
                refused += 1;
            }
        }
    }
    assert_eq!(wins.len(), 1, "exactly one decision wins: {wins:?}");
    assert_eq!(refused, 19);
    let decisions: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM run_events WHERE run_id = $1::uuid \
         AND from_state = 'PENDING_APPROVAL'",
    )
    .bind(&run.id)
    .fetch_one(&stack.db)
    .await
    .expect("events");
    assert_eq!(decisions, 1);
    let (state, _) = state_of(&stack, &run.id).await;
    let want = if wins[0] == "approved" {
        "QUEUED"
    } else {
        "REJECTED"
    };
    assert_eq!(state, want);
    stack.stop().await;
}

#[tokio::test]
async fn an_undecided_run_is_rejected_at_its_approval_deadline() {
    let stack = Stack::start_with(
        StackOptions {
            agent: false,
            ..Default::default()
        }
        .short_leases(2_000),
    )
    .await;
    let mut c = stack.client().await;
    let run = submit(&mut c, gated(1)).await;
    assert!(wait_state(&stack, &run.id, "REJECTED").await);
    let (_, reason) = state_of(&stack, &run.id).await;
    assert!(
        reason
            .as_deref()
            .is_some_and(|r| r.contains("approval timed out")),
        "{reason:?}"
    );
    let too_late = stack
        .client_as(&stack.token_with(&[Role::Approver]).await)
        .await
        .approve_run(pb::ApproveRunRequest {
            run_id: run.id.clone(),
            comment: String::new(),
        })
        .await
        .expect_err("decided already");
    assert_eq!(too_late.code(), Code::FailedPrecondition);
    // A deadline without requires_approval is a mistake, said at submit.
    let bad = c
        .submit_run(pb::SubmitRunRequest {
            spec: Some(pb::RunSpec {
                requires_approval: false,
                ..gated(5)
            }),
            idempotency_key: String::new(),
        })
        .await
        .expect_err("refused");
    assert_eq!(bad.code(), Code::InvalidArgument);
    assert!(
        bad.message().contains("approval_timeout_seconds"),
        "{bad:?}"
    );
    stack.stop().await;
}

#[tokio::test]
async fn the_cli_approves_and_rejects() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let mut submitter = stack
        .client_as(&stack.token_with(&[Role::Submitter]).await)
        .await;
    let a = submit(&mut submitter, gated(0)).await;
    let b = submit(&mut submitter, gated(0)).await;
    let (code, out, err) = stack.cli(&["approve", &a.id, "--comment", "ok"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(String::from_utf8_lossy(&out).contains("approved"));
    let (code, out, err) = stack
        .cli(&["reject", &b.id, "--reason", "not on a friday"])
        .await;
    assert_eq!(code, 0, "{err}");
    assert!(String::from_utf8_lossy(&out).contains("rejected"));
    assert_eq!(state_of(&stack, &a.id).await.0, "QUEUED");
    let (state, reason) = state_of(&stack, &b.id).await;
    assert_eq!(state, "REJECTED");
    assert!(reason.is_some_and(|r| r.contains("not on a friday")));
    let (code, _, err) = stack.cli(&["approve", &b.id]).await;
    assert_ne!(code, 0);
    assert!(err.contains("not possible in its current state"), "{err}");
    stack.stop().await;
}
