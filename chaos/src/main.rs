//! `drover-chaos smoke --endpoint URL [--runs N] [--concurrency C]`

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_chaos::smoke::{self, SmokeConfig};

#[derive(Parser)]
#[command(name = "drover-chaos", version, about = "drover load and chaos runs")]
struct Cli {
    #[arg(
        long,
        global = true,
        env = "DROVER_ENDPOINT",
        default_value = "http://127.0.0.1:50051"
    )]
    endpoint: String,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Closed-loop load; checks every run ended exactly once. Exit code 1 on a violation.
    Smoke {
        #[arg(long, default_value_t = 20)]
        runs: usize,
        #[arg(long, default_value_t = 4)]
        concurrency: usize,
        #[arg(long, default_value = "drover/busybox:latest")]
        image: String,
        /// The argv of each run.
        #[arg(last = true, default_values_t = ["true".to_string()])]
        command: Vec<String>,
    },
}

#[tokio::main]
async fn main() -> anyhow::Result<ExitCode> {
    let cli = Cli::parse();
    match cli.command {
        Command::Smoke {
            runs,
            concurrency,
            image,
            command,
        } => {
            let report = smoke::run(
                &cli.endpoint,
                SmokeConfig {
                    runs,
                    concurrency,
                    image,
                    command,
                },
            )
            .await?;
            for v in &report.violations {
                eprintln!("VIOLATION: {v}");
            }
            println!("{report}");
            Ok(if report.violations.is_empty() {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            })
        }
    }
}
