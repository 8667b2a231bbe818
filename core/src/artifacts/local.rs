//! The local-directory store: `<root>/uploads/<upload id>/<blob index>`. Each blob is fsynced
//! when finished and the upload directory when committed, so a manifest Postgres commits
//! never names bytes a crash could lose.

use std::path::{Path, PathBuf};

use futures::FutureExt;
use futures::future::BoxFuture;
use tokio::io::AsyncWriteExt;
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

struct FileSink {
    file: tokio::fs::File,
    path: PathBuf,
}

impl BlobSink for FileSink {
    fn write<'a>(&'a mut self, data: &'a [u8]) -> BoxFuture<'a, Result<(), StoreError>> {
        async move {
            self.file
                .write_all(data)
                .await
                .map_err(|e| StoreError::io(self.path.display().to_string(), e))
        }
        .boxed()
    }

    fn finish(self: Box<Self>) -> BoxFuture<'static, Result<(), StoreError>> {
        async move {
            let FileSink { mut file, path } = *self;
            let what = || path.display().to_string();
            file.flush().await.map_err(|e| StoreError::io(what(), e))?;
            file.sync_all().await.map_err(|e| StoreError::io(what(), e))
        }
        .boxed()
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
            let file = tokio::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
                .await
                .map_err(|e| StoreError::io(path.display().to_string(), e))?;
            Ok(Box::new(FileSink { file, path }) as Box<dyn BlobSink>)
        }
        .boxed()
    }

    fn commit(&self, upload: Uuid) -> BoxFuture<'_, Result<(), StoreError>> {
        let dir = self.dir(upload);
        async move {
            let d = tokio::fs::File::open(&dir)
                .await
                .map_err(|e| StoreError::io(dir.display().to_string(), e))?;
            d.sync_all()
                .await
                .map_err(|e| StoreError::io(dir.display().to_string(), e))
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
}
