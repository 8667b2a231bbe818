//! WatchRun: every event of a run, in order, until it is terminal. A Redis message names the
//! newest event seq committed and, from the hot paths (assignment, start, end), carries the
//! events themselves ([`drover_core::announce`]): those that follow what the watcher sent
//! without a gap go out as they are; for anything else the watcher reads Postgres, which it
//! also re-reads on a timer, so a Redis that loses messages or dies costs latency, never an
//! event. A wake-up about what was delivered already (it raced the read before) reads nothing.

use std::time::Duration;

use drover_core::convert;
use drover_core::ids::{RunId, TenantId};
use drover_core::repo::runs;
use drover_proto::v1 as pb;
use futures::Stream;
use tokio::sync::mpsc;
use tokio_stream::wrappers::ReceiverStream;
use tonic::Status;

use crate::error::ApiError;
use crate::state::AppState;

/// The stream of `run`'s events; NOT_FOUND (before any stream) for a run the tenant does not
/// have. The first read doubles as the existence check: every run has at least one event.
pub async fn watch(
    state: AppState,
    tenant: TenantId,
    run: RunId,
) -> Result<impl Stream<Item = Result<pb::WatchRunResponse, Status>> + Send + 'static, ApiError> {
    // Subscribe before the first read so nothing committed in between is missed.
    let channels = vec![state.bus.keys().run_events_channel(run)];
    let pubsub = state.live.subscribe(&channels).await;
    let first = runs::events_after_with_end(&state.pool, tenant, run, 0).await?;
    if first.0.is_empty() {
        return Err(ApiError::NotFound("run not found"));
    }
    let (tx, rx) = mpsc::channel(16);
    tokio::spawn(async move {
        let from = Start {
            channels,
            pubsub,
            first,
        };
        if let Err(status) = pump(&state, tenant, run, from, &tx).await {
            let _ = tx.send(Err(status)).await;
        }
    });
    Ok(ReceiverStream::new(rx))
}

/// Where the pump starts: the subscription and the events the handler already read.
struct Start {
    channels: Vec<String>,
    pubsub: Option<crate::live::Subscription>,
    first: (Vec<runs::EventRecord>, Option<runs::RunRecord>),
}

async fn pump(
    state: &AppState,
    tenant: TenantId,
    run: RunId,
    from: Start,
    tx: &mpsc::Sender<Result<pb::WatchRunResponse, Status>>,
) -> Result<(), Status> {
    let Start {
        channels,
        mut pubsub,
        first,
    } = from;
    let mut first = Some(first);
    let poll = Duration::from_millis(state.settings.watch_poll_ms);
    let mut last_seq = 0;
    loop {
        let (events, mut end) = match first.take() {
            Some(read) => read,
            None => runs::events_after_with_end(&state.pool, tenant, run, last_seq)
                .await
                .map_err(ApiError::from)?,
        };
        for ev in events {
            last_seq = ev.seq;
            let terminal = ev.to_state.is_terminal();
            let snapshot = if terminal {
                end.take().map(|r| convert::run_to_proto(&r))
            } else {
                None
            };
            let msg = pb::WatchRunResponse {
                event: Some(convert::event_to_proto(&ev)),
                run: snapshot,
            };
            if tx.send(Ok(msg)).await.is_err() {
                return Ok(()); // client went away
            }
            if terminal {
                return Ok(());
            }
        }
        // Wait for news: a hint of an event not delivered yet, the connection lost, or the
        // poll. A hint of what was delivered already (it raced the last read) reads nothing,
        // and neither does one whose events came with it and follow on without a gap.
        let poll_at = tokio::time::Instant::now() + poll;
        loop {
            let redis_hint = crate::live::Subscription::changed_if_any(&mut pubsub);
            tokio::select! {
                _ = tx.closed() => return Ok(()),
                alive = redis_hint => {
                    if !alive {
                        // Redis connection gone: fall back to polling only, re-subscribe later.
                        pubsub = None;
                        break;
                    }
                    let Some(ps) = pubsub.as_ref() else { break };
                    if ps.hinted() <= i64::from(last_seq) {
                        continue;
                    }
                    let (carried, ends) = ps.carried_after(i64::from(last_seq));
                    for msg in carried {
                        if let Some(seq) = msg.event.as_ref().and_then(|e| i32::try_from(e.seq).ok()) {
                            last_seq = seq;
                        }
                        if tx.send(Ok(msg)).await.is_err() {
                            return Ok(()); // client went away
                        }
                    }
                    if ends {
                        return Ok(());
                    }
                    if ps.hinted() > i64::from(last_seq) {
                        break;
                    }
                },
                _ = tokio::time::sleep_until(poll_at) => {
                    if pubsub.is_none() {
                        pubsub = state.live.subscribe(&channels).await;
                    }
                    break;
                },
            }
        }
    }
}
