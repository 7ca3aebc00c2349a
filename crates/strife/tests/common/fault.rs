//! What every fault run shares: 8 payers making payments (two in three
//! cross-bank, in two phases; one in three within the payer's bank, in one
//! phase) through
//! whichever gateway answers, retrying one id until a final answer as the
//! outbox does, until told to stop; and the checks after healing (every
//! answer replays unchanged, balances are exactly the committed payments,
//! each once, no hold left).

use super::*;
use std::collections::HashMap;
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use tonic::Code;

/// The payers: four customers at each of the two banks.
pub const PAYERS: [(&str, &str); 8] = [
    ("user1", "BankA"),
    ("user2", "BankA"),
    ("user3", "BankA"),
    ("user4", "BankA"),
    ("user1", "BankB"),
    ("user2", "BankB"),
    ("user3", "BankB"),
    ("user4", "BankB"),
];

#[derive(Debug, Clone)]
pub struct Sent {
    pub payer: (String, String),
    pub payee: (String, String),
    pub amount_minor: i64,
    /// 1 committed, 2 declined, None: no final answer reached the client.
    pub outcome: Option<i32>,
}

/// Every payment id a run used, and what its client was told.
pub type Ledger = Arc<Mutex<HashMap<String, Sent>>>;

/// A refusal that means "not now", not "no": try again.
pub fn outage(code: Code) -> bool {
    matches!(
        code,
        Code::Unavailable | Code::Unknown | Code::Cancelled | Code::DeadlineExceeded | Code::Internal
    )
}

fn password(user: &str) -> String {
    format!("pass{}", &user[4..])
}

/// Runs the 8 payers against `gateways` (each payer moves to the next
/// gateway after an outage) until `stop`; returns what they sent. Notes in
/// `commits` when each commit was answered, so that a run can tell how long
/// payments stopped.
pub async fn pay_until_stopped(
    dir: &Path,
    gateways: &[String],
    seed: u64,
    stop: Arc<AtomicBool>,
    commits: Arc<Mutex<Vec<Instant>>>,
) -> Ledger {
    let mut channels = Vec::new();
    for g in gateways {
        channels.push(grpc::client_channel(dir, g).await);
    }
    let sent: Ledger = Arc::new(Mutex::new(HashMap::new()));
    let mut tasks = Vec::new();
    for (n, (user, bank)) in PAYERS.into_iter().enumerate() {
        let (channels, stop, sent, commits) = (channels.clone(), stop.clone(), sent.clone(), commits.clone());
        let mut rng = Rng(seed ^ ((n as u64 + 1) * 0x1234_5678));
        tasks.push(tokio::spawn(async move {
            let mut at = n % channels.len();
            let token = loop {
                match grpc::login(&channels[at], bank, user, &password(user)).await {
                    Ok(t) => break t,
                    Err(e) if outage(e.code()) => {
                        at = (at + 1) % channels.len();
                        tokio::time::sleep(Duration::from_millis(100)).await
                    }
                    Err(e) => panic!("login {user}@{bank}: {e:?}"),
                }
            };
            while !stop.load(Ordering::SeqCst) {
                // One in three within the payer's bank (one phase), to
                // someone else there; the rest to the other bank.
                let (other, payee) = if rng.below(3) == 0 {
                    let n: u64 = user[4..].parse().expect("userN");
                    (bank, format!("user{}", 1 + (n + rng.below(4)) % 5))
                } else {
                    (if bank == "BankA" { "BankB" } else { "BankA" }, format!("user{}", 1 + rng.below(5)))
                };
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
                    let call = grpc::pay(&channels[at], &token, &id, &payee, other, &amount);
                    match tokio::time::timeout(Duration::from_secs(5), call).await {
                        Ok(Ok(resp)) => {
                            if resp.status == 1 {
                                commits.lock().expect("commits").push(Instant::now());
                            }
                            sent.lock().expect("sent").get_mut(&id).expect("id").outcome = Some(resp.status);
                            break;
                        }
                        Ok(Err(e)) if !outage(e.code()) => panic!("pay: {e:?}"),
                        _ => {
                            at = (at + 1) % channels.len();
                            tokio::time::sleep(Duration::from_millis(100)).await
                        }
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
    sent
}

/// What the checks after healing counted.
#[derive(Debug, Default)]
pub struct Tally {
    pub committed: u32,
    pub declined: u32,
    /// Answered only after recovery (the client never heard during the run).
    pub unknown: u32,
}

/// After healing: asks every id again at `gateway` (a final answer never
/// changes; an id never answered runs now, once, as an outbox retry
/// would), then checks that every balance is exactly its opening balance
/// plus the committed payments, each once, with nothing held.
pub async fn check_after_healing(dir: &Path, gateway: &str, sent: &mut HashMap<String, Sent>) -> Tally {
    let ch = grpc::client_channel(dir, gateway).await;
    let mut tokens = HashMap::new();
    for (user, bank) in PAYERS {
        let t = grpc::login(&ch, bank, user, &password(user)).await.expect("login");
        tokens.insert((user.to_string(), bank.to_string()), t);
    }
    let mut tally = Tally::default();
    for (id, s) in sent.iter_mut() {
        let token = &tokens[&s.payer];
        let amount = strife_core::money::format_minor(s.amount_minor);
        let r = grpc::pay(&ch, token, id, &s.payee.0, &s.payee.1, &amount).await.expect("replay");
        match s.outcome {
            Some(o) => {
                assert!(r.replayed, "{id} was answered before, so it is a replay");
                assert_eq!(o, r.status, "payment {id}: the client's answer changed");
            }
            None => {
                tally.unknown += 1;
                s.outcome = Some(r.status);
            }
        }
        if r.status == 1 { tally.committed += 1 } else { tally.declined += 1 }
    }

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
        let token = grpc::login(&ch, bank, user, &password(user)).await.expect("login");
        let b = grpc::balance(&ch, &token).await.expect("balance");
        let (balance, available) = (minor(&b.balance), minor(&b.available));
        assert!(balance >= 0);
        assert_eq!(
            (balance, available),
            (*want, *want),
            "{user}@{bank}: committed payments applied exactly once"
        );
    }
    tally
}
