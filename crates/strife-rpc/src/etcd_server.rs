//! A private etcd server: for the tests, and for `strife up --etcd auto`.
//! It uses the `etcd` program of Debian's `etcd-server` package.
//!
//! ```text
//! base/                  0700
//!   data/                etcd's data directory (its WAL is fsynced)
//!   ports                its client and peer ports, kept for a restart
//!   root.password        0600: the password of etcd's root user
//!   etcd.log             what etcd logs
//! ```
//!
//! One member on 127.0.0.1 (or the address given), clients and peers over
//! mutual TLS with the cluster's CA (`--client-cert-auth`), with a server
//! certificate from the cluster's PKI ([`crate::pki::CertDir::issue_etcd_server`]).
//! [`EtcdServer::start`] returns once etcd answers a status call over that
//! TLS, and has provisioned its users and roles ([`crate::etcd::provision`]).
//!
//! It is killed when its [`EtcdServer`] is dropped, and a small guardian
//! process kills it when this process ends without dropping it (kill -9).

use crate::etcd::{self, Etcd};
use crate::pki::CertDir;
use crate::tls::Tls;
use anyhow::{Context, bail};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use strife_core::Secret;

/// What to install when the program is missing.
pub const INSTALL_COMMAND: &str = "apt-get install -y etcd-server";
/// Longest wait for etcd to answer after it is started.
const START_TIMEOUT: Duration = Duration::from_secs(30);
/// How often readiness is asked while waiting.
const POLL: Duration = Duration::from_millis(100);
/// Ports tried before giving up when another process takes a free port
/// between our choosing it and etcd binding it.
const PORT_TRIES_MAX: u32 = 5;
/// Lines of etcd's log shown in an error.
const LOG_TAIL_LINES: usize = 20;

/// A running private etcd.
pub struct EtcdServer {
    base: PathBuf,
    host: String,
    client_port: u16,
    peer_port: u16,
    certs: CertDir,
    child: Option<Child>,
    guardian: Option<Child>,
}

impl std::fmt::Debug for EtcdServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EtcdServer").field("base", &self.base).field("url", &self.url()).finish()
    }
}

/// The `etcd` program: PATH, else Debian's place for it.
pub fn find_program() -> anyhow::Result<PathBuf> {
    let mut candidates: Vec<PathBuf> = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).map(|d| d.join("etcd")).collect())
        .unwrap_or_default();
    candidates.push(PathBuf::from("/usr/bin/etcd"));
    candidates.into_iter().find(|p| p.is_file()).with_context(|| {
        format!(
            "etcd is not installed (the `etcd` program was not found); install it with: {INSTALL_COMMAND}"
        )
    })
}

impl EtcdServer {
    /// Starts etcd in `base` (a new member on first use, the same one with
    /// its data after) on free ports of 127.0.0.1, or of `host`, with the
    /// certificates of `certs` (issuing etcd's own when missing); waits
    /// until it answers, then provisions its users and roles for `banks`.
    pub async fn start(
        base: &Path,
        certs: &CertDir,
        host: &str,
        banks: &[String],
    ) -> anyhow::Result<EtcdServer> {
        let program = find_program()?;
        crate::files::create_private_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        certs.issue_etcd_server()?;
        let mut server = EtcdServer {
            base: base.to_path_buf(),
            host: host.to_owned(),
            client_port: 0,
            peer_port: 0,
            certs: certs.clone(),
            child: None,
            guardian: None,
        };
        let password = server.root_password()?;
        let kept = server.read_ports();
        let mut last = String::new();
        for attempt in 0..PORT_TRIES_MAX {
            let (client, peer) = match kept {
                Some(ports) if attempt == 0 => ports,
                _ => (free_port(host)?, free_port(host)?),
            };
            server.client_port = client;
            server.peer_port = peer;
            server.spawn(&program)?;
            match server.wait_ready().await {
                Ok(()) => {
                    server.write_ports()?;
                    let etcd = server.client()?;
                    etcd::provision(&etcd, &password, banks)
                        .await
                        .context("setting up etcd's users and roles")?;
                    return Ok(server);
                }
                Err(e) => {
                    server.kill();
                    let log = server.log_tail();
                    if !log.contains("address already in use") {
                        bail!("{e:#}; etcd's log ({}) says:\n{log}", server.log_file().display());
                    }
                    last = log;
                }
            }
        }
        bail!("no free port for etcd after {PORT_TRIES_MAX} tries; the last log:\n{last}")
    }

    /// The URL clients use: `etcd://HOST:PORT`.
    pub fn url(&self) -> String {
        format!("{}{}:{}", etcd::URL_SCHEME, self.host, self.client_port)
    }

