//! Settings: a typed struct with documented defaults, read from a TOML file
//! (`--config FILE`, else `DIR/strife.toml` when it exists), then overridden
//! by environment variables named `STRIFE_<SECTION>_<KEY>`, e.g.
//! `STRIFE_GATEWAY_PREPARE_TIMEOUT_MS=2000` or `STRIFE_LOG_LEVEL=debug`.

use anyhow::{Context, bail};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// The name of the config file `strife` looks for in a Strife directory.
pub const CONFIG_FILE: &str = "strife.toml";
/// The file in a Strife directory where the gateway writes its address, for
/// banks and clients to find it.
pub const GATEWAY_ADDR_FILE: &str = "gateway.addr";

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub gateway: GatewayConfig,
    pub bank: BankConfig,
    pub client: ClientConfig,
    pub log: LogConfig,
    pub runtime: RuntimeConfig,
    pub discovery: DiscoveryConfig,
    pub metrics: MetricsConfig,
    pub telemetry: TelemetryConfig,
    pub admin: AdminConfig,
}

/// The operator's dashboard, served by each gateway (issue 13).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AdminConfig {
    /// Where the gateway serves its dashboard: `127.0.0.1:0` (a free port
    /// of this machine, the default), `HOST:PORT`, or `off`. On an address
    /// other than loopback it is served over mutual TLS with the cluster's
    /// certificates (the browser presents a client certificate of the CA).
    pub listen: String,
    /// How long a login link of `strife admin url` stays valid (0 makes an
    /// expired one, for tests). The gateway refuses a link that claims to
    /// last longer than an hour.
    pub link_ttl_secs: u64,
    /// How long a dashboard session lasts after its login.
    pub session_ttl_secs: u64,
    /// The alarm shows a payment undecided (its legs in doubt at the banks)
    /// for longer than this.
    pub in_doubt_alarm_secs: u64,
    /// How often each gateway audits the payments finished since its last
    /// pass against every bank's legs (0: never). A mismatch raises the
    /// dashboard's `audit-failing` alarm.
    pub audit_interval_secs: u64,
}

impl Default for AdminConfig {
    fn default() -> Self {
        AdminConfig {
            listen: "127.0.0.1:0".to_owned(),
            link_ttl_secs: 300,
            session_ttl_secs: 8 * 3600,
            in_doubt_alarm_secs: 60,
            audit_interval_secs: 60,
        }
    }
}

/// Prometheus metrics (issue 13).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct MetricsConfig {
    /// Where each server serves `/metrics`: `127.0.0.1:0` (a free port of
    /// this machine, the default), `HOST:PORT`, or `off`. On an address
    /// other than loopback it is served over mutual TLS with the cluster's
    /// certificates (a scraper presents a client certificate of the CA).
    pub listen: String,
}

impl Default for MetricsConfig {
    fn default() -> Self {
        MetricsConfig { listen: "127.0.0.1:0".to_owned() }
    }
}

/// Where spans go besides the log files.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TelemetryConfig {
    /// Empty: no export (the log files still carry every trace id).
    /// `http://HOST:PORT`: every gateway and bank exports its spans there
    /// over OTLP/gRPC (an OpenTelemetry collector's port 4317).
    pub otlp_endpoint: String,
}

/// How parties find each other (issue 12).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DiscoveryConfig {
    /// Empty: the built-in registry (banks register with the gateways they
    /// are given; clients use `--gateway`). `etcd://HOST:PORT[,HOST:PORT…]`:
    /// every gateway and bank replica registers in etcd under a lease, and
    /// watches the others there. `STRIFE_DISCOVERY` overrides it too.
    pub url: String,
    /// The lease of a registration: a replica that stops renewing it
    /// (killed, paused, cut off) is gone from everyone's set after this.
    pub lease_ttl_ms: u64,
}

impl Default for DiscoveryConfig {
    fn default() -> Self {
        DiscoveryConfig { url: String::new(), lease_ttl_ms: 3_000 }
    }
}

impl DiscoveryConfig {
    /// The etcd URL, when discovery is through etcd.
    pub fn etcd_url(&self) -> Option<&str> {
        (!self.url.is_empty()).then_some(self.url.as_str())
    }

