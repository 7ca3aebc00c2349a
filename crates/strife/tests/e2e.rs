//! End to end, as a person meets Strife: `strife up`, the README's
//! walk-through, payments across and within banks, and restarts.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[test]
fn walkthrough_through_strife_up() {
    let dir = TempDir::new("up");
    let (up, ready, _lines) = spawn_until(&dir.0, &["up", "--port", "0"], "strife: ready", &[]);
    let mut up = Up(up);
    assert!(ready.contains("banks=BankA,BankB"), "{ready}");
    let gateway =
        ready.split_whitespace().find_map(|w| w.strip_prefix("gateway=")).expect("gateway=").to_owned();
    assert!(gateway.starts_with("127.0.0.1:"), "{ready}");
    let d = &dir.0;

    let r = run_cli(d, &["login", "--bank", "BankA", "--user", "user1"], &[("STRIFE_PASSWORD", "pass1")]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stdout.contains("Logged in as user1@BankA"), "{r:?}");
    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!(r.json()["balance"], "1000.00");
    assert_eq!(r.json()["available"], "1000.00");

    // One `up` per directory: a second is refused, and leaves this one's
    // files alone.
    let mut second = std::process::Command::new(BIN)
        .arg("--dir")
        .arg(d)
        .args(["up", "--port", "0"])
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("a second up");
    let deadline = Instant::now() + Duration::from_secs(30);
    let code = loop {
        if let Some(status) = second.try_wait().expect("wait") {
            break status.code();
        }
        if Instant::now() > deadline {
            let _ = second.kill();
            let _ = second.wait();
            panic!("a second up on a running directory did not stop by itself");
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut second.stderr.take().expect("stderr"), &mut stderr).expect("stderr");
    assert_ne!(code, Some(0), "{stderr}");
    assert!(stderr.contains("another `strife up` is running on"), "{stderr}");
    assert!(d.join("instances.json").exists(), "the running cluster's roster stays");
    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!(r.json()["balance"], "1000.00", "{r:?}");

    let r = run_cli(d, &["--json", "pay", "--to", "user2@BankB", "--amount", "12.50"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let pay = r.json();
    assert_eq!(pay["status"], "committed");
    assert_eq!(pay["reason"], serde_json::Value::Null);
    assert_eq!(pay["replayed"], false);
    let id = pay["payment_id"].as_str().expect("id").to_owned();

    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!((r.json()["balance"].as_str(), r.json()["user"].as_str()), (Some("987.50"), Some("user1")));
    let r = run_cli(d, &["--json", "history"], &[]);
    let h = r.json();
    assert_eq!(h["payments"][0]["payment_id"], id.as_str());
    assert_eq!(h["payments"][0]["direction"], "sent");
    assert_eq!(h["payments"][0]["counterparty"], "user2@BankB");
    assert_eq!(h["payments"][0]["amount"], "12.50");
    assert_eq!(h["payments"][0]["status"], "committed");

    let r = run_cli(
        d,
        &["--json", "login", "--bank", "BankB", "--user", "user2"],
        &[("STRIFE_PASSWORD", "pass2")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(r.json()["user"], "user2");
    assert!(r.json()["expires_at"].as_str().is_some_and(|s| s.ends_with('Z')));
    let r = run_cli(d, &["--json", "--as", "user2@BankB", "balance"], &[]);
    assert_eq!(r.json()["balance"], "2012.50");
    let r = run_cli(d, &["--json", "--as", "user2@BankB", "history"], &[]);
    let h = r.json();
    assert_eq!(h["payments"][0]["direction"], "received");
    assert_eq!(h["payments"][0]["counterparty"], "user1@BankA");
    // The first session is still there, side by side.
    let r = run_cli(d, &["--json", "--as", "user1@BankA", "balance"], &[]);
    assert_eq!(r.json()["balance"], "987.50");

    // Logs name calls but never the password or the token.
    let logs = std::fs::read_to_string(d.join("logs/gateway.log")).expect("gateway.log");
    assert!(logs.contains("/strife.gateway.v1.PaymentsService/Pay"), "the call log records calls");
    assert!(!logs.contains("pass1") && !logs.contains("pass2"));

    // Ctrl-C stops the whole cluster gracefully.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(up.id() as i32), nix::sys::signal::Signal::SIGINT)
        .expect("signal");
    assert_eq!(wait_exit(&mut up), Some(0));
    let r = run_cli(d, &["balance"], &[]);
    assert_eq!(r.code, 1, "the gateway is down after up stopped: {r:?}");

    // A second `up` on the same directory resumes the data. It also drops
    // the DIR/etcd.url that an `up --etcd` killed with SIGKILL leaves, so
    // clients do not look for that etcd (and say so) on every command.
    std::fs::write(d.join("etcd.url"), "etcd://127.0.0.1:9\n").expect("etcd.url");
    let (up, _ready, _lines) = spawn_until(&dir.0, &["up", "--port", "0"], "strife: ready", &[]);
    let mut up = Up(up);
    assert!(!d.join("etcd.url").exists(), "a plain up removes a stale etcd.url");
    let r = run_cli(d, &["--json", "--as", "user1@BankA", "balance"], &[]);
    assert_eq!(r.json()["balance"], "987.50", "{r:?}");
    assert!(r.stderr.is_empty(), "{r:?}");
    assert_eq!(terminate(&mut up), Some(0));
}

#[test]
fn same_bank_and_cross_bank_payments_conserve_money() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user3", "BankA");
    c.login("user2", "BankB");
    let r = c.pay("user1@BankA", "user3@BankA", "100");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let r = c.pay("user2@BankB", "user1@BankA", "0.05");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    assert_eq!(c.balance("user1@BankA"), (90_005, 90_005));
    assert_eq!(c.balance("user3@BankA"), (310_000, 310_000));
    assert_eq!(c.balance("user2@BankB"), (199_995, 199_995));
    // Paying user1 at the other bank is another account: allowed.
    c.login("user1", "BankB");
    let r = c.pay("user1@BankA", "user1@BankB", "5");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.balance("user1@BankB"), (100_500, 100_500));
}

/// A payment within a bank that the gateway knows to be down is declined
/// `bank_unavailable` and moves nothing, as a payment across banks is: one
/// phase (where only the bank may decide) is used only while a replica of
/// the bank is live. Once the bank is back, the same id is refused with the
/// same outcome and the next payment runs.
#[test]
fn a_payment_within_a_bank_that_is_down_is_declined_and_moves_nothing() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user3", "BankA");
    let before = (c.balance("user1@BankA"), c.balance("user3@BankA"));
    let a = c.bank_index("BankA");
    c.banks[a].stop();
    let deadline = Instant::now() + Duration::from_secs(30);
    while common::bank_replicas(c.path(), &c.gateway.addr, "BankA").iter().any(|(_, live)| *live) {
        assert!(Instant::now() < deadline, "the gateway never saw BankA down");
        std::thread::sleep(Duration::from_millis(100));
    }
    let id = "0192e3a4-5b6c-7d8e-9f01-23456789abcd";
    let pay = |c: &Cluster| {
        c.cli(&["--json", "--as", "user1@BankA", "pay", "--to", "user3@BankA", "--amount", "10", "--id", id])
    };
    let r = pay(&c);
    assert_eq!(r.code, 3, "declined, not queued: {r:?}");
    assert_eq!(
        (r.json()["status"].as_str(), r.json()["reason"].as_str()),
        (Some("declined"), Some("bank_unavailable"))
    );
    c.banks[a] = common::start_bank(c.path(), "BankA", &c.gateway.addr, &[]);
    c.wait_registered();
    assert_eq!((c.balance("user1@BankA"), c.balance("user3@BankA")), before, "nothing moved");
    let r = pay(&c);
    assert_eq!(
        (r.code, r.json()["status"].as_str(), r.json()["replayed"].as_bool()),
        (3, Some("declined"), Some(true)),
        "{r:?}"
    );
    let r = c.pay("user1@BankA", "user3@BankA", "10");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    common::wait_audit_ok(c.path());
}

#[test]
fn a_payment_above_the_balance_is_declined_and_moves_nothing() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let r = c.pay("user1@BankA", "user2@BankB", "1000.01");
    assert_eq!(r.code, 3, "{r:?}");
    assert_eq!(r.json()["status"], "declined");
    assert_eq!(r.json()["reason"], "insufficient_funds");
    assert_eq!(c.balance("user1@BankA"), (100_000, 100_000));
    assert_eq!(c.balance("user2@BankB"), (200_000, 200_000));
    // Human output says what happened, on stdout, with the same exit code.
    let r = c.cli(&["--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "5000"]);
    assert_eq!(r.code, 3);
    assert!(r.stdout.contains("insufficient_funds") && r.stdout.contains("Nothing moved"), "{r:?}");
    // The exact balance is payable.
    let r = c.pay("user1@BankA", "user2@BankB", "1000.00");
    assert_eq!(r.code, 0, "{r:?}");
    assert_eq!(c.balance("user1@BankA"), (0, 0));
}

#[test]
fn concurrent_payments_never_overdraw() {
    let c = Cluster::start(&["BankA", "BankB"]);
    let rt = grpc::runtime();
    let addr = c.gateway.addr.clone();
    let dir = c.path().to_path_buf();
    let (committed, declined) = rt.block_on(async move {
        let ch = grpc::client_channel(&dir, &addr).await;
        let token = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let mut tasks = Vec::new();
        // 40 payments of 70.00 from an account of 1000.00: at most 14 fit.
        for i in 0..40 {
            let (ch, token) = (ch.clone(), token.clone());
            let (user, bank) = if i % 2 == 0 { ("user2", "BankB") } else { ("user3", "BankA") };
            tasks.push(tokio::spawn(async move {
                grpc::pay(&ch, &token, &grpc::new_id(), user, bank, "70.00").await.expect("pay").status
            }));
        }
        let mut committed = 0;
        let mut declined = 0;
        for t in tasks {
            match t.await.expect("task") {
                1 => committed += 1,
                2 => declined += 1,
                other => panic!("status {other}"),
            }
        }
        (committed, declined)
    });
    assert_eq!(committed + declined, 40);
    assert_eq!(committed, 14, "exactly as many as the balance allows");
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    c.login("user3", "BankA");
    let (b1, a1) = c.balance("user1@BankA");
    assert_eq!((b1, a1), (100_000 - 14 * 7_000, 100_000 - 14 * 7_000), "no hold left, no overdraft");
    let total = b1 + c.balance("user2@BankB").0 + c.balance("user3@BankA").0;
    assert_eq!(total, 100_000 + 200_000 + 300_000, "money is conserved");
}

#[test]
fn restarting_every_process_keeps_balances_and_histories() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let r = c.pay("user1@BankA", "user2@BankB", "12.50");
    assert_eq!(r.code, 0, "{r:?}");
    let declined = c.pay("user1@BankA", "user2@BankB", "99999");
    assert_eq!(declined.code, 3);
    let history_before = c.cli(&["--json", "--as", "user1@BankA", "history"]).json();

    // Stop everything: banks by kill -9, the gateway gracefully.
    for b in c.banks.iter_mut() {
        b.kill9();
    }
    c.gateway.stop();
    let addr = c.gateway.addr.clone();
    c.gateway = start_gateway(c.path(), &addr, &[]);
    let gw = c.gateway.addr.clone();
    let names = c.bank_names.clone();
    c.banks = names.iter().map(|n| start_bank(c.path(), n, &gw, &[])).collect();
    c.wait_registered();

    assert_eq!(c.balance("user1@BankA"), (98_750, 98_750));
    assert_eq!(c.balance("user2@BankB"), (201_250, 201_250));
    let history_after = c.cli(&["--json", "--as", "user1@BankA", "history"]).json();
    assert_eq!(history_before, history_after);
    assert_eq!(history_after["payments"].as_array().map(Vec::len), Some(2));
    // Replaying the first payment's id after the restarts: same outcome, no new money movement.
    let id = history_after["payments"][1]["payment_id"].as_str().expect("id").to_owned();
    let r = c.cli(&[
        "--json",
        "--as",
        "user1@BankA",
        "pay",
        "--to",
        "user2@BankB",
        "--amount",
        "12.50",
        "--id",
        &id,
    ]);
    assert_eq!((r.code, r.json()["replayed"].as_bool()), (0, Some(true)), "{r:?}");
    assert_eq!(c.balance("user1@BankA"), (98_750, 98_750));
}

#[test]
fn the_shell_covers_every_action() {
    let c = Cluster::start(&["BankA", "BankB"]);
    let script = "1\nBankA\nuser1\npass1\n2\n3\nuser2@BankB\n1.25\n4\n5\n7\nuser2@BankB\n2\n9\n0\n";
    let mut child = std::process::Command::new(BIN)
        .arg("--dir")
        .arg(c.path())
        .arg("shell")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("shell");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write");
    let deadline = std::time::Instant::now() + WAIT;
    while child.try_wait().expect("wait").is_none() {
        assert!(std::time::Instant::now() < deadline, "shell did not finish");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("Logged in as user1@BankA"), "{text}");
    assert!(text.contains("balance 1000.00"), "{text}");
    assert!(text.contains("Paid 1.25 to user2@BankB"), "{text}");
    assert!(text.contains("sent to"), "{text}");
    assert!(text.contains("The outbox is empty"), "{text}");
    assert!(text.contains("first  send: committed (replayed: false)"), "{text}");
    assert!(text.contains("second send: committed (replayed: true)"), "{text}");
    assert!(text.contains("balance 998.75 -> 996.75: 2.00 moved, once."), "unquoted amounts: {text}");
    assert!(text.contains("Logged out user1@BankA"), "{text}");
    c.login("user2", "BankB");
    assert_eq!(c.balance("user2@BankB").0, 200_000 + 125 + 200);
}

/// Runs `strife shell` with `script` on standard input; its stdout.
fn run_shell(dir: &std::path::Path, script: &str) -> String {
    let mut child = std::process::Command::new(BIN)
        .arg("--dir")
        .arg(dir)
        .arg("shell")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("shell");
    use std::io::Write;
    child.stdin.take().expect("stdin").write_all(script.as_bytes()).expect("write");
    let out = child.wait_with_output().expect("output");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{text}");
    text
}

#[test]
fn the_shell_lists_sessions_and_never_switches_to_one_not_logged_in() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    // user2@BankB is the most recent login; the shell acts for it, then
    // switches to user1@BankA by number, then fails to switch to user3.
    c.login("user2", "BankB");
    let text = run_shell(c.path(), "8\n2\n8\nuser3@BankA\n2\n8\nnope\n8\n9\n0\n");
    let sessions = text.find("Sessions (most recent login first):").expect("the menu lists the sessions");
    let listed = &text[sessions..];
    let (first, second) =
        (listed.find("1) user2@BankB").expect("1"), listed.find("2) user1@BankA").expect("2"));
    assert!(first < second, "{text}");
    assert!(
        listed.lines().nth(1).is_some_and(|l| l.contains("until 20") && l.contains("(current)")),
        "{text}"
    );
    assert!(text.contains("Now acting as user1@BankA."), "{text}");
    assert!(
        text.contains(
            "error: user3@BankA is not logged in here (log in with 1); still acting as user1@BankA."
        ),
        "{text}"
    );
    // The balance after the failed switch is user1's (1000.00, no quotes),
    // never the most recent login's.
    let after = &text[text.find("still acting as user1@BankA").expect("failed switch")..];
    assert!(after.contains("user1@BankA: balance 1000.00, available 1000.00"), "{text}");
    assert!(!after.contains("user2@BankB: balance"), "{text}");
    assert!(text.contains("error: 9 is not on the list; still acting as user1@BankA."), "{text}");
    assert_eq!(text.matches("still acting as user1@BankA.").count(), 3, "nope, 9 and user3: {text}");
}

#[test]
fn commands_that_only_read_create_nothing_outside_a_strife_directory() {
    let place = TempDir::new("nowhere");
    let cwd = place.0.join("sub");
    std::fs::create_dir_all(&cwd).expect("cwd");
    assert!(
        cwd.ancestors().all(|a| !a.join(".strife").exists()),
        "the test needs a place with no .strife above it: {}",
        cwd.display()
    );
    let run = |args: &[&str]| {
        let out = std::process::Command::new(BIN)
            .current_dir(&cwd)
            .args(args)
            .env_remove("STRIFE_DIR")
            .env_remove("STRIFE_GATEWAY")
            .env_remove("STRIFE_PASSWORD")
            .stdin(std::process::Stdio::null())
            .output()
            .expect("strife");
        Run {
            code: out.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        }
    };
    let id = strife_core::PaymentId::new_random().to_string();
    let cases: [(&[&str], i32); 11] = [
        (&["balance"], 5),
        (&["history"], 5),
        (&["payment", "--id", &id], 5),
        (&["logout"], 5),
        (&["pay", "--to", "user2@BankB", "--amount", "1"], 5),
        (&["outbox"], 1),
        (&["outbox", "list"], 1),
        (&["outbox", "flush"], 1),
        (&["status"], 1),
        (&["audit"], 1),
        (&["--dir", "elsewhere", "balance"], 5),
    ];
    for (args, code) in cases {
        let r = run(args);
        assert_eq!(r.code, code, "{args:?}: {r:?}");
        assert!(r.stderr.contains("no Strife directory"), "{args:?}: {r:?}");
        let mut json = vec!["--json"];
        json.extend_from_slice(args);
        let r = run(&json);
        assert_eq!(r.code, code, "the same exit with --json: {args:?}: {r:?}");
        assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("no Strife directory")), "{r:?}");
    }
    // A login that cannot reach a cluster creates nothing either.
    let r = run(&["login", "--bank", "BankA", "--user", "user1", "--password-stdin"]);
    assert_eq!(r.code, 1, "{r:?}");
    let created: Vec<_> = std::fs::read_dir(&place.0)
        .expect("read")
        .chain(std::fs::read_dir(&cwd).expect("read"))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| *p != cwd)
        .collect();
    assert!(created.is_empty(), "nothing is created: {created:?}");
}

