//! The parked-run scheduler of one pool: assigns runs the consumer parked
//! ([`drover_core::repo::parking`]) in fair order whenever capacity may have freed.
//!
//! Order: the tenant with the fewest runs ASSIGNED or RUNNING in the pool first; among equal
//! tenants, the one this scheduler served least recently (so with one free slot two tenants
//! alternate instead of the older backlog winning every tie), then the one whose best parked
//! run has the higher priority, then the older one. Within a tenant: higher priority, then
//! older. Tenants at their concurrency quota are passed over.
//!
//! It wakes on capacity notifications (a run ended, an agent registered or came back), on a
//! poke from the consumer after it parked a run, and every `capacity_recheck_ms` as a
//! backstop; it never spins. A capacity notification makes it look only if its last look
//! found runs parked in the pool: runs end far more often than runs park, and a pool with
//! nothing parked gains nothing from a query per ended run. Runs another dispatcher parked
//! and left (it died) are found by the backstop. Each assignment is its own transaction on a run row locked with
//! `FOR UPDATE SKIP LOCKED`, through the same compare-and-set as a direct assignment, so the
//! schedulers of several dispatchers share the parked runs safely, and a restarted dispatcher
//! finds them in Postgres.

use std::cmp::Reverse;
use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_core::CoreError;
use drover_core::events::EventBus;
use drover_core::ids::TenantId;
use drover_core::repo::parking::{self, ParkedTenant};
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::assign::{Limits, Outcome, assign_locked};

pub struct ParkedScheduler {
    pub pool_name: String,
    pub db: PgPool,
    pub bus: Arc<EventBus>,
    pub limits: Limits,
    pub recheck: Duration,
    /// Capacity notifications (Postgres NOTIFY, shared by the dispatcher's pools).
    pub capacity: Arc<Notify>,
    /// Poked by this pool's consumer after it parked a run.
    pub parked: Arc<Notify>,
    /// This process's outbox relay, for the agents' commands.
    pub outbox: drover_core::repo::outbox::Handoff,
}

impl ParkedScheduler {
    pub async fn run(self, cancel: CancellationToken) {
        let mut served: HashMap<TenantId, Instant> = HashMap::new();
        let mut db_backoff = Duration::from_millis(200);
        // Whether the last look found nothing parked in the pool. Every run that ends wakes
        // the scheduler (a capacity notification); with nothing parked that wake-up only cost
        // a query, once per run. So a capacity wake-up alone does not look while the pool was
        // empty: a run parked by this dispatcher pokes it, and the backstop below (which
        // capacity wake-ups do not push back) still looks every `recheck` for runs another
        // dispatcher parked and left.
        let mut empty = false;
        let mut backstop = tokio::time::Instant::now();
        let mut look = true;
        loop {
            // Arm the wake-up before looking, so capacity freed meanwhile is not missed. (A
            // poke while draining is kept as a permit by the Notify.)
            let woken = self.capacity.notified();
            tokio::pin!(woken);
            woken.as_mut().enable();
            if look || tokio::time::Instant::now() >= backstop {
                let pause = match self.drain(&mut served, &cancel).await {
                    Ok((n, any)) => {
                        db_backoff = Duration::from_millis(200);
                        empty = !any;
                        if n > 0 {
                            tracing::debug!(pool = %self.pool_name, assigned = n, "parked runs assigned");
                        }
                        self.recheck
                    }
                    Err(e) => {
                        tracing::warn!(pool = %self.pool_name, error = %e, "parked-run scheduling failed; retrying");
                        empty = false;
                        let pause = db_backoff;
                        db_backoff = (db_backoff * 2).min(Duration::from_secs(5));
                        pause
                    }
                };
                backstop = tokio::time::Instant::now() + pause;
            }
            look = tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut woken => !empty,
                _ = self.parked.notified() => true,
                _ = tokio::time::sleep_until(backstop) => true,
            };
        }
    }

    /// Assigns parked runs until none fits: the number assigned, and whether any run was
    /// parked in the pool when it first looked.
    async fn drain(
        &self,
        served: &mut HashMap<TenantId, Instant>,
        cancel: &CancellationToken,
    ) -> Result<(usize, bool), CoreError> {
        let mut assigned = 0;
        let mut any = false;
        // Label sets no agent had room for, and tenants at their quota, in this drain.
        let mut full_labels: Vec<serde_json::Value> = Vec::new();
        let mut held: HashSet<TenantId> = HashSet::new();
        let mut first = true;
        'pass: while !cancel.is_cancelled() {
            let mut tenants = parking::parked_tenants(&self.db, &self.pool_name).await?;
            if first {
                // Forget tenants with nothing parked; the map stays as small as the backlog.
                served.retain(|t, _| tenants.iter().any(|p| p.tenant == *t));
                any = !tenants.is_empty();
                first = false;
            }
            tenants.retain(|t| !held.contains(&t.tenant));
            sort_fairly(&mut tenants, served);
            for t in &tenants {
                if let Some(limit) =
                    parking::effective_limit(t.max_concurrent, self.limits.default_max_concurrent)
                    && t.active >= limit
                {
                    self.hold(t.tenant, limit, &mut held).await?;
                    continue;
                }
                loop {
                    let mut tx = self.db.begin().await?;
                    let Some(run) =
                        parking::lock_next(&mut tx, &self.pool_name, t.tenant, &full_labels)
                            .await?
                    else {
                        break;
                    };
                    let (run_id, labels) = (run.id, run.spec.labels.clone());
                    match assign_locked(tx, run, self.limits, &self.outbox).await? {
                        Outcome::Assigned {
                            agent_id,
                            epoch,
                            seq,
                        } => {
                            tracing::info!(%run_id, agent_id = %agent_id, epoch, "parked run assigned");
                            self.bus.run_event(run_id, seq);
                            served.insert(t.tenant, Instant::now());
                            assigned += 1;
                            // Counts changed: work the order out again.
                            continue 'pass;
                        }
                        Outcome::NoCapacity if labels.is_empty() => {
                            // Every agent of the pool matches no labels: the pool is full.
                            return Ok((assigned, any));
                        }
                        Outcome::NoCapacity => {
                            full_labels.push(serde_json::to_value(&labels).unwrap_or_default());
                        }
                        Outcome::OverQuota(q) => {
                            self.hold(t.tenant, q.limit, &mut held).await?;
                            break;
                        }
                        // Cannot happen under the row lock; move on to the next tenant.
                        Outcome::Obsolete | Outcome::UnknownRun | Outcome::BehindParked => break,
                    }
                }
            }
            break;
        }
        Ok((assigned, any))
    }

    /// Passes over a tenant at its quota for the rest of this drain, and records the limit
    /// on its parked runs for GetRun.
    async fn hold(
        &self,
        tenant: TenantId,
        limit: i64,
        held: &mut HashSet<TenantId>,
    ) -> Result<(), CoreError> {
        held.insert(tenant);
        parking::mark_over_quota(&self.db, &self.pool_name, tenant, limit).await
    }
}

