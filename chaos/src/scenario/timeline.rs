//! What happened when, relative to the scenario's start: "t=3.2s kill -9 agent-0".

use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Seconds since the scenario started.
    pub t_s: f64,
    pub what: String,
}

impl std::fmt::Display for Entry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "t={:.1}s {}", self.t_s, self.what)
    }
}

/// Shared by the fault script and the workload; cheap to clone.
#[derive(Debug, Clone)]
pub struct Timeline {
    start: Instant,
    /// Unix milliseconds at `start`, to place journal timestamps on the same axis.
    start_unix_ms: i64,
    entries: Arc<Mutex<Vec<Entry>>>,
}

impl Default for Timeline {
    fn default() -> Self {
        Self::new()
    }
}

impl Timeline {
    pub fn new() -> Self {
        Self {
            start: Instant::now(),
            start_unix_ms: chrono::Utc::now().timestamp_millis(),
            entries: Arc::default(),
        }
    }

    pub fn elapsed_s(&self) -> f64 {
        self.start.elapsed().as_secs_f64()
    }

    /// Now, in Unix milliseconds (the clock agents stamp their journals with).
    pub fn unix_ms(&self) -> i64 {
        self.start_unix_ms + i64::try_from(self.start.elapsed().as_millis()).unwrap_or(i64::MAX)
    }

    pub fn note(&self, what: impl Into<String>) {
        let e = Entry {
            t_s: (self.elapsed_s() * 10.0).round() / 10.0,
            what: what.into(),
        };
        eprintln!("  {e}");
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(e);
    }

    pub fn entries(&self) -> Vec<Entry> {
        self.entries
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}
