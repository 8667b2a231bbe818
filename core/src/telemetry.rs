//! Logging and tracing for the binaries.
//!
//! Logs: `RUST_LOG` filter (default `info`), JSON lines when `DROVER_LOG_FORMAT=json` or
//! stderr is not a terminal, human-readable otherwise. JSON lines carry the fields of every
//! span they happen in (`spans`), so a line about a run has its `run_id`, `attempt`, `epoch`,
//! `agent_id`, `tenant` and `trace_id`.
//!
//! Traces: every span also becomes an OpenTelemetry span. One run is one trace: the API's
//! SubmitRun span is its root (or the client's `traceparent`, when it sends one), and the W3C
//! `traceparent` travels in gRPC metadata, AMQP message headers, the outbox and the run row,
//! so the dispatcher, the agent, retries and redrives continue the same trace. Spans are
//! exported over OTLP/gRPC when `OTEL_EXPORTER_OTLP_ENDPOINT` (or
//! `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) is set, and not at all otherwise: ids are still
//! made, so logs carry `trace_id` and propagation works either way. The batch processor
//! honours the standard `OTEL_BSP_*` variables; [`Telemetry::shutdown`] flushes it.

use std::collections::HashMap;
use std::io::IsTerminal;
use std::time::Duration;

use lapin::BasicProperties;
use lapin::types::{AMQPValue, FieldTable, LongString};
use opentelemetry::propagation::TextMapPropagator;
use opentelemetry::trace::{TraceContextExt, TracerProvider as _};
use opentelemetry::{Context, KeyValue};
use opentelemetry_sdk::Resource;
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tonic::codegen::http;
use tracing::Span;
use tracing::field::Empty;
use tracing_opentelemetry::OpenTelemetrySpanExt;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::filter::{LevelFilter, Targets};
use tracing_subscriber::layer::{Layer as _, SubscriberExt};
use tracing_subscriber::util::SubscriberInitExt;

use crate::repo::RunRecord;

/// The W3C header (gRPC metadata key, AMQP header name) carrying the trace context.
pub const TRACEPARENT: &str = "traceparent";

/// How long [`Telemetry::shutdown`] may take to export what is still buffered.
const FLUSH_LIMIT: Duration = Duration::from_secs(5);

/// gRPC paths that get no span: periodic or infrastructure calls that would each make a
/// one-span trace of their own.
const UNTRACED_PATHS: &[&str] = &[
    "/grpc.health.v1.Health/",
    "/grpc.reflection.",
    "/drover.v1.AgentService/Heartbeat",
];

/// The tracer provider; [`Telemetry::shutdown`] flushes its exporter.
pub struct Telemetry {
    provider: SdkTracerProvider,
    exporting: bool,
}

