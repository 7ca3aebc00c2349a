//! `strife up`: a whole local cluster in one command. Creates what is
//! missing in DIR (PKI, token key, settings), starts the gateway and one
//! server per bank as supervised child processes, waits until every bank is
//! registered, prints the ready line, and stops everything on Ctrl-C.

use anyhow::{Context, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;
use strife_rpc::Peer;
use strife_rpc::pki::CertDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};

/// How long a child may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `up` waits for every bank to register.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before restarting a child that died.
const RESTART_DELAY: Duration = Duration::from_secs(1);

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The banks to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "BankA,BankB")]
    banks: Vec<String>,
    /// The gateway's port on 127.0.0.1 (0 takes a free one).
    #[arg(long, default_value_t = 50051)]
    port: u16,
}

/// Every identity a cluster with `banks` needs, names checked.
pub fn identities(banks: &[String]) -> anyhow::Result<Vec<Peer>> {
    let mut peers = vec![Peer::Gateway, Peer::Client(strife_client::connect::CLIENT_NAME.to_owned())];
    for b in banks {
        strife_core::validate_bank_name(b).with_context(|| format!("bank '{b}'"))?;
        if peers.contains(&Peer::Bank(b.clone())) {
            bail!("bank '{b}' is named twice");
        }
        peers.push(Peer::Bank(b.clone()));
    }
    Ok(peers)
}

pub async fn run(dir: PathBuf, args: UpArgs) -> anyhow::Result<()> {
    if args.banks.is_empty() {
        bail!("name at least one bank with --banks");
    }
    let peers = identities(&args.banks)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    strife_rpc::telemetry::init("up", &dir, "info")?;
    let certs = CertDir::new(&dir);
    let created = certs.init(&peers)?;
    if !created.is_empty() {
        tracing::info!(created = ?created.iter().map(CertDir::file_stem).collect::<Vec<_>>(), "issued certificates");
    }
    strife_gateway::tokens::load_or_create_key(&certs.path)?;
    let config_file = dir.join(strife_rpc::config::CONFIG_FILE);
    if !config_file.exists() {
        strife_rpc::pki::write_public_file(&config_file, &strife_rpc::Config::default_toml())?;
    }
    // Fail early on a broken settings file, with its own message.
    strife_rpc::Config::load(&dir, None)?;

    let exe = std::env::current_exe().context("finding the strife binary")?;
    let (stop_tx, stop_rx) = watch::channel(false);
    let mut supervisors = Vec::new();

    let gateway_listen = format!("127.0.0.1:{}", args.port);
    let (ready_tx, ready_rx) = oneshot::channel();
    let spec = ChildSpec {
        name: "gateway".into(),
        exe: exe.clone(),
        dir: dir.clone(),
        args: vec!["gateway".into(), "--listen".into(), gateway_listen],
    };
    supervisors.push(tokio::spawn(supervise(spec, ready_tx, stop_rx.clone())));
    let gateway_addr = match tokio::time::timeout(START_TIMEOUT, ready_rx).await {
        Ok(Ok(Ok(addr))) => addr,
        Ok(Ok(Err(e))) => bail!("the gateway did not start: {e}"),
        _ => bail!("the gateway did not start within {START_TIMEOUT:?}"),
    };

    let mut bank_ready = Vec::new();
    for bank in &args.banks {
        let (tx, rx) = oneshot::channel();
        let spec = ChildSpec {
            name: bank.clone(),
            exe: exe.clone(),
            dir: dir.clone(),
            args: vec![
                "bank".into(),
                "--name".into(),
                bank.clone(),
                "--listen".into(),
                "127.0.0.1:0".into(),
                "--gateway".into(),
                gateway_addr.clone(),
            ],
        };
        supervisors.push(tokio::spawn(supervise(spec, tx, stop_rx.clone())));
        bank_ready.push((bank.clone(), rx));
    }
    for (bank, rx) in bank_ready {
        match tokio::time::timeout(START_TIMEOUT, rx).await {
            Ok(Ok(Ok(_))) => {}
            Ok(Ok(Err(e))) => {
                let _ = stop_tx.send(true);
                bail!("bank {bank} did not start: {e}");
            }
            _ => {
                let _ = stop_tx.send(true);
                bail!("bank {bank} did not start within {START_TIMEOUT:?}");
            }
        }
    }
    if let Err(e) = wait_registered(&dir, &gateway_addr, &args.banks).await {
        let _ = stop_tx.send(true);
        for s in supervisors {
            let _ = s.await;
        }
        return Err(e);
    }
    println!("strife: ready gateway={gateway_addr} banks={} dir={}", args.banks.join(","), dir.display());
    use std::io::Write;
    let _ = std::io::stdout().flush();

    strife_rpc::serve::shutdown_signal().await;
    tracing::info!("stopping the cluster");
    let _ = stop_tx.send(true);
    for s in supervisors {
        let _ = s.await;
    }
    tracing::info!("cluster stopped");
    Ok(())
}

