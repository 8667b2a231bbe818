//! The dead-letter archiver: consumes `drover.dead` and records every message in Postgres
//! (`dead_letters`), where operators list and redrive them (AdminService). It also settles
//! the run behind a run message the broker dead-lettered for exceeding the delivery limit:
//! such a run would otherwise wait QUEUED forever, so it becomes DEAD_LETTERED.
//!
//! What lands here: records of runs that exhausted their attempts (published by drover),
//! messages a consumer rejected (unparseable, unknown run), and messages over the queue's
//! `x-delivery-limit`. Each is acked only after its archive row commits; a redelivery is
//! recognised by its fingerprint and archived once.

use std::time::Duration;

use drover_core::messages::{self, AgentCommand, DeadRunRecord, RunMessage};
use drover_core::repo::dead_letters::{self, DeadKind, NewDeadLetter};
use drover_core::repo::{Transition, runs};
use drover_core::state::RunState;
use drover_core::{CoreError, amqp, topology};
use futures::StreamExt;
use lapin::message::Delivery;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions};
use lapin::types::{AMQPValue, FieldTable};
use secrecy::SecretString;
use sha2::{Digest, Sha256};
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;

pub struct Archiver {
    pub db: PgPool,
    pub amqp_url: SecretString,
}

impl Archiver {
    pub async fn run(self, cancel: CancellationToken) {
        loop {
            let Some(conn) =
                amqp::connect_with_retry(&self.amqp_url, "drover-dispatcher-dead", &cancel).await
            else {
                return;
            };
            match self.consume(&conn, &cancel).await {
                Ok(()) => return,
                Err(e) => {
                    tracing::warn!(error = %e, "dead-letter archiver ended; reconnecting");
                    tokio::select! {
                        _ = cancel.cancelled() => return,
                        _ = tokio::time::sleep(Duration::from_millis(500)) => {},
                    }
                }
            }
        }
    }

