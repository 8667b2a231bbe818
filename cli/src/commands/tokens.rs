//! `drover tokens create --name N --role R [--role R…] [--agent-id ID]`, `drover tokens ls`,
//! `drover tokens revoke ID`: the tenant's bearer tokens (admin role). A token is printed
//! once, at creation; the server keeps only its hash.

use clap::Subcommand;
use drover_proto::v1 as pb;
use serde_json::json;

use crate::client::{self, AdminClient, Subject};

#[derive(Subcommand, Debug)]
pub enum TokensCommand {
    /// Create a token; prints it once.
    Create {
        #[arg(long)]
        name: String,
        /// submitter, approver, admin (repeatable), or agent (with --agent-id, operators only).
        #[arg(long = "role", required = true)]
        roles: Vec<String>,
        #[arg(long, default_value = "")]
        agent_id: String,
        /// Print only the token.
        #[arg(long, short)]
        quiet: bool,
    },
    /// List tokens (never the tokens themselves).
    Ls {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a token at once.
    Revoke { id: String },
}

pub async fn run(admin: &mut AdminClient, cmd: TokensCommand) -> anyhow::Result<()> {
    match cmd {
        TokensCommand::Create {
            name,
            roles,
            agent_id,
            quiet,
        } => {
            let resp = admin
                .create_token(pb::CreateTokenRequest {
                    name,
                    roles,
                    agent_id,
                })
                .await
                .map_err(|s| client::failed("cannot create the token", Subject::Other, &s))?
                .into_inner();
            if quiet {
                println!("{}", resp.token);
            } else {
                let info = resp.info.unwrap_or_default();
                println!("token id {} roles {}", info.id, info.roles.join(","));
                println!("token {}", resp.token);
                println!("(shown once)");
            }
        }
        TokensCommand::Ls { json } => {
            let resp = admin
                .list_tokens(pb::ListTokensRequest {})
                .await
                .map_err(|s| client::failed("cannot list tokens", Subject::Other, &s))?
                .into_inner();
            for t in resp.tokens {
                let revoked = t.revoked_at.is_some();
                if json {
                    println!(
                        "{}",
                        json!({
                            "id": t.id, "name": t.name, "roles": t.roles,
                            "agent_id": t.agent_id, "created_by": t.created_by,
                            "revoked": revoked,
                        })
                    );
                } else {
                    println!(
                        "{}  {:<24} {:<28} {}",
                        t.id,
                        t.name,
                        t.roles.join(","),
                        if revoked { "revoked" } else { "active" }
                    );
                }
            }
        }
        TokensCommand::Revoke { id } => {
            admin
                .revoke_token(pb::RevokeTokenRequest { id: id.clone() })
                .await
                .map_err(|s| {
                    client::failed(format!("cannot revoke token {id}"), Subject::Other, &s)
                })?;
            println!("token {id} revoked");
        }
    }
    Ok(())
}
