//! The Postgres repository. Every state change is one conditional `UPDATE` whose guard comes
//! from the state table ([`runs::transition`]); its row count decides, and a refusal is
//! explained, never applied. Queries are runtime-checked (`sqlx::query`) and exercised by the
//! end-to-end tests against real Postgres; compile-time checking would need a database or
//! checked-in offline data at every build, which the fresh-machine CI would have to provision
//! first.

pub mod agents;
pub mod approvals;
pub mod artifacts;
pub mod attempts;
pub mod cancel;
pub mod dead_letters;
pub mod folded_end;
pub mod logs;
pub mod outbox;
pub mod overdue;
pub mod parking;
pub mod quota_locks;
pub mod runs;
pub mod secrets;
pub mod stats;
mod submit_statement;
pub mod tokens;
pub mod waiting;

pub use runs::{EventRecord, RunRecord, Transition, TransitionPatch};

/// NOTIFY channel that wakes outbox relays after a commit that wrote outbox rows.
pub const OUTBOX_CHANNEL: &str = "drover_outbox";
/// NOTIFY channel that wakes dispatchers waiting for capacity (agent registered, heartbeat
/// after idle, run finished).
pub const CAPACITY_CHANNEL: &str = "drover_capacity";
