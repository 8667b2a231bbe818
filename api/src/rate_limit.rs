//! Token-bucket rate limits in Redis, so every API instance shares them. One Lua script checks
//! and takes from all the buckets of a call atomically (Redis's clock, not ours):
//!
//! - authenticated calls: the tenant's bucket, then the token's (keyed by a digest of the
//!   token hash, never the token). Rotating tokens cannot escape the tenant's bucket; two
//!   tenants behind one address never share one.
//! - calls that fail authentication: the client address's bucket, which bounds token guessing.
//!
//! Over the limit: `RESOURCE_EXHAUSTED` with `retry-after` (seconds, rounded up) and
//! `retry-after-ms` metadata. If Redis is unreachable or slow the limiter **fails open** and
//! logs it (at most every 10 s): Redis holds only losable data by design, and refusing every
//! tenant's work because a cache is down would turn a Redis outage into a drover outage.
//! Authentication itself never depends on Redis.

use std::net::IpAddr;
use std::sync::Mutex;
use std::time::Duration;

use drover_core::ids::TenantId;
use drover_core::repo::tokens::Principal;
use redis::aio::ConnectionManager;
use serde::Deserialize;
use sha2::{Digest, Sha256};
use tokio::time::Instant;

/// `DROVER_RATE_LIMIT__…`. A rate of 0 disables that bucket.
#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct RateLimitSettings {
    /// Calls per second a tenant may make, all its tokens together.
    pub tenant_per_sec: f64,
    pub tenant_burst: f64,
    /// Calls per second one token may make.
    pub token_per_sec: f64,
    pub token_burst: f64,
    /// Failed-authentication calls per second from one address.
    pub unauthenticated_per_sec: f64,
    pub unauthenticated_burst: f64,
    /// Longest a limiter round trip may take before the call goes through unlimited.
    pub redis_timeout_ms: u64,
}

impl Default for RateLimitSettings {
    fn default() -> Self {
        Self {
            tenant_per_sec: 2_000.0,
            tenant_burst: 4_000.0,
            token_per_sec: 1_000.0,
            token_burst: 2_000.0,
            unauthenticated_per_sec: 5.0,
            unauthenticated_burst: 20.0,
            redis_timeout_ms: 250,
        }
    }
}

/// Takes one token from each bucket given as KEYS with (rate, burst) pairs in ARGV, or from
/// none. Returns 0 when allowed, else the milliseconds until the emptiest bucket has a token.
const SCRIPT: &str = r"
local t = redis.call('TIME')
local now = t[1] * 1000 + math.floor(t[2] / 1000)
local wait = 0
local state = {}
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local b = redis.call('HMGET', key, 'tokens', 'ts')
  local tokens = tonumber(b[1]) or burst
  local ts = tonumber(b[2]) or now
  tokens = math.min(burst, tokens + math.max(0, now - ts) * rate / 1000)
  if tokens < 1 then
    local w = math.ceil((1 - tokens) * 1000 / rate)
    if w > wait then wait = w end
  end
  state[i] = tokens
end
for i, key in ipairs(KEYS) do
  local rate = tonumber(ARGV[2 * i - 1])
  local burst = tonumber(ARGV[2 * i])
  local tokens = state[i]
  if wait == 0 then tokens = tokens - 1 end
  redis.call('HSET', key, 'tokens', tokens, 'ts', now)
  redis.call('PEXPIRE', key, math.ceil(burst * 1000 / rate) + 1000)
end
return wait
";

/// Over the limit: how long to wait.
#[derive(Debug, Clone, Copy)]
pub struct Limited {
    pub retry_after: Duration,
}

#[derive(Debug)]
pub struct RateLimiter {
    settings: RateLimitSettings,
    client: redis::Client,
    prefix: String,
    script: redis::Script,
    conn: tokio::sync::Mutex<Option<ConnectionManager>>,
    /// Redis is treated as down until then (no connection attempts, calls unlimited).
    down_until: Mutex<Option<Instant>>,
    last_warning: Mutex<Option<Instant>>,
}

impl RateLimiter {
    pub fn new(settings: RateLimitSettings, client: redis::Client, prefix: &str) -> Self {
        Self {
            settings,
            client,
            prefix: format!("{prefix}rl:"),
            script: redis::Script::new(SCRIPT),
            conn: tokio::sync::Mutex::new(None),
            down_until: Mutex::new(None),
            last_warning: Mutex::new(None),
        }
    }

