//! A dispatcher killed with SIGKILL while runs stream in: unacked messages return to the
//! queue and are redelivered to the surviving (or restarted) dispatcher, which finds the runs
//! it had already assigned and drops the duplicates. No run is lost or assigned twice.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::time::Duration;

use drover_chaos::ledger;
use drover_proto::v1 as pb;
use drover_tests::fake_agent::submit;
use drover_tests::{Stack, StackOptions};

#[tokio::test]
async fn kill9_of_a_dispatcher_during_a_stream_loses_nothing_and_assigns_nothing_twice() {
    let mut stack = Stack::start_with(StackOptions {
        agent_capacity: 8,
        ..Default::default()
    })
    .await;
    stack.start_dispatcher_named("dispatcher-2");
    let spec = pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: vec!["true".into()],
        ..Default::default()
    };
    let mut runs = Vec::new();
    for i in 0..40 {
        runs.push(submit(&stack, spec.clone()).await);
        if i == 15 {
            stack.kill9("dispatcher").await;
        }
        if i == 30 {
            stack.start_dispatcher_named("dispatcher");
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    let ids: Vec<uuid::Uuid> = runs.iter().map(|r| r.parse().unwrap()).collect();
    let all_done = stack
        .wait_for(Duration::from_secs(180), || async {
            let open: i64 = sqlx::query_scalar(
                "SELECT count(*) FROM runs WHERE id = ANY($1) AND state <> 'SUCCEEDED'",
            )
            .bind(&ids)
            .fetch_one(&stack.db)
            .await
            .unwrap();
            open == 0
        })
        .await;
    if !all_done {
        stack.dump_logs();
        panic!("not every run succeeded after the dispatcher was killed");
    }
    let twice: i64 = sqlx::query_scalar(
        "SELECT count(*) FROM (SELECT run_id, attempt FROM run_events WHERE run_id = ANY($1) \
         AND to_state = 'ASSIGNED' GROUP BY run_id, attempt HAVING count(*) > 1) d",
    )
    .bind(&ids)
    .fetch_one(&stack.db)
    .await
    .unwrap();
    assert_eq!(twice, 0, "an attempt was assigned twice");
    let violations = ledger::check_events(&stack.db, Some(&ids)).await.unwrap();
    assert!(violations.is_empty(), "{violations:?}");
    stack.stop().await;
}
