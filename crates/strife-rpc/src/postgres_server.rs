//! A private PostgreSQL server: for the tests, and for `strife up --postgres
//! auto`. It uses Debian's `postgresql` package, whose `initdb` and `pg_ctl`
//! are not on PATH (they live in `/usr/lib/postgresql/<version>/bin`).
//!
//! The server lives in one directory (its *base*):
//!
//! ```text
//! base/                  0700, owned by the user the server runs as
//!   data/                the cluster (initdb), 0700
//!   superuser.password   0600: the password of the superuser `strife`
//!   server.log           the server's log
//!   .s.PGSQL.<port>      its only unix socket
//! ```
//!
//! It listens on one free port of 127.0.0.1 (or of the one address a
//! [`Listen`] names, with a `pg_hba.conf` line for the clients it names: the
//! partition tests run it in a network namespace of its own), authenticates
//! every connection with SCRAM-SHA-256, and runs with `fsync` and `synchronous_commit` on, so
//! a commit it acknowledged survives a crash of the machine.
//!
//! PostgreSQL refuses to run as root. When this process is root (CI is), every
//! server command runs as Debian's `postgres` system user, which then owns
//! the base directory; every parent of the base must let that user pass
//! (temporary directories do). A directory a user keeps private (a Strife
//! directory is 0700) does not: [`base_for_cluster`] opens a cluster's
//! directory to traversal only, or, when one of its parents is private too,
//! puts the data outside it.
//!
//! The server is stopped (`pg_ctl stop -m fast`) when its [`PostgresServer`]
//! is dropped. A small guardian process also stops it when this process ends
//! without dropping it (a `static`, as the tests' shared server is, or kill
//! -9): it waits for end-of-file on a pipe only this process holds.

use anyhow::{Context, bail};
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU32, Ordering};
use strife_core::Secret;

/// What to install when the server binaries are missing.
pub const INSTALL_COMMAND: &str = "apt-get install -y postgresql";
/// The superuser `initdb` creates.
pub const SUPERUSER: &str = "strife";
/// The unprivileged user the server runs as when this process is root.
pub const SYSTEM_USER: &str = "postgres";
/// Ports tried before giving up when another process takes the free port
/// between our choosing it and the server binding it.
const PORT_TRIES_MAX: u32 = 5;
/// Longest wait for the server to accept connections, or to stop.
const START_TIMEOUT_SECS: u32 = 60;
/// Most connections the server accepts: every pool of every bank and test
/// sharing one server must fit.
const CONNECTIONS_MAX: u32 = 300;
/// Longest a lock waits before the server looks for a deadlock. A deadlock
/// aborts one transaction, which the stores retry; 1 s (the default) would
/// stall every payment behind it that long.
const DEADLOCK_TIMEOUT_MS: u32 = 100;
/// Lines of the server log shown in an error.
const LOG_TAIL_LINES: usize = 20;
/// Longest identifier accepted for a database or role made here.
const NAME_MAX: usize = 63;

/// Where Debian's PostgreSQL server programs are.
#[derive(Debug, Clone)]
pub struct Binaries {
    dir: PathBuf,
}

impl Binaries {
    /// `pg_config --bindir`, else the newest `/usr/lib/postgresql/*/bin`,
    /// else PATH; the first that holds `initdb` and `pg_ctl`.
    pub fn find() -> anyhow::Result<Binaries> {
        let mut candidates: Vec<PathBuf> = Vec::new();
        if let Ok(out) = Command::new("pg_config").arg("--bindir").stderr(Stdio::null()).output()
            && out.status.success()
        {
            candidates.push(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
        }
        let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
            .into_iter()
            .flatten()
            .filter_map(Result::ok)
            .filter_map(|e| Some((e.file_name().to_str()?.parse().ok()?, e.path().join("bin"))))
            .collect();
        versions.sort_by_key(|v| std::cmp::Reverse(v.0));
        candidates.extend(versions.into_iter().map(|(_, dir)| dir));
        if let Some(path) = std::env::var_os("PATH") {
            candidates.extend(std::env::split_paths(&path));
        }
        candidates
            .into_iter()
            .find(|dir| ["initdb", "pg_ctl", "psql"].iter().all(|p| dir.join(p).is_file()))
            .map(|dir| Binaries { dir })
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "PostgreSQL's server programs (initdb, pg_ctl) were not found \
                     (looked at `pg_config --bindir`, /usr/lib/postgresql/*/bin and PATH); \
                     install Debian's package with: {INSTALL_COMMAND}"
                )
            })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn program(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }
}

