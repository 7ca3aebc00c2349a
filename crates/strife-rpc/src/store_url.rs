//! Where a server keeps its state: the URL in its `store` setting picks
//! SQLite (the default, a file) or PostgreSQL (a database several processes
//! may share).

use std::path::PathBuf;
use strife_core::Secret;

/// Where a server keeps its state, from its `store` setting.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreUrl {
    /// A SQLite file (`bank.store` empty: `bank.db` in the bank's data
    /// directory; or a path, or `sqlite://PATH`).
    Sqlite(PathBuf),
    /// A PostgreSQL database (`postgres://…` or `postgresql://…`). The URL
    /// may hold a password: it is never logged (see [`StoreUrl::redacted`]).
    Postgres(Secret<String>),
}

impl StoreUrl {
    /// Reads the setting `setting` (e.g. `bank.store`), whose empty value
    /// means the SQLite file `default_file`.
    pub fn parse(setting: &str, store: &str, default_file: PathBuf) -> anyhow::Result<StoreUrl> {
        let store = store.trim();
        if store.is_empty() {
            return Ok(StoreUrl::Sqlite(default_file));
        }
        if store.starts_with("postgres://") || store.starts_with("postgresql://") {
            return Ok(StoreUrl::Postgres(Secret::new(store.to_owned())));
        }
        if let Some(path) = store.strip_prefix("sqlite://") {
            return Ok(StoreUrl::Sqlite(PathBuf::from(path)));
        }
        if let Some((scheme, _)) = store.split_once("://") {
            anyhow::bail!("{setting}: unknown kind of store '{scheme}://' (use a file path or postgres://…)");
        }
        Ok(StoreUrl::Sqlite(PathBuf::from(store)))
    }

    /// What may be logged: the kind and place of the store, no credentials.
    pub fn redacted(&self) -> String {
        match self {
            StoreUrl::Sqlite(path) => format!("sqlite {}", path.display()),
            StoreUrl::Postgres(url) => {
                let rest = url.expose().split_once("://").map_or("", |(_, rest)| rest);
                let host_db = rest.rsplit_once('@').map_or(rest, |(_, host)| host);
                let host_db = host_db.split_once('?').map_or(host_db, |(h, _)| h);
                format!("postgres {host_db}")
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    #[test]
    fn the_url_picks_the_backend() {
        let data = Path::new("/d/banks/A");
        assert_eq!(
            StoreUrl::parse("bank.store", "", data.join("bank.db")).expect("empty"),
            StoreUrl::Sqlite(data.join("bank.db"))
        );
        assert_eq!(
            StoreUrl::parse("bank.store", "/x/a.db", data.join("bank.db")).expect("path"),
            StoreUrl::Sqlite("/x/a.db".into())
        );
        assert_eq!(
            StoreUrl::parse("bank.store", "sqlite:///x/a.db", data.join("bank.db")).expect("url"),
            StoreUrl::Sqlite("/x/a.db".into())
        );
        let pg = StoreUrl::parse(
            "bank.store",
            "postgres://bank:s3cret@127.0.0.1:5432/bank_a?sslmode=disable",
            data.join("bank.db"),
        )
        .expect("postgres");
        assert!(matches!(pg, StoreUrl::Postgres(_)));
        assert_eq!(pg.redacted(), "postgres 127.0.0.1:5432/bank_a");
        assert!(!format!("{pg:?}").contains("s3cret"), "{pg:?}");
        assert!(matches!(
            StoreUrl::parse("bank.store", "postgresql://h/db", data.join("bank.db")),
            Ok(StoreUrl::Postgres(_))
        ));
        assert!(StoreUrl::parse("bank.store", "mysql://h/db", data.join("bank.db")).is_err());
    }
}
