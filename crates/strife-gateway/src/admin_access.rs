//! Who may open the operator's dashboard: a one-time login link signed
//! with the cluster's admin key, then a session cookie.
//!
//! The admin key (`DIR/certs/admin.key`, 32 random bytes, mode 0600) is
//! made by the first gateway (or `strife admin url`) that finds it missing.
//! Whoever can read it can make a link, which is exactly who can read the
//! operator's files in DIR; a customer's token proves nothing here.
//!
//! A link is `/login?t=NONCE.EXPIRY.MAC`: 16 random bytes, seconds since the
//! epoch, and HMAC-SHA-256 of both under the admin key. A gateway accepts it
//! before its expiry (and refuses one claiming more than [`LINK_TTL_MAX`]),
//! and once: the nonces used are remembered in this gateway's memory until
//! their links expire. With several gateway replicas, a link names one
//! replica's address and is used there; each replica remembers only its own
//! logins (a link shown to another replica could be used once more there,
//! within its few minutes). A restart forgets used nonces, so a link made
//! before it could be used again until it expires.

use crate::hex;
use std::collections::HashMap;
use std::path::Path;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;
use strife_core::Secret;

/// The admin key's file in the certificates directory.
pub const ADMIN_KEY_FILE: &str = "admin.key";
/// The longest a link may claim to stay valid.
pub const LINK_TTL_MAX: Duration = Duration::from_secs(3600);
/// Used links remembered at once (until their expiry): more logins than
/// that within [`LINK_TTL_MAX`] are refused.
pub const USED_LINKS_MAX: usize = 10_000;
/// Sessions open at once: more logins are refused until some expire.
pub const SESSIONS_MAX: usize = 1024;
/// The session cookie's name.
pub const SESSION_COOKIE: &str = "strife_admin";

const MAC_CONTEXT: &[u8] = b"strife admin login link v1\n";

/// The admin key, read from (or made in) `certs_dir`.
pub fn admin_key(certs_dir: &Path) -> anyhow::Result<Secret<Vec<u8>>> {
    let path = certs_dir.join(ADMIN_KEY_FILE);
    if !path.exists() {
        let rng = ring::rand::SystemRandom::new();
        let secret: [u8; 32] =
            ring::rand::generate(&rng).map_err(|_| anyhow::anyhow!("no randomness"))?.expose();
        strife_rpc::pki::write_private(&path, &format!("{}\n", hex::encode(&secret)))?;
    }
    let text = std::fs::read_to_string(&path)?;
    let key = hex::decode(text.trim()).ok_or_else(|| anyhow::anyhow!("{} is malformed", path.display()))?;
    if key.len() < 32 {
        anyhow::bail!("{}: the admin key is shorter than 32 bytes", path.display());
    }
    Ok(Secret::new(key))
}

fn mac(key: &Secret<Vec<u8>>, nonce: &str, expiry: u64) -> ring::hmac::Tag {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key.expose());
    let mut ctx = ring::hmac::Context::with_key(&key);
    ctx.update(MAC_CONTEXT);
    ctx.update(format!("{nonce}.{expiry}").as_bytes());
    ctx.sign()
}

/// A fresh login token valid for `ttl` from `now_secs`.
pub fn login_token(key: &Secret<Vec<u8>>, now_secs: u64, ttl: Duration) -> anyhow::Result<String> {
    let nonce = random_hex::<16>()?;
    let expiry = now_secs.saturating_add(ttl.as_secs());
    Ok(format!("{nonce}.{expiry}.{}", hex::encode(mac(key, &nonce, expiry).as_ref())))
}

/// The login link for the dashboard at `addr` (`https` when it is not on
/// loopback: it is then served over TLS).
pub fn login_link(certs_dir: &Path, addr: &str, ttl: Duration) -> anyhow::Result<String> {
    let key = admin_key(certs_dir)?;
    let token = login_token(&key, crate::tokens::now_secs(), ttl)?;
    let loopback = addr.parse::<std::net::SocketAddr>().is_ok_and(|a| a.ip().is_loopback());
    let scheme = if loopback { "http" } else { "https" };
    Ok(format!("{scheme}://{addr}/login?t={token}"))
}

/// `N` random bytes as hex.
pub fn random_hex<const N: usize>() -> anyhow::Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let bytes: [u8; N] = ring::rand::generate(&rng).map_err(|_| anyhow::anyhow!("no randomness"))?.expose();
    Ok(hex::encode(&bytes))
}

/// Why a login was refused (shown to the browser: nothing secret).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkRefused {
    Malformed,
    BadSignature,
    Expired,
    Used,
    Busy,
}

impl LinkRefused {
    pub fn message(self) -> &'static str {
        match self {
            LinkRefused::Malformed => "this login link is malformed",
            LinkRefused::BadSignature => "this login link was not made with this cluster's admin key",
            LinkRefused::Expired => "this login link has expired",
            LinkRefused::Used => "this login link was used already: each link logs in once",
            LinkRefused::Busy => "too many logins at once; try again in a few minutes",
        }
    }
}

/// One logged-in browser.
#[derive(Debug, Clone)]
pub struct Session {
    /// When it ends, seconds since the epoch.
    pub expires_secs: u64,
    /// The token every state-changing form carries back.
    pub csrf: String,
}

