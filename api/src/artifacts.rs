//! Artifacts over gRPC: the agent's UploadArtifacts and DownloadInputs, the client's
//! ListArtifacts and GetArtifact, the `inputs_from_run` check at submit, and the garbage
//! collector of uploads that can never be committed.
//!
//! An upload is staged under the lease it was started with: every file's size and SHA-256
//! are verified as its bytes arrive, and only a stream that ends with every file verified
//! (and the lease still current) yields an upload id. The manifest becomes the run's only
//! when the completion report naming that id ends the run (`end_attempt_with_artifacts`), in
//! the same transaction as the terminal state. A failed stream deletes what it staged at
//! once; anything else never committed is collected by [`collect_garbage`].
//!
//! Small uploads may instead ride in the completion report ([`store_inline`]): the same
//! header checks (`Manifest`), each content checked whole against its size and hash, then
//! the row and every blob, before the report's end commits them. Those totalling at most
//! `artifacts.database_upload_bytes` (64 KiB) keep their bytes in Postgres, written with the
//! row; larger ones go to the store.

use std::time::Duration;

use drover_core::artifact_paths::{self, ManifestPaths, PathError};
use drover_core::artifacts::{BlobReader, BlobSink, StoreError};
use drover_core::ids::{AgentId, RunId, TenantId};
use drover_core::repo::artifacts::{self as repo, ArtifactRecord, NewUpload, StagedEntry};
use drover_core::repo::{RunRecord, runs};
use drover_core::state::RunState;
use drover_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::io::AsyncReadExt;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;
use tonic::{Status, Streaming};
use uuid::Uuid;

use crate::error::{ApiError, ApiResult};
use crate::state::{AppState, parse_run_id};

/// Largest data chunk accepted in an upload, and the size of the chunks served.
pub const MAX_CHUNK_BYTES: usize = 1024 * 1024;
/// Permission bits kept from an upload header.
const MODE_MASK: u32 = 0o777;

pub type ChunkStream = ReceiverStream<Result<pb::ArtifactChunk, Status>>;

fn path_error(field: &'static str, e: &PathError) -> ApiError {
    ApiError::bad(field, e.to_string())
}

/// The run, if `agent` holds its lease under `epoch` right now and it is executing. The
/// same rule as every other AgentService call ([`crate::agent_service::leased_run`]).
async fn leased_run(
    state: &AppState,
    agent: &str,
    run: &str,
    epoch: u64,
) -> ApiResult<(AgentId, RunRecord)> {
    let agent = AgentId::parse(agent).map_err(|m| ApiError::bad("agent_id", m))?;
    let run = parse_run_id("run_id", run)?;
    let epoch = i64::try_from(epoch).map_err(|_| ApiError::bad("lease_epoch", "out of range"))?;
    let rec = crate::agent_service::leased_run(state, &agent, run, epoch).await?;
    if !matches!(rec.state, RunState::Assigned | RunState::Running) {
        return Err(ApiError::Precondition(format!("run is {}", rec.state)));
    }
    Ok((agent, rec))
}

/// The upload id of a completion report: `None` when empty.
pub fn parse_upload_id(s: &str) -> ApiResult<Option<Uuid>> {
    if s.is_empty() {
        return Ok(None);
    }
    Uuid::parse_str(s)
        .map(Some)
        .map_err(|_| ApiError::bad("artifact_upload_id", "must be a UUID"))
}

/// SubmitRun: `inputs_from_run` must name a run of the caller's tenant.
pub async fn check_inputs_from_run(
    state: &AppState,
    tenant: TenantId,
    source: Option<Uuid>,
) -> ApiResult<()> {
    if let Some(src) = source
        && !runs::exists(&state.pool, tenant, RunId(src)).await?
    {
        // NOT_FOUND, as for any other run of another tenant: never confirm it exists.
        return Err(ApiError::NotFound("spec.inputs_from_run: no such run"));
    }
    Ok(())
}

/// The file being received.
struct Receiving {
    path: String,
    declared: u64,
    sha256: String,
    written: u64,
    hasher: Sha256,
    sink: Box<dyn BlobSink>,
}

