//! A server's disk fills up under it: each test puts one server's data
//! directory on a small tmpfs of its own, fills that file system with a
//! file, pays, frees the space, and checks that the failure was said plainly
//! (UNAVAILABLE naming the server and "disk full"; the log names the file)
//! and that nothing was lost or doubled once space is back.
//!
//! Needs root (to mount a tmpfs); without it the tests fail saying so, they
//! never skip: run them as root (`sudo -E cargo test --test disk_full`).

mod common;

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
