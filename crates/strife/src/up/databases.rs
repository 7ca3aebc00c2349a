//! The databases of a cluster on PostgreSQL (`strife up --postgres`): one
//! role and one database per kind of server, the gateway's (shared by every
//! gateway) and each bank's (shared by its replicas). Each role owns its
//! database, and only it (and the administrator) may connect to it; a bank's
//! role cannot reach another bank's data or the gateway's.
//!
//! The names carry a random id kept in `DIR/stores/cluster.id`, so that two
//! clusters on one server never share a role. The passwords are random,
//! made once, and kept in `DIR/stores/*.password` (0600); they reach the
//! server only as SCRAM verifiers, and the servers only through their
//! environment (`STRIFE_GATEWAY_STORE`, `STRIFE_BANK_STORE`).

use anyhow::{Context, bail};
use std::path::{Path, PathBuf};
use std::time::Duration;
use strife_core::Secret;
use tokio_postgres::NoTls;

/// Where the cluster's id and the roles' passwords are, under DIR.
const STORES_DIR: &str = "stores";
/// The gateways' store URL in `DIR/stores` (0600), written at every start.
const GATEWAY_URL_FILE: &str = "gateway.url";

/// The store of the gateways of the cluster `up --postgres` runs in `dir`,
/// if it runs one.
pub fn gateway_store(dir: &Path) -> Option<Secret<String>> {
    let text = std::fs::read_to_string(dir.join(STORES_DIR).join(GATEWAY_URL_FILE)).ok()?;
    Some(Secret::new(text.trim().to_owned())).filter(|url| !url.expose().is_empty())
}
/// Longest wait to reach the server.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// Longest role or database name PostgreSQL keeps whole.
const NAME_MAX: usize = 63;

/// The store URL of each server of the cluster (secrets: never logged).
pub struct Stores {
    /// The gateways' database.
    pub gateway: Secret<String>,
    /// Each bank's database, by the bank's name.
    pub banks: Vec<(String, Secret<String>)>,
}

impl Stores {
    pub fn bank(&self, name: &str) -> Option<&Secret<String>> {
        self.banks.iter().find(|(b, _)| b == name).map(|(_, url)| url)
    }
}

/// One role and its database.
struct Owner {
    /// The role's name, which is also its database's.
    name: String,
    /// Where its password is kept.
    password_file: PathBuf,
}

/// Makes (or finds again) the roles and databases of the cluster in `dir`
/// on the server `admin` names (a role that may create roles and
/// databases), and returns each server's URL.
pub async fn provision(dir: &Path, admin: &Secret<String>, banks: &[String]) -> anyhow::Result<Stores> {
    let stores = dir.join(STORES_DIR);
    strife_rpc::files::create_private_dir_all(&stores)
        .with_context(|| format!("creating {}", stores.display()))?;
    let id = read_or_make(&stores.join("cluster.id"), || {
        uuid::Uuid::new_v4().simple().to_string()[..8].to_owned()
    })?;
    let gateway =
        Owner { name: format!("strife_{id}_gateway"), password_file: stores.join("gateway.password") };
    let mut owners = vec![gateway];
    for (i, bank) in banks.iter().enumerate() {
        // Bank names are letters, digits and `-`: only case can make two one.
        if let Some(twin) = banks[..i].iter().find(|b| b.eq_ignore_ascii_case(bank)) {
            bail!("banks '{twin}' and '{bank}' differ only in case: PostgreSQL would give them one database");
        }
        let name = format!("strife_{id}_bank_{}", bank.to_ascii_lowercase().replace('-', "_"));
        owners.push(Owner { name, password_file: stores.join(format!("bank.{bank}.password")) });
    }
    for owner in &owners {
        check_name(&owner.name)?;
    }

    let config: tokio_postgres::Config =
        admin.expose().parse().context("--postgres is not a PostgreSQL URL")?;
    let client = connect(&config).await?;
    let superuser: bool = client
        .query_one("SELECT rolsuper FROM pg_roles WHERE rolname = current_user", &[])
        .await
        .context("asking the server who we are")?
        .get(0);
    let mut urls = Vec::new();
    for owner in &owners {
        let password = read_or_make(&owner.password_file, random_password)?;
        let password = Secret::new(password);
        make_owner(&client, &config, owner, &password, superuser).await?;
        urls.push(role_url(admin.expose(), &owner.name, &password)?);
    }
    let mut urls = urls.into_iter();
    let gateway = urls.next().context("the gateway's URL")?;
    // For `strife audit` in DIR, which reads the gateways' log through it.
    strife_rpc::pki::write_private(&stores.join(GATEWAY_URL_FILE), &format!("{}\n", gateway.expose()))?;
    Ok(Stores { gateway, banks: banks.iter().cloned().zip(urls).collect() })
}

