//! The agent service: [`Agent::build`] sets up the executors (checking Docker answers when
//! it is used), then
//! [`Agent::run_until_stopped`] connects, registers, heartbeats and executes commands until
//! its token fires, and drains.
//!
//! Start-up order matters: the command queue is declared *before* `Register`, so a command the
//! dispatcher routes to this agent the moment the API knows it is queued, never unroutable.
//! Then the executions an earlier life of this agent left in Docker are reconciled
//! ([`crate::reconcile`]) *before* any command is consumed, with heartbeats already renewing
//! their leases.
//!
//! Drain — on the token (SIGTERM), a `Drain` command, or `drain = true` in a heartbeat answer:
//! 1. `SetDraining`, so dispatchers stop picking this agent;
//! 2. stop intake (cancel the consumer) and hand back what is still queued for us;
//! 3. let running executions finish and report for up to `drain_timeout_secs`, heartbeats
//!    still renewing their leases;
//! 4. hand back the rest: kill, report HANDED_BACK (re-queued without counting an attempt),
//!    remove;
//! 5. stop heartbeats (one after `Deregister` would register the agent again), `Deregister`,
//!    close connections, return `Ok`.
//!
//! Leftovers are never orphaned: an execution that could not be handed back in time keeps its
//! container, which the next start of this agent re-adopts or removes.

use drover_core::bearer::Bearer;
use std::sync::Arc;
use std::time::Duration;

use drover_core::ids::AgentId;
use drover_core::observe::{self, Health};
use drover_proto::v1 as pb;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::api::{ApiClient, ApiError, Patience};
use crate::consumer::{AmqpSession, CommandConsumer, open_session};
use crate::docker::DockerExecutor;
use crate::error::AgentError;
use crate::execution::RunContext;
use crate::executor::Executor;
use crate::heartbeat;
use crate::journal::ExecutionJournal;
use crate::mock::MockExecutor;
use crate::process::ProcessExecutor;
use crate::reconcile;
use crate::running::RunningRuns;
use crate::select::ExecutorSet;
use crate::settings::{ExecutorKind, Settings};
use crate::workspace::Workspaces;
use drover_core::spec::ExecutorName;

/// After the drain timeout, how long handed-back executions get to be killed, reported and
/// removed.
const STOP_GRACE: Duration = Duration::from_secs(15);
/// How long the handing back of commands swept from the queue may take.
const SWEEP_GRACE: Duration = Duration::from_secs(10);
/// Attempts at `Deregister` while the API still sees leases held by this agent (a hand-back
/// it has not committed yet), and the pause between them.
const DEREGISTER_ATTEMPTS: u32 = 5;
const DEREGISTER_PAUSE: Duration = Duration::from_secs(1);

/// A worker agent, built and ready to run.
pub struct Agent {
    settings: Settings,
    agent_id: AgentId,
    executor: Arc<dyn Executor>,
    journal: ExecutionJournal,
    workspaces: Workspaces,
    /// `api` (the last heartbeat got an answer) and `draining` (not draining): `/readyz`.
    health: Health,
}

impl Agent {
    /// Validates the settings and builds the executors: the agent's own (`executor`; `auto`
    /// is Docker when its daemon answers, else the process executor) plus the ones
    /// `allowed_executors` names. Fails with [`AgentError::DockerUnavailable`] when Docker is
    /// asked for (as its own or as allowed) and the daemon does not answer.
    pub async fn build(settings: Settings) -> Result<Agent, AgentError> {
        let agent_id = settings.validate()?;
        let workspaces = Workspaces::new(
            &settings.workspace_root(),
            &agent_id,
            settings.keep_workspaces,
        );
        let own = match settings.executor {
            ExecutorKind::Docker => ExecutorName::Docker,
            ExecutorKind::Process => ExecutorName::Process,
            ExecutorKind::Mock => ExecutorName::Mock,
            ExecutorKind::Auto => match DockerExecutor::connect().await {
                Ok(_) => ExecutorName::Docker,
                Err(e) => {
                    tracing::warn!(
                        endpoint = %e.endpoint,
                        reason = %e.reason,
                        "executor auto: docker daemon not answering; using the process executor (no sandbox)"
                    );
                    ExecutorName::Process
                }
            },
        };
        let mut kinds = settings.allowed()?;
        kinds.push(own);
        kinds.sort();
        kinds.dedup();
        let mut backends = std::collections::BTreeMap::new();
        for kind in kinds {
            let backend: Arc<dyn Executor> = match kind {
                ExecutorName::Docker => {
                    let docker = DockerExecutor::connect().await.map_err(|e| {
                        tracing::error!(
                            endpoint = %e.endpoint,
                            reason = %e.reason,
                            "docker daemon not answering at {}", e.endpoint
                        );
                        AgentError::DockerUnavailable {
                            endpoint: e.endpoint,
                            reason: e.reason,
                        }
                    })?;
                    let (uid, gid) = settings.run_as()?;
                    tracing::info!(endpoint = docker.endpoint(), "docker executor ready");
                    Arc::new(docker.run_as(uid, gid))
                }
                ExecutorName::Process => Arc::new(ProcessExecutor::new(workspaces.agent_root())),
                ExecutorName::Mock => Arc::new(MockExecutor::new(workspaces.agent_root())),
            };
            backends.insert(kind, backend);
        }
        let own_backend = backends
            .remove(&own)
            .ok_or_else(|| AgentError::InvalidSettings("executor: not built".to_owned()))?;
        let set = ExecutorSet::new(own, own_backend, backends);
        tracing::info!(
            executor = own.as_str(),
            allowed = set.allowed().join(","),
            workspace_root = %workspaces.agent_root().display(),
            "executor ready"
        );
        Self::with_executor(settings, Arc::new(set))
    }

