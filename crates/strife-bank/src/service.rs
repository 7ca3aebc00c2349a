//! The bank's gRPC service, generic over the bank's [`Ledger`] (SQLite or
//! PostgreSQL). Every method is for the gateway only (checked by
//! [`only_gateway`]).

use crate::accounts::verify_password_in;
use crate::error::BankError;
use crate::ledger::{Decision, Ledger, Leg, LegRequest, Outcome, TransferRequest, Vote};
use std::sync::Arc;
use strife_core::limits::{BANK_BATCH_MAX, HISTORY_PAGE_DEFAULT, HISTORY_PAGE_MAX, PASSWORD_MAX};
use strife_core::{Secret, validate_bank_name, validate_user_name};
use strife_proto::bank::v1 as pb;
use strife_rpc::PeerRole;
use strife_rpc::telemetry::{record_payment, record_user};
use strife_rpc::trace::TraceContext;
use tonic::{Request, Response, Status};

/// Interceptor: only the gateway's certificate may call a bank.
pub fn only_gateway(req: Request<()>) -> Result<Request<()>, Status> {
    strife_rpc::identity::require(&req, &[PeerRole::Gateway])?;
    Ok(req)
}

#[derive(Clone)]
pub struct BankService<L> {
    /// The bank's ledger: every read and durable write goes through it.
    ledger: L,
    /// A hash of a random password, verified against when the user is
    /// unknown so that an unknown user costs as much as a wrong password.
    decoy_hash: Arc<String>,
    /// The threads that check passwords: each check takes ~19 MiB and a
    /// core for tens of milliseconds, so a login flood cannot exhaust the bank.
    password_checks: PasswordChecks,
}

/// Most legs in one `Audit` answer (~2.5 MB).
pub const AUDIT_PAGE_MAX: u32 = 10_000;

/// Most password checks (Argon2id) running at once: one thread each.
pub const PASSWORD_CHECKS_MAX: usize = 2;
/// Most password checks waiting for a thread.
const PASSWORD_QUEUE_MAX: usize = 256;

type Check = Box<dyn FnOnce(&mut Vec<argon2::Block>) + Send>;

/// A fixed pool of threads for password checks. Fixed threads also keep
/// Argon2's memory in a fixed number of allocator arenas.
#[derive(Clone)]
struct PasswordChecks {
    queue: std::sync::mpsc::SyncSender<Check>,
}

impl PasswordChecks {
    fn start() -> PasswordChecks {
        let (tx, rx) = std::sync::mpsc::sync_channel::<Check>(PASSWORD_QUEUE_MAX);
        let rx = Arc::new(std::sync::Mutex::new(rx));
        for i in 0..PASSWORD_CHECKS_MAX {
            let rx = rx.clone();
            let _ = std::thread::Builder::new().name(format!("password-{i}")).spawn(move || {
                // Each thread's Argon2 work area, allocated once.
                let mut memory: Vec<argon2::Block> = Vec::new();
                loop {
                    let job = match rx.lock() {
                        Ok(guard) => guard.recv(),
                        Err(_) => return,
                    };
                    match job {
                        Ok(job) => job(&mut memory),
                        Err(_) => return,
                    }
                }
            });
        }
        PasswordChecks { queue: tx }
    }

    async fn check(
        &self,
        f: impl FnOnce(&mut Vec<argon2::Block>) -> bool + Send + 'static,
    ) -> Result<bool, BankError> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        let job: Check = Box::new(move |memory| {
            let _ = tx.send(f(memory));
        });
        self.queue
            .try_send(job)
            .map_err(|_| BankError::Busy("too many logins at once; try again shortly".into()))?;
        rx.await.map_err(|_| BankError::Internal("password check thread gone".into()))
    }
}

impl<L: Ledger> BankService<L> {
    pub fn new(ledger: L, decoy_hash: String) -> BankService<L> {
        BankService { ledger, decoy_hash: Arc::new(decoy_hash), password_checks: PasswordChecks::start() }
    }

    /// The bank's ledger.
    pub fn ledger(&self) -> &L {
        &self.ledger
    }
}

pub fn check_user(user: &str) -> Result<(), BankError> {
    validate_user_name(user).map_err(|e| BankError::invalid("user", e.to_string()))
}

pub fn check_txn_id(txn_id: &str) -> Result<(), BankError> {
    txn_id
        .parse::<strife_core::PaymentId>()
        .map(|_| ())
        .map_err(|_| BankError::invalid("txn_id", "transaction id must be a UUID"))
}