impl Receiving {
    async fn finish(self) -> ApiResult<()> {
        if self.written != self.declared {
            return Err(ApiError::bad(
                "data",
                format!(
                    "file {} is short: got {} of {} bytes",
                    self.path, self.written, self.declared
                ),
            ));
        }
        if hex::encode(self.hasher.finalize()) != self.sha256 {
            return Err(ApiError::bad(
                "file.sha256",
                format!("file {}: content does not match its sha256", self.path),
            ));
        }
        self.sink.finish().await?;
        Ok(())
    }
}

/// The entries of one upload as their headers are admitted: every rule a file header must
/// pass (limits, paths, symlinks, sha256 format), whether its bytes arrive streamed or inline.
struct Manifest<'a> {
    limits: &'a crate::settings::ArtifactSettings,
    paths: ManifestPaths,
    entries: Vec<StagedEntry>,
    bytes: u64,
    next_blob: u32,
}

impl<'a> Manifest<'a> {
    fn new(limits: &'a crate::settings::ArtifactSettings) -> Self {
        Self {
            limits,
            paths: ManifestPaths::default(),
            entries: Vec::new(),
            bytes: 0,
            next_blob: 0,
        }
    }

    /// Checks `f` and records it; the entry (with its blob index for a regular file).
    fn admit(&mut self, f: pb::ArtifactEntry) -> ApiResult<&StagedEntry> {
        let limits = self.limits;
        if self.entries.len() >= limits.max_files as usize {
            return Err(ApiError::Exhausted(format!(
                "an upload holds at most {} files",
                limits.max_files
            )));
        }
        self.paths
            .insert(&f.path)
            .map_err(|e| path_error("file.path", &e))?;
        let mode = i32::try_from(f.mode & MODE_MASK).unwrap_or(0o644);
        if f.is_symlink {
            if f.size != 0 || !f.sha256.is_empty() {
                return Err(ApiError::bad(
                    "file",
                    "a symlink has no content: size 0 and no sha256",
                ));
            }
            artifact_paths::validate_link_target(&f.link_target)
                .map_err(|e| path_error("file.link_target", &e))?;
            return Ok(self.push(StagedEntry {
                path: f.path,
                blob: None,
                size: 0,
                sha256: String::new(),
                mode,
                is_symlink: true,
                link_target: Some(f.link_target),
            }));
        }
        if !f.link_target.is_empty() {
            return Err(ApiError::bad(
                "file.link_target",
                "only a symlink has a link target",
            ));
        }
        let sha256 = f.sha256.to_ascii_lowercase();
        if sha256.len() != 64 || !sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ApiError::bad("file.sha256", "must be 64 hex digits"));
        }
        if f.size > limits.max_file_bytes {
            return Err(ApiError::Exhausted(format!(
                "file {} is {} bytes; at most {} per file",
                f.path, f.size, limits.max_file_bytes
            )));
        }
        let total = self.bytes.saturating_add(f.size);
        if total > limits.max_upload_bytes {
            return Err(ApiError::Exhausted(format!(
                "upload exceeds {} bytes",
                limits.max_upload_bytes
            )));
        }
        self.bytes = total;
        let size = i64::try_from(f.size).map_err(|_| ApiError::bad("file.size", "too large"))?;
        let blob = self.next_blob;
        self.next_blob += 1;
        Ok(self.push(StagedEntry {
            path: f.path,
            blob: Some(i32::try_from(blob).unwrap_or(i32::MAX)),
            size,
            sha256,
            mode,
            is_symlink: false,
            link_target: None,
        }))
    }

    fn push(&mut self, entry: StagedEntry) -> &StagedEntry {
        self.entries.push(entry);
        &self.entries[self.entries.len() - 1]
    }

    fn bytes_i64(&self) -> i64 {
        i64::try_from(self.bytes).unwrap_or(i64::MAX)
    }
}

/// What one upload stream has staged so far.
struct Staging<'a> {
    state: &'a AppState,
    id: Uuid,
    manifest: Manifest<'a>,
    current: Option<Receiving>,
}

