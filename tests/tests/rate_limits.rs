//! Rate limits through the real API and Redis: per tenant, then per token, then per address
//! for calls that fail authentication; RESOURCE_EXHAUSTED with retry-after; fail-open when
//! Redis is unreachable. Buckets refill slowly here (0.5/s) so a burst is clearly over.

use drover_core::repo::tokens::Role;
use drover_proto::v1 as pb;
use drover_tests::stack::RunClient;
use drover_tests::{Stack, StackOptions};
use tonic::Code;

fn limits(pairs: &[(&str, &str)]) -> StackOptions {
    StackOptions {
        dispatcher: false,
        agent: false,
        env: pairs
            .iter()
            .map(|(k, v)| (format!("DROVER_RATE_LIMIT__{k}"), (*v).to_owned()))
            .collect(),
        ..Default::default()
    }
}

/// Makes `n` ListRuns calls; the codes, and the first refusal's status.
async fn burst(client: &mut RunClient, n: usize) -> (Vec<Code>, Option<tonic::Status>) {
    let mut codes = Vec::new();
    let mut first_refusal = None;
    for _ in 0..n {
        match client.list_runs(pb::ListRunsRequest::default()).await {
            Ok(_) => codes.push(Code::Ok),
            Err(s) => {
                codes.push(s.code());
                if s.code() == Code::ResourceExhausted && first_refusal.is_none() {
                    first_refusal = Some(s);
                }
            }
        }
    }
    (codes, first_refusal)
}

fn count(codes: &[Code], c: Code) -> usize {
    codes.iter().filter(|x| **x == c).count()
}

#[tokio::test]
async fn tenants_behind_one_address_are_limited_separately_and_new_tokens_share_their_tenants_bucket()
 {
    let stack = Stack::start_with(limits(&[
        ("TENANT_PER_SEC", "0.5"),
        ("TENANT_BURST", "5"),
        ("TOKEN_PER_SEC", "0"),
    ]))
    .await;
    let a1 = stack.client().await;
    let (codes, refusal) = burst(&mut a1.clone(), 10).await;
    assert!(
        count(&codes, Code::Ok) >= 5 && count(&codes, Code::Ok) <= 6,
        "the burst of 5 (plus at most one refilled): {codes:?}"
    );
    assert_eq!(
        count(&codes, Code::Ok) + count(&codes, Code::ResourceExhausted),
        10
    );
    let refusal = refusal.expect("refused over the limit");
    let retry: u64 = refusal
        .metadata()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse().ok())
        .expect("retry-after metadata in seconds");
    assert!((1..=3).contains(&retry), "one token at 0.5/s: {retry}");
    assert!(refusal.metadata().get("retry-after-ms").is_some());
    assert!(refusal.message().contains("retry after"), "{refusal:?}");

    // A fresh token of the same tenant: the tenant's bucket is still empty.
    let a2 = stack
        .client_as(&stack.token_with(&[Role::Submitter]).await)
        .await;
    let (codes, _) = burst(&mut a2.clone(), 1).await;
    assert_eq!(
        codes,
        [Code::ResourceExhausted],
        "rotating tokens does not escape"
    );

    // Another tenant from the same address has its own full bucket.
    let b = stack
        .client_as(&stack.tenant_token("other", &Role::USER).await)
        .await;
    let (codes, _) = burst(&mut b.clone(), 5).await;
    assert_eq!(codes, [Code::Ok; 5]);

    // Keys in Redis name tenants and token ids, never tokens.
    let keys: Vec<String> = {
        let client = redis::Client::open(drover_tests::services::redis_url()).expect("redis");
        let mut conn = client
            .get_multiplexed_async_connection()
            .await
            .expect("redis");
        redis::cmd("KEYS")
            .arg(format!("{}rl:*", stack.redis_prefix))
            .query_async(&mut conn)
            .await
            .expect("KEYS")
    };
    assert!(!keys.is_empty());
    assert!(keys.iter().all(|k| !k.contains(&stack.token)), "{keys:?}");
    stack.stop().await;
}

#[tokio::test]
async fn each_token_has_its_own_bucket_inside_the_tenants() {
    let stack = Stack::start_with(limits(&[("TOKEN_PER_SEC", "0.5"), ("TOKEN_BURST", "3")])).await;
    let (codes, _) = burst(&mut stack.client().await, 6).await;
    assert!(count(&codes, Code::ResourceExhausted) >= 2, "{codes:?}");
    let other = stack
        .client_as(&stack.token_with(&[Role::Submitter]).await)
        .await;
    let (codes, _) = burst(&mut other.clone(), 3).await;
    assert_eq!(
        codes,
        [Code::Ok; 3],
        "a second token of the tenant has its own"
    );
    stack.stop().await;
}

#[tokio::test]
async fn failed_authentications_are_limited_per_address() {
    let stack = Stack::start_with(limits(&[
        ("UNAUTHENTICATED_PER_SEC", "0.5"),
        ("UNAUTHENTICATED_BURST", "3"),
    ]))
    .await;
    let guess = stack.client_as("drv_guessing-a-token").await;
    let (codes, refusal) = burst(&mut guess.clone(), 6).await;
    assert_eq!(&codes[..3], [Code::Unauthenticated; 3], "{codes:?}");
    assert!(count(&codes, Code::ResourceExhausted) >= 2, "{codes:?}");
    assert!(refusal.is_some_and(|s| s.metadata().get("retry-after").is_some()));
    // A valid token from the same address is limited by its tenant, not by the guesses.
    let (codes, _) = burst(&mut stack.client().await, 3).await;
    assert_eq!(codes, [Code::Ok; 3]);
    stack.stop().await;
}

#[tokio::test]
async fn without_redis_the_limiter_fails_open_and_says_so() {
    let stack = Stack::start_with(StackOptions {
        redis_url: "redis://127.0.0.1:1/".into(),
        ..limits(&[("TENANT_PER_SEC", "0.5"), ("TENANT_BURST", "2")])
    })
    .await;
    let (codes, _) = burst(&mut stack.client().await, 6).await;
    assert_eq!(codes, [Code::Ok; 6], "unlimited while Redis is unreachable");
    let log = std::fs::read_to_string(stack.log_dir.join("api.log")).expect("api log");
    assert!(log.contains("failing open"), "the API logs the choice");
    stack.stop().await;
}
