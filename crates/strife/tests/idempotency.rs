//! Exactly once from the customer's side: one payment id runs once, however
//! often and however concurrently it is sent, across restarts; the outbox
//! keeps payments through outages, crashes and expired sessions.

mod common;

use common::grpc;
use common::*;
use nix::sys::signal::Signal;
use tonic::Code;

/// user1@BankA sends 16 concurrent copies of one payment of 30.00 to user2 at
/// `payee_bank`: every copy is answered committed, 15 of them as replays,
/// and the money moved once.
fn sixteen_copies_to(c: &Cluster, payee_bank: &'static str) {
    let rt = grpc::runtime();
    let (dir, addr) = (c.path().to_path_buf(), c.gateway.addr.clone());
    let answers = rt.block_on(async move {
        let ch = grpc::client_channel(&dir, &addr).await;
        let token = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let id = grpc::new_id();
        let tasks: Vec<_> = (0..16)
            .map(|_| {
                let (ch, token, id) = (ch.clone(), token.clone(), id.clone());
                tokio::spawn(async move {
                    grpc::pay(&ch, &token, &id, "user2", payee_bank, "30.00").await.expect("pay")
                })
            })
            .collect();
        let mut out = Vec::new();
        for t in tasks {
            out.push(t.await.expect("task"));
        }
        out
    });
    assert!(answers.iter().all(|a| a.status == 1), "all 16 committed: {answers:?}");
    assert_eq!(answers.iter().filter(|a| a.replayed).count(), 15, "15 are replays");
    c.login("user1", "BankA");
    c.login("user2", payee_bank);
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 3_000);
    assert_eq!(c.balance(&format!("user2@{payee_bank}")).0, 200_000 + 3_000);
}

#[test]
fn sixteen_concurrent_copies_move_money_once() {
    let c = Cluster::start(&["BankA", "BankB"]);
    sixteen_copies_to(&c, "BankB");
}

/// The same within one bank, where BankA decides in one phase: 16 copies,
/// one transfer, the money moved once.
#[test]
fn sixteen_concurrent_copies_of_a_one_bank_payment_move_money_once() {
    let c = Cluster::start(&["BankA", "BankB"]);
    sixteen_copies_to(&c, "BankA");
    // It ran in one phase: one leg at BankA, committed without a hold (its
    // record made and decided at once), and the gateway's record says so.
    let gateway = rusqlite::Connection::open(c.path().join("gateway/gateway.db")).expect("the gateway's log");
    let one_phase: i64 =
        gateway.query_row("SELECT one_phase FROM payments", [], |r| r.get(0)).expect("one payment");
    assert_eq!(one_phase, 1);
    let ledger = rusqlite::Connection::open(c.path().join("banks/BankA/bank.db")).expect("BankA's ledger");
    let (legs, same_moment): (i64, bool) = ledger
        .query_row("SELECT COUNT(*), MIN(prepared_at = decided_at) FROM legs", [], |r| {
            Ok((r.get(0)?, r.get(1)?))
        })
        .expect("legs");
    assert_eq!((legs, same_moment), (1, true), "one leg, decided as it was made");
}

