//! This gateway's payments per second and latency, a ring of per-second
//! samples for the dashboard's charts. Per replica: each gateway counts
//! the payments it decided itself.

use std::collections::VecDeque;
use std::sync::{LazyLock, Mutex, PoisonError};
use std::time::Duration;

/// Seconds of history kept (five minutes).
pub const SAMPLES_MAX: usize = 300;
/// Latencies kept for one second's percentiles; more in that second count
/// but are not sampled.
pub const LATENCIES_PER_SECOND_MAX: usize = 4096;

/// One second of this gateway's payments.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub struct Sample {
    /// The second, since the epoch.
    pub at_secs: i64,
    pub committed: u64,
    pub declined: u64,
    /// Latency percentiles in microseconds (0 when no payment).
    pub p50_micros: u64,
    pub p99_micros: u64,
}

#[derive(Default)]
struct Live {
    current: Sample,
    latencies: Vec<u64>,
    ring: VecDeque<Sample>,
}

static LIVE: LazyLock<Mutex<Live>> = LazyLock::new(Mutex::default);

fn now_secs() -> i64 {
    strife_core::unix_ms() / 1000
}

impl Live {
    /// Closes the current second if `now` is past it, with empty seconds
    /// for any gap.
    fn roll(&mut self, now: i64) {
        if self.current.at_secs == now {
            return;
        }
        if self.current.at_secs != 0 {
            let mut closed = self.current;
            self.latencies.sort_unstable();
            closed.p50_micros = percentile(&self.latencies, 50);
            closed.p99_micros = percentile(&self.latencies, 99);
            self.push(closed);
            let gap = (now - closed.at_secs - 1).clamp(0, SAMPLES_MAX as i64);
            for s in (now - gap)..now {
                self.push(Sample { at_secs: s, ..Sample::default() });
            }
        }
        self.current = Sample { at_secs: now, ..Sample::default() };
        self.latencies.clear();
    }

    fn push(&mut self, s: Sample) {
        if self.ring.len() >= SAMPLES_MAX {
            self.ring.pop_front();
        }
        self.ring.push_back(s);
    }
}

fn percentile(sorted: &[u64], p: usize) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    sorted[(sorted.len() * p / 100).min(sorted.len() - 1)]
}

/// Counts a payment this gateway decided, with its latency.
pub fn record(committed: bool, latency: Duration) {
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    live.roll(now_secs());
    if committed {
        live.current.committed += 1;
    } else {
        live.current.declined += 1;
    }
    if live.latencies.len() < LATENCIES_PER_SECOND_MAX {
        live.latencies.push(u64::try_from(latency.as_micros()).unwrap_or(u64::MAX));
    }
}

/// The completed seconds, oldest first.
pub fn samples() -> Vec<Sample> {
    let mut live = LIVE.lock().unwrap_or_else(PoisonError::into_inner);
    live.roll(now_secs());
    live.ring.iter().copied().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seconds_close_with_their_percentiles_and_gaps_fill_with_zeros() {
        let mut live = Live::default();
        live.roll(100);
        for micros in 1..=100 {
            live.current.committed += 1;
            live.latencies.push(micros);
        }
        live.roll(103);
        let ring: Vec<_> = live.ring.iter().copied().collect();
        assert_eq!(ring.len(), 3);
        assert_eq!((ring[0].committed, ring[0].p50_micros, ring[0].p99_micros), (100, 51, 100));
        assert_eq!((ring[1].at_secs, ring[1].committed), (101, 0));
        assert_eq!(ring[2].at_secs, 102);
    }
}
