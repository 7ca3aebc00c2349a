//! The whole cluster on every dashboard (issue 13). Each gateway replica
//! writes a heartbeat row to the shared store about once a second, from a
//! task of its own ([`run_heartbeat`]): its addresses, when it started, and
//! a [`Report`] of what only it knows (its per-second samples, undelivered
//! decisions as its finisher last claimed them, decision conflicts, storage
//! failures, its view of each bank replica, its last audit). A dashboard
//! reads every row and merges the fresh ones with its own figures
//! ([`merge`]). On SQLite (one gateway) it is the same code path, with one
//! row.
//!
//! How figures merge, over the replicas whose heartbeat is fresh (at most
//! [`REPLICA_FRESH_MAX_MS`] old):
//! - payments per second: summed per second;
//! - p50: the mean of the replicas' p50s weighted by their payments in
//!   that second (exact when replicas see the same distribution, an
//!   estimate otherwise: percentiles do not add); p99: the largest
//!   replica's p99 (an upper bound: a slow replica is never hidden);
//! - undelivered decisions, storage failures: summed;
//! - decision conflicts: summed over every listed replica, stale ones too
//!   (a contradiction does not go away because its replica died);
//! - a bank replica is unreachable when every fresh gateway replica that
//!   knows it says so (reachable if any reaches it), its last heartbeat
//!   the most recent any of them saw.

use crate::backend::GatewayStore;
use crate::coordinator::Gateway;
use crate::live::{self, Sample};
use crate::store::{Heartbeat, ReplicaRow};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;
use strife_rpc::metrics;
use tokio::sync::watch;

/// How often a replica writes its heartbeat.
pub const HEARTBEAT_INTERVAL: Duration = Duration::from_secs(1);
/// A heartbeat older than this is stale: its replica is shown as such, and
/// its figures are left out of the sums.
pub const REPLICA_FRESH_MAX_MS: i64 = 5_000;
/// A replica silent for this long is deleted from the table.
pub const REPLICA_FORGET_MS: i64 = 3_600_000;
/// Replicas read (and listed) at most, the most recent first.
pub const REPLICAS_LISTED_MAX: u32 = 64;
/// Problems an audit report lists in full (all are counted).
pub const AUDIT_PROBLEMS_LISTED_MAX: usize = 20;

/// What one replica says of itself in its heartbeat (JSON in the row).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct Report {
    /// Its seconds with payments among the last [`live::SAMPLES_MAX`]:
    /// `(second, committed, declined, p50 µs, p99 µs)`.
    pub samples: Vec<(i64, u64, u64, u64, u64)>,
    /// Decisions not yet acknowledged, as its finisher last claimed them.
    pub undelivered: i64,
    /// Decisions a bank contradicted, since it started.
    pub conflicts: u64,
    /// Storage failures, since it started.
    pub storage_failures: u64,
    /// Each bank replica as its registry sees it.
    pub banks: Vec<BankSeen>,
    /// Its last audit pass (none yet, or audits off).
    pub audit: Option<AuditSummary>,
}

/// One bank replica as one gateway replica sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BankSeen {
    pub name: String,
    pub address: String,
    pub reachable: bool,
    /// Since it last registered here, in ms; `None` if never.
    pub last_seen_ms: Option<u64>,
}

/// What a replica's audit passes found ([`crate::audit`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub struct AuditSummary {
    /// When the last pass ended, ms since the epoch.
    pub last_run_ms: i64,
    /// Payments checked by the last pass.
    pub checked_last_run: u64,
    /// Payments checked since the replica started.
    pub checked_total: u64,
    /// Problems found since the replica started (a problem found again by
    /// a later pass counts once).
    pub problems: u64,
    /// The first [`AUDIT_PROBLEMS_LISTED_MAX`] of them, said plainly.
    pub listed: Vec<String>,
    /// Why the last pass could not finish, if it could not.
    pub error: Option<String>,
}

