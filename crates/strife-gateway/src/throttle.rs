//! Login throttling: failed logins are counted per account and per peer
//! address. Each failure is answered a little later than the one before,
//! and past a threshold the key is locked for a while (longer each time).
//! An unknown user and a wrong password count alike, so the throttle says
//! nothing about which accounts exist.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Delay added to the answer of the first failure; doubles with each one.
const FAILURE_DELAY_FIRST: Duration = Duration::from_millis(50);
/// Longest delay added to one failed login.
const FAILURE_DELAY_MAX: Duration = Duration::from_secs(2);
/// Longest lock.
const LOCK_MAX: Duration = Duration::from_secs(3600);
/// Most keys tracked; past it, entries idle for a while are dropped.
const ENTRIES_MAX: usize = 100_000;
/// An entry idle this long is forgotten when the table is full.
const IDLE_FORGET: Duration = Duration::from_secs(3600);

/// Thresholds, from the settings.
#[derive(Debug, Clone, Copy)]
pub struct Policy {
    /// Failures in a row that lock one account.
    pub account_failures_max: u32,
    /// Failures in a row that lock one peer address (password spraying).
    pub peer_failures_max: u32,
    /// How long the first lock lasts; each further lock doubles it.
    pub lock: Duration,
}

#[derive(Debug, Default)]
struct Entry {
    failures: u32,
    locks: u32,
    locked_until: Option<Instant>,
    last: Option<Instant>,
}

pub struct LoginThrottle {
    policy: Policy,
    entries: Mutex<HashMap<String, Entry>>,
}

/// Which kind of key, for the thresholds.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Account(&'a str),
    Peer(&'a str),
}

impl Key<'_> {
    fn text(&self) -> String {
        match self {
            Key::Account(a) => format!("account:{a}"),
            Key::Peer(p) => format!("peer:{p}"),
        }
    }
}

impl LoginThrottle {
    pub fn new(policy: Policy) -> LoginThrottle {
        LoginThrottle { policy, entries: Mutex::new(HashMap::new()) }
    }

    /// `Err(retry_after)` while any of `keys` is locked.
    pub fn check(&self, keys: &[Key<'_>], now: Instant) -> Result<(), Duration> {
        let Ok(entries) = self.entries.lock() else { return Ok(()) };
        let wait = keys
            .iter()
            .filter_map(|k| entries.get(&k.text())?.locked_until)
            .filter(|until| *until > now)
            .map(|until| until - now)
            .max();
        match wait {
            Some(w) => Err(w),
            None => Ok(()),
        }
    }

    /// Records a failure; returns how long to wait before answering.
    pub fn failed(&self, keys: &[Key<'_>], now: Instant) -> Duration {
        let Ok(mut entries) = self.entries.lock() else { return FAILURE_DELAY_MAX };
        if entries.len() >= ENTRIES_MAX {
            entries.retain(|_, e| e.last.is_some_and(|t| now.duration_since(t) < IDLE_FORGET));
        }
        let mut delay = Duration::ZERO;
        for key in keys {
            let max = match key {
                Key::Account(_) => self.policy.account_failures_max,
                Key::Peer(_) => self.policy.peer_failures_max,
            };
            let e = entries.entry(key.text()).or_default();
            e.failures += 1;
            e.last = Some(now);
            let exp = e.failures.saturating_sub(1).min(16);
            delay = delay.max((FAILURE_DELAY_FIRST * 2u32.pow(exp)).min(FAILURE_DELAY_MAX));
            if e.failures >= max {
                let lock = (self.policy.lock * 2u32.pow(e.locks.min(16))).min(LOCK_MAX);
                e.locks += 1;
                e.failures = 0;
                e.locked_until = Some(now + lock);
                tracing::warn!(key = %key.text(), lock_secs = lock.as_secs(), "too many failed logins; locked");
            }
        }
        delay
    }

    /// A successful login clears the account's failures (not the peer's
    /// lock history).
    pub fn succeeded(&self, keys: &[Key<'_>]) {
        if let Ok(mut entries) = self.entries.lock() {
            for key in keys {
                if let Some(e) = entries.get_mut(&key.text()) {
                    e.failures = 0;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_the_threshold_and_unlocks_later() {
        let t = LoginThrottle::new(Policy {
            account_failures_max: 3,
            peer_failures_max: 100,
            lock: Duration::from_secs(10),
        });
        let now = Instant::now();
        let keys = [Key::Account("u@B"), Key::Peer("127.0.0.1")];
        let d1 = t.failed(&keys, now);
        let d2 = t.failed(&keys, now);
        assert!(d2 > d1, "delays grow");
        assert!(t.check(&keys, now).is_ok());
        t.failed(&keys, now);
        let wait = t.check(&keys, now).expect_err("locked");
        assert_eq!(wait, Duration::from_secs(10));
        assert!(t.check(&keys, now + Duration::from_secs(11)).is_ok());
        // The second lock lasts twice as long.
        for _ in 0..3 {
            t.failed(&keys, now + Duration::from_secs(11));
        }
        assert_eq!(
            t.check(&keys, now + Duration::from_secs(11)).expect_err("locked"),
            Duration::from_secs(20)
        );
        // Other accounts are not affected by this account's lock.
        assert!(t.check(&[Key::Account("v@B")], now + Duration::from_secs(11)).is_ok());
    }
}
