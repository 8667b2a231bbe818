//! RabbitMQ topology, declared idempotently by whoever needs it at start-up:
//!
//! ```text
//! drover.runs (direct) --pool--> drover.runs.<pool>   (quorum, x-delivery-limit, DLX)
//! drover.agents (direct) --id--> drover.agent.<id>    (quorum, x-delivery-limit, DLX)
//! drover.dlx (fanout) ---------> drover.dead          (quorum)
//! ```
//!
//! Declarations must agree everywhere (RabbitMQ refuses a re-declare with other arguments), so
//! they live only here.

use lapin::options::{ExchangeDeclareOptions, QueueBindOptions, QueueDeclareOptions};
use lapin::types::{AMQPValue, FieldTable};
use lapin::{Channel, ExchangeKind};

use crate::error::CoreError;

pub const RUNS_EXCHANGE: &str = "drover.runs";
pub const AGENTS_EXCHANGE: &str = "drover.agents";
pub const DEAD_LETTER_EXCHANGE: &str = "drover.dlx";
pub const DEAD_QUEUE: &str = "drover.dead";

pub fn run_queue(pool: &str) -> String {
    format!("drover.runs.{pool}")
}

pub fn agent_queue(agent_id: &str) -> String {
    format!("drover.agent.{agent_id}")
}

fn durable_exchange() -> ExchangeDeclareOptions {
    ExchangeDeclareOptions {
        durable: true,
        ..Default::default()
    }
}

fn quorum_args(delivery_limit: Option<u32>) -> FieldTable {
    let mut args = FieldTable::default();
    args.insert(
        "x-queue-type".into(),
        AMQPValue::LongString("quorum".into()),
    );
    if let Some(limit) = delivery_limit {
        args.insert(
            "x-delivery-limit".into(),
            AMQPValue::LongLongInt(i64::from(limit)),
        );
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString(DEAD_LETTER_EXCHANGE.into()),
        );
    }
    args
}

/// Exchanges and the dead-letter queue.
pub async fn declare_base(ch: &Channel) -> Result<(), CoreError> {
    for (name, kind) in [
        (RUNS_EXCHANGE, ExchangeKind::Direct),
        (AGENTS_EXCHANGE, ExchangeKind::Direct),
        (DEAD_LETTER_EXCHANGE, ExchangeKind::Fanout),
    ] {
        ch.exchange_declare(name.into(), kind, durable_exchange(), FieldTable::default())
            .await?;
    }
    ch.queue_declare(
        DEAD_QUEUE.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_args(None),
    )
    .await?;
    ch.queue_bind(
        DEAD_QUEUE.into(),
        DEAD_LETTER_EXCHANGE.into(),
        "".into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

async fn declare_bound_queue(
    ch: &Channel,
    queue: &str,
    exchange: &str,
    routing_key: &str,
    delivery_limit: u32,
) -> Result<(), CoreError> {
    declare_base(ch).await?;
    ch.queue_declare(
        queue.into(),
        QueueDeclareOptions {
            durable: true,
            ..Default::default()
        },
        quorum_args(Some(delivery_limit)),
    )
    .await?;
    ch.queue_bind(
        queue.into(),
        exchange.into(),
        routing_key.into(),
        QueueBindOptions::default(),
        FieldTable::default(),
    )
    .await?;
    Ok(())
}

/// The run queue of one pool, bound to `drover.runs` by the pool name.
pub async fn declare_pool_queue(
    ch: &Channel,
    pool: &str,
    delivery_limit: u32,
) -> Result<String, CoreError> {
    let queue = run_queue(pool);
    declare_bound_queue(ch, &queue, RUNS_EXCHANGE, pool, delivery_limit).await?;
    Ok(queue)
}

/// An agent's command queue, bound to `drover.agents` by the agent id. Durable, so commands
/// wait for an agent that restarts.
pub async fn declare_agent_queue(
    ch: &Channel,
    agent_id: &str,
    delivery_limit: u32,
) -> Result<String, CoreError> {
    let queue = agent_queue(agent_id);
    declare_bound_queue(ch, &queue, AGENTS_EXCHANGE, agent_id, delivery_limit).await?;
    Ok(queue)
}