impl Report {
    /// This process's figures now.
    pub fn own<S: GatewayStore>(gateway: &Gateway<S>) -> Report {
        let samples = live::samples()
            .into_iter()
            .filter(|s| s.committed + s.declined > 0)
            .map(|s| (s.at_secs, s.committed, s.declined, s.p50_micros, s.p99_micros))
            .collect();
        let banks = gateway
            .registry
            .health()
            .into_iter()
            .map(|h| BankSeen {
                name: h.name,
                address: h.address,
                reachable: h.reachable,
                last_seen_ms: h.last_seen.map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX)),
            })
            .collect();
        Report {
            samples,
            undelivered: metrics::GATEWAY.undelivered.get(),
            conflicts: metrics::GATEWAY.decision_conflicts.get(),
            storage_failures: storage_failures(),
            banks,
            audit: gateway.audit_summary(),
        }
    }
}

/// This process's storage failures, every cause.
pub fn storage_failures() -> u64 {
    strife_rpc::storage::StorageCause::ALL
        .iter()
        .map(|c| metrics::STORE.failures.get_or_create(&[("cause", c.code())]).get())
        .sum()
}

/// Who this replica is, as its heartbeat and its dashboard say.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Identity {
    /// Where customers and banks reach it.
    pub address: String,
    /// Where its dashboard is served (empty when off).
    pub admin_address: String,
    /// When it started, ms since the epoch.
    pub started_at_ms: i64,
}

/// Writes this replica's heartbeat every [`HEARTBEAT_INTERVAL`] until
/// `stop`. Its own task: a slow store delays the heartbeat, never a
/// payment. A failure is logged when it starts and when it ends, not
/// every second.
pub async fn run_heartbeat<S: GatewayStore>(
    gateway: Arc<Gateway<S>>,
    me: Identity,
    mut stop: watch::Receiver<bool>,
) {
    let mut failing = false;
    loop {
        let report = serde_json::to_string(&Report::own(&gateway)).unwrap_or_default();
        let beat = Heartbeat {
            boot_id: gateway.boot_id.clone(),
            address: me.address.clone(),
            admin_address: me.admin_address.clone(),
            started_at_ms: me.started_at_ms,
            report,
        };
        match gateway.store.heartbeat(beat).await {
            Ok(()) if failing => {
                failing = false;
                tracing::info!("heartbeat written again");
            }
            Ok(()) => {}
            Err(e) if !failing => {
                failing = true;
                tracing::warn!(error = %e, "cannot write this replica's heartbeat; other dashboards will show it stale");
            }
            Err(_) => {}
        }
        tokio::select! {
            _ = tokio::time::sleep(HEARTBEAT_INTERVAL) => {}
            _ = stop.changed() => return,
        }
    }
}

/// One replica as a dashboard lists it.
#[derive(Debug, Clone, PartialEq)]
pub struct ReplicaView {
    pub boot_id: String,
    pub address: String,
    pub admin_address: String,
    pub started_at_ms: i64,
    /// Since its last heartbeat, ms (0 for the replica showing the page).
    pub age_ms: i64,
    pub fresh: bool,
    /// The replica serving this dashboard.
    pub this: bool,
    pub report: Report,
}

/// A bank replica as the cluster sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BankView {
    pub name: String,
    pub address: String,
    /// Some fresh gateway replica reaches it.
    pub reachable: bool,
    /// The most recent heartbeat any of them saw, ms ago.
    pub last_seen_ms: Option<u64>,
}

/// The cluster merged from every heartbeat (see the module's rules).
#[derive(Debug, Clone, PartialEq)]
pub struct ClusterView {
    /// This replica first, then the others, the most recent first.
    pub replicas: Vec<ReplicaView>,
    /// Payments per second and latency, oldest second first.
    pub samples: Vec<Sample>,
    pub undelivered: i64,
    pub conflicts: u64,
    /// Storage failures of each fresh replica that had any: `(address, count)`.
    pub storage_failures: Vec<(String, u64)>,
    pub banks: Vec<BankView>,
    /// What the replicas' audits found (see [`ClusterAudit`]).
    pub audit: ClusterAudit,
}

