//! The audit's rules, and the gateway's background audit (issue 13).
//!
//! [`disagreements`] and [`unknown_leg`] say what disagrees between the
//! gateway's log and a bank's leg; `strife audit` (the operator's full
//! audit) and the gateway's passes both use them.
//!
//! Each gateway replica runs a pass every `admin.audit_interval_secs`
//! ([`run_audits`]; 0: never). Every replica runs its own passes (no claim
//! in the store): a pass is incremental and reads only what finished since
//! the last, so N replicas cost N small reads, and each replica's heartbeat
//! carries its own result, so every dashboard shows every replica's.
//!
//! A pass reads the log after its watermark, in transaction-id order (UUID
//! v7: time order), up to the payments begun [`margin`] ago, and each bank's
//! legs over the same range through the bank's `Audit` RPC (at the first
//! replica this gateway reaches), merged as `strife audit` merges them, a
//! page at a time: its memory is a page per bank, whatever the ledgers'
//! size. Only *finished* payments are checked (decided and acknowledged by
//! every bank: their legs are final, and the bank is read after the log),
//! so a payment in flight is never a problem. The margin (payment deadline +
//! commit timeout + 10 s) means every payment of the range was written long
//! before the pass, so a leg the log lacks is truly unknown to it. The
//! watermark stops before the first payment not finished yet, so it is
//! checked by a later pass; one still unfinished an hour after it began is
//! passed by (its undelivered decision has its own alarm) and logged.
//!
//! The first pass of a process covers the last day (at most the retention
//! less an hour, so that no pruned payment's legs look unknown); problems
//! found are kept for the life of the process, each counted once.

use crate::backend::GatewayStore;
use crate::cluster::{AUDIT_PROBLEMS_LISTED_MAX, AuditSummary};
use crate::coordinator::Gateway;
use crate::registry::ReplicaHealth;
use crate::store::{PaymentRecord, PaymentState};
use std::collections::{HashSet, VecDeque};
use std::sync::Arc;
use std::time::Duration;
use strife_proto::bank::v1 as bank;
use strife_rpc::metrics;
use strife_twopc::participant::LegState;
use tokio::sync::watch;

/// Legs and payments read at a time.
pub const AUDIT_PAGE_ROWS: u32 = if cfg!(debug_assertions) { 16 } else { 1_000 };
/// What the margin adds to a payment's deadline and commit timeout.
const AUDIT_MARGIN_SLACK: Duration = Duration::from_secs(10);
/// What a process's first pass covers.
const AUDIT_FIRST_WINDOW: Duration = Duration::from_secs(24 * 3600);
/// A payment still unfinished this long after it began no longer holds the
/// watermark back.
const AUDIT_LAG_MAX: Duration = Duration::from_secs(3600);
/// Problems remembered (so that one found again counts once); more are
/// counted each time they are found.
const PROBLEM_KEYS_MAX: usize = 10_000;
/// Longest wait for one page of a bank's ledger.
pub const AUDIT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest `Audit` answer read: a page of at most 10,000 legs is ~2.5 MB.
pub const AUDIT_MESSAGE_MAX_BYTES: usize = 16 * 1024 * 1024;

/// A leg as the audit compares it: its bank, state and amount.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LegSeen<'a> {
    pub bank: &'a str,
    pub state: LegState,
    pub amount_minor: i64,
}

fn state_name(state: Option<LegState>) -> &'static str {
    match state {
        Some(LegState::Prepared) => "prepared",
        Some(LegState::Committed) => "committed",
        Some(LegState::Aborted) => "aborted",
        None => "unknown",
    }
}

/// A leg state as a bank's `Audit` answer names it.
pub fn parse_leg_state(text: &str) -> Option<LegState> {
    match text {
        "prepared" => Some(LegState::Prepared),
        "committed" => Some(LegState::Committed),
        "aborted" => Some(LegState::Aborted),
        _ => None,
    }
}

