//! What every handler shares.

use std::sync::Arc;

use drover_core::events::EventBus;
use drover_core::ids::RunId;
use sqlx::PgPool;

use crate::error::{ApiError, ApiResult};
use crate::settings::Settings;

#[derive(Debug, Clone)]
pub struct AppState {
    pub pool: PgPool,
    pub bus: Arc<EventBus>,
    pub settings: Arc<Settings>,
}

/// Parses a run id from a request field; a malformed id is INVALID_ARGUMENT naming the field.
pub fn parse_run_id(field: &'static str, s: &str) -> ApiResult<RunId> {
    s.parse()
        .map_err(|_| ApiError::bad(field, "must be a UUID"))
}
