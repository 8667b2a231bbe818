//! drover-chaos: load and fault runs against a running drover stack, each judged by an oracle.
//! For now one closed-loop `smoke` load with the first invariant: every accepted run ends in
//! exactly one terminal state. Fault injection and baselines build on this.
//!
//! It talks to drover only through its public gRPC API, as a client would.

pub mod ledger;
pub mod oracle;
pub mod smoke;
