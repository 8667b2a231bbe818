//! The outbox relay: publishes committed outbox rows to RabbitMQ with publisher confirms and
//! marks them published (in batches across publishes, [`crate::outbox_marks`]). Runs in
//! every API and dispatcher process; a claim leases its rows for `claim_lease_ms` (no
//! transaction stays open across the publish) and keeps relays off each other's rows. A crash between confirm and mark, or a publish outliving its lease,
//! republishes a row, which receivers recognise as a duplicate (messages carry ids and
//! fencing numbers only).
//!
//! The hot paths (a submit, an assignment) skip the claim: they write their row already leased
//! to their own process (`available_at` one lease ahead, no NOTIFY) and, once the transaction
//! has committed, hand it to this relay through [`outbox::Handoff`], which publishes it at
//! once. Other relays are not woken and make no empty claims; a row whose process died before
//! publishing it goes out with any relay's next drain after its lease. Per run that was four
//! claim statements and two NOTIFY wake-ups of every relay.
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
use crate::{amqp, outbox_marks, pg_wakeup, telemetry, topology};

/// Hand-offs waiting for the relay; beyond this a row waits out its lease for a drain.
const HANDOFF_QUEUE: usize = 4096;

pub struct OutboxRelay {
    pool: PgPool,
    amqp_url: SecretString,
    delivery_limit: u32,
    settings: RelaySettings,
    name: String,
    handoff: outbox::Handoff,
    handed: Option<tokio::sync::mpsc::Receiver<outbox::OutboxRow>>,
    /// Set while running: published rows go here to be marked ([`crate::outbox_marks`]).
    marks: Option<outbox_marks::Marks>,
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
        let lease_ms = i64::try_from(settings.claim_lease_ms).unwrap_or(i64::MAX);
        let (handoff, handed) = outbox::Handoff::channel(lease_ms, HANDOFF_QUEUE);
        Self {
            pool,
            amqp_url,
            delivery_limit,
            settings,
            name: name.into(),
            handoff,
            handed: Some(handed),
            marks: None,
        }
    }

    /// The handle through which this process gives its relay the rows it wrote pre-leased
    /// ([`outbox::Handoff`]).
    pub fn handoff(&self) -> outbox::Handoff {
        self.handoff.clone()
    }

    /// Runs until `cancel` fires, then writes the marks it still holds.
    pub async fn run(mut self, cancel: CancellationToken) {
        let (marks, marker) = outbox_marks::spawn(self.pool.clone());
        self.marks = Some(marks);
        self.serve(cancel).await;
        self.marks = None;
        marker.finish().await;
    }

    async fn serve(&mut self, cancel: CancellationToken) {
        let wake: Arc<Notify> = pg_wakeup::spawn(
            self.pool.clone(),
            crate::repo::OUTBOX_CHANNEL,
            cancel.clone(),
        );
        let Some(mut handed) = self.handed.take() else {
            return;
        };
        let poll = Duration::from_millis(self.settings.poll_interval_ms);
        let mut link: Option<Link> = None;
        // Interest in a NOTIFY is registered before each drain so one sent during the drain is
        // not lost; it is kept across hand-offs, which do not drain.
        let mut notified = Box::pin(wake.notified());
        notified.as_mut().enable();
        let mut drain = true;
        let mut deadline = tokio::time::Instant::now();
        loop {
            if link.is_none() {
                link = self.open(&cancel).await;
                if link.is_none() {
                    return; // cancelled while connecting
                }
            }
            if drain {
                let next_due = self.drain(&mut link).await;
                // Sleep until a NOTIFY, the next delayed row falls due, or the poll interval.
                let due = match next_due {
                    Ok(due) => due,
                    // The drain failed before it could say: ask.
                    Err(()) => outbox::next_due_in(&self.pool).await.ok().flatten(),
                };
                let nap = due.map_or(poll, |d| d.clamp(Duration::from_millis(20), poll));
                deadline = tokio::time::Instant::now() + nap;
            }
            tokio::select! {
                _ = cancel.cancelled() => {
                    self.flush_handed(&mut handed, link.as_mut()).await;
                    return;
                },
                _ = notified.as_mut() => {
                    notified = Box::pin(wake.notified());
                    notified.as_mut().enable();
                    drain = true;
                },
                _ = tokio::time::sleep_until(deadline) => drain = true,
                Some(row) = handed.recv() => {
                    drain = false;
                    let mut rows = vec![row];
                    let most = usize::try_from(self.settings.batch_size).unwrap_or(1).max(1);
                    while rows.len() < most {
                        match handed.try_recv() {
                            Ok(row) => rows.push(row),
                            Err(_) => break,
                        }
                    }
                    if let Some(l) = link.as_mut() {
                        // A row not published here keeps its lease and goes out with a drain
                        // once the lease ends.
                        if let Err(e) = self.publish_rows(l, &rows).await {
                            tracing::warn!(error = %e, rows = rows.len(), "publishing handed-off outbox rows failed");
                            if matches!(e, CoreError::Amqp(_)) || !l.channel.status().connected() {
                                link = None;
                            }
                        }
                    }
                },
            }
        }
    }

    /// On the way out: publishes what was handed and not yet published (bounded to 2 s), so a
    /// stopping process's last rows do not wait out their lease.
    async fn flush_handed(
        &self,
        handed: &mut tokio::sync::mpsc::Receiver<outbox::OutboxRow>,
        link: Option<&mut Link>,
    ) {
        let mut rows = Vec::new();
        while let Ok(row) = handed.try_recv() {
            rows.push(row);
        }
        let Some(l) = link else { return };
        if rows.is_empty() {
            return;
        }
        match tokio::time::timeout(Duration::from_secs(2), self.publish_rows(l, &rows)).await {
            Ok(Ok(n)) => tracing::debug!(published = n, "handed-off outbox rows flushed"),
            Ok(Err(e)) => {
                tracing::warn!(error = %e, "flushing handed-off outbox rows failed; they go out after their lease")
            }
            Err(_) => tracing::warn!(
                "flushing handed-off outbox rows timed out; they go out after their lease"
            ),
        }
    }

    /// Publishes claimed batches until a short one; returns when the earliest row left falls
    /// due (`Err` if a batch failed before it could say).
    async fn drain(&self, link: &mut Option<Link>) -> Result<Option<Duration>, ()> {
        let mut next_due = Err(());
        let Some(l) = link.as_mut() else {
            return next_due;
        };
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
                        *link = None;
                    }
                    break;
                }
            }
        }
        next_due
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
        let published = self.publish_rows(link, &rows).await?;
        // A row put back for a retry is due later than the claim saw.
        let next_due = if published < rows.len() {
            Some(next_due.map_or(Duration::from_millis(100), |d| {
                d.min(Duration::from_millis(100))
            }))
        } else {
            next_due
        };
        Ok((published, next_due))
    }

    /// Publishes `rows`, which this relay holds leased, and marks them; returns how many were
    /// published (the others are put back for a later try).
    async fn publish_rows(
        &self,
        link: &mut Link,
        rows: &[outbox::OutboxRow],
    ) -> Result<usize, CoreError> {
        for row in rows {
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
        for row in rows {
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
        let count = published.len();
        let unqueued = match self.marks.as_ref() {
            Some(marks) => marks.mark(published).err(),
            None => Some(published),
        };
        if let Some(ids) = unqueued {
            outbox::mark_published(&self.pool, &ids).await?;
        }
        metrics::counter!(crate::observe::names::OUTBOX_PUBLISHED).increment(count as u64);
        if let Some(e) = broken {
            return Err(e.into());
        }
        Ok(count)
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
