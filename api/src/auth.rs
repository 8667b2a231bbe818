//! Who is calling, and may they. Every RunService and AdminService handler starts with
//! [`AppState::user`], every AgentService handler with [`AppState::agent`]: no interceptor
//! magic, so the role a call needs is written next to the call.
//!
//! Missing, malformed, unknown and revoked tokens all get the same `UNAUTHENTICATED` (no hint
//! which); a valid token without the role gets `PERMISSION_DENIED` naming the role. Objects
//! of another tenant are `NOT_FOUND` further down, because every query is scoped by the
//! caller's tenant.

use drover_core::ids::TenantId;
use drover_core::repo::tokens::{self, Principal, Role};
use tonic::Request;

use crate::error::{ApiError, ApiResult};
use crate::state::AppState;
use crate::token_cache::Lookup;

/// An authenticated user-token caller of one tenant.
#[derive(Debug, Clone)]
pub struct User {
    pub principal: Principal,
    pub tenant: TenantId,
}

impl User {
    pub fn actor(&self) -> String {
        self.principal.actor()
    }

    pub fn has(&self, role: Role) -> bool {
        self.principal.has(role)
    }

    /// Fleet-wide operations (agents, agent tokens, queue depths) need an operator tenant's
    /// admin.
    pub fn require_operator(&self) -> ApiResult<()> {
        if self.principal.operator && self.has(Role::Admin) {
            Ok(())
        } else {
            Err(ApiError::Denied(
                "this call needs the admin role in an operator tenant".into(),
            ))
        }
    }
}

/// An authenticated agent, bound to one agent id.
#[derive(Debug, Clone)]
pub struct AgentCaller {
    pub agent_id: String,
}

impl AgentCaller {
    /// The agent id a request speaks for must be the token's own.
    pub fn check(&self, claimed: &str) -> ApiResult<()> {
        if self.agent_id == claimed {
            return Ok(());
        }
        tracing::warn!(token_agent = %self.agent_id, claimed_agent = %claimed, "agent token used for another agent id; refused");
        Err(ApiError::Denied(
            "this agent token belongs to another agent id".into(),
        ))
    }
}

/// The bearer token of a request, if it carries a well-formed `authorization` header.
fn bearer<T>(req: &Request<T>) -> Option<&str> {
    let value = req.metadata().get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return None;
    }
    let token = token.trim();
    // Our tokens are 47 ASCII characters; anything far off is not one (and is not hashed).
    (!token.is_empty() && token.len() <= 256).then_some(token)
}

impl AppState {
    /// The principal of a token hash: from the cache, else from Postgres (and then cached).
    /// Unknown and revoked tokens are never cached, so they always cost a lookup.
    async fn authenticate(&self, hash: &[u8]) -> ApiResult<Option<Principal>> {
        let generation = match self.tokens.get(hash) {
            Lookup::Hit(p) => return Ok(Some(p)),
            Lookup::Miss(generation) => generation,
        };
        let found = tokens::authenticate(&self.pool, hash).await?;
        if let Some(p) = &found {
            self.tokens.put(hash, p, generation);
        }
        Ok(found)
    }

    async fn principal<T>(&self, req: &Request<T>) -> ApiResult<Principal> {
        let found = match bearer(req) {
            Some(token) => self.authenticate(&tokens::hash(token)).await?,
            None => None,
        };
        match found {
            Some(p) => Ok(p),
            None => {
                // Failed attempts are limited per address, which bounds token guessing.
                let addr = req.remote_addr().map(|a| a.ip());
                self.limiter
                    .unauthenticated(addr)
                    .await
                    .map_err(|l| ApiError::Limited(l.retry_after))?;
                Err(ApiError::Unauthenticated)
            }
        }
    }

    /// A user token of a tenant holding `role`.
    pub async fn user<T>(&self, req: &Request<T>, role: Role) -> ApiResult<User> {
        self.user_any(req, &[role]).await
    }

    /// Reading the tenant's runs: any user role (an approver reads what it decides on, an
    /// admin what it redrives).
    pub async fn reader<T>(&self, req: &Request<T>) -> ApiResult<User> {
        self.user_any(req, &Role::USER).await
    }

    /// A user token of a tenant holding at least one of `roles`.
    pub async fn user_any<T>(&self, req: &Request<T>, roles: &[Role]) -> ApiResult<User> {
        let principal = self.principal(req).await?;
        let Some(tenant) = principal.tenant else {
            return Err(ApiError::Denied(
                "agent tokens may call AgentService only".into(),
            ));
        };
        if !roles.iter().any(|r| principal.has(*r)) {
            let names: Vec<&str> = roles.iter().map(|r| r.as_str()).collect();
            return Err(ApiError::Denied(format!(
                "this call needs the {} role",
                names.join(" or ")
            )));
        }
        self.limiter
            .authenticated(tenant, &principal)
            .await
            .map_err(|l| ApiError::Limited(l.retry_after))?;
        Ok(User { principal, tenant })
    }

    /// An agent token; `claimed` is the agent id the request speaks for, which must be the
    /// token's own.
    pub async fn agent<T>(&self, req: &Request<T>, claimed: &str) -> ApiResult<AgentCaller> {
        let caller = self.agent_token(req).await?;
        caller.check(claimed)?;
        Ok(caller)
    }

    /// An agent token, for calls that name their agent id later (a stream's first message):
    /// the caller checks it with [`AgentCaller::check`].
    pub async fn agent_token<T>(&self, req: &Request<T>) -> ApiResult<AgentCaller> {
        let principal = self.principal(req).await?;
        match principal.agent_id {
            Some(agent_id) if principal.roles.contains(&Role::Agent) => {
                Ok(AgentCaller { agent_id })
            }
            _ => Err(ApiError::Denied("AgentService needs an agent token".into())),
        }
    }
}
