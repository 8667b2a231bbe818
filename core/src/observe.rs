//! What a service shows about itself: Prometheus metrics, liveness and readiness, served over
//! plain HTTP on a port of its own (`metrics.listen_addr`, off when empty).
//!
//! - `GET /metrics`: Prometheus text format (0.0.4) from the process-wide `metrics` recorder.
//!   Code anywhere in the process records with the `metrics` macros and the names in
//!   [`names`]; labels are bounded sets (states, outcomes), never run ids or tenants.
//! - `GET /healthz`: 200 while the process serves HTTP at all.
//! - `GET /readyz`: 200 when every dependency check in the service's [`Health`] passes, 503
//!   otherwise; the JSON body names each check and, for a failing one, why.
//!
//! The process prints `<service> metrics listening on ADDR` on stdout once bound, so
//! supervisors and tests learn a port picked with `:0`.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Duration;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};
use serde::Deserialize;
use sqlx::PgPool;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

/// `DROVER_METRICS__LISTEN_ADDR`: where `/metrics`, `/healthz` and `/readyz` are served.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(default)]
pub struct MetricsSettings {
    /// Empty = no HTTP endpoint (metrics are still recorded); port 0 picks a free port.
    pub listen_addr: String,
}

/// Metric names, in one place so the services and the README agree.
pub mod names {
    pub const RUNS_SUBMITTED: &str = "drover_runs_submitted_total";
    /// Label `state`: the terminal state the run reached in this process's transaction.
    pub const RUNS_ENDED: &str = "drover_runs_ended_total";
    /// Labels `from`, `to`: every committed state change applied by this process.
    pub const RUN_TRANSITIONS: &str = "drover_run_transitions_total";
    pub const RETRIES: &str = "drover_run_retries_total";
    pub const DEAD_LETTERS: &str = "drover_dead_letters_archived_total";
    pub const LEASE_EXPIRIES: &str = "drover_lease_expiries_total";
    pub const FENCED_REPORTS: &str = "drover_fenced_reports_total";
    /// Run and audit events linked into their tenant's audit chain by this process's sealer.
    pub const AUDIT_SEALED: &str = "drover_audit_events_sealed_total";
    pub const OUTBOX_BACKLOG: &str = "drover_outbox_backlog";
    pub const OUTBOX_OLDEST_AGE: &str = "drover_outbox_oldest_pending_age_seconds";
    pub const OUTBOX_PUBLISHED: &str = "drover_outbox_published_total";
    pub const PUBLISH_CONFIRM: &str = "drover_amqp_publish_confirm_seconds";
    pub const QUEUE_WAIT: &str = "drover_queue_wait_seconds";
    pub const DISPATCH_LATENCY: &str = "drover_dispatch_latency_seconds";
    pub const DISPATCH_BATCH: &str = "drover_dispatch_batch_size";
    pub const ASSIGNMENTS: &str = "drover_assignments_total";
    pub const RUNS_PARKED: &str = "drover_runs_parked_total";
    pub const CONTAINER_START: &str = "drover_container_start_seconds";
    pub const EXECUTION_DURATION: &str = "drover_execution_duration_seconds";
    pub const EXECUTIONS_STARTED: &str = "drover_executions_started_total";
    pub const AGENT_CAPACITY: &str = "drover_agent_capacity";
    pub const AGENT_RUNNING: &str = "drover_agent_running";
    pub const LOG_BYTES: &str = "drover_log_bytes_received_total";
    pub const ARTIFACT_BYTES: &str = "drover_artifact_bytes_uploaded_total";
    pub const PG_POOL_SIZE: &str = "drover_pg_pool_connections";
    pub const PG_POOL_IDLE: &str = "drover_pg_pool_idle_connections";
    pub const READY: &str = "drover_ready";
}

/// Latency buckets (seconds): 5 ms to 10 min, for waits that span scheduling and container
/// runs alike.
const SECONDS_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
];

#[derive(Debug, thiserror::Error)]
pub enum ObserveError {
    #[error("metrics recorder: {0}")]
    Recorder(String),
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
}

static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();

/// Installs the process-wide recorder once (later calls, e.g. `drover dev` composing the
/// services, share it) and returns its handle.
pub fn recorder() -> Result<PrometheusHandle, ObserveError> {
    if let Some(h) = HANDLE.get() {
        return Ok(h.clone());
    }
    let builder = PrometheusBuilder::new()
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS_BUCKETS)
        .and_then(|b| {
            b.set_buckets_for_metric(
                Matcher::Full(names::DISPATCH_BATCH.into()),
                &[1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 64.0],
            )
        })
        .map_err(|e| ObserveError::Recorder(e.to_string()))?;
    let recorder = builder.build_recorder();
    let handle = recorder.handle();
    if metrics::set_global_recorder(recorder).is_err() {
        // Another thread won the race; its handle is the one that sees the metrics.
        return HANDLE
            .get()
            .cloned()
            .ok_or_else(|| ObserveError::Recorder("a foreign recorder is installed".into()));
    }
    let _ = HANDLE.set(handle.clone());
    describe();
    Ok(handle)
}

