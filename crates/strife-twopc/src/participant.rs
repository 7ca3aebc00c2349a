//! The bank's side of two-phase commit, one leg at a time.
//!
//! Every function takes the leg's durable state (`None`: the bank has no
//! record of the payment) and returns the write to make, if any. The bank makes
//! that write (the new state and its money [`Effect`], together, in one
//! transaction) and only then answers: the vote for a prepare, the
//! acknowledgement for a commit or abort.
//!
//! Nothing here remembers anything between calls: a bank's only state is what
//! it forced, so a restarted bank carries on from its store. What it loses in a
//! crash (timers) it rebuilds from its prepared legs, which ask the coordinator
//! for their decision ([`inquiry_delay_ms`]).

use crate::{Decision, Vote};
use std::fmt;

/// A leg's durable state at a bank. A leg with no record at all is written
/// `None` wherever an `Option<LegState>` is taken.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum LegState {
    /// Voted yes, the hold is in place; waiting for the decision. Only the
    /// coordinator's decision ends this state.
    Prepared,
    /// The payment is applied here. Final.
    Committed,
    /// Nothing moved here, and nothing ever will. Final.
    Aborted,
}

/// What a transition does to money, applied in the same write as the new state,
/// to each of the payment's accounts at this bank by its [`Side`] (see
/// [`Account::apply`]); an account at the other bank is that bank's business.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Effect {
    /// The payer's `held += amount`: the money becomes unavailable without
    /// leaving the balance yet, so no other payment can spend it.
    PlaceHold,
    /// The payer's `balance -= amount` and `held -= amount`; the payee's
    /// `balance += amount`.
    ApplyCommit,
    /// The payer's `held -= amount`: the money is available again.
    ReleaseHold,
    /// A one-phase payment, both of whose accounts are at this bank: the
    /// payer's `balance -= amount` and the payee's `balance += amount` at
    /// once, with no hold in between.
    Transfer,
}

/// A durable write the bank must make before it answers.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Force {
    /// The leg's new state.
    pub state: LegState,
    /// What happens to money in the same write, if anything.
    pub effect: Option<Effect>,
}

/// A message that contradicts what the bank already did. A correct
/// coordinator never sends one; the bank refuses it, changes nothing, and
/// raises an alarm.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Violation {
    /// Commit for a leg this bank has no record of: its yes vote was not
    /// durable, or the coordinator committed without this bank's vote.
    CommitUnprepared,
    /// Commit for a leg this bank aborted.
    CommitAborted,
    /// Abort for a leg this bank committed.
    AbortCommitted,
    /// A one-phase transfer, or a question about one, for a leg this bank
    /// prepared under two-phase commit: one payment, two protocols.
    OnePhasePrepared,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Violation::CommitUnprepared => "commit for a leg that was never prepared here",
            Violation::CommitAborted => "commit for a leg that is already aborted here",
            Violation::AbortCommitted => "abort for a leg that is already committed here",
            Violation::OnePhasePrepared => "one-phase transfer for a leg prepared for two-phase commit here",
        })
    }
}

impl std::error::Error for Violation {}

/// Phase one. `precondition_ok` is the bank's local check, made in the same
/// transaction as the write: for the debit side [`Account::can_debit`], for
/// the credit side that the payee's account exists.
///
/// A new leg that passes is forced as prepared with its hold, then votes yes;
/// one that fails is forced as aborted, then votes no. A repeated prepare gets
/// the same vote and writes nothing.
pub fn on_prepare(current: Option<LegState>, precondition_ok: bool) -> (Option<Force>, Vote) {
    match current {
        None if precondition_ok => {
            (Some(Force { state: LegState::Prepared, effect: Some(Effect::PlaceHold) }), Vote::Yes)
        }
        None => (Some(Force { state: LegState::Aborted, effect: None }), Vote::No),
        Some(LegState::Prepared | LegState::Committed) => (None, Vote::Yes),
        Some(LegState::Aborted) => (None, Vote::No),
    }
}

/// Phase two, commit: a prepared leg applies the payment. Acknowledge once
/// the write (if any) is durable.
pub fn on_commit(current: Option<LegState>) -> Result<Option<Force>, Violation> {
    match current {
        Some(LegState::Prepared) => {
            Ok(Some(Force { state: LegState::Committed, effect: Some(Effect::ApplyCommit) }))
        }
        Some(LegState::Committed) => Ok(None),
        Some(LegState::Aborted) => Err(Violation::CommitAborted),
        None => Err(Violation::CommitUnprepared),
    }
}

