//! The run state machine as data: [`TRANSITIONS`] lists every legal `(from, to)` pair and
//! nothing else decides legality. Postgres updates derive their `state = ANY($allowed)` guard
//! from the same table ([`RunState::sources_of`]), so code and database cannot disagree.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "SCREAMING_SNAKE_CASE")]
pub enum RunState {
    PendingApproval,
    Queued,
    Assigned,
    Running,
    Succeeded,
    Failed,
    Cancelled,
    TimedOut,
    Rejected,
    DeadLettered,
}

use RunState::*;

/// Every legal transition, with why it happens. Anything not listed is illegal.
pub const TRANSITIONS: &[(RunState, RunState, &str)] = &[
    (PendingApproval, Queued, "approved"),
    (
        PendingApproval,
        Rejected,
        "rejected by an approver or approval timed out",
    ),
    (PendingApproval, Cancelled, "cancelled before approval"),
    (Queued, Assigned, "a dispatcher leased it to an agent"),
    (Queued, Cancelled, "cancelled while queued"),
    (Queued, TimedOut, "waited longer than its queue timeout"),
    (Queued, DeadLettered, "its message could not be delivered"),
    (Assigned, Running, "the agent started the container"),
    (
        Assigned,
        Queued,
        "lease lost or start failed with attempts left",
    ),
    (Assigned, Failed, "could not be started"),
    (Assigned, Cancelled, "cancelled before start"),
    (Assigned, TimedOut, "timed out before start"),
    (Assigned, DeadLettered, "lease lost with no attempts left"),
    (Running, Succeeded, "the process exited 0"),
    (Running, Failed, "the process failed"),
    (Running, Cancelled, "cancelled while running"),
    (Running, TimedOut, "exceeded its execution timeout"),
    (
        Running,
        Queued,
        "attempt failed or lease lost with attempts left",
    ),
    (Running, DeadLettered, "lease lost with no attempts left"),
    (DeadLettered, Queued, "redriven by an operator"),
];

impl RunState {
    pub const ALL: [RunState; 10] = [
        PendingApproval,
        Queued,
        Assigned,
        Running,
        Succeeded,
        Failed,
        Cancelled,
        TimedOut,
        Rejected,
        DeadLettered,
    ];

    /// Whether the table allows `self -> to`.
    pub fn can_transition_to(self, to: RunState) -> bool {
        TRANSITIONS.iter().any(|&(f, t, _)| f == self && t == to)
    }

    /// The states from which `to` may be entered, for `WHERE state = ANY($allowed)`.
    pub fn sources_of(to: RunState) -> Vec<RunState> {
        TRANSITIONS
            .iter()
            .filter(|&&(_, t, _)| t == to)
            .map(|&(f, _, _)| f)
            .collect()
    }

    /// Terminal states end a run. DEAD_LETTERED is terminal for the run's clients even though
    /// an operator may redrive it.
    pub fn is_terminal(self) -> bool {
        matches!(
            self,
            Succeeded | Failed | Cancelled | TimedOut | Rejected | DeadLettered
        )
    }

    pub fn as_str(self) -> &'static str {
        match self {
            PendingApproval => "PENDING_APPROVAL",
            Queued => "QUEUED",
            Assigned => "ASSIGNED",
            Running => "RUNNING",
            Succeeded => "SUCCEEDED",
            Failed => "FAILED",
            Cancelled => "CANCELLED",
            TimedOut => "TIMED_OUT",
            Rejected => "REJECTED",
            DeadLettered => "DEAD_LETTERED",
        }
    }

    /// Text forms for a Postgres `text[]` bind.
    pub fn names(states: &[RunState]) -> Vec<String> {
        states.iter().map(|s| s.as_str().to_owned()).collect()
    }
}

impl fmt::Display for RunState {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, thiserror::Error)]
#[error("unknown run state {0:?}")]
pub struct UnknownState(pub String);

impl FromStr for RunState {
    type Err = UnknownState;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        RunState::ALL
            .into_iter()
            .find(|st| st.as_str().eq_ignore_ascii_case(s))
            .ok_or_else(|| UnknownState(s.to_owned()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The legal pairs, written out independently of the table so a change to either is caught.
    const EXPECTED_LEGAL: &[(RunState, RunState)] = &[
        (PendingApproval, Queued),
        (PendingApproval, Rejected),
        (PendingApproval, Cancelled),
        (Queued, Assigned),
        (Queued, Cancelled),
        (Queued, TimedOut),
        (Queued, DeadLettered),
        (Assigned, Running),
        (Assigned, Queued),
        (Assigned, Failed),
        (Assigned, Cancelled),
        (Assigned, TimedOut),
        (Assigned, DeadLettered),
        (Running, Succeeded),
        (Running, Failed),
        (Running, Cancelled),
        (Running, TimedOut),
        (Running, Queued),
        (Running, DeadLettered),
        (DeadLettered, Queued),
    ];

    #[test]
    fn every_pair_legal_or_illegal_as_specified() {
        let mut legal = 0;
        for from in RunState::ALL {
            for to in RunState::ALL {
                let expected = EXPECTED_LEGAL.contains(&(from, to));
                assert_eq!(
                    from.can_transition_to(to),
                    expected,
                    "{from} -> {to} should be {}",
                    if expected { "legal" } else { "illegal" }
                );
                legal += usize::from(expected);
            }
        }
        assert_eq!(legal, EXPECTED_LEGAL.len());
        assert_eq!(TRANSITIONS.len(), EXPECTED_LEGAL.len(), "no duplicate rows");
        // 100 pairs in all: 20 legal, 80 illegal.
        assert_eq!(RunState::ALL.len() * RunState::ALL.len() - legal, 80);
    }

    #[test]
    fn terminal_states_only_leave_by_redrive() {
        for from in RunState::ALL.into_iter().filter(|s| s.is_terminal()) {
            for to in RunState::ALL {
                let allowed = from.can_transition_to(to);
                assert_eq!(
                    allowed,
                    from == DeadLettered && to == Queued,
                    "{from} -> {to}"
                );
            }
        }
    }

    #[test]
    fn no_self_transitions() {
        for s in RunState::ALL {
            assert!(!s.can_transition_to(s), "{s} -> {s}");
        }
    }

    #[test]
    fn sources_match_table() {
        assert_eq!(RunState::sources_of(Running), vec![Assigned]);
        let mut q = RunState::sources_of(Queued);
        q.sort_by_key(|s| s.as_str());
        assert_eq!(q, vec![Assigned, DeadLettered, PendingApproval, Running]);
        assert!(RunState::sources_of(PendingApproval).is_empty());
    }

    #[test]
    fn names_round_trip() {
        for s in RunState::ALL {
            assert_eq!(s.as_str().parse::<RunState>().unwrap(), s);
            assert_eq!(s.as_str().to_lowercase().parse::<RunState>().unwrap(), s);
        }
        assert!("BOGUS".parse::<RunState>().is_err());
    }
}
