//! RunService: what clients call. Every call is authenticated ([`crate::auth`]) and every
//! query is scoped by the caller's tenant, so another tenant's run is NOT_FOUND.

use std::pin::Pin;

use drover_core::CoreError;
use drover_core::convert;
use drover_core::error::Refusal;
use drover_core::ids::{RunId, TenantId};
use drover_core::repo::approvals::{self, Decider, Decision};
use drover_core::repo::tokens::Role;
use drover_core::repo::{cancel, runs, secrets, waiting};
use drover_core::spec::MAX_IDEMPOTENCY_KEY_BYTES;
use drover_proto::v1 as pb;
use futures::Stream;
use tonic::{Request, Response, Status};

use crate::auth::User;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, client_reason, page_size, parse_run_id};
use crate::{artifacts, quota};
use crate::{log_stream, watch};

#[derive(Debug, Clone)]
pub struct RunApi {
    state: AppState,
}

impl RunApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    async fn submit(
        &self,
        user: &User,
        req: pb::SubmitRunRequest,
    ) -> ApiResult<pb::SubmitRunResponse> {
        let tenant = user.tenant;
        let raw = req
            .spec
            .map(convert::raw_spec_from_proto)
            .ok_or_else(|| ApiError::bad("spec", "is required"))?;
        let spec = raw.validate()?;
        artifacts::check_inputs_from_run(&self.state, tenant, spec.inputs_from_run).await?;
        let key = Some(req.idempotency_key.trim()).filter(|k| !k.is_empty());
        if key.is_some_and(|k| k.len() > MAX_IDEMPOTENCY_KEY_BYTES) {
            return Err(ApiError::bad(
                "idempotency_key",
                format!("must be at most {MAX_IDEMPOTENCY_KEY_BYTES} bytes"),
            ));
        }
        // A run naming a secret the tenant does not have could only fail on the worker: say so
        // now. (One deleted after submit fails the attempt with `secret_missing`.)
        let missing = secrets::missing(&self.state.pool, tenant, &spec.secrets).await?;
        if !missing.is_empty() {
            return Err(ApiError::Precondition(format!(
                "spec.secrets names secrets this tenant does not have: {} (create them with \
                 AdminService.PutSecret)",
                missing.join(", ")
            )));
        }
        let by = runs::Submitter {
            token: Some(user.principal.token_id),
            actor: user.actor(),
        };
        let max_queued = quota::max_queued(&self.state, user);
        let submitted = runs::submit_within(
            &self.state.pool,
            tenant,
            &spec,
            key,
            &by,
            max_queued,
            Some(&self.state.outbox),
        )
        .await?;
        drover_core::telemetry::record_run(&tracing::Span::current(), &submitted.run);
        if !submitted.deduplicated {
            tracing::info!(run_id = %submitted.run.id, tenant = %tenant, pool = %spec.pool, "run submitted");
            self.state.bus.run_event(submitted.run.id, 1);
        }
        Ok(pb::SubmitRunResponse {
            run: Some(convert::run_to_proto(&submitted.run)),
            deduplicated: submitted.deduplicated,
        })
    }

    async fn get(&self, tenant: TenantId, id: RunId) -> ApiResult<pb::Run> {
        let run = runs::get(&self.state.pool, tenant, id)
            .await?
            .ok_or(ApiError::NotFound("run not found"))?;
        let mut out = convert::run_to_proto(&run);
        let liveness = i64::try_from(self.state.settings.lease.lease_ttl_ms).unwrap_or(i64::MAX);
        if let Some(wait) = waiting::why_waiting(&self.state.pool, &run, liveness).await? {
            out.wait = Some(convert::wait_to_proto(&wait));
        }
        Ok(out)
    }

    async fn cancel(
        &self,
        user: &User,
        req: pb::CancelRunRequest,
    ) -> ApiResult<pb::CancelRunResponse> {
        let id = parse_run_id("run_id", &req.run_id)?;
        let reason = client_reason(&req.reason, "cancelled by a client")?;
        let run = match cancel::cancel(&self.state.pool, user.tenant, id, &reason, &user.actor())
            .await
        {
            Ok(cancel::Cancelled::Now(run, event)) => {
                tracing::info!(run_id = %id, "run cancelled while waiting");
                self.state.bus.run_event(id, event.seq);
                run
            }
            Ok(cancel::Cancelled::Requested(run)) => {
                tracing::info!(run_id = %id, agent_id = ?run.agent_id, epoch = run.lease_epoch, "cancel requested from the agent");
                run
            }
            Err(CoreError::Refused(Refusal::Illegal { from, .. })) => {
                return Err(ApiError::Precondition(format!(
                    "run already ended {from}; nothing to cancel"
                )));
            }
            Err(e) => return Err(e.into()),
        };
        Ok(pb::CancelRunResponse {
            run: Some(convert::run_to_proto(&run)),
        })
    }

    async fn list(
        &self,
        tenant: TenantId,
        req: pb::ListRunsRequest,
    ) -> ApiResult<pb::ListRunsResponse> {
        let mut states = Vec::with_capacity(req.states.len());
        for s in req.states {
            states.push(
                convert::state_from_proto(s)
                    .ok_or_else(|| ApiError::bad("states", format!("unknown state {s}")))?,
            );
        }
        let page = page_size(req.page_size)?;
        let before = if req.page_token.is_empty() {
            None
        } else {
            Some(parse_run_id("page_token", &req.page_token)?)
        };
        let mut rows = runs::list(
            &self.state.pool,
            tenant,
            &states,
            i64::from(page) + 1,
            before,
        )
        .await?;
        let more = rows.len() > page as usize;
        rows.truncate(page as usize);
        let next_page_token = if more {
            rows.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListRunsResponse {
            runs: rows.iter().map(convert::run_to_proto).collect(),
            next_page_token,
        })
    }

    async fn decide(
        &self,
        user: &User,
        run_id: &str,
        decision: Decision,
        reason: String,
    ) -> ApiResult<pb::Run> {
        let id = parse_run_id("run_id", run_id)?;
        let by = Decider {
            token: user.principal.token_id,
            actor: user.actor(),
            allow_self_approval: user.principal.allow_self_approval,
        };
        match approvals::decide(&self.state.pool, user.tenant, id, decision, &by, &reason).await {
            Ok((run, event)) => {
                tracing::info!(run_id = %id, tenant = %user.tenant, decision = ?decision, "approval decision");
                self.state.bus.run_event(id, event.seq);
                Ok(convert::run_to_proto(&run))
            }
            Err(CoreError::Refused(Refusal::Illegal { from, .. })) => Err(ApiError::Precondition(
                format!("run is {from}, not waiting for approval"),
            )),
            Err(e) => Err(e.into()),
        }
    }
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<pb::WatchRunResponse, Status>> + Send>>;
type LogsStream = Pin<Box<dyn Stream<Item = Result<pb::StreamLogsResponse, Status>> + Send>>;

