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
use drover_core::spec::validate_pool;
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
    /// Worker pool this agent serves.
    pub pool: String,
    /// Labels runs may require (e.g. `gpu = "true"`). Values given as numbers or booleans
    /// (`DROVER_LABELS__GPU=true` reads as a boolean) are kept as their text.
    #[serde(deserialize_with = "labels_as_text")]
    pub labels: BTreeMap<String, String>,
    /// Runs executed at once; also the AMQP prefetch of the command queue.
    pub capacity: u32,
    /// Which executor runs containers.
    pub executor: ExecutorKind,
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
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            agent_id: default_agent_id(),
            api_endpoint: "http://127.0.0.1:50051".to_owned(),
            pool: "default".to_owned(),
            labels: BTreeMap::new(),
            capacity: 4,
            executor: ExecutorKind::Auto,
            amqp: AmqpSettings::default(),
            drain_timeout_secs: 30,
            execution_journal: None,
            metrics: MetricsSettings::default(),
        }
    }
}

/// `auto` picks Docker today; it will fall back to the process executor once that exists.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExecutorKind {
    Auto,
    Docker,
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
        Ok(agent_id)
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
    fn executor_kind_parses_lowercase() {
        let k: ExecutorKind = serde_json::from_str("\"docker\"").unwrap();
        assert_eq!(k, ExecutorKind::Docker);
        assert!(serde_json::from_str::<ExecutorKind>("\"podman\"").is_err());
    }
}
