//! `drover-dispatcher [--config FILE]`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::Parser;
use drover_core::{config, shutdown, telemetry};
use drover_dispatcher::{Dispatcher, Settings};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(
    name = "drover-dispatcher",
    version,
    about = "drover dispatcher: assigns queued runs to agents"
)]
struct Cli {
    /// TOML settings file; DROVER_… environment variables override it.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init("info", "drover-dispatcher");
    let result = run(cli).await;
    telemetry.shutdown().await;
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings: Settings = config::load(cli.config.as_deref()).context("loading settings")?;
    let token = CancellationToken::new();
    shutdown::cancel_on_signals(token.clone())?;
    let dispatcher = Dispatcher::build(settings).await?;
    if let Some(addr) = dispatcher.metrics_addr() {
        // One machine-readable line so supervisors and tests learn the bound port.
        writeln!(
            std::io::stdout(),
            "drover-dispatcher metrics listening on {addr}"
        )?;
    }
    dispatcher.run_until_stopped(token).await?;
    Ok(())
}