/// The audits of every listed replica, fresh or stale (a disagreement does
/// not go away because the replica that found it stopped). Replicas audit
/// the same log and ledgers, so they find the same problems: the count is
/// the largest any replica found, the list their union.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ClusterAudit {
    /// The most recent pass of any replica, ms since the epoch (0: none).
    pub last_run_ms: i64,
    pub problems: u64,
    /// At most [`AUDIT_PROBLEMS_LISTED_MAX`], said plainly.
    pub listed: Vec<String>,
    /// Replicas whose last pass could not finish: `(address, why)`.
    pub errors: Vec<(String, String)>,
}

fn merge_audits(replicas: &[ReplicaView]) -> ClusterAudit {
    let mut out = ClusterAudit::default();
    for r in replicas {
        let Some(a) = &r.report.audit else { continue };
        out.last_run_ms = out.last_run_ms.max(a.last_run_ms);
        out.problems = out.problems.max(a.problems);
        for text in &a.listed {
            if out.listed.len() < AUDIT_PROBLEMS_LISTED_MAX && !out.listed.contains(text) {
                out.listed.push(text.clone());
            }
        }
        if let Some(e) = &a.error
            && r.fresh
        {
            out.errors.push((r.address.clone(), e.clone()));
        }
    }
    out
}

/// Merges `own` (this replica now) with the store's `rows` (its own row is
/// replaced by `own`), as of `now_secs`.
pub fn merge(own: ReplicaView, rows: Vec<ReplicaRow>, now_secs: i64) -> ClusterView {
    let mut replicas = vec![own];
    for row in rows {
        if row.beat.boot_id == replicas[0].boot_id {
            continue;
        }
        let report = serde_json::from_str(&row.beat.report).unwrap_or_else(|e| {
            tracing::debug!(error = %e, boot_id = %row.beat.boot_id, "unreadable heartbeat report");
            Report::default()
        });
        replicas.push(ReplicaView {
            boot_id: row.beat.boot_id,
            address: row.beat.address,
            admin_address: row.beat.admin_address,
            started_at_ms: row.beat.started_at_ms,
            age_ms: row.age_ms,
            fresh: row.age_ms <= REPLICA_FRESH_MAX_MS,
            this: false,
            report,
        });
    }
    let fresh: Vec<&ReplicaView> = replicas.iter().filter(|r| r.fresh).collect();
    let samples = merge_samples(fresh.iter().map(|r| r.report.samples.as_slice()), now_secs);
    let undelivered = fresh.iter().map(|r| r.report.undelivered).sum();
    let conflicts = replicas.iter().map(|r| r.report.conflicts).sum();
    let storage_failures = fresh
        .iter()
        .filter(|r| r.report.storage_failures > 0)
        .map(|r| (r.address.clone(), r.report.storage_failures))
        .collect();
    let mut banks: BTreeMap<(String, String), BankView> = BTreeMap::new();
    for seen in fresh.iter().flat_map(|r| r.report.banks.iter()) {
        let entry = banks.entry((seen.name.clone(), seen.address.clone())).or_insert_with(|| BankView {
            name: seen.name.clone(),
            address: seen.address.clone(),
            reachable: false,
            last_seen_ms: None,
        });
        entry.reachable |= seen.reachable;
        entry.last_seen_ms = match (entry.last_seen_ms, seen.last_seen_ms) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
    }
    let audit = merge_audits(&replicas);
    ClusterView {
        audit,
        replicas,
        samples,
        undelivered,
        conflicts,
        storage_failures,
        banks: banks.into_values().collect(),
    }
}

