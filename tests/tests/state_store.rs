//! The state machine as Postgres applies it: every transition is a conditional UPDATE whose
//! row count decides; a refused transition changes nothing and says why.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use drover_core::CoreError;
use drover_core::error::Refusal;
use drover_core::ids::DEFAULT_TENANT;
use drover_core::repo::{Transition, TransitionPatch, runs};
use drover_core::state::RunState;
use drover_tests::services;
use sqlx::PgPool;

async fn fresh_db(connections: u32) -> (String, PgPool) {
    services::migrated_database(connections).await
}

fn spec() -> drover_core::spec::RunSpec {
    services::noop_spec()
}

async fn apply(pool: &PgPool, t: Transition) -> Result<RunState, CoreError> {
    let mut tx = pool.begin().await?;
    let (run, _) = runs::transition(&mut tx, &t).await?;
    tx.commit().await?;
    Ok(run.state)
}

async fn event_count(pool: &PgPool, run: drover_core::ids::RunId) -> i64 {
    sqlx::query_scalar("SELECT count(*) FROM run_events WHERE run_id = $1")
        .bind(run.0)
        .fetch_one(pool)
        .await
        .unwrap()
}

async fn submit_one(pool: &PgPool) -> runs::RunRecord {
    runs::submit(
        pool,
        DEFAULT_TENANT,
        &spec(),
        None,
        &runs::Submitter::system("test"),
    )
    .await
    .unwrap()
    .run
}

fn assign(run: drover_core::ids::RunId, agent: &str) -> Transition {
    Transition {
        expected_attempt: Some(1),
        patch: TransitionPatch::Assign {
            agent_id: agent.into(),
            lease_ttl_ms: 10_000,
        },
        ..Transition::new(run, RunState::Assigned)
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn refused_transitions_change_nothing() {
    let (name, pool) = fresh_db(10).await;
    let run = submit_one(&pool).await;
    assert_eq!(event_count(&pool, run.id).await, 1);

    // Illegal pair: QUEUED -> SUCCEEDED.
    let err = apply(&pool, Transition::new(run.id, RunState::Succeeded))
        .await
        .unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::Refused(Refusal::Illegal {
                from: RunState::Queued,
                to: RunState::Succeeded
            })
        ),
        "{err:?}"
    );

    assert_eq!(
        apply(&pool, assign(run.id, "a1")).await.unwrap(),
        RunState::Assigned
    );
    // Stale epoch: the lease is epoch 1.
    let stale = Transition {
        expected_epoch: Some(0),
        ..Transition::new(run.id, RunState::Running)
    };
    let err = apply(&pool, stale).await.unwrap_err();
    assert!(
        matches!(
            err,
            CoreError::Refused(Refusal::StaleEpoch {
                given: 0,
                current: 1
            })
        ),
        "{err:?}"
    );
    // Wrong agent.
    let wrong = Transition {
        expected_epoch: Some(1),
        expected_agent: Some("a2".into()),
        ..Transition::new(run.id, RunState::Running)
    };
    let err = apply(&pool, wrong).await.unwrap_err();
    assert!(
        matches!(err, CoreError::Refused(Refusal::WrongAgent)),
        "{err:?}"
    );
    // Unknown run.
    let err = apply(
        &pool,
        Transition::new(drover_core::ids::RunId::new(), RunState::Running),
    )
    .await
    .unwrap_err();
    assert!(
        matches!(err, CoreError::Refused(Refusal::NotFound)),
        "{err:?}"
    );

    let now = runs::get(&pool, DEFAULT_TENANT, run.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.state, RunState::Assigned);
    assert_eq!(now.lease_epoch, 1);
    assert_eq!(
        event_count(&pool, run.id).await,
        2,
        "only the applied transition left an event"
    );

    // The right epoch and agent go through, and the events chain from -> to.
    let start = Transition {
        expected_epoch: Some(1),
        expected_agent: Some("a1".into()),
        patch: TransitionPatch::Start {
            executor: "docker".into(),
        },
        ..Transition::new(run.id, RunState::Running)
    };
    assert_eq!(apply(&pool, start).await.unwrap(), RunState::Running);
    let events = runs::events_after_with_end(&pool, DEFAULT_TENANT, run.id, 0)
        .await
        .unwrap()
        .0;
    let chain: Vec<_> = events.iter().map(|e| (e.from_state, e.to_state)).collect();
    assert_eq!(
        chain,
        vec![
            (None, RunState::Queued),
            (Some(RunState::Queued), RunState::Assigned),
            (Some(RunState::Assigned), RunState::Running),
        ]
    );
    pool.close().await;
    services::drop_database(&name).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn concurrent_assignments_have_exactly_one_winner() {
    let (name, pool) = fresh_db(10).await;
    let run = submit_one(&pool).await;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let pool = pool.clone();
        tasks.push(tokio::spawn(async move {
            apply(&pool, assign(run.id, &format!("a{i}"))).await
        }));
    }
    let mut won = 0;
    for t in tasks {
        match t.await.unwrap() {
            Ok(_) => won += 1,
            Err(CoreError::Refused(Refusal::Illegal {
                from: RunState::Assigned,
                ..
            })) => {}
            Err(e) => panic!("unexpected {e:?}"),
        }
    }
    assert_eq!(won, 1);
    let now = runs::get(&pool, DEFAULT_TENANT, run.id)
        .await
        .unwrap()
        .unwrap();
    assert_eq!(now.lease_epoch, 1, "epoch bumped once");
    assert_eq!(event_count(&pool, run.id).await, 2);
    pool.close().await;
    services::drop_database(&name).await;
}

