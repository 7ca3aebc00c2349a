//! Servers whose stores live in PostgreSQL: banks (`STRIFE_BANK_STORE=postgres://…`)
//! with the gateway on SQLite as before (payments end to end, `strife audit`,
//! which asks such banks for their ledgers over their `Audit` RPC, and a bank
//! killed with SIGKILL keeps every payment it acknowledged); a bank run as two
//! replicas on one database, one of them killed under load; and three
//! gateway replicas on one database (`STRIFE_GATEWAY_STORE=postgres://…`),
//! which share payment ids, tokens, revocations and the bank registry.
//!
//! One private PostgreSQL server serves this test binary
//! (`strife_rpc::postgres_server::shared_for_tests`); each bank, and the
//! gateways together, get a role and a database of their own. Without
//! PostgreSQL installed the test fails, naming the package to install.

mod common;

use common::grpc;
use common::*;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;
use strife_core::Secret;
use strife_rpc::postgres_server::{PostgresServer, shared_for_tests, unique_name};
use tonic::transport::Channel;

fn server() -> &'static PostgresServer {
    shared_for_tests().unwrap_or_else(|e| panic!("{e}"))
}

/// A role and a database of its own for one bank; returns the bank's URL
/// and its database's name.
fn bank_database(bank: &str) -> (Secret<String>, String) {
    let bank = bank.to_ascii_lowercase();
    let database = unique_name(&format!("ledger_{bank}"));
    let url =
        server().create_private_database(&unique_name(&format!("role_{bank}")), &database).expect("database");
    (url, database)
}

/// A role and a database of their own for the gateway replicas.
fn gateway_database() -> Secret<String> {
    server().create_private_database(&unique_name("role_gateway"), &unique_name("gateway")).expect("database")
}

fn start_pg_bank(dir: &std::path::Path, name: &str, gateway: &str, url: &Secret<String>) -> Proc {
    start_bank(dir, name, gateway, &[("STRIFE_BANK_STORE", url.expose())])
}

#[test]
fn banks_on_postgres_serve_payments_audit_and_survive_kill_9() {
    let (url_a, db_a) = bank_database("BankA");
    let (url_b, db_b) = bank_database("BankB");
    // A bank's role can reach neither another bank's database nor its tables.
    let a_at_b = Secret::new(url_a.expose().replace(&format!("/{db_a}"), &format!("/{db_b}")));
    let refused = server().psql(&a_at_b, &["SELECT 1"]).expect_err("BankA's role at BankB's database");
    assert!(format!("{refused:#}").contains("permission denied"), "{refused:#}");

    let dir = TempDir::new("postgres");
    let r = run_cli(&dir.0, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let gateway = start_gateway(&dir.0, "127.0.0.1:0", &[]);
    let banks = vec![
        start_pg_bank(&dir.0, "BankA", &gateway.addr, &url_a),
        start_pg_bank(&dir.0, "BankB", &gateway.addr, &url_b),
    ];
    let mut c = Cluster { dir, gateway, banks, bank_names: vec!["BankA".into(), "BankB".into()] };
    c.wait_registered();
    assert!(!c.path().join("banks/BankA/bank.db").exists(), "BankA's ledger is not in SQLite");
    let (password_b, _) =
        url_b.expose().rsplit_once('@').and_then(|(u, _)| u.rsplit_once(':')).expect("password");
    assert!(
        server().psql(&url_b, &["SELECT COUNT(*) FROM accounts"]).expect("BankB's own database") == "5",
        "the sample accounts are in BankB's database"
    );

    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let r = c.pay("user1@BankA", "user2@BankB", "12.50");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let r = c.pay("user1@BankA", "user3@BankA", "1.00");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "within one bank: {r:?}");
    let r = c.pay("user2@BankB", "user1@BankA", "1000000.00");
    assert_eq!((r.code, r.json()["reason"].as_str()), (3, Some("insufficient_funds")), "{r:?}");
    assert_eq!(c.balance("user1@BankA"), (98_650, 98_650));
    assert_eq!(c.balance("user2@BankB"), (201_250, 201_250));
    let r = c.cli(&["--json", "--as", "user2@BankB", "history"]);
    let payments = r.json()["payments"].as_array().cloned().unwrap_or_default();
    assert!(
        payments
            .iter()
            .any(|p| p["direction"] == "received" && p["amount"] == "12.50" && p["status"] == "committed"),
        "{payments:?}"
    );

    let audit = wait_audit_ok(c.path());
    assert_eq!(audit["committed"], 2, "{audit}");
    assert_eq!(audit["declined"], 1, "{audit}");
    assert_eq!(audit["banks"].as_array().map(Vec::len), Some(2), "both banks audited: {audit}");

    // Payments acknowledged one after another, then SIGKILL for both banks:
    // each acknowledged payment is in their databases when they come back.
    for _ in 0..10 {
        let r = c.pay("user1@BankA", "user2@BankB", "0.25");
        assert_eq!(r.code, 0, "{r:?}");
    }
    for i in 0..c.banks.len() {
        c.banks[i].kill9();
        let (name, url) = if i == 0 { ("BankA", &url_a) } else { ("BankB", &url_b) };
        c.banks[i] = start_pg_bank(c.path(), name, &c.gateway.addr, url);
    }
    c.wait_registered();
    assert_eq!(c.balance("user1@BankA").0, 98_650 - 250);
    assert_eq!(c.balance("user2@BankB").0, 201_250 + 250);
    let r = c.pay("user2@BankB", "user1@BankA", "2.50");
    assert_eq!(r.code, 0, "payments go on after the restart: {r:?}");
    let audit = wait_audit_ok(c.path());
    assert_eq!(audit["committed"], 13, "{audit}");
    assert_eq!(audit["held"], "0.00", "{audit}");

    // The database password is a secret: never in a log.
    for bank in ["BankA", "BankB"] {
        let log = std::fs::read_to_string(c.path().join(format!("logs/{bank}.log"))).expect("bank log");
        assert!(log.contains("opening the ledger"), "{log}");
        assert!(!log.contains(password_b), "a database password in {bank}.log");
    }
}

