//! For each crash point: crash the process there (like kill -9), restart it,
//! and check that the payment converges to one outcome at the gateway and at
//! both banks, the customer learns that outcome by replaying the id, and
//! money moved exactly once or not at all. Two-phase points with a payment
//! from BankA to BankB; one-phase points (`one_phase_*`) with a payment
//! within BankA, which BankA decides.

mod common;

use common::*;

/// Fast timeouts so that a test does not wait seconds for each phase.
const FAST: &[(&str, &str)] = &[
    ("STRIFE_GATEWAY_PREPARE_TIMEOUT_MS", "1500"),
    ("STRIFE_GATEWAY_COMMIT_TIMEOUT_MS", "500"),
    ("STRIFE_GATEWAY_PAYMENT_DEADLINE_MS", "3000"),
    ("STRIFE_BANK_INQUIRY_INTERVAL_MS", "200"),
    ("STRIFE_BANK_REGISTER_INTERVAL_MS", "200"),
];

enum Victim {
    Gateway,
    /// The payer's bank.
    BankA,
}

/// Where the servers keep their state.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Stores {
    Sqlite,
    /// The gateway and each bank in a database of its own on the test
    /// binary's private PostgreSQL server.
    Postgres,
}

/// Where the payment goes.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Payee {
    /// user2@BankB: two-phase commit.
    OtherBank,
    /// user2@BankA: one phase, decided by BankA.
    SameBank,
}

fn crash_and_recover(point: &str, victim: Victim) -> &'static str {
    crash_and_recover_on(point, victim, Stores::Sqlite)
}

fn crash_and_recover_on(point: &str, victim: Victim, stores: Stores) -> &'static str {
    crash_and_recover_paying(point, victim, stores, Payee::OtherBank)
}

