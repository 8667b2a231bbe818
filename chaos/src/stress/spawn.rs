//! `--spawn-stack`: a throwaway drover stack for one stress run, like the end-to-end tests'
//! `Stack` (`tests/src/stack.rs`): `drover-api`, `drover-dispatcher` and N `drover-agent`
//! processes from a build directory, against the local services with a fresh database, vhost
//! and Redis key prefix. Stopped by PID (SIGTERM, then SIGKILL after 30 s) and cleaned up by
//! [`SpawnedStack::stop`]. The processes' logs go to `<out>/logs/`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use sqlx::PgPool;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};

use super::procstat::Watched;
use super::services::{self, Vhost};

#[derive(Debug, Clone)]
pub struct SpawnConfig {
    /// Where `drover-api`, `drover-dispatcher` and `drover-agent` are (e.g. `target/release`).
    pub bin_dir: PathBuf,
    pub agents: usize,
    pub agent_capacity: u32,
    pub pg_admin_url: String,
    pub redis_url: String,
    pub rabbit_host: String,
    pub log_dir: PathBuf,
    /// `RUST_LOG` for the processes.
    pub rust_log: String,
}

#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("{0}")]
    Setup(String),
    #[error("postgres: {0}")]
    Db(#[from] sqlx::Error),
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

#[derive(Debug)]
struct Proc {
    name: String,
    child: Child,
}

#[derive(Debug)]
pub struct SpawnedStack {
    pub endpoint: String,
    db_name: String,
    pg_admin_url: String,
    vhost: Option<Vhost>,
    procs: Vec<Proc>,
}

/// The directory of the running executable: `drover-chaos` is built next to the others.
pub fn default_bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("target/debug"))
}

impl SpawnedStack {
    pub async fn start(cfg: &SpawnConfig) -> Result<Self, SpawnError> {
        for bin in ["drover-api", "drover-dispatcher", "drover-agent"] {
            if !cfg.bin_dir.join(bin).exists() {
                return Err(SpawnError::Setup(format!(
                    "{} not found; build it (`cargo build --release --bins`) or pass --bin-dir",
                    cfg.bin_dir.join(bin).display()
                )));
            }
        }
        std::fs::create_dir_all(&cfg.log_dir)?;
        let tag = uuid::Uuid::now_v7().simple().to_string();
        let db_name = format!("drover_stress_{tag}");
        let database_url = services::create_database(&cfg.pg_admin_url, &db_name).await?;
        let mut stack = SpawnedStack {
            endpoint: String::new(),
            db_name,
            pg_admin_url: cfg.pg_admin_url.clone(),
            vhost: None,
            procs: Vec::new(),
        };
        // From here on, a failure still cleans up what exists.
        match stack.boot(cfg, &tag, &database_url).await {
            Ok(()) => Ok(stack),
            Err(e) => {
                stack.stop().await;
                Err(e)
            }
        }
    }

