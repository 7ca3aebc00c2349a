//! The fault run: a gateway, two banks and 8 concurrent payers doing
//! cross-bank payments while servers are killed with SIGKILL and restarted
//! about every second, and a bank is paused (SIGSTOP) past the prepare
//! timeout. After recovery: money conserved, no balance negative, every
//! payment a client saw committed applied exactly once at both banks, every
//! declined one at neither, no hold left, and `strife audit` agrees.
//!
//! `STRIFE_FAULT_SECS` sets the length (default 15 s), `STRIFE_FAULT_SEED`
//! replays a run.

mod common;

use common::*;
use common::{fault, grpc};
use nix::sys::signal::Signal;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

#[test]
fn payments_survive_kills_and_pauses() {
    let seed = seed_from_env("STRIFE_FAULT_SEED");
    let secs: u64 = std::env::var("STRIFE_FAULT_SECS").ok().and_then(|s| s.parse().ok()).unwrap_or(15);
    let c = Cluster::start_with(&["BankA", "BankB"], FAST);
    let dir = c.path().to_path_buf();
    let gw_addr = c.gateway.addr.clone();
    let Cluster { dir: tmp, gateway, banks, .. } = c;
    let procs = Arc::new(Mutex::new((gateway, banks)));

    let stop = Arc::new(AtomicBool::new(false));
    let chaos = {
        let (procs, stop, dir, gw_addr) = (procs.clone(), stop.clone(), dir.clone(), gw_addr.clone());
        std::thread::spawn(move || {
            let mut rng = Rng(seed);
            let (mut kills, mut pauses) = (0u32, 0u32);
            let end = Instant::now() + Duration::from_secs(secs);
            let pause_at = Instant::now() + Duration::from_secs(secs / 3);
            let mut paused = false;
            while Instant::now() < end {
                // Pacing the faults, not synchronizing: about one a second.
                std::thread::sleep(Duration::from_millis(700 + rng.below(600)));
                let mut guard = procs.lock().expect("procs");
                let (gateway, banks) = &mut *guard;
                if !paused && Instant::now() >= pause_at {
                    paused = true;
                    pauses += 1;
                    let bank = &banks[rng.below(2) as usize];
                    bank.signal(Signal::SIGSTOP);
                    std::thread::sleep(Duration::from_millis(2_500));
                    bank.signal(Signal::SIGCONT);
                    continue;
                }
                kills += 1;
                match rng.below(3) {
                    0 => {
                        gateway.kill9();
                        *gateway = start_gateway(&dir, &gw_addr, FAST);
                    }
                    i => {
                        let i = (i - 1) as usize;
                        let name = banks[i].name.clone();
                        banks[i].kill9();
                        banks[i] = start_bank(&dir, &name, &gw_addr, FAST);
                    }
                }
            }
            stop.store(true, Ordering::SeqCst);
            (kills, pauses)
        })
    };

    let rt = grpc::runtime();
    let commits = Arc::new(Mutex::new(Vec::new()));
    let sent = rt.block_on(fault::pay_until_stopped(
        &dir,
        std::slice::from_ref(&gw_addr),
        seed,
        stop.clone(),
        commits,
    ));
    let (kills, pauses) = chaos.join().expect("chaos");

    // Heal: everything runs again; wait for the cluster to converge.
    let healed = Instant::now();
    let c = {
        let Ok(procs) = Arc::try_unwrap(procs) else { panic!("the chaos thread still holds the processes") };
        let (gateway, banks) = procs.into_inner().expect("lock");
        Cluster { dir: tmp, gateway, banks, bank_names: vec!["BankA".into(), "BankB".into()] }
    };
    c.wait_registered();
    let audit = wait_audit_ok(c.path());
    let converge = healed.elapsed();

    let mut sent = Arc::try_unwrap(sent).expect("sent").into_inner().expect("lock");
    let tally = rt.block_on(fault::check_after_healing(c.path(), &c.gateway.addr, &mut sent));
    let fault::Tally { committed, declined, unknown } = tally;
    assert_eq!(audit["conserved"], true);
    assert_eq!(audit["held"], "0.00");
    eprintln!(
        "fault run: seed {seed}, {secs} s, {} payments ({committed} committed, {declined} declined, {unknown} \
         answered only after recovery), {kills} kills, {pauses} pause(s), converged {converge:?} after healing",
        sent.len()
    );
    assert!(sent.len() >= 100, "the run made too few payments to mean much: {}", sent.len());
    assert!(kills >= secs as u32 / 3);
}
