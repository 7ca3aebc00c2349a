//! `strife up`: a whole local cluster in one command. Creates what is
//! missing in DIR (PKI, token key, settings); with `--postgres`, starts the
//! private PostgreSQL server (`auto`) and makes the cluster's roles and
//! databases; with `--etcd`, starts the private etcd (`auto`) or uses one,
//! and has every server register there; starts the gateways and the banks'
//! processes as supervised children (restarted when they die); waits until
//! every bank is registered with every gateway (and, with etcd, every
//! gateway is registered there); prints the ready line; and on Ctrl-C or
//! SIGTERM stops the servers, then etcd, then PostgreSQL.

pub mod databases;

use anyhow::{Context, bail};
use clap::Args;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use strife_client::instances::{self, Instance, Role};
use strife_core::Secret;
use strife_rpc::Peer;
use strife_rpc::etcd_server::EtcdServer;
use strife_rpc::pki::CertDir;
use strife_rpc::postgres_server::{self, Lifetime, PostgresServer};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::{oneshot, watch};
use tokio::task::JoinHandle;

/// How long a child may take to print its listening line.
const START_TIMEOUT: Duration = Duration::from_secs(60);
/// How long `up` waits for every bank to register.
const READY_TIMEOUT: Duration = Duration::from_secs(60);
/// How long a child may take to stop after SIGTERM before it is killed.
const STOP_TIMEOUT: Duration = Duration::from_secs(15);
/// Pause before restarting a child that died.
const RESTART_DELAY: Duration = Duration::from_secs(1);
/// How often `up` checks that its PostgreSQL server still runs.
const POSTGRES_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Most gateway processes one `up` runs (each holds connections to the
/// database; the private server accepts 300).
pub const GATEWAYS_MAX: u32 = 8;
/// Most processes one bank runs as (each holds up to 16 connections).
pub const BANK_REPLICAS_MAX: u32 = 8;

#[derive(Args, Debug)]
pub struct UpArgs {
    /// The banks to run, comma-separated.
    #[arg(long, value_delimiter = ',', default_value = "BankA,BankB")]
    banks: Vec<String>,
    /// The first gateway's port on 127.0.0.1 (0 takes a free one); the
    /// other gateways take free ports.
    #[arg(long, default_value_t = 50051)]
    port: u16,
    /// Gateway processes to run (more than one needs --postgres).
    #[arg(long, default_value_t = 1, value_name = "N",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(GATEWAYS_MAX)))]
    gateways: u32,
    /// Processes per bank, all under the bank's name and certificate (more
    /// than one needs --postgres).
    #[arg(long, default_value_t = 1, value_name = "M",
          value_parser = clap::value_parser!(u32).range(1..=i64::from(BANK_REPLICAS_MAX)))]
    bank_replicas: u32,
    /// Keep every server's data in PostgreSQL: `auto` runs a private server
    /// (Debian's postgresql package) in DIR/postgres, started and stopped by
    /// `up`; a postgres://USER:PASSWORD@HOST:PORT/DATABASE URL uses a
    /// running server, where USER may create roles and databases.
    #[arg(long, value_name = "auto|URL", env = "STRIFE_POSTGRES", hide_env_values = true)]
    postgres: Option<String>,
    /// Discovery on etcd: `auto` runs a private etcd (Debian's etcd-server
    /// package) in DIR/etcd on a free port of 127.0.0.1, started and
    /// stopped by `up`; an etcd://IP:PORT[,IP:PORT…] URL uses a running one
    /// that trusts DIR's CA (provisioned when DIR/etcd/root.password or
    /// STRIFE_ETCD_ROOT_PASSWORD gives its root password). Every server
    /// registers there, and clients find the gateways there (DIR/etcd.url).
    #[arg(long, value_name = "auto|URL")]
    etcd: Option<String>,
}

/// Where the cluster's discovery is.
enum EtcdChoice {
    /// A private server `up` runs.
    Auto,
    /// A running cluster, at this URL.
    Url(String),
}

