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
    /// No valid token: missing, malformed, unknown and revoked look the same.
    #[error("missing, invalid or revoked token")]
    Unauthenticated,
    #[error("{0}")]
    Denied(String),
    /// Over a rate limit; retry after this long.
    #[error("rate limit reached")]
    Limited(std::time::Duration),
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
            ApiError::Unauthenticated => Status::unauthenticated(err.to_string()),
            ApiError::Denied(msg) => Status::permission_denied(msg),
            ApiError::Limited(wait) => {
                let secs = wait.as_millis().div_ceil(1000).max(1);
                let mut status =
                    Status::resource_exhausted(format!("rate limit reached; retry after {secs} s"));
                let md = status.metadata_mut();
                if let Ok(v) = secs.to_string().parse() {
                    md.insert("retry-after", v);
                }
                if let Ok(v) = wait.as_millis().to_string().parse() {
                    md.insert("retry-after-ms", v);
                }
                status
            }
            // A full store is the deployment's capacity, not a bug: say so, and the agent
            // retries it as it does any RESOURCE_EXHAUSTED.
            ApiError::Store(ref e) if store_is_full(e) => {
                let r = error_ref();
                tracing::error!(error = %e, error_ref = %r, "artifact store full");
                with_ref(
                    Status::resource_exhausted(format!(
                        "artifact store is full; retry later (ref {r})"
                    )),
                    &r,
                )
            }
            ApiError::Store(e) => {
                let r = error_ref();
                tracing::error!(error = %e, error_ref = %r, "artifact store error");
                with_ref(
                    Status::internal(format!("artifact store error (ref {r})")),
                    &r,
                )
            }
            ApiError::Core(core) => match core {
                CoreError::NotFound => Status::not_found("run not found"),
                CoreError::IdempotencyConflict { existing } => Status::already_exists(format!(
                    "idempotency key already used by run {existing} with a different spec"
                )),
                CoreError::Refused(Refusal::NotFound) => Status::not_found("run not found"),
                CoreError::Forbidden(msg) => Status::permission_denied(msg),
                CoreError::OverQuota(msg) => Status::resource_exhausted(msg),
                CoreError::Refused(r) => {
                    if matches!(r, Refusal::StaleEpoch { .. }) {
                        // An agent reporting under a lease that was taken from it.
                        metrics::counter!(drover_core::observe::names::FENCED_REPORTS).increment(1);
                    }
                    Status::failed_precondition(r.to_string())
                }
                CoreError::Database(ref e) if is_unavailable(e) => {
                    let r = error_ref();
                    tracing::warn!(error = %core, error_ref = %r, "database unavailable");
                    with_ref(
                        Status::unavailable(format!("database unavailable; retry (ref {r})")),
                        &r,
                    )
                }
                other => {
                    let r = error_ref();
                    tracing::error!(error = %other, error_ref = %r, "internal error");
                    with_ref(Status::internal(format!("internal error (ref {r})")), &r)
                }
            },
        }
    }
}

/// A correlation id for an error whose detail only the server log holds: the client gets it
/// in the message and in `x-drover-error-ref`, the log line carries it as `error_ref`.
fn error_ref() -> String {
    uuid::Uuid::now_v7().simple().to_string()
}

fn with_ref(mut status: Status, r: &str) -> Status {
    if let Ok(v) = r.parse() {
        status.metadata_mut().insert("x-drover-error-ref", v);
    }
    status
}

/// Out of space or over a disk quota (ENOSPC, EDQUOT).
fn store_is_full(e: &StoreError) -> bool {
    matches!(
        e,
        StoreError::Io { source, .. }
            if matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
    )
}

fn is_unavailable(e: &sqlx::Error) -> bool {
    matches!(
        e,
        sqlx::Error::PoolTimedOut | sqlx::Error::Io(_) | sqlx::Error::PoolClosed
    )
}

pub type ApiResult<T> = Result<T, ApiError>;

#[cfg(test)]
mod tests {
    use super::*;

    fn store_error(kind: std::io::ErrorKind) -> Status {
        Status::from(ApiError::Store(StoreError::Io {
            what: "/var/lib/drover/uploads/0192/3".into(),
            source: std::io::Error::new(kind, "No space left on device (os error 28)"),
        }))
    }

    #[test]
    fn a_full_store_is_resource_exhausted_and_other_store_errors_internal() {
        for kind in [
            std::io::ErrorKind::StorageFull,
            std::io::ErrorKind::QuotaExceeded,
        ] {
            let s = store_error(kind);
            assert_eq!(s.code(), tonic::Code::ResourceExhausted, "{kind:?}");
            assert!(s.message().starts_with("artifact store is full"), "{s:?}");
            assert!(s.metadata().get("x-drover-error-ref").is_some());
        }
        let s = store_error(std::io::ErrorKind::PermissionDenied);
        assert_eq!(s.code(), tonic::Code::Internal);
        for s in [
            store_error(std::io::ErrorKind::StorageFull),
            store_error(std::io::ErrorKind::PermissionDenied),
        ] {
            // The path and the OS text stay in the server log.
            assert!(!s.message().contains("/var/lib"), "{s:?}");
            assert!(!s.message().contains("os error"), "{s:?}");
        }
    }
}
