//! The gateway's state and the coordinator side of two-phase commit.
//!
//! Presumed abort: a payment is `preparing` until every bank involved voted;
//! the decision is forced to disk before any bank hears it; no decision on
//! record means abort. One customer's payment id runs at most once: copies
//! that arrive while it runs wait for its outcome (the in-flight map), and
//! copies that arrive later read it from the store.
//!
//! A payment within one bank that serves transfers runs in one phase
//! (`strife_twopc::coordinator::OnePhase`): the record is forced, one
//! `Transfer` goes to the bank, which decides, and its decision is recorded
//! lazily. Such a payment is never decided here: when its outcome is
//! unknown, the bank is asked (`ResolveTransfer`, which fences a transfer
//! the bank never saw).

use crate::backend::GatewayStore;
use crate::error::GatewayError;
use crate::registry::{BankEntry, Registry};
use crate::store::{PaymentEvent, PaymentRecord, PaymentState, now_ms};
use crate::tokens::{TokenKeys, load_keys};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, RwLock};
use std::time::Duration;
use strife_core::{Amount, DeclineReason, PaymentId, UserRef, banks_involved};
use strife_proto::bank::v1 as bank;
use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::config::GatewayConfig;
use strife_rpc::metrics;
use strife_rpc::trace::TraceContext;
use strife_twopc::coordinator as machine;
use strife_twopc::{Decision, Vote};
use tokio::sync::{Notify, watch};
use tracing::Instrument;

/// Most payments the finisher re-sends decisions for in one pass.
const FINISH_BATCH_MAX: u32 = 256;
/// How often the finisher looks for unacknowledged decisions anyway.
const FINISH_INTERVAL: Duration = Duration::from_secs(1);
/// How often old payments are pruned.
const PRUNE_INTERVAL: Duration = Duration::from_secs(3600);
/// Longest a copy of a payment id waits for another replica's decision.
const REPLAY_WAIT_MAX: Duration = Duration::from_secs(10);
/// First and longest pause between two looks at that decision.
const REPLAY_POLL_FIRST: Duration = Duration::from_millis(5);
const REPLAY_POLL_MAX: Duration = Duration::from_millis(100);
/// Most payments in flight at once; more wait for a slot.
pub const PAYMENTS_IN_FLIGHT_MAX: usize = 4096;

/// A customer's request to pay, validated.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PayRequest {
    pub payment_id: PaymentId,
    pub payer: UserRef,
    pub payee: UserRef,
    pub amount: Amount,
}

impl PayRequest {
    /// SHA-256 of the canonical encoding of what the customer asked for.
    pub fn fingerprint(&self) -> Vec<u8> {
        let canonical = format!("strife.pay.v1\n{}\n{}\n{}", self.payer, self.payee, self.amount.minor());
        ring::digest::digest(&ring::digest::SHA256, canonical.as_bytes()).as_ref().to_vec()
    }

    /// Names the fields in which `record` differs from this request.
    fn differences(&self, payee: &UserRef, amount_minor: i64) -> Vec<&'static str> {
        let mut out = Vec::new();
        if *payee != self.payee {
            out.push("payee");
        }
        if amount_minor != self.amount.minor() {
            out.push("amount");
        }
        out
    }
}

/// What the customer is told about a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    Committed,
    Declined(DeclineReason),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PayOutcome {
    pub outcome: Outcome,
    /// True when the answer comes from an earlier attempt with the same id.
    pub replayed: bool,
}

type OutcomeCell = watch::Receiver<Option<Result<PayOutcome, tonic::Status>>>;

struct InFlight {
    request: PayRequest,
    outcome: OutcomeCell,
}

pub struct Gateway<S> {
    /// The gateway's store (SQLite, or PostgreSQL shared by replicas).
    pub store: S,
    pub registry: Registry,
    /// The keys that sign and verify tokens; replaced when they change.
    tokens: RwLock<Arc<TokenKeys>>,
    /// Where this gateway's token key file is.
    key_dir: PathBuf,
    pub config: GatewayConfig,
    /// Changes at every start; banks re-register when it changes.
    pub boot_id: String,
    /// The store's cluster id ([`GatewayStore::cluster_id`]), told to banks:
    /// the same at every gateway on this payment log.
    pub cluster_id: String,
    /// Payments being executed now, by (payer, payment id).
    in_flight: Mutex<HashMap<(UserRef, PaymentId), InFlight>>,
    /// Bounds how many payments run at once.
    slots: tokio::sync::Semaphore,
    /// Wakes the finisher when a decision could not be delivered.
    finisher_wake: Notify,
    /// Thresholds of failed logins (the counts are in the store).
    pub throttle: crate::throttle::Policy,
    /// What this replica's audit passes found ([`crate::audit`]); `None`
    /// before the first pass, or with audits off.
    audit: Mutex<Option<crate::cluster::AuditSummary>>,
}

fn lock<T>(m: &Mutex<T>) -> Result<std::sync::MutexGuard<'_, T>, GatewayError> {
    m.lock().map_err(|_| GatewayError::Internal("lock poisoned".into()))
}

