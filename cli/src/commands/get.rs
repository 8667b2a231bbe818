//! `drover get ID [--json]`

use crate::client::{self, Client};
use crate::render;

pub async fn run(client: &mut Client, run_id: &str, json: bool) -> anyhow::Result<()> {
    let run = client::fetch_run(client, run_id).await?;
    if json {
        println!("{}", render::run_json(&run));
    } else {
        print!("{}", render::run_text(&run));
    }
    Ok(())
}
