//! `--spawn-stack`: a throwaway drover stack for one stress run — `drover-api`,
//! `drover-dispatcher` and N `drover-agent` processes against the local services with a fresh
//! database, vhost and Redis key prefix, started and stopped (by PID) through
//! [`crate::stack`], the one place that spawns stacks. The processes' logs go to
//! `<out>/logs/`.

use std::path::PathBuf;

use super::procstat::Watched;
use crate::stack::{Backing, Proxied, SharedServices, Stack, StackConfig, StackError};

pub use crate::stack::default_bin_dir;

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
    /// The agents' workspace root; `None`: the agent's default.
    pub workspace_root: Option<PathBuf>,
}

pub type SpawnError = StackError;

#[derive(Debug)]
pub struct SpawnedStack {
    pub endpoint: String,
    /// The spawned stack's bootstrapped token.
    pub token: String,
    stack: Stack,
}

impl SpawnedStack {
    pub async fn start(cfg: &SpawnConfig) -> Result<Self, SpawnError> {
        let stack = Stack::start(StackConfig {
            bin_dir: cfg.bin_dir.clone(),
            shared: SharedServices {
                pg_admin_url: cfg.pg_admin_url.clone(),
                redis_url: cfg.redis_url.clone(),
                rabbit_host: cfg.rabbit_host.clone(),
            },
            postgres: Backing::Shared,
            rabbit: Backing::Shared,
            redis: Backing::Shared,
            proxied: Proxied::default(),
            dispatchers: 1,
            agents: cfg.agents,
            agent_capacity: cfg.agent_capacity,
            agent_executor: "docker".into(),
            // So `--workload mock` measures the control plane on the same agents.
            allowed_executors: "mock".into(),
            env: cfg
                .workspace_root
                .iter()
                .map(|root| {
                    (
                        "DROVER_WORKSPACE_ROOT".to_owned(),
                        root.display().to_string(),
                    )
                })
                .collect(),
            api_env: Vec::new(),
            journal_dir: None,
            log_dir: cfg.log_dir.clone(),
            rust_log: cfg.rust_log.clone(),
        })
        .await?;
        Ok(SpawnedStack {
            endpoint: stack.endpoint.clone(),
            token: stack.token.clone(),
            stack,
        })
    }

    /// The stack's processes, for RSS/CPU sampling.
    pub fn watched(&self) -> Vec<Watched> {
        self.stack
            .running()
            .into_iter()
            .map(|(name, pid)| Watched { name, pid })
            .collect()
    }

    /// SIGTERM each process by PID (agents first), then drop the database and the vhost.
    pub async fn stop(self) {
        self.stack.stop().await;
    }
}
