//! Customers' accounts as first created: the contract's sample accounts, or
//! an accounts file. Passwords are stored only as Argon2id hashes.

use anyhow::{Context, bail};
use argon2::Argon2;
use argon2::{PasswordHash, PasswordHasher};
use serde::Deserialize;
use std::path::Path;
use strife_core::{Amount, Secret, validate_user_name};

/// One account to create.
#[derive(Debug, Clone)]
pub struct NewAccount {
    pub user: String,
    pub password: Secret<String>,
    pub balance_minor: i64,
}

/// The contract's sample accounts: `user1`…`user5`, passwords `pass1`…`pass5`,
/// balances of 1000.00 times the user's number.
pub fn sample_accounts() -> Vec<NewAccount> {
    (1..=5)
        .map(|n: i64| NewAccount {
            user: format!("user{n}"),
            password: Secret::new(format!("pass{n}")),
            balance_minor: n * 100_000,
        })
        .collect()
}

/// How an account from a file proves its password.
#[derive(Debug, Clone)]
pub enum Credential {
    /// Hashed with Argon2id when the account is created.
    Password(Secret<String>),
    /// Already an Argon2id PHC string (`$argon2id$...`), stored as is.
    Hash(String),
}

/// One account to create from an accounts file.
#[derive(Debug, Clone)]
pub struct AccountSpec {
    pub user: String,
    pub credential: Credential,
    pub balance_minor: i64,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountsFile {
    account: Vec<AccountEntry>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AccountEntry {
    user: String,
    /// A plaintext password (hashed on creation) ...
    #[serde(default)]
    password: Option<String>,
    /// ... or an Argon2id hash made elsewhere, so no plaintext is on disk.
    #[serde(default)]
    password_hash: Option<String>,
    /// A decimal string like `"100.00"`; `"0"` is allowed.
    balance: String,
}

/// Reads an accounts file:
/// ```toml
/// [[account]]
/// user = "alice"
/// password = "correct horse"          # or: password_hash = "$argon2id$..."
/// balance = "100.00"
/// ```
pub fn load_accounts_file(path: &Path) -> anyhow::Result<Vec<AccountSpec>> {
    let text = std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    let file: AccountsFile = toml::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    let mut out = Vec::new();
    for entry in file.account {
        validate_user_name(&entry.user).with_context(|| format!("account '{}'", entry.user))?;
        let credential = match (entry.password, entry.password_hash) {
            (Some(p), None) if !p.is_empty() && p.len() <= strife_core::limits::PASSWORD_MAX => {
                Credential::Password(Secret::new(p))
            }
            (None, Some(h)) if PasswordHash::new(&h).is_ok_and(|ph| ph.algorithm.as_str() == "argon2id") => {
                Credential::Hash(h)
            }
            _ => bail!(
                "account '{}': give either a password of 1 to {} bytes or an Argon2id password_hash",
                entry.user,
                strife_core::limits::PASSWORD_MAX
            ),
        };
        let balance_minor = match entry.balance.as_str() {
            "0" | "0.0" | "0.00" => 0,
            text => {
                Amount::parse(text).with_context(|| format!("account '{}': balance", entry.user))?.minor()
            }
        };
        out.push(AccountSpec { user: entry.user, credential, balance_minor });
    }
    Ok(out)
}

/// Hashes a password with Argon2id and a fresh salt (PHC string format).
pub fn hash_password(password: &Secret<String>) -> anyhow::Result<String> {
    // 16 bytes from the OS's random source (a v4 UUID is exactly that).
    let salt = uuid::Uuid::new_v4();
    let hash = Argon2::default()
        .hash_password_with_salt(password.expose().as_bytes(), salt.as_bytes())
        .map_err(|e| anyhow::anyhow!("hashing a password: {e}"))?;
    Ok(hash.to_string())
}

/// Checks a password against a stored hash in a caller-owned work area
/// (`memory`, grown to the hash's memory cost once and then reused), so that
/// repeated checks do not allocate ~19 MiB each. A malformed hash never
/// matches; the comparison takes the same time wherever the bytes differ.
pub fn verify_password_in(password: &Secret<String>, stored: &str, memory: &mut Vec<argon2::Block>) -> bool {
    let Ok(hash) = PasswordHash::new(stored) else { return false };
    let (Some(expected), Some(salt)) = (hash.hash, hash.salt) else { return false };
    let Ok(params) = argon2::Params::try_from(&hash) else { return false };
    let Ok(algorithm) = argon2::Algorithm::try_from(hash.algorithm.as_str()) else { return false };
    let version = hash.version.and_then(|v| argon2::Version::try_from(v).ok()).unwrap_or_default();
    if memory.len() < params.block_count() {
        memory.resize(params.block_count(), argon2::Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    let argon = Argon2::new(algorithm, version, params.clone());
    if argon
        .hash_password_into_with_memory(
            password.expose().as_bytes(),
            &salt,
            &mut out,
            &mut memory[..params.block_count()],
        )
        .is_err()
    {
        return false;
    }
    let diff = out.iter().zip(expected.as_bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b));
    diff == 0 && out.len() == expected.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_verify_only_the_right_password() {
        let hash = hash_password(&Secret::new("pass1".into())).expect("hash");
        assert!(hash.starts_with("$argon2id$"));
        let mut memory = Vec::new();
        assert!(verify_password_in(&Secret::new("pass1".into()), &hash, &mut memory));
        assert!(!verify_password_in(&Secret::new("pass2".into()), &hash, &mut memory));
        assert!(
            verify_password_in(&Secret::new("pass1".into()), &hash, &mut memory),
            "the work area is reused"
        );
        assert!(!verify_password_in(&Secret::new("pass1".into()), "garbage", &mut memory));
    }

    #[test]
    fn hashes_made_before_still_verify() {
        // Made by `hash_password("pass1")` with argon2 0.5: accounts files
        // and stores hold such hashes, and later versions must accept them.
        let old = "$argon2id$v=19$m=19456,t=2,p=1$zNN1IpHjTMK/wZcA6gFdbQ$2OwkE0ulxPNd4IrxXvWyR0OZtYHLdoMghVr2oB/Jz9o";
        let mut memory = Vec::new();
        assert!(verify_password_in(&Secret::new("pass1".into()), old, &mut memory));
        assert!(!verify_password_in(&Secret::new("pass2".into()), old, &mut memory));
        // New hashes keep the same parameters (Argon2id, v=19, 19 MiB, 2 passes).
        let new = hash_password(&Secret::new("pass1".into())).expect("hash");
        assert!(new.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{new}");
    }

    #[test]
    fn samples_follow_the_contract() {
        let s = sample_accounts();
        assert_eq!(s.len(), 5);
        assert_eq!(s[2].user, "user3");
        assert_eq!(s[2].balance_minor, 300_000);
        assert_eq!(s[2].password.expose(), "pass3");
    }
}