/// Phase two, abort: a prepared leg releases its hold; an unknown leg is
/// recorded as aborted, so that a prepare still in flight votes no.
/// Acknowledge once the write (if any) is durable.
pub fn on_abort(current: Option<LegState>) -> Result<Option<Force>, Violation> {
    match current {
        Some(LegState::Prepared) => {
            Ok(Some(Force { state: LegState::Aborted, effect: Some(Effect::ReleaseHold) }))
        }
        None => Ok(Some(Force { state: LegState::Aborted, effect: None })),
        Some(LegState::Aborted) => Ok(None),
        Some(LegState::Committed) => Err(Violation::AbortCommitted),
    }
}

/// Phase two for either decision: a decision message and an inquiry's answer
/// are applied the same way.
pub fn on_decision(current: Option<LegState>, decision: Decision) -> Result<Option<Force>, Violation> {
    match decision {
        Decision::Commit => on_commit(current),
        Decision::Abort => on_abort(current),
    }
}

/// A one-phase payment (payer and payee both at this bank): the bank is the
/// decider. A new transfer that arrives in time and passes the bank's
/// check (`precondition_ok`: the payer can pay, the payee can receive) is
/// forced as committed with [`Effect::Transfer`]; one that fails the check,
/// or arrives at or after its deadline (`past_deadline`, by this bank's
/// clock), is forced as aborted. Either way the answer is sent only once
/// the write is durable, and it is the payment's one decision: a repeated
/// transfer (a duplicate, a retry at another replica) answers from the
/// record and writes nothing.
pub fn on_transfer(
    current: Option<LegState>,
    precondition_ok: bool,
    past_deadline: bool,
) -> Result<(Option<Force>, Decision), Violation> {
    match current {
        None if past_deadline || !precondition_ok => {
            Ok((Some(Force { state: LegState::Aborted, effect: None }), Decision::Abort))
        }
        None => {
            Ok((Some(Force { state: LegState::Committed, effect: Some(Effect::Transfer) }), Decision::Commit))
        }
        Some(LegState::Committed) => Ok((None, Decision::Commit)),
        Some(LegState::Aborted) => Ok((None, Decision::Abort)),
        Some(LegState::Prepared) => Err(Violation::OnePhasePrepared),
    }
}

/// The coordinator asks what became of a one-phase payment (its transfer
/// failed or timed out, or the coordinator crashed, or another replica
/// took it over): the recorded decision, or, for a payment this bank never
/// heard of, abort, **forced before the answer** (a fence), so that the
/// transfer, if it arrives later, finds the record and is refused. Once a
/// coordinator has heard abort, no late transfer may commit.
pub fn on_resolve(current: Option<LegState>) -> Result<(Option<Force>, Decision), Violation> {
    match current {
        None => Ok((Some(Force { state: LegState::Aborted, effect: None }), Decision::Abort)),
        Some(LegState::Committed) => Ok((None, Decision::Commit)),
        Some(LegState::Aborted) => Ok((None, Decision::Abort)),
        Some(LegState::Prepared) => Err(Violation::OnePhasePrepared),
    }
}

/// Whether a leg is waiting for a decision, and so should ask the coordinator
/// for it when it has heard nothing for a while.
pub fn awaits_decision(current: Option<LegState>) -> bool {
    current == Some(LegState::Prepared)
}

/// How long a prepared leg waits before its inquiry number `attempt`
/// (counting from 0): doubling from `first_ms`, never more than `max_ms`, so
/// a coordinator that is down is not flooded and one that is back is asked
/// again soon enough.
pub fn inquiry_delay_ms(attempt: u32, first_ms: u64, max_ms: u64) -> u64 {
    first_ms.saturating_mul(1u64.checked_shl(attempt).unwrap_or(u64::MAX)).min(max_ms)
}

/// Which side of a payment an account is on. A bank that holds both accounts
/// of a payment applies each effect to both sides.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Side {
    /// The payer's account: holds, then pays.
    Debit,
    /// The payee's account: only receives, at commit.
    Credit,
}

/// An account's money as the participant rules see it, in minor units.
/// Invariant (after every write): `0 <= held <= balance`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Account {
    /// What the account owns, holds included.
    pub balance_minor: i64,
    /// The part of the balance reserved by prepared debits, not spendable.
    pub held_minor: i64,
}

impl Account {
    /// What a new debit may use: the balance less the holds.
    pub fn available_minor(&self) -> i64 {
        self.balance_minor - self.held_minor
    }

