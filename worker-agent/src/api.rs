//! The agent's side of the gRPC `AgentService` contract: one thin wrapper that fills in the
//! agent id, sorts every failure into stale / transient / permanent, and retries the transient
//! ones with capped exponential backoff. Callers decide how patient to be per call.

use std::future::Future;
use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use drover_core::bearer::Bearer;
use drover_core::ids::{AgentId, LeaseEpoch, RunId};
use drover_core::telemetry::Traced;
use drover_proto::v1 as pb;
use drover_proto::v1::agent_service_client::AgentServiceClient;
use tokio_util::sync::CancellationToken;
use tonic::transport::{Channel, Endpoint};
use tonic::{Code, Status};
use tracing::Instrument;

use crate::error::AgentError;

/// Every call carries the agent token, and the caller's `traceparent` so the API's span
/// continues the caller's trace.
type Authed = tonic::service::interceptor::InterceptedService<Channel, Traced<Bearer>>;

/// A single call's limit, so a hung API counts as a transient failure and is retried.
const REQUEST_TIMEOUT: Duration = Duration::from_secs(15);
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);

/// How long a call keeps retrying transient failures.
#[derive(Debug, Clone, Copy)]
pub enum Patience {
    /// At most this many retries (with backoff up to 5 s between them).
    Retries(usize),
    /// Until it succeeds, fails permanently, or the given token fires.
    UntilCancelled,
    /// A single attempt.
    Once,
}

/// Why a call did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// FAILED_PRECONDITION or NOT_FOUND: the lease (or agent, or run) is not current. Retrying
    /// cannot help; the caller drops what it was doing.
    #[error("refused as stale ({code:?}): {message}")]
    Stale { code: Code, message: String },
    /// The API could not be reached or was overloaded, even after retries.
    #[error("api unavailable ({code:?}): {message}")]
    Transient { code: Code, message: String },
    /// A refusal that retrying will not change (bad request, permission).
    #[error("refused ({code:?}): {message}")]
    Permanent { code: Code, message: String },
    /// The caller's token fired before the call finished.
    #[error("cancelled")]
    Cancelled,
}

impl ApiError {
    pub fn code(&self) -> Option<Code> {
        match self {
            ApiError::Stale { code, .. }
            | ApiError::Transient { code, .. }
            | ApiError::Permanent { code, .. } => Some(*code),
            ApiError::Cancelled => None,
        }
    }

    fn is_transient(&self) -> bool {
        matches!(self, ApiError::Transient { .. })
    }
}

impl From<Status> for ApiError {
    fn from(status: Status) -> Self {
        let code = status.code();
        let message = status.message().to_owned();
        match code {
            Code::FailedPrecondition | Code::NotFound => ApiError::Stale { code, message },
            // Network trouble surfaces as UNAVAILABLE or UNKNOWN; INTERNAL is the server's
            // database or broker having a bad moment. All are worth another try.
            Code::Unavailable
            | Code::DeadlineExceeded
            | Code::ResourceExhausted
            | Code::Aborted
            | Code::Unknown
            | Code::Internal
            | Code::Cancelled => ApiError::Transient { code, message },
            _ => ApiError::Permanent { code, message },
        }
    }
}

/// Cheap to clone: clones share one HTTP/2 connection.
#[derive(Clone)]
pub struct ApiClient {
    client: AgentServiceClient<Authed>,
    /// The same API without the per-call timeout, for artifact streams.
    bulk: AgentServiceClient<Authed>,
    agent_id: AgentId,
}

impl ApiClient {
    /// Connects to `endpoint`, retrying until the API answers or `cancel` fires (`Ok(None)`).
    pub async fn connect(
        endpoint: &str,
        agent_id: AgentId,
        token: Bearer,
        cancel: &CancellationToken,
    ) -> Result<Option<Self>, AgentError> {
        let invalid = |reason: String| AgentError::InvalidApiEndpoint {
            endpoint: endpoint.to_owned(),
            reason,
        };
        let base = Endpoint::from_shared(endpoint.to_owned())
            .map_err(|e| invalid(e.to_string()))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_keepalive(Some(Duration::from_secs(30)))
            .http2_keep_alive_interval(Duration::from_secs(30))
            .keep_alive_while_idle(true);
        // Artifact transfers take as long as their size needs; the API cuts off a stream that
        // goes idle, and HTTP/2 keep-alives notice a dead peer.
        let bulk = AgentServiceClient::with_interceptor(base.connect_lazy(), Traced(token.clone()));
        let target = base.timeout(REQUEST_TIMEOUT);
        let connect = || target.connect();
        let retrying = connect
            .retry(backoff(Patience::UntilCancelled))
            .notify(|err, after| {
                tracing::warn!(
                    endpoint,
                    error = %err,
                    retry_in_ms = after.as_millis() as u64,
                    "api not answering yet"
                );
            });
        let channel = tokio::select! {
            _ = cancel.cancelled() => return Ok(None),
            res = retrying => res.map_err(|e| invalid(e.to_string()))?,
        };
        tracing::info!(endpoint, "connected to the api");
        Ok(Some(Self {
            client: AgentServiceClient::with_interceptor(channel, Traced(token)),
            bulk,
            agent_id,
        }))
    }

