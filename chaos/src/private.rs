//! Private Redis, Postgres and RabbitMQ instances owned by one chaos scenario: their own ports
//! and data directories, stopped, started, restarted and flushed by PID, so a scenario that
//! restarts or flushes a service never touches the machine's shared ones.
//!
//! The end-to-end tests use these too (`tests/src/private.rs` wraps them). Every server is a
//! direct child in its own process group under `setpriv --pdeathsig`, so a process that dies
//! abruptly still takes its servers with it; `Daemon`'s `Drop` SIGKILLs the group. Errors
//! are values here, not panics: a scenario that cannot start its services reports why.

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

const MISSING: &str = "run `deploy/local-services.sh` (it installs postgresql, redis-server and \
                       rabbitmq-server from Debian packages)";

#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error("{0}")]
    Setup(String),
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
}

fn io(what: impl Into<String>) -> impl FnOnce(std::io::Error) -> ServiceError {
    let what = what.into();
    move |source| ServiceError::Io { what, source }
}

/// A free TCP port below the kernel's ephemeral range, so no outgoing connection takes it
/// while the service is down between a stop and a start.
pub fn free_port() -> Result<u16, ServiceError> {
    for _ in 0..500 {
        let port = fastrand::u16(20_000..32_000);
        let v4 = TcpListener::bind(("0.0.0.0", port)).is_ok();
        let v6 = match TcpListener::bind(("::", port)) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
        };
        if v4 && v6 {
            return Ok(port);
        }
    }
    Err(ServiceError::Setup(
        "no free TCP port in 20000..32000".into(),
    ))
}

fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

fn temp_dir(prefix: &str) -> Result<TempDir, ServiceError> {
    tempfile::Builder::new()
        .prefix(prefix)
        .tempdir()
        .map_err(io("temp dir"))
}

fn utf8(p: &Path) -> Result<&str, ServiceError> {
    p.to_str()
        .ok_or_else(|| ServiceError::Setup(format!("{} is not UTF-8", p.display())))
}

