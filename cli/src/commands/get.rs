//! `drover get ID [--json]`

use anyhow::Context;
use drover_proto::v1 as pb;

use crate::client::{self, Client};
use crate::render;

pub async fn run(client: &mut Client, run_id: &str, json: bool) -> anyhow::Result<()> {
    let run = client
        .get_run(pb::GetRunRequest {
            run_id: run_id.to_owned(),
        })
        .await
        .map_err(|s| anyhow::anyhow!(client::describe(&s)))?
        .into_inner()
        .run
        .context("server returned no run")?;
    if json {
        println!("{}", render::run_json(&run));
    } else {
        print!("{}", render::run_text(&run));
    }
    Ok(())
}