/// The links used and the sessions open at this gateway.
pub struct Access {
    key: Secret<Vec<u8>>,
    session_ttl: Duration,
    /// Nonces of used links, with their links' expiry.
    used: Mutex<HashMap<String, u64>>,
    /// Open sessions by id.
    sessions: Mutex<HashMap<String, Session>>,
}

impl Access {
    pub fn new(key: Secret<Vec<u8>>, session_ttl: Duration) -> Access {
        Access { key, session_ttl, used: Mutex::default(), sessions: Mutex::default() }
    }

    /// Checks a link's token and, if good, opens a session: its id and the
    /// session.
    pub fn login(&self, token: &str, now_secs: u64) -> Result<(String, Session), LinkRefused> {
        let mut parts = token.split('.');
        let (Some(nonce), Some(expiry), Some(tag), None) =
            (parts.next(), parts.next(), parts.next(), parts.next())
        else {
            return Err(LinkRefused::Malformed);
        };
        let expiry: u64 = expiry.parse().map_err(|_| LinkRefused::Malformed)?;
        let tag = hex::decode(tag).ok_or(LinkRefused::Malformed)?;
        if nonce.len() != 32 || hex::decode(nonce).is_none() {
            return Err(LinkRefused::Malformed);
        }
        let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, self.key.expose());
        let mut signed = MAC_CONTEXT.to_vec();
        signed.extend_from_slice(format!("{nonce}.{expiry}").as_bytes());
        ring::hmac::verify(&key, &signed, &tag).map_err(|_| LinkRefused::BadSignature)?;
        if expiry <= now_secs || expiry > now_secs.saturating_add(LINK_TTL_MAX.as_secs()) {
            return Err(LinkRefused::Expired);
        }
        {
            let mut used = self.used.lock().unwrap_or_else(PoisonError::into_inner);
            if used.contains_key(nonce) {
                return Err(LinkRefused::Used);
            }
            if used.len() >= USED_LINKS_MAX {
                used.retain(|_, until| *until > now_secs);
                if used.len() >= USED_LINKS_MAX {
                    return Err(LinkRefused::Busy);
                }
            }
            used.insert(nonce.to_owned(), expiry);
        }
        let id = random_hex::<32>().map_err(|_| LinkRefused::Busy)?;
        let csrf = random_hex::<32>().map_err(|_| LinkRefused::Busy)?;
        let session = Session { expires_secs: now_secs.saturating_add(self.session_ttl.as_secs()), csrf };
        let mut sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        if sessions.len() >= SESSIONS_MAX {
            sessions.retain(|_, s| s.expires_secs > now_secs);
            if sessions.len() >= SESSIONS_MAX {
                return Err(LinkRefused::Busy);
            }
        }
        sessions.insert(id.clone(), session.clone());
        Ok((id, session))
    }

    /// The live session with this id.
    pub fn session(&self, id: &str, now_secs: u64) -> Option<Session> {
        let sessions = self.sessions.lock().unwrap_or_else(PoisonError::into_inner);
        sessions.get(id).filter(|s| s.expires_secs > now_secs).cloned()
    }

    /// Ends a session.
    pub fn logout(&self, id: &str) {
        self.sessions.lock().unwrap_or_else(PoisonError::into_inner).remove(id);
    }

    /// How long a session lasts.
    pub fn session_ttl(&self) -> Duration {
        self.session_ttl
    }
}

/// Compares two secrets in constant time.
pub fn same_secret(a: &str, b: &str) -> bool {
    a.len() == b.len() && a.bytes().zip(b.bytes()).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    fn access() -> Access {
        Access::new(Secret::new(vec![7; 32]), Duration::from_secs(60))
    }

    #[test]
    fn a_link_logs_in_once_before_it_expires() {
        let a = access();
        let token = login_token(&Secret::new(vec![7; 32]), 1000, Duration::from_secs(300)).expect("token");
        let (id, s) = a.login(&token, 1001).expect("first use");
        assert!(a.session(&id, 1002).is_some());
        assert!(a.session(&id, s.expires_secs).is_none(), "sessions expire");
        assert_eq!(a.login(&token, 1002).map(|_| ()), Err(LinkRefused::Used));
        let late = login_token(&Secret::new(vec![7; 32]), 1000, Duration::from_secs(10)).expect("token");
        assert_eq!(a.login(&late, 1010).map(|_| ()), Err(LinkRefused::Expired));
        let other = login_token(&Secret::new(vec![8; 32]), 1000, Duration::from_secs(300)).expect("token");
        assert_eq!(a.login(&other, 1001).map(|_| ()), Err(LinkRefused::BadSignature));
        let long = login_token(&Secret::new(vec![7; 32]), 1000, LINK_TTL_MAX * 2).expect("token");
        assert_eq!(a.login(&long, 1001).map(|_| ()), Err(LinkRefused::Expired));
        assert_eq!(a.login("x.y.z", 1001).map(|_| ()), Err(LinkRefused::Malformed));
        a.logout(&id);
        assert!(a.session(&id, 1002).is_none());
    }
}