#[test]
fn every_file_is_0600_and_every_directory_0700_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt;
    let place = TempDir::new("modes");
    let dir = place.0.join("cluster");
    // `strife up` started the way a shell with the usual umask starts it.
    let mut cmd = std::process::Command::new("sh");
    cmd.args(["-c", "umask 022 && exec \"$0\" \"$@\""])
        .arg(BIN)
        .arg("--dir")
        .arg(&dir)
        .args(["up", "--port", "0"]);
    let (up, _ready, _lines) = spawn_command_until(cmd, &place.0, "strife: ready");
    let mut up = Up(up);
    let r = run_cli(&dir, &["login", "--bank", "BankA", "--user", "user1"], &[("STRIFE_PASSWORD", "pass1")]);
    assert_eq!(r.code, 0, "{r:?}");
    let r = run_cli(&dir, &["pay", "--to", "user2@BankB", "--amount", "1"], &[]);
    assert_eq!(r.code, 0, "{r:?}");

    let mut seen = Vec::new();
    let mut stack = vec![dir.clone()];
    while let Some(path) = stack.pop() {
        let meta = std::fs::metadata(&path).expect("metadata");
        let mode = meta.permissions().mode() & 0o777;
        if meta.is_dir() {
            assert_eq!(mode, 0o700, "{}", path.display());
            stack.extend(std::fs::read_dir(&path).expect("read").filter_map(Result::ok).map(|e| e.path()));
        } else {
            assert_eq!(mode, 0o600, "{}", path.display());
        }
        seen.push(path.strip_prefix(&dir).expect("under DIR").to_string_lossy().into_owned());
    }
    for expected in [
        "certs",
        "certs/ca.key",
        "logs",
        "logs/gateway.log",
        "logs/BankA.log",
        "gateway",
        "gateway/gateway.db",
        "gateway/gateway.db-wal",
        "gateway/gateway.db-shm",
        "banks",
        "banks/BankB",
        "banks/BankB/bank.db",
        "banks/BankB/bank.db-wal",
        "client.db",
    ] {
        assert!(seen.iter().any(|s| s == expected), "{expected} was checked: {seen:?}");
    }
    assert_eq!(terminate(&mut up), Some(0));
}

