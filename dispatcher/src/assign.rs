//! One assignment attempt: in a single transaction, lock the run while it is still QUEUED
//! for its attempt, lock an agent with a free slot, check its tenant's concurrency quota,
//! move the run to ASSIGNED under a new lease epoch and write the agent's command to the
//! outbox. A duplicate message finds the run no longer QUEUED for that attempt and is dropped.
//!
//! Messages that arrive together are assigned as a batch ([`assign_batch`]), in one
//! transaction: one locking read for all their runs, the agents locked once for the batch and
//! their free slots shared out in memory (least loaded first), each tenant's quota counted
//! once, one transition per run and one insert for all the agents' commands. One assignment
//! per transaction held an agent's row locked across six round trips, so every assignment to
//! that agent waited for the one before: measured on 2 cores at saturation, the lock wait was
//! 24 ms a run and dispatch the largest share of the end-to-end time. A batch holds the same
//! lock once for all its runs.
//!
//! Locks are taken in one order on every path — run row, agent row, tenant chain (the quota
//! count, then the transition's event) — and the run row comes first as it does for cancels
//! and reports (run, then chain), so assignments do not deadlock with them. Used for a run
//! whose message just arrived ([`try_assign`]) and for parked runs ([`crate::parked`]).

use std::collections::{BTreeMap, HashMap, HashSet};

use drover_core::CoreError;
use drover_core::announce::Announcement;
use drover_core::ids::{LeaseEpoch, RunId, TenantId};
use drover_core::messages::{self, AgentCommand, RunMessage};
use drover_core::observe;
use drover_core::repo::agents::LockedAgent;
use drover_core::repo::parking::{self, BatchRead, OverQuota, OwnLimit, Precheck};
use drover_core::repo::{
    EventRecord, RunRecord, Transition, TransitionPatch, agents, outbox, runs,
};
use drover_core::state::RunState;
use drover_core::telemetry;
use drover_core::topology;
use sqlx::{PgConnection, PgPool, Postgres, Transaction};
use tracing::Instrument;

#[derive(Debug, PartialEq, Eq)]
pub enum Outcome {
    Assigned {
        agent_id: String,
        epoch: i64,
        /// For the run's watchers: the ASSIGNED event, carried.
        news: Announcement,
    },
    /// Already assigned, finished or superseded: the message is a duplicate.
    Obsolete,
    /// No run with that id for that tenant.
    UnknownRun,
    /// No live agent with a free slot fits; park it.
    NoCapacity,
    /// Its tenant has as many runs assigned or running as its quota allows; park it.
    OverQuota(OverQuota),
    /// Runs of its pool are parked already: it queues behind them (parked too) instead of
    /// taking a slot they have waited longer for.
    BehindParked,
}

/// What every assignment needs from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    pub lease_ttl_ms: i64,
    /// `quota.max_concurrent_runs`: the tenants' default concurrency limit (0 = none).
    pub default_max_concurrent: u32,
}

/// The path of a run whose message just arrived.
pub async fn try_assign(
    pool: &PgPool,
    msg: &RunMessage,
    limits: Limits,
    handoff: &outbox::Handoff,
) -> Result<Outcome, CoreError> {
    match parking::precheck(pool, msg.tenant_id, msg.run_id, msg.attempt).await? {
        Precheck::Unknown => return Ok(Outcome::UnknownRun),
        Precheck::Obsolete => return Ok(Outcome::Obsolete),
        Precheck::BehindParked => return Ok(Outcome::BehindParked),
        Precheck::Dispatchable => {}
    }
    let mut tx = pool.begin().await?;
    let Some(queued) =
        parking::lock_queued(&mut tx, msg.tenant_id, msg.run_id, msg.attempt).await?
    else {
        return Ok(Outcome::Obsolete);
    };
    assign_locked(tx, queued, limits, handoff).await
}

