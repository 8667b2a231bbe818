//! drover-chaos: load and fault runs against a running drover stack, each judged by an oracle.
//! A closed-loop `smoke` load with the first invariant (every accepted run ends in exactly one
//! terminal state), and `stress`: load with HDR latency histograms, process RSS/CPU and
//! side-by-side baselines (bare `docker run`, Celery), reported as JSON, Markdown and SVG.
//!
//! `run`: fault scenarios (kill -9 of agents, dispatchers and the API, restarts of private
//! RabbitMQ / Postgres / Redis, Redis FLUSHALL, network faults through a TCP proxy, duplicate
//! and poison messages, a zombie agent, a full artifact store) against a stack of the real
//! binaries, judged by the oracle in [`verdict`] and reported as JSON and Markdown.
//!
//! Load goes through drover's public gRPC API, as a client's would; the oracle reads
//! Postgres, RabbitMQ and the agents' execution journals directly.

pub mod client;
pub mod ledger;
pub mod oracle;
pub mod private;
pub mod proxy;
pub mod scenario;
pub mod smoke;
pub mod stack;
pub mod stress;
pub mod verdict;