/// The fair order of the module doc.
fn sort_fairly(tenants: &mut [ParkedTenant], served: &HashMap<TenantId, Instant>) {
    tenants.sort_by_key(|t| {
        (
            t.active_in_pool,
            // Never served sorts first (None < Some).
            served.get(&t.tenant).copied(),
            Reverse(t.head_priority),
            t.head_created_at,
            t.tenant.0,
        )
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::{TimeZone, Utc};

    fn tenant(n: u128, active: i64, priority: i32, age_s: i64) -> ParkedTenant {
        ParkedTenant {
            tenant: TenantId(uuid::Uuid::from_u128(n)),
            active_in_pool: active,
            active,
            max_concurrent: None,
            head_priority: priority,
            head_created_at: Utc
                .timestamp_opt(1_000_000 - age_s, 0)
                .single()
                .unwrap_or_default(),
        }
    }

    fn order(tenants: &mut [ParkedTenant], served: &HashMap<TenantId, Instant>) -> Vec<u128> {
        sort_fairly(tenants, served);
        tenants.iter().map(|t| t.tenant.0.as_u128()).collect()
    }

    #[test]
    fn fewest_active_first_then_least_recently_served_then_priority_then_age() {
        let none = HashMap::new();
        // A backlog tenant with 3 running loses to one with none, however old its runs.
        let mut ts = vec![tenant(1, 3, 0, 500), tenant(2, 0, 0, 1)];
        assert_eq!(order(&mut ts, &none), vec![2, 1]);
        // Equal activity: higher priority, then older.
        let mut ts = vec![
            tenant(1, 0, 0, 500),
            tenant(2, 0, 5, 1),
            tenant(3, 0, 0, 900),
        ];
        assert_eq!(order(&mut ts, &none), vec![2, 3, 1]);
        // Equal activity: the tenant served least recently goes first (one-slot pools
        // alternate instead of the older backlog winning every tie).
        let now = Instant::now();
        let served = HashMap::from([
            (TenantId(uuid::Uuid::from_u128(1)), now),
            (
                TenantId(uuid::Uuid::from_u128(3)),
                now - Duration::from_secs(1),
            ),
        ]);
        let mut ts = vec![tenant(1, 0, 9, 900), tenant(2, 0, 0, 1), tenant(3, 0, 0, 1)];
        assert_eq!(order(&mut ts, &served), vec![2, 3, 1]);
    }
}