/// Creates the role (or sets its password again) and its database, closed
/// to every other role.
async fn make_owner(
    client: &tokio_postgres::Client,
    config: &tokio_postgres::Config,
    owner: &Owner,
    password: &Secret<String>,
    superuser: bool,
) -> anyhow::Result<()> {
    let name = &owner.name;
    // The verifier is base64 and `$`/`:` only: safe between quotes.
    let verifier = postgres_protocol::password::scram_sha_256(password.expose().as_bytes());
    let role_exists = !client.query("SELECT 1 FROM pg_roles WHERE rolname = $1", &[name]).await?.is_empty();
    let verb = if role_exists { "ALTER" } else { "CREATE" };
    client
        .batch_execute(&format!(
            "{verb} ROLE {name} LOGIN NOSUPERUSER NOCREATEDB NOCREATEROLE PASSWORD '{verifier}'"
        ))
        .await
        .with_context(|| format!("making the role {name}"))?;
    if !superuser {
        // A role that is not a superuser may make a database owned by
        // another only as a member of it.
        client.batch_execute(&format!("GRANT {name} TO CURRENT_USER")).await?;
    }
    if client.query("SELECT 1 FROM pg_database WHERE datname = $1", &[name]).await?.is_empty() {
        client
            .batch_execute(&format!("CREATE DATABASE {name} OWNER {name}"))
            .await
            .with_context(|| format!("making the database {name}"))?;
    }
    client.batch_execute(&format!("REVOKE ALL ON DATABASE {name} FROM PUBLIC")).await?;
    let mut in_database = config.clone();
    in_database.dbname(name);
    let inside = connect(&in_database).await?;
    inside
        .batch_execute(&format!(
            "REVOKE ALL ON SCHEMA public FROM PUBLIC; GRANT ALL ON SCHEMA public TO {name}"
        ))
        .await
        .with_context(|| format!("closing the database {name} to other roles"))?;
    Ok(())
}

async fn connect(config: &tokio_postgres::Config) -> anyhow::Result<tokio_postgres::Client> {
    let mut config = config.clone();
    config.connect_timeout(CONNECT_TIMEOUT).application_name("strife-up");
    let (client, connection) = tokio::time::timeout(CONNECT_TIMEOUT, config.connect(NoTls))
        .await
        .map_err(|_| anyhow::anyhow!("PostgreSQL did not answer within {CONNECT_TIMEOUT:?}"))?
        .context("connecting to PostgreSQL")?;
    // The connection ends when the client is dropped, and this task then.
    tokio::spawn(async move {
        if let Err(e) = connection.await {
            tracing::warn!(error = %e, "PostgreSQL connection");
        }
    });
    Ok(client)
}

/// The URL of `role` at the server and with the parameters `admin` names,
/// for its own database.
fn role_url(admin: &str, role: &str, password: &Secret<String>) -> anyhow::Result<Secret<String>> {
    let Some((scheme, rest)) =
        admin.split_once("://").filter(|(s, _)| *s == "postgres" || *s == "postgresql")
    else {
        bail!("--postgres takes `auto` or a postgres://USER:PASSWORD@HOST:PORT/DATABASE URL");
    };
    let (rest, query) = rest.split_once('?').map_or((rest, None), |(r, q)| (r, Some(q)));
    let authority = rest.split('/').next().unwrap_or(rest);
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if host.is_empty() {
        bail!("--postgres names no host");
    }
    let query = query.map(|q| format!("?{q}")).unwrap_or_default();
    Ok(Secret::new(format!("{scheme}://{role}:{}@{host}/{role}{query}", password.expose())))
}

/// `host:port` of the server a URL names (5432 when it names no port).
pub fn server_address(url: &str) -> Option<String> {
    let rest = url.split_once("://")?.1;
    let authority = rest.split(['/', '?']).next()?;
    let host = authority.rsplit_once('@').map_or(authority, |(_, host)| host);
    if host.is_empty() {
        return None;
    }
    let has_port = host.rsplit_once(':').is_some_and(|(_, p)| p.parse::<u16>().is_ok());
    Some(if has_port { host.to_owned() } else { format!("{host}:5432") })
}

