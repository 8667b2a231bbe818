//! Moving a workspace's files to and from the API: after the process exits, the files it left
//! (filtered by the spec's `outputs` globs) go inline in the completion report when they are
//! small ([`Collected::into_inline`]), else are streamed through `UploadArtifacts`; before it
//! starts, `inputs_from_run` seeds the workspace through `DownloadInputs`.
//!
//! Both directions distrust what they handle. Uploading never follows a symlink the run made
//! (it is sent as a symlink entry), and skips names the API would refuse, saying so in the
//! log. Seeding writes only below the workspace root: a path that would pass through a
//! symlink, and symlinks whose target leaves the workspace, are refused. Every file's size
//! and sha256 are checked on both sides.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use drover_core::artifact_paths::{
    glob_matches, symlink_escapes, validate_artifact_path, validate_link_target,
};
use drover_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// Upload chunk size; the API accepts at most 1 MiB per data message.
const CHUNK: usize = 1024 * 1024;

/// Files under this directory are always uploaded, whatever the `outputs` globs say: the
/// request/result files and the stored logs are how a client learns what happened.
const DROVER_DIR: &str = ".drover/";

#[derive(Debug, thiserror::Error)]
pub enum TransferError {
    #[error("workspace i/o at {path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("input {path:?} refused: {why}")]
    UnsafeInput { path: String, why: String },
    #[error("input {path:?} does not match its sha256 or size")]
    Corrupt { path: String },
    #[error("the input stream broke its framing: {0}")]
    Framing(&'static str),
    #[error(transparent)]
    Api(#[from] crate::api::ApiError),
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> TransferError + '_ {
    move |source| TransferError::Io {
        path: path.to_owned(),
        source,
    }
}

/// One file (or symlink) to upload: where it is on this host and what the API is told.
#[derive(Debug, Clone)]
pub struct Outgoing {
    pub source: PathBuf,
    pub entry: pb::ArtifactEntry,
    /// The content as it was hashed, kept while the walk's inline budget lasted.
    pub content: Option<Vec<u8>>,
}

/// What [`collect`] found.
#[derive(Debug, Default)]
pub struct Collected {
    pub files: Vec<Outgoing>,
    /// Relative paths left out because the API would refuse their names (with why).
    pub skipped: Vec<(String, String)>,
}

impl Collected {
    /// Adds the `.drover/` records the agent made in memory, each in the place of whatever
    /// the walk found at its path (the record is the agent's word; a file there is not), in
    /// path order. Their content is kept, so they go inline or stream from memory.
    pub fn add_records(&mut self, root: &Path, records: Vec<crate::workspace::Record>) {
        for r in records {
            self.files.retain(|f| f.entry.path != r.path);
            let at = self
                .files
                .partition_point(|f| f.entry.path.as_str() < r.path.as_str());
            let entry = pb::ArtifactEntry {
                path: r.path.clone(),
                size: r.content.len() as u64,
                sha256: hex::encode(Sha256::digest(&r.content)),
                mode: 0o644,
                ..Default::default()
            };
            self.files.insert(
                at,
                Outgoing {
                    source: root.join(&r.path),
                    entry,
                    content: Some(r.content),
                },
            );
        }
    }

    /// The files as inline artifacts of the completion report, when every regular file's
    /// content was kept (all of them fit the inline budget); else the collection back, to
    /// upload. The content sent is the content hashed, so a file changed since cannot
    /// mismatch.
    pub fn into_inline(self) -> Result<Vec<pb::InlineArtifact>, Collected> {
        if self
            .files
            .iter()
            .any(|f| f.content.is_none() && !f.entry.is_symlink)
        {
            return Err(self);
        }
        Ok(self
            .files
            .into_iter()
            .map(|f| pb::InlineArtifact {
                entry: Some(f.entry),
                content: f.content.unwrap_or_default(),
            })
            .collect())
    }
}

/// Walks `root` without following symlinks and returns the files to upload, sorted by path:
/// those matching any of `outputs` (all when empty), plus everything under `.drover/`.
/// Regular files are kept in memory as they are hashed until `inline_budget` bytes are used.
/// No `root` at all is an empty collection (a mock run that wrote nothing has none).
pub async fn collect(
    root: &Path,
    outputs: &[String],
    inline_budget: u64,
) -> Result<Collected, TransferError> {
    let root = root.to_owned();
    let outputs = outputs.to_vec();
    let walked = tokio::task::spawn_blocking(move || walk(&root, &outputs, inline_budget))
        .await
        .map_err(|e| TransferError::Io {
            path: PathBuf::new(),
            source: std::io::Error::other(e),
        })??;
    Ok(walked)
}

fn walk(root: &Path, outputs: &[String], mut budget: u64) -> Result<Collected, TransferError> {
    if let Err(e) = std::fs::symlink_metadata(root)
        && e.kind() == std::io::ErrorKind::NotFound
    {
        return Ok(Collected::default());
    }
    let mut found: BTreeMap<String, Outgoing> = BTreeMap::new();
    let mut skipped = Vec::new();
    let mut stack = vec![root.to_owned()];
    while let Some(dir) = stack.pop() {
        let entries = std::fs::read_dir(&dir).map_err(io(&dir))?;
        for entry in entries {
            let entry = entry.map_err(io(&dir))?;
            let path = entry.path();
            let meta = std::fs::symlink_metadata(&path).map_err(io(&path))?;
            let rel = match relative(root, &path) {
                Some(r) => r,
                None => {
                    skipped.push((path.display().to_string(), "not valid UTF-8".into()));
                    continue;
                }
            };
            if meta.is_dir() {
                stack.push(path);
                continue;
            }
            let wanted = rel.starts_with(DROVER_DIR)
                || outputs.is_empty()
                || outputs.iter().any(|g| glob_matches(g, &rel));
            if !wanted {
                continue;
            }
            if let Err(e) = validate_artifact_path(&rel) {
                skipped.push((rel, e.to_string()));
                continue;
            }
            let out = if meta.file_type().is_symlink() {
                let target = std::fs::read_link(&path).map_err(io(&path))?;
                let Some(target) = target.to_str().map(str::to_owned) else {
                    skipped.push((rel, "symlink target is not valid UTF-8".into()));
                    continue;
                };
                if let Err(e) = validate_link_target(&target) {
                    skipped.push((rel, format!("symlink target: {e}")));
                    continue;
                }
                Outgoing {
                    source: path,
                    entry: pb::ArtifactEntry {
                        path: rel.clone(),
                        is_symlink: true,
                        link_target: target,
                        ..Default::default()
                    },
                    content: None,
                }
            } else if meta.is_file() {
                let out = file_entry(&path, &rel, budget)?;
                budget = match &out.content {
                    Some(c) => budget.saturating_sub(c.len() as u64),
                    // One file did not fit: the upload is streamed, keep nothing more.
                    None => 0,
                };
                out
            } else {
                skipped.push((rel, "not a regular file or symlink".into()));
                continue;
            };
            found.insert(rel, out);
        }
    }
    Ok(Collected {
        files: found.into_values().collect(),
        skipped,
    })
}

fn relative(root: &Path, path: &Path) -> Option<String> {
    let rel = path.strip_prefix(root).ok()?;
    let parts: Option<Vec<&str>> = rel.components().map(|c| c.as_os_str().to_str()).collect();
    Some(parts?.join("/"))
}

/// Hashes the file (reading it once) for its header, keeping its content if it is at most
/// `keep_up_to` bytes.
fn file_entry(source: &Path, rel: &str, keep_up_to: u64) -> Result<Outgoing, TransferError> {
    use std::io::Read;
    use std::os::unix::fs::PermissionsExt;
    let mut f = std::fs::File::open(source).map_err(io(source))?;
    let meta = f.metadata().map_err(io(source))?;
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    let content = if meta.len() <= keep_up_to {
        let mut all = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
        f.read_to_end(&mut all).map_err(io(source))?;
        hasher.update(&all);
        size = all.len() as u64;
        // It grew past the budget while being read: stream it instead.
        (size <= keep_up_to).then_some(all)
    } else {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let n = f.read(&mut buf).map_err(io(source))?;
            if n == 0 {
                break;
            }
            size += n as u64;
            hasher.update(&buf[..n]);
        }
        None
    };
    Ok(Outgoing {
        source: source.to_owned(),
        entry: pb::ArtifactEntry {
            path: rel.to_owned(),
            size,
            sha256: hex::encode(hasher.finalize()),
            mode: meta.permissions().mode() & 0o777,
            ..Default::default()
        },
        content,
    })
}

/// The upload as a stream of requests: the start, then per file its header and its data.
/// Files are read in chunks as the stream is polled, so memory stays at one chunk whatever
/// the workspace holds. A file that changed size since [`collect`] ends the stream early,
/// which the API treats as a failed upload.
pub fn upload_stream(
    start: pb::UploadStart,
    files: Vec<Outgoing>,
) -> impl futures::Stream<Item = pb::UploadArtifactsRequest> + Send + 'static {
    use pb::upload_artifacts_request::Item;
    let (tx, rx) = tokio::sync::mpsc::channel::<pb::UploadArtifactsRequest>(2);
    tokio::spawn(async move {
        let send = |item| pb::UploadArtifactsRequest { item: Some(item) };
        if tx.send(send(Item::Start(start))).await.is_err() {
            return;
        }
        for file in files {
            let is_symlink = file.entry.is_symlink;
            let size = file.entry.size;
            if tx.send(send(Item::File(file.entry))).await.is_err() {
                return;
            }
            if is_symlink {
                continue;
            }
            // Kept at the walk (or made in memory): sent as hashed, without reading again.
            if let Some(content) = file.content {
                for piece in content.chunks(CHUNK) {
                    if tx.send(send(Item::Data(piece.to_vec()))).await.is_err() {
                        return;
                    }
                }
                continue;
            }
            let Ok(mut f) = tokio::fs::File::open(&file.source).await else {
                tracing::warn!(path = %file.source.display(), "artifact vanished before upload");
                return;
            };
            let mut left = size;
            while left > 0 {
                let want = usize::try_from(left.min(CHUNK as u64)).unwrap_or(CHUNK);
                let mut buf = vec![0u8; want];
                if f.read_exact(&mut buf).await.is_err() {
                    tracing::warn!(path = %file.source.display(), "artifact shrank during upload");
                    return;
                }
                left -= want as u64;
                if tx.send(send(Item::Data(buf))).await.is_err() {
                    return;
                }
            }
        }
    });
    tokio_stream::wrappers::ReceiverStream::new(rx)
}

