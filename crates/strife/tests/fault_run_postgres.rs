//! The fault run on PostgreSQL: three gateway replicas on one database,
//! BankA as one process and BankB as two replicas, each bank on its own
//! database, and 8 concurrent payers going through whichever gateway
//! answers, while a random gateway or bank process is killed with SIGKILL
//! (and restarted on its address) about every second, and PostgreSQL itself
//! crashes and restarts twice (`pg_ctl restart -m immediate`). After healing:
//! every payment a client saw committed applied exactly once at both banks,
//! every declined one at neither, no hold left, and `strife audit` agrees.
//! It reports how long after each database restart payments flowed again.
//!
//! The run has a PostgreSQL server of its own (restarting the test binary's
//! shared one would disturb other tests). `STRIFE_FAULT_SECS` sets the
//! length (default 15 s), `STRIFE_FAULT_SEED` replays a run.

mod common;

use common::*;
use common::{fault, grpc};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strife_core::Secret;
use strife_rpc::postgres_server::{INSTALL_COMMAND, Lifetime, PostgresServer};

const GATEWAYS: usize = 3;
/// The bank processes: BankA once, BankB twice (replicas of one ledger).
const BANK_PROCESSES: [&str; 3] = ["BankA", "BankB", "BankB"];

/// Every process of the run, each restartable with its own settings.
struct Processes {
    gateways: Vec<Proc>,
    banks: Vec<Proc>,
}

