//! Clients that find the gateways in etcd, and `strife up --etcd` (issue
//! 12): real etcd, real gateways and banks, the real CLI. Without etcd (or,
//! for `up`, PostgreSQL) installed these tests fail with the command that
//! installs it.
mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::{Duration, Instant};
use strife_rpc::Peer;
use strife_rpc::etcd::{self, Entry, Etcd};
use strife_rpc::etcd_server::EtcdServer;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use tokio::sync::watch;

/// Whether `pid` is a live process (a zombie is not).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// A port of 127.0.0.1 nothing listens on (it was free a moment ago).
fn dead_port() -> u16 {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    listener.local_addr().expect("addr").port()
}

/// A client directory holding only the client's certificates from
/// `cluster`: no gateway address, no instance list, so a command there
/// finds the gateways through discovery or not at all.
fn bare_client_dir(cluster: &Path, tag: &str) -> TempDir {
    let dir = TempDir::new(tag);
    std::fs::create_dir_all(dir.0.join("certs")).expect("certs");
    for file in ["ca.pem", "client.pem", "client.key", "crl.pem"] {
        let from = cluster.join("certs").join(file);
        if from.exists() {
            std::fs::copy(&from, dir.0.join("certs").join(file)).expect(file);
        }
    }
    dir
}

fn login_with(dir: &Path, extra: &[&str], user: &str, bank: &str) {
    let n: String = user.chars().filter(char::is_ascii_digit).collect();
    let mut args = extra.to_vec();
    args.extend_from_slice(&["login", "--bank", bank, "--user", user]);
    let r = run_cli(dir, &args, &[("STRIFE_PASSWORD", &format!("pass{n}"))]);
    assert_eq!(r.code, 0, "login {user}@{bank}: {r:?}");
}