/// How often recorded histogram samples are folded into their buckets.
const UPKEEP_INTERVAL: Duration = Duration::from_secs(5);

/// The histogram upkeep task of this process, if one was started.
static UPKEEP: Mutex<Option<tokio::task::JoinHandle<()>>> = Mutex::new(None);

/// Starts histogram upkeep once per process, whether or not `/metrics` is served: the exporter
/// keeps every recorded sample (a value and a timestamp, 16 bytes, in 1 KiB blocks) in an
/// unbounded buffer until upkeep or a scrape folds it into the fixed buckets. Without it, a
/// process with the endpoint off grows with every histogram sample: dispatch latency, queue
/// wait and publish confirms for each assignment, start time and duration for each execution.
/// Runs on the caller's runtime until it shuts down; one task per process (`drover dev` runs
/// every service in one), started again by the next `bind` if its runtime has gone.
fn spawn_upkeep(handle: PrometheusHandle) {
    let mut running = UPKEEP
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    if running.as_ref().is_some_and(|task| !task.is_finished()) {
        return;
    }
    *running = Some(tokio::spawn(async move {
        let mut tick = tokio::time::interval(UPKEEP_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            handle.run_upkeep();
        }
    }));
}

fn describe() {
    use metrics::{Unit, describe_counter, describe_gauge, describe_histogram};
    use names::*;
    describe_counter!(
        RUNS_SUBMITTED,
        "Runs accepted by SubmitRun (not deduplicated)"
    );
    describe_counter!(RUNS_ENDED, "Runs that reached a terminal state, by state");
    describe_counter!(
        RUN_TRANSITIONS,
        "Committed run state changes, by from/to state"
    );
    describe_counter!(RETRIES, "Failed attempts re-queued as a new attempt");
    describe_counter!(DEAD_LETTERS, "Messages archived from drover.dead");
    describe_counter!(LEASE_EXPIRIES, "Attempts lost because their lease expired");
    describe_counter!(
        FENCED_REPORTS,
        "Agent reports and artifact calls refused because the agent no longer holds the lease"
    );
    describe_counter!(
        AUDIT_SEALED,
        "Run and audit events linked into their tenant's audit chain"
    );
    describe_gauge!(
        OUTBOX_BACKLOG,
        "Due outbox rows not yet published (sampled)"
    );
    describe_gauge!(
        OUTBOX_OLDEST_AGE,
        Unit::Seconds,
        "Age of the oldest due, unpublished outbox row (sampled)"
    );
    describe_counter!(OUTBOX_PUBLISHED, "Outbox rows published and confirmed");
    describe_histogram!(
        PUBLISH_CONFIRM,
        Unit::Seconds,
        "RabbitMQ publish to confirm, per outbox batch"
    );
    describe_histogram!(
        QUEUE_WAIT,
        Unit::Seconds,
        "From dispatchable in QUEUED to ASSIGNED"
    );
    describe_histogram!(
        DISPATCH_LATENCY,
        Unit::Seconds,
        "From a run message's delivery to its assignment commit (runs assigned on arrival)"
    );
    describe_histogram!(
        DISPATCH_BATCH,
        "Run messages a dispatcher assigned together in one transaction"
    );
    describe_counter!(ASSIGNMENTS, "Runs assigned to an agent");
    describe_counter!(
        RUNS_PARKED,
        "Run messages parked: no agent had room, the tenant was at its quota, or others waited"
    );
    describe_histogram!(
        CONTAINER_START,
        Unit::Seconds,
        "Executor start call (create + start)"
    );
    describe_histogram!(
        EXECUTION_DURATION,
        Unit::Seconds,
        "From start to the end of the execution"
    );
    describe_counter!(EXECUTIONS_STARTED, "Executions this agent started");
    describe_gauge!(AGENT_CAPACITY, "Slots this agent offers");
    describe_gauge!(AGENT_RUNNING, "Executions this agent holds");
    describe_counter!(
        LOG_BYTES,
        Unit::Bytes,
        "Run output bytes received by PushLogs"
    );
    describe_counter!(
        ARTIFACT_BYTES,
        Unit::Bytes,
        "Artifact bytes received by UploadArtifacts"
    );
    describe_gauge!(PG_POOL_SIZE, "Postgres pool connections open (sampled)");
    describe_gauge!(PG_POOL_IDLE, "Postgres pool connections idle (sampled)");
    describe_gauge!(READY, "1 when every readiness check passes");
}

