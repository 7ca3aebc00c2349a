//! `strife`: every program of the system is a subcommand of this binary.
//! `main` parses flags, sets up logging and hands over to the crates.

/// mimalloc rather than glibc's malloc: see BENCHMARKS.md, "Issue 14, eighth session".
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

mod audit;
mod bench;
mod up;

use clap::{Args, Parser, Subcommand};
use std::io::{IsTerminal, Read, Write};
use std::path::PathBuf;
use strife_client::{CliError, Client, Exit, Reply};
use strife_core::{Secret, UserRef};
use strife_rpc::Config;
use strife_rpc::Peer;
use strife_rpc::pki::{CertDir, RevokeTarget, RevokedCertificate};
use strife_rpc::revocation::Serial;

#[derive(Parser, Debug)]
#[command(name = "strife", version, about = "Strife: a payment gateway between banks, over mutual TLS")]
struct Cli {
    /// The Strife directory: certificates, data, logs, client state
    /// (default: the nearest `.strife`, else `./.strife`).
    #[arg(long, global = true, env = "STRIFE_DIR")]
    dir: Option<PathBuf>,
    /// The client's flags, given before the command (`strife --json
    /// balance`); client commands take them after it too.
    #[command(flatten, next_help_heading = "Client options (before or after a client command)")]
    client: ClientFlags,
    /// Run as a child of `strife up`: stop when standard input closes.
    #[arg(long, global = true, hide = true)]
    supervised: bool,
    /// A server's log file name, when `strife up` runs several replicas of
    /// it (`gateway.2` logs to `DIR/logs/gateway.2.log`).
    #[arg(long, global = true, hide = true, value_name = "NAME")]
    log_name: Option<String>,
    #[command(subcommand)]
    command: Command,
}

/// The flags of client commands. `main` merges the ones given before the
/// command with the ones given after it (those win), so both
/// `strife --json balance` and `strife balance --json` work; servers do not
/// list them. (No clap `env` here: a flag must win over STRIFE_GATEWAY
/// wherever it is given, so the variable is read after the merge.)
#[derive(Args, Debug, Clone, Default)]
struct ClientFlags {
    /// The gateway: ADDR, or a comma-separated list of replicas, which calls take in turn and fail over between (default: STRIFE_GATEWAY, else the list `strife up` wrote in DIR).
    #[arg(long, value_name = "ADDR")]
    gateway: Option<String>,
    /// Find the gateways in etcd: etcd://IP:PORT[,IP:PORT…] (default: STRIFE_DISCOVERY, else discovery.url in DIR/strife.toml, else DIR/etcd.url that `strife up --etcd` wrote). An explicit --gateway or STRIFE_GATEWAY wins; when etcd cannot be reached, the gateways DIR lists are used.
    #[arg(long, value_name = "URL")]
    discovery: Option<String>,
    /// Which logged-in session to act for, as USER@BANK (default: the most recent login).
    #[arg(long = "as", value_name = "USER@BANK")]
    as_user: Option<String>,
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long)]
    json: bool,
}

impl ClientFlags {
    /// These flags, completed by `outer` (flags given earlier on the line).
    fn over(&self, outer: &ClientFlags) -> ClientFlags {
        ClientFlags {
            gateway: self.gateway.clone().or_else(|| outer.gateway.clone()),
            discovery: self.discovery.clone().or_else(|| outer.discovery.clone()),
            as_user: self.as_user.clone().or_else(|| outer.as_user.clone()),
            json: self.json || outer.json,
        }
    }
}

/// `--json` for a tool or `certs`: global within its command, so
/// `strife certs init --json` and `strife certs --json init` both work.
#[derive(Args, Debug, Clone, Copy, Default)]
struct JsonOutput {
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long, global = true)]
    json: bool,
}

