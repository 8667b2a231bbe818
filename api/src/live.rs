//! One Redis pub/sub connection per API process for every WatchRun and followed StreamLogs.
//! A watcher used to open a connection of its own: a TCP connect, handshake and close per
//! watched run, and one Redis connection per open stream.
//!
//! Channels are subscribed while anyone in this process watches them. A SUBSCRIBE is
//! confirmed by Redis before [`LiveHub::subscribe`] returns, so a watcher that reads Postgres
//! afterwards misses no hint for what commits later. Subscribes and unsubscribes go through
//! one lock, in order, so an UNSUBSCRIBE of a channel's last watcher can never land after a
//! new watcher's SUBSCRIBE. When the connection is lost every subscription ends (its watchers
//! fall back to polling Postgres and subscribe again later), as with a connection of their own.

use std::collections::{BTreeMap, HashMap};
use std::sync::atomic::{AtomicBool, AtomicI64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use drover_core::announce;
use drover_core::redis_keys::RedisKeys;
use drover_proto::v1 as pb;
use futures::StreamExt;
use futures::future::select_all;
use redis::aio::{PubSubSink, PubSubStream};
use tokio::sync::watch;

/// Most carried events one channel keeps (by seq, the newest): a watcher takes them within a
/// wake-up of their arrival, so only a burst of transitions of one run comes near this.
const CARRIED_KEPT: usize = 32;

/// How long connecting and subscribing may take before the watcher polls instead.
const SUBSCRIBE_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug)]
pub struct LiveHub {
    client: redis::Client,
    /// Serialises Redis subscription changes (and connecting).
    ops: tokio::sync::Mutex<()>,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    /// The connection's command half, while connected.
    sink: Option<PubSubSink>,
    /// Which connection `sink` is: an entry of an older one is never touched again.
    connection: u64,
    channels: HashMap<String, Arc<Entry>>,
}

#[derive(Debug)]
struct Entry {
    /// Bumped by every message on the channel, and once more when the connection is lost.
    tx: watch::Sender<u64>,
    /// Set when the connection this channel was subscribed on is lost.
    lost: AtomicBool,
    /// The highest number a message on the channel carried (a run's events channel carries
    /// each event's seq); 0 before any.
    hinted: AtomicI64,
    /// Events a run's events channel carried ([`announce`]), by seq.
    carried: Mutex<BTreeMap<i64, pb::WatchRunResponse>>,
    watchers: Mutex<usize>,
}

impl Entry {
    /// Keeps what an events-channel message carried and raises the announced seq. Before the
    /// wake-up, so a woken watcher finds both.
    fn heard(&self, heard: announce::Heard) {
        if !heard.events.is_empty() {
            let mut kept = locked(&self.carried);
            for msg in heard.events {
                if let Some(seq) = msg.event.as_ref().and_then(|e| i64::try_from(e.seq).ok()) {
                    kept.insert(seq, msg);
                }
            }
            while kept.len() > CARRIED_KEPT {
                kept.pop_first();
            }
        }
        self.hinted.fetch_max(heard.newest, Ordering::SeqCst);
    }
}

/// A watcher's interest in some channels; unsubscribes (when it was the last) on drop.
pub struct Subscription {
    hub: Arc<LiveHub>,
    entries: Vec<(String, Arc<Entry>)>,
    rx: Vec<watch::Receiver<u64>>,
}

fn locked<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Nothing is left half-updated under these locks by a panic.
    m.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

impl LiveHub {
    pub fn new(client: redis::Client) -> Arc<Self> {
        Arc::new(Self {
            client,
            ops: tokio::sync::Mutex::new(()),
            inner: Mutex::new(Inner::default()),
        })
    }

    /// Subscribes to `channels`; `None` when Redis does not answer in time (the caller polls
    /// Postgres only, and tries again later).
    pub async fn subscribe(self: &Arc<Self>, channels: &[String]) -> Option<Subscription> {
        match tokio::time::timeout(SUBSCRIBE_TIMEOUT, self.try_subscribe(channels)).await {
            Ok(Ok(s)) => Some(s),
            Ok(Err(e)) => {
                tracing::debug!(error = %e, "redis subscribe failed; polling postgres");
                None
            }
            Err(_) => {
                tracing::debug!("redis subscribe timed out; polling postgres");
                None
            }
        }
    }

    async fn try_subscribe(
        self: &Arc<Self>,
        channels: &[String],
    ) -> Result<Subscription, redis::RedisError> {
        let _ops = self.ops.lock().await;
        let current = locked(&self.inner).sink.clone();
        let mut sink = match current {
            Some(sink) => sink,
            None => self.connect().await?,
        };
        // Built as it goes, so that a failure (or the timeout) part-way releases what was
        // taken when it is dropped.
        let mut subscription = Subscription {
            hub: self.clone(),
            entries: Vec::with_capacity(channels.len()),
            rx: Vec::with_capacity(channels.len()),
        };
        for channel in channels {
            let existing = locked(&self.inner).channels.get(channel).cloned();
            let entry = match existing {
                Some(e) => e,
                None => {
                    sink.subscribe(channel).await?;
                    let entry = Arc::new(Entry {
                        tx: watch::Sender::new(0),
                        lost: AtomicBool::new(false),
                        hinted: AtomicI64::new(0),
                        carried: Mutex::new(BTreeMap::new()),
                        watchers: Mutex::new(0),
                    });
                    locked(&self.inner)
                        .channels
                        .insert(channel.clone(), entry.clone());
                    entry
                }
            };
            *locked(&entry.watchers) += 1;
            subscription.rx.push(entry.tx.subscribe());
            subscription.entries.push((channel.clone(), entry));
        }
        Ok(subscription)
    }

