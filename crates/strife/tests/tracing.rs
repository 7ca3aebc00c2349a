//! Tracing: the client's W3C `traceparent` travels client → gateway →
//! banks, and every log line of the payment at each server carries its
//! trace id; a malformed one is ignored; with `telemetry.otlp_endpoint`
//! set, the spans of the payment reach an OTLP receiver under that trace.

mod common;

use common::*;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Servers log at debug for their own crates, so the per-leg lines of the
/// banks are there too.
const LEVEL: (&str, &str) = ("STRIFE_LOG_LEVEL", "info,strife_bank=debug,strife_gateway=debug");

/// A traceparent the client is told to join (`STRIFE_TRACEPARENT`): a
/// trace id of our own, so the logs can be searched for it.
fn traceparent() -> (String, String) {
    let trace_id = uuid::Uuid::new_v4().simple().to_string();
    (format!("00-{trace_id}-00f067aa0ba902b7-01"), trace_id)
}

fn log_of(dir: &Path, component: &str) -> String {
    std::fs::read_to_string(dir.join("logs").join(format!("{component}.log"))).expect("log file")
}

/// The value of `key=` in a log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    let start = line.find(&format!("{key}="))? + key.len() + 1;
    let rest = &line[start..];
    Some(rest.split(|c: char| c.is_whitespace() || c == '}' || c == ':').next().unwrap_or(rest))
}

/// Checks that every line of the payment `(payment_id, txn_id)` at the
/// gateway and at `banks` carries `trace_id`; returns how many there were
/// per server. A decision re-sent by the gateway's finisher is the one
/// exception: it is a trace of its own, in a `finish` span naming the txn
/// id, and its lines carry that trace's id instead.
fn every_line_carries(
    dir: &Path,
    banks: &[&str],
    payment_id: &str,
    txn_id: &str,
    trace_id: &str,
) -> Vec<usize> {
    let ours = format!("trace_id={trace_id}");
    let gateway = log_of(dir, "gateway");
    let mut resends: Vec<String> = Vec::new();
    let mut counts = Vec::new();
    let mut n = 0;
    for line in gateway.lines().filter(|l| l.contains(payment_id) || l.contains(txn_id)) {
        if line.contains("finish{") {
            resends.push(format!("trace_id={}", field(line, "trace_id").expect("a re-send names its trace")));
            continue;
        }
        assert!(line.contains(&ours), "a gateway line of the payment without its trace id:\n{line}");
        n += 1;
    }
    counts.push(n);
    for bank in banks {
        let text = log_of(dir, bank);
        let mut n = 0;
        let lines = text.lines().filter(|l| {
            l.contains(payment_id)
                || l.contains(txn_id)
                || l.contains("PrepareBatch")
                || l.contains("DecideBatch")
        });
        for line in lines {
            if resends.iter().any(|r| line.contains(r.as_str())) {
                continue;
            }
            assert!(
                line.contains(&ours),
                "a {bank} line of the payment without its trace id:\n{line}\n\n{text}"
            );
            n += 1;
        }
        counts.push(n);
    }
    counts
}

/// The txn id the gateway gave the payment (from its decision line).
fn txn_id_of(dir: &Path, payment_id: &str) -> String {
    let line = wait_for_log_line(&dir.join("logs/gateway.log"), &format!("payment_id={payment_id}"));
    let decided = wait_for_log_lines(&dir.join("logs/gateway.log"), &["payment decided", payment_id], 1);
    field(&decided[0], "txn_id").unwrap_or_else(|| panic!("no txn_id in {line}")).to_owned()
}