/// Installs logging and tracing for a process named `service_name` (the OpenTelemetry
/// `service.name`, unless `OTEL_SERVICE_NAME` says otherwise). Call it inside the Tokio
/// runtime: the OTLP exporter's gRPC channel lives there. A second call (e.g. a test
/// composing libraries) installs nothing and exports nothing.
pub fn init(default_filter: &str, service_name: &'static str) -> Telemetry {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let json = match std::env::var("DROVER_LOG_FORMAT").as_deref() {
        Ok("json") => true,
        Ok("pretty") | Ok("text") => false,
        _ => !std::io::stderr().is_terminal(),
    };
    let mut resource = Resource::builder();
    if std::env::var_os("OTEL_SERVICE_NAME").is_none() {
        resource = resource.with_service_name(service_name);
    }
    let resource = resource
        .with_attributes([KeyValue::new("service.version", env!("CARGO_PKG_VERSION"))])
        .build();
    let mut builder = SdkTracerProvider::builder().with_resource(resource);
    let (exporting, export_error) = match otlp_wanted() {
        false => (false, None),
        true => match opentelemetry_otlp::SpanExporter::builder()
            .with_tonic()
            .build()
        {
            Ok(exporter) => {
                builder = builder.with_batch_exporter(exporter);
                (true, None)
            }
            Err(e) => (false, Some(e.to_string())),
        },
    };
    let provider = builder.build();
    // The transport's own spans (h2, hyper, tonic, tower) stay out of traces even at
    // `RUST_LOG=trace`: the exporter's calls would otherwise make spans to export, forever.
    let transport_off = Targets::new()
        .with_default(LevelFilter::TRACE)
        .with_targets(
            [
                "h2",
                "hyper",
                "hyper_util",
                "tonic",
                "tower",
                "opentelemetry",
            ]
            .map(|t| (t, LevelFilter::OFF)),
        );
    let otel = tracing_opentelemetry::layer()
        .with_tracer(provider.tracer("drover"))
        .with_filter(transport_off);
    let registry = tracing_subscriber::registry().with(filter).with(otel);
    let installed = if json {
        let fmt = tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_current_span(false)
            .with_span_list(true)
            .with_writer(std::io::stderr);
        registry.with(fmt).try_init()
    } else {
        let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
        registry.with(fmt).try_init()
    };
    if installed.is_err() {
        // Someone installed a subscriber already: this provider would never see a span.
        let _ = provider.shutdown();
        return Telemetry {
            provider: SdkTracerProvider::builder().build(),
            exporting: false,
        };
    }
    match (exporting, export_error) {
        (true, _) => tracing::info!(service = service_name, "exporting traces over OTLP/gRPC"),
        (false, Some(e)) => tracing::warn!(
            error = %e,
            "OTEL_EXPORTER_OTLP_ENDPOINT is set but the exporter cannot be built; traces are \
             not exported"
        ),
        (false, None) => {}
    }
    Telemetry {
        provider,
        exporting,
    }
}

/// Whether an OTLP endpoint is configured (and traces are not switched off).
fn otlp_wanted() -> bool {
    let set = |name: &str| std::env::var(name).is_ok_and(|v| !v.trim().is_empty());
    let off = std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.trim() == "none");
    !off && (set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
}

impl Telemetry {
    /// Exports the spans still buffered (at most `FLUSH_LIMIT`) and stops exporting. Call
    /// it last, while the runtime still runs: the exporter's channel needs it.
    pub async fn shutdown(self) {
        if !self.exporting {
            return;
        }
        let provider = self.provider;
        let flushed =
            tokio::task::spawn_blocking(move || provider.shutdown_with_timeout(FLUSH_LIMIT)).await;
        match flushed {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("trace export did not finish at shutdown: {e}"),
            Err(e) => eprintln!("trace export did not finish at shutdown: {e}"),
        }
    }
}

/// The `traceparent` of `span`, when it belongs to a trace.
pub fn traceparent_of(span: &Span) -> Option<String> {
    let cx = span.context();
    if !cx.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&cx, &mut carrier);
    carrier.remove(TRACEPARENT)
}

/// The `traceparent` of the span the caller is in.
pub fn current_traceparent() -> Option<String> {
    traceparent_of(&Span::current())
}

/// The trace id (32 hex digits) of a `traceparent` value.
pub fn trace_id_of(traceparent: &str) -> Option<&str> {
    traceparent.split('-').nth(1).filter(|t| t.len() == 32)
}

fn context_of(traceparent: &str) -> Option<Context> {
    let carrier = HashMap::from([(TRACEPARENT.to_owned(), traceparent.to_owned())]);
    let cx = TraceContextPropagator::new().extract(&carrier);
    cx.span().span_context().is_valid().then_some(cx)
}

/// Makes `span` a child of the remote span `traceparent` names (when it is a valid one) and
/// records the resulting `trace_id` field. For spans that start a process's part of a trace:
/// an incoming call, a consumed message, a published outbox row, a reaped run.
pub fn adopt(span: &Span, traceparent: Option<&str>) {
    if let Some(parent) = traceparent.and_then(context_of) {
        let _ = span.set_parent(parent);
    }
    let cx = span.context();
    let sc = cx.span().span_context().clone();
    if sc.is_valid() {
        span.record("trace_id", tracing::field::display(sc.trace_id()));
    }
}