/// What disagrees between a decided payment `p` and the legs its banks hold
/// (`legs`: those found, any bank): a committed payment must be committed at
/// every bank it involves, for its amount; an aborted one committed at none.
/// Nothing for a payment still `preparing` (the caller decides what that is).
pub fn disagreements(p: &PaymentRecord, legs: &[LegSeen<'_>]) -> Vec<String> {
    let mut out = Vec::new();
    for bank in strife_core::banks_involved(&p.payer, &p.payee) {
        let leg = legs.iter().find(|l| l.bank == bank);
        let state = leg.map(|l| l.state);
        match p.state {
            PaymentState::Preparing => {}
            PaymentState::Committed if state != Some(LegState::Committed) => out.push(format!(
                "payment {} is committed at the gateway but {} at {bank}",
                p.payment_id,
                state_name(state)
            )),
            PaymentState::Committed => {}
            PaymentState::Aborted if state == Some(LegState::Committed) => out
                .push(format!("payment {} is aborted at the gateway but committed at {bank}", p.payment_id)),
            PaymentState::Aborted => {}
        }
        if let Some(leg) = leg
            && leg.state == LegState::Committed
            && leg.amount_minor != p.amount_minor
        {
            out.push(format!(
                "payment {} is for {} at the gateway but {} moved at {bank}",
                p.payment_id,
                strife_core::money::format_minor(p.amount_minor),
                strife_core::money::format_minor(leg.amount_minor)
            ));
        }
    }
    out
}

/// What is wrong with a leg whose payment the gateway has no record of:
/// money moved for it (a hold is the caller's business).
pub fn unknown_leg(bank: &str, payment_id: &str, state: LegState) -> Option<String> {
    (state == LegState::Committed)
        .then(|| format!("payment {payment_id} is committed at {bank} but unknown to the gateway"))
}

/// A bank's `Audit` client.
pub type BankClient = bank::bank_service_client::BankServiceClient<tonic::transport::Channel>;

/// One page of a bank's ledger: its legs after `after` in transaction-id
/// order (at most `page_size`) and its totals, from its `Audit` RPC.
pub async fn ledger_page(
    client: &mut BankClient,
    after: Option<&str>,
    page_size: u32,
) -> anyhow::Result<bank::AuditResponse> {
    use anyhow::Context;
    let req = bank::AuditRequest { after_txn_id: after.unwrap_or_default().to_owned(), page_size };
    Ok(tokio::time::timeout(AUDIT_CALL_TIMEOUT, client.audit(req))
        .await
        .context("no answer in time")?
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner())
}

/// The lowest transaction id a payment begun at `ms` can have: transaction
/// ids are UUID v7, whose first 48 bits are the time in ms, so ids sort by
/// time and this bound sorts below every id of that millisecond and above
/// every earlier one.
pub fn txn_bound(ms: i64) -> String {
    let ms = u64::try_from(ms).unwrap_or(0).min((1 << 48) - 1);
    format!("{:08x}-{:04x}-0000-0000-000000000000", ms >> 16, ms & 0xffff)
}

/// How old a payment must be to be audited: its deadline, its commit
/// timeout, and a slack.
pub fn margin(config: &strife_rpc::config::GatewayConfig) -> Duration {
    Duration::from_millis(config.payment_deadline_ms) + config.commit_timeout() + AUDIT_MARGIN_SLACK
}

fn millis(d: Duration) -> i64 {
    i64::try_from(d.as_millis()).unwrap_or(i64::MAX)
}

/// One bank's legs after the watermark, a page at a time.
struct BankLegs {
    name: String,
    client: BankClient,
    page: VecDeque<bank::LedgerEntry>,
    last: Option<String>,
    done: bool,
}

impl BankLegs {
    async fn peek(&mut self) -> anyhow::Result<Option<&bank::LedgerEntry>> {
        if self.page.is_empty() && !self.done {
            let legs = ledger_page(&mut self.client, self.last.as_deref(), AUDIT_PAGE_ROWS).await?.legs;
            self.done = legs.len() < AUDIT_PAGE_ROWS as usize;
            if let Some(last) = legs.last() {
                self.last = Some(last.txn_id.clone());
            }
            self.page.extend(legs);
        }
        Ok(self.page.front())
    }

    /// The next leg if its transaction id sorts before `txn_id`.
    async fn next_before(&mut self, txn_id: &str) -> anyhow::Result<Option<bank::LedgerEntry>> {
        Ok(match self.peek().await? {
            Some(leg) if leg.txn_id.as_str() < txn_id => self.page.pop_front(),
            _ => None,
        })
    }

    /// The next leg if it is `txn_id`'s.
    async fn next_if(&mut self, txn_id: &str) -> anyhow::Result<Option<bank::LedgerEntry>> {
        Ok(match self.peek().await? {
            Some(leg) if leg.txn_id == txn_id => self.page.pop_front(),
            _ => None,
        })
    }
}

/// A replica's audit: where the next pass starts, and what was found.
pub struct Auditor {
    /// Every payment (and leg) at or below this transaction id is audited.
    watermark: String,
    /// The problems found, by payment and bank, each counted once.
    seen: HashSet<String>,
    /// Unfinished payments passed by, each logged once.
    passed_by: HashSet<String>,
    summary: AuditSummary,
}

impl Auditor {
    /// An auditor whose first pass starts with the payments begun at `from_ms`.
    pub fn new(from_ms: i64) -> Auditor {
        Auditor {
            watermark: txn_bound(from_ms),
            seen: HashSet::new(),
            passed_by: HashSet::new(),
            summary: AuditSummary::default(),
        }
    }

    /// What the passes found so far.
    pub fn summary(&self) -> &AuditSummary {
        &self.summary
    }

    /// Runs one pass at `now_ms`; keeps its result in the summary.
    pub async fn pass<S: GatewayStore>(&mut self, gateway: &Gateway<S>, now_ms: i64) {
        match self.try_pass(gateway, now_ms).await {
            Ok(checked) => {
                self.summary.checked_last_run = checked;
                self.summary.checked_total += checked;
                self.summary.error = None;
                metrics::GATEWAY.audit_checked.inc_by(checked);
            }
            Err(e) => {
                let text = format!("{e:#}");
                if self.summary.error.as_deref() != Some(text.as_str()) {
                    tracing::warn!(error = %text, "an audit pass could not finish; the next one tries again");
                }
                self.summary.error = Some(text);
            }
        }
        self.summary.last_run_ms = now_ms;
        metrics::GATEWAY.audit_last_run_seconds.set(now_ms / 1000);
        metrics::GATEWAY.audit_problems.set(i64::try_from(self.summary.problems).unwrap_or(i64::MAX));
    }

    fn problem(&mut self, key: String, text: String) {
        if self.seen.contains(&key) {
            return;
        }
        if self.seen.len() < PROBLEM_KEYS_MAX {
            self.seen.insert(key);
        }
        tracing::error!(target: "strife::audit", problem = %text, "audit: the gateway's decision and a bank disagree");
        self.summary.problems += 1;
        if self.summary.listed.len() < AUDIT_PROBLEMS_LISTED_MAX {
            self.summary.listed.push(text);
        }
    }

    fn unknown(&mut self, bank: &str, leg: &bank::LedgerEntry) {
        if let Some(text) = parse_leg_state(&leg.state).and_then(|s| unknown_leg(bank, &leg.payment_id, s)) {
            self.problem(format!("{}/{bank}", leg.txn_id), text);
        }
    }

    /// The pass itself; returns how many finished payments it checked.
    async fn try_pass<S: GatewayStore>(&mut self, gateway: &Gateway<S>, now_ms: i64) -> anyhow::Result<u64> {
        let upper = txn_bound(now_ms - millis(margin(&gateway.config)));
        if upper <= self.watermark {
            return Ok(0);
        }
        let mut banks = reachable_banks(gateway.registry.health(), &self.watermark)?;
        let stuck_before = now_ms - millis(AUDIT_LAG_MAX);
        let (mut after, mut checked) = (self.watermark.clone(), 0u64);
        // The last payment before the first one still unfinished.
        let mut held_at: Option<String> = None;
        'log: loop {
            let page = gateway.store.payments_after(Some(after.clone()), AUDIT_PAGE_ROWS).await?;
            let full = page.len() == AUDIT_PAGE_ROWS as usize;
            for p in page {
                if p.txn_id >= upper {
                    break 'log;
                }
                let mut legs = Vec::new();
                for b in &mut banks {
                    while let Some(leg) = b.next_before(&p.txn_id).await? {
                        let name = b.name.clone();
                        self.unknown(&name, &leg);
                    }
                    if let Some(leg) = b.next_if(&p.txn_id).await? {
                        legs.push((b.name.clone(), leg));
                    }
                }
                let finished = p.state != PaymentState::Preparing && p.acked;
                if finished {
                    checked += 1;
                    let seen: Vec<LegSeen<'_>> = legs
                        .iter()
                        .filter_map(|(bank, leg)| {
                            Some(LegSeen {
                                bank,
                                state: parse_leg_state(&leg.state)?,
                                amount_minor: leg.amount_minor,
                            })
                        })
                        .collect();
                    for (i, text) in disagreements(&p, &seen).into_iter().enumerate() {
                        self.problem(format!("{}/{i}", p.txn_id), text);
                    }
                } else if p.created_at_ms < stuck_before {
                    if self.passed_by.len() < PROBLEM_KEYS_MAX && self.passed_by.insert(p.txn_id.clone()) {
                        tracing::warn!(txn_id = %p.txn_id, payment_id = %p.payment_id,
                            "a payment is still not finished an hour after it began; the audit passes it by");
                    }
                } else if held_at.is_none() {
                    held_at = Some(after.clone());
                }
                after = p.txn_id;
            }
            if !full {
                break;
            }
        }
        for b in &mut banks {
            while let Some(leg) = b.next_before(&upper).await? {
                let name = b.name.clone();
                self.unknown(&name, &leg);
            }
        }
        self.watermark = held_at.unwrap_or(upper);
        Ok(checked)
    }
}

