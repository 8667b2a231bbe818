//! The agent's intake: consumes its own command queue `drover.agent.<id>` with manual acks and
//! a prefetch of its capacity, hands each command to an execution task, and reconnects with
//! backoff whenever the connection or the consumer ends. Unparseable commands are rejected
//! without requeue, so the queue's dead-letter exchange moves them to `drover.dead`.
//!
//! - `Execute` spawns an execution (which hands the lease straight back if the agent is
//!   draining by the time it would start the container).
//! - `Cancel` signals the execution holding that lease; a lease not executing here is ignored.
//!   Cancelling is idempotent, so this path, the heartbeat's and `GetAssignment`'s may all
//!   deliver the same cancel. The grace between SIGTERM and SIGKILL is the spec's
//!   `cancel_grace_secs` (the command's `grace_secs` is the same value, copied by the API), so
//!   every path terminates the same way.
//! - `Drain` starts the agent's drain, as SIGTERM does.
//!
//! When the agent drains, the consumer is cancelled (intake stops), deliveries already on
//! their way are still handled, and [`CommandConsumer::sweep`] later empties the queue of commands that
//! arrived afterwards (their runs are handed back, not left to lease expiry).

use std::sync::Arc;
use std::time::Duration;

use drover_core::amqp::{self, connect_with_retry};
use drover_core::config::AmqpSettings;
use drover_core::ids::AgentId;
use drover_core::messages::{self, AgentCommand};
use drover_core::topology::declare_agent_queue;
use futures::StreamExt;
use lapin::Acker;
use lapin::message::Delivery;
use lapin::options::{
    BasicAckOptions, BasicCancelOptions, BasicConsumeOptions, BasicGetOptions, BasicNackOptions,
    BasicQosOptions, BasicRejectOptions,
};
use lapin::types::FieldTable;
use lapin::{Channel, Connection};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::execution::{self, ExecuteCommand, RunContext};
use crate::running::Signalled;

/// Pause before reconnecting after a consumer ended on a live connection, so a broker that
/// keeps cancelling us is not hammered.
const RECONNECT_PAUSE: Duration = Duration::from_secs(1);
/// After cancelling the consumer, how long deliveries already sent to us may still arrive.
const IN_FLIGHT_AFTER_CANCEL: Duration = Duration::from_secs(2);
/// Most commands one [`CommandConsumer::sweep`] takes, so commands requeued while the API is unreachable
/// cannot keep it going forever.
const SWEEP_LIMIT: usize = 1000;

/// A connection with the agent's queue declared and its prefetch set.
pub struct AmqpSession {
    pub connection: Connection,
    channel: Channel,
    queue: String,
}

/// Connects (retrying) and declares the topology and the agent's queue. `None` when `cancel`
/// fires first. Declaring before registering means commands routed to this agent are queued
/// from the moment the API knows it.
pub async fn open_session(
    amqp: &AmqpSettings,
    agent_id: &AgentId,
    prefetch: u16,
    cancel: &CancellationToken,
) -> Option<AmqpSession> {
    let name = format!("drover-agent {agent_id}");
    loop {
        let connection = connect_with_retry(&amqp.url, &name, cancel).await?;
        match prepare(&connection, agent_id, amqp.delivery_limit, prefetch).await {
            Ok((channel, queue)) => {
                tracing::info!(%queue, prefetch, "command queue ready");
                return Some(AmqpSession {
                    connection,
                    channel,
                    queue,
                });
            }
            Err(e) => {
                tracing::warn!(error = %e, "could not set up the command queue; reconnecting");
                if pause(cancel).await {
                    return None;
                }
            }
        }
    }
}

async fn prepare(
    connection: &Connection,
    agent_id: &AgentId,
    delivery_limit: u32,
    prefetch: u16,
) -> Result<(Channel, String), drover_core::CoreError> {
    let channel = connection.create_channel().await?;
    let queue = declare_agent_queue(&channel, agent_id.as_str(), delivery_limit).await?;
    channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await?;
    Ok((channel, queue))
}

/// Sleeps [`RECONNECT_PAUSE`]; true when cancelled meanwhile.
async fn pause(cancel: &CancellationToken) -> bool {
    tokio::select! {
        _ = cancel.cancelled() => true,
        _ = tokio::time::sleep(RECONNECT_PAUSE) => false,
    }
}

enum Ended {
    Cancelled,
    Broken,
}

pub struct CommandConsumer {
    pub amqp: AmqpSettings,
    pub agent_id: AgentId,
    pub prefetch: u16,
    pub ctx: Arc<RunContext>,
    pub tracker: TaskTracker,
    /// Fired by a `Drain` command.
    pub drain: CancellationToken,
}

impl CommandConsumer {
    /// Consumes until `cancel` fires, then cancels the consumer (stops intake) and returns the
    /// live session: it must stay open while executions drain so their acks still land, and
    /// [`CommandConsumer::sweep`] uses it.
    pub async fn run(&self, first: AmqpSession, cancel: &CancellationToken) -> Option<AmqpSession> {
        let mut next = Some(first);
        loop {
            let session = match next.take() {
                Some(s) => s,
                None => open_session(&self.amqp, &self.agent_id, self.prefetch, cancel).await?,
            };
            match self.consume(&session, cancel).await {
                Ended::Cancelled => return Some(session),
                Ended::Broken => {
                    // Unacked commands go back to the queue with the old channel and are
                    // redelivered; executions already running recognise them as duplicates.
                    drop(session);
                    if pause(cancel).await {
                        return None;
                    }
                }
            }
        }
    }

