//! Test harness: real `strife` processes on 127.0.0.1 port 0, real TLS, real
//! SQLite in a temporary directory. Processes are killed when dropped.
#![allow(dead_code, unused_imports)]

pub mod browser;
pub mod fault;
pub mod grpc;
pub mod http;
pub mod netns;

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_strife");
/// Upper bound for anything a test waits on.
pub const WAIT: Duration = Duration::from_secs(60);

/// Short timeouts and heartbeats, so that faults resolve in a test's time:
/// a payment's deadline of 2 s, inquiries and registrations every 200 ms.
pub const FAST: &[(&str, &str)] = &[
    ("STRIFE_GATEWAY_PREPARE_TIMEOUT_MS", "1000"),
    ("STRIFE_GATEWAY_COMMIT_TIMEOUT_MS", "500"),
    ("STRIFE_GATEWAY_PAYMENT_DEADLINE_MS", "2000"),
    ("STRIFE_BANK_INQUIRY_INTERVAL_MS", "200"),
    ("STRIFE_BANK_REGISTER_INTERVAL_MS", "200"),
];

/// Owned environment pairs as the `&str` pairs the process helpers take.
pub fn refs(env: &[(String, String)]) -> Vec<(&str, &str)> {
    env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect()
}

/// A directory removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static N: AtomicU32 = AtomicU32::new(0);
        let path = std::env::temp_dir().join(format!(
            "strife-test-{tag}-{}-{}",
            std::process::id(),
            N.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&path);
        std::fs::create_dir_all(&path).expect("temp dir");
        TempDir(path)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A running server process.
pub struct Proc {
    pub name: String,
    pub child: Child,
    pub addr: String,
    /// Lines of stdout after the listening line.
    pub lines: mpsc::Receiver<String>,
}

impl Proc {
    pub fn pid(&self) -> nix::unistd::Pid {
        nix::unistd::Pid::from_raw(i32::try_from(self.child.id()).expect("pid"))
    }

    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(self.pid(), sig).expect("signal");
    }

    /// kill -9 and reap.
    pub fn kill9(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM; returns the exit code.
    pub fn stop(&mut self) -> Option<i32> {
        terminate(&mut self.child)
    }
}

/// What a server printed after its listening line on a line starting with
/// `prefix` (its metrics or dashboard address), within [`WAIT`].
pub fn printed_address(server: &Proc, prefix: &str) -> String {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = server.lines.recv_timeout(left).unwrap_or_else(|_| panic!("no line {prefix:?}"));
        if let Some(addr) = line.strip_prefix(prefix) {
            return addr.to_owned();
        }
    }
}

