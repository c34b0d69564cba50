//! Logs and traces. Logs: pretty for people or JSON lines for log shippers, on stderr. Traces:
//! OpenTelemetry over OTLP (HTTP, protobuf) when the standard environment names a receiver
//! (`OTEL_EXPORTER_OTLP_ENDPOINT` or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`; `OTEL_SERVICE_NAME`,
//! `OTEL_TRACES_SAMPLER`, `OTEL_TRACES_SAMPLER_ARG`, `OTEL_BSP_*` as the SDK reads them), and
//! off otherwise: no exporter, no thread, and the spans of the hot paths are not even created
//! ([`enabled`]). Contexts cross processes as W3C `traceparent` strings: in HTTP headers, and in
//! an event's envelope and outbox row, so that a publish and the deliveries of an event are
//! linked to the write that caused it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use opentelemetry::propagation::TextMapPropagator as _;
use opentelemetry::trace::{TraceContextExt as _, TracerProvider as _};
use opentelemetry_sdk::propagation::TraceContextPropagator;
use opentelemetry_sdk::trace::SdkTracerProvider;
use tracing_opentelemetry::OpenTelemetrySpanExt as _;
use tracing_subscriber::filter::{EnvFilter, LevelFilter};
use tracing_subscriber::layer::SubscriberExt as _;
use tracing_subscriber::util::SubscriberInitExt as _;
use tracing_subscriber::Layer as _;

use crate::config::ConfigError;
use clap::{Args, ValueEnum};

/// Log output format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable, coloured when stderr is a terminal.
    Pretty,
    /// One JSON object per line, for log shippers.
    Json,
}

#[derive(Debug, Clone, Args)]
pub struct LogArgs {
    /// Log format.
    #[arg(long, env = "LOG_FORMAT", value_enum, default_value = "pretty")]
    pub log_format: LogFormat,
    /// Log filter in `tracing` EnvFilter syntax, e.g. `info,auth_service=debug`.
    #[arg(long, env = "LOG_LEVEL", default_value = "info")]
    pub log_level: String,
}

static ENABLED: AtomicBool = AtomicBool::new(false);
static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

/// Installs the global subscriber: the logs, and the traces when configured. `service` names
/// the process in its traces unless `OTEL_SERVICE_NAME` does. Safe to call twice (tests build
/// several apps in one process): the second call keeps the first subscriber.
pub fn init(args: &LogArgs, service: &'static str) -> Result<(), ConfigError> {
    let filter = EnvFilter::try_new(&args.log_level)
        .map_err(|err| ConfigError::new("LOG_LEVEL", err.to_string()))?;
    let logs = match args.log_format {
        LogFormat::Pretty => tracing_subscriber::fmt::layer()
            .with_writer(std::io::stderr)
            .boxed(),
        LogFormat::Json => tracing_subscriber::fmt::layer()
            .json()
            .flatten_event(true)
            .with_writer(std::io::stderr)
            .boxed(),
    }
    .with_filter(filter);
    // The traces keep their own level, whatever LOG_LEVEL says of the logs.
    let traces = tracer(service)?.map(|tracer| {
        tracing_opentelemetry::layer()
            .with_tracer(tracer)
            .with_filter(LevelFilter::INFO)
    });
    let _ = tracing_subscriber::registry()
        .with(logs)
        .with(traces)
        .try_init();
    Ok(())
}