impl<S: GatewayStore> Gateway<S> {
    pub fn new(
        store: S,
        registry: Registry,
        tokens: TokenKeys,
        key_dir: PathBuf,
        config: GatewayConfig,
        cluster_id: String,
    ) -> Gateway<S> {
        Gateway {
            store,
            registry,
            tokens: RwLock::new(Arc::new(tokens)),
            key_dir,
            boot_id: uuid::Uuid::new_v4().to_string(),
            cluster_id,
            in_flight: Mutex::new(HashMap::new()),
            slots: tokio::sync::Semaphore::new(PAYMENTS_IN_FLIGHT_MAX),
            finisher_wake: Notify::new(),
            throttle: crate::throttle::Policy {
                account_failures_max: config.login_failures_max,
                peer_failures_max: config.login_peer_failures_max,
                lock: Duration::from_secs(config.login_lock_secs),
            },
            audit: Mutex::new(None),
            config,
        }
    }

    /// What this replica's audit passes found, if any ran.
    pub fn audit_summary(&self) -> Option<crate::cluster::AuditSummary> {
        self.audit.lock().map(|a| a.clone()).unwrap_or_else(|p| p.into_inner().clone())
    }

    /// Keeps the result of an audit pass.
    pub fn set_audit_summary(&self, summary: crate::cluster::AuditSummary) {
        match self.audit.lock() {
            Ok(mut slot) => *slot = Some(summary),
            Err(p) => *p.into_inner() = Some(summary),
        }
    }

    /// The token keys in use now.
    pub fn tokens(&self) -> Arc<TokenKeys> {
        match self.tokens.read() {
            Ok(keys) => keys.clone(),
            Err(poisoned) => poisoned.into_inner().clone(),
        }
    }

    /// Reads the key file again and takes the keys the store says every
    /// replica uses: a key rotated into the file (`strife rotate-key`) or
    /// into another replica's store signs here within one finisher pass.
    async fn refresh_keys(&self) -> Result<(), GatewayError> {
        let from_file = load_keys(&self.key_dir).map_err(|e| GatewayError::Internal(format!("{e:#}")))?;
        let keys = self.store.token_keys(from_file).await?;
        let current = self.tokens();
        if current.key_ids() != keys.iter().map(|(kid, _)| kid.as_str()).collect::<Vec<_>>() {
            let fresh = TokenKeys::with_keys(&keys, current.ttl_secs)
                .map_err(|e| GatewayError::Internal(format!("{e:#}")))?;
            tracing::info!(signing_key = %keys[0].0, keys = keys.len(), "token keys changed");
            let mut slot =
                self.tokens.write().map_err(|_| GatewayError::Internal("key lock poisoned".into()))?;
            *slot = Arc::new(fresh);
        }
        Ok(())
    }

    pub fn bank(&self, name: &str) -> Option<BankEntry> {
        self.registry.get(name)
    }

    /// The registry entries of every bank a payment involves; `None` if any
    /// of them is unknown.
    fn entries(&self, payer: &UserRef, payee: &UserRef) -> Option<Vec<(String, BankEntry)>> {
        banks_involved(payer, payee).into_iter().map(|n| self.bank(n).map(|e| (n.to_owned(), e))).collect()
    }

    /// Pays, exactly once per (payer, payment id). `trace` is the trace of
    /// the call (the customer's, or one the call started): the payment runs
    /// in a `payment` span inside it and its legs carry it to the banks.
    pub async fn pay(
        self: &Arc<Self>,
        req: PayRequest,
        trace: TraceContext,
    ) -> Result<PayOutcome, tonic::Status> {
        let key = (req.payer.clone(), req.payment_id);
        let (cell, first) = {
            let mut map = lock(&self.in_flight).map_err(tonic::Status::from)?;
            match map.get(&key) {
                Some(running) => {
                    let diff = req.differences(&running.request.payee, running.request.amount.minor());
                    if !diff.is_empty() {
                        return Err(id_reused(&req.payment_id, diff).into());
                    }
                    (running.outcome.clone(), false)
                }
                None => {
                    let (tx, rx) = watch::channel(None);
                    map.insert(key.clone(), InFlight { request: req.clone(), outcome: rx.clone() });
                    let gw = self.clone();
                    // A child of the call's span: its lines carry the trace id.
                    let span = tracing::info_span!("payment", payment_id = %req.payment_id);
                    // The payment runs in its own task so that a client that
                    // hangs up cannot stop it half-way. `drain` waits for it.
                    tokio::spawn(
                        async move {
                            let result = gw.execute(req, trace).await.map_err(tonic::Status::from);
                            let _ = tx.send(Some(result));
                            if let Ok(mut map) = gw.in_flight.lock() {
                                map.remove(&key);
                            }
                        }
                        .instrument(span),
                    );
                    (rx, true)
                }
            }
        };
        let outcome = wait_outcome(cell).await?;
        Ok(if first { outcome } else { PayOutcome { replayed: true, ..outcome } })
    }

