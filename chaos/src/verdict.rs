//! The chaos oracle: after a scenario's faults and recovery window, what every witness
//! recorded ([`History`]: Postgres's runs, events, artifacts and dead-letter archive,
//! RabbitMQ's `drover.dead`, the agents' execution journals, and what the clients were told)
//! is judged by one pure function, [`judge`], against what the scenario did on purpose
//! ([`Expectations`]: poison messages injected, files every successful run must have).
//!
//! Invariants:
//! - every acknowledged submission (idempotency key) is exactly one run, the one the client
//!   was told, and every submission was acknowledged in the end (clients retry);
//! - every run is terminal after the recovery window, with exactly one terminal event since
//!   its last redrive and gap-free events ([`crate::ledger::check_run`]);
//! - lease epochs never go backwards in a run's events (a stale report was never applied);
//! - no epoch executed twice, no two executions of a run overlapped (journals; time an agent
//!   spent frozen does not count);
//! - dead letters are exactly what should be there: one per injected poison / unknown-run
//!   message, one per DEAD_LETTERED run, none naming a run that is not DEAD_LETTERED, and
//!   nothing left unarchived on `drover.dead`;
//! - a SUCCEEDED run has exactly one committed upload holding the files it wrote.
//!
//! Collection ([`collect`]) talks to the services; judging does not, so it is unit-tested
//! on recorded histories.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use sqlx::{PgPool, Row};

use crate::ledger::{self, JournalEntry, LedgerViolation, Pause};

/// One event of a run, as Postgres recorded it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EventRecord {
    pub seq: i32,
    pub from_state: Option<String>,
    pub to_state: String,
    pub lease_epoch: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunRecord {
    pub id: String,
    pub idempotency_key: Option<String>,
    pub state: String,
    pub reason: Option<String>,
    pub events: Vec<EventRecord>,
    pub committed_uploads: usize,
    pub artifact_paths: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeadLetterRecord {
    pub kind: String,
    pub run_id: Option<String>,
}

/// What clients saw of one idempotency key.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Submission {
    pub key: String,
    /// The run id of every successful SubmitRun answer for this key (retries included).
    pub acked: Vec<String>,
    /// SubmitRun calls made for this key.
    pub tries: u32,
    /// Calls that failed (and were retried with the same key, unless given up).
    #[serde(default)]
    pub errors: u32,
}

#[derive(Debug, Clone, Default)]
pub struct History {
    pub runs: Vec<RunRecord>,
    pub journal: Vec<JournalEntry>,
    pub dead_letters: Vec<DeadLetterRecord>,
    /// Messages still on `drover.dead` (not archived), if RabbitMQ could be asked.
    pub dead_queue_depth: Option<u32>,
    pub submissions: Vec<Submission>,
    pub pauses: Vec<Pause>,
    /// Outbox rows due for publishing but still unpublished.
    pub unpublished_outbox: i64,
    /// Each tenant's audit chain as `drover audit verify` recomputes it: the first broken
    /// link, if any.
    pub audit: Vec<AuditVerdict>,
}