/// Transitions racing on one run each take the next event number from the row they lock: the
/// run's events are numbered 1..=n with no gap and no repeat, and the run's counter ends at n.
#[tokio::test(flavor = "multi_thread")]
async fn racing_transitions_number_their_events_without_gaps() {
    let (name, pool) = fresh_db(10).await;
    let run = submit_one(&pool).await;
    // Ten assigners and ten requeuers, each retrying until its one transition applies: twenty
    // transitions, alternating QUEUED -> ASSIGNED -> QUEUED, contending for the row.
    let mut tasks = Vec::new();
    for i in 0..10 {
        for to_assigned in [true, false] {
            let pool = pool.clone();
            tasks.push(tokio::spawn(async move {
                loop {
                    let t = if to_assigned {
                        assign(run.id, &format!("a{i}"))
                    } else {
                        Transition {
                            patch: TransitionPatch::Requeue {
                                next_attempt: false,
                                delay_ms: 0,
                                exit_code: None,
                                output: None,
                            },
                            ..Transition::new(run.id, RunState::Queued)
                        }
                    };
                    match apply(&pool, t).await {
                        Ok(_) => return,
                        Err(CoreError::Refused(_)) => tokio::task::yield_now().await,
                        Err(e) => panic!("unexpected {e:?}"),
                    }
                }
            }));
        }
    }
    for t in tasks {
        t.await.unwrap();
    }
    let seqs: Vec<i32> =
        sqlx::query_scalar("SELECT seq FROM run_events WHERE run_id = $1 ORDER BY seq")
            .bind(run.id.0)
            .fetch_all(&pool)
            .await
            .unwrap();
    assert_eq!(seqs, (1..=21).collect::<Vec<i32>>());
    let last: i32 = sqlx::query_scalar("SELECT last_seq FROM runs WHERE id = $1")
        .bind(run.id.0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(last, 21);
    pool.close().await;
    services::drop_database(&name).await;
}

/// agent-1's report of a silent success of `run`, started and ended inside its fold window.
fn folded_report(
    run: drover_core::ids::RunId,
    epoch: i64,
) -> drover_core::repo::folded_end::FoldedSuccess<'static> {
    drover_core::repo::folded_end::FoldedSuccess {
        run_id: run,
        agent: "agent-1",
        epoch,
        executor: "mock",
        start_reason: "started on agent-1 (mock); reported with its end",
        exit_code: Some(0),
        output: b"",
        output_truncated: false,
        reason: "exited with code 0",
    }
}

