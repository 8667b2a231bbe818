//! drover-dispatcher: consumes the run queues of its pools and assigns each run to a live
//! agent with a free slot, under a new lease epoch, acking only after the Postgres commit.
//! A run that cannot be placed at once (no free slot, its tenant at its concurrency quota,
//! or other runs of its pool already waiting) is parked in Postgres and its message acked;
//! the pool's [`parked`] scheduler assigns parked runs fairly across tenants.
//! Runs the outbox relay for the agent commands it writes. Many dispatchers may run at once;
//! the conditional UPDATE and the agent row lock make them safe.
//!
//! Beside assignment it runs the [`reaper`] (expired leases, overrun timeouts, queue
//! timeouts) and the [`dead_letters`] archiver of `drover.dead`. It must not talk to agents
//! directly or execute anything.

pub mod assign;
pub mod consumer;
pub mod dead_letters;
pub mod parked;
pub mod reaper;
pub mod settings;

use std::sync::Arc;
use std::time::Duration;

use drover_core::events::EventBus;
use drover_core::observe::{self, Health};
use drover_core::outbox_relay::OutboxRelay;
use drover_core::spec::validate_pool;
use drover_core::{CoreError, db, pg_wakeup, repo};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

pub use settings::Settings;

#[derive(Debug, thiserror::Error)]
pub enum DispatcherError {
    #[error(transparent)]
    Core(#[from] CoreError),
    #[error("invalid pool {0:?}: {1}")]
    Pool(String, String),
    #[error("redis url is invalid: {0}")]
    Redis(#[from] redis::RedisError),
    #[error(transparent)]
    Observe(#[from] observe::ObserveError),
}

pub struct Dispatcher {
    settings: Arc<Settings>,
    db: PgPool,
    bus: Arc<EventBus>,
    metrics: Option<observe::Endpoint>,
    /// Postgres and migrations (checked every 2 s) and RabbitMQ (the pool consumers say
    /// whether they are consuming).
    health: Health,
}

impl Dispatcher {
    pub async fn build(settings: Settings) -> Result<Self, DispatcherError> {
        for p in &settings.pools {
            validate_pool(p).map_err(|e| DispatcherError::Pool(p.clone(), e.message))?;
        }
        let db = db::connect(&settings.database).await?;
        db::migrate(&db).await?;
        let bus = Arc::new(EventBus::new(&settings.redis.url, &settings.redis.prefix)?);
        let metrics = observe::bind(&settings.metrics).await?;
        Ok(Self {
            settings: Arc::new(settings),
            db,
            bus,
            metrics,
            health: Health::new(&["postgres", "migrations", "rabbitmq"]),
        })
    }

    /// Where `/metrics`, `/healthz` and `/readyz` are served, when configured.
    pub fn metrics_addr(&self) -> Option<std::net::SocketAddr> {
        self.metrics.as_ref().map(|m| m.addr)
    }

    pub async fn run_until_stopped(
        mut self,
        cancel: CancellationToken,
    ) -> Result<(), DispatcherError> {
        let tasks = TaskTracker::new();
        if let Some(endpoint) = self.metrics.take() {
            endpoint.spawn(self.health.clone(), cancel.child_token())?;
        }
        tasks.spawn(observe::watch_postgres(
            self.db.clone(),
            self.health.clone(),
            cancel.child_token(),
            |_| {},
        ));
        let capacity = pg_wakeup::spawn(self.db.clone(), repo::CAPACITY_CHANNEL, cancel.clone());
        let limits = assign::Limits {
            lease_ttl_ms: i64::try_from(self.settings.lease.lease_ttl_ms).unwrap_or(i64::MAX),
            default_max_concurrent: self.settings.quota.max_concurrent_runs,
        };
        // Created first: the consumers hand it the commands they write.
        let relay = OutboxRelay::new(
            self.db.clone(),
            self.settings.amqp.url.clone(),
            self.settings.amqp.delivery_limit,
            self.settings.relay.clone(),
            "drover-dispatcher",
        );
        let handoff = relay.handoff();
        for pool in &self.settings.pools {
            let parked = Arc::new(tokio::sync::Notify::new());
            let consumer = consumer::PoolConsumer {
                pool_name: pool.clone(),
                db: self.db.clone(),
                bus: self.bus.clone(),
                settings: self.settings.clone(),
                parked: parked.clone(),
                health: self.health.clone(),
                outbox: handoff.clone(),
            };
            tasks.spawn(consumer.run(cancel.child_token()));
            let scheduler = parked::ParkedScheduler {
                pool_name: pool.clone(),
                db: self.db.clone(),
                bus: self.bus.clone(),
                limits,
                recheck: Duration::from_millis(self.settings.capacity_recheck_ms.max(100)),
                capacity: capacity.clone(),
                parked,
                outbox: handoff.clone(),
            };
            tasks.spawn(scheduler.run(cancel.child_token()));
        }
        tasks.spawn(
            reaper::Reaper {
                db: self.db.clone(),
                bus: self.bus.clone(),
                settings: self.settings.reaper.clone(),
            }
            .run(cancel.child_token()),
        );
        tasks.spawn(
            drover_core::audit::Sealer {
                pool: self.db.clone(),
                settings: self.settings.audit.clone(),
            }
            .run(cancel.child_token()),
        );
        tasks.spawn(
            dead_letters::Archiver {
                db: self.db.clone(),
                amqp_url: self.settings.amqp.url.clone(),
            }
            .run(cancel.child_token()),
        );
        // The relay outlives the consumers briefly so commands of final assignments go out.
        let relay_token = CancellationToken::new();
        let relay_task = tokio::spawn(relay.run(relay_token.clone()));
        tracing::info!(pools = ?self.settings.pools, "drover-dispatcher running");

        cancel.cancelled().await;
        tasks.close();
        if tokio::time::timeout(Duration::from_secs(10), tasks.wait())
            .await
            .is_err()
        {
            tracing::warn!("consumers did not stop within 10 s");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        relay_token.cancel();
        let _ = relay_task.await;
        self.db.close().await;
        tracing::info!("drover-dispatcher stopped");
        Ok(())
    }
}