    async fn execute(
        self: &Arc<Self>,
        req: PayRequest,
        trace: TraceContext,
    ) -> Result<PayOutcome, GatewayError> {
        let _slot = self.slots.acquire().await.map_err(|_| {
            GatewayError::unavailable(ErrorReason::Unavailable, "the gateway is shutting down")
        })?;
        let _in_flight = InFlightGauge::enter();
        let started = std::time::Instant::now();
        let now = now_ms();
        let deadline_ms = i64::try_from(self.config.payment_deadline_ms).unwrap_or(i64::MAX);
        // One phase when payer and payee are at one bank that serves
        // transfers (chosen now, and written with the payment).
        let one_bank = (req.payer.bank == req.payee.bank).then(|| self.bank(&req.payer.bank)).flatten();
        let protocol = machine::protocol_for(
            banks_involved(&req.payer, &req.payee).len(),
            one_bank.as_ref().is_some_and(BankEntry::serves_transfers),
        );
        let one_phase = protocol == machine::Protocol::OnePhase;
        let record = PaymentRecord {
            // Time-ordered (v7): the stores append to their indexes instead of
            // writing all over them, which keeps large ledgers fast.
            txn_id: uuid::Uuid::now_v7().to_string(),
            payment_id: req.payment_id.to_string(),
            payer: req.payer.clone(),
            payee: req.payee.clone(),
            amount_minor: req.amount.minor(),
            state: PaymentState::Preparing,
            reason: None,
            acked: false,
            created_at_ms: now,
            deadline_at_ms: now.saturating_add(deadline_ms),
            fingerprint: req.fingerprint(),
            one_phase,
        };
        // The `preparing` record need not be durable before the prepares go
        // out: if a crash loses it, no record means abort, the banks learn
        // that by inquiry, and the customer (never answered) retries. It is
        // durable before the decision, which is written in a later batch.
        // A one-phase record is durable before the transfer goes out (the
        // store forces it): the bank may commit at once.
        if let Err(existing) = self.store.begin_payment(record.clone()).await? {
            return self.replay(&req, existing).await;
        }
        let txn_id = record.txn_id.clone();
        strife_rpc::fault::crash_point("gateway.after_begin");
        if let Some(bank) = one_bank.filter(|_| one_phase) {
            return self.execute_one_phase(&req, &record, bank, &trace, started).await;
        }

        if self.bank(&req.payee.bank).is_none() {
            return self.decline_unsent(&txn_id, DeclineReason::UnknownBank).await;
        }
        let Some(banks) = self.entries(&req.payer, &req.payee) else {
            return self.decline_unsent(&txn_id, DeclineReason::BankUnavailable).await;
        };

        // Phase one: every bank votes; a refusal, an error or silence is no.
        let prepare = bank::PrepareRequest {
            txn_id: txn_id.clone(),
            payment_id: record.payment_id.clone(),
            payer: Some(bank::Party { user: req.payer.user.clone(), bank: req.payer.bank.clone() }),
            payee: Some(bank::Party { user: req.payee.user.clone(), bank: req.payee.bank.clone() }),
            amount_minor: req.amount.minor(),
            traceparent: strife_rpc::telemetry::outgoing(&trace).header(),
        };
        let timeout = self.config.prepare_timeout();
        let timed_votes = on_each_bank(&banks, |name, entry| {
            let req = prepare.clone();
            async move {
                let vote = match tokio::time::timeout(timeout, entry.prepare(req)).await {
                    Ok(Ok(resp)) => {
                        if resp.vote() == bank::Vote::Yes {
                            None
                        } else {
                            Some(DeclineReason::from_code(&resp.reason).unwrap_or(DeclineReason::BankUnavailable))
                        }
                    }
                    Ok(Err(status)) => {
                        tracing::warn!(bank = %name, code = ?status.code(), message = status.message(), "prepare failed");
                        Some(DeclineReason::BankUnavailable)
                    }
                    Err(_) => {
                        tracing::warn!(bank = %name, "prepare timed out");
                        Some(DeclineReason::BankUnavailable)
                    }
                };
                (vote, now_ms())
            }
        })
        .await;
        // The timeline (best-effort, lazy): the opening steps wait for the
        // decision and the acknowledgements, to be written with them as one
        // row.
        let mut steps = vec![PaymentEvent::new(&txn_id, now, "begin", None, String::new())];
        for ((name, _), (vote, at)) in banks.iter().zip(&timed_votes) {
            let detail = vote.map_or_else(|| "yes".to_owned(), |r| format!("no: {}", r.code()));
            steps.push(PaymentEvent::new(&txn_id, *at, "vote", Some(name), detail));
        }
        let votes: Vec<Option<DeclineReason>> = timed_votes.into_iter().map(|(v, _)| v).collect();
        let voted = std::time::Instant::now();
        metrics::GATEWAY
            .phase_seconds
            .get_or_create(&[("phase", "prepare")])
            .observe((voted - started).as_secs_f64());
        // The pure coordinator decides: any no, or the deadline passed, aborts.
        let ballots: Vec<Option<Vote>> =
            votes.iter().map(|v| Some(if v.is_none() { Vote::Yes } else { Vote::No })).collect();
        let past_deadline = now_ms() >= record.deadline_at_ms;
        let mut reason = votes.into_iter().flatten().next();
        let wanted = match machine::tally(&ballots, past_deadline) {
            Some(Decision::Commit) => PaymentState::Committed,
            _ => {
                reason = reason.or(Some(DeclineReason::Timeout));
                PaymentState::Aborted
            }
        };
        strife_rpc::fault::crash_point("gateway.before_decision");

        // The decision is durable before any bank hears it. A bank's inquiry
        // may have aborted the payment first (past its deadline): then that
        // decision stands.
        let decision = self.store.decide(txn_id.clone(), wanted, reason).await?;
        if decision != wanted {
            tracing::warn!(%txn_id, "the payment passed its deadline before the votes were in; it stays aborted");
            reason = Some(DeclineReason::Timeout);
        }
        strife_rpc::fault::crash_point("gateway.after_decision");
        // Recorded with the opening steps and the acknowledgements (one
        // lazy write, not two).
        steps.push(decision_event(&txn_id, decision, reason));
        let decided = std::time::Instant::now();
        metrics::GATEWAY
            .phase_seconds
            .get_or_create(&[("phase", "decision")])
            .observe((decided - voted).as_secs_f64());

        // Phase two. The answer does not wait past the commit timeout: the
        // decision is already durable, and the finisher delivers the rest.
        let delivered = self.deliver(&txn_id, decision, &banks, &prepare.traceparent, steps).await;
        strife_rpc::fault::crash_point("gateway.after_commit_sent");
        metrics::GATEWAY
            .phase_seconds
            .get_or_create(&[("phase", "delivery")])
            .observe(decided.elapsed().as_secs_f64());
        if delivered {
            // A lazy write: if it is lost, the finisher re-sends the decision.
            self.store.mark_acked_lazily(txn_id.clone());
        } else {
            self.finisher_wake.notify_one();
        }
        let outcome = match (decision, reason) {
            (PaymentState::Committed, _) => Outcome::Committed,
            (_, r) => Outcome::Declined(r.unwrap_or(DeclineReason::Timeout)),
        };
        tracing::info!(%txn_id, payment_id = %req.payment_id, decision = decision.as_str(), reason = reason.map(|r| r.code()), "payment decided");
        count_outcome(&outcome);
        metrics::GATEWAY.payment_seconds.observe(started.elapsed().as_secs_f64());
        crate::live::record(outcome == Outcome::Committed, started.elapsed());
        Ok(PayOutcome { outcome, replayed: false })
    }