/// Validates a prepare request (pure: the fuzz targets call it too).
pub fn prepare_request(req: pb::PrepareRequest) -> Result<LegRequest, BankError> {
    check_txn_id(&req.txn_id)?;
    let payer = party(req.payer, "payer")?;
    let payee = party(req.payee, "payee")?;
    if payer == payee {
        return Err(BankError::invalid("payee", "payer and payee are the same account"));
    }
    let amount = strife_core::Amount::from_minor(req.amount_minor)
        .ok_or_else(|| BankError::invalid("amount_minor", "amount is out of range"))?;
    if req.payment_id.len() > 64 {
        return Err(BankError::invalid("payment_id", "payment id is too long"));
    }
    Ok(LegRequest {
        txn_id: req.txn_id,
        payment_id: req.payment_id,
        payer_user: payer.user,
        payer_bank: payer.bank,
        payee_user: payee.user,
        payee_bank: payee.bank,
        amount_minor: amount.minor(),
    })
}

/// Validates a one-phase transfer (pure: the fuzz targets may call it too).
/// Whether both sides are at this bank is the ledger's check.
pub fn transfer_request(t: pb::Transfer) -> Result<TransferRequest, BankError> {
    let leg = prepare_request(pb::PrepareRequest {
        txn_id: t.txn_id,
        payment_id: t.payment_id,
        payer: t.payer,
        payee: t.payee,
        amount_minor: t.amount_minor,
        traceparent: String::new(),
    })?;
    Ok(TransferRequest { leg, deadline_ms: t.deadline_unix_ms })
}

/// A transfer's outcome as the API says it, counted.
fn outcome_message(outcome: Outcome) -> (pb::TransferOutcome, String) {
    let (label, answer) = match outcome {
        Outcome::Committed => ("committed", (pb::TransferOutcome::Committed, String::new())),
        Outcome::Aborted(r) => ("aborted", (pb::TransferOutcome::Aborted, r.code().to_owned())),
    };
    strife_rpc::metrics::BANK.transfers.get_or_create(&[("outcome", label)]).inc();
    answer
}

fn party(p: Option<pb::Party>, what: &'static str) -> Result<pb::Party, BankError> {
    let p = p.ok_or_else(|| BankError::invalid(what, format!("{what} is missing")))?;
    check_user(&p.user)?;
    validate_bank_name(&p.bank).map_err(|e| BankError::invalid(what, e.to_string()))?;
    Ok(p)
}

/// A batch of at most [`BANK_BATCH_MAX`] items, or INVALID_ARGUMENT.
fn check_batch(field: &'static str, len: usize) -> Result<(), BankError> {
    if len > BANK_BATCH_MAX {
        return Err(BankError::invalid(
            field,
            format!("a batch holds at most {BANK_BATCH_MAX} items, not {len}"),
        ));
    }
    Ok(())
}

/// An item of a batch of one payment each (a leg to prepare, a transfer):
/// what the opening of its handler reads of it.
trait PaymentItem {
    /// Its `txn_id`, `traceparent`, `payment_id` and `amount_minor`.
    fn fields(&self) -> (&str, &str, &str, i64);
}

impl PaymentItem for pb::PrepareRequest {
    fn fields(&self) -> (&str, &str, &str, i64) {
        (&self.txn_id, &self.traceparent, &self.payment_id, self.amount_minor)
    }
}

impl PaymentItem for pb::Transfer {
    fn fields(&self) -> (&str, &str, &str, i64) {
        (&self.txn_id, &self.traceparent, &self.payment_id, self.amount_minor)
    }
}

/// A batch's spans and requests, by place.
type OpenBatch<R> = (Vec<tracing::Span>, Vec<Result<R, BankError>>);

/// The opening of a batch handler: at most [`BANK_BATCH_MAX`] `items`
/// (named `field`); a batch of one records its payment on the call's span;
/// a span per item; each item made into its request by `request` (an
/// invalid one is refused alone).
fn open_batch<M: PaymentItem, R>(
    call: Option<&TraceContext>,
    field: &'static str,
    items: Vec<M>,
    request: fn(M) -> Result<R, BankError>,
) -> Result<OpenBatch<R>, BankError> {
    check_batch(field, items.len())?;
    if let [item] = items.as_slice() {
        let (_, _, payment_id, amount_minor) = item.fields();
        record_payment(&payment_id, &strife_core::money::format_minor(amount_minor));
    }
    let spans = items
        .iter()
        .map(|item| {
            let (txn_id, traceparent, _, _) = item.fields();
            leg_span(call, traceparent, txn_id)
        })
        .collect();
    Ok((spans, items.into_iter().map(request).collect()))
}