/// The text of a private file, made by `make` (and written 0600) the first
/// time.
fn read_or_make(path: &Path, make: impl FnOnce() -> String) -> anyhow::Result<String> {
    match std::fs::read_to_string(path) {
        Ok(text) if !text.trim().is_empty() => Ok(text.trim().to_owned()),
        Ok(_) => bail!("{} is empty", path.display()),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let text = make();
            strife_rpc::pki::write_private(path, &format!("{text}\n"))?;
            Ok(text)
        }
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// 256 bits from the operating system's random source, as hex.
fn random_password() -> String {
    format!("{}{}", uuid::Uuid::new_v4().simple(), uuid::Uuid::new_v4().simple())
}

/// Names go into SQL as identifiers: a-z, 0-9 and `_` only.
fn check_name(name: &str) -> anyhow::Result<()> {
    let ok = name.len() <= NAME_MAX
        && name.starts_with(|c: char| c.is_ascii_lowercase())
        && name.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
    if !ok {
        bail!("'{name}' cannot name a PostgreSQL role (a-z, 0-9, _; at most {NAME_MAX})");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;
    use strife_rpc::postgres_server::shared_for_tests;

    fn admin() -> Secret<String> {
        shared_for_tests().unwrap_or_else(|e| panic!("{e}")).superuser_url("postgres")
    }

    fn temp_dir(tag: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("strife-databases-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        strife_rpc::files::create_private_dir_all(&dir).expect("dir");
        dir
    }

    /// Connects with `url`; the error's text when refused.
    async fn try_connect(url: &str) -> Result<(), String> {
        let config: tokio_postgres::Config = url.parse().map_err(|e| format!("{e}"))?;
        match connect(&config).await {
            Ok(client) => client.simple_query("SELECT 1").await.map(|_| ()).map_err(|e| format!("{e}")),
            Err(e) => Err(format!("{e:#}")),
        }
    }

    fn at_database(url: &Secret<String>, database: &str) -> String {
        let (base, _) = url.expose().rsplit_once('/').expect("a database");
        format!("{base}/{database}")
    }

    fn database(url: &Secret<String>) -> String {
        url.expose().rsplit_once('/').expect("a database").1.to_owned()
    }

    #[tokio::test]
    async fn each_server_kind_gets_its_own_closed_database_and_finds_it_again() {
        let dir = temp_dir("own");
        let banks = vec!["BankA".to_owned(), "Bank-B".to_owned()];
        let stores = provision(&dir, &admin(), &banks).await.expect("provision");
        let bank_a = stores.bank("BankA").expect("BankA");
        let bank_b = stores.bank("Bank-B").expect("Bank-B");
        for url in [&stores.gateway, bank_a, bank_b] {
            try_connect(url.expose()).await.expect("a role reaches its own database");
        }
        // A bank's role reaches neither another bank's database nor the gateway's.
        for other in [database(bank_b), database(&stores.gateway)] {
            let refused = try_connect(&at_database(bank_a, &other)).await.expect_err(&other);
            assert!(refused.contains("permission denied"), "{other}: {refused}");
        }
        let refused = try_connect(&at_database(&stores.gateway, &database(bank_a))).await.expect_err("A");
        assert!(refused.contains("permission denied"), "{refused}");

        // The passwords are private files, and a second run finds them again.
        for file in ["stores/cluster.id", "stores/gateway.password", "stores/bank.BankA.password"] {
            let mode = std::fs::metadata(dir.join(file)).expect(file).permissions().mode() & 0o777;
            assert_eq!(mode, 0o600, "{file}");
        }
        let again = provision(&dir, &admin(), &banks).await.expect("again");
        assert_eq!(again.gateway.expose(), stores.gateway.expose());
        assert_eq!(again.bank("BankA").map(|u| u.expose().clone()), Some(bank_a.expose().clone()));
        try_connect(again.gateway.expose()).await.expect("still reachable");

        // Another cluster on the same server gets roles of its own.
        let other_dir = temp_dir("other");
        let other = provision(&other_dir, &admin(), &banks).await.expect("other cluster");
        assert_ne!(database(&other.gateway), database(&stores.gateway));
        let refused = try_connect(&at_database(&other.gateway, &database(&stores.gateway))).await;
        assert!(refused.is_err_and(|e| e.contains("permission denied")));
        let _ = std::fs::remove_dir_all(&dir);
        let _ = std::fs::remove_dir_all(&other_dir);
    }

    #[tokio::test]
    async fn banks_that_differ_only_in_case_are_refused() {
        let dir = temp_dir("case");
        let err = provision(&dir, &admin(), &["BankA".to_owned(), "banka".to_owned()]).await;
        assert!(err.is_err_and(|e| format!("{e:#}").contains("differ only in case")));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn role_urls_keep_the_server_and_its_parameters() {
        let password = Secret::new("pw".to_owned());
        let url =
            role_url("postgres://admin:secret@db.example:6000/postgres?sslmode=disable", "r", &password)
                .expect("url");
        assert_eq!(url.expose(), "postgres://r:pw@db.example:6000/r?sslmode=disable");
        let url = role_url("postgresql://127.0.0.1", "r", &password).expect("url");
        assert_eq!(url.expose(), "postgresql://r:pw@127.0.0.1/r");
        assert!(role_url("host=x user=y", "r", &password).is_err());
        assert_eq!(server_address("postgres://a:b@h:7/d").as_deref(), Some("h:7"));
        assert_eq!(server_address("postgres://h/d?x=1").as_deref(), Some("h:5432"));
    }
}
