//! Live fan-out of committed changes through Redis pub/sub. Publishing happens after the
//! Postgres commit and is best effort: Redis may lose anything at any time, so subscribers use
//! a message only as a hint to read Postgres, and also poll it.

use redis::aio::ConnectionManager;
use secrecy::{ExposeSecret, SecretString};
use tokio::sync::Mutex;

use crate::ids::RunId;
use crate::redis_keys::RedisKeys;

pub struct EventBus {
    client: redis::Client,
    keys: RedisKeys,
    conn: Mutex<Option<ConnectionManager>>,
}

impl std::fmt::Debug for EventBus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventBus").field("keys", &self.keys).finish()
    }
}

impl EventBus {
    /// Does not connect yet: Redis being down must not stop a service from starting.
    pub fn new(url: &SecretString, prefix: &str) -> Result<Self, redis::RedisError> {
        Ok(Self {
            client: redis::Client::open(url.expose_secret())?,
            keys: RedisKeys::new(prefix),
            conn: Mutex::new(None),
        })
    }

    pub fn keys(&self) -> &RedisKeys {
        &self.keys
    }

    pub fn client(&self) -> &redis::Client {
        &self.client
    }

    async fn publish(&self, channel: String, payload: Vec<u8>) {
        let mut guard = self.conn.lock().await;
        if guard.is_none() {
            match tokio::time::timeout(
                std::time::Duration::from_secs(2),
                ConnectionManager::new(self.client.clone()),
            )
            .await
            {
                Ok(Ok(c)) => *guard = Some(c),
                Ok(Err(e)) => {
                    tracing::debug!(error = %e, "redis unavailable; live updates skipped");
                    return;
                }
                Err(_) => {
                    tracing::debug!("redis connect timed out; live updates skipped");
                    return;
                }
            }
        }
        if let Some(conn) = guard.as_mut() {
            let res: Result<i64, _> = redis::cmd("PUBLISH")
                .arg(&channel)
                .arg(payload)
                .query_async(conn)
                .await;
            if let Err(e) = res {
                tracing::debug!(error = %e, "redis publish failed; watchers fall back to postgres");
            }
        }
    }

    /// Announces that run `run` has a new event `seq`.
    pub async fn run_event(&self, run: RunId, seq: i32) {
        self.publish(self.keys.run_events_channel(run), seq.to_string().into_bytes())
            .await;
    }

    /// Forwards a live log chunk.
    pub async fn run_log(&self, run: RunId, data: Vec<u8>) {
        self.publish(self.keys.run_logs_channel(run), data).await;
    }
}
