//! The one place where drover-chaos starts a drover stack: `drover-api`, dispatchers and
//! agents from a build directory, as separate processes, against either the machine's shared
//! services (a fresh database, vhost and Redis key prefix each time) or private instances
//! owned by this stack ([`crate::private`]), optionally through fault-injecting proxies
//! ([`crate::proxy`]). Processes are signalled, killed, frozen and restarted by PID, never by
//! name; [`Stack::stop`] takes everything down and drops what it created.
//!
//! Used by `stress --spawn-stack` (shared services, no proxies) and by every chaos scenario.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use drover_core::repo::tokens;
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;
use sqlx::PgPool;
use sqlx::postgres::PgPoolOptions;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

use crate::private::{PrivatePostgres, PrivateRabbit, PrivateRedis, ServiceError};
use crate::proxy::Proxy;
use crate::stress::services::{self, Vhost};

/// Where a service comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backing {
    /// The machine's instance, isolated by a fresh database / vhost / key prefix.
    Shared,
    /// An instance of this stack's own, which a scenario may restart, kill or flush.
    Private,
}

/// The machine's shared services (used for [`Backing::Shared`]).
#[derive(Debug, Clone)]
pub struct SharedServices {
    pub pg_admin_url: String,
    pub redis_url: String,
    /// `127.0.0.1:5672`-style.
    pub rabbit_host: String,
}

/// Which links go through a fault-injecting proxy (see [`Stack::proxy`]).
#[derive(Debug, Clone, Copy, Default)]
pub struct Proxied {
    /// Every process's Postgres connections.
    pub postgres: bool,
    pub amqp: bool,
    pub redis: bool,
    /// The agents' (not the chaos clients') gRPC connections to the API.
    pub api: bool,
}

