//! The run's complete output on this host, as it leaves the executor (already redacted):
//! `.drover/logs/stdout.log` and `stderr.log` in the workspace, uploaded with the artifacts,
//! so the whole log survives whatever the live path (PushLogs, which gives up on a batch the
//! API will not take) or Redis forgets. Appended to, so a re-adopted execution keeps what an
//! earlier life of the agent wrote; output between that life's last write and the adoption
//! is not in the files, nor what was still buffered (at most [`BUFFER`] per stream, at most a
//! flush interval old: the log shipper flushes on its tick).
//!
//! Buffered because output arrives in small pieces (Docker frames a line at a time): a write
//! to a tokio file per piece is a trip to the blocking pool per line.

use std::path::{Path, PathBuf};

use tokio::io::{AsyncWriteExt, BufWriter};

use crate::executor::{OutputChunk, OutputSource};

pub const STDOUT_LOG: &str = "stdout.log";
pub const STDERR_LOG: &str = "stderr.log";

/// Bytes buffered per stream before they are written.
pub const BUFFER: usize = 64 * 1024;

/// The two files, each created (with the directory) at its stream's first output: a run that
/// prints nothing leaves no files, and costs no inodes. File creation is what a short run's
/// agent spends most on (on ext4 without a journal, every new inode scans the recently
/// deleted ones), so a silent stream has no file rather than an empty one.
pub struct LogFiles {
    dir: PathBuf,
    stdout: Option<BufWriter<tokio::fs::File>>,
    stderr: Option<BufWriter<tokio::fs::File>>,
    /// Set after the first failed write: the files are then incomplete, said once in the log.
    broken: bool,
}

impl LogFiles {
    /// The files of `dir`; nothing is created yet.
    pub fn new(dir: &Path) -> Self {
        Self {
            dir: dir.to_owned(),
            stdout: None,
            stderr: None,
            broken: false,
        }
    }

    pub async fn write(&mut self, chunk: &OutputChunk) {
        if self.broken {
            return;
        }
        let (slot, name) = match chunk.source {
            OutputSource::Stdout => (&mut self.stdout, STDOUT_LOG),
            OutputSource::Stderr => (&mut self.stderr, STDERR_LOG),
        };
        let written = async {
            if slot.is_none() {
                tokio::fs::create_dir_all(&self.dir).await?;
                let file = tokio::fs::OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(self.dir.join(name))
                    .await?;
                *slot = Some(BufWriter::with_capacity(BUFFER, file));
            }
            match slot {
                Some(file) => file.write_all(&chunk.data).await,
                None => Ok(()),
            }
        };
        if let Err(e) = written.await {
            tracing::warn!(error = %e, "could not write the stored log; it will be incomplete");
            self.broken = true;
        }
    }

    /// Writes out what is buffered. A failure marks the files incomplete, as a failed write
    /// does.
    pub async fn flush(&mut self) {
        if self.broken {
            return;
        }
        for file in [&mut self.stdout, &mut self.stderr].into_iter().flatten() {
            if let Err(e) = file.flush().await {
                tracing::warn!(error = %e, "could not write the stored log; it will be incomplete");
                self.broken = true;
                return;
            }
        }
    }
}