/// A success reported with its start (the agent's fold window) is one row update with both
/// events, numbered and ordered as the two transitions would have numbered them; under a
/// stale lease it writes nothing.
#[tokio::test]
async fn a_folded_success_writes_the_start_and_the_end_at_once() {
    use drover_core::repo::folded_end::{FoldedSuccess, start_and_succeed};
    let (name, pool) = fresh_db(4).await;
    let run = submit_one(&pool).await;
    let assigned = {
        let mut tx = pool.begin().await.unwrap();
        let (r, _) = runs::transition(&mut tx, &assign(run.id, "agent-1"))
            .await
            .unwrap();
        tx.commit().await.unwrap();
        r
    };
    let report = |epoch: i64| FoldedSuccess {
        output: b"hello\n",
        ..folded_report(run.id, epoch)
    };

    // A stale epoch: refused, nothing written.
    let mut tx = pool.begin().await.unwrap();
    let stale = start_and_succeed(&mut tx, &report(assigned.lease_epoch + 1))
        .await
        .unwrap();
    assert!(stale.is_none());
    tx.commit().await.unwrap();
    assert_eq!(event_count(&pool, run.id).await, 2);

    let mut tx = pool.begin().await.unwrap();
    let (done, started, ended) = start_and_succeed(&mut tx, &report(assigned.lease_epoch))
        .await
        .unwrap()
        .unwrap();
    tx.commit().await.unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    assert_eq!(done.exit_code, Some(0));
    assert_eq!(done.output, b"hello\n");
    assert_eq!(done.executor.as_deref(), Some("mock"));
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    assert_eq!(done.lease_expires_at, None);
    assert_eq!(done.lease_epoch, assigned.lease_epoch, "same lease");
    assert_eq!(
        (started.seq, started.from_state, started.to_state),
        (3, Some(RunState::Assigned), RunState::Running)
    );
    assert_eq!(
        (ended.seq, ended.from_state, ended.to_state),
        (4, Some(RunState::Running), RunState::Succeeded)
    );
    // As stored: in order (for the audit chain too), with their reasons and actor.
    let rows: Vec<(i32, String, String, String, String)> = sqlx::query_as(
        "SELECT seq, from_state, to_state, reason, actor FROM run_events \
         WHERE run_id = $1 AND seq > 2 ORDER BY audit_order",
    )
    .bind(run.id.0)
    .fetch_all(&pool)
    .await
    .unwrap();
    assert_eq!(
        rows,
        vec![
            (
                3,
                "ASSIGNED".into(),
                "RUNNING".into(),
                "started on agent-1 (mock); reported with its end".into(),
                "agent:agent-1".into()
            ),
            (
                4,
                "RUNNING".into(),
                "SUCCEEDED".into(),
                "exited with code 0".into(),
                "agent:agent-1".into()
            ),
        ]
    );
    let last_seq: i32 = sqlx::query_scalar("SELECT last_seq FROM runs WHERE id = $1")
        .bind(run.id.0)
        .fetch_one(&pool)
        .await
        .unwrap();
    assert_eq!(last_seq, 4, "the run's counter agrees");

    // Already ended: a repeat writes nothing.
    let mut tx = pool.begin().await.unwrap();
    assert!(
        start_and_succeed(&mut tx, &report(assigned.lease_epoch))
            .await
            .unwrap()
            .is_none()
    );
    tx.commit().await.unwrap();
    assert_eq!(event_count(&pool, run.id).await, 4);
    pool.close().await;
    services::drop_database(&name).await;
}