    /// The directory it lives in.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// The process id of etcd, while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Kills etcd with SIGKILL (for tests: etcd crashing).
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        if let Some(mut guardian) = self.guardian.take() {
            drop(guardian.stdin.take());
            let _ = guardian.wait();
        }
    }

    /// Starts etcd again on its ports, with its data, after [`Self::kill`].
    pub async fn restart(&mut self) -> anyhow::Result<()> {
        self.kill();
        self.spawn(&find_program()?)?;
        self.wait_ready().await
    }

    /// The root user's password, made on first use (0600).
    pub fn root_password(&self) -> anyhow::Result<Secret<String>> {
        let path = self.base.join("root.password");
        if let Ok(text) = std::fs::read_to_string(&path) {
            return Ok(Secret::new(text.trim().to_owned()));
        }
        let password = format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple());
        crate::pki::write_private(&path, &password)?;
        Ok(Secret::new(password))
    }

    fn client(&self) -> anyhow::Result<Etcd> {
        let tls = Tls::load(&self.certs, &crate::Peer::Gateway)?;
        Etcd::connect(&tls, &self.url())
    }

    fn log_file(&self) -> PathBuf {
        self.base.join("etcd.log")
    }

    fn ports_file(&self) -> PathBuf {
        self.base.join("ports")
    }

    fn read_ports(&self) -> Option<(u16, u16)> {
        let text = std::fs::read_to_string(self.ports_file()).ok()?;
        let (c, p) = text.trim().split_once(' ')?;
        Some((c.parse().ok()?, p.parse().ok()?))
    }

    fn write_ports(&self) -> anyhow::Result<()> {
        crate::pki::write_private(&self.ports_file(), &format!("{} {}\n", self.client_port, self.peer_port))
    }

    fn spawn(&mut self, program: &Path) -> anyhow::Result<()> {
        let server = self.certs.etcd_server();
        let (host, client, peer) = (&self.host, self.client_port, self.peer_port);
        // With data from an earlier start, etcd takes its membership from
        // there and ignores the initial-cluster flags.
        let data = self.base.join("data");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_file())
            .with_context(|| format!("opening {}", self.log_file().display()))?;
        let mut cmd = Command::new(program);
        cmd.arg("--name")
            .arg("strife")
            .arg("--data-dir")
            .arg(&data)
            .arg("--listen-client-urls")
            .arg(format!("https://{host}:{client}"))
            .arg("--advertise-client-urls")
            .arg(format!("https://{host}:{client}"))
            .arg("--listen-peer-urls")
            .arg(format!("https://{host}:{peer}"))
            .arg("--initial-advertise-peer-urls")
            .arg(format!("https://{host}:{peer}"))
            .arg("--initial-cluster")
            .arg(format!("strife=https://{host}:{peer}"))
            .arg("--initial-cluster-state")
            .arg("new")
            .arg("--cert-file")
            .arg(&server.cert)
            .arg("--key-file")
            .arg(&server.key)
            .arg("--trusted-ca-file")
            .arg(self.certs.ca_cert())
            .arg("--client-cert-auth")
            .arg("--peer-cert-file")
            .arg(&server.cert)
            .arg("--peer-key-file")
            .arg(&server.key)
            .arg("--peer-trusted-ca-file")
            .arg(self.certs.ca_cert())
            .arg("--peer-client-cert-auth")
            .arg("--logger")
            .arg("zap")
            .arg("--log-outputs")
            .arg("stderr")
            .arg("--auto-compaction-mode")
            .arg("revision")
            .arg("--auto-compaction-retention")
            .arg("10000");
        cmd.current_dir("/").stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().with_context(|| format!("starting {}", program.display()))?;
        let mut guardian = Command::new("/bin/sh")
            .arg("-c")
            .arg("cat >/dev/null; kill -9 \"$0\" 2>/dev/null")
            .arg(child.id().to_string())
            .current_dir("/")
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .context("starting etcd's guardian")?;
        // Nothing is written: the pipe only has to stay open while we live.
        if let Some(stdin) = guardian.stdin.as_mut() {
            let _ = stdin.flush();
        }
        self.child = Some(child);
        self.guardian = Some(guardian);
        Ok(())
    }

    /// Waits until etcd answers a status call over mutual TLS.
    async fn wait_ready(&mut self) -> anyhow::Result<()> {
        let etcd = self.client()?;
        let deadline = Instant::now() + START_TIMEOUT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Some(status) = child.try_wait()?
            {
                bail!("etcd exited at start ({status})");
            }
            match etcd.status().await {
                Ok(_) => return Ok(()),
                Err(status) if Instant::now() >= deadline => {
                    bail!("etcd did not answer within {START_TIMEOUT:?}: {}", status.message())
                }
                Err(_) => tokio::time::sleep(POLL).await,
            }
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.log_file()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }
}

impl Drop for EtcdServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A port of `host` that was free a moment ago.
fn free_port(host: &str) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((host, 0)).context("looking for a free port")?;
    Ok(listener.local_addr()?.port())
}
