//! Private RabbitMQ, Postgres and Redis instances for one test: their own ports and their own
//! data directories under a temp dir, stopped, started and restarted by pid. A test that
//! stops, restarts or flushes a service uses one of these, so the shared instances on the
//! default ports (which parallel tests use) are never touched.
//!
//! Every service runs as a direct child in its own process group, under
//! `setpriv --pdeathsig`, so a test process killed before its destructors run (a nextest
//! timeout) still takes its services down with it. `stop()` asks for a clean shutdown by
//! signal and waits; `kill()` and `Drop` SIGKILL the whole process group.
//!
//! Measured on the 2-core build machine (see each type for details): Redis starts in about
//! 0.1 s, Postgres (initdb + start + role) in about 1.5 s and restarts in under 1 s, RabbitMQ
//! boots in about 4-6 s (restart: about 1 s to stop, then the same again to boot).

use std::fs::{self, OpenOptions};
use std::net::TcpListener;
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::time::{Duration, Instant};

use nix::sys::signal::{Signal, kill, killpg};
use nix::unistd::Pid;
use sqlx::{Connection, PgConnection};
use tempfile::TempDir;

const MISSING: &str = "run `deploy/local-services.sh` (it installs postgresql, redis-server and \
                       rabbitmq-server from Debian packages)";

/// A free TCP port outside the kernel's ephemeral range (32768-60999 here), so an outgoing
/// connection cannot take it while the service is stopped between a stop and a start.
fn free_port() -> u16 {
    for _ in 0..500 {
        let port = fastrand::u16(20_000..32_000);
        let v4 = TcpListener::bind(("0.0.0.0", port)).is_ok();
        // RabbitMQ listens on `::` as well; a v6 failure other than "in use" (no IPv6) is fine.
        let v6 = match TcpListener::bind(("::", port)) {
            Ok(_) => true,
            Err(e) => e.kind() != std::io::ErrorKind::AddrInUse,
        };
        if v4 && v6 {
            return port;
        }
    }
    panic!("no free TCP port found in 20000..32000");
}

/// The last `n` lines of a log file, for panic messages.
fn tail(path: &Path, n: usize) -> String {
    let text = fs::read_to_string(path).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}

/// One service process: the leader of its own process group, logging to a file.
struct Daemon {
    name: String,
    child: Child,
    log: PathBuf,
    reaped: bool,
}

impl Daemon {
    /// Spawns `program args…` through `setpriv` (dropping to `user` if given, with a parent
    /// death signal) in a new process group, appending stdout and stderr to `log`.
    fn spawn(
        name: &str,
        user: Option<&str>,
        death_signal: &str,
        program: &str,
        args: &[&str],
        log: &Path,
        configure: impl FnOnce(&mut Command),
    ) -> Daemon {
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap_or_else(|e| panic!("cannot open {}: {e}", log.display()));
        let err = file.try_clone().expect("clone log file handle");
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
        let child = cmd.spawn().unwrap_or_else(|e| {
            panic!("cannot start {name} (setpriv … {program}): {e}; setpriv is in util-linux; {MISSING}")
        });
        Daemon {
            name: name.to_owned(),
            child,
            log: log.to_owned(),
            reaped: false,
        }
    }

    fn pid(&self) -> Pid {
        Pid::from_raw(i32::try_from(self.child.id()).expect("pid fits i32"))
    }

    /// The exit status once the process has exited; `None` while it runs.
    fn exited(&mut self) -> Option<ExitStatus> {
        let status = self.child.try_wait().ok().flatten();
        if status.is_some() {
            self.reaped = true;
        }
        status
    }

    /// Panics with the log tail if the process has already exited.
    fn assert_alive(&mut self, what: &str) {
        if let Some(status) = self.exited() {
            panic!(
                "{} exited ({status}) {what}; log {}:\n{}",
                self.name,
                self.log.display(),
                tail(&self.log, 40)
            );
        }
    }