    /// A payment within one bank, in one phase: the record is durable
    /// already; the bank decides, and its decision is recorded lazily. When
    /// the transfer's answer does not come, the bank is asked at once; if
    /// that fails too, the customer is told the payment is still being
    /// decided (the deadline sweep and any replay ask again).
    async fn execute_one_phase(
        &self,
        req: &PayRequest,
        record: &PaymentRecord,
        bank: BankEntry,
        trace: &TraceContext,
        started: std::time::Instant,
    ) -> Result<PayOutcome, GatewayError> {
        let txn_id = &record.txn_id;
        let deadline = u64::try_from(record.deadline_at_ms).unwrap_or(0);
        // The record is written (ForcePreparing); send the transfer.
        let (mut payment, _) = machine::OnePhase::begin(bank.name.clone(), deadline);
        let transfer = bank::Transfer {
            txn_id: txn_id.clone(),
            payment_id: record.payment_id.clone(),
            payer: Some(bank::Party { user: req.payer.user.clone(), bank: req.payer.bank.clone() }),
            payee: Some(bank::Party { user: req.payee.user.clone(), bank: req.payee.bank.clone() }),
            amount_minor: req.amount.minor(),
            deadline_unix_ms: record.deadline_at_ms,
            traceparent: strife_rpc::telemetry::outgoing(trace).header(),
        };
        let mut events =
            vec![PaymentEvent::new(txn_id, record.created_at_ms, "begin", None, "one phase".into())];
        let answer = tokio::time::timeout(self.config.prepare_timeout(), bank.transfer(transfer)).await;
        let answered = match answer {
            Ok(Ok(result)) => Some(transfer_outcome(result.outcome(), &result.reason)),
            Ok(Err(status)) => {
                tracing::warn!(bank = %bank.name, code = ?status.code(), message = status.message(), "transfer failed");
                None
            }
            Err(_) => {
                tracing::warn!(bank = %bank.name, "transfer timed out");
                None
            }
        };
        let detail = answered.map_or_else(|| "no answer".to_owned(), outcome_detail);
        events.push(PaymentEvent::new(txn_id, now_ms(), "transfer", Some(&bank.name), detail));
        let decided = match answered {
            Some(outcome) => Some(outcome),
            // The outcome is unknown: ask (the question fences it).
            None => {
                let asked = payment.on_transfer_failed();
                debug_assert!(matches!(
                    asked.as_slice(),
                    [machine::Action::Send(_, machine::ToBank::Resolve)]
                ));
                let answer = self.ask_bank(&bank, txn_id, DeclineReason::BankUnavailable).await;
                if let Err(why) = &answer {
                    tracing::warn!(bank = %bank.name, %txn_id, error = %why, "cannot ask the bank about a transfer");
                }
                let detail = answer.as_ref().map_or_else(|_| "no answer".to_owned(), |a| outcome_detail(*a));
                events.push(PaymentEvent::new(txn_id, now_ms(), "resolve", Some(&bank.name), detail));
                answer.ok()
            }
        };
        metrics::GATEWAY
            .phase_seconds
            .get_or_create(&[("phase", "transfer")])
            .observe(started.elapsed().as_secs_f64());
        let Some((state, reason)) = decided else {
            self.store.record_events(events);
            self.finisher_wake.notify_one();
            return Err(GatewayError::unavailable(
                ErrorReason::PaymentInProgress,
                format!(
                    "payment {}: bank {} did not answer; it is asked again until it does; ask again shortly",
                    req.payment_id, bank.name
                ),
            ));
        };
        let decision = if state == PaymentState::Committed { Decision::Commit } else { Decision::Abort };
        let recorded = payment.on_outcome(&bank.name, decision);
        debug_assert_eq!(recorded, [machine::Action::RecordOutcome(decision)]);
        strife_rpc::fault::crash_point("gateway.before_outcome");
        // Lazy: the bank holds the decision; a lost record is asked for again.
        self.store.record_outcome_lazily(txn_id.clone(), state, reason);
        events.push(decision_event(txn_id, state, reason));
        self.store.record_events(events);
        let outcome = match (state, reason) {
            (PaymentState::Committed, _) => Outcome::Committed,
            (_, r) => Outcome::Declined(r.unwrap_or(DeclineReason::Timeout)),
        };
        tracing::info!(%txn_id, payment_id = %req.payment_id, decision = state.as_str(), reason = reason.map(|r| r.code()), bank = %bank.name, "payment decided by its bank");
        count_outcome(&outcome);
        metrics::GATEWAY.payment_seconds.observe(started.elapsed().as_secs_f64());
        crate::live::record(outcome == Outcome::Committed, started.elapsed());
        Ok(PayOutcome { outcome, replayed: false })
    }

