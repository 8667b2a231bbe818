//! `drover admin …`: what whoever holds the database credentials does before any token
//! exists, straight against Postgres (no RPC can do it unauthenticated):
//!
//! - `drover admin bootstrap [--tenant NAME]` creates the tenant if needed (the first one
//!   becomes the operator tenant) and prints a new token with every user role.
//! - `drover admin agent-token --agent-id ID` prints a new agent token bound to that id.
//! - `drover admin audit-verify [--tenant NAME]` verifies the audit chain of one tenant or all.
//!
//! The database comes from `DROVER_DATABASE__URL` (or the local default), as for the services.

use anyhow::{Context, bail};
use clap::Subcommand;
use drover_core::config::{self, DatabaseSettings};
use drover_core::ids::TenantId;
use drover_core::repo::tokens;
use drover_core::{audit, db};
use serde::Deserialize;
use sqlx::{PgPool, Row};

#[derive(Subcommand, Debug)]
pub enum AdminCommand {
    /// Create a tenant (if needed) and print a token with the submitter, approver and admin
    /// roles. The first tenant bootstrapped becomes the operator tenant.
    Bootstrap {
        #[arg(long, default_value = "default")]
        tenant: String,
        /// Print only the token (for scripts: `export DROVER_TOKEN=$(drover admin bootstrap -q)`).
        #[arg(long, short)]
        quiet: bool,
    },
    /// Print a new agent token bound to an agent id (`DROVER_AGENT_TOKEN` of that agent).
    AgentToken {
        #[arg(long)]
        agent_id: String,
        #[arg(long, short)]
        quiet: bool,
    },
    /// Verify the audit hash chain of one tenant, or of every tenant.
    AuditVerify {
        #[arg(long)]
        tenant: Option<String>,
    },
}

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Db {
    database: DatabaseSettings,
}

async fn pool() -> anyhow::Result<PgPool> {
    let s: Db = config::load(None).context("loading settings")?;
    let pool = db::connect(&s.database)
        .await
        .context("connecting to Postgres (DROVER_DATABASE__URL)")?;
    db::migrate(&pool).await.context("applying migrations")?;
    Ok(pool)
}

/// Returns whether everything verified.
pub async fn run(cmd: AdminCommand) -> anyhow::Result<bool> {
    let pool = pool().await?;
    match cmd {
        AdminCommand::Bootstrap { tenant, quiet } => {
            let b = tokens::bootstrap(&pool, &tenant).await?;
            if quiet {
                println!("{}", b.token.token);
            } else {
                println!(
                    "tenant {} ({}){}",
                    b.tenant_name,
                    b.tenant,
                    if b.operator { ", operator" } else { "" }
                );
                println!(
                    "token id {} roles submitter,approver,admin",
                    b.token.info.id
                );
                println!("token {}", b.token.token);
                println!("(shown once: export DROVER_TOKEN=<token>)");
            }
            Ok(true)
        }
        AdminCommand::AgentToken { agent_id, quiet } => {
            let id = drover_core::ids::AgentId::parse(&agent_id)
                .map_err(|m| anyhow::anyhow!("invalid agent id: {m}"))?;
            let c = tokens::create_agent(&pool, id.as_str(), "agent", "admin-cli", None).await?;
            if quiet {
                println!("{}", c.token);
            } else {
                println!("agent token for {agent_id} (id {})", c.info.id);
                println!("token {}", c.token);
                println!("(shown once: give it to the agent as DROVER_AGENT_TOKEN)");
            }
            Ok(true)
        }
        AdminCommand::AuditVerify { tenant } => {
            let rows = match &tenant {
                Some(name) => {
                    sqlx::query("SELECT id, name FROM tenants WHERE name = $1")
                        .bind(name)
                        .fetch_all(&pool)
                        .await?
                }
                None => {
                    sqlx::query("SELECT id, name FROM tenants ORDER BY name")
                        .fetch_all(&pool)
                        .await?
                }
            };
            if rows.is_empty() {
                bail!("no tenant {}", tenant.unwrap_or_default());
            }
            let mut all_ok = true;
            for row in rows {
                let id: uuid::Uuid = row.try_get("id")?;
                let name: String = row.try_get("name")?;
                let v = audit::verify(&pool, TenantId(id)).await?;
                all_ok &= v.broken.is_none();
                println!("{}", crate::commands::audit::verdict_line(&name, &v.into()));
            }
            Ok(all_ok)
        }
    }
}