/// A folded success whose files Postgres keeps is one statement: the run and its two events,
/// the upload (committed), its bytes and its manifest. Under a stale lease, after the end,
/// or when the run already has a manifest (a redriven run's second end, which the checked
/// path replaces), it writes nothing at all.
#[tokio::test]
async fn a_folded_success_with_kept_files_writes_run_upload_and_manifest_at_once() {
    use drover_core::repo::artifacts::{self, Content, KeptBytes, StagedEntry};
    use drover_core::repo::folded_end::{FoldedArtifacts, start_and_succeed_with_artifacts};
    let (name, pool) = fresh_db(4).await;
    let assigned = |agent: &'static str| {
        let pool = pool.clone();
        async move {
            let run = submit_one(&pool).await;
            let mut tx = pool.begin().await.unwrap();
            let (r, _) = runs::transition(&mut tx, &assign(run.id, agent))
                .await
                .unwrap();
            tx.commit().await.unwrap();
            r
        }
    };
    let run = assigned("agent-1").await;
    let report = |run: &runs::RunRecord, epoch: i64| folded_report(run.id, epoch);
    let entries = vec![
        StagedEntry {
            path: ".drover/result.json".into(),
            blob: Some(0),
            size: 2,
            sha256: "44136fa355b3678a1146ad16f7e8649e94fb4fc21fe77e8310c060f61caaff8a".into(),
            mode: 0o644,
            is_symlink: false,
            link_target: None,
        },
        StagedEntry {
            path: "latest".into(),
            blob: None,
            size: 0,
            sha256: String::new(),
            mode: 0o777,
            is_symlink: true,
            link_target: Some(".drover/result.json".into()),
        },
    ];
    let kept = KeptBytes {
        indexes: vec![0],
        contents: vec![b"{}".to_vec()],
    };
    let files = || FoldedArtifacts {
        upload_id: uuid::Uuid::now_v7(),
        entries: &entries,
        bytes: 2,
        kept: &kept,
    };
    let uploads = |run: drover_core::ids::RunId| {
        let pool = pool.clone();
        async move {
            sqlx::query_scalar::<_, i64>("SELECT count(*) FROM artifact_uploads WHERE run_id = $1")
                .bind(run.0)
                .fetch_one(&pool)
                .await
                .unwrap()
        }
    };
    let mut conn = pool.acquire().await.unwrap();

    // A stale epoch: nothing written, neither the end nor any of the files.
    let stale =
        start_and_succeed_with_artifacts(&mut conn, &report(&run, run.lease_epoch + 1), &files())
            .await
            .unwrap();
    assert!(stale.is_none());
    assert_eq!(event_count(&pool, run.id).await, 2);
    assert_eq!(uploads(run.id).await, 0);

    let (done, started, ended) =
        start_and_succeed_with_artifacts(&mut conn, &report(&run, run.lease_epoch), &files())
            .await
            .unwrap()
            .unwrap();
    assert_eq!(done.state, RunState::Succeeded);
    assert_eq!((started.seq, ended.seq), (3, 4));
    assert_eq!(event_count(&pool, run.id).await, 4);
    let (committed, completed, count, bytes): (bool, bool, i32, i64) = sqlx::query_as(
        "SELECT committed_at IS NOT NULL, completed_at IS NOT NULL, files, bytes \
         FROM artifact_uploads WHERE run_id = $1",
    )
    .bind(run.id.0)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!((committed, completed, count, bytes), (true, true, 2, 2));
    let listed = artifacts::list(&pool, DEFAULT_TENANT, run.id, Content::With)
        .await
        .unwrap();
    let got: Vec<(String, Option<Vec<u8>>, i32)> = listed
        .into_iter()
        .map(|r| (r.entry.path, r.content, r.attempt))
        .collect();
    assert_eq!(
        got,
        vec![
            (".drover/result.json".into(), Some(b"{}".to_vec()), 1),
            ("latest".into(), None, 1),
        ]
    );

    // A repeat after the end: nothing more.
    let again =
        start_and_succeed_with_artifacts(&mut conn, &report(&run, run.lease_epoch), &files())
            .await
            .unwrap();
    assert!(again.is_none());
    assert_eq!(uploads(run.id).await, 1);

    // A run that already has a committed manifest: left to the checked path, untouched.
    let other = assigned("agent-1").await;
    sqlx::query(
        "INSERT INTO artifact_uploads (id, tenant_id, run_id, attempt, lease_epoch, agent_id, \
         manifest, completed_at, committed_at) \
         VALUES ($1, $2, $3, 1, 0, 'agent-0', '[]', now(), now())",
    )
    .bind(uuid::Uuid::now_v7())
    .bind(DEFAULT_TENANT.0)
    .bind(other.id.0)
    .execute(&pool)
    .await
    .unwrap();
    let redriven =
        start_and_succeed_with_artifacts(&mut conn, &report(&other, other.lease_epoch), &files())
            .await
            .unwrap();
    assert!(redriven.is_none());
    assert_eq!(event_count(&pool, other.id).await, 2, "still ASSIGNED");
    assert_eq!(uploads(other.id).await, 1);
    drop(conn);
    pool.close().await;
    services::drop_database(&name).await;
}

/// The dispatcher's assignment and its command to the agent are one statement: the outbox
/// row is written, leased to the writer's relay, exactly when the transition applies.
#[tokio::test]
async fn an_assignment_writes_its_command_only_when_it_applies() {
    let (_db, pool) = fresh_db(2).await;
    let run = submit_one(&pool).await;
    let message = drover_core::repo::outbox::Message {
        exchange: "drover.agents",
        routing_key: "agent-cmd",
        payload: b"the command",
        traceparent: None,
    };
    let commands = || async {
        sqlx::query_scalar::<_, i64>("SELECT count(*) FROM outbox WHERE routing_key = 'agent-cmd'")
            .fetch_one(&pool)
            .await
            .unwrap()
    };
    let mut conn = pool.acquire().await.unwrap();

    let mut stale = assign(run.id, "agent-cmd");
    stale.expected_attempt = Some(2);
    let refused = runs::transition_and_enqueue(&mut conn, &stale, &message, 60_000).await;
    assert!(matches!(refused, Err(CoreError::Refused(_))), "{refused:?}");
    assert_eq!(
        commands().await,
        0,
        "a refused assignment writes no command"
    );

    let (done, event, id) =
        runs::transition_and_enqueue(&mut conn, &assign(run.id, "agent-cmd"), &message, 60_000)
            .await
            .unwrap();
    assert_eq!(done.state, RunState::Assigned);
    assert_eq!(event.seq, 2);
    let (payload, leased): (Vec<u8>, bool) = sqlx::query_as(
        "SELECT payload, available_at > now() + interval '50 seconds' FROM outbox WHERE id = $1",
    )
    .bind(id)
    .fetch_one(&pool)
    .await
    .unwrap();
    assert_eq!(payload, b"the command");
    assert!(leased, "leased to the writer's relay for the lease given");

    let again =
        runs::transition_and_enqueue(&mut conn, &assign(run.id, "agent-cmd"), &message, 60_000)
            .await;
    assert!(matches!(again, Err(CoreError::Refused(_))), "{again:?}");
    assert_eq!(commands().await, 1, "still the one command");
}
