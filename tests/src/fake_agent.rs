//! A scripted agent speaking AgentService directly, for tests of the control plane's side of
//! leases, fencing, cancel and retries where the exact timing of each report matters (a
//! real agent would report on its own schedule). The real agent binary is exercised by the
//! tests that need a container.

use std::collections::HashMap;
use std::time::Duration;

use drover_proto::v1 as pb;
use tonic::transport::Channel;

use crate::Stack;

pub struct FakeAgent {
    pub id: String,
    pub client: pb::agent_service_client::AgentServiceClient<Channel>,
}

impl FakeAgent {
    /// Registers an agent `id` of pool `default` with `capacity` slots and `labels`.
    pub async fn register(
        stack: &Stack,
        id: &str,
        capacity: u32,
        labels: &[(&str, &str)],
    ) -> FakeAgent {
        let mut client = pb::agent_service_client::AgentServiceClient::new(stack.channel().await);
        client
            .register(pb::RegisterAgentRequest {
                agent_id: id.into(),
                hostname: "fake".into(),
                pool: "default".into(),
                labels: labels
                    .iter()
                    .map(|(k, v)| (k.to_string(), v.to_string()))
                    .collect::<HashMap<_, _>>(),
                capacity,
                executor: "mock".into(),
                version: "test".into(),
            })
            .await
            .expect("register fake agent");
        FakeAgent {
            id: id.into(),
            client,
        }
    }

    /// Heartbeats every 300 ms for every lease the database says this agent holds, until
    /// the returned handle is aborted (or dropped with the test).
    pub fn keep_alive(&self, db: sqlx::PgPool) -> tokio::task::JoinHandle<()> {
        let mut me = FakeAgent {
            id: self.id.clone(),
            client: self.client.clone(),
        };
        tokio::spawn(async move {
            loop {
                let held: Vec<(uuid::Uuid, i64)> = sqlx::query_as(
                    "SELECT id, lease_epoch FROM runs WHERE agent_id = $1 \
                     AND state IN ('ASSIGNED', 'RUNNING')",
                )
                .bind(&me.id)
                .fetch_all(&db)
                .await
                .unwrap_or_default();
                let leases: Vec<(String, u64)> = held
                    .into_iter()
                    .map(|(r, e)| (r.to_string(), u64::try_from(e).unwrap_or(0)))
                    .collect();
                me.heartbeat(&leases).await;
                tokio::time::sleep(Duration::from_millis(300)).await;
            }
        })
    }

    pub async fn heartbeat(&mut self, running: &[(String, u64)]) -> pb::HeartbeatResponse {
        self.client
            .heartbeat(pb::HeartbeatRequest {
                agent_id: self.id.clone(),
                running: running
                    .iter()
                    .map(|(r, e)| pb::LeaseRef {
                        run_id: r.clone(),
                        lease_epoch: *e,
                    })
                    .collect(),
            })
            .await
            .expect("heartbeat")
            .into_inner()
    }

    pub async fn started(&mut self, run: &str, epoch: u64) -> Result<(), tonic::Status> {
        self.client
            .report_started(pb::ReportStartedRequest {
                agent_id: self.id.clone(),
                run_id: run.into(),
                lease_epoch: epoch,
                container_id: format!("fake-{run}"),
                executor: "mock".into(),
            })
            .await
            .map(|_| ())
    }

    pub async fn complete(
        &mut self,
        run: &str,
        epoch: u64,
        outcome: pb::Outcome,
        exit_code: Option<i32>,
    ) -> Result<pb::ReportCompletionResponse, tonic::Status> {
        self.client
            .report_completion(pb::ReportCompletionRequest {
                agent_id: self.id.clone(),
                run_id: run.into(),
                lease_epoch: epoch,
                outcome: outcome as i32,
                exit_code,
                output: b"fake output\n".to_vec(),
                output_truncated: false,
                reason: String::new(),
                infrastructure_error: false,
            })
            .await
            .map(tonic::Response::into_inner)
    }
}

/// Polls GetRun until `pred` holds (or panics after `limit`, dumping the stack's logs).
pub async fn wait_run<F>(stack: &Stack, run_id: &str, limit: Duration, pred: F) -> pb::Run
where
    F: Fn(&pb::Run) -> bool,
{
    let mut client = stack.client().await;
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let run = client
            .get_run(pb::GetRunRequest {
                run_id: run_id.into(),
            })
            .await
            .expect("get run")
            .into_inner()
            .run
            .expect("run");
        if pred(&run) {
            return run;
        }
        if tokio::time::Instant::now() > deadline {
            stack.dump_logs();
            panic!(
                "run {run_id} did not reach the expected condition in {limit:?}; it is {:?} ({})",
                pb::RunState::try_from(run.state),
                run.reason
            );
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Submits `spec` and returns the run id.
pub async fn submit(stack: &Stack, spec: pb::RunSpec) -> String {
    stack
        .client()
        .await
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run")
        .id
}

pub fn in_state(s: pb::RunState) -> impl Fn(&pb::Run) -> bool {
    move |r: &pb::Run| r.state == s as i32
}
