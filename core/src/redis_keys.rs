//! Redis key and channel names, all under a configurable prefix so several stacks or tests
//! share one Redis. Redis holds only losable, fast data; Postgres stays the truth.

use crate::ids::RunId;

#[derive(Debug, Clone)]
pub struct RedisKeys {
    prefix: String,
}

impl RedisKeys {
    pub fn new(prefix: impl Into<String>) -> Self {
        Self {
            prefix: prefix.into(),
        }
    }

    /// Pub/sub channel announcing new events of a run (payload: the event's seq).
    pub fn run_events_channel(&self, run: RunId) -> String {
        format!("{}run:{}:events", self.prefix, run)
    }

    /// Pub/sub channel carrying live log chunks of a run.
    pub fn run_logs_channel(&self, run: RunId) -> String {
        format!("{}run:{}:logs", self.prefix, run)
    }
}
