//! The execution journal: an optional append-only file (setting `execution_journal`, env
//! `DROVER_EXECUTION_JOURNAL`) with one JSON object per line for every process this agent
//! starts, adopts, or sees end. It is evidence for test oracles ("no two executions of one run
//! overlapped; at most one execution per lease epoch"), not state: the agent never reads it,
//! and Docker remains its journal of record.
//!
//! Format (one line each, fields in this order; `at_ms` is Unix time in milliseconds):
//!
//! ```text
//! {"event":"started","run_id":"…","attempt":1,"epoch":3,"agent_id":"a1","container":"drover-…-1-3","container_id":"…","at_ms":…}
//! {"event":"adopted",…same fields…}
//! {"event":"found_exited",…same fields…}
//! {"event":"ended",…same fields…,"exit_code":143}
//! ```
//!
//! - `started`: this agent created and started a new process for the lease. At most one per
//!   (run_id, epoch) across every life of every agent.
//! - `adopted`: a restarted agent (or a redelivered command) took over a process that was
//!   already started and still running. Not a new execution.
//! - `found_exited`: a restarted agent found a process of the lease that had already exited
//!   (or died with an earlier life of the agent); it reports it and removes it. Nothing runs
//!   any more, so the line is a record, not execution time: its time is when it was found,
//!   not when the process ended, and no `ended` follows it.
//! - `ended`: the agent saw the process exit, or killed it (`exit_code` null when unknown).
//!   An execution adopted after an earlier life saw it end may have a second `ended`; an
//!   execution's interval runs from its `started` to its last `ended`. An `adopted` with no
//!   `started` before it means the earlier life died between starting the container and
//!   writing the line; it is still that lease's one execution.
//!
//! Writes are O_APPEND without fsync: each line is one `write` of well under `PIPE_BUF`, so
//! lines from several agents sharing a file do not interleave, and a `kill -9` loses nothing
//! already written (the page cache survives the process).

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};

use chrono::Utc;
use drover_core::ids::{AgentId, LeaseEpoch, RunId};
use serde::Serialize;

use crate::executor::ExecHandle;

/// Why the journal could not be opened.
#[derive(Debug, thiserror::Error)]
#[error("cannot open the execution journal {path}: {source}")]
pub struct JournalError {
    pub path: PathBuf,
    #[source]
    pub source: std::io::Error,
}

/// A handle on the journal; cheap to clone. Without a path every write is a no-op.
#[derive(Clone, Default)]
pub struct ExecutionJournal {
    file: Option<Arc<Mutex<File>>>,
}

/// Which lease and process a line is about.
#[derive(Debug, Clone, Copy)]
pub struct JournalEntry<'a> {
    pub run_id: RunId,
    pub attempt: u32,
    pub epoch: LeaseEpoch,
    pub agent_id: &'a AgentId,
    pub handle: &'a ExecHandle,
}

#[derive(Serialize)]
struct Line<'a> {
    event: &'static str,
    run_id: String,
    attempt: u32,
    epoch: i64,
    agent_id: &'a str,
    container: &'a str,
    container_id: &'a str,
    at_ms: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<Option<i32>>,
}

impl ExecutionJournal {
    /// Opens (creating if needed) the file for appending; `None` journals nothing.
    pub fn open(path: Option<&Path>) -> Result<Self, JournalError> {
        let Some(path) = path else {
            return Ok(Self::default());
        };
        let file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| JournalError {
                path: path.to_owned(),
                source,
            })?;
        Ok(Self {
            file: Some(Arc::new(Mutex::new(file))),
        })
    }

    pub fn started(&self, entry: JournalEntry<'_>) {
        self.write("started", entry, None);
    }

    pub fn adopted(&self, entry: JournalEntry<'_>) {
        self.write("adopted", entry, None);
    }

    pub fn found_exited(&self, entry: JournalEntry<'_>) {
        self.write("found_exited", entry, None);
    }

    pub fn ended(&self, entry: JournalEntry<'_>, exit_code: Option<i32>) {
        self.write("ended", entry, Some(exit_code));
    }

    fn write(&self, event: &'static str, e: JournalEntry<'_>, exit_code: Option<Option<i32>>) {
        let Some(file) = &self.file else { return };
        let line = Line {
            event,
            run_id: e.run_id.to_string(),
            attempt: e.attempt,
            epoch: e.epoch.0,
            agent_id: e.agent_id.as_str(),
            container: &e.handle.name,
            container_id: &e.handle.id,
            at_ms: Utc::now().timestamp_millis(),
            exit_code,
        };
        let mut bytes = match serde_json::to_vec(&line) {
            Ok(b) => b,
            Err(err) => {
                tracing::warn!(error = %err, "could not encode a journal line");
                return;
            }
        };
        bytes.push(b'\n');
        // One small write to a local file: blocking for microseconds is cheaper than a hop to
        // the blocking pool, and keeps lines in the order the events happened.
        let mut file = file.lock().unwrap_or_else(PoisonError::into_inner);
        if let Err(err) = file.write_all(&bytes) {
            tracing::warn!(error = %err, event, "could not append to the execution journal");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_are_json_one_per_event() {
        let dir = std::env::temp_dir().join(format!("drover-journal-{}", uuid::Uuid::now_v7()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("journal.jsonl");
        let journal = ExecutionJournal::open(Some(&path)).unwrap();
        let agent = AgentId::parse("a1").unwrap();
        let handle = ExecHandle {
            id: "cid".into(),
            name: "drover-x-1-3".into(),
        };
        let run = RunId::new();
        let entry = JournalEntry {
            run_id: run,
            attempt: 1,
            epoch: LeaseEpoch(3),
            agent_id: &agent,
            handle: &handle,
        };
        journal.started(entry);
        journal.adopted(entry);
        journal.found_exited(entry);
        journal.ended(entry, Some(143));
        journal.ended(entry, None);
        // A second handle on the same file appends, never truncates.
        ExecutionJournal::open(Some(&path))
            .unwrap()
            .ended(entry, Some(0));

        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<serde_json::Value> = text
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(lines.len(), 6);
        let events: Vec<&str> = lines.iter().map(|l| l["event"].as_str().unwrap()).collect();
        assert_eq!(
            events,
            [
                "started",
                "adopted",
                "found_exited",
                "ended",
                "ended",
                "ended"
            ]
        );
        let first = &lines[0];
        assert_eq!(first["run_id"], run.to_string());
        assert_eq!(first["attempt"], 1);
        assert_eq!(first["epoch"], 3);
        assert_eq!(first["agent_id"], "a1");
        assert_eq!(first["container"], "drover-x-1-3");
        assert!(first["at_ms"].as_i64().unwrap() > 1_600_000_000_000);
        assert!(first.get("exit_code").is_none());
        assert!(lines[2].get("exit_code").is_none());
        assert_eq!(lines[3]["exit_code"], 143);
        assert!(lines[4]["exit_code"].is_null());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn no_path_journals_nothing() {
        let journal = ExecutionJournal::open(None).unwrap();
        let agent = AgentId::parse("a1").unwrap();
        let handle = ExecHandle {
            id: "c".into(),
            name: "n".into(),
        };
        journal.started(JournalEntry {
            run_id: RunId::new(),
            attempt: 1,
            epoch: LeaseEpoch(1),
            agent_id: &agent,
            handle: &handle,
        });
    }
}