    pub async fn register(
        &self,
        req: pb::RegisterAgentRequest,
        patience: Patience,
        cancel: &CancellationToken,
    ) -> Result<pb::RegisterAgentResponse, ApiError> {
        self.call("register", patience, cancel, |mut c| {
            let req = req.clone();
            async move { c.register(req).await }
        })
        .await
    }

    pub async fn heartbeat(
        &self,
        running: Vec<(RunId, LeaseEpoch)>,
        cancel: &CancellationToken,
    ) -> Result<pb::HeartbeatResponse, ApiError> {
        let req = pb::HeartbeatRequest {
            agent_id: self.agent_id.to_string(),
            running: running
                .into_iter()
                .map(|(run_id, epoch)| pb::LeaseRef {
                    run_id: run_id.to_string(),
                    lease_epoch: epoch_to_wire(epoch),
                })
                .collect(),
        };
        self.call("heartbeat", Patience::Once, cancel, |mut c| {
            let req = req.clone();
            async move { c.heartbeat(req).await }
        })
        .await
    }

    pub async fn get_assignment(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        patience: Patience,
        cancel: &CancellationToken,
    ) -> Result<pb::GetAssignmentResponse, ApiError> {
        let req = pb::GetAssignmentRequest {
            agent_id: self.agent_id.to_string(),
            run_id: run_id.to_string(),
            lease_epoch: epoch_to_wire(epoch),
        };
        self.call("get assignment", patience, cancel, |mut c| {
            let req = req.clone();
            async move { c.get_assignment(req).await }
        })
        .await
    }

    pub async fn report_started(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        container_id: &str,
        executor: &str,
        cancel: &CancellationToken,
    ) -> Result<(), ApiError> {
        let req = pb::ReportStartedRequest {
            agent_id: self.agent_id.to_string(),
            run_id: run_id.to_string(),
            lease_epoch: epoch_to_wire(epoch),
            container_id: container_id.to_owned(),
            executor: executor.to_owned(),
        };
        self.call(
            "report started",
            Patience::UntilCancelled,
            cancel,
            |mut c| {
                let req = req.clone();
                async move { c.report_started(req).await }
            },
        )
        .await
        .map(|_| ())
    }

    pub async fn push_logs(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        chunks: Vec<pb::LogChunk>,
        cancel: &CancellationToken,
    ) -> Result<(), ApiError> {
        let req = pb::PushLogsRequest {
            agent_id: self.agent_id.to_string(),
            run_id: run_id.to_string(),
            lease_epoch: epoch_to_wire(epoch),
            chunks,
        };
        // Live logs are losable (the tail travels with the completion): a few tries only, so
        // a struggling API never stalls the run.
        self.call("push logs", Patience::Retries(3), cancel, |mut c| {
            let req = req.clone();
            async move { c.push_logs(req).await }
        })
        .await
        .map(|_| ())
    }

    /// The agent id and lease are filled in here; the rest comes from the caller.
    pub async fn report_completion(
        &self,
        req: pb::ReportCompletionRequest,
        cancel: &CancellationToken,
    ) -> Result<pb::ReportCompletionResponse, ApiError> {
        self.report_completion_with(req, Patience::UntilCancelled, cancel)
            .await
    }

    /// [`Self::report_completion`] with a bound: a report carrying inline artifacts gives
    /// up after a few tries, as an upload does, so a full artifact store cannot hold the
    /// run's end back for ever.
    pub async fn report_completion_with(
        &self,
        mut req: pb::ReportCompletionRequest,
        patience: Patience,
        cancel: &CancellationToken,
    ) -> Result<pb::ReportCompletionResponse, ApiError> {
        req.agent_id = self.agent_id.to_string();
        self.call("report completion", patience, cancel, |mut c| {
            let req = req.clone();
            async move { c.report_completion(req).await }
        })
        .await
    }

    /// Uploads the workspace files `collect` found; returns the upload id the completion
    /// report names. A failed stream is retried whole a few times (the API discards the
    /// partial upload); a stale lease is [`ApiError::Stale`].
    pub async fn upload_artifacts(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        files: Vec<crate::transfer::Outgoing>,
        cancel: &CancellationToken,
    ) -> Result<pb::UploadArtifactsResponse, ApiError> {
        let start = pb::UploadStart {
            agent_id: self.agent_id.to_string(),
            run_id: run_id.to_string(),
            lease_epoch: epoch_to_wire(epoch),
        };
        let bulk = self.bulk.clone();
        self.call("upload artifacts", Patience::Retries(3), cancel, |_| {
            let mut c = bulk.clone();
            let stream = crate::transfer::upload_stream(start.clone(), files.clone());
            async move { c.upload_artifacts(stream).await }
        })
        .await
    }

