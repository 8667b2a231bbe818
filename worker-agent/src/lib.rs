//! drover-agent: the worker agent that runs on each worker host.
//!
//! Owns everything between an agent's command queue and the containers on its host: settings
//! ([`settings`]), registration and heartbeats with the API, consuming `drover.agent.<id>`,
//! executing assignments through an [`Executor`] (Docker via bollard: [`docker`]; a local
//! child process: [`process`]; a simulated run: [`mock`]; chosen per run by [`select`]) in a
//! per-attempt [`workspace`], following
//! output ([`supervise`], [`output_tail`], [`log_batch`]), enforcing time limits, cancelling
//! (SIGTERM, grace, SIGKILL), reporting start and completion under the lease epoch (and
//! dropping whatever a stale-epoch refusal fences off), re-adopting its containers after a
//! restart, the optional execution journal for test oracles ([`journal`]), secret and host
//! pass-through environment ([`secret_env`]) with log redaction ([`redact`]), and draining
//! ([`Agent`]).
//!
//! It must not touch Postgres or Redis, decide run state, or assign work: the API is the only
//! authority it talks to, and every report it sends may be refused as stale. It pulls images
//! only as a spec's pull policy allows, and never removes a container (or a workspace) before
//! the API has settled its completion report: Docker is the agent's durable journal.
//!
//! Composition (`drover dev`): build [`Settings`], then [`Agent::build`] (or
//! [`Agent::with_executor`]) and [`Agent::run_until_stopped`] with a cancellation token.

mod agent;
mod api;
mod attempt;
mod consumer;
pub mod docker;
pub mod error;
mod execution;
pub mod executor;
mod heartbeat;
pub mod journal;
pub mod log_batch;
pub mod log_files;
mod log_shipper;
pub mod mock;
pub mod outcome;
pub mod output_tail;
pub mod process;
mod reconcile;
pub mod redact;
pub mod running;
pub mod secret_env;
pub mod select;
pub mod settings;
mod settle;
pub mod state_file;
pub mod supervise;
pub mod transfer;
pub mod workspace;

pub use agent::Agent;
pub use docker::DockerExecutor;
pub use error::AgentError;
pub use executor::{
    ExecError, ExecHandle, Executor, FoundExecution, FoundStatus, Job, Termination,
};
pub use mock::MockExecutor;
pub use process::ProcessExecutor;
pub use select::ExecutorSet;
pub use settings::{ExecutorKind, Settings};