/// Polls the gateway's status until every bank is registered and reachable.
async fn wait_registered(dir: &Path, gateway: &str, banks: &[String]) -> anyhow::Result<()> {
    use strife_proto::gateway::v1 as pb;
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut last = String::from("the gateway did not answer");
    while tokio::time::Instant::now() < deadline {
        if let Ok(channel) = strife_client::connect::connect(dir, gateway, Duration::from_secs(2)).await {
            let mut admin = pb::admin_service_client::AdminServiceClient::new(channel);
            match admin.status(pb::StatusRequest {}).await {
                Ok(resp) => {
                    let status = resp.into_inner();
                    let missing: Vec<&String> = banks
                        .iter()
                        .filter(|b| !status.banks.iter().any(|s| &s.name == *b && s.reachable))
                        .collect();
                    if missing.is_empty() {
                        return Ok(());
                    }
                    last = format!("waiting for {missing:?} to register");
                }
                Err(s) => last = s.message().to_owned(),
            }
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the cluster did not become ready within {READY_TIMEOUT:?}: {last}")
}

/// Servers that share one machine do best with one async worker each
/// (measured in BENCHMARKS.md); an explicit STRIFE_RUNTIME_WORKERS wins.
pub fn co_located_env() -> Option<(&'static str, &'static str)> {
    std::env::var_os("STRIFE_RUNTIME_WORKERS").is_none().then_some(("STRIFE_RUNTIME_WORKERS", "1"))
}

struct ChildSpec {
    /// The component's name, for logs.
    name: String,
    exe: PathBuf,
    dir: PathBuf,
    args: Vec<String>,
}

impl ChildSpec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        if let Some((k, v)) = co_located_env() {
            cmd.env(k, v);
        }
        cmd.arg("--dir")
            .arg(&self.dir)
            .args(&self.args)
            .arg("--supervised")
            // Our own process group: Ctrl-C reaches only `up`, which then
            // stops the children in order.
            .process_group(0)
            // With --supervised the child stops by itself if `up` dies,
            // even by kill -9.
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .kill_on_drop(true)
            .spawn()
            .with_context(|| format!("starting {}", self.name))
    }
}

/// Runs one child: starts it, reports its address once, restarts it if it
/// dies, and stops it gracefully when `stop` turns true.
async fn supervise(
    spec: ChildSpec,
    ready: oneshot::Sender<Result<String, String>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ready = Some(ready);
    loop {
        let mut child = match spec.spawn() {
            Ok(c) => c,
            Err(e) => {
                if let Some(tx) = ready.take() {
                    let _ = tx.send(Err(format!("{e:#}")));
                }
                return;
            }
        };
        let stdout = child.stdout.take();
        let addr = match stdout {
            Some(out) => listening_line(out).await,
            None => None,
        };
        match (addr, ready.take()) {
            (Some(addr), Some(tx)) => {
                let _ = tx.send(Ok(addr));
            }
            (None, Some(tx)) => {
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                let _ = tx.send(Err(format!(
                    "{} exited ({status}); see {}",
                    spec.name,
                    log_path(&spec).display()
                )));
                return;
            }
            (Some(_), None) => tracing::info!(component = %spec.name, "restarted"),
            (None, None) => {}
        }
        tokio::select! {
            status = child.wait() => {
                if *stop.borrow() {
                    return;
                }
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                tracing::error!(component = %spec.name, %status, "exited unexpectedly; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = stop.changed() => return,
                }
            }
            _ = stop.changed() => {
                terminate(&spec.name, &mut child).await;
                return;
            }
        }
    }
}

fn log_path(spec: &ChildSpec) -> PathBuf {
    spec.dir.join("logs").join(format!("{}.log", spec.name))
}

/// Reads the child's stdout until its `listening on ADDR` line, then keeps
/// draining it in the background so the child never blocks on a full pipe.
async fn listening_line(out: tokio::process::ChildStdout) -> Option<String> {
    let mut lines = BufReader::new(out).lines();
    let found = loop {
        match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if let Some((_, addr)) = line.split_once(" listening on ") {
                    break Some(addr.trim().to_owned());
                }
            }
            _ => break None,
        }
    };
    if found.is_some() {
        tokio::spawn(async move { while let Ok(Some(_)) = lines.next_line().await {} });
    }
    found
}

/// SIGTERM, then SIGKILL if it does not stop in time.
async fn terminate(name: &str, child: &mut Child) {
    if let Some(pid) = child.id().and_then(|p| i32::try_from(p).ok()) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
    }
    match tokio::time::timeout(STOP_TIMEOUT, child.wait()).await {
        Ok(_) => tracing::info!(component = %name, "stopped"),
        Err(_) => {
            tracing::warn!(component = %name, "did not stop in time; killing it");
            let _ = child.kill().await;
        }
    }
}
