//! Errors at the drover-core boundary. Messages are lowercase and carry no driver text meant
//! for clients; the API maps these to gRPC codes in one place.

use crate::state::RunState;

#[derive(Debug, thiserror::Error)]
pub enum CoreError {
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration error: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("amqp error: {0}")]
    Amqp(#[from] lapin::Error),
    #[error("redis error: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("configuration error: {0}")]
    Config(#[from] Box<figment::Error>),
    #[error("run not found")]
    NotFound,
    #[error("idempotency key already used by run {existing} with a different spec")]
    IdempotencyConflict { existing: String },
    #[error("stored data is corrupt: {0}")]
    Corrupt(String),
    #[error(transparent)]
    Refused(#[from] Refusal),
    /// The caller is known but may not do this (PERMISSION_DENIED).
    #[error("{0}")]
    Forbidden(String),
    /// A tenant quota would be exceeded (RESOURCE_EXHAUSTED).
    #[error("{0}")]
    OverQuota(String),
}

/// Why a transition changed nothing. Never applied, always reported.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Refusal {
    #[error("run not found")]
    NotFound,
    #[error("stale lease epoch {given}; current epoch is {current}")]
    StaleEpoch { given: i64, current: i64 },
    #[error("run is leased to another agent")]
    WrongAgent,
    #[error("attempt {given} is not the current attempt {current}")]
    StaleAttempt { given: i32, current: i32 },
    #[error("illegal transition {from} -> {to}")]
    Illegal { from: RunState, to: RunState },
    /// The artifact upload named by a completion report cannot be committed with it.
    #[error("{0}")]
    Upload(String),
}
