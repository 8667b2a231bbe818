//! Principals of recently seen tokens, so that an agent's or a client's every call does not
//! look its token up in Postgres again.
//!
//! Why this is safe: every change to `api_tokens` or `tenants` (a revocation, a policy
//! change, even one made by hand in `psql`) fires a NOTIFY on [`AUTH_CHANNEL`] from a trigger,
//! and every API listens on it and empties its cache. A revocation therefore takes effect on
//! every API instance within the notification's delivery time, not after the TTL. While the
//! listener is not connected (start-up, a Postgres restart) nothing is cached at all, so a
//! lost notification cannot leave a revoked token usable; the TTL is the last bound.
//!
//! A lookup racing a revocation cannot put the old principal back: entries are tagged with the
//! generation they were read under, and every notification starts a new generation.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_core::repo::tokens::Principal;
use sqlx::PgPool;
use sqlx::postgres::PgListener;
use std::time::Instant;
use tokio_util::sync::CancellationToken;

/// The channel the `api_tokens` and `tenants` triggers notify on (see the migration
/// `…12_auth_notify.sql`).
pub const AUTH_CHANNEL: &str = "drover_auth";

/// Most tokens kept; far more than the live agents and clients of one deployment.
const MAX_ENTRIES: usize = 10_000;

/// A token hash's principal, valid for `ttl` while the invalidation listener is connected.
#[derive(Debug)]
pub struct TokenCache {
    ttl: Duration,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// Bumped by every invalidation; a lookup started under an older one is not stored.
    generation: u64,
    /// False while the listener is down: nothing is served from or put into the cache.
    live: bool,
    entries: HashMap<Vec<u8>, (Principal, Instant)>,
}

/// Where a cache lookup stands: a hit, or the generation to store the database's answer under.
pub enum Lookup {
    Hit(Principal),
    Miss(u64),
}

impl TokenCache {
    /// A cache keeping principals for `ttl`; a zero TTL caches nothing.
    pub fn new(ttl: Duration) -> Self {
        Self {
            ttl,
            inner: Mutex::new(Inner::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        // A panic while holding the lock leaves nothing half-done worth refusing over.
        self.inner
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub fn get(&self, hash: &[u8]) -> Lookup {
        let mut inner = self.lock();
        if inner.live
            && let Some((principal, at)) = inner.entries.get(hash)
        {
            if at.elapsed() < self.ttl {
                return Lookup::Hit(principal.clone());
            }
            inner.entries.remove(hash);
        }
        Lookup::Miss(inner.generation)
    }

    /// Keeps `principal`, read from the database under `generation`, unless an invalidation
    /// came in since.
    pub fn put(&self, hash: &[u8], principal: &Principal, generation: u64) {
        if self.ttl.is_zero() {
            return;
        }
        let mut inner = self.lock();
        if !inner.live || inner.generation != generation {
            return;
        }
        if inner.entries.len() >= MAX_ENTRIES {
            let ttl = self.ttl;
            inner.entries.retain(|_, (_, at)| at.elapsed() < ttl);
            if inner.entries.len() >= MAX_ENTRIES {
                inner.entries.clear();
            }
        }
        inner
            .entries
            .insert(hash.to_vec(), (principal.clone(), Instant::now()));
    }

    /// Forgets everything now, for a change this instance just committed (the NOTIFY of it
    /// reaches the other instances).
    pub fn clear(&self) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.entries.clear();
    }

    /// Forgets everything; `live` says whether caching may go on.
    fn invalidate(&self, live: bool) {
        let mut inner = self.lock();
        inner.generation += 1;
        inner.live = live;
        inner.entries.clear();
    }

    /// Listens for invalidations until `cancel` fires, reconnecting after a lost connection.
    /// Caching is on only while the listener is connected.
    pub async fn listen(self: Arc<Self>, pool: PgPool, cancel: CancellationToken) {
        if self.ttl.is_zero() {
            return;
        }
        loop {
            let connected = async {
                let mut l = PgListener::connect_with(&pool).await?;
                l.listen(AUTH_CHANNEL).await?;
                Ok::<_, sqlx::Error>(l)
            };
            let mut listener = tokio::select! {
                _ = cancel.cancelled() => return,
                l = connected => match l {
                    Ok(l) => l,
                    Err(e) => {
                        tracing::warn!(error = %e, "token cache: postgres listen failed; not caching until it works");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                },
            };
            // Listening now: whatever changes from here on is heard.
            self.invalidate(true);
            loop {
                tokio::select! {
                    _ = cancel.cancelled() => {
                        self.invalidate(false);
                        return;
                    }
                    msg = listener.try_recv() => match msg {
                        Ok(Some(_)) => self.invalidate(true),
                        Ok(None) | Err(_) => {
                            // The connection dropped; notifications may have been missed.
                            tracing::warn!("token cache: postgres listener lost; not caching until it is back");
                            self.invalidate(false);
                            break;
                        }
                    },
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use drover_core::repo::tokens::Role;

    fn principal() -> Principal {
        Principal {
            token_id: uuid::Uuid::nil(),
            tenant: None,
            roles: vec![Role::Agent],
            agent_id: Some("a".into()),
            operator: false,
            allow_self_approval: false,
            max_queued_runs: None,
        }
    }

    fn generation(l: Lookup) -> u64 {
        match l {
            Lookup::Miss(g) => g,
            Lookup::Hit(_) => panic!("expected a miss"),
        }
    }

    #[test]
    fn nothing_is_cached_until_the_listener_is_live() {
        let cache = TokenCache::new(Duration::from_secs(60));
        let g = generation(cache.get(b"h"));
        cache.put(b"h", &principal(), g);
        assert!(matches!(cache.get(b"h"), Lookup::Miss(_)));
        cache.invalidate(true);
        let g = generation(cache.get(b"h"));
        cache.put(b"h", &principal(), g);
        assert!(matches!(cache.get(b"h"), Lookup::Hit(_)));
        cache.invalidate(false);
        assert!(matches!(cache.get(b"h"), Lookup::Miss(_)));
    }

    #[test]
    fn a_lookup_racing_an_invalidation_is_not_stored() {
        let cache = TokenCache::new(Duration::from_secs(60));
        cache.invalidate(true);
        let g = generation(cache.get(b"h"));
        // A revocation commits and is heard while the lookup is at the database.
        cache.invalidate(true);
        cache.put(b"h", &principal(), g);
        assert!(matches!(cache.get(b"h"), Lookup::Miss(_)));
    }

    #[tokio::test]
    async fn entries_expire_after_the_ttl() {
        let cache = TokenCache::new(Duration::from_millis(1));
        cache.invalidate(true);
        let g = generation(cache.get(b"h"));
        cache.put(b"h", &principal(), g);
        tokio::time::sleep(Duration::from_millis(20)).await;
        assert!(matches!(cache.get(b"h"), Lookup::Miss(_)));
    }

    #[test]
    fn a_zero_ttl_caches_nothing() {
        let cache = TokenCache::new(Duration::ZERO);
        cache.invalidate(true);
        let g = generation(cache.get(b"h"));
        cache.put(b"h", &principal(), g);
        assert!(matches!(cache.get(b"h"), Lookup::Miss(_)));
    }
}
