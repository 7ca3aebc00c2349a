//! The operator's views in a real browser (issue 13): headless Chromium
//! through chromedriver (`common/browser.rs`), against real servers.
mod common;

use common::browser::Browser;
use common::*;
use std::time::Instant;

/// The metrics a gateway serves, as a person opening them in a browser
/// sees them: the payments counted.
#[test]
fn a_browser_reads_the_gateway_s_metrics() {
    let c = Cluster::start(&["BankA", "BankB"]);
    let deadline = Instant::now() + WAIT;
    let metrics = loop {
        let line =
            c.gateway.lines.recv_timeout(deadline.saturating_duration_since(Instant::now())).expect("a line");
        if let Some((_, addr)) = line.split_once(" metrics listening on ") {
            break addr.trim().to_owned();
        }
    };
    c.login("user1", "BankA");
    let r = c.pay("user1@BankA", "user2@BankB", "1.00");
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    let browser = Browser::start(1280, 800);
    browser.goto(&format!("http://{metrics}/metrics"));
    let text = browser.text("body");
    assert!(text.contains("strife_payments_total{outcome=\"committed\",reason=\"none\"} 1"), "{text}");
}