/// The state of a service's dependency checks; `/readyz` and `grpc.health.v1` read it.
#[derive(Debug, Clone, Default)]
pub struct Health {
    checks: Arc<Mutex<BTreeMap<&'static str, Result<(), String>>>>,
}

impl Health {
    /// A health with these checks, all failing ("not checked yet") until first set.
    pub fn new(checks: &[&'static str]) -> Self {
        let map = checks
            .iter()
            .map(|c| (*c, Err("not checked yet".to_owned())))
            .collect();
        Self {
            checks: Arc::new(Mutex::new(map)),
        }
    }

    pub fn set(&self, check: &'static str, result: Result<(), String>) {
        let mut map = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        map.insert(check, result);
        let ready = map.values().all(Result::is_ok);
        metrics::gauge!(names::READY).set(if ready { 1.0 } else { 0.0 });
    }

    pub fn is_ready(&self) -> bool {
        let map = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        map.values().all(Result::is_ok)
    }

    /// `{"ready": bool, "checks": {"postgres": "ok" | "<why not>", ...}}`.
    pub fn report(&self) -> serde_json::Value {
        let map = self.checks.lock().unwrap_or_else(|p| p.into_inner());
        let checks: serde_json::Map<String, serde_json::Value> = map
            .iter()
            .map(|(k, v)| {
                let s = match v {
                    Ok(()) => "ok".to_owned(),
                    Err(e) => e.clone(),
                };
                ((*k).to_owned(), serde_json::Value::String(s))
            })
            .collect();
        serde_json::json!({
            "ready": map.values().all(Result::is_ok),
            "checks": checks,
        })
    }
}

#[derive(Clone)]
struct Served {
    handle: PrometheusHandle,
    health: Health,
}

/// A bound metrics listener, not yet serving: binding early lets the binary print the port
/// before it reports itself started.
pub struct Endpoint {
    listener: TcpListener,
    pub addr: SocketAddr,
}

/// Installs the recorder and binds `settings.listen_addr`; `None` when the endpoint is off.
pub async fn bind(settings: &MetricsSettings) -> Result<Option<Endpoint>, ObserveError> {
    spawn_upkeep(recorder()?);
    if settings.listen_addr.is_empty() {
        return Ok(None);
    }
    let bind_err = |source| ObserveError::Bind {
        addr: settings.listen_addr.clone(),
        source,
    };
    let listener = TcpListener::bind(&settings.listen_addr)
        .await
        .map_err(bind_err)?;
    let addr = listener.local_addr().map_err(bind_err)?;
    Ok(Some(Endpoint { listener, addr }))
}

impl Endpoint {
    /// Serves `/metrics`, `/healthz` and `/readyz` until `cancel` fires.
    pub fn spawn(self, health: Health, cancel: CancellationToken) -> Result<(), ObserveError> {
        let handle = recorder()?;
        let app = Router::new()
            .route("/metrics", get(metrics_page))
            .route("/healthz", get(|| async { "ok\n" }))
            .route("/readyz", get(readyz))
            .with_state(Served { handle, health });
        let addr = self.addr;
        tokio::spawn(async move {
            let stop = async move { cancel.cancelled().await };
            if let Err(e) = axum::serve(self.listener, app)
                .with_graceful_shutdown(stop)
                .await
            {
                tracing::warn!(error = %e, "metrics endpoint stopped");
            }
        });
        tracing::info!(%addr, "metrics, /healthz and /readyz served");
        Ok(())
    }
}

async fn metrics_page(State(s): State<Served>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        s.handle.render(),
    )
}

async fn readyz(State(s): State<Served>) -> impl IntoResponse {
    let code = if s.health.is_ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        code,
        [(header::CONTENT_TYPE, "application/json")],
        s.health.report().to_string(),
    )
}

/// How often dependencies are checked and gauges sampled.
pub const CHECK_INTERVAL: Duration = Duration::from_secs(2);
/// Longest a check may take before it counts as failed.
const CHECK_TIMEOUT: Duration = Duration::from_secs(1);

