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
