//! drover-chaos: load and fault runs against a running drover stack, each judged by an oracle.
//! A closed-loop `smoke` load with the first invariant (every accepted run ends in exactly one
//! terminal state), and `stress`: load with HDR latency histograms, process RSS/CPU and
//! side-by-side baselines (bare `docker run`, Celery), reported as JSON, Markdown and SVG.
//!
//! It talks to drover only through its public gRPC API, as a client would.

pub mod client;
pub mod ledger;
pub mod oracle;
pub mod private;
pub mod proxy;
pub mod smoke;
pub mod stack;
pub mod stress;
pub mod verdict;
