//! `strife bench`: starts a cluster of its own in a temporary directory (or
//! targets a running one with `--gateway`), runs N payments from C
//! concurrent payers, measures in the same run the rate of a no-op
//! mutual-TLS call to the gateway, and checks at the end that the total of
//! money is unchanged (exit 1 if not).

use anyhow::{Context, bail};
use clap::Args;
use serde_json::{Value, json};
use std::io::{BufRead, BufReader, IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};
use strife_client::{Exit, Reply};
use strife_core::rng::SplitMix64;
use strife_proto::gateway::v1 as pb;
use strife_rpc::postgres_server::{Lifetime, PostgresServer};
use tonic::transport::Channel;

/// Connections the load generator spreads its calls over.
const CONNECTIONS: usize = 4;
/// Most logins in flight while preparing the payers.
const LOGINS_IN_FLIGHT: usize = 8;
/// The balance of every bench account, in minor units (1,000,000.00).
const BENCH_BALANCE_MINOR: i64 = 100_000_000;
/// Payments of prefilled history per transaction of each store.
const PREFILL_BATCH: u64 = 100_000;

#[derive(Args, Debug, Clone)]
pub struct BenchArgs {
    /// How many payments to make.
    #[arg(long, default_value_t = 10_000)]
    payments: u64,
    /// How many payers run at once.
    #[arg(long, default_value_t = 64)]
    concurrency: usize,
    /// Banks in the bench's own cluster.
    #[arg(long, default_value_t = 2)]
    banks: usize,
    /// Accounts per bank in the bench's own cluster.
    #[arg(long, default_value_t = 1000)]
    accounts: usize,
    /// Skew: every payment comes from one of this many payers (hot accounts).
    #[arg(long)]
    hot: Option<usize>,
    /// Seconds spent measuring the no-op call.
    #[arg(long, default_value_t = 2.0)]
    noop_secs: f64,
    /// Keep the bench's cluster directory afterwards.
    #[arg(long)]
    keep: bool,
    /// Fill the bench cluster's stores with this many committed payments of
    /// history first (written straight into SQLite, in pairs that cancel
    /// out, so balances stay as they were), to measure a large ledger.
    #[arg(long, default_value_t = 0)]
    history: u64,
    /// Run the bench's own cluster on a private PostgreSQL server started
    /// for the run (Debian's `postgresql` package), instead of SQLite.
    #[arg(long)]
    postgres: bool,
    /// Gateway processes in the bench's own cluster, sharing one database
    /// (more than one needs --postgres); payers spread over them.
    #[arg(long, default_value_t = 1)]
    gateways: usize,
    /// With --history: make every payment of that history one of this
    /// account's (`u<i>@Bank<j>`), alternately sent and received, to
    /// measure one customer's long history.
    #[arg(long, value_name = "USER@BANK")]
    history_account: Option<String>,
    /// With --history: keep the filled stores under this directory, and
    /// copy them from there instead of filling again on a later run with
    /// the same --history, --banks, --accounts and --history-account, made
    /// by a gateway of the same schema version (a fill of 10,000,000
    /// payments takes about 5 minutes and 8 GB; a copy is refused up front
    /// when the disk has no room for it).
    #[arg(long, value_name = "DIR")]
    history_cache: Option<PathBuf>,
    /// With --postgres: a setting of the private server (`ALTER SYSTEM SET
    /// NAME = 'VALUE'`, then a restart, before any store connects), to
    /// measure with it (e.g. `shared_preload_libraries=pg_stat_statements`,
    /// `commit_delay=100`). Repeatable.
    #[arg(long = "pg-setting", value_name = "NAME=VALUE")]
    pg_settings: Vec<String>,
}

/// Sets each `NAME=VALUE` of `settings` on `pg` and restarts it (a
/// setting such as `shared_preload_libraries` needs the restart), before
/// anything connects. A library's own settings (`NAME` with a dot) are set
/// after a first restart has loaded it.
fn apply_pg_settings(pg: &PostgresServer, settings: &[String]) -> anyhow::Result<()> {
    let mut statements: [Vec<String>; 2] = [Vec::new(), Vec::new()];
    for setting in settings {
        let Some((name, value)) = setting.split_once('=') else {
            bail!("--pg-setting {setting}: expected NAME=VALUE");
        };
        let name = name.trim();
        if name.is_empty() || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '.') {
            bail!("--pg-setting {setting}: not a setting's name");
        }
        let sql = format!("ALTER SYSTEM SET {name} = '{}'", value.trim().replace('\'', "''"));
        statements[usize::from(name.contains('.'))].push(sql);
    }
    for round in statements.iter().filter(|s| !s.is_empty()) {
        let round: Vec<&str> = round.iter().map(String::as_str).collect();
        pg.sql("postgres", &round)?;
        pg.restart_immediately()?;
    }
    Ok(())
}

/// A customer the bench can act as.
#[derive(Clone)]
struct Customer {
    user: String,
    bank: String,
    password: String,
}

/// A server the bench started.
struct Server {
    name: String,
    child: Child,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Ok(pid) = i32::try_from(self.child.id()) {
            let _ =
                nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), nix::sys::signal::Signal::SIGTERM);
        }
        let _ = self.child.wait();
    }
}

