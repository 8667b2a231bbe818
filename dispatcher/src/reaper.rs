//! The reaper: every `reaper.interval_ms` it ends what nobody else will —
//! - leases that expired (the agent stopped heartbeating): the attempt is lost, and goes back
//!   to QUEUED with its retry backoff, or to DEAD_LETTERED when no attempts remain;
//! - RUNNING runs past their execution timeout plus a grace (the agent lives, renewing its
//!   lease, but did not enforce the timeout): TIMED_OUT;
//! - QUEUED runs past their queue deadline: TIMED_OUT;
//! - ASSIGNED runs whose agent, though heartbeating (which renews an assignment's lease even
//!   before the command arrives, e.g. across a broker outage), has not started them within
//!   `assign_timeout_ms`: the attempt is lost as above.
//!
//! Each end is a guarded transition on the epoch it was found under, and ends that the lease
//! holder did not report bump the epoch (fencing): anything the old holder still sends is
//! refused. Safe in every dispatcher at once: two reapers finding one run make one change,
//! and the loser's refusal is expected and ignored. Worst-case detection of a dead agent is
//! the lease TTL plus one interval (10 s + 2 s by default).

use std::sync::Arc;
use std::time::Duration;

use drover_core::CoreError;
use drover_core::events::EventBus;
use drover_core::repo::approvals;
use drover_core::repo::attempts::{self, AttemptEnd, EndKind, Holder};
use drover_core::repo::overdue::{self, Found};
use drover_core::repo::{Transition, runs};
use drover_core::retry::Failure;
use drover_core::state::RunState;
use serde::Deserialize;
use sqlx::PgPool;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

#[derive(Debug, Clone, Deserialize)]
#[serde(default)]
pub struct ReaperSettings {
    /// How often to look. Detection of a dead agent takes the lease TTL plus up to this.
    pub interval_ms: u64,
    /// How long past its execution timeout a RUNNING run may go unreported before the reaper
    /// ends it (the agent normally kills and reports at the timeout itself).
    pub timeout_grace_ms: u64,
    /// How long a run may stay ASSIGNED to a live agent before the attempt counts as lost.
    /// Heartbeats renew an agent's assignments whether or not its command has arrived (a
    /// broker outage must not burn attempts); this bounds an agent that never acts on one.
    pub assign_timeout_ms: u64,
    /// Runs handled per scan and kind.
    pub batch: i64,
}

impl Default for ReaperSettings {
    fn default() -> Self {
        Self {
            interval_ms: 2_000,
            timeout_grace_ms: 30_000,
            assign_timeout_ms: 300_000,
            batch: 200,
        }
    }
}

pub struct Reaper {
    pub db: PgPool,
    pub bus: Arc<EventBus>,
    pub settings: ReaperSettings,
}

/// What one pass changed, for logs and tests.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    pub lost: usize,
    pub timed_out: usize,
    pub queue_timed_out: usize,
    pub approval_timed_out: usize,
}