impl Staging<'_> {
    async fn header(&mut self, f: pb::ArtifactEntry) -> ApiResult<()> {
        if let Some(cur) = self.current.take() {
            cur.finish().await?;
        }
        let entry = self.manifest.admit(f)?;
        let Some(blob) = entry.blob else {
            return Ok(());
        };
        let (path, declared, sha256) = (entry.path.clone(), entry.size, entry.sha256.clone());
        let blob = u32::try_from(blob).unwrap_or(u32::MAX);
        let sink = self.state.artifacts.stage(self.id, blob).await?;
        self.current = Some(Receiving {
            path,
            declared: u64::try_from(declared).unwrap_or(0),
            sha256,
            written: 0,
            hasher: Sha256::new(),
            sink,
        });
        Ok(())
    }

    async fn data(&mut self, data: Vec<u8>) -> ApiResult<()> {
        if data.len() > MAX_CHUNK_BYTES {
            return Err(ApiError::bad(
                "data",
                format!("at most {MAX_CHUNK_BYTES} bytes per chunk"),
            ));
        }
        let Some(cur) = self.current.as_mut() else {
            return Err(ApiError::bad(
                "data",
                "data must follow the header of a regular file",
            ));
        };
        let len = data.len() as u64;
        if cur.written + len > cur.declared {
            return Err(ApiError::bad(
                "data",
                format!(
                    "file {} has more data than its declared {} bytes",
                    cur.path, cur.declared
                ),
            ));
        }
        cur.hasher.update(&data);
        cur.written += len;
        cur.sink.write(&data).await?;
        metrics::counter!(drover_core::observe::names::ARTIFACT_BYTES).increment(len);
        Ok(())
    }
}

/// UploadArtifacts.
pub async fn upload(
    state: &AppState,
    caller: &crate::auth::AgentCaller,
    mut stream: Streaming<pb::UploadArtifactsRequest>,
) -> ApiResult<pb::UploadArtifactsResponse> {
    use pb::upload_artifacts_request::Item;
    let start = match stream.message().await {
        Ok(Some(pb::UploadArtifactsRequest {
            item: Some(Item::Start(s)),
        })) => s,
        Ok(_) => {
            return Err(ApiError::bad("start", "the first message must be `start`"));
        }
        Err(status) => return Err(ApiError::Client(status)),
    };
    caller.check(&start.agent_id)?;
    let (agent, run) = leased_run(state, &start.agent_id, &start.run_id, start.lease_epoch).await?;
    let id = Uuid::now_v7();
    repo::begin_upload(
        &state.pool,
        &NewUpload {
            id,
            tenant_id: run.tenant_id,
            run_id: run.id,
            attempt: run.attempt,
            lease_epoch: run.lease_epoch,
            agent_id: agent.as_str().to_owned(),
        },
    )
    .await?;
    let mut staging = Staging {
        state,
        id,
        manifest: Manifest::new(&state.settings.artifacts),
        current: None,
    };
    let staged = async {
        state.artifacts.begin(id).await?;
        let idle = Duration::from_secs(state.settings.artifacts.upload_idle_secs.max(1));
        loop {
            let msg = tokio::time::timeout(idle, stream.message())
                .await
                .map_err(|_| {
                    ApiError::Client(Status::deadline_exceeded(format!(
                        "no upload message for {} s; upload abandoned",
                        idle.as_secs()
                    )))
                })?
                .map_err(ApiError::Client)?;
            match msg.and_then(|m| m.item) {
                None => break,
                Some(Item::Start(_)) => {
                    return Err(ApiError::bad("start", "only the first message is `start`"));
                }
                Some(Item::File(f)) => staging.header(f).await?,
                Some(Item::Data(d)) => staging.data(d).await?,
            }
        }
        if let Some(cur) = staging.current.take() {
            cur.finish().await?;
        }
        state.artifacts.commit(id).await?;
        let m = &staging.manifest;
        if !repo::complete_upload(&state.pool, id, &m.entries, m.bytes_i64()).await? {
            return Err(ApiError::Precondition(
                "the lease moved on during the upload; nothing was kept".into(),
            ));
        }
        Ok(())
    }
    .await;
    if let Err(e) = staged {
        tracing::info!(run_id = %run.id, agent_id = %agent, upload_id = %id, error = %e, "artifact upload refused; discarding it");
        discard(state, id).await;
        return Err(e);
    }
    let m = &staging.manifest;
    tracing::info!(run_id = %run.id, agent_id = %agent, upload_id = %id, files = m.entries.len(), bytes = m.bytes, "artifacts staged");
    Ok(pb::UploadArtifactsResponse {
        upload_id: id.to_string(),
        files: u32::try_from(m.entries.len()).unwrap_or(u32::MAX),
        bytes: m.bytes,
    })
}