/// The unprivileged user the server runs as, when this process is root.
#[derive(Debug, Clone)]
struct RunAs {
    uid: u32,
    gid: u32,
}

impl RunAs {
    fn current() -> anyhow::Result<Option<RunAs>> {
        if !nix::unistd::geteuid().is_root() {
            return Ok(None);
        }
        let user = nix::unistd::User::from_name(SYSTEM_USER)
            .context("looking up the postgres user")?
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "PostgreSQL refuses to run as root, and there is no '{SYSTEM_USER}' user to run it as; \
                     Debian's package creates it: {INSTALL_COMMAND}"
                )
            })?;
        Ok(Some(RunAs { uid: user.uid.as_raw(), gid: user.gid.as_raw() }))
    }

    /// Whether this user may enter `dir` (search rights on it and on every
    /// parent), asked of the system by trying.
    fn can_enter(&self, dir: &Path) -> bool {
        Command::new("/bin/sh")
            .arg("-c")
            .arg("cd -- \"$0\"")
            .arg(dir)
            .uid(self.uid)
            .gid(self.gid)
            .current_dir("/")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Gives `path` to this user.
    fn own(this: Option<&RunAs>, path: &Path) -> anyhow::Result<()> {
        if let Some(u) = this {
            std::os::unix::fs::chown(path, Some(u.uid), Some(u.gid))
                .with_context(|| format!("giving {} to the {SYSTEM_USER} user", path.display()))?;
        }
        Ok(())
    }
}

/// Where a server listens, and which other hosts may connect to it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// The one address the server listens on (its port is chosen free).
    pub address: IpAddr,
    /// A network (address, prefix length) whose hosts may connect, with
    /// SCRAM-SHA-256 like every connection: one `host` line in
    /// `pg_hba.conf`. `None`: only the lines `initdb` writes (this machine).
    pub clients: Option<(IpAddr, u8)>,
}

impl Default for Listen {
    /// 127.0.0.1, and only this machine may connect.
    fn default() -> Listen {
        Listen { address: IpAddr::V4(Ipv4Addr::LOCALHOST), clients: None }
    }
}

impl Listen {
    /// The `pg_hba.conf` line that lets the clients in, if any.
    fn hba_line(&self) -> anyhow::Result<Option<String>> {
        let Some((network, prefix)) = self.clients else { return Ok(None) };
        let bits = if network.is_ipv4() { 32 } else { 128 };
        if prefix > bits {
            bail!("{network}/{prefix} is not a network");
        }
        Ok(Some(format!("host all all {network}/{prefix} scram-sha-256")))
    }

    /// The server's options on `pg_ctl`'s `-o`: the port, and the address
    /// when it is not the one `postgresql.conf` names (127.0.0.1).
    fn server_options(&self, port: u16) -> String {
        if self.address == IpAddr::V4(Ipv4Addr::LOCALHOST) {
            format!("-p {port}")
        } else {
            format!("-p {port} -h {}", self.address)
        }
    }

    /// The address in a URL's host part.
    fn url_host(&self) -> String {
        match self.address {
            IpAddr::V4(a) => a.to_string(),
            IpAddr::V6(a) => format!("[{a}]"),
        }
    }
}

/// Whether the server's directory goes when the server stops.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Kept: started again on the same base, the server resumes its data.
    Kept,
    /// Removed with everything in it once the server has stopped.
    Temporary,
}

/// A running private server; stopped when dropped.
pub struct PostgresServer {
    /// The server's programs.
    bin: Binaries,
    /// Its directory (see the module's documentation).
    base: PathBuf,
    /// The port it listens on, on `listen.address`.
    port: u16,
    /// Where it listens, and who may connect.
    listen: Listen,
    /// The superuser's password.
    password: Secret<String>,
    /// Whom the server's commands run as (`None`: this process's user).
    run_as: Option<RunAs>,
    /// Stops the server when this process ends; its stdin is the pipe.
    guardian: Option<Child>,
    lifetime: Lifetime,
}

impl std::fmt::Debug for PostgresServer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PostgresServer").field("base", &self.base).field("port", &self.port).finish()
    }
}

