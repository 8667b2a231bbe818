//! The run-queue consumer of one pool: prefetch-bounded, manual acks after the Postgres
//! commit (the assignment, or the parking of a run that cannot be placed now — see
//! [`crate::parked`]), reconnecting with backoff whenever the broker connection or consumer
//! ends (a consumer that silently stops is the classic failure this loop exists to prevent).

use std::sync::Arc;
use std::time::{Duration, Instant};

use drover_core::events::EventBus;
use drover_core::messages::{self, RunMessage};
use drover_core::repo::{outbox, parking};
use drover_core::{amqp, telemetry, topology};
use futures::{FutureExt, StreamExt};
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::sync::{Notify, Semaphore};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::assign::{BatchItem, Limits, Outcome, assign_batch, try_assign};
use crate::settings::Settings;

/// Most messages one batch assigns.
const MAX_BATCH: usize = 64;
/// Batches of one pool's consumer in flight at once: one in the database while the next
/// gathers, and two dispatchers' worth of overlap where agents are many.
const BATCHES_IN_FLIGHT: usize = 2;

#[derive(Clone)]
pub struct PoolConsumer {
    pub pool_name: String,
    pub db: PgPool,
    pub bus: Arc<EventBus>,
    pub settings: Arc<Settings>,
    /// Wakes this pool's parked-run scheduler after a run was parked.
    pub parked: Arc<Notify>,
    /// Its `rabbitmq` check: ok while consuming, failing while (re)connecting.
    pub health: drover_core::observe::Health,
    /// This process's outbox relay, for the agents' commands.
    pub outbox: outbox::Handoff,
}

impl PoolConsumer {
    pub async fn run(self, cancel: CancellationToken) {
        let in_flight = TaskTracker::new();
        loop {
            let Some(conn) = amqp::connect_with_retry(
                &self.settings.amqp.url,
                &format!("drover-dispatcher-{}", self.pool_name),
                &cancel,
            )
            .await
            else {
                break;
            };
            match self.consume(&conn, &cancel, &in_flight).await {
                Ok(()) => break,
                Err(e) => {
                    self.health
                        .set("rabbitmq", Err(format!("pool {}: {e}", self.pool_name)));
                    tracing::warn!(pool = %self.pool_name, error = %e, "consumer ended; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => break,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {},
                    }
                }
            }
        }
        in_flight.close();
        in_flight.wait().await;
    }

