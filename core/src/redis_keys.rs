//! Redis key and channel names, all under a configurable prefix so several stacks or tests
//! share one Redis. Redis holds only losable, fast data; Postgres stays the truth.

use crate::ids::RunId;

const EVENTS_SUFFIX: &str = "events";

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

    /// Pub/sub channel announcing new events of a run (payload: [`crate::announce`]).
    pub fn run_events_channel(&self, run: RunId) -> String {
        format!("{}run:{}:{EVENTS_SUFFIX}", self.prefix, run)
    }

    /// Whether `channel` is a run's events channel (whatever the prefix).
    pub fn is_run_events_channel(channel: &str) -> bool {
        channel
            .strip_suffix(EVENTS_SUFFIX)
            .is_some_and(|c| c.ends_with(':'))
    }

    /// Pub/sub channel carrying live log chunks of a run.
    pub fn run_logs_channel(&self, run: RunId) -> String {
        format!("{}run:{}:logs", self.prefix, run)
    }
}
