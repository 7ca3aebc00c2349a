//! Serving: a TCP listener on the configured address (port 0 allowed), mutual
//! TLS, the call log, limits, health and reflection, and graceful shutdown.

use crate::telemetry::CallLogLayer;
use anyhow::Context;
use std::net::SocketAddr;
use std::time::Duration;
use strife_core::limits::STREAMS_PER_CONNECTION_MAX;
use tokio::net::TcpListener;
use tonic::transport::Server;
use tonic::transport::server::TcpIncoming;
use tower::layer::util::{Identity, Stack};

/// The longest any call may run on a server, whatever deadline it asks for.
pub const REQUEST_DEADLINE_MAX: Duration = Duration::from_secs(30);

/// Binds `addr` and reports the real address (for port 0).
pub async fn bind(addr: &str) -> anyhow::Result<(TcpListener, SocketAddr)> {
    let listener = TcpListener::bind(addr).await.with_context(|| format!("binding {addr}"))?;
    let local = listener.local_addr()?;
    Ok((listener, local))
}

pub fn incoming(listener: TcpListener) -> TcpIncoming {
    TcpIncoming::from(listener).with_nodelay(Some(true))
}

/// A server builder with mutual TLS, the call log and every limit set.
pub fn builder(tls: &crate::tls::Tls) -> anyhow::Result<Server<Stack<CallLogLayer, Identity>>> {
    Ok(Server::builder()
        .tls_config(tls.server())
        .context("setting up TLS")?
        .timeout(REQUEST_DEADLINE_MAX)
        .max_concurrent_streams(STREAMS_PER_CONNECTION_MAX)
        .http2_max_header_list_size(16 * 1024)
        .tcp_nodelay(true)
        .layer(CallLogLayer))
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
