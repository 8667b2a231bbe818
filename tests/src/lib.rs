//! Harness for end-to-end tests: starts the real `drover-api`, `drover-dispatcher` and
//! `drover-agent` binaries as separate processes against the real Postgres, RabbitMQ, Redis
//! and Docker on this machine, each test with its own database, RabbitMQ vhost, Redis key
//! prefix and agent id, so tests run in parallel without seeing each other.
//!
//! A missing service is a loud failure naming the fix (`deploy/local-services.sh`), never a
//! silent pass.

pub mod fake_agent;
pub mod private;
pub mod scrape;
pub mod services;
pub mod stack;

pub use stack::{Stack, StackOptions};
