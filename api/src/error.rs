//! The one place where errors become gRPC statuses. Clients get a code and a safe message;
//! driver text and internals go to the server log only.

use drover_core::CoreError;
use drover_core::artifacts::StoreError;
use drover_core::error::Refusal;
use drover_core::spec::ValidationError;
use tonic::Status;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error(transparent)]
    Invalid(#[from] ValidationError),
    #[error("invalid {field}: {message}")]
    BadRequest {
        field: &'static str,
        message: String,
    },
    #[error("{0}")]
    NotFound(&'static str),
    #[error("{0}")]
    Precondition(String),
    #[error("{0}")]
    Exhausted(String),
    /// A client stream failed or went silent; the status is passed on as it is.
    #[error("client stream failed: {0}")]
    Client(Status),
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl ApiError {
    pub fn bad(field: &'static str, message: impl Into<String>) -> Self {
        ApiError::BadRequest {
            field,
            message: message.into(),
        }
    }
}

impl From<ApiError> for Status {
    fn from(err: ApiError) -> Status {
        match err {
            ApiError::Invalid(v) => Status::invalid_argument(v.to_string()),
            ApiError::BadRequest { .. } => Status::invalid_argument(err.to_string()),
            ApiError::NotFound(what) => Status::not_found(what),
            ApiError::Precondition(msg) => Status::failed_precondition(msg),
            ApiError::Exhausted(msg) => Status::resource_exhausted(msg),
            ApiError::Client(status) => status,
            ApiError::Store(e) => {
                tracing::error!(error = %e, "artifact store error");
                Status::internal("artifact store error")
            }
            ApiError::Core(core) => match core {
                CoreError::NotFound => Status::not_found("run not found"),
                CoreError::IdempotencyConflict { existing } => Status::already_exists(format!(
                    "idempotency key already used by run {existing} with a different spec"
                )),
                CoreError::Refused(Refusal::NotFound) => Status::not_found("run not found"),
                CoreError::Refused(r) => {
                    if matches!(r, Refusal::StaleEpoch { .. }) {
                        // An agent reporting under a lease that was taken from it.
                        metrics::counter!(drover_core::observe::names::FENCED_REPORTS).increment(1);
                    }
                    Status::failed_precondition(r.to_string())
                }
                CoreError::Database(ref e) if is_unavailable(e) => {
                    tracing::warn!(error = %core, "database unavailable");
                    Status::unavailable("database unavailable; retry")
                }
                other => {
                    tracing::error!(error = %other, "internal error");
                    Status::internal("internal error")
                }
            },
        }
    }
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

pub type ApiResult<T> = Result<T, ApiError>;