/// SIGTERM to `child`, then its exit code once it is gone.
pub fn terminate(child: &mut Child) -> Option<i32> {
    let pid = nix::unistd::Pid::from_raw(i32::try_from(child.id()).expect("pid"));
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).expect("signal");
    wait_exit(child)
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A `strife up` (or another process that stops its children on
/// SIGTERM), stopped however the test ends: SIGTERM, then SIGKILL if it
/// has not exited within [`WAIT`]. A test that panics while its cluster
/// runs would otherwise leave the cluster running. It derefs to the
/// [`Child`], so `terminate(&mut up)` and `up.id()` work as on the child;
/// once the test has stopped it, dropping does nothing. Never panics (it
/// may run while a panic unwinds).
pub struct Up(pub Child);

impl Drop for Up {
    fn drop(&mut self) {
        if !matches!(self.0.try_wait(), Ok(None)) {
            return;
        }
        if let Ok(pid) = i32::try_from(self.0.id()) {
            let pid = nix::unistd::Pid::from_raw(pid);
            let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        }
        let deadline = Instant::now() + WAIT;
        while Instant::now() < deadline {
            if !matches!(self.0.try_wait(), Ok(None)) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

impl std::ops::Deref for Up {
    type Target = Child;
    fn deref(&self) -> &Child {
        &self.0
    }
}

impl std::ops::DerefMut for Up {
    fn deref_mut(&mut self) -> &mut Child {
        &mut self.0
    }
}

pub fn wait_exit(child: &mut Child) -> Option<i32> {
    let deadline = Instant::now() + WAIT;
    while Instant::now() < deadline {
        if let Some(status) = child.try_wait().expect("wait") {
            return status.code();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    panic!("process did not exit within {WAIT:?}");
}

/// Starts `strife <args>` and waits for a stdout line containing `marker`;
/// returns the process and that line.
pub fn spawn_until(
    dir: &Path,
    args: &[&str],
    marker: &str,
    envs: &[(&str, &str)],
) -> (Child, String, mpsc::Receiver<String>) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--dir").arg(dir).args(args);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    spawn_command_until(cmd, dir, marker)
}

/// Starts `cmd` (its stderr goes to a file in `err_dir`) and waits for a
/// stdout line containing `marker`; returns the process and that line.
pub fn spawn_command_until(
    cmd: Command,
    err_dir: &Path,
    marker: &str,
) -> (Child, String, mpsc::Receiver<String>) {
    let (child, line, lines, _) = spawn_command_logged(cmd, err_dir, marker);
    (child, line, lines)
}

/// [`spawn_command_until`], also returning the file that gets the
/// process's stderr (its own log, where processes share a log file).
pub fn spawn_command_logged(
    mut cmd: Command,
    err_dir: &Path,
    marker: &str,
) -> (Child, String, mpsc::Receiver<String>, PathBuf) {
    static N: AtomicU32 = AtomicU32::new(0);
    let err_path = err_dir.join(format!("stderr-{}.log", N.fetch_add(1, Ordering::SeqCst)));
    let err_file = std::fs::File::create(&err_path).expect("stderr file");
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(err_file);
    let args: Vec<_> = cmd.get_args().map(|a| a.to_string_lossy().into_owned()).collect();
    let mut child = cmd.spawn().expect("spawn strife");
    let out = child.stdout.take().expect("stdout");
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(out).lines() {
            let Ok(line) = line else { break };
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match rx.recv_timeout(left) {
            Ok(line) if line.contains(marker) => return (child, line, rx, err_path),
            Ok(_) => continue,
            Err(_) => {
                let _ = child.kill();
                let status = child.wait().ok();
                let err = std::fs::read_to_string(&err_path).unwrap_or_default();
                panic!("strife {args:?} never printed {marker:?} (exit {status:?}); stderr:\n{err}");
            }
        }
    }
}

/// Output of one CLI run.
#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| panic!("not JSON ({e}): {self:?}"))
    }
}

/// A gateway and banks, started one by one like an operator would.
pub struct Cluster {
    pub dir: TempDir,
    pub gateway: Proc,
    pub banks: Vec<Proc>,
    pub bank_names: Vec<String>,
}

impl Cluster {
    pub fn start(banks: &[&str]) -> Cluster {
        Self::start_with(banks, &[])
    }

    /// Starts with extra environment (settings overrides) for the servers.
    pub fn start_with(banks: &[&str], envs: &[(&str, &str)]) -> Cluster {
        let dir = TempDir::new("cluster");
        let mut init = vec!["certs", "init"];
        for b in banks {
            init.push("--bank");
            init.push(b);
        }
        let r = run_cli(&dir.0, &init, &[]);
        assert_eq!(r.code, 0, "certs init: {r:?}");
        let gateway = start_gateway(&dir.0, "127.0.0.1:0", envs);
        let mut procs = Vec::new();
        for b in banks {
            procs.push(start_bank(&dir.0, b, &gateway.addr, envs));
        }
        let c =
            Cluster { dir, gateway, banks: procs, bank_names: banks.iter().map(|s| s.to_string()).collect() };
        c.wait_registered();
        c
    }

    pub fn path(&self) -> &Path {
        &self.dir.0
    }

    pub fn cli(&self, args: &[&str]) -> Run {
        run_cli(&self.dir.0, args, &[])
    }

    pub fn cli_env(&self, args: &[&str], envs: &[(&str, &str)]) -> Run {
        run_cli(&self.dir.0, args, envs)
    }

    /// Waits until the gateway reports every bank registered and live.
    pub fn wait_registered(&self) {
        let names: Vec<&str> = self.bank_names.iter().map(String::as_str).collect();
        wait_registered(&self.dir.0, &names);
    }

    /// Logs `user@bank` in (sessions live side by side; use `--as`).
    pub fn login(&self, user: &str, bank: &str) {
        let n: String = user.chars().filter(char::is_ascii_digit).collect();
        let r = self
            .cli_env(&["login", "--bank", bank, "--user", user], &[("STRIFE_PASSWORD", &format!("pass{n}"))]);
        assert_eq!(r.code, 0, "login {user}@{bank}: {r:?}");
    }

    /// `(balance, available)` of a logged-in customer, in minor units.
    pub fn balance(&self, who: &str) -> (i64, i64) {
        let r = self.cli(&["--json", "--as", who, "balance"]);
        assert_eq!(r.code, 0, "balance {who}: {r:?}");
        let j = r.json();
        (minor(j["balance"].as_str().expect("balance")), minor(j["available"].as_str().expect("available")))
    }

    pub fn pay(&self, from: &str, to: &str, amount: &str) -> Run {
        self.cli(&["--json", "--as", from, "pay", "--to", to, "--amount", amount])
    }

    pub fn restart_gateway(&mut self) {
        let addr = self.gateway.addr.clone();
        self.gateway.stop();
        self.gateway = start_gateway(&self.dir.0, &addr, &[]);
        self.wait_registered();
    }

    pub fn bank_index(&self, name: &str) -> usize {
        self.bank_names.iter().position(|n| n == name).expect("bank")
    }
}

/// Waits until the gateway of the cluster in `dir` reports every bank in
/// `names` registered and live.
pub fn wait_registered(dir: &Path, names: &[&str]) {
    wait_registered_at(dir, None, names);
}

/// Waits until the gateway at `gateway` (default: the cluster's in `dir`)
/// reports every bank in `names` registered and live.
pub fn wait_registered_at(dir: &Path, gateway: Option<&str>, names: &[&str]) {
    let deadline = Instant::now() + WAIT;
    let mut args = vec!["--json", "status"];
    if let Some(addr) = gateway {
        args.splice(0..0, ["--gateway", addr]);
    }
    loop {
        let r = run_cli(dir, &args, &[]);
        if r.code == 0 {
            let s = r.json();
            let live = s["banks"]
                .as_array()
                .map(|banks| {
                    names.iter().all(|n| banks.iter().any(|b| b["name"] == *n && b["reachable"] == true))
                })
                .unwrap_or(false);
            if live {
                return;
            }
        }
        assert!(Instant::now() < deadline, "banks never registered: {r:?}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

pub fn start_gateway(dir: &Path, listen: &str, envs: &[(&str, &str)]) -> Proc {
    let (child, line, lines) = spawn_until(dir, &["gateway", "--listen", listen], "listening on", envs);
    let addr = line.rsplit(' ').next().expect("addr").to_owned();
    Proc { name: "gateway".into(), child, addr, lines }
}

pub fn start_bank(dir: &Path, name: &str, gateway: &str, envs: &[(&str, &str)]) -> Proc {
    let (child, line, lines) = spawn_until(
        dir,
        &["bank", "--name", name, "--listen", "127.0.0.1:0", "--gateway", gateway],
        "listening on",
        envs,
    );
    let addr = line.rsplit(' ').next().expect("addr").to_owned();
    Proc { name: name.into(), child, addr, lines }
}

/// [`start_bank`], also returning the file that gets the process's stderr:
/// its own log, where two processes of one bank share `DIR/logs`.
pub fn start_bank_logged(dir: &Path, name: &str, gateway: &str, envs: &[(&str, &str)]) -> (Proc, PathBuf) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--dir").arg(dir).args(["bank", "--name", name, "--listen", "127.0.0.1:0", "--gateway", gateway]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let (child, line, lines, log) = spawn_command_logged(cmd, dir, "listening on");
    let addr = line.rsplit(' ').next().expect("addr").to_owned();
    (Proc { name: name.into(), child, addr, lines }, log)
}

/// [`start_gateway`], also returning the file that gets its stderr.
pub fn start_gateway_logged(dir: &Path, listen: &str, envs: &[(&str, &str)]) -> (Proc, PathBuf) {
    let mut cmd = Command::new(BIN);
    cmd.arg("--dir").arg(dir).args(["gateway", "--listen", listen]);
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let (child, line, lines, log) = spawn_command_logged(cmd, dir, "listening on");
    let addr = line.rsplit(' ').next().expect("addr").to_owned();
    (Proc { name: "gateway".into(), child, addr, lines }, log)
}

/// Waits until the file at `path` has a line containing `needle`; returns
/// that line. Panics with the file's text if it does not within the bound.
pub fn wait_for_log_line(path: &Path, needle: &str) -> String {
    wait_for_log_lines(path, &[needle], 1).remove(0)
}

/// Waits until the file at `path` has `count` lines that contain every one
/// of `needles`; returns them.
pub fn wait_for_log_lines(path: &Path, needles: &[&str], count: usize) -> Vec<String> {
    let deadline = Instant::now() + WAIT;
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        let found: Vec<String> =
            text.lines().filter(|l| needles.iter().all(|n| l.contains(n))).map(str::to_owned).collect();
        if found.len() >= count {
            return found;
        }
        assert!(Instant::now() < deadline, "{} never logged {count} × {needles:?}:\n{text}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The `(address, reachable)` of each replica of bank `name` in the status
/// of the gateway at `gateway`.
pub fn bank_replicas(dir: &Path, gateway: &str, name: &str) -> Vec<(String, bool)> {
    let r = run_cli(dir, &["--json", "--gateway", gateway, "status"], &[]);
    assert_eq!(r.code, 0, "status: {r:?}");
    let banks = r.json()["banks"].as_array().cloned().unwrap_or_default();
    banks
        .iter()
        .filter(|b| b["name"] == name)
        .map(|b| (b["address"].as_str().unwrap_or_default().to_owned(), b["reachable"] == true))
        .collect()
}

pub fn run_cli(dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    run_cli_with(Command::new(BIN), dir, args, envs)
}

/// `cmd` (the `strife` binary, or a command that runs it, such as `ip
/// netns exec NS strife`) with `--dir DIR ARGS`, run to its end.
pub fn run_cli_with(mut cmd: Command, dir: &Path, args: &[&str], envs: &[(&str, &str)]) -> Run {
    cmd.arg("--dir").arg(dir).args(args).stdin(Stdio::null()).env_remove("STRIFE_PASSWORD");
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let out = cmd.output().expect("run strife");
    Run {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    }
}

/// One `strife --dir DIR` invocation for [`run_cli_concurrently`].
#[derive(Debug, Clone)]
pub struct Invocation {
    pub args: Vec<String>,
    /// Extra environment (STRIFE_PASSWORD is removed otherwise).
    pub envs: Vec<(String, String)>,
}

impl Invocation {
    pub fn new(args: &[&str]) -> Invocation {
        Invocation { args: args.iter().map(|a| a.to_string()).collect(), envs: Vec::new() }
    }

    pub fn env(mut self, key: &str, value: &str) -> Invocation {
        self.envs.push((key.to_owned(), value.to_owned()));
        self
    }
}

/// Runs every invocation as its own process, all at once (each is started
/// before any is waited for); the outputs in order.
pub fn run_cli_concurrently(dir: &Path, runs: &[Invocation]) -> Vec<Run> {
    let children: Vec<Child> = runs
        .iter()
        .map(|run| {
            let mut cmd = Command::new(BIN);
            cmd.arg("--dir")
                .arg(dir)
                .args(&run.args)
                .stdin(Stdio::null())
                .stdout(Stdio::piped())
                .stderr(Stdio::piped())
                .env_remove("STRIFE_PASSWORD")
                .envs(run.envs.iter().map(|(k, v)| (k, v)));
            cmd.spawn().expect("spawn strife")
        })
        .collect();
    children
        .into_iter()
        .map(|child| {
            let out = child.wait_with_output().expect("wait for strife");
            Run {
                code: out.status.code().unwrap_or(-1),
                stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
                stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
            }
        })
        .collect()
}

/// "12.50" -> 1250
pub fn minor(text: &str) -> i64 {
    let (w, f) = text.split_once('.').expect("two decimals");
    let sign = if w.starts_with('-') { -1 } else { 1 };
    sign * (w.trim_start_matches('-').parse::<i64>().expect("whole") * 100 + f.parse::<i64>().expect("cents"))
}

/// Runs `strife audit` until it reports that everything agrees; returns its
/// JSON. Panics with the last report if it does not within the bound.
pub fn wait_audit_ok(dir: &Path) -> Value {
    wait_audit_ok_with(dir, &[])
}

/// [`wait_audit_ok`] with extra environment (settings overrides, e.g. the
/// gateway's store).
pub fn wait_audit_ok_with(dir: &Path, envs: &[(&str, &str)]) -> Value {
    let deadline = Instant::now() + WAIT;
    loop {
        let r = run_cli(dir, &["--json", "audit"], envs);
        if r.code == 0 {
            return r.json();
        }
        assert!(Instant::now() < deadline, "the cluster never converged: {}", r.stdout);
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The seeded PRNG, so a failing run can be replayed, and its seed.
pub use strife_core::rng::{SplitMix64 as Rng, seed_from_env};

/// Decodes base64 in `alphabet` (standard or URL-safe), skipping padding
/// and white space.
pub fn decode_base64(text: &str, alphabet: &[u8; 64]) -> Vec<u8> {
    let (mut bits, mut n, mut out) = (0u32, 0u32, Vec::with_capacity(text.len() * 3 / 4));
    for ch in text.bytes().filter(|c| *c != b'=' && !c.is_ascii_whitespace()) {
        let v = alphabet.iter().position(|&a| a == ch).expect("base64") as u32;
        bits = (bits << 6) | v;
        n += 6;
        if n >= 8 {
            n -= 8;
            out.push((bits >> n) as u8);
            bits &= (1 << n) - 1;
        }
    }
    out
}