#[tonic::async_trait]
impl pb::run_service_server::RunService for RunApi {
    async fn submit_run(
        &self,
        request: Request<pb::SubmitRunRequest>,
    ) -> Result<Response<pb::SubmitRunResponse>, Status> {
        let user = self.state.user(&request, Role::Submitter).await?;
        Ok(Response::new(
            self.submit(&user, request.into_inner()).await?,
        ))
    }

    async fn get_run(
        &self,
        request: Request<pb::GetRunRequest>,
    ) -> Result<Response<pb::GetRunResponse>, Status> {
        let tenant = self.state.reader(&request).await?.tenant;
        let id = parse_run_id("run_id", &request.get_ref().run_id)?;
        let run = self.get(tenant, id).await?;
        Ok(Response::new(pb::GetRunResponse { run: Some(run) }))
    }

    async fn list_runs(
        &self,
        request: Request<pb::ListRunsRequest>,
    ) -> Result<Response<pb::ListRunsResponse>, Status> {
        let tenant = self.state.reader(&request).await?.tenant;
        Ok(Response::new(
            self.list(tenant, request.into_inner()).await?,
        ))
    }

    async fn cancel_run(
        &self,
        request: Request<pb::CancelRunRequest>,
    ) -> Result<Response<pb::CancelRunResponse>, Status> {
        let user = self.state.user(&request, Role::Submitter).await?;
        Ok(Response::new(
            self.cancel(&user, request.into_inner()).await?,
        ))
    }

    type WatchRunStream = WatchStream;

    async fn watch_run(
        &self,
        request: Request<pb::WatchRunRequest>,
    ) -> Result<Response<Self::WatchRunStream>, Status> {
        let tenant = self.state.reader(&request).await?.tenant;
        let id = parse_run_id("run_id", &request.get_ref().run_id)?;
        let stream = watch::watch(self.state.clone(), tenant, id).await?;
        Ok(Response::new(Box::pin(stream)))
    }

    type StreamLogsStream = LogsStream;

    async fn stream_logs(
        &self,
        request: Request<pb::StreamLogsRequest>,
    ) -> Result<Response<Self::StreamLogsStream>, Status> {
        let tenant = self.state.reader(&request).await?.tenant;
        let req = request.into_inner();
        let id = parse_run_id("run_id", &req.run_id)?;
        let from = i64::try_from(req.from_offset)
            .map_err(|_| ApiError::bad("from_offset", "out of range"))?;
        if !runs::exists(&self.state.pool, tenant, id)
            .await
            .map_err(ApiError::from)?
        {
            return Err(ApiError::NotFound("run not found").into());
        }
        let stream = log_stream::stream(self.state.clone(), tenant, id, req.follow, from);
        Ok(Response::new(Box::pin(stream)))
    }

    async fn list_artifacts(
        &self,
        request: Request<pb::ListArtifactsRequest>,
    ) -> Result<Response<pb::ListArtifactsResponse>, Status> {
        let tenant = self.state.reader(&request).await?.tenant;
        Ok(Response::new(
            artifacts::list(&self.state, tenant, request.into_inner()).await?,
        ))
    }

    type GetArtifactStream = artifacts::ChunkStream;

    async fn get_artifact(
        &self,
        request: Request<pb::GetArtifactRequest>,
    ) -> Result<Response<Self::GetArtifactStream>, Status> {
        let tenant = self.state.reader(&request).await?.tenant;
        Ok(Response::new(
            artifacts::get(&self.state, tenant, request.into_inner()).await?,
        ))
    }

    async fn approve_run(
        &self,
        request: Request<pb::ApproveRunRequest>,
    ) -> Result<Response<pb::ApproveRunResponse>, Status> {
        let user = self.state.user(&request, Role::Approver).await?;
        let req = request.into_inner();
        let reason = client_reason(&req.comment, "approved")?;
        let run = self
            .decide(&user, &req.run_id, Decision::Approve, reason)
            .await?;
        Ok(Response::new(pb::ApproveRunResponse { run: Some(run) }))
    }

    async fn reject_run(
        &self,
        request: Request<pb::RejectRunRequest>,
    ) -> Result<Response<pb::RejectRunResponse>, Status> {
        let user = self.state.user(&request, Role::Approver).await?;
        let req = request.into_inner();
        let reason = client_reason(&req.reason, "rejected by an approver")?;
        let run = self
            .decide(&user, &req.run_id, Decision::Reject, reason)
            .await?;
        Ok(Response::new(pb::RejectRunResponse { run: Some(run) }))
    }
}