    /// An agent over a given executor (for composition, e.g. `drover dev`, and tests).
    pub fn with_executor(
        settings: Settings,
        executor: Arc<dyn Executor>,
    ) -> Result<Agent, AgentError> {
        let agent_id = settings.validate()?;
        let journal = ExecutionJournal::open(settings.execution_journal.as_deref())?;
        let workspaces = Workspaces::new(
            &settings.workspace_root(),
            &agent_id,
            settings.keep_workspaces,
        );
        Ok(Agent {
            settings,
            agent_id,
            executor,
            journal,
            workspaces,
            health: Health::new(&["api", "draining"]),
        })
    }

    /// Readiness: failing before registration, while the API does not answer heartbeats,
    /// and from the start of a drain.
    pub fn health(&self) -> Health {
        self.health.clone()
    }

    pub fn agent_id(&self) -> &AgentId {
        &self.agent_id
    }

    /// "docker", "process" or "mock".
    pub fn executor_name(&self) -> &'static str {
        self.executor.name()
    }

    /// Runs until `cancel` fires (or a drain is asked for by command or by the API), then
    /// drains and returns. Errors only for what retrying cannot fix (a bad endpoint, a
    /// registration the API refuses); outages of the API or RabbitMQ are waited out.
    pub async fn run_until_stopped(self, cancel: CancellationToken) -> Result<(), AgentError> {
        let span = tracing::info_span!("agent", agent_id = %self.agent_id);
        self.serve(cancel).instrument(span).await
    }

    async fn serve(self, cancel: CancellationToken) -> Result<(), AgentError> {
        let Agent {
            settings,
            agent_id,
            executor,
            journal,
            workspaces,
            health,
        } = self;
        health.set("draining", Ok(()));
        let token = Bearer::from_secret(&settings.agent_token)
            .map_err(|e| AgentError::InvalidSettings(format!("agent_token: {e}")))?;
        if !token.is_set() {
            tracing::warn!(
                "no agent token configured (DROVER_AGENT_TOKEN): the api will refuse this agent"
            );
        }
        let Some(api) =
            ApiClient::connect(&settings.api_endpoint, agent_id.clone(), token, &cancel).await?
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
        health.set("api", Ok(()));
        metrics::gauge!(observe::names::AGENT_CAPACITY).set(f64::from(settings.capacity));
        tracing::info!(
            pool = %settings.pool,
            capacity = settings.capacity,
            executor = executor.name(),
            heartbeat_ms = every.as_millis() as u64,
            lease_ttl_ms = registered.lease_ttl_ms,
            "registered with the api"
        );

        // SIGTERM (the caller's token), a Drain command or the API all end up here.
        let drain = cancel.child_token();
        let runs = RunningRuns::default();
        let ctx = Arc::new(RunContext {
            api: api.clone(),
            executor,
            agent_id: agent_id.clone(),
            runs: runs.clone(),
            draining: drain.clone(),
            hand_back: CancellationToken::new(),
            journal,
            workspaces,
            start_fold: Duration::from_millis(settings.start_fold_ms),
        });
        let tracker = TaskTracker::new();

        // Adopted leases are claimed before the first heartbeat, which then renews them.
        reconcile::adopt_leftovers(&ctx, &tracker, &drain).await;
        let heartbeat_stop = CancellationToken::new();
        let heartbeat = tokio::spawn(
            heartbeat::run(
                api.clone(),
                registration,
                every,
                runs.clone(),
                drain.clone(),
                heartbeat_stop.clone(),
                health.clone(),
            )
            .in_current_span(),
        );

        let intake_stop = CancellationToken::new();
        let consumer = Arc::new(CommandConsumer {
            amqp: settings.amqp.clone(),
            agent_id: agent_id.clone(),
            prefetch,
            ctx: ctx.clone(),
            tracker: tracker.clone(),
            drain: drain.clone(),
        });
        let intake = tokio::spawn({
            let consumer = consumer.clone();
            let intake_stop = intake_stop.clone();
            async move { consumer.run(session, &intake_stop).await }.in_current_span()
        });

        drain.cancelled().await;
        health.set("draining", Err("draining: taking no new work".into()));
        let session = drain_agent(
            &ctx,
            &consumer,
            intake,
            intake_stop,
            &tracker,
            settings.drain_timeout(),
        )
        .await;

        // Heartbeats stop before deregistering: a heartbeat after it would find the agent
        // unknown and register it again.
        heartbeat_stop.cancel();
        match heartbeat.await {
            Ok(()) => tracing::info!("heartbeats stopped"),
            Err(e) => tracing::warn!(error = %e, "heartbeat task failed"),
        }
        deregister(&ctx.api).await;
        if let Some(session) = session
            && let Err(e) = session.connection.close(200, "agent stopping".into()).await
        {
            tracing::debug!(error = %e, "rabbitmq connection was already closed");
        }
        tracing::info!("agent stopped");
        Ok(())
    }
}