pub async fn run(
    args: BenchArgs,
    dir_flag: Option<PathBuf>,
    gateway: Option<String>,
) -> anyhow::Result<Reply> {
    if args.payments == 0 || args.concurrency == 0 {
        bail!("--payments and --concurrency must be at least 1");
    }
    let own = gateway.is_none();
    let (dir, cluster, gw_addrs, customers) = if own {
        let dir = std::env::temp_dir().join(format!("strife-bench-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let (cluster, addrs, customers) = start_cluster(&dir, &args)?;
        (dir, cluster, addrs, customers)
    } else {
        let dir = strife_client::connect::resolve_dir(dir_flag.as_deref());
        let addrs = strife_client::connect::gateway_addresses(&dir, gateway.as_deref())
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let customers = sample_customers(&dir, &addrs[0]).await?;
        (dir, OwnCluster::default(), addrs, customers)
    };
    let result = measure(&args, &dir, &gw_addrs, &customers, &cluster, own).await;
    // The servers stop before their database does.
    drop(cluster);
    if own && !args.keep {
        let _ = std::fs::remove_dir_all(&dir);
    }
    result
}

/// The bench's own cluster: its servers, and the PostgreSQL server under
/// them if any (dropped after them).
#[derive(Default)]
struct OwnCluster {
    servers: Vec<Server>,
    postgres: Option<PostgresServer>,
}

impl Drop for OwnCluster {
    fn drop(&mut self) {
        self.servers.clear();
        if let Some(mut pg) = self.postgres.take() {
            let _ = pg.stop();
        }
    }
}

fn start_cluster(dir: &Path, args: &BenchArgs) -> anyhow::Result<(OwnCluster, Vec<String>, Vec<Customer>)> {
    if args.banks == 0 || args.accounts == 0 || args.gateways == 0 {
        bail!("--banks, --accounts and --gateways must be at least 1");
    }
    if args.gateways > 1 && !args.postgres {
        bail!("--gateways {} needs --postgres: gateways share their state only in PostgreSQL", args.gateways);
    }
    if args.postgres && args.history > 0 {
        bail!("--history writes SQLite stores; it cannot be combined with --postgres");
    }
    if !args.postgres && !args.pg_settings.is_empty() {
        bail!("--pg-setting needs --postgres");
    }
    let banks: Vec<String> = (0..args.banks).map(|i| format!("Bank{i}")).collect();
    let focus = match &args.history_account {
        Some(who) => Some(bench_account(who, &banks, args.accounts)?),
        None => None,
    };
    if focus.is_some() && args.history == 0 {
        bail!("--history-account needs --history N");
    }
    if args.history_cache.is_some() && args.history == 0 {
        bail!("--history-cache needs --history N");
    }
    let peers = crate::up::identities(&banks)?;
    let certs = strife_rpc::pki::CertDir::new(dir);
    certs.init(&peers)?;
    strife_gateway::tokens::load_or_create_key(&certs.path)?;
    // One Argon2id hash serves every bench account (same password).
    let hash = strife_bank::accounts::hash_password(&strife_core::Secret::new("bench".to_owned()))?;
    let mut customers = Vec::new();
    for bank in &banks {
        let mut file = String::new();
        for i in 0..args.accounts {
            file.push_str(&format!(
                "[[account]]\nuser = \"u{i}\"\npassword_hash = \"{hash}\"\nbalance = \"{}\"\n",
                strife_core::money::format_minor(BENCH_BALANCE_MINOR)
            ));
            customers.push(Customer { user: format!("u{i}"), bank: bank.clone(), password: "bench".into() });
        }
        strife_rpc::pki::write_public_file(&dir.join(format!("{bank}.accounts.toml")), &file)?;
    }
    if args.history > 0 {
        match &args.history_cache {
            Some(cache) => cached_history(cache, dir, &banks, args.accounts, args.history, focus)?,
            None => prefill_history(dir, &banks, args.accounts, args.history, focus)?,
        }
    }
    let mut cluster = OwnCluster::default();
    // On PostgreSQL, one database for the gateways and one per bank, each
    // with its own role; the URLs go to the servers in their environment.
    let mut gateway_env: Vec<(String, String)> = vec![("STRIFE_LOG_LEVEL".into(), "warn".into())];
    let mut bank_env: Vec<Vec<(String, String)>> = vec![gateway_env.clone(); banks.len()];
    if args.postgres {
        let base = std::env::temp_dir().join(format!("strife-bench-pg-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let pg = PostgresServer::start(&base, Lifetime::Temporary)?;
        apply_pg_settings(&pg, &args.pg_settings)?;
        let url = pg.create_private_database("strife_gateway", "strife_gateway")?;
        // The audit at the end reads the gateway's store through the settings.
        strife_rpc::pki::write_private(
            &dir.join(strife_rpc::config::CONFIG_FILE),
            &format!("[gateway]\nstore = \"{}\"\n", url.expose()),
        )?;
        gateway_env.push(("STRIFE_GATEWAY_STORE".into(), url.expose().clone()));
        for (bank, env) in banks.iter().zip(&mut bank_env) {
            let name = format!("strife_{}", bank.to_ascii_lowercase());
            let url = pg.create_private_database(&name, &name)?;
            env.push(("STRIFE_BANK_STORE".into(), url.expose().clone()));
        }
        cluster.postgres = Some(pg);
    }
    let exe = std::env::current_exe()?;
    let mut addrs = Vec::new();
    for g in 0..args.gateways {
        let name = if args.gateways == 1 { "gateway".to_owned() } else { format!("gateway{g}") };
        let (gateway, addr) = spawn(&exe, dir, &name, &["gateway", "--listen", "127.0.0.1:0"], &gateway_env)?;
        cluster.servers.push(gateway);
        addrs.push(addr);
    }
    let gateway_list = addrs.join(",");
    for (bank, env) in banks.iter().zip(&bank_env) {
        let accounts = dir.join(format!("{bank}.accounts.toml"));
        let accounts = accounts.to_string_lossy().into_owned();
        let (server, _) = spawn(
            &exe,
            dir,
            bank,
            &[
                "bank",
                "--name",
                bank,
                "--listen",
                "127.0.0.1:0",
                "--gateway",
                &gateway_list,
                "--accounts",
                &accounts,
            ],
            env,
        )?;
        cluster.servers.push(server);
    }
    Ok((cluster, addrs, customers))
}

/// The index (bank-major, as in `prefill_history`) of a bench account
/// named `u<i>@Bank<j>`.
fn bench_account(who: &str, banks: &[String], accounts: usize) -> anyhow::Result<usize> {
    let who: strife_core::UserRef = who.parse().with_context(|| format!("--history-account {who}"))?;
    let bank = banks.iter().position(|b| *b == who.bank);
    let user = who.user.strip_prefix('u').and_then(|i| i.parse::<usize>().ok()).filter(|&i| i < accounts);
    match (bank, user) {
        (Some(b), Some(u)) if who.user == format!("u{u}") => Ok(b * accounts + u),
        _ => bail!(
            "--history-account {who}: the bench's accounts are u0..u{} at Bank0..Bank{}",
            accounts - 1,
            banks.len() - 1
        ),
    }
}

/// The stores [`prefill_history`] writes, relative to the cluster's
/// directory: the gateway's, then each bank's.
fn store_files(banks: &[String]) -> Vec<PathBuf> {
    let config = strife_rpc::Config::default();
    let root = Path::new("");
    std::iter::once(config.gateway.data_dir(root).join("gateway.db"))
        .chain(banks.iter().map(|b| config.bank.data_dir(root, b).join("bank.db")))
        .collect()
}

/// [`prefill_history`] through a cache: the first run with a given shape
/// fills the stores and copies them to `cache/<shape>`; later runs copy
/// them from there. A fill is saved only once complete (copied to a
/// temporary name, then renamed), so an interrupted run leaves no half
/// history behind. The stores are closed (checkpointed) when copied, and
/// each copy is synced before the servers start.
fn cached_history(
    cache: &Path,
    dir: &Path,
    banks: &[String],
    accounts: usize,
    count: u64,
    focus: Option<usize>,
) -> anyhow::Result<()> {
    let label = focus.map(|f| format!("-focus{f}")).unwrap_or_default();
    // A cache made by a gateway of another schema version is not used (its
    // stores would be migrated at every run's start): it is filled anew.
    let saved = cache.join(format!(
        "history{count}-banks{}-accounts{accounts}{label}-schema{}",
        banks.len(),
        strife_gateway::store::SCHEMA_VERSION
    ));
    let files = store_files(banks);
    let copy_all = |from: &Path, to: &Path| -> anyhow::Result<()> {
        enough_room(from, to, &files)?;
        for f in &files {
            if let Some(parent) = to.join(f).parent() {
                std::fs::create_dir_all(parent)?;
            }
            for suffix in STORE_SUFFIXES {
                let (src, dst) = (store_file(from, f, suffix), store_file(to, f, suffix));
                if suffix.is_empty() || src.exists() {
                    copy_by_pages(&src, &dst)
                        .with_context(|| format!("copying {} to {}", src.display(), dst.display()))?;
                }
            }
        }
        Ok(())
    };
    if saved.is_dir() {
        return copy_all(&saved, dir);
    }
    prefill_history(dir, banks, accounts, count, focus)?;
    let partial = saved.with_extension("partial");
    let _ = std::fs::remove_dir_all(&partial);
    copy_all(dir, &partial)?;
    std::fs::rename(&partial, &saved)?;
    Ok(())
}

/// A store is its file and, when there is one, its WAL.
const STORE_SUFFIXES: [&str; 2] = ["", "-wal"];

/// The file of store `f` under `base`, with `suffix` (one of
/// [`STORE_SUFFIXES`]).
fn store_file(base: &Path, f: &Path, suffix: &str) -> PathBuf {
    let mut p = base.join(f).into_os_string();
    p.push(suffix);
    PathBuf::from(p)
}

/// Fails, saying how much is needed, unless `to`'s filesystem has room for
/// the store `files` under `from` (a history of 10,000,000 payments is
/// 7–8 GB; a copy that fills the disk leaves every process on it failing).
fn enough_room(from: &Path, to: &Path, files: &[PathBuf]) -> anyhow::Result<()> {
    let mut need: u64 = 0;
    for f in files {
        for suffix in STORE_SUFFIXES {
            need += std::fs::metadata(store_file(from, f, suffix)).map(|m| m.len()).unwrap_or(0);
        }
    }
    std::fs::create_dir_all(to)?;
    let fs = nix::sys::statvfs::statvfs(to).with_context(|| format!("the free space at {}", to.display()))?;
    let free = fs.blocks_available() * fs.fragment_size();
    // Some room to spare for the run's own writes (WAL, logs).
    let spare = 1 << 30;
    let gb = |b: u64| b as f64 / 1e9;
    anyhow::ensure!(
        need + spare <= free,
        "copying the cached history to {} needs {:.1} GB and leaves 1 GB to spare; its filesystem has {:.1} GB free",
        to.display(),
        gb(need),
        gb(free)
    );
    Ok(())
}

/// Copies a store file the way its server wrote it, one 4 KiB page per
/// write, then syncs the copy.
///
/// Not `std::fs::copy`: the kernel's in-kernel copy fills the page cache
/// with large folios (2 MiB here, `FileHugePages` in `/proc/meminfo`), which
/// no server's own writes produce. A checkpoint's 4 KiB write into such a
/// folio walks all of its 512 block buffers, and so does the writeback at
/// its `fsync`. Measured in the tenth session (BENCHMARKS.md): after such a
/// copy the checkpoint threads took 18 % of the servers' CPU, against 13 %
/// after a page-sized copy, so part of what history runs measured was the
/// copy, not the ledger. The sync keeps gigabytes of dirty pages from being
/// written back during the run, under its own fsyncs.
fn copy_by_pages(src: &Path, dst: &Path) -> std::io::Result<()> {
    use std::io::Read;
    const PAGE: usize = 4096;
    let mut from = std::fs::File::open(src)?;
    // 0600: every strife process runs with a private umask (main.rs).
    let mut to = std::fs::File::create(dst)?;
    let mut buf = vec![0u8; 256 * PAGE];
    loop {
        let n = from.read(&mut buf)?;
        if n == 0 {
            break;
        }
        for page in buf[..n].chunks(PAGE) {
            to.write_all(page)?;
        }
    }
    to.sync_all()
}

/// Writes `count` committed payments into the gateway's and the banks'
/// stores, as pairs (a pays b, b pays a back) so that no balance changes.
/// With `focus` (an account's index), `a` is always that account, so it
/// sends and receives every other payment.
fn prefill_history(
    dir: &Path,
    banks: &[String],
    accounts: usize,
    count: u64,
    focus: Option<usize>,
) -> anyhow::Result<()> {
    // Pairs cancel out only when complete.
    anyhow::ensure!(
        count.is_multiple_of(2),
        "--history must be even (payments come in pairs that cancel out)"
    );
    let total = accounts * banks.len();
    anyhow::ensure!(total >= 2, "--history needs at least two accounts");
    let config = strife_rpc::Config::default();
    let gw_dir = config.gateway.data_dir(dir);
    std::fs::create_dir_all(&gw_dir)?;
    drop(strife_gateway::store::Store::open(&gw_dir.join("gateway.db"))?);
    let mut bank_dbs = Vec::new();
    for b in banks {
        let d = config.bank.data_dir(dir, b);
        std::fs::create_dir_all(&d)?;
        drop(strife_bank::store::Store::open(&d.join("bank.db"), b)?);
        let conn = rusqlite::Connection::open(d.join("bank.db"))?;
        conn.execute_batch("BEGIN")?;
        bank_dbs.push(conn);
    }
    let gw = rusqlite::Connection::open(gw_dir.join("gateway.db"))?;
    gw.execute_batch("BEGIN")?;
    let start_ms = strife_gateway::store::now_ms() - i64::try_from(count).unwrap_or(0) - 1;
    let mut rng = SplitMix64(0x5EED);
    let mut draw = 0;
    {
        let mut pay = gw.prepare(
            "INSERT INTO payments (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                   fingerprint, state, acked, created_at, deadline_at, decided_at)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, zeroblob(32), 'committed', 1, ?8, ?8, ?8)",
        )?;
        let mut legs: Vec<rusqlite::Statement<'_>> = bank_dbs
            .iter()
            .map(|c| {
                c.prepare(
                    "INSERT INTO legs (txn_id, payment_id, payer_user, payer_bank, payee_user, payee_bank, amount_minor,
                                       debit_user, credit_user, state, prepared_at, decided_at)
                     VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, 'committed', ?10, ?10)",
                )
            })
            .collect::<Result<_, _>>()?;
        let none: Option<&str> = None;
        for n in 0..count {
            if n > 0 && n.is_multiple_of(PREFILL_BATCH) {
                // Commit in batches: the WAL of each store stays bounded.
                for c in std::iter::once(&gw).chain(&bank_dbs) {
                    c.execute_batch("COMMIT; BEGIN")?;
                }
            }
            let pair = n / 2;
            if n.is_multiple_of(2) {
                draw = rng.below(total as u64) as usize;
            }
            let a = focus.unwrap_or((pair as usize) % total);
            let mut b = draw;
            if a == b {
                b = (b + 1) % total;
            }
            let (mut from, mut to) = ((a / accounts, a % accounts), (b / accounts, b % accounts));
            if n % 2 == 1 {
                std::mem::swap(&mut from, &mut to);
            }
            let amount = 100 + i64::try_from(pair % 1000).unwrap_or(0);
            let at = start_ms + i64::try_from(n).unwrap_or(0);
            let txn = uuid::Uuid::now_v7().to_string();
            let id = strife_core::PaymentId::new_random().to_string();
            let (fu, tu) = (format!("u{}", from.1), format!("u{}", to.1));
            let (fb, tb) = (&banks[from.0], &banks[to.0]);
            pay.execute(rusqlite::params![txn, id, fu, fb, tu, tb, amount, at])?;
            if from.0 == to.0 {
                legs[from.0].execute(rusqlite::params![txn, id, fu, fb, tu, tb, amount, fu, tu, at])?;
            } else {
                legs[from.0].execute(rusqlite::params![txn, id, fu, fb, tu, tb, amount, fu, none, at])?;
                legs[to.0].execute(rusqlite::params![txn, id, fu, fb, tu, tb, amount, none, tu, at])?;
            }
        }
    }
    gw.execute_batch("COMMIT")?;
    for c in &bank_dbs {
        c.execute_batch("COMMIT")?;
    }
    drop((gw, bank_dbs));
    // Opened once more, each store folds the history for its customers'
    // pages (as it would fold a log it was upgraded over), so that neither
    // a cached copy nor the run's servers do it at start.
    drop(strife_gateway::store::Store::open(&gw_dir.join("gateway.db"))?);
    for b in banks {
        drop(strife_bank::store::Store::open(&config.bank.data_dir(dir, b).join("bank.db"), b)?);
    }
    Ok(())
}

fn spawn(
    exe: &Path,
    dir: &Path,
    name: &str,
    args: &[&str],
    env: &[(String, String)],
) -> anyhow::Result<(Server, String)> {
    let mut cmd = Command::new(exe);
    if let Some((k, v)) = crate::up::co_located_env() {
        cmd.env(k, v);
    }
    cmd.arg("--dir").arg(dir).args(args).stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::inherit());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
    let out = child.stdout.take().context("no stdout")?;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = BufReader::new(out).lines();
        while let Some(Ok(line)) = lines.next() {
            if let Some((_, addr)) = line.split_once(" listening on ") {
                let _ = tx.send(addr.trim().to_owned());
            }
        }
    });
    let server = Server { name: name.to_owned(), child };
    let addr = rx.recv_timeout(Duration::from_secs(120)).with_context(|| format!("{name} did not start"))?;
    Ok((server, addr))
}