impl EtcdChoice {
    fn parse(text: &str) -> anyhow::Result<EtcdChoice> {
        if text == "auto" {
            // Missing etcd is said before anything starts.
            strife_rpc::etcd_server::find_program()?;
            return Ok(EtcdChoice::Auto);
        }
        strife_rpc::etcd::parse_url(text)
            .context("--etcd takes `auto` or an etcd://IP:PORT[,IP:PORT…] URL")?;
        Ok(EtcdChoice::Url(text.to_owned()))
    }
}

/// The environment variable giving the root password of an existing etcd
/// (`--etcd URL`), so that `up` provisions its users and roles.
const ETCD_ROOT_PASSWORD_ENV: &str = "STRIFE_ETCD_ROOT_PASSWORD";

/// Where the cluster's databases are.
enum Postgres {
    /// A private server `up` runs.
    Auto,
    /// A running server, reached as a role that may create roles and
    /// databases.
    Url(Secret<String>),
}

impl Postgres {
    fn parse(text: &str) -> anyhow::Result<Postgres> {
        if text == "auto" {
            return Ok(Postgres::Auto);
        }
        if databases::server_address(text).is_none() {
            bail!("--postgres takes `auto` or a postgres://USER:PASSWORD@HOST:PORT/DATABASE URL");
        }
        Ok(Postgres::Url(Secret::new(text.to_owned())))
    }
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
    let postgres = args.postgres.as_deref().map(Postgres::parse).transpose()?;
    let etcd = args.etcd.as_deref().map(EtcdChoice::parse).transpose()?;
    if postgres.is_none() && (args.gateways > 1 || args.bank_replicas > 1) {
        bail!(
            "--gateways {} --bank-replicas {} needs --postgres auto (or --postgres URL): without it every \
             server keeps its data in a SQLite file that only one process may use",
            args.gateways,
            args.bank_replicas
        );
    }
    let peers = identities(&args.banks)?;
    std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
    let _one_up = lock_dir(&dir)?;
    strife_rpc::telemetry::init("up", &dir, "info", "")?;
    let certs = CertDir::new(&dir);
    let created = certs.init(&peers)?;
    if !created.is_empty() {
        tracing::info!(created = ?created.iter().map(CertDir::file_stem).collect::<Vec<_>>(), "issued certificates");
    }
    strife_gateway::tokens::load_or_create_key(&certs.path)?;
    strife_gateway::admin_access::admin_key(&certs.path)?;
    let config_file = dir.join(strife_rpc::config::CONFIG_FILE);
    if !config_file.exists() {
        strife_rpc::pki::write_public_file(&config_file, &strife_rpc::Config::default_toml())?;
    }
    // Fail early on a broken settings file, with its own message.
    let config = strife_rpc::Config::load(&dir, None)?;

    let exe = std::env::current_exe().context("finding the strife binary")?;
    let mut cluster = Cluster::new(dir.clone(), exe);
    let shutdown = strife_rpc::serve::shutdown_signal();
    tokio::pin!(shutdown);
    let started = tokio::select! {
        started = cluster.start(&args, postgres, etcd) => started.map(Some),
        () = &mut shutdown => Ok(None),
    };
    let gateways = match started {
        Ok(Some(gateways)) => gateways,
        Ok(None) => {
            tracing::info!("stopped before the cluster was ready");
            cluster.stop().await;
            return Ok(());
        }
        Err(e) => {
            cluster.stop().await;
            return Err(e);
        }
    };
    println!(
        "strife: ready gateway={} banks={} dir={}",
        gateways.join(","),
        args.banks.join(","),
        dir.display()
    );
    use std::io::Write;
    let _ = std::io::stdout().flush();
    if !config.admin.listen.trim().eq_ignore_ascii_case(strife_rpc::metrics::OFF) {
        match cluster.roster.first_admin(ADMIN_WAIT_MAX).await {
            Some(addr) => {
                let ttl = Duration::from_secs(config.admin.link_ttl_secs);
                match strife_gateway::admin_access::login_link(&certs.path, &addr, ttl) {
                    Ok(link) => println!("strife: dashboard {link}"),
                    Err(e) => tracing::warn!(error = %format!("{e:#}"), "cannot make a dashboard link"),
                }
            }
            None => tracing::warn!("the gateway did not say where its dashboard is"),
        }
        let _ = std::io::stdout().flush();
    }

