//! Prometheus metrics (issue 13): one registry per process, the metrics
//! every Strife server keeps, and the HTTP listener that serves them at
//! `/metrics` in Prometheus' text format.
//!
//! Metrics are plain atomics (prometheus-client): recording one is an
//! atomic add, or for a histogram a bucket search and two adds; labelled
//! families are looked up in a map under a read lock. Nothing is recorded
//! per payment that a store or network call does not dwarf.
//!
//! Names follow Prometheus' conventions: `strife_` prefix, base units
//! (`_seconds`, `_bytes`), `_total` on counters (added by the encoder).
//! The process metrics (`process_cpu_seconds_total`,
//! `process_resident_memory_bytes`, `process_open_fds`,
//! `process_start_time_seconds`) are read from `/proc` at each scrape.

use crate::tls::Tls;
use anyhow::Context;
use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};
use std::net::SocketAddr;
use std::sync::atomic::AtomicU64;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;

/// The setting that turns the listener off.
pub const OFF: &str = "off";
/// Longest a scrape's connection may stay open idle.
const CONNECTION_IDLE_MAX: Duration = Duration::from_secs(30);

/// A counter of events.
pub type Count = Counter<u64, AtomicU64>;
/// A labelled counter, with static label values (reasons, outcomes).
pub type Counts<const N: usize> = Family<[(&'static str, &'static str); N], Count>;
/// A labelled histogram.
pub type Histograms<const N: usize> = Family<[(&'static str, &'static str); N], Histogram>;

/// Durations from 0.25 ms to about 16 s.
fn duration_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.000_25, 2.0, 17)
}

fn duration_histogram() -> Histogram {
    Histogram::new(duration_buckets())
}

fn duration_family<const N: usize>() -> Histograms<N> {
    Family::new_with_constructor(duration_histogram)
}

/// Sizes from 1 to 4096.
fn size_histogram() -> Histogram {
    Histogram::new(exponential_buckets(1.0, 2.0, 13))
}

static REGISTRY: LazyLock<Mutex<Registry>> = LazyLock::new(|| {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(ProcessCollector));
    Mutex::new(registry)
});

fn register(f: impl FnOnce(&mut Registry)) {
    f(&mut REGISTRY.lock().unwrap_or_else(PoisonError::into_inner));
}

/// The registry as Prometheus' text format.
pub fn render() -> String {
    // Every family this process uses is registered before the first scrape.
    LazyLock::force(&STORE);
    let mut out = String::new();
    let registry = REGISTRY.lock().unwrap_or_else(PoisonError::into_inner);
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut out, &registry) {
        tracing::warn!(error = %e, "encoding the metrics");
    }
    out
}

/// What every process's store does (the group-commit thread of SQLite).
pub struct StoreMetrics {
    /// Time of one batch's transaction, its fsync included.
    pub commit_seconds: Histogram,
    /// Operations per committed batch.
    pub batch_size: Histogram,
    /// Storage failures, by cause (`disk_full`, `io_error`, `cannot_open`,
    /// `read_only`, `other`): each failed batch and each failed statement
    /// reported (a payment lost with its batch counts twice).
    pub failures: Counts<1>,
}

pub static STORE: LazyLock<StoreMetrics> = LazyLock::new(|| {
    let m = StoreMetrics {
        commit_seconds: duration_histogram(),
        batch_size: size_histogram(),
        failures: Counts::default(),
    };
    register(|r| {
        r.register_with_unit(
            "strife_store_commit",
            "Time of one store transaction (a batch of operations), its forced write included",
            Unit::Seconds,
            m.commit_seconds.clone(),
        );
        r.register(
            "strife_store_batch_size",
            "Operations committed together in one store transaction",
            m.batch_size.clone(),
        );
        r.register("strife_store_failures", "Store operations that failed, by cause", m.failures.clone());
    });
    m
});