#[test]
fn history_pages_through_every_payment_once_and_received_payments_are_found() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let mut ids = Vec::new();
    for n in 1..=7 {
        let r = c.pay("user1@BankA", "user2@BankB", &format!("{n}.00"));
        assert_eq!(r.code, 0, "{r:?}");
        ids.push(r.json()["payment_id"].as_str().expect("id").to_owned());
    }
    let r = c.pay("user2@BankB", "user1@BankA", "0.50");
    assert_eq!(r.code, 0, "{r:?}");
    ids.push(r.json()["payment_id"].as_str().expect("id").to_owned());
    let newest_first: Vec<String> = ids.iter().rev().cloned().collect();
    let page_ids = |j: &serde_json::Value| -> Vec<String> {
        j["payments"]
            .as_array()
            .expect("payments")
            .iter()
            .map(|p| p["payment_id"].as_str().expect("id").to_owned())
            .collect()
    };

    // Page by page with the token.
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    loop {
        let mut args = vec!["--json", "--as", "user1@BankA", "history", "--limit", "3"];
        if let Some(t) = &token {
            args.extend(["--page-token", t.as_str()]);
        }
        let r = c.cli(&args);
        assert_eq!(r.code, 0, "{r:?}");
        let j = r.json();
        let page = page_ids(&j);
        assert!(page.len() <= 3, "{j}");
        seen.extend(page);
        match j["next_page_token"].as_str() {
            Some(t) => token = Some(t.to_owned()),
            None => break,
        }
        // A payment arriving between pages shifts nothing.
        if seen.len() == 3 {
            let r = c.pay("user1@BankA", "user2@BankB", "0.01");
            assert_eq!(r.code, 0, "{r:?}");
        }
    }
    assert_eq!(seen, newest_first, "every payment once, newest first");

    // --all follows the pages to the end (now with the payment made meanwhile).
    let r = c.cli(&["--json", "--as", "user1@BankA", "history", "--all", "--limit", "2"]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(page_ids(&j).len(), ids.len() + 1, "{j}");
    assert!(j["next_page_token"].is_null(), "{j}");
    let received = &j["payments"].as_array().expect("payments")[1];
    assert_eq!(
        (received["direction"].as_str(), received["counterparty"].as_str()),
        (Some("received"), Some("user2@BankB"))
    );

    // A token that is not the gateway's is invalid input.
    let r = c.cli(&["--as", "user1@BankA", "history", "--page-token", "p1.00"]);
    assert_eq!(r.code, 6, "{r:?}");

    // The payee finds a payment it received by id.
    let r = c.cli(&["--json", "--as", "user2@BankB", "payment", "--id", &ids[0]]);
    assert_eq!(r.code, 0, "{r:?}");
    let j = r.json();
    assert_eq!(
        (j["direction"].as_str(), j["counterparty"].as_str(), j["amount"].as_str()),
        (Some("received"), Some("user1@BankA"), Some("1.00")),
        "{j}"
    );
}