#[derive(Debug, Clone)]
pub struct StackConfig {
    /// Where `drover-api`, `drover-dispatcher` and `drover-agent` are.
    pub bin_dir: PathBuf,
    pub shared: SharedServices,
    pub postgres: Backing,
    pub rabbit: Backing,
    pub redis: Backing,
    pub proxied: Proxied,
    pub dispatchers: usize,
    pub agents: usize,
    pub agent_capacity: u32,
    /// The agents' own executor ("docker", "mock", …).
    pub agent_executor: String,
    /// Executors a spec may name besides the agent's own (`DROVER_ALLOWED_EXECUTORS`).
    pub allowed_executors: String,
    /// Extra variables for every process (e.g. short leases).
    pub env: Vec<(String, String)>,
    /// Extra variables for the API only (e.g. the artifact store root).
    pub api_env: Vec<(String, String)>,
    /// Each agent writes its execution journal to `<dir>/<agent name>.jsonl`.
    pub journal_dir: Option<PathBuf>,
    /// The processes' logs: `<dir>/<name>.log` (a restarted process appends).
    pub log_dir: PathBuf,
    /// `RUST_LOG` for the processes.
    pub rust_log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum StackError {
    #[error("{0}")]
    Setup(String),
    #[error("service: {0}")]
    Service(#[from] ServiceError),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("no process named {0}")]
    NoProcess(String),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> StackError {
    let what = what.into();
    move |source| StackError::Io { what, source }
}

/// The kind of a process, which decides how it is (re)started.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Role {
    Api,
    Dispatcher,
    Agent,
}

#[derive(Debug)]
struct Proc {
    name: String,
    role: Role,
    child: Option<Child>,
}

/// A running stack; see the module doc.
#[derive(Debug)]
pub struct Stack {
    pub tag: String,
    /// The API as clients reach it (`http://127.0.0.1:PORT`).
    pub endpoint: String,
    /// `http://ADDR` of the API's `/metrics` (its latest life).
    pub api_metrics: String,
    pub database_url: String,
    pub amqp_url: String,
    /// The broker itself, bypassing any proxy (for the oracle and injected messages).
    pub amqp_direct_url: String,
    pub redis_url: String,
    pub redis_prefix: String,
    /// A token of the operator tenant `default` with every user role, bootstrapped once the
    /// API has migrated the database (as `drover admin bootstrap` does).
    pub token: String,
    cfg: StackConfig,
    api_addr: String,
    /// Agent name (`agent-0`) → agent id.
    agent_ids: HashMap<String, String>,
    procs: Vec<Proc>,
    pool: Option<PgPool>,
    db_name: Option<String>,
    vhost: Option<Vhost>,
    pub private_pg: Option<PrivatePostgres>,
    pub private_rabbit: Option<PrivateRabbit>,
    pub private_redis: Option<PrivateRedis>,
    proxies: HashMap<&'static str, Proxy>,
    cancel: CancellationToken,
}

/// The directory of the running executable: `drover-chaos` is built next to the others.
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

/// `scheme://[user@]host:port/rest` → the `host:port` part.
fn authority(url: &str) -> Option<(usize, usize)> {
    let start = url.find("://")? + 3;
    let rest = &url[start..];
    let end = rest.find('/').unwrap_or(rest.len());
    let at = rest[..end].rfind('@').map_or(0, |i| i + 1);
    Some((start + at, start + end))
}

/// The URL with its `host:port` replaced.
pub fn with_host_port(url: &str, host_port: &str) -> String {
    match authority(url) {
        Some((a, b)) => format!("{}{}{}", &url[..a], host_port, &url[b..]),
        None => url.to_owned(),
    }
}

async fn socket_addr(url: &str) -> Result<SocketAddr, StackError> {
    let (a, b) =
        authority(url).ok_or_else(|| StackError::Setup(format!("no host:port in {url}")))?;
    let hp = &url[a..b];
    tokio::net::lookup_host(hp)
        .await
        .map_err(io(format!("resolve {hp}")))?
        .find(SocketAddr::is_ipv4)
        .ok_or_else(|| StackError::Setup(format!("{hp} does not resolve to IPv4")))
}

impl Stack {
    /// Starts services, proxies, the API, the dispatchers and the agents; returns once every
    /// agent has registered. On failure, whatever was started is stopped again.
    pub async fn start(cfg: StackConfig) -> Result<Stack, StackError> {
        for bin in ["drover-api", "drover-dispatcher", "drover-agent"] {
            if !cfg.bin_dir.join(bin).exists() {
                return Err(StackError::Setup(format!(
                    "{} not found; build it (`cargo build --bins`) or pass --bin-dir",
                    cfg.bin_dir.join(bin).display()
                )));
            }
        }
        std::fs::create_dir_all(&cfg.log_dir).map_err(io("create the log dir"))?;
        if let Some(j) = &cfg.journal_dir {
            std::fs::create_dir_all(j).map_err(io("create the journal dir"))?;
        }
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let mut stack = Stack {
            redis_prefix: format!("c{tag}:"),
            tag,
            endpoint: String::new(),
            api_metrics: String::new(),
            database_url: String::new(),
            amqp_url: String::new(),
            amqp_direct_url: String::new(),
            redis_url: String::new(),
            token: String::new(),
            cfg,
            api_addr: "127.0.0.1:0".into(),
            agent_ids: HashMap::new(),
            procs: Vec::new(),
            pool: None,
            db_name: None,
            vhost: None,
            private_pg: None,
            private_rabbit: None,
            private_redis: None,
            proxies: HashMap::new(),
            cancel: CancellationToken::new(),
        };
        match stack.boot().await {
            Ok(()) => Ok(stack),
            Err(e) => {
                stack.stop().await;
                Err(e)
            }
        }
    }

    async fn boot(&mut self) -> Result<(), StackError> {
        let shared = self.cfg.shared.clone();
        let database_url = match self.cfg.postgres {
            Backing::Shared => {
                let name = format!("drover_chaos_{}", self.tag);
                let url = services::create_database(&shared.pg_admin_url, &name).await?;
                self.db_name = Some(name);
                url
            }
            Backing::Private => {
                let pg = PrivatePostgres::launch().await?;
                let url = pg.url();
                self.private_pg = Some(pg);
                url
            }
        };
        let amqp_url = match self.cfg.rabbit {
            Backing::Shared => {
                let vhost =
                    Vhost::create(&format!("drover-chaos-{}", self.tag), &shared.rabbit_host)
                        .map_err(StackError::Setup)?;
                let url = vhost.url.clone();
                self.vhost = Some(vhost);
                url
            }
            Backing::Private => {
                let r = PrivateRabbit::launch().await?;
                let url = r.url();
                self.private_rabbit = Some(r);
                url
            }
        };
        let redis_url = match self.cfg.redis {
            Backing::Shared => shared.redis_url.clone(),
            Backing::Private => {
                let r = PrivateRedis::launch().await?;
                let url = r.url();
                self.private_redis = Some(r);
                url
            }
        };
        // The oracle's own pool bypasses any proxy.
        self.pool = Some(
            PgPoolOptions::new()
                .max_connections(4)
                .connect_lazy(&database_url)?,
        );
        let proxied = self.cfg.proxied;
        self.database_url = self
            .through_proxy("postgres", proxied.postgres, &database_url)
            .await?;
        self.amqp_url = self.through_proxy("amqp", proxied.amqp, &amqp_url).await?;
        self.amqp_direct_url = amqp_url;
        self.redis_url = self
            .through_proxy("redis", proxied.redis, &redis_url)
            .await?;

        self.start_api().await?;
        self.token = tokens::bootstrap(self.db()?, "default")
            .await
            .map_err(|e| StackError::Setup(format!("bootstrap the default tenant: {e}")))?
            .token
            .token;
        for i in 0..self.cfg.dispatchers.max(1) {
            self.start_dispatcher(&format!("dispatcher-{i}"))?;
        }
        for i in 0..self.cfg.agents {
            self.start_agent(&format!("agent-{i}")).await?;
        }
        Ok(())
    }

    async fn through_proxy(
        &mut self,
        name: &'static str,
        on: bool,
        url: &str,
    ) -> Result<String, StackError> {
        if !on {
            return Ok(url.to_owned());
        }
        let upstream = socket_addr(url).await?;
        let proxy = Proxy::start(name, upstream, &self.cancel)
            .await
            .map_err(io(format!("start the {name} proxy")))?;
        let url = with_host_port(url, &proxy.addr().to_string());
        self.proxies.insert(name, proxy);
        Ok(url)
    }

    /// The proxy of a link (`postgres`, `amqp`, `redis`, `api`), if it is proxied.
    pub fn proxy(&self, name: &str) -> Option<&Proxy> {
        self.proxies.get(name)
    }

    /// A pool on the stack's database, straight to the server (never through a proxy).
    pub fn db(&self) -> Result<&PgPool, StackError> {
        self.pool
            .as_ref()
            .ok_or_else(|| StackError::Setup("the stack has no database yet".into()))
    }

    /// The agents' journal files.
    pub fn journals(&self) -> Vec<PathBuf> {
        let Some(dir) = &self.cfg.journal_dir else {
            return Vec::new();
        };
        let mut names: Vec<&String> = self.agent_ids.keys().collect();
        names.sort();
        names
            .into_iter()
            .map(|n| dir.join(format!("{n}.jsonl")))
            .collect()
    }

    /// Agent name → agent id.
    pub fn agent_id(&self, name: &str) -> Option<&str> {
        self.agent_ids.get(name).map(String::as_str)
    }

    pub fn log_path(&self, name: &str) -> PathBuf {
        self.cfg.log_dir.join(format!("{name}.log"))
    }

    /// `bin` from the build directory, under `setpriv --pdeathsig KILL` (which execs it, so
    /// the PID is the binary's): if drover-chaos itself is killed, its stack dies with it
    /// instead of lingering.
    fn command(&self, bin: &str) -> Command {
        let mut cmd = Command::new("setpriv");
        cmd.args(["--pdeathsig", "KILL", "--"])
            .arg(self.cfg.bin_dir.join(bin));
        cmd
    }

    fn env(&self, cmd: &mut Command) {
        cmd.env("DROVER_DATABASE__URL", &self.database_url)
            .env("DROVER_DATABASE__MAX_CONNECTIONS", "10")
            .env("DROVER_AMQP__URL", &self.amqp_url)
            .env("DROVER_REDIS__URL", &self.redis_url)
            .env("DROVER_REDIS__PREFIX", &self.redis_prefix)
            .env("DROVER_LOG_FORMAT", "text")
            .env("RUST_LOG", &self.cfg.rust_log)
            .stdin(Stdio::null())
            .kill_on_drop(true);
        for (k, v) in &self.cfg.env {
            cmd.env(k, v);
        }
    }

    fn spawn(
        &mut self,
        name: &str,
        role: Role,
        mut cmd: Command,
        pipe_stdout: bool,
    ) -> Result<usize, StackError> {
        let log = self.log_path(name);
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .map_err(io(format!("open {}", log.display())))?;
        let err = file.try_clone().map_err(io("clone a log handle"))?;
        cmd.stderr(Stdio::from(err));
        if pipe_stdout {
            cmd.stdout(Stdio::piped());
        } else {
            cmd.stdout(Stdio::from(file));
        }
        let child = cmd.spawn().map_err(io(format!("spawn {name}")))?;
        // A restarted process keeps its place, so `stop` still takes agents down before
        // the API they deregister from.
        if let Some(i) = self.procs.iter().position(|p| p.name == name) {
            self.procs[i].child = Some(child);
            return Ok(i);
        }
        self.procs.push(Proc {
            name: name.to_owned(),
            role,
            child: Some(child),
        });
        Ok(self.procs.len() - 1)
    }

    /// Starts the API (again, on the same address once it had one) and waits for its
    /// "listening" line.
    pub async fn start_api(&mut self) -> Result<(), StackError> {
        let mut cmd = self.command("drover-api");
        self.env(&mut cmd);
        cmd.env("DROVER_LISTEN_ADDR", &self.api_addr)
            .env("DROVER_METRICS__LISTEN_ADDR", "127.0.0.1:0");
        for (k, v) in &self.cfg.api_env {
            cmd.env(k, v);
        }
        let idx = self.spawn("api", Role::Api, cmd, true)?;
        let stdout = self.procs[idx]
            .child
            .as_mut()
            .and_then(|c| c.stdout.take())
            .ok_or_else(|| StackError::Setup("api stdout".into()))?;
        let mut lines = BufReader::new(stdout).lines();
        let mut metrics = String::new();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(a) = line.strip_prefix("drover-api metrics listening on ") {
                    metrics = format!("http://{}", a.trim());
                }
                if let Some(a) = line.strip_prefix("drover-api listening on ") {
                    return Some(a.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            StackError::Setup(format!(
                "drover-api did not report its address; see {}",
                self.log_path("api").display()
            ))
        })?;
        // Keep draining the API's stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.api_metrics = metrics;
        self.api_addr.clone_from(&addr);
        self.endpoint = format!("http://{addr}");
        if self.cfg.proxied.api && !self.proxies.contains_key("api") {
            let upstream: SocketAddr = addr
                .parse()
                .map_err(|e| StackError::Setup(format!("api address {addr}: {e}")))?;
            let proxy = Proxy::start("api", upstream, &self.cancel)
                .await
                .map_err(io("start the api proxy"))?;
            self.proxies.insert("api", proxy);
        }
        Ok(())
    }

    /// The endpoint agents use: the API's, or its proxy's.
    fn agent_endpoint(&self) -> String {
        self.proxies
            .get("api")
            .map_or_else(|| self.endpoint.clone(), |p| format!("http://{}", p.addr()))
    }

    /// Starts (or restarts) a dispatcher process called `name`.
    pub fn start_dispatcher(&mut self, name: &str) -> Result<(), StackError> {
        let mut cmd = self.command("drover-dispatcher");
        self.env(&mut cmd);
        self.spawn(name, Role::Dispatcher, cmd, false)?;
        Ok(())
    }

    /// Starts (or restarts) agent `name` and waits until it has (re-)registered.
    pub async fn start_agent(&mut self, name: &str) -> Result<(), StackError> {
        let id = self
            .agent_ids
            .entry(name.to_owned())
            .or_insert_with(|| format!("chaos-{}-{name}", &self.tag[self.tag.len() - 8..]))
            .clone();
        let db = self.db()?.clone();
        let registered = |db: PgPool, id: String| async move {
            sqlx::query_scalar::<_, chrono::DateTime<chrono::Utc>>(
                "SELECT registered_at FROM agents WHERE id = $1",
            )
            .bind(id)
            .fetch_optional(&db)
            .await
            .ok()
            .flatten()
        };
        let before = registered(db.clone(), id.clone()).await;
        // Each life gets a fresh agent token bound to the agent's id.
        let agent_token = tokens::create_agent(&db, &id, name, "drover-chaos", None)
            .await
            .map_err(|e| StackError::Setup(format!("agent token for {id}: {e}")))?
            .token;
        let mut cmd = self.command("drover-agent");
        self.env(&mut cmd);
        cmd.env("DROVER_AGENT_ID", &id)
            .env("DROVER_AGENT_TOKEN", agent_token)
            .env("DROVER_API_ENDPOINT", self.agent_endpoint())
            .env("DROVER_CAPACITY", self.cfg.agent_capacity.to_string())
            .env("DROVER_EXECUTOR", &self.cfg.agent_executor);
        if !self.cfg.allowed_executors.is_empty() {
            cmd.env("DROVER_ALLOWED_EXECUTORS", &self.cfg.allowed_executors);
        }
        if let Some(dir) = &self.cfg.journal_dir {
            cmd.env(
                "DROVER_EXECUTION_JOURNAL",
                dir.join(format!("{name}.jsonl")),
            );
        }
        self.spawn(name, Role::Agent, cmd, false)?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let at = registered(db.clone(), id.clone()).await;
            if at.is_some() && at != before {
                return Ok(());
            }
            if let Some(status) = self.exited(name) {
                return Err(StackError::Setup(format!(
                    "agent {name} exited ({status}) before registering; see {}",
                    self.log_path(name).display()
                )));
            }
            if tokio::time::Instant::now() > deadline {
                return Err(StackError::Setup(format!(
                    "agent {name} did not register within 60 s; see {}",
                    self.log_path(name).display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    fn exited(&mut self, name: &str) -> Option<std::process::ExitStatus> {
        let p = self.procs.iter_mut().find(|p| p.name == name)?;
        p.child.as_mut()?.try_wait().ok().flatten()
    }

    /// Restarts a stopped or killed process by its name, the way it was first started.
    pub async fn restart(&mut self, name: &str) -> Result<(), StackError> {
        let role = self
            .procs
            .iter()
            .find(|p| p.name == name)
            .map(|p| p.role)
            .ok_or_else(|| StackError::NoProcess(name.to_owned()))?;
        match role {
            Role::Api => {
                let started = self.start_api().await;
                if let (Ok(()), Some(p)) = (&started, self.proxies.get("api"))
                    && let Ok(a) = self.api_addr.parse()
                {
                    p.set_upstream(a);
                }
                started
            }
            Role::Dispatcher => self.start_dispatcher(name),
            Role::Agent => self.start_agent(name).await,
        }
    }

    /// The PID of a running process of the stack.
    pub fn pid(&self, name: &str) -> Option<u32> {
        self.procs
            .iter()
            .find(|p| p.name == name)
            .and_then(|p| p.child.as_ref())
            .and_then(Child::id)
    }

    /// Sends `signal` to one process, by PID.
    pub fn signal(&self, name: &str, signal: Signal) -> Result<(), StackError> {
        let pid = self
            .pid(name)
            .ok_or_else(|| StackError::NoProcess(name.to_owned()))?;
        let pid = i32::try_from(pid).map_err(|_| StackError::NoProcess(name.to_owned()))?;
        kill(Pid::from_raw(pid), signal)
            .map_err(|e| StackError::Setup(format!("kill -{signal} {name}: {e}")))
    }

    /// SIGKILL, and reap.
    pub async fn kill9(&mut self, name: &str) -> Result<(), StackError> {
        // A frozen process dies of SIGKILL as well.
        self.signal(name, Signal::SIGKILL)?;
        if let Some(c) = self
            .procs
            .iter_mut()
            .find(|p| p.name == name)
            .and_then(|p| p.child.as_mut())
        {
            let _ = c.wait().await;
        }
        Ok(())
    }

    /// Names of the processes started so far (running or not), in start order.
    pub fn names(&self) -> Vec<String> {
        self.procs.iter().map(|p| p.name.clone()).collect()
    }

    /// Names and PIDs of the running processes, for RSS/CPU sampling.
    pub fn running(&self) -> Vec<(String, u32)> {
        self.procs
            .iter()
            .filter_map(|p| Some((p.name.clone(), p.child.as_ref()?.id()?)))
            .collect()
    }

    /// SIGTERM every process by PID (agents first; a frozen one is thawed), wait up to 30 s
    /// each, then SIGKILL; stop private services and proxies; drop the database and vhost.
    pub async fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            let Some(child) = p.child.as_mut() else {
                continue;
            };
            if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
                let pid = Pid::from_raw(pid);
                let _ = kill(pid, Signal::SIGCONT);
                let _ = kill(pid, Signal::SIGTERM);
            }
            if tokio::time::timeout(Duration::from_secs(30), child.wait())
                .await
                .is_err()
            {
                eprintln!("{} ignored SIGTERM for 30 s; killing", p.name);
                let _ = child.kill().await;
            }
            p.child = None;
        }
        self.cancel.cancel();
        self.proxies.clear();
        if let Some(pool) = self.pool.take() {
            pool.close().await;
        }
        if let Some(mut r) = self.private_redis.take() {
            r.stop().await;
        }
        if let Some(mut r) = self.private_rabbit.take() {
            r.stop().await;
        }
        if let Some(mut p) = self.private_pg.take() {
            p.stop().await;
        }
        self.vhost.take();
        if let Some(name) = self.db_name.take() {
            services::drop_database(&self.cfg.shared.pg_admin_url, &name).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_port_is_replaced_with_or_without_credentials() {
        assert_eq!(
            with_host_port("postgres://drover:drover@127.0.0.1:5432/db", "127.0.0.1:9"),
            "postgres://drover:drover@127.0.0.1:9/db"
        );
        assert_eq!(
            with_host_port("redis://127.0.0.1:6379", "127.0.0.1:9"),
            "redis://127.0.0.1:9"
        );
        assert_eq!(
            with_host_port("amqp://guest:guest@127.0.0.1:5672/%2f", "127.0.0.1:9"),
            "amqp://guest:guest@127.0.0.1:9/%2f"
        );
    }
}
