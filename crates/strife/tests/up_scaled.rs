//! `strife up` on PostgreSQL: `--postgres auto` runs a private server that
//! `up` owns, `--gateways N --bank-replicas M` run replicas on it, `strife
//! status --json` lists every process, and SIGTERM to `up` leaves no process
//! behind. Real processes throughout; without PostgreSQL installed these
//! tests fail with the command that installs it.

mod common;

use common::*;
use serde_json::Value;
use std::path::Path;
use std::time::Instant;

/// Whether `pid` is a live process (a zombie is not).
fn running(pid: u64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
}

/// `strife status --json` of the cluster in `dir`, once `ready` says every
/// instance is there and healthy (bounded).
fn status_when(dir: &Path, ready: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = run_cli(dir, &["--json", "status"], &[]);
        if r.code == 0 {
            let instances = r.json()["instances"].as_array().cloned().unwrap_or_default();
            if ready(&instances) {
                return instances;
            }
        }
        assert!(Instant::now() < deadline, "the cluster's status never settled: {r:?}");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
}

fn all_healthy(instances: &[Value]) -> bool {
    !instances.is_empty() && instances.iter().all(|i| i["healthy"] == true && i["pid"].as_u64().is_some())
}

/// The instances of `role` named `name`.
fn of<'a>(instances: &'a [Value], role: &str, name: &str) -> Vec<&'a Value> {
    instances.iter().filter(|i| i["role"] == role && i["name"] == name).collect()
}

fn pids(instances: &[Value]) -> Vec<u64> {
    instances.iter().filter_map(|i| i["pid"].as_u64()).collect()
}

/// The addresses on the ready line.
fn ready_gateways(ready: &str) -> Vec<String> {
    let list = ready.split_whitespace().find_map(|w| w.strip_prefix("gateway=")).expect("gateway=");
    list.split(',').map(str::to_owned).collect()
}

fn login(dir: &Path, user: &str, bank: &str, gateways: &str) {
    let n: String = user.chars().filter(char::is_ascii_digit).collect();
    let r = run_cli(
        dir,
        &["--gateway", gateways, "login", "--bank", bank, "--user", user],
        &[("STRIFE_PASSWORD", &format!("pass{n}"))],
    );
    assert_eq!(r.code, 0, "login {user}@{bank}: {r:?}");
}

fn stop_and_check_nothing_is_left(up: &mut std::process::Child, pids: &[u64]) {
    assert_eq!(terminate(up), Some(0), "up stops cleanly on SIGTERM");
    let left: Vec<u64> = pids.iter().copied().filter(|p| running(*p)).collect();
    assert!(left.is_empty(), "processes left after up stopped: {left:?}");
}