    /// One authenticated call of `principal` in `tenant`.
    pub async fn authenticated(
        &self,
        tenant: TenantId,
        principal: &Principal,
    ) -> Result<(), Limited> {
        let s = &self.settings;
        let mut buckets = Vec::with_capacity(2);
        if s.tenant_per_sec > 0.0 {
            buckets.push((
                format!("{}t:{tenant}", self.prefix),
                s.tenant_per_sec,
                s.tenant_burst,
            ));
        }
        if s.token_per_sec > 0.0 {
            // The token id is already not the token; it is stable across calls and unique.
            buckets.push((
                format!("{}k:{}", self.prefix, principal.token_id.simple()),
                s.token_per_sec,
                s.token_burst,
            ));
        }
        self.take(buckets).await
    }

    /// One call from `addr` that failed authentication.
    pub async fn unauthenticated(&self, addr: Option<IpAddr>) -> Result<(), Limited> {
        let s = &self.settings;
        if s.unauthenticated_per_sec <= 0.0 {
            return Ok(());
        }
        let who = addr.map_or_else(|| "unknown".to_owned(), |a| a.to_string());
        // Hash the address too: keys should not be a list of client IPs for whoever reads Redis.
        let digest = hex::encode(&Sha256::digest(who.as_bytes())[..12]);
        self.take(vec![(
            format!("{}a:{digest}", self.prefix),
            s.unauthenticated_per_sec,
            s.unauthenticated_burst,
        )])
        .await
    }

    async fn take(&self, buckets: Vec<(String, f64, f64)>) -> Result<(), Limited> {
        if buckets.is_empty() {
            return Ok(());
        }
        if self.known_down() {
            return Ok(());
        }
        let timeout = Duration::from_millis(self.settings.redis_timeout_ms);
        let res = tokio::time::timeout(timeout, self.eval(&buckets)).await;
        match res {
            Ok(Ok(0)) => Ok(()),
            Ok(Ok(wait_ms)) => {
                metrics::counter!("drover_rate_limited_total").increment(1);
                Err(Limited {
                    retry_after: Duration::from_millis(u64::try_from(wait_ms).unwrap_or(1)),
                })
            }
            Ok(Err(e)) => {
                self.failed_open(&e.to_string());
                Ok(())
            }
            Err(_) => {
                self.failed_open("timed out");
                Ok(())
            }
        }
    }

    async fn eval(&self, buckets: &[(String, f64, f64)]) -> Result<i64, redis::RedisError> {
        // The lock guards only connecting: clones of a ConnectionManager share one
        // multiplexed connection, so calls run their scripts concurrently.
        let mut conn = {
            let mut guard = self.conn.lock().await;
            match guard.as_ref() {
                Some(c) => c.clone(),
                None => {
                    let c = ConnectionManager::new(self.client.clone()).await?;
                    *guard = Some(c.clone());
                    c
                }
            }
        };
        let mut inv = self.script.prepare_invoke();
        for (key, rate, burst) in buckets {
            inv.key(key).arg(*rate).arg(*burst);
        }
        let res = inv.invoke_async::<i64>(&mut conn).await;
        if res.is_err() {
            *self.conn.lock().await = None;
        }
        res
    }

    fn known_down(&self) -> bool {
        let mut down = self.down_until.lock().unwrap_or_else(|p| p.into_inner());
        match *down {
            Some(t) if Instant::now() < t => true,
            Some(_) => {
                *down = None;
                false
            }
            None => false,
        }
    }

    /// Redis failed: let calls through for a second, and say so now and then.
    fn failed_open(&self, why: &str) {
        *self.down_until.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + Duration::from_secs(1));
        metrics::counter!("drover_rate_limit_fail_open_total").increment(1);
        let mut last = self.last_warning.lock().unwrap_or_else(|p| p.into_inner());
        if last.is_none_or(|t| t.elapsed() > Duration::from_secs(10)) {
            *last = Some(Instant::now());
            tracing::warn!(error = %why, "rate limiter cannot reach redis; failing open (calls are not rate limited)");
        }
    }
}
