//! Invariant checks over what a load run observed.

use drover_core::convert::state_from_proto;
use drover_core::state::RunState;
use drover_proto::v1 as pb;

/// What one run's WatchRun stream showed.
#[derive(Debug, Clone)]
pub struct Observed {
    pub run_id: String,
    pub events: Vec<pb::RunEvent>,
}

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum Violation {
    #[error("run {0} has no terminal event")]
    NotTerminal(String),
    #[error("run {0} has {1} terminal events")]
    ManyTerminal(String, usize),
    #[error("run {0} has events out of order or with gaps")]
    Gaps(String),
}

/// Every run reached exactly one terminal state, through a gap-free event sequence.
pub fn check(runs: &[Observed]) -> Vec<Violation> {
    let mut out = Vec::new();
    for r in runs {
        let gap_free = r
            .events
            .iter()
            .enumerate()
            .all(|(i, e)| e.seq == i as u64 + 1);
        if !gap_free {
            out.push(Violation::Gaps(r.run_id.clone()));
        }
        let terminal = r
            .events
            .iter()
            .filter(|e| state_from_proto(e.to_state).is_some_and(RunState::is_terminal))
            .count();
        match terminal {
            0 => out.push(Violation::NotTerminal(r.run_id.clone())),
            1 => {}
            n => out.push(Violation::ManyTerminal(r.run_id.clone(), n)),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: u64, to: pb::RunState) -> pb::RunEvent {
        pb::RunEvent {
            seq,
            to_state: to as i32,
            ..Default::default()
        }
    }

    #[test]
    fn flags_missing_duplicate_and_gapped_terminals() {
        use pb::RunState as S;
        let ok = Observed {
            run_id: "a".into(),
            events: vec![
                ev(1, S::Queued),
                ev(2, S::Assigned),
                ev(3, S::Running),
                ev(4, S::Succeeded),
            ],
        };
        let open = Observed {
            run_id: "b".into(),
            events: vec![ev(1, S::Queued)],
        };
        let twice = Observed {
            run_id: "c".into(),
            events: vec![ev(1, S::Queued), ev(2, S::Failed), ev(3, S::Succeeded)],
        };
        let gap = Observed {
            run_id: "d".into(),
            events: vec![ev(1, S::Queued), ev(3, S::Succeeded)],
        };
        assert!(check(&[ok]).is_empty());
        assert_eq!(check(&[open]), vec![Violation::NotTerminal("b".into())]);
        assert_eq!(
            check(&[twice]),
            vec![Violation::ManyTerminal("c".into(), 2)]
        );
        assert_eq!(check(&[gap]), vec![Violation::Gaps("d".into())]);
    }
}
