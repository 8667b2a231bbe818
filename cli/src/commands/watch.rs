//! `drover watch ID`: every transition until the run is terminal.

use std::process::ExitCode;

use drover_core::convert::state_from_proto;
use drover_core::state::RunState;
use drover_proto::v1 as pb;

use crate::client::{self, Client};
use crate::render;

/// Streams the run's events (to stderr when `to_stderr`, else stdout) and returns the
/// terminal run.
pub async fn follow(client: &mut Client, run_id: &str, to_stderr: bool) -> anyhow::Result<pb::Run> {
    let mut stream = client
        .watch_run(pb::WatchRunRequest {
            run_id: run_id.to_owned(),
        })
        .await
        .map_err(|s| {
            client::failed(
                format!("cannot watch run {run_id}"),
                client::Subject::Run,
                &s,
            )
        })?
        .into_inner();
    while let Some(msg) = stream.message().await.map_err(|s| {
        client::failed(
            format!("watch of run {run_id} broke off"),
            client::Subject::Run,
            &s,
        )
    })? {
        if let Some(ev) = &msg.event {
            let line = render::event_line(ev);
            if to_stderr {
                eprintln!("{line}");
            } else {
                println!("{line}");
            }
        }
        if let Some(run) = msg.run
            && state_from_proto(run.state).is_some_and(RunState::is_terminal)
        {
            return Ok(run);
        }
    }
    // The stream ended without a terminal snapshot (server shutting down): ask directly.
    client::fetch_run(client, run_id).await
}

/// 0 for SUCCEEDED; the container's exit code when it failed with one; 1 otherwise.
pub fn exit_code_for(run: &pb::Run) -> ExitCode {
    if state_from_proto(run.state) == Some(RunState::Succeeded) {
        return ExitCode::SUCCESS;
    }
    match run
        .exit_code
        .and_then(|c| u8::try_from(c).ok())
        .filter(|&c| c != 0)
    {
        Some(c) => ExitCode::from(c),
        None => ExitCode::FAILURE,
    }
}

pub async fn run(client: &mut Client, run_id: &str) -> anyhow::Result<ExitCode> {
    let done = follow(client, run_id, false).await?;
    Ok(exit_code_for(&done))
}