/// Every replica's samples as one series: each second from the oldest
/// sample (at most [`live::SAMPLES_MAX`] ago) to the last complete one.
fn merge_samples<'a>(
    series: impl Iterator<Item = &'a [(i64, u64, u64, u64, u64)]>,
    now_secs: i64,
) -> Vec<Sample> {
    let first = now_secs - live::SAMPLES_MAX as i64;
    // second -> (committed, declined, Σ p50 × payments, max p99)
    let mut seconds: BTreeMap<i64, (u64, u64, u128, u64)> = BTreeMap::new();
    for &(at, committed, declined, p50, p99) in series.flatten() {
        if at < first || at >= now_secs {
            continue;
        }
        let s = seconds.entry(at).or_default();
        s.0 += committed;
        s.1 += declined;
        s.2 += u128::from(p50) * u128::from(committed + declined);
        s.3 = s.3.max(p99);
    }
    let Some(&oldest) = seconds.keys().next() else { return Vec::new() };
    (oldest..now_secs)
        .map(|at| {
            let (committed, declined, weighted, p99) = seconds.get(&at).copied().unwrap_or_default();
            let n = u128::from(committed + declined);
            let p50_micros = weighted.checked_div(n).map_or(0, |p| u64::try_from(p).unwrap_or(u64::MAX));
            Sample { at_secs: at, committed, declined, p50_micros, p99_micros: p99 }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(boot: &str, age_ms: i64, report: Report) -> ReplicaView {
        ReplicaView {
            boot_id: boot.into(),
            address: format!("{boot}:1"),
            admin_address: String::new(),
            started_at_ms: 0,
            age_ms,
            fresh: age_ms <= REPLICA_FRESH_MAX_MS,
            this: age_ms == 0,
            report,
        }
    }

    fn row(v: &ReplicaView) -> ReplicaRow {
        ReplicaRow {
            beat: Heartbeat {
                boot_id: v.boot_id.clone(),
                address: v.address.clone(),
                admin_address: String::new(),
                started_at_ms: 0,
                report: serde_json::to_string(&v.report).expect("json"),
            },
            age_ms: v.age_ms,
        }
    }

    fn bank(address: &str, reachable: bool, last_seen_ms: u64) -> BankSeen {
        BankSeen {
            name: "BankA".into(),
            address: address.into(),
            reachable,
            last_seen_ms: Some(last_seen_ms),
        }
    }

    #[test]
    fn fresh_replicas_add_up_and_stale_ones_are_listed_but_not_summed() {
        let a = Report {
            samples: vec![(100, 10, 1, 1_000, 5_000), (101, 2, 0, 2_000, 2_000)],
            undelivered: 1,
            conflicts: 0,
            banks: vec![bank("b1", false, 900), bank("b2", false, 5_000)],
            ..Report::default()
        };
        let b = Report {
            samples: vec![(100, 30, 0, 3_000, 4_000)],
            undelivered: 2,
            storage_failures: 3,
            banks: vec![bank("b1", true, 200), bank("b2", false, 4_000)],
            ..Report::default()
        };
        let stale = Report {
            samples: vec![(100, 1_000, 0, 9, 9)],
            undelivered: 50,
            conflicts: 1,
            banks: vec![bank("b2", true, 1)],
            ..Report::default()
        };
        let own = view("a", 0, a);
        let others = [view("b", 900, b), view("c", REPLICA_FRESH_MAX_MS + 1, stale)];
        let rows: Vec<ReplicaRow> = std::iter::once(row(&own)).chain(others.iter().map(row)).collect();
        let m = merge(own, rows, 103);
        assert_eq!(m.replicas.len(), 3, "its own row is not listed twice");
        assert!(m.replicas[0].this && m.replicas[1].fresh && !m.replicas[2].fresh);
        assert_eq!(m.samples.len(), 3, "100, 101, and an empty 102");
        let s = m.samples[0];
        assert_eq!(
            (s.at_secs, s.committed, s.declined),
            (100, 40, 1),
            "the stale replica's second is left out"
        );
        // p50: (1000 × 11 + 3000 × 30) / 41; p99: the largest.
        assert_eq!((s.p50_micros, s.p99_micros), (2_463, 5_000));
        assert_eq!((m.samples[2].at_secs, m.samples[2].committed), (102, 0));
        assert_eq!(m.undelivered, 3);
        assert_eq!(m.conflicts, 1, "a conflict stays counted while its replica is listed");
        assert_eq!(m.storage_failures, vec![("b:1".to_owned(), 3)]);
        let b1 = m.banks.iter().find(|b| b.address == "b1").expect("b1");
        assert!(b1.reachable, "one fresh replica reaches it");
        assert_eq!(b1.last_seen_ms, Some(200));
        let b2 = m.banks.iter().find(|b| b.address == "b2").expect("b2");
        assert!(!b2.reachable, "every fresh replica says unreachable (the stale one does not count)");
    }
}