impl PostgresServer {
    /// Starts a server in `base` (creating the cluster on first use) on a
    /// free port of 127.0.0.1, and returns once it accepts connections.
    pub fn start(base: &Path, lifetime: Lifetime) -> anyhow::Result<PostgresServer> {
        Self::start_listening(base, lifetime, Listen::default())
    }

    /// [`PostgresServer::start`] on a free port of `listen.address`, letting
    /// `listen.clients` connect too. The address must be one of this
    /// network namespace's (a server started from a thread that entered a
    /// namespace lives in that namespace).
    pub fn start_listening(
        base: &Path,
        lifetime: Lifetime,
        listen: Listen,
    ) -> anyhow::Result<PostgresServer> {
        let hba_line = listen.hba_line()?;
        let bin = Binaries::find()?;
        let run_as = RunAs::current()?;
        crate::files::create_private_dir_all(base).with_context(|| format!("creating {}", base.display()))?;
        std::fs::set_permissions(base, std::fs::Permissions::from_mode(crate::files::DIR_MODE))?;
        RunAs::own(run_as.as_ref(), base)?;
        let mut server = PostgresServer {
            bin,
            base: base.to_path_buf(),
            port: 0,
            listen,
            password: Secret::new(String::new()),
            run_as,
            guardian: None,
            lifetime,
        };
        server.check_reachable()?;
        if !server.data().join("PG_VERSION").exists() {
            server.init()?;
        }
        if let Some(line) = hba_line {
            server.allow(&line)?;
        }
        server.password = Secret::new(
            std::fs::read_to_string(server.password_file())
                .with_context(|| format!("reading {}", server.password_file().display()))?
                .trim()
                .to_owned(),
        );
        // A server left running in this directory (its owner was killed
        // before its guardian could act) is ours to stop.
        if server.pg_ctl(&["status", "-D"]).arg(server.data()).output().is_ok_and(|o| o.status.success()) {
            server.stop_server()?;
        }
        server.guardian = Some(server.start_guardian()?);
        server.start_on_free_port()?;
        Ok(server)
    }

    /// The port the server listens on, on [`PostgresServer::address`].
    pub fn port(&self) -> u16 {
        self.port
    }

    /// The address the server listens on (127.0.0.1 unless a [`Listen`]
    /// said otherwise); the URLs made here name it.
    pub fn address(&self) -> IpAddr {
        self.listen.address
    }

    /// The process id of the server's postmaster (the parent of every
    /// backend), if it runs.
    pub fn pid(&self) -> Option<u32> {
        let text = std::fs::read_to_string(self.data().join("postmaster.pid")).ok()?;
        text.lines().next()?.trim().parse().ok()
    }