/// Assigns `queued`, whose row the transaction holds locked while QUEUED at its attempt, and
/// commits; on any other outcome the transaction is dropped (rolled back). The agent's command
/// is written leased to this process's relay and handed to it after the commit.
pub async fn assign_locked(
    mut tx: Transaction<'static, Postgres>,
    queued: RunRecord,
    limits: Limits,
    handoff: &outbox::Handoff,
) -> Result<Outcome, CoreError> {
    let Some(agent_id) = agents::pick_and_lock(
        &mut tx,
        &queued.spec.pool,
        &queued.spec.labels,
        limits.lease_ttl_ms,
    )
    .await?
    else {
        return Ok(Outcome::NoCapacity);
    };
    if let Some(over) =
        parking::check_quota(&mut tx, queued.tenant_id, limits.default_max_concurrent).await?
    {
        return Ok(Outcome::OverQuota(over));
    }
    let traceparent = telemetry::current_traceparent();
    let (run, event, row) = match assign_with_command(
        &mut tx,
        &queued,
        &agent_id,
        limits,
        traceparent,
        handoff,
    )
    .await
    {
        Ok(done) => done,
        // Cannot happen while the row lock is held; kept as the compare-and-set's answer.
        Err(CoreError::Refused(_)) => return Ok(Outcome::Obsolete),
        Err(e) => return Err(e),
    };
    tx.commit().await?;
    handoff.hand(row);
    committed(&queued, &event);
    Ok(Outcome::Assigned {
        agent_id,
        epoch: run.lease_epoch,
        news: Announcement::carrying(&run, &[&event]),
    })
}

/// The ASSIGNED transition of `queued` to `agent_id`, under a new lease epoch.
fn assignment(queued: &RunRecord, agent_id: &str, limits: Limits) -> Transition {
    Transition {
        tenant: Some(queued.tenant_id),
        expected_attempt: Some(queued.attempt),
        reason: Some(format!("assigned to {agent_id}")),
        patch: TransitionPatch::Assign {
            agent_id: agent_id.to_owned(),
            lease_ttl_ms: limits.lease_ttl_ms,
        },
        ..Transition::new(queued.id, RunState::Assigned)
    }
}

/// Assigns the locked QUEUED `queued` to `agent_id` and writes the agent's command in the
/// same statement ([`runs::transition_and_enqueue`]). The command names the epoch the
/// assignment gives the run, one past the locked row's; an assignment that gave another (it
/// cannot, under the lock) is an error, and the caller's transaction rolls back with it.
async fn assign_with_command(
    tx: &mut PgConnection,
    queued: &RunRecord,
    agent_id: &str,
    limits: Limits,
    traceparent: Option<String>,
    handoff: &outbox::Handoff,
) -> Result<(RunRecord, EventRecord, outbox::OutboxRow), CoreError> {
    let epoch = queued.lease_epoch + 1;
    let command = command_row(queued, epoch, agent_id, traceparent);
    let message = outbox::Message {
        exchange: &command.exchange,
        routing_key: &command.routing_key,
        payload: &command.payload,
        traceparent: command.traceparent.as_deref(),
    };
    let t = assignment(queued, agent_id, limits);
    let (run, event, id) =
        runs::transition_and_enqueue(tx, &t, &message, handoff.lease_ms()).await?;
    if run.lease_epoch != epoch || run.attempt != queued.attempt {
        return Err(CoreError::Corrupt(format!(
            "assignment of run {} gave epoch {} attempt {}, its command says {epoch} and {}",
            run.id, run.lease_epoch, run.attempt, queued.attempt
        )));
    }
    Ok((run, event, outbox::OutboxRow { id, ..command }))
}

/// The agent's `Execute` command for `run` under lease `epoch`, as an outbox row (its id is
/// set by the insert), continuing the trace `traceparent` names.
fn command_row(
    run: &RunRecord,
    epoch: i64,
    agent_id: &str,
    traceparent: Option<String>,
) -> outbox::OutboxRow {
    let cmd = AgentCommand::Execute {
        run_id: run.id,
        tenant_id: run.tenant_id,
        attempt: run.attempt,
        lease_epoch: LeaseEpoch(epoch),
    };
    outbox::OutboxRow {
        id: 0,
        exchange: topology::AGENTS_EXCHANGE.to_owned(),
        routing_key: agent_id.to_owned(),
        payload: messages::encode(&cmd),
        traceparent,
    }
}

/// After an assignment committed: its transition and queue wait in the metrics.
fn committed(queued: &RunRecord, event: &EventRecord) {
    observe::record_transition(event);
    metrics::counter!(observe::names::ASSIGNMENTS).increment(1);
    // Queue wait: from when the attempt became dispatchable (entered QUEUED, or its retry
    // backoff ended) to this commit. `queued` is the locked read of the same QUEUED row.
    let dispatchable = queued
        .not_before
        .map_or(queued.updated_at, |nb| nb.max(queued.updated_at));
    let waited = (chrono::Utc::now() - dispatchable)
        .num_milliseconds()
        .max(0) as f64
        / 1000.0;
    metrics::histogram!(observe::names::QUEUE_WAIT).record(waited);
}

