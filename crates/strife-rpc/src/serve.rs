//! Serving: a TCP listener on the configured address (port 0 allowed), mutual
//! TLS, the call log, limits, health and reflection, and graceful shutdown.

use crate::telemetry::CallLogLayer;
use crate::tls::{Guarded, HANDSHAKE_TIMEOUT, Tls};
use anyhow::Context;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context as TaskContext, Poll};
use std::time::Duration;
use strife_core::limits::STREAMS_PER_CONNECTION_MAX;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinSet;
use tonic::transport::Server;
use tower::layer::util::{Identity, Stack};

/// The longest any call may run on a server, whatever deadline it asks for.
pub const REQUEST_DEADLINE_MAX: Duration = Duration::from_secs(30);

/// Binds `addr` and reports the real address (for port 0).
pub async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

/// Most TLS handshakes a server runs at once; further connections wait in
/// the listen queue.
pub const HANDSHAKES_MAX: usize = 256;
/// How long the accept loop rests after an error such as "too many open
/// files", rather than spinning on it.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The connections of `listener`, each after its mutual-TLS handshake with
/// `tls` as its files are at that moment (see [`Tls::accept`]). Handshakes
/// run at once, at most [`HANDSHAKES_MAX`], each for at most
/// [`HANDSHAKE_TIMEOUT`]; they end when the stream is dropped.
pub fn incoming(listener: TcpListener, tls: &Tls) -> Incoming {
    Incoming { listener, tls: tls.clone(), handshakes: JoinSet::new(), backoff: None }
}

/// See [`incoming`].
pub struct Incoming {
    listener: TcpListener,
    tls: Tls,
    handshakes: JoinSet<Option<Guarded<tokio_rustls::server::TlsStream<TcpStream>>>>,
    backoff: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl tokio_stream::Stream for Incoming {
    type Item = io::Result<Guarded<tokio_rustls::server::TlsStream<TcpStream>>>;

    fn poll_next(self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<Option<Self::Item>> {
        let this = self.get_mut();
        if let Some(backoff) = &mut this.backoff
            && backoff.as_mut().poll(cx).is_ready()
        {
            this.backoff = None;
        }
        while this.backoff.is_none() && this.handshakes.len() < HANDSHAKES_MAX {
            match this.listener.poll_accept(cx) {
                Poll::Ready(Ok((tcp, remote))) => {
                    let tls = this.tls.clone();
                    this.handshakes.spawn(async move {
                        let _ = tcp.set_nodelay(true);
                        match tokio::time::timeout(HANDSHAKE_TIMEOUT, tls.accept(tcp)).await {
                            Ok(Ok(stream)) => Some(stream),
                            Ok(Err(e)) => {
                                tracing::debug!(%remote, error = %e, "TLS handshake failed");
                                None
                            }
                            Err(_) => {
                                tracing::debug!(%remote, "TLS handshake timed out");
                                None
                            }
                        }
                    });
                }
                Poll::Ready(Err(e)) if is_connection_error(&e) => {}
                Poll::Ready(Err(e)) => {
                    tracing::warn!(error = %e, "cannot accept connections; retrying");
                    let mut backoff = Box::pin(tokio::time::sleep(ACCEPT_ERROR_BACKOFF));
                    let _ = backoff.as_mut().poll(cx);
                    this.backoff = Some(backoff);
                }
                Poll::Pending => break,
            }
        }
        loop {
            match this.handshakes.poll_join_next(cx) {
                Poll::Ready(Some(Ok(Some(stream)))) => return Poll::Ready(Some(Ok(stream))),
                Poll::Ready(Some(_)) => continue,
                Poll::Ready(None) | Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// An error of one connection, not of the listener.
fn is_connection_error(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionAborted
            | io::ErrorKind::ConnectionReset
            | io::ErrorKind::BrokenPipe
            | io::ErrorKind::Interrupted
            | io::ErrorKind::WouldBlock
            | io::ErrorKind::TimedOut
    )
}

/// A server builder with the call log and every limit set; mutual TLS is
/// done by [`incoming`].
pub fn builder() -> Server<Stack<CallLogLayer, Identity>> {
    Server::builder()
        .timeout(REQUEST_DEADLINE_MAX)
        .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX)
        .http2_max_header_list_size(16 * 1024)
        .tcp_nodelay(true)
        .layer(CallLogLayer)
}

/// The names of the standard services [`standard_services`] adds.
const STANDARD_SERVICES: [&str; 3] = [
    "grpc.health.v1.Health",
    "grpc.reflection.v1.ServerReflection",
    "grpc.reflection.v1alpha.ServerReflection",
];

/// The standard services every Strife server also serves: gRPC health, and
/// server reflection in both versions tools speak (`v1`, and `v1alpha` for
/// older ones such as Python's grpcio-reflection). `services` are the
/// fully-qualified names of the services the server itself serves: health
/// marks them serving, and reflection advertises exactly them and the
/// standard ones. Add all four to the server.
pub async fn standard_services(
    services: &[&str],
) -> anyhow::Result<(
    tonic_health::server::HealthReporter,
    tonic_health::pb::health_server::HealthServer<impl tonic_health::pb::health_server::Health>,
    tonic_reflection::server::v1::ServerReflectionServer<impl tonic_reflection::server::v1::ServerReflection>,
    tonic_reflection::server::v1alpha::ServerReflectionServer<
        impl tonic_reflection::server::v1alpha::ServerReflection,
    >,
)> {
    let (reporter, health) = tonic_health::server::health_reporter();
    for name in services {
        reporter.set_service_status(*name, tonic_health::ServingStatus::Serving).await;
    }
    let configure = || {
        services.iter().chain(STANDARD_SERVICES.iter()).fold(
            tonic_reflection::server::Builder::configure()
                .include_reflection_service(false)
                .register_encoded_file_descriptor_set(strife_proto::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_health::pb::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1::FILE_DESCRIPTOR_SET)
                .register_encoded_file_descriptor_set(tonic_reflection::pb::v1alpha::FILE_DESCRIPTOR_SET),
            |builder, name| builder.with_service_name(*name),
        )
    };
    Ok((reporter, health, configure().build_v1()?, configure().build_v1alpha()?))
}

/// Resolves when the process gets SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (signal(SignalKind::terminate()), signal(SignalKind::interrupt()))
    else {
        // Without signal handlers we can only run until killed.
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = int.recv() => {}
    }
    tracing::info!("shutdown signal received; stopping gracefully");
}

/// Prints the contract's ready line on stdout and flushes it.
pub fn announce_listening(component: &str, addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "strife: {component} listening on {addr}");
    let _ = out.flush();
}