    /// Whether the server's process is there.
    pub fn is_running(&self) -> bool {
        let Some(pid) = self.pid().and_then(|p| i32::try_from(p).ok()) else { return false };
        matches!(
            nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None),
            Ok(()) | Err(nix::errno::Errno::EPERM)
        )
    }

    /// Starts the server again, on its port, when it is not running (it
    /// crashed, or was killed); true when it did. A server killed with
    /// SIGKILL may leave backends that hold its shared memory for a moment:
    /// then this fails, and a later call succeeds.
    pub fn restart_if_stopped(&mut self) -> anyhow::Result<bool> {
        if self.is_running() {
            return Ok(false);
        }
        let mut start = self.pg_ctl(&["start", "-w", "-t", &START_TIMEOUT_SECS.to_string(), "-D"]);
        start
            .arg(self.data())
            .arg("-l")
            .arg(self.log_file())
            .arg("-o")
            .arg(self.listen.server_options(self.port));
        Self::run(start, "pg_ctl start")?;
        Ok(true)
    }

    /// The server's directory.
    pub fn base(&self) -> &Path {
        &self.base
    }

    /// A URL for the superuser and `database`.
    pub fn superuser_url(&self, database: &str) -> Secret<String> {
        Secret::new(format!(
            "postgres://{SUPERUSER}:{}@{}:{}/{database}",
            self.password.expose(),
            self.listen.url_host(),
            self.port
        ))
    }

    /// Creates an empty database owned by the superuser; returns its URL.
    pub fn create_database(&self, name: &str) -> anyhow::Result<Secret<String>> {
        check_name(name)?;
        self.sql("postgres", &[&format!("CREATE DATABASE {name}")])?;
        Ok(self.superuser_url(name))
    }

    /// Creates a role that may log in with a fresh password, and a database
    /// that it owns and only it (and the superuser) may connect to; returns
    /// the role's URL for that database. What one role owns, another role
    /// made here can neither connect to nor read.
    pub fn create_private_database(&self, role: &str, database: &str) -> anyhow::Result<Secret<String>> {
        check_name(role)?;
        check_name(database)?;
        let password = random_password();
        self.sql(
            "postgres",
            &[
                &format!("CREATE ROLE {role} LOGIN PASSWORD '{}'", password.expose()),
                &format!("CREATE DATABASE {database} OWNER {role}"),
                &format!("REVOKE ALL ON DATABASE {database} FROM PUBLIC"),
            ],
        )?;
        // A new database's public schema may be used by every role: only
        // its owner may now.
        self.sql(
            database,
            &["REVOKE ALL ON SCHEMA public FROM PUBLIC", &format!("GRANT ALL ON SCHEMA public TO {role}")],
        )?;
        Ok(Secret::new(format!(
            "postgres://{role}:{}@{}:{}/{database}",
            password.expose(),
            self.listen.url_host(),
            self.port
        )))
    }

    /// Runs `statements` as the superuser in `database` with `psql`, each
    /// in its own transaction; returns what they printed (unaligned, tuples
    /// only).
    pub fn sql(&self, database: &str, statements: &[&str]) -> anyhow::Result<String> {
        check_name(database)?;
        self.psql(&self.superuser_url(database), statements)
    }

    /// Runs `statements` with `psql` at `url` (as whoever the URL names),
    /// each in its own transaction.
    pub fn psql(&self, url: &Secret<String>, statements: &[&str]) -> anyhow::Result<String> {
        let (url, password) = split_password(url.expose())?;
        let mut psql = Command::new(self.bin.program("psql"));
        psql.args(["-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1", "-d", &url]);
        for statement in statements {
            psql.arg("-c").arg(statement);
        }
        let out = psql
            // The password travels in the environment, never on a command
            // line that `ps` shows.
            .env("PGPASSWORD", password.expose())
            .env("PGCONNECT_TIMEOUT", "10")
            .stdin(Stdio::null())
            .output()
            .context("running psql")?;
        if !out.status.success() {
            bail!("psql failed: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_owned())
    }

    /// Stops the server (`pg_ctl stop -m fast`: open transactions roll back,
    /// everything committed stays).
    pub fn stop(&mut self) -> anyhow::Result<()> {
        let stopped = self.stop_server();
        // Closing the pipe lets the guardian go (and remove a temporary base).
        if let Some(mut guardian) = self.guardian.take() {
            drop(guardian.stdin.take());
            let _ = guardian.wait();
        }
        stopped
    }

    /// Crashes the server and starts it again on the same port
    /// (`pg_ctl restart -m immediate`: no checkpoint, every client cut off;
    /// the server recovers from its WAL, so every commit that returned is
    /// still there). Returns once it accepts connections again.
    pub fn restart_immediately(&self) -> anyhow::Result<()> {
        let mut restart =
            self.pg_ctl(&["restart", "-m", "immediate", "-w", "-t", &START_TIMEOUT_SECS.to_string(), "-D"]);
        restart
            .arg(self.data())
            .arg("-l")
            .arg(self.log_file())
            .arg("-o")
            .arg(self.listen.server_options(self.port));
        Self::run(restart, "pg_ctl restart -m immediate")
    }

    fn data(&self) -> PathBuf {
        self.base.join("data")
    }

    fn password_file(&self) -> PathBuf {
        self.base.join("superuser.password")
    }

    fn log_file(&self) -> PathBuf {
        self.base.join("server.log")
    }

    /// A server command, run as the server's user inside its directory.
    fn command(&self, program: &str) -> Command {
        let mut cmd = Command::new(self.bin.program(program));
        cmd.current_dir(&self.base).stdin(Stdio::null()).env_remove("PGDATA");
        if let Some(u) = &self.run_as {
            cmd.uid(u.uid).gid(u.gid).env("HOME", &self.base);
        }
        cmd
    }

    fn pg_ctl(&self, args: &[&str]) -> Command {
        let mut cmd = self.command("pg_ctl");
        cmd.args(args);
        cmd
    }

    /// Runs `cmd`; an error carries its output.
    fn run(mut cmd: Command, what: &str) -> anyhow::Result<()> {
        let out =
            cmd.stdout(Stdio::piped()).stderr(Stdio::piped()).output().with_context(|| what.to_owned())?;
        if !out.status.success() {
            bail!(
                "{what} failed ({}): {}{}",
                out.status,
                String::from_utf8_lossy(&out.stdout).trim(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    /// The server's user must be able to enter its directory (and so every
    /// parent of it) before anything else can work.
    fn check_reachable(&self) -> anyhow::Result<()> {
        match self.command("pg_ctl").arg("--version").stdout(Stdio::null()).stderr(Stdio::null()).status() {
            Ok(status) if status.success() => Ok(()),
            Ok(status) => bail!("{} --version failed ({status})", self.bin.program("pg_ctl").display()),
            Err(e) if e.kind() == std::io::ErrorKind::PermissionDenied => bail!(
                "the {SYSTEM_USER} user cannot enter {}: PostgreSQL runs as that user when Strife runs as \
                 root, and every parent directory must let it pass (o+x)",
                self.base.display()
            ),
            Err(e) => Err(e).context("running pg_ctl"),
        }
    }

    /// `initdb` with a random superuser password, then Strife's settings.
    fn init(&self) -> anyhow::Result<()> {
        let password = random_password();
        let file = self.password_file();
        let mut f = crate::files::open_private_append(&file)
            .and_then(|f| f.set_len(0).map(|()| f))
            .with_context(|| format!("creating {}", file.display()))?;
        writeln!(f, "{}", password.expose())?;
        f.sync_all()?;
        RunAs::own(self.run_as.as_ref(), &file)?;
        let mut initdb = self.command("initdb");
        initdb
            .arg("-D")
            .arg(self.data())
            .args(["-U", SUPERUSER, "--auth=scram-sha-256", "--encoding=UTF8", "--no-locale"])
            .arg(format!("--pwfile={}", file.display()));
        Self::run(initdb, "initdb")?;
        let socket_dir = self.base.to_string_lossy().replace('\'', "''");
        let settings = format!(
            "\n# Strife's private server\n\
             listen_addresses = '127.0.0.1'\n\
             unix_socket_directories = '{socket_dir}'\n\
             unix_socket_permissions = 0700\n\
             max_connections = {CONNECTIONS_MAX}\n\
             password_encryption = 'scram-sha-256'\n\
             fsync = on\n\
             synchronous_commit = on\n\
             full_page_writes = on\n\
             deadlock_timeout = '{DEADLOCK_TIMEOUT_MS}ms'\n"
        );
        let conf = self.data().join("postgresql.conf");
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&conf)
            .with_context(|| format!("opening {}", conf.display()))?;
        f.write_all(settings.as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    /// Adds `line` to `pg_hba.conf` unless it is there (read at the start).
    fn allow(&self, line: &str) -> anyhow::Result<()> {
        let hba = self.data().join("pg_hba.conf");
        let text = std::fs::read_to_string(&hba).with_context(|| format!("reading {}", hba.display()))?;
        if text.lines().any(|l| l.trim() == line) {
            return Ok(());
        }
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&hba)
            .with_context(|| format!("opening {}", hba.display()))?;
        f.write_all(format!("# Strife's clients on other hosts\n{line}\n").as_bytes())?;
        f.sync_all()?;
        Ok(())
    }

    /// Waits (as the server's user) for end-of-file on its stdin, which
    /// comes when this process closes it or ends in any way; then stops the
    /// server, and removes a temporary base.
    fn start_guardian(&self) -> anyhow::Result<Child> {
        let remove = if self.lifetime == Lifetime::Temporary { "rm -rf \"$2\"" } else { ":" };
        let script = format!("cat >/dev/null; \"$0\" stop -D \"$1\" -m fast -s >/dev/null 2>&1; {remove}");
        let mut cmd = Command::new("/bin/sh");
        cmd.arg("-c").arg(script).arg(self.bin.program("pg_ctl")).arg(self.data()).arg(&self.base);
        cmd.current_dir("/").stdin(Stdio::piped()).stdout(Stdio::null()).stderr(Stdio::null());
        if let Some(u) = &self.run_as {
            cmd.uid(u.uid).gid(u.gid);
        }
        cmd.spawn().context("starting the server's guardian")
    }

    /// Chooses a free port and starts the server on it, choosing again if
    /// another process took the port in between.
    fn start_on_free_port(&mut self) -> anyhow::Result<()> {
        let mut last = String::new();
        for _ in 0..PORT_TRIES_MAX {
            let port = free_port(self.listen.address)?;
            let log_len = std::fs::metadata(self.log_file()).map_or(0, |m| m.len());
            let mut start = self.pg_ctl(&["start", "-w", "-t", &START_TIMEOUT_SECS.to_string(), "-D"]);
            start
                .arg(self.data())
                .arg("-l")
                .arg(self.log_file())
                .arg("-o")
                .arg(self.listen.server_options(port));
            match Self::run(start, "pg_ctl start") {
                Ok(()) => {
                    self.port = port;
                    return Ok(());
                }
                Err(e) => {
                    let log = self.log_since(log_len);
                    if !(log.contains("could not bind") || log.contains("Address already in use")) {
                        bail!("{e:#}; the server's log ({}) says:\n{log}", self.log_file().display());
                    }
                    last = log;
                }
            }
        }
        bail!("no free port after {PORT_TRIES_MAX} tries; the last log:\n{last}")
    }

    /// The last lines the server logged after `from` bytes.
    fn log_since(&self, from: u64) -> String {
        let text = std::fs::read(self.log_file()).unwrap_or_default();
        let text = String::from_utf8_lossy(text.get(usize::try_from(from).unwrap_or(0)..).unwrap_or(&[]))
            .into_owned();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(LOG_TAIL_LINES)..].join("\n")
    }

    fn stop_server(&self) -> anyhow::Result<()> {
        let mut stop =
            self.pg_ctl(&["stop", "-m", "fast", "-w", "-t", &START_TIMEOUT_SECS.to_string(), "-D"]);
        stop.arg(self.data());
        Self::run(stop, "pg_ctl stop")
    }
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        if self.guardian.is_some()
            && let Err(e) = self.stop()
        {
            tracing::warn!(error = %format!("{e:#}"), "stopping the private PostgreSQL server");
        }
    }
}

/// A port of `address` that was free a moment ago.
fn free_port(address: IpAddr) -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind((address, 0)).context("looking for a free port")?;
    Ok(listener.local_addr()?.port())
}

/// `postgres://user:password@host/…` as the URL without its password, and
/// the password.
fn split_password(url: &str) -> anyhow::Result<(String, Secret<String>)> {
    let (scheme, rest) = url.split_once("://").context("a postgres:// URL")?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return Ok((url.to_owned(), Secret::new(String::new())));
    };
    let (user, password) = userinfo.split_once(':').unwrap_or((userinfo, ""));
    Ok((format!("{scheme}://{user}@{host}/{path}"), Secret::new(password.to_owned())))
}

/// 256 bits from the operating system's random source, as hex.
fn random_password() -> Secret<String> {
    Secret::new(format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple()))
}