/// Verifies `tenant`'s chain once every event is sealed, or after 30 s with what is left: an
/// event can wait for the sealing horizon while any write transaction of the cluster runs.
async fn verify_sealed(
    db: &sqlx::PgPool,
    tenant: drover_core::ids::TenantId,
) -> Result<drover_core::audit::Verdict, drover_core::CoreError> {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    loop {
        let v = drover_core::audit::verify(db, tenant).await?;
        if v.unsealed == 0 || v.broken.is_some() || std::time::Instant::now() > deadline {
            return Ok(v);
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// One tenant's recomputed audit chain.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AuditVerdict {
    pub tenant: String,
    pub links: i64,
    /// `(chain_seq, location, problem)` of the first broken link.
    pub broken: Option<(i64, String, String)>,
    /// Events still not linked into the chain once the sealers had time to link them all.
    pub unsealed: i64,
}

/// What the scenario did on purpose.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Expectations {
    /// Unparseable messages published to `drover.runs` (each must be archived once).
    pub poison: usize,
    /// Well-formed messages naming no run.
    pub unknown_run: usize,
    /// Paths every SUCCEEDED run must have among its committed artifacts.
    pub artifacts: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Violation {
    #[error("key {key}: acknowledged as run {run} but no such run exists (lost)")]
    LostRun { key: String, run: String },
    #[error("key {key}: clients were told runs {told:?} but Postgres holds {stored:?}")]
    KeyMismatch {
        key: String,
        told: Vec<String>,
        stored: Vec<String>,
    },
    #[error("key {key}: never acknowledged after {tries} tries")]
    NeverAcknowledged { key: String, tries: u32 },
    #[error("run {run} is stuck in {state} after the recovery window")]
    Stuck { run: String, state: String },
    #[error("run {run} reached a terminal state {count} times")]
    ManyTerminal { run: String, count: usize },
    #[error("run {run} has gaps in its event sequence")]
    Gaps { run: String },
    #[error(
        "run {run}: event {seq} has epoch {epoch} after epoch {before} (a stale report applied)"
    )]
    StaleApplied {
        run: String,
        seq: i32,
        epoch: i64,
        before: i64,
    },
    #[error("run {run}: epoch {epoch} was started {count} times")]
    EpochTwice {
        run: String,
        epoch: i64,
        count: usize,
    },
    #[error("run {run}: executions of epochs {a} and {b} overlapped")]
    Overlap { run: String, a: i64, b: i64 },
    #[error("unexpected dead letter ({dl_kind}) for run {run} in state {state}")]
    UnexpectedDeadLetter {
        dl_kind: String,
        run: String,
        state: String,
    },
    #[error("run {run} is DEAD_LETTERED but has no archived dead letter")]
    MissingDeadLetter { run: String },
    #[error("{dl_kind} dead letters: expected {expected}, found {found}")]
    DeadLetterCount {
        dl_kind: String,
        expected: usize,
        found: usize,
    },
    #[error("{0} messages left unarchived on drover.dead")]
    DeadQueueNotDrained(u32),
    #[error("run {run} SUCCEEDED without its artifact {path}")]
    SucceededWithoutArtifact { run: String, path: String },
    #[error("run {run} has {count} committed uploads")]
    ManyUploads { run: String, count: usize },
    #[error("{0} outbox rows due but never published")]
    OutboxStuck(i64),
    #[error("evidence unreadable: {0}")]
    Evidence(String),
    #[error("audit chain of tenant {tenant} broken at link {seq} ({location}): {problem}")]
    AuditChainBroken {
        tenant: String,
        seq: i64,
        location: String,
        problem: String,
    },
    #[error("audit chain of tenant {tenant}: {unsealed} event(s) never linked into it")]
    AuditUnsealed { tenant: String, unsealed: i64 },
}

