//! The agent's typed settings, loaded once by `main` (or composed by `drover dev`) with
//! [`drover_core::config::load`]: defaults, then an optional TOML file, then `DROVER_…`
//! environment variables with `__` between levels (`DROVER_AGENT_ID`, `DROVER_CAPACITY`,
//! `DROVER_AMQP__URL`, `DROVER_LABELS__GPU=true`, `DROVER_EXECUTION_JOURNAL=/path`).

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use drover_core::config::AmqpSettings;
use drover_core::ids::AgentId;
use drover_core::observe::MetricsSettings;
use drover_core::spec::{ExecutorName, validate_pool};
use secrecy::SecretString;
use serde::Deserialize;

use crate::error::AgentError;

/// Largest capacity the API accepts at registration (`RegisterAgentRequest.capacity`).
pub const MAX_CAPACITY: u32 = 1024;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Stable identity across restarts; names the command queue `drover.agent.<id>`.
    /// Defaults to the host name, so one agent per host needs no configuration.
    pub agent_id: String,
    /// Where the API's gRPC `AgentService` listens.
    pub api_endpoint: String,
    /// The agent token bound to `agent_id` (`DROVER_AGENT_TOKEN`; made with
    /// `drover admin agent-token` or AdminService.CreateToken by an operator).
    pub agent_token: SecretString,
    /// Worker pool this agent serves.
    pub pool: String,
    /// Labels runs may require (e.g. `gpu = "true"`). Values given as numbers or booleans
    /// (`DROVER_LABELS__GPU=true` reads as a boolean) are kept as their text.
    #[serde(deserialize_with = "labels_as_text")]
    pub labels: BTreeMap<String, String>,
    /// Runs executed at once; also the AMQP prefetch of the command queue.
    pub capacity: u32,
    /// Which executor runs this agent's runs (see [`ExecutorKind`]).
    pub executor: ExecutorKind,
    /// Executors a spec may ask for by name (`spec.executor`), besides the agent's own:
    /// a list, or one string of comma-separated names (`DROVER_ALLOWED_EXECUTORS=process,mock`).
    /// Empty: only the agent's own.
    #[serde(deserialize_with = "names_list")]
    pub allowed_executors: Vec<String>,
    /// Where per-attempt workspaces are created (`<root>/<agent_id>/<execution>`). None: the
    /// system temp directory's `drover-workspaces`.
    pub workspace_root: Option<PathBuf>,
    /// Keep workspaces after the completion report is settled (tests, debugging).
    pub keep_workspaces: bool,
    /// `uid:gid` the Docker executor runs containers as (never root); the workspace is handed
    /// to it.
    pub run_as_user: String,
    /// `url` and `delivery_limit` are used; `prefetch` is not: the agent's prefetch is its
    /// `capacity`, one unacknowledged command per execution slot.
    pub amqp: AmqpSettings,
    /// On drain (SIGTERM, a `Drain` command, or the API asking in a heartbeat), how long
    /// running executions may take to finish before they are killed and handed back.
    pub drain_timeout_secs: u64,
    /// Where to append the execution journal (one JSON line per started, adopted or ended
    /// process; see [`crate::journal`]), for test oracles. None: no journal.
    pub execution_journal: Option<PathBuf>,
    /// `/metrics`, `/healthz`, `/readyz` (`DROVER_METRICS__LISTEN_ADDR`; empty = off).
    pub metrics: MetricsSettings,
    /// A started run's start is reported once it has run this long; a run that ends sooner
    /// reports its start with its completion (one call and one transaction fewer, the same
    /// history). The run shows ASSIGNED for up to this long after its process started.
    /// 0 = report every start at once.
    pub start_fold_ms: u64,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            agent_id: default_agent_id(),
            api_endpoint: "http://127.0.0.1:50051".to_owned(),
            agent_token: SecretString::from(String::new()),
            pool: "default".to_owned(),
            labels: BTreeMap::new(),
            capacity: 4,
            executor: ExecutorKind::Auto,
            allowed_executors: Vec::new(),
            workspace_root: None,
            keep_workspaces: false,
            run_as_user: DEFAULT_RUN_AS_USER.to_owned(),
            amqp: AmqpSettings::default(),
            drain_timeout_secs: 30,
            execution_journal: None,
            metrics: MetricsSettings::default(),
            start_fold_ms: 100,
        }
    }
}