/// One reader per bank, at its first replica this gateway reaches; a bank
/// it reaches at no replica fails the pass (it is tried again next time).
fn reachable_banks(replicas: Vec<ReplicaHealth>, after: &str) -> anyhow::Result<Vec<BankLegs>> {
    let mut banks: Vec<BankLegs> = Vec::new();
    let mut unreachable: Vec<String> = Vec::new();
    for r in replicas {
        if banks.iter().any(|b| b.name == r.name) {
            continue;
        }
        if !r.reachable {
            if !unreachable.contains(&r.name) {
                unreachable.push(r.name);
            }
            continue;
        }
        unreachable.retain(|n| *n != r.name);
        banks.push(BankLegs {
            name: r.name,
            client: r.client.max_decoding_message_size(AUDIT_MESSAGE_MAX_BYTES),
            page: VecDeque::new(),
            last: Some(after.to_owned()),
            done: false,
        });
    }
    if !unreachable.is_empty() {
        anyhow::bail!("cannot read the ledger of {}: no replica reachable", unreachable.join(", "));
    }
    Ok(banks)
}

/// Runs an audit pass every `interval` until `stop`, keeping each result
/// on the gateway (its heartbeat carries it to every dashboard).
pub async fn run_audits<S: GatewayStore>(
    gateway: Arc<Gateway<S>>,
    interval: Duration,
    mut stop: watch::Receiver<bool>,
) {
    let retention = Duration::from_secs(gateway.config.retention_days.saturating_mul(86_400));
    let window = AUDIT_FIRST_WINDOW.min(retention.saturating_sub(AUDIT_LAG_MAX));
    let mut auditor = Auditor::new(strife_core::unix_ms() - millis(window));
    loop {
        tokio::select! {
            _ = tokio::time::sleep(interval) => {}
            _ = stop.changed() => return,
        }
        let pass = auditor.pass(&gateway, strife_core::unix_ms());
        tokio::select! {
            _ = pass => {}
            _ = stop.changed() => return,
        }
        gateway.set_audit_summary(auditor.summary().clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use strife_core::UserRef;

    fn payment(state: PaymentState, payer: &str, payee: &str) -> PaymentRecord {
        PaymentRecord {
            txn_id: "t".into(),
            payment_id: "p1".into(),
            payer: payer.parse::<UserRef>().expect("payer"),
            payee: payee.parse::<UserRef>().expect("payee"),
            amount_minor: 500,
            state,
            reason: None,
            acked: true,
            created_at_ms: 0,
            deadline_at_ms: 0,
            fingerprint: Vec::new(),
            one_phase: false,
        }
    }

    fn leg(bank: &str, state: LegState, amount_minor: i64) -> LegSeen<'_> {
        LegSeen { bank, state, amount_minor }
    }

    #[test]
    fn a_decision_and_its_legs_agree_or_say_what_differs() {
        let committed = payment(PaymentState::Committed, "a@BankA", "b@BankB");
        let both = [leg("BankA", LegState::Committed, 500), leg("BankB", LegState::Committed, 500)];
        assert!(disagreements(&committed, &both).is_empty());
        let one = [leg("BankA", LegState::Committed, 500), leg("BankB", LegState::Aborted, 500)];
        assert_eq!(
            disagreements(&committed, &one),
            ["payment p1 is committed at the gateway but aborted at BankB"]
        );
        assert_eq!(
            disagreements(&committed, &one[..1]),
            ["payment p1 is committed at the gateway but unknown at BankB"]
        );
        let more = [leg("BankA", LegState::Committed, 500), leg("BankB", LegState::Committed, 900)];
        assert_eq!(
            disagreements(&committed, &more),
            ["payment p1 is for 5.00 at the gateway but 9.00 moved at BankB"]
        );
        let aborted = payment(PaymentState::Aborted, "a@BankA", "b@BankA");
        assert!(disagreements(&aborted, &[leg("BankA", LegState::Aborted, 0)]).is_empty());
        assert!(disagreements(&aborted, &[]).is_empty(), "an abort needs no leg");
        assert_eq!(
            disagreements(&aborted, &[leg("BankA", LegState::Committed, 500)]),
            ["payment p1 is aborted at the gateway but committed at BankA"]
        );
        assert!(unknown_leg("BankB", "x", LegState::Aborted).is_none());
        assert!(unknown_leg("BankB", "x", LegState::Committed).is_some());
    }

    #[test]
    fn the_bound_sorts_between_milliseconds_as_v7_ids_do() {
        let at = 1_700_000_000_123_i64;
        let bound = txn_bound(at);
        assert!(bound.parse::<strife_core::PaymentId>().is_ok(), "{bound}");
        let ts =
            uuid::Timestamp::from_unix(uuid::NoContext, (at / 1000) as u64, ((at % 1000) * 1_000_000) as u32);
        let id = uuid::Uuid::new_v7(ts).to_string();
        assert!(txn_bound(at) < id && id < txn_bound(at + 1), "{bound} {id}");
        assert!(txn_bound(at - 1) < txn_bound(at));
    }
}