/// One message of a batch, with the span its assignment is traced in.
pub struct BatchItem {
    pub msg: RunMessage,
    pub span: tracing::Span,
}

/// The agents one selector (pool and labels) of a batch may use, with the slots left.
type Selector = (String, BTreeMap<String, String>);

/// Assigns the runs of `items` in one transaction (see the module doc) and returns one
/// outcome per item, in order. Runs that cannot be placed come back as `NoCapacity`,
/// `OverQuota` or `BehindParked` for the caller to park; once one run of a pool is held back,
/// the pool's later runs in the batch queue behind it, as they would behind a parked run.
/// A second message for a run earlier in the batch is `Obsolete`
/// ([`parking::lock_queued_batch`]).
///
/// Agents are locked per selector, in the order the selectors sort; only the first selector
/// may wait for an agent another assigner holds (a later one waiting while this transaction
/// holds agents could close a cycle with another batch), so a later selector whose agents are
/// all held gets `NoCapacity` and is parked, which the parked-run scheduler places promptly.
pub async fn assign_batch(
    pool: &PgPool,
    items: &[BatchItem],
    limits: Limits,
    handoff: &outbox::Handoff,
) -> Result<Vec<Outcome>, CoreError> {
    let keys: Vec<(TenantId, RunId, i32)> = items
        .iter()
        .map(|i| (i.msg.tenant_id, i.msg.run_id, i.msg.attempt))
        .collect();
    let mut tx = pool.begin().await?;
    let reads = parking::lock_queued_batch(&mut tx, &keys).await?;
    let mut outcomes: Vec<Option<Outcome>> = Vec::with_capacity(items.len());
    let mut queued: Vec<Option<(Box<RunRecord>, tracing::Span)>> = Vec::with_capacity(items.len());
    let mut own_limits = HashMap::new();
    for (read, item) in reads.into_iter().zip(items) {
        let decided = match read {
            BatchRead::Queued {
                behind_parked: true,
                ..
            } => Outcome::BehindParked,
            BatchRead::Queued { run, own_limit, .. } => {
                own_limits.insert(run.tenant_id, own_limit);
                outcomes.push(None);
                queued.push(Some((run, item.span.clone())));
                continue;
            }
            BatchRead::Obsolete => Outcome::Obsolete,
            BatchRead::Unknown => Outcome::UnknownRun,
        };
        outcomes.push(Some(decided));
        queued.push(None);
    }
    let placed = place(tx, queued, HoldBack::Pool, limits, &own_limits, handoff).await?;
    Ok(outcomes
        .into_iter()
        .zip(placed)
        .map(|(o, p)| o.or(p).unwrap_or(Outcome::Obsolete))
        .collect())
}

/// What a batch does with a pool's later runs once one run of it could not be placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldBack {
    /// They are BehindParked: fresh messages queue behind a run just parked.
    Pool,
    /// Each is tried on its own: parked runs, already in their fair order, where a run whose
    /// labels no agent has room for must not hold back the others.
    None,
}

