//! The API's token cache never outlives a revocation: with a ten-minute TTL, a revoked token
//! is refused at once on the instance that revoked it, within the NOTIFY's delivery time when
//! revoked by hand in SQL, and as soon as the invalidation listener is lost when the
//! notification never comes. Through the real API binary and Postgres.

use std::time::Duration;

use drover_core::repo::tokens::{self, Role};
use drover_proto::v1 as pb;
use drover_tests::{Stack, StackOptions};
use tonic::Code;

async fn list_code(stack: &Stack, token: &str) -> Code {
    let mut client = stack.client_as(token).await;
    match client.list_runs(pb::ListRunsRequest::default()).await {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

/// Revokes `token` behind the API's back, as an operator in `psql` would.
async fn revoke_in_sql(stack: &Stack, token: &str) {
    sqlx::query("UPDATE api_tokens SET revoked_at = now() WHERE token_hash = $1")
        .bind(tokens::hash(token))
        .execute(&stack.db)
        .await
        .expect("revoke in SQL");
}

async fn refused_within(stack: &Stack, token: &str, limit: Duration) -> bool {
    stack
        .wait_for(limit, || async {
            list_code(stack, token).await == Code::Unauthenticated
        })
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cached_token_is_refused_once_revoked() {
    let stack = Stack::start_with(StackOptions {
        dispatcher: false,
        agent: false,
        env: vec![("DROVER_TOKEN_CACHE_MS".into(), "600000".into())],
        ..Default::default()
    })
    .await;

    // Revoked through the API: refused on the very next call.
    let token = stack.token_with(&[Role::Submitter]).await;
    assert_eq!(list_code(&stack, &token).await, Code::Ok);
    assert_eq!(list_code(&stack, &token).await, Code::Ok, "cached");
    let mut admin = stack.admin().await;
    let id = admin
        .list_tokens(pb::ListTokensRequest {})
        .await
        .expect("ListTokens")
        .into_inner()
        .tokens
        .first()
        .expect("a token")
        .id
        .clone();
    admin
        .revoke_token(pb::RevokeTokenRequest { id })
        .await
        .expect("RevokeToken");
    assert_eq!(list_code(&stack, &token).await, Code::Unauthenticated);

    // Revoked by hand in SQL: the trigger's NOTIFY empties the cache.
    let token = stack.token_with(&[Role::Submitter]).await;
    assert_eq!(list_code(&stack, &token).await, Code::Ok);
    revoke_in_sql(&stack, &token).await;
    assert!(
        refused_within(&stack, &token, Duration::from_secs(10)).await,
        "a token revoked in SQL stayed usable"
    );

    // With the notification suppressed the cached principal is still served (so the cache
    // really is in the way) until the listener's connection is lost: then nothing cached
    // is trusted any more.
    let token = stack.token_with(&[Role::Submitter]).await;
    assert_eq!(list_code(&stack, &token).await, Code::Ok);
    sqlx::query("ALTER TABLE api_tokens DISABLE TRIGGER api_tokens_auth_changed")
        .execute(&stack.db)
        .await
        .expect("disable the trigger");
    revoke_in_sql(&stack, &token).await;
    assert_eq!(
        list_code(&stack, &token).await,
        Code::Ok,
        "served from the cache"
    );
    let terminated: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE datname = $1 AND pid <> pg_backend_pid() \
         AND query ILIKE '%listen%drover_auth%') t",
    )
    .bind(&stack.db_name)
    .fetch_one(&stack.db)
    .await
    .expect("terminate the listener");
    assert_eq!(terminated, 1, "the API's drover_auth listener");
    assert!(
        refused_within(&stack, &token, Duration::from_secs(10)).await,
        "a revoked token stayed usable after the listener was lost"
    );
    sqlx::query("ALTER TABLE api_tokens ENABLE TRIGGER api_tokens_auth_changed")
        .execute(&stack.db)
        .await
        .expect("enable the trigger");

    // The API listens again and serves new tokens.
    let token = stack.token_with(&[Role::Submitter]).await;
    assert_eq!(list_code(&stack, &token).await, Code::Ok);
    stack.stop().await;
}
