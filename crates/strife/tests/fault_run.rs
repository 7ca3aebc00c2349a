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

use common::grpc;
use common::*;
use nix::sys::signal::Signal;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use tonic::Code;

const FAST: &[(&str, &str)] = &[
    ("STRIFE_GATEWAY_PREPARE_TIMEOUT_MS", "1000"),
    ("STRIFE_GATEWAY_COMMIT_TIMEOUT_MS", "500"),
    ("STRIFE_GATEWAY_PAYMENT_DEADLINE_MS", "2000"),
    ("STRIFE_BANK_INQUIRY_INTERVAL_MS", "200"),
    ("STRIFE_BANK_REGISTER_INTERVAL_MS", "200"),
];

#[derive(Debug, Clone)]
struct Sent {
    payer: (String, String),
    payee: (String, String),
    amount_minor: i64,
    /// 1 committed, 2 declined, None: no final answer reached the client.
    outcome: Option<i32>,
}

fn outage(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal
    )
}

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
    let sent: Arc<Mutex<HashMap<String, Sent>>> = Arc::new(Mutex::new(HashMap::new()));
    let payers = [
        ("user1", "BankA"),
        ("user2", "BankA"),
        ("user3", "BankA"),
        ("user4", "BankA"),
        ("user1", "BankB"),
        ("user2", "BankB"),
        ("user3", "BankB"),
        ("user4", "BankB"),
    ];
    rt.block_on(async {
        let ch = grpc::client_channel(&dir, &gw_addr).await;
        let mut tasks = Vec::new();
        for (n, (user, bank)) in payers.into_iter().enumerate() {
            let (ch, stop, sent) = (ch.clone(), stop.clone(), sent.clone());
            let mut rng = Rng(seed ^ ((n as u64 + 1) * 0x1234_5678));
            tasks.push(tokio::spawn(async move {
                let password = format!("pass{}", &user[4..]);
                let token = loop {
                    match grpc::login(&ch, bank, user, &password).await {
                        Ok(t) => break t,
                        Err(e) if outage(e.code()) => tokio::time::sleep(Duration::from_millis(100)).await,
                        Err(e) => panic!("login {user}@{bank}: {e:?}"),
                    }
                };
                while !stop.load(Ordering::SeqCst) {
                    let other = if bank == "BankA" { "BankB" } else { "BankA" };
                    let payee = format!("user{}", 1 + rng.below(5));
                    let amount_minor = 100 + rng.below(5_000) as i64;
                    let amount = strife_core::money::format_minor(amount_minor);
                    let id = grpc::new_id();
                    sent.lock().expect("sent").insert(
                        id.clone(),
                        Sent {
                            payer: (user.into(), bank.into()),
                            payee: (payee.clone(), other.into()),
                            amount_minor,
                            outcome: None,
                        },
                    );
                    // Retry the same id until a final answer, as the outbox does.
                    let give_up = Instant::now() + Duration::from_secs(20);
                    while Instant::now() < give_up {
                        let call = grpc::pay(&ch, &token, &id, &payee, other, &amount);
                        match tokio::time::timeout(Duration::from_secs(5), call).await {
                            Ok(Ok(resp)) => {
                                sent.lock().expect("sent").get_mut(&id).expect("id").outcome =
                                    Some(resp.status);
                                break;
                            }
                            Ok(Err(e)) if !outage(e.code()) => panic!("pay: {e:?}"),
                            _ => tokio::time::sleep(Duration::from_millis(100)).await,
                        }
                        if stop.load(Ordering::SeqCst) {
                            break;
                        }
                    }
                }
            }));
        }
        for t in tasks {
            t.await.expect("payer");
        }
    });
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

    // Every id's outcome, asked again: a client's final answer never changes.
    let mut sent = Arc::try_unwrap(sent).expect("sent").into_inner().expect("lock");
    let (mut committed, mut declined, mut unknown) = (0, 0, 0);
    rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &c.gateway.addr).await;
        let mut tokens = HashMap::new();
        for (user, bank) in payers {
            let t = grpc::login(&ch, bank, user, &format!("pass{}", &user[4..])).await.expect("login");
            tokens.insert((user.to_string(), bank.to_string()), t);
        }
        for (id, s) in sent.iter_mut() {
            let token = &tokens[&s.payer];
            let amount = strife_core::money::format_minor(s.amount_minor);
            let r = grpc::pay(&ch, token, id, &s.payee.0, &s.payee.1, &amount).await.expect("replay");
            match s.outcome {
                Some(o) => {
                    assert!(r.replayed, "{id} was answered before, so it is a replay");
                    assert_eq!(o, r.status, "payment {id}: the client's answer changed");
                }
                // Never answered: it may never have reached the gateway, and
                // runs now, once, as an outbox retry would.
                None => {
                    unknown += 1;
                    s.outcome = Some(r.status);
                }
            }
            if r.status == 1 { committed += 1 } else { declined += 1 }
        }
    });

    // Balances: exactly the committed payments, each once.
    let mut expected: HashMap<(String, String), i64> = HashMap::new();
    for bank in ["BankA", "BankB"] {
        for n in 1..=5i64 {
            expected.insert((format!("user{n}"), bank.into()), n * 100_000);
        }
    }
    for s in sent.values().filter(|s| s.outcome == Some(1)) {
        *expected.get_mut(&s.payer).expect("payer") -= s.amount_minor;
        *expected.get_mut(&s.payee).expect("payee") += s.amount_minor;
    }
    for ((user, bank), want) in &expected {
        c.login(user, bank);
        let (balance, available) = c.balance(&format!("{user}@{bank}"));
        assert!(balance >= 0);
        assert_eq!(
            (balance, available),
            (*want, *want),
            "{user}@{bank}: committed payments applied exactly once"
        );
    }
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
