//! A running drover stack of real binaries for one test.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use drover_core::bearer::Bearer;
use drover_core::repo::tokens::{self, Role};
use drover_proto::v1 as pb;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use crate::services;

/// Clients carry a bearer token on every call.
pub type Authed =
    tonic::service::interceptor::InterceptedService<tonic::transport::Channel, Bearer>;
pub type RunClient = pb::run_service_client::RunServiceClient<Authed>;
pub type AdminClient = pb::admin_service_client::AdminServiceClient<Authed>;
pub type AgentClient = pb::agent_service_client::AgentServiceClient<Authed>;

/// The API's secrets key in test stacks (id `test1`); a test may override
/// `DROVER_SECRETS__KEYS` through [`StackOptions::env`], e.g. to an empty string for none.
pub const TEST_SECRETS_KEY_HEX: &str =
    "7465737420737461636b206b657920666f722064726f76657220736563726574";

/// Which processes to start and how.
#[derive(Debug, Clone)]
pub struct StackOptions {
    pub dispatcher: bool,
    pub agent: bool,
    /// Redis URL handed to the services; point it at a dead port to test the fallback.
    pub redis_url: String,
    pub agent_capacity: u32,
    /// Extra `DROVER_…` variables for every process (e.g. a short lease TTL).
    pub env: Vec<(String, String)>,
    /// Use this Postgres database as it is (e.g. a [`crate::private::PrivatePostgres`]'s)
    /// instead of creating a fresh one on the shared Postgres; the stack never drops it.
    pub database_url: Option<String>,
    /// Use this AMQP URL (broker and vhost) as it is (e.g. a
    /// [`crate::private::PrivateRabbit`]'s) instead of a fresh vhost on the shared RabbitMQ;
    /// the stack never deletes it.
    pub amqp_url: Option<String>,
    /// The agent's `executor` setting ("docker", "process", "mock", "auto").
    pub agent_executor: String,
    /// Extra `DROVER_…` variables for the agent only (e.g. `DROVER_KEEP_WORKSPACES`).
    pub agent_env: Vec<(String, String)>,
}

impl Default for StackOptions {
    fn default() -> Self {
        Self {
            dispatcher: true,
            agent: true,
            redis_url: services::redis_url(),
            agent_capacity: 4,
            env: Vec::new(),
            database_url: None,
            amqp_url: None,
            agent_executor: "docker".to_owned(),
            agent_env: Vec::new(),
        }
    }
}

impl StackOptions {
    /// Leases of `ttl_ms` with heartbeats every `ttl_ms / 5` and a reaper every 500 ms, so
    /// lease-expiry tests take seconds, not the default 10 s + interval.
    pub fn short_leases(mut self, ttl_ms: u64) -> Self {
        self.env.extend([
            ("DROVER_LEASE__LEASE_TTL_MS".into(), ttl_ms.to_string()),
            (
                "DROVER_LEASE__HEARTBEAT_INTERVAL_MS".into(),
                (ttl_ms / 5).max(100).to_string(),
            ),
            ("DROVER_REAPER__INTERVAL_MS".into(), "500".into()),
        ]);
        self
    }
}

struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

pub struct Stack {
    pub tag: String,
    pub endpoint: String,
    pub db: PgPool,
    pub db_name: String,
    pub database_url: String,
    pub amqp_url: String,
    pub vhost: String,
    pub redis_prefix: String,
    pub agent_id: String,
    pub log_dir: PathBuf,
    /// `http://ADDR` of the API's `/metrics`, `/healthz` and `/readyz`.
    pub api_metrics: String,
    /// A token of tenant `default` (the operator tenant) with every user role, made by the
    /// same bootstrap `drover admin bootstrap` runs. [`Stack::client`], [`Stack::admin`] and
    /// [`Stack::cli`] use it.
    pub token: String,
    procs: Vec<Proc>,
    opts: StackOptions,
}

/// Where cargo put the binaries: next to the test executable's `deps/` directory.
pub fn bin_path(name: &str) -> PathBuf {
    let exe = std::env::current_exe().expect("current exe");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("test binary lives in target/<profile>/deps");
    let path = dir.join(name);
    assert!(
        path.exists(),
        "{} not built; run `cargo build --workspace --bins` first (the test command does)",
        path.display()
    );
    path
}

