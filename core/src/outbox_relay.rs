//! The outbox relay: publishes committed outbox rows to RabbitMQ with publisher confirms and
//! marks them published. Runs in every API and dispatcher process; a claim leases its rows
//! for `claim_lease_ms` (no transaction stays open across the publish) and keeps relays off
//! each other's rows. A crash between confirm and mark, or a publish outliving its lease,
//! republishes a row, which receivers recognise as a duplicate (messages carry ids and
//! fencing numbers only).
//!
//! Publishes are `mandatory`: an unroutable message (no queue bound yet) comes back and the row
//! is retried later with backoff instead of vanishing. Pool queues are declared on first use.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, Connection};
use secrecy::SecretString;
use sqlx::PgPool;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::config::RelaySettings;
use crate::error::CoreError;
use crate::messages::CONTENT_TYPE;
use crate::repo::outbox;
use crate::{amqp, pg_wakeup, telemetry, topology};

pub struct OutboxRelay {
    pool: PgPool,
    amqp_url: SecretString,
    delivery_limit: u32,
    settings: RelaySettings,
    name: String,
}

struct Link {
    _conn: Connection,
    channel: Channel,
    declared_pools: HashSet<String>,
}

impl OutboxRelay {
    pub fn new(
        pool: PgPool,
        amqp_url: SecretString,
        delivery_limit: u32,
        settings: RelaySettings,
        name: impl Into<String>,
    ) -> Self {
        Self {
            pool,
            amqp_url,
            delivery_limit,
            settings,
            name: name.into(),
        }
    }

