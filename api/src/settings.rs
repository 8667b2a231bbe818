//! `drover-api` settings: defaults, then an optional TOML file, then `DROVER_…` variables
//! (e.g. `DROVER_LISTEN_ADDR`, `DROVER_DATABASE__URL`, `DROVER_AMQP__URL`,
//! `DROVER_REDIS__URL`, `DROVER_REDIS__PREFIX`, `DROVER_SECRETS__KEYS`,
//! `DROVER_SECRETS__ACTIVE_KEY_ID`).

use drover_core::config::{
    AmqpSettings, DatabaseSettings, LeaseSettings, RedisSettings, RelaySettings,
};
use drover_core::secrets_crypto::SecretsSettings;
use serde::Deserialize;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct Settings {
    /// gRPC listen address; port 0 picks a free port (the bound one is reported).
    pub listen_addr: String,
    pub database: DatabaseSettings,
    pub amqp: AmqpSettings,
    pub redis: RedisSettings,
    pub lease: LeaseSettings,
    pub relay: RelaySettings,
    /// How often WatchRun re-reads Postgres when Redis stays silent (it may have lost messages).
    pub watch_poll_ms: u64,
    /// Keys that seal tenant secrets at rest; none = the secret RPCs answer
    /// FAILED_PRECONDITION and runs naming secrets cannot get them.
    pub secrets: SecretsSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Self {
            listen_addr: "127.0.0.1:50051".into(),
            database: DatabaseSettings::default(),
            amqp: AmqpSettings::default(),
            redis: RedisSettings::default(),
            lease: LeaseSettings::default(),
            relay: RelaySettings::default(),
            watch_poll_ms: 1_000,
            secrets: SecretsSettings::default(),
        }
    }
}