    shutdown.await;
    tracing::info!("stopping the cluster");
    cluster.stop().await;
    Ok(())
}

/// The processes `up` runs, and how to stop them.
struct Cluster {
    dir: PathBuf,
    /// The `strife` binary the children run.
    exe: PathBuf,
    /// Turns true to stop every supervisor (each stops its child).
    stop_tx: watch::Sender<bool>,
    supervisors: Vec<JoinHandle<()>>,
    /// What runs where, for `DIR/instances.json` and `DIR/gateway.addr`.
    roster: Arc<Roster>,
    /// The private PostgreSQL server (`--postgres auto`), restarted if it
    /// dies, stopped after the servers that use it.
    postgres: Option<Arc<Mutex<PostgresServer>>>,
    /// The private etcd server (`--etcd auto`), stopped after the servers
    /// that register in it.
    etcd: Option<EtcdServer>,
}

impl Cluster {
    fn new(dir: PathBuf, exe: PathBuf) -> Cluster {
        let (stop_tx, _) = watch::channel(false);
        let roster = Arc::new(Roster {
            dir: dir.clone(),
            state: Mutex::new(RosterState::default()),
            changes: watch::channel(0).0,
        });
        Cluster { dir, exe, stop_tx, supervisors: Vec::new(), roster, postgres: None, etcd: None }
    }

