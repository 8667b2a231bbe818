//! Per-attempt workspaces: one host directory per lease,
//! `<workspace_root>/<agent_id>/drover-<run>-<attempt>-<epoch>`, named like the execution so a
//! restarted agent finds it again. Before start the agent writes the spec's inline inputs and
//! `.drover/request.json` into it. After exit it makes `.drover/result.json` in memory and
//! sends it with the artifacts; the file is written into the directory only when workspaces
//! are kept. The directory is removed only once the completion report is settled (with the
//! execution, in the agent's `settle` module), unless the `keep_workspaces` setting asks to
//! keep it (tests, debugging).
//!
//! A mock run given nothing to put there (no inputs, no `inputs_from_run`) gets no directory
//! at all ([`Workspaces::needs_directory`]): its `request.json` is made in memory too, and a
//! directory appears only if the simulation writes files or output. On the build machine's
//! journal-less ext4, each new inode scans the group's recently deleted ones, and the five a
//! no-op mock run created (the directory, `.drover/`, both records, the mock's own record)
//! were a third of the agent's CPU, which scale tests of the control plane should not pay.
//!
//! Safety: `.drover/` stays owned by the agent and is not handed to the sandbox user; before
//! writing `result.json` the agent replaces whatever the run left at `.drover` or
//! `.drover/result.json` (a symlink planted by the run is removed, never followed), and the
//! file is created with `create_new` so no link is followed. Whatever the run left at that
//! path is never sent: the record made in memory takes its place in the artifacts. Scans
//! never follow symlinks: a symlink counts as a file whose content is its target text.
//!
//! `request.json` lists env names as `"present"`, never values (they may become secrets), and
//! each input with its size, mode and sha256; `result.json` compares the workspace after the
//! run with those hashes to list created, modified and deleted files.

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, Read, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};

use chrono::{DateTime, Utc};
use drover_core::ids::AgentId;
use drover_core::inputs::DROVER_DIR;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::executor::Job;
use crate::secret_env::Origin;

pub const REQUEST_FILE: &str = "request.json";
pub const RESULT_FILE: &str = "result.json";

/// Why a workspace could not be prepared or its result written.
#[derive(Debug, thiserror::Error)]
pub enum WorkspaceError {
    #[error("{what} {path}: {source}")]
    Io {
        what: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("workspace task failed: {0}")]
    Task(String),
}

fn io_err<'a>(what: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> WorkspaceError + 'a {
    move |source| WorkspaceError::Io {
        what,
        path: path.to_owned(),
        source,
    }
}

/// This agent's workspaces under one root.
#[derive(Debug, Clone)]
pub struct Workspaces {
    /// `<workspace_root>/<agent_id>`: agents sharing a host never share a directory.
    agent_root: PathBuf,
    keep: bool,
}

/// One input as `request.json` records it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct InputEntry {
    pub path: String,
    pub size: u64,
    pub mode: u32,
    pub sha256: String,
}

/// `.drover/request.json`: the spec as the run sees it, without env values.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RequestFile {
    pub run_id: String,
    pub attempt: u32,
    pub lease_epoch: i64,
    pub executor: String,
    pub image: String,
    pub command: Vec<String>,
    /// Name → `"present"`.
    pub env: BTreeMap<String, String>,
    /// Tenant secret name → `"present"` / `"absent"`; never a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub secrets: BTreeMap<String, String>,
    /// Host pass-through name → `"present"` / `"absent"`; never a value.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub host_env: BTreeMap<String, String>,
    pub network: String,
    pub writable_rootfs: bool,
    pub image_pull_policy: String,
    pub timeout_secs: u32,
    pub cpus: f64,
    pub memory_bytes: u64,
    pub pids: u32,
    pub inputs: Vec<InputEntry>,
}

