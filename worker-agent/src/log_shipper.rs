//! Streams one run's output to the API with `PushLogs` while it runs: batched (see
//! [`crate::log_batch`]), flushed at least every 250 ms while output flows, and immediately
//! when a full request is ready. Live logs are losable (the completion carries the tail), so a
//! batch the API will not take after a few tries is dropped rather than stalling the run. A
//! refusal as stale means the lease is gone: the run is stopped. Every chunk is also
//! written to the stored log ([`crate::log_files`]), which nothing drops.

use std::time::Duration;

use drover_core::ids::{LeaseEpoch, RunId};
use tokio::sync::mpsc;
use tokio::time::MissedTickBehavior;
use tokio_util::sync::CancellationToken;

use crate::api::{ApiClient, ApiError};
use crate::executor::OutputChunk;
use crate::log_batch::LogBatch;
use crate::log_files::LogFiles;

pub const FLUSH_INTERVAL: Duration = Duration::from_millis(250);

/// Runs until `output` is closed and everything received has been pushed (or given up on),
/// and written to `files` (the stored log).
pub async fn ship_logs(
    api: ApiClient,
    run_id: RunId,
    epoch: LeaseEpoch,
    mut output: mpsc::Receiver<OutputChunk>,
    run_stop: CancellationToken,
    mut files: LogFiles,
) {
    let mut shipper = Shipper {
        api,
        run_id,
        epoch,
        run_stop,
        batch: LogBatch::new(),
        lease_lost: false,
    };
    let mut tick = tokio::time::interval(FLUSH_INTERVAL);
    tick.set_missed_tick_behavior(MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            chunk = output.recv() => match chunk {
                Some(chunk) => {
                    files.write(&chunk).await;
                    shipper.batch.push(chunk);
                    while shipper.batch.has_full_request() {
                        shipper.flush_one().await;
                    }
                }
                None => break,
            },
            _ = tick.tick() => {
                if !shipper.batch.is_empty() {
                    shipper.flush_one().await;
                }
                files.flush().await;
            }
        }
    }
    while !shipper.batch.is_empty() {
        shipper.flush_one().await;
    }
    files.flush().await;
}

struct Shipper {
    api: ApiClient,
    run_id: RunId,
    epoch: LeaseEpoch,
    run_stop: CancellationToken,
    batch: LogBatch,
    /// Once the API said the lease is stale, output is discarded.
    lease_lost: bool,
}

impl Shipper {
    async fn flush_one(&mut self) {
        let chunks = self.batch.take_request();
        if self.lease_lost || chunks.is_empty() {
            return;
        }
        let count = chunks.len();
        // The run's own stop token is not used to cut a push short: the final flush after a
        // stop still deserves its few tries. A fresh token bounds nothing but is required.
        let never = CancellationToken::new();
        match self
            .api
            .push_logs(self.run_id, self.epoch, chunks, &never)
            .await
        {
            Ok(()) => {}
            Err(ApiError::Stale { code, message }) => {
                tracing::warn!(?code, %message, "logs refused: the lease is gone; stopping the run");
                self.lease_lost = true;
                self.run_stop.cancel();
            }
            Err(e) => {
                tracing::warn!(error = %e, chunks = count, "could not push logs; dropping this batch");
            }
        }
    }
}
