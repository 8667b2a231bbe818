//! `drover`: submit, watch, get, list, cancel, dlq, agents, and `drover dev`.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use drover_cli::client;
use drover_cli::commands::{
    admin, agents, approve, artifacts, audit, cancel, dev, dlq, get, list, logs, secrets, stats,
    submit, tokens, watch,
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
    /// Bearer token (default: the first line of ~/.config/drover/token, which `drover dev`
    /// writes).
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
    /// Approve a run waiting for approval (approver role).
    Approve {
        id: String,
        #[arg(long, default_value = "")]
        comment: String,
        #[arg(long)]
        json: bool,
    },
    /// Reject a run waiting for approval (approver role); it ends REJECTED.
    Reject {
        id: String,
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
    /// The tenant's bearer tokens: create, ls, revoke (admin role).
    Tokens {
        #[command(subcommand)]
        command: tokens::TokensCommand,
    },
    /// The tenant's audit chain: verify (admin role). Exit code 1 when broken.
    Audit {
        #[command(subcommand)]
        command: AuditCommand,
    },
    /// The tenant's policy: self-approval and quotas (admin role). Without flags, shows it.
    Policy {
        #[arg(long)]
        allow_self_approval: Option<bool>,
        /// Most runs assigned or running at once; 0 = the server default.
        #[arg(long)]
        max_concurrent: Option<u32>,
        /// Most runs queued or waiting for approval; 0 = the server default.
        #[arg(long)]
        max_queued: Option<u32>,
    },
    /// Set-up straight against Postgres, before any token exists: bootstrap, agent-token,
    /// audit-verify (all tenants).
    Admin {
        #[command(subcommand)]
        command: admin::AdminCommand,
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

#[derive(Subcommand)]
enum AuditCommand {
    /// Recompute the chain and name the first broken link.
    Verify {
        #[arg(long)]
        json: bool,
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
    if let Command::Admin { command } = cli.command {
        let ok = admin::run(command).await?;
        return Ok(if ok {
            ExitCode::SUCCESS
        } else {
            ExitCode::FAILURE
        });
    }
    let token = client::resolve_token(cli.token);
    let conn = client::connect(&cli.endpoint, token.as_deref()).await?;
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
        Command::Approve { id, comment, json } => approve::approve(&mut c, &id, &comment, json)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Reject { id, reason, json } => approve::reject(&mut c, &id, &reason, json)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Tokens { command } => tokens::run(&mut conn.admin(), command)
            .await
            .map(|()| ExitCode::SUCCESS),
        Command::Audit {
            command: AuditCommand::Verify { json },
        } => audit::verify(&mut conn.admin(), json).await.map(|ok| {
            if ok {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }),
        Command::Policy {
            allow_self_approval,
            max_concurrent,
            max_queued,
        } => policy(
            &mut conn.admin(),
            allow_self_approval,
            max_concurrent,
            max_queued,
        )
        .await
        .map(|()| ExitCode::SUCCESS),
        Command::Dev { .. } | Command::Admin { .. } => Ok(ExitCode::SUCCESS),
    }
}

/// `drover policy`: shows the tenant's policy, changing the given fields first.
async fn policy(
    admin: &mut client::AdminClient,
    allow_self_approval: Option<bool>,
    max_concurrent: Option<u32>,
    max_queued: Option<u32>,
) -> anyhow::Result<()> {
    use drover_proto::v1 as pb;
    let fail =
        |s: tonic::Status| client::failed("cannot read the policy", client::Subject::Other, &s);
    let mut p = admin
        .get_tenant_policy(pb::GetTenantPolicyRequest {})
        .await
        .map_err(fail)?
        .into_inner();
    if allow_self_approval.is_some() || max_concurrent.is_some() || max_queued.is_some() {
        if let Some(v) = allow_self_approval {
            p.allow_self_approval = v;
        }
        if let Some(v) = max_concurrent {
            p.max_concurrent_runs = v;
        }
        if let Some(v) = max_queued {
            p.max_queued_runs = v;
        }
        p = admin
            .set_tenant_policy(p)
            .await
            .map_err(|s| client::failed("cannot change the policy", client::Subject::Other, &s))?
            .into_inner();
    }
    let n = |v: u32| {
        if v == 0 {
            "default".to_owned()
        } else {
            v.to_string()
        }
    };
    println!(
        "allow_self_approval={} max_concurrent_runs={} max_queued_runs={}",
        p.allow_self_approval,
        n(p.max_concurrent_runs),
        n(p.max_queued_runs)
    );
    Ok(())
}
