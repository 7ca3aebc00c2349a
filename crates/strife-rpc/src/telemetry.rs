//! Logging: every process logs to stderr and to `DIR/logs/<component>.log`,
//! and every server logs every call through [`CallLogLayer`]. Secrets never
//! reach a log: handlers record only user, payment id and amount.

use crate::identity::Peer;
use crate::trace::TraceContext;
use anyhow::Context;
use std::fs;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Mutex;
use std::task::{Context as TaskContext, Poll};
use std::time::Instant;
use tracing::Instrument;
use tracing_subscriber::EnvFilter;
use tracing_subscriber::layer::SubscriberExt;
use tracing_subscriber::util::SubscriberInitExt;

/// Sets up logging for one component. `level` is an `EnvFilter` directive
/// (`info`, `debug`, `strife_gateway=debug`, …); `RUST_LOG` overrides it.
/// One formatter writes each line to both stderr and the log file, so the
/// two always agree. A non-empty `otlp_endpoint` (`telemetry.otlp_endpoint`)
/// also exports every span the filter lets through to that OTLP/gRPC
/// collector; this must then run inside a Tokio runtime (the exporter's
/// connection lives there), and [`shutdown_export`] sends what is left.
pub fn init(component: &str, dir: &Path, level: &str, otlp_endpoint: &str) -> anyhow::Result<()> {
    let logs = dir.join("logs");
    crate::files::create_private_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let path = logs.join(format!("{component}.log"));
    let file =
        crate::files::open_private_append(&path).with_context(|| format!("opening {}", path.display()))?;
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(level))?;
    let tee = Tee { file: std::sync::Arc::new(Mutex::new(file)) };
    let export = if otlp_endpoint.is_empty() {
        None
    } else {
        let tracer = otlp::start(component, otlp_endpoint).context("telemetry.otlp_endpoint")?;
        Some(tracing_opentelemetry::layer().with_tracer(tracer))
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(tee).with_ansi(false).with_target(false))
        .with(export)
        .try_init()
        .ok();
    Ok(())
}

/// Sends the spans not exported yet and stops the exporter (nothing
/// happens when OTLP export is off). Call it at the end of a server's run,
/// inside its runtime.
pub async fn shutdown_export() {
    otlp::shutdown().await;
}

/// A writer that copies every log line to stderr and to the log file.
#[derive(Clone)]
struct Tee {
    file: std::sync::Arc<Mutex<fs::File>>,
}

impl std::io::Write for Tee {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        let _ = std::io::stderr().write_all(buf);
        let mut file = self.file.lock().map_err(|_| std::io::Error::other("log file lock poisoned"))?;
        file.write_all(buf)?;
        Ok(buf.len())
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for Tee {
    type Writer = Tee;
    fn make_writer(&'a self) -> Tee {
        self.clone()
    }
}

/// Logging only to stderr, for client commands.
pub fn init_stderr(level: &str) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(std::io::stderr).with_target(false))
        .try_init()
        .ok();
}

/// A tower layer that puts each call in a `call` span (method, peer, and
/// the empty fields `user`, `payment_id`, `amount` that handlers fill in),
/// stores the caller's [`Peer`] in the request extensions for the
/// authorization checks, and logs the gRPC status and latency at the end.
#[derive(Debug, Clone, Copy)]
pub struct CallLogLayer;

impl<S> tower::Layer<S> for CallLogLayer {
    type Service = CallLog<S>;
    fn layer(&self, inner: S) -> CallLog<S> {
        CallLog { inner }
    }
}

#[derive(Debug, Clone)]
pub struct CallLog<S> {
    inner: S,
}

impl<S, B, RB> tower::Service<http::Request<B>> for CallLog<S>
where
    S: tower::Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = Pin<Box<dyn Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut TaskContext<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let peer = Peer::from_extensions(req.extensions());
        let peer_text = peer.as_ref().map_or_else(|| "unknown".to_owned(), Peer::to_string);
        if let Some(peer) = peer {
            req.extensions_mut().insert(peer);
        }
        let span = tracing::info_span!(
            "call",
            method = req.uri().path(),
            peer = peer_text,
            trace_id = tracing::field::Empty,
            user = tracing::field::Empty,
            payment_id = tracing::field::Empty,
            amount = tracing::field::Empty,
        );
        // The caller's trace, or a new one: correlation only, never trusted.
        let trace = join_trace(&span, TraceContext::from_headers(req.headers()));
        req.extensions_mut().insert(trace);
        let path = req.uri().path();
        let routine = path.ends_with("/RegisterBank") || path.starts_with("/grpc.");
        let started = Instant::now();
        let fut = self.inner.call(req).instrument(span.clone());
        Box::pin(async move {
            let result = fut.await;
            let latency_us = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
            let status = match &result {
                Ok(resp) => grpc_status_name(resp.headers()),
                Err(_) => "transport_error",
            };
            // Heartbeats and health checks would drown the log at info.
            if routine {
                span.in_scope(|| tracing::debug!(status, latency_us, "done"));
            } else {
                span.in_scope(|| tracing::info!(status, latency_us, "done"));
            }
            result
        })
    }
}

/// The gRPC status of a unary response. tonic sends an error as a
/// trailers-only response, so the code is in the headers; no code there
/// means the call succeeded.
fn grpc_status_name(headers: &http::HeaderMap) -> &'static str {
    let code = headers
        .get("grpc-status")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<i32>().ok())
        .unwrap_or(0);
    code_name(tonic::Code::from_i32(code))
}

