//! `drover-api` settings: defaults, then an optional TOML file, then `DROVER_…` variables
//! (e.g. `DROVER_LISTEN_ADDR`, `DROVER_DATABASE__URL`, `DROVER_AMQP__URL`,
//! `DROVER_REDIS__URL`, `DROVER_REDIS__PREFIX`, `DROVER_SECRETS__KEYS`,
//! `DROVER_SECRETS__ACTIVE_KEY_ID`).

use drover_core::audit::SealSettings;
use drover_core::config::{
    AmqpSettings, DatabaseSettings, LeaseSettings, RedisSettings, RelaySettings,
};
use drover_core::observe::MetricsSettings;
use drover_core::secrets_crypto::SecretsSettings;
use serde::Deserialize;

use crate::rate_limit::RateLimitSettings;

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
    /// The audit-chain sealer (`DROVER_AUDIT__INTERVAL_MS`, `DROVER_AUDIT__BATCH_SIZE`).
    pub audit: SealSettings,
    /// How often WatchRun re-reads Postgres when Redis stays silent (it may have lost messages).
    pub watch_poll_ms: u64,
    /// Keys that seal tenant secrets at rest; none = the secret RPCs answer
    /// FAILED_PRECONDITION and runs naming secrets cannot get them.
    pub secrets: SecretsSettings,
    pub artifacts: ArtifactSettings,
    /// `/metrics`, `/healthz`, `/readyz` (`DROVER_METRICS__LISTEN_ADDR`; empty = off).
    pub metrics: MetricsSettings,
    /// Token buckets per tenant, token and unauthenticated address (`DROVER_RATE_LIMIT__…`).
    pub rate_limit: RateLimitSettings,
    /// Quotas applied when a tenant sets none (`DROVER_QUOTA__…`).
    pub quota: QuotaSettings,
    /// How long a token's principal is reused without asking Postgres again; 0 = ask every
    /// call. Revocations and policy changes still apply at once (they empty the cache over
    /// NOTIFY), so this only bounds the damage of a notification that never arrives.
    pub token_cache_ms: u64,
}

/// Default per-tenant quotas; a tenant's own policy (AdminService.SetTenantPolicy) overrides.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct QuotaSettings {
    /// Most runs QUEUED or PENDING_APPROVAL at once; submits beyond get RESOURCE_EXHAUSTED.
    pub max_queued_runs: u32,
}

impl Default for QuotaSettings {
    fn default() -> Self {
        Self {
            max_queued_runs: 100_000,
        }
    }
}

/// The artifact store and the limits of UploadArtifacts (`DROVER_ARTIFACTS__…`).
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ArtifactSettings {
    /// Root directory of the local store; empty = `<system temp dir>/drover-artifacts`.
    pub root: String,
    /// Largest single file an upload may carry (RESOURCE_EXHAUSTED beyond).
    pub max_file_bytes: u64,
    /// Largest total of one upload.
    pub max_upload_bytes: u64,
    /// Most files (and symlinks) in one upload.
    pub max_files: u32,
    /// An upload not committed within this is garbage, whatever its run does.
    pub staged_ttl_secs: u64,
    /// How often the garbage collector looks for uploads that can never be committed.
    pub gc_interval_secs: u64,
    /// An upload stream silent this long is abandoned (DEADLINE_EXCEEDED) and discarded, so
    /// a hung agent does not hold staged files until the TTL.
    pub upload_idle_secs: u64,
    /// Inline artifacts (carried by a completion report) totalling at most this many bytes
    /// are kept in Postgres with the upload's row instead of as files in the store: a
    /// short run's `.drover/` records then cost no file creation and no fsync. 0 keeps every
    /// byte in the store.
    pub database_upload_bytes: u64,
}

impl Default for ArtifactSettings {
    fn default() -> Self {
        Self {
            root: String::new(),
            max_file_bytes: 1024 * 1024 * 1024,
            max_upload_bytes: 4 * 1024 * 1024 * 1024,
            max_files: 10_000,
            staged_ttl_secs: 3_600,
            gc_interval_secs: 60,
            upload_idle_secs: 60,
            database_upload_bytes: 64 * 1024,
        }
    }
}

impl ArtifactSettings {
    pub fn root_dir(&self) -> std::path::PathBuf {
        if self.root.is_empty() {
            std::env::temp_dir().join("drover-artifacts")
        } else {
            std::path::PathBuf::from(&self.root)
        }
    }
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
            audit: SealSettings::default(),
            watch_poll_ms: 1_000,
            secrets: SecretsSettings::default(),
            artifacts: ArtifactSettings::default(),
            metrics: MetricsSettings::default(),
            rate_limit: RateLimitSettings::default(),
            quota: QuotaSettings::default(),
            token_cache_ms: 1000,
        }
    }
}