    /// Asks `bank` what became of one-phase payment `txn_id` (a transfer
    /// it never saw is fenced with `reason`), within the commit timeout:
    /// its decision, or why there is none.
    async fn ask_bank(
        &self,
        bank: &BankEntry,
        txn_id: &str,
        reason: DeclineReason,
    ) -> Result<(PaymentState, Option<DeclineReason>), String> {
        let asked =
            tokio::time::timeout(self.config.commit_timeout(), bank.resolve_transfer(txn_id, reason.code()))
                .await;
        match asked {
            Ok(Ok(resp)) => Ok(transfer_outcome(resp.outcome(), &resp.reason)),
            Ok(Err(status)) => Err(format!("{:?}: {}", status.code(), status.message())),
            Err(_) => Err("no answer in time".to_owned()),
        }
    }

    /// Settles a one-phase payment found undecided (its deadline passed,
    /// its driver gone): asks its bank, and records the answer. `None`:
    /// the bank could not be asked (not registered, or no answer); a later
    /// pass asks again.
    async fn settle_one_phase(&self, p: &PaymentRecord) -> Option<(PaymentState, Option<DeclineReason>)> {
        debug_assert_eq!(
            machine::on_abandoned(machine::Protocol::OnePhase, machine::PaymentState::Preparing),
            Some(machine::Abandoned::AskBank)
        );
        let bank = self.bank(&p.payer.bank)?;
        // Asked again at every pass while the bank does not answer: only an
        // answer goes into the log and the timeline.
        let (state, reason) = match self.ask_bank(&bank, &p.txn_id, DeclineReason::Timeout).await {
            Ok(answer) => answer,
            Err(why) => {
                tracing::debug!(bank = %bank.name, txn_id = %p.txn_id, error = %why, "cannot settle a one-phase payment yet");
                return None;
            }
        };
        self.store.record_outcome_lazily(p.txn_id.clone(), state, reason);
        self.store.record_events(vec![
            PaymentEvent::new(
                &p.txn_id,
                now_ms(),
                "resolve",
                Some(&bank.name),
                outcome_detail((state, reason)),
            ),
            decision_event(&p.txn_id, state, reason),
        ]);
        tracing::info!(txn_id = %p.txn_id, decision = state.as_str(), bank = %bank.name, "learnt a one-phase payment's outcome from its bank");
        Some((state, reason))
    }

