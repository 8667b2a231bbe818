//! The whole agent loop against the real control plane: the real `drover-api` (built in-process
//! on port 0 with `drover_api::Application`, its outbox relay included), a fresh Postgres
//! database, a private RabbitMQ vhost, a private Redis prefix and the local Docker daemon.
//!
//! Runs are submitted with the real repository and assigned the way the dispatcher does it: one
//! transaction moves the run to ASSIGNED under a new lease epoch and writes the agent's
//! `Execute` command to the outbox, which the API's relay publishes to `drover.agents`. What
//! the tests assert is what the system records: the `runs`, `run_events` and `run_logs` rows,
//! the RabbitMQ queues, and the containers Docker holds.
//!
//! Each test has its own agent id, database, vhost and Redis prefix, so tests run in parallel.
//! A missing Postgres, RabbitMQ or Docker (or the `drover/busybox:latest` image) fails the test
//! loudly; nothing is skipped.

#![allow(
    clippy::unwrap_used,
    reason = "test harness: a failed unwrap is a failed test"
)]

use std::collections::BTreeMap;
use std::process::Command;
use std::time::Duration;

use drover_agent::{Agent, AgentError, Settings};
use drover_api::Application;
use drover_core::config::{
    AmqpSettings, DatabaseSettings, LeaseSettings, RedisSettings, RelaySettings,
};
use drover_core::ids::{DEFAULT_TENANT, LeaseEpoch, RunId};
use drover_core::messages::{self, AgentCommand};
use drover_core::repo::{RunRecord, Transition, TransitionPatch, outbox, runs};
use drover_core::spec::{RawSpec, RunSpec};
use drover_core::state::RunState;
use drover_core::topology::{AGENTS_EXCHANGE, DEAD_QUEUE, agent_queue};
use drover_tests::services;
use lapin::options::{BasicGetOptions, BasicPublishOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use sqlx::{PgConnection, PgPool};
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

const IMAGE: &str = "drover/busybox:latest";
const HEARTBEAT_MS: u64 = 200;
const LEASE_TTL_MS: u64 = 2_000;
const POLL: Duration = Duration::from_millis(50);
const WAIT: Duration = Duration::from_secs(30);
/// The agent's drain timeout; a stop may take that plus its 15 s grace for stopping leftovers.
const DRAIN_SECS: u64 = 10;
const STOP_WAIT: Duration = Duration::from_secs(DRAIN_SECS + 15 + 20);

/// Removes what a test created on the shared services, also when it panicked: containers the
/// agent left behind, the vhost and the database.
struct Cleanup {
    agent_id: String,
    vhost: String,
    db_name: String,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        let leftovers = Command::new("docker")
            .args([
                "ps",
                "-a",
                "-q",
                "--filter",
                &format!("label=drover.agent={}", self.agent_id),
            ])
            .output();
        if let Ok(out) = leftovers {
            for id in String::from_utf8_lossy(&out.stdout).split_whitespace() {
                let _ = Command::new("docker").args(["rm", "-f", id]).output();
            }
        }
        services::delete_vhost(&self.vhost);
        // `drop_database` is async and we may be inside the test's runtime: use a thread of
        // our own with its own runtime.
        let db_name = self.db_name.clone();
        let _ = std::thread::spawn(move || {
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            {
                rt.block_on(services::drop_database(&db_name));
            }
        })
        .join();
    }
}

/// The real API, an agent under test, and handles on Postgres and RabbitMQ.
struct TestEnv {
    agent_id: String,
    pool: PgPool,
    amqp: Connection,
    api_stop: CancellationToken,
    api: JoinHandle<Result<(), drover_api::StartError>>,
    agent_stop: CancellationToken,
    agent: Option<JoinHandle<Result<(), AgentError>>>,
    _cleanup: Cleanup,
}

