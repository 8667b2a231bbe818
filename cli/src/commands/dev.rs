//! `drover dev`: API, dispatcher and one agent in one process, composed from the same
//! libraries the separate binaries use, against the local services that
//! `deploy/local-services.sh` starts. Connection settings come from `DROVER_…` variables
//! (`DROVER_DATABASE__URL`, `DROVER_AMQP__URL`, `DROVER_REDIS__URL`) or their local defaults.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use drover_core::config::{self, AmqpSettings, DatabaseSettings, RedisSettings};
use drover_core::repo::tokens;
use drover_core::secrets_crypto::SecretsSettings;
use drover_core::shutdown;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

use crate::client;

#[derive(Debug, Deserialize, Default)]
#[serde(default)]
struct Shared {
    database: DatabaseSettings,
    amqp: AmqpSettings,
    redis: RedisSettings,
    secrets: SecretsSettings,
}

pub async fn run(listen: &str, agent_capacity: u32) -> anyhow::Result<()> {
    let shared: Shared = config::load(None).context("loading settings")?;
    let root = CancellationToken::new();
    shutdown::cancel_on_signals(root.clone())?;

    // Secrets work out of the box in a dev stack: without configured keys, a fixed public
    // development key seals them (so they are not protected; say so).
    let secrets = if shared.secrets.is_configured() {
        shared.secrets.clone()
    } else {
        tracing::warn!(
            "no DROVER_SECRETS__KEYS: tenant secrets are sealed with the public development key \
             `dev`; do not store real secrets in this dev stack"
        );
        SecretsSettings::development()
    };
    let api_settings = drover_api::Settings {
        secrets,
        listen_addr: listen.to_owned(),
        database: shared.database.clone(),
        amqp: shared.amqp.clone(),
        redis: shared.redis.clone(),
        ..Default::default()
    };
    let api = drover_api::Application::build(api_settings)
        .await
        .context("starting the API (is Postgres running? try deploy/local-services.sh)")?;
    let addr = api.local_addr();
    let pool = drover_core::db::connect(&shared.database)
        .await
        .context("connecting to Postgres")?;
    let token = dev_token(&pool).await?;

    let dispatcher = drover_dispatcher::Dispatcher::build(drover_dispatcher::Settings {
        database: shared.database.clone(),
        amqp: shared.amqp.clone(),
        redis: shared.redis.clone(),
        ..Default::default()
    })
    .await
    .context("starting the dispatcher")?;

    let mut agent_settings = drover_agent::Settings {
        api_endpoint: format!("http://{addr}"),
        amqp: shared.amqp.clone(),
        capacity: agent_capacity,
        ..Default::default()
    };
    let agent_token = tokens::create_agent(
        &pool,
        &agent_settings.agent_id,
        "dev-agent",
        "drover-dev",
        None,
    )
    .await
    .context("creating the dev agent's token")?;
    agent_settings.agent_token = agent_token.token.into();

    let api_task = tokio::spawn(api.run_until_stopped(root.child_token()));
    let dispatcher_task = tokio::spawn(dispatcher.run_until_stopped(root.child_token()));
    let agent_task = match drover_agent::Agent::build(agent_settings).await {
        Ok(agent) => Some(tokio::spawn(agent.run_until_stopped(root.child_token()))),
        Err(e) => {
            tracing::error!(
                error = %e,
                "no agent in this dev stack: runs will wait in QUEUED until an agent joins"
            );
            None
        }
    };
    println!("drover dev: API on http://{addr}  (export DROVER_ENDPOINT=http://{addr})");
    match &token {
        DevToken::Reused(path) => println!("drover dev: using the token in {}", path.display()),
        DevToken::Created(path) => println!(
            "drover dev: bootstrapped tenant `default`; its admin token is in {} (the CLI reads it)",
            path.display()
        ),
    }
    println!("drover dev: press Ctrl-C to stop");

    root.cancelled().await;
    // Agent first (hands back or finishes its runs), then dispatcher, then API.
    if let Some(t) = agent_task {
        report("agent", t.await);
    }
    report("dispatcher", dispatcher_task.await);
    tokio::time::sleep(Duration::from_millis(100)).await;
    report("api", api_task.await);
    Ok(())
}

enum DevToken {
    Reused(PathBuf),
    Created(PathBuf),
}

/// The local user's token: the one in the CLI's token file if it still authenticates, else a
/// new bootstrap token of tenant `default` written there (mode 0600), so `drover submit` works
/// against the dev stack with no set-up.
async fn dev_token(pool: &sqlx::PgPool) -> anyhow::Result<DevToken> {
    let path = client::token_file().context("no HOME or XDG_CONFIG_HOME for the token file")?;
    if let Some(existing) = client::resolve_token(None)
        && tokens::authenticate(pool, &tokens::hash(&existing))
            .await?
            .is_some()
    {
        return Ok(DevToken::Reused(path));
    }
    let b = tokens::bootstrap(pool, "default").await?;
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&path)
        .with_context(|| format!("writing {}", path.display()))?;
    writeln!(f, "{}", b.token.token)?;
    Ok(DevToken::Created(path))
}

fn report<E: std::fmt::Display>(what: &str, res: Result<Result<(), E>, tokio::task::JoinError>) {
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "{what} stopped with an error"),
        Err(e) => tracing::error!(error = %e, "{what} task panicked"),
    }
}
