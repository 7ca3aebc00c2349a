//! Real network partitions: every party in a network namespace of its own
//! (`common/netns.rs`: hosts behind a router; a cut is a silent drop at the
//! router, both ways), real processes, real mutual TLS (names checked by
//! the identities' DNS names, while every address is a 10.77.x.2), two
//! gateway replicas on a real PostgreSQL server that listens in its own
//! namespace, banks on SQLite.
//!
//! - a client cut off from one gateway fails over at once (hedged connect)
//!   and every payment commits through the other;
//! - a gateway cut off from the database: its customers fail over to the
//!   other, nothing is decided twice, no hold is left after healing;
//! - a bank cut off from both gateways: its payments decline
//!   (`bank_unavailable`) within the prepare timeout, other banks' payments
//!   go on, and its holds converge after healing; and the same with
//!   discovery through etcd, which runs on a host of its own and which the
//!   cut bank still reaches (its key stays: etcd says where, not whether a
//!   call gets through).
//!
//! After each: `strife audit` agrees (money conserved, one outcome per
//! payment everywhere, no hold), and balances are the committed payments,
//! each once. Needs root and iproute2 (it fails, naming them, without).

mod common;

use common::netns::{self, Host, NETWORK, Net};
use common::*;
use std::net::IpAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use strife_core::Secret;
use strife_rpc::etcd_server::EtcdServer;
use strife_rpc::postgres_server::{INSTALL_COMMAND, Lifetime, Listen, PostgresServer};

const GATEWAYS: usize = 2;
/// The gateways' database on the run's own server.
const GATEWAY_DB: &str = "part_gateway";

#[test]
fn the_private_network_cuts_and_heals() {
    netns::self_check();
}

/// Two gateways (on PostgreSQL) and banks, each process on a host of its
/// own, and a client host. Fields drop in order: processes, the database
/// server, the directory, and the network last.
struct World {
    /// With discovery through etcd: its host and the server.
    etcd: Option<(Host, EtcdServer)>,
    gateways: Vec<Proc>,
    banks: Vec<Proc>,
    pg: PostgresServer,
    store: Secret<String>,
    dir: TempDir,
    client: Host,
    db: Host,
    gateway_hosts: Vec<Host>,
    bank_hosts: Vec<Host>,
    /// Every gateway's address, comma-separated, as clients take it.
    list: String,
    net: Net,
}

impl World {
    fn start(tag: &str, banks: &[&str], env: &[(&str, &str)]) -> World {
        Self::start_with(tag, banks, env, false)
    }

