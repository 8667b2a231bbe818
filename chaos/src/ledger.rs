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
type Event = (i32, Option<String>, String);

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
        let id = id.to_string();
        if !events.iter().enumerate().all(|(i, e)| e.0 == i as i32 + 1) {
            out.push(LedgerViolation::Gaps(id.clone()));
        }
        if !TERMINAL.contains(&state.as_str()) {
            out.push(LedgerViolation::NotTerminal(id.clone(), state));
            continue;
        }
        let since_redrive = events
            .iter()
            .rposition(|e| e.1.as_deref() == Some("DEAD_LETTERED") && e.2 == "QUEUED")
            .map_or(&events[..], |i| &events[i + 1..]);
        let terminals = since_redrive
            .iter()
            .filter(|e| TERMINAL.contains(&e.2.as_str()))
            .count();
        if terminals != 1 {
            out.push(LedgerViolation::ManyTerminal(id, terminals));
        }
    }
    Ok(out)
}

/// One line of an agent's execution journal.
#[derive(Debug, Clone, Deserialize)]
pub struct JournalEntry {
    pub event: String,
    pub run_id: String,
    pub epoch: i64,
    pub at_ms: i64,
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
/// or it was adopted later, which keeps the same epoch).
pub fn check_executions(entries: &[JournalEntry]) -> Vec<LedgerViolation> {
    let mut spans: HashMap<(String, i64), (usize, i64, i64)> = HashMap::new();
    for e in entries {
        let span = spans
            .entry((e.run_id.clone(), e.epoch))
            .or_insert((0, i64::MAX, i64::MIN));
        if e.event == "started" {
            span.0 += 1;
        }
        span.1 = span.1.min(e.at_ms);
        span.2 = span.2.max(e.at_ms);
    }
    let mut out = Vec::new();
    let mut by_run: HashMap<&str, Vec<(i64, i64, i64)>> = HashMap::new();
    for ((run, epoch), (starts, from, to)) in &spans {
        if *starts > 1 {
            out.push(LedgerViolation::EpochTwice {
                run: run.clone(),
                epoch: *epoch,
                count: *starts,
            });
        }
        by_run.entry(run).or_default().push((*epoch, *from, *to));
    }
    for (run, mut list) in by_run {
        list.sort_by_key(|s| s.1);
        for pair in list.windows(2) {
            if pair[1].1 < pair[0].2 {
                out.push(LedgerViolation::Overlap {
                    run: run.to_owned(),
                    a: pair[0].0,
                    b: pair[1].0,
                });
            }
        }
    }
    out
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
        let twice = [e("started", "b", 1, 0), e("started", "b", 1, 5)];
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