/// Fast heartbeats and inquiries: a replica killed is skipped after three
/// missed heartbeats (0.6 s).
const FAST: [(&str, &str); 2] =
    [("STRIFE_BANK_REGISTER_INTERVAL_MS", "200"), ("STRIFE_BANK_INQUIRY_INTERVAL_MS", "200")];

/// One replica (process) of bank `name` on the ledger at `url`, and the file
/// its stderr goes to: its own log (the replicas share `logs/NAME.log`).
fn start_replica(dir: &Path, name: &str, gateway: &str, url: &Secret<String>) -> (Proc, PathBuf) {
    let mut cmd = std::process::Command::new(BIN);
    cmd.arg("--dir").arg(dir);
    cmd.args(["bank", "--name", name, "--listen", "127.0.0.1:0", "--gateway", gateway]);
    cmd.env("STRIFE_BANK_STORE", url.expose()).envs(FAST);
    let (child, line, lines, log) = spawn_command_logged(cmd, dir, "listening on");
    let addr = line.rsplit(' ').next().expect("addr").to_owned();
    (Proc { name: name.into(), child, addr, lines }, log)
}

/// Prepare batches a replica answered, counted in its own call log.
fn prepares_answered(log: &Path) -> usize {
    let text = std::fs::read_to_string(log).expect("replica log");
    text.lines()
        .filter(|l| l.contains("/PrepareBatch") && l.contains(" done ") && l.contains("\"OK\""))
        .count()
}

/// Waits until the gateway's status shows the replicas of `bank` as
/// `want` accepts them; returns them as `(address, reachable)`, sorted.
fn wait_replicas(dir: &Path, bank: &str, want: impl Fn(&[(String, bool)]) -> bool) -> Vec<(String, bool)> {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = run_cli(dir, &["--json", "status"], &[]);
        assert_eq!(r.code, 0, "{r:?}");
        let mut rows: Vec<(String, bool)> = r.json()["banks"]
            .as_array()
            .expect("banks")
            .iter()
            .filter(|b| b["name"] == bank)
            .map(|b| (b["address"].as_str().expect("address").to_owned(), b["reachable"] == true))
            .collect();
        rows.sort();
        if want(&rows) {
            return rows;
        }
        assert!(Instant::now() < deadline, "the replicas of {bank} never became as wanted: {rows:?}");
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
}