    /// The answer for a payment id seen before. A payment still
    /// `preparing` is being driven by another replica (or was, by one that
    /// died): wait for its decision, polling the store, for at most
    /// [`REPLAY_WAIT_MAX`] and not past its deadline plus the commit
    /// timeout; then the customer is told to ask again.
    async fn replay(
        &self,
        req: &PayRequest,
        mut existing: PaymentRecord,
    ) -> Result<PayOutcome, GatewayError> {
        if existing.fingerprint != req.fingerprint() {
            let mut diff = req.differences(&existing.payee, existing.amount_minor);
            if diff.is_empty() {
                diff.push("request");
            }
            return Err(id_reused(&req.payment_id, diff));
        }
        let commit_ms = i64::try_from(self.config.commit_timeout_ms).unwrap_or(i64::MAX);
        let wait_ms = i64::try_from(REPLAY_WAIT_MAX.as_millis()).unwrap_or(i64::MAX);
        let give_up = now_ms().saturating_add(wait_ms).min(existing.deadline_at_ms.saturating_add(commit_ms));
        let mut pause = REPLAY_POLL_FIRST;
        let mut asked = false;
        loop {
            if existing.state == PaymentState::Preparing
                && existing.one_phase
                && !asked
                && now_ms() >= existing.deadline_at_ms
            {
                // Its driver is gone (or slow past the deadline): ask the
                // bank, which decided it or now fences it.
                asked = true;
                if let Some((state, reason)) = self.settle_one_phase(&existing).await {
                    (existing.state, existing.reason) = (state, reason);
                }
            }
            match existing.state {
                PaymentState::Committed => {
                    return Ok(PayOutcome { outcome: Outcome::Committed, replayed: true });
                }
                PaymentState::Aborted => {
                    let reason = existing.reason.unwrap_or(DeclineReason::Timeout);
                    return Ok(PayOutcome { outcome: Outcome::Declined(reason), replayed: true });
                }
                PaymentState::Preparing if now_ms() >= give_up => {
                    return Err(GatewayError::unavailable(
                        ErrorReason::PaymentInProgress,
                        format!("payment {} is still being decided; ask again shortly", req.payment_id),
                    ));
                }
                PaymentState::Preparing => {}
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(REPLAY_POLL_MAX);
            existing = self.store.find_txn(existing.txn_id.clone()).await?.ok_or_else(|| {
                GatewayError::Internal(format!("payment {} vanished while being decided", existing.txn_id))
            })?;
        }
    }

    /// Declines a payment no bank has heard of.
    async fn decline_unsent(&self, txn_id: &str, reason: DeclineReason) -> Result<PayOutcome, GatewayError> {
        self.store.decide(txn_id.to_owned(), PaymentState::Aborted, Some(reason)).await?;
        self.store.record_events(vec![
            PaymentEvent::new(txn_id, now_ms(), "begin", None, String::new()),
            decision_event(txn_id, PaymentState::Aborted, Some(reason)),
        ]);
        self.store.mark_acked(txn_id.to_owned()).await?;
        count_outcome(&Outcome::Declined(reason));
        Ok(PayOutcome { outcome: Outcome::Declined(reason), replayed: false })
    }

    /// Sends the decision to every bank, waiting at most the commit
    /// timeout; true when all acknowledged in time. `traceparent`: the
    /// payment's trace context (empty: none). Records `events` (the
    /// payment's timeline so far) with the acknowledgements, or, when cut
    /// short by the timeout, as they are.
    async fn deliver(
        &self,
        txn_id: &str,
        decision: PaymentState,
        banks: &[(String, BankEntry)],
        traceparent: &str,
        mut events: Vec<PaymentEvent>,
    ) -> bool {
        if banks.is_empty() {
            self.store.record_events(events);
            return false;
        }
        let sending = on_each_bank(banks, |name, entry| {
            let txn_id = txn_id.to_owned();
            async move {
                let result = entry.decide(&txn_id, decision == PaymentState::Committed, traceparent).await;
                if let Err(status) = &result {
                    if status.code() == tonic::Code::FailedPrecondition {
                        metrics::GATEWAY.decision_conflicts.inc();
                        tracing::error!(bank = %name, message = status.message(), "bank contradicts a decision");
                    } else if strife_rpc::errors::reason_of(status) == Some(ErrorReason::StorageUnavailable) {
                        // The bank's disk is full (or failing): the decision
                        // is re-sent until it lands; say why it does not.
                        tracing::warn!(bank = %name, message = status.message(), "decision not delivered: the bank's store fails");
                    } else {
                        tracing::debug!(bank = %name, message = status.message(), "decision not delivered yet");
                    }
                }
                let detail = match &result {
                    Ok(_) => "ok".to_owned(),
                    Err(status) => format!("failed: {}", status.message()),
                };
                (name.to_owned(), result.is_ok(), now_ms(), detail)
            }
        });
        let Ok(acks) = tokio::time::timeout(self.config.commit_timeout(), sending).await else {
            // Cut short: the steps so far still go in; the finisher
            // delivers the rest.
            if !events.is_empty() {
                self.store.record_events(events);
            }
            return false;
        };
        let all = acks.iter().all(|(_, ok, _, _)| *ok);
        events.extend(
            acks.into_iter()
                .map(|(name, _, at, detail)| PaymentEvent::new(txn_id, at, "ack", Some(&name), detail)),
        );
        self.store.record_events(events);
        all
    }

    /// Re-sends decisions that some bank has not acknowledged, until every
    /// one is; prunes old payments now and then. Runs until `stop`.
    pub async fn run_finisher(self: Arc<Self>, mut stop: watch::Receiver<bool>) {
        let mut last_prune = tokio::time::Instant::now() - PRUNE_INTERVAL;
        loop {
            if last_prune.elapsed() >= PRUNE_INTERVAL {
                last_prune = tokio::time::Instant::now();
                let days = i64::try_from(self.config.retention_days).unwrap_or(i64::MAX);
                let before = now_ms().saturating_sub(days.saturating_mul(86_400_000));
                match self.store.prune(before).await {
                    Ok(0) => {}
                    Ok(n) => tracing::info!(pruned = n, "pruned payments past the retention window"),
                    Err(e) => tracing::warn!(error = %e, "pruning failed"),
                }
            }
            self.settle_abandoned().await;
            if let Err(e) = self.refresh_keys().await {
                tracing::warn!(error = %e, "cannot refresh the token keys");
            }
            match self.store.claim_unfinished(FINISH_BATCH_MAX).await {
                Ok(payments) => {
                    metrics::GATEWAY.undelivered.set(i64::try_from(payments.len()).unwrap_or(i64::MAX));
                    // A claim lasts a bounded time (a replica's store lets
                    // others take it over after that): deliver all of it at
                    // once, each delivery bounded by the commit timeout.
                    let mut deliveries = tokio::task::JoinSet::new();
                    // A payment whose own task here is still delivering its
                    // decision is left to it: sending the decision twice
                    // at once costs the banks a call and the store a
                    // forced write. If that delivery fails, the payment is
                    // claimed again at a later round.
                    for p in payments.into_iter().filter(|p| !self.running_here(p)) {
                        let gateway = self.clone();
                        // A re-send is a trace of its own (the payment's is
                        // not stored); the span names the txn id it is for.
                        let span = tracing::info_span!("finish", trace_id = tracing::field::Empty, txn_id = %p.txn_id);
                        let trace = strife_rpc::telemetry::join_trace(&span, None);
                        deliveries.spawn(async move { gateway.finish(&p, &trace).await }.instrument(span));
                    }
                    while deliveries.join_next().await.is_some() {}
                }
                Err(e) => tracing::warn!(error = %e, "cannot read unfinished payments"),
            }
            tokio::select! {
                _ = tokio::time::sleep(FINISH_INTERVAL) => {}
                _ = self.finisher_wake.notified() => {}
                _ = stop.changed() => return,
            }
        }
    }

    /// Whether this process's task for `p` (its `pay`) is still running.
    fn running_here(&self, p: &PaymentRecord) -> bool {
        let Ok(id) = p.payment_id.parse::<PaymentId>() else { return false };
        self.in_flight.lock().map(|m| m.contains_key(&(p.payer.clone(), id))).unwrap_or(false)
    }

    async fn finish(&self, p: &PaymentRecord, trace: &TraceContext) {
        if p.one_phase {
            // Its bank decided it: there is nothing to deliver (its record
            // lost the acknowledgement mark only).
            if let Err(e) = self.store.mark_acked(p.txn_id.clone()).await {
                tracing::warn!(error = %e, "cannot mark a payment finished");
            }
            return;
        }
        // Tell every bank the registry knows; one it does not know (yet)
        // keeps the payment unfinished, to be tried again.
        let names = banks_involved(&p.payer, &p.payee);
        let banks: Vec<(String, BankEntry)> =
            names.iter().filter_map(|n| self.bank(n).map(|e| ((*n).to_owned(), e))).collect();
        let all_known = banks.len() == names.len();
        let delivered = self.deliver(&p.txn_id, p.state, &banks, &trace.header(), Vec::new()).await;
        if delivered && all_known {
            if let Err(e) = self.store.mark_acked(p.txn_id.clone()).await {
                tracing::warn!(error = %e, "cannot mark a payment finished");
            } else {
                tracing::info!(txn_id = %p.txn_id, decision = p.state.as_str(), "decision delivered to every bank");
            }
        }
    }

    /// A bank asks for the decision of a payment it prepared. Answers from
    /// the log; a payment still undecided past its deadline is first
    /// aborted durably, so that it can never commit later. No record means
    /// abort (presumed abort). `None` means "not decided yet, ask again".
    pub async fn inquire(&self, txn_id: String) -> Result<Option<PaymentState>, GatewayError> {
        let now = now_ms();
        let record = self.store.find_txn(txn_id.clone()).await?;
        if let Some(p) = record.as_ref().filter(|p| p.one_phase) {
            // A bank never holds a one-phase payment in doubt, so a correct
            // one does not ask; answer without deciding: its bank decides.
            return Ok(match machine::on_inquiry_one_phase(Some(machine_state(p.state))) {
                machine::InquiryAnswer::Decided(_) => Some(p.state),
                machine::InquiryAnswer::NotYet => None,
            });
        }
        {
            let state = record.as_ref().map(|p| machine_state(p.state));
            let past_deadline = record.as_ref().is_some_and(|p| now >= p.deadline_at_ms);
            match machine::on_inquiry(state, past_deadline) {
                // Abort durably first, so that it can never commit later; if
                // the payment was decided meanwhile, that decision stands.
                (Some(_), _) => self
                    .store
                    .decide(txn_id, PaymentState::Aborted, Some(DeclineReason::Timeout))
                    .await
                    .map(Some),
                (None, machine::InquiryAnswer::Decided(Decision::Commit)) => {
                    Ok(Some(PaymentState::Committed))
                }
                (None, machine::InquiryAnswer::Decided(Decision::Abort)) => Ok(Some(PaymentState::Aborted)),
                (None, machine::InquiryAnswer::NotYet) => Ok(None),
            }
        }
    }

    /// Settles payments still `preparing` past their deadline that nobody
    /// drives (their task failed, or their replica died), by the rule of
    /// their protocol (`on_abandoned`): a two-phase one that no task here
    /// is driving is aborted (nobody else would); a one-phase one is asked
    /// about at its bank, all of them at once (asking is safe even while a
    /// task still drives it: past the deadline the bank refuses its transfer).
    async fn settle_abandoned(self: &Arc<Self>) {
        let before = now_ms().saturating_sub(i64::try_from(self.config.payment_deadline_ms).unwrap_or(0));
        let Ok(stale) = self.store.preparing_before(before, FINISH_BATCH_MAX).await else {
            return;
        };
        let (one_phase, two_phase): (Vec<PaymentRecord>, Vec<PaymentRecord>) =
            stale.into_iter().partition(|p| p.one_phase);
        let mut asks = tokio::task::JoinSet::new();
        for p in one_phase {
            let gateway = self.clone();
            asks.spawn(async move { gateway.settle_one_phase(&p).await.is_some() });
        }
        let (mut asked, mut unsettled) = (0, 0);
        while let Some(settled) = asks.join_next().await {
            asked += 1;
            if !matches!(settled, Ok(true)) {
                unsettled += 1;
            }
        }
        if unsettled > 0 {
            tracing::warn!(
                unsettled,
                asked,
                "one-phase payments past their deadline whose bank cannot be asked yet"
            );
        }
        for p in two_phase {
            let running = self
                .in_flight
                .lock()
                .map(|m| m.values().any(|f| f.request.payment_id.to_string() == p.payment_id))
                .unwrap_or(true);
            if running {
                continue;
            }
            match self
                .store
                .decide(p.txn_id.clone(), PaymentState::Aborted, Some(DeclineReason::Timeout))
                .await
            {
                Ok(PaymentState::Aborted) => {
                    tracing::warn!(txn_id = %p.txn_id, "aborted a payment nobody was driving")
                }
                // Its driver decided it meanwhile; that decision stands.
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "cannot abort an abandoned payment"),
            }
        }
    }