/// `.drover/result.json`, the same shape for every executor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ResultFile {
    /// `success` (exited 0) or `error`.
    pub status: String,
    pub exit_code: Option<i32>,
    /// The run's reason in words (e.g. "exited with code 3").
    pub summary: String,
    pub errors: Vec<String>,
    /// Files present after the run that were not inputs (paths relative to the workspace,
    /// sorted; `.drover/` is left out).
    pub created_files: Vec<String>,
    /// Inputs whose content changed.
    pub modified_files: Vec<String>,
    /// Inputs that are gone.
    pub deleted_files: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub duration_ms: u64,
    pub executor: String,
}

/// A `.drover/` record made in memory: its path in the artifacts and its bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub path: String,
    pub content: Vec<u8>,
}

/// What the agent knows about the end of an attempt, for [`Workspaces::write_result`].
#[derive(Debug, Clone)]
pub struct Ended {
    pub success: bool,
    pub exit_code: Option<i32>,
    pub summary: String,
    pub started_at: DateTime<Utc>,
    pub finished_at: DateTime<Utc>,
    pub executor: String,
}

impl Workspaces {
    pub fn new(root: &Path, agent: &AgentId, keep: bool) -> Self {
        Self {
            agent_root: root.join(agent.to_string()),
            keep,
        }
    }

    /// `<workspace_root>/<agent_id>`.
    pub fn agent_root(&self) -> &Path {
        &self.agent_root
    }

    /// The workspace of the execution named `name` ([`crate::executor::execution_name`]).
    pub fn dir(&self, name: &str) -> PathBuf {
        self.agent_root.join(name)
    }

    /// Whether the job's execution needs its directory before it starts: every executor but
    /// the mock runs a program in it, and a mock needs one only for its inputs (or when
    /// workspaces are kept, to be looked at). Decided from the job alone, so the start and
    /// the end agree.
    pub fn needs_directory(&self, job: &Job, executor: &str) -> bool {
        self.keep
            || executor != crate::mock::MOCK_EXECUTOR
            || !job.spec.inputs.is_empty()
            || job.spec.inputs_from_run.is_some()
    }

    /// `.drover/request.json` of a job with no directory ([`Workspaces::needs_directory`]):
    /// the same record, made in memory, with no inputs.
    pub fn request_record(job: &Job, executor: &str) -> Result<Record, WorkspaceError> {
        let path = format!("{DROVER_DIR}/{REQUEST_FILE}");
        let content = serde_json::to_vec_pretty(&request_of(job, executor, Vec::new()))
            .map_err(|e| io_err("encoding", Path::new(&path))(io::Error::other(e)))?;
        Ok(Record { path, content })
    }

    /// Creates the job's workspace afresh (a leftover of a start that never happened is
    /// replaced), writes the inputs and `.drover/request.json`.
    pub async fn prepare(&self, job: &Job, executor: &str) -> Result<(), WorkspaceError> {
        self.create(job).await?;
        self.write_inputs(job, executor).await
    }

    /// Creates the job's workspace afresh and empty (with `.drover/`), e.g. to seed it from an
    /// earlier run before [`Workspaces::write_inputs`].
    pub async fn create(&self, job: &Job) -> Result<(), WorkspaceError> {
        let dir = job.workspace.clone();
        blocking(move || create_blocking(&dir)).await
    }

    /// Writes the spec's inline inputs (over any seeded file of the same path) and
    /// `.drover/request.json`, whose inputs are every file then in the workspace: seeded and
    /// inline alike, so `result.json` compares the run's work with all it was given.
    pub async fn write_inputs(&self, job: &Job, executor: &str) -> Result<(), WorkspaceError> {
        let job = job.clone();
        let executor = executor.to_owned();
        blocking(move || prepare_blocking(&job, &executor)).await
    }

    /// `<workspace>/.drover/logs`: where the agent keeps the run's complete (redacted) stdout
    /// and stderr while it runs, to upload as artifacts. The directory is the agent's (see the
    /// module doc), so a run cannot plant links there.
    pub fn logs_dir(job: &Job) -> PathBuf {
        job.workspace.join(DROVER_DIR).join("logs")
    }