/// Writes the `DownloadInputs` stream below `root`; returns the paths written. Entries under
/// `.drover/` (the earlier run's request, result and logs) are skipped: they describe that
/// run, and this run's `.drover/` is the agent's.
pub async fn seed(
    root: &Path,
    mut stream: tonic::Streaming<pb::ArtifactChunk>,
) -> Result<Vec<String>, TransferError> {
    use pb::artifact_chunk::Item;
    enum Current {
        Nothing,
        Skipping,
        File(Box<Incoming>),
    }
    let mut written = Vec::new();
    let mut current = Current::Nothing;
    loop {
        let msg = stream.message().await.map_err(crate::api::ApiError::from)?;
        let Some(msg) = msg else { break };
        match msg.item {
            Some(Item::Entry(entry)) => {
                if let Current::File(done) = std::mem::replace(&mut current, Current::Nothing) {
                    written.push(done.finish().await?);
                }
                current = if entry.path.starts_with(DROVER_DIR) {
                    Current::Skipping
                } else {
                    let path = entry.path.clone();
                    match Incoming::begin(root, entry).await? {
                        Some(file) => Current::File(Box::new(file)),
                        None => {
                            // A symlink: created, or skipped because it leaves the workspace.
                            if tokio::fs::symlink_metadata(root.join(&path)).await.is_ok() {
                                written.push(path);
                            }
                            Current::Skipping
                        }
                    }
                };
            }
            Some(Item::Data(data)) => match &mut current {
                Current::File(file) => file.write(&data).await?,
                Current::Skipping => {}
                Current::Nothing => return Err(TransferError::Framing("data before any entry")),
            },
            None => return Err(TransferError::Framing("empty message")),
        }
    }
    if let Current::File(done) = current {
        written.push(done.finish().await?);
    }
    Ok(written)
}