/// How a single call's error travels inside a batch answer.
fn refusal(e: BankError) -> pb::Refusal {
    let status = Status::from(e);
    let reason =
        strife_rpc::errors::reason_of(&status).map(strife_rpc::errors::reason_code).unwrap_or_default();
    pb::Refusal {
        code: status.code() as i32,
        message: status.message().to_owned(),
        reason: reason.to_owned(),
    }
}

/// Runs the valid items of a batch through `run` (one durable write) and
/// answers every item in order: an invalid one with its own error, a valid
/// one with what the ledger said about it.
async fn answer_each<I, T, F, Fut>(
    items: Vec<Result<I, BankError>>,
    run: F,
) -> Result<Vec<Result<T, BankError>>, BankError>
where
    F: FnOnce(Vec<I>) -> Fut,
    Fut: std::future::Future<Output = Result<Vec<Result<T, BankError>>, BankError>>,
{
    let mut valid = Vec::with_capacity(items.len());
    let mut answers: Vec<Option<Result<T, BankError>>> = Vec::with_capacity(items.len());
    for item in items {
        match item {
            Ok(item) => {
                valid.push(item);
                answers.push(None);
            }
            Err(e) => answers.push(Some(Err(e))),
        }
    }
    let mut done = if valid.is_empty() { Vec::new() } else { run(valid).await? }.into_iter();
    Ok(answers
        .into_iter()
        .map(|a| match a {
            Some(invalid) => invalid,
            None => done
                .next()
                .unwrap_or_else(|| Err(BankError::Internal("a batch item without an answer".into()))),
        })
        .collect::<Vec<_>>())
}

/// The span of one batch item (a leg of one payment): its `txn_id`, and
/// its payment's `trace_id` when that is not the call's own (a batch of
/// several payments' legs), so every line about the leg names its trace.
fn leg_span(call: Option<&TraceContext>, traceparent: &str, txn_id: &str) -> tracing::Span {
    let span = tracing::info_span!("leg", txn_id, trace_id = tracing::field::Empty);
    if let Some(leg) = TraceContext::parse(traceparent)
        && call.is_none_or(|call| call.trace_id != leg.trace_id)
    {
        span.record("trace_id", tracing::field::display(leg.trace_id_hex()));
    }
    span
}

fn vote_message(vote: Vote) -> pb::PrepareResponse {
    let label = if vote == Vote::Yes { "yes" } else { "no" };
    strife_rpc::metrics::BANK.prepares.get_or_create(&[("vote", label)]).inc();
    match vote {
        Vote::Yes => pb::PrepareResponse { vote: pb::Vote::Yes.into(), reason: String::new() },
        Vote::No(r) => pb::PrepareResponse { vote: pb::Vote::No.into(), reason: r.code().to_owned() },
    }
}

/// Counts a decision received from the gateway (a repeat counts again).
fn count_decision(decision: Decision) {
    let label = if decision == Decision::Commit { "commit" } else { "abort" };
    strife_rpc::metrics::BANK.decisions.get_or_create(&[("decision", label)]).inc();
}

fn entry(leg: Leg) -> pb::LedgerEntry {
    pb::LedgerEntry {
        txn_id: leg.txn_id,
        payment_id: leg.payment_id,
        payer: Some(pb::Party { user: leg.payer_user, bank: leg.payer_bank }),
        payee: Some(pb::Party { user: leg.payee_user, bank: leg.payee_bank }),
        amount_minor: leg.amount_minor,
        state: crate::ledger::state_name(leg.state).to_owned(),
        at_unix_ms: leg.prepared_at_ms,
    }
}

#[tonic::async_trait]
impl<L: Ledger> pb::bank_service_server::BankService for BankService<L> {
    async fn verify_password(
        &self,
        req: Request<pb::VerifyPasswordRequest>,
    ) -> Result<Response<pb::VerifyPasswordResponse>, Status> {
        let req = req.into_inner();
        check_user(&req.user)?;
        record_user(&req.user);
        if req.password.len() > PASSWORD_MAX {
            return Err(BankError::invalid(
                "password",
                format!("password is longer than {PASSWORD_MAX} bytes"),
            )
            .into());
        }
        let password = Secret::new(req.password);
        let user = req.user;
        let stored = self.ledger.password_hash(user).await?;
        let decoy = self.decoy_hash.clone();
        let valid = self
            .password_checks
            .check(move |memory| match stored {
                Some(hash) => verify_password_in(&password, &hash, memory),
                None => {
                    let _ = verify_password_in(&password, &decoy, memory);
                    false
                }
            })
            .await?;
        Ok(Response::new(pb::VerifyPasswordResponse { valid }))
    }

