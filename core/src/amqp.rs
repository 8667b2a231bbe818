//! RabbitMQ connections. Every long-lived user reconnects through [`connect_with_retry`], so a
//! broker restart costs a pause, never a silently dead consumer.

use std::time::Duration;

use backon::{ExponentialBuilder, Retryable};
use lapin::{Connection, ConnectionProperties};
use secrecy::{ExposeSecret, SecretString};
use tokio_util::sync::CancellationToken;

use crate::error::CoreError;

pub async fn connect(url: &SecretString, name: &str) -> Result<Connection, CoreError> {
    let props = ConnectionProperties::default().with_connection_name(name.into());
    Ok(Connection::connect(url.expose_secret(), props).await?)
}

/// Connects, retrying with capped exponential backoff until it succeeds or `cancel` fires
/// (then `None`).
pub async fn connect_with_retry(
    url: &SecretString,
    name: &str,
    cancel: &CancellationToken,
) -> Option<Connection> {
    let attempt = || async { connect(url, name).await };
    let retry = attempt
        .retry(
            ExponentialBuilder::default()
                .with_min_delay(Duration::from_millis(100))
                // backon's jitter adds up to one more delay, so a reconnect waits at most
                // ~4 s after the broker is back: commands and leases wait on it.
                .with_max_delay(Duration::from_secs(2))
                .with_jitter()
                .without_max_times(),
        )
        .notify(|err, after| {
            tracing::warn!(error = %err, retry_in_ms = after.as_millis() as u64, "rabbitmq connect failed");
        });
    tokio::select! {
        _ = cancel.cancelled() => None,
        res = retry => res.ok(),
    }
}

/// How long settling (ack, nack, reject) a delivery may take. lapin's settle futures wait for
/// the channel; on a connection that died without lapin noticing yet they can wait a long
/// time, and no consumer may stall on one (an agent's run would stay ASSIGNED while its
/// heartbeats keep the lease). An unsettled delivery goes back to its queue when the channel
/// closes, and every consumer handles redeliveries idempotently, so giving up loses nothing.
pub const SETTLE_TIMEOUT: Duration = Duration::from_secs(5);

/// Awaits one settle operation for at most [`SETTLE_TIMEOUT`]; failures are logged, never
/// returned (see above for why that is safe).
pub async fn settle<T>(what: &str, op: impl std::future::Future<Output = lapin::Result<T>>) {
    match tokio::time::timeout(SETTLE_TIMEOUT, op).await {
        Ok(Ok(_)) => {}
        Ok(Err(e)) => {
            tracing::warn!(error = %e, "could not {what} a delivery; it will be redelivered");
        }
        Err(_) => tracing::warn!(
            timeout_ms = SETTLE_TIMEOUT.as_millis() as u64,
            "could not {what} a delivery in time (broker connection gone?); it will be redelivered"
        ),
    }
}