/// Most inline artifact bytes one completion report may carry (with the 64 KiB output tail,
/// well inside gRPC's default 4 MiB message).
pub const MAX_INLINE_BYTES: usize = 1024 * 1024;

/// A completion report's inline artifacts, checked: the manifest entries, their total size,
/// and the bytes, kept for Postgres or bound for the store.
pub struct CheckedInline {
    pub entries: Vec<StagedEntry>,
    pub bytes: u64,
    pub content: InlineBytes,
}

/// Where a checked inline upload's bytes go.
pub enum InlineBytes {
    /// At most `artifacts.database_upload_bytes` in all: Postgres keeps them.
    Database(repo::KeptBytes),
    /// More: the store, blob index and content.
    Store(Vec<(u32, Vec<u8>)>),
}

impl CheckedInline {
    /// The bytes, when Postgres is to keep them.
    pub fn kept(&self) -> Option<&repo::KeptBytes> {
        match &self.content {
            InlineBytes::Database(kept) => Some(kept),
            InlineBytes::Store(_) => None,
        }
    }

    /// The total size as Postgres stores it.
    pub fn bytes_i64(&self) -> i64 {
        i64::try_from(self.bytes).unwrap_or(i64::MAX)
    }
}

/// Checks a completion report's inline artifacts: every entry passes the same checks as a
/// streamed file, and its content must match its size and sha256 (INVALID_ARGUMENT
/// otherwise, before anything is written).
pub fn check_inline(state: &AppState, items: Vec<pb::InlineArtifact>) -> ApiResult<CheckedInline> {
    let total: usize = items.iter().map(|i| i.content.len()).sum();
    if total > MAX_INLINE_BYTES {
        return Err(ApiError::bad(
            "inline_artifacts",
            format!(
                "at most {MAX_INLINE_BYTES} bytes in all; upload larger ones with UploadArtifacts"
            ),
        ));
    }
    let mut manifest = Manifest::new(&state.settings.artifacts);
    let mut blobs = Vec::new();
    for item in items {
        let Some(f) = item.entry else {
            return Err(ApiError::bad("inline_artifacts.entry", "required"));
        };
        let entry = manifest.admit(f)?;
        let Some(blob) = entry.blob else {
            if !item.content.is_empty() {
                return Err(ApiError::bad(
                    "inline_artifacts.content",
                    format!("symlink {} has no content", entry.path),
                ));
            }
            continue;
        };
        if u64::try_from(entry.size).ok() != Some(item.content.len() as u64)
            || hex::encode(Sha256::digest(&item.content)) != entry.sha256
        {
            return Err(ApiError::bad(
                "inline_artifacts.content",
                format!(
                    "file {}: content does not match its size and sha256",
                    entry.path
                ),
            ));
        }
        blobs.push((blob, item.content));
    }
    // Small enough: the bytes go with the row, in its statement; else to the store after it.
    let content = if total as u64 <= state.settings.artifacts.database_upload_bytes {
        let (indexes, contents) = blobs.into_iter().unzip();
        InlineBytes::Database(repo::KeptBytes { indexes, contents })
    } else {
        InlineBytes::Store(
            blobs
                .into_iter()
                .map(|(index, content)| (u32::try_from(index).unwrap_or(u32::MAX), content))
                .collect(),
        )
    };
    Ok(CheckedInline {
        bytes: manifest.bytes,
        entries: manifest.entries,
        content,
    })
}

/// Stores checked inline artifacts ([`check_inline`]) as an upload of `agent`'s lease and
/// returns its id, for the report to commit with the end. The row comes first (so the
/// collector knows it), with the bytes when Postgres keeps them, else every blob in one store
/// step after it. `None` when the lease is not executing: nothing is stored, and the end
/// decides, by the same rules as any report (a stale lease is refused; a repeat of this
/// lease's own end after a lost answer is told what stands).
pub async fn store_inline(
    state: &AppState,
    agent: &AgentId,
    run: RunId,
    epoch: i64,
    checked: CheckedInline,
) -> ApiResult<Option<Uuid>> {
    let id = Uuid::now_v7();
    let none = repo::KeptBytes::default();
    if !repo::begin_inline_upload(
        &state.pool,
        id,
        run,
        epoch,
        agent.as_str(),
        &checked.entries,
        checked.bytes_i64(),
        checked.kept().unwrap_or(&none),
    )
    .await?
    {
        return Ok(None);
    }
    metrics::counter!(drover_core::observe::names::ARTIFACT_BYTES).increment(checked.bytes);
    let InlineBytes::Store(files) = checked.content else {
        return Ok(Some(id));
    };
    if let Err(e) = state.artifacts.put_all(id, files).await {
        discard(state, id).await;
        return Err(e.into());
    }
    Ok(Some(id))
}

