//! The operator's views in a real browser (issue 13, item 4): headless
//! Chromium through chromedriver (`common/browser.rs`), against a cluster
//! `strife up` runs. The dashboard's counts, a payment's 2PC timeline and
//! the banks' health must match what happened; a paused bank raises the
//! alarm. Screenshots are saved under the test build's temporary directory
//! (`target/tmp/browser/`) as artifacts.
mod common;

use common::browser::Browser;
use common::*;
use std::path::PathBuf;
use std::time::Instant;

/// Where the screenshots go.
fn artifact(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("browser").join(name)
}

/// Resumes a paused process however the test ends (so that `up` can stop it).
struct Paused(nix::unistd::Pid);

impl Drop for Paused {
    fn drop(&mut self) {
        let _ = nix::sys::signal::kill(self.0, nix::sys::signal::Signal::SIGCONT);
    }
}

#[test]
fn the_dashboard_in_a_browser_shows_what_happened_and_raises_the_alarm() {
    let dir = TempDir::new("browser");
    let (up, _ready, lines) = spawn_until(&dir.0, &["up", "--port", "0"], "strife: ready ", FAST);
    let _up = Up(up);
    let line = lines.recv_timeout(WAIT).expect("a line after the ready line");
    let link =
        line.strip_prefix("strife: dashboard ").unwrap_or_else(|| panic!("not the dashboard line: {line}"));

    // What happens: three committed payments, two declined for two reasons.
    let r =
        run_cli(&dir.0, &["login", "--bank", "BankA", "--user", "user1"], &[("STRIFE_PASSWORD", "pass1")]);
    assert_eq!(r.code, 0, "{r:?}");
    let pay = |to: &str, amount: &str| {
        run_cli(&dir.0, &["--json", "--as", "user1@BankA", "pay", "--to", to, "--amount", amount], &[])
    };
    let mut last = String::new();
    for _ in 0..3 {
        let r = pay("user2@BankB", "1.25");
        assert_eq!(r.code, 0, "{r:?}");
        last = r.json()["payment_id"].as_str().expect("id").to_owned();
    }
    assert_eq!(pay("user2@BankB", "99999.00").code, 3);
    assert_eq!(pay("nobody@BankB", "1.00").code, 3);

    let browser = Browser::start(1280, 900);
    // The link logs the browser in and lands on the overview.
    browser.goto(link);
    browser.wait_for("#count-committed");
    assert!(!browser.url().contains("/login"), "the login redirects: {}", browser.url());
    browser.wait_text("#count-committed", "3 committed", |t| t.trim() == "3");
    browser.wait_text("#count-declined", "2 declined", |t| t.trim() == "2");
    assert_eq!(browser.text("#decline-insufficient_funds").trim(), "1");
    assert_eq!(browser.text("#decline-unknown_payee").trim(), "1");
    for bank in ["BankA", "BankB"] {
        let css = format!("td[data-testid=\"bank-health\"][data-bank=\"{bank}\"]");
        browser.wait_text(&css, "the bank up", |t| t.contains("up"));
    }
    browser.wait_text("#alarm-banner", "no alarm", |_| {
        browser.run("return document.querySelector('#alarm-banner').dataset.alarms") == "0"
    });
    // The live chart is drawn by the page's script.
    let drawn = browser.run("return document.querySelectorAll('#chart-rate *').length");
    assert!(drawn.as_u64().is_some_and(|n| n > 0), "the rate chart is drawn: {drawn}");
    browser.screenshot(&artifact("dashboard.png"));

    // The last payment, found by its id, and its 2PC timeline.
    browser.click("#nav-payments");
    browser.type_into("#search", &last);
    browser.run("document.querySelector('#search-form').submit(); return true");
    browser.click("tr[data-testid=\"payment-row\"] a");
    browser.wait_text("#payment-id", "the payment", |t| t.trim() == last);
    assert_eq!(browser.text("#payment-state").trim(), "committed");
    assert_eq!(browser.text("#payment-amount").trim(), "1.25");
    let kinds = |kind: &str| {
        browser.run(&format!(
            "return document.querySelectorAll('li[data-testid=\"timeline-row\"][data-kind=\"{kind}\"]').length"
        ))
    };
    let deadline = Instant::now() + WAIT;
    while kinds("ack") != 2 {
        assert!(Instant::now() < deadline, "both acknowledgements never showed");
        browser.run("location.reload(); return true");
        browser.wait_for("#timeline");
    }
    assert_eq!(kinds("begin"), 1);
    assert_eq!(kinds("vote"), 2, "each bank's vote");
    assert_eq!(kinds("decision"), 1);
    browser.screenshot(&artifact("payment.png"));

    // BankB paused: the banner says a bank is unreachable.
    let status = run_cli(&dir.0, &["--json", "status"], &[]).json();
    let pid = status["instances"]
        .as_array()
        .and_then(|l| l.iter().find(|i| i["name"] == "BankB"))
        .and_then(|i| i["pid"].as_u64())
        .expect("BankB's pid");
    let paused = Paused(nix::unistd::Pid::from_raw(i32::try_from(pid).expect("pid")));
    nix::sys::signal::kill(paused.0, nix::sys::signal::Signal::SIGSTOP).expect("SIGSTOP");
    browser.click("#nav-overview");
    browser.wait_for("li[data-testid=\"alarm\"][data-alarm=\"bank-unreachable\"]");
    browser.wait_text("td[data-testid=\"bank-health\"][data-bank=\"BankB\"]", "BankB unreachable", |t| {
        t.contains("unreachable")
    });
    browser.screenshot(&artifact("alarm.png"));
    drop(paused);
}