/// BankA runs as two processes on one PostgreSQL database, registered at one
/// gateway: the status shows both, and payments one after another are
/// prepared by each in turn (counted in each one's log). Then, under a
/// stream of payments from two payers, one replica is killed with SIGKILL:
/// every payment commits at its first attempt (the gateway retries a failed
/// call at the other replica), each moves its money once, and the audit is
/// clean.
#[test]
fn bank_replicas_share_the_calls_and_one_killed_loses_no_payment() {
    let (url_a, _) = bank_database("BankA");
    let (url_b, _) = bank_database("BankB");
    let dir = TempDir::new("replicas");
    let r = run_cli(&dir.0, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let gateway = start_gateway(&dir.0, "127.0.0.1:0", &FAST);
    let (mut a1, log1) = start_replica(&dir.0, "BankA", &gateway.addr, &url_a);
    let (a2, log2) = start_replica(&dir.0, "BankA", &gateway.addr, &url_a);
    let b = start_replica(&dir.0, "BankB", &gateway.addr, &url_b).0;
    let c = Cluster { dir, gateway, banks: vec![b], bank_names: vec!["BankA".into(), "BankB".into()] };
    c.wait_registered();

    let rows = wait_replicas(c.path(), "BankA", |r| r.len() == 2 && r.iter().all(|(_, live)| *live));
    let mut expected = vec![a1.addr.clone(), a2.addr.clone()];
    expected.sort();
    assert_eq!(rows.iter().map(|(a, _)| a.clone()).collect::<Vec<_>>(), expected, "a row per replica");
    let text = c.cli(&["status"]);
    assert!(text.stdout.contains(&a1.addr) && text.stdout.contains(&a2.addr), "{}", text.stdout);

    for (user, bank) in [("user1", "BankA"), ("user2", "BankB"), ("user3", "BankB"), ("user4", "BankA")] {
        c.login(user, bank);
    }
    // One after another, BankA's prepares go to each replica in turn.
    const ONE_BY_ONE: usize = 10;
    let before = (prepares_answered(&log1), prepares_answered(&log2));
    for _ in 0..ONE_BY_ONE {
        let r = c.pay("user1@BankA", "user2@BankB", "1.00");
        assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    }
    let answered = (prepares_answered(&log1) - before.0, prepares_answered(&log2) - before.1);
    eprintln!("prepares answered by each replica of BankA: {answered:?}");
    assert!(answered.0 > 0 && answered.1 > 0, "both replicas prepare: {answered:?}");
    assert_eq!(answered.0 + answered.1, ONE_BY_ONE, "one prepare call per payment");

    // A stream of payments from two payers; SIGKILL for one replica under it.
    const PER_PAYER: usize = 20;
    let done = Arc::new(AtomicUsize::new(0));
    let payers: Vec<_> = [("user1@BankA", "user2@BankB"), ("user3@BankB", "user4@BankA")]
        .into_iter()
        .map(|(from, to)| {
            let (dir, done) = (c.path().to_path_buf(), done.clone());
            std::thread::spawn(move || {
                for _ in 0..PER_PAYER {
                    let id = grpc::new_id();
                    let args = ["--json", "--as", from, "pay", "--to", to, "--amount", "1.00", "--id", &id];
                    let r = run_cli(&dir, &args, &[]);
                    assert_eq!(
                        (r.code, r.json()["status"].as_str()),
                        (0, Some("committed")),
                        "{from}: {r:?}"
                    );
                    done.fetch_add(1, Ordering::SeqCst);
                }
            })
        })
        .collect();
    let deadline = Instant::now() + WAIT;
    while done.load(Ordering::SeqCst) < 4 {
        assert!(Instant::now() < deadline, "the payments never started");
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    a1.kill9();
    let at_kill = done.load(Ordering::SeqCst);
    let answered_at_kill = prepares_answered(&log2);
    // The killed replica is no longer live (shown as unreachable, later
    // forgotten); the other serves on.
    let (dead, alive) = ((a1.addr.clone(), true), (a2.addr.clone(), true));
    wait_replicas(c.path(), "BankA", |r| !r.contains(&dead) && r.contains(&alive));
    for payer in payers {
        payer.join().expect("every payment committed");
    }
    assert!(at_kill < 2 * PER_PAYER, "payments went on after the kill ({at_kill} before it)");
    assert!(prepares_answered(&log2) > answered_at_kill, "the other replica took over");
    let gateway_log = std::fs::read_to_string(c.path().join("logs/gateway.log")).expect("gateway log");
    let retried = gateway_log.lines().filter(|l| l.contains("a replica failed; trying another")).count();
    eprintln!("{at_kill} payments before the kill; calls retried at the other replica: {retried}");

    // Each payment moved its money once.
    let paid = (ONE_BY_ONE + PER_PAYER) as i64 * 100;
    assert_eq!(c.balance("user1@BankA").0, 100_000 - paid);
    assert_eq!(c.balance("user2@BankB").0, 200_000 + paid);
    assert_eq!(c.balance("user3@BankB").0, 300_000 - PER_PAYER as i64 * 100);
    assert_eq!(c.balance("user4@BankA").0, 400_000 + PER_PAYER as i64 * 100);
    let audit = wait_audit_ok(c.path());
    assert_eq!(audit["committed"], ONE_BY_ONE + 2 * PER_PAYER, "{audit}");
    assert_eq!(audit["declined"], 0, "{audit}");
    assert_eq!(audit["held"], "0.00", "{audit}");
}

/// One payment id from user1@BankA to user2 at `payee_bank`, 16 copies at
/// once spread over the gateways behind `channels`: all 16 are answered
/// committed, 15 of them as replays.
async fn copies_over_gateways(
    channels: &[Channel],
    token: &str,
    payee_bank: &'static str,
    amount: &'static str,
) {
    const COPIES: usize = 16;
    let id = grpc::new_id();
    let tasks: Vec<_> = (0..COPIES)
        .map(|n| {
            let (ch, token, id) = (channels[n % channels.len()].clone(), token.to_owned(), id.clone());
            tokio::spawn(async move { grpc::pay(&ch, &token, &id, "user2", payee_bank, amount).await })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task").expect("pay"));
    }
    assert!(answers.iter().all(|a| a.status == 1), "all 16 committed: {answers:?}");
    assert_eq!(answers.iter().filter(|a| a.replayed).count(), COPIES - 1, "15 replays: {answers:?}");
}

/// Three gateways on one PostgreSQL database and two banks (each a replica
/// per gateway on its own database: a bank registers with one gateway): one
/// payment id sent 16 times at once across the three moves the money once;
/// a token from one gateway works at the others, and once logged out at one
/// is refused at every other; the audit reads the shared log and agrees.
#[test]
fn three_gateways_on_one_database_pay_once_share_tokens_and_audit_clean() {
    const GATEWAYS: usize = 3;
    let (url_a, _) = bank_database("BankA");
    let (url_b, _) = bank_database("BankB");
    let url_g = gateway_database();
    let store = [("STRIFE_GATEWAY_STORE", url_g.expose().as_str())];

    let dir = TempDir::new("gateways");
    let r = run_cli(&dir.0, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let gateways: Vec<Proc> = (0..GATEWAYS).map(|_| start_gateway(&dir.0, "127.0.0.1:0", &store)).collect();
    let mut banks = Vec::new();
    for g in &gateways {
        banks.push(start_pg_bank(&dir.0, "BankA", &g.addr, &url_a));
        banks.push(start_pg_bank(&dir.0, "BankB", &g.addr, &url_b));
    }
    for g in &gateways {
        wait_registered_at(&dir.0, Some(&g.addr), &["BankA", "BankB"]);
    }
    assert!(!dir.0.join("gateway/gateway.db").exists(), "the gateways' log is not in SQLite");
    let registered =
        server().psql(&url_g, &["SELECT COUNT(*) FROM banks"]).expect("the gateways' own database");
    assert_eq!(
        registered,
        (2 * GATEWAYS).to_string(),
        "every replica of each bank is in the shared registry"
    );

    let rt = grpc::runtime();
    let (path, addrs) = (dir.0.clone(), gateways.iter().map(|g| g.addr.clone()).collect::<Vec<_>>());
    rt.block_on(async move {
        let mut channels = Vec::new();
        for addr in &addrs {
            channels.push(grpc::client_channel(&path, addr).await);
        }
        let token = grpc::login(&channels[0], "BankA", "user1", "pass1").await.expect("login at gateway 1");

        // One payment id, 16 copies at once, spread over the three gateways.
        copies_over_gateways(&channels, &token, "BankB", "30.00").await;

        // The same within BankA, which decides in one phase.
        copies_over_gateways(&channels, &token, "BankA", "20.00").await;

        // The token from gateway 1 works at 2 and 3, and sees the money moved once.
        for ch in &channels[1..] {
            let b = grpc::balance(ch, &token).await.expect("a token from gateway 1");
            assert_eq!(b.balance, "950.00", "{b:?}");
        }
        let within = grpc::login(&channels[1], "BankA", "user2", "pass2").await.expect("login at gateway 2");
        assert_eq!(grpc::balance(&channels[0], &within).await.expect("balance").balance, "2020.00");
        let payee = grpc::login(&channels[2], "BankB", "user2", "pass2").await.expect("login at gateway 3");
        assert_eq!(grpc::balance(&channels[1], &payee).await.expect("balance").balance, "2030.00");

        // Logged out at gateway 1: refused at every gateway, at once.
        let logout = grpc::payments(&channels[0])
            .logout(grpc::authed(strife_proto::gateway::v1::LogoutRequest {}, &token))
            .await;
        logout.expect("logout at gateway 1");
        for (n, ch) in channels.iter().enumerate() {
            let refused = grpc::balance(ch, &token).await.expect_err("a revoked token");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "gateway {}: {refused:?}", n + 1);
        }
        assert!(grpc::balance(&channels[0], &payee).await.is_ok(), "other sessions go on");
    });

    let audit = wait_audit_ok_with(&dir.0, &store);
    assert_eq!(audit["committed"], 2, "{audit}");
    assert_eq!(audit["payments"], 2, "{audit}");
    let modes = server()
        .psql(&url_g, &["SELECT string_agg(one_phase::text, ',' ORDER BY one_phase) FROM payments"])
        .expect("the shared log");
    assert_eq!(modes, "false,true", "the payment within BankA ran in one phase");
    assert_eq!(audit["banks"].as_array().map(Vec::len), Some(2), "both banks audited: {audit}");
    assert_eq!(audit["held"], "0.00", "{audit}");

    // The database password is a secret: never in a log.
    let (password, _) = url_g
        .expose()
        .rsplit_once('@')
        .and_then(|(u, _)| u.rsplit_once(':'))
        .map(|(_, p)| (p, ()))
        .expect("password");
    let log = std::fs::read_to_string(dir.0.join("logs/gateway.log")).expect("gateway log");
    assert!(log.contains("serving as one replica of the gateway"), "{log}");
    assert!(!log.contains(password), "the database password in gateway.log");
    drop(banks);
    drop(gateways);
}

/// Two gateways on one database and both banks (on SQLite) registered with
/// both, through the comma-separated gateway list. `gw_envs[i]` is added to
/// gateway i's environment (e.g. a crash point).
fn two_gateways(tag: &str, gw_envs: [&[(&str, &str)]; 2]) -> (TempDir, Secret<String>, Vec<Proc>, Vec<Proc>) {
    let url_g = gateway_database();
    let dir = TempDir::new(tag);
    let r = run_cli(&dir.0, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let gateways: Vec<Proc> = gw_envs
        .iter()
        .map(|extra| {
            let mut envs: Vec<(&str, &str)> = common::FAST.to_vec();
            envs.push(("STRIFE_GATEWAY_STORE", url_g.expose()));
            envs.extend_from_slice(extra);
            start_gateway(&dir.0, "127.0.0.1:0", &envs)
        })
        .collect();
    let list = format!("{},{}", gateways[0].addr, gateways[1].addr);
    let banks = vec![
        start_bank(&dir.0, "BankA", &list, common::FAST),
        start_bank(&dir.0, "BankB", &list, common::FAST),
    ];
    for g in &gateways {
        wait_registered_at(&dir.0, Some(&g.addr), &["BankA", "BankB"]);
    }
    (dir, url_g, gateways, banks)
}

#[test]
fn failed_logins_and_token_keys_are_the_clusters_not_one_gateways() {
    let (dir, _url, gateways, _banks) = two_gateways("cluster-wide", [&[], &[]]);
    let header = |token: &str| token.split('.').next().expect("JWT header").to_owned();
    let rt = grpc::runtime();
    let (path, g1, g2) = (dir.0.clone(), gateways[0].addr.clone(), gateways[1].addr.clone());
    rt.block_on(async {
        let one = grpc::client_channel(&path, &g1).await;
        let two = grpc::client_channel(&path, &g2).await;
        // Five failures (the default threshold), alternating gateways: the
        // account is locked at both, not at neither.
        for n in 0..5 {
            let ch = if n % 2 == 0 { &one } else { &two };
            let refused = grpc::login(ch, "BankA", "user1", "wrong").await.expect_err("wrong password");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        for ch in [&one, &two] {
            let locked = grpc::login(ch, "BankA", "user1", "pass1").await.expect_err("locked everywhere");
            assert_eq!(locked.code(), tonic::Code::ResourceExhausted, "{locked:?}");
        }

        // A key rotated into the key file reaches the store at the next
        // pass of a gateway, and from there every gateway signs with it.
        let old = grpc::login(&two, "BankA", "user2", "pass2").await.expect("login");
        let r = run_cli(&path, &["--json", "certs", "rotate-token-key"], &[]);
        assert_eq!(r.code, 0, "{r:?}");
        let deadline = std::time::Instant::now() + WAIT;
        loop {
            let a = grpc::login(&one, "BankA", "user3", "pass3").await.expect("login at 1");
            let b = grpc::login(&two, "BankA", "user3", "pass3").await.expect("login at 2");
            if header(&a) == header(&b) && header(&b) != header(&old) {
                break;
            }
            assert!(std::time::Instant::now() < deadline, "the gateways never both signed with the new key");
            tokio::time::sleep(std::time::Duration::from_millis(50)).await;
        }
        for ch in [&one, &two] {
            grpc::balance(ch, &old).await.expect("a token of the older key still works everywhere");
        }
    });
}

/// user1@BankA pays 10.00 to `to` through `gateway`, with payment id `id`.
fn pay_10(d: &Path, gateway: &str, to: &str, id: &str) -> Run {
    let args = ["--json", "--gateway", gateway, "--as", "user1@BankA", "pay", "--to", to];
    run_cli(d, &[&args[..], &["--amount", "10.00", "--id", id]].concat(), &[])
}

/// user1@BankA logs in (through gateway 2) and pays `to` through gateway
/// 1, which dies by its crash point before answering; the retry through
/// gateway 2 is answered committed, as a replay. Returns the payment's id.
fn dies_then_replayed(d: &Path, (g1, g2): (&str, &str), gateway1: &mut Child, to: &str) -> String {
    let r = run_cli(
        d,
        &["--gateway", g2, "login", "--bank", "BankA", "--user", "user1"],
        &[("STRIFE_PASSWORD", "pass1")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    let id = grpc::new_id();
    let first = pay_10(d, g1, to, &id);
    assert_ne!(first.code, 0, "gateway 1 died before answering: {first:?}");
    assert_eq!(wait_exit(gateway1), None, "gateway 1 died by a signal");
    let again = pay_10(d, g2, to, &id);
    assert_eq!((again.code, again.json()["status"].as_str()), (0, Some("committed")), "{again:?}");
    assert_eq!(again.json()["replayed"], true, "{again:?}");
    id
}

#[test]
fn a_dead_gateways_payments_are_finished_by_the_other() {
    // Gateway 1 dies right after its decision is durable, before any bank
    // hears it; it stays dead.
    let crash: &[(&str, &str)] = &[("STRIFE_CRASH_AT", "gateway.after_decision")];
    let (dir, url_g, mut gateways, _banks) = two_gateways("takeover", [crash, &[]]);
    let d = &dir.0;
    let store = [("STRIFE_GATEWAY_STORE", url_g.expose().as_str())];
    let (g1, g2) = (gateways[0].addr.clone(), gateways[1].addr.clone());
    let pay = |gateway: &str, id: &str| pay_10(d, gateway, "user2@BankB", id);
    // The decision was durable: gateway 2 tells the customer, and the banks
    // (by inquiry) and gateway 2's finisher (once the dead one's claim
    // lapsed) carry it out, once.
    let decided = dies_then_replayed(d, (&g1, &g2), &mut gateways[0].child, "user2@BankB");
    let deadline = std::time::Instant::now() + WAIT;
    // Acknowledged: decided, and out of the gateways' work queue.
    let sql = format!(
        "SELECT state <> 'preparing' AND NOT EXISTS (SELECT 1 FROM payment_queue q WHERE q.txn_id = p.txn_id)
         FROM payments p WHERE payment_id = '{decided}'"
    );
    while server().psql(&url_g, &[&sql]).expect("the gateways' log") != "t" {
        assert!(
            std::time::Instant::now() < deadline,
            "gateway 2 never delivered the dead gateway's decision"
        );
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    // Gateway 1 comes back, and now dies before deciding, with both legs
    // prepared: gateway 2 aborts the payment at its deadline, the banks
    // release the holds.
    gateways[0] = start_gateway(
        d,
        &g1,
        &[("STRIFE_GATEWAY_STORE", url_g.expose()), ("STRIFE_CRASH_AT", "gateway.before_decision")],
    );
    wait_registered_at(d, Some(&gateways[0].addr), &["BankA", "BankB"]);
    let undecided = grpc::new_id();
    let first = pay(&g1, &undecided);
    assert_ne!(first.code, 0, "gateway 1 died before deciding: {first:?}");
    assert_eq!(wait_exit(&mut gateways[0].child), None, "gateway 1 died by a signal");
    let audit = wait_audit_ok_with(d, &store);
    assert_eq!(audit["held"], "0.00", "no hold left: {audit}");
    let again = pay(&g2, &undecided);
    assert_eq!((again.code, again.json()["reason"].as_str()), (3, Some("timeout")), "{again:?}");
    let r = run_cli(d, &["--json", "--gateway", &g2, "--as", "user1@BankA", "balance"], &[]);
    assert_eq!(r.json()["balance"], "990.00", "the decided payment moved once, the other never: {r:?}");
}

/// One phase across replicas: gateway 1 dies after BankA decided a payment
/// within BankA, before recording BankA's decision; gateway 2 never
/// aborts it (BankA may have committed it, and did) but asks BankA, and
/// the customer's retry there is told the truth. Then gateway 1 dies right
/// after forcing the record of another, before BankA heard of it: gateway
/// 2 asks BankA past the deadline, BankA fences the transfer it never saw,
/// and the payment is declined; the money moved once.
#[test]
fn a_dead_gateways_one_phase_payments_are_settled_by_the_other_at_their_bank() {
    let crash: &[(&str, &str)] = &[("STRIFE_CRASH_AT", "gateway.before_outcome")];
    let (dir, url_g, mut gateways, _banks) = two_gateways("takeover-one-phase", [crash, &[]]);
    let d = &dir.0;
    let (g1, g2) = (gateways[0].addr.clone(), gateways[1].addr.clone());
    let pay = |gateway: &str, id: &str| pay_10(d, gateway, "user2@BankA", id);
    let decided = dies_then_replayed(d, (&g1, &g2), &mut gateways[0].child, "user2@BankA");
    let sql = format!(
        "SELECT state || ' ' || (NOT EXISTS (SELECT 1 FROM payment_queue q WHERE q.txn_id = p.txn_id)) || ' ' || one_phase
         FROM payments p WHERE payment_id = '{decided}'"
    );
    let deadline = std::time::Instant::now() + WAIT;
    while server().psql(&url_g, &[&sql]).expect("the gateways' log") != "committed true true" {
        assert!(std::time::Instant::now() < deadline, "gateway 2 never recorded BankA's decision");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }

    gateways[0] = start_gateway(
        d,
        &g1,
        &[("STRIFE_GATEWAY_STORE", url_g.expose()), ("STRIFE_CRASH_AT", "gateway.after_begin")],
    );
    wait_registered_at(d, Some(&gateways[0].addr), &["BankA", "BankB"]);
    let fenced = grpc::new_id();
    let first = pay(&g1, &fenced);
    assert_ne!(first.code, 0, "gateway 1 died before the transfer: {first:?}");
    assert_eq!(wait_exit(&mut gateways[0].child), None, "gateway 1 died by a signal");
    let store = [("STRIFE_GATEWAY_STORE", url_g.expose().as_str())];
    let audit = wait_audit_ok_with(d, &store);
    assert_eq!(audit["committed"], 1, "{audit}");
    let again = pay(&g2, &fenced);
    assert_eq!((again.code, again.json()["reason"].as_str()), (3, Some("timeout")), "{again:?}");
    let balance = |who: &str| {
        run_cli(d, &["--json", "--gateway", &g2, "--as", who, "balance"], &[]).json()["balance"].clone()
    };
    assert_eq!(balance("user1@BankA"), "990.00", "the decided payment moved once, the fenced one never");
    let r = run_cli(
        d,
        &["--gateway", &g2, "login", "--bank", "BankA", "--user", "user2"],
        &[("STRIFE_PASSWORD", "pass2")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(balance("user2@BankA"), "2010.00");
}
