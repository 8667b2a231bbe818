//! `drover-agent`: the worker agent binary. Thin on purpose: configuration, logging and
//! signals here; everything else in the `drover_agent` library.

use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use drover_agent::{Agent, Settings};
use drover_core::{config, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

/// Registers with the drover API and runs the containers assigned to this host.
#[derive(Debug, Parser)]
#[command(name = "drover-agent", version)]
struct Cli {
    /// TOML settings file; `DROVER_…` environment variables override it.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    telemetry::init("info");
    let settings: Settings =
        config::load(cli.config.as_deref()).context("loading agent settings")?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signals(token.clone()).context("installing signal handlers")?;
    let agent = Agent::build(settings).await?;
    agent.run_until_stopped(token).await?;
    Ok(())
}