impl Stack {
    pub async fn start() -> Stack {
        Self::start_with(StackOptions::default()).await
    }

    pub async fn start_with(opts: StackOptions) -> Stack {
        let tag = uuid::Uuid::now_v7().simple().to_string();
        // Services given by the options are used as they are (db_name / vhost stay empty).
        let (db_name, database_url) = match &opts.database_url {
            Some(url) => (String::new(), url.clone()),
            None => services::create_database(&tag).await,
        };
        let (vhost, amqp_url) = match &opts.amqp_url {
            Some(url) => (String::new(), url.clone()),
            None => {
                let vhost = format!("drover-t-{tag}");
                let url = services::create_vhost(&vhost);
                (vhost, url)
            }
        };
        let log_dir = std::env::temp_dir().join(format!("drover-e2e-{tag}"));
        std::fs::create_dir_all(&log_dir).expect("log dir");
        let mut stack = Stack {
            redis_prefix: format!("t{tag}:"),
            agent_id: format!("agent-{tag}"),
            endpoint: String::new(),
            api_metrics: String::new(),
            token: String::new(),
            db: PgPool::connect_lazy(&database_url).expect("pool"),
            tag,
            db_name,
            database_url,
            amqp_url,
            vhost,
            log_dir,
            procs: Vec::new(),
            opts,
        };
        stack.start_api().await;
        // A database given by the options may already have its operator tenant.
        stack.token = tokens::bootstrap(&stack.db, "default")
            .await
            .expect("bootstrap the default tenant")
            .token
            .token;
        if stack.opts.dispatcher {
            stack.start_dispatcher();
        }
        if stack.opts.agent {
            stack.start_agent().await;
        }
        stack
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("DROVER_DATABASE__URL", &self.database_url)
            .env("DROVER_DATABASE__MAX_CONNECTIONS", "10")
            .env("DROVER_AMQP__URL", &self.amqp_url)
            .env("DROVER_REDIS__URL", &self.opts.redis_url)
            .env("DROVER_REDIS__PREFIX", &self.redis_prefix)
            .env(
                "DROVER_SECRETS__KEYS",
                format!("test1:{TEST_SECRETS_KEY_HEX}"),
            )
            .env("DROVER_SECRETS__ACTIVE_KEY_ID", "test1")
            .env("DROVER_LOG_FORMAT", "text")
            .env("RUST_LOG", "info,drover=debug")
            .env("DROVER_METRICS__LISTEN_ADDR", "127.0.0.1:0")
            .kill_on_drop(true);
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
    }

