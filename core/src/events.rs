//! Live fan-out of committed changes through Redis pub/sub. Publishing happens after the
//! Postgres commit and is best effort: Redis may lose anything at any time, so subscribers
//! take what a message carries only where it leaves no gap ([`crate::announce`]), read
//! Postgres for the rest, and also poll it.
//!
//! Request handlers never wait on Redis: they hand messages to a background publisher over a
//! bounded channel, which drops them when full or while Redis is unreachable. A blackholed
//! Redis therefore costs live latency, never API latency.

use std::time::Duration;

use redis::aio::ConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::mpsc;

use crate::announce::Announcement;
use crate::ids::RunId;
use crate::redis_keys::RedisKeys;

const QUEUE: usize = 4096;

#[derive(Debug)]
pub struct EventBus {
    client: redis::Client,
    keys: RedisKeys,
    tx: mpsc::Sender<(String, Vec<u8>)>,
}

impl EventBus {
    /// Does not connect yet: Redis being down must not stop a service from starting. Spawns
    /// the publisher task, which ends when the bus is dropped.
    pub fn new(url: &SecretString, prefix: &str) -> Result<Self, redis::RedisError> {
        let client = client(url)?;
        let (tx, rx) = mpsc::channel(QUEUE);
        tokio::spawn(publisher(client.clone(), rx));
        Ok(Self {
            client,
            keys: RedisKeys::new(prefix),
            tx,
        })
    }

    pub fn keys(&self) -> &RedisKeys {
        &self.keys
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    fn publish(&self, channel: String, payload: Vec<u8>) {
        if self.tx.try_send((channel, payload)).is_err() {
            tracing::debug!("live update dropped: redis publisher backlog full");
        }
    }

    /// Announces that run `run` has a new event `seq` (watchers read it from Postgres).
    pub fn run_event(&self, run: RunId, seq: i32) {
        self.announce(Announcement::hint(run, seq));
    }

    /// Publishes an [`Announcement`]: a hint, or the committed events themselves.
    pub fn announce(&self, news: Announcement) {
        self.publish(self.keys.run_events_channel(news.run), news.payload);
    }

    /// Forwards a live log chunk.
    pub fn run_log(&self, run: RunId, data: Vec<u8>) {
        self.publish(self.keys.run_logs_channel(run), data);
    }
}

/// A client for `url` whose connections set `TCP_NODELAY`. redis-rs leaves Nagle's algorithm
/// on by default: a command written while the previous segment is unacknowledged (a
/// SUBSCRIBE after an UNSUBSCRIBE, a PUBLISH after a PUBLISH) then waits out the peer's
/// delayed ACK, 40 ms on Linux. Measured: every WatchRun's first event came 40 ms late.
pub fn client(url: &SecretString) -> Result<redis::Client, redis::RedisError> {
    use redis::IntoConnectionInfo;
    let info = url
        .expose_secret()
        .into_connection_info()?
        .set_tcp_settings(redis::io::tcp::TcpSettings::default().set_nodelay(true));
    redis::Client::open(info)
}

async fn publisher(client: redis::Client, mut rx: mpsc::Receiver<(String, Vec<u8>)>) {
    let mut conn: Option<ConnectionManager> = None;
    let mut retry_at = tokio::time::Instant::now();
    while let Some((channel, payload)) = rx.recv().await {
        if conn.is_none() {
            if tokio::time::Instant::now() < retry_at {
                continue; // drop while Redis is known to be down
            }
            match tokio::time::timeout(
                Duration::from_secs(2),
                ConnectionManager::new(client.clone()),
            )
            .await
            {
                Ok(Ok(c)) => conn = Some(c),
                _ => {
                    tracing::debug!("redis unavailable; live updates dropped for 1 s");
                    retry_at = tokio::time::Instant::now() + Duration::from_secs(1);
                    continue;
                }
            }
        }
        if let Some(c) = conn.as_mut() {
            let res = tokio::time::timeout(
                Duration::from_secs(2),
                redis::cmd("PUBLISH")
                    .arg(&channel)
                    .arg(payload)
                    .query_async::<i64>(c),
            )
            .await;
            if !matches!(res, Ok(Ok(_))) {
                tracing::debug!("redis publish failed; watchers fall back to postgres");
                conn = None;
                retry_at = tokio::time::Instant::now() + Duration::from_secs(1);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn connections_disable_nagle() {
        let url = SecretString::from("redis://127.0.0.1:6379/0".to_owned());
        let c = client(&url).expect("a valid url");
        assert!(c.get_connection_info().tcp_settings().nodelay());
    }
}