    /// The committed artifacts of the run the leased run's spec names in `inputs_from_run`.
    pub async fn download_inputs(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        cancel: &CancellationToken,
    ) -> Result<tonic::Streaming<pb::ArtifactChunk>, ApiError> {
        let req = pb::DownloadInputsRequest {
            agent_id: self.agent_id.to_string(),
            run_id: run_id.to_string(),
            lease_epoch: epoch_to_wire(epoch),
        };
        let bulk = self.bulk.clone();
        self.call("download inputs", Patience::Retries(5), cancel, |_| {
            let mut c = bulk.clone();
            let req = req.clone();
            async move { c.download_inputs(req).await }
        })
        .await
    }

    /// Tells the API this agent takes no new work; dispatchers skip it from then on.
    pub async fn set_draining(&self, cancel: &CancellationToken) -> Result<(), ApiError> {
        let req = pb::SetDrainingRequest {
            agent_id: self.agent_id.to_string(),
        };
        self.call("set draining", Patience::Retries(5), cancel, |mut c| {
            let req = req.clone();
            async move { c.set_draining(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Leaves the fleet. FAILED_PRECONDITION (here [`ApiError::Stale`]) while the API still
    /// sees leases held by this agent.
    pub async fn deregister(&self, cancel: &CancellationToken) -> Result<(), ApiError> {
        let req = pb::DeregisterRequest {
            agent_id: self.agent_id.to_string(),
        };
        self.call("deregister", Patience::Retries(5), cancel, |mut c| {
            let req = req.clone();
            async move { c.deregister(req).await }
        })
        .await
        .map(|_| ())
    }

    /// Runs `f` with retries of transient failures, as patient as asked, until `cancel`.
    async fn call<T, F, Fut>(
        &self,
        what: &'static str,
        patience: Patience,
        cancel: &CancellationToken,
        mut f: F,
    ) -> Result<T, ApiError>
    where
        F: FnMut(AgentServiceClient<Authed>) -> Fut,
        Fut: Future<Output = Result<tonic::Response<T>, Status>>,
    {
        let attempt = || {
            let fut = f(self.client.clone());
            async move {
                fut.await
                    .map(tonic::Response::into_inner)
                    .map_err(ApiError::from)
            }
        };
        let retrying = attempt
            .retry(backoff(patience))
            .when(ApiError::is_transient)
            .notify(|err, after| {
                tracing::warn!(
                    call = what,
                    error = %err,
                    retry_in_ms = after.as_millis() as u64,
                    "api call failed; retrying"
                );
            });
        // One client span per call (retries included), in the caller's trace; heartbeats
        // are periodic and belong to no run, so they get none.
        let span = if what == "heartbeat" {
            tracing::Span::none()
        } else {
            tracing::info_span!("grpc.client", otel.name = what, otel.kind = "client")
        };
        tokio::select! {
            _ = cancel.cancelled() => Err(ApiError::Cancelled),
            res = retrying.instrument(span) => res,
        }
    }
}

fn backoff(patience: Patience) -> ExponentialBuilder {
    let b = ExponentialBuilder::default()
        .with_min_delay(Duration::from_millis(100))
        .with_max_delay(Duration::from_secs(5))
        .with_jitter();
    match patience {
        Patience::Retries(n) => b.with_max_times(n),
        Patience::UntilCancelled => b.without_max_times(),
        Patience::Once => b.with_max_times(0),
    }
}

/// Epochs are positive in practice; a negative one (corrupt data) maps to 0, which the API
/// refuses as stale.
pub fn epoch_to_wire(epoch: LeaseEpoch) -> u64 {
    u64::try_from(epoch.0).unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_classified() {
        let stale = ApiError::from(Status::failed_precondition("stale epoch"));
        assert!(matches!(stale, ApiError::Stale { .. }));
        assert!(matches!(
            ApiError::from(Status::not_found("x")),
            ApiError::Stale { .. }
        ));
        for s in [
            Status::unavailable("down"),
            Status::deadline_exceeded("slow"),
            Status::internal("db"),
            Status::unknown("h2"),
        ] {
            assert!(ApiError::from(s).is_transient());
        }
        for s in [
            Status::invalid_argument("bad"),
            Status::permission_denied("no"),
            Status::unauthenticated("who"),
        ] {
            assert!(matches!(ApiError::from(s), ApiError::Permanent { .. }));
        }
        assert_eq!(stale.code(), Some(Code::FailedPrecondition));
        assert_eq!(ApiError::Cancelled.code(), None);
    }

    #[test]
    fn epochs_go_on_the_wire_unsigned() {
        assert_eq!(epoch_to_wire(LeaseEpoch(7)), 7);
        assert_eq!(epoch_to_wire(LeaseEpoch(-1)), 0);
    }
}