/// Names made here go into SQL as identifiers: lower-case letters, digits
/// and `_` only, starting with a letter.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = !name.is_empty()
        && name.len() <= NAME_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!("'{name}' is not a database or role name Strife makes (a-z, 0-9, _; at most {NAME_MAX})");
    }
    Ok(())
}

/// The mode of a cluster's directory whose `postgres/` the server's user
/// must reach: that user may pass through it, and nothing else (it can
/// neither list it nor open anything in it, every file there being 0600 and
/// every directory 0700).
pub const TRAVERSE_ONLY_DIR_MODE: u32 = 0o711;

/// Where `strife up --postgres auto` keeps the server of the cluster in
/// `dir`, creating what it needs. Run by anyone but root: `DIR/postgres`.
/// Run by root, the server runs as the `postgres` user, which must reach
/// its directory: when that user can pass every parent of `DIR`, the data
/// is in `DIR/postgres` (owned by it, 0700) and `DIR` becomes
/// [`TRAVERSE_ONLY_DIR_MODE`]; when a parent is closed to it (`/root` is
/// 0700), the data lives in a directory of its own under `outside` (see
/// [`SYSTEM_DATA_ROOT`]), named in `DIR/postgres.location` so that the next
/// `up` on `DIR` finds it again. `DIR` must exist; the path returned is
/// absolute.
pub fn base_for_cluster(dir: &Path, outside: &Path) -> anyhow::Result<PathBuf> {
    // Absolute: the server's commands run in its directory.
    let dir = std::fs::canonicalize(dir).with_context(|| format!("finding {}", dir.display()))?;
    let inside = dir.join("postgres");
    let Some(run_as) = RunAs::current()? else {
        return Ok(inside);
    };
    let location = dir.join("postgres.location");
    if let Ok(text) = std::fs::read_to_string(&location) {
        return Ok(PathBuf::from(text.trim()));
    }
    let parent_open = dir.parent().is_none_or(|parent| run_as.can_enter(parent));
    if inside.join("data").exists() || parent_open {
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(TRAVERSE_ONLY_DIR_MODE))
            .with_context(|| format!("letting the {SYSTEM_USER} user pass {}", dir.display()))?;
        return Ok(inside);
    }
    if !outside.exists() {
        crate::files::create_private_dir_all(outside)
            .with_context(|| format!("creating {}", outside.display()))?;
        RunAs::own(Some(&run_as), outside)?;
    }
    let base = outside.join(uuid::Uuid::new_v4().simple().to_string());
    crate::pki::write_private(&location, &format!("{}\n", base.display()))?;
    Ok(base)
}

