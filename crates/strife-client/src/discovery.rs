//! Finding the gateways in etcd (issue 12): which etcd a client asks, the
//! one read a command makes of the gateways' keys, the watch a long-lived
//! client keeps on them, and the static set used when etcd cannot be
//! reached.
//!
//! Where the etcd URL comes from, first found wins: `--discovery`, then
//! `discovery.url` of the settings (`STRIFE_DISCOVERY` sets it), then
//! `DIR/etcd.url`, which `strife up --etcd` writes. An explicit
//! `--gateway`/`STRIFE_GATEWAY` wins over all of them (see
//! [`crate::Client::gateways`]).
//!
//! An entry in etcd only says where a gateway is: the connection to it
//! still requires the gateway's certificate, so a forged entry leads
//! nowhere.

use crate::connect::CLIENT_NAME;
use crate::exit::{CliError, Exit};
use crate::instances::{self, Role};
use std::collections::BTreeMap;
use std::path::Path;
use std::time::Duration;
use strife_rpc::Peer;
use strife_rpc::config::DiscoveryConfig;
use strife_rpc::etcd::{self, Entry, Etcd, View};
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use tokio::sync::watch;

/// The file in a Strife directory naming the cluster's etcd (0600), written
/// by `strife up --etcd`.
pub const ETCD_URL_FILE: &str = "etcd.url";
/// Longest a command waits for its one read of the gateways' keys before it
/// uses the static set.
pub const READ_TIMEOUT: Duration = Duration::from_secs(3);

/// The etcd a client finds the gateways in, if any: `flag`, else the
/// settings' `discovery.url`, else `DIR/etcd.url`.
pub fn etcd_url(dir: &Path, flag: Option<&str>, config: &DiscoveryConfig) -> Option<String> {
    if let Some(url) = flag.map(str::trim).filter(|u| !u.is_empty()) {
        return Some(url.to_owned());
    }
    if let Some(url) = config.etcd_url() {
        return Some(url.to_owned());
    }
    let text = std::fs::read_to_string(dir.join(ETCD_URL_FILE)).ok()?;
    Some(text.trim().to_owned()).filter(|u| !u.is_empty())
}

/// Checks a URL given with `--discovery` before anything is sent.
pub fn check_url(url: &str) -> Result<(), CliError> {
    etcd::parse_url(url).map(|_| ()).map_err(|e| CliError::new(Exit::Usage, format!("--discovery: {e:#}")))
}

/// A connection to the etcd at `url` as `peer`, with its certificate in
/// `dir`.
pub fn connect_as(dir: &Path, url: &str, peer: &Peer) -> anyhow::Result<Etcd> {
    let tls = Tls::load(&CertDir::new(dir), peer)?;
    Etcd::connect(&tls, url)
}

/// A connection to the etcd at `url` with the client certificate of `dir`
/// (which may read the gateways' keys, and nothing else).
pub fn connect(dir: &Path, url: &str) -> anyhow::Result<Etcd> {
    connect_as(dir, url, &Peer::Client(CLIENT_NAME.to_owned()))
}

/// Every parsable entry under `prefix`, in one read (within
/// [`READ_TIMEOUT`]); the error says why etcd gave none.
pub async fn read_entries(etcd: &Etcd, prefix: &str) -> Result<BTreeMap<String, Entry>, String> {
    match tokio::time::timeout(READ_TIMEOUT, etcd.range_prefix(prefix)).await {
        Ok(Ok((entries, _))) => Ok(View { entries, live: true, loaded: true }.parsed()),
        Ok(Err(status)) => Err(status.message().to_owned()),
        Err(_) => Err(format!("no answer within {READ_TIMEOUT:?}")),
    }
}

/// The gateways registered in the etcd at `url`, by one read with the
/// client certificate of `dir`: their addresses, sorted, each once. An
/// empty list means etcd answered and no gateway is registered.
pub async fn gateway_addresses(dir: &Path, url: &str) -> Result<Vec<String>, String> {
    let etcd = connect(dir, url).map_err(|e| format!("{e:#}"))?;
    let entries = read_entries(&etcd, etcd::GATEWAYS_PREFIX).await?;
    Ok(addresses(&entries))
}

/// The addresses of `entries`, sorted, each once.
pub fn addresses(entries: &BTreeMap<String, Entry>) -> Vec<String> {
    let mut list: Vec<String> = entries.values().map(|e| e.address.clone()).collect();
    list.sort();
    list.dedup();
    list
}