/// Against a running cluster: the contract's sample customers of every bank.
async fn sample_customers(dir: &Path, addr: &str) -> anyhow::Result<Vec<Customer>> {
    let channel = strife_client::connect::connect(dir, addr, Duration::from_secs(5))
        .await
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let status = pb::admin_service_client::AdminServiceClient::new(channel)
        .status(pb::StatusRequest {})
        .await?
        .into_inner();
    let mut out = Vec::new();
    for b in status.banks {
        for n in 1..=5 {
            out.push(Customer {
                user: format!("user{n}"),
                bank: b.name.clone(),
                password: format!("pass{n}"),
            });
        }
    }
    Ok(out)
}

/// `CONNECTIONS` channels to every gateway, interleaved, so that payers
/// spread evenly over the gateways.
async fn channels(dir: &Path, addrs: &[String]) -> anyhow::Result<Vec<Channel>> {
    let mut out = Vec::new();
    for i in 0..CONNECTIONS * addrs.len() {
        let addr = &addrs[i % addrs.len()];
        let ch = strife_client::connect::connect(dir, addr, Duration::from_secs(10))
            .await
            .map_err(|e| anyhow::anyhow!("connecting to the gateway: {e:?}"))?;
        out.push(ch);
    }
    Ok(out)
}

async fn wait_banks(channel: &Channel, want: usize) -> anyhow::Result<()> {
    let deadline = Instant::now() + Duration::from_secs(120);
    while Instant::now() < deadline {
        let mut admin = pb::admin_service_client::AdminServiceClient::new(channel.clone());
        if let Ok(s) = admin.status(pb::StatusRequest {}).await
            && s.get_ref().banks.iter().filter(|b| b.reachable).count() >= want
        {
            return Ok(());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("the banks did not register in time")
}

async fn login_all(chs: &[Channel], customers: &[Customer]) -> anyhow::Result<Vec<String>> {
    let sem = Arc::new(tokio::sync::Semaphore::new(LOGINS_IN_FLIGHT));
    let mut tasks = Vec::new();
    for (i, c) in customers.iter().enumerate() {
        let (ch, c, sem) = (chs[i % chs.len()].clone(), c.clone(), sem.clone());
        tasks.push(tokio::spawn(async move {
            let _permit = sem.acquire().await;
            let mut s = pb::session_service_client::SessionServiceClient::new(ch);
            s.login(pb::LoginRequest {
                bank: c.bank.clone(),
                user: c.user.clone(),
                password: c.password.clone(),
            })
            .await
            .map(|r| r.into_inner().token)
            .with_context(|| format!("login {}@{}", c.user, c.bank))
        }));
    }
    let mut tokens = Vec::new();
    for t in tasks {
        tokens.push(t.await??);
    }
    Ok(tokens)
}

/// No-op mutual-TLS calls (gRPC health checks) per second, at the same
/// concurrency as the payments.
async fn noop_rate(chs: &[Channel], concurrency: usize, secs: f64) -> f64 {
    use tonic_health::pb::{HealthCheckRequest, health_client::HealthClient};
    let count = Arc::new(AtomicU64::new(0));
    let end = Instant::now() + Duration::from_secs_f64(secs);
    let mut tasks = Vec::new();
    for i in 0..concurrency {
        let (ch, count) = (chs[i % chs.len()].clone(), count.clone());
        tasks.push(tokio::spawn(async move {
            let mut h = HealthClient::new(ch);
            while Instant::now() < end {
                if h.check(HealthCheckRequest { service: String::new() }).await.is_ok() {
                    count.fetch_add(1, Ordering::Relaxed);
                }
            }
        }));
    }
    let started = Instant::now();
    for t in tasks {
        let _ = t.await;
    }
    count.load(Ordering::Relaxed) as f64 / started.elapsed().as_secs_f64()
}

#[derive(Default)]
struct Tally {
    committed: AtomicU64,
    declined: AtomicU64,
    failed: AtomicU64,
    /// Sum over payments of gRPC calls it takes (1 + 2 per bank involved).
    calls: AtomicU64,
}

async fn measure(
    args: &BenchArgs,
    dir: &Path,
    addrs: &[String],
    customers: &[Customer],
    cluster: &OwnCluster,
    own: bool,
) -> anyhow::Result<Reply> {
    let servers = &cluster.servers;
    let chs = channels(dir, addrs).await?;
    let banks: std::collections::BTreeSet<&str> = customers.iter().map(|c| c.bank.as_str()).collect();
    // The first channels go one to each gateway; every one must know every bank.
    for ch in &chs[..addrs.len()] {
        wait_banks(ch, banks.len()).await?;
    }
    let payer_count = args.hot.unwrap_or(args.concurrency).clamp(1, customers.len());
    // Payers spread over the banks: every bank's first accounts.
    let per_bank = customers.len() / banks.len().max(1);
    let payers: Vec<usize> =
        (0..payer_count).map(|i| (i % banks.len()) * per_bank + i / banks.len()).collect();
    let payer_customers: Vec<Customer> = payers.iter().map(|&i| customers[i].clone()).collect();
    let tokens = login_all(&chs, &payer_customers).await?;

    let noop = noop_rate(&chs, args.concurrency, args.noop_secs).await;
    let before: Vec<(u64, u64)> = servers.iter().map(|s| cpu_ticks(s.child.id())).collect();
    let bench_before = cpu_ticks(std::process::id());
    let postgres_before = cluster.postgres.as_ref().map(|pg| postgres_ticks(pg.pid()));

    let tally = Arc::new(Tally::default());
    let next = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let progress = progress_bar(args.payments, next.clone(), started);
    let mut workers = Vec::new();
    let amount_max = if own { 100 } else { 10 };
    for w in 0..args.concurrency {
        let (ch, tally, next) = (chs[w % chs.len()].clone(), tally.clone(), next.clone());
        let slot = w % payers.len();
        let payer = payers[slot];
        // Made once per worker: each request clones it (a reference count).
        let authorization: Option<tonic::metadata::MetadataValue<tonic::metadata::Ascii>> =
            format!("Bearer {}", tokens[slot]).parse().ok();
        let customers = customers.to_vec();
        let total = args.payments;
        workers.push(tokio::spawn(async move {
            let mut rng = SplitMix64(w as u64 + 1);
            let mut lat = Vec::new();
            let mut client = pb::payments_service_client::PaymentsServiceClient::new(ch);
            while next.fetch_add(1, Ordering::Relaxed) < total {
                let mut payee = rng.below(customers.len() as u64) as usize;
                if payee == payer {
                    payee = (payee + 1) % customers.len();
                }
                let (from, to) = (&customers[payer], &customers[payee]);
                let amount = 1 + rng.below(amount_max);
                let mut req = tonic::Request::new(pb::PayRequest {
                    payment_id: strife_core::PaymentId::new_random().to_string(),
                    payee: Some(pb::Account { user: to.user.clone(), bank: to.bank.clone() }),
                    amount: strife_core::money::format_minor(amount as i64),
                });
                if let Some(v) = &authorization {
                    req.metadata_mut().insert("authorization", v.clone());
                }
                let t0 = Instant::now();
                let result = client.pay(req).await;
                let one_bank = from.bank == to.bank;
                lat.push((u32::try_from(t0.elapsed().as_micros()).unwrap_or(u32::MAX), one_bank));
                tally.calls.fetch_add(if from.bank == to.bank { 3 } else { 5 }, Ordering::Relaxed);
                match result {
                    Ok(r) if r.get_ref().status() == pb::PaymentStatus::Committed => &tally.committed,
                    Ok(_) => &tally.declined,
                    Err(_) => &tally.failed,
                }
                .fetch_add(1, Ordering::Relaxed);
            }
            lat
        }));
    }
    let mut kinds: Vec<(u32, bool)> = Vec::new();
    for w in workers {
        kinds.extend(w.await?);
    }
    // Payments within one bank (one phase, where the bank serves transfers)
    // and across two, apart: their paths differ.
    let mut within: Vec<u32> = kinds.iter().filter(|k| k.1).map(|k| k.0).collect();
    let mut across: Vec<u32> = kinds.iter().filter(|k| !k.1).map(|k| k.0).collect();
    within.sort_unstable();
    across.sort_unstable();
    let mut latencies: Vec<u32> = kinds.iter().map(|k| k.0).collect();
    let elapsed = started.elapsed().as_secs_f64();
    progress.abort();
    if std::io::stderr().is_terminal() {
        eprintln!();
    }
    let after: Vec<(u64, u64)> = servers.iter().map(|s| cpu_ticks(s.child.id())).collect();
    let bench_after = cpu_ticks(std::process::id());
    let postgres_after = cluster.postgres.as_ref().map(|pg| postgres_ticks(pg.pid()));
    latencies.sort_unstable();
    let pct_of = |sorted: &[u32], p: f64| -> f64 {
        if sorted.is_empty() {
            return 0.0;
        }
        let i = ((sorted.len() as f64 * p).ceil() as usize).clamp(1, sorted.len()) - 1;
        f64::from(sorted[i]) / 1000.0
    };
    let pct = |p: f64| pct_of(&latencies, p);
    let done = latencies.len() as f64;
    let rate = done / elapsed;
    let calls_per_payment = tally.calls.load(Ordering::Relaxed) as f64 / done.max(1.0);
    let ceiling_ratio = if noop > 0.0 { rate * calls_per_payment / noop } else { 0.0 };

    // Conservation and agreement: wait (bounded) for the decisions to reach
    // every bank, then audit the stores.
    let mut audit = json!(null);
    let deadline = Instant::now() + Duration::from_secs(60);
    while Instant::now() < deadline {
        match crate::audit::run(dir).await {
            Ok(r) if r.exit == Exit::Done => {
                audit = r.json;
                break;
            }
            Ok(r) => audit = r.json,
            Err(e) => audit = json!({ "error": e.to_string(), "conserved": false }),
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let conserved = audit["conserved"] == true && audit["ok"] == true;

    let tick = clock_ticks_per_sec();
    let cpu_ms =
        |b: (u64, u64), a: (u64, u64)| ((a.0 + a.1) - (b.0 + b.1)) as f64 * 1000.0 / tick / done.max(1.0);
    let mut cpu = serde_json::Map::new();
    let mut memory = serde_json::Map::new();
    for (i, s) in servers.iter().enumerate() {
        cpu.insert(s.name.clone(), json!(round3(cpu_ms(before[i], after[i]))));
        memory.insert(s.name.clone(), json!(peak_rss_mb(s.child.id())));
    }
    cpu.insert("bench".into(), json!(round3(cpu_ms(bench_before, bench_after))));
    if let (Some(b), Some(a)) = (postgres_before, postgres_after) {
        cpu.insert("postgres".into(), json!(round3(cpu_ms(b, a))));
    }
    let json = json!({
        "payments": latencies.len(),
        "concurrency": args.concurrency,
        "mode": if args.hot.is_some() { "hot" } else { "uniform" },
        "payers": payer_count,
        "banks": banks.len(),
        "gateways": addrs.len(),
        "store": if cluster.postgres.is_some() { "postgres" } else if own { "sqlite" } else { "external" },
        "pg_settings": args.pg_settings,
        "accounts": customers.len(),
        "history": args.history,
        "history_account": args.history_account,
        "seconds": round3(elapsed),
        "payments_per_sec": round3(rate),
        "latency_ms": { "p50": round3(pct(0.50)), "p90": round3(pct(0.90)), "p99": round3(pct(0.99)), "p999": round3(pct(0.999)) },
        "one_bank_share": round3(within.len() as f64 / done.max(1.0)),
        "latency_ms_one_bank": { "p50": round3(pct_of(&within, 0.50)), "p99": round3(pct_of(&within, 0.99)) },
        "latency_ms_two_banks": { "p50": round3(pct_of(&across, 0.50)), "p99": round3(pct_of(&across, 0.99)) },
        "committed": tally.committed.load(Ordering::Relaxed),
        "declined": tally.declined.load(Ordering::Relaxed),
        "failed": tally.failed.load(Ordering::Relaxed),
        "noop_calls_per_sec": round3(noop),
        "calls_per_payment": round3(calls_per_payment),
        "ceiling_ratio": round3(ceiling_ratio),
        "cpu_ms_per_payment": Value::Object(cpu),
        "peak_memory_mb": Value::Object(memory),
        "conserved": conserved,
        "audit": audit,
    });
    let text = table(&json);
    Ok(Reply { exit: if conserved { Exit::Done } else { Exit::Unexpected }, json, text })
}

fn table(j: &Value) -> String {
    let mut t = String::new();
    t.push_str(&format!(
        "strife bench: {} payments, {} concurrent payers ({}, {} payer accounts), {} gateway(s) on {}, {} banks, {} accounts, {} payments of history{}\n",
        j["payments"],
        j["concurrency"],
        j["mode"].as_str().unwrap_or(""),
        j["payers"],
        j["gateways"],
        j["store"].as_str().unwrap_or(""),
        j["banks"],
        j["accounts"],
        j["history"],
        j["history_account"].as_str().map(|a| format!(" (all {a}'s)")).unwrap_or_default()
    ));
    t.push_str(&format!("  payments/s           {}\n", j["payments_per_sec"]));
    t.push_str(&format!(
        "  latency ms           p50 {}  p90 {}  p99 {}  p99.9 {}\n",
        j["latency_ms"]["p50"], j["latency_ms"]["p90"], j["latency_ms"]["p99"], j["latency_ms"]["p999"]
    ));
    t.push_str(&format!(
        "  outcomes             {} committed, {} declined, {} failed\n",
        j["committed"], j["declined"], j["failed"]
    ));
    t.push_str(&format!("  no-op mTLS calls/s   {}\n", j["noop_calls_per_sec"]));
    t.push_str(&format!(
        "  ceiling ratio        {} (payments/s x {} calls per payment / no-op calls/s)\n",
        j["ceiling_ratio"], j["calls_per_payment"]
    ));
    t.push_str(&format!("  CPU ms per payment   {}\n", j["cpu_ms_per_payment"]));
    t.push_str(&format!("  peak memory MB       {}\n", j["peak_memory_mb"]));
    t.push_str(&format!(
        "  money conserved      {}",
        if j["conserved"] == true { "yes (audit agrees)" } else { "NO: see the audit" }
    ));
    t
}

fn progress_bar(total: u64, next: Arc<AtomicU64>, started: Instant) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        if !std::io::stderr().is_terminal() {
            return;
        }
        loop {
            tokio::time::sleep(Duration::from_millis(250)).await;
            let done = next.load(Ordering::Relaxed).min(total);
            let width = 30;
            let filled = (done * width / total.max(1)) as usize;
            let rate = done as f64 / started.elapsed().as_secs_f64();
            let mut err = std::io::stderr().lock();
            let _ = write!(
                err,
                "\r[{}{}] {done}/{total} payments  {rate:.0}/s ",
                "#".repeat(filled),
                ".".repeat(width as usize - filled)
            );
            let _ = err.flush();
        }
    })
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// (user, system) CPU time of a PostgreSQL server: its postmaster and
/// every process it started (the backends serving the pools), in clock
/// ticks. A backend that exits during the run takes its time with it.
fn postgres_ticks(postmaster: Option<u32>) -> (u64, u64) {
    let Some(root) = postmaster else { return (0, 0) };
    let mut total = cpu_ticks(root);
    let Ok(procs) = std::fs::read_dir("/proc") else { return total };
    for entry in procs.filter_map(Result::ok) {
        let Some(pid) = entry.file_name().to_str().and_then(|p| p.parse::<u32>().ok()) else { continue };
        let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
        let ppid = stat.rsplit_once(')').and_then(|(_, r)| r.split_whitespace().nth(1)?.parse::<u32>().ok());
        if ppid == Some(root) {
            let (u, s) = cpu_ticks(pid);
            total = (total.0 + u, total.1 + s);
        }
    }
    total
}

/// (user, system) CPU time of a process, in clock ticks.
fn cpu_ticks(pid: u32) -> (u64, u64) {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // Fields after the command name, which is in parentheses.
    let rest = stat.rsplit_once(')').map(|(_, r)| r).unwrap_or("");
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let get = |i: usize| fields.get(i).and_then(|f| f.parse().ok()).unwrap_or(0);
    (get(11), get(12))
}

fn clock_ticks_per_sec() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK).ok().flatten().map_or(100.0, |t| t as f64)
}

