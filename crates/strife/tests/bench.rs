//! `strife bench` runs a small load correctly: money is conserved and the
//! report has every field. (Speed itself is measured, not asserted: see
//! BENCHMARKS.md.)

mod common;

use common::*;

fn bench(args: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("bench");
    let mut full = vec!["--json", "bench", "--payments", "300", "--concurrency", "8", "--accounts", "20"];
    full.extend_from_slice(&["--noop-secs", "0.2"]);
    full.extend_from_slice(args);
    let r = run_cli(&dir.0, &full, &[]);
    assert_eq!(r.code, 0, "{r:?}");
    r.json()
}

#[test]
fn a_small_uniform_run_reports_everything_and_conserves_money() {
    let j = bench(&["--history", "1000"]);
    for field in [
        "payments",
        "concurrency",
        "payments_per_sec",
        "noop_calls_per_sec",
        "calls_per_payment",
        "ceiling_ratio",
        "conserved",
        "committed",
        "declined",
        "failed",
        "cpu_ms_per_payment",
        "peak_memory_mb",
    ] {
        assert!(!j[field].is_null(), "missing {field}: {j}");
    }
    assert_eq!(j["history"], 1000, "{j}");
    for p in ["p50", "p90", "p99", "p999"] {
        assert!(j["latency_ms"][p].as_f64().is_some_and(|v| v > 0.0), "latency {p}: {j}");
    }
    assert_eq!(j["payments"], 300);
    assert_eq!(j["conserved"], true);
    assert_eq!(j["committed"], 300, "every bench payment fits the balances: {j}");
    assert!(j["payments_per_sec"].as_f64().is_some_and(|v| v > 0.0));
    assert!(j["noop_calls_per_sec"].as_f64().is_some_and(|v| v > 0.0));
    assert!(j["peak_memory_mb"]["gateway"].as_f64().is_some_and(|v| v > 0.0));
    assert_eq!(j["audit"]["payments"], 1300, "history plus the run, all in the audit");
}

#[test]
fn hot_accounts_never_overdraw() {
    let j = bench(&["--hot", "2"]);
    assert_eq!(j["mode"], "hot");
    assert_eq!(j["payers"], 2);
    assert_eq!(j["conserved"], true);
    assert_eq!(j["failed"], 0, "{j}");
}