/// Deletes a failed upload's files, then its row (the collector retries whatever fails).
async fn discard(state: &AppState, id: Uuid) {
    if let Err(e) = state.artifacts.delete(id).await {
        tracing::warn!(upload_id = %id, error = %e, "could not delete a discarded upload; the collector will");
        return;
    }
    if let Err(e) = repo::discard_upload(&state.pool, id).await {
        tracing::warn!(upload_id = %id, error = %e, "could not forget a discarded upload; the collector will");
    }
}

pub fn entry_to_proto(r: &ArtifactRecord) -> pb::ArtifactEntry {
    let e = &r.entry;
    pb::ArtifactEntry {
        path: e.path.clone(),
        size: u64::try_from(e.size).unwrap_or(0),
        sha256: e.sha256.clone(),
        mode: u32::try_from(e.mode).unwrap_or(0),
        is_symlink: e.is_symlink,
        link_target: e.link_target.clone().unwrap_or_default(),
        attempt: u32::try_from(r.attempt).unwrap_or(0),
    }
}

/// Streams `records`: each entry, then its content in chunks, verified against the recorded
/// SHA-256 as it is read (a mismatch ends the stream with DATA_LOSS).
fn stream_records(state: &AppState, records: Vec<ArtifactRecord>) -> ChunkStream {
    let (tx, rx) = mpsc::channel(4);
    let store = state.artifacts.clone();
    tokio::spawn(async move {
        use pb::artifact_chunk::Item;
        for r in records {
            let entry = entry_to_proto(&r);
            if tx
                .send(Ok(pb::ArtifactChunk {
                    item: Some(Item::Entry(entry)),
                }))
                .await
                .is_err()
            {
                return;
            }
            let Some(blob) = r.entry.blob.and_then(|b| u32::try_from(b).ok()) else {
                continue;
            };
            if let Err(status) = send_blob(&*store, &r, blob, &tx).await {
                let _ = tx.send(Err(status)).await;
                return;
            }
        }
    });
    ReceiverStream::new(rx)
}

async fn send_blob(
    store: &dyn drover_core::artifacts::ArtifactStore,
    r: &ArtifactRecord,
    blob: u32,
    tx: &mpsc::Sender<Result<pb::ArtifactChunk, Status>>,
) -> Result<(), Status> {
    let internal = |e: StoreError| {
        tracing::error!(upload_id = %r.upload_id, path = %r.entry.path, "artifact read failed");
        // Logged again with the reference the client gets.
        Status::from(ApiError::Store(e))
    };
    // A small upload's bytes came with the record (Postgres holds them); they are checked
    // against the manifest the same way.
    let mut reader = match &r.content {
        Some(bytes) => Box::pin(std::io::Cursor::new(bytes.clone())) as BlobReader,
        None => store.open(r.upload_id, blob).await.map_err(internal)?,
    };
    let mut hasher = Sha256::new();
    let mut sent = 0u64;
    loop {
        let mut buf = Vec::with_capacity(MAX_CHUNK_BYTES);
        let n = (&mut reader)
            .take(MAX_CHUNK_BYTES as u64)
            .read_to_end(&mut buf)
            .await
            .map_err(|e| {
                internal(StoreError::Io {
                    what: r.entry.path.clone(),
                    source: e,
                })
            })?;
        if n == 0 {
            break;
        }
        hasher.update(&buf);
        sent += n as u64;
        let chunk = pb::ArtifactChunk {
            item: Some(pb::artifact_chunk::Item::Data(buf)),
        };
        if tx.send(Ok(chunk)).await.is_err() {
            return Ok(());
        }
    }
    if i64::try_from(sent).ok() != Some(r.entry.size)
        || hex::encode(hasher.finalize()) != r.entry.sha256
    {
        tracing::error!(upload_id = %r.upload_id, path = %r.entry.path, "stored artifact does not match its manifest");
        return Err(Status::data_loss(
            "stored artifact does not match its recorded size and sha256",
        ));
    }
    Ok(())
}

