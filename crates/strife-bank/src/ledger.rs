//! The bank's ledger: one interface ([`Ledger`]), two backends beside each
//! other, chosen by the URL in `bank.store` ([`StoreUrl`]):
//!
//! - [`crate::store`]: SQLite in one file, driven by one group-commit thread
//!   (the default: nothing to install);
//! - [`crate::postgres`]: PostgreSQL through a connection pool, which
//!   several processes of one bank may share.
//!
//! Both store the same things and answer the same way; one conformance
//! suite (`conformance.rs`) runs against each. Neither decides anything about
//! 2PC: every transition of a leg is decided by
//! [`strife_twopc::participant`], and a backend only makes the write it is
//! told to make, durably, before it answers.

use crate::accounts::AccountSpec;
use crate::error::BankError;
use std::future::Future;
use strife_core::DeclineReason;
use strife_core::limits::BALANCE_MAX_MINOR;

pub use strife_twopc::Decision;
/// A leg's state at this bank: the participant's states of the 2PC state
/// machine in `strife-twopc`, which decides every transition.
pub use strife_twopc::participant::LegState;

/// How a leg state is written in a store and shown to operators.
pub fn state_name(state: LegState) -> &'static str {
    match state {
        LegState::Prepared => "prepared",
        LegState::Committed => "committed",
        LegState::Aborted => "aborted",
    }
}

/// A leg state as a store wrote it.
pub fn parse_state(s: &str) -> Result<LegState, BankError> {
    match s {
        "prepared" => Ok(LegState::Prepared),
        "committed" => Ok(LegState::Committed),
        "aborted" => Ok(LegState::Aborted),
        other => Err(BankError::Internal(format!("leg state '{other}' in the store"))),
    }
}

/// What the gateway asks this bank to prepare.
#[derive(Debug, Clone)]
pub struct LegRequest {
    pub txn_id: String,
    pub payment_id: String,
    pub payer_user: String,
    pub payer_bank: String,
    pub payee_user: String,
    pub payee_bank: String,
    pub amount_minor: i64,
}

impl LegRequest {
    /// The accounts of this leg at `bank`: the payer's (debit) and the
    /// payee's (credit), where they are here. A leg with neither is invalid.
    pub fn sides(&self, bank: &str) -> Result<(Option<&str>, Option<&str>), BankError> {
        let debit = (self.payer_bank == bank).then_some(self.payer_user.as_str());
        let credit = (self.payee_bank == bank).then_some(self.payee_user.as_str());
        if debit.is_none() && credit.is_none() {
            return Err(BankError::invalid(
                "payee",
                format!("payment {} has no leg at bank {bank}", self.txn_id),
            ));
        }
        Ok((debit, credit))
    }
}

impl LegRequest {
    /// Both accounts of a one-phase transfer, payer's then payee's: both
    /// must be at `bank`.
    pub fn both_sides(&self, bank: &str) -> Result<(&str, &str), BankError> {
        match self.sides(bank)? {
            (Some(debit), Some(credit)) => Ok((debit, credit)),
            _ => Err(BankError::invalid(
                "payee",
                format!(
                    "payment {} is not within bank {bank}: a transfer needs both accounts here",
                    self.txn_id
                ),
            )),
        }
    }
}

/// The bank's vote.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Vote {
    Yes,
    No(DeclineReason),
}

/// A one-phase payment: payer and payee both at this bank, which decides it.
#[derive(Debug, Clone)]
pub struct TransferRequest {
    pub leg: LegRequest,
    /// ms since the Unix epoch: a transfer that arrives at or after it (by
    /// this bank's clock) is refused.
    pub deadline_ms: i64,
}

/// This bank's decision of a one-phase payment: durable once answered.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// Both sides applied.
    Committed,
    /// Refused, and why: nothing moved, and nothing ever will.
    Aborted(DeclineReason),
}

/// A leg as stored, for history and audit.
#[derive(Debug, Clone)]
pub struct Leg {
    pub txn_id: String,
    pub payment_id: String,
    pub payer_user: String,
    pub payer_bank: String,
    pub payee_user: String,
    pub payee_bank: String,
    pub amount_minor: i64,
    pub state: LegState,
    pub prepared_at_ms: i64,
}