    fn spawn(&mut self, name: &str, mut cmd: Command, pipe_stdout: bool) -> usize {
        // A restarted process appends to its log, so the first life stays readable.
        let log = self.log_dir.join(format!("{name}.log"));
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        let err = file.try_clone().expect("log file");
        cmd.stderr(Stdio::from(err));
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::from(file));
        }
        let child = cmd.spawn().unwrap_or_else(|e| panic!("spawn {name}: {e}"));
        self.procs.push(Proc {
            name: name.to_owned(),
            child,
            log,
        });
        self.procs.len() - 1
    }

    async fn start_api(&mut self) {
        let mut cmd = Command::new(bin_path("drover-api"));
        self.env(&mut cmd);
        cmd.env("DROVER_LISTEN_ADDR", "127.0.0.1:0");
        let idx = self.spawn("api", cmd, true);
        let stdout = self.procs[idx].child.stdout.take().expect("api stdout");
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics = String::new();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("drover-api metrics listening on ") {
                    metrics = format!("http://{}", addr.trim());
                }
                if let Some(addr) = line.strip_prefix("drover-api listening on ") {
                    return Some(addr.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten();
        let Some(addr) = addr else {
            self.dump_logs();
            panic!("drover-api did not report its address");
        };
        self.endpoint = format!("http://{addr}");
        self.api_metrics = metrics;
    }

    /// `http://ADDR` of the metrics endpoint of a process of this stack ("api",
    /// "dispatcher", an agent id), from the line it printed when it bound it (the latest
    /// life's, for a restarted process). Waits up to 60 s for the line.
    pub async fn metrics_url(&self, name: &str) -> String {
        if name == "api" && !self.api_metrics.is_empty() {
            return self.api_metrics.clone();
        }
        let log = self
            .procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.log.clone())
            .unwrap_or_else(|| panic!("no process {name}"));
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let found = text.lines().rev().find_map(|l| {
                l.split_once(" metrics listening on ")
                    .map(|(_, a)| a.trim().to_owned())
            });
            if let Some(addr) = found {
                return format!("http://{addr}");
            }
            if tokio::time::Instant::now() > deadline {
                self.dump_logs();
                panic!("{name} did not report its metrics address");
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn start_dispatcher(&mut self) {
        self.start_dispatcher_named("dispatcher");
    }

    /// Starts the agent and waits until it has registered.
    pub async fn start_agent(&mut self) {
        let id = self.agent_id.clone();
        self.start_agent_named(&id).await;
    }

    /// Starts (or restarts) an agent with this id; its process is named after the id. Waits
    /// until it has (re-)registered.
    pub async fn start_agent_named(&mut self, agent_id: &str) {
        if self.opts.agent_executor == "docker" {
            services::require_docker_image("drover/busybox:latest");
        }
        let before: Option<chrono::DateTime<chrono::Utc>> =
            sqlx::query_scalar("SELECT registered_at FROM agents WHERE id = $1")
                .bind(agent_id)
                .fetch_optional(&self.db)
                .await
                .ok()
                .flatten();
        let mut cmd = Command::new(bin_path("drover-agent"));
        self.env(&mut cmd);
        let agent_token = tokens::create_agent(&self.db, agent_id, "test", "test-stack", None)
            .await
            .expect("create an agent token")
            .token;
        cmd.env("DROVER_AGENT_ID", agent_id)
            .env("DROVER_AGENT_TOKEN", agent_token)
            .env("DROVER_API_ENDPOINT", &self.endpoint)
            .env("DROVER_CAPACITY", self.opts.agent_capacity.to_string())
            .env("DROVER_EXECUTOR", &self.opts.agent_executor);
        for (k, v) in &self.opts.agent_env {
            cmd.env(k, v);
        }
        self.procs.retain(|p| p.name != agent_id);
        self.spawn(agent_id, cmd, false);
        let registered = self
            .wait_for(Duration::from_secs(60), || async {
                let at: Option<chrono::DateTime<chrono::Utc>> =
                    sqlx::query_scalar("SELECT registered_at FROM agents WHERE id = $1")
                        .bind(agent_id)
                        .fetch_optional(&self.db)
                        .await
                        .ok()
                        .flatten();
                at.is_some() && at != before
            })
            .await;
        if !registered {
            self.dump_logs();
            panic!("agent {agent_id} did not register within 60 s");
        }
    }

    /// The pid of a running process of this stack ("api", "dispatcher", or an agent id).
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.child.id())
    }

    /// Sends `signal` to one process of this stack (by pid, never by name).
    pub fn signal(&self, name: &str, signal: Signal) {
        let pid = self
            .pid(name)
            .unwrap_or_else(|| panic!("no running process {name}"));
        kill(Pid::from_raw(pid as i32), signal).expect("signal");
    }

    /// SIGKILLs a process and reaps it.
    pub async fn kill9(&mut self, name: &str) {
        self.signal(name, Signal::SIGKILL);
        if let Some(p) = self.procs.iter_mut().find(|p| p.name == name) {
            let _ = p.child.wait().await;
        }
    }

    /// Waits for a process to exit by itself; its exit status, or `None` after `limit`.
    pub async fn wait_exit(
        &mut self,
        name: &str,
        limit: Duration,
    ) -> Option<std::process::ExitStatus> {
        let p = self.procs.iter_mut().find(|p| p.name == name)?;
        tokio::time::timeout(limit, p.child.wait())
            .await
            .ok()
            .and_then(Result::ok)
    }

    /// Starts another dispatcher process named `name`.
    pub fn start_dispatcher_named(&mut self, name: &str) {
        let mut cmd = Command::new(bin_path("drover-dispatcher"));
        self.env(&mut cmd);
        self.procs.retain(|p| p.name != name);
        self.spawn(name, cmd, false);
    }

    /// Runs the `drover` CLI binary against this stack: (exit code, stdout, stderr).
    pub async fn cli(&self, args: &[&str]) -> (i32, Vec<u8>, String) {
        let out = Command::new(bin_path("drover"))
            .args(args)
            .env("DROVER_ENDPOINT", &self.endpoint)
            .env("DROVER_TOKEN", &self.token)
            // Never the developer's own token file.
            .env("XDG_CONFIG_HOME", &self.log_dir)
            .output()
            .await
            .expect("run drover");
        (
            out.status.code().unwrap_or(-1),
            out.stdout,
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// An AdminService client with the stack's token.
    pub async fn admin(&self) -> AdminClient {
        self.admin_as(&self.token).await
    }

    /// An AdminService client with another token.
    pub async fn admin_as(&self, token: &str) -> AdminClient {
        pb::admin_service_client::AdminServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(token).expect("token"),
        )
    }

    /// A RunService client with another token.
    pub async fn client_as(&self, token: &str) -> RunClient {
        pb::run_service_client::RunServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(token).expect("token"),
        )
    }

    /// A RunService client on `channel` with the stack's token.
    pub fn client_on(&self, channel: tonic::transport::Channel) -> RunClient {
        pb::run_service_client::RunServiceClient::with_interceptor(
            channel,
            Bearer::new(&self.token).expect("token"),
        )
    }

    /// An AgentService client with a fresh agent token bound to `agent_id`.
    pub async fn agent_client(&self, agent_id: &str) -> AgentClient {
        let token = tokens::create_agent(&self.db, agent_id, "test", "test-stack", None)
            .await
            .expect("create an agent token")
            .token;
        pb::agent_service_client::AgentServiceClient::with_interceptor(
            self.channel().await,
            Bearer::new(&token).expect("token"),
        )
    }

    /// A new tenant (not an operator) and a token of it with the given roles.
    pub async fn tenant_token(&self, tenant: &str, roles: &[Role]) -> String {
        let b = tokens::bootstrap(&self.db, tenant)
            .await
            .expect("bootstrap a tenant");
        if roles == Role::USER {
            return b.token.token;
        }
        tokens::create_user(&self.db, b.tenant, roles, "test", "test")
            .await
            .expect("create a token")
            .token
    }

    /// A token of tenant `default` with exactly `roles`.
    pub async fn token_with(&self, roles: &[Role]) -> String {
        self.tenant_token("default", roles).await
    }

    /// Polls `cond` every 50 ms until true or `limit` passes.
    pub async fn wait_for<F, Fut>(&self, limit: Duration, mut cond: F) -> bool
    where
        F: FnMut() -> Fut,
        Fut: std::future::Future<Output = bool>,
    {
        let deadline = tokio::time::Instant::now() + limit;
        while tokio::time::Instant::now() < deadline {
            if cond().await {
                return true;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        false
    }

    /// A RunService client with the stack's token.
    pub async fn client(&self) -> RunClient {
        self.client_as(&self.token).await
    }

    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(self.endpoint.clone())
            .expect("endpoint")
            .connect()
            .await
            .expect("connect to drover-api")
    }

    /// Prints the tail of every process log (called when a test is about to fail).
    pub fn dump_logs(&self) {
        for p in &self.procs {
            let text = std::fs::read_to_string(&p.log).unwrap_or_default();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "----- {} ({}) -----\n{}",
                p.name,
                p.log.display(),
                tail.join("\n")
            );
        }
    }

    /// SIGTERM every process and wait for them (graceful shutdown path).
    pub async fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            if let Some(pid) = p.child.id() {
                let _ = kill(Pid::from_raw(pid as i32), Signal::SIGTERM);
            }
            match tokio::time::timeout(Duration::from_secs(40), p.child.wait()).await {
                Ok(Ok(status)) if !status.success() => {
                    eprintln!("{} exited with {status}", p.name);
                }
                Err(_) => {
                    eprintln!("{} ignored SIGTERM for 40 s; killing", p.name);
                    let _ = p.child.kill().await;
                }
                _ => {}
            }
        }
        self.db.close().await;
        if !self.db_name.is_empty() {
            services::drop_database(&self.db_name).await;
        }
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.dump_logs();
        }
        for p in &mut self.procs {
            let _ = p.child.start_kill();
        }
        if !self.vhost.is_empty() {
            services::delete_vhost(&self.vhost);
        }
    }
}
