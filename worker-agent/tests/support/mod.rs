//! The harness the agent's integration tests share: the real `drover-api` built in-process on
//! port 0 (its outbox relay included), a fresh Postgres database, a private RabbitMQ vhost, a
//! private Redis prefix, the local Docker daemon, and the agent under test — in-process
//! ([`TestEnv::start_agent`]) or as the real `drover-agent` binary ([`TestEnv::spawn_agent`]),
//! which a test can SIGTERM or SIGKILL by pid.
//!
//! Runs are submitted with the real repository and assigned the way the dispatcher does it: one
//! transaction moves the run to ASSIGNED under a new lease epoch and writes the agent's
//! `Execute` command to the outbox, which the API's relay publishes to `drover.agents`. There
//! is no dispatcher and so no reaper: a lease never expires under these tests unless a test
//! changes the row itself.
//!
//! Each test has its own agent id, database, vhost, Redis prefix and journal file, so tests
//! run in parallel. A missing Postgres, RabbitMQ or Docker (or the `drover/busybox:latest`
//! image) fails the test loudly; nothing is skipped.

#![allow(
    dead_code,
    unused_imports,
    reason = "each test binary uses a different part of the harness"
)]

mod helpers;
mod process;

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::Duration;

use drover_agent::{Agent, AgentError, Settings};
use drover_api::Application;
use drover_core::bearer::Bearer;
use drover_core::config::{
    AmqpSettings, DatabaseSettings, LeaseSettings, RedisSettings, RelaySettings,
};
use drover_core::ids::{DEFAULT_TENANT, RunId};
use drover_core::repo::tokens;
use drover_core::repo::{RunRecord, runs};
use drover_core::spec::RawSpec;
use drover_core::state::RunState;
use drover_proto::v1 as pb;
use drover_tests::services;
use lapin::options::QueueDeclareOptions;
use lapin::types::FieldTable;
use lapin::{Connection, ConnectionProperties};
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use sqlx::types::Json;
use tokio::task::JoinHandle;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

pub use helpers::{
    container_running, containers, enqueue_execute, events_of, eventually, lease, read_journal,
    wait_until_no_container,
};
pub use process::AgentProcess;

pub const IMAGE: &str = "drover/busybox:latest";
pub const POLL: Duration = Duration::from_millis(50);
pub const WAIT: Duration = Duration::from_secs(30);

/// The API's lease timing and the agent's, per test.
#[derive(Debug, Clone)]
pub struct EnvOptions {
    pub heartbeat_ms: u64,
    pub lease_ttl_ms: u64,
    pub capacity: u32,
    pub drain_secs: u64,
}

impl Default for EnvOptions {
    fn default() -> Self {
        Self {
            heartbeat_ms: 200,
            lease_ttl_ms: 2_000,
            capacity: 2,
            drain_secs: 10,
        }
    }
}

/// Removes what a test created on the shared services, also when it panicked: containers the
/// agent left behind, the vhost, the database and the scratch directory.
struct Cleanup {
    agent_id: String,
    vhost: String,
    db_name: String,
    dir: PathBuf,
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
        let _ = std::fs::remove_dir_all(&self.dir);
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

/// The real API, the agent under test, and handles on Postgres and RabbitMQ.
pub struct TestEnv {
    pub agent_id: String,
    pub pool: PgPool,
    pub amqp: Connection,
    pub amqp_url: String,
    pub api_addr: std::net::SocketAddr,
    pub opts: EnvOptions,
    /// The execution journal every agent of this test appends to.
    pub journal: PathBuf,
    /// A token of tenant `default` with every user role.
    pub token: String,
    /// The agent's token, bound to `agent_id`.
    pub agent_token: String,
    dir: PathBuf,
    api_stop: CancellationToken,
    api: JoinHandle<Result<(), drover_api::StartError>>,
    agent_stop: CancellationToken,
    agent: Option<JoinHandle<Result<(), AgentError>>>,
    _cleanup: Cleanup,
}

impl TestEnv {
    /// The API and an in-process agent.
    pub async fn start() -> TestEnv {
        let mut env = Self::without_agent(EnvOptions::default()).await;
        env.start_agent().await;
        env
    }

