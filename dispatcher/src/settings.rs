//! `drover-dispatcher` settings: defaults, optional TOML file, then `DROVER_…` variables
//! (`DROVER_POOLS` as a TOML array, e.g. `DROVER_POOLS='["default","gpu"]'`).

use drover_core::audit::SealSettings;
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
    /// The audit-chain sealer (`DROVER_AUDIT__INTERVAL_MS`, `DROVER_AUDIT__BATCH_SIZE`).
    pub audit: SealSettings,
    /// Longest the parked-run scheduler sleeps before looking again if no wake-up came.
    pub capacity_recheck_ms: u64,
    /// Per-tenant quotas the dispatcher enforces (`DROVER_QUOTA__…`).
    pub quota: QuotaSettings,
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
            audit: SealSettings::default(),
            capacity_recheck_ms: 5_000,
            quota: QuotaSettings::default(),
            reaper: ReaperSettings::default(),
            metrics: MetricsSettings::default(),
        }
    }
}

/// Quotas applied when a tenant sets none; a tenant's own policy
/// (AdminService.SetTenantPolicy) overrides.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct QuotaSettings {
    /// Most runs a tenant may have ASSIGNED or RUNNING at once, over all pools
    /// (`DROVER_QUOTA__MAX_CONCURRENT_RUNS`); 0 = unlimited. Runs beyond wait QUEUED (GetRun
    /// says TENANT_OVER_QUOTA).
    pub max_concurrent_runs: u32,
}