#[test]
fn payments_survive_kills_and_database_crashes_on_postgres() {
    let seed = seed_from_env("STRIFE_FAULT_SEED");
    let secs: u64 = std::env::var("STRIFE_FAULT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let base = std::env::temp_dir().join(format!("strife-pg-fault-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    let pg = PostgresServer::start(&base, Lifetime::Temporary)
        .unwrap_or_else(|e| panic!("{e:#}\n(install PostgreSQL with: {INSTALL_COMMAND})"));
    let url_g = pg.create_private_database("fault_gateway", "fault_gateway").expect("gateways' database");
    let url_a = pg.create_private_database("fault_bank_a", "fault_bank_a").expect("BankA's database");
    let url_b = pg.create_private_database("fault_bank_b", "fault_bank_b").expect("BankB's database");

    let tmp = TempDir::new("pg-fault");
    let dir = tmp.0.clone();
    let r = run_cli(&dir, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let gateway_env = with(FAST, &[("STRIFE_GATEWAY_STORE", &url_g)]);
    let bank_env =
        |name: &str| with(FAST, &[("STRIFE_BANK_STORE", if name == "BankA" { &url_a } else { &url_b })]);
    let gateways: Vec<Proc> =
        (0..GATEWAYS).map(|_| start_gateway(&dir, "127.0.0.1:0", &refs(&gateway_env))).collect();
    let addrs: Vec<String> = gateways.iter().map(|g| g.addr.clone()).collect();
    let list = addrs.join(",");
    let banks: Vec<Proc> =
        BANK_PROCESSES.iter().map(|name| start_bank(&dir, name, &list, &refs(&bank_env(name)))).collect();
    for a in &addrs {
        wait_registered_at(&dir, Some(a), &["BankA", "BankB"]);
    }
    let procs = Arc::new(Mutex::new(Processes { gateways, banks }));

    let stop = Arc::new(AtomicBool::new(false));
    let pg = Arc::new(pg);
    let chaos = {
        let (procs, stop, dir, pg, list) =
            (procs.clone(), stop.clone(), dir.clone(), pg.clone(), list.clone());
        let (gateway_env, bank_env_a, bank_env_b) =
            (gateway_env.clone(), bank_env("BankA"), bank_env("BankB"));
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let (mut kills, mut restarts) = (0u32, Vec::new());
            let start = Instant::now();
            let end = start + Duration::from_secs(secs);
            let crash_at = [start + Duration::from_secs(secs / 3), start + Duration::from_secs(2 * secs / 3)];
            while Instant::now() < end {
                // Pacing the faults, not synchronizing: about one a second.
                std::thread::sleep(Duration::from_millis(700 + rng.below(600)));
                if restarts.len() < crash_at.len() && Instant::now() >= crash_at[restarts.len()] {
                    pg.restart_immediately().expect("pg_ctl restart -m immediate");
                    restarts.push(Instant::now());
                    continue;
                }
                let mut p = procs.lock().expect("procs");
                kills += 1;
                let victim = rng.below((GATEWAYS + BANK_PROCESSES.len()) as u64) as usize;
                if victim < GATEWAYS {
                    let g = &mut p.gateways[victim];
                    let addr = g.addr.clone();
                    g.kill9();
                    *g = start_gateway(&dir, &addr, &refs(&gateway_env));
                } else {
                    let i = victim - GATEWAYS;
                    let name = BANK_PROCESSES[i];
                    p.banks[i].kill9();
                    let env = if name == "BankA" { &bank_env_a } else { &bank_env_b };
                    p.banks[i] = start_bank(&dir, name, &list, &refs(env));
                }
            }
            stop.store(true, Ordering::SeqCst);
            (kills, restarts)
        })
    };

    let rt = grpc::runtime();
    let commits = Arc::new(Mutex::new(Vec::new()));
    let sent = rt.block_on(fault::pay_until_stopped(&dir, &addrs, seed, stop.clone(), commits.clone()));
    let (kills, restarts) = chaos.join().expect("chaos");

    // How long after each database restart the next payment committed,
    // and the longest time without a commit.
    let mut commits = commits.lock().expect("commits").clone();
    commits.sort();
    let longest_gap =
        commits.windows(2).map(|w| w[1].saturating_duration_since(w[0])).max().unwrap_or_default();
    let flowing_again: Vec<Duration> = restarts
        .iter()
        .map(|back| commits.iter().filter(|c| *c > back).map(|c| *c - *back).min().unwrap_or(Duration::MAX))
        .collect();

    // Heal: everything runs again; wait for the cluster to converge.
    let healed = Instant::now();
    for a in &addrs {
        wait_registered_at(&dir, Some(a), &["BankA", "BankB"]);
    }
    let store = [("STRIFE_GATEWAY_STORE", url_g.expose().as_str())];
    let audit = wait_audit_ok_with(&dir, &store);
    let converge = healed.elapsed();

    let mut sent = Arc::try_unwrap(sent).expect("sent").into_inner().expect("lock");
    let tally = rt.block_on(fault::check_after_healing(&dir, &addrs[0], &mut sent));
    let fault::Tally { committed, declined, unknown } = tally;
    let audit_after = wait_audit_ok_with(&dir, &store);
    assert_eq!(audit["conserved"], true);
    assert_eq!(audit_after["held"], "0.00", "{audit_after}");
    assert_eq!(audit_after["committed"], committed, "{audit_after}");
    eprintln!(
        "fault run on PostgreSQL: seed {seed}, {secs} s, {} payments ({committed} committed, {declined} declined, \
         {unknown} answered only after recovery), {kills} kills, {} database crashes, first commit after each \
         restart {flowing_again:?}, longest time without a commit {longest_gap:?}, converged {converge:?} after healing",
        sent.len(),
        restarts.len()
    );
    // How many payments a run makes depends on the machine (a loaded one
    // makes few, and declines many at the prepare timeout); the checks
    // above hold for each of them. Too few would mean nothing.
    assert!(sent.len() >= 20 && committed > 0, "the run made too few payments to mean much: {}", sent.len());
    assert_eq!(restarts.len(), 2, "the database crashed twice");
    assert!(kills > 0, "servers were killed");
    assert!(
        flowing_again.iter().all(|d| *d < Duration::MAX),
        "payments flowed again after each database crash"
    );
    drop(procs);
}

/// `base` plus store settings whose values are secrets.
fn with(base: &[(&str, &str)], stores: &[(&str, &Secret<String>)]) -> Vec<(String, String)> {
    let mut out: Vec<(String, String)> = base.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
    out.extend(stores.iter().map(|(k, v)| (k.to_string(), v.expose().clone())));
    out
}
