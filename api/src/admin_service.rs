//! AdminService: what operators call — the dead-letter archive and redrive, the agent fleet
//! and remote drain, tenant secrets, tokens, policy and the audit chain. Every call needs the
//! admin role and is scoped by the caller's tenant; fleet-wide calls (ListAgents, DrainAgent,
//! agent tokens, GetStats's fleet figures) need an admin of an operator tenant, because the
//! fleet is shared by every tenant.
//!
//! Secrets: values are sealed before they reach Postgres and are never returned by any call
//! here; only GetAssignment opens them, for the agent holding a run's current lease. Values
//! shorter than [`MIN_SECRET_VALUE_BYTES`] are refused so that log redaction, which masks every
//! occurrence of a value, never masks innocent short text.

use drover_core::audit;
use drover_core::convert;
use drover_core::error::Refusal;
use drover_core::ids::{AgentId, TenantId};
use drover_core::messages::{self, AgentCommand};
use drover_core::repo::secrets::{self, SecretsError};
use drover_core::repo::tokens::{self, Role};
use drover_core::repo::{agents, dead_letters, outbox, stats};
use drover_core::secrets_crypto::SecretKeys;
use drover_core::spec::{
    MAX_ENV_NAME_BYTES, MAX_SECRET_VALUE_BYTES, MIN_SECRET_VALUE_BYTES, is_env_name,
};
use drover_core::state::RunState;
use drover_core::{CoreError, topology};
use drover_proto::v1 as pb;
use tonic::{Request, Response, Status};

use crate::admin_tokens;
use crate::auth::User;
use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, client_reason, page_size, parse_run_id};

#[derive(Debug, Clone)]
pub struct AdminApi {
    state: AppState,
}

impl AdminApi {
    pub fn new(state: AppState) -> Self {
        Self { state }
    }

    fn liveness_ms(&self) -> i64 {
        i64::try_from(self.state.settings.lease.lease_ttl_ms).unwrap_or(i64::MAX)
    }

    async fn list_dead_letters(
        &self,
        tenant: TenantId,
        req: pb::ListDeadLettersRequest,
    ) -> ApiResult<pb::ListDeadLettersResponse> {
        let page = page_size(req.page_size)?;
        let before = if req.page_token.is_empty() {
            None
        } else {
            Some(
                req.page_token
                    .parse::<i64>()
                    .map_err(|_| ApiError::bad("page_token", "is not a token from this list"))?,
            )
        };
        let mut rows =
            dead_letters::list(&self.state.pool, tenant, i64::from(page) + 1, before).await?;
        let more = rows.len() > page as usize;
        rows.truncate(page as usize);
        let next_page_token = if more {
            rows.last().map(|r| r.id.to_string()).unwrap_or_default()
        } else {
            String::new()
        };
        Ok(pb::ListDeadLettersResponse {
            dead_letters: rows.iter().map(convert::dead_letter_to_proto).collect(),
            next_page_token,
        })
    }