    /// Makes `.drover/result.json` after the run, comparing the workspace (none counts as
    /// empty) with the inputs recorded in `request.json`; writes it into the workspace too
    /// when workspaces are kept. Returns the result and the record to send.
    pub async fn write_result(
        &self,
        dir: PathBuf,
        ended: Ended,
    ) -> Result<(ResultFile, Record), WorkspaceError> {
        let keep = self.keep;
        blocking(move || write_result_blocking(&dir, ended, keep)).await
    }

    /// Removes the workspace of execution `name` (unless workspaces are kept). Failures are
    /// logged: a leftover directory costs disk, nothing else.
    pub async fn remove(&self, name: &str) {
        if self.keep {
            return;
        }
        let dir = self.dir(name);
        let result = blocking(move || match std::fs::remove_dir_all(&dir) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(io_err("removing", &dir)(e)),
        })
        .await;
        if let Err(e) = result {
            tracing::warn!(error = %e, "could not remove the workspace");
        }
    }
}

impl Workspaces {
    /// Removes every workspace under this agent's root whose execution is not in `live`
    /// (leftovers of a start that never happened, or of a removal that failed). Called at
    /// start-up after the executors listed what they still hold. Returns how many went.
    pub async fn sweep(&self, live: BTreeSet<String>) -> usize {
        if self.keep {
            return 0;
        }
        let root = self.agent_root.clone();
        let swept = blocking(move || {
            let entries = match std::fs::read_dir(&root) {
                Ok(e) => e,
                Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
                Err(e) => return Err(io_err("listing", &root)(e)),
            };
            let mut swept = 0;
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                let is_dir = entry.file_type().map(|t| t.is_dir()).unwrap_or(false);
                if is_dir && name.starts_with("drover-") && !live.contains(&name) {
                    match std::fs::remove_dir_all(entry.path()) {
                        Ok(()) => swept += 1,
                        Err(e) => tracing::warn!(error = %e, workspace = %name, "could not remove a leftover workspace"),
                    }
                }
            }
            Ok(swept)
        })
        .await;
        swept.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "could not sweep leftover workspaces");
            0
        })
    }
}

async fn blocking<T: Send + 'static>(
    f: impl FnOnce() -> Result<T, WorkspaceError> + Send + 'static,
) -> Result<T, WorkspaceError> {
    tokio::task::spawn_blocking(f)
        .await
        .map_err(|e| WorkspaceError::Task(e.to_string()))?
}

fn create_blocking(dir: &Path) -> Result<(), WorkspaceError> {
    match std::fs::remove_dir_all(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io_err("clearing", dir)(e)),
    }
    std::fs::create_dir_all(dir).map_err(io_err("creating", dir))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .map_err(io_err("setting the mode of", dir))?;
    let drover = dir.join(DROVER_DIR);
    std::fs::create_dir(&drover).map_err(io_err("creating", &drover))
}

fn prepare_blocking(job: &Job, executor: &str) -> Result<(), WorkspaceError> {
    let dir = &job.workspace;
    let drover = dir.join(DROVER_DIR);
    let spec = &job.spec;
    for input in &spec.inputs {
        // Paths were validated (relative, normalised, no `..`) with the spec. A seeded file
        // of the same path is replaced (a seeded symlink is removed, never followed); a
        // seeded directory there is an error.
        let path = dir.join(&input.path);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent).map_err(io_err("creating", parent))?;
        }
        if std::fs::symlink_metadata(&path).is_ok_and(|m| !m.is_dir()) {
            std::fs::remove_file(&path).map_err(io_err("replacing", &path))?;
        }
        write_new(&path, &input.content, input.mode)?;
    }
    let mut inputs = Vec::new();
    for (path, sha256) in scan(dir)? {
        let meta = std::fs::symlink_metadata(dir.join(&path))
            .map_err(io_err("reading", &dir.join(&path)))?;
        inputs.push(InputEntry {
            path,
            size: meta.len(),
            mode: meta.permissions().mode() & 0o777,
            sha256,
        });
    }
    write_json(
        &drover.join(REQUEST_FILE),
        &request_of(job, executor, inputs),
    )
}