/// One server process, leader of its own process group, logging to a file.
#[derive(Debug)]
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Daemon {
    fn spawn(
        name: &str,
        user: Option<&str>,
        death_signal: &str,
        program: &str,
        args: &[&str],
        log: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> Result<Daemon, ServiceError> {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .map_err(io(format!("open {}", log.display())))?;
        let err = file.try_clone().map_err(io("clone log handle"))?;
        let mut cmd = Command::new("setpriv");
        if let Some(user) = user {
            cmd.args([
                &format!("--reuid={user}"),
                &format!("--regid={user}"),
                "--init-groups",
            ]);
        }
        cmd.args(["--pdeathsig", death_signal, "--", program])
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::from(file))
            .stderr(Stdio::from(err))
            .process_group(0);
        configure(&mut cmd);
        let child = cmd.spawn().map_err(|e| {
            ServiceError::Setup(format!(
                "cannot start {name} (setpriv … {program}): {e}; {MISSING}"
            ))
        })?;
        Ok(Daemon {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reaped: false,
        })
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).unwrap_or(i32::MAX))
    }

    fn check_alive(&mut self, what: &str) -> Result<(), ServiceError> {
        if let Ok(Some(status)) = self.child.try_wait() {
            self.reaped = true;
            return Err(ServiceError::Setup(format!(
                "{} exited ({status}) {what}; log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 30)
            )));
        }
        Ok(())
    }

    /// `signal` to the leader, wait up to `grace`, then SIGKILL the group.
    async fn stop(mut self, signal: Signal, grace: Duration) {
        let _ = kill(self.pid(), signal);
        let deadline = Instant::now() + grace;
        loop {
            if let Ok(Some(_)) = self.child.try_wait() {
                self.reaped = true;
                return;
            }
            if Instant::now() >= deadline {
                eprintln!("{} ignored {signal} for {grace:?}; SIGKILL", self.name);
                self.kill_group();
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn kill_group(&mut self) {
        if !self.reaped {
            let _ = killpg(self.pid(), Signal::SIGKILL);
            let _ = self.child.wait();
            self.reaped = true;
        }
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.kill_group();
    }
}

async fn output(
    program: &str,
    args: &[&str],
    envs: &[(&str, &Path)],
) -> Result<std::process::Output, ServiceError> {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output()
        .await
        .map_err(|e| ServiceError::Setup(format!("cannot run {program}: {e}; {MISSING}")))
}

// ---- Redis --------------------------------------------------------------------------------

/// A private `redis-server` without persistence: a restart loses everything.
#[derive(Debug)]
pub struct PrivateRedis {
    port: u16,
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl PrivateRedis {
    pub async fn launch() -> Result<PrivateRedis, ServiceError> {
        let mut redis = PrivateRedis {
            port: free_port()?,
            daemon: None,
            dir: temp_dir("drover-chaos-redis-")?,
        };
        redis.start().await?;
        Ok(redis)
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    async fn cli(&self, args: &[&str]) -> Option<String> {
        let port = self.port.to_string();
        let mut all = vec!["-p", port.as_str()];
        all.extend_from_slice(args);
        let out = output("redis-cli", &all, &[]).await.ok()?;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    pub async fn start(&mut self) -> Result<(), ServiceError> {
        if self.daemon.is_some() {
            return Ok(());
        }
        let port = self.port.to_string();
        let data = utf8(self.dir.path())?.to_owned();
        let mut daemon = Daemon::spawn(
            &format!("redis:{port}"),
            None,
            "KILL",
            "redis-server",
            &[
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                &data,
            ],
            &self.dir.path().join("redis.log"),
            |_| {},
        )?;
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            daemon.check_alive("while starting")?;
            if self.cli(&["ping"]).await.as_deref() == Some("PONG") {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::Setup(format!(
                    "private redis on {port} did not answer PING within 30 s"
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop(Signal::SIGTERM, Duration::from_secs(20)).await;
        }
    }

    /// SIGKILL: a crash, everything in memory gone.
    pub fn kill(&mut self) {
        drop(self.daemon.take());
    }

    pub async fn flushall(&self) -> Result<(), ServiceError> {
        match self.cli(&["FLUSHALL"]).await.as_deref() {
            Some("OK") => Ok(()),
            other => Err(ServiceError::Setup(format!(
                "redis-cli FLUSHALL answered {other:?}"
            ))),
        }
    }
}

// ---- Postgres -----------------------------------------------------------------------------

/// A private PostgreSQL cluster (`initdb` into a temp dir, run as the `postgres` OS user) with
/// a `drover`/`drover` superuser role and a `drover` database. The data survives restarts.
#[derive(Debug)]
pub struct PrivatePostgres {
    port: u16,
    bin: PathBuf,
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl PrivatePostgres {
    pub async fn launch() -> Result<PrivatePostgres, ServiceError> {
        let bin = Self::find_bin()?;
        let dir = temp_dir("drover-chaos-pg-")?;
        // The server runs as `postgres`: it must reach its data dir inside our temp dir.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755))
            .map_err(io("chmod temp dir"))?;
        let data = dir.path().join("data");
        fs::create_dir(&data).map_err(io("create data dir"))?;
        let chown = Command::new("chown")
            .arg("postgres:postgres")
            .arg(&data)
            .status()
            .map_err(io("run chown"))?;
        if !chown.success() {
            return Err(ServiceError::Setup(format!(
                "chown postgres:postgres {} failed; {MISSING}",
                data.display()
            )));
        }
        let out = Command::new("setpriv")
            .args([
                "--reuid=postgres",
                "--regid=postgres",
                "--init-groups",
                "--",
            ])
            .arg(bin.join("initdb"))
            .args(["-A", "trust", "-U", "postgres", "-E", "UTF8", "--locale=C"])
            .arg("--no-sync")
            .arg("-D")
            .arg(&data)
            .current_dir(dir.path())
            .output()
            .map_err(io("run initdb"))?;
        if !out.status.success() {
            return Err(ServiceError::Setup(format!(
                "initdb failed: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            )));
        }
        let port = free_port()?;
        // `fsync = off` survives what these tests do to Postgres (its processes killed, never
        // the machine): written WAL is in the kernel's page cache. `synchronous_commit` must
        // stay on: off, a commit is acknowledged while its WAL is still in Postgres's own
        // buffers, and a SIGKILL loses it after its effects (an agent command published, a
        // message acked) have left — the chaos crash scenario found a run stuck that way.
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = on\n\
             full_page_writes = off\n",
            data.display()
        );
        let mut file = OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .map_err(io("open postgresql.conf"))?;
        std::io::Write::write_all(&mut file, conf.as_bytes())
            .map_err(io("write postgresql.conf"))?;
        let mut pg = PrivatePostgres {
            port,
            bin,
            daemon: None,
            dir,
        };
        pg.start().await?;
        let mut conn = PgConnection::connect(&pg.admin_url()).await?;
        for sql in [
            "CREATE ROLE drover LOGIN SUPERUSER PASSWORD 'drover'",
            "CREATE DATABASE drover OWNER drover",
        ] {
            sqlx::query(sql).execute(&mut conn).await?;
        }
        let _ = conn.close().await;
        Ok(pg)
    }

    fn find_bin() -> Result<PathBuf, ServiceError> {
        let mut bins: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("initdb").exists())
                    .collect()
            })
            .unwrap_or_default();
        bins.sort();
        bins.pop().ok_or_else(|| {
            ServiceError::Setup(format!("no /usr/lib/postgresql/*/bin/initdb; {MISSING}"))
        })
    }

    /// The `drover` database, as drover's processes use it.
    pub fn url(&self) -> String {
        format!("postgres://drover:drover@127.0.0.1:{}/drover", self.port)
    }

    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub async fn start(&mut self) -> Result<(), ServiceError> {
        if self.daemon.is_some() {
            return Ok(());
        }
        let data = self.dir.path().join("data");
        let mut daemon = Daemon::spawn(
            &format!("postgres:{}", self.port),
            Some("postgres"),
            // Immediate shutdown if chaos dies: it must not wait for clients.
            "QUIT",
            utf8(&self.bin.join("postgres"))?,
            &["-D", utf8(&data)?],
            &self.dir.path().join("postgres.log"),
            |cmd| {
                cmd.current_dir(self.dir.path());
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            daemon.check_alive("while starting")?;
            if let Ok(conn) = PgConnection::connect(&self.admin_url()).await {
                let _ = conn.close().await;
                break;
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::Setup(format!(
                    "private postgres on {} did not accept connections within 60 s:\n{}",
                    self.port,
                    tail(&daemon.log, 30)
                )));
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    /// Fast shutdown (SIGINT: sessions are disconnected).
    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop(Signal::SIGINT, Duration::from_secs(60)).await;
        }
    }

    /// SIGKILL of the whole group (a crash; the next start runs crash recovery).
    pub fn kill(&mut self) {
        drop(self.daemon.take());
    }
}

// ---- RabbitMQ -----------------------------------------------------------------------------

/// A private RabbitMQ node beside the shared one, run from `/usr/lib/rabbitmq/bin` with its
/// own Erlang cookie in its own `HOME`, its own AMQP and distribution ports, no plugins, and
/// its Mnesia directory in the temp dir (durable queues survive restarts). The AMQP port is
/// set only through `listeners.tcp.default` (also setting `RABBITMQ_NODE_PORT` makes the node
/// bind it twice and die). Boots in about 4-6 s on the 2-core machine.
#[derive(Debug)]
pub struct PrivateRabbit {
    port: u16,
    dist_port: u16,
    node: String,
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl PrivateRabbit {
    pub async fn launch() -> Result<PrivateRabbit, ServiceError> {
        let dir = temp_dir("drover-chaos-rabbit-")?;
        let port = free_port()?;
        let dist_port = loop {
            let p = free_port()?;
            if p != port {
                break p;
            }
        };
        let tag = format!("{}-{}", std::process::id(), fastrand::u32(..));
        let home = dir.path().join("home");
        fs::create_dir(&home).map_err(io("create home"))?;
        let cookie = home.join(".erlang.cookie");
        let value: String = (0..32).map(|_| fastrand::uppercase()).collect();
        fs::write(&cookie, value).map_err(io("write cookie"))?;
        // Erlang refuses a cookie file that others can read.
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400))
            .map_err(io("chmod cookie"))?;
        fs::write(dir.path().join("enabled_plugins"), "[].\n").map_err(io("plugins file"))?;
        fs::write(dir.path().join("rabbitmq-env.conf"), "").map_err(io("env file"))?;
        fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\nloopback_users = none\n"),
        )
        .map_err(io("rabbitmq.conf"))?;
        let mut rabbit = PrivateRabbit {
            port,
            dist_port,
            node: format!("rabbit-chaos-{tag}@localhost"),
            daemon: None,
            dir,
        };
        rabbit.start().await?;
        Ok(rabbit)
    }

    /// The default vhost of this node, as guest.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    async fn ctl(&self, args: &[&str]) -> Result<std::process::Output, ServiceError> {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        output(
            "/usr/lib/rabbitmq/bin/rabbitmqctl",
            &all,
            &[("HOME", &self.dir.path().join("home"))],
        )
        .await
    }

    pub async fn start(&mut self) -> Result<(), ServiceError> {
        if self.daemon.is_some() {
            return Ok(());
        }
        let base = self.dir.path();
        let mut daemon = Daemon::spawn(
            &self.node,
            None,
            // The wrapper script turns SIGTERM into a clean stop of the VM.
            "TERM",
            "/usr/lib/rabbitmq/bin/rabbitmq-server",
            &[],
            &base.join("rabbitmq.out.log"),
            |cmd| {
                cmd.current_dir(base)
                    .env("HOME", base.join("home"))
                    .env("RABBITMQ_NODENAME", &self.node)
                    .env("RABBITMQ_DIST_PORT", self.dist_port.to_string())
                    .env("RABBITMQ_MNESIA_BASE", base.join("mnesia"))
                    .env("RABBITMQ_LOG_BASE", base.join("log"))
                    .env(
                        "RABBITMQ_ENABLED_PLUGINS_FILE",
                        base.join("enabled_plugins"),
                    )
                    .env("RABBITMQ_CONFIG_FILE", base.join("rabbitmq.conf"))
                    .env("RABBITMQ_CONF_ENV_FILE", base.join("rabbitmq-env.conf"))
                    .env(
                        "RABBITMQ_ADVANCED_CONFIG_FILE",
                        base.join("advanced.config"),
                    )
                    .env_remove("RABBITMQ_NODE_PORT");
            },
        )?;
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            daemon.check_alive("while booting")?;
            let out = self
                .ctl(&["-q", "await_startup", "--timeout", "20"])
                .await?;
            if out.status.success() {
                break;
            }
            if Instant::now() >= deadline {
                return Err(ServiceError::Setup(format!(
                    "private rabbitmq {} did not start within 120 s: {}",
                    self.node,
                    String::from_utf8_lossy(&out.stderr)
                )));
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        self.daemon = Some(daemon);
        Ok(())
    }

    pub async fn stop(&mut self) {
        if let Some(d) = self.daemon.take() {
            d.stop(Signal::SIGTERM, Duration::from_secs(60)).await;
        }
    }

    /// SIGKILL of the wrapper and the VM (a crash).
    pub fn kill(&mut self) {
        drop(self.daemon.take());
    }
}