/// Records a run's identity on `span` (fields it declared, e.g. [`grpc_server_span`]'s). The
/// lease (agent, epoch) is the caller's to record: a report names its own, which may be stale.
pub fn record_run(span: &Span, run: &RunRecord) {
    span.record("run_id", tracing::field::display(run.id));
    span.record("tenant", tracing::field::display(run.tenant_id));
    span.record("attempt", run.attempt);
}

/// Records a lease (from an agent's report, before the run is loaded) on `span`.
pub fn record_lease(span: &Span, run_id: impl std::fmt::Display, agent_id: &str, epoch: i64) {
    span.record("run_id", tracing::field::display(run_id));
    span.record("agent_id", agent_id);
    span.record("epoch", epoch);
}

/// The span of one incoming gRPC call (for `tonic`'s `Server::trace_fn`): named after the
/// method, a child of the caller's `traceparent`, with empty run fields handlers fill in
/// with [`record_run`]. Health, reflection and heartbeats get none.
pub fn grpc_server_span(req: &http::Request<()>) -> Span {
    let path = req.uri().path();
    if UNTRACED_PATHS.iter().any(|p| path.starts_with(p)) {
        return Span::none();
    }
    let method = path.trim_start_matches('/');
    let span = tracing::info_span!(
        "grpc",
        otel.name = method,
        otel.kind = "server",
        rpc.system = "grpc",
        run_id = Empty,
        attempt = Empty,
        epoch = Empty,
        agent_id = Empty,
        tenant = Empty,
        trace_id = Empty,
    );
    let parent = req.headers().get(TRACEPARENT).and_then(|v| v.to_str().ok());
    adopt(&span, parent);
    span
}

/// A `tonic` interceptor that puts the current span's `traceparent` into each outgoing
/// call's metadata, so the server's span continues the caller's trace, then runs the inner
/// interceptor (e.g. the bearer token's).
#[derive(Debug, Clone, Default)]
pub struct Traced<I>(pub I);

impl<I: tonic::service::Interceptor> tonic::service::Interceptor for Traced<I> {
    fn call(&mut self, mut req: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(value) = current_traceparent().and_then(|tp| tp.parse().ok()) {
            req.metadata_mut().insert(TRACEPARENT, value);
        }
        self.0.call(req)
    }
}

/// AMQP headers carrying `traceparent` (the outbox row's, or a span's), if any.
pub fn amqp_headers(traceparent: Option<&str>) -> Option<FieldTable> {
    let tp = traceparent?;
    let mut headers = FieldTable::default();
    headers.insert(
        TRACEPARENT.into(),
        AMQPValue::LongString(LongString::from(tp)),
    );
    Some(headers)
}

/// The `traceparent` header of a consumed message, if it has one.
pub fn amqp_traceparent(props: &BasicProperties) -> Option<String> {
    match props.headers().as_ref()?.inner().get(TRACEPARENT)? {
        AMQPValue::LongString(s) => std::str::from_utf8(s.as_bytes()).ok().map(str::to_owned),
        AMQPValue::ShortString(s) => Some(s.as_str().to_owned()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const TP: &str = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";

    #[test]
    fn trace_ids_are_read_from_traceparents() {
        assert_eq!(trace_id_of(TP), Some("4bf92f3577b34da6a3ce929d0e0e4736"));
        assert_eq!(trace_id_of("garbage"), None);
        assert!(context_of(TP).is_some());
        assert!(context_of("00-00000000000000000000000000000000-00f067aa0ba902b7-01").is_none());
        assert!(context_of("nonsense").is_none());
    }

    #[test]
    fn amqp_headers_round_trip() {
        let headers = amqp_headers(Some(TP)).expect("headers");
        let props = BasicProperties::default().with_headers(headers);
        assert_eq!(amqp_traceparent(&props).as_deref(), Some(TP));
        assert!(amqp_headers(None).is_none());
        assert_eq!(amqp_traceparent(&BasicProperties::default()), None);
    }
}