#[test]
fn a_list_of_gateways_is_served_by_whichever_answers() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let live = c.gateway.addr.clone();
    // Port 1 on loopback refuses connections: a dead replica.
    let list = format!("127.0.0.1:1, {live}");
    for _ in 0..4 {
        let r = c.cli(&["--json", "--as", "user1@BankA", "--gateway", &list, "balance"]);
        assert_eq!((r.code, r.json()["balance"].as_str()), (0, Some("1000.00")), "{r:?}");
    }
    let r = c.cli_env(
        &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "1"],
        &[("STRIFE_GATEWAY", &format!("{live},127.0.0.1:1"))],
    );
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    // None answers: the payment is queued, and the message names each.
    let r = c.cli(&[
        "--as",
        "user1@BankA",
        "--gateway",
        "127.0.0.1:1,127.0.0.1:2",
        "pay",
        "--to",
        "user2@BankB",
        "--amount",
        "1",
    ]);
    assert_eq!(r.code, 4, "{r:?}");
    assert!(r.stdout.contains("127.0.0.1:1") && r.stdout.contains("127.0.0.1:2"), "{r:?}");
    let r = c.cli(&["--as", "user1@BankA", "--gateway", " , ", "balance"]);
    assert_ne!(r.code, 0, "{r:?}");
}

