//! The run-queue consumer of one pool: prefetch-bounded, manual acks after the Postgres
//! commit (the assignment, or the parking of a run that cannot be placed now — see
//! [`crate::parked`]), reconnecting with backoff whenever the broker connection or consumer
//! ends (a consumer that silently stops is the classic failure this loop exists to prevent).

use std::sync::Arc;
use std::time::Duration;

use drover_core::events::EventBus;
use drover_core::messages::{self, RunMessage};
use drover_core::repo::{outbox, parking};
use drover_core::{amqp, telemetry, topology};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions,
    BasicRejectOptions,
};
use lapin::types::FieldTable;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::Instrument;

use crate::assign::{Limits, Outcome, try_assign};
use crate::settings::Settings;

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
        loop {
            tokio::select! {
                _ = cancel.cancelled() => {
                    // Stop intake; unacked deliveries return to the queue when the channel
                    // closes, after in-flight handlers have acked or nacked what they hold.
                    let _ = ch.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
                    return Ok(());
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => {
                        let this = self.clone();
                        let cancel = cancel.clone();
                        in_flight.spawn(async move { this.handle(delivery, cancel).await });
                    }
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    )).into()),
                },
            }
        }
    }

    async fn handle(&self, delivery: Delivery, cancel: CancellationToken) {
        let msg: RunMessage = match messages::decode(&delivery.data) {
            Ok(m) => m,
            Err(e) => {
                tracing::warn!(pool = %self.pool_name, error = %e, "unparseable run message dead-lettered");
                amqp::settle(
                    "reject",
                    delivery.reject(BasicRejectOptions { requeue: false }),
                )
                .await;
                return;
            }
        };
        // The assignment is a span of the run's trace, continuing the publisher's.
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
        self.assign(delivery, msg, cancel).instrument(span).await;
    }

    /// Assigns the run, waiting for capacity, then settles the message.
    async fn assign(&self, delivery: Delivery, msg: RunMessage, cancel: CancellationToken) {
        let received = std::time::Instant::now();
        let limits = Limits {
            lease_ttl_ms: i64::try_from(self.settings.lease.lease_ttl_ms).unwrap_or(i64::MAX),
            default_max_concurrent: self.settings.quota.max_concurrent_runs,
        };
        let mut db_backoff = Duration::from_millis(200);
        loop {
            let failed = match try_assign(&self.db, &msg, limits, &self.outbox).await {
                Ok(Outcome::Assigned {
                    agent_id,
                    epoch,
                    seq,
                }) => {
                    let span = tracing::Span::current();
                    span.record("agent_id", agent_id.as_str());
                    span.record("epoch", epoch);
                    tracing::info!(run_id = %msg.run_id, attempt = msg.attempt, agent_id = %agent_id, epoch, "run assigned");
                    amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
                    metrics::histogram!(drover_core::observe::names::DISPATCH_LATENCY)
                        .record(received.elapsed().as_secs_f64());
                    self.bus.run_event(msg.run_id, seq);
                    return;
                }
                Ok(Outcome::Obsolete) => {
                    tracing::debug!(run_id = %msg.run_id, attempt = msg.attempt, "duplicate or superseded message dropped");
                    amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
                    return;
                }
                Ok(Outcome::UnknownRun) => {
                    tracing::warn!(run_id = %msg.run_id, "message for unknown run dead-lettered");
                    amqp::settle(
                        "reject",
                        delivery.reject(BasicRejectOptions { requeue: false }),
                    )
                    .await;
                    return;
                }
                Ok(
                    waits @ (Outcome::NoCapacity | Outcome::OverQuota(_) | Outcome::BehindParked),
                ) => {
                    // Park it and ack, so the queue drains past it (one tenant's backlog must
                    // not hold the runs behind it); the scheduler assigns it in fair order.
                    let over = match waits {
                        Outcome::OverQuota(q) => Some(q.limit),
                        _ => None,
                    };
                    match parking::park(&self.db, msg.run_id, msg.attempt, over).await {
                        Ok(parked) => {
                            if parked {
                                tracing::debug!(run_id = %msg.run_id, pool = %self.pool_name, why = ?waits, "run parked");
                                metrics::counter!(drover_core::observe::names::RUNS_PARKED)
                                    .increment(1);
                                self.parked.notify_one();
                            }
                            amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
                            return;
                        }
                        Err(e) => e,
                    }
                }
                Err(e) => e,
            };
            tracing::warn!(run_id = %msg.run_id, error = %failed, "assignment failed; retrying");
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
