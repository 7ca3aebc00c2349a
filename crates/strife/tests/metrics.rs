//! Prometheus metrics (issue 13): every server serves `/metrics` on a
//! listener of its own and says where (`strife: <component> metrics
//! listening on ADDR`); the counts match what happened; `strife up` lists
//! each instance's metrics address in `status --json`.
mod common;

use common::*;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

/// The metrics address a server printed after its listening line.
fn metrics_address(p: &Proc) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line =
            p.lines.recv_timeout(left).unwrap_or_else(|_| panic!("{} printed no metrics line", p.name));
        if let Some((_, addr)) = line.split_once(" metrics listening on ") {
            return addr.trim().to_owned();
        }
    }
}

/// `GET /metrics` over plain HTTP/1.1; the samples by series (name and
/// labels as printed).
fn scrape(addr: &str) -> HashMap<String, f64> {
    let mut tcp = std::net::TcpStream::connect(addr).expect("connect to the metrics listener");
    tcp.set_read_timeout(Some(WAIT)).expect("timeout");
    write!(tcp, "GET /metrics HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n\r\n").expect("request");
    let mut text = String::new();
    tcp.read_to_string(&mut text).expect("response");
    let (head, body) = text.split_once("\r\n\r\n").expect("an HTTP response");
    assert!(head.starts_with("HTTP/1.1 200"), "{head}");
    assert!(head.to_ascii_lowercase().contains("content-type: text/plain; version=0.0.4"), "{head}");
    // A chunked body: the metrics lines are whole lines between chunk sizes.
    body.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.rsplit_once(' '))
        .filter_map(|(series, value)| value.parse::<f64>().ok().map(|v| (series.to_owned(), v)))
        .collect()
}

fn value(samples: &HashMap<String, f64>, series: &str) -> f64 {
    *samples.get(series).unwrap_or_else(|| {
        let mut names: Vec<&String> = samples.keys().collect();
        names.sort();
        panic!("no {series} in {names:#?}")
    })
}

#[test]
fn every_server_serves_metrics_that_count_what_happened() {
    let c = Cluster::start(&["BankA", "BankB"]);
    let gateway = metrics_address(&c.gateway);
    let bank_a = metrics_address(&c.banks[c.bank_index("BankA")]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    for _ in 0..2 {
        let r = c.pay("user1@BankA", "user2@BankB", "1.00");
        assert_eq!(r.json()["status"], "committed", "{r:?}");
    }
    let r = c.pay("user1@BankA", "user2@BankB", "99999.00");
    assert_eq!(r.json()["reason"], "insufficient_funds", "{r:?}");
    // Within BankA: one phase, a transfer that BankA decides.
    let r = c.pay("user1@BankA", "user2@BankA", "1.00");
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    let wrong = c.cli_env(&["login", "--bank", "BankA", "--user", "user3"], &[("STRIFE_PASSWORD", "nope")]);
    assert_ne!(wrong.code, 0, "{wrong:?}");

    let g = scrape(&gateway);
    assert_eq!(value(&g, "strife_payments_total{outcome=\"committed\",reason=\"none\"}"), 3.0);
    assert_eq!(value(&g, "strife_payments_total{outcome=\"declined\",reason=\"insufficient_funds\"}"), 1.0);
    assert_eq!(value(&g, "strife_payment_duration_seconds_count"), 4.0);
    assert_eq!(value(&g, "strife_payment_phase_duration_seconds_count{phase=\"prepare\"}"), 3.0);
    assert_eq!(value(&g, "strife_payment_phase_duration_seconds_count{phase=\"decision\"}"), 3.0);
    assert_eq!(value(&g, "strife_payment_phase_duration_seconds_count{phase=\"transfer\"}"), 1.0);
    assert_eq!(value(&g, "strife_payments_in_flight"), 0.0);
    assert_eq!(value(&g, "strife_decision_conflicts_total"), 0.0);
    assert_eq!(value(&g, "strife_logins_total{result=\"ok\"}"), 2.0);
    assert_eq!(value(&g, "strife_logins_total{result=\"wrong_credentials\"}"), 1.0);
    assert!(value(&g, "strife_bank_registrations_total{result=\"accepted\"}") >= 2.0);
    assert!(value(&g, "strife_bank_batch_size_count{call=\"prepare\"}") >= 1.0);
    assert!(value(&g, "strife_bank_batch_size_count{call=\"transfer\"}") >= 1.0);
    assert!(value(&g, "strife_store_commit_seconds_count") >= 3.0);
    assert!(value(&g, "process_resident_memory_bytes") > 0.0);
    assert!(value(&g, "process_cpu_seconds_total") > 0.0);
    assert!(value(&g, "process_open_fds") > 0.0);

    let a = scrape(&bank_a);
    // Three prepares at the payer's bank: two yes, one no (funds).
    assert_eq!(value(&a, "strife_prepares_total{vote=\"yes\"}"), 2.0);
    assert_eq!(value(&a, "strife_prepares_total{vote=\"no\"}"), 1.0);
    assert_eq!(value(&a, "strife_transfers_total{outcome=\"committed\"}"), 1.0, "the payment within BankA");
    // The gauge is refreshed once per inquiry interval: it may still show
    // a leg that was in doubt a moment ago; every leg is decided by now.
    let deadline = Instant::now() + WAIT;
    while value(&scrape(&bank_a), "strife_in_doubt_legs") != 0.0 {
        assert!(Instant::now() < deadline, "BankA's legs in doubt never went back to 0");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(!a.keys().any(|k| k.starts_with("strife_payments_total")), "a bank has no gateway metrics");
}

#[test]
fn up_lists_every_instance_s_metrics_address_and_off_turns_them_off() {
    let dir = TempDir::new("metrics-up");
    let (up, _ready, _lines) = spawn_until(&dir.0, &["up", "--port", "0"], "strife: ready", &[]);
    let mut up = Up(up);
    let deadline = Instant::now() + WAIT;
    let instances = loop {
        let s = run_cli(&dir.0, &["--json", "status"], &[]).json();
        let instances = s["instances"].as_array().cloned().unwrap_or_default();
        if instances.len() == 3 && instances.iter().all(|i| i["metrics"].is_string()) {
            break instances;
        }
        assert!(Instant::now() < deadline, "status never listed every metrics address: {s}");
        std::thread::sleep(Duration::from_millis(50));
    };
    for i in &instances {
        let samples = scrape(i["metrics"].as_str().expect("address"));
        assert!(samples.contains_key("process_resident_memory_bytes"), "{i}");
    }
    assert_eq!(terminate(&mut up), Some(0));

    let other = TempDir::new("metrics-off");
    let r = run_cli(&other.0, &["certs", "init", "--bank", "BankA"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let g = start_gateway(&other.0, "127.0.0.1:0", &[("STRIFE_METRICS_LISTEN", "off")]);
    // Its next line would be the metrics line; with `off` none comes.
    let b = start_bank(&other.0, "BankA", &g.addr, &[("STRIFE_METRICS_LISTEN", "off")]);
    wait_registered_at(&other.0, Some(&g.addr), &["BankA"]);
    assert!(g.lines.try_iter().all(|l| !l.contains("metrics listening")));
    assert!(b.lines.try_iter().all(|l| !l.contains("metrics listening")));
}
