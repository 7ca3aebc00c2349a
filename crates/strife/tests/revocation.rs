//! Revocation and renewal of identities without downtime, on real
//! processes: `strife certs revoke` writes a CRL that the running gateway,
//! banks and clients honour from their next connection or message, and a
//! certificate renewed with `strife certs issue` is presented to new
//! connections without a restart and without dropping payments.

mod common;

use common::grpc;
use common::*;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::{Duration, Instant};
use strife_proto::gateway::v1 as pb;

/// Waits until some line of the log `file` in `dir/logs` satisfies `found`;
/// returns that line.
fn wait_for_log_line(dir: &Path, file: &str, found: impl Fn(&str) -> bool) -> String {
    let path = dir.join("logs").join(file);
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(&path).unwrap_or_default();
        if let Some(line) = text.lines().find(|l| found(l)) {
            return line.to_owned();
        }
        assert!(Instant::now() < deadline, "no such line in {}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Whether the gateway reports `bank` registered and live.
fn bank_live(c: &Cluster, bank: &str) -> bool {
    let r = c.cli(&["--json", "status"]);
    r.code == 0
        && r.json()["banks"]
            .as_array()
            .is_some_and(|banks| banks.iter().any(|b| b["name"] == bank && b["reachable"] == true))
}

fn wait_until(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = Instant::now() + WAIT;
    while !done() {
        assert!(Instant::now() < deadline, "{what} never happened");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn still_running(p: &mut Proc) -> bool {
    p.child.try_wait().expect("wait").is_none()
}

#[test]
fn a_revoked_bank_certificate_is_refused_at_its_next_connection_and_a_renewed_one_taken_without_restarts() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user1", "BankB");
    let r = c.pay("user1@BankA", "user1@BankB", "1");
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    let payee_before = c.balance("user1@BankB");

    let r = c.cli(&["--json", "certs", "revoke", "--bank", "BankB"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(j["identity"], "bank:BankB");
    let revoked = j["revoked"].as_array().expect("revoked");
    assert_eq!(revoked.len(), 1, "BankB had one certificate: {j}");
    assert_eq!(revoked[0]["identity"], "bank:BankB");
    let serial = revoked[0]["serial"].as_str().expect("serial").to_owned();
    assert_eq!(j["total"], 1);

    // The gateway's link to BankB is cut at its next message, and every
    // new connection to BankB is refused: payments to BankB decline as
    // bank_unavailable, and nothing moves.
    for _ in 0..3 {
        let r = c.pay("user1@BankA", "user1@BankB", "1");
        assert_eq!(r.code, 3, "{r:?}");
        assert_eq!(r.json()["reason"], "bank_unavailable", "{r:?}");
    }
    assert_eq!(c.balance("user1@BankA").1, 99_900, "no hold left at the payer's bank");
    // BankB's own customers cannot be served either (their balance is BankB's).
    let r = c.cli(&["--json", "--as", "user1@BankB", "balance"]);
    assert_eq!(r.json()["reason"], "BANK_UNAVAILABLE", "{r:?}");
    // The gateway's log names the revoked certificate.
    let line = wait_for_log_line(c.path(), "gateway.log", |l| {
        l.contains(&serial) && l.contains("bank:BankB") && l.to_lowercase().contains("revoked")
    });
    eprintln!("gateway: {line}");
    // BankB cannot register: the gateway refuses its certificate, so the
    // gateway stops seeing it.
    wait_until("BankB shown as not seen", || !bank_live(&c, "BankB"));
    let line = wait_for_log_line(c.path(), "BankB.log", |l| l.contains("CertificateRevoked"));
    eprintln!("BankB: {line}");

    // Renewed: BankB presents its new certificate from its next connection
    // on, registers again, and payments to it commit; no process restarted.
    let r = c.cli(&["--json", "certs", "issue", "--bank", "BankB"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_ne!(r.json()["serial"], serial.as_str());
    wait_until("BankB registered again", || bank_live(&c, "BankB"));
    let r = c.pay("user1@BankA", "user1@BankB", "1");
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    assert_eq!(c.balance("user1@BankB").0, payee_before.0 + 100, "only the committed payments moved money");
    assert!(still_running(&mut c.gateway));
    for bank in &mut c.banks {
        assert!(still_running(bank), "{} restarted", bank.name);
    }
    let audit = wait_audit_ok(c.path());
    assert_eq!(audit["declined"], 3, "{audit}");
}

#[test]
fn a_revoked_client_certificate_is_refused_by_the_gateway() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    assert_eq!(c.cli(&["balance"]).code, 0);
    // A client elsewhere, with a copy of the client identity but not of the
    // CRL: only the gateway can refuse it.
    let remote = TempDir::new("remote-client");
    std::fs::create_dir_all(remote.0.join("certs")).expect("certs");
    for file in ["ca.pem", "client.pem", "client.key"] {
        std::fs::copy(c.path().join("certs").join(file), remote.0.join("certs").join(file)).expect("copy");
    }
    let gw = c.gateway.addr.clone();
    let remote_login = |args: &[&str]| {
        let mut all = vec!["--gateway", gw.as_str()];
        all.extend_from_slice(args);
        run_cli(&remote.0, &all, &[("STRIFE_PASSWORD", "pass2")])
    };
    assert_eq!(remote_login(&["login", "--bank", "BankA", "--user", "user2"]).code, 0);

    let r = c.cli(&["--json", "certs", "revoke", "--client", "client"]);
    assert_eq!(r.code, 0, "{r:?}");
    let serial = r.json()["revoked"][0]["serial"].as_str().expect("serial").to_owned();

    // The gateway refuses the certificate: exit 5, naming the refusal.
    let r = remote_login(&["login", "--bank", "BankA", "--user", "user2"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("refused this client's certificate (CertificateRevoked)"), "{r:?}");
    let r =
        run_cli(&remote.0, &["--gateway", &gw, "--json", "pay", "--to", "user1@BankB", "--amount", "1"], &[]);
    assert_eq!(r.code, 5, "a refusal is not an outage: {r:?}");
    let line = wait_for_log_line(c.path(), "gateway.log", |l| {
        l.contains(&serial) && l.contains("client:client") && l.contains("Revoked")
    });
    eprintln!("gateway: {line}");
    // Where the CRL is at hand, the client knows before it asks.
    let r = c.cli(&["--as", "user1@BankA", "pay", "--to", "user1@BankB", "--amount", "1"]);
    assert_eq!(r.code, 5, "{r:?}");
    assert!(r.stderr.contains("is revoked"), "{r:?}");

    // A new certificate: accepted at once, by the same gateway process;
    // the payment that waited goes with its id.
    let r = c.cli(&["certs", "issue", "--client", "client"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.cli(&["balance"]).code, 0);
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.balance("user1@BankA").0, 99_900);
}

#[test]
fn a_renewed_gateway_certificate_is_served_to_new_connections_while_payments_keep_committing() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    let dir = c.path().to_path_buf();
    let gw = c.gateway.addr.clone();
    let old_serial = {
        let text = std::fs::read_to_string(dir.join("certs/issued.json")).expect("index");
        let index: serde_json::Value = serde_json::from_str(&text).expect("json");
        let gateway =
            index["certificates"].as_array().expect("list").iter().find(|e| e["identity"] == "gateway");
        gateway.expect("gateway in the index")["serial"].as_str().expect("serial").to_owned()
    };

    let stop = AtomicBool::new(false);
    let (held_ok, held_failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (cli_ok, cli_failed) = (AtomicUsize::new(0), AtomicUsize::new(0));
    let (held_ok, cli_ok) = (&held_ok, &cli_ok);
    std::thread::scope(|s| {
        // Payments on one connection made before the renewal.
        s.spawn(|| {
            let rt = grpc::runtime();
            rt.block_on(async {
                let ch = grpc::client_channel(&dir, &gw).await;
                let token = grpc::login(&ch, "BankB", "user2", "pass2").await.expect("login");
                while !stop.load(Ordering::SeqCst) {
                    match grpc::pay(&ch, &token, &grpc::new_id(), "user3", "BankA", "0.01").await {
                        Ok(r) if r.status() == pb::PaymentStatus::Committed => {
                            held_ok.fetch_add(1, Ordering::SeqCst)
                        }
                        other => {
                            eprintln!("held connection: {other:?}");
                            held_failed.fetch_add(1, Ordering::SeqCst)
                        }
                    };
                }
            });
        });
        // Payments each on a new connection (a CLI process each).
        s.spawn(|| {
            while !stop.load(Ordering::SeqCst) {
                let r = run_cli(
                    &dir,
                    &["--json", "--as", "user1@BankA", "pay", "--to", "user4@BankB", "--amount", "0.01"],
                    &[],
                );
                if r.code == 0 && r.json()["status"] == "committed" {
                    cli_ok.fetch_add(1, Ordering::SeqCst);
                } else {
                    eprintln!("new connection: {r:?}");
                    cli_failed.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        let at_least = |n: usize| {
            let (held, cli) = (held_ok.load(Ordering::SeqCst), cli_ok.load(Ordering::SeqCst));
            move || held_ok.load(Ordering::SeqCst) >= held + n && cli_ok.load(Ordering::SeqCst) >= cli + n
        };
        wait_until("payments before the renewal", at_least(3));
        let r = run_cli(&dir, &["--json", "certs", "issue", "--gateway"], &[]);
        assert_eq!(r.code, 0, "{r:?}");
        let new_serial = r.json()["serial"].as_str().expect("serial").to_owned();
        assert_ne!(new_serial, old_serial);
        let line = wait_for_log_line(&dir, "gateway.log", |l| {
            l.contains("presenting a renewed certificate") && l.contains(&new_serial)
        });
        eprintln!("gateway: {line}");
        wait_until("payments after the renewal", at_least(5));
        stop.store(true, Ordering::SeqCst);
    });
    let (held, cli) = (held_ok.load(Ordering::SeqCst), cli_ok.load(Ordering::SeqCst));
    eprintln!("committed: {held} on the held connection, {cli} on new connections");
    assert_eq!(held_failed.load(Ordering::SeqCst), 0, "payments failed on the held connection");
    assert_eq!(cli_failed.load(Ordering::SeqCst), 0, "payments failed on new connections");
    assert!(still_running(&mut c.gateway), "the gateway did not restart");

    // New connections get the renewed certificate: with the old one
    // revoked, clients (which check the gateway against the CRL) still get
    // in. (The gateway's links to the banks, made with the old one, are
    // closed by the banks at their next message and made again with the
    // new one.)
    let r = c.cli(&["--json", "certs", "revoke", "--serial", &old_serial]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["revoked"][0]["identity"], "gateway");
    let r = c.cli(&["--json", "status"]);
    assert_eq!(r.code, 0, "{r:?}");
    wait_until("the gateway reaches the banks with its new certificate", || {
        c.cli(&["--as", "user1@BankA", "balance"]).code == 0
    });
    let audit = wait_audit_ok(c.path());
    assert_eq!(audit["declined"], 0, "{audit}");
}