    async fn boot(
        &mut self,
        cfg: &SpawnConfig,
        tag: &str,
        database_url: &str,
    ) -> Result<(), SpawnError> {
        let vhost = Vhost::create(&format!("drover-stress-{tag}"), &cfg.rabbit_host)
            .map_err(SpawnError::Setup)?;
        let amqp_url = vhost.url.clone();
        self.vhost = Some(vhost);
        let prefix = format!("s{tag}:");
        let env = |cmd: &mut Command| {
            cmd.env("DROVER_DATABASE__URL", database_url)
                .env("DROVER_AMQP__URL", &amqp_url)
                .env("DROVER_REDIS__URL", &cfg.redis_url)
                .env("DROVER_REDIS__PREFIX", &prefix)
                .env("DROVER_LOG_FORMAT", "text")
                .env("RUST_LOG", &cfg.rust_log)
                .stdin(Stdio::null())
                .kill_on_drop(true);
        };
        let log = |name: &str| -> Result<(Stdio, Stdio), SpawnError> {
            let f = std::fs::File::create(cfg.log_dir.join(format!("{name}.log")))?;
            Ok((Stdio::from(f.try_clone()?), Stdio::from(f)))
        };

        let mut api = Command::new(cfg.bin_dir.join("drover-api"));
        env(&mut api);
        api.env("DROVER_LISTEN_ADDR", "127.0.0.1:0");
        let (_, err) = log("api")?;
        api.stdout(Stdio::piped()).stderr(err);
        let mut child = api.spawn()?;
        let stdout = child
            .stdout
            .take()
            .ok_or_else(|| SpawnError::Setup("api stdout".into()))?;
        self.procs.push(Proc {
            name: "api".into(),
            child,
        });
        let mut lines = BufReader::new(stdout).lines();
        let addr = tokio::time::timeout(Duration::from_secs(60), async {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some(addr) = line.strip_prefix("drover-api listening on ") {
                    return Some(addr.trim().to_owned());
                }
            }
            None
        })
        .await
        .ok()
        .flatten()
        .ok_or_else(|| {
            SpawnError::Setup(format!(
                "drover-api did not report its address; see {}",
                cfg.log_dir.join("api.log").display()
            ))
        })?;
        // Keep draining the API's stdout so it never blocks on a full pipe.
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
        self.endpoint = format!("http://{addr}");

        let mut disp = Command::new(cfg.bin_dir.join("drover-dispatcher"));
        env(&mut disp);
        let (out, err) = log("dispatcher")?;
        disp.stdout(out).stderr(err);
        self.procs.push(Proc {
            name: "dispatcher".into(),
            child: disp.spawn()?,
        });

        let mut ids = Vec::new();
        for i in 0..cfg.agents {
            let id = format!("stress-{tag}-{i}");
            let mut agent = Command::new(cfg.bin_dir.join("drover-agent"));
            env(&mut agent);
            agent
                .env("DROVER_AGENT_ID", &id)
                .env("DROVER_API_ENDPOINT", &self.endpoint)
                .env("DROVER_CAPACITY", cfg.agent_capacity.to_string())
                .env("DROVER_EXECUTOR", "docker")
                // So `--workload mock` measures the control plane on the same agents.
                .env("DROVER_ALLOWED_EXECUTORS", "mock");
            let name = format!("agent{i}");
            let (out, err) = log(&name)?;
            agent.stdout(out).stderr(err);
            self.procs.push(Proc {
                name,
                child: agent.spawn()?,
            });
            ids.push(id);
        }
        // Load starts only once every agent has registered.
        let db = PgPool::connect(database_url).await?;
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            let n: i64 = sqlx::query_scalar("SELECT count(*) FROM agents WHERE id = ANY($1)")
                .bind(&ids)
                .fetch_one(&db)
                .await
                .unwrap_or(0);
            if n == ids.len() as i64 {
                break;
            }
            if tokio::time::Instant::now() > deadline {
                db.close().await;
                return Err(SpawnError::Setup(format!(
                    "{n} of {} agents registered within 60 s; see {}",
                    ids.len(),
                    cfg.log_dir.display()
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        db.close().await;
        Ok(())
    }

    /// The stack's processes, for RSS/CPU sampling.
    pub fn watched(&self) -> Vec<Watched> {
        self.procs
            .iter()
            .filter_map(|p| {
                p.child.id().map(|pid| Watched {
                    name: p.name.clone(),
                    pid,
                })
            })
            .collect()
    }

    /// SIGTERM each process by PID (agents first), wait up to 30 s each, then drop the
    /// database and the vhost.
    pub async fn stop(mut self) {
        for p in self.procs.iter_mut().rev() {
            if let Some(pid) = p.child.id().and_then(|p| i32::try_from(p).ok()) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGTERM,
                );
            }
            if tokio::time::timeout(Duration::from_secs(30), p.child.wait())
                .await
                .is_err()
            {
                eprintln!("{} ignored SIGTERM for 30 s; killing", p.name);
                let _ = p.child.kill().await;
            }
        }
        self.vhost.take();
        services::drop_database(&self.pg_admin_url, &self.db_name).await;
    }
}
