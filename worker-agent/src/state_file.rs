//! Per-execution records an executor keeps beside the workspaces
//! (`<agent_root>/<execution name>.<kind>.json`), so that a restarted agent knows which leases
//! an earlier life of it started. Docker needs none (the container is the record); the
//! process and mock executors write one before their execution can have any effect, and the
//! rule they share is: a lease whose record exists is never started again.
//!
//! Writes go to a temporary file renamed into place, so a reader never sees half a record.

use std::path::{Path, PathBuf};

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::executor::ExecError;

/// The records of one kind (`suffix`, e.g. `.process.json`) in one agent's directory.
#[derive(Debug, Clone)]
pub struct StateFiles {
    dir: PathBuf,
    suffix: &'static str,
}

impl StateFiles {
    pub fn new(dir: &Path, suffix: &'static str) -> Self {
        Self {
            dir: dir.to_owned(),
            suffix,
        }
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(format!("{name}{}", self.suffix))
    }

    pub async fn write<T: Serialize>(&self, name: &str, value: &T) -> Result<(), ExecError> {
        let err = |e| ExecError::backend("write execution record", e);
        let json = serde_json::to_vec(value)
            .map_err(|e| ExecError::backend("write execution record", e))?;
        let (dir, path) = (self.dir.clone(), self.path(name));
        // One blocking hop for the whole write: it sits on every start's path.
        tokio::task::spawn_blocking(move || {
            let tmp = path.with_extension("json.tmp");
            if let Err(e) = std::fs::write(&tmp, &json) {
                if e.kind() != std::io::ErrorKind::NotFound {
                    return Err(e);
                }
                std::fs::create_dir_all(&dir)?;
                std::fs::write(&tmp, &json)?;
            }
            std::fs::rename(&tmp, &path)
        })
        .await
        .map_err(|e| ExecError::backend("write execution record", e))?
        .map_err(err)
    }

    /// The record of `name`, `None` if there is none.
    pub async fn read<T: DeserializeOwned>(&self, name: &str) -> Result<Option<T>, ExecError> {
        let bytes = match tokio::fs::read(self.path(name)).await {
            Ok(b) => b,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(ExecError::backend("read execution record", e)),
        };
        serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|e| ExecError::backend("read execution record", e))
    }

    /// Removes the record of `name`; one already gone is fine.
    pub async fn remove(&self, name: &str) -> Result<(), ExecError> {
        match tokio::fs::remove_file(self.path(name)).await {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ExecError::backend("remove execution record", e)),
        }
    }

    /// The execution names that have a record (none when the directory does not exist).
    pub async fn names(&self) -> Result<Vec<String>, ExecError> {
        let err = |e| ExecError::backend("list execution records", e);
        let mut dir = match tokio::fs::read_dir(&self.dir).await {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(err(e)),
        };
        let mut names = Vec::new();
        while let Some(entry) = dir.next_entry().await.map_err(err)? {
            let file = entry.file_name().to_string_lossy().into_owned();
            if let Some(name) = file.strip_suffix(self.suffix) {
                names.push(name.to_owned());
            }
        }
        Ok(names)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn records_round_trip_list_by_suffix_and_remove_idempotently() {
        let tmp = tempfile::tempdir().unwrap();
        let files = StateFiles::new(&tmp.path().join("agent"), ".mock.json");
        assert!(files.names().await.unwrap().is_empty(), "no directory yet");
        files.write("drover-a", &vec![1, 2]).await.unwrap();
        std::fs::write(tmp.path().join("agent/other.process.json"), b"{}").unwrap();
        assert_eq!(files.names().await.unwrap(), vec!["drover-a".to_owned()]);
        assert_eq!(
            files.read::<Vec<i32>>("drover-a").await.unwrap(),
            Some(vec![1, 2])
        );
        assert_eq!(files.read::<Vec<i32>>("drover-b").await.unwrap(), None);
        files.remove("drover-a").await.unwrap();
        files.remove("drover-a").await.unwrap();
        assert!(files.names().await.unwrap().is_empty());
    }
}