/// STRIFE_GATEWAY, for a `--gateway` that was not given.
fn gateway_from_env() -> Option<String> {
    std::env::var("STRIFE_GATEWAY").ok().filter(|v| !v.is_empty())
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a local cluster (PKI, gateway, one server per bank; with --postgres, replicas) in the foreground.
    Up(up::UpArgs),
    /// Manage the PKI in DIR/certs.
    Certs {
        #[command(flatten)]
        output: JsonOutput,
        #[command(subcommand)]
        command: CertsCommand,
    },
    /// The operator's dashboard of a running cluster.
    Admin {
        #[command(flatten)]
        output: JsonOutput,
        #[command(subcommand)]
        command: AdminCommand,
    },
    /// Run the gateway.
    Gateway {
        /// Address to listen on (`127.0.0.1:0` takes a free port).
        #[arg(long)]
        listen: Option<String>,
        /// Settings file (default: DIR/strife.toml if it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Run one bank.
    Bank {
        /// The bank's name; DIR/certs/NAME.pem must name it.
        #[arg(long)]
        name: String,
        /// Address to listen on (`127.0.0.1:0` takes a free port).
        #[arg(long)]
        listen: Option<String>,
        /// The gateway to register with, or a comma-separated list of
        /// gateway replicas (sharing one payment log) to register with
        /// every one of (default: STRIFE_GATEWAY, else the one `strife up`
        /// wrote in DIR).
        #[arg(long, value_name = "ADDR")]
        gateway: Option<String>,
        /// Accounts to create if they do not exist (TOML; see README).
        #[arg(long)]
        accounts: Option<PathBuf>,
        /// Settings file (default: DIR/strife.toml if it exists).
        #[arg(long)]
        config: Option<PathBuf>,
    },
    /// Log in as a customer of a bank.
    Login {
        #[arg(long)]
        bank: String,
        #[arg(long)]
        user: String,
        /// Read the password from the first line of standard input
        /// (otherwise STRIFE_PASSWORD, otherwise a prompt).
        #[arg(long)]
        password_stdin: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// End the session (the token stops working at the gateway).
    Logout {
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Show the balance and the available balance.
    Balance {
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Pay another customer.
    Pay {
        /// The payee, as USER@BANK.
        #[arg(long, value_name = "USER@BANK")]
        to: String,
        /// A decimal amount with at most two fraction digits, like 12.50.
        #[arg(long, allow_hyphen_values = true)]
        amount: String,
        /// The payment's id (a UUID); the same id never pays twice.
        #[arg(long)]
        id: Option<String>,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Show sent and received payments, newest first.
    History {
        /// How many payments a page shows (at most 500).
        #[arg(long, default_value_t = 50)]
        limit: u32,
        /// Start at this page: the `next_page_token` an earlier page gave.
        #[arg(long, conflicts_with = "all")]
        page_token: Option<String>,
        /// Show every payment, following the pages to the end.
        #[arg(long)]
        all: bool,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Payments waiting to be sent.
    Outbox {
        #[command(flatten)]
        client: ClientFlags,
        #[command(subcommand)]
        action: Option<OutboxAction>,
    },
    /// An interactive menu of every action.
    Shell {
        #[command(flatten)]
        client: ClientFlags,
    },
    /// What the gateway knows: banks (a row per replica) and payment counts.
    Status {
        #[command(flatten)]
        client: ClientFlags,
    },
    /// One payment you made or received, by its id.
    Payment {
        #[arg(long)]
        id: String,
        #[command(flatten)]
        client: ClientFlags,
    },
    /// Cross-check the gateway's payments against every bank's ledger (exit 0 when all agree).
    Audit {
        #[command(flatten)]
        output: JsonOutput,
    },
    /// Measure payments per second and latency (own cluster, or --gateway).
    Bench {
        #[command(flatten)]
        args: bench::BenchArgs,
        /// A running gateway to measure (default: the bench starts its own cluster).
        #[arg(long, value_name = "ADDR")]
        gateway: Option<String>,
        #[command(flatten)]
        output: JsonOutput,
    },
}

#[derive(Subcommand, Debug, Clone)]
enum OutboxAction {
    /// List waiting payments and outcomes not yet shown (the default).
    List(ClientFlags),
    /// Try to send every waiting payment now.
    Flush(ClientFlags),
    /// Keep sending until the outbox is empty (Ctrl-C stops).
    Watch(ClientFlags),
}

impl Command {
    /// The client flags given after a client command, completed by the
    /// ones given before it; None for the servers and tools.
    fn client_flags(&self, outer: &ClientFlags) -> Option<ClientFlags> {
        let inner = match self {
            Command::Login { client, .. }
            | Command::Logout { client }
            | Command::Balance { client }
            | Command::Pay { client, .. }
            | Command::History { client, .. }
            | Command::Shell { client }
            | Command::Status { client }
            | Command::Payment { client, .. } => client.over(outer),
            Command::Outbox { client, action } => match action {
                Some(OutboxAction::List(a) | OutboxAction::Flush(a) | OutboxAction::Watch(a)) => {
                    a.over(&client.over(outer))
                }
                None => client.over(outer),
            },
            Command::Up(_)
            | Command::Admin { .. }
            | Command::Certs { .. }
            | Command::Gateway { .. }
            | Command::Bank { .. }
            | Command::Audit { .. }
            | Command::Bench { .. } => return None,
        };
        Some(inner)
    }

    /// Whether `--json` was given, before or after the command.
    fn json(&self, outer: &ClientFlags) -> bool {
        match self {
            Command::Certs { output, .. }
            | Command::Admin { output, .. }
            | Command::Audit { output }
            | Command::Bench { output, .. } => output.json || outer.json,
            other => other.client_flags(outer).is_some_and(|f| f.json) || outer.json,
        }
    }
}

#[derive(Subcommand, Debug)]
enum AdminCommand {
    /// Print a one-time login link to the dashboard of the cluster in DIR
    /// (valid for `admin.link_ttl_secs`, 5 minutes by default, and once).
    /// Only someone who can read DIR/certs/admin.key can make one.
    Url {
        /// The dashboard's address (default: the first gateway's, from
        /// DIR/instances.json as `strife up` wrote it).
        #[arg(long, value_name = "ADDR")]
        admin: Option<String>,
    },
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create the CA and the gateway, bank and client certificates that are missing.
    Init(CertsInit),
    /// Make a new token-signing key; tokens signed with the previous keys
    /// stay valid (the gateway reads the keys when it starts).
    RotateTokenKey,
    /// Add one identity to an existing PKI (or renew it): a bank's server
    /// certificate, a client's certificate, or the gateway's, signed by the
    /// CA in DIR/certs. Running processes of that identity present the new
    /// one from their next connection, without a restart.
    Issue {
        /// The bank to issue a certificate for (its name, as in `--name` of `strife bank`).
        #[arg(
            long,
            value_name = "NAME",
            conflicts_with_all = ["client", "gateway"],
            required_unless_present_any = ["client", "gateway"]
        )]
        bank: Option<String>,
        /// The client identity to issue a certificate for (the client
        /// commands use the one named `client`).
        #[arg(long, value_name = "NAME", conflicts_with = "gateway")]
        client: Option<String>,
        /// Renew the gateway's certificate.
        #[arg(long)]
        gateway: bool,
    },
    /// Revoke certificates: every one issued so far to a bank, a client or
    /// the gateway, or one serial number. The CA signs a new CRL
    /// (DIR/certs/crl.pem) that adds them to those revoked before; running
    /// servers and clients refuse them from their next connection or
    /// message, without a restart.
    Revoke(RevokeArgs),
}

/// What `certs revoke` revokes: exactly one of these.
#[derive(Args, Debug)]
#[group(required = true, multiple = false)]
struct RevokeArgs {
    /// Every certificate issued to this bank.
    #[arg(long, value_name = "NAME")]
    bank: Option<String>,
    /// Every certificate issued to this client identity.
    #[arg(long, value_name = "NAME")]
    client: Option<String>,
    /// Every certificate issued to the gateway.
    #[arg(long)]
    gateway: bool,
    /// One certificate, by its serial number in hex (as `certs issue` prints it).
    #[arg(long, value_name = "N", value_parser = parse_serial)]
    serial: Option<Serial>,
}

fn parse_serial(text: &str) -> Result<Serial, String> {
    text.parse().map_err(|e: anyhow::Error| e.to_string())
}

#[derive(Args, Debug)]
struct CertsInit {
    /// A bank to issue a certificate for (repeatable; default BankA and BankB).
    #[arg(long = "bank")]
    banks: Vec<String>,
}

fn main() {
    // Everything strife creates under DIR is private, whatever the umask
    // it was started with (children inherit it).
    strife_rpc::files::restrict_umask();
    let cli = Cli::parse();
    let json = cli.command.json(&cli.client);
    let code = match run(cli) {
        Ok(reply) => emit(&reply, json),
        Err(e) => emit(&e.to_reply(), json),
    };
    std::process::exit(code);
}

fn emit(reply: &Reply, json: bool) -> i32 {
    if json {
        println!("{}", reply.json);
        // A queued payment's why, for a person (stdout is the JSON alone).
        if reply.exit == Exit::Queued && !reply.text.is_empty() {
            eprintln!("{}", reply.text);
        }
    } else if reply.exit == Exit::Done {
        if !reply.text.is_empty() {
            println!("{}", reply.text);
        }
    } else if matches!(reply.exit, Exit::Declined | Exit::Queued)
        || reply.json.get("problems").is_some()
        || reply.json.get("payments_per_sec").is_some()
    {
        println!("{}", reply.text);
    } else {
        eprintln!("{}", reply.text);
    }
    let _ = std::io::stdout().flush();
    reply.exit.code()
}

fn runtime(single: bool) -> Result<tokio::runtime::Runtime, CliError> {
    server_runtime(if single { 1 } else { 0 })
}

/// A runtime with `workers` threads (0: one per core; 1: the current thread).
fn server_runtime(workers: u64) -> Result<tokio::runtime::Runtime, CliError> {
    match workers {
        0 => tokio::runtime::Builder::new_multi_thread().enable_all().build(),
        1 => tokio::runtime::Builder::new_current_thread().enable_all().build(),
        n => tokio::runtime::Builder::new_multi_thread()
            .worker_threads(usize::try_from(n).unwrap_or(1))
            .enable_all()
            .build(),
    }
    .map_err(CliError::unexpected)
}

/// A server's logging, and its OTLP export when `telemetry.otlp_endpoint`
/// is set (set up inside `rt`, where the exporter's connection lives).
fn init_server_logs(
    rt: &tokio::runtime::Runtime,
    log_name: &str,
    dir: &std::path::Path,
    config: &Config,
) -> Result<(), CliError> {
    let _inside = rt.enter();
    strife_rpc::telemetry::init(log_name, dir, &config.log.level, &config.telemetry.otlp_endpoint)
        .map_err(fatal)
}

/// A server's or tool's failure: the whole error chain, exit 1.
fn fatal(e: anyhow::Error) -> CliError {
    CliError::new(Exit::Unexpected, format!("{e:#}"))
}

fn run(cli: Cli) -> Result<Reply, CliError> {
    if let Some(name) = &cli.log_name
        && (name.starts_with('.') || !name.chars().all(|c| c.is_ascii_alphanumeric() || c == '.' || c == '-'))
    {
        return Err(CliError::new(Exit::Usage, "--log-name takes letters, digits, '.' and '-'"));
    }
    let dir = strife_client::connect::resolve_dir(cli.dir.as_deref());
    let flags = cli.command.client_flags(&cli.client);
    match cli.command {
        Command::Up(args) => {
            let dir = cli.dir.unwrap_or_else(|| PathBuf::from(strife_client::connect::DEFAULT_DIR));
            runtime(false)?.block_on(up::run(dir, args)).map_err(fatal)?;
            Ok(Reply::done(serde_json::json!({"stopped": true}), ""))
        }
        Command::Certs { command, .. } => certs(&dir, command).map_err(fatal),
        Command::Admin { command: AdminCommand::Url { admin }, .. } => {
            let dir = strife_client::connect::existing_dir(cli.dir.as_deref(), Exit::Unexpected)?;
            admin_url(&dir, admin).map_err(fatal)
        }
        Command::Audit { .. } => {
            let dir = strife_client::connect::existing_dir(cli.dir.as_deref(), Exit::Unexpected)?;
            runtime(true)?.block_on(audit::run(&dir)).map_err(fatal)
        }
        Command::Bench { args, gateway, .. } => {
            strife_rpc::telemetry::init_stderr("warn");
            let gateway = gateway.or(cli.client.gateway).or_else(gateway_from_env);
            runtime(false)?.block_on(bench::run(args, cli.dir, gateway)).map_err(fatal)
        }
        Command::Gateway { listen, config } => {
            let config = Config::load(&dir, config.as_deref()).map_err(fatal)?;
            let log_name = cli.log_name.as_deref().unwrap_or("gateway");
            let rt = server_runtime(config.runtime.workers)?;
            init_server_logs(&rt, log_name, &dir, &config)?;
            let listen = listen.unwrap_or_else(|| config.gateway.listen.clone());
            // Under `up`, which writes every gateway's address there.
            let write_address_file = !cli.supervised;
            let opts = strife_gateway::GatewayOptions { dir, config, write_address_file };
            rt.block_on(async move {
                let (listener, _) = strife_rpc::serve::bind(&listen).await?;
                let ran = strife_gateway::run(opts, listener, shutdown(cli.supervised)).await;
                strife_rpc::telemetry::shutdown_export().await;
                ran
            })
            .map_err(|e| {
                tracing::error!("gateway failed: {e:#}");
                fatal(e)
            })?;
            Ok(Reply::done(serde_json::json!({"stopped": true}), ""))
        }
        Command::Bank { name, listen, gateway, accounts, config } => {
            strife_core::validate_bank_name(&name).map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
            let config = Config::load(&dir, config.as_deref()).map_err(fatal)?;
            let log_name = cli.log_name.as_deref().unwrap_or(&name);
            let rt = server_runtime(config.runtime.workers)?;
            init_server_logs(&rt, log_name, &dir, &config)?;
            let listen = listen.unwrap_or_else(|| config.bank.listen.clone());
            let gateway = gateway.or(cli.client.gateway).or_else(gateway_from_env);
            let opts = strife_bank::BankOptions { dir, name, config, gateway, accounts, discovered: None };
            rt.block_on(async move {
                let (listener, _) = strife_rpc::serve::bind(&listen).await?;
                let ran = strife_bank::run(opts, listener, shutdown(cli.supervised)).await;
                strife_rpc::telemetry::shutdown_export().await;
                ran
            })
            .map_err(|e| {
                tracing::error!("bank failed: {e:#}");
                fatal(e)
            })?;
            Ok(Reply::done(serde_json::json!({"stopped": true}), ""))
        }
        command => {
            let flags = flags.unwrap_or_default();
            let dir = match client_dir_need(&command) {
                // Only a login (here or in the shell) may create DIR.
                None => dir,
                Some(exit) => strife_client::connect::existing_dir(cli.dir.as_deref(), exit)?,
            };
            let mut client = open_client(&dir, flags)?;
            if let Command::Shell { .. } = command {
                // Several threads: the shell blocks on its input while the
                // discovery watch keeps the gateways' set current.
                return runtime(false)?.block_on(async move {
                    client.watch_gateways()?;
                    strife_client::shell::run(client).await
                });
            }
            strife_rpc::telemetry::init_stderr("warn");
            runtime(true)?.block_on(client_command(&mut client, command))
        }
    }
}

/// Whether a client command needs an existing Strife directory, and the
/// exit code it gives when there is none: only `login` (and the shell,
/// through its login) may create one. Commands that act for a session
/// answer "not authenticated" (there is no session), the others
/// "unexpected" (there is no cluster to ask).
fn client_dir_need(command: &Command) -> Option<Exit> {
    match command {
        Command::Login { .. } | Command::Shell { .. } => None,
        Command::Logout { .. }
        | Command::Balance { .. }
        | Command::Pay { .. }
        | Command::History { .. }
        | Command::Payment { .. } => Some(Exit::NotAllowed),
        _ => Some(Exit::Unexpected),
    }
}

/// Resolves on SIGTERM or SIGINT, or, for a child of `strife up`, when its
/// parent is gone (it died, even by kill -9, and we were re-parented).
async fn shutdown(supervised: bool) {
    if !supervised {
        return strife_rpc::serve::shutdown_signal().await;
    }
    let parent = std::os::unix::process::parent_id();
    let orphaned = async move {
        while std::os::unix::process::parent_id() == parent {
            tokio::time::sleep(std::time::Duration::from_millis(250)).await;
        }
    };
    tokio::select! {
        _ = strife_rpc::serve::shutdown_signal() => {}
        _ = orphaned => tracing::warn!("strife up went away; stopping"),
    }
}

fn open_client(dir: &std::path::Path, flags: ClientFlags) -> Result<Client, CliError> {
    let as_user = flags
        .as_user
        .map(|s| s.parse::<UserRef>().map_err(|e| CliError::new(Exit::Usage, format!("--as: {e}"))))
        .transpose()?;
    if let Some(url) = &flags.discovery {
        strife_client::discovery::check_url(url)?;
    }
    let config = Config::load(dir, None).map_err(fatal)?;
    // An explicit gateway list wins over discovery.
    let gateway = flags.gateway.or_else(gateway_from_env);
    let discovery = match gateway {
        Some(_) => None,
        None => strife_client::discovery::etcd_url(dir, flags.discovery.as_deref(), &config.discovery),
    };
    let mut client = Client::open(dir.to_path_buf(), gateway, as_user, config.client)?;
    client.discovery = discovery;
    Ok(client)
}

async fn client_command(client: &mut Client, command: Command) -> Result<Reply, CliError> {
    match command {
        Command::Login { bank, user, password_stdin, .. } => {
            let password = read_password(password_stdin)?;
            client.login(&bank, &user, password).await
        }
        Command::Logout { .. } => client.logout().await,
        Command::Balance { .. } => client.balance().await,
        Command::Pay { to, amount, id, .. } => client.pay(&to, &amount, id.as_deref()).await,
        Command::History { limit, page_token, all, .. } => {
            client.history(strife_client::commands::HistoryPage { size: limit, token: page_token, all }).await
        }
        Command::Outbox { action, .. } => match action {
            None | Some(OutboxAction::List(_)) => client.outbox_list(),
            Some(OutboxAction::Flush(_)) => client.outbox_flush().await,
            Some(OutboxAction::Watch(_)) => {
                client.watch_gateways()?;
                client.outbox_watch(strife_rpc::serve::shutdown_signal()).await
            }
        },
        Command::Status { .. } => client.status().await,
        Command::Payment { id, .. } => client.payment(&id).await,
        other => Err(CliError::unexpected(format!("{other:?} is not a client command"))),
    }
}

/// The password: `--password-stdin`, else STRIFE_PASSWORD, else a prompt.
fn read_password(from_stdin: bool) -> Result<Secret<String>, CliError> {
    if from_stdin {
        let mut text = String::new();
        std::io::stdin().lock().read_to_string(&mut text).map_err(CliError::unexpected)?;
        let line = text.lines().next().unwrap_or("").to_owned();
        return Ok(Secret::new(line));
    }
    if let Ok(p) = std::env::var("STRIFE_PASSWORD") {
        return Ok(Secret::new(p));
    }
    if !std::io::stdin().is_terminal() {
        return Err(CliError::new(
            Exit::Usage,
            "no password: set STRIFE_PASSWORD, pass --password-stdin, or run in a terminal to be asked",
        ));
    }
    rpassword::prompt_password("Password: ").map(Secret::new).map_err(CliError::unexpected)
}

/// A login link to the dashboard at `admin`, else at the first gateway's
/// dashboard that `up` recorded in DIR/instances.json.
fn admin_url(dir: &std::path::Path, admin: Option<String>) -> anyhow::Result<Reply> {
    let config = Config::load(dir, None)?;
    let certs = CertDir::new(dir);
    let key = certs.path.join(strife_gateway::admin_access::ADMIN_KEY_FILE);
    if !key.exists() {
        anyhow::bail!(
            "no admin key at {}: start the cluster (strife up or strife gateway) first",
            key.display()
        );
    }
    let addr = match admin {
        Some(a) => a,
        None => strife_client::instances::read(dir)?
            .unwrap_or_default()
            .into_iter()
            .find_map(|i| if i.role == strife_client::instances::Role::Gateway { i.admin } else { None })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "no gateway dashboard recorded in {}/instances.json: is the cluster running (strife up), with admin.listen not off? Or give --admin ADDR",
                    dir.display()
                )
            })?,
    };
    let ttl = std::time::Duration::from_secs(config.admin.link_ttl_secs);
    let link = strife_gateway::admin_access::login_link(&certs.path, &addr, ttl)?;
    Ok(Reply::done(serde_json::json!({ "url": link, "admin": addr }), link))
}

fn certs(dir: &std::path::Path, cmd: CertsCommand) -> anyhow::Result<Reply> {
    let certs = CertDir::new(dir);
    match cmd {
        CertsCommand::Init(args) => {
            let banks = if args.banks.is_empty() { vec!["BankA".into(), "BankB".into()] } else { args.banks };
            let peers = up::identities(&banks)?;
            let created = certs.init(&peers)?;
            strife_gateway::tokens::load_or_create_key(&certs.path)?;
            let names: Vec<String> = created.iter().map(CertDir::file_stem).collect();
            let text = if names.is_empty() {
                format!("The PKI in {} is complete; nothing to do.", certs.path.display())
            } else {
                format!("Created certificates in {}: {}", certs.path.display(), names.join(", "))
            };
            Ok(Reply::done(serde_json::json!({ "dir": certs.path, "created": names }), text))
        }
        CertsCommand::RotateTokenKey => {
            let kid = strife_gateway::tokens::rotate_key(&certs.path)?;
            Ok(Reply::done(
                serde_json::json!({ "kid": kid }),
                format!(
                    "New token-signing key {kid}; running gateways sign with it within seconds. Older tokens stay valid."
                ),
            ))
        }
        CertsCommand::Issue { bank, client, gateway } => {
            let peer = match (bank, client, gateway) {
                (Some(b), _, _) => {
                    strife_core::validate_bank_name(&b)?;
                    Peer::Bank(b)
                }
                (None, Some(c), _) => {
                    strife_core::validate_user_name(&c)?;
                    Peer::Client(c)
                }
                (None, None, true) => Peer::Gateway,
                (None, None, false) => anyhow::bail!("name a --bank, a --client or the --gateway"),
            };
            if !certs.exists() {
                anyhow::bail!("no CA in {}: run `strife certs init` first", certs.path.display());
            }
            let issued = certs.issue(&peer)?;
            let files = &issued.files;
            Ok(Reply::done(
                serde_json::json!({
                    "identity": peer.to_string(),
                    "serial": issued.serial.to_string(),
                    "cert": files.cert,
                    "key": files.key,
                }),
                format!(
                    "Issued {peer} (serial {}): {} and {}. Running processes of {peer} present it from their next connection, without a restart.",
                    issued.serial,
                    files.cert.display(),
                    files.key.display()
                ),
            ))
        }
        CertsCommand::Revoke(args) => {
            let target = match args {
                RevokeArgs { bank: Some(b), .. } => {
                    strife_core::validate_bank_name(&b)?;
                    RevokeTarget::Identity(Peer::Bank(b))
                }
                RevokeArgs { client: Some(c), .. } => {
                    strife_core::validate_user_name(&c)?;
                    RevokeTarget::Identity(Peer::Client(c))
                }
                RevokeArgs { gateway: true, .. } => RevokeTarget::Identity(Peer::Gateway),
                RevokeArgs { serial: Some(serial), .. } => RevokeTarget::Serial(serial),
                _ => anyhow::bail!("name a --bank, a --client, the --gateway or a --serial"),
            };
            let done = certs.revoke(&target)?;
            Ok(revocation_reply(&target, &done))
        }
    }
}

/// The reply of `certs revoke`: what it revoked now, what was revoked
/// already, and the CRL.
fn revocation_reply(target: &RevokeTarget, done: &strife_rpc::pki::Revocation) -> Reply {
    let entry = |r: &RevokedCertificate| {
        serde_json::json!({
            "serial": r.serial.to_string(),
            "identity": r.identity,
            "revoked_at": strife_rpc::pki::rfc3339(r.revoked_at),
        })
    };
    let list = |rs: &[RevokedCertificate]| {
        rs.iter()
            .map(|r| match &r.identity {
                Some(who) => format!("{} ({who})", r.serial),
                None => format!("{} (not in this CA's index)", r.serial),
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    let mut text = Vec::new();
    if !done.revoked.is_empty() {
        text.push(format!("Revoked {}.", list(&done.revoked)));
    }
    if !done.already.is_empty() {
        text.push(format!("Already revoked: {}.", list(&done.already)));
    }
    text.push(format!(
        "The CRL {} (number {}) lists {} certificate(s); running servers and clients refuse them from their next connection or message.",
        done.crl.display(),
        done.crl_number,
        done.total
    ));
    if let RevokeTarget::Identity(peer) = target {
        let flag = match peer {
            Peer::Gateway => "--gateway".to_owned(),
            Peer::Bank(name) => format!("--bank {name}"),
            Peer::Client(name) => format!("--client {name}"),
        };
        text.push(format!(
            "Give {peer} a new certificate with `strife certs issue {flag}`; its running processes use it without a restart."
        ));
    }
    Reply::done(
        serde_json::json!({
            "identity": match target {
                RevokeTarget::Identity(peer) => Some(peer.to_string()),
                RevokeTarget::Serial(_) => None,
            },
            "revoked": done.revoked.iter().map(entry).collect::<Vec<_>>(),
            "already_revoked": done.already.iter().map(entry).collect::<Vec<_>>(),
            "crl": done.crl,
            "crl_number": done.crl_number,
            "total": done.total,
        }),
        text.join("\n"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::CommandFactory;

    fn parse(args: &[&str]) -> Result<Cli, clap::Error> {
        Cli::try_parse_from(std::iter::once("strife").chain(args.iter().copied()))
    }

    /// The client flags a command line ends up with (None: not a client command).
    fn flags(args: &[&str]) -> Option<ClientFlags> {
        let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
        cli.command.client_flags(&cli.client)
    }

    #[test]
    fn the_definition_is_consistent() {
        Cli::command().debug_assert();
    }

    #[test]
    fn client_flags_work_before_and_after_the_command() {
        for args in [
            &["--json", "balance"][..],
            &["balance", "--json"],
            &["--json", "outbox", "list"],
            &["outbox", "--json", "list"],
            &["outbox", "list", "--json"],
            &["outbox", "--json"],
            &["--json", "pay", "--to", "u@B", "--amount", "1"],
            &["pay", "--to", "u@B", "--amount", "1", "--json"],
            &["history", "--json", "--limit", "3"],
            &["status", "--json"],
            &["--json", "login", "--bank", "B", "--user", "u"],
        ] {
            assert!(flags(args).is_some_and(|f| f.json), "{args:?}");
        }
        let f = flags(&["--as", "u1@A", "--gateway", "g1", "balance"]).expect("client");
        assert_eq!((f.as_user.as_deref(), f.gateway.as_deref()), (Some("u1@A"), Some("g1")));
        let f = flags(&["--discovery", "etcd://127.0.0.1:1", "pay", "--to", "u@B", "--amount", "1"])
            .expect("client");
        assert_eq!(f.discovery.as_deref(), Some("etcd://127.0.0.1:1"));
        let f = flags(&["balance", "--discovery", "etcd://127.0.0.1:2"]).expect("client");
        assert_eq!(f.discovery.as_deref(), Some("etcd://127.0.0.1:2"));
        let f = flags(&["balance", "--as", "u1@A", "--gateway", "g1"]).expect("client");
        assert_eq!((f.as_user.as_deref(), f.gateway.as_deref()), (Some("u1@A"), Some("g1")));
        // Given both before and after the command, the later one wins.
        let f = flags(&["--as", "u1@A", "outbox", "--as", "u2@A", "flush", "--as", "u3@A"]).expect("client");
        assert_eq!(f.as_user.as_deref(), Some("u3@A"));
        assert!(flags(&["balance"]).is_some_and(|f| !f.json && f.as_user.is_none()));
    }

    #[test]
    fn tools_keep_their_json_and_gateway_flags() {
        for args in [
            &["--json", "audit"][..],
            &["audit", "--json"],
            &["--json", "bench"],
            &["bench", "--json"],
            &["certs", "init", "--json"],
            &["certs", "--json", "init"],
            &["--json", "certs", "init"],
        ] {
            let cli = parse(args).unwrap_or_else(|e| panic!("{args:?}: {e}"));
            assert!(cli.command.json(&cli.client), "{args:?}");
        }
        for args in [&["bank", "--name", "B", "--gateway", "g"][..], &["bench", "--gateway", "g"]] {
            assert!(parse(args).is_ok(), "{args:?}");
        }
        let cli = parse(&["--gateway", "g", "bank", "--name", "B"]).expect("before the command");
        assert_eq!(cli.client.gateway.as_deref(), Some("g"));
    }

    #[test]
    fn servers_take_no_client_flags() {
        for args in [
            &["up", "--json"][..],
            &["up", "--as", "u@B"],
            &["up", "--gateway", "g"],
            &["gateway", "--json"],
            &["gateway", "--as", "u@B"],
            &["bank", "--name", "B", "--as", "u@B"],
            &["certs", "init", "--as", "u@B"],
        ] {
            assert!(parse(args).is_err(), "{args:?} is refused");
        }
        let mut cmd = Cli::command();
        for name in ["up", "gateway", "bank"] {
            let help = cmd.find_subcommand_mut(name).expect(name).render_long_help().to_string();
            assert!(!help.contains("--as") && !help.contains("--json"), "{name}: {help}");
        }
        let help = cmd.find_subcommand_mut("balance").expect("balance").render_long_help().to_string();
        assert!(help.contains("--as") && help.contains("--json") && help.contains("--gateway"), "{help}");
    }

    #[test]
    fn certs_issue_explains_its_flags() {
        let mut cmd = Cli::command();
        let certs = cmd.find_subcommand_mut("certs").expect("certs");
        let help = certs.find_subcommand_mut("issue").expect("issue").render_long_help().to_string();
        assert!(help.contains("The bank to issue a certificate for"), "{help}");
        assert!(help.contains("The client identity to issue a certificate for"), "{help}");
    }
}
