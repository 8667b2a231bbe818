//! Bearer tokens and tenants. A token is `drv_` + 256 random bits (base64url); only its
//! SHA-256 is stored, so a database dump reveals no usable token. User tokens belong to a
//! tenant and carry roles; agent tokens belong to no tenant and are bound to one agent id.

use std::fmt;
use std::str::FromStr;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use chacha20poly1305::aead::OsRng;
use chacha20poly1305::aead::rand_core::RngCore;
use chrono::{DateTime, Utc};
use sha2::{Digest, Sha256};
use sqlx::{PgConnection, PgPool, Row};
use uuid::Uuid;

use crate::audit;
use crate::error::CoreError;
use crate::ids::TenantId;

/// What a token may do. Roles do not imply each other: a token gets exactly the roles it was
/// created with (the bootstrap admin token gets all three user roles).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Role {
    /// Submit, read and cancel the tenant's runs.
    Submitter,
    /// Approve or reject runs waiting for approval.
    Approver,
    /// Tokens, secrets, quotas, dead letters, drain, audit.
    Admin,
    /// A worker agent: AgentService only.
    Agent,
}

impl Role {
    pub const USER: [Role; 3] = [Role::Submitter, Role::Approver, Role::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Role::Submitter => "submitter",
            Role::Approver => "approver",
            Role::Admin => "admin",
            Role::Agent => "agent",
        }
    }
}

impl fmt::Display for Role {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Role {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        match s {
            "submitter" => Ok(Role::Submitter),
            "approver" => Ok(Role::Approver),
            "admin" => Ok(Role::Admin),
            "agent" => Ok(Role::Agent),
            other => Err(format!(
                "unknown role {other:?} (submitter, approver, admin or agent)"
            )),
        }
    }
}

/// Who is calling, as established from a valid, unrevoked token.
#[derive(Debug, Clone)]
pub struct Principal {
    pub token_id: Uuid,
    /// `None` for agent tokens.
    pub tenant: Option<TenantId>,
    pub roles: Vec<Role>,
    /// For agent tokens: the one agent id this token may act as.
    pub agent_id: Option<String>,
    /// The tenant is an operator tenant (fleet-wide operations for its admins).
    pub operator: bool,
    pub allow_self_approval: bool,
    /// The tenant's own queued-runs quota, if it set one.
    pub max_queued_runs: Option<i32>,
}

impl Principal {
    pub fn has(&self, role: Role) -> bool {
        self.roles.contains(&role)
    }

    /// The audit actor for changes made with this token.
    pub fn actor(&self) -> String {
        format!("token:{}", self.token_id)
    }
}

/// A token as listed (never the token itself).
#[derive(Debug, Clone)]
pub struct TokenInfo {
    pub id: Uuid,
    pub tenant: Option<TenantId>,
    pub name: String,
    pub roles: Vec<Role>,
    pub agent_id: Option<String>,
    pub created_by: String,
    pub created_at: DateTime<Utc>,
    pub revoked_at: Option<DateTime<Utc>>,
}

/// A fresh token: 32 bytes from the OS generator.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    OsRng.fill_bytes(&mut bytes);
    format!("drv_{}", URL_SAFE_NO_PAD.encode(bytes))
}

/// What is stored for, and looked up by, a token.
pub fn hash(token: &str) -> Vec<u8> {
    Sha256::digest(token.as_bytes()).to_vec()
}

fn roles_of(names: Vec<String>) -> Result<Vec<Role>, CoreError> {
    names
        .iter()
        .map(|n| n.parse().map_err(CoreError::Corrupt))
        .collect()
}

fn role_names(roles: &[Role]) -> Vec<String> {
    roles.iter().map(|r| r.as_str().to_owned()).collect()
}

/// The principal behind a token hash, if the token exists and is not revoked.
pub async fn authenticate(
    pool: &PgPool,
    token_hash: &[u8],
) -> Result<Option<Principal>, CoreError> {
    let row = sqlx::query(
        "SELECT t.id, t.tenant_id, t.roles, t.agent_id, \
           COALESCE(n.operator, false) AS operator, \
           COALESCE(n.allow_self_approval, false) AS allow_self_approval, \
           n.max_queued_runs \
         FROM api_tokens t LEFT JOIN tenants n ON n.id = t.tenant_id \
         WHERE t.token_hash = $1 AND t.revoked_at IS NULL",
    )
    .bind(token_hash)
    .fetch_optional(pool)
    .await?;
    let Some(row) = row else { return Ok(None) };
    Ok(Some(Principal {
        token_id: row.try_get("id")?,
        tenant: row.try_get::<Option<Uuid>, _>("tenant_id")?.map(TenantId),
        roles: roles_of(row.try_get("roles")?)?,
        agent_id: row.try_get("agent_id")?,
        operator: row.try_get("operator")?,
        allow_self_approval: row.try_get("allow_self_approval")?,
        max_queued_runs: row.try_get("max_queued_runs")?,
    }))
}

