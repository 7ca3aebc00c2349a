//! Two-phase commit for Strife payments, as pure state machines.
//!
//! Nothing here does IO, reads a clock or draws a random number: the caller
//! (an *IO shell*: the gateway over SQLite and gRPC, a bank over SQLite, or the
//! simulation in `tests/simulation.rs`) passes events and the current time in,
//! and gets back what to write durably and what to send. The shell must carry
//! out the returned actions **in order**, and must not send anything that
//! follows a durable write until that write is on disk.
//!
//! # Parties
//!
//! One **coordinator** (the gateway) and, per payment, one or two
//! **participants** (banks). A payment moves an amount from a payer account at
//! the payer's bank to a payee account at the payee's bank; when both accounts
//! are at one bank, that bank holds both sides of a single leg and gets a single
//! prepare. The transaction id is the key at every party.
//!
//! # The protocol (presumed abort)
//!
//! Coordinator, per payment ([`coordinator::Payment`]):
//! 1. Writes the payment as `Preparing`, with a deadline, then sends `Prepare`
//!    to each bank involved.
//! 2. All banks vote yes before the deadline: the decision is commit. Any no,
//!    or the deadline passing first: the decision is abort.
//! 3. **Forces** the decision, then sends it to every bank, again and again on
//!    a timer until each acknowledges, then marks the payment finished (a lazy
//!    write: losing it only costs a few repeated messages).
//! 4. Answers a bank's inquiry from its log ([`coordinator::on_inquiry`]); no
//!    record at all means abort.
//! 5. After a restart, aborts (durably) every payment still `Preparing`, since
//!    nobody drives them any more, and re-sends every unfinished decision.
//!
//! # One phase, for a payment within one bank
//!
//! When payer and payee are at the same bank, there is nothing to
//! coordinate: the coordinator delegates the decision to that bank (the
//! "last participant" optimisation). [`coordinator::OnePhase`]:
//! 1. **Forces** the payment as `Preparing`, marked one-phase, then sends
//!    one `Transfer` (both sides, with the deadline).
//! 2. The bank ([`participant::on_transfer`]) applies both sides in one
//!    forced write, or refuses (no funds, unknown account, past the
//!    deadline) with a forced aborted record, and answers that decision.
//! 3. The coordinator records the bank's decision lazily and answers the
//!    customer.
//! 4. Presumed abort does not hold for these payments: the coordinator
//!    never aborts one on its own. When the outcome is unknown (the
//!    transfer failed or timed out, the deadline passed, a restart, a
//!    takeover), it asks the bank (`Resolve`); a bank that never heard of
//!    the payment first forces it as aborted (a fence), so that the transfer,
//!    arriving late, is refused ([`participant::on_resolve`]).
//!
//! A payment therefore has exactly one decision, made and forced at one
//! place: the coordinator's log for a two-phase payment, the bank's ledger
//! for a one-phase one. Which rule applies to a payment found undecided is
//! [`coordinator::on_abandoned`].
//!
//! Participant, per leg ([`participant`]): `None` → `Prepared` → `Committed`
//! or `Aborted`, or `None` → `Aborted`. A prepared bank holds the payer's money
//! (a **hold**: unavailable, not yet gone) and never releases it on its own; if
//! the decision is slow to come, it asks the coordinator (an inquiry, with
//! backoff) and applies the answer.
//!
//! # Why each durable write is needed
//!
//! - **The yes vote is forced before it is sent** (the prepared leg and its
//!   hold). A bank that voted yes has promised to commit if told to. If it
//!   crashed and came back without the record, a commit would find nothing
//!   to apply (money created at the payee, never taken from the payer), and the
//!   hold would be gone, so the money could be spent twice.
//! - **A no vote is written too** (the leg as aborted), so that a repeated
//!   prepare, delayed in the network, gets the same no: a yes after a no would
//!   hold money for a payment that is already aborted.
//! - **The decision is forced before any bank hears it.** Otherwise the
//!   coordinator could send commit, crash before the write, restart, find the
//!   payment still `Preparing`, and abort it, while a bank has already committed
//!   its leg: one side of the payment done, the other undone.
//! - **An inquiry past the deadline forces the abort before answering it**, for
//!   the same reason: once a bank has heard abort, the coordinator must never
//!   decide commit, even if the last yes vote arrives a moment later.
//! - **An abort for an unknown leg leaves a record** (a tombstone), so that a
//!   prepare still in flight votes no instead of placing a hold that only a
//!   later inquiry would release.
//! - **Commit and abort at a bank are one durable write each** (the state and
//!   the money together), acknowledged only after the write: an acknowledged
//!   leg is applied exactly once.
//! - **A one-phase payment's record is forced before its transfer is
//!   sent.** The bank may commit at once; a coordinator that lost the record
//!   would not know of a committed payment, and the customer's retry (never
//!   answered) would start it again under a new transaction id: paid twice.
//! - **A bank forces its one-phase decision before answering**, and a
//!   question about a transfer it never saw forces an abort (the fence)
//!   before answering, for the same reason as the inquiry past the deadline:
//!   once the coordinator has heard abort, no late transfer may commit.
//! - **The coordinator's record of a one-phase decision is lazy**: the bank
//!   holds the decision, so a lost record is asked for again.
//! - **The payment is written as `Preparing` before any prepare is sent**, so
//!   that a restarted coordinator finds it and tells its banks to abort at
//!   once. Safety does not depend on it (presumed abort would answer a bank's
//!   inquiry about an unknown payment with abort anyway), but without it a hold
//!   would wait for an inquiry to be released.
//!
//! # What is never done
//!
//! - A bank never releases a prepared hold without the coordinator's decision.
//! - The coordinator never changes a decision, and never sends one that is not
//!   on disk.
//! - Late, repeated or reordered messages never change a decided payment or
//!   leg; a message that contradicts a decided leg is a
//!   [`participant::Violation`], which a correct coordinator never causes.

pub mod coordinator;
pub mod participant;

/// The coordinator's decision for a payment: the only two outcomes there are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Decision {
    /// Every bank voted yes in time: every leg applies the payment.
    Commit,
    /// Some bank voted no, or the votes did not all arrive in time: every leg
    /// releases what it holds, and no money moves.
    Abort,
}

/// A bank's answer to `Prepare`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Vote {
    /// The leg is prepared and durable: the bank will commit if told to.
    Yes,
    /// The leg cannot be prepared (or was already aborted): the payment must
    /// abort.
    No,
}