    pub fn lease_ttl(&self) -> Duration {
        Duration::from_millis(self.lease_ttl_ms)
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RuntimeConfig {
    /// Async worker threads per server process; 0 means one per core.
    /// Co-located servers on few cores may do better with 1.
    pub workers: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Where the gateway listens (`strife up --port` and `--listen` override).
    pub listen: String,
    /// How long the gateway waits for each bank's prepare vote.
    pub prepare_timeout_ms: u64,
    /// How long the gateway waits for commit/abort acknowledgements before it
    /// answers the customer and leaves the rest to background retries.
    pub commit_timeout_ms: u64,
    /// A payment not decided this long after it began is aborted.
    pub payment_deadline_ms: u64,
    /// How long a login token is valid.
    pub token_ttl_secs: u64,
    /// How long payment records (and idempotency keys) are kept.
    pub retention_days: u64,
    /// Where the gateway keeps its data; empty means `DIR/gateway`.
    pub data_dir: String,
    /// Failed logins in a row that lock an account for a while.
    pub login_failures_max: u32,
    /// Failed logins in a row from one address that lock that address.
    pub login_peer_failures_max: u32,
    /// How long the first lock lasts; each further lock doubles it (up to an hour).
    pub login_lock_secs: u64,
    /// The gateway's store: empty means SQLite in `gateway.db` of its data
    /// directory; a path (or `sqlite://PATH`) another SQLite file; a
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` URL a PostgreSQL
    /// database, which several gateways may share (the URL is a secret,
    /// never logged).
    pub store: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BankConfig {
    /// Where a bank listens when `--listen` is not given.
    pub listen: String,
    /// The gateway's address, or a comma-separated list of gateway replicas
    /// (the bank registers with each); empty means the one `up` wrote to
    /// `DIR/gateway.addr`.
    pub gateway: String,
    /// How often a bank re-registers with the gateway (a heartbeat, which is
    /// also how it notices that the gateway restarted).
    pub register_interval_ms: u64,
    /// How often a bank asks the gateway about a leg it prepared and has not
    /// heard the decision of.
    pub inquiry_interval_ms: u64,
    /// Where banks keep their data; empty means `DIR/banks/<name>`.
    pub data_dir: String,
    /// The bank's ledger: empty means SQLite in `bank.db` of its data
    /// directory; a path (or `sqlite://PATH`) another SQLite file; a
    /// `postgres://USER:PASSWORD@HOST:PORT/DATABASE` URL a PostgreSQL
    /// database (one per bank; the URL is a secret, never logged).
    pub store: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClientConfig {
    /// How long a client command waits for the gateway.
    pub request_timeout_ms: u64,
    /// First delay before the outbox retries a queued payment.
    pub retry_first_delay_ms: u64,
    /// Longest delay between two retries of a queued payment.
    pub retry_max_delay_ms: u64,
    /// Tries per payment in one burst of `outbox flush`.
    pub retry_burst_max: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// A tracing filter: `info`, `debug`, `strife_gateway=debug,info`, …
    pub level: String,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        GatewayConfig {
            listen: "127.0.0.1:50051".to_owned(),
            prepare_timeout_ms: 5_000,
            commit_timeout_ms: 5_000,
            payment_deadline_ms: 10_000,
            token_ttl_secs: 3_600,
            retention_days: 30,
            data_dir: String::new(),
            login_failures_max: 5,
            login_peer_failures_max: 50,
            login_lock_secs: 60,
            store: String::new(),
        }
    }
}

impl Default for BankConfig {
    fn default() -> Self {
        BankConfig {
            listen: "127.0.0.1:0".to_owned(),
            gateway: String::new(),
            register_interval_ms: 1_000,
            inquiry_interval_ms: 1_000,
            data_dir: String::new(),
            store: String::new(),
        }
    }
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            request_timeout_ms: 15_000,
            retry_first_delay_ms: 500,
            retry_max_delay_ms: 30_000,
            retry_burst_max: 3,
        }
    }
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig { level: "info".to_owned() }
    }
}

impl GatewayConfig {
    pub fn prepare_timeout(&self) -> Duration {
        Duration::from_millis(self.prepare_timeout_ms)
    }
    pub fn commit_timeout(&self) -> Duration {
        Duration::from_millis(self.commit_timeout_ms)
    }
    pub fn payment_deadline(&self) -> Duration {
        Duration::from_millis(self.payment_deadline_ms)
    }
    pub fn data_dir(&self, dir: &Path) -> PathBuf {
        if self.data_dir.is_empty() { dir.join("gateway") } else { PathBuf::from(&self.data_dir) }
    }
}

impl BankConfig {
    pub fn data_dir(&self, dir: &Path, name: &str) -> PathBuf {
        if self.data_dir.is_empty() {
            dir.join("banks").join(name)
        } else {
            PathBuf::from(&self.data_dir).join(name)
        }
    }
}