    async fn consume(
        &self,
        conn: &lapin::Connection,
        cancel: &CancellationToken,
    ) -> Result<(), CoreError> {
        let ch = conn.create_channel().await?;
        ch.basic_qos(16, BasicQosOptions::default()).await?;
        topology::declare_base(&ch).await?;
        let tag = format!("dead-archiver-{}", uuid::Uuid::now_v7());
        let mut consumer = ch
            .basic_consume(
                topology::DEAD_QUEUE.into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await?;
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return Ok(()),
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => self.handle(delivery, cancel).await,
                    Some(Err(e)) => return Err(e.into()),
                    None => return Err(lapin::Error::from(lapin::ErrorKind::InvalidConnectionState(
                        lapin::ConnectionState::Closed,
                    )).into()),
                },
            }
        }
    }

    async fn handle(&self, delivery: Delivery, cancel: &CancellationToken) {
        let mut backoff = Duration::from_millis(200);
        loop {
            match self.archive(&delivery).await {
                Ok(()) => {
                    amqp::settle("ack", delivery.ack(BasicAckOptions::default())).await;
                    return;
                }
                Err(e) => {
                    tracing::warn!(error = %e, "could not archive a dead letter; retrying");
                    tokio::select! {
                        _ = cancel.cancelled() => {
                            amqp::settle("requeue", delivery.nack(BasicNackOptions { requeue: true, ..Default::default() })).await;
                            return;
                        }
                        _ = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(5));
                }
            }
        }
    }

    async fn archive(&self, delivery: &Delivery) -> Result<(), CoreError> {
        let headers = delivery.properties.headers().clone().unwrap_or_default();
        let death_reason = header_str(&headers, "x-first-death-reason");
        let source_queue = header_str(&headers, "x-first-death-queue")
            .unwrap_or_else(|| topology::DEAD_LETTER_EXCHANGE.to_owned());
        let body = &delivery.data;
        let mut tx = self.db.begin().await?;
        // A run this dead letter ended, counted once committed.
        let mut ended = None;
        let mut letter = NewDeadLetter {
            tenant_id: None,
            run_id: None,
            kind: DeadKind::Rejected,
            reason: String::new(),
            source_queue: source_queue.clone(),
            payload: body.clone(),
            fingerprint: fingerprint(&headers, delivery, body),
        };

        if let Ok(record) = messages::decode::<DeadRunRecord>(body) {
            letter.kind = DeadKind::RunExhausted;
            letter.run_id = Some(record.run_id);
            letter.tenant_id = Some(record.tenant_id);
            letter.reason = format!("attempt {}: {}", record.attempt, record.reason);
            letter.source_queue = topology::DEAD_LETTER_EXCHANGE.to_owned();
            letter.fingerprint = format!("run_exhausted:{}:{}", record.run_id, record.attempt);
        } else {
            let named = named_run(body);
            let run = match named {
                Some((id, _)) => runs::get_unscoped(&self.db, id).await?,
                None => None,
            };
            letter.run_id = named.map(|(id, _)| id);
            letter.tenant_id = run.as_ref().map(|r| r.tenant_id);
            let over_limit = death_reason.as_deref() == Some("delivery_limit");
            letter.kind = if named.is_none() {
                DeadKind::Unparseable
            } else if run.is_none() {
                DeadKind::UnknownRun
            } else if over_limit {
                DeadKind::DeliveryLimit
            } else {
                DeadKind::Rejected
            };
            letter.reason = match letter.kind {
                DeadKind::Unparseable => {
                    format!("unparseable message from {source_queue}")
                }
                DeadKind::UnknownRun => format!("message from {source_queue} names an unknown run"),
                DeadKind::DeliveryLimit => {
                    format!("message from {source_queue} exceeded the queue's delivery limit")
                }
                _ => format!(
                    "rejected by a consumer of {source_queue} ({})",
                    death_reason.as_deref().unwrap_or("no reason given")
                ),
            };
            // A run message over the delivery limit leaves its run QUEUED with no message to
            // carry it: dead-letter the run too, so it is visible and redrivable.
            if let (DeadKind::DeliveryLimit, Some(run), Some((_, Some(attempt)))) =
                (letter.kind, run.as_ref(), named)
                && run.state == RunState::Queued
                && run.attempt == attempt
            {
                let t = Transition {
                    expected_attempt: Some(attempt),
                    reason: Some(format!(
                        "its message exceeded the delivery limit of {source_queue}"
                    )),
                    ..Transition::new(run.id, RunState::DeadLettered)
                };
                match runs::transition(&mut tx, &t).await {
                    Ok((_, event)) => ended = Some(event),
                    Err(CoreError::Refused(_)) => {}
                    Err(e) => return Err(e),
                }
            }
        }
        let new = dead_letters::record(&mut tx, &letter).await?;
        tx.commit().await?;
        if let Some(event) = &ended {
            drover_core::observe::record_transition(event);
        }
        if new {
            metrics::counter!(drover_core::observe::names::DEAD_LETTERS, "kind" => letter.kind.as_str())
                .increment(1);
            tracing::warn!(kind = letter.kind.as_str(), run_id = ?letter.run_id.map(|r| r.to_string()), source = %letter.source_queue, "dead letter archived");
        }
        Ok(())
    }
}

/// The run a body names, and the attempt when it is a run message.
fn named_run(body: &[u8]) -> Option<(drover_core::ids::RunId, Option<i32>)> {
    if let Ok(m) = messages::decode::<RunMessage>(body) {
        return Some((m.run_id, Some(m.attempt)));
    }
    match messages::decode::<AgentCommand>(body) {
        Ok(AgentCommand::Execute { run_id, .. } | AgentCommand::Cancel { run_id, .. }) => {
            Some((run_id, None))
        }
        _ => None,
    }
}

fn header_str(headers: &FieldTable, key: &str) -> Option<String> {
    match headers.inner().get(key)? {
        AMQPValue::LongString(s) => Some(String::from_utf8_lossy(s.as_bytes()).into_owned()),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

/// Same for a redelivery of one dead letter, different for two messages that merely share a
/// body (the broker stamps each death with its time and count).
fn fingerprint(headers: &FieldTable, delivery: &Delivery, body: &[u8]) -> String {
    let mut h = Sha256::new();
    h.update(format!("{:?}", headers.inner().get("x-death")));
    h.update(format!("{:?}", delivery.properties.message_id()));
    h.update(format!("{:?}", delivery.properties.timestamp()));
    h.update(body);
    hex::encode(h.finalize())
}