    /// With `etcd`, a private etcd on a host of its own, and every server
    /// registering there and finding the others there.
    fn start_with(tag: &str, banks: &[&str], env: &[(&str, &str)], etcd: bool) -> World {
        let net = Net::new();
        let client = net.host("client");
        let db = net.host("db");
        let gateway_hosts: Vec<Host> = (1..=GATEWAYS).map(|i| net.host(&format!("gw{i}"))).collect();
        let bank_hosts: Vec<Host> = banks.iter().map(|b| net.host(&b.to_lowercase())).collect();

        let base = std::env::temp_dir().join(format!("strife-netpg-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let listen =
            Listen { address: IpAddr::V4(db.addr()), clients: Some((IpAddr::V4(NETWORK.0), NETWORK.1)) };
        let pg = db
            .run(|| PostgresServer::start_listening(&base, Lifetime::Temporary, listen))
            .unwrap_or_else(|e| panic!("{e:#}\n(install PostgreSQL with: {INSTALL_COMMAND})"));
        let store =
            db.run(|| pg.create_private_database(GATEWAY_DB, GATEWAY_DB)).expect("gateways' database");

        let dir = TempDir::new(tag);
        let mut init = vec!["certs", "init"];
        for b in banks {
            init.extend(["--bank", b]);
        }
        let r = run_cli(&dir.0, &init, &[]);
        assert_eq!(r.code, 0, "certs init: {r:?}");

        let etcd = etcd.then(|| {
            let host = net.host("etcd");
            let (base, certs) = (dir.0.join("etcd"), strife_rpc::pki::CertDir::new(&dir.0));
            let names: Vec<String> = banks.iter().map(|b| b.to_string()).collect();
            let addr = host.addr().to_string();
            let server = host
                .run(|| {
                    let rt =
                        tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
                    rt.block_on(EtcdServer::start(&base, &certs, &addr, &names))
                })
                .unwrap_or_else(|e| panic!("{e:#}"));
            (host, server)
        });
        let discovery = etcd.as_ref().map(|(_, e)| e.url()).unwrap_or_default();
        let mut server_env: Vec<(&str, &str)> = FAST.to_vec();
        server_env.extend_from_slice(env);
        if etcd.is_some() {
            server_env.push(("STRIFE_DISCOVERY", &discovery));
        }
        let mut gateway_env = server_env.clone();
        gateway_env.push(("STRIFE_GATEWAY_STORE", store.expose()));
        let gateways: Vec<Proc> = gateway_hosts
            .iter()
            .map(|h| spawn(h, &dir.0, "gateway", &["gateway", "--listen", &h.listen_any()], &gateway_env))
            .collect();
        let list = gateways.iter().map(|g| g.addr.clone()).collect::<Vec<_>>().join(",");
        let banks: Vec<Proc> = banks
            .iter()
            .zip(&bank_hosts)
            .map(|(b, h)| {
                let args = ["bank", "--name", b, "--listen", &h.listen_any(), "--gateway", &list];
                spawn(h, &dir.0, b, &args, &server_env)
            })
            .collect();
        let w =
            World { etcd, gateways, banks, pg, store, dir, client, db, gateway_hosts, bank_hosts, list, net };
        let names: Vec<&str> = w.banks.iter().map(|b| b.name.as_str()).collect();
        for g in &w.gateways {
            w.wait_registered(&g.addr, &names);
        }
        w
    }

    fn path(&self) -> &std::path::Path {
        &self.dir.0
    }

    /// The client side: its host, the directory, both gateways.
    fn customer(&self) -> Customer {
        Customer { host: self.client.clone(), dir: self.path().to_path_buf(), list: self.list.clone() }
    }

    fn cli(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        self.customer().cli(args, envs)
    }

    fn login(&self, who: &str) {
        let (user, bank) = who.split_once('@').expect("user@bank");
        let password = format!("pass{}", &user[4..]);
        let r = self.cli(&["login", "--bank", bank, "--user", user], &[("STRIFE_PASSWORD", &password)]);
        assert_eq!(r.code, 0, "login {who}: {r:?}");
    }

    /// `(balance, available)` of `who`, asked until its bank answers: a
    /// gateway's connection to a bank that was cut off may stay silent for
    /// a while after healing (until TCP retransmits, or HTTP/2 keepalive
    /// gives it up and a new one is made), and it answers
    /// `BANK_UNAVAILABLE` meanwhile.
    fn balance(&self, who: &str) -> (i64, i64) {
        let (started, deadline) = (Instant::now(), Instant::now() + WAIT);
        let r = loop {
            let r = self.cli(&["--json", "--as", who, "balance"], &[]);
            if r.code == 0 || !r.stdout.contains("BANK_UNAVAILABLE") || Instant::now() >= deadline {
                break r;
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        if started.elapsed() > Duration::from_secs(1) {
            eprintln!("{who}'s bank answered its gateway again after {:?}", started.elapsed());
        }
        assert_eq!(r.code, 0, "balance {who}: {r:?}");
        let j = r.json();
        (minor(j["balance"].as_str().expect("balance")), minor(j["available"].as_str().expect("available")))
    }

    /// Waits until the gateway at `gateway`, asked from the client host,
    /// reports every bank of `names` registered and reachable.
    fn wait_registered(&self, gateway: &str, names: &[&str]) {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.client.cli(self.path(), &["--json", "--gateway", gateway, "status"], &[]);
            let live = r.code == 0
                && r.json()["banks"].as_array().is_some_and(|banks| {
                    names.iter().all(|n| banks.iter().any(|b| b["name"] == *n && b["reachable"] == true))
                });
            if live {
                return;
            }
            assert!(Instant::now() < deadline, "{names:?} never live at {gateway}: {r:?}");
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// `strife audit` from the client host until it agrees; its JSON.
    fn wait_audit_ok(&self) -> serde_json::Value {
        let deadline = Instant::now() + WAIT;
        loop {
            let r = self.client.cli(
                self.path(),
                &["--json", "audit"],
                &[("STRIFE_GATEWAY_STORE", self.store.expose())],
            );
            if r.code == 0 {
                return r.json();
            }
            assert!(Instant::now() < deadline, "the cluster never converged: {}{}", r.stdout, r.stderr);
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// `(payment id, state)` of every payment in the gateways' log.
    fn gateway_log(&self) -> Vec<(String, String)> {
        let pg = &self.pg;
        let out = self.db.run(|| pg.sql(GATEWAY_DB, &["SELECT payment_id || ' ' || state FROM payments"]));
        out.expect("the gateways' log")
            .lines()
            .filter_map(|l| l.split_once(' '))
            .map(|(id, state)| (id.to_owned(), state.to_owned()))
            .collect()
    }

    /// The addresses etcd lists for `bank`, read from etcd's own host.
    fn in_etcd(&self, bank: &str) -> Vec<String> {
        let (host, server) = self.etcd.as_ref().expect("etcd");
        let certs = strife_rpc::pki::CertDir::new(self.path());
        host.run(|| {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().expect("runtime");
            rt.block_on(async {
                let tls = strife_rpc::tls::Tls::load(&certs, &strife_rpc::Peer::Gateway).expect("tls");
                let etcd = strife_rpc::etcd::Etcd::connect(&tls, &server.url()).expect("etcd");
                let prefix = format!("{}{bank}/", strife_rpc::etcd::BANKS_PREFIX);
                let (entries, _) = etcd.range_prefix(&prefix).await.expect("range");
                entries
                    .values()
                    .filter_map(|v| serde_json::from_slice::<strife_rpc::etcd::Entry>(v).ok())
                    .map(|e| e.address)
                    .collect()
            })
        })
    }

    /// Legs of `bank` (SQLite) still prepared: holds waiting for a decision.
    fn prepared_legs(&self, bank: &str) -> i64 {
        let path = self.path().join("banks").join(bank).join("bank.db");
        let db = rusqlite::Connection::open_with_flags(&path, rusqlite::OpenFlags::SQLITE_OPEN_READ_ONLY)
            .expect("bank.db");
        db.query_row("SELECT count(*) FROM legs WHERE state = 'prepared'", [], |r| r.get(0)).expect("legs")
    }
}

/// Starts `strife --dir DIR ARGS` on `host` and waits for its listening
/// line.
fn spawn(host: &Host, dir: &std::path::Path, name: &str, args: &[&str], envs: &[(&str, &str)]) -> Proc {
    let mut cmd = host.command(BIN);
    cmd.arg("--dir").arg(dir).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let (child, line, lines, _log) = spawn_command_logged(cmd, dir, "listening on");
    let addr = line.rsplit(' ').next().expect("addr").to_owned();
    assert!(addr.starts_with(&host.addr().to_string()), "{name} listens on its host's address: {line}");
    Proc { name: name.into(), child, addr, lines }
}

/// What a customer's CLI needs; cloned into the payers' threads.
#[derive(Clone)]
struct Customer {
    host: Host,
    dir: std::path::PathBuf,
    list: String,
}

impl Customer {
    /// `strife ARGS` on the client host, given both gateways.
    fn cli(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        let mut env = vec![("STRIFE_GATEWAY", self.list.as_str())];
        env.extend_from_slice(envs);
        self.host.cli(&self.dir, args, &env)
    }
}

/// What one `strife pay` told its client.
#[derive(Debug, Clone)]
struct Paid {
    from: String,
    to: String,
    code: i32,
    status: Option<String>,
    reason: Option<String>,
    payment_id: Option<String>,
    /// Whether the client passed over `avoid` (its log says so).
    passed_over: bool,
    took: Duration,
}

/// `strife pay` of 1.00 on the client host, logging failovers.
fn pay(w: &Customer, from: &str, to: &str, avoid: &str) -> Paid {
    let started = Instant::now();
    let r = w.cli(
        &["--json", "--as", from, "pay", "--to", to, "--amount", "1.00"],
        &[("RUST_LOG", "strife_client=info")],
    );
    let took = started.elapsed();
    let j: serde_json::Value = serde_json::from_str(r.stdout.trim()).unwrap_or_default();
    let text = |k: &str| j[k].as_str().map(str::to_owned);
    Paid {
        from: from.into(),
        to: to.into(),
        code: r.code,
        status: text("status"),
        reason: text("reason"),
        payment_id: text("payment_id"),
        passed_over: r.stderr.lines().any(|l| l.contains("passed over") && l.contains(avoid)),
        took,
    }
}

/// Payers on the client host, each paying 1.00 in a loop until `stop`.
struct Payers {
    stop: Arc<AtomicBool>,
    paid: Arc<Mutex<Vec<Paid>>>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl Payers {
    fn start(w: &World, pairs: &[(&str, &str)], avoid: &str) -> Payers {
        let stop = Arc::new(AtomicBool::new(false));
        let paid = Arc::new(Mutex::new(Vec::new()));
        let threads = pairs
            .iter()
            .map(|(from, to)| {
                let (w, stop, paid) = (w.customer(), stop.clone(), paid.clone());
                let (from, to, avoid) = (from.to_string(), to.to_string(), avoid.to_owned());
                std::thread::spawn(move || {
                    while !stop.load(Ordering::SeqCst) {
                        let p = pay(&w, &from, &to, &avoid);
                        paid.lock().expect("paid").push(p);
                    }
                })
            })
            .collect();
        Payers { stop, paid, threads }
    }

    fn count(&self) -> usize {
        self.paid.lock().expect("paid").len()
    }

    /// Waits until `enough` holds of what was paid, within the bound.
    fn wait(&self, what: &str, enough: impl Fn(&[Paid]) -> bool) {
        let deadline = Instant::now() + WAIT * 2;
        while !enough(&self.paid.lock().expect("paid")) {
            assert!(
                Instant::now() < deadline,
                "{what} never happened: {:#?}",
                self.paid.lock().expect("paid")
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(self) -> Vec<Paid> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("payer");
        }
        Arc::try_unwrap(self.paid).expect("paid").into_inner().expect("paid")
    }
}

/// Opening balances (user N has N × 1000.00) plus the committed payments of
/// 1.00 each.
fn expected_balance(who: &str, paid: &[Paid]) -> i64 {
    let n: i64 = who[4..who.find('@').expect("@")].parse().expect("user number");
    let committed = paid.iter().filter(|p| p.code == 0);
    n * 100_000 - 100 * committed.clone().filter(|p| p.from == who).count() as i64
        + 100 * committed.filter(|p| p.to == who).count() as i64
}

/// The checks after healing: the audit agrees with `committed` payments and
/// no hold, and every customer's balance is exactly theirs.
fn check_converged(w: &World, who: &[&str], paid: &[Paid]) {
    let committed = paid.iter().filter(|p| p.code == 0).count();
    let audit = w.wait_audit_ok();
    assert_eq!(audit["conserved"], true, "{audit}");
    assert_eq!(audit["held"], "0.00", "{audit}");
    assert_eq!(audit["committed"], committed, "{audit}");
    for c in who {
        let want = expected_balance(c, paid);
        assert_eq!(w.balance(c), (want, want), "{c}: the committed payments, each once, nothing held");
    }
}

#[test]
fn a_client_cut_off_from_one_gateway_fails_over_at_once() {
    let w = World::start("part-client", &["BankA", "BankB"], &[]);
    let (a, b) = ("user1@BankA", "user2@BankB");
    w.login(a);
    w.login(b);
    let cut_off = w.gateways[0].addr.clone();
    let payers = Payers::start(&w, &[(a, b), (b, a)], &cut_off);
    payers.wait("payments before the cut", |p| p.len() >= 4);

    w.net.cut(&w.client, &w.gateway_hosts[0]);
    let at_cut = payers.count();
    payers.wait("payments that met the cut gateway", |p| {
        p.iter().skip(at_cut).filter(|p| p.passed_over).count() >= 3
    });
    w.net.heal(&w.client, &w.gateway_hosts[0]);
    let paid = payers.stop();

    for p in &paid {
        assert_eq!((p.code, p.status.as_deref()), (0, Some("committed")), "{p:?}");
    }
    let met: Vec<Duration> = paid.iter().skip(at_cut).filter(|p| p.passed_over).map(|p| p.took).collect();
    eprintln!(
        "{} payments, {} during the cut; {} met the cut gateway and committed through the other, taking {met:?}",
        paid.len(),
        paid.len() - at_cut,
        met.len()
    );
    check_converged(&w, &[a, b], &paid);
}

#[test]
fn a_gateway_cut_off_from_the_database_loses_its_customers_to_the_other_and_decides_nothing_twice() {
    let w = World::start("part-db", &["BankA", "BankB"], &[]);
    let (a, b) = ("user1@BankA", "user2@BankB");
    w.login(a);
    w.login(b);
    let cut_off = w.gateways[0].addr.clone();
    let payers = Payers::start(&w, &[(a, b), (b, a)], &cut_off);
    payers.wait("payments before the cut", |p| p.len() >= 4);

    w.net.cut(&w.gateway_hosts[0], &w.db);
    let at_cut = payers.count();
    payers.wait("customers of the cut gateway going to the other", |p| {
        p.iter().skip(at_cut).filter(|p| p.passed_over && p.code == 0).count() >= 2
    });
    w.net.heal(&w.gateway_hosts[0], &w.db);
    let paid = payers.stop();

    // A payment the cut gateway had begun when the cut came is decided by
    // it or, past its deadline, aborted by the other's sweep: either way
    // one decision, which every retry hears.
    for p in &paid {
        let ok = (p.code, p.status.as_deref()) == (0, Some("committed"))
            || (p.code, p.reason.as_deref()) == (3, Some("timeout"));
        assert!(ok, "{p:?}");
    }
    let log = w.gateway_log();
    for p in &paid {
        let id = p.payment_id.as_deref().expect("payment id");
        let states: Vec<&str> = log.iter().filter(|(i, _)| i == id).map(|(_, s)| s.as_str()).collect();
        let want = if p.code == 0 { "committed" } else { "aborted" };
        assert_eq!(states, [want], "payment {id}: one record, the decision its client heard");
    }
    // The healed gateway serves again, alone.
    let alone = w.client.cli(
        w.path(),
        &["--json", "--gateway", &cut_off, "--as", a, "pay", "--to", b, "--amount", "1.00"],
        &[],
    );
    assert_eq!((alone.code, alone.json()["status"].as_str()), (0, Some("committed")), "{alone:?}");
    let mut paid = paid;
    paid.push(Paid {
        from: a.into(),
        to: b.into(),
        code: 0,
        status: Some("committed".into()),
        reason: None,
        payment_id: alone.json()["payment_id"].as_str().map(str::to_owned),
        passed_over: false,
        took: Duration::ZERO,
    });
    let met: Vec<Duration> = paid.iter().skip(at_cut).filter(|p| p.passed_over).map(|p| p.took).collect();
    let declined = paid.iter().filter(|p| p.code != 0).count();
    eprintln!(
        "{} payments ({declined} declined at their deadline), {} during the cut; {} went on at the other gateway, \
         taking {met:?}",
        paid.len(),
        paid.len() - at_cut,
        met.len()
    );
    check_converged(&w, &[a, b], &paid);
}

#[test]
fn a_bank_cut_off_from_the_gateways_declines_within_the_prepare_timeout_and_its_holds_converge() {
    bank_cut_off_from_the_gateways(false);
}

#[test]
fn with_etcd_a_bank_cut_off_from_the_gateways_but_not_from_etcd_declines_and_converges() {
    bank_cut_off_from_the_gateways(true);
}

fn bank_cut_off_from_the_gateways(etcd: bool) {
    // A prepare timeout long enough to cut the bank while one of its holds
    // waits for the decision (see below); the deadline beyond it.
    let env = [("STRIFE_GATEWAY_PREPARE_TIMEOUT_MS", "4000"), ("STRIFE_GATEWAY_PAYMENT_DEADLINE_MS", "8000")];
    let tag = if etcd { "part-bank-etcd" } else { "part-bank" };
    let w = World::start_with(tag, &["BankA", "BankB", "BankC"], &env, etcd);
    let bank_b = w.banks[1].addr.clone();
    if etcd {
        let deadline = Instant::now() + WAIT;
        while w.in_etcd("BankB") != vec![bank_b.clone()] {
            assert!(Instant::now() < deadline, "BankB never registered in etcd");
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    let (a, b, c) = ("user1@BankA", "user1@BankB", "user1@BankC");
    for who in [a, b, c, "user2@BankA"] {
        w.login(who);
    }
    let mut paid = Vec::new();

    // A hold at BankB whose decision cannot reach it: BankA is paused, so a
    // payment from BankB to BankA waits for BankA's vote while BankB holds
    // the money; BankB is cut off then, and the payment declines at the
    // prepare timeout.
    w.banks[0].signal(nix::sys::signal::Signal::SIGSTOP);
    let customer = w.customer();
    let held = std::thread::scope(|s| {
        let payment = s.spawn(|| pay(&customer, b, "user2@BankA", ""));
        let deadline = Instant::now() + WAIT;
        while w.prepared_legs("BankB") == 0 {
            assert!(Instant::now() < deadline, "BankB never held the payment's money");
            std::thread::sleep(Duration::from_millis(5));
        }
        for g in &w.gateway_hosts {
            w.net.cut(&w.bank_hosts[1], g);
        }
        payment.join().expect("payment")
    });
    w.banks[0].signal(nix::sys::signal::Signal::SIGCONT);
    assert_eq!((held.code, held.reason.as_deref()), (3, Some("bank_unavailable")), "{held:?}");
    assert!(w.prepared_legs("BankB") > 0, "BankB still holds the money: it never heard the abort");
    paid.push(held);
    for g in &w.gateways {
        w.wait_registered(&g.addr, &["BankA", "BankC"]);
    }

    // While BankB is cut off: its payments, either way, decline; the
    // others' commit.
    for _ in 0..2 {
        for (from, to) in [(a, b), (b, c)] {
            let p = pay(&customer, from, to, "");
            assert_eq!((p.code, p.reason.as_deref()), (3, Some("bank_unavailable")), "{p:?}");
            eprintln!("{from} -> {to} declined in {:?} (prepare timeout 4 s)", p.took);
            paid.push(p);
        }
        for (from, to) in [(a, c), (c, a), (a, "user2@BankA")] {
            let p = pay(&customer, from, to, "");
            assert_eq!((p.code, p.status.as_deref()), (0, Some("committed")), "{p:?}");
            paid.push(p);
        }
    }
    assert!(w.prepared_legs("BankB") > 0, "BankB's hold waits while it is cut off");
    if etcd {
        // Still renewing its lease through etcd, which it reaches.
        assert_eq!(
            w.in_etcd("BankB"),
            vec![bank_b.clone()],
            "BankB's key stays while only the gateways are cut off"
        );
    }

    for g in &w.gateway_hosts {
        w.net.heal(&w.bank_hosts[1], g);
    }
    for g in &w.gateways {
        w.wait_registered(&g.addr, &["BankA", "BankB", "BankC"]);
    }
    check_converged(&w, &[a, b, c, "user2@BankA"], &paid);
    assert_eq!(w.prepared_legs("BankB"), 0, "BankB's holds converged");
}