/// `request.json` of `job` with `inputs` (what the workspace held before the start).
fn request_of(job: &Job, executor: &str, inputs: Vec<InputEntry>) -> RequestFile {
    let spec = &job.spec;
    RequestFile {
        run_id: job.run_id.to_string(),
        attempt: job.attempt,
        lease_epoch: job.lease_epoch.0,
        executor: executor.to_owned(),
        image: spec.image.clone(),
        command: spec.command.clone(),
        env: spec
            .env
            .keys()
            .map(|k| (k.clone(), "present".to_owned()))
            .collect(),
        secrets: job.secret_env.presence_of(Origin::Secret),
        host_env: job.secret_env.presence_of(Origin::Host),
        network: spec.network.as_str().to_owned(),
        writable_rootfs: spec.writable_rootfs,
        image_pull_policy: spec.image_pull_policy.as_str().to_owned(),
        timeout_secs: spec.timeout_secs,
        cpus: spec.resources.cpus,
        memory_bytes: spec.resources.memory_bytes,
        pids: spec.resources.pids,
        inputs,
    }
}

/// Creates `path` (never following or replacing anything there) with `content` and `mode`.
fn write_new(path: &Path, content: &[u8], mode: u32) -> Result<(), WorkspaceError> {
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(mode)
        .open(path)
        .map_err(io_err("creating", path))?;
    file.write_all(content).map_err(io_err("writing", path))?;
    // The process umask may have narrowed the mode at create.
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .map_err(io_err("setting the mode of", path))
}

fn write_json<T: Serialize>(path: &Path, value: &T) -> Result<(), WorkspaceError> {
    let json = serde_json::to_vec_pretty(value)
        .map_err(|e| io_err("encoding", path)(io::Error::other(e)))?;
    write_new(path, &json, 0o644)
}

fn write_result_blocking(
    dir: &Path,
    ended: Ended,
    keep: bool,
) -> Result<(ResultFile, Record), WorkspaceError> {
    let drover = dir.join(DROVER_DIR);
    let inputs = read_inputs(&drover.join(REQUEST_FILE));
    let after = match std::fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => BTreeMap::new(),
        _ => scan(dir)?,
    };

    let mut created = Vec::new();
    let mut modified = Vec::new();
    for (path, hash) in &after {
        match inputs.get(path) {
            None => created.push(path.clone()),
            Some(before) if before != hash => modified.push(path.clone()),
            Some(_) => {}
        }
    }
    let deleted: Vec<String> = inputs
        .keys()
        .filter(|p| !after.contains_key(*p))
        .cloned()
        .collect();
    let duration_ms = (ended.finished_at - ended.started_at)
        .to_std()
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0);
    let result = ResultFile {
        status: if ended.success { "success" } else { "error" }.to_owned(),
        exit_code: ended.exit_code,
        errors: if ended.success {
            Vec::new()
        } else {
            vec![ended.summary.clone()]
        },
        summary: ended.summary,
        created_files: created,
        modified_files: modified,
        deleted_files: deleted,
        started_at: ended.started_at,
        finished_at: ended.finished_at,
        duration_ms,
        executor: ended.executor,
    };
    let path = drover.join(RESULT_FILE);
    let record = Record {
        path: format!("{DROVER_DIR}/{RESULT_FILE}"),
        content: serde_json::to_vec_pretty(&result)
            .map_err(|e| io_err("encoding", &path)(io::Error::other(e)))?,
    };
    if !keep {
        return Ok((result, record));
    }

    // Whatever the run left at `.drover` (a symlink, a file) is replaced, never followed.
    let is_dir = std::fs::symlink_metadata(&drover)
        .map(|m| m.file_type().is_dir())
        .unwrap_or(false);
    if !is_dir {
        let _ = std::fs::remove_file(&drover);
        let _ = std::fs::remove_dir_all(&drover);
        std::fs::create_dir(&drover).map_err(io_err("creating", &drover))?;
    }
    match std::fs::symlink_metadata(&path) {
        Ok(m) if m.is_dir() => {
            std::fs::remove_dir_all(&path).map_err(io_err("replacing", &path))?
        }
        Ok(_) => std::fs::remove_file(&path).map_err(io_err("replacing", &path))?,
        Err(_) => {}
    }
    write_new(&path, &record.content, 0o644)?;
    Ok((result, record))
}