pub fn code_name(code: tonic::Code) -> &'static str {
    use tonic::Code::*;
    match code {
        Ok => "OK",
        Cancelled => "CANCELLED",
        Unknown => "UNKNOWN",
        InvalidArgument => "INVALID_ARGUMENT",
        DeadlineExceeded => "DEADLINE_EXCEEDED",
        NotFound => "NOT_FOUND",
        AlreadyExists => "ALREADY_EXISTS",
        PermissionDenied => "PERMISSION_DENIED",
        ResourceExhausted => "RESOURCE_EXHAUSTED",
        FailedPrecondition => "FAILED_PRECONDITION",
        Aborted => "ABORTED",
        OutOfRange => "OUT_OF_RANGE",
        Unimplemented => "UNIMPLEMENTED",
        Internal => "INTERNAL",
        Unavailable => "UNAVAILABLE",
        DataLoss => "DATA_LOSS",
        Unauthenticated => "UNAUTHENTICATED",
    }
}

/// Records the customer a call acts for in the current call span.
pub fn record_user(user: &dyn std::fmt::Display) {
    tracing::Span::current().record("user", tracing::field::display(user));
}

/// Records a payment's id and amount in the current call span.
pub fn record_payment(payment_id: &dyn std::fmt::Display, amount: &dyn std::fmt::Display) {
    let span = tracing::Span::current();
    span.record("payment_id", tracing::field::display(payment_id));
    span.record("amount", tracing::field::display(amount));
}

/// The trace context of a span that starts work of its own (a call, or a
/// re-send of the gateway's finisher): a child of `incoming` when there is
/// one, else a new trace; recorded as `span`'s `trace_id` field. With OTLP
/// export on, `span` is made a child of `incoming` for the exporter too,
/// and the ids are the exported span's, so the logs and the exported spans
/// name the same trace.
pub fn join_trace(span: &tracing::Span, incoming: Option<TraceContext>) -> TraceContext {
    let trace = trace_of(span, incoming);
    span.record("trace_id", tracing::field::display(trace.trace_id_hex()));
    trace
}

fn trace_of(span: &tracing::Span, incoming: Option<TraceContext>) -> TraceContext {
    let ours = incoming.map_or_else(TraceContext::new_root, |parent| parent.child());
    if !otlp::exporting() {
        return ours;
    }
    if let Some(parent) = incoming {
        otlp::set_parent(span, &parent);
    }
    otlp::context_of(span).unwrap_or(ours)
}

/// The context to send on to the next hop from inside the current span:
/// with OTLP export on, the current span's (so the next hop's span is its
/// child in the exported trace); otherwise `fallback`, the server span's.
pub fn outgoing(fallback: &TraceContext) -> TraceContext {
    if !otlp::exporting() {
        return *fallback;
    }
    otlp::context_of(&tracing::Span::current())
        .filter(|here| here.trace_id == fallback.trace_id)
        .unwrap_or(*fallback)
}

/// OTLP export of spans through `opentelemetry-otlp`'s gRPC (tonic)
/// exporter; off unless `telemetry.otlp_endpoint` is set.
mod otlp {
    use crate::trace::TraceContext;
    use opentelemetry::trace::{
        SpanContext, SpanId, TraceContextExt, TraceFlags, TraceId, TraceState, TracerProvider as _,
    };
    use opentelemetry_otlp::WithExportConfig;
    use opentelemetry_sdk::trace::{SdkTracer, SdkTracerProvider};
    use std::sync::OnceLock;
    use tracing_opentelemetry::OpenTelemetrySpanExt;

    /// The exporting provider, once started (at most once per process).
    static PROVIDER: OnceLock<SdkTracerProvider> = OnceLock::new();

    pub fn exporting() -> bool {
        PROVIDER.get().is_some()
    }

    /// Starts the batch exporter to `endpoint` (`http://HOST:PORT`); spans
    /// of `component` carry the service name `strife-<component>`.
    pub fn start(component: &str, endpoint: &str) -> anyhow::Result<SdkTracer> {
        let exporter =
            opentelemetry_otlp::SpanExporter::builder().with_tonic().with_endpoint(endpoint).build()?;
        let resource =
            opentelemetry_sdk::Resource::builder().with_service_name(format!("strife-{component}")).build();
        let provider =
            SdkTracerProvider::builder().with_batch_exporter(exporter).with_resource(resource).build();
        let tracer = provider.tracer("strife");
        if PROVIDER.set(provider).is_err() {
            anyhow::bail!("OTLP export is already started in this process");
        }
        Ok(tracer)
    }

    pub async fn shutdown() {
        if let Some(provider) = PROVIDER.get() {
            let provider = provider.clone();
            // Blocks until the last batch is sent (or the export times out).
            let _ = tokio::task::spawn_blocking(move || provider.shutdown()).await;
        }
    }

    pub fn set_parent(span: &tracing::Span, parent: &TraceContext) {
        let flags = if parent.sampled { TraceFlags::SAMPLED } else { TraceFlags::default() };
        let remote = SpanContext::new(
            TraceId::from_bytes(parent.trace_id),
            SpanId::from_bytes(parent.span_id),
            flags,
            true,
            TraceState::default(),
        );
        let _ = span.set_parent(opentelemetry::Context::new().with_remote_span_context(remote));
    }

    /// The exported span's ids, if `span` has a valid one.
    pub fn context_of(span: &tracing::Span) -> Option<TraceContext> {
        let cx = span.context();
        let sc = cx.span().span_context().clone();
        sc.is_valid().then(|| TraceContext {
            trace_id: sc.trace_id().to_bytes(),
            span_id: sc.span_id().to_bytes(),
            sampled: sc.is_sampled(),
        })
    }
}