/// Places the locked QUEUED runs of `runs` (`None`: decided by the caller) in order, as the
/// module doc says, and commits: one outcome per entry (`None` for the caller's). Each run's
/// transition is traced in its span, and its agent's command continues that span's trace.
/// `own_limits`: the tenants' own concurrency limits the caller read already in `tx`.
pub async fn place(
    mut tx: Transaction<'static, Postgres>,
    runs: Vec<Option<(Box<RunRecord>, tracing::Span)>>,
    hold_back: HoldBack,
    limits: Limits,
    own_limits: &HashMap<TenantId, Option<i32>>,
    handoff: &outbox::Handoff,
) -> Result<Vec<Option<Outcome>>, CoreError> {
    let mut outcomes: Vec<Option<Outcome>> = runs.iter().map(|_| None).collect();
    let mut wanted: BTreeMap<Selector, usize> = BTreeMap::new();
    let mut tenants = std::collections::BTreeSet::new();
    for (run, _) in runs.iter().flatten() {
        *wanted
            .entry((run.spec.pool.clone(), run.spec.labels.clone()))
            .or_default() += 1;
        tenants.insert(run.tenant_id.0);
    }
    if wanted.is_empty() {
        return Ok(outcomes);
    }
    // Locks in the one order: the runs (the caller's), the agents, then the tenants (sorted).
    // An agent can serve several selectors (an unlabelled run fits every agent): its slots
    // are counted once, in `locked`, whichever selector's runs take them.
    let mut locked: HashMap<String, LockedAgent> = HashMap::new();
    let mut fleet: HashMap<Selector, Vec<String>> = HashMap::new();
    for (i, (selector, n)) in wanted.into_iter().enumerate() {
        let found = agents::lock_for_batch(
            &mut tx,
            &selector.0,
            &selector.1,
            limits.lease_ttl_ms,
            n,
            i == 0,
        )
        .await?;
        let ids = found.iter().map(|a| a.id.clone()).collect();
        for agent in found {
            locked.entry(agent.id.clone()).or_insert(agent);
        }
        fleet.insert(selector, ids);
    }
    let mut room: HashMap<TenantId, Option<(i64, i64)>> = HashMap::new();
    for tenant in tenants.into_iter().map(TenantId) {
        let own = own_limits
            .get(&tenant)
            .map_or(OwnLimit::Unknown, |l| OwnLimit::Read(*l));
        let r = parking::quota_room(&mut tx, tenant, limits.default_max_concurrent, own).await?;
        room.insert(tenant, r);
    }
    let mut held_back: HashSet<String> = HashSet::new();
    let mut assigned: Vec<(RunRecord, EventRecord)> = Vec::new();
    let mut commands: Vec<outbox::OutboxRow> = Vec::new();
    for (i, entry) in runs.into_iter().enumerate() {
        let Some((run, span)) = entry else {
            continue;
        };
        let pool_name = run.spec.pool.clone();
        if held_back.contains(&pool_name) {
            outcomes[i] = Some(Outcome::BehindParked);
            continue;
        }
        let selector = (pool_name.clone(), run.spec.labels.clone());
        // Least loaded first, as a single assignment picks.
        let pick = fleet.get(&selector).and_then(|ids| {
            ids.iter()
                .filter_map(|id| locked.get(id))
                .filter(|a| a.active < a.capacity)
                .min_by(|x, y| {
                    let (lx, ly) = (x.active * y.capacity, y.active * x.capacity);
                    lx.cmp(&ly).then_with(|| x.id.cmp(&y.id))
                })
                .map(|a| a.id.clone())
        });
        let Some(agent) = pick.and_then(|id| locked.get_mut(&id)) else {
            outcomes[i] = Some(Outcome::NoCapacity);
            if hold_back == HoldBack::Pool {
                held_back.insert(pool_name);
            }
            continue;
        };
        if let Some(Some((active, limit))) = room.get(&run.tenant_id)
            && active >= limit
        {
            outcomes[i] = Some(Outcome::OverQuota(OverQuota {
                active: *active,
                limit: *limit,
            }));
            if hold_back == HoldBack::Pool {
                held_back.insert(pool_name);
            }
            continue;
        }
        let traceparent = telemetry::traceparent_of(&span);
        let (done, event, row) =
            match assign_with_command(&mut tx, &run, &agent.id, limits, traceparent, handoff)
                .instrument(span.clone())
                .await
            {
                Ok(done) => done,
                // Cannot happen while the row lock is held; kept as the compare-and-set's answer.
                Err(CoreError::Refused(_)) => {
                    outcomes[i] = Some(Outcome::Obsolete);
                    continue;
                }
                Err(e) => return Err(e),
            };
        agent.active += 1;
        if let Some(Some((active, _))) = room.get_mut(&run.tenant_id) {
            *active += 1;
        }
        commands.push(row);
        outcomes[i] = Some(Outcome::Assigned {
            agent_id: agent.id.clone(),
            epoch: done.lease_epoch,
            news: Announcement::carrying(&done, &[&event]),
        });
        assigned.push((*run, event));
    }
    tx.commit().await?;
    for row in commands {
        handoff.hand(row);
    }
    for (run, event) in &assigned {
        committed(run, event);
    }
    Ok(outcomes)
}