/// The exporter and provider, when the environment names a receiver.
fn tracer(service: &'static str) -> Result<Option<opentelemetry_sdk::trace::Tracer>, ConfigError> {
    let set = |name: &str| std::env::var(name).is_ok_and(|value| !value.trim().is_empty());
    let disabled = std::env::var("OTEL_SDK_DISABLED").is_ok_and(|v| v.eq_ignore_ascii_case("true"))
        || std::env::var("OTEL_TRACES_EXPORTER").is_ok_and(|v| v.eq_ignore_ascii_case("none"));
    if disabled
        || !(set("OTEL_EXPORTER_OTLP_ENDPOINT") || set("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT"))
    {
        return Ok(None);
    }
    if let Some(provider) = PROVIDER.get() {
        return Ok(Some(provider.tracer("gqlws")));
    }
    // The blocking HTTP client may not be built (or dropped) on an async runtime's thread.
    let exporter = std::thread::spawn(|| {
        opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .build()
    })
    .join()
    .map_err(|_| ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", "the exporter panicked"))?
    .map_err(|err| ConfigError::new("OTEL_EXPORTER_OTLP_ENDPOINT", err.to_string()))?;
    let mut resource = opentelemetry_sdk::Resource::builder();
    if !set("OTEL_SERVICE_NAME") {
        resource = resource.with_service_name(service);
    }
    let provider = SdkTracerProvider::builder()
        .with_batch_exporter(exporter)
        .with_resource(resource.build())
        .build();
    let tracer = provider.tracer("gqlws");
    let _ = PROVIDER.set(provider);
    ENABLED.store(true, Ordering::Release);
    Ok(Some(tracer))
}

/// Whether traces are exported: hot paths create their spans only then.
pub fn enabled() -> bool {
    ENABLED.load(Ordering::Relaxed)
}

/// The span `make` builds when traces are exported, else a disabled one (which instruments a
/// future and records fields for nothing): hot paths build their spans only when it counts.
pub fn span(make: impl FnOnce() -> tracing::Span) -> tracing::Span {
    if enabled() {
        make()
    } else {
        tracing::Span::none()
    }
}

/// Sends what is buffered; at the end of `main`.
pub fn shutdown() {
    if let Some(provider) = PROVIDER.get() {
        if let Err(err) = provider.shutdown() {
            tracing::warn!(%err, "traces not all exported at shutdown");
        }
    }
}

/// The current span's context as a W3C `traceparent`, if tracing is on and it is sampled or
/// valid.
pub fn traceparent() -> Option<String> {
    if !enabled() {
        return None;
    }
    let context = tracing::Span::current().context();
    if !context.span().span_context().is_valid() {
        return None;
    }
    let mut carrier = HashMap::new();
    TraceContextPropagator::new().inject_context(&context, &mut carrier);
    carrier.remove("traceparent")
}

/// The context a `traceparent` (and its `tracestate`) names, if it names a valid one.
fn extract(traceparent: &str, tracestate: Option<&str>) -> Option<opentelemetry::Context> {
    let mut carrier = HashMap::from([("traceparent".to_owned(), traceparent.to_owned())]);
    if let Some(state) = tracestate {
        carrier.insert("tracestate".to_owned(), state.to_owned());
    }
    let context = TraceContextPropagator::new().extract(&carrier);
    context.span().span_context().is_valid().then_some(context)
}

/// The context a `traceparent` names (and its `tracestate`), as a parent for `span`.
pub fn set_parent(span: &tracing::Span, traceparent: &str, tracestate: Option<&str>) {
    if let Some(context) = extract(traceparent, tracestate) {
        let _ = span.set_parent(context);
    }
}

/// Links `span` to the context a `traceparent` names: a publish or a delivery to the write
/// that caused it, without making the write's trace hold every delivery.
pub fn link(span: &tracing::Span, traceparent: &str) {
    if let Some(context) = extract(traceparent, None) {
        span.add_link(context.span().span_context().clone());
    }
}

/// Sets the OpenTelemetry status of `span` to an error with `description` (an error code).
pub fn set_error(span: &tracing::Span, description: &str) {
    span.set_status(opentelemetry::trace::Status::error(description.to_owned()));
}

#[cfg(test)]
mod tests {
    /// With no receiver named, nothing is set up: no exporter, no thread, no context.
    #[test]
    fn off_when_the_environment_names_no_receiver() {
        if std::env::var_os("OTEL_EXPORTER_OTLP_ENDPOINT").is_some()
            || std::env::var_os("OTEL_EXPORTER_OTLP_TRACES_ENDPOINT").is_some()
        {
            return; // the environment of this run turns tracing on
        }
        assert!(super::tracer("test").expect("valid").is_none());
        assert!(!super::enabled());
        assert_eq!(super::traceparent(), None);
    }
}
