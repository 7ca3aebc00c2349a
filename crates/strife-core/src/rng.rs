//! A seeded pseudo-random generator (SplitMix64) for everything that must
//! replay from a seed: property tests, fault runs, the benchmark's choices.
//! Not for secrets: keys, salts and ids come from the OS.

/// SplitMix64: tiny and well mixed; the state is the seed.
#[derive(Debug, Clone)]
pub struct SplitMix64(pub u64);

impl SplitMix64 {
    /// The next number. (Not `Iterator::next`: the stream never ends.)
    #[allow(clippy::should_implement_trait)]
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }

    /// A number in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        match (hi - lo).checked_add(1) {
            Some(span) => lo + self.next() % span,
            None => self.next(),
        }
    }
}

/// The seed of a replayable run: the number in the environment variable
/// `var` when it is set, else one from the clock. Printed on stderr with
/// the variable to set to replay the run.
pub fn seed_from_env(var: &str) -> u64 {
    let seed = std::env::var(var).ok().and_then(|s| s.trim().parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(1, |d| d.as_nanos() as u64)
    });
    eprintln!("{var}={seed} (set it to replay this run)");
    seed
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_seed_replays() {
        let (mut a, mut b) = (SplitMix64(42), SplitMix64(42));
        for _ in 0..100 {
            assert_eq!(a.next(), b.next());
        }
        assert!((0..1000).all(|_| a.range(5, 9) >= 5 && a.below(3) < 3));
    }
}
