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

use std::path::Path;

use tokio::io::{AsyncWriteExt, BufWriter};

use crate::executor::{OutputChunk, OutputSource};

pub const STDOUT_LOG: &str = "stdout.log";
pub const STDERR_LOG: &str = "stderr.log";

/// Bytes buffered per stream before they are written.
pub const BUFFER: usize = 64 * 1024;

pub struct LogFiles {
    stdout: BufWriter<tokio::fs::File>,
    stderr: BufWriter<tokio::fs::File>,
    /// Set after the first failed write: the files are then incomplete, said once in the log.
    broken: bool,
}

impl LogFiles {
    pub async fn open(dir: &Path) -> std::io::Result<Self> {
        tokio::fs::create_dir_all(dir).await?;
        let mut options = tokio::fs::OpenOptions::new();
        options.create(true).append(true);
        Ok(Self {
            stdout: BufWriter::with_capacity(BUFFER, options.open(dir.join(STDOUT_LOG)).await?),
            stderr: BufWriter::with_capacity(BUFFER, options.open(dir.join(STDERR_LOG)).await?),
            broken: false,
        })
    }

    pub async fn write(&mut self, chunk: &OutputChunk) {
        if self.broken {
            return;
        }
        let file = match chunk.source {
            OutputSource::Stdout => &mut self.stdout,
            OutputSource::Stderr => &mut self.stderr,
        };
        if let Err(e) = file.write_all(&chunk.data).await {
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
        for file in [&mut self.stdout, &mut self.stderr] {
            if let Err(e) = file.flush().await {
                tracing::warn!(error = %e, "could not write the stored log; it will be incomplete");
                self.broken = true;
                return;
            }
        }
    }
}
