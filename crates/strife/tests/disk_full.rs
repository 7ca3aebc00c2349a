//! A server's disk fills up under it: each test puts one server's data
//! directory on a small tmpfs of its own, fills that file system with a
//! file, pays, frees the space, and checks that the failure was said plainly
//! (UNAVAILABLE naming the server and "disk full"; the log names the file)
//! and that nothing was lost or doubled once space is back.
//!
//! Needs root (to mount a tmpfs); without it the tests fail saying so, they
//! never skip: run them as root (`sudo -E cargo test --test disk_full`).

mod common;

use common::http::{http, log_in};
use common::*;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The tmpfs's size: room for a fresh store and its WAL (which grows until
/// the 16 MiB checkpoint, so the test never fills it by itself).
const TMPFS_SIZE: &str = "size=64m";

/// Bytes written at a time while filling the file system.
const FILL_CHUNK: usize = 64 * 1024;

/// A tmpfs mounted on a directory of its own; unmounted (and the directory
/// removed) when dropped, even by a panic. Declare it before the servers
/// that use it, so that they are stopped first.
struct Tmpfs {
    dir: TempDir,
    /// The file that fills it, while it is full.
    filler: Option<PathBuf>,
}

impl Tmpfs {
    fn mount(tag: &str) -> Tmpfs {
        assert!(
            nix::unistd::geteuid().is_root(),
            "the disk-full tests mount a tmpfs and need root: run them as root \
             (`sudo -E cargo test --test disk_full`)"
        );
        let dir = TempDir::new(tag);
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o", TMPFS_SIZE, "strife-test-tmpfs"])
            .arg(&dir.0)
            .output()
            .unwrap_or_else(|e| panic!("cannot run mount (install util-linux: apt-get install mount): {e}"));
        assert!(
            out.status.success(),
            "mount -t tmpfs on {} failed (needs root and a kernel with tmpfs): {}",
            dir.0.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        Tmpfs { dir, filler: None }
    }

    fn path(&self) -> &Path {
        &self.dir.0
    }

    fn path_text(&self) -> String {
        self.dir.0.to_string_lossy().into_owned()
    }

    /// Writes a file until the file system has no room left.
    fn fill(&mut self) {
        let path = self.dir.0.join("filler");
        let mut file = std::fs::File::create(&path).expect("create the filler");
        let chunk = vec![0x5a_u8; FILL_CHUNK];
        let full = loop {
            match file.write_all(&chunk) {
                Ok(()) => continue,
                Err(e) => break e,
            }
        };
        assert_eq!(full.kind(), std::io::ErrorKind::StorageFull, "filling {}: {full}", path.display());
        // A page smaller than a chunk may still be free: take it too.
        while file.write(&[0x5a]).is_ok_and(|n| n == 1) {}
        self.filler = Some(path);
    }

    /// Removes the filler: space is back.
    fn free(&mut self) {
        if let Some(path) = self.filler.take() {
            std::fs::remove_file(&path).expect("remove the filler");
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        // Lazy: a server that outlived the test cannot keep it mounted.
        let out = Command::new("umount").arg("--lazy").arg(&self.dir.0).output();
        if !out.as_ref().is_ok_and(|o| o.status.success()) {
            eprintln!("cannot unmount {}: {out:?}", self.dir.0.display());
        }
    }
}

/// A customer's `balance` in minor units (the money on hold included).
fn balance(dir: &Path, who: &str) -> i64 {
    let r = run_cli(dir, &["--json", "--as", who, "balance"], &[]);
    assert_eq!(r.code, 0, "balance of {who}: {r:?}");
    minor(r.json()["balance"].as_str().expect("balance"))
}

/// The gateway's data directory is full: a payment is answered UNAVAILABLE
/// naming the gateway and "disk full", the CLI keeps it queued (exit 4),
/// the gateway's log names the file; once space is back, `outbox flush`
/// commits it exactly once.
#[test]
fn a_full_disk_at_the_gateway_queues_the_payment_and_it_goes_once_space_is_back() {
    let mut data = Tmpfs::mount("gateway-data");
    let data_dir = data.path_text();
    let mut envs: Vec<(&str, &str)> = FAST.to_vec();
    envs.push(("STRIFE_GATEWAY_DATA_DIR", &data_dir));
    let c = Cluster::start_with(&["BankA", "BankB"], &envs);
    let d = c.path();
    assert!(data.path().join("gateway.db").exists(), "the gateway's store is on the tmpfs");
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let r = c.pay("user1@BankA", "user2@BankB", "1");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let (payer, payee) = (balance(d, "user1@BankA"), balance(d, "user2@BankB"));

    data.fill();
    let r = c.pay("user1@BankA", "user2@BankB", "2");
    let j = r.json();
    assert_eq!((r.code, j["status"].as_str()), (4, Some("queued")), "exit 4, queued: {r:?}");
    assert_eq!(j["reason"], "storage_unavailable", "{r:?}");
    assert_eq!(j["replayed"], false, "{r:?}");
    let id = j["payment_id"].as_str().expect("payment id").to_owned();
    assert!(
        r.stderr.contains("the gateway cannot write its store: disk full"),
        "stderr names the server and the cause: {r:?}"
    );
    let r = c.cli(&["--json", "outbox", "list"]);
    let pending = r.json()["pending"].as_array().cloned().unwrap_or_default();
    assert_eq!(pending.len(), 1, "the payment waits in the outbox: {r:?}");
    assert_eq!(pending[0]["payment_id"], id.as_str(), "{r:?}");
    assert!(pending[0]["last_error"].as_str().is_some_and(|e| e.contains("disk full")), "{r:?}");

    let log = d.join("logs").join("gateway.log");
    let line = wait_for_log_line(&log, "storage failure: disk full");
    assert!(
        line.contains("gateway.db") && line.contains("cause=\"disk_full\""),
        "the log names the file: {line}"
    );
    let text = std::fs::read_to_string(&log).expect("gateway log");
    assert!(!text.contains("Query returned no rows"), "the real error is not lost:\n{text}");
    assert_eq!(balance(d, "user1@BankA"), payer, "nothing moved while the disk was full");

    // Still full: flushing keeps it queued, with the same cause.
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!(r.code, 4, "{r:?}");

    data.free();
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!(r.code, 0, "once space is back the payment goes: {r:?}");
    let results = r.json()["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 1, "{r:?}");
    assert_eq!(
        (results[0]["payment_id"].as_str(), results[0]["status"].as_str()),
        (Some(id.as_str()), Some("committed"))
    );
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!((r.code, r.json()["results"].as_array().map(Vec::len)), (0, Some(0)), "sent once: {r:?}");

    let audit = wait_audit_ok_with(d, &[("STRIFE_GATEWAY_DATA_DIR", &data_dir)]);
    assert_eq!(balance(d, "user1@BankA"), payer - 200, "moved exactly once: {audit}");
    assert_eq!(balance(d, "user2@BankB"), payee + 200, "moved exactly once: {audit}");
    drop(c);
}

/// A bank's data directory is full: its prepare fails, so the payment
/// declines (`bank_unavailable`) with nothing moved; the gateway's log has
/// the bank's own words ("bank BankB cannot write its ledger: disk full").
/// Once space is back the decision lands, the audit agrees, and payments
/// commit again.
#[test]
fn a_full_disk_at_a_bank_declines_the_payment_and_converges_once_space_is_back() {
    let mut data = Tmpfs::mount("bank-data");
    let data_dir = data.path_text();
    let dir = TempDir::new("bank-full");
    let d = &dir.0;
    let r = run_cli(d, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "certs init: {r:?}");
    let gateway = start_gateway(d, "127.0.0.1:0", FAST);
    let bank_a = start_bank(d, "BankA", &gateway.addr, FAST);
    let mut envs: Vec<(&str, &str)> = FAST.to_vec();
    envs.push(("STRIFE_BANK_DATA_DIR", &data_dir));
    let bank_b = start_bank(d, "BankB", &gateway.addr, &envs);
    wait_registered(d, &["BankA", "BankB"]);
    assert!(data.path().join("BankB").join("bank.db").exists(), "BankB's ledger is on the tmpfs");
    for (user, bank, password) in [("user1", "BankA", "pass1"), ("user2", "BankB", "pass2")] {
        let r = run_cli(d, &["login", "--bank", bank, "--user", user], &[("STRIFE_PASSWORD", password)]);
        assert_eq!(r.code, 0, "login {user}@{bank}: {r:?}");
    }
    let pay = |amount: &str| {
        run_cli(d, &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", amount], &[])
    };
    let r = pay("1");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let (payer, payee) = (balance(d, "user1@BankA"), balance(d, "user2@BankB"));

    data.fill();
    let r = pay("2");
    let j = r.json();
    assert_eq!(
        (r.code, j["status"].as_str(), j["reason"].as_str()),
        (3, Some("declined"), Some("bank_unavailable")),
        "{r:?}"
    );
    let gateway_log = d.join("logs").join("gateway.log");
    let line = wait_for_log_line(&gateway_log, "bank BankB cannot write its ledger: disk full");
    assert!(line.contains("prepare failed") && line.contains("Unavailable"), "{line}");
    let bank_log = d.join("logs").join("BankB.log");
    let line = wait_for_log_line(&bank_log, "storage failure: disk full");
    assert!(line.contains("bank.db"), "the bank's log names the file: {line}");
    assert_eq!(balance(d, "user1@BankA"), payer, "nothing moved");
    assert_eq!(balance(d, "user2@BankB"), payee, "nothing moved");
    let r = run_cli(d, &["--json", "outbox", "list"], &[]);
    assert_eq!(
        r.json()["pending"].as_array().map(Vec::len),
        Some(0),
        "a declined payment has its outcome: {r:?}"
    );

    data.free();
    // The audit reads BankA's ledger from DIR and asks BankB for its own.
    wait_audit_ok(d);
    let r = pay("3");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let audit = wait_audit_ok(d);
    assert_eq!(balance(d, "user1@BankA"), payer - 300, "only the last payment moved: {audit}");
    assert_eq!(balance(d, "user2@BankB"), payee + 300, "only the last payment moved: {audit}");
    drop((bank_b, bank_a, gateway));
}

/// A tablespace of the test binary's PostgreSQL server on a tmpfs of its
/// own, holding one database: its tables and indexes fill up with the
/// tmpfs, while the server's write-ahead log stays on the machine's disk
/// (a full `pg_wal` makes PostgreSQL PANIC and restart, which is not a
/// store failure a server can answer). Dropped (database, then tablespace)
/// before the tmpfs is unmounted.
struct FullableDatabase {
    server: &'static strife_rpc::postgres_server::PostgresServer,
    database: String,
    tablespace: String,
    url: strife_core::Secret<String>,
}

impl FullableDatabase {
    fn create(tmpfs: &Tmpfs) -> FullableDatabase {
        use strife_rpc::postgres_server::{SYSTEM_USER, shared_for_tests, unique_name};
        let server = shared_for_tests().unwrap_or_else(|e| panic!("{e}"));
        let location = tmpfs.path().join("tablespace");
        std::fs::create_dir(&location).expect("the tablespace's directory");
        let out = Command::new("chown")
            .arg(format!("{SYSTEM_USER}:{SYSTEM_USER}"))
            .arg(&location)
            .output()
            .expect("chown (apt-get install coreutils)");
        assert!(out.status.success(), "chown: {}", String::from_utf8_lossy(&out.stderr));
        let (database, tablespace) = (unique_name("full"), unique_name("ts"));
        let url = server.create_private_database(&unique_name("role_full"), &database).expect("a database");
        server
            .sql(
                "postgres",
                &[
                    &format!("CREATE TABLESPACE {tablespace} LOCATION '{}'", location.display()),
                    &format!("ALTER DATABASE {database} SET TABLESPACE {tablespace}"),
                ],
            )
            .expect("the database in a tablespace on the tmpfs");
        FullableDatabase { server, database, tablespace, url }
    }
}

impl Drop for FullableDatabase {
    fn drop(&mut self) {
        let dropped = self.server.sql(
            "postgres",
            &[
                &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.database),
                &format!("DROP TABLESPACE IF EXISTS {}", self.tablespace),
            ],
        );
        if let Err(e) = dropped {
            eprintln!("cannot drop the test's database and tablespace: {e:#}");
        }
    }
}

/// The gateway's PostgreSQL database is on a file system that fills up
/// (`disk_full`, SQLSTATE 53100, as PostgreSQL says it when a table or an
/// index cannot grow): a payment is answered UNAVAILABLE naming the gateway
/// and "disk full", the CLI keeps it queued (exit 4), the log names the
/// cause and the metric counts it, and the dashboard's alarm shows it; once
/// space is back, `outbox flush` settles it exactly once and the audit is
/// clean.
#[test]
fn a_full_disk_under_the_gateway_s_postgres_queues_the_payment_and_it_settles_once_space_is_back() {
    let mut data = Tmpfs::mount("gateway-pg");
    let database = FullableDatabase::create(&data);
    let store_env = [("STRIFE_GATEWAY_STORE", database.url.expose().as_str())];
    let mut envs: Vec<(&str, &str)> = FAST.to_vec();
    envs.extend_from_slice(&store_env);
    let c = Cluster::start_with(&["BankA", "BankB"], &envs);
    let d = c.path();
    let metrics = printed_address(&c.gateway, "strife: gateway metrics listening on ");
    let admin = printed_address(&c.gateway, "strife: gateway admin listening on ");
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let r = c.pay("user1@BankA", "user2@BankB", "1");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let payer = balance(d, "user1@BankA");

    // Full: pages with room left still take rows, so pay until the store refuses one.
    data.fill();
    let mut committed = 0;
    let queued = loop {
        let r = c.pay("user1@BankA", "user2@BankB", "1");
        match r.code {
            0 => committed += 1,
            4 => break r,
            _ => panic!("a payment on a full disk is either committed or queued: {r:?}"),
        }
        assert!(committed < 500, "the store never filled up");
    };
    let j = queued.json();
    assert_eq!(
        (j["status"].as_str(), j["reason"].as_str()),
        (Some("queued"), Some("storage_unavailable")),
        "{queued:?}"
    );
    assert!(
        queued.stderr.contains("the gateway cannot write its store: disk full"),
        "stderr names the server and the cause: {queued:?}"
    );
    let id = j["payment_id"].as_str().expect("payment id").to_owned();
    let r = c.cli(&["--json", "outbox", "list"]);
    let pending = r.json()["pending"].as_array().cloned().unwrap_or_default();
    assert_eq!(pending.len(), 1, "the payment waits in the outbox: {r:?}");
    assert_eq!(pending[0]["payment_id"], id.as_str(), "{r:?}");
    let log = d.join("logs").join("gateway.log");
    let line = wait_for_log_line(&log, "storage failure: disk full");
    assert!(line.contains("cause=\"disk_full\"") && line.contains("No space left on device"), "{line}");
    let (_, _, text) = http(&metrics, "GET", "/metrics", &[], "");
    let full = text.lines().find_map(|l| l.strip_prefix("strife_store_failures_total{cause=\"disk_full\"} "));
    assert!(full.and_then(|n| n.parse::<f64>().ok()).is_some_and(|n| n >= 1.0), "counted:\n{text}");
    let r = c.cli(&["admin", "url", "--admin", &admin]);
    let cookie = log_in(r.stdout.trim());
    let (status, _, body) = http(&admin, "GET", "/api/overview", &[("Cookie", &cookie)], "");
    assert_eq!(status, 200, "{body}");
    let overview: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    let alarmed = overview["alarms"].as_array().is_some_and(|l| l.iter().any(|a| a["code"] == "storage"));
    assert!(alarmed, "the dashboard's alarm: {overview:#}");

    data.free();
    let r = c.cli(&["--json", "outbox", "flush"]);
    let results = r.json()["results"].as_array().cloned().unwrap_or_default();
    assert_eq!(results.len(), 1, "{r:?}");
    assert_eq!(results[0]["payment_id"], id.as_str(), "{r:?}");
    // It was refused at its begin (it runs now) or at its decision (then
    // presumed abort: declined); either way once.
    let settled = results[0]["status"].as_str().expect("status").to_owned();
    assert!(["committed", "declined"].contains(&settled.as_str()), "{r:?}");
    eprintln!(
        "on the full disk: {committed} payment(s) committed before one was refused; it settled as {settled}"
    );
    if settled == "committed" {
        committed += 1;
    }
    let r = c.cli(&["--json", "outbox", "flush"]);
    assert_eq!((r.code, r.json()["results"].as_array().map(Vec::len)), (0, Some(0)), "sent once: {r:?}");
    let audit = wait_audit_ok_with(d, &store_env);
    assert_eq!(balance(d, "user1@BankA"), payer - 100 * committed, "each payment moved once: {audit}");
    let r = c.pay("user1@BankA", "user2@BankB", "1");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "payments go on: {r:?}");
    drop(c);
    drop(database);
}
