//! The local-directory store: `<root>/uploads/<upload id>/<blob index>`. Each blob is fsynced
//! when finished and the upload directory when committed, so a manifest Postgres commits
//! never names bytes a crash could lose.

use std::path::{Path, PathBuf};

use futures::FutureExt;
use futures::future::BoxFuture;
use std::io::Write;
use uuid::Uuid;

use super::{ArtifactStore, BlobReader, BlobSink, StoreError};

#[derive(Debug, Clone)]
pub struct LocalStore {
    uploads: PathBuf,
}

impl LocalStore {
    /// Creates `<root>/uploads` if needed.
    pub fn open(root: &Path) -> Result<Self, StoreError> {
        let uploads = root.join("uploads");
        std::fs::create_dir_all(&uploads)
            .map_err(|e| StoreError::io(uploads.display().to_string(), e))?;
        Ok(Self { uploads })
    }

    fn dir(&self, upload: Uuid) -> PathBuf {
        self.uploads.join(upload.simple().to_string())
    }

    fn blob(&self, upload: Uuid, index: u32) -> PathBuf {
        self.dir(upload).join(index.to_string())
    }
}

/// Writes are buffered and handed to the blocking pool in large pieces: a small blob (most
/// are: a run's `.drover/` records) costs two trips to the pool, its creation and then one
/// write + fsync, instead of one per tokio file operation.
struct FileSink {
    file: Option<std::fs::File>,
    path: PathBuf,
    buf: Vec<u8>,
}

/// Buffered bytes that go to the file before more are taken.
const SINK_BUFFER: usize = 1 << 20;

/// Runs blocking file work off the async workers; `what` names the file in errors.
async fn blocking<T: Send + 'static>(
    what: &Path,
    work: impl FnOnce() -> std::io::Result<T> + Send + 'static,
) -> Result<T, StoreError> {
    match tokio::task::spawn_blocking(work).await {
        Ok(done) => done.map_err(|e| StoreError::io(what.display().to_string(), e)),
        Err(e) => Err(StoreError::io(
            what.display().to_string(),
            std::io::Error::other(e.to_string()),
        )),
    }
}

impl FileSink {
    /// Writes the buffer out (and fsyncs when `sync`), on the blocking pool.
    async fn drain(&mut self, sync: bool) -> Result<(), StoreError> {
        let Some(mut file) = self.file.take() else {
            return Err(StoreError::io(
                self.path.display().to_string(),
                std::io::Error::other("blob sink used after a failed write"),
            ));
        };
        let buf = std::mem::take(&mut self.buf);
        let (file, mut buf) = blocking(&self.path, move || {
            file.write_all(&buf)?;
            if sync {
                file.sync_all()?;
            }
            Ok((file, buf))
        })
        .await?;
        buf.clear();
        self.buf = buf;
        self.file = Some(file);
        Ok(())
    }
}

impl BlobSink for FileSink {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.buf.extend_from_slice(data);
            if self.buf.len() >= SINK_BUFFER {
                self.drain(false).await?;
            }
            Ok(())
        }
        .boxed()
    }

    fn finish(mut self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        async move { self.drain(true).await }.boxed()
    }
}

impl ArtifactStore for LocalStore {
    fn begin(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        let dir = self.dir(upload);
        async move {
            tokio::fs::create_dir(&dir)
                .await
                .map_err(|e| StoreError::io(dir.display().to_string(), e))
        }
        .boxed()
    }