/// Input path → sha256 as `request.json` recorded them; empty if it cannot be read (then
/// every file counts as created).
fn read_inputs(request: &Path) -> BTreeMap<String, String> {
    #[derive(Deserialize)]
    struct Inputs {
        inputs: Vec<InputEntry>,
    }
    let Ok(text) = std::fs::read(request) else {
        return BTreeMap::new();
    };
    serde_json::from_slice::<Inputs>(&text)
        .map(|r| r.inputs.into_iter().map(|i| (i.path, i.sha256)).collect())
        .unwrap_or_default()
}

/// Every file under `dir` but `.drover/`, relative path → sha256, without following symlinks.
pub fn scan(dir: &Path) -> Result<BTreeMap<String, String>, WorkspaceError> {
    let mut out = BTreeMap::new();
    let mut stack = vec![(dir.to_owned(), String::new())];
    while let Some((abs, rel)) = stack.pop() {
        let entries = std::fs::read_dir(&abs).map_err(io_err("listing", &abs))?;
        let mut names = BTreeSet::new();
        for entry in entries {
            let entry = entry.map_err(io_err("listing", &abs))?;
            names.insert(entry.file_name());
        }
        for name in names {
            let name_text = name.to_string_lossy().into_owned();
            let rel_path = if rel.is_empty() {
                name_text
            } else {
                format!("{rel}/{name_text}")
            };
            if rel_path == DROVER_DIR {
                continue;
            }
            let path = abs.join(&name);
            let meta = std::fs::symlink_metadata(&path).map_err(io_err("reading", &path))?;
            let kind = meta.file_type();
            if kind.is_dir() {
                stack.push((path, rel_path));
            } else if kind.is_symlink() {
                let target = std::fs::read_link(&path).map_err(io_err("reading", &path))?;
                let mut h = Sha256::new();
                h.update(b"symlink:");
                h.update(target.as_os_str().as_encoded_bytes());
                out.insert(rel_path, hex::encode(h.finalize()));
            } else if kind.is_file() {
                out.insert(rel_path, hash_file(&path)?);
            }
            // Sockets, fifos and devices are not files a run hands back.
        }
    }
    Ok(out)
}

fn hash_file(path: &Path) -> Result<String, WorkspaceError> {
    let mut file = std::fs::File::open(path).map_err(io_err("opening", path))?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        let n = file.read(&mut buf).map_err(io_err("reading", path))?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex::encode(h.finalize()))
}