impl Reaper {
    pub async fn run(self, cancel: CancellationToken) {
        let every = Duration::from_millis(self.settings.interval_ms.max(50));
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = cancel.cancelled() => return,
                _ = tick.tick() => {}
            }
            match self.pass().await {
                Ok(p) if p != Pass::default() => tracing::info!(
                    lost = p.lost,
                    timed_out = p.timed_out,
                    queue_timed_out = p.queue_timed_out,
                    approval_timed_out = p.approval_timed_out,
                    "reaper pass"
                ),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "reaper pass failed; next interval retries"),
            }
        }
    }

    pub async fn pass(&self) -> Result<Pass, CoreError> {
        let batch = self.settings.batch;
        let mut pass = Pass::default();
        for found in overdue::expired_leases(&self.db, batch).await? {
            let end = AttemptEnd {
                kind: EndKind::Failed(Failure::LostLease),
                exit_code: None,
                output: None,
                reason: "lost_lease: the agent stopped heartbeating and its lease expired".into(),
            };
            if self.end(found, end).await? {
                pass.lost += 1;
            }
        }
        let assign_timeout = i64::try_from(self.settings.assign_timeout_ms).unwrap_or(i64::MAX);
        for found in overdue::stale_assignments(&self.db, assign_timeout, batch).await? {
            let end = AttemptEnd {
                kind: EndKind::Failed(Failure::LostLease),
                exit_code: None,
                output: None,
                reason: format!(
                    "lost_lease: the agent did not start the run within {} s of its assignment",
                    assign_timeout / 1000
                ),
            };
            if self.end(found, end).await? {
                pass.lost += 1;
            }
        }
        let grace = i64::try_from(self.settings.timeout_grace_ms).unwrap_or(i64::MAX);
        for found in overdue::overran_timeout(&self.db, grace, batch).await? {
            let end = AttemptEnd {
                kind: EndKind::TimedOut,
                exit_code: None,
                output: None,
                reason: format!(
                    "timeout: exceeded its execution timeout and the agent did not report \
                     within {} s more",
                    grace / 1000
                ),
            };
            if self.end(found, end).await? {
                pass.timed_out += 1;
            }
        }
        for found in overdue::past_queue_deadline(&self.db, batch).await? {
            if self.queue_timeout(found).await? {
                pass.queue_timed_out += 1;
            }
        }
        for run_id in approvals::overdue(&self.db, batch).await? {
            if let Some((run, event)) = approvals::expire(&self.db, run_id).await? {
                tracing::warn!(run_id = %run.id, "approval timed out; run rejected");
                self.bus.run_event(run.id, event.seq);
                pass.approval_timed_out += 1;
            }
        }
        Ok(pass)
    }

    /// Ends the attempt found under `found.epoch`; false when someone else got there first.
    async fn end(&self, found: Found, end: AttemptEnd) -> Result<bool, CoreError> {
        // In the run's trace, so a retry's dispatch and execution continue it.
        let span = tracing::info_span!(
            "reaper.end_attempt",
            run_id = %found.run_id,
            epoch = found.epoch,
            trace_id = tracing::field::Empty,
        );
        drover_core::telemetry::adopt(&span, found.traceparent.as_deref());
        self.end_in_span(found, end).instrument(span).await
    }

    async fn end_in_span(&self, found: Found, end: AttemptEnd) -> Result<bool, CoreError> {
        let lost_lease = end.kind == EndKind::Failed(Failure::LostLease);
        let holder = Holder {
            agent: None,
            epoch: found.epoch,
            fence: true,
        };
        let mut tx = self.db.begin().await?;
        match attempts::end_attempt(&mut tx, found.run_id, &holder, end).await {
            Ok((run, event)) => {
                tx.commit().await?;
                drover_core::observe::record_transition(&event);
                if lost_lease {
                    metrics::counter!(drover_core::observe::names::LEASE_EXPIRIES).increment(1);
                }
                tracing::warn!(run_id = %run.id, epoch = found.epoch, attempt = event.attempt, state = %run.state, reason = run.reason.as_deref().unwrap_or(""), "reaped");
                self.bus.run_event(run.id, event.seq);
                Ok(true)
            }
            Err(CoreError::Refused(r)) => {
                tracing::debug!(run_id = %found.run_id, refusal = %r, "already handled elsewhere");
                Ok(false)
            }
            Err(e) => Err(e),
        }
    }

    async fn queue_timeout(&self, found: Found) -> Result<bool, CoreError> {
        let mut tx = self.db.begin().await?;
        let Some(run) = runs::lock(&mut tx, found.run_id)
            .await?
            .filter(|r| r.state == RunState::Queued)
        else {
            return Ok(false);
        };
        let t = Transition {
            expected_attempt: Some(run.attempt),
            reason: Some(format!(
                "queue_timeout: waited longer than its queue timeout of {} s",
                run.spec.queue_timeout_secs
            )),
            ..Transition::new(found.run_id, RunState::TimedOut).by("reaper")
        };
        match runs::transition(&mut tx, &t).await {
            Ok((run, event)) => {
                tx.commit().await?;
                drover_core::observe::record_transition(&event);
                tracing::warn!(run_id = %run.id, attempt = run.attempt, "queued run timed out");
                self.bus.run_event(run.id, event.seq);
                Ok(true)
            }
            Err(CoreError::Refused(_)) => Ok(false),
            Err(e) => Err(e),
        }
    }
}