    /// Waits (bounded) for payments in flight to finish, at shutdown.
    pub async fn drain(&self, bound: Duration) {
        let deadline = tokio::time::Instant::now() + bound;
        while tokio::time::Instant::now() < deadline {
            if self.in_flight.lock().map(|m| m.is_empty()).unwrap_or(true) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        tracing::warn!("stopping with payments still in flight; they resume as aborted on restart");
    }
}

fn id_reused(id: &PaymentId, fields: Vec<&'static str>) -> GatewayError {
    let message = format!(
        "payment id {id} was already used for a different payment ({}); use a new id for a new payment",
        strife_core::differences_text(&fields)
    );
    GatewayError::IdReused { payment_id: id.to_string(), fields, message }
}

async fn wait_outcome(mut rx: OutcomeCell) -> Result<PayOutcome, tonic::Status> {
    let value = rx.wait_for(Option::is_some).await.map_err(|_| {
        tonic::Status::from(GatewayError::Internal("the payment task ended without an outcome".into()))
    })?;
    value.clone().unwrap_or_else(|| Err(GatewayError::Internal("no outcome".into()).into()))
}

/// Runs `f` for each of the (one or two) banks of a payment concurrently,
/// and collects the outputs in order.
async fn on_each_bank<'a, F, Fut, T>(banks: &'a [(String, BankEntry)], f: F) -> Vec<T>
where
    F: Fn(&'a str, &'a BankEntry) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    match banks {
        [(n, e)] => vec![f(n, e).await],
        [(n1, e1), (n2, e2)] => {
            let (a, b) = tokio::join!(f(n1, e1), f(n2, e2));
            vec![a, b]
        }
        _ => unreachable!("a payment touches one or two banks"),
    }
}