/// Hands the workspace (not `.drover/`) to `uid:gid` so a sandbox running as that user can
/// write it. Needs root; without it the directories are made world-writable instead.
pub async fn give_to(dir: PathBuf, uid: u32, gid: u32) -> Result<(), WorkspaceError> {
    blocking(move || {
        std::fs::create_dir_all(&dir).map_err(io_err("creating", &dir))?;
        let mut stack = vec![dir.clone()];
        let mut chown_ok = true;
        while let Some(d) = stack.pop() {
            if chown_ok && let Err(e) = std::os::unix::fs::lchown(&d, Some(uid), Some(gid)) {
                if e.kind() != io::ErrorKind::PermissionDenied {
                    return Err(io_err("changing the owner of", &d)(e));
                }
                chown_ok = false;
            }
            if !chown_ok {
                std::fs::set_permissions(&d, std::fs::Permissions::from_mode(0o777))
                    .map_err(io_err("setting the mode of", &d))?;
            }
            for entry in std::fs::read_dir(&d).map_err(io_err("listing", &d))? {
                let entry = entry.map_err(io_err("listing", &d))?;
                let path = entry.path();
                if d == dir && entry.file_name() == DROVER_DIR {
                    continue;
                }
                let kind = entry.file_type().map_err(io_err("reading", &path))?;
                if kind.is_dir() {
                    stack.push(path);
                } else if chown_ok {
                    std::os::unix::fs::lchown(&path, Some(uid), Some(gid))
                        .map_err(io_err("changing the owner of", &path))?;
                } else if kind.is_file() {
                    let mode = entry.metadata().map_err(io_err("reading", &path))?.mode();
                    std::fs::set_permissions(&path, std::fs::Permissions::from_mode(mode | 0o666))
                        .map_err(io_err("setting the mode of", &path))?;
                }
            }
        }
        Ok(())
    })
    .await
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::ids::{LeaseEpoch, RunId};
    use drover_core::inputs::InputFile;
    use drover_core::spec::RawSpec;

    fn job(root: &Path) -> Job {
        let spec = RawSpec {
            image: "img".into(),
            command: vec!["true".into()],
            env: vec![("TOKEN".into(), "s3cret-value".into())],
            inputs: vec![
                InputFile {
                    path: "app.py".into(),
                    content: b"print(1)\n".to_vec(),
                    mode: 0o755,
                },
                InputFile {
                    path: "docs/README.md".into(),
                    content: b"# hi\n".to_vec(),
                    mode: 0,
                },
                InputFile {
                    path: "gone.txt".into(),
                    content: b"x".to_vec(),
                    mode: 0,
                },
            ],
            ..Default::default()
        }
        .validate()
        .unwrap();
        let agent = AgentId::parse("a1").unwrap();
        let ws = Workspaces::new(root, &agent, false);
        let (run_id, attempt, epoch) = (RunId::new(), 1, LeaseEpoch(3));
        Job {
            secret_env: Default::default(),
            run_id,
            attempt,
            lease_epoch: epoch,
            tenant_id: "t".into(),
            agent_id: agent,
            spec,
            workspace: ws.dir(&crate::executor::execution_name(run_id, attempt, epoch)),
        }
    }

    #[tokio::test]
    async fn inputs_request_and_result_round_trip() {
        let tmp = tempfile::tempdir().unwrap();
        let job = job(tmp.path());
        let ws = Workspaces::new(tmp.path(), &job.agent_id, false);
        ws.prepare(&job, "process").await.unwrap();
        let dir = &job.workspace;
        assert_eq!(std::fs::read(dir.join("app.py")).unwrap(), b"print(1)\n");
        let mode = std::fs::metadata(dir.join("app.py")).unwrap().mode() & 0o777;
        assert_eq!(mode, 0o755);
        let request = std::fs::read_to_string(dir.join(".drover/request.json")).unwrap();
        assert!(!request.contains("s3cret-value"), "{request}");
        let request: RequestFile = serde_json::from_str(&request).unwrap();
        assert_eq!(request.env["TOKEN"], "present");
        assert_eq!(request.inputs.len(), 3);
        assert_eq!(request.executor, "process");

        // The "run": modify one input, delete one, create two files.
        std::fs::write(dir.join("app.py"), b"print(2)\n").unwrap();
        std::fs::remove_file(dir.join("gone.txt")).unwrap();
        std::fs::create_dir(dir.join("out")).unwrap();
        std::fs::write(dir.join("out/new.txt"), b"new").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("link")).unwrap();

        let now = Utc::now();
        let ended = Ended {
            success: false,
            exit_code: Some(3),
            summary: "exited with code 3".into(),
            started_at: now - chrono::Duration::milliseconds(1500),
            finished_at: now,
            executor: "process".into(),
        };
        let (result, record) = ws.write_result(dir.clone(), ended).await.unwrap();
        assert_eq!(result.status, "error");
        assert_eq!(result.errors, vec!["exited with code 3".to_owned()]);
        assert_eq!(result.created_files, vec!["link", "out/new.txt"]);
        assert_eq!(result.modified_files, vec!["app.py"]);
        assert_eq!(result.deleted_files, vec!["gone.txt"]);
        assert_eq!(result.duration_ms, 1500);
        // Made in memory, sent with the artifacts; not written where workspaces go.
        assert_eq!(record.path, ".drover/result.json");
        let sent: ResultFile = serde_json::from_slice(&record.content).unwrap();
        assert_eq!(sent, result);
        assert!(!dir.join(".drover/result.json").exists());

        ws.remove(&job.name()).await;
        assert!(!dir.exists());
    }

    fn mock_exited_0() -> Ended {
        Ended {
            success: true,
            exit_code: Some(0),
            summary: "exited with code 0".into(),
            started_at: Utc::now(),
            finished_at: Utc::now(),
            executor: "mock".into(),
        }
    }

    #[tokio::test]
    async fn a_planted_result_symlink_is_replaced_not_followed() {
        let tmp = tempfile::tempdir().unwrap();
        let job = job(tmp.path());
        let ws = Workspaces::new(tmp.path(), &job.agent_id, true);
        ws.prepare(&job, "mock").await.unwrap();
        let victim = tmp.path().join("victim");
        std::fs::write(&victim, b"keep me").unwrap();
        std::os::unix::fs::symlink(&victim, job.workspace.join(".drover/result.json")).unwrap();
        let ended = mock_exited_0();
        let (_, record) = ws.write_result(job.workspace.clone(), ended).await.unwrap();
        assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
        let at = job.workspace.join(".drover/result.json");
        assert!(std::fs::symlink_metadata(&at).unwrap().is_file());
        // Kept workspaces get the file, the same bytes as the record sent.
        assert_eq!(std::fs::read(&at).unwrap(), record.content);
        ws.remove(&job.name()).await;
        assert!(job.workspace.exists(), "kept workspaces stay");
    }

    #[tokio::test]
    async fn a_mock_run_without_inputs_gets_no_directory_and_its_records_from_memory() {
        let tmp = tempfile::tempdir().unwrap();
        let mut job = job(tmp.path());
        let ws = Workspaces::new(tmp.path(), &job.agent_id, false);
        assert!(ws.needs_directory(&job, "mock"), "it has inputs");
        job.spec.inputs.clear();
        assert!(!ws.needs_directory(&job, "mock"));
        assert!(ws.needs_directory(&job, "process"));
        assert!(ws.needs_directory(&job, "docker"));
        job.spec.inputs_from_run = Some(uuid::Uuid::now_v7());
        assert!(ws.needs_directory(&job, "mock"), "it is seeded");
        job.spec.inputs_from_run = None;
        let kept = Workspaces::new(tmp.path(), &job.agent_id, true);
        assert!(kept.needs_directory(&job, "mock"), "kept to be looked at");

        // The request record is the one a directory would have held, with no inputs.
        let request = Workspaces::request_record(&job, "mock").unwrap();
        assert_eq!(request.path, ".drover/request.json");
        let parsed: RequestFile = serde_json::from_slice(&request.content).unwrap();
        assert_eq!(parsed.executor, "mock");
        assert_eq!(parsed.env["TOKEN"], "present");
        assert!(parsed.inputs.is_empty());
        assert!(!String::from_utf8_lossy(&request.content).contains("s3cret-value"));

        // No directory is an empty one: nothing created, and nothing written.
        let ended = mock_exited_0();
        let (result, record) = ws.write_result(job.workspace.clone(), ended).await.unwrap();
        assert_eq!(result.status, "success");
        assert!(result.created_files.is_empty() && result.deleted_files.is_empty());
        assert!(!record.content.is_empty());
        assert!(!job.workspace.exists());
    }

    #[tokio::test]
    async fn the_sweep_keeps_live_workspaces_only() {
        let tmp = tempfile::tempdir().unwrap();
        let live = job(tmp.path());
        let leftover = job(tmp.path());
        let ws = Workspaces::new(tmp.path(), &live.agent_id, false);
        ws.prepare(&live, "process").await.unwrap();
        ws.prepare(&leftover, "process").await.unwrap();
        let state_file = ws
            .agent_root()
            .join(format!("{}.process.json", live.name()));
        std::fs::write(&state_file, b"{}").unwrap();
        assert_eq!(ws.sweep(BTreeSet::from([live.name()])).await, 1);
        assert!(live.workspace.exists());
        assert!(!leftover.workspace.exists());
        assert!(state_file.exists(), "only workspace directories are swept");
    }
}
