//! `drover agents ls [--json]` and `drover agents drain ID [--json]`: the fleet as the control
//! plane sees it, and asking one agent to take no new work, finish and exit.

use clap::Subcommand;
use drover_proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::{self, AdminClient, Subject};
use crate::render;

#[derive(Subcommand, Debug)]
pub enum AgentsCommand {
    /// List the agents known to the control plane.
    Ls {
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Ask an agent to drain: no new work; it finishes or hands back its runs, then exits.
    Drain {
        id: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(admin: &mut AdminClient, cmd: AgentsCommand) -> anyhow::Result<()> {
    match cmd {
        AgentsCommand::Ls { json } => {
            let agents = admin
                .list_agents(pb::ListAgentsRequest {})
                .await
                .map_err(|s| client::failed("cannot list agents", Subject::Agent, &s))?
                .into_inner()
                .agents;
            if json {
                for a in &agents {
                    println!("{}", agent_json(a));
                }
            } else if agents.is_empty() {
                println!("no agents registered");
            } else {
                print!("{}", agent_table(&agents));
            }
        }
        AgentsCommand::Drain { id, json } => {
            let agent = admin
                .drain_agent(pb::DrainAgentRequest {
                    agent_id: id.clone(),
                })
                .await
                .map_err(|s| {
                    client::failed(format!("cannot drain agent {id}"), Subject::Agent, &s)
                })?
                .into_inner()
                .agent
                .ok_or_else(|| anyhow::anyhow!("server returned no agent"))?;
            if json {
                println!("{}", agent_json(&agent));
            } else {
                println!(
                    "agent {}: drain requested; it takes no new work and exits when its runs are done",
                    agent.id
                );
                print!("{}", agent_table(std::slice::from_ref(&agent)));
            }
        }
    }
    Ok(())
}

fn sorted_labels(a: &pb::Agent) -> Vec<String> {
    let mut labels: Vec<String> = a.labels.iter().map(|(k, v)| format!("{k}={v}")).collect();
    labels.sort();
    labels
}

pub fn agent_json(a: &pb::Agent) -> Value {
    json!({
        "id": a.id,
        "hostname": a.hostname,
        "pool": a.pool,
        "executor": a.executor,
        "running": a.running,
        "capacity": a.capacity,
        "live": a.live,
        "draining": a.draining,
        "last_heartbeat_at": render::ts(&a.last_heartbeat_at),
        "labels": a.labels,
        "version": a.version,
    })
}

pub fn agent_table(agents: &[pb::Agent]) -> String {
    let rows: Vec<Vec<String>> = agents
        .iter()
        .map(|a| {
            let labels = sorted_labels(a);
            vec![
                a.id.clone(),
                a.pool.clone(),
                a.executor.clone(),
                format!("{}/{}", a.running, a.capacity),
                render::yes_no(a.live).into(),
                render::yes_no(a.draining).into(),
                render::age(&a.last_heartbeat_at),
                if labels.is_empty() {
                    "-".into()
                } else {
                    labels.join(",")
                },
                a.version.clone(),
            ]
        })
        .collect();
    render::table(
        &[
            "ID",
            "POOL",
            "EXECUTOR",
            "RUNNING",
            "LIVE",
            "DRAINING",
            "HEARTBEAT",
            "LABELS",
            "VERSION",
        ],
        &rows,
    )
}