fn crash_and_recover_paying(point: &str, victim: Victim, stores: Stores, destination: Payee) -> &'static str {
    let dir = TempDir::new("crash");
    let d = &dir.0;
    assert_eq!(run_cli(d, &["certs", "init"], &[]).code, 0);
    let mut urls: Vec<(&str, String)> = Vec::new();
    if stores == Stores::Postgres {
        let pg = strife_rpc::postgres_server::shared_for_tests().unwrap_or_else(|e| panic!("{e}"));
        let name = |what: &str| strife_rpc::postgres_server::unique_name(what);
        let gateway = pg.create_private_database(&name("crash_gw_role"), &name("crash_gw")).expect("db");
        // Every process in DIR, and the audit, read the gateway's store here.
        std::fs::write(d.join("strife.toml"), format!("[gateway]\nstore = \"{}\"\n", gateway.expose()))
            .expect("strife.toml");
        for bank in ["BankA", "BankB"] {
            let url = pg.create_private_database(&name("crash_bank_role"), &name("crash_bank")).expect("db");
            urls.push((bank, url.expose().clone()));
        }
    }
    let bank_store = |bank: &str| -> Vec<(String, String)> {
        urls.iter()
            .filter(|(b, _)| *b == bank)
            .map(|(_, u)| ("STRIFE_BANK_STORE".to_owned(), u.clone()))
            .collect()
    };
    let env = |crash: bool, store: Vec<(String, String)>| -> Vec<(String, String)> {
        let mut e: Vec<(String, String)> = FAST.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        if crash {
            e.push(("STRIFE_CRASH_AT".into(), point.into()));
        }
        e.extend(store);
        e
    };

    let gw_env = env(matches!(victim, Victim::Gateway), Vec::new());
    let a_env = env(matches!(victim, Victim::BankA), bank_store("BankA"));
    let a_env_after = env(false, bank_store("BankA"));
    let b_env = env(false, bank_store("BankB"));
    let mut gateway = start_gateway(d, "127.0.0.1:0", &refs(&gw_env));
    let gw = gateway.addr.clone();
    let mut bank_a = start_bank(d, "BankA", &gw, &refs(&a_env));
    let _bank_b = start_bank(d, "BankB", &gw, &refs(&b_env));
    wait_registered(d, &["BankA", "BankB"]);
    let (to, to_bank) = match destination {
        Payee::OtherBank => ("user2@BankB", "BankB"),
        Payee::SameBank => ("user2@BankA", "BankA"),
    };
    for (u, b, p) in [("user1", "BankA", "pass1"), ("user2", to_bank, "pass2")] {
        let r = run_cli(d, &["login", "--bank", b, "--user", u], &[("STRIFE_PASSWORD", p)]);
        assert_eq!(r.code, 0, "{r:?}");
    }
    let id = strife_core::PaymentId::new_random().to_string();
    let pay = ["--json", "--as", "user1@BankA", "pay", "--to", to, "--amount", "10.00", "--id", id.as_str()];
    let first = run_cli(d, &pay, &[]);

    // The victim died at the crash point; bring it back without the fault.
    match victim {
        Victim::Gateway => {
            let code = wait_exit(&mut gateway.child);
            assert_eq!(code, None, "the gateway died by a signal at {point}");
            gateway = start_gateway(d, &gw, FAST);
        }
        Victim::BankA => {
            let code = wait_exit(&mut bank_a.child);
            assert_eq!(code, None, "BankA died by a signal at {point}");
            bank_a = start_bank(d, "BankA", &gw, &refs(&a_env_after));
        }
    }
    wait_registered(d, &["BankA", "BankB"]);
    let audit = wait_audit_ok(d);
    assert_eq!(audit["conserved"], true);

    // The customer asks again with the same id and gets the outcome; money moved at most once.
    let again = run_cli(d, &pay, &[]);
    let status = again.json()["status"].as_str().expect("status").to_owned();
    assert!(status == "committed" || status == "declined", "{again:?}");
    if first.code == 0 || first.code == 3 {
        assert_eq!(first.json()["status"], status.as_str(), "the first answer was already the truth");
    } else {
        assert_eq!(first.code, 4, "the first attempt was queued: {first:?}");
    }
    if first.code == 4 {
        // The first attempt was never answered. If the gateway's record of it
        // did not reach the disk (it is not forced: no record means abort),
        // this retry is its first execution; either way it runs once.
        assert!(again.json()["replayed"].is_boolean(), "{again:?}");
    } else {
        assert_eq!(again.json()["replayed"], true, "{again:?}");
    }
    let balance = |who: &str| run_cli(d, &["--json", "--as", who, "balance"], &[]).json()["balance"].clone();
    let (payer, payee) = if status == "committed" { ("990.00", "2010.00") } else { ("1000.00", "2000.00") };
    assert_eq!(balance("user1@BankA"), payer, "{point}");
    assert_eq!(balance(to), payee, "{point}");
    // The queued first attempt, flushed, agrees too.
    let r = run_cli(d, &["--json", "outbox", "flush"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(balance("user1@BankA"), payer, "flushing the outbox moved nothing more");
    assert_eq!(balance(to), payee, "flushing the outbox moved nothing more");
    drop((gateway, bank_a));
    if status == "committed" { "committed" } else { "declined" }
}

#[test]
fn gateway_crash_after_recording_the_payment_runs_it_at_most_once() {
    // The record is written but not forced before the prepares: after the
    // crash it is either on disk (aborted at restart, so the retry is told
    // "declined") or gone (the retry runs the payment for the first time).
    let outcome = crash_and_recover("gateway.after_begin", Victim::Gateway);
    assert!(outcome == "declined" || outcome == "committed", "{outcome}");
}

#[test]
fn gateway_crash_before_deciding_aborts_and_releases_holds() {
    assert_eq!(crash_and_recover("gateway.before_decision", Victim::Gateway), "declined");
}

#[test]
fn gateway_crash_after_forcing_commit_still_commits() {
    assert_eq!(crash_and_recover("gateway.after_decision", Victim::Gateway), "committed");
}

#[test]
fn gateway_crash_after_sending_commit_still_commits() {
    assert_eq!(crash_and_recover("gateway.after_commit_sent", Victim::Gateway), "committed");
}

#[test]
fn bank_crash_after_voting_yes_aborts_and_releases_the_hold() {
    assert_eq!(crash_and_recover("bank.after_prepare", Victim::BankA), "declined");
}

#[test]
fn bank_crash_before_applying_commit_applies_it_after_restart() {
    assert_eq!(crash_and_recover("bank.before_commit", Victim::BankA), "committed");
}

#[test]
fn bank_crash_after_applying_commit_keeps_it() {
    assert_eq!(crash_and_recover("bank.after_commit", Victim::BankA), "committed");
}

/// One phase: the record is forced before the transfer, so after the crash
/// it is on disk, and the deadline sweep asks BankA, which never saw the
/// transfer and fences it: declined, every time.
#[test]
fn one_phase_gateway_crash_after_recording_the_payment_declines_it() {
    let outcome =
        crash_and_recover_paying("gateway.after_begin", Victim::Gateway, Stores::Sqlite, Payee::SameBank);
    assert_eq!(outcome, "declined");
}

/// BankA dies before its commit: the gateway cannot learn the outcome (the
/// customer's payment is queued); once BankA is back the sweep asks it, and
/// it fences the transfer it never made.
#[test]
fn one_phase_bank_crash_before_its_commit_declines_after_restart() {
    let outcome =
        crash_and_recover_paying("bank.before_transfer", Victim::BankA, Stores::Sqlite, Payee::SameBank);
    assert_eq!(outcome, "declined");
}

/// BankA dies after its forced commit, before answering: the payment is
/// made; the sweep learns it from BankA once it is back.
#[test]
fn one_phase_bank_crash_after_its_commit_keeps_it() {
    let outcome =
        crash_and_recover_paying("bank.after_transfer", Victim::BankA, Stores::Sqlite, Payee::SameBank);
    assert_eq!(outcome, "committed");
}

/// The gateway dies after BankA answered, before recording the outcome: a
/// restart must not abort the payment (BankA committed it); the sweep asks
/// BankA and records its commit.
#[test]
fn one_phase_gateway_crash_before_recording_the_outcome_keeps_it() {
    let outcome =
        crash_and_recover_paying("gateway.before_outcome", Victim::Gateway, Stores::Sqlite, Payee::SameBank);
    assert_eq!(outcome, "committed");
}

/// The same crash points with every store in PostgreSQL. One difference:
/// a restarted gateway aborts nothing at start there (other replicas may be
/// driving what is preparing); the deadline sweep and the banks' inquiries
/// abort what nobody drives.
mod on_postgres {
    use super::*;

    #[test]
    fn gateway_crash_after_recording_the_payment_runs_it_at_most_once() {
        let outcome = crash_and_recover_on("gateway.after_begin", Victim::Gateway, Stores::Postgres);
        assert!(outcome == "declined" || outcome == "committed", "{outcome}");
    }

    #[test]
    fn gateway_crash_before_deciding_aborts_and_releases_holds() {
        assert_eq!(
            crash_and_recover_on("gateway.before_decision", Victim::Gateway, Stores::Postgres),
            "declined"
        );
    }

    #[test]
    fn gateway_crash_after_forcing_commit_still_commits() {
        assert_eq!(
            crash_and_recover_on("gateway.after_decision", Victim::Gateway, Stores::Postgres),
            "committed"
        );
    }

    #[test]
    fn gateway_crash_after_sending_commit_still_commits() {
        assert_eq!(
            crash_and_recover_on("gateway.after_commit_sent", Victim::Gateway, Stores::Postgres),
            "committed"
        );
    }

    #[test]
    fn bank_crash_after_voting_yes_aborts_and_releases_the_hold() {
        assert_eq!(crash_and_recover_on("bank.after_prepare", Victim::BankA, Stores::Postgres), "declined");
    }

    #[test]
    fn bank_crash_before_applying_commit_applies_it_after_restart() {
        assert_eq!(crash_and_recover_on("bank.before_commit", Victim::BankA, Stores::Postgres), "committed");
    }

    #[test]
    fn bank_crash_after_applying_commit_keeps_it() {
        assert_eq!(crash_and_recover_on("bank.after_commit", Victim::BankA, Stores::Postgres), "committed");
    }

    #[test]
    fn one_phase_gateway_crash_after_recording_the_payment_declines_it() {
        let outcome = crash_and_recover_paying(
            "gateway.after_begin",
            Victim::Gateway,
            Stores::Postgres,
            Payee::SameBank,
        );
        assert_eq!(outcome, "declined");
    }

    #[test]
    fn one_phase_bank_crash_before_its_commit_declines_after_restart() {
        let outcome = crash_and_recover_paying(
            "bank.before_transfer",
            Victim::BankA,
            Stores::Postgres,
            Payee::SameBank,
        );
        assert_eq!(outcome, "declined");
    }

    #[test]
    fn one_phase_bank_crash_after_its_commit_keeps_it() {
        let outcome =
            crash_and_recover_paying("bank.after_transfer", Victim::BankA, Stores::Postgres, Payee::SameBank);
        assert_eq!(outcome, "committed");
    }

    #[test]
    fn one_phase_gateway_crash_before_recording_the_outcome_keeps_it() {
        let outcome = crash_and_recover_paying(
            "gateway.before_outcome",
            Victim::Gateway,
            Stores::Postgres,
            Payee::SameBank,
        );
        assert_eq!(outcome, "committed");
    }
}