    /// Opens the connection and starts its reader. Called with `ops` held.
    async fn connect(self: &Arc<Self>) -> Result<PubSubSink, redis::RedisError> {
        let (sink, stream) = self.client.get_async_pubsub().await?.split();
        let connection = {
            let mut inner = locked(&self.inner);
            inner.connection += 1;
            inner.sink = Some(sink.clone());
            inner.connection
        };
        tokio::spawn(self.clone().read(stream, connection));
        Ok(sink)
    }

    /// Wakes the watchers of each message's channel until the connection ends, then ends
    /// every subscription of it.
    async fn read(self: Arc<Self>, mut stream: PubSubStream, connection: u64) {
        while let Some(msg) = stream.next().await {
            let entry = locked(&self.inner)
                .channels
                .get(msg.get_channel_name())
                .cloned();
            if let Some(entry) = entry {
                if RedisKeys::is_run_events_channel(msg.get_channel_name())
                    && let Some(heard) = announce::parse(msg.get_payload_bytes())
                {
                    entry.heard(heard);
                }
                entry.tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
        tracing::debug!("redis pub/sub connection lost; watchers poll postgres");
        let mut inner = locked(&self.inner);
        if inner.connection == connection {
            inner.sink = None;
            for (_, entry) in inner.channels.drain() {
                entry.lost.store(true, Ordering::SeqCst);
                entry.tx.send_modify(|n| *n = n.wrapping_add(1));
            }
        }
    }

    /// Unsubscribes the channels `gone` named if nobody watches them any more.
    async fn release(self: Arc<Self>, gone: Vec<(String, Arc<Entry>)>) {
        let _ops = self.ops.lock().await;
        let mut idle = Vec::new();
        {
            let mut inner = locked(&self.inner);
            for (channel, entry) in gone {
                let current = inner
                    .channels
                    .get(&channel)
                    .is_some_and(|e| Arc::ptr_eq(e, &entry));
                if current && *locked(&entry.watchers) == 0 {
                    inner.channels.remove(&channel);
                    idle.push(channel);
                }
            }
        }
        let sink = locked(&self.inner).sink.clone();
        if let (Some(mut sink), false) = (sink, idle.is_empty()) {
            // A failure means the connection is going; its reader clears everything.
            if let Err(e) = sink.unsubscribe(&idle).await {
                tracing::debug!(error = %e, "redis unsubscribe failed");
            }
        }
    }

    /// Channels subscribed right now (for tests and metrics).
    pub fn subscribed(&self) -> usize {
        locked(&self.inner).channels.len()
    }
}

impl Subscription {
    /// Waits for a message on any of the channels: true on one, false once the connection
    /// was lost (the subscription is then dead; drop it and poll).
    pub async fn changed(&mut self) -> bool {
        // A loss that came between taking an entry and watching it left nothing to wake on.
        if self.is_lost() {
            return false;
        }
        if self.rx.is_empty() {
            return std::future::pending().await;
        }
        let waits = self.rx.iter_mut().map(|rx| Box::pin(rx.changed()));
        let (result, _, _) = select_all(waits).await;
        result.is_ok() && !self.is_lost()
    }

    /// [`Subscription::changed`] of `sub` if there is one; never ready without one (the
    /// watcher then runs on its poll timer alone).
    pub async fn changed_if_any(sub: &mut Option<Subscription>) -> bool {
        match sub.as_mut() {
            Some(s) => s.changed().await,
            None => std::future::pending::<bool>().await,
        }
    }

    /// The highest number any message on these channels carried (0 before any): for a
    /// run's events channel, the newest event seq announced. A watcher that has delivered up
    /// to it has nothing to read.
    pub fn hinted(&self) -> i64 {
        self.entries
            .iter()
            .map(|(_, e)| e.hinted.load(Ordering::SeqCst))
            .max()
            .unwrap_or(0)
    }

    /// The carried events that follow seq `after` without a gap, in order, up to and
    /// including a terminal one (which must carry its run; one that does not ends the list,
    /// for the watcher to read it with the run from Postgres); and whether the last is that
    /// terminal one.
    pub fn carried_after(&self, after: i64) -> (Vec<pb::WatchRunResponse>, bool) {
        let mut out = Vec::new();
        let mut next = after + 1;
        loop {
            let found = self
                .entries
                .iter()
                .find_map(|(_, e)| locked(&e.carried).get(&next).cloned());
            let Some(msg) = found else { break };
            let terminal = msg
                .event
                .as_ref()
                .and_then(|e| drover_core::convert::state_from_proto(e.to_state))
                .is_none_or(|s| s.is_terminal());
            if terminal && msg.run.is_none() {
                break;
            }
            out.push(msg);
            if terminal {
                return (out, true);
            }
            next += 1;
        }
        (out, false)
    }

    fn is_lost(&self) -> bool {
        self.entries
            .iter()
            .any(|(_, e)| e.lost.load(Ordering::SeqCst))
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        let mut gone = Vec::new();
        for (channel, entry) in self.entries.drain(..) {
            let mut watchers = locked(&entry.watchers);
            *watchers = watchers.saturating_sub(1);
            if *watchers == 0 {
                drop(watchers);
                gone.push((channel, entry));
            }
        }
        if !gone.is_empty() {
            // Dropping happens in async handlers' tasks; the unsubscribe goes on its own.
            if let Ok(rt) = tokio::runtime::Handle::try_current() {
                rt.spawn(self.hub.clone().release(gone));
            }
        }
    }
}
