//! `drover cancel ID [--reason TEXT] [--json]`: a waiting run ends CANCELLED at once; an
//! assigned or running one is stopped by its agent (SIGTERM, grace, SIGKILL).

use drover_core::convert::state_from_proto;
use drover_core::state::RunState;
use drover_proto::v1 as pb;

use crate::client::{self, Client, Subject};
use crate::render;

pub async fn run(
    client: &mut Client,
    run_id: &str,
    reason: &str,
    json: bool,
) -> anyhow::Result<()> {
    let run = client
        .cancel_run(pb::CancelRunRequest {
            run_id: run_id.to_owned(),
            reason: reason.to_owned(),
        })
        .await
        .map_err(|s| client::failed(format!("cannot cancel run {run_id}"), Subject::Run, &s))?
        .into_inner()
        .run
        .ok_or_else(|| anyhow::anyhow!("server returned no run"))?;
    if json {
        println!("{}", render::run_json(&run));
    } else {
        println!("{}", outcome_line(&run));
    }
    Ok(())
}

fn outcome_line(run: &pb::Run) -> String {
    let state = render::state_name(run.state);
    if state_from_proto(run.state) == Some(RunState::Cancelled) {
        format!("run {}: cancelled (state {state})", run.id)
    } else if run.cancel_requested {
        let on = if run.agent_id.is_empty() {
            String::new()
        } else {
            format!(" on agent {}", run.agent_id)
        };
        format!(
            "run {}: cancel requested; the agent is stopping it (state {state}{on})",
            run.id
        )
    } else {
        format!("run {}: state {state}", run.id)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn says_whether_it_is_done_or_on_its_way() {
        let mut run = pb::Run {
            id: "r".into(),
            state: pb::RunState::Cancelled.into(),
            ..Default::default()
        };
        assert_eq!(outcome_line(&run), "run r: cancelled (state CANCELLED)");
        run.state = pb::RunState::Running.into();
        run.cancel_requested = true;
        run.agent_id = "a1".into();
        assert_eq!(
            outcome_line(&run),
            "run r: cancel requested; the agent is stopping it (state RUNNING on agent a1)"
        );
    }
}