impl Config {
    /// Loads `file` (or `DIR/strife.toml` if it exists), then the
    /// environment overrides.
    pub fn load(dir: &Path, file: Option<&Path>) -> anyhow::Result<Config> {
        let default_file = dir.join(CONFIG_FILE);
        let file = file.map(Path::to_path_buf).or_else(|| default_file.exists().then_some(default_file));
        let text = match &file {
            Some(path) => {
                std::fs::read_to_string(path).with_context(|| format!("reading config {}", path.display()))?
            }
            None => String::new(),
        };
        Config::from_parts(&text, std::env::vars()).with_context(|| {
            file.map_or_else(|| "settings".to_owned(), |f| format!("config {}", f.display()))
        })
    }

    /// Parses a TOML text and applies `STRIFE_*` overrides from `env`.
    pub fn from_parts(text: &str, env: impl Iterator<Item = (String, String)>) -> anyhow::Result<Config> {
        let parsed: Config = toml::from_str(text)?;
        let mut table = toml::Table::try_from(&parsed)?;
        for (name, value) in env {
            let Some(rest) = name.strip_prefix("STRIFE_") else { continue };
            // `STRIFE_DISCOVERY`, as clients take it, is `discovery.url`.
            let rest =
                if rest == "DISCOVERY" { "discovery_url".to_owned() } else { rest.to_ascii_lowercase() };
            for (section, keys) in table.iter_mut() {
                let Some(key) = rest.strip_prefix(&format!("{section}_")) else { continue };
                let Some(keys) = keys.as_table_mut() else { continue };
                if let Some(slot) = keys.get_mut(key) {
                    *slot = match slot {
                        toml::Value::Integer(_) => toml::Value::Integer(
                            value.parse().with_context(|| format!("{name} must be a whole number"))?,
                        ),
                        toml::Value::Boolean(_) => toml::Value::Boolean(
                            value.parse().with_context(|| format!("{name} must be true or false"))?,
                        ),
                        _ => toml::Value::String(value.clone()),
                    };
                }
            }
        }
        let config: Config = table.try_into()?;
        config.validate()?;
        Ok(config)
    }

    fn validate(&self) -> anyhow::Result<()> {
        let g = &self.gateway;
        for (name, v) in [
            ("gateway.prepare_timeout_ms", g.prepare_timeout_ms),
            ("gateway.commit_timeout_ms", g.commit_timeout_ms),
            ("gateway.payment_deadline_ms", g.payment_deadline_ms),
            ("gateway.token_ttl_secs", g.token_ttl_secs),
            ("gateway.retention_days", g.retention_days),
            ("gateway.login_failures_max", u64::from(g.login_failures_max)),
            ("gateway.login_peer_failures_max", u64::from(g.login_peer_failures_max)),
            ("gateway.login_lock_secs", g.login_lock_secs),
            ("bank.register_interval_ms", self.bank.register_interval_ms),
            ("bank.inquiry_interval_ms", self.bank.inquiry_interval_ms),
            ("client.request_timeout_ms", self.client.request_timeout_ms),
            ("client.retry_first_delay_ms", self.client.retry_first_delay_ms),
            ("discovery.lease_ttl_ms", self.discovery.lease_ttl_ms),
            ("admin.session_ttl_secs", self.admin.session_ttl_secs),
            ("admin.in_doubt_alarm_secs", self.admin.in_doubt_alarm_secs),
        ] {
            if v == 0 {
                bail!("{name} must be greater than zero");
            }
        }
        if let Some(url) = self.discovery.etcd_url() {
            crate::etcd::parse_url(url).context("discovery.url")?;
        }
        let otlp = &self.telemetry.otlp_endpoint;
        if !(otlp.is_empty() || otlp.starts_with("http://") || otlp.starts_with("https://")) {
            bail!("telemetry.otlp_endpoint must be empty or an http:// or https:// URL, not {otlp:?}");
        }
        if g.payment_deadline_ms < g.prepare_timeout_ms {
            bail!("gateway.payment_deadline_ms must be at least gateway.prepare_timeout_ms");
        }
        Ok(())
    }

