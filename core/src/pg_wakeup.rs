//! Turns Postgres NOTIFY on one channel into a [`tokio::sync::Notify`] wake-up, so waiters
//! react to commits at once instead of polling tightly. A lost listener connection also wakes
//! everyone (notifications may have been missed); waiters keep a slow poll as a backstop.

use std::sync::Arc;
use std::time::Duration;

use sqlx::PgPool;
use sqlx::postgres::PgListener;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

/// Spawns the listener task; it ends when `cancel` fires.
pub fn spawn(pool: PgPool, channel: &'static str, cancel: CancellationToken) -> Arc<Notify> {
    let notify = Arc::new(Notify::new());
    let wake = notify.clone();
    tokio::spawn(async move {
        let mut listener: Option<PgListener> = None;
        loop {
            if listener.is_none() {
                let attempt = async {
                    let mut l = PgListener::connect_with(&pool).await?;
                    l.listen(channel).await?;
                    Ok::<_, sqlx::Error>(l)
                };
                match attempt.await {
                    Ok(l) => {
                        listener = Some(l);
                        wake.notify_waiters();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, channel, "postgres listen failed; retrying");
                        tokio::select! {
                            _ = cancel.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                        }
                    }
                }
            }
            let Some(l) = listener.as_mut() else { continue };
            tokio::select! {
                _ = cancel.cancelled() => return,
                msg = l.try_recv() => match msg {
                    Ok(Some(_)) => wake.notify_waiters(),
                    Ok(None) => wake.notify_waiters(),
                    Err(e) => {
                        tracing::warn!(error = %e, channel, "postgres listener lost");
                        listener = None;
                        wake.notify_waiters();
                    }
                },
            }
        }
    });
    notify
}
