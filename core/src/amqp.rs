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
                .with_max_delay(Duration::from_secs(5))
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
