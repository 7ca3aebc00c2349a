//! Discovery on a real etcd (issue 12): a private etcd server with mutual
//! TLS and one user per identity, registrations under leases, watches, and
//! who may write which keys.
mod common;

use common::TempDir;
use std::time::{Duration, Instant};
use strife_rpc::Peer;
use strife_rpc::etcd::{self, Entry, Etcd};
use strife_rpc::etcd_server::EtcdServer;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use tokio::sync::watch;

const WAIT: Duration = Duration::from_secs(30);

fn pki(dir: &std::path::Path) -> CertDir {
    let certs = CertDir::new(dir);
    certs
        .init(&[
            Peer::Gateway,
            Peer::Bank("BankA".into()),
            Peer::Bank("BankB".into()),
            Peer::Client("client".into()),
        ])
        .expect("pki");
    certs
}

fn as_peer(certs: &CertDir, peer: Peer, url: &str) -> Etcd {
    let tls = Tls::load(certs, &peer).expect("tls");
    Etcd::connect(&tls, url).expect("connect")
}

async fn wait_view(rx: &mut watch::Receiver<etcd::View>, what: &str, pred: impl Fn(&etcd::View) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        if pred(&rx.borrow()) {
            return;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        assert!(!left.is_zero(), "timed out waiting for {what}; view: {:?}", rx.borrow());
        let _ = tokio::time::timeout(left, rx.changed()).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_identity_writes_only_its_own_keys() {
    let dir = TempDir::new("etcd-identity");
    let certs = pki(&dir.0);
    let server =
        EtcdServer::start(&dir.0.join("etcd"), &certs, "127.0.0.1", &["BankA".into(), "BankB".into()])
            .await
            .expect("etcd");
    let url = server.url();
    let entry = serde_json::to_vec(&Entry::new("127.0.0.1:1", "boot")).expect("json");

    let gateway = as_peer(&certs, Peer::Gateway, &url);
    gateway.put(&etcd::gateway_key("g1"), entry.clone(), 0).await.expect("the gateway writes its key");
    let bank_a = as_peer(&certs, Peer::Bank("BankA".into()), &url);
    bank_a.put(&etcd::bank_key("BankA", "a1"), entry.clone(), 0).await.expect("BankA writes its key");

    let refused = bank_a.put(&etcd::bank_key("BankB", "forged"), entry.clone(), 0).await;
    assert_eq!(refused.expect_err("BankA cannot register as BankB").code(), tonic::Code::PermissionDenied);
    let refused = bank_a.put(&etcd::gateway_key("forged"), entry.clone(), 0).await;
    assert_eq!(refused.expect_err("a bank cannot register a gateway").code(), tonic::Code::PermissionDenied);

    let client = as_peer(&certs, Peer::Client("client".into()), &url);
    let refused = client.put(&etcd::gateway_key("forged"), entry.clone(), 0).await;
    assert_eq!(refused.expect_err("a client cannot register").code(), tonic::Code::PermissionDenied);
    let refused = client.put(&etcd::bank_key("BankA", "forged"), entry.clone(), 0).await;
    assert_eq!(refused.expect_err("a client cannot register a bank").code(), tonic::Code::PermissionDenied);
    let (gateways, _) =
        client.range_prefix(etcd::GATEWAYS_PREFIX).await.expect("a client reads the gateways");
    assert_eq!(gateways.keys().collect::<Vec<_>>(), vec![&etcd::gateway_key("g1")]);

    // A client named like a bank is still only a client in etcd.
    certs.issue(&Peer::Client("BankA".into())).expect("issue");
    let lookalike = as_peer(&certs, Peer::Client("BankA".into()), &url);
    let refused = lookalike.put(&etcd::bank_key("BankA", "forged"), entry, 0).await;
    assert_eq!(refused.expect_err("a client named BankA is no bank").code(), tonic::Code::PermissionDenied);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_registration_comes_and_goes_with_its_lease_and_survives_an_etcd_restart() {
    let dir = TempDir::new("etcd-lease");
    let certs = pki(&dir.0);
    let mut server =
        EtcdServer::start(&dir.0.join("etcd"), &certs, "127.0.0.1", &["BankA".into()]).await.expect("etcd");
    let url = server.url();
    let (stop_tx, stop) = watch::channel(false);
    let client = as_peer(&certs, Peer::Client("client".into()), &url);
    let mut view = etcd::watch_prefix(client, etcd::GATEWAYS_PREFIX.to_owned(), stop.clone());

    let gateway = as_peer(&certs, Peer::Gateway, &url);
    let (reg_stop_tx, reg_stop) = watch::channel(false);
    let key = etcd::gateway_key("g1");
    let _state =
        etcd::register(gateway, key.clone(), || Entry::new("127.0.0.1:7", "b1"), etcd::DEFAULT_TTL, reg_stop);
    wait_view(&mut view, "the registration", |v| {
        v.live && v.parsed().get(&key).is_some_and(|e| e.address == "127.0.0.1:7")
    })
    .await;

    // etcd dies: the watcher keeps the last set, marked not live.
    server.kill();
    wait_view(&mut view, "the watch to break", |v| !v.live).await;
    assert!(view.borrow().entries.contains_key(&key), "the last known set is kept");
    server.restart().await.expect("etcd restarts");
    wait_view(&mut view, "the watch to come back with the key", |v| v.live && v.entries.contains_key(&key))
        .await;

    // A registration that stops renewing (as a killed process) goes with
    // its lease; a stopped one goes at once (revoked).
    reg_stop_tx.send_replace(true);
    wait_view(&mut view, "the key to go", |v| v.live && !v.entries.contains_key(&key)).await;
    stop_tx.send_replace(true);
}

/// A gateway and banks (SQLite) that register in a private etcd and find
/// each other there: the banks are given a dead `--gateway` address, which
/// etcd's list replaces.
struct Discovered {
    dir: TempDir,
    rt: tokio::runtime::Runtime,
    etcd: EtcdServer,
    envs: Vec<(String, String)>,
    gateway: common::Proc,
    banks: Vec<common::Proc>,
}

/// Where nothing listens: a bank given it finds the gateway only through
/// etcd.
const DEAD_GATEWAY: &str = "127.0.0.1:9";
/// Leases in these tests: the shortest etcd grants.
const TTL_MS: &str = "2000";

fn start_bank_discovering(dir: &std::path::Path, name: &str, envs: &[(&str, &str)]) -> common::Proc {
    common::start_bank(dir, name, DEAD_GATEWAY, envs)
}

impl Discovered {
    fn start(tag: &str) -> Discovered {
        let dir = TempDir::new(tag);
        let r = common::run_cli(&dir.0, &["certs", "init", "--bank", "BankA", "--bank", "BankB"], &[]);
        assert_eq!(r.code, 0, "certs init: {r:?}");
        let rt = tokio::runtime::Runtime::new().expect("runtime");
        let certs = CertDir::new(&dir.0);
        let etcd = rt
            .block_on(EtcdServer::start(
                &dir.0.join("etcd"),
                &certs,
                "127.0.0.1",
                &["BankA".into(), "BankB".into()],
            ))
            .unwrap_or_else(|e| panic!("{e:#}"));
        let mut envs: Vec<(String, String)> =
            common::FAST.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        envs.push(("STRIFE_DISCOVERY".into(), etcd.url()));
        envs.push(("STRIFE_DISCOVERY_LEASE_TTL_MS".into(), TTL_MS.into()));
        let gateway = common::start_gateway(&dir.0, "127.0.0.1:0", &common::refs(&envs));
        let banks = ["BankA", "BankB"]
            .iter()
            .map(|b| start_bank_discovering(&dir.0, b, &common::refs(&envs)))
            .collect();
        common::wait_registered_at(&dir.0, Some(&gateway.addr), &["BankA", "BankB"]);
        Discovered { dir, rt, etcd, envs, gateway, banks }
    }

    fn watch(&self, prefix: &str) -> (watch::Sender<bool>, watch::Receiver<etcd::View>) {
        let _guard = self.rt.enter();
        let certs = CertDir::new(&self.dir.0);
        let (stop_tx, stop) = watch::channel(false);
        let reader = as_peer(&certs, Peer::Gateway, &self.etcd.url());
        (stop_tx, etcd::watch_prefix(reader, prefix.to_owned(), stop))
    }

    fn wait(
        &self,
        view: &mut watch::Receiver<etcd::View>,
        what: &str,
        pred: impl Fn(&etcd::View) -> bool,
    ) -> Duration {
        let started = Instant::now();
        self.rt.block_on(wait_view(view, what, pred));
        started.elapsed()
    }

    fn pay(&self, from: &str, to: &str, amount: &str) -> common::Run {
        common::run_cli(
            &self.dir.0,
            &["--gateway", &self.gateway.addr, "--json", "--as", from, "pay", "--to", to, "--amount", amount],
            &[],
        )
    }

    fn login(&self, user: &str, bank: &str) {
        let n: String = user.chars().filter(char::is_ascii_digit).collect();
        let r = common::run_cli(
            &self.dir.0,
            &["--gateway", &self.gateway.addr, "login", "--bank", bank, "--user", user],
            &[("STRIFE_PASSWORD", &format!("pass{n}"))],
        );
        assert_eq!(r.code, 0, "login {user}@{bank}: {r:?}");
    }
}

fn addresses(view: &etcd::View) -> Vec<String> {
    let mut out: Vec<String> = view.parsed().into_values().map(|e| e.address).collect();
    out.sort();
    out
}

#[test]
fn servers_register_under_leases_and_come_and_go_with_their_processes() {
    let mut c = Discovered::start("etcd-servers");
    let (_stop_g, mut gateways) = c.watch(etcd::GATEWAYS_PREFIX);
    let (_stop_b, mut banks) = c.watch(etcd::BANKS_PREFIX);
    let gw = c.gateway.addr.clone();
    c.wait(&mut gateways, "the gateway's key", |v| v.live && addresses(v) == vec![gw.clone()]);
    let bank_b = c.banks[1].addr.clone();
    let both: Vec<String> = {
        let mut b = vec![c.banks[0].addr.clone(), bank_b.clone()];
        b.sort();
        b
    };
    c.wait(&mut banks, "both banks' keys", |v| v.live && addresses(v) == both);
    let entry = banks.borrow().parsed().into_iter().find(|(k, _)| k.starts_with("/strife/v1/banks/BankB/"));
    assert!(
        entry.is_some_and(|(_, e)| e.address == bank_b && !e.boot_id.is_empty()),
        "BankB's key names its address"
    );

    // Found through etcd only (their --gateway is dead): payments work.
    c.login("user1", "BankA");
    let r = c.pay("user1@BankA", "user2@BankB", "1.00");
    assert_eq!(r.code, 0, "pay: {r:?}");
    assert_eq!(r.json()["status"], "committed", "{r:?}");

    // SIGKILL of a bank: its key goes when its lease runs out.
    c.banks[1].kill9();
    let gone = c.wait(&mut banks, "BankB's key to go after SIGKILL", |v| !addresses(v).contains(&bank_b));
    println!("figure: BankB gone from etcd {} ms after SIGKILL (lease {TTL_MS} ms)", gone.as_millis());
    // It comes back with its new address, and registers with the gateway
    // it finds in etcd.
    c.banks[1] = start_bank_discovering(&c.dir.0, "BankB", &common::refs(&c.envs));
    let back = c.banks[1].addr.clone();
    c.wait(&mut banks, "BankB's key to come back", |v| addresses(v).contains(&back));
    common::wait_registered_at(&c.dir.0, Some(&gw), &["BankA", "BankB"]);
    let r = c.pay("user1@BankA", "user2@BankB", "1.00");
    assert_eq!(r.json()["status"], "committed", "{r:?}");

    // SIGSTOP of the gateway: its key goes with its lease; SIGCONT brings
    // it back (the lease was lost, so it registers again).
    c.gateway.signal(nix::sys::signal::Signal::SIGSTOP);
    let paused =
        c.wait(&mut gateways, "the paused gateway's key to go", |v| v.live && addresses(v).is_empty());
    println!("figure: gateway gone from etcd {} ms after SIGSTOP", paused.as_millis());
    c.gateway.signal(nix::sys::signal::Signal::SIGCONT);
    c.wait(&mut gateways, "the resumed gateway's key", |v| addresses(v) == vec![gw.clone()]);

    // SIGTERM: the key goes at once (the lease is revoked).
    c.banks[0].signal(nix::sys::signal::Signal::SIGTERM);
    let a = c.banks[0].addr.clone();
    c.wait(&mut banks, "BankA's key to go at SIGTERM", |v| !addresses(v).contains(&a));
    let _ = common::wait_exit(&mut c.banks[0].child);
}

#[test]
fn payments_go_on_while_etcd_is_down_and_registrations_come_back() {
    let mut c = Discovered::start("etcd-down");
    c.login("user1", "BankA");
    let (_stop_b, mut banks) = c.watch(etcd::BANKS_PREFIX);
    c.wait(&mut banks, "both banks' keys", |v| v.live && v.entries.len() == 2);

    c.etcd.kill();
    c.wait(&mut banks, "the watch to see etcd down", |v| !v.live);
    // Longer than a lease: the gateway and banks keep the last known set.
    let until = Instant::now() + Duration::from_millis(2 * TTL_MS.parse::<u64>().expect("ttl"));
    let mut committed = 0;
    while Instant::now() < until || committed < 3 {
        let r = c.pay("user1@BankA", "user2@BankB", "0.01");
        assert_eq!(r.code, 0, "paying while etcd is down: {r:?}");
        assert_eq!(r.json()["status"], "committed", "{r:?}");
        committed += 1;
    }
    let log = std::fs::read_to_string(c.dir.0.join("logs").join("gateway.log")).unwrap_or_default();
    let said = log.contains("etcd watch broken") || log.contains("lost the etcd lease");
    let stderr_said = std::fs::read_dir(&c.dir.0)
        .expect("dir")
        .filter_map(Result::ok)
        .filter(|e| e.file_name().to_string_lossy().starts_with("stderr-"))
        .any(|e| std::fs::read_to_string(e.path()).is_ok_and(|t| t.contains("etcd watch broken")));
    assert!(said || stderr_said, "the servers said etcd is down");

    c.rt.block_on(c.etcd.restart()).unwrap_or_else(|e| panic!("{e:#}"));
    let gw = c.gateway.addr.clone();
    let (_stop_g, mut gateways) = c.watch(etcd::GATEWAYS_PREFIX);
    c.wait(&mut gateways, "the gateway registered again", |v| v.live && addresses(v) == vec![gw.clone()]);
    c.wait(&mut banks, "the banks registered again", |v| v.live && v.entries.len() == 2);
    let r = c.pay("user1@BankA", "user2@BankB", "0.01");
    assert_eq!(r.json()["status"], "committed", "{r:?}");
    let audit = common::wait_audit_ok(&c.dir.0);
    assert_eq!(audit["ok"], true, "{audit}");
    drop(c.banks.drain(..));
}