/// Steps 1–4 of the drain (see the module doc). Heartbeats keep running throughout. Returns
/// the AMQP session for the caller to close.
async fn drain_agent(
    ctx: &RunContext,
    consumer: &CommandConsumer,
    intake: tokio::task::JoinHandle<Option<AmqpSession>>,
    intake_stop: CancellationToken,
    tracker: &TaskTracker,
    drain_timeout: Duration,
) -> Option<AmqpSession> {
    // The caller's token may have fired already; the drain's own calls are bounded by their
    // retries instead.
    let unbounded = CancellationToken::new();
    tracing::info!(
        running = ctx.runs.len(),
        drain_timeout_s = drain_timeout.as_secs(),
        "draining: taking no new work"
    );
    match ctx.api.set_draining(&unbounded).await {
        Ok(()) => tracing::info!("the api marked this agent as draining"),
        Err(e) => tracing::warn!(error = %e, "could not mark this agent as draining; carrying on"),
    }

    intake_stop.cancel();
    let session = match intake.await {
        Ok(session) => session,
        Err(e) => {
            tracing::warn!(error = %e, "command consumer task failed");
            None
        }
    };
    sweep(consumer, session.as_ref(), "after stopping intake").await;

    tracker.close();
    if !tracker.is_empty() {
        tracing::info!(
            running = ctx.runs.len(),
            "waiting for running executions to finish"
        );
    }
    if tokio::time::timeout(drain_timeout, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!(
            running = ctx.runs.len(),
            "drain timeout passed; handing back the remaining executions"
        );
        ctx.hand_back.cancel();
        if tokio::time::timeout(STOP_GRACE, tracker.wait())
            .await
            .is_err()
        {
            tracing::warn!(
                running = ctx.runs.len(),
                "some executions did not finish handing back in time; their containers stay for the next start"
            );
        }
    } else {
        tracing::info!("every execution finished");
    }
    // Commands routed to us while we drained (a dispatcher that picked us just before
    // SetDraining landed).
    sweep(consumer, session.as_ref(), "before deregistering").await;
    if tokio::time::timeout(SWEEP_GRACE, tracker.wait())
        .await
        .is_err()
    {
        tracing::warn!("commands swept from the queue are still being handed back");
    }

    session
}

/// Step 5 of the drain: leave the fleet. Retried a few times while the API still sees leases
/// held here (a hand-back it has not committed yet).
async fn deregister(api: &ApiClient) {
    let unbounded = CancellationToken::new();
    for attempt in 1..=DEREGISTER_ATTEMPTS {
        match api.deregister(&unbounded).await {
            Ok(()) => {
                tracing::info!("deregistered");
                break;
            }
            Err(ApiError::Stale { code, message }) if attempt < DEREGISTER_ATTEMPTS => {
                tracing::info!(?code, %message, "the api still sees leases held here; retrying deregistration");
                tokio::time::sleep(DEREGISTER_PAUSE).await;
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not deregister; the api will see this agent's heartbeats stop");
                break;
            }
        }
    }
}

/// Hands back whatever is still in the command queue. The commands run on the tracker like
/// any execution; with the agent draining, an `Execute` is handed back without starting.
async fn sweep(consumer: &CommandConsumer, session: Option<&AmqpSession>, when: &str) {
    let Some(session) = session else { return };
    let swept = consumer.sweep(session).await;
    if swept > 0 {
        tracing::info!(commands = swept, when, "handled commands left in the queue");
    }
}