/// Postgres answers `SELECT 1`, and the newest migration this binary knows is applied.
pub async fn check_postgres(pool: &PgPool) -> (Result<(), String>, Result<(), String>) {
    let latest = crate::db::MIGRATOR.iter().map(|m| m.version).max();
    let probe = async {
        sqlx::query("SELECT 1").execute(pool).await?;
        let applied: Option<i64> =
            sqlx::query_scalar("SELECT max(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(pool)
                .await?;
        Ok::<_, sqlx::Error>(applied)
    };
    match tokio::time::timeout(CHECK_TIMEOUT, probe).await {
        Err(_) => (
            Err("postgres did not answer within 1 s".into()),
            Err("unknown: postgres unreachable".into()),
        ),
        Ok(Err(e)) => (
            Err(format!("postgres unreachable: {}", short(&e))),
            Err("unknown: postgres unreachable".into()),
        ),
        Ok(Ok(applied)) if applied >= latest => (Ok(()), Ok(())),
        Ok(Ok(applied)) => (
            Ok(()),
            Err(format!(
                "applied migration {applied:?}, this binary needs {latest:?}"
            )),
        ),
    }
}

/// Samples the pool and the outbox into gauges.
pub async fn sample_postgres(pool: &PgPool) {
    metrics::gauge!(names::PG_POOL_SIZE).set(f64::from(pool.size()));
    metrics::gauge!(names::PG_POOL_IDLE).set(pool.num_idle() as f64);
    let row = sqlx::query_as::<_, (i64, Option<f64>)>(
        "SELECT count(*), EXTRACT(EPOCH FROM now() - min(available_at))::float8 \
         FROM outbox WHERE published_at IS NULL AND available_at <= now()",
    )
    .fetch_one(pool);
    if let Ok(Ok((backlog, age))) = tokio::time::timeout(CHECK_TIMEOUT, row).await {
        metrics::gauge!(names::OUTBOX_BACKLOG).set(backlog as f64);
        metrics::gauge!(names::OUTBOX_OLDEST_AGE).set(age.unwrap_or(0.0).max(0.0));
    }
}

/// Every [`CHECK_INTERVAL`] until `cancel`: checks Postgres into `health` (checks `postgres`
/// and `migrations`), samples the gauges, and calls `on_change(ready)` when readiness flips.
pub async fn watch_postgres(
    pool: PgPool,
    health: Health,
    cancel: CancellationToken,
    on_change: impl Fn(bool) + Send + 'static,
) {
    let mut last: Option<bool> = None;
    loop {
        let (pg, migrations) = check_postgres(&pool).await;
        if pg.is_ok() {
            sample_postgres(&pool).await;
        }
        if let Err(e) = &pg
            && last != Some(false)
        {
            tracing::warn!(error = %e, "readiness: postgres check failed");
        }
        health.set("postgres", pg);
        health.set("migrations", migrations);
        let ready = health.is_ready();
        if last != Some(ready) {
            on_change(ready);
            last = Some(ready);
        }
        tokio::select! {
            _ = cancel.cancelled() => return,
            _ = tokio::time::sleep(CHECK_INTERVAL) => {},
        }
    }
}

/// Counts one committed state change (call after the commit): every transition by
/// `from`/`to`, and a terminal one in [`names::RUNS_ENDED`] by state.
pub fn record_transition(event: &crate::repo::EventRecord) {
    let from = event.from_state.map_or("NONE", |s| s.as_str());
    let to = event.to_state.as_str();
    metrics::counter!(names::RUN_TRANSITIONS, "from" => from, "to" => to).increment(1);
    if event.to_state.is_terminal() {
        metrics::counter!(names::RUNS_ENDED, "state" => to).increment(1);
    }
}

fn short(e: &sqlx::Error) -> String {
    let s = e.to_string();
    s.chars().take(200).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn upkeep_running() -> bool {
        UPKEEP
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .as_ref()
            .is_some_and(|task| !task.is_finished())
    }

    /// Upkeep runs with the metrics endpoint off (the dispatcher's and agent's default), once
    /// per process, and again on a later runtime once the first has gone.
    #[test]
    fn histogram_upkeep_runs_without_an_endpoint_and_outlives_a_runtime() {
        let off = MetricsSettings::default();
        assert!(off.listen_addr.is_empty());
        for _ in 0..2 {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .expect("runtime");
            rt.block_on(async {
                assert!(bind(&off).await.expect("recorder").is_none());
                assert!(upkeep_running());
                let first = UPKEEP
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                    .map(tokio::task::JoinHandle::id);
                bind(&off).await.expect("recorder");
                let second = UPKEEP
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .as_ref()
                    .map(tokio::task::JoinHandle::id);
                assert_eq!(first, second, "one upkeep task per process");
            });
            drop(rt);
            assert!(!upkeep_running(), "its runtime is gone");
        }
    }
}
