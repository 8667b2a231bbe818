//! Per-tenant quotas the API enforces. (The concurrency quota is the dispatcher's: it holds a
//! tenant's runs QUEUED while the tenant has `max_concurrent_runs` assigned or running.)

use crate::auth::User;
use crate::state::AppState;

/// The caller's tenant's queued-runs limit: its own policy (read with the token), else the
/// server default; 0 = none.
pub fn max_queued(state: &AppState, user: &User) -> Option<i64> {
    let max = user
        .principal
        .max_queued_runs
        .map(i64::from)
        .unwrap_or_else(|| i64::from(state.settings.quota.max_queued_runs));
    (max > 0).then_some(max)
}
