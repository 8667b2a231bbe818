//! `drover approve ID [--comment TEXT]` and `drover reject ID --reason TEXT`: decide on a run
//! waiting in PENDING_APPROVAL (needs the approver role).

use drover_proto::v1 as pb;

use crate::client::{self, Client, Subject};
use crate::render;

pub async fn approve(
    client: &mut Client,
    id: &str,
    comment: &str,
    json: bool,
) -> anyhow::Result<()> {
    let run = client
        .approve_run(pb::ApproveRunRequest {
            run_id: id.to_owned(),
            comment: comment.to_owned(),
        })
        .await
        .map_err(|s| client::failed(format!("cannot approve run {id}"), Subject::Run, &s))?
        .into_inner()
        .run
        .ok_or_else(|| anyhow::anyhow!("server returned no run"))?;
    show(&run, "approved", json);
    Ok(())
}

pub async fn reject(client: &mut Client, id: &str, reason: &str, json: bool) -> anyhow::Result<()> {
    let run = client
        .reject_run(pb::RejectRunRequest {
            run_id: id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
        .map_err(|s| client::failed(format!("cannot reject run {id}"), Subject::Run, &s))?
        .into_inner()
        .run
        .ok_or_else(|| anyhow::anyhow!("server returned no run"))?;
    show(&run, "rejected", json);
    Ok(())
}

fn show(run: &pb::Run, what: &str, json: bool) {
    if json {
        println!("{}", render::run_json(run));
    } else {
        println!(
            "run {}: {what} (state {})",
            run.id,
            render::state_name(run.state)
        );
    }
}
