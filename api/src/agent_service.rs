//! AgentService: what worker agents call. Every run-related call is authorised by the lease:
//! the run must be held by this agent under this epoch. A stale report is refused with
//! FAILED_PRECONDITION and changes nothing; a repeat of an accepted report is a no-op.

use drover_core::CoreError;
use drover_core::announce::Announcement;
use drover_core::convert;
use drover_core::error::Refusal;
use drover_core::ids::{AgentId, RunId};
use drover_core::observe;
use drover_core::repo::agents::{self, AgentRegistration};
use drover_core::repo::attempts::{self, AttemptEnd, EndKind, Holder};
use drover_core::repo::folded_end::{self, FoldedArtifacts, FoldedSuccess};
use drover_core::repo::runs::EventRecord;
use drover_core::repo::{RunRecord, Transition, TransitionPatch, artifacts, logs, runs, secrets};
use drover_core::retry::Failure;
use drover_core::spec::validate_pool;
use drover_core::state::RunState;
use drover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::error::{ApiError, ApiResult};
use crate::state::MAX_REASON_BYTES;
use crate::state::{AppState, parse_run_id};

const MAX_CHUNKS: usize = 64;
const MAX_CHUNK_BYTES: usize = 64 * 1024;
const MAX_OUTPUT_BYTES: usize = 64 * 1024;

#[derive(Debug, Clone)]
pub struct AgentApi {
    state: AppState,
}

fn agent_id(s: &str) -> ApiResult<AgentId> {
    AgentId::parse(s).map_err(|m| ApiError::bad("agent_id", m))
}

fn epoch(v: u64) -> ApiResult<i64> {
    i64::try_from(v).map_err(|_| ApiError::bad("lease_epoch", "out of range"))
}

/// The run, if `agent` holds its lease under `epoch` right now: the one rule for every
/// AgentService call, reports and artifact transfers alike. A refusal from an agent that lost
/// the lease (to another agent, or to a newer epoch of its own) is a fenced call and counted.
pub(crate) async fn leased_run(
    state: &AppState,
    agent: &AgentId,
    run: RunId,
    epoch: i64,
) -> ApiResult<RunRecord> {
    let rec = runs::get_unscoped(&state.pool, run)
        .await?
        .ok_or(ApiError::NotFound("run not found"))?;
    let span = tracing::Span::current();
    drover_core::telemetry::record_lease(&span, run, agent.as_str(), epoch);
    drover_core::telemetry::record_run(&span, &rec);
    if rec.agent_id.as_deref() != Some(agent.as_str()) {
        metrics::counter!(observe::names::FENCED_REPORTS).increment(1);
        tracing::warn!(run_id = %run, agent_id = %agent, "call for a run not leased to this agent refused");
        return Err(ApiError::Precondition(
            "run is not leased to this agent".into(),
        ));
    }
    if rec.lease_epoch != epoch {
        metrics::counter!(observe::names::FENCED_REPORTS).increment(1);
        tracing::info!(run_id = %run, agent_id = %agent, given = epoch, current = rec.lease_epoch, "stale lease epoch refused");
        return Err(ApiError::Precondition(format!(
            "stale lease epoch {epoch}; current epoch is {}",
            rec.lease_epoch
        )));
    }
    Ok(rec)
}

/// The guarded ASSIGNED → RUNNING of `agent`'s lease under `epoch`.
/// The folded success of `end`, reported by `agent` under epoch `ep` (see
/// [`folded_end`]).
fn folded_success<'a>(
    run: RunId,
    agent: &'a AgentId,
    ep: i64,
    executor: &'a str,
    start_reason: &'a str,
    end: &'a AttemptEnd,
) -> FoldedSuccess<'a> {
    let (output, output_truncated) = end
        .output
        .as_ref()
        .map_or((&[][..], false), |(o, t)| (o.as_slice(), *t));
    FoldedSuccess {
        run_id: run,
        agent: agent.as_str(),
        epoch: ep,
        executor,
        start_reason,
        exit_code: end.exit_code,
        output,
        output_truncated,
        reason: &end.reason,
    }
}

fn start(agent: &AgentId, run: RunId, epoch: i64, executor: String, reason: String) -> Transition {
    Transition {
        expected_epoch: Some(epoch),
        expected_agent: Some(agent.as_str().to_owned()),
        reason: Some(reason),
        patch: TransitionPatch::Start { executor },
        ..Transition::new(run, RunState::Running)
    }
}

