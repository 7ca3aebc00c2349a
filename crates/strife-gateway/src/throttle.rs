//! Login throttling: failed logins are counted per account and per peer
//! address. Each failure is answered a little later than the one before,
//! and past a threshold the key is locked for a while (longer each time).
//! An unknown user and a wrong password count alike, so the throttle says
//! nothing about which accounts exist.
//!
//! The counts live in the gateway's store ([`crate::backend::GatewayStore`]),
//! so they survive a restart and, on PostgreSQL, every replica counts into
//! the same rows: N gateways do not give an attacker N times the tries. The
//! rules are here, as pure functions the stores apply inside the
//! transaction that reads and writes a key's entry.

use std::time::Duration;

/// Delay added to the answer of the first failure; doubles with each one.
const FAILURE_DELAY_FIRST: Duration = Duration::from_millis(50);
/// Longest delay added to one failed login.
const FAILURE_DELAY_MAX: Duration = Duration::from_secs(2);
/// Longest lock.
const LOCK_MAX: Duration = Duration::from_secs(3600);
/// An entry idle this long (and not locked) is forgotten when the store
/// prunes.
pub const IDLE_FORGET: Duration = Duration::from_secs(3600);

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

/// What is known of one key: failures since the last lock or success,
/// how many locks it had, and until when it is locked (ms since the epoch;
/// 0 when it never was).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Entry {
    pub failures: u32,
    pub locks: u32,
    pub locked_until_ms: i64,
}

/// The threshold and first lock that apply to one key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    pub failures_max: u32,
    pub lock: Duration,
}

impl Rule {
    /// The entry after one more failure at `now_ms`: past the threshold
    /// the key is locked, each lock twice as long as the one before.
    pub fn after_failure(&self, e: Entry, now_ms: i64) -> Entry {
        let failures = e.failures.saturating_add(1);
        if failures < self.failures_max {
            return Entry { failures, ..e };
        }
        let lock = (self.lock * 2u32.pow(e.locks.min(16))).min(LOCK_MAX);
        let lock_ms = i64::try_from(lock.as_millis()).unwrap_or(i64::MAX);
        Entry {
            failures: 0,
            locks: e.locks.saturating_add(1),
            locked_until_ms: now_ms.saturating_add(lock_ms),
        }
    }
}

/// How long to wait before answering the `failures`-th failure in a row.
fn failure_delay(failures: u32) -> Duration {
    let exp = failures.saturating_sub(1).min(16);
    (FAILURE_DELAY_FIRST * 2u32.pow(exp)).min(FAILURE_DELAY_MAX)
}

/// Which kind of key, for the thresholds.
#[derive(Debug, Clone, Copy)]
pub enum Key<'a> {
    Account(&'a str),
    Peer(&'a str),
}

impl Key<'_> {
    /// The key as the store keeps it.
    pub fn text(&self) -> String {
        match self {
            Key::Account(a) => format!("account:{a}"),
            Key::Peer(p) => format!("peer:{p}"),
        }
    }

    pub fn rule(&self, policy: &Policy) -> Rule {
        let failures_max = match self {
            Key::Account(_) => policy.account_failures_max,
            Key::Peer(_) => policy.peer_failures_max,
        };
        Rule { failures_max, lock: policy.lock }
    }
}

/// `Err(retry_after)` while any of `entries` is locked at `now_ms`.
pub fn check(entries: &[Entry], now_ms: i64) -> Result<(), Duration> {
    let wait = entries.iter().map(|e| e.locked_until_ms.saturating_sub(now_ms)).filter(|ms| *ms > 0).max();
    match wait {
        Some(ms) => Err(Duration::from_millis(u64::try_from(ms).unwrap_or(0))),
        None => Ok(()),
    }
}

/// How long to wait before answering a failure, from the entries it left
/// (`before`: the entries it found): the delay grows with the failures in
/// a row, and the failure that locks a key waits longest.
pub fn delay_after(before: &[Entry], after: &[Entry]) -> Duration {
    before
        .iter()
        .zip(after)
        .map(|(b, a)| if a.locks > b.locks { FAILURE_DELAY_MAX } else { failure_delay(a.failures) })
        .max()
        .unwrap_or(Duration::ZERO)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn locks_after_the_threshold_and_unlocks_later() {
        let policy =
            Policy { account_failures_max: 3, peer_failures_max: 100, lock: Duration::from_secs(10) };
        let rule = Key::Account("u@B").rule(&policy);
        let now = 1_000_000;
        let e1 = rule.after_failure(Entry::default(), now);
        let e2 = rule.after_failure(e1, now);
        assert!(delay_after(&[e1], &[e2]) > delay_after(&[Entry::default()], &[e1]), "delays grow");
        assert!(check(&[e2], now).is_ok());
        let e3 = rule.after_failure(e2, now);
        assert_eq!(delay_after(&[e2], &[e3]), FAILURE_DELAY_MAX, "the locking failure waits longest");
        assert_eq!(check(&[e3], now).expect_err("locked"), Duration::from_secs(10));
        assert!(check(&[e3], now + 11_000).is_ok());
        // The second lock lasts twice as long.
        let later = now + 11_000;
        let e6 = (0..3).fold(e3, |e, _| rule.after_failure(e, later));
        assert_eq!(check(&[e6], later).expect_err("locked"), Duration::from_secs(20));
        // A peer key has its own, higher threshold.
        let peer = Key::Peer("127.0.0.1").rule(&policy);
        assert_eq!(peer.after_failure(e2, now).locks, 0);
        // Locks never pass an hour.
        let many = Entry { failures: 2, locks: 40, locked_until_ms: 0 };
        assert_eq!(check(&[rule.after_failure(many, now)], now).expect_err("locked"), LOCK_MAX);
    }
}
