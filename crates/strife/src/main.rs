//! `strife`: every program of the system is a subcommand of this binary.
//! `main` parses flags, sets up logging and hands over to the crates.

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
use strife_rpc::pki::CertDir;

#[derive(Parser, Debug)]
#[command(name = "strife", version, about = "Strife: a payment gateway between banks, over mutual TLS")]
struct Cli {
    /// The Strife directory: certificates, data, logs, client state
    /// (default: the nearest `.strife`, else `./.strife`).
    #[arg(long, global = true, env = "STRIFE_DIR")]
    dir: Option<PathBuf>,
    /// The gateway's address (default: the one `strife up` wrote in DIR).
    #[arg(long, global = true, env = "STRIFE_GATEWAY")]
    gateway: Option<String>,
    /// Which logged-in session to act for, as USER@BANK (default: the most recent login).
    #[arg(long = "as", global = true, value_name = "USER@BANK")]
    as_user: Option<String>,
    /// Print one JSON object on stdout and nothing else there.
    #[arg(long, global = true)]
    json: bool,
    /// Run as a child of `strife up`: stop when standard input closes.
    #[arg(long, global = true, hide = true)]
    supervised: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Start a local cluster (PKI, gateway, one server per bank) in the foreground.
    Up(up::UpArgs),
    /// Manage the PKI in DIR/certs.
    #[command(subcommand)]
    Certs(CertsCommand),
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
    },
    /// End the session (the token stops working at the gateway).
    Logout,
    /// Show the balance and the available balance.
    Balance,
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
    },
    /// Payments waiting to be sent.
    Outbox {
        #[command(subcommand)]
        action: Option<OutboxAction>,
    },
    /// An interactive menu of every action.
    Shell,
    /// What the gateway knows: banks and payment counts.
    Status,
    /// The outcome of one of your payments, by id.
    Payment {
        #[arg(long)]
        id: String,
    },
    /// Cross-check the gateway's payments against every bank's ledger (exit 0 when all agree).
    Audit,
    /// Measure payments per second and latency (own cluster, or --gateway).
    Bench(bench::BenchArgs),
}

#[derive(Subcommand, Debug, Clone, Copy)]
enum OutboxAction {
    /// List waiting payments and outcomes not yet shown (the default).
    List,
    /// Try to send every waiting payment now.
    Flush,
    /// Keep sending until the outbox is empty (Ctrl-C stops).
    Watch,
}

#[derive(Subcommand, Debug)]
enum CertsCommand {
    /// Create the CA and the gateway, bank and client certificates that are missing.
    Init(CertsInit),
    /// Make a new token-signing key; tokens signed with the previous keys
    /// stay valid (the gateway reads the keys when it starts).
    RotateTokenKey,
    /// Add one identity to an existing PKI (or renew it).
    Issue {
        #[arg(long, conflicts_with = "client", required_unless_present = "client")]
        bank: Option<String>,
        #[arg(long)]
        client: Option<String>,
    },
}

#[derive(Args, Debug)]
struct CertsInit {
    /// A bank to issue a certificate for (repeatable; default BankA and BankB).
    #[arg(long = "bank")]
    banks: Vec<String>,
}

fn main() {
    let cli = Cli::parse();
    let json = cli.json;
    let code = match run(cli) {
        Ok(reply) => emit(&reply, json),
        Err(e) => emit(&e.to_reply(), json),
    };
    std::process::exit(code);
}