impl AgentApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn apply(&self, mut t: Transition) -> Result<RunRecord, CoreError> {
        t.frees_capacity = t.to.is_terminal();
        // One statement, so no transaction around it: BEGIN and COMMIT were two of its three
        // round trips.
        let mut conn = self.state.pool.acquire().await?;
        let (run, event) = runs::transition(&mut conn, &t).await?;
        observe::record_transition(&event);
        self.state
            .bus
            .announce(Announcement::carrying(&run, &[&event]));
        Ok(run)
    }

    async fn register(
        &self,
        req: pb::RegisterAgentRequest,
    ) -> ApiResult<pb::RegisterAgentResponse> {
        let id = agent_id(&req.agent_id)?;
        validate_pool(&req.pool).map_err(|e| ApiError::bad("pool", e.message))?;
        if !(1..=1024).contains(&req.capacity) {
            return Err(ApiError::bad("capacity", "must be 1..1024"));
        }
        let reg = AgentRegistration {
            id: id.as_str().to_owned(),
            hostname: req.hostname,
            pool: req.pool,
            labels: req.labels.into_iter().collect(),
            capacity: i32::try_from(req.capacity).unwrap_or(1),
            executor: req.executor,
            version: req.version,
        };
        agents::register(&self.state.pool, &reg).await?;
        tracing::info!(agent_id = %id, pool = %reg.pool, capacity = reg.capacity, executor = %reg.executor, "agent registered");
        let lease = &self.state.settings.lease;
        Ok(pb::RegisterAgentResponse {
            heartbeat_interval_ms: lease.heartbeat_interval_ms,
            lease_ttl_ms: lease.lease_ttl_ms,
        })
    }

    async fn heartbeat(&self, req: pb::HeartbeatRequest) -> ApiResult<pb::HeartbeatResponse> {
        let id = agent_id(&req.agent_id)?;
        let mut leases = Vec::with_capacity(req.running.len());
        for l in &req.running {
            leases.push((
                parse_run_id("running.run_id", &l.run_id)?,
                epoch(l.lease_epoch)?,
            ));
        }
        let ttl = i64::try_from(self.state.settings.lease.lease_ttl_ms).unwrap_or(i64::MAX);
        let answer =
            match agents::heartbeat_answer(&self.state.pool, id.as_str(), &leases, ttl).await {
                Err(CoreError::NotFound) => {
                    return Err(ApiError::NotFound("agent not registered"));
                }
                other => other?,
            };
        let refs = |v: Vec<(RunId, i64)>| -> Vec<pb::LeaseRef> {
            v.into_iter()
                .map(|(r, e)| pb::LeaseRef {
                    run_id: r.to_string(),
                    lease_epoch: u64::try_from(e).unwrap_or(0),
                })
                .collect()
        };
        Ok(pb::HeartbeatResponse {
            revoked: refs(answer.revoked),
            cancel: refs(answer.cancel),
            drain: answer.drain,
        })
    }

    async fn get_assignment(
        &self,
        req: pb::GetAssignmentRequest,
    ) -> ApiResult<pb::GetAssignmentResponse> {
        let agent = agent_id(&req.agent_id)?;
        let run = parse_run_id("run_id", &req.run_id)?;
        let rec = leased_run(&self.state, &agent, run, epoch(req.lease_epoch)?).await?;
        if !matches!(rec.state, RunState::Assigned | RunState::Running) {
            return Err(ApiError::Precondition(format!("run is {}", rec.state)));
        }
        // Only now, with the lease checked, are the run's secrets opened. One that is gone or
        // does not decrypt is left out: the agent fails the attempt with `secret_missing`
        // rather than this call failing on every retry.
        let revealed = secrets::reveal(
            &self.state.pool,
            self.state.secret_keys.as_deref(),
            rec.tenant_id,
            &rec.spec.secrets,
        )
        .await?;
        for (name, why) in &revealed.unavailable {
            tracing::error!(run_id = %run, tenant = %rec.tenant_id, secret = %name, reason = %why, "a secret of the run cannot be delivered");
        }
        Ok(pb::GetAssignmentResponse {
            run_id: rec.id.to_string(),
            attempt: u32::try_from(rec.attempt).unwrap_or(0),
            lease_epoch: req.lease_epoch,
            state: convert::state_to_proto(rec.state).into(),
            spec: Some(convert::spec_to_proto(&rec.spec)),
            tenant_id: rec.tenant_id.to_string(),
            cancel_requested: rec.cancel_requested_at.is_some(),
            secret_env: revealed.values.into_iter().collect(),
        })
    }

    async fn report_started(&self, req: pb::ReportStartedRequest) -> ApiResult<()> {
        let agent = agent_id(&req.agent_id)?;
        let run = parse_run_id("run_id", &req.run_id)?;
        let ep = epoch(req.lease_epoch)?;
        drover_core::telemetry::record_lease(&tracing::Span::current(), run, agent.as_str(), ep);
        let executor = if req.executor.is_empty() {
            "docker".to_owned()
        } else {
            req.executor
        };
        let reason = format!("started on {agent} ({executor})");
        match self.apply(start(&agent, run, ep, executor, reason)).await {
            Ok(rec) => {
                drover_core::telemetry::record_run(&tracing::Span::current(), &rec);
                tracing::info!(run_id = %run, agent_id = %agent, epoch = ep, "run started");
                Ok(())
            }
            // A repeat of an accepted start report.
            Err(CoreError::Refused(Refusal::Illegal {
                from: RunState::Running,
                ..
            })) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }

    async fn push_logs(&self, req: pb::PushLogsRequest) -> ApiResult<()> {
        let agent = agent_id(&req.agent_id)?;
        let run = parse_run_id("run_id", &req.run_id)?;
        if req.chunks.len() > MAX_CHUNKS {
            return Err(ApiError::bad(
                "chunks",
                format!("at most {MAX_CHUNKS} per request"),
            ));
        }
        if req.chunks.iter().any(|c| c.data.len() > MAX_CHUNK_BYTES) {
            return Err(ApiError::bad(
                "chunks.data",
                format!("at most {MAX_CHUNK_BYTES} bytes per chunk"),
            ));
        }
        let rec = leased_run(&self.state, &agent, run, epoch(req.lease_epoch)?).await?;
        if !matches!(rec.state, RunState::Assigned | RunState::Running) {
            return Err(ApiError::Precondition(format!("run is {}", rec.state)));
        }
        let chunks: Vec<(i16, Vec<u8>)> = req
            .chunks
            .into_iter()
            .map(|c| (i16::try_from(c.stream).unwrap_or(1), c.data))
            .collect();
        logs::append(&self.state.pool, rec.tenant_id, run, rec.attempt, &chunks).await?;
        let bytes: usize = chunks.iter().map(|(_, d)| d.len()).sum();
        metrics::counter!(observe::names::LOG_BYTES).increment(bytes as u64);
        for (_, data) in chunks {
            self.state.bus.run_log(run, data);
        }
        Ok(())
    }

    async fn report_completion(
        &self,
        mut req: pb::ReportCompletionRequest,
    ) -> ApiResult<pb::ReportCompletionResponse> {
        let agent = agent_id(&req.agent_id)?;
        let run = parse_run_id("run_id", &req.run_id)?;
        let ep = epoch(req.lease_epoch)?;
        drover_core::telemetry::record_lease(&tracing::Span::current(), run, agent.as_str(), ep);
        let mut upload = crate::artifacts::parse_upload_id(&req.artifact_upload_id)?;
        let inline = std::mem::take(&mut req.inline_artifacts);
        if upload.is_some() && !inline.is_empty() {
            return Err(ApiError::bad(
                "inline_artifacts",
                "not together with artifact_upload_id",
            ));
        }
        // A run that ended inside the agent's fold window: its start goes in first.
        let folded_executor = std::mem::take(&mut req.started_executor);
        let start_reason = if folded_executor.is_empty() {
            String::new()
        } else {
            format!("started on {agent} ({folded_executor}); reported with its end")
        };
        let fold_start = (!folded_executor.is_empty()).then(|| {
            start(
                &agent,
                run,
                ep,
                folded_executor.clone(),
                start_reason.clone(),
            )
        });
        let kind = match pb::Outcome::try_from(req.outcome) {
            Ok(pb::Outcome::Succeeded) => EndKind::Succeeded,
            Ok(pb::Outcome::Failed) if req.infrastructure_error => {
                EndKind::Failed(Failure::Infrastructure)
            }
            Ok(pb::Outcome::Failed) => EndKind::Failed(Failure::Exit(req.exit_code)),
            Ok(pb::Outcome::Cancelled) => EndKind::Cancelled,
            Ok(pb::Outcome::TimedOut) => EndKind::TimedOut,
            Ok(pb::Outcome::HandedBack) => EndKind::HandedBack,
            _ => {
                return Err(ApiError::bad(
                    "outcome",
                    "must be SUCCEEDED, FAILED, CANCELLED, TIMED_OUT or HANDED_BACK",
                ));
            }
        };
        if req.output.len() > MAX_OUTPUT_BYTES {
            return Err(ApiError::bad(
                "output",
                format!("at most {MAX_OUTPUT_BYTES} bytes"),
            ));
        }
        if req.reason.len() > MAX_REASON_BYTES {
            return Err(ApiError::bad(
                "reason",
                format!("at most {MAX_REASON_BYTES} bytes"),
            ));
        }
        let reason = if req.reason.is_empty() {
            match (kind, req.exit_code) {
                (EndKind::HandedBack, _) => format!("handed back by draining agent {agent}"),
                (_, Some(code)) => format!("exited with code {code}"),
                _ => "finished".to_owned(),
            }
        } else {
            req.reason
        };
        let end = AttemptEnd {
            kind,
            exit_code: req.exit_code,
            output: Some((req.output, req.output_truncated)),
            reason,
        };
        let holder = Holder {
            agent: Some(agent.as_str().to_owned()),
            epoch: ep,
            fence: false,
        };
        let checked = if inline.is_empty() {
            None
        } else {
            Some(crate::artifacts::check_inline(&self.state, inline)?)
        };
        // A folded success: start and end in one row update (the common short run)...
        let fold = fold_start.is_some() && kind == EndKind::Succeeded;
        // ...and when Postgres keeps its files, those too, all in one statement.
        let kept = checked
            .as_ref()
            .and_then(|c| c.kept().map(|kept| (c, kept)));
        let one_statement = match kept {
            Some((checked, kept)) if fold => {
                let files = FoldedArtifacts {
                    upload_id: uuid::Uuid::now_v7(),
                    entries: &checked.entries,
                    bytes: checked.bytes_i64(),
                    kept,
                };
                let mut conn = self.state.pool.acquire().await.map_err(CoreError::from)?;
                let done = folded_end::start_and_succeed_with_artifacts(
                    &mut conn,
                    &folded_success(run, &agent, ep, &folded_executor, &start_reason, &end),
                    &files,
                )
                .await?;
                if done.is_some() {
                    metrics::counter!(observe::names::ARTIFACT_BYTES).increment(checked.bytes);
                }
                done
            }
            _ => None,
        };
        if one_statement.is_none()
            && let Some(checked) = checked
        {
            upload = crate::artifacts::store_inline(&self.state, &agent, run, ep, checked).await?;
        }
        let ended = async {
            if let Some((rec, started, event)) = one_statement {
                observe::record_transition(&started);
                return Ok::<_, CoreError>((rec, Some(started), event));
            }
            let mut tx = self.state.pool.begin().await?;
            if fold
                && let Some((rec, started, event)) = folded_end::start_and_succeed(
                    &mut tx,
                    &folded_success(run, &agent, ep, &folded_executor, &start_reason, &end),
                )
                .await?
            {
                if let Some(upload) = upload {
                    artifacts::commit_upload(&mut tx, run, upload, Some(agent.as_str()), ep, true)
                        .await?;
                }
                tx.commit().await?;
                observe::record_transition(&started);
                return Ok::<_, CoreError>((rec, Some(started), event));
            }
            let (started, locked) = match fold_start {
                Some(t) => match runs::transition(&mut tx, &t).await {
                    Ok((rec, event)) => (Some(event), Some(rec)),
                    // Reported after all, or the lease is gone: the end decides below, under
                    // the same lock, and refuses what is stale.
                    Err(CoreError::Refused(_)) => (None, None),
                    Err(e) => return Err(e),
                },
                None => (None, None),
            };
            let (rec, event) =
                attempts::end_attempt_with_artifacts(&mut tx, run, &holder, end, upload, locked)
                    .await?;
            tx.commit().await?;
            if let Some(event) = &started {
                observe::record_transition(event);
            }
            Ok::<_, CoreError>((rec, started, event))
        };
        match ended.await {
            Ok((rec, started, event)) => {
                let span = tracing::Span::current();
                span.record("tenant", tracing::field::display(rec.tenant_id));
                observe::record_transition(&event);
                // The start (when folded) and the end, for watchers; an end that wrote more
                // events than these leaves a gap, which they read from Postgres.
                let events: Vec<&EventRecord> = started.iter().chain([&event]).collect();
                self.state
                    .bus
                    .announce(Announcement::carrying(&rec, &events));
                tracing::info!(run_id = %run, agent_id = %agent, epoch = ep, attempt = event.attempt, state = %rec.state, exit_code = ?rec.exit_code, reason = rec.reason.as_deref().unwrap_or(""), "attempt ended");
                Ok(pb::ReportCompletionResponse {
                    state: convert::state_to_proto(rec.state).into(),
                })
            }
            // This lease's end was already applied (a repeat after a lost answer): every end
            // that its holder did not report bumps the epoch, so a same-epoch refusal here can
            // only be our own earlier report. Say what stands.
            Err(CoreError::Refused(Refusal::Illegal { from, .. }))
                if from.is_terminal() || from == RunState::Queued =>
            {
                Ok(pb::ReportCompletionResponse {
                    state: convert::state_to_proto(from).into(),
                })
            }
            Err(e) => {
                if matches!(e, CoreError::Refused(_)) {
                    tracing::info!(run_id = %run, agent_id = %agent, epoch = ep, refusal = %e, "completion report refused");
                }
                Err(e.into())
            }
        }
    }

    async fn set_draining(&self, req: pb::SetDrainingRequest) -> ApiResult<()> {
        let id = agent_id(&req.agent_id)?;
        match agents::set_draining(&self.state.pool, id.as_str()).await {
            Err(CoreError::NotFound) => Err(ApiError::NotFound("agent not registered")),
            other => {
                other?;
                tracing::info!(agent_id = %id, "agent draining: no new work");
                Ok(())
            }
        }
    }

    async fn deregister(&self, req: pb::DeregisterRequest) -> ApiResult<()> {
        let id = agent_id(&req.agent_id)?;
        if agents::deregister(&self.state.pool, id.as_str()).await? {
            tracing::info!(agent_id = %id, "agent deregistered");
            Ok(())
        } else {
            Err(ApiError::Precondition(
                "agent still holds leases; hand them back or finish them first".into(),
            ))
        }
    }
}

