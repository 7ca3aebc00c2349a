//! The operator's dashboard (issue 13), through plain HTTP/1.1 requests to
//! a cluster that `strife up` runs: `up` prints a login link after its
//! ready line; a link logs in once, before it expires; nothing opens
//! without a session (a customer's token neither); the pages show the
//! cluster's payments, a payment's 2PC timeline, values from outside
//! escaped; logout needs its CSRF token; a paused bank raises the alarm.
mod common;

use common::http::{http, log_in, split_link};
use common::*;
use std::time::Instant;

fn get(addr: &str, path: &str, cookie: &str) -> (u16, String) {
    let (status, head, body) = http(addr, "GET", path, &[("Cookie", cookie)], "");
    if status == 200 {
        assert!(head.contains("content-security-policy: default-src 'none'; script-src 'self'"), "{head}");
        assert!(head.contains("x-frame-options: deny") && head.contains("cache-control: no-store"), "{head}");
    }
    (status, body)
}

/// The text of the element with `id` (up to the next tag).
fn text_of<'a>(html: &'a str, id: &str) -> &'a str {
    let at = html.find(&format!("id=\"{id}\"")).unwrap_or_else(|| panic!("no #{id} in:\n{html}"));
    let rest = &html[at..];
    let start = rest.find('>').expect("tag end") + 1;
    let end = rest[start..].find('<').expect("next tag");
    &rest[start..start + end]
}

