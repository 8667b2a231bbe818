//! The oracle's second and third witnesses, beside what clients observed ([`crate::oracle`]):
//! Postgres's own event history, and the agents' execution journals (append-only JSON lines,
//! one file per agent, written when `DROVER_EXECUTION_JOURNAL` is set). Shared by the
//! end-to-end tests and the chaos scenarios so both judge runs by the same rules:
//!
//! - every accepted run ends in exactly one terminal state (counted from its last redrive);
//! - its events are gap-free;
//! - no two executions of one run overlapped in time, and no epoch executed twice.

use std::collections::HashMap;
use std::path::Path;

use serde::Deserialize;
use sqlx::{PgPool, Row};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LedgerViolation {
    #[error("run {0} is not terminal ({1})")]
    NotTerminal(String, String),
    #[error("run {0} reached a terminal state {1} times since its last redrive")]
    ManyTerminal(String, usize),
    #[error("run {0} has gaps in its event sequence")]
    Gaps(String),
    #[error("run {run} epoch {epoch} was started {count} times")]
    EpochTwice {
        run: String,
        epoch: i64,
        count: usize,
    },
    #[error("run {run}: execution of epoch {a} overlapped execution of epoch {b}")]
    Overlap { run: String, a: i64, b: i64 },
    #[error("journal {0} is unreadable: {1}")]
    Journal(String, String),
}

const TERMINAL: [&str; 6] = [
    "SUCCEEDED",
    "FAILED",
    "CANCELLED",
    "TIMED_OUT",
    "REJECTED",
    "DEAD_LETTERED",
];

/// `(seq, from_state, to_state)` of one event.
pub type Event = (i32, Option<String>, String);

/// Checks every run of the database (or only `runs` when given) against its event history.
pub async fn check_events(
    pool: &PgPool,
    runs: Option<&[uuid::Uuid]>,
) -> Result<Vec<LedgerViolation>, sqlx::Error> {
    let rows = sqlx::query(
        "SELECT r.id, r.state, e.seq, e.from_state, e.to_state FROM runs r \
         JOIN run_events e ON e.run_id = r.id \
         WHERE ($1::uuid[] IS NULL OR r.id = ANY($1)) ORDER BY r.id, e.seq",
    )
    .bind(runs.map(<[uuid::Uuid]>::to_vec))
    .fetch_all(pool)
    .await?;
    let mut by_run: Vec<(uuid::Uuid, String, Vec<Event>)> = Vec::new();
    for row in &rows {
        let id: uuid::Uuid = row.try_get("id")?;
        let ev = (
            row.try_get("seq")?,
            row.try_get("from_state")?,
            row.try_get("to_state")?,
        );
        match by_run.last_mut() {
            Some((last, _, events)) if *last == id => events.push(ev),
            _ => by_run.push((id, row.try_get("state")?, vec![ev])),
        }
    }
    let mut out = Vec::new();
    for (id, state, events) in by_run {
        out.extend(check_run(&id.to_string(), &state, &events));
    }
    Ok(out)
}

/// Whether a state name is terminal.
pub fn is_terminal(state: &str) -> bool {
    TERMINAL.contains(&state)
}

/// One run's current state against its events (in `seq` order): gap-free, terminal, and
/// exactly one terminal event since its last redrive.
pub fn check_run(id: &str, state: &str, events: &[Event]) -> Vec<LedgerViolation> {
    let mut out = Vec::new();
    if !events.iter().enumerate().all(|(i, e)| e.0 == i as i32 + 1) {
        out.push(LedgerViolation::Gaps(id.to_owned()));
    }
    if !is_terminal(state) {
        out.push(LedgerViolation::NotTerminal(
            id.to_owned(),
            state.to_owned(),
        ));
        return out;
    }
    let since_redrive = events
        .iter()
        .rposition(|e| e.1.as_deref() == Some("DEAD_LETTERED") && e.2 == "QUEUED")
        .map_or(events, |i| &events[i + 1..]);
    let terminals = since_redrive.iter().filter(|e| is_terminal(&e.2)).count();
    if terminals != 1 {
        out.push(LedgerViolation::ManyTerminal(id.to_owned(), terminals));
    }
    out
}

/// One line of an agent's execution journal.
#[derive(Debug, Clone, Deserialize)]
pub struct JournalEntry {
    pub event: String,
    pub run_id: String,
    pub epoch: i64,
    pub at_ms: i64,
    /// The agent that wrote the line.
    #[serde(default)]
    pub agent_id: String,
}

/// A window in which an agent's process was frozen (SIGSTOP … SIGCONT): whatever it was
/// executing made no progress then, so the window does not count as execution time.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pause {
    pub agent_id: String,
    pub from_ms: i64,
    pub to_ms: i64,
}

/// Reads journal files (missing files are empty: the agent never executed anything).
pub fn read_journals(paths: &[&Path]) -> Result<Vec<JournalEntry>, LedgerViolation> {
    let mut out = Vec::new();
    for path in paths {
        let text = match std::fs::read_to_string(path) {
            Ok(t) => t,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
            Err(e) => {
                return Err(LedgerViolation::Journal(
                    path.display().to_string(),
                    e.to_string(),
                ));
            }
        };
        for line in text.lines().filter(|l| !l.trim().is_empty()) {
            let entry: JournalEntry = serde_json::from_str(line)
                .map_err(|e| LedgerViolation::Journal(path.display().to_string(), e.to_string()))?;
            out.push(entry);
        }
    }
    Ok(out)
}

