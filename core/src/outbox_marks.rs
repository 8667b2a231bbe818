//! Marks published outbox rows in Postgres in batches gathered across publishes, off the
//! relay's path: one UPDATE per publish was 0.7 statements per run at saturation, and the
//! relay waited for it before publishing the next rows.
//!
//! A mark that is late or lost changes nothing a receiver can see: the row stays leased to
//! this relay until its lease ends (`claim_lease_ms`, seconds, against a gathering window of
//! milliseconds), and a row never marked is published again by a later drain, which
//! receivers drop as the duplicate it is (as after a crash between confirm and mark).

use std::time::Duration;

use sqlx::PgPool;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::repo::outbox;

/// How long the marker gathers ids after the first before it writes them: long enough that a
/// relay publishing a run every few milliseconds marks many per statement (at 20 ms, a
/// process at 100 runs/s wrote about one mark per run), short against the lease.
const WINDOW: Duration = Duration::from_millis(200);
/// The most ids one UPDATE marks.
const MOST: usize = 1024;
/// How long a stopping relay waits for its last marks.
const FLUSH_LIMIT: Duration = Duration::from_secs(2);

/// The relay's side: ids published and confirmed, to be marked.
#[derive(Clone)]
pub struct Marks {
    tx: mpsc::UnboundedSender<Vec<i64>>,
}

/// The marker task; [`Marker::finish`] writes what is left and waits for it.
pub struct Marker {
    task: JoinHandle<()>,
}

/// Starts the marker of `pool`'s outbox.
pub fn spawn(pool: PgPool) -> (Marks, Marker) {
    let (tx, rx) = mpsc::unbounded_channel();
    let task = tokio::spawn(run(pool, rx));
    (Marks { tx }, Marker { task })
}

impl Marks {
    /// Queues `ids` for marking; gives them back if the marker is gone.
    pub fn mark(&self, ids: Vec<i64>) -> Result<(), Vec<i64>> {
        if ids.is_empty() {
            return Ok(());
        }
        self.tx.send(ids).map_err(|e| e.0)
    }
}

impl Marker {
    /// Once every [`Marks`] is dropped: lets the marker write what it holds, for at most
    /// `FLUSH_LIMIT`.
    pub async fn finish(self) {
        if tokio::time::timeout(FLUSH_LIMIT, self.task).await.is_err() {
            tracing::warn!(
                "outbox marks not written in time; those rows go out again after their lease"
            );
        }
    }
}

async fn run(pool: PgPool, mut rx: mpsc::UnboundedReceiver<Vec<i64>>) {
    while let Some(mut ids) = rx.recv().await {
        let deadline = tokio::time::Instant::now() + WINDOW;
        while ids.len() < MOST {
            tokio::select! {
                more = rx.recv() => match more {
                    Some(more) => ids.extend(more),
                    None => break,
                },
                _ = tokio::time::sleep_until(deadline) => break,
            }
        }
        match outbox::mark_published(&pool, &ids).await {
            Ok(()) => tracing::trace!(rows = ids.len(), "outbox rows marked published"),
            Err(e) => tracing::warn!(
                error = %e,
                rows = ids.len(),
                "marking published outbox rows failed; they go out again after their lease"
            ),
        }
    }
}