/// A one-phase payment's state as the state machines see it.
fn machine_state(state: PaymentState) -> machine::PaymentState {
    match state {
        PaymentState::Preparing => machine::PaymentState::Preparing,
        PaymentState::Committed => machine::PaymentState::Decided(Decision::Commit),
        PaymentState::Aborted => machine::PaymentState::Decided(Decision::Abort),
    }
}

/// A bank's one-phase decision as the log records it (an outcome the bank
/// left unspecified, or a reason it did not name, reads as abort, timeout).
fn transfer_outcome(outcome: bank::TransferOutcome, reason: &str) -> (PaymentState, Option<DeclineReason>) {
    match outcome {
        bank::TransferOutcome::Committed => (PaymentState::Committed, None),
        bank::TransferOutcome::Aborted | bank::TransferOutcome::Unspecified => {
            (PaymentState::Aborted, Some(DeclineReason::from_code(reason).unwrap_or(DeclineReason::Timeout)))
        }
    }
}

/// The timeline's words for a bank's one-phase decision.
fn outcome_detail((state, reason): (PaymentState, Option<DeclineReason>)) -> String {
    match (state, reason) {
        (PaymentState::Committed, _) => "commit".to_owned(),
        (_, Some(r)) => format!("abort: {}", r.code()),
        (_, None) => "abort".to_owned(),
    }
}

/// The timeline's step for a decision.
fn decision_event(txn_id: &str, decision: PaymentState, reason: Option<DeclineReason>) -> PaymentEvent {
    let detail = match (decision, reason) {
        (PaymentState::Committed, _) => "commit".to_owned(),
        (_, Some(r)) => format!("abort: {}", r.code()),
        (_, None) => "abort".to_owned(),
    };
    PaymentEvent::new(txn_id, now_ms(), "decision", None, detail)
}

/// Counts a payment this process decided, by outcome and decline reason.
fn count_outcome(outcome: &Outcome) {
    let labels = match outcome {
        Outcome::Committed => [("outcome", "committed"), ("reason", "none")],
        Outcome::Declined(reason) => [("outcome", "declined"), ("reason", reason.code())],
    };
    metrics::GATEWAY.payments.get_or_create(&labels).inc();
}

/// `strife_payments_in_flight` up while a payment is being decided here.
struct InFlightGauge;

impl InFlightGauge {
    fn enter() -> InFlightGauge {
        metrics::GATEWAY.in_flight.inc();
        InFlightGauge
    }
}

impl Drop for InFlightGauge {
    fn drop(&mut self) {
        metrics::GATEWAY.in_flight.dec();
    }
}