    /// The API only; start the agent with [`TestEnv::start_agent`] or
    /// [`TestEnv::spawn_agent`].
    pub async fn without_agent(opts: EnvOptions) -> TestEnv {
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
        let dir = std::env::temp_dir().join(format!("drover-agent-test-{tag}"));
        std::fs::create_dir_all(&dir).expect("scratch directory");
        let cleanup = Cleanup {
            agent_id: format!("test-agent-{tag}"),
            vhost: vhost.clone(),
            db_name: db_name.clone(),
            dir: dir.clone(),
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
                heartbeat_interval_ms: opts.heartbeat_ms,
                lease_ttl_ms: opts.lease_ttl_ms,
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
        let amqp = Connection::connect(&amqp_url, ConnectionProperties::default())
            .await
            .unwrap_or_else(|e| panic!("rabbitmq not reachable at {amqp_url}: {e}"));
        let token = tokens::bootstrap(&pool, "default")
            .await
            .expect("bootstrap the default tenant")
            .token
            .token;
        let agent_token = tokens::create_agent(&pool, &agent_id, "test", "test", None)
            .await
            .expect("create the agent token")
            .token;

        TestEnv {
            agent_id,
            pool,
            amqp,
            amqp_url,
            api_addr,
            opts,
            journal: dir.join("executions.jsonl"),
            token,
            agent_token,
            dir,
            api_stop,
            api,
            agent_stop: CancellationToken::new(),
            agent: None,
            _cleanup: cleanup,
        }
    }

    /// The settings of the agent under test.
    pub fn agent_settings(&self) -> Settings {
        Settings {
            agent_id: self.agent_id.clone(),
            api_endpoint: format!("http://{}", self.api_addr),
            capacity: self.opts.capacity,
            drain_timeout_secs: self.opts.drain_secs,
            labels: [("gpu".to_owned(), "true".to_owned())].into(),
            amqp: AmqpSettings {
                url: self.amqp_url.clone().into(),
                ..AmqpSettings::default()
            },
            execution_journal: Some(self.journal.clone()),
            agent_token: self.agent_token.clone().into(),
            ..Settings::default()
        }
    }

    /// Starts the agent in this process and waits for its registration.
    pub async fn start_agent(&mut self) {
        let agent = Agent::build(self.agent_settings())
            .await
            .expect("agent builds (is the docker daemon answering?)");
        assert_eq!(agent.executor_name(), "docker");
        self.agent_stop = CancellationToken::new();
        self.agent = Some(tokio::spawn(
            agent.run_until_stopped(self.agent_stop.clone()),
        ));
        self.assert_registered().await;
    }

    /// Starts the real `drover-agent` binary with the same settings (through `DROVER_…`
    /// environment variables) and waits until it has (re-)registered.
    pub async fn spawn_agent(&self, life: &str) -> AgentProcess {
        let before = self.registered_at().await;
        let s = self.agent_settings();
        let log = self.dir.join(format!("agent-{life}.log"));
        let file = std::fs::File::create(&log).expect("agent log file");
        let err = file.try_clone().expect("agent log file");
        let child = tokio::process::Command::new(env!("CARGO_BIN_EXE_drover-agent"))
            .env("DROVER_AGENT_ID", &s.agent_id)
            .env("DROVER_AGENT_TOKEN", &self.agent_token)
            .env("DROVER_API_ENDPOINT", &s.api_endpoint)
            .env("DROVER_CAPACITY", s.capacity.to_string())
            .env(
                "DROVER_DRAIN_TIMEOUT_SECS",
                s.drain_timeout_secs.to_string(),
            )
            .env("DROVER_LABELS__GPU", "true")
            .env("DROVER_AMQP__URL", &self.amqp_url)
            .env("DROVER_EXECUTOR", "docker")
            .env("DROVER_EXECUTION_JOURNAL", &self.journal)
            .env("DROVER_LOG_FORMAT", "text")
            .env("RUST_LOG", "info,lapin=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .kill_on_drop(true)
            .spawn()
            .expect("spawn drover-agent");
        let process = AgentProcess { child, log };
        let registered = tokio::time::timeout(WAIT, async {
            loop {
                let at = self.registered_at().await;
                if at.is_some() && at != before {
                    return;
                }
                tokio::time::sleep(POLL).await;
            }
        })
        .await;
        if registered.is_err() {
            process.dump_log();
            panic!("drover-agent ({life}) did not register within {WAIT:?}");
        }
        self.assert_registered().await;
        process
    }

    async fn registered_at(&self) -> Option<chrono::DateTime<chrono::Utc>> {
        sqlx::query_scalar("SELECT registered_at FROM agents WHERE id = $1")
            .bind(&self.agent_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    /// Waits for the agent's row (it declares its queue before registering, so commands routed
    /// to it from then on are queued) and checks what it registered.
    pub async fn assert_registered(&self) {
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
        assert_eq!(capacity, i32::try_from(self.opts.capacity).unwrap());
        assert_eq!(executor, "docker");
        assert_eq!(version, env!("CARGO_PKG_VERSION"));
    }

    /// Whether the agent's row still exists (a drained agent deregisters).
    pub async fn agent_registered(&self) -> bool {
        self.registered_at().await.is_some()
    }

    pub async fn agent_draining(&self) -> Option<bool> {
        sqlx::query_scalar("SELECT draining FROM agents WHERE id = $1")
            .bind(&self.agent_id)
            .fetch_optional(&self.pool)
            .await
            .unwrap()
    }

    /// Submits a run of `command` with a 60 s timeout.
    pub async fn submit(&self, image: &str, command: &[&str]) -> RunId {
        self.submit_spec(RawSpec {
            image: image.into(),
            command: command.iter().map(|s| (*s).to_owned()).collect(),
            timeout_secs: 60,
            ..Default::default()
        })
        .await
    }

    pub async fn submit_spec(&self, raw: RawSpec) -> RunId {
        let spec = raw.validate().unwrap();
        let submitted = runs::submit(
            &self.pool,
            DEFAULT_TENANT,
            &spec,
            None,
            &runs::Submitter::system("test"),
        )
        .await
        .unwrap();
        assert_eq!(submitted.run.state, RunState::Queued);
        submitted.run.id
    }

    /// What the dispatcher does (`dispatcher/src/assign.rs`): in one transaction, lease the run
    /// to this agent under a new epoch and write its `Execute` command to the outbox; the API's
    /// outbox relay publishes it to `drover.agents` once committed.
    pub async fn assign(&self, run: RunId) -> RunRecord {
        let rec = self.lease_only(run).await;
        self.send_execute(&rec, rec.lease_epoch).await;
        rec
    }

    /// Leases the run to this agent without sending the command.
    pub async fn lease_only(&self, run: RunId) -> RunRecord {
        let mut tx = self.pool.begin().await.unwrap();
        let rec = lease(&mut tx, run, &self.agent_id, self.opts.lease_ttl_ms).await;
        tx.commit().await.unwrap();
        rec
    }

    /// Writes an `Execute` command for `run` under `epoch` to the outbox.
    pub async fn send_execute(&self, run: &RunRecord, epoch: i64) {
        let mut tx = self.pool.begin().await.unwrap();
        enqueue_execute(&mut tx, &self.agent_id, run, epoch).await;
        tx.commit().await.unwrap();
    }

    /// The real RunService `CancelRun`, as a client calls it.
    pub async fn cancel(&self, run: RunId) -> pb::Run {
        self.runs_client()
            .await
            .cancel_run(pb::CancelRunRequest {
                run_id: run.to_string(),
                reason: "test".into(),
            })
            .await
            .expect("CancelRun")
            .into_inner()
            .run
            .expect("the run after the cancel")
    }

    async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.api_addr))
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to the api")
    }

    /// A RunService client with the test's user token.
    pub async fn runs_client(
        &self,
    ) -> pb::run_service_client::RunServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    > {
        let bearer = Bearer::new(&self.token).expect("token");
        pb::run_service_client::RunServiceClient::with_interceptor(self.channel().await, bearer)
    }

    /// An AdminService client with the test's user token (an operator tenant's admin).
    pub async fn admin_client(
        &self,
    ) -> pb::admin_service_client::AdminServiceClient<
        tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>,
    > {
        let bearer = Bearer::new(&self.token).expect("token");
        pb::admin_service_client::AdminServiceClient::with_interceptor(self.channel().await, bearer)
    }

    /// Moves the lease away from this agent behind its back, as the reaper and a dispatcher
    /// would (next epoch, another agent).
    pub async fn steal_lease(&self, run: RunId, from_epoch: i64) {
        let updated = sqlx::query(
            "UPDATE runs SET state = 'ASSIGNED', lease_epoch = lease_epoch + 1, \
             agent_id = 'some-other-agent', \
             lease_expires_at = now() + interval '1 minute', reason = 'reassigned by the test' \
             WHERE id = $1 AND state IN ('ASSIGNED', 'RUNNING') AND lease_epoch = $2",
        )
        .bind(run.0)
        .bind(from_epoch)
        .execute(&self.pool)
        .await
        .unwrap();
        assert_eq!(
            updated.rows_affected(),
            1,
            "the run was held under {from_epoch}"
        );
    }

    pub async fn run(&self, run: RunId) -> RunRecord {
        runs::get(&self.pool, DEFAULT_TENANT, run)
            .await
            .unwrap()
            .expect("the run exists")
    }

    /// Polls the run until `done` holds for it.
    pub async fn wait_for_run(
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

    pub async fn wait_for_state(&self, run: RunId, state: RunState) -> RunRecord {
        self.wait_for_run(run, state.as_str(), |r| r.state == state)
            .await
    }

    /// The `to_state` of every `run_events` row of the run, in order.
    pub async fn events(&self, run: RunId) -> Vec<String> {
        sqlx::query_scalar("SELECT to_state FROM run_events WHERE run_id = $1 ORDER BY seq")
            .bind(run.0)
            .fetch_all(&self.pool)
            .await
            .unwrap()
    }

    /// Stored output of the run, per stream (1 stdout, 2 stderr), each in arrival order.
    pub async fn logs(&self, run: RunId) -> (Vec<u8>, Vec<u8>) {
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

    /// The journal's lines about `run`, in order.
    pub fn journal_of(&self, run: RunId) -> Vec<serde_json::Value> {
        read_journal(&self.journal)
            .into_iter()
            .filter(|l| l["run_id"] == run.to_string())
            .collect()
    }

    /// Ready messages in `queue` (a passive declare: the queue must exist).
    pub async fn ready_messages(&self, queue: &str) -> u32 {
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

    /// Stops the in-process agent (drain), which must return `Ok`. After this no report can
    /// arrive and every command it received is settled.
    pub async fn stop_agent(&mut self) {
        self.agent_stop.cancel();
        self.agent_returns().await;
    }

    /// Waits for the in-process agent to return by itself (a drain it was asked for), `Ok`.
    pub async fn agent_returns(&mut self) {
        let stop_wait = Duration::from_secs(self.opts.drain_secs + 15 + 20);
        let agent = self.agent.take().expect("agent still running");
        let res = tokio::time::timeout(stop_wait, agent)
            .await
            .expect("the agent stops within its drain timeout and grace")
            .expect("the agent task did not panic");
        assert!(res.is_ok(), "run_until_stopped returned {res:?}");
    }

    /// Stops the agent (if still running) and the API; the database, vhost and scratch
    /// directory go with [`Cleanup`].
    pub async fn finish(mut self) {
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