    fn stage(
        &self,
        upload: Uuid,
        index: u32,
    ) -> BoxFuture<'_, Result<Box<dyn BlobSink>, StoreError>> {
        let path = self.blob(upload, index);
        async move {
            // create_new: never overwrite, and fail if the upload directory is gone.
            let at = path.clone();
            let file = blocking(&path, move || {
                std::fs::OpenOptions::new()
                    .write(true)
                    .create_new(true)
                    .open(at)
            })
            .await?;
            Ok(Box::new(FileSink {
                file: Some(file),
                path,
                buf: Vec::new(),
            }) as Box<dyn BlobSink>)
        }
        .boxed()
    }

    fn commit(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        let dir = self.dir(upload);
        async move {
            let at = dir.clone();
            blocking(&dir, move || std::fs::File::open(at)?.sync_all()).await
        }
        .boxed()
    }

    /// One trip to the blocking pool for the whole upload: small blobs cost a syscall each,
    /// and a hop per step cost more than the writes.
    fn put_all(
        &self,
        upload: Uuid,
        blobs: Vec<(u32, Vec<u8>)>,
    ) -> BoxFuture<'_, Result<(), StoreError>> {
        let dir = self.dir(upload);
        async move {
            let at = dir.clone();
            blocking(&dir, move || {
                std::fs::create_dir(&at)?;
                for (index, content) in blobs {
                    let mut file = std::fs::OpenOptions::new()
                        .write(true)
                        .create_new(true)
                        .open(at.join(index.to_string()))?;
                    file.write_all(&content)?;
                    file.sync_all()?;
                }
                std::fs::File::open(&at)?.sync_all()
            })
            .await
        }
        .boxed()
    }

    fn open(&self, upload: Uuid, index: u32) -> BoxFuture<'_, Result<BlobReader, StoreError>> {
        let path = self.blob(upload, index);
        async move {
            match tokio::fs::File::open(&path).await {
                Ok(f) => Ok(Box::pin(f) as BlobReader),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                    Err(StoreError::Missing(format!("{upload}/{index}")))
                }
                Err(e) => Err(StoreError::io(path.display().to_string(), e)),
            }
        }
        .boxed()
    }

    fn delete(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        let dir = self.dir(upload);
        async move {
            match tokio::fs::remove_dir_all(&dir).await {
                Ok(()) => Ok(()),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
                Err(e) => Err(StoreError::io(dir.display().to_string(), e)),
            }
        }
        .boxed()
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, reason = "test code")]

    use tokio::io::AsyncReadExt;

    use super::*;

    #[tokio::test]
    async fn stage_commit_read_delete() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let up = Uuid::now_v7();
        assert!(store.stage(up, 0).await.is_err(), "stage before begin");
        store.begin(up).await.unwrap();
        let mut sink = store.stage(up, 0).await.unwrap();
        sink.write(b"hello ").await.unwrap();
        sink.write(b"world").await.unwrap();
        sink.finish().await.unwrap();
        assert!(
            store.stage(up, 0).await.is_err(),
            "blobs are never overwritten"
        );
        store.commit(up).await.unwrap();
        let mut buf = String::new();
        store
            .open(up, 0)
            .await
            .unwrap()
            .read_to_string(&mut buf)
            .await
            .unwrap();
        assert_eq!(buf, "hello world");
        assert!(matches!(
            store.open(up, 1).await,
            Err(StoreError::Missing(_))
        ));
        store.delete(up).await.unwrap();
        store.delete(up).await.unwrap();
        assert!(
            !tmp.path()
                .join("uploads")
                .join(up.simple().to_string())
                .exists()
        );
        assert!(
            store.stage(up, 1).await.is_err(),
            "a deleted upload takes no bytes"
        );
    }

    #[tokio::test]
    async fn put_all_stores_an_upload_in_one_step_and_never_twice() {
        let tmp = tempfile::tempdir().unwrap();
        let store = LocalStore::open(tmp.path()).unwrap();
        let up = Uuid::now_v7();
        store
            .put_all(up, vec![(0, b"first".to_vec()), (1, Vec::new())])
            .await
            .unwrap();
        for (index, want) in [(0, "first"), (1, "")] {
            let mut buf = String::new();
            store
                .open(up, index)
                .await
                .unwrap()
                .read_to_string(&mut buf)
                .await
                .unwrap();
            assert_eq!(buf, want);
        }
        assert!(
            store
                .put_all(up, vec![(0, b"other".to_vec())])
                .await
                .is_err(),
            "an upload id is used once"
        );
        store.delete(up).await.unwrap();
    }
}