/// A bank uses the gateways of one cluster only. Given two independent
/// gateways (each its own SQLite payment log, so each would presume abort
/// for the other's payments), it registers with the first it reaches (a
/// dead address before it in the list does not stop it), says once in its
/// log that the other is not used, and the other does not have it.
#[test]
fn a_bank_uses_the_gateways_of_one_cluster_only() {
    let dir = TempDir::new("two-clusters");
    let r = run_cli(&dir.0, &["certs", "init", "--bank", "BankA"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let data = |n: &str| dir.0.join(n).to_string_lossy().into_owned();
    let (data1, data2) = (data("gateway-1"), data("gateway-2"));
    let g1 = start_gateway(&dir.0, "127.0.0.1:0", &[("STRIFE_GATEWAY_DATA_DIR", &data1)]);
    // At debug, the gateway logs every registration call with its status.
    let (g2, g2_log) = start_gateway_logged(
        &dir.0,
        "127.0.0.1:0",
        &[("STRIFE_GATEWAY_DATA_DIR", &data2), ("STRIFE_LOG_LEVEL", "debug")],
    );
    // Port 1 on loopback refuses connections: a gateway that is down.
    let list = format!("127.0.0.1:1,{},{}", g1.addr, g2.addr);
    let (bank, log) = start_bank_logged(&dir.0, "BankA", &list, &[]);
    let refusal = format!("gateway {} belongs to another cluster; it is not used", g2.addr);
    let line = wait_for_log_line(&log, &refusal);
    assert!(line.contains("ERROR"), "{line}");
    let deadline = std::time::Instant::now() + WAIT;
    while bank_replicas(&dir.0, &g1.addr, "BankA") != [(bank.addr.clone(), true)] {
        assert!(std::time::Instant::now() < deadline, "BankA never registered at {}", g1.addr);
        std::thread::sleep(std::time::Duration::from_millis(50));
    }
    assert_eq!(bank_replicas(&dir.0, &g2.addr, "BankA"), [], "the other cluster's gateway does not have it");
    let login = |gateway: &str| {
        run_cli(
            &dir.0,
            &["--json", "--gateway", gateway, "login", "--bank", "BankA", "--user", "user1"],
            &[("STRIFE_PASSWORD", "pass1")],
        )
    };
    let r = login(&g1.addr);
    assert_eq!(r.code, 0, "a login at {} reaches the bank: {r:?}", g1.addr);
    let r = login(&g2.addr);
    assert_eq!(
        (r.code, r.json()["reason"].as_str()),
        (6, Some("UNKNOWN_BANK")),
        "no BankA at {}: {r:?}",
        g2.addr
    );
    // The bank keeps knocking (the other gateway refuses it each time, for
    // naming another cluster), but says so once, and is never taken there.
    wait_for_log_lines(&g2_log, &["RegisterBank", "FAILED_PRECONDITION"], 3);
    assert_eq!(bank_replicas(&dir.0, &g2.addr, "BankA"), []);
    let g2_text = std::fs::read_to_string(&g2_log).expect("log");
    assert!(
        !g2_text.lines().any(|l| l.contains("RegisterBank") && l.contains("status=\"OK\"")),
        "not even for a moment: the bank tried the gateways one at a time until one answered\n{g2_text}"
    );
    let text = std::fs::read_to_string(&log).expect("log");
    assert_eq!(text.matches(&refusal).count(), 1, "{text}");
}

/// Two processes of BankA on ledgers of their own (a second started by
/// mistake on another SQLite file, under the same certificate) are not
/// replicas: the gateway refuses the second while the first is live, and
/// every payment goes to the first's ledger. Once the first is gone, the
/// second is taken (the bank moved to a new ledger).
#[test]
fn a_second_bank_process_on_another_ledger_is_refused_while_the_first_is_live() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user1", "BankB");
    let first = c.banks[c.bank_index("BankA")].addr.clone();
    let elsewhere = c.path().join("elsewhere");
    let elsewhere_text = elsewhere.to_string_lossy().into_owned();
    let (second, log) =
        start_bank_logged(c.path(), "BankA", &c.gateway.addr, &[("STRIFE_BANK_DATA_DIR", &elsewhere_text)]);
    let line = wait_for_log_line(&log, "ALREADY_EXISTS");
    assert!(line.contains("ERROR"), "{line}");
    assert!(line.contains(&format!("bank BankA is already served from {first} by another ledger")), "{line}");
    assert!(line.contains("replicas of a bank must share one ledger"), "{line}");
    assert_eq!(bank_replicas(c.path(), &c.gateway.addr, "BankA"), [(first.clone(), true)]);

    for _ in 0..5 {
        let r = c.pay("user1@BankA", "user1@BankB", "1.00");
        assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
        let r = c.pay("user1@BankB", "user1@BankA", "0.50");
        assert_eq!(r.code, 0, "{r:?}");
    }
    assert_eq!(c.balance("user1@BankA"), (100_000 - 250, 100_000 - 250), "the first ledger moved the money");
    let second_ledger =
        rusqlite::Connection::open(elsewhere.join("BankA/bank.db")).expect("the second's ledger");
    let untouched: (i64, i64) = second_ledger
        .query_row(
            "SELECT balance_minor, (SELECT COUNT(*) FROM legs) FROM accounts WHERE user = 'user1'",
            [],
            |r| Ok((r.get(0)?, r.get(1)?)),
        )
        .expect("user1");
    assert_eq!(untouched, (100_000, 0), "the second ledger saw no payment");
    wait_audit_ok(c.path());

    // The first stops: once it is stale, the second is BankA.
    let index = c.bank_index("BankA");
    assert_eq!(c.banks[index].stop(), Some(0));
    wait_for_log_line(&log, "registered with the gateway");
    assert_eq!(bank_replicas(c.path(), &c.gateway.addr, "BankA"), [(second.addr.clone(), true)]);
    assert_eq!(c.balance("user1@BankA"), (100_000, 100_000), "the bank now answers from its new ledger");
}

/// The audit is only worth its exit 0 if it fails on every kind of
/// disagreement: each tampering below must be named.
#[test]
fn the_audit_names_every_disagreement() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let mut committed = Vec::new();
    for n in 1..=40 {
        let r = c.pay("user1@BankA", "user2@BankB", &format!("{n}.00"));
        assert_eq!(r.code, 0, "{r:?}");
        committed.push(r.json()["payment_id"].as_str().expect("id").to_owned());
    }
    let r = c.pay("user1@BankA", "user2@BankB", "5000");
    assert_eq!(r.code, 3, "{r:?}");
    let declined = r.json()["payment_id"].as_str().expect("id").to_owned();
    let audit = wait_audit_ok(c.path());
    assert_eq!((audit["payments"].as_u64(), audit["committed"].as_u64()), (Some(41), Some(40)), "{audit}");
    assert_eq!(audit["banks"][1]["legs"].as_u64(), Some(41), "every leg read, over several pages: {audit}");
    for bank in &mut c.banks {
        assert_eq!(bank.stop(), Some(0));
    }
    assert_eq!(c.gateway.stop(), Some(0));

    let bank_b = rusqlite::Connection::open(c.path().join("banks/BankB/bank.db")).expect("BankB's ledger");
    let bank_a = rusqlite::Connection::open(c.path().join("banks/BankA/bank.db")).expect("BankA's ledger");
    // A committed payment that BankB says was aborted.
    bank_b
        .execute("UPDATE legs SET state = 'aborted' WHERE payment_id = ?1", [&committed[3]])
        .expect("tamper");
    // A hold left open at BankA.
    bank_a
        .execute("UPDATE legs SET state = 'prepared' WHERE payment_id = ?1", [&committed[17]])
        .expect("tamper");
    // A declined payment that BankA committed after all.
    bank_a.execute("UPDATE legs SET state = 'committed' WHERE payment_id = ?1", [&declined]).expect("tamper");
    // Money that appeared from nowhere at BankB, and a payment the gateway never saw.
    bank_b
        .execute("UPDATE accounts SET balance_minor = balance_minor + 1 WHERE user = 'user5'", [])
        .expect("tamper");
    bank_b
        .execute(
            "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                               state, prepared_at)
             VALUES ('ffffffff-ffff-7fff-bfff-ffffffffffff', 'made-up', 'user1', 'BankA', 'user2', 'BankB', 100,
                     'committed', 0)",
            [],
        )
        .expect("tamper");
    drop((bank_a, bank_b));

    let r = run_cli(c.path(), &["--json", "audit"], &[]);
    assert_eq!(r.code, 1, "{r:?}");
    let j = r.json();
    let problems: Vec<&str> =
        j["problems"].as_array().expect("problems").iter().filter_map(|p| p.as_str()).collect();
    let named = |needle: &str| problems.iter().any(|p| p.contains(needle));
    assert!(named("money is not conserved"), "{problems:#?}");
    assert!(
        named(&format!("payment {} is committed at the gateway but aborted at BankB", committed[3])),
        "{problems:#?}"
    );
    assert!(named(&format!("open hold at BankA: payment {}", committed[17])), "{problems:#?}");
    assert!(
        named(&format!("payment {} is committed at the gateway but prepared at BankA", committed[17])),
        "{problems:#?}"
    );
    assert!(
        named(&format!("payment {declined} is aborted at the gateway but committed at BankA")),
        "{problems:#?}"
    );
    assert!(named("payment made-up is committed at BankB but unknown to the gateway"), "{problems:#?}");
    assert_eq!(j["problem_count"].as_u64(), Some(problems.len() as u64), "{j}");
}

