//! Traces: one run is one OpenTelemetry trace across the real API, dispatcher and agent
//! processes. Each test runs an OTLP/gRPC receiver in-process (the collector's
//! `TraceService`), points the stack's `OTEL_EXPORTER_OTLP_ENDPOINT` at it, and reads the
//! spans the binaries export.

#![allow(
    clippy::unwrap_used,
    reason = "test code: a failed unwrap is a failed test"
)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use drover_proto::v1 as pb;
use drover_tests::fake_agent::{FakeAgent, in_state, wait_run};
use drover_tests::{Stack, StackOptions};
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::{KeyValue, any_value};
use tonic::{Request, Response, Status};

const SUBMIT: &str = "drover.v1.RunService/SubmitRun";

/// One exported span, flattened.
#[derive(Debug, Clone)]
struct Got {
    service: String,
    name: String,
    trace_id: String,
    span_id: String,
    parent: String,
    attrs: HashMap<String, String>,
}

/// The in-process OTLP receiver: keeps every span it is sent.
#[derive(Clone, Default)]
struct Receiver {
    spans: Arc<Mutex<Vec<Got>>>,
}

fn value(kv: &KeyValue) -> String {
    match kv.value.as_ref().and_then(|v| v.value.as_ref()) {
        Some(any_value::Value::StringValue(s)) => s.clone(),
        Some(any_value::Value::IntValue(i)) => i.to_string(),
        Some(any_value::Value::BoolValue(b)) => b.to_string(),
        Some(any_value::Value::DoubleValue(d)) => d.to_string(),
        other => format!("{other:?}"),
    }
}

#[tonic::async_trait]
impl TraceService for Receiver {
    async fn export(
        &self,
        request: Request<ExportTraceServiceRequest>,
    ) -> Result<Response<ExportTraceServiceResponse>, Status> {
        let mut got = Vec::new();
        for rs in request.into_inner().resource_spans {
            let service = rs
                .resource
                .iter()
                .flat_map(|r| r.attributes.iter())
                .find(|kv| kv.key == "service.name")
                .map(value)
                .unwrap_or_default();
            for span in rs.scope_spans.into_iter().flat_map(|s| s.spans) {
                got.push(Got {
                    service: service.clone(),
                    name: span.name,
                    trace_id: hex::encode(&span.trace_id),
                    span_id: hex::encode(&span.span_id),
                    parent: hex::encode(&span.parent_span_id),
                    attrs: span
                        .attributes
                        .iter()
                        .map(|kv| (kv.key.clone(), value(kv)))
                        .collect(),
                });
            }
        }
        self.spans.lock().unwrap().extend(got);
        Ok(Response::new(ExportTraceServiceResponse {
            partial_success: None,
        }))
    }
}