impl TestEnv {
    async fn start() -> TestEnv {
        // The agent's and the API's logs, shown by the test runner when a test fails
        // (`RUST_LOG` overrides the level).
        let _ = tracing_subscriber::fmt()
            .with_env_filter(
                tracing_subscriber::EnvFilter::try_from_default_env()
                    .unwrap_or_else(|_| "info,lapin=warn,sqlx=warn".into()),
            )
            .with_test_writer()
            .try_init();
        services::require_docker_image(IMAGE);
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let (db_name, db_url) = services::create_database(&format!("agent_{tag}")).await;
        let vhost = format!("drover-agent-t-{tag}");
        let cleanup = Cleanup {
            agent_id: format!("test-agent-{tag}"),
            vhost: vhost.clone(),
            db_name: db_name.clone(),
        };
        let amqp_url = services::create_vhost(&vhost);
        let agent_id = cleanup.agent_id.clone();

        let api_settings = drover_api::Settings {
            listen_addr: "127.0.0.1:0".into(),
            database: DatabaseSettings {
                url: db_url.clone().into(),
                max_connections: 5,
                ..DatabaseSettings::default()
            },
            amqp: AmqpSettings {
                url: amqp_url.clone().into(),
                ..AmqpSettings::default()
            },
            redis: RedisSettings {
                url: services::redis_url().into(),
                prefix: format!("t{tag}:"),
            },
            lease: LeaseSettings {
                heartbeat_interval_ms: HEARTBEAT_MS,
                lease_ttl_ms: LEASE_TTL_MS,
            },
            relay: RelaySettings {
                poll_interval_ms: 200,
                ..RelaySettings::default()
            },
            ..drover_api::Settings::default()
        };
        let app = Application::build(api_settings)
            .await
            .unwrap_or_else(|e| panic!("drover-api does not start on database {db_name}: {e}"));
        let api_addr = app.local_addr();
        let api_stop = CancellationToken::new();
        let api = tokio::spawn(app.run_until_stopped(api_stop.clone()));

        let pool = PgPoolOptions::new()
            .max_connections(4)
            .connect(&db_url)
            .await
            .unwrap_or_else(|e| panic!("postgres not reachable at {db_url}: {e}"));

        let settings = Settings {
            agent_id: agent_id.clone(),
            api_endpoint: format!("http://{api_addr}"),
            capacity: 2,
            drain_timeout_secs: DRAIN_SECS,
            labels: [("gpu".to_owned(), "true".to_owned())].into(),
            amqp: AmqpSettings {
                url: amqp_url.clone().into(),
                ..AmqpSettings::default()
            },
            ..Settings::default()
        };
        let agent = Agent::build(settings)
            .await
            .expect("agent builds (is the docker daemon answering?)");
        assert_eq!(agent.executor_name(), "docker");
        let agent_stop = CancellationToken::new();
        let agent = tokio::spawn(agent.run_until_stopped(agent_stop.clone()));

        let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("rabbitmq not reachable at {amqp_url}: {e}"));