/// ListArtifacts.
pub async fn list(
    state: &AppState,
    tenant: TenantId,
    req: pb::ListArtifactsRequest,
) -> ApiResult<pb::ListArtifactsResponse> {
    let run = parse_run_id("run_id", &req.run_id)?;
    if !runs::exists(&state.pool, tenant, run).await? {
        return Err(ApiError::NotFound("run not found"));
    }
    let records = repo::list(&state.pool, tenant, run, repo::Content::Without).await?;
    Ok(pb::ListArtifactsResponse {
        entries: records.iter().map(entry_to_proto).collect(),
    })
}

/// GetArtifact: the entry, then its content; a symlink is its entry alone.
pub async fn get(
    state: &AppState,
    tenant: TenantId,
    req: pb::GetArtifactRequest,
) -> ApiResult<ChunkStream> {
    let run = parse_run_id("run_id", &req.run_id)?;
    artifact_paths::validate_artifact_path(&req.path).map_err(|e| path_error("path", &e))?;
    if !runs::exists(&state.pool, tenant, run).await? {
        return Err(ApiError::NotFound("run not found"));
    }
    let record = repo::get(&state.pool, tenant, run, &req.path)
        .await?
        .ok_or(ApiError::NotFound("artifact not found"))?;
    Ok(stream_records(state, vec![record]))
}

/// DownloadInputs: the committed artifacts of the run named by the leased run's
/// `inputs_from_run`, checked against the leased run's tenant.
pub async fn download_inputs(
    state: &AppState,
    req: pb::DownloadInputsRequest,
) -> ApiResult<ChunkStream> {
    let (agent, run) = leased_run(state, &req.agent_id, &req.run_id, req.lease_epoch).await?;
    let Some(src) = run.spec.inputs_from_run else {
        return Err(ApiError::Precondition(
            "the run's spec names no inputs_from_run".into(),
        ));
    };
    let src = RunId(src);
    let source = runs::get(&state.pool, run.tenant_id, src)
        .await?
        .ok_or(ApiError::NotFound(
            "inputs_from_run: no such run in this tenant",
        ))?;
    if !source.state.is_terminal() {
        return Err(ApiError::Precondition(format!(
            "inputs_from_run {src} has not ended (it is {})",
            source.state
        )));
    }
    let records = repo::list(&state.pool, run.tenant_id, src, repo::Content::With).await?;
    tracing::info!(run_id = %run.id, agent_id = %agent, source = %src, files = records.len(), "serving inputs from an earlier run");
    Ok(stream_records(state, records))
}

/// Deletes, every `gc_interval_secs`, the uploads that can never be committed: their run
/// ended with another (or no) upload, their lease was fenced or handed on, or they are older
/// than `staged_ttl_secs`. Files go first, then the rows, in one transaction holding the row
/// locks, so a concurrent completion report either commits first (and the upload is no
/// longer garbage) or finds no upload and is refused.
pub async fn collect_garbage(state: AppState, cancel: CancellationToken) {
    let every = Duration::from_secs(state.settings.artifacts.gc_interval_secs.max(1));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match collect_once(&state).await {
            Ok(0) => {}
            Ok(n) => tracing::info!(
                uploads = n,
                "collected artifact uploads that can never be committed"
            ),
            Err(e) => {
                tracing::warn!(error = %e, "artifact garbage collection failed; retrying next round")
            }
        }
    }
}

/// One round of [`collect_garbage`]; how many uploads it deleted.
pub async fn collect_once(state: &AppState) -> ApiResult<usize> {
    let ttl = state.settings.artifacts.staged_ttl_secs;
    let mut tx = state
        .pool
        .begin()
        .await
        .map_err(drover_core::CoreError::from)?;
    let stale = repo::lock_stale_uploads(&mut tx, ttl, 100).await?;
    let mut gone = Vec::with_capacity(stale.len());
    for id in stale {
        match state.artifacts.delete(id).await {
            Ok(()) => gone.push(id),
            Err(e) => {
                tracing::warn!(upload_id = %id, error = %e, "could not delete a stale upload")
            }
        }
    }
    repo::delete_uploads(&mut tx, &gone).await?;
    tx.commit().await.map_err(drover_core::CoreError::from)?;
    Ok(gone.len())
}