#[test]
fn one_payment_carries_the_clients_trace_id_through_every_log() {
    let c = Cluster::start_with(&["BankA", "BankB"], &[LEVEL]);
    c.login("user1", "BankA");
    let (parent, trace_id) = traceparent();
    let r = c.cli_env(
        &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "1.00"],
        &[("STRIFE_TRACEPARENT", &parent)],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    let payment_id = r.json()["payment_id"].as_str().expect("id").to_owned();
    let txn_id = txn_id_of(c.path(), &payment_id);

    // Each bank logs its leg's prepare and decision under the trace id.
    let ours = format!("trace_id={trace_id}");
    for bank in ["BankA", "BankB"] {
        let log = c.path().join("logs").join(format!("{bank}.log"));
        wait_for_log_lines(&log, &["PrepareBatch", "done", &ours], 1);
        wait_for_log_lines(&log, &["DecideBatch", "done", &ours], 1);
        wait_for_log_lines(&log, &["leg prepared", &txn_id, &ours], 1);
        wait_for_log_lines(&log, &["leg decided", &txn_id, &ours], 1);
    }
    let counts = every_line_carries(c.path(), &["BankA", "BankB"], &payment_id, &txn_id, &trace_id);
    // The Pay call's line and the decision's at the gateway; at each bank
    // two calls and two leg lines at least.
    assert!(counts[0] >= 2 && counts[1] >= 4 && counts[2] >= 4, "lines per server: {counts:?}");

    // The client's other commands are traces of their own.
    let r = c.cli_env(
        &["--json", "--as", "user1@BankA", "balance"],
        &[("RUST_LOG", "warn,strife_client=debug"), ("NO_COLOR", "1")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let shown =
        field(&r.stderr, "trace_id").expect("the client shows its trace id at debug level").to_owned();
    assert_eq!(shown.len(), 32, "{}", r.stderr);
    assert_ne!(shown, trace_id);
    wait_for_log_lines(&c.path().join("logs/gateway.log"), &["GetBalance", &format!("trace_id={shown}")], 1);
    wait_for_log_lines(&c.path().join("logs/BankA.log"), &["GetBalance", &format!("trace_id={shown}")], 1);
}

#[test]
fn a_malformed_traceparent_is_ignored_and_changes_nothing() {
    let c = Cluster::start_with(&["BankA", "BankB"], &[LEVEL]);
    c.login("user1", "BankA");
    let before = c.balance("user1@BankA");

    // The CLI ignores a malformed STRIFE_TRACEPARENT: a new trace.
    let r = c.cli_env(
        &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "1.00"],
        &[("STRIFE_TRACEPARENT", "00-NOT-A-TRACE-01")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["status"], "committed", "{r:?}");

    // The gateway ignores malformed headers sent by hand: each payment runs
    // in a new trace, named in every line of it, and commits as usual.
    let bad = [
        "garbage".to_owned(),
        "00-4BF92F3577B34DA6A3CE929D0E0E4736-00f067aa0ba902b7-01".to_owned(),
        "00-00000000000000000000000000000000-00f067aa0ba902b7-01".to_owned(),
        format!("00-{}-00f067aa0ba902b7-01", "a".repeat(4000)),
    ];
    let rt = grpc::runtime();
    let paid: Vec<String> = rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &c.gateway.addr).await;
        let token = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let mut paid = Vec::new();
        for header in &bad {
            let id = grpc::new_id();
            let msg = strife_proto::gateway::v1::PayRequest {
                payment_id: id.clone(),
                payee: Some(strife_proto::gateway::v1::Account {
                    user: "user2".into(),
                    bank: "BankB".into(),
                }),
                amount: "1.00".into(),
            };
            let mut req = grpc::authed(msg, &token);
            req.metadata_mut().insert("traceparent", header.parse().expect("ascii"));
            let resp = grpc::payments(&ch).pay(req).await.expect("paid").into_inner();
            assert_eq!(resp.status(), strife_proto::gateway::v1::PaymentStatus::Committed, "{header}");
            paid.push(id);
        }
        paid
    });
    let (balance, available) = c.balance("user1@BankA");
    assert_eq!((balance, available), (before.0 - 500, before.1 - 500));

    let gateway = log_of(c.path(), "gateway");
    let mut seen = Vec::new();
    for id in &paid {
        let txn_id = txn_id_of(c.path(), id);
        let line = gateway
            .lines()
            .find(|l| l.contains("payment decided") && l.contains(id.as_str()))
            .expect("decision line");
        let trace_id = field(line, "trace_id").expect("a new trace").to_owned();
        assert!(trace_id.len() == 32 && trace_id.chars().all(|c| c.is_ascii_hexdigit()), "{line}");
        for b in &bad {
            assert!(!line.contains(b.as_str()), "{line}");
        }
        for bank in ["BankA", "BankB"] {
            let log = c.path().join("logs").join(format!("{bank}.log"));
            wait_for_log_lines(&log, &["leg decided", &txn_id, &format!("trace_id={trace_id}")], 1);
        }
        seen.push(trace_id);
    }
    seen.sort();
    seen.dedup();
    assert_eq!(seen.len(), paid.len(), "each payment is a trace of its own");
    for b in &bad {
        for component in ["gateway", "BankA", "BankB"] {
            assert!(!log_of(c.path(), component).contains(b.as_str()), "{component} logged {b}");
        }
    }
}

