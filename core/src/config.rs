//! Typed settings shared by the binaries. Each binary has one `Settings` struct built from
//! these parts and loaded once in `main` by [`load`]: defaults, then an optional TOML file,
//! then `DROVER_…` environment variables with `__` between levels
//! (`DROVER_DATABASE__URL`, `DROVER_REDIS__PREFIX`). Connection URLs may hold passwords, so
//! they are [`SecretString`]s that never print.

use std::path::Path;
use std::time::Duration;

use figment::Figment;
use figment::providers::{Env, Format, Toml};
use secrecy::SecretString;
use serde::Deserialize;
use serde::de::DeserializeOwned;

use crate::error::CoreError;

/// Loads `T` from defaults (its serde defaults), `file` if given, then the environment.
pub fn load<T: DeserializeOwned>(file: Option<&Path>) -> Result<T, CoreError> {
    let mut fig = Figment::new();
    if let Some(path) = file {
        fig = fig.merge(Toml::file_exact(path));
    }
    fig.merge(Env::prefixed("DROVER_").split("__"))
        .extract()
        .map_err(|e| CoreError::Config(Box::new(e)))
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct DatabaseSettings {
    pub url: SecretString,
    pub max_connections: u32,
    pub acquire_timeout_ms: u64,
}

impl Default for DatabaseSettings {
    fn default() -> Self {
        Self {
            url: "postgres://drover:drover@127.0.0.1:5432/drover".into(),
            max_connections: 20,
            acquire_timeout_ms: 5_000,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct AmqpSettings {
    /// Includes the vhost, e.g. `amqp://guest:guest@127.0.0.1:5672/%2f`.
    pub url: SecretString,
    /// `x-delivery-limit` of the quorum queues: deliveries before a message is dead-lettered.
    pub delivery_limit: u32,
    /// Unacknowledged deliveries a consumer holds at once.
    pub prefetch: u16,
}

impl Default for AmqpSettings {
    fn default() -> Self {
        Self {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            delivery_limit: 10,
            prefetch: 32,
        }
    }
}

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RedisSettings {
    pub url: SecretString,
    /// Prefix of every key and channel, so several stacks (or tests) share one Redis.
    pub prefix: String,
}

impl Default for RedisSettings {
    fn default() -> Self {
        Self {
            url: "redis://127.0.0.1:6379".into(),
            prefix: "drover:".into(),
        }
    }
}

/// Heartbeat and lease timing, decided by the API and handed to agents at registration.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct LeaseSettings {
    pub heartbeat_interval_ms: u64,
    /// An agent silent for this long is no longer live, and its leases expire.
    pub lease_ttl_ms: u64,
}

impl Default for LeaseSettings {
    fn default() -> Self {
        Self {
            heartbeat_interval_ms: 2_000,
            lease_ttl_ms: 10_000,
        }
    }
}

impl LeaseSettings {
    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

/// The outbox relay's timing.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RelaySettings {
    /// Upper bound on how long a committed row waits if its NOTIFY was missed.
    pub poll_interval_ms: u64,
    /// Rows published per batch (publishes are pipelined, confirms awaited together).
    pub batch_size: i64,
    /// How long a claimed row is left to its relay before any relay may publish it again: the
    /// delay before the rows of a relay that died mid-publish go out.
    pub claim_lease_ms: u64,
}

impl Default for RelaySettings {
    fn default() -> Self {
        Self {
            poll_interval_ms: 1_000,
            batch_size: 200,
            claim_lease_ms: 5_000,
        }
    }
}