/// A token just created: its record and the token, which is never retrievable again.
#[derive(Debug)]
pub struct Created {
    pub info: TokenInfo,
    pub token: String,
}

async fn insert(
    conn: &mut PgConnection,
    tenant: Option<TenantId>,
    roles: &[Role],
    agent_id: Option<&str>,
    name: &str,
    created_by: &str,
) -> Result<Created, CoreError> {
    let token = generate();
    let id = Uuid::now_v7();
    let kind = if agent_id.is_some() { "agent" } else { "user" };
    let row = sqlx::query(
        "INSERT INTO api_tokens (id, tenant_id, kind, roles, agent_id, name, token_hash, created_by) \
         VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING created_at",
    )
    .bind(id)
    .bind(tenant.map(|t| t.0))
    .bind(kind)
    .bind(role_names(roles))
    .bind(agent_id)
    .bind(name)
    .bind(hash(&token))
    .bind(created_by)
    .fetch_one(&mut *conn)
    .await?;
    Ok(Created {
        info: TokenInfo {
            id,
            tenant,
            name: name.to_owned(),
            roles: roles.to_vec(),
            agent_id: agent_id.map(str::to_owned),
            created_by: created_by.to_owned(),
            created_at: row.try_get("created_at")?,
            revoked_at: None,
        },
        token,
    })
}

/// A user token of `tenant` with `roles`; audited in the tenant's chain.
pub async fn create_user(
    pool: &PgPool,
    tenant: TenantId,
    roles: &[Role],
    name: &str,
    created_by: &str,
) -> Result<Created, CoreError> {
    let mut tx = pool.begin().await?;
    let created = insert(&mut tx, Some(tenant), roles, None, name, created_by).await?;
    audit::record(
        &mut tx,
        tenant,
        "token.create",
        created_by,
        &created.info.id.to_string(),
        &format!("name={name} roles={}", role_names(roles).join(",")),
    )
    .await?;
    tx.commit().await?;
    Ok(created)
}

/// An agent token bound to `agent_id`; audited in `audit_tenant`'s chain when given (the
/// operator tenant whose admin asked for it).
pub async fn create_agent(
    pool: &PgPool,
    agent_id: &str,
    name: &str,
    created_by: &str,
    audit_tenant: Option<TenantId>,
) -> Result<Created, CoreError> {
    let mut tx = pool.begin().await?;
    let created = insert(
        &mut tx,
        None,
        &[Role::Agent],
        Some(agent_id),
        name,
        created_by,
    )
    .await?;
    if let Some(t) = audit_tenant {
        audit::record(
            &mut tx,
            t,
            "token.create",
            created_by,
            &created.info.id.to_string(),
            &format!("name={name} roles=agent agent_id={agent_id}"),
        )
        .await?;
    }
    tx.commit().await?;
    Ok(created)
}

/// Revokes a token of `tenant` (or, for an operator, an agent token). `false` if there is no
/// such token in scope.
pub async fn revoke(
    pool: &PgPool,
    tenant: TenantId,
    include_agent_tokens: bool,
    id: Uuid,
    actor: &str,
) -> Result<bool, CoreError> {
    let mut tx = pool.begin().await?;
    let row = sqlx::query(
        "UPDATE api_tokens SET revoked_at = COALESCE(revoked_at, now()) \
         WHERE id = $1 AND (tenant_id = $2 OR ($3 AND tenant_id IS NULL)) RETURNING name",
    )
    .bind(id)
    .bind(tenant.0)
    .bind(include_agent_tokens)
    .fetch_optional(&mut *tx)
    .await?;
    let Some(row) = row else {
        tx.rollback().await?;
        return Ok(false);
    };
    let name: String = row.try_get("name")?;
    audit::record(
        &mut tx,
        tenant,
        "token.revoke",
        actor,
        &id.to_string(),
        &format!("name={name}"),
    )
    .await?;
    tx.commit().await?;
    Ok(true)
}

/// The tenant's tokens (and, for an operator, agent tokens), newest first.
pub async fn list(
    pool: &PgPool,
    tenant: TenantId,
    include_agent_tokens: bool,
) -> Result<Vec<TokenInfo>, CoreError> {
    let rows = sqlx::query(
        "SELECT id, tenant_id, name, roles, agent_id, created_by, created_at, revoked_at \
         FROM api_tokens WHERE tenant_id = $1 OR ($2 AND tenant_id IS NULL) \
         ORDER BY created_at DESC, id DESC",
    )
    .bind(tenant.0)
    .bind(include_agent_tokens)
    .fetch_all(pool)
    .await?;
    rows.iter()
        .map(|r| {
            Ok(TokenInfo {
                id: r.try_get("id")?,
                tenant: r.try_get::<Option<Uuid>, _>("tenant_id")?.map(TenantId),
                name: r.try_get("name")?,
                roles: roles_of(r.try_get("roles")?)?,
                agent_id: r.try_get("agent_id")?,
                created_by: r.try_get("created_by")?,
                created_at: r.try_get("created_at")?,
                revoked_at: r.try_get("revoked_at")?,
            })
        })
        .collect()
}

