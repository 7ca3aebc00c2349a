//! Crash-point injection for fault tests. With the `fault-injection`
//! feature (enabled for the test build of the `strife` binary only), a
//! process whose `STRIFE_CRASH_AT` names a point aborts there, like
//! `kill -9`: no destructor runs, nothing more is written. `NAME@N` crashes
//! at the N-th time the point is reached. Without the feature, the calls
//! compile to nothing.

/// The points the code can crash at, for tests and documentation.
pub const CRASH_POINTS: [&str; 10] = [
    "gateway.after_begin",
    "gateway.before_decision",
    "gateway.after_decision",
    "gateway.after_commit_sent",
    "gateway.before_outcome",
    "bank.after_prepare",
    "bank.before_commit",
    "bank.after_commit",
    "bank.before_transfer",
    "bank.after_transfer",
];

/// Aborts the process if `STRIFE_CRASH_AT` names `point`.
#[inline]
pub fn crash_point(point: &'static str) {
    #[cfg(feature = "fault-injection")]
    imp::check(point);
    #[cfg(not(feature = "fault-injection"))]
    let _ = point;
}

#[cfg(feature = "fault-injection")]
mod imp {
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU32, Ordering};

    static TARGET: OnceLock<Option<(String, u32)>> = OnceLock::new();
    static HITS: AtomicU32 = AtomicU32::new(0);

    pub fn check(point: &'static str) {
        let target = TARGET.get_or_init(|| {
            let spec = std::env::var("STRIFE_CRASH_AT").ok()?;
            let (name, nth) = match spec.split_once('@') {
                Some((n, k)) => (n.to_owned(), k.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some((name, nth))
        });
        if let Some((name, nth)) = target
            && name == point
            && HITS.fetch_add(1, Ordering::SeqCst) + 1 == *nth
        {
            eprintln!("strife: crash point {point} reached; aborting");
            std::process::abort();
        }
    }
}
