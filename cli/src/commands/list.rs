//! `drover list [--state S]... [--limit N] [--json]`

use anyhow::Context;
use drover_core::convert::state_to_proto;
use drover_core::state::RunState;
use drover_proto::v1 as pb;

use crate::client::{self, Client};
use crate::render;

pub async fn run(
    client: &mut Client,
    states: &[String],
    limit: u32,
    json: bool,
) -> anyhow::Result<()> {
    let mut wanted = Vec::new();
    for s in states {
        let st: RunState = s.parse().with_context(|| format!("unknown state {s}"))?;
        wanted.push(i32::from(state_to_proto(st)));
    }
    let mut token = String::new();
    let mut shown = 0u32;
    if !json {
        println!(
            "{:<36}  {:<14}  {:>4}  {:<24}  COMMAND",
            "ID", "STATE", "EXIT", "IMAGE"
        );
    }
    loop {
        let page = limit.saturating_sub(shown).min(1000);
        if page == 0 {
            break;
        }
        let resp = client
            .list_runs(pb::ListRunsRequest {
                states: wanted.clone(),
                page_size: page,
                page_token: token.clone(),
            })
            .await
            .map_err(|s| client::failed("cannot list runs", client::Subject::Run, &s))?
            .into_inner();
        for r in &resp.runs {
            if json {
                println!("{}", render::run_json(r));
            } else {
                let spec = r.spec.clone().unwrap_or_default();
                println!(
                    "{:<36}  {:<14}  {:>4}  {:<24}  {}",
                    r.id,
                    render::state_name(r.state),
                    r.exit_code
                        .map(|c| c.to_string())
                        .unwrap_or_else(|| "-".into()),
                    spec.image,
                    spec.command.join(" ")
                );
            }
        }
        shown += u32::try_from(resp.runs.len()).unwrap_or(u32::MAX);
        if resp.next_page_token.is_empty() {
            break;
        }
        token = resp.next_page_token;
    }
    Ok(())
}