#[test]
fn failed_logins_are_remembered_across_a_gateway_crash() {
    // The defaults: 5 failures in a row lock an account for a minute.
    let mut c = Cluster::start(&["BankA", "BankB"]);
    let rt = grpc::runtime();
    let gw = c.gateway.addr.clone();
    rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &gw).await;
        for _ in 0..5 {
            let refused = grpc::login(&ch, "BankA", "user1", "wrong").await.expect_err("wrong password");
            assert_eq!(refused.code(), tonic::Code::Unauthenticated, "{refused:?}");
        }
        let locked = grpc::login(&ch, "BankA", "user1", "pass1").await.expect_err("locked");
        assert_eq!(locked.code(), tonic::Code::ResourceExhausted, "{locked:?}");
    });
    c.gateway.kill9();
    c.gateway = start_gateway(c.path(), &gw, &[]);
    c.wait_registered();
    rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &gw).await;
        let locked = grpc::login(&ch, "BankA", "user1", "pass1").await.expect_err("still locked");
        assert_eq!(locked.code(), tonic::Code::ResourceExhausted, "{locked:?}");
        // Another account is not affected.
        grpc::login(&ch, "BankA", "user3", "pass3").await.expect("another account logs in");
    });
}

#[test]
fn a_rotated_token_key_signs_new_tokens_without_a_restart() {
    let c = Cluster::start(&["BankA"]);
    let rt = grpc::runtime();
    let gw = c.gateway.addr.clone();
    let header = |token: &str| token.split('.').next().expect("JWT header").to_owned();
    let (old_token, old_header) = rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &gw).await;
        let t = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let h = header(&t);
        (t, h)
    });
    let r = c.cli(&["--json", "certs", "rotate-token-key"]);
    assert_eq!(r.code, 0, "{r:?}");
    let kid = r.json()["kid"].as_str().expect("kid").to_owned();
    rt.block_on(async {
        let ch = grpc::client_channel(c.path(), &gw).await;
        // The gateway takes the new key within a pass of its finisher.
        let deadline = std::time::Instant::now() + WAIT;
        let new_token = loop {
            let t = grpc::login(&ch, "BankA", "user3", "pass3").await.expect("login");
            if header(&t) != old_header || std::time::Instant::now() > deadline {
                break t;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        };
        assert_ne!(header(&new_token), old_header, "new tokens are signed with key {kid}");
        grpc::balance(&ch, &new_token).await.expect("a token of the new key works");
        grpc::balance(&ch, &old_token).await.expect("a token of the old key still works");
    });
}
