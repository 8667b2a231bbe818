//! The agent service: [`Agent::build`] checks the executor backend answers, then
//! [`Agent::run_until_stopped`] connects, registers, heartbeats and executes commands until
//! its token fires, and drains.
//!
//! Start-up order matters: the command queue is declared *before* `Register`, so a command the
//! dispatcher routes to this agent the moment the API knows it is queued, never unroutable.
//!
//! Shutdown order: stop intake (cancel the consumer), let running executions finish and report
//! for up to `drain_timeout_secs` while heartbeats keep their leases alive, then stop what is
//! left (container killed and removed, no report: its lease expires and the run is retried
//! elsewhere, which beats an orphan container running unsupervised), then close connections.

use std::sync::Arc;
use std::time::Duration;

use drover_core::ids::AgentId;
use drover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::{ApiClient, ApiError, Patience};
use crate::consumer::{CommandConsumer, open_session};
use crate::docker::DockerExecutor;
use crate::error::AgentError;
use crate::execution::RunContext;
use crate::executor::Executor;
use crate::heartbeat;
use crate::running::RunningRuns;
use crate::settings::{ExecutorKind, Settings};

/// After the drain timeout, how long stopped executions get to kill and remove containers.
const STOP_GRACE: Duration = Duration::from_secs(15);

/// A worker agent, built and ready to run.
pub struct Agent {
    settings: Settings,
    agent_id: AgentId,
    executor: Arc<dyn Executor>,
}

impl Agent {
    /// Validates the settings and connects the executor backend. Fails with
    /// [`AgentError::DockerUnavailable`] when the Docker daemon does not answer.
    pub async fn build(settings: Settings) -> Result<Agent, AgentError> {
        settings.validate()?;
        let executor = match settings.executor {
            // `auto` will fall back to the process executor once it exists.
            ExecutorKind::Auto | ExecutorKind::Docker => {
                DockerExecutor::connect().await.map_err(|e| {
                    tracing::error!(
                        endpoint = %e.endpoint,
                        reason = %e.reason,
                        "docker daemon not answering at {}", e.endpoint
                    );
                    AgentError::DockerUnavailable {
                        endpoint: e.endpoint,
                        reason: e.reason,
                    }
                })?
            }
        };
        tracing::info!(
            executor = "docker",
            endpoint = executor.endpoint(),
            "executor ready"
        );
        Self::with_executor(settings, Arc::new(executor))
    }

    /// An agent over a given executor (for composition, e.g. `drover dev`, and tests).
    pub fn with_executor(
        settings: Settings,
        executor: Arc<dyn Executor>,
    ) -> Result<Agent, AgentError> {
        let agent_id = settings.validate()?;
        Ok(Agent {
            settings,
            agent_id,
            executor,
        })
    }

    pub fn agent_id(&self) -> &AgentId {
        &self.agent_id
    }

    /// "docker", "process" or "mock".
    pub fn executor_name(&self) -> &'static str {
        self.executor.name()
    }

    /// Runs until `cancel` fires, then drains and returns. Errors only for what retrying
    /// cannot fix (a bad endpoint, a registration the API refuses); outages of the API or
    /// RabbitMQ are waited out.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", agent_id = %self.agent_id);
        self.serve(cancel).instrument(span).await
    }

    async fn serve(self, cancel: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            settings,
            agent_id,
            executor,
        } = self;
        let Some(api) =
            ApiClient::connect(&settings.api_endpoint, agent_id.clone(), &cancel).await?
        else {
            tracing::info!("stopped before the api answered");
            return Ok(());
        };
        let prefetch = settings.prefetch();
        let Some(session) = open_session(&settings.amqp, &agent_id, prefetch, &cancel).await else {
            tracing::info!("stopped before rabbitmq answered");
            return Ok(());
        };

        let registration = pb::RegisterAgentRequest {
            agent_id: agent_id.to_string(),
            hostname: hostname::get()
                .map(|h| h.to_string_lossy().into_owned())
                .unwrap_or_default(),
            pool: settings.pool.clone(),
            labels: settings.labels.clone().into_iter().collect(),
            capacity: settings.capacity,
            executor: executor.name().to_owned(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
        };
        let registered = match api
            .register(registration.clone(), Patience::UntilCancelled, &cancel)
            .await
        {
            Ok(r) => r,
            Err(ApiError::Cancelled) => {
                tracing::info!("stopped before registration completed");
                return Ok(());
            }
            Err(e) => {
                return Err(AgentError::RegistrationRefused {
                    code: e.code().unwrap_or(tonic::Code::Unknown),
                    message: e.to_string(),
                });
            }
        };
        let every = heartbeat::interval_from(&registered);
        tracing::info!(
            pool = %settings.pool,
            capacity = settings.capacity,
            executor = executor.name(),
            heartbeat_ms = every.as_millis() as u64,
            lease_ttl_ms = registered.lease_ttl_ms,
            "registered with the api"
        );

        let runs = RunningRuns::default();
        let hard_stop = CancellationToken::new();
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(
            heartbeat::run(
                api.clone(),
                registration,
                every,
                runs.clone(),
                heartbeat_stop.clone(),
            )
            .in_current_span(),
        );

        let tracker = TaskTracker::new();
        let consumer = CommandConsumer {
            amqp: settings.amqp.clone(),
            agent_id: agent_id.clone(),
            prefetch,
            ctx: Arc::new(RunContext {
                api,
                executor,
                agent_id,
                runs: runs.clone(),
                hard_stop: hard_stop.clone(),
            }),
            tracker: tracker.clone(),
        };
        let connection = consumer.run(session, &cancel).await;

        tracker.close();
        let drain = settings.drain_timeout();
        if !tracker.is_empty() {
            tracing::info!(
                running = runs.len(),
                drain_timeout_s = drain.as_secs(),
                "draining running executions"
            );
        }
        if tokio::time::timeout(drain, tracker.wait()).await.is_err() {
            tracing::warn!(
                running = runs.len(),
                "drain timeout passed; stopping the remaining executions"
            );
            hard_stop.cancel();
            if tokio::time::timeout(STOP_GRACE, tracker.wait())
                .await
                .is_err()
            {
                tracing::warn!(running = runs.len(), "some executions did not stop in time");
            }
        }
        heartbeat_stop.cancel();
        if let Err(e) = heartbeat.await {
            tracing::warn!(error = %e, "heartbeat task failed");
        }
        if let Some(conn) = connection
            && let Err(e) = conn.close(200, "agent stopping".into()).await
        {
            tracing::debug!(error = %e, "rabbitmq connection was already closed");
        }
        tracing::info!("agent stopped");
        Ok(())
    }
}