/// Every violation the history shows; empty when every invariant holds.
pub fn judge(h: &History, e: &Expectations) -> Vec<Violation> {
    let mut out = Vec::new();
    for a in &h.audit {
        if let Some((seq, location, problem)) = &a.broken {
            out.push(Violation::AuditChainBroken {
                tenant: a.tenant.clone(),
                seq: *seq,
                location: location.clone(),
                problem: problem.clone(),
            });
        }
        if a.unsealed > 0 {
            out.push(Violation::AuditUnsealed {
                tenant: a.tenant.clone(),
                unsealed: a.unsealed,
            });
        }
    }
    let by_id: HashMap<&str, &RunRecord> = h.runs.iter().map(|r| (r.id.as_str(), r)).collect();
    let mut by_key: HashMap<&str, Vec<&str>> = HashMap::new();
    for r in &h.runs {
        if let Some(k) = &r.idempotency_key {
            by_key.entry(k).or_default().push(&r.id);
        }
    }

    for s in &h.submissions {
        if s.acked.is_empty() {
            out.push(Violation::NeverAcknowledged {
                key: s.key.clone(),
                tries: s.tries,
            });
            continue;
        }
        let stored = by_key.get(s.key.as_str()).cloned().unwrap_or_default();
        if stored.is_empty() {
            out.push(Violation::LostRun {
                key: s.key.clone(),
                run: s.acked[0].clone(),
            });
            continue;
        }
        let mut told = s.acked.clone();
        told.sort();
        told.dedup();
        if told.len() != 1 || stored.len() != 1 || told[0] != stored[0] {
            out.push(Violation::KeyMismatch {
                key: s.key.clone(),
                told,
                stored: stored.iter().map(|s| (*s).to_owned()).collect(),
            });
        }
    }

    for r in &h.runs {
        let events: Vec<ledger::Event> = r
            .events
            .iter()
            .map(|ev| (ev.seq, ev.from_state.clone(), ev.to_state.clone()))
            .collect();
        for v in ledger::check_run(&r.id, &r.state, &events) {
            out.push(from_ledger(v));
        }
        let mut max_epoch = i64::MIN;
        for ev in &r.events {
            if ev.lease_epoch < max_epoch {
                out.push(Violation::StaleApplied {
                    run: r.id.clone(),
                    seq: ev.seq,
                    epoch: ev.lease_epoch,
                    before: max_epoch,
                });
            }
            max_epoch = max_epoch.max(ev.lease_epoch);
        }
        if r.committed_uploads > 1 {
            out.push(Violation::ManyUploads {
                run: r.id.clone(),
                count: r.committed_uploads,
            });
        }
        if r.state == "SUCCEEDED" {
            for path in &e.artifacts {
                if !r.artifact_paths.contains(path) {
                    out.push(Violation::SucceededWithoutArtifact {
                        run: r.id.clone(),
                        path: path.clone(),
                    });
                }
            }
        }
    }

    for v in ledger::check_executions_paused(&h.journal, &h.pauses) {
        out.push(from_ledger(v));
    }

    let mut counts: BTreeMap<&str, usize> = BTreeMap::new();
    let mut archived_runs: HashMap<&str, usize> = HashMap::new();
    for d in &h.dead_letters {
        *counts.entry(d.kind.as_str()).or_default() += 1;
        let Some(run) = d.run_id.as_deref() else {
            continue;
        };
        match (d.kind.as_str(), by_id.get(run).map(|r| r.state.as_str())) {
            // A message naming no run: what an injected unknown-run message becomes.
            ("unknown_run", None) => {}
            (_, Some("DEAD_LETTERED")) => *archived_runs.entry(run).or_default() += 1,
            (_, state) => out.push(Violation::UnexpectedDeadLetter {
                dl_kind: d.kind.clone(),
                run: run.to_owned(),
                state: state.unwrap_or("missing").to_owned(),
            }),
        }
    }
    for (kind, expected) in [("unparseable", e.poison), ("unknown_run", e.unknown_run)] {
        let found = counts.get(kind).copied().unwrap_or(0);
        if found != expected {
            out.push(Violation::DeadLetterCount {
                dl_kind: kind.to_owned(),
                expected,
                found,
            });
        }
    }
    for r in h.runs.iter().filter(|r| r.state == "DEAD_LETTERED") {
        if !archived_runs.contains_key(r.id.as_str()) {
            out.push(Violation::MissingDeadLetter { run: r.id.clone() });
        }
    }
    if let Some(n) = h.dead_queue_depth
        && n > 0
    {
        out.push(Violation::DeadQueueNotDrained(n));
    }
    if h.unpublished_outbox > 0 {
        out.push(Violation::OutboxStuck(h.unpublished_outbox));
    }
    out
}

fn from_ledger(v: LedgerViolation) -> Violation {
    match v {
        LedgerViolation::NotTerminal(run, state) => Violation::Stuck { run, state },
        LedgerViolation::ManyTerminal(run, count) => Violation::ManyTerminal { run, count },
        LedgerViolation::Gaps(run) => Violation::Gaps { run },
        LedgerViolation::EpochTwice { run, epoch, count } => {
            Violation::EpochTwice { run, epoch, count }
        }
        LedgerViolation::Overlap { run, a, b } => Violation::Overlap { run, a, b },
        LedgerViolation::Journal(path, e) => Violation::Evidence(format!("journal {path}: {e}")),
    }
}

/// Where [`collect`] looks.
#[derive(Debug, Clone)]
pub struct Sources<'a> {
    pub db: &'a PgPool,
    /// The AMQP URL straight to the broker (not through a fault proxy).
    pub amqp_url: &'a str,
    pub journals: Vec<PathBuf>,
}

