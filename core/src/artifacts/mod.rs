//! Where artifact bytes live. Postgres holds the manifests (`repo::artifacts`), and the bytes
//! of small inline uploads (`artifact_blobs`, see `repo::artifacts`); a store holds the rest,
//! addressed by upload id and blob index — per upload rather than by content
//! hash, so nothing on disk is shared between runs, deleting an upload is one directory, and
//! no reference counting is needed. (Content addressing, which would de-duplicate the files a
//! follow-up run inherits through `inputs_from_run`, is a later step behind the same trait.)
//!
//! Paths from clients never reach the store: blobs are named by numbers the API assigns, so
//! a hostile path cannot name a file here whatever it contains.
//!
//! The trait keeps the operations an S3-compatible backend needs: `begin` (nothing or a
//! prefix), `stage` (a multipart upload), `commit` (make staged blobs durable and readable),
//! `open` and `delete`. Postgres knows every upload before its first byte is stored (the
//! upload row is written before `begin`) and deletes the row only after `delete`, so the
//! garbage collector never has to list the store to find orphans.

pub mod local;

use std::fmt::Debug;
use std::pin::Pin;

use futures::future::BoxFuture;
use tokio::io::AsyncRead;
use uuid::Uuid;

pub use local::LocalStore;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("artifact store i/o error on {what}: {source}")]
    Io {
        what: String,
        source: std::io::Error,
    },
    #[error("artifact blob {0} not found")]
    Missing(String),
}

impl StoreError {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        StoreError::Io {
            what: what.into(),
            source,
        }
    }
}

pub type BlobReader = Pin<Box<dyn AsyncRead + Send>>;

/// One blob being written. Dropping it without [`BlobSink::finish`] leaves a partial blob
/// that only the upload's deletion removes; the manifest never names it.
pub trait BlobSink: Send {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>>;
    /// Flushes the blob to stable storage.
    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>>;
}

pub trait ArtifactStore: Send + Sync + Debug {
    /// Prepares staging space for a new upload.
    fn begin(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>>;
    /// Starts writing blob `index` of `upload` (after `begin`; fails once the upload was
    /// deleted, so a discarded upload stops taking bytes).
    fn stage(
        &self,
        upload: Uuid,
        index: u32,
    ) -> BoxFuture<'_, Result<Box<dyn BlobSink>, StoreError>>;
    /// Makes every finished blob of `upload` durable and readable; called once all files were
    /// verified, before Postgres records the upload as complete. Idempotent.
    fn commit(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>>;
    /// `begin`, every blob of `blobs` (index, whole content) staged and finished, then
    /// `commit`: an upload whose bytes are all in hand (inline artifacts). A store may do it
    /// in fewer steps; the default takes the same ones as a streamed upload.
    fn put_all(
        &self,
        upload: Uuid,
        blobs: Vec<(u32, Vec<u8>)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        Box::pin(async move {
            self.begin(upload).await?;
            for (index, content) in blobs {
                let mut sink = self.stage(upload, index).await?;
                sink.write(&content).await?;
                sink.finish().await?;
            }
            self.commit(upload).await
        })
    }
    /// Reads blob `index` of `upload`.
    fn open(&self, upload: Uuid, index: u32) -> BoxFuture<'_, Result<BlobReader, StoreError>>;
    /// Deletes everything of `upload`; deleting a missing upload is not an error.
    fn delete(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>>;
}