    /// Starts everything; returns the gateways' addresses once every bank
    /// is registered with each of them.
    async fn start(
        &mut self,
        args: &UpArgs,
        postgres: Option<Postgres>,
        etcd: Option<EtcdChoice>,
    ) -> anyhow::Result<Vec<String>> {
        let stores = match postgres {
            Some(postgres) => Some(self.databases(postgres, &args.banks).await?),
            None => None,
        };
        let discovery = match etcd {
            Some(etcd) => Some(self.discovery(etcd, &args.banks).await?),
            None => None,
        };
        let discovery_env: Vec<(&'static str, Secret<String>)> =
            discovery.iter().map(|url| ("STRIFE_DISCOVERY", Secret::new(url.clone()))).collect();
        let mut starting = Vec::new();
        for replica in 1..=args.gateways {
            let port = if replica == 1 { args.port } else { 0 };
            let envs = stores
                .iter()
                .map(|s| ("STRIFE_GATEWAY_STORE", s.gateway.clone()))
                .chain(discovery_env.iter().cloned())
                .collect();
            starting.push(self.spawn(Role::Gateway, "gateway", replica, vec!["gateway".into()], port, envs));
        }
        let gateways = wait_started(starting).await?;
        let list = gateways.join(",");
        let mut starting = Vec::new();
        for bank in &args.banks {
            let envs: Vec<_> = stores
                .iter()
                .filter_map(|s| s.bank(bank))
                .map(|url| ("STRIFE_BANK_STORE", url.clone()))
                .chain(discovery_env.iter().cloned())
                .collect();
            for replica in 1..=args.bank_replicas {
                let command =
                    vec!["bank".into(), "--name".into(), bank.clone(), "--gateway".into(), list.clone()];
                starting.push(self.spawn(Role::Bank, bank, replica, command, 0, envs.clone()));
            }
        }
        wait_started(starting).await?;
        for gateway in &gateways {
            wait_registered(&self.dir, gateway, &args.banks).await?;
        }
        match &discovery {
            Some(url) => wait_in_etcd(&self.dir, url, &gateways).await?,
            // Left by an `up --etcd` that was killed: clients would ask an
            // etcd that is gone, and say so on every command.
            None => forget_etcd_url(&self.dir),
        }
        self.roster.publish()?;
        Ok(gateways)
    }

    /// The etcd the cluster registers in (started here for `auto`, and
    /// provisioned when `up` can act as its root user); writes its URL to
    /// `DIR/etcd.url` for clients, and returns it.
    async fn discovery(&mut self, etcd: EtcdChoice, banks: &[String]) -> anyhow::Result<String> {
        let certs = CertDir::new(&self.dir);
        let url = match etcd {
            EtcdChoice::Auto => {
                let base = self.dir.join("etcd");
                let server = EtcdServer::start(&base, &certs, "127.0.0.1", banks)
                    .await
                    .context("starting the private etcd server (--etcd auto)")?;
                let url = server.url();
                tracing::info!(%url, base = %server.base().display(), "etcd serving");
                self.roster.add(Instance {
                    role: Role::Etcd,
                    name: "etcd".into(),
                    replica: 1,
                    address: url.trim_start_matches(strife_rpc::etcd::URL_SCHEME).to_owned(),
                    pid: server.pid(),
                    metrics: None,
                    admin: None,
                });
                self.etcd = Some(server);
                url
            }
            EtcdChoice::Url(url) => {
                let endpoints = strife_rpc::etcd::parse_url(&url)?;
                for (replica, address) in (1..).zip(endpoints) {
                    self.roster.add(Instance {
                        role: Role::Etcd,
                        name: "etcd".into(),
                        replica,
                        address,
                        pid: None,
                        metrics: None,
                        admin: None,
                    });
                }
                let kept = self.dir.join("etcd").join("root.password");
                let password = match std::env::var(ETCD_ROOT_PASSWORD_ENV) {
                    Ok(p) if !p.is_empty() => Some(Secret::new(p)),
                    _ => std::fs::read_to_string(&kept).ok().map(|p| Secret::new(p.trim().to_owned())),
                };
                match password {
                    Some(password) => {
                        let tls = strife_rpc::tls::Tls::load(&certs, &Peer::Gateway)?;
                        let etcd = strife_rpc::etcd::Etcd::connect(&tls, &url)?;
                        strife_rpc::etcd::provision(&etcd, &password, banks).await.with_context(|| {
                            format!("setting up the users and roles of the etcd at {url}")
                        })?;
                    }
                    None => tracing::info!(
                        %url,
                        "no etcd root password ({ETCD_ROOT_PASSWORD_ENV} or DIR/etcd/root.password): \
                         assuming its users and roles are set up"
                    ),
                }
                url
            }
        };
        strife_rpc::pki::write_private(
            &self.dir.join(strife_client::discovery::ETCD_URL_FILE),
            &format!("{url}\n"),
        )?;
        Ok(url)
    }

    /// The PostgreSQL server (started here for `auto`), and on it the
    /// cluster's roles and databases.
    async fn databases(&mut self, postgres: Postgres, banks: &[String]) -> anyhow::Result<databases::Stores> {
        let admin = match postgres {
            Postgres::Url(url) => {
                let address = databases::server_address(url.expose()).unwrap_or_default();
                self.roster.add(Instance {
                    role: Role::Postgres,
                    name: "postgres".into(),
                    replica: 1,
                    address,
                    pid: None,
                    metrics: None,
                    admin: None,
                });
                url
            }
            Postgres::Auto => {
                let dir = self.dir.clone();
                let server = tokio::task::spawn_blocking(move || {
                    let outside = Path::new(postgres_server::SYSTEM_DATA_ROOT);
                    let base = postgres_server::base_for_cluster(&dir, outside)?;
                    PostgresServer::start(&base, Lifetime::Kept)
                })
                .await
                .context("starting PostgreSQL")?
                .context("starting the private PostgreSQL server (--postgres auto)")?;
                tracing::info!(port = server.port(), base = %server.base().display(), "PostgreSQL serving");
                let address = format!("127.0.0.1:{}", server.port());
                let slot = self.roster.add(Instance {
                    role: Role::Postgres,
                    name: "postgres".into(),
                    replica: 1,
                    address: address.clone(),
                    pid: server.pid(),
                    metrics: None,
                    admin: None,
                });
                let admin = server.superuser_url("postgres");
                let server = Arc::new(Mutex::new(server));
                self.postgres = Some(server.clone());
                let watch = PostgresWatch { server, address, slot, roster: self.roster.clone() };
                self.supervisors.push(tokio::spawn(watch.run(self.stop_tx.subscribe())));
                admin
            }
        };
        databases::provision(&self.dir, &admin, banks).await.context("making the cluster's databases")
    }

    /// Starts supervising one child; its address comes on the receiver.
    fn spawn(
        &mut self,
        role: Role,
        name: &str,
        replica: u32,
        command: Vec<String>,
        port: u16,
        envs: Vec<(&'static str, Secret<String>)>,
    ) -> Starting {
        let slot = self.roster.add(Instance {
            role,
            name: name.to_owned(),
            replica,
            address: String::new(),
            pid: None,
            metrics: None,
            admin: None,
        });
        let spec = ChildSpec {
            log_name: if replica == 1 { name.to_owned() } else { format!("{name}.{replica}") },
            replica,
            exe: self.exe.clone(),
            dir: self.dir.clone(),
            command,
            listen: format!("127.0.0.1:{port}"),
            envs,
            slot,
            roster: self.roster.clone(),
        };
        let label = spec.log_name.clone();
        let (tx, rx) = oneshot::channel();
        self.supervisors.push(tokio::spawn(supervise(spec, tx, self.stop_tx.subscribe())));
        Starting { label, ready: rx }
    }

    /// Stops every server, then etcd, then PostgreSQL.
    async fn stop(&mut self) {
        self.stop_tx.send_replace(true);
        for supervisor in self.supervisors.drain(..) {
            let _ = supervisor.await;
        }
        if let Some(mut etcd) = self.etcd.take() {
            tokio::task::block_in_place(|| etcd.kill());
            tracing::info!("etcd stopped");
        }
        if let Some(server) = self.postgres.take() {
            match tokio::task::spawn_blocking(move || lock(&server).stop()).await {
                Ok(Ok(())) => tracing::info!("PostgreSQL stopped"),
                Ok(Err(e)) => tracing::error!(error = %format!("{e:#}"), "stopping PostgreSQL"),
                Err(e) => tracing::error!(error = %e, "stopping PostgreSQL"),
            }
        }
        instances::remove(&self.dir);
        // The etcd it names has stopped, or no longer lists this cluster's
        // gateways.
        forget_etcd_url(&self.dir);
        tracing::info!("cluster stopped");
    }
}

/// The file `up` holds a lock on for its whole life, in its directory.
const LOCK_FILE: &str = "up.lock";

/// One `up` per directory: a second one would start servers on the same
/// stores and ports, and on failing, its clean-up would remove the running
/// cluster's `instances.json` and `etcd.url`. The lock (`flock`) is the
/// kernel's, so it goes with the process however it ends, `kill -9` too;
/// the servers do not inherit it.
fn lock_dir(dir: &Path) -> anyhow::Result<std::fs::File> {
    let path = dir.join(LOCK_FILE);
    let file = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .with_context(|| format!("opening {}", path.display()))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => bail!(
            "another `strife up` is running on {}: stop it first (Ctrl-C, or SIGTERM), or use another --dir",
            dir.display()
        ),
        Err(std::fs::TryLockError::Error(e)) => Err(e).with_context(|| format!("locking {}", path.display())),
    }
}

/// Removes `DIR/etcd.url`, where clients look for the cluster's etcd.
fn forget_etcd_url(dir: &Path) {
    let file = dir.join(strife_client::discovery::ETCD_URL_FILE);
    match std::fs::remove_file(&file) {
        Ok(()) => tracing::info!(file = %file.display(), "removed: it names no running cluster's etcd"),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => tracing::warn!(file = %file.display(), error = %e, "cannot remove"),
    }
}

/// Keeps the private PostgreSQL server running, as the supervisors do
/// the servers: started again on its port if it dies.
struct PostgresWatch {
    server: Arc<Mutex<PostgresServer>>,
    /// Where it listens.
    address: String,
    /// Its place in the roster.
    slot: usize,
    roster: Arc<Roster>,
}

impl PostgresWatch {
    async fn run(self, mut stop: watch::Receiver<bool>) {
        loop {
            tokio::select! {
                _ = tokio::time::sleep(POSTGRES_CHECK_INTERVAL) => {}
                _ = stop.changed() => return,
            }
            let server = self.server.clone();
            let checked = tokio::task::spawn_blocking(move || {
                let mut server = lock(&server);
                server.restart_if_stopped().map(|restarted| (restarted, server.pid()))
            })
            .await;
            match checked {
                Ok(Ok((false, _))) => {}
                Ok(Ok((true, pid))) => {
                    tracing::error!("PostgreSQL had stopped; restarted it");
                    self.roster.started(self.slot, &self.address, pid);
                }
                Ok(Err(e)) => {
                    tracing::error!(error = %format!("{e:#}"), "PostgreSQL is down; trying again");
                    self.roster.exited(self.slot);
                }
                Err(e) => tracing::error!(error = %e, "checking PostgreSQL"),
            }
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A child being started: its name and, once it listens, its address.
struct Starting {
    label: String,
    ready: oneshot::Receiver<Result<String, String>>,
}

/// The addresses of the children, in order, once each listens.
async fn wait_started(starting: Vec<Starting>) -> anyhow::Result<Vec<String>> {
    let deadline = tokio::time::Instant::now() + START_TIMEOUT;
    let mut addresses = Vec::new();
    for Starting { label, ready } in starting {
        match tokio::time::timeout_at(deadline, ready).await {
            Ok(Ok(Ok(addr))) => addresses.push(addr),
            Ok(Ok(Err(e))) => bail!("{label} did not start: {e}"),
            Ok(Err(_)) => bail!("{label} did not start"),
            Err(_) => bail!("{label} did not start within {START_TIMEOUT:?}"),
        }
    }
    Ok(addresses)
}

/// What runs where. Once the cluster is ready, every change is written to
/// `DIR/instances.json` (for `strife status`) and the gateways' addresses
/// to `DIR/gateway.addr` (for clients; a gateway run by `up` leaves that
/// file alone).
struct Roster {
    dir: PathBuf,
    state: Mutex<RosterState>,
    /// Bumped at every change, for whoever waits for one.
    changes: watch::Sender<u64>,
}

#[derive(Default)]
struct RosterState {
    instances: Vec<Instance>,
    /// Whether the files are written (from the ready line on).
    published: bool,
}

impl Roster {
    fn state(&self) -> std::sync::MutexGuard<'_, RosterState> {
        lock(&self.state)
    }

    /// Adds an instance; returns its slot.
    fn add(&self, instance: Instance) -> usize {
        let mut state = self.state();
        state.instances.push(instance);
        state.instances.len() - 1
    }

    /// The child in `slot` listens on `address` as process `pid`.
    fn started(&self, slot: usize, address: &str, pid: Option<u32>) {
        self.update(slot, |i| {
            i.address = address.to_owned();
            i.pid = pid;
        });
    }

    /// The child in `slot` is gone (until its restart).
    fn exited(&self, slot: usize) {
        self.update(slot, |i| {
            i.pid = None;
            i.metrics = None;
            i.admin = None;
        });
    }

    /// The first gateway's dashboard address, once it printed it; `None`
    /// after `wait` without it.
    async fn first_admin(&self, wait: Duration) -> Option<String> {
        let mut changes = self.changes.subscribe();
        let find = |state: &RosterState| {
            state.instances.iter().find(|i| i.role == Role::Gateway).and_then(|i| i.admin.clone())
        };
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            if let Some(addr) = find(&self.state()) {
                return Some(addr);
            }
            match tokio::time::timeout_at(deadline, changes.changed()).await {
                Ok(Ok(())) => continue,
                _ => return None,
            }
        }
    }

    fn update(&self, slot: usize, change: impl FnOnce(&mut Instance)) {
        let mut state = self.state();
        if let Some(instance) = state.instances.get_mut(slot) {
            change(instance);
        }
        self.changes.send_modify(|n| *n = n.wrapping_add(1));
        if state.published
            && let Err(e) = self.write(&state)
        {
            tracing::warn!(error = %format!("{e:#}"), "writing the cluster's instances");
        }
    }

    /// Writes the files now and on every change from now on.
    fn publish(&self) -> anyhow::Result<()> {
        let mut state = self.state();
        state.published = true;
        self.write(&state)
    }

    fn write(&self, state: &RosterState) -> anyhow::Result<()> {
        let gateways: Vec<&str> =
            state.instances.iter().filter(|i| i.role == Role::Gateway).map(|i| i.address.as_str()).collect();
        let file = self.dir.join(strife_rpc::config::GATEWAY_ADDR_FILE);
        strife_rpc::pki::write_public_file(&file, &format!("{}\n", gateways.join(",")))?;
        instances::write(&self.dir, &state.instances)
    }
}

/// Polls a gateway's status until every bank is registered and reachable.
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

/// Waits until every one of `gateways` is registered in the etcd at `url`
/// (read as a client would), so that a client finds them from the ready
/// line on.
async fn wait_in_etcd(dir: &Path, url: &str, gateways: &[String]) -> anyhow::Result<()> {
    let deadline = tokio::time::Instant::now() + READY_TIMEOUT;
    let mut last = String::new();
    while tokio::time::Instant::now() < deadline {
        match strife_client::discovery::gateway_addresses(dir, url).await {
            Ok(found) => {
                let missing: Vec<&String> = gateways.iter().filter(|g| !found.contains(g)).collect();
                if missing.is_empty() {
                    return Ok(());
                }
                last = format!("gateways {missing:?} are not registered there");
            }
            Err(why) => last = why,
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    bail!("the gateways did not register in the etcd at {url} within {READY_TIMEOUT:?}: {last}")
}

/// Servers that share one machine do best with one async worker each
/// (measured in BENCHMARKS.md); an explicit STRIFE_RUNTIME_WORKERS wins.
pub fn co_located_env() -> Option<(&'static str, &'static str)> {
    std::env::var_os("STRIFE_RUNTIME_WORKERS").is_none().then_some(("STRIFE_RUNTIME_WORKERS", "1"))
}

struct ChildSpec {
    /// The name of its log (`DIR/logs/<log_name>.log`): the component's
    /// name, with `.<replica>` after the first replica.
    log_name: String,
    /// Which replica of its component it is, from 1.
    replica: u32,
    exe: PathBuf,
    dir: PathBuf,
    /// The subcommand and its flags, but `--listen`.
    command: Vec<String>,
    /// Where it listens: at first the address asked for, then the one it
    /// got, so that a restart keeps every list of addresses true.
    listen: String,
    /// Settings given in its environment (store URLs: secrets, never on a
    /// command line).
    envs: Vec<(&'static str, Secret<String>)>,
    /// Its place in the roster.
    slot: usize,
    roster: Arc<Roster>,
}

impl ChildSpec {
    fn spawn(&self) -> anyhow::Result<Child> {
        let mut cmd = Command::new(&self.exe);
        if let Some((k, v)) = co_located_env() {
            cmd.env(k, v);
        }
        // The administrator's URL stays with `up`.
        cmd.env_remove("STRIFE_POSTGRES");
        cmd.env_remove(ETCD_ROOT_PASSWORD_ENV);
        for (k, v) in &self.envs {
            cmd.env(k, v.expose());
        }
        cmd.arg("--dir").arg(&self.dir).args(&self.command).arg("--listen").arg(&self.listen);
        if self.replica > 1 {
            cmd.arg("--log-name").arg(&self.log_name);
        }
        cmd.arg("--supervised")
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
            .with_context(|| format!("starting {}", self.log_name))
    }
}

/// Runs one child: starts it, reports its address once, restarts it if it
/// dies, and stops it gracefully when `stop` turns true.
async fn supervise(
    mut spec: ChildSpec,
    ready: oneshot::Sender<Result<String, String>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut ready = Some(ready);
    loop {
        if *stop.borrow() {
            return;
        }
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
            Some(out) => listening_line(out, spec.roster.clone(), spec.slot).await,
            None => None,
        };
        match (addr, ready.take()) {
            (Some(addr), first) => {
                spec.roster.started(spec.slot, &addr, child.id());
                match first {
                    Some(tx) => {
                        let _ = tx.send(Ok(addr.clone()));
                    }
                    None => tracing::info!(component = %spec.log_name, %addr, "restarted"),
                }
                spec.listen = addr;
            }
            (None, Some(tx)) => {
                let _ = child.start_kill();
                let status = child.wait().await.map(|s| s.to_string()).unwrap_or_default();
                let _ = tx.send(Err(format!(
                    "{} exited ({status}); see {}",
                    spec.log_name,
                    log_path(&spec).display()
                )));
                return;
            }
            // A restart that did not come up: it is waited for below, and
            // tried again.
            (None, None) => {
                let _ = child.start_kill();
            }
        }
        tokio::select! {
            status = child.wait() => {
                spec.roster.exited(spec.slot);
                if *stop.borrow() {
                    return;
                }
                let status = status.map(|s| s.to_string()).unwrap_or_default();
                tracing::error!(component = %spec.log_name, %status, "exited unexpectedly; restarting");
                tokio::select! {
                    _ = tokio::time::sleep(RESTART_DELAY) => {}
                    _ = stop.changed() => return,
                }
            }
            _ = stop.changed() => {
                terminate(&spec.log_name, &mut child).await;
                spec.roster.exited(spec.slot);
                return;
            }
        }
    }
}

fn log_path(spec: &ChildSpec) -> PathBuf {
    spec.dir.join("logs").join(format!("{}.log", spec.log_name))
}

/// Reads the child's stdout until its `listening on ADDR` line, then keeps
/// draining it in the background so the child never blocks on a full pipe,
/// noting in the roster where it serves its metrics (`metrics listening on
/// ADDR`, printed after).
async fn listening_line(
    out: tokio::process::ChildStdout,
    roster: Arc<Roster>,
    slot: usize,
) -> Option<String> {
    let mut lines = BufReader::new(out).lines();
    let found = loop {
        match tokio::time::timeout(START_TIMEOUT, lines.next_line()).await {
            Ok(Ok(Some(line))) => {
                if line.contains(METRICS_LINE) || line.contains(ADMIN_LINE) {
                    continue;
                }
                if let Some((_, addr)) = line.split_once(" listening on ") {
                    break Some(addr.trim().to_owned());
                }
            }
            _ => break None,
        }
    };
    if found.is_some() {
        tokio::spawn(async move {
            while let Ok(Some(line)) = lines.next_line().await {
                if let Some((_, addr)) = line.split_once(METRICS_LINE) {
                    let addr = addr.trim().to_owned();
                    roster.update(slot, |i| i.metrics = Some(addr));
                } else if let Some((_, addr)) = line.split_once(ADMIN_LINE) {
                    let addr = addr.trim().to_owned();
                    roster.update(slot, |i| i.admin = Some(addr));
                }
            }
        });
    }
    found
}

/// What a server prints, after its listening line, where it serves metrics.
const METRICS_LINE: &str = " metrics listening on ";
/// What a gateway prints, after its metrics line, where it serves the dashboard.
const ADMIN_LINE: &str = " admin listening on ";
/// Longest `up` waits, after its ready line, for the dashboard's address.
const ADMIN_WAIT_MAX: Duration = Duration::from_secs(10);

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
