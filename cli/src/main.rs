//! `drover`: submit, watch, get, list, cancel, dlq, agents, and `drover dev`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_cli::client;
use drover_cli::commands::{
    agents, artifacts, cancel, dev, dlq, get, list, logs, secrets, stats, submit, watch,
};

#[derive(Parser)]
#[command(name = "drover", version, about = "Run containers on a drover cluster")]
struct Cli {
    /// API endpoint.
    #[arg(
        long,
        global = true,
        env = "DROVER_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    /// Bearer token.
    #[arg(long, global = true, env = "DROVER_TOKEN", hide_env_values = true)]
    token: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Submit a run; prints its id (or waits for it with --wait).
    Submit(Box<submit::SubmitArgs>),
    /// Show one run.
    Get {
        id: String,
        #[arg(long)]
        json: bool,
    },
    /// List runs, newest first.
    List {
        /// Only runs in this state (repeatable), e.g. --state running.
        #[arg(long = "state")]
        states: Vec<String>,
        #[arg(long, default_value_t = 50)]
        limit: u32,
        #[arg(long)]
        json: bool,
    },
    /// Print a run's output (stdout and stderr); --follow streams it live until the run ends.
    Logs {
        id: String,
        #[arg(long, short)]
        follow: bool,
        /// Only output after this offset (as a broken-off stream last reported it).
        #[arg(long, default_value_t = 0)]
        from: u64,
    },
    /// Follow a run's state changes until it ends.
    Watch { id: String },
    /// Cancel a run: a waiting one at once, a running one via its agent.
    Cancel {
        id: String,
        /// Recorded with the transition.
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// The dead-letter archive: list, redrive.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// A run's artifacts: list, download.
    Artifacts {
        #[command(subcommand)]
        command: artifacts::ArtifactsCommand,
    },
    /// The tenant's secrets: put (value from stdin), ls (names only), rm.
    Secrets {
        #[command(subcommand)]
        command: secrets::SecretsCommand,
    },
    /// The agent fleet: list, drain.
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Runs by state, oldest queued run, dead letters, agents and slots, outbox, queue depths.
    Stats {
        /// One JSON object.
        #[arg(long)]
        json: bool,
    },
    /// Run API, dispatcher and one agent in this process against local services.
    Dev {
        /// gRPC listen address of the API.
        #[arg(long, default_value = "127.0.0.1:50051")]
        listen: String,
        /// Runs the agent executes at once.
        #[arg(long, default_value_t = 4)]
        capacity: u32,
    },
}

#[tokio::main]
async fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

async fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    if let Command::Dev { listen, capacity } = &cli.command {
        // One process, one `service.name`; span names say which component made each span.
        let telemetry = drover_core::telemetry::init("info", "drover-dev");
        let result = dev::run(listen, *capacity).await;
        telemetry.shutdown().await;
        result?;
        return Ok(ExitCode::SUCCESS);
    }
    let conn = client::connect(&cli.endpoint, cli.token.as_deref()).await?;
    let mut c = conn.runs();
    match cli.command {
        Command::Submit(args) => submit::run(&mut c, *args).await,
        Command::Get { id, json } => get::run(&mut c, &id, json)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::List {
            states,
            limit,
            json,
        } => list::run(&mut c, &states, limit, json)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Watch { id } => watch::run(&mut c, &id).await,
        Command::Logs { id, follow, from } => logs::print(&mut c, &id, follow, from)
            .await
            .map(|_| ExitCode::SUCCESS),
        Command::Cancel { id, reason, json } => cancel::run(&mut c, &id, &reason, json)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Dlq { command } => dlq::run(&mut conn.admin(), command)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Artifacts { command } => artifacts::run(&mut c, command)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Secrets { command } => secrets::run(&mut conn.admin(), command)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Agents { command } => agents::run(&mut conn.admin(), command)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Stats { json } => stats::run(&mut conn.admin(), json)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Dev { .. } => Ok(ExitCode::SUCCESS),
    }
}
