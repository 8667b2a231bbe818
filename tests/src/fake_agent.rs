//! A scripted agent speaking AgentService directly, for tests of the control plane's side of
//! leases, fencing, cancel and retries where the exact timing of each report matters (a
//! real agent would report on its own schedule). The real agent binary is exercised by the
//! tests that need a container.

use std::collections::HashMap;
use std::time::Duration;

use crate::Stack;
use crate::stack::AgentClient;
use drover_proto::v1 as pb;

pub struct FakeAgent {
    pub id: String,
    pub client: AgentClient,
}

impl FakeAgent {
    /// Registers an agent `id` of pool `default` with `capacity` slots and `labels`.
    pub async fn register(
        stack: &Stack,
        id: &str,
        capacity: u32,
        labels: &[(&str, &str)],
    ) -> FakeAgent {
        let mut client = stack.agent_client(id).await;
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

    /// A completion of `run` under `epoch` by this agent, the rest left empty.
    fn completion(
        &self,
        run: &str,
        epoch: u64,
        outcome: pb::Outcome,
        exit_code: Option<i32>,
    ) -> pb::ReportCompletionRequest {
        pb::ReportCompletionRequest {
            agent_id: self.id.clone(),
            run_id: run.into(),
            lease_epoch: epoch,
            outcome: outcome as i32,
            exit_code,
            ..Default::default()
        }
    }

    async fn send_completion(
        &mut self,
        request: pb::ReportCompletionRequest,
    ) -> Result<pb::ReportCompletionResponse, tonic::Status> {
        self.client
            .report_completion(request)
            .await
            .map(tonic::Response::into_inner)
    }

    pub async fn complete(
        &mut self,
        run: &str,
        epoch: u64,
        outcome: pb::Outcome,
        exit_code: Option<i32>,
    ) -> Result<pb::ReportCompletionResponse, tonic::Status> {
        let request = pb::ReportCompletionRequest {
            output: b"fake output\n".to_vec(),
            ..self.completion(run, epoch, outcome, exit_code)
        };
        self.send_completion(request).await
    }

    /// Reports success of a run whose start was never reported (it ended inside a real
    /// agent's fold window): the completion names the executor it started on.
    pub async fn complete_unreported_start(
        &mut self,
        run: &str,
        epoch: u64,
        executor: &str,
    ) -> Result<pb::ReportCompletionResponse, tonic::Status> {
        let request = pb::ReportCompletionRequest {
            started_executor: executor.into(),
            ..self.completion(run, epoch, pb::Outcome::Succeeded, Some(0))
        };
        self.send_completion(request).await
    }

    /// Reports completion naming an artifact upload (empty = none).
    pub async fn complete_with_artifacts(
        &mut self,
        run: &str,
        epoch: u64,
        outcome: pb::Outcome,
        exit_code: Option<i32>,
        upload_id: &str,
    ) -> Result<pb::ReportCompletionResponse, tonic::Status> {
        let request = pb::ReportCompletionRequest {
            artifact_upload_id: upload_id.into(),
            ..self.completion(run, epoch, outcome, exit_code)
        };
        self.send_completion(request).await
    }

    /// Reports completion carrying `files` inline (what a real agent does for small ones).
    pub async fn complete_with_inline(
        &mut self,
        run: &str,
        epoch: u64,
        outcome: pb::Outcome,
        exit_code: Option<i32>,
        files: &[UploadFile],
    ) -> Result<pb::ReportCompletionResponse, tonic::Status> {
        let request = pb::ReportCompletionRequest {
            inline_artifacts: files
                .iter()
                .map(|f| pb::InlineArtifact {
                    entry: Some(f.header()),
                    content: f.data.clone(),
                })
                .collect(),
            ..self.completion(run, epoch, outcome, exit_code)
        };
        self.send_completion(request).await
    }

    /// The well-formed UploadArtifacts messages for `files` (what a real agent sends):
    /// `start`, then per file its header and data in chunks of at most `chunk` bytes.
    pub fn upload_messages(
        &self,
        run: &str,
        epoch: u64,
        files: &[UploadFile],
        chunk: usize,
    ) -> Vec<pb::UploadArtifactsRequest> {
        use pb::upload_artifacts_request::Item;
        let mut msgs = vec![pb::UploadArtifactsRequest {
            item: Some(Item::Start(pb::UploadStart {
                agent_id: self.id.clone(),
                run_id: run.into(),
                lease_epoch: epoch,
            })),
        }];
        for f in files {
            msgs.push(pb::UploadArtifactsRequest {
                item: Some(Item::File(f.header())),
            });
            for piece in f.data.chunks(chunk.max(1)) {
                msgs.push(pb::UploadArtifactsRequest {
                    item: Some(Item::Data(piece.to_vec())),
                });
            }
        }
        msgs
    }

    /// Uploads `files` (64 KiB chunks) and returns the upload.
    pub async fn upload(
        &mut self,
        run: &str,
        epoch: u64,
        files: &[UploadFile],
    ) -> Result<pb::UploadArtifactsResponse, tonic::Status> {
        let msgs = self.upload_messages(run, epoch, files, 64 * 1024);
        self.upload_raw(msgs).await
    }

    /// Sends exactly these messages as one UploadArtifacts stream.
    pub async fn upload_raw(
        &mut self,
        msgs: Vec<pb::UploadArtifactsRequest>,
    ) -> Result<pb::UploadArtifactsResponse, tonic::Status> {
        self.client
            .upload_artifacts(futures::stream::iter(msgs))
            .await
            .map(tonic::Response::into_inner)
    }

    /// Sends `msgs` as one UploadArtifacts stream, as they come (e.g. one that never ends).
    pub async fn upload_raw_stream<S>(
        &mut self,
        msgs: S,
    ) -> Result<pb::UploadArtifactsResponse, tonic::Status>
    where
        S: futures::Stream<Item = pb::UploadArtifactsRequest> + Send + 'static,
    {
        self.client
            .upload_artifacts(msgs)
            .await
            .map(tonic::Response::into_inner)
    }

    /// DownloadInputs, collected: each entry with its content.
    pub async fn download_inputs(
        &mut self,
        run: &str,
        epoch: u64,
    ) -> Result<Vec<(pb::ArtifactEntry, Vec<u8>)>, tonic::Status> {
        let stream = self
            .client
            .download_inputs(pb::DownloadInputsRequest {
                agent_id: self.id.clone(),
                run_id: run.into(),
                lease_epoch: epoch,
            })
            .await?
            .into_inner();
        collect_artifacts(stream).await
    }
}

/// One file (or symlink) a fake agent uploads.
#[derive(Debug, Clone)]
pub struct UploadFile {
    pub path: String,
    pub data: Vec<u8>,
    pub mode: u32,
    /// Set for a symlink: its target (it has no data).
    pub link_target: Option<String>,
    /// Overrides the header's size / sha256 (to send a lying header).
    pub size: Option<u64>,
    pub sha256: Option<String>,
}

impl UploadFile {
    pub fn file(path: &str, data: &[u8]) -> Self {
        UploadFile {
            path: path.into(),
            data: data.to_vec(),
            mode: 0o644,
            link_target: None,
            size: None,
            sha256: None,
        }
    }