#[tonic::async_trait]
impl pb::agent_service_server::AgentService for AgentApi {
    async fn register(
        &self,
        request: Request<pb::RegisterAgentRequest>,
    ) -> Result<Response<pb::RegisterAgentResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        Ok(Response::new(
            AgentApi::register(self, request.into_inner()).await?,
        ))
    }

    async fn heartbeat(
        &self,
        request: Request<pb::HeartbeatRequest>,
    ) -> Result<Response<pb::HeartbeatResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        Ok(Response::new(
            AgentApi::heartbeat(self, request.into_inner()).await?,
        ))
    }

    async fn get_assignment(
        &self,
        request: Request<pb::GetAssignmentRequest>,
    ) -> Result<Response<pb::GetAssignmentResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        Ok(Response::new(
            AgentApi::get_assignment(self, request.into_inner()).await?,
        ))
    }

    async fn report_started(
        &self,
        request: Request<pb::ReportStartedRequest>,
    ) -> Result<Response<pb::ReportStartedResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        AgentApi::report_started(self, request.into_inner()).await?;
        Ok(Response::new(pb::ReportStartedResponse {}))
    }

    async fn push_logs(
        &self,
        request: Request<pb::PushLogsRequest>,
    ) -> Result<Response<pb::PushLogsResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        AgentApi::push_logs(self, request.into_inner()).await?;
        Ok(Response::new(pb::PushLogsResponse {}))
    }

    async fn report_completion(
        &self,
        request: Request<pb::ReportCompletionRequest>,
    ) -> Result<Response<pb::ReportCompletionResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        Ok(Response::new(
            AgentApi::report_completion(self, request.into_inner()).await?,
        ))
    }

    async fn set_draining(
        &self,
        request: Request<pb::SetDrainingRequest>,
    ) -> Result<Response<pb::SetDrainingResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        AgentApi::set_draining(self, request.into_inner()).await?;
        Ok(Response::new(pb::SetDrainingResponse {}))
    }

    async fn deregister(
        &self,
        request: Request<pb::DeregisterRequest>,
    ) -> Result<Response<pb::DeregisterResponse>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        AgentApi::deregister(self, request.into_inner()).await?;
        Ok(Response::new(pb::DeregisterResponse {}))
    }

    async fn upload_artifacts(
        &self,
        request: Request<tonic::Streaming<pb::UploadArtifactsRequest>>,
    ) -> Result<Response<pb::UploadArtifactsResponse>, Status> {
        let caller = self.state.agent_token(&request).await?;
        Ok(Response::new(
            crate::artifacts::upload(&self.state, &caller, request.into_inner()).await?,
        ))
    }

    type DownloadInputsStream = crate::artifacts::ChunkStream;

    async fn download_inputs(
        &self,
        request: Request<pb::DownloadInputsRequest>,
    ) -> Result<Response<Self::DownloadInputsStream>, Status> {
        self.state
            .agent(&request, &request.get_ref().agent_id)
            .await?;
        Ok(Response::new(
            crate::artifacts::download_inputs(&self.state, request.into_inner()).await?,
        ))
    }
}
