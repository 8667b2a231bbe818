//! `drover dlq ls [--limit N] [--json]` and `drover dlq redrive ID [--reason TEXT] [--json]`:
//! the dead-letter archive, and giving a dead-lettered run one more attempt.

use clap::Subcommand;
use drover_proto::v1 as pb;
use serde_json::{Value, json};

use crate::client::{self, AdminClient, Subject};
use crate::render;

#[derive(Subcommand, Debug)]
pub enum DlqCommand {
    /// List dead letters, newest first.
    Ls {
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// One JSON object per line.
        #[arg(long)]
        json: bool,
    },
    /// Queue a dead-lettered run again with one more attempt allowed.
    Redrive {
        id: String,
        /// Recorded with the transition.
        #[arg(long, default_value = "")]
        reason: String,
        #[arg(long)]
        json: bool,
    },
}

pub async fn run(admin: &mut AdminClient, cmd: DlqCommand) -> anyhow::Result<()> {
    match cmd {
        DlqCommand::Ls { limit, json } => list(admin, limit, json).await,
        DlqCommand::Redrive { id, reason, json } => redrive(admin, &id, &reason, json).await,
    }
}

async fn list(admin: &mut AdminClient, limit: u32, json: bool) -> anyhow::Result<()> {
    let mut all = Vec::new();
    let mut token = String::new();
    loop {
        let page = limit
            .saturating_sub(u32::try_from(all.len()).unwrap_or(u32::MAX))
            .min(1000);
        if page == 0 {
            break;
        }
        let resp = admin
            .list_dead_letters(pb::ListDeadLettersRequest {
                page_size: page,
                page_token: token.clone(),
            })
            .await
            .map_err(|s| client::failed("cannot list dead letters", Subject::Other, &s))?
            .into_inner();
        all.extend(resp.dead_letters);
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    if json {
        for d in &all {
            println!("{}", dead_letter_json(d));
        }
    } else if all.is_empty() {
        println!("no dead letters");
    } else {
        print!("{}", dead_letter_table(&all));
    }
    Ok(())
}

async fn redrive(
    admin: &mut AdminClient,
    run_id: &str,
    reason: &str,
    json: bool,
) -> anyhow::Result<()> {
    let run = admin
        .redrive_run(pb::RedriveRunRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
        .map_err(|s| client::failed(format!("cannot redrive run {run_id}"), Subject::Run, &s))?
        .into_inner()
        .run
        .ok_or_else(|| anyhow::anyhow!("server returned no run"))?;
    if json {
        println!("{}", render::run_json(&run));
    } else {
        println!(
            "run {}: redriven; attempt {} of {}, state {}",
            run.id,
            run.attempt,
            render::max_attempts(&run),
            render::state_name(run.state)
        );
    }
    Ok(())
}

pub fn dead_letter_json(d: &pb::DeadLetter) -> Value {
    json!({
        "id": d.id,
        "kind": d.kind,
        "run_id": d.run_id,
        "reason": d.reason,
        "source_queue": d.source_queue,
        "payload": String::from_utf8_lossy(&d.payload),
        "at": render::ts(&d.at),
        "redriven_at": render::ts(&d.redriven_at),
    })
}

pub fn dead_letter_table(rows: &[pb::DeadLetter]) -> String {
    let rows: Vec<Vec<String>> = rows
        .iter()
        .map(|d| {
            vec![
                d.id.to_string(),
                d.kind.clone(),
                if d.run_id.is_empty() {
                    "-".into()
                } else {
                    d.run_id.clone()
                },
                d.source_queue.clone(),
                render::when(&d.at),
                match &d.redriven_at {
                    Some(_) => format!("yes, {}", render::age(&d.redriven_at)),
                    None => "no".into(),
                },
                d.reason.split_whitespace().collect::<Vec<_>>().join(" "),
            ]
        })
        .collect();
    render::table(
        &["ID", "KIND", "RUN", "QUEUE", "AT", "REDRIVEN", "REASON"],
        &rows,
    )
}