    /// Sends `signal` to the leader and waits up to `grace` for it to exit; then SIGKILLs the
    /// whole process group.
    async fn stop(mut self, signal: Signal, grace: Duration) {
        let _ = kill(self.pid(), signal);
        let deadline = Instant::now() + grace;
        while self.exited().is_none() {
            if Instant::now() >= deadline {
                eprintln!(
                    "{} ignored {signal} for {grace:?}; sending SIGKILL to its process group",
                    self.name
                );
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

async fn run_output(program: &str, args: &[&str], envs: &[(&str, &Path)]) -> std::process::Output {
    let mut cmd = tokio::process::Command::new(program);
    cmd.args(args).stdin(Stdio::null()).kill_on_drop(true);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    cmd.output()
        .await
        .unwrap_or_else(|e| panic!("cannot run {program}: {e}; {MISSING}"))
}

// ---- Redis --------------------------------------------------------------------------------

/// A private `redis-server` without persistence: a restart loses everything, like a Redis
/// that died. Starts in about 0.1 s.
pub struct PrivateRedis {
    port: u16,
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl PrivateRedis {
    /// Starts a new instance on a free port.
    pub async fn launch() -> PrivateRedis {
        let dir = tempfile::Builder::new()
            .prefix("drover-redis-")
            .tempdir()
            .expect("temp dir");
        let mut redis = PrivateRedis {
            port: free_port(),
            daemon: None,
            dir,
        };
        redis.start().await;
        redis
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.daemon.is_some()
    }

    async fn cli(&self, args: &[&str]) -> Option<String> {
        let port = self.port.to_string();
        let mut all = vec!["-p", port.as_str()];
        all.extend_from_slice(args);
        let out = run_output("redis-cli", &all, &[]).await;
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Starts the server (it must be stopped) and waits until it answers PING.
    pub async fn start(&mut self) {
        assert!(self.daemon.is_none(), "private redis already running");
        let started = Instant::now();
        let port = self.port.to_string();
        let data = self
            .dir
            .path()
            .to_str()
            .expect("utf-8 temp path")
            .to_owned();
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
        );
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            daemon.assert_alive("while starting");
            if self.cli(&["ping"]).await.as_deref() == Some("PONG") {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "private redis on port {port} did not answer PING within 30 s; log:\n{}",
                tail(&daemon.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "private redis up on port {port} in {:.1} s",
            started.elapsed().as_secs_f64()
        );
        self.daemon = Some(daemon);
    }

    /// SIGTERM, and wait for the exit.
    pub async fn stop(&mut self) {
        let daemon = self.daemon.take().expect("private redis not running");
        daemon.stop(Signal::SIGTERM, Duration::from_secs(20)).await;
    }

    /// SIGKILL (a crash).
    pub fn kill(&mut self) {
        drop(self.daemon.take().expect("private redis not running"));
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }

    /// `FLUSHALL`: every key of every database gone.
    pub async fn flushall(&self) {
        let reply = self.cli(&["FLUSHALL"]).await;
        assert_eq!(reply.as_deref(), Some("OK"), "redis-cli FLUSHALL failed");
    }
}

// ---- Postgres -----------------------------------------------------------------------------

/// A private PostgreSQL cluster (`initdb` into a temp dir, run as the `postgres` OS user) with
/// a `drover`/`drover` superuser role and a `drover` database. `stop()` is a fast shutdown
/// (SIGINT to the postmaster, what `pg_ctl stop -m fast` sends); the data survives restarts.
/// initdb + first start take about 1.5 s here; a restart under 1 s.
pub struct PrivatePostgres {
    port: u16,
    bin: PathBuf,
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl PrivatePostgres {
    /// Initialises a cluster, starts it on a free port and creates role and database.
    pub async fn launch() -> PrivatePostgres {
        let bin = Self::find_bin();
        let dir = tempfile::Builder::new()
            .prefix("drover-pg-")
            .tempdir()
            .expect("temp dir");
        // The server runs as `postgres`: it must reach its data dir inside our temp dir.
        fs::set_permissions(dir.path(), fs::Permissions::from_mode(0o755)).expect("chmod");
        let data = dir.path().join("data");
        fs::create_dir(&data).expect("create data dir");
        let chown = Command::new("chown")
            .args(["postgres:postgres"])
            .arg(&data)
            .status()
            .expect("run chown");
        assert!(
            chown.success(),
            "chown postgres:postgres {} failed (is there a `postgres` user? {MISSING})",
            data.display()
        );
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
            .unwrap_or_else(|e| panic!("cannot run initdb: {e}; {MISSING}"));
        assert!(
            out.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let port = free_port();
        let conf = format!(
            "\nlisten_addresses = '127.0.0.1'\nport = {port}\nunix_socket_directories = '{}'\n\
             max_connections = 300\nfsync = off\nsynchronous_commit = off\n\
             full_page_writes = off\n",
            data.display()
        );
        let mut file = OpenOptions::new()
            .append(true)
            .open(data.join("postgresql.conf"))
            .expect("open postgresql.conf");
        std::io::Write::write_all(&mut file, conf.as_bytes()).expect("write postgresql.conf");
        let mut pg = PrivatePostgres {
            port,
            bin,
            daemon: None,
            dir,
        };
        pg.start().await;
        let mut conn = PgConnection::connect(&pg.admin_url())
            .await
            .expect("connect to private postgres");
        for sql in [
            "CREATE ROLE drover LOGIN SUPERUSER PASSWORD 'drover'",
            "CREATE DATABASE drover OWNER drover",
        ] {
            sqlx::query(sql)
                .execute(&mut conn)
                .await
                .unwrap_or_else(|e| panic!("{sql}: {e}"));
        }
        let _ = conn.close().await;
        pg
    }

    fn find_bin() -> PathBuf {
        let mut bins: Vec<PathBuf> = fs::read_dir("/usr/lib/postgresql")
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path().join("bin"))
                    .filter(|p| p.join("initdb").exists())
                    .collect()
            })
            .unwrap_or_default();
        // Highest major version: "15" < "16" sorts right for the two-digit versions in use.
        bins.sort();
        bins.pop()
            .unwrap_or_else(|| panic!("no /usr/lib/postgresql/*/bin/initdb; {MISSING}"))
    }

    /// The `drover` database, as drover's processes should use it.
    pub fn url(&self) -> String {
        format!("postgres://drover:drover@127.0.0.1:{}/drover", self.port)
    }

    /// The `postgres` superuser on the `postgres` database (trust authentication).
    pub fn admin_url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn is_running(&self) -> bool {
        self.daemon.is_some()
    }

    /// Starts the postmaster (it must be stopped) and waits until it accepts connections.
    pub async fn start(&mut self) {
        assert!(self.daemon.is_none(), "private postgres already running");
        let started = Instant::now();
        let data = self.dir.path().join("data");
        let data = data.to_str().expect("utf-8 temp path");
        let mut daemon = Daemon::spawn(
            &format!("postgres:{}", self.port),
            Some("postgres"),
            // Immediate shutdown if the test process dies: it must not wait for clients.
            "QUIT",
            self.bin.join("postgres").to_str().expect("utf-8 path"),
            &["-D", data],
            &self.dir.path().join("postgres.log"),
            |cmd| {
                cmd.current_dir(self.dir.path());
            },
        );
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            daemon.assert_alive("while starting");
            if let Ok(conn) = PgConnection::connect(&self.admin_url()).await {
                let _ = conn.close().await;
                break;
            }
            assert!(
                Instant::now() < deadline,
                "private postgres on port {} did not accept connections within 60 s; log:\n{}",
                self.port,
                tail(&daemon.log, 40)
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        eprintln!(
            "private postgres up on port {} in {:.1} s",
            self.port,
            started.elapsed().as_secs_f64()
        );
        self.daemon = Some(daemon);
    }

    /// Fast shutdown (SIGINT: open sessions are disconnected), and wait for the exit.
    pub async fn stop(&mut self) {
        let daemon = self.daemon.take().expect("private postgres not running");
        daemon.stop(Signal::SIGINT, Duration::from_secs(60)).await;
    }

    /// SIGKILL of the whole process group (a crash; the next start runs crash recovery).
    pub fn kill(&mut self) {
        drop(self.daemon.take().expect("private postgres not running"));
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }
}

// ---- RabbitMQ -----------------------------------------------------------------------------

/// A private RabbitMQ node `rabbit-<tag>@localhost` beside the shared one, run as root from
/// `/usr/lib/rabbitmq/bin/rabbitmq-server` (the `/usr/sbin` wrapper would `su` to the
/// `rabbitmq` user and redirect its output to /var/log). It has its own Erlang cookie in its
/// own `HOME` (so `rabbitmqctl` with that `HOME` reaches it and nothing else does), its own
/// AMQP and distribution ports (the shared node holds 5672 and 25672, the default
/// distribution port of any node on 5672), no plugins, and its Mnesia directory in the temp
/// dir, so durable queues and persistent messages survive `restart()`.
///
/// The AMQP port is set only through `listeners.tcp.default` in its config file; setting
/// `RABBITMQ_NODE_PORT` as well makes the node bind the port twice and die with `eaddrinuse`.
///
/// Measured here (2 cores): the node boots and passes `rabbitmqctl await_startup` about 4-6 s
/// after spawn; a graceful stop (SIGTERM to the wrapper, which stops the VM) takes about 1 s.
pub struct PrivateRabbit {
    port: u16,
    dist_port: u16,
    node: String,
    daemon: Option<Daemon>,
    dir: TempDir,
}

impl PrivateRabbit {
    /// Writes the node's config and cookie, then boots it.
    pub async fn launch() -> PrivateRabbit {
        let dir = tempfile::Builder::new()
            .prefix("drover-rabbit-")
            .tempdir()
            .expect("temp dir");
        let port = free_port();
        let dist_port = loop {
            let p = free_port();
            if p != port {
                break p;
            }
        };
        let tag = format!("{}-{}", std::process::id(), fastrand::u32(..));
        let home = dir.path().join("home");
        fs::create_dir(&home).expect("create home");
        let cookie = home.join(".erlang.cookie");
        let value: String = (0..32).map(|_| fastrand::uppercase()).collect();
        fs::write(&cookie, value).expect("write cookie");
        // Erlang refuses a cookie file that others can read.
        fs::set_permissions(&cookie, fs::Permissions::from_mode(0o400)).expect("chmod cookie");
        fs::write(dir.path().join("enabled_plugins"), "[].\n").expect("write plugins file");
        fs::write(dir.path().join("rabbitmq-env.conf"), "").expect("write env file");
        fs::write(
            dir.path().join("rabbitmq.conf"),
            format!("listeners.tcp.default = {port}\nloopback_users = none\n"),
        )
        .expect("write rabbitmq.conf");
        let mut rabbit = PrivateRabbit {
            port,
            dist_port,
            node: format!("rabbit-{tag}@localhost"),
            daemon: None,
            dir,
        };
        rabbit.start().await;
        rabbit
    }

    /// The default vhost `/` of this node, as guest.
    pub fn url(&self) -> String {
        format!("amqp://guest:guest@127.0.0.1:{}/%2f", self.port)
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// The Erlang node name, for `rabbitmqctl -n`.
    pub fn node(&self) -> &str {
        &self.node
    }

    pub fn is_running(&self) -> bool {
        self.daemon.is_some()
    }

    /// Runs `rabbitmqctl -n <node> args…` with this node's cookie.
    pub async fn ctl(&self, args: &[&str]) -> std::process::Output {
        let mut all = vec!["-n", self.node.as_str()];
        all.extend_from_slice(args);
        run_output(
            "/usr/lib/rabbitmq/bin/rabbitmqctl",
            &all,
            &[("HOME", &self.dir.path().join("home"))],
        )
        .await
    }

    /// Boots the node (it must be stopped) and waits for `rabbitmqctl await_startup`.
    pub async fn start(&mut self) {
        assert!(self.daemon.is_none(), "private rabbitmq already running");
        let started = Instant::now();
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
        );
        let deadline = Instant::now() + Duration::from_secs(120);
        loop {
            daemon.assert_alive("while booting");
            // Fails at once while the node is not registered with epmd yet.
            let out = self.ctl(&["-q", "await_startup", "--timeout", "20"]).await;
            if out.status.success() {
                break;
            }
            if Instant::now() >= deadline {
                let node_log = base.join("log").join(format!("{}.log", self.node));
                panic!(
                    "private rabbitmq {} did not start within 120 s: {}\n--- stdout ---\n{}\n--- node log ---\n{}",
                    self.node,
                    String::from_utf8_lossy(&out.stderr),
                    tail(&daemon.log, 30),
                    tail(&node_log, 30)
                );
            }
            tokio::time::sleep(Duration::from_millis(250)).await;
        }
        eprintln!(
            "private rabbitmq {} up on port {} in {:.1} s",
            self.node,
            self.port,
            started.elapsed().as_secs_f64()
        );
        self.daemon = Some(daemon);
    }

    /// A clean stop (SIGTERM to the wrapper, which stops the VM), and wait for the exit.
    pub async fn stop(&mut self) {
        let daemon = self.daemon.take().expect("private rabbitmq not running");
        let started = Instant::now();
        daemon.stop(Signal::SIGTERM, Duration::from_secs(60)).await;
        eprintln!(
            "private rabbitmq {} stopped in {:.1} s",
            self.node,
            started.elapsed().as_secs_f64()
        );
    }

    /// SIGKILL of the wrapper and the VM (a crash).
    pub fn kill(&mut self) {
        drop(self.daemon.take().expect("private rabbitmq not running"));
    }

    pub async fn restart(&mut self) {
        self.stop().await;
        self.start().await;
    }
}
