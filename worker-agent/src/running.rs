//! The leases this agent is executing right now. Heartbeats report them; a revoked lease's
//! token is cancelled so its execution stops; a redelivered command for a lease already here
//! is recognised as a duplicate.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use drover_core::ids::{LeaseEpoch, RunId};
use tokio_util::sync::CancellationToken;

type Lease = (RunId, LeaseEpoch);

#[derive(Clone, Default)]
pub struct RunningRuns {
    inner: Arc<Mutex<HashMap<Lease, CancellationToken>>>,
}

impl RunningRuns {
    fn lock(&self) -> MutexGuard<'_, HashMap<Lease, CancellationToken>> {
        // The map stays consistent even if a holder panicked: every update is one insert or
        // remove.
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Records the lease as executing, with the token that stops it. `None` when it is
    /// already executing (a duplicate delivery).
    pub fn claim(
        &self,
        run_id: RunId,
        epoch: LeaseEpoch,
        stop: CancellationToken,
    ) -> Option<RunClaim> {
        let mut map = self.lock();
        let key = (run_id, epoch);
        if map.contains_key(&key) {
            return None;
        }
        map.insert(key, stop.clone());
        Some(RunClaim {
            runs: self.clone(),
            key,
            stop,
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

    /// Stops the execution holding this lease. False when no execution holds it.
    pub fn revoke(&self, run_id: RunId, epoch: LeaseEpoch) -> bool {
        match self.lock().get(&(run_id, epoch)) {
            Some(stop) => {
                stop.cancel();
                true
            }
            None => false,
        }
    }
}

/// Held by the execution of one lease; dropping it takes the lease off the running set.
pub struct RunClaim {
    runs: RunningRuns,
    key: Lease,
    stop: CancellationToken,
}

impl RunClaim {
    /// Fires when the lease is revoked or the agent stops executions.
    pub fn stop_token(&self) -> &CancellationToken {
        &self.stop
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
        let run = RunId::new();
        let claim = runs
            .claim(run, LeaseEpoch(1), CancellationToken::new())
            .unwrap();
        assert!(
            runs.claim(run, LeaseEpoch(1), CancellationToken::new())
                .is_none()
        );
        // A newer lease of the same run is a different execution.
        let newer = runs
            .claim(run, LeaseEpoch(2), CancellationToken::new())
            .unwrap();
        assert_eq!(
            runs.leases(),
            vec![(run, LeaseEpoch(1)), (run, LeaseEpoch(2))]
        );
        drop(claim);
        drop(newer);
        assert_eq!(runs.leases(), vec![]);
        assert!(
            runs.claim(run, LeaseEpoch(1), CancellationToken::new())
                .is_some()
        );
    }

    #[test]
    fn revoking_cancels_only_that_lease() {
        let runs = RunningRuns::default();
        let (a, b) = (RunId::new(), RunId::new());
        let ca = runs
            .claim(a, LeaseEpoch(1), CancellationToken::new())
            .unwrap();
        let cb = runs
            .claim(b, LeaseEpoch(1), CancellationToken::new())
            .unwrap();
        assert!(runs.revoke(a, LeaseEpoch(1)));
        assert!(!runs.revoke(a, LeaseEpoch(9)));
        assert!(ca.stop_token().is_cancelled());
        assert!(!cb.stop_token().is_cancelled());
        assert_eq!(runs.len(), 2);
    }
}
