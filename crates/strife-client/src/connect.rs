//! Finding and reaching the gateway: its addresses from `--gateway`,
//! `STRIFE_GATEWAY` (a comma-separated list of replicas) or
//! `DIR/gateway.addr`; mutual TLS with the client certificate in
//! `DIR/certs`. Commands spread their calls over the replicas and fail
//! over between them through [`crate::gateways::Gateways`].

use crate::exit::{CliError, Exit};
use std::path::{Path, PathBuf};
use std::time::Duration;
use strife_rpc::Peer;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use tonic::transport::Channel;

/// The name of the directory `up` creates and clients look for.
pub const DEFAULT_DIR: &str = ".strife";
/// The client identity `certs init` issues.
pub const CLIENT_NAME: &str = "client";

/// The Strife directory, if there is one: `--dir`/`STRIFE_DIR` if given,
/// else the nearest `.strife` in this directory or a parent.
pub fn find_dir(given: Option<&Path>) -> Option<PathBuf> {
    if let Some(dir) = given {
        return Some(dir.to_path_buf());
    }
    let cwd = std::env::current_dir().ok()?;
    cwd.ancestors().map(|a| a.join(DEFAULT_DIR)).find(|d| d.is_dir())
}

/// The Strife directory of a command that may create it (`up`, `login`,
/// the servers): [`find_dir`], else `./.strife`.
pub fn resolve_dir(given: Option<&Path>) -> PathBuf {
    find_dir(given).unwrap_or_else(|| PathBuf::from(DEFAULT_DIR))
}

/// The Strife directory of a command that only uses what is there: an
/// error with `exit` when there is none, so that nothing is created.
pub fn existing_dir(given: Option<&Path>, exit: Exit) -> Result<PathBuf, CliError> {
    match find_dir(given) {
        Some(dir) if dir.is_dir() => Ok(dir),
        Some(dir) => Err(CliError::new(
            exit,
            format!(
                "no Strife directory at {}: run `strife up --dir {}`, or pass the --dir of your cluster",
                dir.display(),
                dir.display()
            ),
        )),
        None => Err(CliError::new(
            exit,
            format!(
                "no Strife directory here (no {DEFAULT_DIR} in this directory or a parent): \
                 run `strife up`, or pass --dir"
            ),
        )),
    }
}

/// Most gateway addresses one list may name.
pub const GATEWAYS_MAX: usize = 64;

/// The gateways' addresses: the flag/env value (`a,b,c`), else
/// `DIR/gateway.addr`.
pub fn gateway_addresses(dir: &Path, given: Option<&str>) -> Result<Vec<String>, CliError> {
    let list = match given {
        Some(list) => list.to_owned(),
        None => read_address_file(dir)?,
    };
    let addresses: Vec<String> =
        list.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
    if addresses.is_empty() {
        return Err(CliError::new(Exit::Usage, "--gateway names no address (give ADDR or ADDR1,ADDR2,…)"));
    }
    if addresses.len() > GATEWAYS_MAX {
        return Err(CliError::new(
            Exit::Usage,
            format!("--gateway names more than {GATEWAYS_MAX} addresses"),
        ));
    }
    Ok(addresses)
}

fn read_address_file(dir: &Path) -> Result<String, CliError> {
    let file = dir.join(strife_rpc::config::GATEWAY_ADDR_FILE);
    std::fs::read_to_string(&file).map(|s| s.trim().to_owned()).map_err(|_| {
        CliError::new(
            Exit::Unexpected,
            format!(
                "cannot find the gateway: no {} (start a cluster with `strife up`, or pass --gateway)",
                file.display()
            ),
        )
    })
}

/// A channel to the gateway, connected (or an error saying it is down).
pub async fn connect(dir: &Path, addr: &str, timeout: Duration) -> Result<Channel, ConnectError> {
    let tls = Tls::load(&CertDir::new(dir), &Peer::Client(CLIENT_NAME.to_owned()))
        .map_err(|e| ConnectError::Setup(format!("{e:#}")))?;
    if tls.is_revoked(&tls.serial()) {
        return Err(ConnectError::Refused(format!(
            "this client's certificate (serial {}) is revoked; get a new one with \
             `strife certs issue --client {CLIENT_NAME}`",
            tls.serial()
        )));
    }
    let endpoint = tls.endpoint(&Peer::Gateway, addr).map_err(|e| ConnectError::Setup(format!("{e:#}")))?;
    let endpoint = endpoint.timeout(timeout);
    match tokio::time::timeout(timeout, endpoint.connect()).await {
        Ok(Ok(channel)) => Ok(channel),
        Ok(Err(e)) => match strife_rpc::tls::refused_by_server() {
            Some(alert) => Err(ConnectError::Refused(format!(
                "the gateway at {addr} refused this client's certificate ({alert}): if it was revoked, \
                 get a new one with `strife certs issue --client {CLIENT_NAME}`"
            ))),
            None => Err(ConnectError::Unreachable(format!("{addr}: {}", root_cause(&e)))),
        },
        Err(_) => Err(ConnectError::Unreachable(format!("{addr}: no answer within {timeout:?}"))),
    }
}

/// The innermost error of a chain, which says what went wrong ("Connection
/// refused"); the layers above it ("transport error", "tcp connect error",
/// the latter twice) only say where.
pub(crate) fn root_cause(e: &dyn std::error::Error) -> String {
    let mut cause = e;
    while let Some(inner) = cause.source() {
        cause = inner;
    }
    cause.to_string()
}

#[derive(Debug, Clone)]
pub enum ConnectError {
    /// Our own set-up is wrong (no certificate, bad address): not an outage.
    Setup(String),
    /// The gateway did not answer: payments wait in the outbox.
    Unreachable(String),
    /// Our certificate is revoked: no gateway will take it.
    Refused(String),
}

impl From<ConnectError> for CliError {
    fn from(e: ConnectError) -> CliError {
        match e {
            ConnectError::Setup(m) => CliError::new(Exit::Unexpected, m),
            ConnectError::Unreachable(m) => {
                CliError::new(Exit::Unexpected, format!("the gateway is unreachable ({m})"))
            }
            ConnectError::Refused(m) => CliError::new(Exit::NotAllowed, m),
        }
    }
}