/// Passes on today's servers: one gateway and one process per bank, their
/// data in a private PostgreSQL server that `up` starts, restarts with them
/// when one dies, and stops; a second `up` finds the data again.
#[test]
fn up_with_a_private_postgres_runs_the_cluster_on_it_and_stops_it() {
    let dir = TempDir::new("up-pg");
    let d = &dir.0;
    let (up, ready, _lines) =
        spawn_until(d, &["up", "--port", "0", "--postgres", "auto"], "strife: ready", &[]);
    let mut up = Up(up);
    let gateways = ready_gateways(&ready);
    assert_eq!(gateways.len(), 1, "{ready}");
    assert!(ready.contains("banks=BankA,BankB"), "{ready}");

    let instances = status_when(d, all_healthy);
    assert_eq!(of(&instances, "postgres", "postgres").len(), 1, "{instances:?}");
    assert_eq!(of(&instances, "gateway", "gateway").len(), 1, "{instances:?}");
    assert_eq!(of(&instances, "bank", "BankA").len(), 1, "{instances:?}");
    assert_eq!(of(&instances, "bank", "BankB").len(), 1, "{instances:?}");
    for p in pids(&instances) {
        assert!(running(p), "pid {p} runs");
    }

    login(d, "user1", "BankA", &gateways[0]);
    let r = run_cli(d, &["--json", "pay", "--to", "user2@BankB", "--amount", "12.50"], &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    assert!(!d.join("banks/BankA/bank.db").exists(), "BankA's ledger is in PostgreSQL, not SQLite");
    let audit = wait_audit_ok(d);
    assert_eq!(audit["committed"], 1, "{audit}");

    // A bank killed with SIGKILL is restarted on its address, and keeps what it acknowledged.
    let bank_a = of(&instances, "bank", "BankA")[0].clone();
    let old_pid = bank_a["pid"].as_u64().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(old_pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let instances = status_when(d, |list| {
        all_healthy(list) && of(list, "bank", "BankA").iter().all(|b| b["pid"].as_u64() != Some(old_pid))
    });
    assert_eq!(of(&instances, "bank", "BankA")[0]["address"], bank_a["address"], "restarted where it was");
    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!(r.json()["balance"], "987.50", "{r:?}");

    // PostgreSQL killed with SIGKILL is started again on its port, and
    // payments go on (one declined meanwhile moved nothing).
    let postgres_pid = of(&instances, "postgres", "postgres")[0]["pid"].as_u64().expect("pid");
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(postgres_pid).expect("pid")),
        nix::sys::signal::Signal::SIGKILL,
    )
    .expect("kill");
    let instances = status_when(d, |list| {
        all_healthy(list)
            && of(list, "postgres", "postgres").iter().all(|p| p["pid"].as_u64() != Some(postgres_pid))
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let r = run_cli(d, &["--json", "pay", "--to", "user2@BankB", "--amount", "1"], &[]);
        if r.code == 0 {
            break;
        }
        assert!(Instant::now() < deadline, "payments never resumed after PostgreSQL restarted: {r:?}");
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!(r.json()["balance"], "986.50", "{r:?}");
    wait_audit_ok(d);

    // Secrets: private files, and in no log.
    let mut passwords = Vec::new();
    for entry in std::fs::read_dir(d.join("stores")).expect("stores") {
        let path = entry.expect("entry").path();
        let mode =
            std::os::unix::fs::PermissionsExt::mode(&std::fs::metadata(&path).expect("meta").permissions());
        assert_eq!(mode & 0o777, 0o600, "{}", path.display());
        if path.extension().is_some_and(|e| e == "password") {
            passwords.push(std::fs::read_to_string(&path).expect("password").trim().to_owned());
        }
    }
    assert_eq!(passwords.len(), 3, "the gateways' and each bank's");
    for entry in std::fs::read_dir(d.join("logs")).expect("logs") {
        let path = entry.expect("entry").path();
        let log = std::fs::read_to_string(&path).expect("log");
        for password in &passwords {
            assert!(!log.contains(password.as_str()), "a database password in {}", path.display());
        }
    }

    stop_and_check_nothing_is_left(&mut up, &pids(&instances));
    assert!(!d.join("instances.json").exists(), "a stopped cluster lists no instances");

    // A second `up` on the same directory finds its data again.
    let (up, _ready, _lines) =
        spawn_until(d, &["up", "--port", "0", "--postgres", "auto"], "strife: ready", &[]);
    let mut up = Up(up);
    let r = run_cli(d, &["--json", "balance"], &[]);
    assert_eq!(r.json()["balance"], "986.50", "{r:?}");
    let instances = status_when(d, all_healthy);
    stop_and_check_nothing_is_left(&mut up, &pids(&instances));
}

/// Passes on today's servers: `--postgres URL` (here from STRIFE_POSTGRES,
/// off the command line) makes the cluster's roles and databases on a
/// running server, which `up` leaves running when it stops.
#[test]
fn up_with_a_postgres_url_keeps_its_databases_on_that_server() {
    let server = strife_rpc::postgres_server::shared_for_tests().unwrap_or_else(|e| panic!("{e}"));
    let admin = server.superuser_url("postgres");
    let dir = TempDir::new("up-url");
    let d = &dir.0;
    let (up, ready, _lines) =
        spawn_until(d, &["up", "--port", "0"], "strife: ready", &[("STRIFE_POSTGRES", admin.expose())]);
    let mut up = Up(up);
    let gateways = ready_gateways(&ready);
    login(d, "user2", "BankB", &gateways[0]);
    let r = run_cli(d, &["--json", "pay", "--to", "user1@BankA", "--amount", "2"], &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let instances = status_when(d, |list| list.len() == 4 && list.iter().all(|i| i["healthy"] == true));
    let postgres = of(&instances, "postgres", "postgres");
    assert_eq!(postgres[0]["address"], format!("127.0.0.1:{}", server.port()), "{instances:?}");
    assert_eq!(postgres[0]["pid"], Value::Null, "not a process of this cluster");
    let id = std::fs::read_to_string(d.join("stores/cluster.id")).expect("cluster id");
    let databases = server
        .sql(
            "postgres",
            &[&format!(
                "SELECT datname FROM pg_database WHERE datname LIKE 'strife_{}_%' ORDER BY 1",
                id.trim()
            )],
        )
        .expect("databases");
    let expected = ["bank_banka", "bank_bankb", "gateway"].map(|k| format!("strife_{}_{k}", id.trim()));
    assert_eq!(databases.lines().collect::<Vec<_>>(), expected, "one database per kind of server");
    stop_and_check_nothing_is_left(&mut up, &pids(&instances));
    assert_eq!(server.sql("postgres", &["SELECT 1"]).expect("the server runs on"), "1");
}

/// The scaled-out cluster. Needs gateways that share their store in
/// PostgreSQL (`gateway.store`) and a registry that takes several processes
/// of one bank, with banks that register with a list of gateways.
#[test]
fn up_runs_gateway_and_bank_replicas_on_postgres_and_sigterm_stops_every_one() {
    let dir = TempDir::new("up-scaled");
    let d = &dir.0;
    let (up, ready, _lines) = spawn_until(
        d,
        &["up", "--port", "0", "--postgres", "auto", "--gateways", "3", "--bank-replicas", "2"],
        "strife: ready",
        &[],
    );
    let mut up = Up(up);
    let gateways = ready_gateways(&ready);
    assert_eq!(gateways.len(), 3, "{ready}");
    assert!(
        gateways[0] != gateways[1] && gateways[1] != gateways[2] && gateways[0] != gateways[2],
        "{ready}"
    );
    assert!(ready.contains("banks=BankA,BankB"), "{ready}");
    let list = gateways.join(",");
    let written = std::fs::read_to_string(d.join("gateway.addr")).expect("gateway.addr");
    assert_eq!(written.trim(), list, "clients find every gateway");

    let instances = status_when(d, |list| all_healthy(list) && list.len() == 8);
    let listed_gateways: Vec<&Value> = of(&instances, "gateway", "gateway");
    assert_eq!(listed_gateways.len(), 3, "{instances:?}");
    for g in &listed_gateways {
        assert!(gateways.iter().any(|a| g["address"] == a.as_str()), "{g}");
    }
    for bank in ["BankA", "BankB"] {
        let replicas = of(&instances, "bank", bank);
        assert_eq!(replicas.len(), 2, "{bank}: {instances:?}");
        assert_ne!(replicas[0]["address"], replicas[1]["address"], "each replica its own port");
        assert_ne!(replicas[0]["pid"], replicas[1]["pid"]);
    }
    assert_eq!(of(&instances, "postgres", "postgres").len(), 1, "{instances:?}");
    let all = pids(&instances);
    assert_eq!(all.len(), 8, "{instances:?}");
    for p in &all {
        assert!(running(*p), "pid {p} runs");
    }

    // A payment through the list of gateways.
    login(d, "user1", "BankA", &list);
    let r =
        run_cli(d, &["--gateway", &list, "--json", "pay", "--to", "user2@BankB", "--amount", "12.50"], &[]);
    assert_eq!((r.code, r.json()["status"].as_str()), (0, Some("committed")), "{r:?}");
    let r = run_cli(d, &["--gateway", &list, "--json", "balance"], &[]);
    assert_eq!(r.json()["balance"], "987.50", "{r:?}");
    // Each gateway alone knows it (their store is shared).
    for gateway in &gateways {
        let r = run_cli(d, &["--gateway", gateway, "--json", "history"], &[]);
        assert_eq!(r.json()["payments"][0]["amount"], "12.50", "{gateway}: {r:?}");
    }
    // The payee sees it received, through another gateway; the audit agrees.
    login(d, "user2", "BankB", &gateways[2]);
    let r = run_cli(d, &["--gateway", &gateways[2], "--as", "user2@BankB", "--json", "history"], &[]);
    assert_eq!(r.json()["payments"][0]["direction"], "received", "{r:?}");
    let audit = wait_audit_ok(d);
    assert_eq!((audit["committed"].as_u64(), audit["held"].as_str()), (Some(1), Some("0.00")), "{audit}");

    stop_and_check_nothing_is_left(&mut up, &all);
}

/// Passes on today's servers: replicas need PostgreSQL, and `up` says so
/// before it starts anything.
#[test]
fn replicas_without_postgres_are_refused() {
    for flags in [&["--gateways", "2"][..], &["--bank-replicas", "3"]] {
        let dir = TempDir::new("up-refused");
        let mut args = vec!["up", "--port", "0"];
        args.extend_from_slice(flags);
        let r = run_cli(&dir.0, &args, &[]);
        assert_eq!(r.code, 1, "{flags:?}: {r:?}");
        assert!(r.stderr.contains("needs --postgres auto"), "{r:?}");
        assert!(!dir.0.join("gateway.addr").exists(), "nothing started");
    }
    let dir = TempDir::new("up-refused");
    let r = run_cli(&dir.0, &["up", "--gateways", "0"], &[]);
    assert_eq!(r.code, 2, "at least one gateway: {r:?}");
}