    async fn redrive(
        &self,
        user: &User,
        req: pb::RedriveRunRequest,
    ) -> ApiResult<pb::RedriveRunResponse> {
        let id = parse_run_id("run_id", &req.run_id)?;
        let reason = client_reason(&req.reason, "redriven by an operator")?;
        match dead_letters::redrive(&self.state.pool, user.tenant, id, &reason, &user.actor()).await
        {
            Ok((run, event)) => {
                tracing::info!(run_id = %id, attempt = run.attempt, max_attempts = run.max_attempts, "run redriven");
                self.state.bus.run_event(id, event.seq);
                Ok(pb::RedriveRunResponse {
                    run: Some(convert::run_to_proto(&run)),
                })
            }
            Err(CoreError::Refused(Refusal::Illegal { from, .. })) => {
                Err(ApiError::Precondition(format!(
                    "only a {} run can be redriven; this one is {from}",
                    RunState::DeadLettered
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    fn secret_keys(&self) -> ApiResult<&SecretKeys> {
        self.state.secret_keys.as_deref().ok_or_else(|| {
            ApiError::Precondition(
                "tenant secrets are disabled: the API has no encryption key configured \
                 (set DROVER_SECRETS__KEYS and DROVER_SECRETS__ACTIVE_KEY_ID)"
                    .into(),
            )
        })
    }

    async fn put_secret(
        &self,
        user: &User,
        req: pb::PutSecretRequest,
    ) -> ApiResult<pb::PutSecretResponse> {
        let tenant = user.tenant;
        let keys = self.secret_keys()?;
        secret_name(&req.name)?;
        let len = req.value.len();
        if len < MIN_SECRET_VALUE_BYTES {
            return Err(ApiError::bad(
                "value",
                format!(
                    "must be at least {MIN_SECRET_VALUE_BYTES} bytes (got {len}): shorter values \
                     would make log redaction mask innocent text"
                ),
            ));
        }
        if len > MAX_SECRET_VALUE_BYTES {
            return Err(ApiError::bad(
                "value",
                format!("must be at most {MAX_SECRET_VALUE_BYTES} bytes (got {len})"),
            ));
        }
        if req.value.contains('\0') {
            return Err(ApiError::bad(
                "value",
                "must not contain NUL (it becomes an environment variable)",
            ));
        }
        let (info, created) = match secrets::put(
            &self.state.pool,
            keys,
            tenant,
            &req.name,
            &req.value,
            &user.actor(),
        )
        .await
        {
            Ok(done) => done,
            Err(SecretsError::Core(e)) => return Err(e.into()),
            Err(SecretsError::Crypto(e)) => {
                tracing::error!(error = %e, name = %req.name, "sealing a secret failed");
                return Err(ApiError::Precondition(
                    "the secret could not be encrypted".into(),
                ));
            }
        };
        tracing::info!(tenant = %tenant, name = %info.name, key_id = %info.key_id, created, "secret stored");
        Ok(pb::PutSecretResponse {
            secret: Some(convert::secret_info_to_proto(&info)),
            created,
        })
    }

    async fn delete_secret(&self, user: &User, req: pb::DeleteSecretRequest) -> ApiResult<()> {
        self.secret_keys()?;
        secret_name(&req.name)?;
        let tenant = user.tenant;
        if secrets::delete(&self.state.pool, tenant, &req.name, &user.actor()).await? {
            tracing::info!(tenant = %tenant, name = %req.name, "secret deleted");
            Ok(())
        } else {
            Err(ApiError::NotFound("secret not found"))
        }
    }

    async fn list_secrets(&self, tenant: TenantId) -> ApiResult<pb::ListSecretsResponse> {
        self.secret_keys()?;
        let rows = secrets::list(&self.state.pool, tenant).await?;
        Ok(pb::ListSecretsResponse {
            secrets: rows.iter().map(convert::secret_info_to_proto).collect(),
        })
    }

    async fn get_stats(&self, user: &User) -> ApiResult<pb::GetStatsResponse> {
        let tenant = user.tenant;
        let s = stats::read(&self.state.pool, tenant).await?;
        // The fleet and the queues are shared by every tenant: their figures would count other
        // tenants' work, so only an operator sees them.
        let operator = user.require_operator().is_ok();
        if !operator {
            return Ok(tenant_stats(
                &s,
                "fleet and queue figures need an operator tenant's admin",
            ));
        }
        let fleet = agents::list(&self.state.pool, self.liveness_ms()).await?;
        let live: Vec<_> = fleet.iter().filter(|a| a.live).collect();
        let serving = live.iter().filter(|a| !a.draining);
        let (capacity, running) = serving.fold((0u32, 0u32), |(c, r), a| {
            (
                c + u32::try_from(a.capacity).unwrap_or(0),
                r + u32::try_from(a.running).unwrap_or(0),
            )
        });
        let (queues, queues_error) = queue_depths(&self.state.settings.amqp.url, &s.pools).await;
        Ok(pb::GetStatsResponse {
            agents_live: u32::try_from(live.len()).unwrap_or(u32::MAX),
            agents_draining: u32::try_from(live.iter().filter(|a| a.draining).count())
                .unwrap_or(u32::MAX),
            capacity,
            running,
            outbox_backlog: s.outbox_backlog,
            outbox_oldest_age_seconds: s.outbox_oldest_age_secs,
            queues,
            queues_error,
            ..tenant_stats(&s, "")
        })
    }

    async fn list_agents(&self) -> ApiResult<pb::ListAgentsResponse> {
        let rows = agents::list(&self.state.pool, self.liveness_ms()).await?;
        Ok(pb::ListAgentsResponse {
            agents: rows.iter().map(convert::agent_to_proto).collect(),
        })
    }

    async fn drain_agent(
        &self,
        user: &User,
        req: pb::DrainAgentRequest,
    ) -> ApiResult<pb::DrainAgentResponse> {
        let tenant = user.tenant;
        let id = AgentId::parse(&req.agent_id).map_err(|m| ApiError::bad("agent_id", m))?;
        let mut tx = self.state.pool.begin().await.map_err(CoreError::from)?;
        let Some(agent) = agents::request_drain(&mut tx, id.as_str(), self.liveness_ms()).await?
        else {
            return Err(ApiError::NotFound("agent not found"));
        };
        // The queue is the fast path; the next heartbeat answer carries the same request.
        outbox::enqueue(
            &mut tx,
            tenant,
            topology::AGENTS_EXCHANGE,
            id.as_str(),
            &messages::encode(&AgentCommand::Drain),
        )
        .await?;
        tx.commit().await.map_err(CoreError::from)?;
        tracing::info!(agent_id = %id, "drain requested by an operator");
        Ok(pb::DrainAgentResponse {
            agent: Some(convert::agent_to_proto(&agent)),
        })
    }
}

/// GetStats's tenant-scoped part; fleet figures zero, with `why` in `queues_error`.
fn tenant_stats(s: &stats::Stats, why: &str) -> pb::GetStatsResponse {
    pb::GetStatsResponse {
        runs_by_state: s
            .runs_by_state
            .iter()
            .map(|(state, count)| pb::StateCount {
                state: convert::state_to_proto(*state).into(),
                count: *count,
            })
            .collect(),
        oldest_queued_run_id: s
            .oldest_queued
            .map(|(id, _)| id.to_string())
            .unwrap_or_default(),
        oldest_queued_age_seconds: s.oldest_queued.map_or(0.0, |(_, age)| age),
        dead_letters: s.dead_letters,
        queues_error: why.to_owned(),
        ..Default::default()
    }
}

/// Secret names become environment variable names.
fn secret_name(name: &str) -> ApiResult<()> {
    if is_env_name(name) {
        Ok(())
    } else {
        Err(ApiError::bad(
            "name",
            format!("must match [A-Za-z_][A-Za-z0-9_]* and be at most {MAX_ENV_NAME_BYTES} bytes"),
        ))
    }
}

#[tonic::async_trait]
impl pb::admin_service_server::AdminService for AdminApi {
    async fn put_secret(
        &self,
        request: Request<pb::PutSecretRequest>,
    ) -> Result<Response<pb::PutSecretResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(
            AdminApi::put_secret(self, &user, request.into_inner()).await?,
        ))
    }

    async fn delete_secret(
        &self,
        request: Request<pb::DeleteSecretRequest>,
    ) -> Result<Response<pb::DeleteSecretResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        AdminApi::delete_secret(self, &user, request.into_inner()).await?;
        Ok(Response::new(pb::DeleteSecretResponse {}))
    }

    async fn list_secrets(
        &self,
        request: Request<pb::ListSecretsRequest>,
    ) -> Result<Response<pb::ListSecretsResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(
            AdminApi::list_secrets(self, user.tenant).await?,
        ))
    }

    async fn list_dead_letters(
        &self,
        request: Request<pb::ListDeadLettersRequest>,
    ) -> Result<Response<pb::ListDeadLettersResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(
            AdminApi::list_dead_letters(self, user.tenant, request.into_inner()).await?,
        ))
    }

    async fn redrive_run(
        &self,
        request: Request<pb::RedriveRunRequest>,
    ) -> Result<Response<pb::RedriveRunResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(
            self.redrive(&user, request.into_inner()).await?,
        ))
    }

    async fn list_agents(
        &self,
        request: Request<pb::ListAgentsRequest>,
    ) -> Result<Response<pb::ListAgentsResponse>, Status> {
        self.state
            .user(&request, Role::Admin)
            .await?
            .require_operator()?;
        Ok(Response::new(AdminApi::list_agents(self).await?))
    }

    async fn get_stats(
        &self,
        request: Request<pb::GetStatsRequest>,
    ) -> Result<Response<pb::GetStatsResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(AdminApi::get_stats(self, &user).await?))
    }

    async fn drain_agent(
        &self,
        request: Request<pb::DrainAgentRequest>,
    ) -> Result<Response<pb::DrainAgentResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        user.require_operator()?;
        Ok(Response::new(
            AdminApi::drain_agent(self, &user, request.into_inner()).await?,
        ))
    }

    async fn create_token(
        &self,
        request: Request<pb::CreateTokenRequest>,
    ) -> Result<Response<pb::CreateTokenResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(
            admin_tokens::create(&self.state, &user, request.into_inner()).await?,
        ))
    }

    async fn revoke_token(
        &self,
        request: Request<pb::RevokeTokenRequest>,
    ) -> Result<Response<pb::RevokeTokenResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        admin_tokens::revoke(&self.state, &user, request.into_inner()).await?;
        Ok(Response::new(pb::RevokeTokenResponse {}))
    }

    async fn list_tokens(
        &self,
        request: Request<pb::ListTokensRequest>,
    ) -> Result<Response<pb::ListTokensResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        Ok(Response::new(admin_tokens::list(&self.state, &user).await?))
    }

    async fn verify_audit(
        &self,
        request: Request<pb::VerifyAuditRequest>,
    ) -> Result<Response<pb::VerifyAuditResponse>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        let v = audit::verify(&self.state.pool, user.tenant)
            .await
            .map_err(ApiError::from)?;
        if let Some(b) = &v.broken {
            tracing::error!(tenant = %user.tenant, chain_seq = b.chain_seq, location = %b.location, problem = %b.problem, "audit chain broken");
        }
        let broken = v.broken.clone();
        Ok(Response::new(pb::VerifyAuditResponse {
            ok: broken.is_none(),
            checked: u64::try_from(v.checked).unwrap_or(0),
            head_seq: u64::try_from(v.head_seq).unwrap_or(0),
            head_hash: v.head_hash,
            broken_seq: broken
                .as_ref()
                .map_or(0, |b| u64::try_from(b.chain_seq).unwrap_or(0)),
            broken_location: broken
                .as_ref()
                .map(|b| b.location.clone())
                .unwrap_or_default(),
            broken_problem: broken.map(|b| b.problem).unwrap_or_default(),
        }))
    }

    async fn get_tenant_policy(
        &self,
        request: Request<pb::GetTenantPolicyRequest>,
    ) -> Result<Response<pb::TenantPolicy>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        let p = tokens::policy(&self.state.pool, user.tenant)
            .await
            .map_err(ApiError::from)?;
        Ok(Response::new(admin_tokens::policy_to_proto(&p)))
    }

    async fn set_tenant_policy(
        &self,
        request: Request<pb::TenantPolicy>,
    ) -> Result<Response<pb::TenantPolicy>, Status> {
        let user = self.state.user(&request, Role::Admin).await?;
        let p = admin_tokens::policy_from_proto(request.get_ref())?;
        tokens::set_policy(&self.state.pool, user.tenant, &p, &user.actor())
            .await
            .map_err(ApiError::from)?;
        self.state.tokens.clear();
        tracing::info!(tenant = %user.tenant, policy = ?p, "tenant policy changed");
        Ok(Response::new(admin_tokens::policy_to_proto(&p)))
    }
}

