//! The leases this agent is executing right now, each with the signals that end it early.
//! Heartbeats report them; a revoked lease is stopped, a cancelled one terminated and reported;
//! a redelivered command (or a second cancel) for a lease already here is recognised.
//!
//! Three signals, because they end an execution differently:
//! - **stop** (lease revoked, a report refused as stale): kill, remove, report nothing — the
//!   lease is no longer ours to report on;
//! - **cancel** (a client cancelled the run): SIGTERM, grace, SIGKILL, report CANCELLED;
//! - **hand back** (the drain timeout passed): kill, report HANDED_BACK so the run is
//!   re-queued without counting an attempt.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drover_core::ids::{LeaseEpoch, RunId};
use tokio_util::sync::CancellationToken;

pub type Lease = (RunId, LeaseEpoch);

/// How one execution is asked to end early. Cancelling a token twice is a no-op, which makes
/// every signal idempotent however many paths deliver it.
#[derive(Debug, Clone, Default)]
pub struct LeaseSignals {
    pub stop: CancellationToken,
    pub cancel: CancellationToken,
    pub hand_back: CancellationToken,
}

#[derive(Clone, Default)]
pub struct RunningRuns {
    inner: Arc<Mutex<HashMap<Lease, LeaseSignals>>>,
}

impl RunningRuns {
    fn lock(&self) -> MutexGuard<'_, HashMap<Lease, LeaseSignals>> {
        // The map stays consistent even if a holder panicked: every update is one insert or
        // remove.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the lease as executing. `hand_back` is the agent-wide token the lease's own
    /// hand-back signal descends from. `None` when the lease is already executing here (a
    /// duplicate delivery).
    pub fn claim(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        hand_back: &CancellationToken,
    ) -> Option<RunClaim> {
        let mut map = self.lock();
        let key = (run_id, epoch);
        if map.contains_key(&key) {
            return None;
        }
        let signals = LeaseSignals {
            stop: CancellationToken::new(),
            cancel: CancellationToken::new(),
            hand_back: hand_back.child_token(),
        };
        map.insert(key, signals.clone());
        Some(RunClaim {
            runs: self.clone(),
            key,
            signals,
        })
    }

    pub fn leases(&self) -> Vec<Lease> {
        let mut leases: Vec<Lease> = self.lock().keys().copied().collect();
        leases.sort();
        leases
    }

    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Stops the execution holding this lease.
    pub fn revoke(&self, run_id: RunId, epoch: LeaseEpoch) -> Signalled {
        self.signal(run_id, epoch, |s| &s.stop)
    }

    /// Cancels the execution holding this lease.
    pub fn cancel(&self, run_id: RunId, epoch: LeaseEpoch) -> Signalled {
        self.signal(run_id, epoch, |s| &s.cancel)
    }

    fn signal(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        which: impl Fn(&LeaseSignals) -> &CancellationToken,
    ) -> Signalled {
        match self.lock().get(&(run_id, epoch)) {
            Some(signals) => {
                let token = which(signals);
                if token.is_cancelled() {
                    Signalled::Already
                } else {
                    token.cancel();
                    Signalled::Now
                }
            }
            None => Signalled::NotHere,
        }
    }
}

/// What a signal to a lease did. Heartbeats repeat a cancel or a revocation until the run
/// ends, so only [`Signalled::Now`] is news worth a log line.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Signalled {
    Now,
    /// The execution had been signalled so already.
    Already,
    /// No execution holds the lease here: nothing to do.
    NotHere,
}

/// Held by the execution of one lease; dropping it takes the lease off the running set.
pub struct RunClaim {
    runs: RunningRuns,
    key: Lease,
    signals: LeaseSignals,
}

impl RunClaim {
    pub fn signals(&self) -> &LeaseSignals {
        &self.signals
    }

    pub fn lease(&self) -> Lease {
        self.key
    }
}

impl Drop for RunClaim {
    fn drop(&mut self) {
        self.runs.lock().remove(&self.key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn claims_are_exclusive_and_released_on_drop() {
        let runs = RunningRuns::default();
        let agent = CancellationToken::new();
        let run = RunId::new();
        let claim = runs.claim(run, LeaseEpoch(1), &agent).unwrap();
        assert!(runs.claim(run, LeaseEpoch(1), &agent).is_none());
        // A newer lease of the same run is a different execution.
        let newer = runs.claim(run, LeaseEpoch(2), &agent).unwrap();
        assert_eq!(
            runs.leases(),
            vec![(run, LeaseEpoch(1)), (run, LeaseEpoch(2))]
        );
        drop(claim);
        drop(newer);
        assert_eq!(runs.leases(), vec![]);
        assert!(runs.claim(run, LeaseEpoch(1), &agent).is_some());
    }

    #[test]
    fn signals_reach_only_their_lease_and_repeat_harmlessly() {
        let runs = RunningRuns::default();
        let agent = CancellationToken::new();
        let (a, b) = (RunId::new(), RunId::new());
        let ca = runs.claim(a, LeaseEpoch(1), &agent).unwrap();
        let cb = runs.claim(b, LeaseEpoch(1), &agent).unwrap();
        assert_eq!(runs.revoke(a, LeaseEpoch(1)), Signalled::Now);
        assert_eq!(runs.revoke(a, LeaseEpoch(9)), Signalled::NotHere);
        assert!(ca.signals().stop.is_cancelled());
        assert!(!ca.signals().cancel.is_cancelled());
        assert!(!cb.signals().stop.is_cancelled());

        assert_eq!(runs.cancel(b, LeaseEpoch(1)), Signalled::Now);
        assert_eq!(
            runs.cancel(b, LeaseEpoch(1)),
            Signalled::Already,
            "a second cancel is harmless"
        );
        assert!(cb.signals().cancel.is_cancelled());
        assert!(!cb.signals().stop.is_cancelled());
        assert_eq!(runs.cancel(RunId::new(), LeaseEpoch(1)), Signalled::NotHere);
        assert_eq!(runs.len(), 2);
    }

    #[test]
    fn the_agent_wide_hand_back_reaches_every_lease() {
        let runs = RunningRuns::default();
        let agent = CancellationToken::new();
        let c1 = runs.claim(RunId::new(), LeaseEpoch(1), &agent).unwrap();
        let c2 = runs.claim(RunId::new(), LeaseEpoch(1), &agent).unwrap();
        agent.cancel();
        assert!(c1.signals().hand_back.is_cancelled());
        assert!(c2.signals().hand_back.is_cancelled());
        assert!(!c1.signals().stop.is_cancelled());
    }
}
