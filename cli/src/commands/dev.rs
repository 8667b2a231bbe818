//! `drover dev`: API, dispatcher and one agent in one process, composed from the same
//! libraries the separate binaries use, against the local services that
//! `deploy/local-services.sh` starts. Connection settings come from `DROVER_…` variables
//! (`DROVER_DATABASE__URL`, `DROVER_AMQP__URL`, `DROVER_REDIS__URL`) or their local defaults.

use std::time::Duration;

use anyhow::Context;
use drover_core::config::{self, AmqpSettings, DatabaseSettings, RedisSettings};
use drover_core::secrets_crypto::SecretsSettings;
use drover_core::shutdown;
use serde::Deserialize;
use tokio_util::sync::CancellationToken;

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

    let dispatcher = drover_dispatcher::Dispatcher::build(drover_dispatcher::Settings {
        database: shared.database.clone(),
        amqp: shared.amqp.clone(),
        redis: shared.redis.clone(),
        ..Default::default()
    })
    .await
    .context("starting the dispatcher")?;

    let agent_settings = drover_agent::Settings {
        api_endpoint: format!("http://{addr}"),
        amqp: shared.amqp.clone(),
        capacity: agent_capacity,
        ..Default::default()
    };

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

fn report<E: std::fmt::Display>(what: &str, res: Result<Result<(), E>, tokio::task::JoinError>) {
    match res {
        Ok(Ok(())) => {}
        Ok(Err(e)) => tracing::error!(error = %e, "{what} stopped with an error"),
        Err(e) => tracing::error!(error = %e, "{what} task panicked"),
    }
}
