//! The audit chain: every transition, approval, cancel, token and secret change of a tenant is
//! a link; editing, deleting or reordering a row by hand in Postgres is found by
//! `VerifyAudit`, `drover audit verify` and `drover admin audit-verify`, which name the first
//! broken link.

use std::time::Duration;

use drover_core::repo::tokens::Role;
use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};

fn spec() -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    }
}

/// A tenant with some history: runs (one cancelled, one approved), a secret, a token.
async fn tenant_with_history(stack: &Stack, name: &str) -> (String, uuid::Uuid) {
    let token = stack.tenant_token(name, &Role::USER).await;
    let mut c = stack.client_as(&token).await;
    let mut ids = Vec::new();
    for _ in 0..3 {
        let r = c
            .submit_run(pb::SubmitRunRequest {
                spec: Some(spec()),
                idempotency_key: String::new(),
            })
            .await
            .expect("submit")
            .into_inner()
            .run
            .expect("run");
        ids.push(r.id);
    }
    c.cancel_run(pb::CancelRunRequest {
        run_id: ids[0].clone(),
        reason: "audit test".into(),
    })
    .await
    .expect("cancel");
    let mut admin = stack.admin_as(&token).await;
    admin
        .put_secret(pb::PutSecretRequest {
            name: "AUDITED".into(),
            value: "an-audited-secret-value".into(),
        })
        .await
        .expect("PutSecret");
    admin
        .create_token(pb::CreateTokenRequest {
            name: "audited".into(),
            roles: vec!["approver".into()],
            agent_id: String::new(),
        })
        .await
        .expect("CreateToken");
    let tenant: uuid::Uuid = sqlx::query_scalar("SELECT id FROM tenants WHERE name = $1")
        .bind(name)
        .fetch_one(&stack.db)
        .await
        .expect("tenant id");
    (token, tenant)
}

async fn verify(stack: &Stack, token: &str) -> pb::VerifyAuditResponse {
    stack
        .admin_as(token)
        .await
        .verify_audit(pb::VerifyAuditRequest {})
        .await
        .expect("VerifyAudit")
        .into_inner()
}

async fn exec(stack: &Stack, sql: &str, tenant: uuid::Uuid) {
    sqlx::query(sql)
        .bind(tenant)
        .execute(&stack.db)
        .await
        .unwrap_or_else(|e| panic!("{sql}: {e}"));
}