    /// Runs until `cancel` fires.
    pub async fn run(self, cancel: CancellationToken) {
        let wake: Arc<Notify> = pg_wakeup::spawn(
            self.pool.clone(),
            crate::repo::OUTBOX_CHANNEL,
            cancel.clone(),
        );
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let mut link: Option<Link> = None;
        loop {
            // Register interest before draining so a NOTIFY during the drain is not lost.
            let notified = wake.notified();
            tokio::pin!(notified);
            notified.as_mut().enable();

            if link.is_none() {
                link = self.open(&cancel).await;
                if link.is_none() {
                    return; // cancelled while connecting
                }
            }
            // When to look again if no NOTIFY comes, from the drain's last claim.
            let mut next_due = Err(());
            if let Some(l) = link.as_mut() {
                loop {
                    let batch = self.publish_batch(l).await;
                    next_due = batch.as_ref().map(|(_, due)| *due).map_err(drop);
                    match batch.map(|(n, _)| n) {
                        Ok(0) => break,
                        // A short batch took every row due and unclaimed when it looked: rows
                        // written since will wake this loop (the NOTIFY interest is already
                        // registered), so another look now would find nothing. At a steady
                        // trickle that look was most of the relay's queries.
                        Ok(n) if (n as i64) < self.settings.batch_size => {
                            tracing::debug!(published = n, "outbox batch published");
                            break;
                        }
                        Ok(n) => tracing::debug!(published = n, "outbox batch published"),
                        Err(e) => {
                            tracing::warn!(error = %e, "outbox relay batch failed");
                            if matches!(e, CoreError::Amqp(_)) || !l.channel.status().connected() {
                                link = None;
                            }
                            break;
                        }
                    }
                }
            }
            // Sleep until a NOTIFY, the next delayed row falls due, or the poll interval.
            let due = match next_due {
                Ok(due) => due,
                // The drain failed before it could say: ask.
                Err(()) => outbox::next_due_in(&self.pool).await.ok().flatten(),
            };
            let nap = due.map_or(poll, |d| d.clamp(Duration::from_millis(20), poll));
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = &mut notified => {},
                _ = tokio::time::sleep(nap) => {},
            }
        }
    }

    async fn open(&self, cancel: &CancellationToken) -> Option<Link> {
        loop {
            let conn =
                amqp::connect_with_retry(&self.amqp_url, &format!("{}-relay", self.name), cancel)
                    .await?;
            let setup = async {
                let channel = conn.create_channel().await?;
                channel
                    .confirm_select(ConfirmSelectOptions::default())
                    .await?;
                topology::declare_base(&channel).await?;
                Ok::<_, CoreError>(channel)
            };
            match setup.await {
                Ok(channel) => {
                    tracing::info!("outbox relay connected to rabbitmq");
                    return Some(Link {
                        _conn: conn,
                        channel,
                        declared_pools: HashSet::new(),
                    });
                }
                Err(e) => {
                    tracing::warn!(error = %e, "outbox relay channel setup failed");
                    tokio::select! {
                        _ = cancel.cancelled() => return None,
                        _ = tokio::time::sleep(Duration::from_secs(1)) => {},
                    }
                }
            }
        }
    }

    /// Publishes one batch of due rows; returns how many were published, and how long until
    /// the earliest row it left falls due.
    async fn publish_batch(&self, link: &mut Link) -> Result<(usize, Option<Duration>), CoreError> {
        let outbox::Claim { rows, next_due } = outbox::claim(
            &self.pool,
            self.settings.batch_size,
            i64::try_from(self.settings.claim_lease_ms).unwrap_or(i64::MAX),
        )
        .await?;
        if rows.is_empty() {
            return Ok((0, next_due));
        }
        for row in &rows {
            if row.exchange == topology::RUNS_EXCHANGE
                && !link.declared_pools.contains(&row.routing_key)
            {
                topology::declare_pool_queue(&link.channel, &row.routing_key, self.delivery_limit)
                    .await?;
                link.declared_pools.insert(row.routing_key.clone());
            }
        }
        // Pipeline the publishes, then collect the confirms.
        let sent_at = std::time::Instant::now();
        let mut pending = Vec::with_capacity(rows.len());
        for row in &rows {
            let mut props = BasicProperties::default()
                .with_delivery_mode(2)
                .with_content_type(CONTENT_TYPE.into())
                .with_message_id(format!("outbox-{}", row.id).into());
            // The publish is a span of the trace that wrote the row, and the message carries
            // it on to whoever consumes it.
            let span = publish_span(row);
            let traceparent = telemetry::traceparent_of(&span).or_else(|| row.traceparent.clone());
            if let Some(headers) = telemetry::amqp_headers(traceparent.as_deref()) {
                props = props.with_headers(headers);
            }
            let confirm = link
                .channel
                .basic_publish(
                    row.exchange.as_str().into(),
                    row.routing_key.as_str().into(),
                    BasicPublishOptions {
                        mandatory: true,
                        ..Default::default()
                    },
                    &row.payload,
                    props,
                )
                .instrument(span.clone())
                .await;
            pending.push((row.id, confirm, span));
        }
        let mut published = Vec::with_capacity(rows.len());
        let mut broken: Option<lapin::Error> = None;
        for (id, confirm, span) in pending {
            let outcome = match confirm {
                Ok(c) => c.instrument(span).await,
                Err(e) => Err(e),
            };
            match outcome {
                Ok(Confirmation::Ack(None)) => published.push(id),
                Ok(Confirmation::Ack(Some(_))) => {
                    tracing::warn!(outbox_id = id, "message unroutable; will retry");
                    outbox::mark_failed(&self.pool, id, "unroutable: no queue bound").await?;
                }
                Ok(Confirmation::Nack(_)) => {
                    outbox::mark_failed(&self.pool, id, "nacked by broker").await?;
                }
                Ok(Confirmation::NotRequested) => published.push(id),
                Err(e) => {
                    outbox::mark_failed(&self.pool, id, "publish failed").await?;
                    broken.get_or_insert(e);
                }
            }
        }
        metrics::histogram!(crate::observe::names::PUBLISH_CONFIRM)
            .record(sent_at.elapsed().as_secs_f64());
        outbox::mark_published(&self.pool, &published).await?;
        metrics::counter!(crate::observe::names::OUTBOX_PUBLISHED)
            .increment(published.len() as u64);
        if let Some(e) = broken {
            return Err(e.into());
        }
        // A row put back for a retry is due later than the claim saw.
        let next_due = if published.len() < rows.len() {
            Some(next_due.map_or(Duration::from_millis(100), |d| {
                d.min(Duration::from_millis(100))
            }))
        } else {
            next_due
        };
        Ok((published.len(), next_due))
    }
}

/// The span of one row's publish, in the row's trace; none for a row written outside any.
fn publish_span(row: &outbox::OutboxRow) -> tracing::Span {
    let Some(parent) = row.traceparent.as_deref() else {
        return tracing::Span::none();
    };
    let span = tracing::info_span!(
        "outbox.publish",
        otel.kind = "producer",
        messaging.system = "rabbitmq",
        exchange = %row.exchange,
        routing_key = %row.routing_key,
        outbox_id = row.id,
        trace_id = tracing::field::Empty,
    );
    telemetry::adopt(&span, Some(parent));
    span
}