    async fn get_balance(
        &self,
        req: Request<pb::GetBalanceRequest>,
    ) -> Result<Response<pb::GetBalanceResponse>, Status> {
        let user = req.into_inner().user;
        check_user(&user)?;
        record_user(&user);
        let (balance_minor, available_minor) = self.ledger.balance(user).await?;
        Ok(Response::new(pb::GetBalanceResponse { balance_minor, available_minor }))
    }

    async fn prepare(
        &self,
        req: Request<pb::PrepareRequest>,
    ) -> Result<Response<pb::PrepareResponse>, Status> {
        let leg = prepare_request(req.into_inner())?;
        record_user(&format_args!("{}@{}", leg.payer_user, leg.payer_bank));
        record_payment(&leg.payment_id, &strife_core::money::format_minor(leg.amount_minor));
        let vote = self.ledger.prepare(leg).await?;
        strife_rpc::fault::crash_point("bank.after_prepare");
        Ok(Response::new(vote_message(vote)))
    }

    async fn prepare_batch(
        &self,
        req: Request<pb::PrepareBatchRequest>,
    ) -> Result<Response<pb::PrepareBatchResponse>, Status> {
        let call = req.extensions().get::<TraceContext>().copied();
        let (spans, legs) = open_batch(call.as_ref(), "legs", req.into_inner().legs, prepare_request)?;
        // One durable write for the whole batch: each leg still rolls back
        // alone if it fails, and every answer waits for the batch's commit.
        let results = answer_each(legs, |valid| self.ledger.prepare_batch(valid)).await?;
        strife_rpc::fault::crash_point("bank.after_prepare");
        let results = results
            .into_iter()
            .zip(spans)
            .map(|(r, span)| {
                let _leg = span.enter();
                match r {
                    Ok(vote) => {
                        tracing::debug!(vote = ?vote, "leg prepared");
                        pb::PrepareResult { vote: Some(vote_message(vote)), refusal: None }
                    }
                    Err(e) => {
                        let refusal = refusal(e);
                        tracing::debug!(code = refusal.code, message = %refusal.message, "leg refused");
                        pb::PrepareResult { vote: None, refusal: Some(refusal) }
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::PrepareBatchResponse { results }))
    }

    async fn decide_batch(
        &self,
        req: Request<pb::DecideBatchRequest>,
    ) -> Result<Response<pb::DecideBatchResponse>, Status> {
        let call = req.extensions().get::<TraceContext>().copied();
        let decisions = req.into_inner().decisions;
        check_batch("decisions", decisions.len())?;
        let spans: Vec<(tracing::Span, bool)> = decisions
            .iter()
            .map(|d| (leg_span(call.as_ref(), &d.traceparent, &d.txn_id), d.commit))
            .collect();
        let commits = decisions.iter().any(|d| d.commit);
        if commits {
            strife_rpc::fault::crash_point("bank.before_commit");
        }
        let decisions: Vec<Result<(String, Decision), BankError>> = decisions
            .into_iter()
            .map(|d| {
                check_txn_id(&d.txn_id)?;
                Ok((d.txn_id, if d.commit { Decision::Commit } else { Decision::Abort }))
            })
            .collect();
        for d in decisions.iter().flatten() {
            count_decision(d.1);
        }
        let results = answer_each(decisions, |valid| self.ledger.decide_batch(valid)).await?;
        if commits {
            strife_rpc::fault::crash_point("bank.after_commit");
        }
        let results = results
            .into_iter()
            .zip(spans)
            .map(|(r, (span, commit))| {
                let _leg = span.enter();
                let refusal = r.err().map(refusal);
                match &refusal {
                    None => tracing::debug!(commit, "leg decided"),
                    Some(refusal) => {
                        tracing::debug!(code = refusal.code, message = %refusal.message, "decision refused")
                    }
                }
                pb::DecisionResult { refusal }
            })
            .collect();
        Ok(Response::new(pb::DecideBatchResponse { results }))
    }

    async fn transfer(
        &self,
        req: Request<pb::TransferRequest>,
    ) -> Result<Response<pb::TransferResponse>, Status> {
        let call = req.extensions().get::<TraceContext>().copied();
        let (spans, transfers) =
            open_batch(call.as_ref(), "transfers", req.into_inner().transfers, transfer_request)?;
        if !transfers.is_empty() {
            strife_rpc::fault::crash_point("bank.before_transfer");
        }
        // One durable write for the whole batch, each transfer in its own
        // savepoint; every answer waits for the batch's commit.
        let results = answer_each(transfers, |valid| self.ledger.transfer_batch(valid)).await?;
        if !results.is_empty() {
            strife_rpc::fault::crash_point("bank.after_transfer");
        }
        let results = results
            .into_iter()
            .zip(spans)
            .map(|(r, span)| {
                let _leg = span.enter();
                match r {
                    Ok(outcome) => {
                        tracing::debug!(?outcome, "transfer decided");
                        let (outcome, reason) = outcome_message(outcome);
                        pb::TransferResult { outcome: outcome.into(), reason, refusal: None }
                    }
                    Err(e) => {
                        let refusal = refusal(e);
                        tracing::debug!(code = refusal.code, message = %refusal.message, "transfer refused");
                        pb::TransferResult { outcome: 0, reason: String::new(), refusal: Some(refusal) }
                    }
                }
            })
            .collect();
        Ok(Response::new(pb::TransferResponse { results }))
    }

    async fn resolve_transfer(
        &self,
        req: Request<pb::ResolveTransferRequest>,
    ) -> Result<Response<pb::ResolveTransferResponse>, Status> {
        let req = req.into_inner();
        check_txn_id(&req.txn_id)?;
        let reason = strife_core::DeclineReason::from_code(&req.reason)
            .ok_or_else(|| BankError::invalid("reason", "reason must be a decline reason code"))?;
        let outcome = self.ledger.resolve_transfer(req.txn_id, reason).await?;
        tracing::debug!(?outcome, "transfer resolved");
        let (outcome, reason) = outcome_message(outcome);
        Ok(Response::new(pb::ResolveTransferResponse { outcome: outcome.into(), reason }))
    }

    async fn commit(&self, req: Request<pb::CommitRequest>) -> Result<Response<pb::CommitResponse>, Status> {
        let txn_id = req.into_inner().txn_id;
        check_txn_id(&txn_id)?;
        strife_rpc::fault::crash_point("bank.before_commit");
        count_decision(Decision::Commit);
        self.ledger.decide(txn_id, Decision::Commit).await?;
        strife_rpc::fault::crash_point("bank.after_commit");
        Ok(Response::new(pb::CommitResponse {}))
    }

    async fn abort(&self, req: Request<pb::AbortRequest>) -> Result<Response<pb::AbortResponse>, Status> {
        let txn_id = req.into_inner().txn_id;
        check_txn_id(&txn_id)?;
        count_decision(Decision::Abort);
        self.ledger.decide(txn_id, Decision::Abort).await?;
        Ok(Response::new(pb::AbortResponse {}))
    }

    async fn get_history(
        &self,
        req: Request<pb::GetHistoryRequest>,
    ) -> Result<Response<pb::GetHistoryResponse>, Status> {
        let req = req.into_inner();
        check_user(&req.user)?;
        record_user(&req.user);
        let limit = if req.limit == 0 { HISTORY_PAGE_DEFAULT } else { req.limit.min(HISTORY_PAGE_MAX) };
        let user = req.user;
        let legs = self.ledger.history(user, limit).await?;
        Ok(Response::new(pb::GetHistoryResponse { entries: legs.into_iter().map(entry).collect() }))
    }

    async fn get_status(
        &self,
        _req: Request<pb::GetStatusRequest>,
    ) -> Result<Response<pb::GetStatusResponse>, Status> {
        let doubt = self.ledger.in_doubt().await?;
        Ok(Response::new(pb::GetStatusResponse {
            in_doubt_legs: doubt.legs,
            oldest_in_doubt_prepared_at_ms: doubt.oldest_prepared_at_ms.unwrap_or(0),
        }))
    }

    async fn audit(&self, req: Request<pb::AuditRequest>) -> Result<Response<pb::AuditResponse>, Status> {
        let req = req.into_inner();
        let size = match req.page_size {
            0 => AUDIT_PAGE_MAX,
            n => n.min(AUDIT_PAGE_MAX),
        };
        let after = if req.after_txn_id.is_empty() {
            None
        } else {
            check_txn_id(&req.after_txn_id)?;
            Some(req.after_txn_id)
        };
        let (legs, totals) = self.ledger.audit_page(after, size).await?;
        Ok(Response::new(pb::AuditResponse {
            legs: legs.into_iter().map(entry).collect(),
            total_balance_minor: totals.balance_minor,
            total_held_minor: totals.held_minor,
            total_opening_minor: totals.opening_minor,
            accounts: totals.accounts,
        }))
    }
}
