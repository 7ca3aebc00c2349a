//! The processes of a cluster: `DIR/instances.json`, which `strife up`
//! rewrites whenever one of its children starts or stops, and which
//! `strife status` reads to check each one's health over mutual TLS.

use crate::connect::CLIENT_NAME;
use serde_json::{Value, json};
use std::path::Path;
use std::time::Duration;
use strife_rpc::Peer;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;

/// The file in a Strife directory that lists the cluster's processes.
pub const INSTANCES_FILE: &str = "instances.json";
/// Longest wait for one instance's health answer (all are asked at once).
pub const HEALTH_TIMEOUT: Duration = Duration::from_secs(2);
/// Most instances the file may list (`up` runs far fewer).
pub const INSTANCES_MAX: usize = 1_024;

/// What an instance is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Role {
    Gateway,
    Bank,
    /// The PostgreSQL server `up --postgres auto` runs.
    Postgres,
    /// The etcd server `up --etcd` uses.
    Etcd,
}

impl Role {
    pub fn as_str(self) -> &'static str {
        match self {
            Role::Gateway => "gateway",
            Role::Bank => "bank",
            Role::Postgres => "postgres",
            Role::Etcd => "etcd",
        }
    }

    /// Whether instances of this role register themselves in etcd.
    pub fn registers(self) -> bool {
        matches!(self, Role::Gateway | Role::Bank)
    }

    fn parse(text: &str) -> Option<Role> {
        [Role::Gateway, Role::Bank, Role::Postgres, Role::Etcd].into_iter().find(|r| r.as_str() == text)
    }
}

/// One process of the cluster.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub role: Role,
    /// `gateway`, the bank's name (every replica of a bank has it), or
    /// `postgres`.
    pub name: String,
    /// Which of the replicas of `name` this is, from 1.
    pub replica: u32,
    /// Where it listens, `host:port`.
    pub address: String,
    /// Its process id, when it runs on this machine.
    pub pid: Option<u32>,
    /// Where it serves its Prometheus metrics, when it does.
    pub metrics: Option<String>,
    /// Where a gateway serves the operator's dashboard, when it does.
    pub admin: Option<String>,
}

impl Instance {
    fn to_json(&self) -> Value {
        json!({
            "role": self.role.as_str(), "name": self.name, "replica": self.replica,
            "address": self.address, "pid": self.pid, "metrics": self.metrics,
            "admin": self.admin,
        })
    }

    fn from_json(v: &Value) -> Option<Instance> {
        Some(Instance {
            role: Role::parse(v["role"].as_str()?)?,
            name: v["name"].as_str()?.to_owned(),
            replica: u32::try_from(v["replica"].as_u64()?).ok()?,
            address: v["address"].as_str()?.to_owned(),
            pid: v["pid"].as_u64().and_then(|p| u32::try_from(p).ok()),
            metrics: v["metrics"].as_str().map(str::to_owned),
            admin: v["admin"].as_str().map(str::to_owned),
        })
    }
}

/// Writes the list (atomically: readers see the old one or the new one).
pub fn write(dir: &Path, instances: &[Instance]) -> anyhow::Result<()> {
    let list: Vec<Value> = instances.iter().map(Instance::to_json).collect();
    strife_rpc::pki::write_private(&dir.join(INSTANCES_FILE), &format!("{}\n", json!({ "instances": list })))
}

/// Removes the list (the cluster stopped).
pub fn remove(dir: &Path) {
    let _ = std::fs::remove_file(dir.join(INSTANCES_FILE));
}

/// The list `up` wrote in `dir`; None when there is none.
pub fn read(dir: &Path) -> anyhow::Result<Option<Vec<Instance>>> {
    let path = dir.join(INSTANCES_FILE);
    let text = match std::fs::read_to_string(&path) {
        Ok(text) => text,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(anyhow::anyhow!("reading {}: {e}", path.display())),
    };
    let parsed: Value = serde_json::from_str(&text)
        .map_err(|e| anyhow::anyhow!("{} is not an instance list: {e}", path.display()))?;
    let list = parsed["instances"].as_array().cloned().unwrap_or_default();
    if list.len() > INSTANCES_MAX {
        anyhow::bail!("{} lists more than {INSTANCES_MAX} instances", path.display());
    }
    list.iter()
        .map(|v| {
            Instance::from_json(v).ok_or_else(|| anyhow::anyhow!("{}: a malformed entry {v}", path.display()))
        })
        .collect::<anyhow::Result<Vec<_>>>()
        .map(Some)
}

