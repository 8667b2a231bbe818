//! What every handler shares.

use std::sync::Arc;

use drover_core::artifacts::ArtifactStore;
use drover_core::events::EventBus;
use drover_core::ids::RunId;
use drover_core::secrets_crypto::SecretKeys;
use sqlx::PgPool;

use crate::error::{ApiError, ApiResult};
use crate::live::LiveHub;
use crate::rate_limit::RateLimiter;
use crate::settings::Settings;
use crate::token_cache::TokenCache;

#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub bus: Arc<EventBus>,
    pub settings: Arc<Settings>,
    /// Parsed from `settings.secrets` at start; `None` when no key is configured.
    pub secret_keys: Option<Arc<SecretKeys>>,
    pub artifacts: Arc<dyn ArtifactStore>,
    pub limiter: Arc<RateLimiter>,
    /// Principals of recently seen tokens (`DROVER_TOKEN_CACHE_MS`).
    pub tokens: Arc<TokenCache>,
    /// The process's one Redis pub/sub connection for WatchRun and StreamLogs.
    pub live: Arc<LiveHub>,
    /// This process's outbox relay, for the rows a submit writes.
    pub outbox: drover_core::repo::outbox::Handoff,
}

/// Parses a run id from a request field; a malformed id is INVALID_ARGUMENT naming the field.
pub fn parse_run_id(field: &'static str, s: &str) -> ApiResult<RunId> {
    s.parse()
        .map_err(|_| ApiError::bad(field, "must be a UUID"))
}

/// Most runs or dead letters one page returns; 0 asks for the default.
const DEFAULT_PAGE: u32 = 100;
const MAX_PAGE: u32 = 1000;

/// A list call's page size: 0 = 100, at most 1000.
pub fn page_size(requested: u32) -> ApiResult<u32> {
    match requested {
        0 => Ok(DEFAULT_PAGE),
        n if n > MAX_PAGE => Err(ApiError::bad(
            "page_size",
            format!("must be at most {MAX_PAGE}"),
        )),
        n => Ok(n),
    }
}

/// Bound on client-given reasons (cancel, redrive), which are stored in events.
pub const MAX_REASON_BYTES: usize = 1024;

/// The event reason for an operator or client action: `what`, plus the caller's words.
pub fn client_reason(given: &str, what: &str) -> ApiResult<String> {
    if given.len() > MAX_REASON_BYTES {
        return Err(ApiError::bad(
            "reason",
            format!("must be at most {MAX_REASON_BYTES} bytes"),
        ));
    }
    Ok(match given.trim() {
        "" => what.to_owned(),
        r => format!("{what}: {r}"),
    })
}