#[test]
fn sixteen_cli_processes_with_one_id_in_one_directory_pay_once() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let id = strife_core::PaymentId::new_random().to_string();
    let pay = |to: &str, amount: &str, id: &str| {
        Invocation::new(&["--json", "--as", "user1@BankA", "pay", "--to", to, "--amount", amount, "--id", id])
    };
    let runs = run_cli_concurrently(c.path(), &vec![pay("user2@BankB", "1.00", &id); 16]);
    for r in &runs {
        assert_eq!(r.code, 0, "every copy exits 0: {r:?}");
        let j = r.json();
        assert_eq!(
            (j["payment_id"].as_str(), j["status"].as_str(), &j["reason"]),
            (Some(id.as_str()), Some("committed"), &serde_json::Value::Null),
            "every copy reports the one outcome: {r:?}"
        );
    }
    let replayed = runs.iter().filter(|r| r.json()["replayed"] == true).count();
    assert_eq!(replayed, 15, "one first attempt, 15 replays: {runs:?}");
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 100, "the money moved once");
    assert_eq!(c.balance("user2@BankB").0, 200_000 + 100);
    let list = c.cli(&["--json", "outbox", "list"]).json();
    assert_eq!(list["pending"].as_array().map(Vec::len), Some(0), "{list}");

    // The same id for another payment, from many processes at once: each is
    // refused with exit 7 naming what differs, and nothing moves.
    let mut others = vec![pay("user2@BankB", "2.00", &id); 8];
    others.extend(vec![pay("user3@BankB", "1.00", &id); 8]);
    let runs = run_cli_concurrently(c.path(), &others);
    for (i, r) in runs.iter().enumerate() {
        let field = if i < 8 { "amount differs" } else { "payee differs" };
        assert_eq!((r.code, r.json()["error"].as_str()), (7, Some("payment_id_reused")), "{r:?}");
        assert!(r.json()["message"].as_str().is_some_and(|m| m.contains(field)), "{field}: {r:?}");
    }
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 100, "nothing more moved");

    // A new id sent at once for two different amounts: whichever process
    // records it first defines the payment; every copy of that one gets its
    // outcome, every copy of the other exit 7, and the money moves once.
    let id = strife_core::PaymentId::new_random().to_string();
    let mut race = vec![pay("user2@BankB", "1.00", &id); 8];
    race.extend(vec![pay("user2@BankB", "3.00", &id); 8]);
    let runs = run_cli_concurrently(c.path(), &race);
    let (ones, threes) = runs.split_at(8);
    let (winners, losers, amount) = if ones[0].code == 0 { (ones, threes, 100) } else { (threes, ones, 300) };
    assert!(winners.iter().all(|r| r.code == 0 && r.json()["status"] == "committed"), "{runs:?}");
    assert_eq!(winners.iter().filter(|r| r.json()["replayed"] == false).count(), 1, "{runs:?}");
    for r in losers {
        assert_eq!(r.code, 7, "{r:?}");
        assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("amount differs")), "{r:?}");
    }
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 100 - amount, "moved once");
    assert_eq!(c.balance("user2@BankB").0, 200_000 + 100 + amount);
}

#[test]
fn concurrent_logins_logouts_and_queries_share_one_directory() {
    let c = Cluster::start(&["BankA", "BankB"]);
    assert!(!c.path().join("client.db").exists(), "no client state before the first login");
    let customers: Vec<(String, &str, u32)> = ["BankA", "BankB"]
        .iter()
        .flat_map(|bank| (1..=5).map(move |n| (format!("user{n}"), *bank, n)))
        .collect();
    let logins: Vec<_> = customers
        .iter()
        .map(|(user, bank, n)| {
            Invocation::new(&["--json", "login", "--bank", bank, "--user", user])
                .env("STRIFE_PASSWORD", &format!("pass{n}"))
        })
        .collect();
    let runs = run_cli_concurrently(c.path(), &logins);
    for (r, (user, bank, _)) in runs.iter().zip(&customers) {
        assert_eq!(r.code, 0, "{r:?}");
        assert_eq!(
            (r.json()["user"].as_str(), r.json()["bank"].as_str()),
            (Some(user.as_str()), Some(*bank))
        );
    }
    for (user, bank, n) in &customers {
        assert_eq!(c.balance(&format!("{user}@{bank}")).0, i64::from(*n) * 100_000, "{user}@{bank}");
    }

    // Logouts, balances and outbox listings, all at once.
    let mut mixed = Vec::new();
    for (user, bank, _) in &customers {
        let who = format!("{user}@{bank}");
        mixed.push(if *bank == "BankB" {
            Invocation::new(&["--json", "--as", &who, "logout"])
        } else {
            Invocation::new(&["--json", "--as", &who, "balance"])
        });
        mixed.push(Invocation::new(&["--json", "outbox", "list"]));
    }
    let runs = run_cli_concurrently(c.path(), &mixed);
    assert!(runs.iter().all(|r| r.code == 0), "{runs:?}");
    for (user, bank, _) in &customers {
        let r = c.cli(&["--json", "--as", &format!("{user}@{bank}"), "balance"]);
        let expected = if *bank == "BankB" { 5 } else { 0 };
        assert_eq!(r.code, expected, "{user}@{bank} logged out only if at BankB: {r:?}");
    }
}

