//! `strife bench` runs a small load correctly: money is conserved and the
//! report has every field. (Speed itself is measured, not asserted: see
//! BENCHMARKS.md.)

mod common;

use common::*;

fn bench(args: &[&str]) -> serde_json::Value {
    let dir = TempDir::new("bench");
    bench_in(&dir, args)
}

/// Runs the bench with `TMPDIR` in `dir`, so that a `--keep` cluster
/// directory lands there.
fn bench_in(dir: &TempDir, args: &[&str]) -> serde_json::Value {
    let mut full = vec!["--json", "bench", "--payments", "300", "--concurrency", "8", "--accounts", "20"];
    full.extend_from_slice(&["--noop-secs", "0.2"]);
    full.extend_from_slice(args);
    let tmp = dir.0.to_string_lossy().into_owned();
    let r = run_cli(&dir.0, &full, &[("TMPDIR", &tmp)]);
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
    // Payments within one bank (one phase) and across two, apart: about half each.
    let share = j["one_bank_share"].as_f64().expect("one_bank_share");
    assert!((0.2..0.8).contains(&share), "{j}");
    for kind in ["latency_ms_one_bank", "latency_ms_two_banks"] {
        for p in ["p50", "p99"] {
            assert!(j[kind][p].as_f64().is_some_and(|v| v > 0.0), "{kind} {p}: {j}");
        }
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

#[test]
fn a_history_of_one_account_is_that_accounts_sent_and_received_payments() {
    let dir = TempDir::new("bench-history");
    let j = bench_in(&dir, &["--history", "2000", "--history-account", "u7@Bank1", "--keep"]);
    assert_eq!(j["conserved"], true, "the prefill agrees at the gateway and both banks: {j}");
    assert_eq!(j["audit"]["payments"], 2300, "{j}");
    assert_eq!(j["history_account"], "u7@Bank1");

    // Page through the account's history in the kept cluster's gateway store.
    let kept = std::fs::read_dir(&dir.0)
        .expect("read temp dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .find(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("strife-bench-")))
        .expect("the kept bench directory");
    let store =
        strife_gateway::store::Store::open(&kept.join("gateway").join("gateway.db")).expect("gateway store");
    let me: strife_core::UserRef = "u7@Bank1".parse().expect("user");
    let (mut sent, mut received, mut prefilled_received, mut after) = (0, 0, 0, None);
    loop {
        let q = strife_gateway::store::PageQuery { limit: 500, after, ..Default::default() };
        let page = store.list_payments(&me, &q).expect("page");
        for p in &page.payments {
            if p.payer == me {
                sent += 1;
            } else {
                assert_eq!(p.payee, me);
                received += 1;
                // The prefill writes no request fingerprint.
                prefilled_received += i32::from(p.fingerprint.iter().all(|&b| b == 0));
            }
        }
        match page.next {
            Some(next) => after = Some(next),
            None => break,
        }
    }
    // u7 is no bench payer (they are u0..u3 of each bank); it may be paid.
    assert_eq!(sent, 1000, "every other payment of the history was sent");
    assert_eq!(prefilled_received, 1000, "and every other received");
    assert!(received - prefilled_received <= 300, "plus any bench payment to u7: {received}");
    let total = store.all_payments().expect("all").len();
    assert_eq!(total, 2300, "nothing else in the store");
}

#[test]
fn a_cached_history_is_filled_once_and_copied_after() {
    let dir = TempDir::new("bench-history-cache");
    let cache = dir.0.join("cache");
    let cache_arg = cache.to_string_lossy().into_owned();
    let args = ["--history", "1000", "--history-cache", &cache_arg, "--keep"];
    let first = bench_in(&dir, &args);
    assert_eq!(first["audit"]["payments"], 1300, "{first}");
    let saved: Vec<_> =
        std::fs::read_dir(&cache).expect("the cache").filter_map(Result::ok).map(|e| e.path()).collect();
    assert_eq!(saved.len(), 1, "one complete fill, nothing partial: {saved:?}");
    let shape = format!("history1000-banks2-accounts20-schema{}", strife_gateway::store::SCHEMA_VERSION);
    assert!(saved[0].ends_with(&shape), "named by its shape and the gateway's schema: {saved:?}");
    let txn_ids = |db: &std::path::Path| -> std::collections::BTreeSet<String> {
        let conn = rusqlite::Connection::open(db).expect("open");
        let mut stmt = conn.prepare("SELECT txn_id FROM payments").expect("prepare");
        stmt.query_map([], |r| r.get(0)).expect("query").map(|r| r.expect("row")).collect()
    };
    let history = txn_ids(&saved[0].join("gateway").join("gateway.db"));
    assert_eq!(history.len(), 1000, "the cache holds the history only");

    let second = bench_in(&dir, &args);
    assert_eq!(second["audit"]["payments"], 1300, "{second}");
    assert_eq!(second["conserved"], true, "{second}");
    // Both kept clusters start from the very same history.
    let kept: Vec<_> = std::fs::read_dir(&dir.0)
        .expect("read temp dir")
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().starts_with("strife-bench-")))
        .collect();
    assert_eq!(kept.len(), 2, "{kept:?}");
    for k in &kept {
        let all = txn_ids(&k.join("gateway").join("gateway.db"));
        assert_eq!(all.len(), 1300);
        assert!(history.is_subset(&all), "{} starts from the cached history", k.display());
    }
}