/// `nobody:nogroup` on most distributions.
pub const DEFAULT_RUN_AS_USER: &str = "65534:65534";

/// `auto` picks Docker when its daemon answers at start-up, else the process executor (and
/// says so in the log).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Auto,
    Docker,
    Process,
    Mock,
}

/// A list of names, or one comma-separated string of them.
fn names_list<'de, D>(de: D) -> Result<Vec<String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum Names {
        One(String),
        Many(Vec<String>),
    }
    let names = match Names::deserialize(de)? {
        Names::One(s) => s.split(',').map(str::to_owned).collect(),
        Names::Many(v) => v,
    };
    Ok(names
        .into_iter()
        .map(|n| n.trim().to_owned())
        .filter(|n| !n.is_empty())
        .collect())
}

/// The host name, or `agent` when it cannot be read or is not a valid agent id (e.g. it holds
/// characters outside `[A-Za-z0-9._-]`); an explicit `agent_id` setting always wins.
fn default_agent_id() -> String {
    hostname::get()
        .ok()
        .and_then(|h| h.into_string().ok())
        .filter(|h| AgentId::parse(h).is_ok())
        .unwrap_or_else(|| "agent".to_owned())
}

/// A label value as configuration formats may type it.
#[derive(Deserialize)]
#[serde(untagged)]
enum LabelValue {
    Text(String),
    Bool(bool),
    Int(i64),
    Uint(u64),
    Float(f64),
}

fn labels_as_text<'de, D>(de: D) -> Result<BTreeMap<String, String>, D::Error>
where
    D: serde::Deserializer<'de>,
{
    let raw = BTreeMap::<String, LabelValue>::deserialize(de)?;
    Ok(raw
        .into_iter()
        .map(|(k, v)| {
            let text = match v {
                LabelValue::Text(s) => s,
                LabelValue::Bool(b) => b.to_string(),
                LabelValue::Int(i) => i.to_string(),
                LabelValue::Uint(u) => u.to_string(),
                LabelValue::Float(f) => f.to_string(),
            };
            (k, text)
        })
        .collect())
}

impl Settings {
    /// Checks what the API would refuse anyway, so a bad config fails at start-up with a
    /// message naming the setting rather than as a gRPC error later.
    pub fn validate(&self) -> Result<AgentId, AgentError> {
        let agent_id = AgentId::parse(&self.agent_id)
            .map_err(|msg| AgentError::InvalidSettings(format!("agent_id: {msg}")))?;
        if !(1..=MAX_CAPACITY).contains(&self.capacity) {
            return Err(AgentError::InvalidSettings(format!(
                "capacity: must be between 1 and {MAX_CAPACITY}, got {}",
                self.capacity
            )));
        }
        validate_pool(&self.pool)
            .map_err(|e| AgentError::InvalidSettings(format!("pool: {}", e.message)))?;
        if self.api_endpoint.trim().is_empty() {
            return Err(AgentError::InvalidSettings(
                "api_endpoint: must not be empty".to_owned(),
            ));
        }
        self.allowed()?;
        self.run_as()?;
        Ok(agent_id)
    }

    /// The executors a spec may name besides the agent's own.
    pub fn allowed(&self) -> Result<Vec<ExecutorName>, AgentError> {
        self.allowed_executors
            .iter()
            .map(|n| {
                ExecutorName::parse(n).ok_or_else(|| {
                    AgentError::InvalidSettings(format!(
                        "allowed_executors: {n:?} is not one of docker, process, mock"
                    ))
                })
            })
            .collect()
    }

    /// `run_as_user` as numbers; root (uid 0) is refused.
    pub fn run_as(&self) -> Result<(u32, u32), AgentError> {
        let bad = || {
            AgentError::InvalidSettings(format!(
                "run_as_user: must be \"uid:gid\" with a non-zero uid, got {:?}",
                self.run_as_user
            ))
        };
        let (uid, gid) = self.run_as_user.split_once(':').ok_or_else(bad)?;
        let uid: u32 = uid.parse().map_err(|_| bad())?;
        let gid: u32 = gid.parse().map_err(|_| bad())?;
        if uid == 0 {
            return Err(bad());
        }
        Ok((uid, gid))
    }