#[test]
fn replays_survive_restarts_and_a_declined_id_stays_declined() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    c.login("user3", "BankA");
    let ok_id = strife_core::PaymentId::new_random().to_string();
    let big_id = strife_core::PaymentId::new_random().to_string();
    let dir = c.path().to_path_buf();
    let pay = |id: &str, amount: &str| {
        run_cli(
            &dir,
            &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", amount, "--id", id],
            &[],
        )
    };
    let r = pay(&ok_id, "25");
    assert_eq!((r.code, r.json()["replayed"].as_bool()), (0, Some(false)), "{r:?}");
    let r = pay(&big_id, "1500");
    assert_eq!((r.code, r.json()["reason"].as_str()), (3, Some("insufficient_funds")), "{r:?}");

    // After a gateway restart.
    c.restart_gateway();
    let r = pay(&ok_id, "25");
    assert_eq!(
        (r.code, r.json()["status"].as_str(), r.json()["replayed"].as_bool()),
        (0, Some("committed"), Some(true))
    );
    // After restarting the payer's bank.
    let i = c.bank_index("BankA");
    c.banks[i].stop();
    c.banks[i] = start_bank(c.path(), "BankA", &c.gateway.addr, &[]);
    c.wait_registered();
    let r = pay(&ok_id, "25");
    assert_eq!((r.code, r.json()["replayed"].as_bool()), (0, Some(true)), "{r:?}");

    // The funds that were missing arrive; the declined id stays declined.
    let r = c.pay("user3@BankA", "user1@BankA", "1000");
    assert_eq!(r.code, 0, "{r:?}");
    let r = pay(&big_id, "1500");
    assert_eq!(
        (r.code, r.json()["reason"].as_str(), r.json()["replayed"].as_bool()),
        (3, Some("insufficient_funds"), Some(true))
    );
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 2_500 + 100_000);
    assert_eq!(c.balance("user2@BankB").0, 200_000 + 2_500);
    // The status query by id tells the same.
    let r = c.cli(&["--json", "--as", "user1@BankA", "payment", "--id", &ok_id]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
}

#[test]
fn the_same_id_for_another_payment_is_refused_naming_the_field() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let id = strife_core::PaymentId::new_random().to_string();
    let pay = |to: &str, amount: &str| {
        c.cli(&["--json", "--as", "user1@BankA", "pay", "--to", to, "--amount", amount, "--id", &id])
    };
    assert_eq!(pay("user2@BankB", "10").code, 0);
    let r = pay("user2@BankB", "11");
    assert_eq!((r.code, r.json()["error"].as_str()), (7, Some("payment_id_reused")), "{r:?}");
    assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("amount differs")), "{r:?}");
    assert_eq!(
        (r.json()["reason"].as_str(), &r.json()["fields"]),
        (Some("PAYMENT_ID_REUSED"), &serde_json::json!(["amount"])),
        "{r:?}"
    );
    let r = pay("user3@BankB", "10");
    assert_eq!(r.code, 7, "{r:?}");
    assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("payee differs")), "{r:?}");
    // Over the API too: FAILED_PRECONDITION.
    let rt = grpc::runtime();
    rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &c.gateway.addr).await;
        let token = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let e = grpc::pay(&ch, &token, &id, "user3", "BankB", "12").await.expect_err("reused");
        assert_eq!(e.code(), Code::FailedPrecondition);
        assert!(e.message().contains("(payee and amount differ)"), "{e:?}");
        assert_eq!(strife_rpc::errors::differing_fields(&e), ["payee", "amount"]);
        // Another customer may use the same id for a payment of their own: ids are per payer.
        let other = grpc::login(&ch, "BankA", "user3", "pass3").await.expect("login");
        let r = grpc::pay(&ch, &other, &id, "user2", "BankB", "1").await.expect("own id space");
        assert_eq!((r.status, r.replayed), (1, false));
    });
    assert_eq!(c.balance("user1@BankA").0, 99_000);
    assert_eq!(c.balance("user2@BankB").0, 201_100);
}