    async fn consume(&self, session: &AmqpSession, cancel: &CancellationToken) -> Ended {
        let tag = format!("drover-agent-{}", self.agent_id);
        let consumer = session
            .channel
            .basic_consume(
                session.queue.as_str().into(),
                tag.as_str().into(),
                BasicConsumeOptions::default(),
                FieldTable::default(),
            )
            .await;
        let mut consumer = match consumer {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "could not start consuming; reconnecting");
                return Ended::Broken;
            }
        };
        tracing::info!(queue = %session.queue, "consuming commands");
        loop {
            tokio::select! {
                biased;
                _ = cancel.cancelled() => {
                    if let Err(e) = session
                        .channel
                        .basic_cancel(consumer.tag(), BasicCancelOptions::default())
                        .await
                    {
                        tracing::warn!(error = %e, "could not cancel the consumer cleanly");
                    }
                    tracing::info!("stopped consuming commands");
                    // Deliveries the broker sent before the cancel: handle them, or they sit
                    // unacknowledged until the connection closes.
                    let _ = tokio::time::timeout(IN_FLIGHT_AFTER_CANCEL, async {
                        while let Some(Ok(delivery)) = consumer.next().await {
                            self.dispatch(delivery).await;
                        }
                    })
                    .await;
                    return Ended::Cancelled;
                }
                next = consumer.next() => match next {
                    Some(Ok(delivery)) => self.dispatch(delivery).await,
                    Some(Err(e)) => {
                        tracing::warn!(error = %e, "command consumer failed; reconnecting");
                        return Ended::Broken;
                    }
                    None => {
                        tracing::warn!("command consumer ended; reconnecting");
                        return Ended::Broken;
                    }
                },
            }
        }
    }

    async fn dispatch(&self, delivery: Delivery) {
        let traceparent = drover_core::telemetry::amqp_traceparent(&delivery.properties);
        let ack = CommandAck(delivery.acker);
        let command = match messages::decode::<AgentCommand>(&delivery.data) {
            Ok(c) => c,
            Err(e) => {
                tracing::warn!(error = %e, "unparseable command; dead-lettering it");
                ack.dead_letter().await;
                return;
            }
        };
        match command {
            AgentCommand::Execute {
                run_id,
                tenant_id,
                attempt,
                lease_epoch,
            } => {
                if attempt < 1 || lease_epoch.0 < 1 {
                    tracing::warn!(%run_id, attempt, epoch = %lease_epoch, "command with impossible attempt or epoch; dead-lettering it");
                    ack.dead_letter().await;
                    return;
                }
                let cmd = ExecuteCommand {
                    run_id,
                    tenant_id,
                    attempt,
                    lease_epoch,
                    traceparent,
                };
                self.tracker
                    .spawn(execution::execute(self.ctx.clone(), cmd, ack));
            }
            AgentCommand::Cancel {
                run_id,
                lease_epoch,
                grace_secs,
            } => {
                match self.ctx.runs.cancel(run_id, lease_epoch) {
                    Signalled::Now => {
                        tracing::info!(%run_id, epoch = %lease_epoch, grace_secs, "cancel command: cancelling the execution");
                    }
                    Signalled::Already => {
                        tracing::debug!(%run_id, epoch = %lease_epoch, "cancel command for an execution already cancelling");
                    }
                    Signalled::NotHere => {
                        tracing::info!(%run_id, epoch = %lease_epoch, "cancel command for a lease not executing here; ignoring it");
                    }
                }
                ack.ack().await;
            }
            AgentCommand::Drain => {
                tracing::info!("drain command received");
                self.drain.cancel();
                ack.ack().await;
            }
        }
    }

    /// Takes every command still in the queue (at most [`SWEEP_LIMIT`]) and handles it as a
    /// delivery: once the agent drains, `Execute` hands its lease back. Returns how many.
    pub async fn sweep(&self, session: &AmqpSession) -> usize {
        let mut taken = 0;
        while taken < SWEEP_LIMIT {
            let got = session
                .channel
                .basic_get(
                    session.queue.as_str().into(),
                    BasicGetOptions { no_ack: false },
                )
                .await;
            match got {
                Ok(Some(message)) => {
                    taken += 1;
                    self.dispatch(message.delivery).await;
                }
                Ok(None) => break,
                Err(e) => {
                    tracing::warn!(error = %e, "could not sweep the command queue");
                    break;
                }
            }
        }
        taken
    }
}

/// The settlement of one delivery. Each method consumes it, so a command is settled once.
/// Failures are logged, not returned: an unsettled command is redelivered, and a redelivery
/// is recognised (same lease, same container name) and handled idempotently.
pub struct CommandAck(Acker);

impl CommandAck {
    /// Done with it: executed (or executing, with Docker as the journal) or stale.
    pub async fn ack(self) {
        amqp::settle("ack", self.0.ack(BasicAckOptions::default())).await;
    }

    /// Could not act on it now (API unreachable); try again later. Counts towards the
    /// queue's delivery limit.
    pub async fn requeue(self) {
        let opts = BasicNackOptions {
            requeue: true,
            ..Default::default()
        };
        amqp::settle("requeue", self.0.nack(opts)).await;
    }

    /// Never processable: to `drover.dead` through the queue's dead-letter exchange.
    pub async fn dead_letter(self) {
        amqp::settle(
            "dead-letter",
            self.0.reject(BasicRejectOptions { requeue: false }),
        )
        .await;
    }
}