/// A gateway's metrics.
pub struct GatewayMetrics {
    /// Payments decided, by outcome (`committed`, `declined`) and decline
    /// reason (`none` when committed).
    pub payments: Counts<2>,
    /// From the request to the answer, for payments this process decided.
    pub payment_seconds: Histogram,
    /// Each phase of a payment: `prepare` (every vote in), `decision` (the
    /// decision durable), `delivery` (every bank acknowledged, or the
    /// commit timeout).
    pub phase_seconds: Histograms<1>,
    /// Payments being decided by this process now.
    pub in_flight: Gauge,
    /// Decisions not yet acknowledged by every bank, as this gateway's
    /// finisher last claimed them (at most one claim's worth, 256).
    pub undelivered: Gauge,
    /// A bank answered a decision with one of its own that contradicts it
    /// (must stay 0: it means a bank and the gateway disagree).
    pub decision_conflicts: Count,
    /// Legs per batch sent to a bank, by call (`prepare`, `decide`).
    pub bank_batch_size: Histograms<1>,
    /// Logins, by result (`ok`, `wrong_credentials`, `throttled`, `failed`).
    pub logins: Counts<1>,
    /// Addresses or accounts locked out after too many failed logins.
    pub login_locks: Count,
    /// Requests refused for their token, by reason.
    pub token_rejections: Counts<1>,
    /// Bank registrations, by result (`accepted`, `refused`).
    pub registrations: Counts<1>,
    /// Payments whose decision and legs disagree, found by this gateway's
    /// audit passes since it started (must stay 0).
    pub audit_problems: Gauge,
    /// When this gateway's last audit pass ended, seconds since the epoch
    /// (0: none yet).
    pub audit_last_run_seconds: Gauge,
    /// Finished payments checked by its audit passes.
    pub audit_checked: Count,
}

pub static GATEWAY: LazyLock<GatewayMetrics> = LazyLock::new(|| {
    let m = GatewayMetrics {
        payments: Counts::default(),
        payment_seconds: duration_histogram(),
        phase_seconds: duration_family(),
        in_flight: Gauge::default(),
        undelivered: Gauge::default(),
        decision_conflicts: Count::default(),
        bank_batch_size: Family::new_with_constructor(size_histogram),
        logins: Counts::default(),
        login_locks: Count::default(),
        token_rejections: Counts::default(),
        registrations: Counts::default(),
        audit_problems: Gauge::default(),
        audit_last_run_seconds: Gauge::default(),
        audit_checked: Count::default(),
    };
    register(|r| {
        r.register(
            "strife_audit_problems",
            "Payments whose decision and a bank's leg disagree, found by this gateway's audit (must stay 0)",
            m.audit_problems.clone(),
        );
        r.register(
            "strife_audit_last_run_timestamp_seconds",
            "When this gateway's last audit pass ended (0: none yet)",
            m.audit_last_run_seconds.clone(),
        );
        r.register(
            "strife_audit_payments_checked",
            "Finished payments checked against every bank's leg by this gateway's audit",
            m.audit_checked.clone(),
        );
        r.register("strife_payments", "Payments decided, by outcome and decline reason", m.payments.clone());
        r.register_with_unit(
            "strife_payment_duration",
            "Time from a payment's request to its answer",
            Unit::Seconds,
            m.payment_seconds.clone(),
        );
        r.register_with_unit(
            "strife_payment_phase_duration",
            "Time of each phase of a payment: prepare, decision, delivery",
            Unit::Seconds,
            m.phase_seconds.clone(),
        );
        r.register(
            "strife_payments_in_flight",
            "Payments being decided by this gateway now",
            m.in_flight.clone(),
        );
        r.register(
            "strife_undelivered_decisions",
            "Decisions some bank has not acknowledged yet",
            m.undelivered.clone(),
        );
        r.register(
            "strife_decision_conflicts",
            "Decisions a bank contradicted (must stay 0)",
            m.decision_conflicts.clone(),
        );
        r.register("strife_bank_batch_size", "Legs per batched call to a bank", m.bank_batch_size.clone());
        r.register("strife_logins", "Logins, by result", m.logins.clone());
        r.register("strife_login_locks", "Lock-outs after too many failed logins", m.login_locks.clone());
        r.register(
            "strife_token_rejections",
            "Requests refused for their token, by reason",
            m.token_rejections.clone(),
        );
        r.register("strife_bank_registrations", "Bank registrations, by result", m.registrations.clone());
    });
    m
});