impl Receiver {
    /// Serves on 127.0.0.1:0; returns the receiver and its `http://ADDR`.
    async fn start() -> (Receiver, String) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let receiver = Receiver::default();
        let service = TraceServiceServer::new(receiver.clone());
        tokio::spawn(async move {
            tonic::transport::Server::builder()
                .add_service(service)
                .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener))
                .await
                .unwrap();
        });
        (receiver, format!("http://{addr}"))
    }

    fn spans(&self) -> Vec<Got> {
        self.spans.lock().unwrap().clone()
    }

    /// Waits until `found` picks something out of the spans received so far.
    async fn wait_for<T>(
        &self,
        stack: &Stack,
        what: &str,
        found: impl Fn(&[Got]) -> Option<T>,
    ) -> T {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(t) = found(&self.spans()) {
                return t;
            }
            if tokio::time::Instant::now() > deadline {
                stack.dump_logs();
                let names: Vec<String> = self
                    .spans()
                    .iter()
                    .map(|s| format!("{}:{}:{}", s.service, s.name, &s.trace_id[..8]))
                    .collect();
                panic!("no {what} among the exported spans within 60 s: {names:?}");
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

/// Env for a stack exporting to `endpoint`, in batches every 100 ms.
fn exporting_to(endpoint: &str, opts: StackOptions) -> StackOptions {
    let mut opts = opts;
    opts.env.extend([
        (
            "OTEL_EXPORTER_OTLP_ENDPOINT".to_owned(),
            endpoint.to_owned(),
        ),
        ("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "100".to_owned()),
    ]);
    opts
}

fn spec(cmd: &[&str], max_attempts: u32) -> pb::RunSpec {
    pb::RunSpec {
        image: "drover/busybox:latest".into(),
        command: cmd.iter().map(|s| s.to_string()).collect(),
        timeout_seconds: 120,
        max_attempts,
        ..Default::default()
    }
}

/// The chain of spans from `start` up to the root of its trace, `start` first; `None` while
/// a link is missing (not exported yet).
fn chain<'a>(spans: &'a [Got], start: &'a Got) -> Option<Vec<&'a Got>> {
    let by_id: HashMap<(&str, &str), &Got> = spans
        .iter()
        .map(|s| ((s.trace_id.as_str(), s.span_id.as_str()), s))
        .collect();
    let mut out = vec![start];
    let mut at = start;
    while !at.parent.is_empty() {
        at = by_id.get(&(at.trace_id.as_str(), at.parent.as_str()))?;
        out.push(at);
        if out.len() > 64 {
            return None;
        }
    }
    Some(out)
}

fn position(chain: &[(String, String)], service: &str, name: &str) -> Option<usize> {
    chain.iter().position(|(s, n)| s == service && n == name)
}

/// The API's SubmitRun span of `run_id`.
fn submit_span(spans: &[Got], run_id: &str) -> Option<Got> {
    spans
        .iter()
        .find(|s| s.name == SUBMIT && s.attrs.get("run_id").map(String::as_str) == Some(run_id))
        .cloned()
}

async fn submit(stack: &Stack, request: Request<pb::SubmitRunRequest>) -> pb::Run {
    stack
        .client()
        .await
        .submit_run(request)
        .await
        .expect("submit")
        .into_inner()
        .run
        .expect("run")
}

fn submit_request(spec: pb::RunSpec) -> Request<pb::SubmitRunRequest> {
    Request::new(pb::SubmitRunRequest {
        spec: Some(spec),
        idempotency_key: String::new(),
    })
}

#[tokio::test(flavor = "multi_thread")]
async fn one_run_is_one_trace_from_submit_through_dispatch_to_the_agent() {
    let (receiver, endpoint) = Receiver::start().await;
    let mut opts = exporting_to(&endpoint, StackOptions::default());
    opts.env
        .push(("DROVER_LOG_FORMAT".to_owned(), "json".to_owned()));
    // Every start reported on its own, so the trace has a ReportStarted to check.
    opts.agent_env
        .push(("DROVER_START_FOLD_MS".to_owned(), "0".to_owned()));
    let stack = Stack::start_with(opts).await;

    let run = submit(&stack, submit_request(spec(&["echo", "traced"], 1))).await;
    wait_run(
        &stack,
        &run.id,
        Duration::from_secs(120),
        in_state(pb::RunState::Succeeded),
    )
    .await;

    let root = receiver
        .wait_for(&stack, "SubmitRun span", |s| submit_span(s, &run.id))
        .await;
    assert_eq!(root.service, "drover-api");
    assert!(
        root.parent.is_empty(),
        "without a client traceparent, SubmitRun is the root"
    );
    let stored: Option<String> = sqlx::query_scalar("SELECT traceparent FROM runs WHERE id = $1")
        .bind(uuid::Uuid::parse_str(&run.id).unwrap())
        .fetch_one(&stack.db)
        .await
        .unwrap();
    assert!(
        stored
            .as_deref()
            .is_some_and(|tp| tp.contains(&root.trace_id) && tp.contains(&root.span_id)),
        "the run row stores the SubmitRun span's context: {stored:?}"
    );

    // The agent's execution, walked up to the root: dispatcher assignment, then SubmitRun.
    let trace = root.trace_id.clone();
    let execution_chain = receiver
        .wait_for(
            &stack,
            "agent execution span chained to SubmitRun",
            |spans| {
                let exec = spans.iter().find(|s| {
                    s.trace_id == trace && s.service == "drover-agent" && s.name == "agent.execute"
                })?;
                let names = chain(spans, exec)?;
                Some(
                    names
                        .iter()
                        .map(|s| (s.service.clone(), s.name.clone()))
                        .collect::<Vec<_>>(),
                )
            },
        )
        .await;
    let assign = position(&execution_chain, "drover-dispatcher", "dispatcher.assign")
        .unwrap_or_else(|| {
            panic!("no dispatcher assignment above the execution: {execution_chain:?}")
        });
    let root_at = position(&execution_chain, "drover-api", SUBMIT)
        .unwrap_or_else(|| panic!("no SubmitRun above the execution: {execution_chain:?}"));
    assert!(assign > 0 && assign < root_at, "{execution_chain:?}");
    assert_eq!(
        root_at,
        execution_chain.len() - 1,
        "SubmitRun is the root: {execution_chain:?}"
    );
    assert!(
        execution_chain.iter().any(|(_, n)| n == "outbox.publish"),
        "the outbox relay's publishes are links of the chain: {execution_chain:?}"
    );

    // The agent's steps and its reports, and the API handling them, are in the same trace
    // under the execution.
    for (service, name) in [
        ("drover-agent", "agent.start"),
        ("drover-agent", "docker.create"),
        ("drover-agent", "docker.start"),
        ("drover-agent", "agent.wait"),
        ("drover-agent", "agent.upload_artifacts"),
        ("drover-agent", "report started"),
        ("drover-agent", "report completion"),
        ("drover-api", "drover.v1.AgentService/ReportStarted"),
        // The run's few small files ride inline in ReportCompletion: no UploadArtifacts.
        ("drover-api", "drover.v1.AgentService/ReportCompletion"),
    ] {
        let up = receiver
            .wait_for(&stack, &format!("{service} {name} span"), |spans| {
                let span = spans
                    .iter()
                    .find(|s| s.trace_id == trace && s.service == service && s.name == name)?;
                let up = chain(spans, span)?;
                Some(up.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
            })
            .await;
        assert!(
            up.iter().any(|n| n == "agent.execute")
                && up.last().map(String::as_str) == Some(SUBMIT),
            "{service} {name} is under the execution and the submit: {up:?}"
        );
    }
    let completion = receiver
        .wait_for(&stack, "ReportCompletion span with run fields", |spans| {
            spans
                .iter()
                .find(|s| {
                    s.trace_id == trace && s.name == "drover.v1.AgentService/ReportCompletion"
                })
                .cloned()
        })
        .await;
    assert_eq!(completion.attrs.get("run_id"), Some(&run.id));
    assert_eq!(completion.attrs.get("agent_id"), Some(&stack.agent_id));
    assert_eq!(completion.attrs.get("trace_id"), Some(&trace));

    // The JSON log lines about the run carry its identity and trace id, from their spans.
    let agent_log = format!("{}.log", stack.agent_id);
    for (file, message) in [
        (agent_log.as_str(), "execution started"),
        ("dispatcher.log", "run assigned"),
        ("api.log", "attempt ended"),
    ] {
        let fields = json_log_fields(&stack.log_dir.join(file), message);
        for key in [
            "run_id", "attempt", "epoch", "agent_id", "tenant", "trace_id",
        ] {
            assert!(
                fields.contains_key(key),
                "{file}: `{message}` has no {key}: {fields:?}"
            );
        }
        assert_eq!(fields["run_id"], serde_json::json!(run.id), "{file}");
        assert_eq!(fields["trace_id"], serde_json::json!(trace), "{file}");
    }
    stack.stop().await;
}

/// The fields of the first JSON log line in `path` with this message, its spans' included.
fn json_log_fields(
    path: &std::path::Path,
    message: &str,
) -> serde_json::Map<String, serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap();
    let line = text
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .find(|v| v["message"] == message)
        .unwrap_or_else(|| panic!("no JSON line `{message}` in {}", path.display()));
    let mut fields = serde_json::Map::new();
    for span in line["spans"].as_array().into_iter().flatten() {
        if let Some(map) = span.as_object() {
            fields.extend(map.clone());
        }
    }
    if let Some(map) = line.as_object() {
        fields.extend(map.clone());
    }
    fields
}

/// Also the flush at shutdown: the batch delay is longer than the test, so the spans only
/// leave each process when it stops gracefully.
#[tokio::test(flavor = "multi_thread")]
async fn a_client_traceparent_on_submit_becomes_the_parent() {
    let (receiver, endpoint) = Receiver::start().await;
    let mut opts = exporting_to(&endpoint, StackOptions::default());
    opts.env.retain(|(k, _)| k != "OTEL_BSP_SCHEDULE_DELAY");
    opts.env
        .push(("OTEL_BSP_SCHEDULE_DELAY".to_owned(), "3600000".to_owned()));
    let stack = Stack::start_with(opts).await;

    let client_trace = format!("{:032x}", fastrand::u128(1..));
    let client_span = format!("{:016x}", fastrand::u64(1..));
    let mut request = submit_request(spec(&["true"], 1));
    request.metadata_mut().insert(
        "traceparent",
        format!("00-{client_trace}-{client_span}-01")
            .parse()
            .unwrap(),
    );
    let run = submit(&stack, request).await;
    wait_run(
        &stack,
        &run.id,
        Duration::from_secs(120),
        in_state(pb::RunState::Succeeded),
    )
    .await;
    stack.stop().await;

    // Every process has exited: what they flushed on the way out is all there is.
    let spans = receiver.spans();
    let root = submit_span(&spans, &run.id).expect("SubmitRun span flushed at shutdown");
    assert_eq!(root.trace_id, client_trace, "the client's trace continues");
    assert_eq!(
        root.parent, client_span,
        "the client's span is SubmitRun's parent"
    );
    // ... all the way into the agent.
    for (service, name) in [
        ("drover-dispatcher", "dispatcher.assign"),
        ("drover-agent", "agent.execute"),
        ("drover-api", "drover.v1.AgentService/ReportCompletion"),
    ] {
        assert!(
            spans
                .iter()
                .any(|s| s.trace_id == client_trace && s.service == service && s.name == name),
            "{service} {name} in the client's trace, flushed at shutdown"
        );
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_reaper_retry_and_a_redrive_continue_the_trace() {
    let (receiver, endpoint) = Receiver::start().await;
    let opts = StackOptions {
        agent: false,
        ..Default::default()
    }
    .short_leases(2_000);
    let stack = Stack::start_with(exporting_to(&endpoint, opts)).await;
    let mut agent = FakeAgent::register(&stack, "fake-traced", 4, &[]).await;

    let run = submit(&stack, submit_request(spec(&["true"], 2))).await;
    let assigned = wait_run(
        &stack,
        &run.id,
        Duration::from_secs(30),
        in_state(pb::RunState::Assigned),
    )
    .await;
    agent.started(&run.id, assigned.lease_epoch).await.unwrap();
    // The agent goes silent; the reaper ends the attempt and re-queues the run. Then the
    // agent heartbeats again, so the retry is assigned to it.
    wait_run(&stack, &run.id, Duration::from_secs(30), |r| r.attempt == 2).await;
    let alive = agent.keep_alive(stack.db.clone());
    wait_run(&stack, &run.id, Duration::from_secs(30), |r| {
        r.attempt == 2 && r.state == pb::RunState::Assigned as i32
    })
    .await;

    let root = receiver
        .wait_for(&stack, "SubmitRun span", |s| submit_span(s, &run.id))
        .await;
    let trace = root.trace_id.clone();
    let retry_chain = receiver
        .wait_for(
            &stack,
            "attempt 2's assignment chained to SubmitRun",
            |spans| {
                let second = spans.iter().find(|s| {
                    s.trace_id == trace
                        && s.name == "dispatcher.assign"
                        && s.attrs.get("attempt").map(String::as_str) == Some("2")
                })?;
                let up = chain(spans, second)?;
                Some(up.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
            },
        )
        .await;
    let reaper = retry_chain
        .iter()
        .position(|n| n == "reaper.end_attempt")
        .unwrap_or_else(|| panic!("the retry descends from the reaper's span: {retry_chain:?}"));
    assert_eq!(
        retry_chain.last().map(String::as_str),
        Some(SUBMIT),
        "{retry_chain:?}"
    );
    assert!(reaper > 0, "{retry_chain:?}");

    // Attempt 2 is lost too: dead-lettered. An operator's redrive (a call in the operator's
    // own trace) sends attempt 3 on in the run's trace.
    alive.abort();
    wait_run(
        &stack,
        &run.id,
        Duration::from_secs(60),
        in_state(pb::RunState::DeadLettered),
    )
    .await;
    stack
        .admin()
        .await
        .redrive_run(pb::RedriveRunRequest {
            run_id: run.id.clone(),
            reason: String::new(),
        })
        .await
        .expect("redrive");
    let _alive = agent.keep_alive(stack.db.clone());
    let redrive_chain = receiver
        .wait_for(
            &stack,
            "attempt 3's assignment chained to SubmitRun",
            |spans| {
                let third = spans.iter().find(|s| {
                    s.trace_id == trace
                        && s.name == "dispatcher.assign"
                        && s.attrs.get("attempt").map(String::as_str) == Some("3")
                })?;
                let up = chain(spans, third)?;
                Some(up.iter().map(|s| s.name.clone()).collect::<Vec<_>>())
            },
        )
        .await;
    assert_eq!(
        redrive_chain.last().map(String::as_str),
        Some(SUBMIT),
        "{redrive_chain:?}"
    );
    stack.stop().await;
}
