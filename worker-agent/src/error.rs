//! Errors at the agent's boundary: what `Agent::build` and `Agent::run_until_stopped` return.
//! Per-run failures never surface here; they are reported to the API as the run's outcome.

/// Why the agent could not start or keep running.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid agent settings: {0}")]
    InvalidSettings(String),
    /// The executor's backend is unusable; the message names where the agent looked.
    #[error("docker daemon not answering at {endpoint}: {reason}")]
    DockerUnavailable { endpoint: String, reason: String },
    #[error("invalid api endpoint {endpoint:?}: {reason}")]
    InvalidApiEndpoint { endpoint: String, reason: String },
    /// The API answered registration with a permanent refusal (bad id, capacity, auth).
    #[error("the api refused to register this agent: {code:?}: {message}")]
    RegistrationRefused { code: tonic::Code, message: String },
    /// `execution_journal` names a file that cannot be opened for appending.
    #[error(transparent)]
    Journal(#[from] crate::journal::JournalError),
    #[error("rabbitmq: {0}")]
    Amqp(#[from] lapin::Error),
    #[error(transparent)]
    Core(#[from] drover_core::CoreError),
}