/// A file being seeded; symlink entries are done in [`Incoming::begin`].
struct Incoming {
    path: String,
    host: PathBuf,
    file: tokio::fs::File,
    hasher: Sha256,
    size: u64,
    entry: pb::ArtifactEntry,
}

impl Incoming {
    async fn begin(root: &Path, entry: pb::ArtifactEntry) -> Result<Option<Self>, TransferError> {
        let refuse = |why: &str| TransferError::UnsafeInput {
            path: entry.path.clone(),
            why: why.to_owned(),
        };
        validate_artifact_path(&entry.path).map_err(|e| refuse(&e.to_string()))?;
        let host = root.join(&entry.path);
        // Every directory on the way must be a real directory below the root, never a
        // symlink an earlier entry created.
        let mut dir = root.to_owned();
        let segments: Vec<&str> = entry.path.split('/').collect();
        for seg in &segments[..segments.len().saturating_sub(1)] {
            dir.push(seg);
            match tokio::fs::symlink_metadata(&dir).await {
                Ok(m) if m.is_dir() => {}
                Ok(_) => return Err(refuse("a parent is not a directory (symlink?)")),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    tokio::fs::create_dir(&dir).await.map_err(io(&dir))?;
                }
                Err(e) => return Err(io(&dir)(e)),
            }
        }
        if let Ok(m) = tokio::fs::symlink_metadata(&host).await
            && !m.is_file()
        {
            return Err(refuse("exists and is not a regular file"));
        }
        if entry.is_symlink {
            if symlink_escapes(&entry.path, &entry.link_target) {
                tracing::warn!(path = %entry.path, target = %entry.link_target, "input symlink points outside the workspace; not seeded");
                return Ok(None);
            }
            let _ = tokio::fs::remove_file(&host).await;
            tokio::fs::symlink(&entry.link_target, &host)
                .await
                .map_err(io(&host))?;
            return Ok(None);
        }
        let file = tokio::fs::OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(&host)
            .await
            .map_err(io(&host))?;
        Ok(Some(Self {
            path: entry.path.clone(),
            host,
            file,
            hasher: Sha256::new(),
            size: 0,
            entry,
        }))
    }

    async fn write(&mut self, data: &[u8]) -> Result<(), TransferError> {
        self.size += data.len() as u64;
        if self.size > self.entry.size {
            return Err(TransferError::Corrupt {
                path: self.path.clone(),
            });
        }
        self.hasher.update(data);
        self.file.write_all(data).await.map_err(io(&self.host))
    }

    async fn finish(mut self) -> Result<String, TransferError> {
        use std::os::unix::fs::PermissionsExt;
        self.file.flush().await.map_err(io(&self.host))?;
        let digest = hex::encode(self.hasher.finalize());
        if self.size != self.entry.size || digest != self.entry.sha256 {
            return Err(TransferError::Corrupt { path: self.path });
        }
        let mode = if self.entry.mode == 0 {
            0o644
        } else {
            self.entry.mode & 0o777
        };
        tokio::fs::set_permissions(&self.host, std::fs::Permissions::from_mode(mode))
            .await
            .map_err(io(&self.host))?;
        Ok(self.path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn collect_walks_without_following_links_and_applies_globs() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("src/deep")).unwrap();
        std::fs::create_dir_all(root.join(".drover")).unwrap();
        std::fs::write(root.join("README.md"), "readme").unwrap();
        std::fs::write(root.join("src/app.py"), "print(1)").unwrap();
        std::fs::write(root.join("src/deep/x.txt"), "x").unwrap();
        std::fs::write(root.join(".drover/result.json"), "{}").unwrap();
        std::os::unix::fs::symlink("/etc", root.join("etc-link")).unwrap();
        std::fs::write(root.join("bad\\name"), "b").unwrap();

        let all = collect(root, &[], 0).await.unwrap();
        let all = all.into_inline().expect_err("no budget: streamed");
        let paths: Vec<&str> = all.files.iter().map(|f| f.entry.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![
                ".drover/result.json",
                "README.md",
                "etc-link",
                "src/app.py",
                "src/deep/x.txt"
            ]
        );
        let link = all.files.iter().find(|f| f.entry.is_symlink).unwrap();
        assert_eq!(link.entry.link_target, "/etc");
        assert_eq!(all.skipped.len(), 1, "{:?}", all.skipped);
        let app = all
            .files
            .iter()
            .find(|f| f.entry.path == "src/app.py")
            .unwrap();
        assert_eq!(app.entry.size, 8);
        assert_eq!(app.entry.sha256, hex::encode(Sha256::digest(b"print(1)")));

        let py = collect(root, &["**/*.py".into()], 0).await.unwrap();
        let paths: Vec<&str> = py.files.iter().map(|f| f.entry.path.as_str()).collect();
        assert_eq!(paths, vec![".drover/result.json", "src/app.py"]);
    }

    #[tokio::test]
    async fn records_take_the_place_of_files_at_their_path_and_stream_from_memory() {
        use futures::StreamExt;
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".drover")).unwrap();
        std::fs::write(root.join(".drover/result.json"), "planted").unwrap();
        std::fs::write(root.join("out.txt"), "out").unwrap();
        let record = |path: &str, content: &str| crate::workspace::Record {
            path: path.into(),
            content: content.as_bytes().to_vec(),
        };

        // No directory at all: an empty walk, and the records alone.
        let mut none = collect(&root.join("missing"), &[], 0).await.unwrap();
        assert!(none.files.is_empty());
        none.add_records(root, vec![record(".drover/result.json", "{}")]);
        assert_eq!(none.files.len(), 1);

        let mut all = collect(root, &[], 0).await.unwrap();
        all.add_records(
            root,
            vec![
                record(".drover/result.json", r#"{"status":"success"}"#),
                record(".drover/request.json", "{}"),
            ],
        );
        let paths: Vec<&str> = all.files.iter().map(|f| f.entry.path.as_str()).collect();
        assert_eq!(
            paths,
            vec![".drover/request.json", ".drover/result.json", "out.txt"],
            "in path order, the planted file replaced"
        );
        let result = &all.files[1];
        assert_eq!(result.entry.size, 20);
        assert_eq!(
            result.entry.sha256,
            hex::encode(Sha256::digest(br#"{"status":"success"}"#))
        );
        // No budget: streamed, the records from memory and out.txt from its file.
        let all = all.into_inline().expect_err("out.txt was not kept");
        let sent: Vec<pb::UploadArtifactsRequest> =
            upload_stream(pb::UploadStart::default(), all.files)
                .collect()
                .await;
        use pb::upload_artifacts_request::Item;
        let data: Vec<&[u8]> = sent
            .iter()
            .filter_map(|m| match &m.item {
                Some(Item::Data(d)) => Some(d.as_slice()),
                _ => None,
            })
            .collect();
        assert_eq!(
            data,
            vec![b"{}".as_slice(), br#"{"status":"success"}"#, b"out"]
        );
    }

    #[tokio::test]
    async fn files_within_the_budget_go_inline_with_the_content_hashed() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join(".drover")).unwrap();
        std::fs::write(root.join(".drover/result.json"), "{}").unwrap();
        std::fs::write(root.join("out.txt"), "0123456789").unwrap();
        std::os::unix::fs::symlink("out.txt", root.join("link")).unwrap();

        let fits = collect(root, &[], 12).await.unwrap();
        let inline = fits.into_inline().expect("12 bytes fit a budget of 12");
        let got: Vec<(&str, &[u8], bool)> = inline
            .iter()
            .map(|i| {
                let e = i.entry.as_ref().unwrap();
                (e.path.as_str(), i.content.as_slice(), e.is_symlink)
            })
            .collect();
        assert_eq!(
            got,
            vec![
                (".drover/result.json", b"{}".as_slice(), false),
                ("link", b"".as_slice(), true),
                ("out.txt", b"0123456789".as_slice(), false),
            ]
        );
        let out = inline[2].entry.as_ref().unwrap();
        assert_eq!(out.sha256, hex::encode(Sha256::digest(b"0123456789")));

        let over = collect(root, &[], 11).await.unwrap();
        let over = over.into_inline().expect_err("one byte over: streamed");
        assert_eq!(over.files.len(), 3, "the same files either way");
    }
}
