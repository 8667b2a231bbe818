//! `drover-agent`: the worker agent binary. Thin on purpose: configuration, logging and
//! signals here; everything else in the `drover_agent` library.
//!
//! Signals: the first SIGTERM or SIGINT starts the drain (the agent hands back what it cannot
//! finish, deregisters and exits 0). A second one exits at once with status 130, leaving
//! running containers behind: the next start of this agent re-adopts them. That exit is a
//! return from `main` with an [`ExitCode`], not `std::process::exit`, and the runtime is shut
//! down without waiting for its tasks.

use std::io::Write;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::Context;
use clap::Parser;
use drover_agent::{Agent, Settings};
use drover_core::{config, telemetry};
use tokio::signal::unix::{SignalKind, signal};
use tokio_util::sync::CancellationToken;

/// Exit status after a second signal (128 + SIGINT, as shells report an interrupt).
const EXIT_AT_ONCE: u8 = 130;
/// How long the runtime may take to drop its tasks after `main`'s future returned.
const RUNTIME_SHUTDOWN: Duration = Duration::from_millis(500);

/// Registers with the drover API and runs the containers assigned to this host.
#[derive(Debug, Parser)]
#[command(name = "drover-agent", version)]
struct Cli {
    /// TOML settings file; `DROVER_…` environment variables override it.
    #[arg(long, env = "DROVER_CONFIG")]
    config: Option<PathBuf>,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            // No logging yet: it is set up inside the runtime (the trace exporter needs one).
            let _ = writeln!(std::io::stderr(), "cannot start the async runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let telemetry = runtime.block_on(async { telemetry::init("info", "drover-agent") });
    let code = runtime.block_on(run(cli));
    // Also after a second signal: the flush is bounded, and the spans tell what was cut off.
    runtime.block_on(telemetry.shutdown());
    // Tasks left after a second signal (executions mid-flight) are dropped, not awaited.
    runtime.shutdown_timeout(RUNTIME_SHUTDOWN);
    code
}

async fn run(cli: Cli) -> ExitCode {
    let drain = CancellationToken::new();
    let at_once = CancellationToken::new();
    if let Err(e) = watch_signals(drain.clone(), at_once.clone()) {
        tracing::error!(error = %e, "installing signal handlers");
        return ExitCode::FAILURE;
    }
    tokio::select! {
        res = serve(cli, drain) => match res {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tracing::error!(error = format!("{e:#}"), "drover-agent failed");
                ExitCode::FAILURE
            }
        },
        _ = at_once.cancelled() => {
            tracing::warn!("second signal: exiting now; running containers stay for the next start to re-adopt");
            ExitCode::from(EXIT_AT_ONCE)
        }
    }
}

async fn serve(cli: Cli, drain: CancellationToken) -> anyhow::Result<()> {
    let settings: Settings =
        config::load(cli.config.as_deref()).context("loading agent settings")?;
    let endpoint = drover_core::observe::bind(&settings.metrics).await?;
    let agent = Agent::build(settings).await?;
    if let Some(endpoint) = endpoint {
        // One machine-readable line so supervisors and tests learn the bound port.
        // A closed stdout must not stop the agent: the line is informational here.
        let _ = writeln!(
            std::io::stdout(),
            "drover-agent metrics listening on {}",
            endpoint.addr
        );
        // Served until the process exits: `/readyz` answers 503 throughout the drain.
        endpoint.spawn(agent.health(), CancellationToken::new())?;
    }
    agent.run_until_stopped(drain).await?;
    Ok(())
}

/// First SIGTERM/SIGINT fires `drain`, the second `at_once`.
fn watch_signals(drain: CancellationToken, at_once: CancellationToken) -> std::io::Result<()> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        tracing::info!("shutdown requested: draining; send the signal again to exit at once");
        drain.cancel();
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
        at_once.cancel();
    });
    Ok(())
}