/// The gateways' keys in etcd, read as a client (bounded wait until `pred`).
fn wait_gateway_keys(rt: &tokio::runtime::Runtime, etcd: &Etcd, what: &str, pred: impl Fn(usize) -> bool) {
    let deadline = Instant::now() + WAIT;
    loop {
        let keys = rt.block_on(etcd.range_prefix(etcd::GATEWAYS_PREFIX)).map(|(k, _)| k.len());
        if keys.as_ref().is_ok_and(|n| pred(*n)) {
            return;
        }
        assert!(Instant::now() < deadline, "timed out waiting for {what}: {keys:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A client with discovery uses what etcd lists (here a registration the
/// test makes for today's gateway); with etcd down it uses the static set
/// and says so on stderr; with nothing registered a payment is queued; an
/// explicit --gateway wins over discovery.
#[test]
fn clients_find_the_gateways_in_etcd_and_fall_back_when_it_cannot_be_reached() {
    let cluster = Cluster::start(&["BankA", "BankB"]);
    let rt = common::grpc::runtime();
    let _in_runtime = rt.enter();
    let certs = CertDir::new(cluster.path());
    let banks = vec!["BankA".to_owned(), "BankB".to_owned()];
    let server = rt
        .block_on(EtcdServer::start(&cluster.path().join("etcd"), &certs, "127.0.0.1", &banks))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = server.url();
    let as_gateway = Etcd::connect(&Tls::load(&certs, &Peer::Gateway).expect("tls"), &url).expect("etcd");
    let as_client =
        Etcd::connect(&Tls::load(&certs, &Peer::Client("client".into())).expect("tls"), &url).expect("etcd");
    let (stop_tx, stop) = watch::channel(false);
    let address = cluster.gateway.addr.clone();
    let _registration = rt.block_on(async {
        etcd::register(
            as_gateway,
            etcd::gateway_key("test-gateway"),
            move || Entry::new(&address, "test-gateway"),
            etcd::DEFAULT_TTL,
            stop,
        )
    });
    wait_gateway_keys(&rt, &as_client, "the registration", |n| n == 1);

    // A directory that knows no gateway: only etcd can say where it is.
    let bare = bare_client_dir(cluster.path(), "bare-client");
    let d = &bare.0;
    let discovery = ["--discovery", url.as_str()];
    login_with(d, &discovery, "user1", "BankA");
    let mut args = discovery.to_vec();
    args.extend_from_slice(&["--json", "pay", "--to", "user2@BankB", "--amount", "3.25"]);
    let r = run_cli(d, &args, &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    assert!(r.stderr.is_empty(), "nothing said when etcd answers: {r:?}");
    // STRIFE_DISCOVERY does the same as the flag.
    let r = run_cli(d, &["--json", "history"], &[("STRIFE_DISCOVERY", &url)]);
    assert_eq!(r.json()["payments"][0]["amount"], "3.25", "{r:?}");
    // So does DIR/etcd.url (what `up --etcd` writes).
    std::fs::write(d.join("etcd.url"), format!("{url}\n")).expect("etcd.url");
    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!((r.code, r.json()["balance"].as_str()), (0, Some("996.75")), "{r:?}");
    // The shell keeps a watch on the gateways' keys and calls through it.
    let mut shell = std::process::Command::new(BIN)
        .arg("--dir")
        .arg(d)
        .args(["--discovery", &url, "shell"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("shell");
    {
        use std::io::Write;
        let mut input = shell.stdin.take().expect("stdin");
        input.write_all(b"2\n0\n").expect("menu choices");
    }
    let out = shell.wait_with_output().expect("shell output");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("balance 996.75"), "{text}\n{}", String::from_utf8_lossy(&out.stderr));

    // `status` shows what etcd lists: the gateway, its lease age, its health.
    let r = run_cli(cluster.path(), &["--discovery", &url, "--json", "status"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let seen = &r.json()["discovery"];
    assert_eq!(seen["reachable"], true, "{r:?}");
    let listed = seen["instances"].as_array().expect("instances");
    let gateway = listed.iter().find(|i| i["role"] == "gateway").expect("the gateway in etcd");
    assert_eq!(gateway["address"], cluster.gateway.addr.as_str(), "{gateway}");
    assert_eq!(gateway["healthy"], true, "{gateway}");
    assert!(gateway["lease_age_ms"].as_u64().is_some(), "{gateway}");

    // etcd unreachable: the static set (DIR/gateway.addr), said in one line.
    let dead = format!("etcd://127.0.0.1:{}", dead_port());
    login_with(cluster.path(), &[], "user3", "BankA");
    let r = run_cli(
        cluster.path(),
        &["--discovery", &dead, "--json", "pay", "--to", "user2@BankB", "--amount", "1"],
        &[],
    );
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let said: Vec<&str> = r.stderr.lines().collect();
    assert_eq!(said.len(), 1, "one line on stderr: {r:?}");
    assert!(said[0].contains("cannot be reached") && said[0].contains("gateway.addr"), "{r:?}");
    let r = run_cli(cluster.path(), &["--discovery", &dead, "--json", "status"], &[]);
    assert_eq!((r.code, &r.json()["discovery"]["reachable"]), (0, &Value::Bool(false)), "{r:?}");

    // An explicit gateway wins: etcd is not asked.
    let r = run_cli(d, &["--gateway", &cluster.gateway.addr, "--discovery", &dead, "--json", "balance"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    assert!(r.stderr.is_empty(), "{r:?}");

    // Nothing registered: as if no gateway answered; the payment waits.
    stop_tx.send_replace(true);
    wait_gateway_keys(&rt, &as_client, "the key to go", |n| n == 0);
    let mut args = discovery.to_vec();
    args.extend_from_slice(&["--json", "pay", "--to", "user2@BankB", "--amount", "1"]);
    let r = run_cli(d, &args, &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (4, Some("queued")), "{r:?}");
    let r = run_cli(d, &["--json", "outbox", "list"], &[]);
    assert_eq!(r.json()["pending"].as_array().map(Vec::len), Some(1), "{r:?}");
    drop(server);
}

/// `strife status --json` once `ready` holds (bounded).
fn status_when(dir: &Path, args: &[&str], ready: impl Fn(&Value) -> bool) -> Value {
    let deadline = Instant::now() + WAIT;
    let mut full = args.to_vec();
    full.extend_from_slice(&["--json", "status"]);
    loop {
        let r = run_cli(dir, &full, &[]);
        if r.code == 0 && ready(&r.json()) {
            return r.json();
        }
        assert!(Instant::now() < deadline, "the cluster's status never settled: {r:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn registered<'a>(status: &'a Value, role: &str) -> Vec<&'a Value> {
    status["discovery"]["instances"]
        .as_array()
        .map(|list| list.iter().filter(|i| i["role"] == role).collect())
        .unwrap_or_default()
}

fn listed<'a>(status: &'a Value, role: &str) -> Vec<&'a Value> {
    status["instances"]
        .as_array()
        .map(|list| list.iter().filter(|i| i["role"] == role).collect())
        .unwrap_or_default()
}

/// `up --etcd auto --gateways 2 --postgres auto`: every server registers
/// in the private etcd, a client finds the gateways there, status shows
/// each instance with its lease age, a gateway killed with SIGKILL is
/// passed over, and SIGTERM to `up` leaves no etcd behind. Needs gateways
/// and banks that register themselves in etcd when `discovery.url` is set.
#[test]
fn up_with_a_private_etcd_registers_every_server_and_clients_find_the_gateways_there() {
    let dir = TempDir::new("up-etcd");
    let d = &dir.0;
    let (up, ready, _lines) = spawn_until(
        d,
        &["up", "--port", "0", "--postgres", "auto", "--gateways", "2", "--etcd", "auto"],
        "strife: ready",
        &[],
    );
    let mut up = Up(up);
    let gateways: Vec<String> = ready
        .split_whitespace()
        .find_map(|w| w.strip_prefix("gateway="))
        .expect("gateway=")
        .split(',')
        .map(str::to_owned)
        .collect();
    assert_eq!(gateways.len(), 2, "{ready}");
    assert!(ready.contains("banks=BankA,BankB"), "{ready}");
    let url = std::fs::read_to_string(d.join("etcd.url")).expect("etcd.url").trim().to_owned();
    assert!(url.starts_with("etcd://127.0.0.1:"), "{url}");
    let mode = std::os::unix::fs::PermissionsExt::mode(
        &std::fs::metadata(d.join("etcd.url")).expect("meta").permissions(),
    );
    assert_eq!(mode & 0o777, 0o600, "etcd.url is private");

    // Status lists every server as etcd sees it, with lease ages.
    let status = status_when(d, &[], |s| {
        registered(s, "gateway").len() == 2
            && registered(s, "bank").len() == 2
            && registered(s, "gateway").iter().chain(&registered(s, "bank")).all(|i| i["healthy"] == true)
    });
    for i in registered(&status, "gateway").iter().chain(&registered(&status, "bank")) {
        assert!(i["lease_age_ms"].as_u64().is_some(), "{i}");
    }
    let mut in_etcd: Vec<String> = registered(&status, "gateway")
        .iter()
        .map(|g| g["address"].as_str().unwrap_or("").to_owned())
        .collect();
    in_etcd.sort();
    let mut expected = gateways.clone();
    expected.sort();
    assert_eq!(in_etcd, expected, "the gateways register the addresses they serve on");
    let etcd_pid = listed(&status, "etcd").first().and_then(|e| e["pid"].as_u64()).expect("etcd's pid");
    assert!(running(etcd_pid));
    for g in listed(&status, "gateway") {
        assert_eq!(g["registered"], true, "{g}");
    }

    // A client that knows only the etcd URL: login, pay, history.
    let bare = bare_client_dir(d, "up-etcd-client");
    let c = &bare.0;
    let discovery = ["--discovery", url.as_str()];
    login_with(c, &discovery, "user1", "BankA");
    let pay = |amount: &str| {
        let mut args = discovery.to_vec();
        args.extend_from_slice(&["--json", "pay", "--to", "user2@BankB", "--amount", amount]);
        run_cli(c, &args, &[])
    };
    let r = pay("12.50");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let mut args = discovery.to_vec();
    args.extend_from_slice(&["--json", "history"]);
    let r = run_cli(c, &args, &[]);
    assert_eq!(r.json()["payments"][0]["amount"], "12.50", "{r:?}");

    // One gateway killed: the client still pays, through the other (or
    // through the killed one's restart), with no line about etcd.
    let victim = listed(&status, "gateway")[0]["pid"].as_u64().expect("a gateway's pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(victim).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let r = pay("1");
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    assert!(r.stderr.is_empty(), "{r:?}");
    // From the cluster's own directory, with no flag (DIR/etcd.url).
    login_with(d, &[], "user3", "BankA");
    let r = run_cli(d, &["--json", "pay", "--to", "user1@BankA", "--amount", "2"], &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let audit = wait_audit_ok(d);
    assert_eq!(audit["committed"], 3, "{audit}");

    let pids: Vec<u64> = status["instances"]
        .as_array()
        .expect("instances")
        .iter()
        .filter_map(|i| i["pid"].as_u64())
        .filter(|p| *p != victim)
        .collect();
    assert_eq!(terminate(&mut up), Some(0), "up stops cleanly on SIGTERM");
    assert!(!running(etcd_pid), "etcd is stopped with the cluster");
    assert!(!d.join("etcd.url").exists(), "and clients are no longer sent to it");
    let left: Vec<u64> = pids.into_iter().filter(|p| running(*p)).collect();
    assert!(left.is_empty(), "processes left after up stopped: {left:?}");
}

/// A bad `--etcd` is refused before anything starts.
#[test]
fn up_refuses_a_bad_etcd_url_before_starting_anything() {
    let dir = TempDir::new("up-etcd-bad");
    let r = run_cli(&dir.0, &["up", "--port", "0", "--etcd", "http://127.0.0.1:1"], &[]);
    assert_eq!(r.code, 1, "{r:?}");
    assert!(r.stderr.contains("--etcd takes `auto`"), "{r:?}");
    assert!(!dir.0.join("gateway.addr").exists(), "nothing started");
}

/// `up --etcd URL` on a running etcd that trusts the cluster's CA: with
/// its root password (STRIFE_ETCD_ROOT_PASSWORD) `up` sets up its users and
/// roles, the servers register there, clients find the gateway there, and
/// `up` leaves that etcd running when it stops. Needs gateways and banks
/// that register themselves in etcd when `discovery.url` is set.
#[test]
fn up_with_an_etcd_url_provisions_it_with_the_root_password_and_leaves_it_running() {
    let dir = TempDir::new("up-etcd-url");
    let d = &dir.0;
    let r = run_cli(d, &["certs", "init"], &[]);
    assert_eq!(r.code, 0, "{r:?}");
    let rt = common::grpc::runtime();
    let _in_runtime = rt.enter();
    let outside = TempDir::new("etcd-outside");
    let certs = CertDir::new(d);
    // Provisioned for no bank: `up` must give BankA and BankB their users.
    let server = rt
        .block_on(EtcdServer::start(&outside.0, &certs, "127.0.0.1", &[]))
        .unwrap_or_else(|e| panic!("{e:#}"));
    let url = server.url();
    let password = server.root_password().expect("root password");
    let (up, _ready, _lines) = spawn_until(
        d,
        &["up", "--port", "0", "--etcd", &url],
        "strife: ready",
        &[("STRIFE_ETCD_ROOT_PASSWORD", password.expose())],
    );
    let mut up = Up(up);
    assert_eq!(std::fs::read_to_string(d.join("etcd.url")).expect("etcd.url").trim(), url);
    let status =
        status_when(d, &[], |s| registered(s, "gateway").len() == 1 && registered(s, "bank").len() == 2);
    let etcd = listed(&status, "etcd");
    assert_eq!(etcd.len(), 1, "{status}");
    assert_eq!(etcd[0]["pid"], Value::Null, "not a process of this cluster");

    let bare = bare_client_dir(d, "up-etcd-url-client");
    let c = &bare.0;
    login_with(c, &["--discovery", &url], "user2", "BankB");
    let r = run_cli(c, &["--discovery", &url, "--json", "pay", "--to", "user1@BankA", "--amount", "5"], &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");

    assert_eq!(terminate(&mut up), Some(0), "up stops cleanly on SIGTERM");
    let as_client =
        Etcd::connect(&Tls::load(&certs, &Peer::Client("client".into())).expect("tls"), &url).expect("etcd");
    assert!(rt.block_on(as_client.status()).is_ok(), "the etcd up did not start runs on");
    wait_gateway_keys(&rt, &as_client, "the stopped gateway's key to go", |n| n == 0);
    drop(server);
}