    /// The root under which this agent's workspaces live.
    pub fn workspace_root(&self) -> PathBuf {
        self.workspace_root
            .clone()
            .unwrap_or_else(|| std::env::temp_dir().join("drover-workspaces"))
    }

    pub fn drain_timeout(&self) -> Duration {
        Duration::from_secs(self.drain_timeout_secs)
    }

    /// AMQP prefetch: one unacknowledged command per execution slot.
    pub fn prefetch(&self) -> u16 {
        u16::try_from(self.capacity).unwrap_or(u16::MAX)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid() {
        let s = Settings::default();
        assert!(s.validate().is_ok(), "{:?}", s.validate().err());
        assert_eq!(s.capacity, 4);
        assert_eq!(s.executor, ExecutorKind::Auto);
        assert_eq!(s.drain_timeout(), Duration::from_secs(30));
        assert_eq!(s.execution_journal, None);
    }

    #[test]
    fn the_journal_path_is_an_optional_setting() {
        // `DROVER_EXECUTION_JOURNAL` reaches serde as this key.
        let s: Settings = serde_json::from_str(r#"{"execution_journal": "/tmp/j.jsonl"}"#).unwrap();
        assert_eq!(
            s.execution_journal.as_deref(),
            Some(std::path::Path::new("/tmp/j.jsonl"))
        );
    }

    #[test]
    fn bad_values_name_the_setting() {
        let bad_id = Settings {
            agent_id: "a/b".into(),
            ..Settings::default()
        };
        assert!(
            bad_id
                .validate()
                .unwrap_err()
                .to_string()
                .contains("agent_id")
        );
        let bad_cap = Settings {
            capacity: 0,
            ..Settings::default()
        };
        assert!(
            bad_cap
                .validate()
                .unwrap_err()
                .to_string()
                .contains("capacity")
        );
        let bad_pool = Settings {
            pool: "Not A Pool".into(),
            ..Settings::default()
        };
        assert!(
            bad_pool
                .validate()
                .unwrap_err()
                .to_string()
                .contains("pool")
        );
    }

    #[test]
    fn label_values_of_any_scalar_type_become_text() {
        let s: Settings = serde_json::from_str(
            r#"{"agent_id": "a1", "labels": {"gpu": true, "cores": 8, "zone": "eu-1", "ratio": 0.5}}"#,
        )
        .unwrap();
        assert_eq!(s.labels["gpu"], "true");
        assert_eq!(s.labels["cores"], "8");
        assert_eq!(s.labels["zone"], "eu-1");
        assert_eq!(s.labels["ratio"], "0.5");
        assert_eq!(s.capacity, 4, "other settings keep their defaults");
    }

    #[test]
    fn executor_settings_parse() {
        let s: Settings = serde_json::from_str(
            r#"{"executor": "mock", "allowed_executors": "process, docker", "run_as_user": "1000:1000"}"#,
        )
        .unwrap();
        assert_eq!(s.executor, ExecutorKind::Mock);
        assert_eq!(
            s.allowed().unwrap(),
            vec![ExecutorName::Process, ExecutorName::Docker]
        );
        assert_eq!(s.run_as().unwrap(), (1000, 1000));
        let list: Settings = serde_json::from_str(r#"{"allowed_executors": ["mock"]}"#).unwrap();
        assert_eq!(list.allowed().unwrap(), vec![ExecutorName::Mock]);
        let bad = Settings {
            allowed_executors: vec!["podman".into()],
            ..Settings::default()
        };
        assert!(
            bad.validate()
                .unwrap_err()
                .to_string()
                .contains("allowed_executors")
        );
        let root = Settings {
            run_as_user: "0:0".into(),
            ..Settings::default()
        };
        assert!(
            root.validate()
                .unwrap_err()
                .to_string()
                .contains("run_as_user")
        );
    }

    #[test]
    fn executor_kind_parses_lowercase() {
        let k: ExecutorKind = serde_json::from_str("\"docker\"").unwrap();
        assert_eq!(k, ExecutorKind::Docker);
        let k: ExecutorKind = serde_json::from_str("\"process\"").unwrap();
        assert_eq!(k, ExecutorKind::Process);
        assert!(serde_json::from_str::<ExecutorKind>("\"podman\"").is_err());
    }
}