/// The gateways a client uses when etcd cannot be reached: the list in
/// `DIR/gateway.addr`, else the gateways `DIR/instances.json` lists; and
/// where that came from.
pub fn static_gateways(dir: &Path) -> Option<(Vec<String>, String)> {
    let file = dir.join(strife_rpc::config::GATEWAY_ADDR_FILE);
    if let Ok(text) = std::fs::read_to_string(&file) {
        let list: Vec<String> =
            text.split(',').map(str::trim).filter(|a| !a.is_empty()).map(str::to_owned).collect();
        if !list.is_empty() {
            return Some((list, file.display().to_string()));
        }
    }
    let listed = instances::read(dir).ok().flatten()?;
    let list: Vec<String> = listed
        .into_iter()
        .filter(|i| i.role == Role::Gateway && !i.address.is_empty())
        .map(|i| i.address)
        .collect();
    (!list.is_empty()).then(|| (list, dir.join(instances::INSTANCES_FILE).display().to_string()))
}

/// A watch on the gateways' keys for a long-lived client (the shell): the
/// receiver always holds the whole set; it ends when the sender is
/// dropped or set to true. Must run inside a tokio runtime.
pub fn watch_gateways(dir: &Path, url: &str) -> anyhow::Result<(watch::Receiver<View>, watch::Sender<bool>)> {
    let etcd = connect(dir, url)?;
    let (stop_tx, stop) = watch::channel(false);
    let rx = etcd::watch_prefix(etcd, etcd::GATEWAYS_PREFIX.to_owned(), stop);
    Ok((rx, stop_tx))
}

/// One registration in etcd, as `strife status` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub role: Role,
    /// `gateway`, or the bank's name (from its key).
    pub name: String,
    /// The last part of its key: the replica's boot id.
    pub instance: String,
    pub entry: Entry,
    /// How long its current lease has been held.
    pub lease_age_ms: u64,
    /// Whether it answers its health check (registered *and* serving).
    pub healthy: bool,
}

/// What etcd says of a cluster, for `strife status`.
#[derive(Debug, Clone)]
pub struct Seen {
    pub url: String,
    /// Whether etcd answered.
    pub reachable: bool,
    /// Why it did not, or why the banks' keys could not be read.
    pub error: Option<String>,
    /// Whether the banks' keys were read (a client certificate may read
    /// only the gateways'; the gateway's certificate, where DIR has it,
    /// reads both).
    pub banks_read: bool,
    pub registered: Vec<Registered>,
}

/// The role, name and instance of a key under Strife's prefixes.
fn parse_key(key: &str) -> Option<(Role, String, String)> {
    if let Some(instance) = key.strip_prefix(etcd::GATEWAYS_PREFIX) {
        return Some((Role::Gateway, "gateway".to_owned(), instance.to_owned()));
    }
    let (name, instance) = key.strip_prefix(etcd::BANKS_PREFIX)?.split_once('/')?;
    Some((Role::Bank, name.to_owned(), instance.to_owned()))
}

/// Every gateway and bank registered in the etcd at `url`, each with its
/// lease age and whether it answers its health check. Reads as the
/// gateway when `dir` holds its certificate (to see the banks too), else
/// as the client (the gateways only).
pub async fn status(dir: &Path, url: &str) -> Seen {
    let mut seen = Seen {
        url: url.to_owned(),
        reachable: false,
        error: None,
        banks_read: false,
        registered: Vec::new(),
    };
    let (etcd, banks_readable) = match connect_as(dir, url, &Peer::Gateway) {
        Ok(etcd) => (etcd, true),
        Err(_) => match connect(dir, url) {
            Ok(etcd) => (etcd, false),
            Err(e) => {
                seen.error = Some(format!("{e:#}"));
                return seen;
            }
        },
    };
    let mut entries = match read_entries(&etcd, etcd::GATEWAYS_PREFIX).await {
        Ok(entries) => entries,
        Err(why) => {
            seen.error = Some(why);
            return seen;
        }
    };
    seen.reachable = true;
    if banks_readable {
        match read_entries(&etcd, etcd::BANKS_PREFIX).await {
            Ok(banks) => {
                entries.extend(banks);
                seen.banks_read = true;
            }
            Err(why) => seen.error = Some(format!("the banks' keys: {why}")),
        }
    } else {
        seen.error = Some("the banks' keys are not readable with the client certificate".to_owned());
    }
    let mut listed = Vec::new();
    for (key, entry) in entries {
        let Some((role, name, instance)) = parse_key(&key) else { continue };
        let lease_age_ms = u64::try_from(entry.lease_age().as_millis()).unwrap_or(u64::MAX);
        listed.push(Registered { role, name, instance, entry, lease_age_ms, healthy: false });
    }
    let checked: Vec<instances::Instance> = listed
        .iter()
        .map(|r| instances::Instance {
            role: r.role,
            name: r.name.clone(),
            replica: 1,
            address: r.entry.address.clone(),
            pid: None,
            metrics: None,
            admin: None,
        })
        .collect();
    for (r, healthy) in listed.iter_mut().zip(instances::health(dir, &checked).await) {
        r.healthy = healthy;
    }
    seen.registered = listed;
    seen
}

/// A lease age for people: seconds with one decimal.
pub fn age(ms: u64) -> String {
    format!("{}.{} s", ms / 1000, (ms % 1000) / 100)
}

