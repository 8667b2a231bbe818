//! StreamLogs: a run's output from an offset, optionally live until the run ends. Postgres
//! (`run_logs`) holds the complete log and is the only source of entries; Redis pub/sub (a
//! log chunk or a run event published) only wakes the stream up early, and a timer re-reads
//! Postgres regardless, so a Redis that forgets or dies costs latency, never output. This
//! is why the log is not kept in a capped Redis stream: a follower that falls behind, or
//! resumes from an old offset, still gets every byte.

use std::time::Duration;

use drover_core::convert::timestamp;
use drover_core::ids::{RunId, TenantId};
use drover_core::repo::{logs, runs};
use drover_proto::v1 as pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::ApiError;
use crate::state::AppState;

/// Chunks read (and sent as one response) at a time: up to 64 × 64 KiB.
const BATCH: i64 = 64;

pub fn stream(
    state: AppState,
    tenant: TenantId,
    run: RunId,
    follow: bool,
    from: i64,
) -> impl Stream<Item = Result<pb::StreamLogsResponse, Status>> + Send + 'static {
    let (tx, rx) = mpsc::channel(4);
    tokio::spawn(async move {
        if let Err(status) = pump(&state, tenant, run, follow, from, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    ReceiverStream::new(rx)
}

fn entry(rec: logs::LogRecord) -> pb::LogEntry {
    let stream = match rec.stream {
        2 => pb::LogStream::Stderr,
        _ => pb::LogStream::Stdout,
    };
    pb::LogEntry {
        offset: u64::try_from(rec.offset).unwrap_or(0),
        attempt: u32::try_from(rec.attempt).unwrap_or(0),
        stream: stream as i32,
        data: rec.data,
        at: Some(timestamp(rec.at)),
    }
}

async fn pump(
    state: &AppState,
    tenant: TenantId,
    run: RunId,
    follow: bool,
    from: i64,
    tx: &mpsc::Sender<Result<pb::StreamLogsResponse, Status>>,
) -> Result<(), Status> {
    // Subscribe before the first read so nothing committed in between is missed.
    let keys = state.bus.keys();
    let channels = vec![keys.run_logs_channel(run), keys.run_events_channel(run)];
    let mut pubsub = if follow {
        state.live.subscribe(&channels).await
    } else {
        None
    };
    let poll = Duration::from_millis(state.settings.watch_poll_ms);
    let mut offset = from;
    // Once the run is terminal every chunk is in (agents push output before they report the
    // end), so one more read after seeing it terminal is the last.
    let mut last_read = !follow;
    loop {
        let batch = logs::read_after(&state.pool, tenant, run, offset, BATCH)
            .await
            .map_err(ApiError::from)?;
        let full = i64::try_from(batch.len()).unwrap_or(BATCH) >= BATCH;
        if let Some(last) = batch.last() {
            offset = last.offset;
            let msg = pb::StreamLogsResponse {
                entries: batch.into_iter().map(entry).collect(),
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(()); // client went away
            }
        }
        if full {
            continue;
        }
        if last_read {
            return Ok(());
        }
        let terminal = runs::get(&state.pool, tenant, run)
            .await
            .map_err(ApiError::from)?
            .is_some_and(|r| r.state.is_terminal());
        if terminal {
            last_read = true;
            continue;
        }
        let redis_hint = crate::live::Subscription::changed_if_any(&mut pubsub);
        tokio::select! {
            _ = tx.closed() => return Ok(()),
            alive = redis_hint => if !alive {
                pubsub = None;
            },
            _ = tokio::time::sleep(poll) => {
                if pubsub.is_none() {
                    pubsub = state.live.subscribe(&channels).await;
                }
            },
        }
    }
}
