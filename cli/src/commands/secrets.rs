//! `drover secrets put NAME` (the value from stdin), `drover secrets ls [--json]` and
//! `drover secrets rm NAME`: the tenant's secrets. A value is never taken from the command
//! line (it would land in the process list and the shell's history) and never printed.

use std::io::Read;

use anyhow::{Context, bail};
use clap::Subcommand;
use drover_proto::v1 as pb;
use serde_json::json;

use crate::client::{self, AdminClient, Subject};
use crate::render;

#[derive(Subcommand, Debug)]
pub enum SecretsCommand {
    /// Create or replace a secret; its value is read from stdin (one trailing newline is
    /// dropped), e.g. `printf %s "$TOKEN" | drover secrets put API_TOKEN`.
    Put { name: String },
    /// List secret names (never values).
    Ls {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Delete a secret; runs that name it fail with `secret_missing` from then on.
    Rm { name: String },
}

pub async fn run(admin: &mut AdminClient, cmd: SecretsCommand) -> anyhow::Result<()> {
    match cmd {
        SecretsCommand::Put { name } => {
            let mut value = String::new();
            std::io::stdin()
                .read_to_string(&mut value)
                .context("reading the secret value from stdin")?;
            if let Some(stripped) = value.strip_suffix('\n') {
                value.truncate(stripped.len());
            }
            if value.is_empty() {
                bail!("no value on stdin for secret {name}");
            }
            let resp = admin
                .put_secret(pb::PutSecretRequest {
                    name: name.clone(),
                    value,
                })
                .await
                .map_err(|s| {
                    client::failed(format!("cannot store secret {name}"), Subject::Other, &s)
                })?
                .into_inner();
            let verb = if resp.created { "created" } else { "replaced" };
            println!("secret {name} {verb}");
            Ok(())
        }
        SecretsCommand::Ls { json } => {
            let resp = admin
                .list_secrets(pb::ListSecretsRequest {})
                .await
                .map_err(|s| client::failed("cannot list secrets", Subject::Other, &s))?
                .into_inner();
            for s in resp.secrets {
                let updated = render::time(&s.updated_at)
                    .map(|d| d.to_rfc3339())
                    .unwrap_or_default();
                if json {
                    println!(
                        "{}",
                        json!({"name": s.name, "key_id": s.key_id, "updated_at": updated})
                    );
                } else {
                    println!("{}\tkey {}\tupdated {updated}", s.name, s.key_id);
                }
            }
            Ok(())
        }
        SecretsCommand::Rm { name } => {
            admin
                .delete_secret(pb::DeleteSecretRequest { name: name.clone() })
                .await
                .map_err(|s| {
                    client::failed(format!("cannot delete secret {name}"), Subject::Other, &s)
                })?;
            println!("secret {name} deleted");
            Ok(())
        }
    }
}