/// A bank's metrics.
pub struct BankMetrics {
    /// Prepares answered, by vote (`yes`, `no`).
    pub prepares: Counts<1>,
    /// Decisions received from the gateway, by decision (`commit`,
    /// `abort`); a repeated one counts again.
    pub decisions: Counts<1>,
    /// One-phase transfers answered, by outcome (`committed`, `aborted`);
    /// a repeated one counts again.
    pub transfers: Counts<1>,
    /// Legs prepared and waiting for the gateway's decision.
    pub in_doubt: Gauge,
    /// Age of the oldest of them, in seconds (0 when none).
    pub in_doubt_oldest_seconds: Gauge<f64, AtomicU64>,
    /// Registrations with a gateway that it accepted (`result="accepted"`).
    pub registrations: Counts<1>,
}

pub static BANK: LazyLock<BankMetrics> = LazyLock::new(|| {
    let m = BankMetrics {
        prepares: Counts::default(),
        decisions: Counts::default(),
        transfers: Counts::default(),
        in_doubt: Gauge::default(),
        in_doubt_oldest_seconds: Gauge::default(),
        registrations: Counts::default(),
    };
    register(|r| {
        r.register("strife_prepares", "Prepares answered, by vote", m.prepares.clone());
        r.register(
            "strife_decisions",
            "Decisions received from the gateway, by decision",
            m.decisions.clone(),
        );
        r.register("strife_transfers", "One-phase transfers answered, by outcome", m.transfers.clone());
        r.register(
            "strife_in_doubt_legs",
            "Legs prepared and waiting for the gateway's decision",
            m.in_doubt.clone(),
        );
        r.register_with_unit(
            "strife_in_doubt_oldest",
            "Age of the oldest leg waiting for a decision",
            Unit::Seconds,
            m.in_doubt_oldest_seconds.clone(),
        );
        r.register(
            "strife_registrations",
            "Registrations with a gateway, by result",
            m.registrations.clone(),
        );
    });
    m
});

/// Discovery through etcd (gateways and banks alike).
pub struct DiscoveryMetrics {
    /// 1 while this process's key is in etcd under a live lease.
    pub registered: Gauge,
    /// Leases lost (etcd unreachable longer than the TTL, or restarted).
    pub lease_losses: Count,
    /// Watches broken and established again (resyncs).
    pub watch_resyncs: Count,
}

pub static DISCOVERY: LazyLock<DiscoveryMetrics> = LazyLock::new(|| {
    let m = DiscoveryMetrics {
        registered: Gauge::default(),
        lease_losses: Count::default(),
        watch_resyncs: Count::default(),
    };
    register(|r| {
        r.register(
            "strife_discovery_registered",
            "1 while registered in etcd under a live lease",
            m.registered.clone(),
        );
        r.register("strife_discovery_lease_losses", "etcd leases lost", m.lease_losses.clone());
        r.register(
            "strife_discovery_watch_resyncs",
            "etcd watches broken and read again",
            m.watch_resyncs.clone(),
        );
    });
    m
});

/// The process metrics, read from `/proc/self` at each scrape.
#[derive(Debug)]
struct ProcessCollector;

/// Clock ticks per second of `/proc` times (USER_HZ: 100 on Linux).
const CLOCK_TICKS_PER_SECOND: f64 = 100.0;
/// Bytes per page of `/proc/self/statm`.
const PAGE_BYTES: i64 = 4096;

impl Collector for ProcessCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
        // Fields after the command (which may hold spaces), from field 3.
        let fields: Vec<&str> =
            stat.rsplit_once(") ").map(|(_, rest)| rest.split(' ').collect()).unwrap_or_default();
        let field = |n: usize| fields.get(n - 3).and_then(|f| f.parse::<f64>().ok()).unwrap_or(0.0);
        let cpu = ConstCounter::new((field(14) + field(15)) / CLOCK_TICKS_PER_SECOND);
        let m = encoder.encode_descriptor(
            "process_cpu",
            "Total user and system CPU time spent",
            Some(&Unit::Seconds),
            cpu.metric_type(),
        )?;
        cpu.encode(m)?;
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap_or_default();
        let pages: i64 = statm.split(' ').nth(1).and_then(|p| p.parse().ok()).unwrap_or(0);
        let rss = ConstGauge::new(pages.saturating_mul(PAGE_BYTES));
        let m = encoder.encode_descriptor(
            "process_resident_memory",
            "Resident memory size",
            Some(&Unit::Bytes),
            rss.metric_type(),
        )?;
        rss.encode(m)?;
        let fds = std::fs::read_dir("/proc/self/fd").map_or(0, |d| d.count());
        let fds = ConstGauge::new(i64::try_from(fds).unwrap_or(i64::MAX));
        let m = encoder.encode_descriptor(
            "process_open_fds",
            "Open file descriptors",
            None,
            fds.metric_type(),
        )?;
        fds.encode(m)?;
        let start = ConstGauge::new(*PROCESS_START);
        let m = encoder.encode_descriptor(
            "process_start_time",
            "When the process started, since the Unix epoch",
            Some(&Unit::Seconds),
            start.metric_type(),
        )?;
        start.encode(m)?;
        Ok(())
    }
}