        let env = TestEnv {
            agent_id,
            pool,
            amqp,
            api_stop,
            api,
            agent_stop,
            agent: Some(agent),
            _cleanup: cleanup,
        };
        env.assert_registered().await;
        env
    }

    /// Waits for the agent's row (it declares its queue before registering, so commands routed
    /// to it from then on are queued) and checks what it registered.
    async fn assert_registered(&self) {
        type AgentRow = (String, Json<BTreeMap<String, String>>, i32, String, String);
        let row: AgentRow = eventually("the agent's registration", async || {
            sqlx::query_as(
                "SELECT pool, labels, capacity, executor, version FROM agents WHERE id = $1",
            )
            .bind(&self.agent_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
        })
        .await;
        let (pool, Json(labels), capacity, executor, version) = row;
        assert_eq!(pool, "default");
        assert_eq!(labels, [("gpu".to_owned(), "true".to_owned())].into());
        assert_eq!(capacity, 2);
        assert_eq!(executor, "docker");
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
    }

    async fn submit(&self, image: &str, command: &[&str]) -> RunId {
        let spec: RunSpec = RawSpec {
            image: image.into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            timeout_secs: 60,
            ..Default::default()
        }
        .validate()
        .unwrap();
        let submitted = runs::submit(&self.pool, DEFAULT_TENANT, &spec, None)
            .await
            .unwrap();
        assert_eq!(submitted.run.state, RunState::Queued);
        submitted.run.id
    }

    /// What the dispatcher does (`dispatcher/src/assign.rs`): in one transaction, lease the run
    /// to this agent under a new epoch and write its `Execute` command to the outbox; the API's
    /// outbox relay publishes it to `drover.agents` once committed.
    async fn assign(&self, run: RunId) -> RunRecord {
        let mut tx = self.pool.begin().await.unwrap();
        let rec = lease(&mut tx, run, &self.agent_id).await;
        enqueue_execute(&mut tx, &self.agent_id, &rec, rec.lease_epoch).await;
        tx.commit().await.unwrap();
        rec
    }

    async fn run(&self, run: RunId) -> RunRecord {
        runs::get(&self.pool, DEFAULT_TENANT, run)
            .await
            .unwrap()
            .expect("the run exists")
    }

    /// Polls the run until `done` holds for it.
    async fn wait_for_run(
        &self,
        run: RunId,
        what: &str,
        done: impl Fn(&RunRecord) -> bool,
    ) -> RunRecord {
        let deadline = Instant::now() + WAIT;
        loop {
            let rec = self.run(run).await;
            if done(&rec) {
                return rec;
            }
            assert!(
                Instant::now() < deadline,
                "timed out waiting for run {run} to be {what}; it is {} (epoch {}, agent {:?}, \
                 reason {:?})",
                rec.state,
                rec.lease_epoch,
                rec.agent_id,
                rec.reason
            );
            tokio::time::sleep(POLL).await;
        }
    }

    async fn wait_for_state(&self, run: RunId, state: RunState) -> RunRecord {
        self.wait_for_run(run, state.as_str(), |r| r.state == state)
            .await
    }

    /// The `to_state` of every `run_events` row of the run, in order.
    async fn events(&self, run: RunId) -> Vec<String> {
        sqlx::query_scalar("SELECT to_state FROM run_events WHERE run_id = $1 ORDER BY seq")
            .bind(run.0)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Stored output of the run, per stream (1 stdout, 2 stderr), each in arrival order.
    async fn logs(&self, run: RunId) -> (Vec<u8>, Vec<u8>) {
        let rows: Vec<(i16, Vec<u8>)> =
            sqlx::query_as("SELECT stream, data FROM run_logs WHERE run_id = $1 ORDER BY id")
                .bind(run.0)
                .fetch_all(&self.pool)
                .await
                .unwrap();
        let (mut out, mut err) = (Vec::new(), Vec::new());
        for (stream, data) in rows {
            match stream {
                1 => out.extend(data),
                2 => err.extend(data),
                other => panic!("run_logs row with unknown stream {other}"),
            }
        }
        (out, err)
    }

    /// Publishes raw bytes to this agent's routing key, as a foreign producer would.
    async fn publish_raw(&self, payload: &[u8]) {
        let ch = self.amqp.create_channel().await.unwrap();
        ch.basic_publish(
            AGENTS_EXCHANGE.into(),
            self.agent_id.as_str().into(),
            BasicPublishOptions {
                mandatory: true,
                ..Default::default()
            },
            payload,
            BasicProperties::default().with_delivery_mode(2),
        )
        .await
        .unwrap()
        .await
        .unwrap();
        let _ = ch.close(200, "done".into()).await;
    }

    /// Ready messages in `queue` (a passive declare: the queue must exist).
    async fn ready_messages(&self, queue: &str) -> u32 {
        let ch = self.amqp.create_channel().await.unwrap();
        let q = ch
            .queue_declare(
                queue.into(),
                QueueDeclareOptions {
                    passive: true,
                    ..Default::default()
                },
                FieldTable::default(),
            )
            .await
            .unwrap_or_else(|e| panic!("queue {queue} should exist: {e}"));
        let _ = ch.close(200, "done".into()).await;
        q.message_count()
    }

    /// Stops the agent, which must drain and return `Ok`. After this no report can arrive and
    /// every command it received is settled (unsettled ones would be back in its queue).
    async fn stop_agent(&mut self) {
        self.agent_stop.cancel();
        let agent = self.agent.take().expect("agent still running");
        let res = tokio::time::timeout(STOP_WAIT, agent)
            .await
            .expect("the agent stops within its drain timeout and grace")
            .expect("the agent task did not panic");
        assert!(res.is_ok(), "run_until_stopped returned {res:?}");
    }

    /// Stops the agent (if still running) and the API; the database and vhost go with
    /// [`Cleanup`].
    async fn finish(mut self) {
        if self.agent.is_some() {
            self.stop_agent().await;
        }
        let _ = self.amqp.close(200, "test done".into()).await;
        self.api_stop.cancel();
        let api = tokio::time::timeout(WAIT, &mut self.api)
            .await
            .expect("the api stops")
            .expect("the api task did not panic");
        assert!(api.is_ok(), "drover-api returned {api:?}");
        self.pool.close().await;
    }
}

/// Moves the run to ASSIGNED for `agent` under a new lease epoch (attempt 1), as the
/// dispatcher does.
async fn lease(conn: &mut PgConnection, run: RunId, agent: &str) -> RunRecord {
    let t = Transition {
        tenant: Some(DEFAULT_TENANT),
        expected_attempt: Some(1),
        reason: Some(format!("assigned to {agent}")),
        patch: TransitionPatch::Assign {
            agent_id: agent.to_owned(),
            lease_ttl_ms: i64::try_from(LEASE_TTL_MS).unwrap(),
        },
        ..Transition::new(run, RunState::Assigned)
    };
    let (rec, _) = runs::transition(conn, &t).await.unwrap();
    assert_eq!(rec.state, RunState::Assigned);
    rec
}

/// Writes an `Execute` command for `run` under `epoch` to the outbox, routed to `agent`.
async fn enqueue_execute(conn: &mut PgConnection, agent: &str, run: &RunRecord, epoch: i64) {
    let cmd = AgentCommand::Execute {
        run_id: run.id,
        tenant_id: run.tenant_id,
        attempt: run.attempt,
        lease_epoch: LeaseEpoch(epoch),
    };
    outbox::enqueue(
        conn,
        run.tenant_id,
        AGENTS_EXCHANGE,
        agent,
        &messages::encode(&cmd),
    )
    .await
    .unwrap();
}

/// Polls `probe` every [`POLL`] until it yields a value, failing after [`WAIT`].
async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

fn containers(run: RunId) -> Vec<String> {
    drover_tests::services::containers_for_run(&run.to_string())
}

async fn wait_until_no_container(run: RunId) {
    eventually(
        &format!("the containers of run {run} to be removed"),
        async || containers(run).is_empty().then_some(()),
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn executes_stores_logs_reports_and_removes_the_container() {
    let env = TestEnv::start().await;
    let run = env
        .submit(IMAGE, &["sh", "-c", "echo hello; echo oops >&2"])
        .await;
    let assigned = env.assign(run).await;
    assert_eq!(assigned.lease_epoch, 1);

    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(done.state, RunState::Succeeded, "reason: {:?}", done.reason);
    assert_eq!(done.exit_code, Some(0));
    // The output tail interleaves both streams in arrival order; Docker does not order
    // stdout against stderr, so either interleaving is right (each stream is exact below).
    assert!(
        [&b"hello\noops\n"[..], &b"oops\nhello\n"[..]].contains(&done.output.as_slice()),
        "output: {:?}",
        String::from_utf8_lossy(&done.output)
    );
    assert!(!done.output_truncated);
    assert_eq!(done.reason.as_deref(), Some("exited with code 0"));
    assert_eq!(done.agent_id.as_deref(), Some(env.agent_id.as_str()));
    assert_eq!(done.lease_epoch, 1);
    assert_eq!(done.executor.as_deref(), Some("docker"));
    assert!(done.started_at.is_some() && done.finished_at.is_some());
    assert_eq!(
        env.events(run).await,
        ["QUEUED", "ASSIGNED", "RUNNING", "SUCCEEDED"]
    );
    // Logs were pushed before the completion report, so they are all stored by now.
    let (stdout, stderr) = env.logs(run).await;
    assert_eq!(stdout, b"hello\n");
    assert_eq!(stderr, b"oops\n");

    wait_until_no_container(run).await;
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stale_command_is_dropped_and_the_agent_carries_on() {
    let mut env = TestEnv::start().await;

    // The stale run: leased at epoch 1, the lease lost and the run leased again at epoch 2
    // (no command for epoch 2 is sent, so nothing may run it). The epoch-1 command is still
    // in the outbox, as a late duplicate would be.
    let stale = env.submit(IMAGE, &["sh", "-c", "echo must not run"]).await;
    let mut tx = env.pool.begin().await.unwrap();
    let first = lease(&mut tx, stale, &env.agent_id).await;
    let requeue = Transition {
        expected_epoch: Some(first.lease_epoch),
        reason: Some("lease lost".into()),
        ..Transition::new(stale, RunState::Queued)
    };
    runs::transition(&mut tx, &requeue).await.unwrap();
    let second = lease(&mut tx, stale, &env.agent_id).await;
    assert_eq!((first.lease_epoch, second.lease_epoch), (1, 2));
    enqueue_execute(&mut tx, &env.agent_id, &second, first.lease_epoch).await;
    tx.commit().await.unwrap();

    // A valid command queued behind it is served.
    let valid = env.submit(IMAGE, &["sh", "-c", "echo fine"]).await;
    env.assign(valid).await;
    let done = env.wait_for_state(valid, RunState::Succeeded).await;
    assert_eq!(done.output, b"fine\n");
    wait_until_no_container(valid).await;

    env.stop_agent().await;
    // The API refused GetAssignment (FAILED_PRECONDITION: stale epoch); the agent acked and
    // dropped the command: it is neither back in the agent's queue nor dead-lettered.
    assert_eq!(env.ready_messages(&agent_queue(&env.agent_id)).await, 0);
    assert_eq!(env.ready_messages(DEAD_QUEUE).await, 0);
    // Nothing ran for it: no container, no start, no logs, no report.
    assert!(containers(stale).is_empty(), "a container was created");
    let rec = env.run(stale).await;
    assert_eq!(rec.state, RunState::Assigned);
    assert_eq!(rec.lease_epoch, 2);
    assert!(rec.started_at.is_none() && rec.executor.is_none());
    assert_eq!(
        env.events(stale).await,
        ["QUEUED", "ASSIGNED", "QUEUED", "ASSIGNED"]
    );
    assert_eq!(env.logs(stale).await, (Vec::new(), Vec::new()));
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_garbage_command_is_dead_lettered_and_the_agent_carries_on() {
    let mut env = TestEnv::start().await;
    let garbage: &[u8] = b"{not a command";
    env.publish_raw(garbage).await;

    let run = env.submit(IMAGE, &["sh", "-c", "echo still here"]).await;
    env.assign(run).await;
    let done = env.wait_for_state(run, RunState::Succeeded).await;
    assert_eq!(done.output, b"still here\n");
    wait_until_no_container(run).await;

    // Rejected without requeue, the queue's dead-letter exchange moved it to `drover.dead`.
    eventually("the garbage command in drover.dead", async || {
        (env.ready_messages(DEAD_QUEUE).await == 1).then_some(())
    })
    .await;
    let ch = env.amqp.create_channel().await.unwrap();
    let dead = ch
        .basic_get(DEAD_QUEUE.into(), BasicGetOptions { no_ack: true })
        .await
        .unwrap()
        .expect("a dead-lettered message");
    assert_eq!(dead.delivery.data, garbage);
    let headers = dead
        .delivery
        .properties
        .headers()
        .clone()
        .expect("dead-letter headers");
    let header = |name: &str| match headers.inner().get(name) {
        Some(AMQPValue::LongString(s)) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        other => panic!("header {name}: {other:?}"),
    };
    assert_eq!(header("x-first-death-reason"), "rejected");
    assert_eq!(header("x-first-death-queue"), agent_queue(&env.agent_id));
    let _ = ch.close(200, "done".into()).await;

    env.stop_agent().await;
    assert_eq!(env.ready_messages(&agent_queue(&env.agent_id)).await, 0);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_image_fails_the_run_as_image_unavailable() {
    let env = TestEnv::start().await;
    let run = env.submit("drover/not-here:never", &["true"]).await;
    env.assign(run).await;

    let done = env
        .wait_for_run(run, "finished", |r| r.state.is_terminal())
        .await;
    assert_eq!(done.state, RunState::Failed);
    let reason = done.reason.clone().unwrap_or_default();
    assert!(reason.starts_with("image_unavailable"), "reason: {reason}");
    assert_eq!(
        reason,
        "image_unavailable: image drover/not-here:never is not present on this host"
    );
    assert_eq!(done.exit_code, None);
    assert!(done.started_at.is_none(), "it never ran");
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "FAILED"]);
    assert!(containers(run).is_empty());
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_revoked_lease_stops_and_removes_the_container_without_a_report() {
    let mut env = TestEnv::start().await;
    let run = env.submit(IMAGE, &["sleep", "30"]).await;
    env.assign(run).await;
    let running = env.wait_for_state(run, RunState::Running).await;
    assert_eq!(containers(run).len(), 1, "one container runs it");

    // The agent's heartbeats renew the lease while it runs.
    let first_expiry = running.lease_expires_at.expect("a running run has a lease");
    env.wait_for_run(run, "renewed by a heartbeat", |r| {
        r.lease_expires_at.is_some_and(|t| t > first_expiry)
    })
    .await;

    // Simulate the reaper taking the lease and a dispatcher giving the run to another agent.
    // The reaper does not exist yet, so this is a direct UPDATE rather than its transitions
    // (hence no run_events row for it).
    let updated = sqlx::query(
        "UPDATE runs SET state = 'ASSIGNED', lease_epoch = lease_epoch + 1, \
         agent_id = 'some-other-agent', \
         lease_expires_at = now() + interval '1 minute', reason = 'reassigned by the test' \
         WHERE id = $1 AND state = 'RUNNING' AND lease_epoch = 1",
    )
    .bind(run.0)
    .execute(&env.pool)
    .await
    .unwrap();
    assert_eq!(
        updated.rows_affected(),
        1,
        "the run was RUNNING under epoch 1"
    );

    // The next heartbeat answers with the lease revoked: the agent kills and removes the
    // container (the run had ~30 s left, so this is the agent's doing).
    wait_until_no_container(run).await;

    // Once the agent has stopped nothing more can come from it: the run is as the test left it.
    env.stop_agent().await;
    let rec = env.run(run).await;
    assert_eq!(rec.state, RunState::Assigned);
    assert_eq!(rec.lease_epoch, 2);
    assert_eq!(rec.agent_id.as_deref(), Some("some-other-agent"));
    assert_eq!(rec.reason.as_deref(), Some("reassigned by the test"));
    assert_eq!(rec.exit_code, None);
    assert!(rec.finished_at.is_none());
    assert!(rec.output.is_empty());
    assert_eq!(env.events(run).await, ["QUEUED", "ASSIGNED", "RUNNING"]);
    env.finish().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_a_running_execution_finish_and_report() {
    let mut env = TestEnv::start().await;
    let run = env
        .submit(IMAGE, &["sh", "-c", "sleep 2; echo drained"])
        .await;
    env.assign(run).await;
    env.wait_for_state(run, RunState::Running).await;
    assert_eq!(containers(run).len(), 1, "the run is executing");

    // Stop the agent mid-run: it stops intake, lets the run finish, reports it, removes the
    // container, and only then returns Ok.
    env.stop_agent().await;
    let rec = env.run(run).await;
    assert_eq!(rec.state, RunState::Succeeded, "reason: {:?}", rec.reason);
    assert_eq!(rec.exit_code, Some(0));
    assert_eq!(rec.output, b"drained\n");
    assert_eq!(env.logs(run).await.0, b"drained\n");
    assert!(
        containers(run).is_empty(),
        "container removed before return"
    );
    env.finish().await;
}