/// What `drover admin bootstrap` made.
#[derive(Debug)]
pub struct Bootstrapped {
    pub tenant: TenantId,
    pub tenant_name: String,
    pub operator: bool,
    pub token: Created,
}

/// Creates tenant `name` if it does not exist (the first tenant to be bootstrapped becomes the
/// operator tenant) and a new token with every user role for it. This is the way in for
/// whoever holds the database credentials: there is no unauthenticated RPC that does it.
pub async fn bootstrap(pool: &PgPool, name: &str) -> Result<Bootstrapped, CoreError> {
    let mut tx = pool.begin().await?;
    // Serialise bootstraps so "first operator" is decided once.
    sqlx::query("LOCK TABLE tenants IN SHARE ROW EXCLUSIVE MODE")
        .execute(&mut *tx)
        .await?;
    let has_operator: bool =
        sqlx::query_scalar("SELECT EXISTS (SELECT 1 FROM tenants WHERE operator)")
            .fetch_one(&mut *tx)
            .await?;
    let row = sqlx::query(
        "INSERT INTO tenants (id, name, operator) VALUES ($1, $2, $3) \
         ON CONFLICT (name) DO UPDATE SET operator = tenants.operator OR EXCLUDED.operator \
         RETURNING id, operator",
    )
    .bind(Uuid::now_v7())
    .bind(name)
    .bind(!has_operator)
    .fetch_one(&mut *tx)
    .await?;
    let tenant = TenantId(row.try_get("id")?);
    let operator: bool = row.try_get("operator")?;
    let token = insert(
        &mut tx,
        Some(tenant),
        &Role::USER,
        None,
        "bootstrap",
        "bootstrap",
    )
    .await?;
    audit::record(
        &mut tx,
        tenant,
        "token.create",
        "bootstrap",
        &token.info.id.to_string(),
        "name=bootstrap roles=submitter,approver,admin",
    )
    .await?;
    tx.commit().await?;
    Ok(Bootstrapped {
        tenant,
        tenant_name: name.to_owned(),
        operator,
        token,
    })
}

/// A tenant's policy, as admins see and change it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TenantPolicy {
    pub allow_self_approval: bool,
    pub max_concurrent_runs: Option<i32>,
    pub max_queued_runs: Option<i32>,
}

pub async fn policy(pool: &PgPool, tenant: TenantId) -> Result<TenantPolicy, CoreError> {
    let row = sqlx::query(
        "SELECT allow_self_approval, max_concurrent_runs, max_queued_runs FROM tenants \
         WHERE id = $1",
    )
    .bind(tenant.0)
    .fetch_one(pool)
    .await?;
    Ok(TenantPolicy {
        allow_self_approval: row.try_get("allow_self_approval")?,
        max_concurrent_runs: row.try_get("max_concurrent_runs")?,
        max_queued_runs: row.try_get("max_queued_runs")?,
    })
}

/// Replaces the tenant's policy; audited.
pub async fn set_policy(
    pool: &PgPool,
    tenant: TenantId,
    p: &TenantPolicy,
    actor: &str,
) -> Result<(), CoreError> {
    let mut tx = pool.begin().await?;
    sqlx::query(
        "UPDATE tenants SET allow_self_approval = $2, max_concurrent_runs = $3, \
         max_queued_runs = $4 WHERE id = $1",
    )
    .bind(tenant.0)
    .bind(p.allow_self_approval)
    .bind(p.max_concurrent_runs)
    .bind(p.max_queued_runs)
    .execute(&mut *tx)
    .await?;
    audit::record(
        &mut tx,
        tenant,
        "tenant.policy",
        actor,
        &tenant.to_string(),
        &format!(
            "allow_self_approval={} max_concurrent_runs={} max_queued_runs={}",
            p.allow_self_approval,
            p.max_concurrent_runs
                .map_or("default".to_owned(), |n| n.to_string()),
            p.max_queued_runs
                .map_or("default".to_owned(), |n| n.to_string()),
        ),
    )
    .await?;
    tx.commit().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_long_random_and_hash_stably() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert!(a.starts_with("drv_") && a.len() == 4 + 43, "{a}");
        assert_eq!(hash(&a), hash(&a));
        assert_eq!(hash(&a).len(), 32);
        assert_ne!(hash(&a), hash(&b));
    }

    #[test]
    fn roles_round_trip_and_unknown_ones_are_refused() {
        for r in [Role::Submitter, Role::Approver, Role::Admin, Role::Agent] {
            assert_eq!(r.as_str().parse::<Role>(), Ok(r));
        }
        assert!("root".parse::<Role>().is_err());
    }
}
