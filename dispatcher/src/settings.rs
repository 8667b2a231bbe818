//! `drover-dispatcher` settings: defaults, optional TOML file, then `DROVER_…` variables
//! (`DROVER_POOLS` as a TOML array, e.g. `DROVER_POOLS='["default","gpu"]'`).

use drover_core::config::{
    AmqpSettings, DatabaseSettings, LeaseSettings, RedisSettings, RelaySettings,
};
use drover_core::observe::MetricsSettings;
use serde::Deserialize;

use crate::reaper::ReaperSettings;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// Pools whose run queues this dispatcher consumes.
    pub pools: Vec<String>,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub lease: LeaseSettings,
    pub relay: RelaySettings,
    /// Longest a run waiting for capacity sleeps before looking again if no wake-up came.
    pub capacity_recheck_ms: u64,
    pub reaper: ReaperSettings,
    /// `/metrics`, `/healthz`, `/readyz` (`DROVER_METRICS__LISTEN_ADDR`; empty = off).
    pub metrics: MetricsSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            pools: vec!["default".into()],
            database: DatabaseSettings::default(),
            amqp: AmqpSettings::default(),
            redis: RedisSettings::default(),
            lease: LeaseSettings::default(),
            relay: RelaySettings::default(),
            capacity_recheck_ms: 5_000,
            reaper: ReaperSettings::default(),
            metrics: MetricsSettings::default(),
        }
    }
}