#[tokio::test]
async fn editing_deleting_or_reordering_a_row_is_found_and_named() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        ..Default::default()
    })
    .await;
    let (edit_token, edit) = tenant_with_history(&stack, "audit-edit").await;
    let (delete_token, delete) = tenant_with_history(&stack, "audit-delete").await;
    let (reorder_token, reorder) = tenant_with_history(&stack, "audit-reorder").await;
    let (secret_token, secret) = tenant_with_history(&stack, "audit-secret").await;
    let (tail_token, tail) = tenant_with_history(&stack, "audit-tail").await;

    for token in [
        &edit_token,
        &delete_token,
        &reorder_token,
        &secret_token,
        &tail_token,
    ] {
        // Sealing waits for every older transaction in the cluster (other tests' included)
        // to end, so the last rows may take a moment to join the chain.
        stack
            .wait_for(std::time::Duration::from_secs(30), || async {
                verify(&stack, token).await.checked >= 7
            })
            .await;
        let v = verify(&stack, token).await;
        assert!(v.ok, "untouched chain verifies: {v:?}");
        // bootstrap token + 3 submits + 1 cancel + secret + token
        assert_eq!(v.checked, 7, "{v:?}");
        assert_eq!(v.head_seq, 7);
        assert_eq!(v.head_hash.len(), 64);
    }

    // Edit: a run event's reason is changed in place.
    exec(
        &stack,
        "UPDATE run_events SET reason = 'nothing to see' WHERE tenant_id = $1 AND chain_seq = 3",
        edit,
    )
    .await;
    let v = verify(&stack, &edit_token).await;
    assert!(!v.ok);
    assert_eq!(v.broken_seq, 3, "{v:?}");
    assert!(v.broken_location.starts_with("run_events"), "{v:?}");
    assert!(v.broken_problem.contains("edited"), "{v:?}");
    assert_eq!(v.checked, 2);

    // Delete: a link in the middle disappears.
    exec(
        &stack,
        "DELETE FROM run_events WHERE tenant_id = $1 AND chain_seq = 4",
        delete,
    )
    .await;
    let v = verify(&stack, &delete_token).await;
    assert!(!v.ok);
    assert_eq!(v.broken_seq, 5, "the link after the gap: {v:?}");
    assert!(v.broken_problem.contains("missing"), "{v:?}");

    // Reorder: two links swap places (their chain positions).
    exec(
        &stack,
        "UPDATE run_events SET chain_seq = -chain_seq WHERE tenant_id = $1 AND chain_seq IN (2, 3)",
        reorder,
    )
    .await;
    exec(
        &stack,
        "UPDATE run_events SET chain_seq = CASE chain_seq WHEN -2 THEN 3 ELSE 2 END \
         WHERE tenant_id = $1 AND chain_seq IN (-2, -3)",
        reorder,
    )
    .await;
    let v = verify(&stack, &reorder_token).await;
    assert!(!v.ok);
    assert_eq!(v.broken_seq, 2, "{v:?}");

    // An audit event (not a run event): the secret change's detail is rewritten.
    exec(
        &stack,
        "UPDATE audit_events SET actor = 'someone-else' WHERE tenant_id = $1 AND kind = 'secret.put'",
        secret,
    )
    .await;
    let v = verify(&stack, &secret_token).await;
    assert!(!v.ok);
    assert_eq!(v.broken_seq, 6, "{v:?}");
    assert!(v.broken_location.contains("secret.put"), "{v:?}");

    // The newest link is deleted: the chain is intact but shorter than its head.
    exec(
        &stack,
        "DELETE FROM audit_events WHERE tenant_id = $1 AND chain_seq = 7",
        tail,
    )
    .await;
    let v = verify(&stack, &tail_token).await;
    assert!(!v.ok);
    assert!(v.broken_location.contains("audit_heads"), "{v:?}");

    // The CLI says the same, with a failing exit code; other tenants are unaffected.
    let (code, out, err) = stack
        .cli(&["--token", &edit_token, "audit", "verify"])
        .await;
    assert_eq!(code, 1, "{err}");
    let out = String::from_utf8_lossy(&out);
    assert!(out.contains("BROKEN at link 3"), "{out}");
    let (code, out, err) = stack.cli(&["audit", "verify"]).await;
    assert_eq!(code, 0, "{err}");
    assert!(String::from_utf8_lossy(&out).contains(": ok,"));
    stack.stop().await;
}

#[tokio::test]
async fn a_runs_whole_life_is_chained_and_the_admin_cli_verifies_every_tenant() {
    let stack = Stack::start().await;
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
    let done = stack
        .wait_for(Duration::from_secs(60), || async {
            let s: String = sqlx::query_scalar("SELECT state FROM runs WHERE id = $1::uuid")
                .bind(&run.id)
                .fetch_one(&stack.db)
                .await
                .expect("state");
            s == "SUCCEEDED"
        })
        .await;
    assert!(done);
    let actors: Vec<(String, Option<String>, Option<i64>)> = sqlx::query_as(
        "SELECT to_state, actor, chain_seq FROM run_events WHERE run_id = $1::uuid ORDER BY seq",
    )
    .bind(&run.id)
    .fetch_all(&stack.db)
    .await
    .expect("events");
    let states: Vec<&str> = actors.iter().map(|(s, _, _)| s.as_str()).collect();
    assert_eq!(states, ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]);
    let who: Vec<String> = actors
        .iter()
        .map(|(_, a, _)| a.clone().unwrap_or_default())
        .collect();
    assert!(who[0].starts_with("token:"), "{who:?}");
    assert_eq!(who[1], "dispatcher");
    assert!(
        who[2].starts_with("agent:") && who[3].starts_with("agent:"),
        "{who:?}"
    );
    // Events are written unchained and linked by the API's and dispatcher's sealers shortly
    // after they commit.
    let sealed = stack
        .wait_for(Duration::from_secs(10), || async {
            let unsealed: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM run_events WHERE run_id = $1::uuid AND chain_seq IS NULL",
            )
            .bind(&run.id)
            .fetch_one(&stack.db)
            .await
            .expect("unsealed");
            unsealed == 0
        })
        .await;
    assert!(sealed, "every event is chained by the background sealer");

    // `drover admin audit-verify` reads Postgres directly (operators, before any token).
    let out = tokio::process::Command::new(drover_tests::stack::bin_path("drover"))
        .args(["admin", "audit-verify"])
        .env("DROVER_DATABASE__URL", &stack.database_url)
        .output()
        .await
        .expect("drover admin audit-verify");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{text}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(text.contains("audit chain of default: ok"), "{text}");
    stack.stop().await;
}