/// Whether `pid` is a process of this machine that is still there.
pub fn is_running(pid: u32) -> bool {
    let Ok(raw) = i32::try_from(pid) else { return false };
    match nix::sys::signal::kill(nix::unistd::Pid::from_raw(raw), None) {
        Ok(()) | Err(nix::errno::Errno::EPERM) => true,
        Err(_) => false,
    }
}

/// Whether each instance answers, in order, all asked at once, each within
/// [`HEALTH_TIMEOUT`]: a gateway or bank its gRPC health check over mutual
/// TLS (with the client certificate of `dir`, and checking that the server
/// proves the identity the entry names); PostgreSQL and etcd a TCP
/// connection.
pub async fn health(dir: &Path, instances: &[Instance]) -> Vec<bool> {
    let tls = Tls::load(&CertDir::new(dir), &Peer::Client(CLIENT_NAME.to_owned())).ok();
    let mut tasks = tokio::task::JoinSet::new();
    for (i, instance) in instances.iter().enumerate() {
        let (tls, instance) = (tls.clone(), instance.clone());
        tasks.spawn(async move {
            let healthy = tokio::time::timeout(HEALTH_TIMEOUT, check(tls.as_ref(), &instance)).await;
            (i, healthy.unwrap_or(false))
        });
    }
    let mut healthy = vec![false; instances.len()];
    while let Some(done) = tasks.join_next().await {
        if let Ok((i, ok)) = done
            && let Some(slot) = healthy.get_mut(i)
        {
            *slot = ok;
        }
    }
    healthy
}

async fn check(tls: Option<&Tls>, instance: &Instance) -> bool {
    use tonic_health::pb::{
        HealthCheckRequest, health_check_response::ServingStatus, health_client::HealthClient,
    };
    let peer = match instance.role {
        Role::Postgres | Role::Etcd => {
            return tokio::net::TcpStream::connect(&instance.address).await.is_ok();
        }
        Role::Gateway => Peer::Gateway,
        Role::Bank => Peer::Bank(instance.name.clone()),
    };
    let Some(endpoint) = tls.and_then(|tls| tls.endpoint(&peer, &instance.address).ok()) else {
        return false;
    };
    let Ok(channel) = endpoint.timeout(HEALTH_TIMEOUT).connect().await else {
        return false;
    };
    HealthClient::new(channel)
        .check(HealthCheckRequest { service: String::new() })
        .await
        .is_ok_and(|r| r.into_inner().status() == ServingStatus::Serving)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_list_reads_back_as_written() {
        let dir = std::env::temp_dir().join(format!("strife-instances-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("dir");
        assert_eq!(read(&dir).expect("read"), None, "no file, no list");
        let list = vec![
            Instance {
                role: Role::Gateway,
                name: "gateway".into(),
                replica: 2,
                address: "127.0.0.1:1".into(),
                pid: Some(7),
                metrics: None,
                admin: None,
            },
            Instance {
                role: Role::Bank,
                name: "BankA".into(),
                replica: 1,
                address: "127.0.0.1:2".into(),
                pid: None,
                metrics: None,
                admin: None,
            },
            Instance {
                role: Role::Postgres,
                name: "postgres".into(),
                replica: 1,
                address: "127.0.0.1:3".into(),
                pid: Some(9),
                metrics: None,
                admin: None,
            },
        ];
        write(&dir, &list).expect("write");
        assert_eq!(read(&dir).expect("read"), Some(list));
        std::fs::write(dir.join(INSTANCES_FILE), r#"{"instances":[{"role":"cook"}]}"#).expect("write");
        assert!(read(&dir).is_err(), "a malformed list is an error");
        remove(&dir);
        assert_eq!(read(&dir).expect("read"), None);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn this_process_runs() {
        assert!(is_running(std::process::id()));
    }
}