impl Seen {
    /// The registration of `instance` (same role, name and address).
    pub fn find(&self, instance: &instances::Instance) -> Option<&Registered> {
        self.registered.iter().find(|r| {
            r.role == instance.role && r.name == instance.name && r.entry.address == instance.address
        })
    }

    pub fn text(&self) -> String {
        let mut text = if self.reachable {
            format!("discovery: etcd at {} lists {} instance(s)\n", self.url, self.registered.len())
        } else {
            format!(
                "discovery: etcd at {} cannot be reached ({}); the instances above are the last known set\n",
                self.url,
                self.error.as_deref().unwrap_or("no answer")
            )
        };
        for r in &self.registered {
            text.push_str(&format!(
                "  {:<8} {:<12} {:<22} lease {:<8} {}\n",
                r.role.as_str(),
                r.name,
                r.entry.address,
                age(r.lease_age_ms),
                if r.healthy { "healthy" } else { "not answering" }
            ));
        }
        if self.reachable
            && let Some(error) = &self.error
        {
            text.push_str(&format!("  ({error})\n"));
        }
        text
    }

    pub fn json(&self) -> serde_json::Value {
        let registered: Vec<serde_json::Value> = self
            .registered
            .iter()
            .map(|r| {
                serde_json::json!({
                    "role": r.role.as_str(), "name": r.name, "instance": r.instance,
                    "address": r.entry.address, "boot_id": r.entry.boot_id, "version": r.entry.version,
                    "registered_at_ms": r.entry.registered_at_ms, "lease_age_ms": r.lease_age_ms,
                    "registered": true, "healthy": r.healthy,
                })
            })
            .collect();
        serde_json::json!({
            "url": self.url, "reachable": self.reachable, "error": self.error,
            "banks_read": self.banks_read, "instances": registered,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(tag: &str) -> std::path::PathBuf {
        let dir = std::env::temp_dir().join(format!("strife-discovery-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        dir
    }

    #[test]
    fn the_flag_wins_then_the_settings_then_the_file() {
        let dir = temp_dir("url");
        let none = DiscoveryConfig::default();
        assert_eq!(etcd_url(&dir, None, &none), None);
        std::fs::write(dir.join(ETCD_URL_FILE), "etcd://127.0.0.1:3\n").expect("write");
        assert_eq!(etcd_url(&dir, None, &none).as_deref(), Some("etcd://127.0.0.1:3"));
        let set = DiscoveryConfig { url: "etcd://127.0.0.1:2".into(), ..DiscoveryConfig::default() };
        assert_eq!(etcd_url(&dir, None, &set).as_deref(), Some("etcd://127.0.0.1:2"));
        assert_eq!(etcd_url(&dir, Some("etcd://127.0.0.1:1"), &set).as_deref(), Some("etcd://127.0.0.1:1"));
        assert!(check_url("etcd://127.0.0.1:1").is_ok());
        assert_eq!(check_url("http://x").map_err(|e| e.exit).err(), Some(Exit::Usage));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_static_set_is_the_address_file_else_the_instances() {
        let dir = temp_dir("static");
        assert_eq!(static_gateways(&dir), None);
        let listed = vec![instances::Instance {
            role: Role::Gateway,
            name: "gateway".into(),
            replica: 1,
            address: "127.0.0.1:9".into(),
            pid: None,
            metrics: None,
            admin: None,
        }];
        instances::write(&dir, &listed).expect("write");
        assert_eq!(static_gateways(&dir).map(|(l, _)| l), Some(vec!["127.0.0.1:9".to_owned()]));
        std::fs::write(dir.join(strife_rpc::config::GATEWAY_ADDR_FILE), "127.0.0.1:1,127.0.0.1:2\n")
            .expect("write");
        assert_eq!(
            static_gateways(&dir).map(|(l, _)| l),
            Some(vec!["127.0.0.1:1".to_owned(), "127.0.0.1:2".to_owned()])
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn keys_name_their_role_and_instance() {
        assert_eq!(
            parse_key(&etcd::gateway_key("b1")),
            Some((Role::Gateway, "gateway".to_owned(), "b1".to_owned()))
        );
        assert_eq!(
            parse_key(&etcd::bank_key("BankA", "b2")),
            Some((Role::Bank, "BankA".to_owned(), "b2".to_owned()))
        );
        assert_eq!(parse_key("/strife/v1/other"), None);
        assert_eq!(age(12_345), "12.3 s");
    }

    #[test]
    fn addresses_are_sorted_and_each_once() {
        let mut entries = BTreeMap::new();
        entries.insert("/a".to_owned(), Entry::new("127.0.0.1:2", "x"));
        entries.insert("/b".to_owned(), Entry::new("127.0.0.1:1", "y"));
        entries.insert("/c".to_owned(), Entry::new("127.0.0.1:2", "z"));
        assert_eq!(addresses(&entries), vec!["127.0.0.1:1", "127.0.0.1:2"]);
    }
}