/// Reads every witness into a [`History`]. An unreadable journal or broker comes back as
/// `Evidence` violations beside it, never as a silent pass.
pub async fn collect(
    src: &Sources<'_>,
    submissions: Vec<Submission>,
    pauses: Vec<Pause>,
) -> Result<(History, Vec<Violation>), sqlx::Error> {
    let mut problems = Vec::new();
    let rows = sqlx::query(
        "SELECT r.id::text AS id, r.idempotency_key, r.state, r.reason, \
         (SELECT count(*) FROM artifact_uploads u WHERE u.run_id = r.id \
            AND u.committed_at IS NOT NULL) AS uploads, \
         COALESCE((SELECT array_agg(a.path ORDER BY a.path) FROM artifacts a \
            WHERE a.run_id = r.id), '{}') AS paths \
         FROM runs r ORDER BY r.id",
    )
    .fetch_all(src.db)
    .await?;
    let mut runs = Vec::with_capacity(rows.len());
    let mut index = HashMap::new();
    for row in &rows {
        let id: String = row.try_get("id")?;
        index.insert(id.clone(), runs.len());
        runs.push(RunRecord {
            id,
            idempotency_key: row.try_get("idempotency_key")?,
            state: row.try_get("state")?,
            reason: row.try_get("reason")?,
            events: Vec::new(),
            committed_uploads: usize::try_from(row.try_get::<i64, _>("uploads")?).unwrap_or(0),
            artifact_paths: row.try_get("paths")?,
        });
    }
    let events = sqlx::query(
        "SELECT run_id::text AS run_id, seq, from_state, to_state, lease_epoch \
         FROM run_events ORDER BY run_id, seq",
    )
    .fetch_all(src.db)
    .await?;
    for row in &events {
        let run: String = row.try_get("run_id")?;
        if let Some(&i) = index.get(&run) {
            runs[i].events.push(EventRecord {
                seq: row.try_get("seq")?,
                from_state: row.try_get("from_state")?,
                to_state: row.try_get("to_state")?,
                lease_epoch: row.try_get("lease_epoch")?,
            });
        }
    }
    let dead_letters = sqlx::query("SELECT kind, run_id::text AS run_id FROM dead_letters")
        .fetch_all(src.db)
        .await?
        .iter()
        .map(|row| {
            Ok(DeadLetterRecord {
                kind: row.try_get("kind")?,
                run_id: row.try_get("run_id")?,
            })
        })
        .collect::<Result<Vec<_>, sqlx::Error>>()?;
    let unpublished_outbox = unpublished_outbox(src.db).await?;
    let mut audit = Vec::new();
    let tenants: Vec<(uuid::Uuid, String)> = sqlx::query_as("SELECT id, name FROM tenants")
        .fetch_all(src.db)
        .await?;
    for (id, name) in tenants {
        match verify_sealed(src.db, drover_core::ids::TenantId(id)).await {
            Ok(v) => audit.push(AuditVerdict {
                tenant: name,
                links: v.checked,
                broken: v.broken.map(|b| (b.chain_seq, b.location, b.problem)),
                unsealed: v.unsealed,
            }),
            Err(e) => problems.push(Violation::Evidence(format!("audit chain of {name}: {e}"))),
        }
    }
    let paths: Vec<&std::path::Path> = src.journals.iter().map(PathBuf::as_path).collect();
    let journal = match ledger::read_journals(&paths) {
        Ok(j) => j,
        Err(e) => {
            problems.push(from_ledger(e));
            Vec::new()
        }
    };
    let dead_queue_depth = match dead_queue_depth(src.amqp_url).await {
        Ok(n) => Some(n),
        Err(e) => {
            problems.push(Violation::Evidence(format!("drover.dead depth: {e}")));
            None
        }
    };
    Ok((
        History {
            runs,
            journal,
            dead_letters,
            dead_queue_depth,
            submissions,
            pauses,
            unpublished_outbox,
            audit,
        },
        problems,
    ))
}

/// Outbox rows due (a second ago or earlier) that the relay has not published.
pub async fn unpublished_outbox(db: &PgPool) -> Result<i64, sqlx::Error> {
    sqlx::query_scalar(
        "SELECT count(*) FROM outbox WHERE published_at IS NULL \
         AND available_at < now() - interval '1 second'",
    )
    .fetch_one(db)
    .await
}