#[test]
fn the_outbox_keeps_payments_while_the_gateway_is_down() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let addr = c.gateway.addr.clone();
    assert_eq!(c.gateway.stop(), Some(0), "SIGTERM stops the gateway with exit 0");
    let r1 = c.pay("user1@BankA", "user2@BankB", "10");
    assert_eq!((r1.code, r1.json()["status"].as_str()), (4, Some("queued")), "{r1:?}");
    let r2 = c.cli(&["--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "5"]);
    assert_eq!(r2.code, 4, "{r2:?}");
    assert!(r2.stdout.contains("waits in the outbox"), "{r2:?}");
    // Said once, clearly: where, and the cause (not "tcp connect error" twice).
    let unreachable = format!("the gateway is unreachable ({addr}: Connection refused");
    assert_eq!(r2.stdout.matches(&unreachable).count(), 1, "{r2:?}");
    assert!(!r2.stdout.contains("connect error") && !r2.stdout.contains("transport error"), "{r2:?}");
    let list = c.cli(&["--json", "outbox", "list"]).json();
    assert_eq!(list["pending"].as_array().map(Vec::len), Some(2), "{list}");
    assert!(list["pending"][0]["last_error"].as_str().is_some_and(|e| e.contains("unreachable")), "{list}");
    let r = c.cli_env(&["--json", "outbox", "flush"], &[("STRIFE_CLIENT_RETRY_FIRST_DELAY_MS", "10")]);
    assert_eq!(r.code, 4, "still down: {r:?}");

    c.gateway = start_gateway(c.path(), &addr, &[]);
    c.wait_registered();
    let r = c.cli(&["--json", "outbox", "watch"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["pending"].as_array().map(Vec::len), Some(0));
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 1_500, "each queued payment once");
    // Flushing again sends nothing; the same ids replayed change nothing.
    assert_eq!(c.cli(&["outbox", "flush"]).code, 0);
    let id = r1.json()["payment_id"].as_str().expect("id").to_owned();
    let r = c.cli(&[
        "--json",
        "--as",
        "user1@BankA",
        "pay",
        "--to",
        "user2@BankB",
        "--amount",
        "10",
        "--id",
        &id,
    ]);
    assert_eq!((r.code, r.json()["replayed"].as_bool()), (0, Some(true)), "{r:?}");
    assert_eq!(c.balance("user2@BankB").0, 200_000 + 1_500);
    let list = c.cli(&["--json", "outbox", "list"]).json();
    assert_eq!(list["pending"].as_array().map(Vec::len), Some(0));
}

#[test]
fn a_client_killed_mid_send_doubles_nothing() {
    let c = Cluster::start_with(
        &["BankA", "BankB"],
        &[("STRIFE_GATEWAY_PREPARE_TIMEOUT_MS", "20000"), ("STRIFE_GATEWAY_PAYMENT_DEADLINE_MS", "30000")],
    );
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    // Hold the payment mid-flight: the payee's bank is paused.
    let b = &c.banks[c.bank_index("BankB")];
    b.signal(Signal::SIGSTOP);
    let mut client = std::process::Command::new(BIN)
        .arg("--dir")
        .arg(c.path())
        .args(["--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "40"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("pay");
    // Wait until the gateway has the payment in progress, then kill the client.
    let deadline = std::time::Instant::now() + WAIT;
    while c.cli(&["--json", "status"]).json()["payments_pending"] != 1 {
        assert!(std::time::Instant::now() < deadline, "the payment never reached the gateway");
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    client.kill().expect("kill -9 the client");
    let _ = client.wait();
    b.signal(Signal::SIGCONT);
    // The restarted client finds the payment in its outbox and sends it with the same id.
    let list = c.cli(&["--json", "outbox", "list"]).json();
    assert_eq!(list["pending"].as_array().map(Vec::len), Some(1), "{list}");
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["results"][0]["replayed"], true, "{r:?}");
    assert_eq!(r.json()["results"][0]["status"], "committed", "{r:?}");
    assert_eq!(c.balance("user1@BankA").0, 100_000 - 4_000, "moved once");
    assert_eq!(c.balance("user2@BankB").0, 200_000 + 4_000);
}

#[test]
fn a_payment_with_an_expired_session_waits_for_the_next_login() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    // Expire user1's session: put a token that expired long ago in its place.
    let (kid, secret) = strife_gateway::tokens::load_or_create_key(&c.path().join("certs")).expect("key");
    let keys = strife_gateway::tokens::TokenKeys::new(kid, &secret, 60).expect("keys");
    let who = strife_core::UserRef::new("user1", "BankA").expect("who");
    let old = keys.issue_at(&who, 1_000_000).expect("token").0;
    let db = rusqlite::Connection::open(c.path().join("client.db")).expect("client.db");
    db.execute("UPDATE sessions SET token = ?1 WHERE user = 'user1'", [old.expose()]).expect("expire");
    drop(db);

    let r = c.pay("user1@BankA", "user2@BankB", "7");
    assert_eq!(r.code, 5, "{r:?}");
    assert!(
        r.json()["message"].as_str().is_some_and(|m| m.contains("expired") && m.contains("waits")),
        "{r:?}"
    );
    let list = c.cli(&["--json", "outbox", "list"]).json();
    assert_eq!(list["pending"].as_array().map(Vec::len), Some(1));
    assert!(
        list["pending"][0]["last_error"].as_str().is_some_and(|e| e.contains("waiting for login")),
        "{list}"
    );
    assert_eq!(c.balance("user2@BankB").0, 200_000, "nothing moved yet");

    let r = c.cli_env(&["login", "--bank", "BankA", "--user", "user1"], &[("STRIFE_PASSWORD", "pass1")]);
    assert!(r.stdout.contains("1 queued payment"), "login says a payment can go: {r:?}");
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.balance("user2@BankB").0, 200_700);
    assert_eq!(c.balance("user1@BankA").0, 99_300);
}