/// Polls `path` until `pred` holds of its body, within [`WAIT`].
fn wait_page(addr: &str, path: &str, cookie: &str, what: &str, pred: impl Fn(&str) -> bool) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(addr, path, cookie);
        if status == 200 && pred(&body) {
            return body;
        }
        assert!(Instant::now() < deadline, "{what} never showed on {path}:\n{body}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

#[test]
fn the_dashboard_is_for_operators_and_shows_what_happened() {
    let dir = TempDir::new("dashboard");
    let (up, _ready, lines) = spawn_until(&dir.0, &["up", "--port", "0"], "strife: ready ", FAST);
    let mut up = Up(up);
    let line = lines.recv_timeout(WAIT).expect("a line after the ready line");
    let link =
        line.strip_prefix("strife: dashboard ").unwrap_or_else(|| panic!("not the dashboard line: {line}"));
    let (addr, _) = split_link(link);

    // No session: 401 saying how to get a link; a customer's token opens nothing.
    let (status, body) = get(&addr, "/", "");
    assert_eq!(status, 401);
    assert!(body.contains("strife admin url"), "{body}");
    let run =
        run_cli(&dir.0, &["login", "--bank", "BankA", "--user", "user1"], &[("STRIFE_PASSWORD", "pass1")]);
    assert_eq!(run.code, 0, "{run:?}");
    let gateway = std::fs::read_to_string(dir.0.join("gateway.addr")).expect("gateway.addr");
    let token = grpc::runtime().block_on(async {
        let ch = grpc::client_channel(&dir.0, gateway.trim()).await;
        grpc::login(&ch, "BankA", "user1", "pass1").await.expect("a customer's token")
    });
    let (status, _, body) = http(&addr, "GET", "/", &[("Authorization", &format!("Bearer {token}"))], "");
    assert_eq!(status, 401, "a customer's token is refused: {body}");
    let (status, _, _) =
        http(&addr, "GET", "/api/overview", &[("Authorization", &format!("Bearer {token}"))], "");
    assert_eq!(status, 401);

    // The link of `up` logs in once; `strife admin url` makes fresh ones.
    let cookie = log_in(link);
    let (addr2, path) = split_link(link);
    let (status, _, body) = http(&addr2, "GET", &path, &[], "");
    assert_eq!(status, 401, "a used link is refused");
    assert!(body.contains("used already"), "{body}");
    let run = run_cli(&dir.0, &["admin", "url"], &[]);
    assert_eq!(run.code, 0, "{run:?}");
    let fresh = run.stdout.trim().to_owned();
    let run = run_cli(&dir.0, &["admin", "url"], &[("STRIFE_ADMIN_LINK_TTL_SECS", "0")]);
    let (addr3, expired) = split_link(run.stdout.trim());
    let (status, _, body) = http(&addr3, "GET", &expired, &[], "");
    assert_eq!(status, 401, "an expired link is refused");
    assert!(body.contains("expired"), "{body}");
    let (addr4, good) = split_link(&fresh);
    let flipped = if good.ends_with('0') { '1' } else { '0' };
    let forged = format!("{}{flipped}", &good[..good.len() - 1]);
    assert_eq!(http(&addr4, "GET", &forged, &[], "").0, 401, "a link with a wrong signature is refused");
    let cookie2 = log_in(&fresh);
    let status = run_cli(&dir.0, &["--json", "status"], &[]).json();
    let gateway_entry = status["instances"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["role"] == "gateway").cloned())
        .expect("the gateway in status");
    assert_eq!(gateway_entry["admin"], addr.as_str(), "status lists the dashboard's address");

    // Payments, some declined.
    let pay = |to: &str, amount: &str| {
        run_cli(&dir.0, &["--json", "--as", "user1@BankA", "pay", "--to", to, "--amount", amount], &[])
    };
    for _ in 0..2 {
        assert_eq!(pay("user2@BankB", "1.00").code, 0);
    }
    assert_eq!(pay("user2@BankB", "99999.00").code, 3);
    assert_eq!(pay("nobody@BankB", "1.00").code, 3);
    let overview = wait_page(&addr, "/", &cookie, "the counts", |b| text_of(b, "count-committed") == "2");
    assert_eq!(text_of(&overview, "count-declined"), "2");
    assert_eq!(text_of(&overview, "decline-insufficient_funds"), "1");
    assert_eq!(text_of(&overview, "decline-unknown_payee"), "1");
    assert!(overview.contains(r#"data-alarms="0""#), "no alarm yet: {overview}");
    for bank in ["BankA", "BankB"] {
        assert!(
            overview.contains(&format!(r#"data-testid="bank-health" data-bank="{bank}" class="up">up<"#)),
            "{bank} up: {overview}"
        );
    }
    // Each bank says how many legs it holds in doubt (GetStatus): none, once every decision landed.
    wait_page(&addr, "/", &cookie, "no leg in doubt", |b| {
        ["BankA", "BankB"]
            .iter()
            .all(|bank| b.contains(&format!(r#"data-testid="bank-in-doubt" data-bank="{bank}">0<"#)))
    });
    let (status, json) = get(&addr, "/api/overview", &cookie2);
    assert_eq!(status, 200);
    let json: serde_json::Value = serde_json::from_str(&json).expect("JSON");
    assert_eq!(json["counts"]["committed"], 2);

    // The list, a customer's search, and a payment's 2PC timeline.
    let (_, list) = get(&addr, "/payments", &cookie);
    assert_eq!(list.matches(r#"data-testid="payment-row""#).count(), 4, "{list}");
    let (_, mine) = get(&addr, "/payments?q=user2%40BankB", &cookie);
    assert_eq!(mine.matches(r#"data-testid="payment-row""#).count(), 2, "user2 received two: {mine}");
    let paid = pay("user2@BankB", "2.50").json();
    let id = paid["payment_id"].as_str().expect("payment id");
    let (_, found) = get(&addr, &format!("/payments?q={id}"), &cookie);
    let txn = found.split(r#"data-txn=""#).nth(1).and_then(|r| r.split('"').next()).expect("found by id");
    let page = wait_page(&addr, &format!("/payments/{txn}"), &cookie, "both acknowledgements", |b| {
        b.matches(r#"data-kind="ack""#).count() == 2
    });
    assert_eq!(text_of(&page, "payment-state"), "committed");
    assert_eq!(text_of(&page, "payment-amount"), "2.50");
    for bank in ["BankA", "BankB"] {
        assert!(page.contains(&format!(r#"data-kind="vote" data-bank="{bank}""#)), "{bank} votes: {page}");
        assert!(page.contains(&format!(r#"data-kind="ack" data-bank="{bank}""#)), "{bank} acks: {page}");
    }
    assert!(page.contains(r#"data-kind="begin""#) && page.contains(r#"data-kind="decision""#), "{page}");
    assert!(page.find(r#"data-kind="begin""#) < page.find(r#"data-kind="decision""#));

    // A payment within one bank: BankA decided it in one phase, and the
    // timeline says so (no votes, no acknowledgements: the bank's decision).
    let within = run_cli(
        &dir.0,
        &["--json", "--as", "user1@BankA", "pay", "--to", "user2@BankA", "--amount", "1.50"],
        &[],
    );
    assert_eq!(within.code, 0, "{within:?}");
    let id = within.json()["payment_id"].as_str().expect("payment id").to_owned();
    let (_, found) = get(&addr, &format!("/payments?q={id}"), &cookie);
    let txn = found.split(r#"data-txn=""#).nth(1).and_then(|r| r.split('"').next()).expect("found by id");
    let page = wait_page(&addr, &format!("/payments/{txn}"), &cookie, "the bank's decision", |b| {
        b.contains(r#"data-kind="decision""#)
    });
    assert_eq!(text_of(&page, "payment-state"), "committed");
    assert_eq!(text_of(&page, "payment-protocol"), "one phase: decided by BankA");
    assert!(page.contains("One-phase commit timeline"), "{page}");
    assert!(page.contains(r#"data-kind="transfer" data-bank="BankA""#), "{page}");
    assert!(!page.contains(r#"data-kind="vote""#) && !page.contains(r#"data-kind="ack""#), "{page}");

    // A value from outside is escaped: the search query echoed back.
    let (_, search) = get(&addr, "/payments?q=%3Cscript%3Ealert(1)%3C%2Fscript%3E", &cookie);
    assert!(!search.contains("<script>alert"), "{search}");
    assert!(search.contains("&lt;script&gt;alert(1)&lt;/script&gt;"), "{search}");

    // Logout: a POST with the session's CSRF token, and only with it.
    let csrf = overview
        .split(r#"name="csrf" id="csrf" value=""#)
        .nth(1)
        .and_then(|r| r.split('"').next())
        .expect("a CSRF token in the logout form");
    let form = [("Cookie", cookie2.as_str()), ("Content-Type", "application/x-www-form-urlencoded")];
    assert_eq!(http(&addr, "POST", "/logout", &form, "").0, 403, "no CSRF token");
    assert_eq!(
        http(&addr, "POST", "/logout", &form, &format!("csrf={csrf}")).0,
        403,
        "another session's token"
    );
    let (_, page2) = get(&addr, "/", &cookie2);
    let csrf2 = page2.split(r#"id="csrf" value=""#).nth(1).and_then(|r| r.split('"').next()).expect("csrf");
    assert_eq!(http(&addr, "POST", "/logout", &form, &format!("csrf={csrf2}")).0, 200);
    assert_eq!(get(&addr, "/", &cookie2).0, 401, "logged out");
    assert_eq!(get(&addr, "/", &cookie).0, 200, "the other session lives on");

    // A bank that stops answering raises the alarm.
    let instances: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.0.join("instances.json")).expect("instances.json"))
            .expect("JSON");
    let bank_pid = instances["instances"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["name"] == "BankB"))
        .and_then(|i| i["pid"].as_i64())
        .expect("BankB's pid");
    let pid = nix::unistd::Pid::from_raw(i32::try_from(bank_pid).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).expect("pause BankB");
    let alarmed =
        wait_page(&addr, "/", &cookie, "the alarm", |b| b.contains(r#"data-alarm="bank-unreachable""#));
    assert!(alarmed.contains(r#"class="alarm""#), "{alarmed}");
    assert!(alarmed.contains(r#"data-bank="BankB" class="unreachable""#), "{alarmed}");
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).expect("resume BankB");
    assert_eq!(terminate(&mut up.0), Some(0));
}

/// The dashboard's address a gateway printed after its listening line.
fn admin_address(gateway: &Proc) -> String {
    printed_address(gateway, "strife: gateway admin listening on ")
}

/// Polls `/api/overview` until `pred` holds of it, within [`WAIT`].
fn wait_overview(
    addr: &str,
    cookie: &str,
    what: &str,
    pred: impl Fn(&serde_json::Value) -> bool,
) -> serde_json::Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let (status, body) = get(addr, "/api/overview", cookie);
        if status == 200 {
            let json: serde_json::Value = serde_json::from_str(&body).expect("JSON");
            if pred(&json) {
                return json;
            }
            assert!(Instant::now() < deadline, "{what} never showed in /api/overview:\n{json:#}");
        }
        assert!(Instant::now() < deadline, "{what}: /api/overview answered {status}: {body}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

/// The replica of `/api/overview` at `address`.
fn replica<'a>(overview: &'a serde_json::Value, address: &str) -> Option<&'a serde_json::Value> {
    overview["replicas"].as_array()?.iter().find(|r| r["address"] == address)
}

/// Three gateway replicas on one PostgreSQL database: payments go through
/// the first only, and the dashboard of the second shows them in its live
/// chart (every replica's heartbeat, merged), lists all three replicas,
/// and shows the third stale once it is killed.
#[test]
fn every_replica_s_dashboard_shows_the_whole_cluster() {
    let server = strife_rpc::postgres_server::shared_for_tests().unwrap_or_else(|e| panic!("{e}"));
    let store = server
        .create_private_database(
            &strife_rpc::postgres_server::unique_name("role_dash"),
            &strife_rpc::postgres_server::unique_name("dash"),
        )
        .expect("a database for the gateways");
    let dir = TempDir::new("dashboard-cluster");
    let d = &dir.0;
    let r = run_cli(d, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let mut env = FAST.to_vec();
    env.push(("STRIFE_GATEWAY_STORE", store.expose()));
    let mut gateways: Vec<Proc> = (0..3).map(|_| start_gateway(d, "127.0.0.1:0", &env)).collect();
    let admins: Vec<String> = gateways.iter().map(admin_address).collect();
    let addrs: Vec<String> = gateways.iter().map(|g| g.addr.clone()).collect();
    let list = addrs.join(",");
    let _banks = [start_bank(d, "BankA", &list, FAST), start_bank(d, "BankB", &list, FAST)];
    for a in &addrs {
        wait_registered_at(d, Some(a), &["BankA", "BankB"]);
    }

    // Payments through the first replica only.
    let first = addrs[0].as_str();
    let r = run_cli(
        d,
        &["--gateway", first, "login", "--bank", "BankA", "--user", "user1"],
        &[("STRIFE_PASSWORD", "pass1")],
    );
    assert_eq!(r.code, 0, "{r:?}");
    for _ in 0..5 {
        let r = run_cli(
            d,
            &["--json", "--gateway", first, "pay", "--to", "user2@BankB", "--amount", "1.00"],
            &[],
        );
        assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    }
    let r =
        run_cli(d, &["--json", "--gateway", first, "pay", "--to", "nobody@BankB", "--amount", "1.00"], &[]);
    assert_eq!(r.code, 3, "{r:?}");

    // The second replica's dashboard: its link, its overview.
    let r = run_cli(d, &["admin", "url", "--admin", &admins[1]], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let cookie = log_in(r.stdout.trim());
    let second = admins[1].as_str();
    let sum = |o: &serde_json::Value, key: &str| -> u64 {
        o["samples"].as_array().map_or(0, |s| s.iter().filter_map(|x| x[key].as_u64()).sum())
    };
    let overview = wait_overview(second, &cookie, "the first replica's payments in the chart", |o| {
        sum(o, "committed") == 5 && sum(o, "declined") == 1
    });
    assert_eq!(overview["counts"]["committed"], 5, "{overview:#}");
    let overview = wait_overview(second, &cookie, "every replica, fresh", |o| {
        addrs.iter().all(|a| replica(o, a).is_some_and(|r| r["state"] != "stale"))
    });
    assert_eq!(replica(&overview, &addrs[1]).expect("itself")["state"], "this", "{overview:#}");
    assert_eq!(replica(&overview, &addrs[0]).expect("the first")["admin_address"], admins[0].as_str());
    let p99_seen =
        overview["samples"].as_array().expect("samples").iter().any(|s| s["p99_ms"].as_f64() > Some(0.0));
    assert!(p99_seen, "the first replica's latencies are in the chart: {overview:#}");
    for bank in ["BankA", "BankB"] {
        let b = overview["banks"].as_array().and_then(|l| l.iter().find(|b| b["name"] == bank)).expect(bank);
        assert_eq!(b["reachable"], true, "{overview:#}");
    }
    assert_eq!(overview["alarms"].as_array().map(Vec::len), Some(0), "{overview:#}");
    let (_, page) = get(second, "/", &cookie);
    assert_eq!(page.matches(r#"data-testid="replica-row""#).count(), 3, "{page}");

    // A replica killed with SIGKILL turns stale there, and stays listed.
    let third = addrs[2].clone();
    gateways[2].kill9();
    wait_overview(second, &cookie, "the killed replica stale", |o| {
        replica(o, &third).is_some_and(|r| r["state"] == "stale")
    });
    let (_, page) = get(second, "/", &cookie);
    assert!(page.contains(r#"data-state="stale""#), "{page}");
    assert_eq!(page.matches(r#"data-testid="replica-row""#).count(), 3, "{page}");
    for g in &mut gateways[..2] {
        assert_eq!(g.stop(), Some(0));
    }
}

/// The value of an unlabelled series in Prometheus text.
fn series(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.trim().parse().ok())
}

/// The gateway's background audit: payments under load and a pass every
/// second find nothing; a committed leg altered at a bank (the cluster
/// stopped, the bank's SQLite row changed, everything restarted) raises
/// the `audit-failing` alarm naming the payment and what differs, the
/// `strife_audit_problems` metric and an error line in the log.
#[test]
fn the_audit_alarm_names_a_payment_a_bank_contradicts_and_stays_quiet_under_load() {
    let dir = TempDir::new("dashboard-audit");
    let d = &dir.0;
    let r = run_cli(d, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let mut env = FAST.to_vec();
    env.push(("STRIFE_ADMIN_AUDIT_INTERVAL_SECS", "1"));
    let start = |listen: &str| -> (Proc, String, String) {
        let g = start_gateway(d, listen, &env);
        let metrics = printed_address(&g, "strife: gateway metrics listening on ");
        let admin = printed_address(&g, "strife: gateway admin listening on ");
        (g, metrics, admin)
    };
    let (mut gateway, metrics, admin) = start("127.0.0.1:0");
    let mut banks =
        vec![start_bank(d, "BankA", &gateway.addr, FAST), start_bank(d, "BankB", &gateway.addr, FAST)];
    wait_registered(d, &["BankA", "BankB"]);
    for (user, bank) in [("user1", "BankA"), ("user2", "BankB")] {
        let n = &user[4..];
        let r = run_cli(
            d,
            &["login", "--bank", bank, "--user", user],
            &[("STRIFE_PASSWORD", &format!("pass{n}"))],
        );
        assert_eq!(r.code, 0, "{r:?}");
    }

    // Load: two payers at once, 40 payments (a few declined), while a pass runs every second.
    let runs: Vec<Invocation> = (0..40)
        .map(|i| {
            let (from, to) =
                if i % 2 == 0 { ("user1@BankA", "user2@BankB") } else { ("user2@BankB", "user1@BankA") };
            let amount = if i % 10 == 9 { "99999.00" } else { "1.00" };
            Invocation::new(&["--json", "--as", from, "pay", "--to", to, "--amount", amount])
        })
        .collect();
    let mut results = Vec::new();
    for chunk in runs.chunks(8) {
        results.extend(run_cli_concurrently(d, chunk));
    }
    let committed: Vec<String> = results
        .iter()
        .filter(|r| r.code == 0)
        .map(|r| r.json()["payment_id"].as_str().expect("id").to_owned())
        .collect();
    assert_eq!(committed.len(), 36, "{results:?}");
    let scrape = || http(&metrics, "GET", "/metrics", &[], "").2;
    let deadline = Instant::now() + WAIT;
    loop {
        let text = scrape();
        if series(&text, "strife_audit_payments_checked_total").is_some_and(|n| n >= 40.0) {
            assert_eq!(series(&text, "strife_audit_problems"), Some(0.0), "a clean run: {text}");
            assert!(
                series(&text, "strife_audit_last_run_timestamp_seconds").is_some_and(|t| t > 0.0),
                "{text}"
            );
            break;
        }
        assert!(Instant::now() < deadline, "the audit never checked the 40 payments:\n{text}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let r = run_cli(d, &["admin", "url", "--admin", &admin], &[]);
    let cookie = log_in(r.stdout.trim());
    let (_, body) = get(&admin, "/api/overview", &cookie);
    let overview: serde_json::Value = serde_json::from_str(&body).expect("JSON");
    assert_eq!(overview["alarms"].as_array().map(Vec::len), Some(0), "{overview:#}");
    assert_eq!(overview["audit"]["problems"], 0, "{overview:#}");

    // Stop everything, make BankB say a committed payment was aborted, restart.
    for b in &mut banks {
        assert_eq!(b.stop(), Some(0));
    }
    assert_eq!(gateway.stop(), Some(0));
    let victim = &committed[5];
    let ledger = rusqlite::Connection::open(d.join("banks/BankB/bank.db")).expect("BankB's ledger");
    let changed =
        ledger.execute("UPDATE legs SET state = 'aborted' WHERE payment_id = ?1", [victim]).expect("tamper");
    assert_eq!(changed, 1);
    drop(ledger);
    let addr = gateway.addr.clone();
    let (gateway, metrics, admin) = start(&addr);
    let _banks = [start_bank(d, "BankA", &gateway.addr, FAST), start_bank(d, "BankB", &gateway.addr, FAST)];
    let r = run_cli(d, &["admin", "url", "--admin", &admin], &[]);
    let cookie = log_in(r.stdout.trim());
    let what = format!("payment {victim} is committed at the gateway but aborted at BankB");
    let overview = wait_overview(&admin, &cookie, "the audit alarm", |o| {
        o["alarms"].as_array().is_some_and(|l| {
            l.iter().any(|a| {
                a["code"] == "audit-failing" && a["message"].as_str().is_some_and(|m| m.contains(&what))
            })
        })
    });
    assert_eq!(overview["audit"]["problems"], 1, "{overview:#}");
    let text = http(&metrics, "GET", "/metrics", &[], "").2;
    assert_eq!(series(&text, "strife_audit_problems"), Some(1.0), "{text}");
    let line = wait_for_log_line(&d.join("logs").join("gateway.log"), &what);
    assert!(line.contains("ERROR"), "{line}");
    let (_, page) = get(&admin, "/", &cookie);
    assert!(page.contains(r#"data-alarm="audit-failing""#), "{page}");
    drop(gateway);
}