/// What a test OTLP receiver got.
#[derive(Default, Clone)]
struct Received(Arc<Mutex<Vec<ExportTraceServiceRequest>>>);

#[tonic::async_trait]
impl TraceService for Received {
    async fn export(
        &self,
        req: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.0.lock().expect("lock").push(req.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse { partial_success: None }))
    }
}

impl Received {
    /// `(service name, span name)` of every span received in trace `trace_id`.
    fn spans_of(&self, trace_id: &[u8]) -> Vec<(String, String)> {
        let mut out = Vec::new();
        for req in self.0.lock().expect("lock").iter() {
            for rs in &req.resource_spans {
                let service = rs
                    .resource
                    .iter()
                    .flat_map(|r| &r.attributes)
                    .find(|a| a.key == "service.name")
                    .and_then(|a| a.value.as_ref())
                    .map(|v| format!("{:?}", v.value))
                    .unwrap_or_default();
                for ss in &rs.scope_spans {
                    for span in ss.spans.iter().filter(|s| s.trace_id == trace_id) {
                        out.push((service.clone(), span.name.clone()));
                    }
                }
            }
        }
        out
    }
}

#[test]
fn with_an_otlp_endpoint_the_payments_spans_are_exported_under_its_trace() {
    let rt = grpc::runtime();
    let received = Received::default();
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0")).expect("bind");
    let endpoint = format!("http://{}", listener.local_addr().expect("addr"));
    let server = tonic::transport::Server::builder()
        .add_service(TraceServiceServer::new(received.clone()))
        .serve_with_incoming(tonic::transport::server::TcpIncoming::from(listener));
    rt.spawn(server);

    let envs =
        [("STRIFE_TELEMETRY_OTLP_ENDPOINT", endpoint.as_str()), ("OTEL_BSP_SCHEDULE_DELAY", "100"), LEVEL];
    let c = Cluster::start_with(&["BankA", "BankB"], &envs);
    c.login("user1", "BankA");
    let (parent, trace_id) = traceparent();
    let r = c.cli_env(
        &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "1.00"],
        &[("STRIFE_TRACEPARENT", &parent)],
    );
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    let payment_id = r.json()["payment_id"].as_str().expect("id").to_owned();
    let txn_id = txn_id_of(c.path(), &payment_id);
    every_line_carries(c.path(), &["BankA", "BankB"], &payment_id, &txn_id, &trace_id);

    // The gateway's call and payment spans and each bank's call span
    // arrive under the client's trace id (each server exports every 100 ms).
    let id: Vec<u8> =
        (0..16).map(|i| u8::from_str_radix(&trace_id[2 * i..2 * i + 2], 16).expect("hex")).collect();
    let deadline = Instant::now() + WAIT;
    loop {
        let spans = received.spans_of(&id);
        let has = |service: &str, name: &str| spans.iter().any(|(s, n)| s.contains(service) && n == name);
        if has("strife-gateway", "call")
            && has("strife-gateway", "payment")
            && has("strife-BankA", "call")
            && has("strife-BankB", "call")
        {
            break;
        }
        assert!(Instant::now() < deadline, "spans of trace {trace_id} received: {spans:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}