/// Where [`base_for_cluster`] puts the data of clusters run by root.
pub const SYSTEM_DATA_ROOT: &str = "/var/lib/postgresql/strife";

/// One server per test binary, started on first use and stopped when the
/// binary ends; each test makes its own database on it
/// ([`unique_name`]). An error says what to install: tests that need
/// PostgreSQL fail with it, never skip.
pub fn shared_for_tests() -> Result<&'static PostgresServer, String> {
    static SERVER: OnceLock<Result<PostgresServer, String>> = OnceLock::new();
    SERVER
        .get_or_init(|| {
            let base = std::env::temp_dir().join(format!("strife-pg-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&base);
            PostgresServer::start(&base, Lifetime::Temporary).map_err(|e| {
                format!("cannot start a private PostgreSQL server for the tests: {e:#}\n(install it with: {INSTALL_COMMAND})")
            })
        })
        .as_ref()
        .map_err(Clone::clone)
}

/// A database or role name no other caller in this process gets.
pub fn unique_name(prefix: &str) -> String {
    static N: AtomicU32 = AtomicU32::new(0);
    format!("{prefix}_{}_{}", std::process::id(), N.fetch_add(1, Ordering::SeqCst))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_url_gives_up_its_password() {
        let (url, password) = split_password("postgres://r:pw@127.0.0.1:5/db").expect("split");
        assert_eq!((url.as_str(), password.expose().as_str()), ("postgres://r@127.0.0.1:5/db", "pw"));
        let (url, password) = split_password("postgres://127.0.0.1:5/db").expect("split");
        assert_eq!((url.as_str(), password.expose().as_str()), ("postgres://127.0.0.1:5/db", ""));
    }

    #[test]
    fn the_default_listen_is_this_machine_only_and_another_adds_one_scram_line() {
        let local = Listen::default();
        assert_eq!(local.server_options(5432), "-p 5432");
        assert_eq!(local.hba_line().expect("line"), None);
        let net = Listen {
            address: IpAddr::V4(Ipv4Addr::new(10, 77, 1, 2)),
            clients: Some((IpAddr::V4(Ipv4Addr::new(10, 77, 0, 0)), 16)),
        };
        assert_eq!(net.server_options(5432), "-p 5432 -h 10.77.1.2");
        assert_eq!(net.hba_line().expect("line").as_deref(), Some("host all all 10.77.0.0/16 scram-sha-256"));
        let bad = Listen { clients: Some((IpAddr::V4(Ipv4Addr::new(10, 0, 0, 0)), 33)), ..net };
        assert!(bad.hba_line().is_err());
    }

    #[test]
    fn names_are_checked_before_they_reach_sql() {
        for good in ["bank_a", "t1", "strife_123_4"] {
            check_name(good).expect(good);
        }
        for bad in ["", "Bank", "a-b", "a;drop", "1a", "a b", &"a".repeat(64)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn a_cluster_keeps_its_data_in_dir_unless_the_server_user_cannot_reach_it() {
        let tmp = std::env::temp_dir().join(format!("strife-pg-base-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&tmp);
        let dir = tmp.join("open").join("cluster");
        crate::files::create_private_dir_all(&dir).expect("dir");
        for open in [&tmp, &tmp.join("open")] {
            std::fs::set_permissions(open, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        }
        let outside = tmp.join("outside");
        let base = base_for_cluster(&dir, &outside).expect("base");
        assert_eq!(base, dir.join("postgres"));
        // A relative DIR gives an absolute base (the server's commands run inside it).
        let cwd = std::env::current_dir().expect("cwd");
        let relative =
            PathBuf::from("../".repeat(cwd.components().count())).join(dir.strip_prefix("/").expect("dir"));
        assert_eq!(base_for_cluster(&relative, &outside).expect("base"), base);
        let mode = |p: &Path| std::fs::metadata(p).expect("metadata").permissions().mode() & 0o777;
        if nix::unistd::geteuid().is_root() {
            assert_eq!(mode(&dir), TRAVERSE_ONLY_DIR_MODE, "the server's user may pass DIR");
            // Under a parent closed to the server's user (as /root is), the
            // data goes outside, and is found there again.
            let closed = tmp.join("closed").join("cluster");
            crate::files::create_private_dir_all(&closed).expect("closed");
            let base = base_for_cluster(&closed, &outside).expect("base");
            assert!(base.starts_with(&outside), "{}", base.display());
            assert_eq!(base_for_cluster(&closed, &outside).expect("again"), base, "found again");
            assert_eq!(mode(&closed), crate::files::DIR_MODE, "DIR stays private");
            let owner = std::os::unix::fs::MetadataExt::uid(&std::fs::metadata(&outside).expect("outside"));
            assert_eq!(Some(owner), RunAs::current().expect("user").map(|u| u.uid));
        } else {
            assert_eq!(mode(&dir), crate::files::DIR_MODE, "DIR stays private");
        }
        let _ = std::fs::remove_dir_all(&tmp);
    }

    /// Whether `pid` is a live process (a zombie is not).
    fn running(pid: u32) -> bool {
        std::fs::read_to_string(format!("/proc/{pid}/stat"))
            .is_ok_and(|stat| stat.rsplit_once(") ").is_some_and(|(_, rest)| !rest.starts_with('Z')))
    }

    /// The server starts, takes SQL, isolates private databases, and stops.
    #[test]
    fn a_private_server_starts_serves_and_stops() {
        let base = std::env::temp_dir().join(format!("strife-pg-own-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        let mut server = PostgresServer::start(&base, Lifetime::Temporary)
            .unwrap_or_else(|e| panic!("{e:#}\n(install PostgreSQL with: {INSTALL_COMMAND})"));
        assert_eq!(server.sql("postgres", &["SHOW fsync"]).expect("sql"), "on");
        assert_eq!(server.sql("postgres", &["SHOW synchronous_commit"]).expect("sql"), "on");
        assert_eq!(server.sql("postgres", &["SHOW listen_addresses"]).expect("sql"), "127.0.0.1");
        let pid = server.pid().expect("the server's pid");
        assert!(running(pid), "pid {pid} runs");
        let mode =
            std::fs::metadata(base.join("superuser.password")).expect("password file").permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let a = server.create_private_database("role_a", "db_a").expect("a");
        let b = server.create_private_database("role_b", "db_b").expect("b");
        server.psql(&a, &["CREATE TABLE t (x INT)", "INSERT INTO t VALUES (1)"]).expect("a's own database");
        assert_eq!(server.psql(&a, &["SELECT x FROM t"]).expect("read"), "1");
        let a_at_b = Secret::new(a.expose().replace("/db_a", "/db_b"));
        let err = server.psql(&a_at_b, &["SELECT 1"]).expect_err("a cannot connect to b's database");
        assert!(format!("{err:#}").contains("permission denied"), "{err:#}");
        let wrong = Secret::new(b.expose().replace("role_b:", "role_b:x"));
        assert!(server.psql(&wrong, &["SELECT 1"]).is_err(), "a wrong password is refused");

        // A crash of the server loses no commit, and it comes back on its port.
        let port = server.port();
        server.restart_immediately().expect("restart -m immediate");
        assert_eq!(server.port(), port);
        assert_eq!(server.psql(&a, &["SELECT x FROM t"]).expect("read after the crash"), "1");

        server.stop().expect("stop");
        assert!(!running(pid), "pid {pid} is gone");
        assert!(!base.exists(), "a temporary base is removed");
    }
}