/// Totals over every account, for the audit.
#[derive(Debug, Clone, Copy, Default)]
pub struct Totals {
    pub accounts: u32,
    pub balance_minor: i64,
    pub held_minor: i64,
    /// What the accounts held when created: the sum of balances must equal
    /// the sum of opening balances plus committed credits from other banks
    /// minus committed debits to them.
    pub opening_minor: i64,
}

/// The money of an account as a prepare checks it, in minor units.
#[derive(Debug, Clone, Copy)]
pub struct Funds {
    pub balance_minor: i64,
    /// On hold for prepared debits.
    pub held_minor: i64,
    /// Reserved for prepared credits.
    pub incoming_minor: i64,
}

/// The check of a new leg, made in the transaction that places its hold:
/// the payer (`None`: no such account) must have the amount available, and
/// the payee (`None`: no such account) must stay under the balance maximum
/// with every prepared credit.
pub fn check_leg(debit: Option<Option<Funds>>, credit: Option<Option<Funds>>, amount_minor: i64) -> Vote {
    if let Some(payer) = debit {
        let Some(payer) = payer else { return Vote::No(DeclineReason::UnknownPayer) };
        if payer.balance_minor - payer.held_minor < amount_minor {
            return Vote::No(DeclineReason::InsufficientFunds);
        }
    }
    if let Some(payee) = credit {
        let Some(payee) = payee else { return Vote::No(DeclineReason::UnknownPayee) };
        if payee.balance_minor.saturating_add(payee.incoming_minor).saturating_add(amount_minor)
            > BALANCE_MAX_MINOR
        {
            return Vote::No(DeclineReason::BalanceLimit);
        }
    }
    Vote::Yes
}