    /// Consumes until cancelled (Ok) or the channel breaks (Err).
    async fn consume(
        &self,
        conn: &lapin::Connection,
        cancel: &CancellationToken,
        in_flight: &TaskTracker,
    ) -> Result<(), drover_core::CoreError> {
        let ch = conn.create_channel().await?;
        ch.basic_qos(self.settings.amqp.prefetch, BasicQosOptions::default())
            .await?;
        let queue =
            topology::declare_pool_queue(&ch, &self.pool_name, self.settings.amqp.delivery_limit)
                .await?;
        let tag = format!("dispatcher-{}-{}", self.pool_name, uuid::Uuid::now_v7());
        let mut consumer = ch
            .basic_consume(
                queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        tracing::info!(pool = %self.pool_name, queue = %queue, "dispatcher consuming");
        self.health.set("rabbitmq", Ok(()));
        let batches = Arc::new(Semaphore::new(BATCHES_IN_FLIGHT));
        let stop = || async {
            // Stop intake; unacked deliveries return to the queue when the channel closes,
            // after in-flight handlers have acked or nacked what they hold.
            let _ = ch
                .basic_cancel(tag.as_str().into(), BasicCancelOptions::default())
                .await;
        };
        loop {
            // A free batch slot first, then whatever has arrived: while both batches are in
            // the database, deliveries gather and the next batch takes them all.
            let permit = tokio::select! {
                _ = cancel.cancelled() => {
                    stop().await;
                    return Ok(());
                }
                permit = batches.clone().acquire_owned() => match permit {
                    Ok(p) => p,
                    Err(_) => return Ok(()),
                },
            };
            let first = tokio::select! {
                _ = cancel.cancelled() => {
                    stop().await;
                    return Ok(());
                }
                next = consumer.next() => next,
            };
            let first = match first {
                Some(Ok(delivery)) => delivery,
                Some(Err(e)) => return Err(e.into()),
                None => {
                    return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    ))
                    .into());
                }
            };
            let mut batch = vec![first];
            let mut broken = None;
            while batch.len() < MAX_BATCH {
                match consumer.next().now_or_never() {
                    Some(Some(Ok(delivery))) => batch.push(delivery),
                    Some(Some(Err(e))) => {
                        broken = Some(e);
                        break;
                    }
                    // Nothing more ready now (or the stream ended: the next turn says so).
                    Some(None) | None => break,
                }
            }
            let this = self.clone();
            let cancel = cancel.clone();
            in_flight.spawn(async move {
                this.handle_batch(batch, cancel).await;
                drop(permit);
            });
            if let Some(e) = broken {
                return Err(e.into());
            }
        }
    }

    /// Decodes a batch (dead-lettering what does not parse), assigns it in one transaction
    /// and settles each message. If the batch fails as a whole (the database went away),
    /// each message takes the single-run path, which retries with backoff.
    async fn handle_batch(&self, deliveries: Vec<Delivery>, cancel: CancellationToken) {
        let received = Instant::now();
        let mut kept = Vec::with_capacity(deliveries.len());
        let mut items = Vec::with_capacity(deliveries.len());
        for delivery in deliveries {
            match messages::decode::<RunMessage>(&delivery.data) {
                Ok(msg) => {
                    let span = self.span(&msg, &delivery);
                    items.push(BatchItem { msg, span });
                    kept.push(delivery);
                }
                Err(e) => {
                    tracing::warn!(pool = %self.pool_name, error = %e, "unparseable run message dead-lettered");
                    amqp::settle(
                        "reject",
                        delivery.reject(BasicRejectOptions { requeue: false }),
                    )
                    .await;
                }
            }
        }
        if items.is_empty() {
            return;
        }
        let outcomes: Vec<Option<Outcome>> = match assign_batch(
            &self.db,
            &items,
            self.limits(),
            &self.outbox,
        )
        .await
        {
            Ok(outcomes) => outcomes.into_iter().map(Some).collect(),
            Err(e) => {
                tracing::warn!(pool = %self.pool_name, runs = items.len(), error = %e, "batch assignment failed; assigning one by one");
                (0..items.len()).map(|_| None).collect()
            }
        };
        metrics::histogram!(drover_core::observe::names::DISPATCH_BATCH).record(items.len() as f64);
        for ((delivery, item), outcome) in kept.into_iter().zip(items).zip(outcomes) {
            let BatchItem { msg, span } = item;
            let settled = match outcome {
                Some(outcome) => {
                    self.settle(&delivery, &msg, outcome, received)
                        .instrument(span.clone())
                        .await
                }
                None => Err(None),
            };
            if let Err(e) = settled {
                if let Some(e) = e {
                    tracing::warn!(run_id = %msg.run_id, error = %e, "parking failed; retrying");
                }
                self.assign(delivery, msg, received, cancel.clone())
                    .instrument(span)
                    .await;
            }
        }
    }

    /// The run's `dispatcher.assign` span, continuing the publisher's trace.
    fn span(&self, msg: &RunMessage, delivery: &Delivery) -> tracing::Span {
        let span = tracing::info_span!(
            "dispatcher.assign",
            otel.kind = "consumer",
            run_id = %msg.run_id,
            attempt = msg.attempt,
            tenant = %msg.tenant_id,
            pool = %self.pool_name,
            agent_id = tracing::field::Empty,
            epoch = tracing::field::Empty,
            trace_id = tracing::field::Empty,
        );
        telemetry::adopt(
            &span,
            telemetry::amqp_traceparent(&delivery.properties).as_deref(),
        );
        span
    }

    fn limits(&self) -> Limits {
        Limits {
            lease_ttl_ms: i64::try_from(self.settings.lease.lease_ttl_ms).unwrap_or(i64::MAX),
            default_max_concurrent: self.settings.quota.max_concurrent_runs,
        }
    }

    /// Acts on an assignment's outcome: acks (assigned, duplicate, or parked to wait for
    /// capacity or quota) or dead-letters (an unknown run). `Err` when parking failed, for
    /// the caller to retry the message.
    async fn settle(
        &self,
        delivery: &Delivery,
        msg: &RunMessage,
        outcome: Outcome,
        received: Instant,
    ) -> Result<(), Option<drover_core::CoreError>> {
        match outcome {
            Outcome::Assigned {
                agent_id,
                epoch,
                news,
            } => {
                let span = tracing::Span::current();
                span.record("agent_id", agent_id.as_str());
                span.record("epoch", epoch);
                tracing::info!(run_id = %msg.run_id, attempt = msg.attempt, agent_id = %agent_id, epoch, "run assigned");
                amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
                metrics::histogram!(drover_core::observe::names::DISPATCH_LATENCY)
                    .record(received.elapsed().as_secs_f64());
                self.bus.announce(news);
            }
            Outcome::Obsolete => {
                tracing::debug!(run_id = %msg.run_id, attempt = msg.attempt, "duplicate or superseded message dropped");
                amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
            }
            Outcome::UnknownRun => {
                tracing::warn!(run_id = %msg.run_id, "message for unknown run dead-lettered");
                amqp::settle(
                    "reject",
                    delivery.reject(BasicRejectOptions { requeue: false }),
                )
                .await;
            }
            waits @ (Outcome::NoCapacity | Outcome::OverQuota(_) | Outcome::BehindParked) => {
                // Park it and ack, so the queue drains past it (one tenant's backlog must not
                // hold the runs behind it); the scheduler assigns it in fair order.
                let over = match waits {
                    Outcome::OverQuota(q) => Some(q.limit),
                    _ => None,
                };
                let parked = parking::park(&self.db, msg.run_id, msg.attempt, over)
                    .await
                    .map_err(Some)?;
                if parked {
                    tracing::debug!(run_id = %msg.run_id, pool = %self.pool_name, why = ?waits, "run parked");
                    metrics::counter!(drover_core::observe::names::RUNS_PARKED).increment(1);
                    self.parked.notify_one();
                }
                amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
            }
        }
        Ok(())
    }

    /// The single-run path: assigns the run, retrying with backoff while the database fails,
    /// then settles the message.
    async fn assign(
        &self,
        delivery: Delivery,
        msg: RunMessage,
        received: Instant,
        cancel: CancellationToken,
    ) {
        let mut db_backoff = Duration::from_millis(200);
        loop {
            let failed = match try_assign(&self.db, &msg, self.limits(), &self.outbox).await {
                Ok(outcome) => match self.settle(&delivery, &msg, outcome, received).await {
                    Ok(()) => return,
                    Err(e) => e,
                },
                Err(e) => Some(e),
            };
            if let Some(failed) = failed {
                tracing::warn!(run_id = %msg.run_id, error = %failed, "assignment failed; retrying");
            }
            tokio::select! {
                _ = cancel.cancelled() => break,
                _ = tokio::time::sleep(db_backoff) => {},
            }
            db_backoff = (db_backoff * 2).min(Duration::from_secs(5));
        }
        // Shutting down: hand the message back for another dispatcher.
        let requeue = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        amqp::settle("requeue", delivery.nack(requeue)).await;
    }
}