    /// The debit side's precondition for a yes vote.
    pub fn can_debit(&self, amount_minor: i64) -> bool {
        amount_minor > 0 && self.available_minor() >= amount_minor
    }

    /// The account after `effect` on `side` for a payment of `amount_minor`.
    #[must_use]
    pub fn apply(self, effect: Effect, side: Side, amount_minor: i64) -> Account {
        let Account { balance_minor: balance, held_minor: held } = self;
        let (balance_minor, held_minor) = match (side, effect) {
            (Side::Debit, Effect::PlaceHold) => (balance, held + amount_minor),
            (Side::Debit, Effect::ApplyCommit) => (balance - amount_minor, held - amount_minor),
            (Side::Debit, Effect::ReleaseHold) => (balance, held - amount_minor),
            (Side::Credit, Effect::ApplyCommit) => (balance + amount_minor, held),
            (Side::Credit, Effect::PlaceHold | Effect::ReleaseHold) => (balance, held),
            (Side::Debit, Effect::Transfer) => (balance - amount_minor, held),
            (Side::Credit, Effect::Transfer) => (balance + amount_minor, held),
        };
        Account { balance_minor, held_minor }
    }

    /// Whether the invariant `0 <= held <= balance` holds.
    pub fn is_consistent(&self) -> bool {
        0 <= self.held_minor && self.held_minor <= self.balance_minor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const STATES: [Option<LegState>; 4] =
        [None, Some(LegState::Prepared), Some(LegState::Committed), Some(LegState::Aborted)];

    fn force(state: LegState, effect: Option<Effect>) -> Option<Force> {
        Some(Force { state, effect })
    }

    #[test]
    fn a_new_leg_forces_its_vote() {
        assert_eq!(on_prepare(None, true), (force(LegState::Prepared, Some(Effect::PlaceHold)), Vote::Yes));
        assert_eq!(on_prepare(None, false), (force(LegState::Aborted, None), Vote::No));
    }

    #[test]
    fn a_repeated_prepare_repeats_the_vote_and_writes_nothing() {
        for ok in [true, false] {
            assert_eq!(on_prepare(Some(LegState::Prepared), ok), (None, Vote::Yes));
            assert_eq!(on_prepare(Some(LegState::Committed), ok), (None, Vote::Yes));
            assert_eq!(on_prepare(Some(LegState::Aborted), ok), (None, Vote::No));
        }
    }

    #[test]
    fn commit_applies_a_prepared_leg_once() {
        assert_eq!(
            on_commit(Some(LegState::Prepared)),
            Ok(force(LegState::Committed, Some(Effect::ApplyCommit)))
        );
        assert_eq!(on_commit(Some(LegState::Committed)), Ok(None));
        assert_eq!(on_commit(Some(LegState::Aborted)), Err(Violation::CommitAborted));
        assert_eq!(on_commit(None), Err(Violation::CommitUnprepared));
    }

    #[test]
    fn abort_releases_or_leaves_a_tombstone() {
        assert_eq!(
            on_abort(Some(LegState::Prepared)),
            Ok(force(LegState::Aborted, Some(Effect::ReleaseHold)))
        );
        assert_eq!(on_abort(Some(LegState::Aborted)), Ok(None));
        assert_eq!(on_abort(None), Ok(force(LegState::Aborted, None)));
        assert_eq!(on_abort(Some(LegState::Committed)), Err(Violation::AbortCommitted));
        // The tombstone makes a late prepare vote no.
        assert_eq!(on_prepare(Some(LegState::Aborted), true).1, Vote::No);
    }

    #[test]
    fn on_decision_is_commit_or_abort() {
        for s in STATES {
            assert_eq!(on_decision(s, Decision::Commit), on_commit(s));
            assert_eq!(on_decision(s, Decision::Abort), on_abort(s));
        }
    }

    #[test]
    fn decided_legs_never_change_again() {
        for s in [LegState::Committed, LegState::Aborted] {
            for ok in [true, false] {
                assert_eq!(on_prepare(Some(s), ok).0, None);
            }
            for d in [Decision::Commit, Decision::Abort] {
                assert!(matches!(on_decision(Some(s), d), Ok(None) | Err(_)));
            }
        }
    }

    #[test]
    fn only_prepared_legs_inquire() {
        let waiting: Vec<_> = STATES.into_iter().filter(|s| awaits_decision(*s)).collect();
        assert_eq!(waiting, [Some(LegState::Prepared)]);
    }

    #[test]
    fn inquiries_back_off_up_to_a_limit() {
        let delays: Vec<u64> = (0..6).map(|a| inquiry_delay_ms(a, 100, 1_000)).collect();
        assert_eq!(delays, [100, 200, 400, 800, 1_000, 1_000]);
        assert_eq!(inquiry_delay_ms(200, 100, 1_000), 1_000);
        assert_eq!(inquiry_delay_ms(63, u64::MAX, u64::MAX), u64::MAX);
    }

    #[test]
    fn money_moves_only_at_commit() {
        let payer = Account { balance_minor: 100, held_minor: 0 };
        let payee = Account { balance_minor: 5, held_minor: 0 };
        assert!(payer.can_debit(100) && !payer.can_debit(101) && !payer.can_debit(0));

        let held = payer.apply(Effect::PlaceHold, Side::Debit, 60);
        assert_eq!(held, Account { balance_minor: 100, held_minor: 60 });
        assert_eq!(held.available_minor(), 40);
        assert!(!held.can_debit(41), "a hold makes money unavailable");
        assert_eq!(payee.apply(Effect::PlaceHold, Side::Credit, 60), payee);

        let paid = held.apply(Effect::ApplyCommit, Side::Debit, 60);
        assert_eq!(paid, Account { balance_minor: 40, held_minor: 0 });
        assert_eq!(payee.apply(Effect::ApplyCommit, Side::Credit, 60).balance_minor, 65);

        assert_eq!(held.apply(Effect::ReleaseHold, Side::Debit, 60), payer);
        assert_eq!(payee.apply(Effect::ReleaseHold, Side::Credit, 60), payee);
        assert!([payer, held, paid].iter().all(Account::is_consistent));
        assert!(!Account { balance_minor: 10, held_minor: 11 }.is_consistent());
        assert!(!Account { balance_minor: 10, held_minor: -1 }.is_consistent());
    }

    #[test]
    fn a_transfer_decides_once_at_the_bank() {
        let committed = force(LegState::Committed, Some(Effect::Transfer));
        assert_eq!(on_transfer(None, true, false), Ok((committed, Decision::Commit)));
        assert_eq!(on_transfer(None, false, false), Ok((force(LegState::Aborted, None), Decision::Abort)));
        assert_eq!(
            on_transfer(None, true, true),
            Ok((force(LegState::Aborted, None), Decision::Abort)),
            "a transfer past its deadline is refused, however rich the payer"
        );
        for (ok, late) in [(true, false), (false, false), (true, true), (false, true)] {
            assert_eq!(on_transfer(Some(LegState::Committed), ok, late), Ok((None, Decision::Commit)));
            assert_eq!(on_transfer(Some(LegState::Aborted), ok, late), Ok((None, Decision::Abort)));
            assert_eq!(on_transfer(Some(LegState::Prepared), ok, late), Err(Violation::OnePhasePrepared));
        }
    }

    #[test]
    fn a_question_about_an_unknown_transfer_fences_it() {
        assert_eq!(on_resolve(None), Ok((force(LegState::Aborted, None), Decision::Abort)));
        // The fence makes the transfer, arriving late, answer abort.
        assert_eq!(on_transfer(Some(LegState::Aborted), true, false), Ok((None, Decision::Abort)));
        assert_eq!(on_resolve(Some(LegState::Committed)), Ok((None, Decision::Commit)));
        assert_eq!(on_resolve(Some(LegState::Aborted)), Ok((None, Decision::Abort)));
        assert_eq!(on_resolve(Some(LegState::Prepared)), Err(Violation::OnePhasePrepared));
    }

    #[test]
    fn a_transfer_moves_the_money_at_once() {
        let payer = Account { balance_minor: 100, held_minor: 30 };
        let payee = Account { balance_minor: 5, held_minor: 0 };
        assert!(payer.can_debit(70) && !payer.can_debit(71));
        assert_eq!(
            payer.apply(Effect::Transfer, Side::Debit, 70),
            Account { balance_minor: 30, held_minor: 30 }
        );
        assert_eq!(
            payee.apply(Effect::Transfer, Side::Credit, 70),
            Account { balance_minor: 75, held_minor: 0 }
        );
        assert!(payer.apply(Effect::Transfer, Side::Debit, 70).is_consistent(), "other holds stay covered");
    }

    #[test]
    fn violations_explain_themselves() {
        assert_eq!(Violation::AbortCommitted.to_string(), "abort for a leg that is already committed here");
    }
}