/// At most one execution started per (run, epoch), and the executions of one run never
/// overlap in time. An execution runs from its `started` line to its `ended` line (or to
/// the end of the record if it never ended: the agent was killed, and the container with it
/// or it was adopted later, which keeps the same epoch). A `found_exited` line (a restarted
/// agent found it already over) is not execution time: its process ended at some unknown
/// moment before, so counting up to the finding would flag overlaps that never happened.
pub fn check_executions(entries: &[JournalEntry]) -> Vec<LedgerViolation> {
    check_executions_paused(entries, &[])
}

/// [`check_executions`], where the time an execution's agent spent frozen (`pauses`) is not
/// execution time: a zombie agent's execution stands still while it is stopped.
pub fn check_executions_paused(entries: &[JournalEntry], pauses: &[Pause]) -> Vec<LedgerViolation> {
    // (starts, from, to, agent)
    let mut spans: HashMap<(String, i64), (usize, i64, i64, String)> = HashMap::new();
    for e in entries {
        // Found after it had exited: a record of when it was found, not execution time.
        if e.event == "found_exited" {
            continue;
        }
        let span = spans.entry((e.run_id.clone(), e.epoch)).or_insert((
            0,
            i64::MAX,
            i64::MIN,
            e.agent_id.clone(),
        ));
        if e.event == "started" {
            span.0 += 1;
            span.3.clone_from(&e.agent_id);
        }
        span.1 = span.1.min(e.at_ms);
        span.2 = span.2.max(e.at_ms);
    }
    let mut out = Vec::new();
    let mut by_run: HashMap<&str, Vec<EpochSegments>> = HashMap::new();
    for ((run, epoch), (starts, from, to, agent)) in &spans {
        if *starts > 1 {
            out.push(LedgerViolation::EpochTwice {
                run: run.clone(),
                epoch: *epoch,
                count: *starts,
            });
        }
        let agent_pauses: Vec<&Pause> = pauses.iter().filter(|p| &p.agent_id == agent).collect();
        by_run
            .entry(run)
            .or_default()
            .push((*epoch, unpaused(*from, *to, &agent_pauses)));
    }
    for (run, mut list) in by_run {
        list.sort_by_key(|s| (s.1.first().map_or(i64::MAX, |x| x.0), s.0));
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                // Half-open, at least 1 ms long: an execution that only started (its
                // agent died at once) still occupies its instant.
                let overlaps = a.1.iter().any(|x| {
                    b.1.iter()
                        .any(|y| x.0.max(y.0) < x.1.max(x.0 + 1).min(y.1.max(y.0 + 1)))
                });
                if overlaps {
                    out.push(LedgerViolation::Overlap {
                        run: run.to_owned(),
                        a: a.0,
                        b: b.0,
                    });
                }
            }
        }
    }
    out
}

/// An epoch and the time segments its execution ran in.
type EpochSegments = (i64, Vec<(i64, i64)>);

/// `[from, to]` minus the pauses, as closed segments.
fn unpaused(from: i64, to: i64, pauses: &[&Pause]) -> Vec<(i64, i64)> {
    let mut segs = vec![(from, to)];
    for p in pauses {
        segs = segs
            .into_iter()
            .flat_map(|(a, b)| {
                if p.to_ms <= a || p.from_ms >= b {
                    vec![(a, b)]
                } else {
                    let mut v = Vec::new();
                    if p.from_ms > a {
                        v.push((a, p.from_ms));
                    }
                    if p.to_ms < b {
                        v.push((p.to_ms, b));
                    }
                    v
                }
            })
            .collect();
    }
    segs
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(event: &str, run: &str, epoch: i64, at_ms: i64) -> JournalEntry {
        JournalEntry {
            event: event.into(),
            run_id: run.into(),
            epoch,
            at_ms,
            agent_id: format!("agent-{epoch}"),
        }
    }

    #[test]
    fn sequential_executions_pass_overlaps_and_repeats_fail() {
        let ok = [
            e("started", "a", 1, 0),
            e("ended", "a", 1, 10),
            e("started", "a", 2, 20),
            e("adopted", "a", 2, 25),
            e("ended", "a", 2, 30),
        ];
        assert!(check_executions(&ok).is_empty());
        let overlap = [
            e("started", "a", 1, 0),
            e("started", "a", 2, 5),
            e("ended", "a", 1, 10),
            e("ended", "a", 2, 30),
        ];
        assert_eq!(
            check_executions(&overlap),
            vec![LedgerViolation::Overlap {
                run: "a".into(),
                a: 1,
                b: 2
            }]
        );
        // Epoch 1 died with its agent; the agent's next life found it over while epoch 2
        // already ran elsewhere. Finding it is not executing it.
        let found_late = [
            e("started", "c", 1, 0),
            e("started", "c", 2, 20),
            e("found_exited", "c", 1, 25),
            e("ended", "c", 2, 30),
        ];
        assert!(check_executions(&found_late).is_empty());
        let twice = [e("started", "b", 1, 0), e("started", "b", 1, 5)];
        // Agent 1 frozen from 3 to 40: its execution of epoch 1 did not overlap epoch 2's.
        let pause = Pause {
            agent_id: "agent-1".into(),
            from_ms: 3,
            to_ms: 40,
        };
        let zombie = [
            e("started", "z", 1, 0),
            e("started", "z", 2, 5),
            e("ended", "z", 2, 30),
            e("ended", "z", 1, 41),
        ];
        assert!(check_executions_paused(&zombie, std::slice::from_ref(&pause)).is_empty());
        assert_eq!(
            check_executions(&zombie).len(),
            1,
            "without the pause it overlaps"
        );
        assert_eq!(
            check_executions(&twice),
            vec![LedgerViolation::EpochTwice {
                run: "b".into(),
                epoch: 1,
                count: 2
            }]
        );
    }
}