/// Ready messages on `drover.dead` (a passive declare: nothing is created).
pub async fn dead_queue_depth(amqp_url: &str) -> Result<u32, lapin::Error> {
    let conn = lapin::Connection::connect(amqp_url, lapin::ConnectionProperties::default()).await?;
    let ch = conn.create_channel().await?;
    let q = ch
        .queue_declare(
            drover_core::topology::DEAD_QUEUE.into(),
            lapin::options::QueueDeclareOptions {
                passive: true,
                ..Default::default()
            },
            lapin::types::FieldTable::default(),
        )
        .await;
    let _ = conn.close(200, "bye".into()).await;
    Ok(q?.message_count())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ev(seq: i32, from: Option<&str>, to: &str, epoch: i64) -> EventRecord {
        EventRecord {
            seq,
            from_state: from.map(str::to_owned),
            to_state: to.into(),
            lease_epoch: epoch,
        }
    }

    /// A run that went QUEUED → ASSIGNED → RUNNING → SUCCEEDED under epoch 1.
    fn good_run(id: &str) -> RunRecord {
        RunRecord {
            id: id.into(),
            idempotency_key: Some(format!("k-{id}")),
            state: "SUCCEEDED".into(),
            reason: None,
            events: vec![
                ev(1, None, "QUEUED", 0),
                ev(2, Some("QUEUED"), "ASSIGNED", 1),
                ev(3, Some("ASSIGNED"), "RUNNING", 1),
                ev(4, Some("RUNNING"), "SUCCEEDED", 1),
            ],
            committed_uploads: 1,
            artifact_paths: vec!["out.txt".into()],
        }
    }

    fn sub(id: &str) -> Submission {
        Submission {
            key: format!("k-{id}"),
            acked: vec![id.into()],
            tries: 1,
            errors: 0,
        }
    }

    fn line(event: &str, run: &str, epoch: i64, at_ms: i64, agent: &str) -> JournalEntry {
        JournalEntry {
            event: event.into(),
            run_id: run.into(),
            epoch,
            at_ms,
            agent_id: agent.into(),
        }
    }

    fn healthy() -> History {
        History {
            runs: vec![good_run("a"), good_run("b")],
            journal: vec![
                line("started", "a", 1, 0, "x"),
                line("ended", "a", 1, 10, "x"),
                line("started", "b", 1, 5, "y"),
                line("ended", "b", 1, 15, "y"),
            ],
            dead_letters: Vec::new(),
            dead_queue_depth: Some(0),
            submissions: vec![sub("a"), sub("b")],
            pauses: Vec::new(),
            unpublished_outbox: 0,
            audit: vec![AuditVerdict {
                tenant: "default".into(),
                links: 9,
                broken: None,
                unsealed: 0,
            }],
        }
    }

    fn expect() -> Expectations {
        Expectations {
            artifacts: vec!["out.txt".into()],
            ..Default::default()
        }
    }

    #[test]
    fn a_healthy_history_passes() {
        assert_eq!(judge(&healthy(), &expect()), vec![]);
    }

    #[test]
    fn a_double_execution_is_flagged() {
        let mut h = healthy();
        // The same epoch started again on another agent, while the first still ran.
        h.journal.push(line("started", "a", 1, 5, "y"));
        let v = judge(&h, &expect());
        assert!(
            v.contains(&Violation::EpochTwice {
                run: "a".into(),
                epoch: 1,
                count: 2
            }),
            "{v:?}"
        );
        let mut h = healthy();
        h.journal.push(line("started", "a", 2, 5, "y"));
        assert!(judge(&h, &expect()).contains(&Violation::Overlap {
            run: "a".into(),
            a: 1,
            b: 2
        }));
    }

    #[test]
    fn an_event_never_linked_into_the_chain_is_flagged() {
        let mut h = healthy();
        h.audit[0].unsealed = 2;
        assert_eq!(
            judge(&h, &expect()),
            vec![Violation::AuditUnsealed {
                tenant: "default".into(),
                unsealed: 2
            }]
        );
    }

    #[test]
    fn a_broken_audit_chain_is_flagged() {
        let mut h = healthy();
        h.audit[0].broken = Some((
            4,
            "run_events run=a seq=2".into(),
            "content does not match its hash (edited)".into(),
        ));
        let v = judge(&h, &expect());
        assert!(
            matches!(v.as_slice(), [Violation::AuditChainBroken { seq: 4, .. }]),
            "{v:?}"
        );
    }

    #[test]
    fn a_lost_run_is_flagged() {
        let mut h = healthy();
        h.runs.retain(|r| r.id != "b");
        assert_eq!(
            judge(&h, &expect()),
            vec![Violation::LostRun {
                key: "k-b".into(),
                run: "b".into()
            }]
        );
        let mut h = healthy();
        h.submissions.push(Submission {
            key: "k-c".into(),
            acked: Vec::new(),
            tries: 7,
            errors: 7,
        });
        assert_eq!(
            judge(&h, &expect()),
            vec![Violation::NeverAcknowledged {
                key: "k-c".into(),
                tries: 7
            }]
        );
        let mut h = healthy();
        h.submissions[0].acked.push("other".into());
        assert!(matches!(
            judge(&h, &expect()).as_slice(),
            [Violation::KeyMismatch { .. }]
        ));
    }

    #[test]
    fn a_stuck_run_is_flagged() {
        let mut h = healthy();
        h.runs[1].state = "RUNNING".into();
        h.runs[1].events.pop();
        assert_eq!(
            judge(&h, &expect()),
            vec![Violation::Stuck {
                run: "b".into(),
                state: "RUNNING".into()
            }]
        );
    }

    #[test]
    fn an_unexpected_dead_letter_is_flagged_and_expected_ones_are_counted() {
        let mut h = healthy();
        h.dead_letters.push(DeadLetterRecord {
            kind: "delivery_limit".into(),
            run_id: Some("a".into()),
        });
        assert_eq!(
            judge(&h, &expect()),
            vec![Violation::UnexpectedDeadLetter {
                dl_kind: "delivery_limit".into(),
                run: "a".into(),
                state: "SUCCEEDED".into()
            }]
        );
        // "Unknown" is wrong for a run that exists.
        let mut h = healthy();
        h.dead_letters.push(DeadLetterRecord {
            kind: "unknown_run".into(),
            run_id: Some("b".into()),
        });
        let e = Expectations {
            unknown_run: 1,
            ..expect()
        };
        assert_eq!(
            judge(&h, &e),
            vec![Violation::UnexpectedDeadLetter {
                dl_kind: "unknown_run".into(),
                run: "b".into(),
                state: "SUCCEEDED".into()
            }]
        );
        // Two poison messages injected, one archived; one left on the queue.
        let mut h = healthy();
        h.dead_letters.push(DeadLetterRecord {
            kind: "unparseable".into(),
            run_id: None,
        });
        h.dead_queue_depth = Some(1);
        h.unpublished_outbox = 2;
        let e = Expectations {
            poison: 2,
            ..expect()
        };
        assert_eq!(
            judge(&h, &e),
            vec![
                Violation::DeadLetterCount {
                    dl_kind: "unparseable".into(),
                    expected: 2,
                    found: 1
                },
                Violation::DeadQueueNotDrained(1),
                Violation::OutboxStuck(2)
            ]
        );
        // A run that exhausted its attempts belongs there; its missing record does not.
        let mut h = healthy();
        h.runs[0].state = "DEAD_LETTERED".into();
        h.runs[0].events[3].to_state = "DEAD_LETTERED".into();
        assert_eq!(
            judge(&h, &expect()),
            vec![Violation::MissingDeadLetter { run: "a".into() }]
        );
        h.dead_letters.push(DeadLetterRecord {
            kind: "run_exhausted".into(),
            run_id: Some("a".into()),
        });
        assert_eq!(judge(&h, &expect()), vec![]);
    }

    #[test]
    fn stale_reports_and_artifact_less_successes_are_flagged() {
        let mut h = healthy();
        h.runs[0].events = vec![
            ev(1, None, "QUEUED", 0),
            ev(2, Some("QUEUED"), "ASSIGNED", 1),
            ev(3, Some("ASSIGNED"), "QUEUED", 1),
            ev(4, Some("QUEUED"), "ASSIGNED", 2),
            ev(5, Some("ASSIGNED"), "SUCCEEDED", 1),
        ];
        h.runs[1].artifact_paths.clear();
        h.runs[1].committed_uploads = 0;
        assert_eq!(
            judge(&h, &expect()),
            vec![
                Violation::StaleApplied {
                    run: "a".into(),
                    seq: 5,
                    epoch: 1,
                    before: 2
                },
                Violation::SucceededWithoutArtifact {
                    run: "b".into(),
                    path: "out.txt".into()
                }
            ]
        );
    }
}