/// Peak resident memory of a process, in MB.
fn peak_rss_mb(pid: u32) -> f64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| round3(kb / 1024.0))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A cached history larger than the free space is refused before any
    /// byte is copied, with both figures. (Each store is a sparse file of 8
    /// TiB, the most ext4 allows: it takes no room, but says it needs it.)
    #[test]
    fn a_copy_larger_than_the_free_space_is_refused_up_front() {
        let base = std::env::temp_dir().join(format!("strife-bench-room-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let (from, to) = (base.join("cache"), base.join("run"));
        let banks = vec!["Bank0".to_owned()];
        let files = store_files(&banks);
        for f in &files {
            let path = from.join(f);
            std::fs::create_dir_all(path.parent().expect("a parent")).expect("dirs");
            std::fs::File::create(&path).expect("file").set_len(1 << 43).expect("sparse");
        }
        let e = enough_room(&from, &to, &files).expect_err("16 TiB do not fit");
        let message = e.to_string();
        assert!(message.contains("needs 17592.2 GB") && message.contains("GB free"), "{message}");
        assert!(std::fs::read_dir(&to).expect("the run's directory").next().is_none(), "nothing copied");
        // What fits passes.
        for f in &files {
            std::fs::File::create(from.join(f)).expect("file").set_len(4096).expect("small");
        }
        enough_room(&from, &to, &files).expect("4 KiB fits");
        let _ = std::fs::remove_dir_all(&base);
    }
}