/// Longest GetStats waits for RabbitMQ before it answers without queue depths.
const QUEUE_DEPTH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(3);

/// Ready messages and consumers of each pool's run queue, by passive declare (which creates
/// nothing); a queue not declared yet counts as empty. On failure: what was read, and why the
/// rest is missing.
async fn queue_depths(
    url: &secrecy::SecretString,
    pools: &[String],
) -> (Vec<pb::QueueDepth>, String) {
    use lapin::options::QueueDeclareOptions;
    use lapin::types::FieldTable;
    let mut out = Vec::new();
    let read = async {
        let conn = drover_core::amqp::connect(url, "drover-api-stats").await?;
        for pool in pools {
            let queue = topology::run_queue(pool);
            // A passive declare of a missing queue closes its channel: one channel each.
            let ch = conn.create_channel().await?;
            let declared = ch
                .queue_declare(
                    queue.as_str().into(),
                    QueueDeclareOptions {
                        passive: true,
                        ..Default::default()
                    },
                    FieldTable::default(),
                )
                .await;
            let (messages, consumers) = match declared {
                Ok(q) => (u64::from(q.message_count()), q.consumer_count()),
                Err(e) => {
                    tracing::debug!(%queue, error = %e, "queue not declared yet; counted as empty");
                    (0, 0)
                }
            };
            out.push(pb::QueueDepth {
                pool: pool.clone(),
                queue,
                messages,
                consumers,
            });
            let _ = ch.close(200, "stats read".into()).await;
        }
        let _ = conn.close(200, "stats read".into()).await;
        Ok::<_, CoreError>(())
    };
    let error = match tokio::time::timeout(QUEUE_DEPTH_TIMEOUT, read).await {
        Ok(Ok(())) => String::new(),
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "queue depths: rabbitmq unreachable");
            "rabbitmq unreachable (details in the server log)".to_owned()
        }
        Err(_) => "rabbitmq did not answer within 3 s".to_owned(),
    };
    (out, error)
}
