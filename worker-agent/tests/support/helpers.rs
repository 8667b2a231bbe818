//! Small helpers the agent tests share: leasing as the dispatcher does, polling, Docker and
//! journal probes.

use std::path::Path;
use std::process::Command;

use drover_core::ids::{DEFAULT_TENANT, LeaseEpoch, RunId};
use drover_core::messages::{self, AgentCommand};
use drover_core::repo::{RunRecord, Transition, TransitionPatch, outbox, runs};
use drover_core::state::RunState;
use drover_core::topology::AGENTS_EXCHANGE;
use drover_tests::services;
use sqlx::PgConnection;
use tokio::time::Instant;

use super::{POLL, WAIT};

/// Every line of a journal file, parsed.
pub fn read_journal(path: &Path) -> Vec<serde_json::Value> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("journal line {l:?}: {e}")))
        .collect()
}

/// The `event` field of each line.
pub fn events_of(lines: &[serde_json::Value]) -> Vec<String> {
    lines
        .iter()
        .map(|l| l["event"].as_str().unwrap_or_default().to_owned())
        .collect()
}

/// Moves the run to ASSIGNED for `agent` under a new lease epoch (attempt 1), as the
/// dispatcher does.
pub async fn lease(conn: &mut PgConnection, run: RunId, agent: &str, ttl_ms: u64) -> RunRecord {
    let t = Transition {
        tenant: Some(DEFAULT_TENANT),
        expected_attempt: Some(1),
        reason: Some(format!("assigned to {agent}")),
        patch: TransitionPatch::Assign {
            agent_id: agent.to_owned(),
            lease_ttl_ms: i64::try_from(ttl_ms).unwrap(),
        },
        ..Transition::new(run, RunState::Assigned)
    };
    let (rec, _) = runs::transition(conn, &t).await.unwrap();
    assert_eq!(rec.state, RunState::Assigned);
    rec
}

/// Writes an `Execute` command for `run` under `epoch` to the outbox, routed to `agent`.
pub async fn enqueue_execute(conn: &mut PgConnection, agent: &str, run: &RunRecord, epoch: i64) {
    let cmd = AgentCommand::Execute {
        run_id: run.id,
        tenant_id: run.tenant_id,
        attempt: run.attempt,
        lease_epoch: LeaseEpoch(epoch),
    };
    outbox::enqueue(
        conn,
        run.tenant_id,
        AGENTS_EXCHANGE,
        agent,
        &messages::encode(&cmd),
    )
    .await
    .unwrap();
}

/// Polls `probe` every [`POLL`] until it yields a value, failing after [`WAIT`].
pub async fn eventually<T>(what: &str, mut probe: impl AsyncFnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(v) = probe().await {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(POLL).await;
    }
}

pub fn containers(run: RunId) -> Vec<String> {
    services::containers_for_run(&run.to_string())
}

/// Whether the run's container is running (`docker inspect`).
pub fn container_running(run: RunId) -> bool {
    let ids = containers(run);
    let Some(id) = ids.first() else { return false };
    let out = Command::new("docker")
        .args(["inspect", "--format", "{{.State.Running}}", id])
        .output()
        .expect("docker inspect");
    String::from_utf8_lossy(&out.stdout).trim() == "true"
}

pub async fn wait_until_no_container(run: RunId) {
    eventually(
        &format!("the containers of run {run} to be removed"),
        async || containers(run).is_empty().then_some(()),
    )
    .await;
}