fn emit(reply: &Reply, json: bool) -> i32 {
    if json {
        println!("{}", reply.json);
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

/// A server's or tool's failure: the whole error chain, exit 1.
fn fatal(e: anyhow::Error) -> CliError {
    CliError::new(Exit::Unexpected, format!("{e:#}"))
}

fn run(cli: Cli) -> Result<Reply, CliError> {
    let dir = strife_client::connect::resolve_dir(cli.dir.as_deref());
    match cli.command {
        Command::Up(args) => {
            let dir = cli.dir.unwrap_or_else(|| PathBuf::from(strife_client::connect::DEFAULT_DIR));
            runtime(false)?.block_on(up::run(dir, args)).map_err(fatal)?;
            Ok(Reply::done(serde_json::json!({"stopped": true}), ""))
        }
        Command::Certs(cmd) => certs(&dir, cmd).map_err(fatal),
        Command::Audit => audit::run(&dir).map_err(fatal),
        Command::Bench(args) => {
            strife_rpc::telemetry::init_stderr("warn");
            runtime(false)?.block_on(bench::run(args, cli.dir, cli.gateway)).map_err(fatal)
        }
        Command::Gateway { listen, config } => {
            let config = Config::load(&dir, config.as_deref()).map_err(fatal)?;
            strife_rpc::telemetry::init("gateway", &dir, &config.log.level).map_err(fatal)?;
            let listen = listen.unwrap_or_else(|| config.gateway.listen.clone());
            let workers = config.runtime.workers;
            let opts = strife_gateway::GatewayOptions { dir, config };
            server_runtime(workers)?
                .block_on(async move {
                    let (listener, _) = strife_rpc::serve::bind(&listen).await?;
                    strife_gateway::run(opts, listener, shutdown(cli.supervised)).await
                })
                .map_err(|e| {
                    tracing::error!("gateway failed: {e:#}");
                    fatal(e)
                })?;
            Ok(Reply::done(serde_json::json!({"stopped": true}), ""))
        }
        Command::Bank { name, listen, accounts, config } => {
            strife_core::validate_bank_name(&name).map_err(|e| CliError::new(Exit::Usage, e.to_string()))?;
            let config = Config::load(&dir, config.as_deref()).map_err(fatal)?;
            strife_rpc::telemetry::init(&name, &dir, &config.log.level).map_err(fatal)?;
            let listen = listen.unwrap_or_else(|| config.bank.listen.clone());
            let workers = config.runtime.workers;
            let opts = strife_bank::BankOptions { dir, name, config, gateway: cli.gateway, accounts };
            server_runtime(workers)?
                .block_on(async move {
                    let (listener, _) = strife_rpc::serve::bind(&listen).await?;
                    strife_bank::run(opts, listener, shutdown(cli.supervised)).await
                })
                .map_err(|e| {
                    tracing::error!("bank failed: {e:#}");
                    fatal(e)
                })?;
            Ok(Reply::done(serde_json::json!({"stopped": true}), ""))
        }
        Command::Shell => {
            let client = open_client(&dir, cli.gateway, cli.as_user.as_deref())?;
            runtime(true)?.block_on(strife_client::shell::run(client))
        }
        command => {
            strife_rpc::telemetry::init_stderr("warn");
            let mut client = open_client(&dir, cli.gateway, cli.as_user.as_deref())?;
            runtime(true)?.block_on(client_command(&mut client, command))
        }
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

fn open_client(
    dir: &std::path::Path,
    gateway: Option<String>,
    as_user: Option<&str>,
) -> Result<Client, CliError> {
    let as_user = as_user
        .map(|s| s.parse::<UserRef>().map_err(|e| CliError::new(Exit::Usage, format!("--as: {e}"))))
        .transpose()?;
    let config = Config::load(dir, None).map_err(fatal)?;
    Client::open(dir.to_path_buf(), gateway, as_user, config.client)
}

async fn client_command(client: &mut Client, command: Command) -> Result<Reply, CliError> {
    match command {
        Command::Login { bank, user, password_stdin } => {
            let password = read_password(password_stdin)?;
            client.login(&bank, &user, password).await
        }
        Command::Logout => client.logout().await,
        Command::Balance => client.balance().await,
        Command::Pay { to, amount, id } => client.pay(&to, &amount, id.as_deref()).await,
        Command::History { limit, page_token, all } => {
            client.history(strife_client::commands::HistoryPage { size: limit, token: page_token, all }).await
        }
        Command::Outbox { action } => match action.unwrap_or(OutboxAction::List) {
            OutboxAction::List => client.outbox_list(),
            OutboxAction::Flush => client.outbox_flush().await,
            OutboxAction::Watch => client.outbox_watch(strife_rpc::serve::shutdown_signal()).await,
        },
        Command::Status => client.status().await,
        Command::Payment { id } => client.payment(&id).await,
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
                    "New token-signing key {kid}; restart the gateway to sign with it. Older tokens stay valid."
                ),
            ))
        }
        CertsCommand::Issue { bank, client } => {
            let peer = match (bank, client) {
                (Some(b), _) => {
                    strife_core::validate_bank_name(&b)?;
                    Peer::Bank(b)
                }
                (None, Some(c)) => {
                    strife_core::validate_user_name(&c)?;
                    Peer::Client(c)
                }
                (None, None) => anyhow::bail!("name a --bank or a --client"),
            };
            if !certs.exists() {
                anyhow::bail!("no CA in {}: run `strife certs init` first", certs.path.display());
            }
            let files = certs.issue(&peer)?;
            Ok(Reply::done(
                serde_json::json!({ "identity": peer.to_string(), "cert": files.cert, "key": files.key }),
                format!("Issued {peer}: {} and {}", files.cert.display(), files.key.display()),
            ))
        }
    }
}