/// A bank's ledger: accounts, and one leg per payment the bank takes part
/// in. Every write is durable when its future resolves with `Ok`.
///
/// The futures are `Send` and named by the implementation (no boxing): the
/// bank's service is generic over its ledger.
pub trait Ledger: Clone + Send + Sync + 'static {
    /// The ledger's id: random, made once when the ledger was created, the
    /// same for every process that opens it (read at open). The bank sends
    /// it when it registers, so that a gateway takes two processes of one
    /// bank as replicas only when they share one ledger.
    fn ledger_id(&self) -> &str;

    /// Creates each account that does not exist yet (hashing a plaintext
    /// password only then); never touches an existing one. Returns how many
    /// were created.
    fn create_accounts(
        &self,
        accounts: Vec<AccountSpec>,
    ) -> impl Future<Output = Result<usize, BankError>> + Send;

    /// How many accounts there are.
    fn account_count(&self) -> impl Future<Output = Result<u32, BankError>> + Send;

    /// The Argon2id hash of `user`'s password, if there is such a user.
    fn password_hash(&self, user: String) -> impl Future<Output = Result<Option<String>, BankError>> + Send;

    /// `(balance, available)` of `user`, in minor units.
    fn balance(&self, user: String) -> impl Future<Output = Result<(i64, i64), BankError>> + Send;

    /// Phase one for one leg. Votes yes only once the hold (debit) and the
    /// reservation (credit) are durable; a no vote is stored too (as an
    /// aborted leg), so a repeated prepare gets the same answer. A repeated
    /// prepare with another amount is refused (`Conflict`).
    fn prepare(&self, leg: LegRequest) -> impl Future<Output = Result<Vote, BankError>> + Send;

    /// Phase one for many legs; each leg gets its own answer, as
    /// [`Ledger::prepare`] would have given it, durable when the future
    /// resolves. The legs are independent: a backend may run them in any
    /// order or at once (SQLite: one write, in order; PostgreSQL: one
    /// statement, in order). `Err` only when the batch as a whole failed.
    fn prepare_batch(
        &self,
        legs: Vec<LegRequest>,
    ) -> impl Future<Output = Result<Vec<Result<Vote, BankError>>, BankError>> + Send;

    /// Phase two for one leg: commit applies the hold and the credit, abort
    /// releases them. Idempotent; a decision that contradicts the leg's
    /// state is refused (`Conflict`) and changes nothing; an abort for an
    /// unknown leg leaves a record so that a late prepare votes no.
    fn decide(
        &self,
        txn_id: String,
        decision: Decision,
    ) -> impl Future<Output = Result<(), BankError>> + Send;

    /// Phase two for many legs; each its own answer, as for
    /// [`Ledger::prepare_batch`].
    fn decide_batch(
        &self,
        decisions: Vec<(String, Decision)>,
    ) -> impl Future<Output = Result<Vec<Result<(), BankError>>, BankError>> + Send;

    /// One phase for many payments within this bank: each is decided here,
    /// by [`strife_twopc::participant::on_transfer`] with [`check_leg`] on
    /// both sides and its deadline against this bank's clock, and answered
    /// with that decision, durable when the future resolves. A repeated
    /// transfer answers its record and writes nothing; one with a side at
    /// another bank is refused (`Invalid`), one that meets a prepared leg
    /// or another amount is refused (`Conflict`). As for
    /// [`Ledger::prepare_batch`], `Err` only when the batch as a whole failed.
    fn transfer_batch(
        &self,
        transfers: Vec<TransferRequest>,
    ) -> impl Future<Output = Result<Vec<Result<Outcome, BankError>>, BankError>> + Send;

    /// What became of a one-phase payment
    /// ([`strife_twopc::participant::on_resolve`]): its decision, or, for one
    /// this bank never heard of, abort with `reason`, recorded durably before
    /// the answer (a fence: the transfer, if it comes later, is refused). A
    /// prepared leg is refused (`Conflict`).
    fn resolve_transfer(
        &self,
        txn_id: String,
        reason: DeclineReason,
    ) -> impl Future<Output = Result<Outcome, BankError>> + Send;

    /// Committed legs that touch `user`, newest first, at most `limit`.
    fn history(&self, user: String, limit: u32) -> impl Future<Output = Result<Vec<Leg>, BankError>> + Send;

    /// At most `limit` legs with an amount (not bare abort records) whose
    /// transaction id sorts after `after`, in transaction-id order, and the
    /// totals, as of one moment: the audit reads a ledger of any size this
    /// way, a page at a time.
    fn audit_page(
        &self,
        after: Option<String>,
        limit: u32,
    ) -> impl Future<Output = Result<(Vec<Leg>, Totals), BankError>> + Send;

    /// Transaction ids of legs prepared before `before_ms` and not decided
    /// yet, oldest first, at most `limit`: the legs to ask the gateway about.
    fn open_legs(
        &self,
        before_ms: i64,
        limit: u32,
    ) -> impl Future<Output = Result<Vec<String>, BankError>> + Send;

    /// How many legs are prepared and not decided, and when the oldest of
    /// them was prepared (for the `strife_in_doubt_*` metrics).
    fn in_doubt(&self) -> impl Future<Output = Result<InDoubt, BankError>> + Send;
}

/// Legs waiting for a decision.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct InDoubt {
    pub legs: i64,
    /// When the oldest was prepared, in ms since the Unix epoch.
    pub oldest_prepared_at_ms: Option<i64>,
}

/// Where a bank keeps its ledger, from `bank.store`.
pub use strife_rpc::store_url::StoreUrl;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_new_leg_is_checked_on_both_sides() {
        let funds = |balance_minor, held_minor, incoming_minor| {
            Some(Funds { balance_minor, held_minor, incoming_minor })
        };
        assert_eq!(check_leg(Some(funds(100, 40, 0)), None, 60), Vote::Yes);
        assert_eq!(check_leg(Some(funds(100, 41, 0)), None, 60), Vote::No(DeclineReason::InsufficientFunds));
        assert_eq!(check_leg(Some(None), Some(funds(0, 0, 0)), 1), Vote::No(DeclineReason::UnknownPayer));
        assert_eq!(check_leg(None, Some(None), 1), Vote::No(DeclineReason::UnknownPayee));
        assert_eq!(
            check_leg(None, Some(funds(BALANCE_MAX_MINOR - 10, 0, 5)), 6),
            Vote::No(DeclineReason::BalanceLimit)
        );
        assert_eq!(check_leg(None, Some(funds(BALANCE_MAX_MINOR - 10, 0, 5)), 5), Vote::Yes);
    }
}