    pub fn symlink(path: &str, target: &str) -> Self {
        UploadFile {
            link_target: Some(target.into()),
            mode: 0o777,
            ..Self::file(path, b"")
        }
    }

    pub fn header(&self) -> pb::ArtifactEntry {
        let symlink = self.link_target.is_some();
        pb::ArtifactEntry {
            path: self.path.clone(),
            size: self.size.unwrap_or(self.data.len() as u64),
            sha256: self.sha256.clone().unwrap_or_else(|| {
                if symlink {
                    String::new()
                } else {
                    sha256_hex(&self.data)
                }
            }),
            mode: self.mode,
            is_symlink: symlink,
            link_target: self.link_target.clone().unwrap_or_default(),
            attempt: 0,
        }
    }
}

pub fn sha256_hex(data: &[u8]) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(data))
}

/// Reads an artifact stream (GetArtifact, DownloadInputs) into entries with their content.
pub async fn collect_artifacts(
    mut stream: tonic::Streaming<pb::ArtifactChunk>,
) -> Result<Vec<(pb::ArtifactEntry, Vec<u8>)>, tonic::Status> {
    use pb::artifact_chunk::Item;
    let mut out: Vec<(pb::ArtifactEntry, Vec<u8>)> = Vec::new();
    while let Some(chunk) = stream.message().await? {
        match chunk.item {
            Some(Item::Entry(e)) => out.push((e, Vec::new())),
            Some(Item::Data(d)) => match out.last_mut() {
                Some((_, buf)) => buf.extend_from_slice(&d),
                None => return Err(tonic::Status::internal("data before any entry")),
            },
            None => return Err(tonic::Status::internal("empty chunk")),
        }
    }
    Ok(out)
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

/// Submits `spec` with the stack's token and returns the run id.
pub async fn submit(stack: &Stack, spec: pb::RunSpec) -> String {
    submit_run(&mut stack.client().await, spec).await.id
}

/// Submits `spec` (no idempotency key) with `client`; the run as accepted.
pub async fn submit_run(client: &mut crate::stack::RunClient, spec: pb::RunSpec) -> pb::Run {
    client
        .submit_run(pb::SubmitRunRequest {
            spec: Some(spec),
            idempotency_key: String::new(),
        })
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run")
}

pub fn in_state(s: pb::RunState) -> impl Fn(&pb::Run) -> bool {
    move |r: &pb::Run| r.state == s as i32
}
