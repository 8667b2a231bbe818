//! AdminService's token and policy calls. A tenant admin makes tokens of its own tenant; only
//! an operator tenant's admin makes agent tokens, since an agent sees runs of every tenant.

use drover_core::convert;
use drover_core::ids::AgentId;
use drover_core::repo::tokens::{self, Role, TenantPolicy, TokenInfo};
use drover_proto::v1 as pb;
use uuid::Uuid;

use crate::auth::User;
use crate::error::{ApiError, ApiResult};
use crate::state::AppState;

const MAX_TOKEN_NAME_BYTES: usize = 128;

fn info_to_proto(t: &TokenInfo) -> pb::TokenInfo {
    pb::TokenInfo {
        id: t.id.to_string(),
        name: t.name.clone(),
        roles: t.roles.iter().map(|r| r.as_str().to_owned()).collect(),
        agent_id: t.agent_id.clone().unwrap_or_default(),
        created_by: t.created_by.clone(),
        created_at: Some(convert::timestamp(t.created_at)),
        revoked_at: t.revoked_at.map(convert::timestamp),
    }
}

pub async fn create(
    state: &AppState,
    user: &User,
    req: pb::CreateTokenRequest,
) -> ApiResult<pb::CreateTokenResponse> {
    let name = req.name.trim();
    if name.is_empty() || name.len() > MAX_TOKEN_NAME_BYTES || name.chars().any(char::is_control) {
        return Err(ApiError::bad(
            "name",
            format!("must be 1..{MAX_TOKEN_NAME_BYTES} bytes without control characters"),
        ));
    }
    let mut roles = Vec::new();
    for r in &req.roles {
        let role: Role = r.parse().map_err(|m: String| ApiError::bad("roles", m))?;
        if !roles.contains(&role) {
            roles.push(role);
        }
    }
    roles.sort();
    if roles.is_empty() {
        return Err(ApiError::bad("roles", "at least one role is required"));
    }
    let created = if roles.contains(&Role::Agent) {
        if roles.len() > 1 {
            return Err(ApiError::bad(
                "roles",
                "an agent token has the agent role only",
            ));
        }
        user.require_operator()?;
        let agent = AgentId::parse(&req.agent_id).map_err(|m| ApiError::bad("agent_id", m))?;
        tokens::create_agent(
            &state.pool,
            agent.as_str(),
            name,
            &user.actor(),
            Some(user.tenant),
        )
        .await?
    } else {
        if !req.agent_id.is_empty() {
            return Err(ApiError::bad(
                "agent_id",
                "only agent tokens (roles [\"agent\"]) are bound to an agent",
            ));
        }
        tokens::create_user(&state.pool, user.tenant, &roles, name, &user.actor()).await?
    };
    tracing::info!(tenant = %user.tenant, token_id = %created.info.id, roles = ?created.info.roles, "token created");
    Ok(pb::CreateTokenResponse {
        info: Some(info_to_proto(&created.info)),
        token: created.token,
    })
}

pub async fn revoke(state: &AppState, user: &User, req: pb::RevokeTokenRequest) -> ApiResult<()> {
    let id = Uuid::parse_str(req.id.trim()).map_err(|_| ApiError::bad("id", "must be a UUID"))?;
    let operator = user.require_operator().is_ok();
    if tokens::revoke(&state.pool, user.tenant, operator, id, &user.actor()).await? {
        // This instance forgets at once; the others when the trigger's NOTIFY reaches them.
        state.tokens.clear();
        tracing::info!(tenant = %user.tenant, token_id = %id, "token revoked");
        Ok(())
    } else {
        Err(ApiError::NotFound("token not found"))
    }
}

pub async fn list(state: &AppState, user: &User) -> ApiResult<pb::ListTokensResponse> {
    let operator = user.require_operator().is_ok();
    let rows = tokens::list(&state.pool, user.tenant, operator).await?;
    Ok(pb::ListTokensResponse {
        tokens: rows.iter().map(info_to_proto).collect(),
    })
}

pub fn policy_to_proto(p: &TenantPolicy) -> pb::TenantPolicy {
    let n = |v: Option<i32>| v.and_then(|n| u32::try_from(n).ok()).unwrap_or(0);
    pb::TenantPolicy {
        allow_self_approval: p.allow_self_approval,
        max_concurrent_runs: n(p.max_concurrent_runs),
        max_queued_runs: n(p.max_queued_runs),
    }
}

pub fn policy_from_proto(p: &pb::TenantPolicy) -> ApiResult<TenantPolicy> {
    let n = |field: &'static str, v: u32| -> ApiResult<Option<i32>> {
        match v {
            0 => Ok(None),
            v => i32::try_from(v)
                .map(Some)
                .map_err(|_| ApiError::bad(field, "is too large")),
        }
    };
    Ok(TenantPolicy {
        allow_self_approval: p.allow_self_approval,
        max_concurrent_runs: n("max_concurrent_runs", p.max_concurrent_runs)?,
        max_queued_runs: n("max_queued_runs", p.max_queued_runs)?,
    })
}