    /// The defaults as a TOML document, for `strife up` to write out. An
    /// empty `data_dir` means the default place, which a comment names.
    pub fn default_toml() -> String {
        let body = toml::to_string_pretty(&Config::default()).unwrap_or_default();
        let mut section = "";
        let body: String = body
            .lines()
            .map(|line| {
                if line.starts_with('[') {
                    section = line;
                }
                let place = match section {
                    "[gateway]" => "DIR/gateway",
                    "[bank]" => "DIR/banks/<name>",
                    _ => "",
                };
                if line == "data_dir = \"\"" && !place.is_empty() {
                    format!("{line}  # empty: {place}\n")
                } else if line == "store = \"\"" && !place.is_empty() {
                    let file = if section == "[bank]" { "bank.db" } else { "gateway.db" };
                    format!(
                        "{line}  # empty: SQLite, {place}/{file}; or postgres://USER:PASSWORD@HOST:PORT/DB\n"
                    )
                } else {
                    format!("{line}\n")
                }
            })
            .collect();
        format!(
            "# Strife settings. Every key is optional; these are the defaults.\n\
             # Any key can be overridden by STRIFE_<SECTION>_<KEY>, e.g. STRIFE_GATEWAY_PREPARE_TIMEOUT_MS.\n\
             # See README.md, section Configuration, for what each one means.\n\n{body}"
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> impl Iterator<Item = (String, String)> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect::<Vec<_>>().into_iter()
    }

    #[test]
    fn defaults_then_file_then_environment() {
        let c = Config::from_parts("", env(&[])).expect("defaults");
        assert_eq!(c.gateway.prepare_timeout_ms, 5_000);
        let c = Config::from_parts("[gateway]\nprepare_timeout_ms = 700\n", env(&[])).expect("file");
        assert_eq!(c.gateway.prepare_timeout_ms, 700);
        let c = Config::from_parts(
            "[gateway]\nprepare_timeout_ms = 700\n",
            env(&[
                ("STRIFE_GATEWAY_PREPARE_TIMEOUT_MS", "900"),
                ("STRIFE_LOG_LEVEL", "debug"),
                ("STRIFE_GATEWAY", "127.0.0.1:1"),
                ("STRIFE_DIR", "/x"),
            ]),
        )
        .expect("env");
        assert_eq!(c.gateway.prepare_timeout_ms, 900);
        assert_eq!(c.log.level, "debug");
    }

    #[test]
    fn refuses_nonsense() {
        assert!(Config::from_parts("[gateway]\nprepare_timeout = 1\n", env(&[])).is_err());
        assert!(Config::from_parts("", env(&[("STRIFE_GATEWAY_TOKEN_TTL_SECS", "soon")])).is_err());
        assert!(Config::from_parts("[gateway]\ntoken_ttl_secs = 0\n", env(&[])).is_err());
    }

    #[test]
    fn written_defaults_parse_back() {
        let text = Config::default_toml();
        let c = Config::from_parts(&text, env(&[])).expect("round trip");
        assert_eq!(c.gateway.token_ttl_secs, GatewayConfig::default().token_ttl_secs);
        assert!(text.contains("data_dir = \"\"  # empty: DIR/gateway\n"), "{text}");
        assert!(text.contains("data_dir = \"\"  # empty: DIR/banks/<name>\n"), "{text}");
        assert!(
            text.contains("store = \"\"  # empty: SQLite, DIR/banks/<name>/bank.db; or postgres://"),
            "{text}"
        );
        let c = Config::from_parts("", env(&[("STRIFE_BANK_STORE", "postgres://b@h/db")])).expect("env");
        assert_eq!(c.bank.store, "postgres://b@h/db");
    }

    #[test]
    fn discovery_is_built_in_unless_an_etcd_url_is_given() {
        let c = Config::from_parts("", env(&[])).expect("defaults");
        assert_eq!(c.discovery.etcd_url(), None);
        let c = Config::from_parts("", env(&[("STRIFE_DISCOVERY", "etcd://127.0.0.1:2379")])).expect("env");
        assert_eq!(c.discovery.etcd_url(), Some("etcd://127.0.0.1:2379"));
        let c = Config::from_parts("[discovery]\nurl = \"etcd://127.0.0.1:1,127.0.0.1:2\"\n", env(&[]))
            .expect("file");
        assert_eq!(c.discovery.etcd_url(), Some("etcd://127.0.0.1:1,127.0.0.1:2"));
        let bad = Config::from_parts("", env(&[("STRIFE_DISCOVERY_URL", "consul://x")]));
        assert!(format!("{:#}", bad.expect_err("not etcd")).contains("not an etcd URL"));
    }

    #[test]
    fn otlp_export_is_off_unless_an_endpoint_is_given() {
        let c = Config::from_parts("", env(&[])).expect("defaults");
        assert_eq!(c.telemetry.otlp_endpoint, "");
        let c = Config::from_parts("", env(&[("STRIFE_TELEMETRY_OTLP_ENDPOINT", "http://127.0.0.1:4317")]))
            .expect("env");
        assert_eq!(c.telemetry.otlp_endpoint, "http://127.0.0.1:4317");
        let c = Config::from_parts("[telemetry]\notlp_endpoint = \"https://collector:4317\"\n", env(&[]))
            .expect("file");
        assert_eq!(c.telemetry.otlp_endpoint, "https://collector:4317");
        let bad = Config::from_parts("", env(&[("STRIFE_TELEMETRY_OTLP_ENDPOINT", "127.0.0.1:4317")]));
        assert!(format!("{:#}", bad.expect_err("no scheme")).contains("telemetry.otlp_endpoint"));
    }
}