/// When this process started (as far as metrics know: their first use).
static PROCESS_START: LazyLock<f64> = LazyLock::new(|| {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0.0, |d| d.as_secs_f64())
});

/// The listener of `setting` (`metrics.listen`), or `None` when it is
/// `off`.
pub async fn bind(setting: &str) -> anyhow::Result<Option<TcpListener>> {
    let setting = setting.trim();
    if setting.is_empty() || setting.eq_ignore_ascii_case(OFF) {
        return Ok(None);
    }
    let addr: SocketAddr =
        setting.parse().with_context(|| format!("metrics.listen '{setting}' is not IP:PORT or off"))?;
    let listener =
        TcpListener::bind(addr).await.with_context(|| format!("binding the metrics listener on {addr}"))?;
    LazyLock::force(&PROCESS_START);
    Ok(Some(listener))
}

/// Prints `strife: <component> metrics listening on ADDR`.
pub fn announce(component: &str, addr: SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "strife: {component} metrics listening on {addr}");
    let _ = out.flush();
}

/// Serves `/metrics` on `listener` until `stop`: plain HTTP on a loopback
/// address, mutual TLS with `tls` on any other.
pub async fn serve(listener: TcpListener, tls: Tls, stop: watch::Receiver<bool>) {
    let router = axum::Router::new().route(
        "/metrics",
        axum::routing::get(|| async {
            (
                [(
                    axum::http::header::CONTENT_TYPE,
                    prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                )],
                render(),
            )
        }),
    );
    serve_http(listener, router, tls, stop).await;
}

/// Serves `router` over HTTP/1.1 on `listener` until `stop`: plain on a
/// loopback address; on any other, mutual TLS with `tls` (the client
/// presents a certificate of the cluster's CA, not revoked).
pub async fn serve_http(
    listener: TcpListener,
    router: axum::Router,
    tls: Tls,
    mut stop: watch::Receiver<bool>,
) {
    let loopback = listener.local_addr().is_ok_and(|a| a.ip().is_loopback());
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    tracing::warn!(error = %e, "accepting an HTTP connection");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.changed() => return,
        };
        let (router, tls) = (router.clone(), tls.clone());
        tokio::spawn(async move {
            let service = hyper_util::service::TowerToHyperService::new(router);
            let builder = hyper_util::server::conn::auto::Builder::new(hyper_util::rt::TokioExecutor::new());
            let served = if loopback {
                let io = hyper_util::rt::TokioIo::new(tcp);
                tokio::time::timeout(CONNECTION_IDLE_MAX, builder.serve_connection(io, service)).await
            } else {
                match tls.accept(tcp).await {
                    Ok(stream) => {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        tokio::time::timeout(CONNECTION_IDLE_MAX, builder.serve_connection(io, service)).await
                    }
                    Err(e) => {
                        tracing::debug!(%peer, error = %e, "HTTP client refused at TLS");
                        return;
                    }
                }
            };
            if let Ok(Err(e)) = served {
                tracing::debug!(%peer, error = %e, "HTTP connection ended with an error");
            }
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_text_names_every_family_in_base_units() {
        GATEWAY.payments.get_or_create(&[("outcome", "committed"), ("reason", "none")]).inc();
        GATEWAY.phase_seconds.get_or_create(&[("phase", "prepare")]).observe(0.002);
        BANK.in_doubt.set(3);
        let text = render();
        for needle in [
            "strife_payments_total{outcome=\"committed\",reason=\"none\"} 1",
            "strife_payment_phase_duration_seconds_bucket{",
            "strife_payments_in_flight 0",
            "strife_in_doubt_legs 3",
            "strife_store_commit_seconds_count",
            "process_cpu_seconds_total",
            "process_resident_memory_bytes",
            "process_open_fds",
        ] {
            assert!(text.contains(needle), "{needle} missing in:\n{text}");
        }
    }
}
