//! drover-core: what every drover binary shares.
//!
//! Owns the domain types ([`ids`], [`state`], [`spec`], [`inputs`]), the run state machine as a
//! transition table, run-spec validation (with [`paths`] and [`artifact_paths`] for paths from
//! outside), typed configuration ([`config`]), the Postgres repository ([`repo`]) and
//! migrations ([`db`]), the RabbitMQ topology ([`topology`]) and wire messages ([`messages`]),
//! tenant-secret encryption ([`secrets_crypto`]), Redis key names ([`redis_keys`]) and the
//! outbox relay ([`outbox_relay`]).
//!
//! It must not serve gRPC, consume queues or run containers: those belong to the binaries.

pub mod amqp;
pub mod announce;
pub mod artifact_paths;
pub mod artifacts;
pub mod audit;
pub mod bearer;
pub mod config;
pub mod convert;
pub mod db;
pub mod error;
pub mod events;
pub mod ids;
pub mod inputs;
pub mod messages;
pub mod observe;
pub mod outbox_marks;
pub mod outbox_relay;
pub mod paths;
pub mod pg_wakeup;
pub mod redis_keys;
pub mod repo;
pub mod retry;
pub mod secrets_crypto;
pub mod shutdown;
pub mod spec;
pub mod state;
pub mod telemetry;
pub mod topology;

pub use error::CoreError;
