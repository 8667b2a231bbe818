//! `drover-api [--config FILE] [serve|migrate]`.

use std::io::Write;
use std::path::PathBuf;

use anyhow::Context;
use clap::{Parser, Subcommand};
use drover_api::{Application, Settings};
use drover_core::{config, db, shutdown, telemetry};
use tokio_util::sync::CancellationToken;

#[derive(Parser)]
#[command(name = "drover-api", version, about = "drover gRPC API server")]
struct Cli {
    /// TOML settings file; DROVER_… environment variables override it.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Subcommand)]
enum Command {
    /// Serve gRPC (the default).
    Serve,
    /// Apply database migrations and exit.
    Migrate,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let telemetry = telemetry::init("info", "drover-api");
    let result = run(cli).await;
    // Exported last, so the spans of the shutdown itself are in it.
    telemetry.shutdown().await;
    result
}

async fn run(cli: Cli) -> anyhow::Result<()> {
    let settings: Settings = config::load(cli.config.as_deref()).context("loading settings")?;
    match cli.command.unwrap_or(Command::Serve) {
        Command::Migrate => {
            let pool = db::connect(&settings.database).await?;
            db::migrate(&pool).await?;
            tracing::info!("migrations applied");
        }
        Command::Serve => {
            let token = CancellationToken::new();
            shutdown::cancel_on_signals(token.clone())?;
            let app = Application::build(settings).await?;
            if let Some(addr) = app.metrics_addr() {
                writeln!(std::io::stdout(), "drover-api metrics listening on {addr}")?;
            }
            // One machine-readable line so supervisors and tests learn the bound port.
            writeln!(
                std::io::stdout(),
                "drover-api listening on {}",
                app.local_addr()
            )?;
            app.run_until_stopped(token).await?;
        }
    }
    Ok(())
}
