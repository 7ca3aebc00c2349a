//! Logging: every process logs to stderr and to `DIR/logs/<component>.log`,
//! and every server logs every call through [`CallLogLayer`]. Secrets never
//! reach a log: handlers record only user, payment id and amount.

use crate::identity::Peer;
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
/// two always agree.
pub fn init(component: &str, dir: &Path, level: &str) -> anyhow::Result<()> {
    let logs = dir.join("logs");
    crate::files::create_private_dir_all(&logs).with_context(|| format!("creating {}", logs.display()))?;
    let path = logs.join(format!("{component}.log"));
    let file =
        crate::files::open_private_append(&path).with_context(|| format!("opening {}", path.display()))?;
    let filter = EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(level))?;
    let tee = Tee { file: std::sync::Arc::new(Mutex::new(file)) };
    tracing_subscriber::registry()
        .with(filter)
        .with(tracing_subscriber::fmt::layer().with_writer(tee).with_ansi(false).with_target(false))
        .try_init()
        .ok();
    Ok(())
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
            user = tracing::field::Empty,
            payment_id = tracing::field::Empty,
            amount = tracing::field::Empty,
        );
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
