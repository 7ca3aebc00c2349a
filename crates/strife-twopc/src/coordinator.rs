//! The gateway's side of two-phase commit, one payment at a time.
//!
//! The rules are free functions ([`tally`], [`on_inquiry`], [`on_restart`]) that
//! a shell holding its log in a database can call inside a transaction.
//! [`Payment`] puts them together with what the coordinator remembers only in
//! memory (votes and acknowledgements so far) and turns every event into a list
//! of [`Action`]s, to be carried out in order.
//!
//! Timers belong to the shell: it calls [`Payment::on_deadline`] once the
//! deadline has passed, and [`Payment::on_resend_timer`] every so often while
//! [`Payment::awaits_acks`] is true. The current time is always an argument.
//!
//! A payment whose payer and payee are at one bank may instead run in one
//! phase ([`OnePhase`]): the coordinator delegates the decision to that
//! bank, the last (and only) participant, which applies both sides in one
//! forced write or refuses, and answers the outcome. See [`Protocol`].

use crate::{Decision, Vote};

/// Most banks one payment involves: the payer's and the payee's.
pub const BANKS_PER_PAYMENT_MAX: usize = 2;

/// A payment's state in the coordinator's durable log. No record at all is
/// `None` wherever an `Option<PaymentState>` is taken, and means abort.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum PaymentState {
    /// Prepares are out; no decision yet.
    Preparing,
    /// Decided, for good.
    Decided(Decision),
}

/// What the coordinator sends to a bank.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ToBank {
    /// Phase one: prepare your leg and vote.
    Prepare,
    /// Phase two (also the answer to an inquiry about a decided payment):
    /// apply this decision and acknowledge it.
    Decision(Decision),
    /// The answer to an inquiry when the payment is not decided yet: ask
    /// again later.
    NotDecidedYet,
    /// One phase: both sides are yours; decide, apply or refuse, and tell
    /// the outcome ([`crate::participant::on_transfer`]).
    Transfer,
    /// One phase: what became of the transfer? If you never heard of it,
    /// refuse it for good before you answer
    /// ([`crate::participant::on_resolve`]).
    Resolve,
}

/// One thing for the shell to do. Actions come in a list and are carried
/// out in that order; a `Force…` must be durable before anything after it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Action<B> {
    /// Write the payment, with its banks, deadline and [`Protocol`], as
    /// `Preparing`. Comes before the prepares, so that a restart finds the
    /// payment and aborts it (two phases: the write need not be durable
    /// yet, a lost one means abort), or before the transfer, so that a
    /// restart finds it and asks the bank (one phase: durable first, see
    /// [`OnePhase::begin`]).
    ForcePreparing,
    /// Write the decision. Comes before any bank hears it, so that no restart
    /// can reach a different one.
    ForceDecision(Decision),
    /// Send a message to a bank. It may be lost: the protocol repeats what
    /// matters.
    Send(B, ToBank),
    /// Every bank acknowledged the decision: the payment needs nothing more.
    /// A lazy write: if a crash loses it, the decision is sent again and the
    /// banks acknowledge again.
    MarkFinished,
    /// One phase: the bank decided, and this is its decision; the payment
    /// needs nothing more. A lazy write: the bank holds the decision
    /// durably, so if a crash loses it the coordinator asks the bank again
    /// ([`ToBank::Resolve`]) and gets the same answer.
    RecordOutcome(Decision),
}

/// The coordinator's answer to a bank that asks about a payment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum InquiryAnswer {
    /// The decision, which the bank applies as if it had come by itself.
    Decided(Decision),
    /// Still collecting votes, within the deadline: ask again later.
    NotYet,
}

/// How a payment is driven. Chosen once, before the payment is written,
/// and written with it: the rules for a payment found undecided differ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Protocol {
    /// Presumed-abort 2PC: the coordinator decides; an undecided payment
    /// may always be aborted by the coordinator.
    TwoPhase,
    /// The payer's and the payee's accounts are at one bank, which decides
    /// in one forced write. The coordinator never decides such a payment:
    /// an undecided one is settled by asking the bank.
    OnePhase,
}

/// The protocol for a payment that involves `banks` banks: one phase when
/// there is a single bank and it applies one-phase transfers (a bank too
/// old for them answers two-phase messages only).
pub fn protocol_for(banks: usize, bank_applies_transfers: bool) -> Protocol {
    if banks == 1 && bank_applies_transfers { Protocol::OnePhase } else { Protocol::TwoPhase }
}

/// What to do with a payment found undecided that nobody drives any more
/// (the coordinator restarted, its deadline passed, or the replica driving
/// it died).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Abandoned {
    /// Force an abort ([`on_restart`]): presumed abort allows it.
    ForceAbort,
    /// Ask the bank ([`ToBank::Resolve`]) and record its answer: the bank
    /// may have committed it, and only the bank knows.
    AskBank,
}

/// The rule for an undecided payment nobody drives: a two-phase payment is
/// aborted, a one-phase one is asked about. `None` for a decided payment.
pub fn on_abandoned(protocol: Protocol, state: PaymentState) -> Option<Abandoned> {
    match (protocol, state) {
        (_, PaymentState::Decided(_)) => None,
        (Protocol::TwoPhase, PaymentState::Preparing) => Some(Abandoned::ForceAbort),
        (Protocol::OnePhase, PaymentState::Preparing) => Some(Abandoned::AskBank),
    }
}

/// Counts the votes: `votes` has one entry per bank (`None`: not in yet).
/// Returns the decision, or `None` while it must still wait. Any no, or the
/// deadline passing before every yes is in, means abort.
pub fn tally(votes: &[Option<Vote>], past_deadline: bool) -> Option<Decision> {
    if votes.contains(&Some(Vote::No)) || past_deadline {
        Some(Decision::Abort)
    } else if votes.iter().all(|v| *v == Some(Vote::Yes)) {
        Some(Decision::Commit)
    } else {
        None
    }
}

/// Answers a bank's inquiry from the log. The first value, when present, is
/// an abort that must be forced before the answer is sent: the deadline
/// passed, and once a bank has heard abort no late vote may turn into commit.
/// With no record at all the answer is abort, and there is nothing to write.
pub fn on_inquiry(state: Option<PaymentState>, past_deadline: bool) -> (Option<Decision>, InquiryAnswer) {
    match state {
        None => (None, InquiryAnswer::Decided(Decision::Abort)),
        Some(PaymentState::Decided(d)) => (None, InquiryAnswer::Decided(d)),
        Some(PaymentState::Preparing) if past_deadline => {
            (Some(Decision::Abort), InquiryAnswer::Decided(Decision::Abort))
        }
        Some(PaymentState::Preparing) => (None, InquiryAnswer::NotYet),
    }
}

/// Answers a bank's inquiry about a one-phase payment (a bank has no
/// prepared leg of one, so a correct bank never asks): the recorded
/// decision, else "not yet". Never abort: the bank is the decider.
pub fn on_inquiry_one_phase(state: Option<PaymentState>) -> InquiryAnswer {
    match state {
        Some(PaymentState::Decided(d)) => InquiryAnswer::Decided(d),
        Some(PaymentState::Preparing) | None => InquiryAnswer::NotYet,
    }
}

/// After a restart: the decision to force for a payment found in the log,
/// if any. A payment still `Preparing` has lost the votes it had and nobody
/// drives it any more, so it aborts.
pub fn on_restart(state: PaymentState) -> Option<Decision> {
    match state {
        PaymentState::Preparing => Some(Decision::Abort),
        PaymentState::Decided(_) => None,
    }
}

/// One payment as the coordinator drives it. `B` names a bank (an index, a
/// bank name: whatever the shell sends messages to).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment<B> {
    /// The banks that hold a leg of the payment, one or two, all different.
    banks: Vec<B>,
    /// When the votes must all be in; a shell's clock value, in milliseconds.
    deadline_ms: u64,
    /// Mirrors the durable log (after the shell carried out the actions).
    state: PaymentState,
    /// Each bank's vote so far, by position in `banks`. Memory only: lost in
    /// a crash, which is why a restart aborts payments still preparing.
    votes: Vec<Option<Vote>>,
    /// Whether each bank acknowledged the decision. Memory only: after a
    /// crash the decision is simply sent again.
    acked: Vec<bool>,
    /// Every bank acknowledged; mirrors the lazy `MarkFinished` write.
    finished: bool,
}

impl<B: Clone + PartialEq> Payment<B> {
    /// Starts a payment: force it as `Preparing`, then send the prepares.
    ///
    /// # Panics
    /// If `banks` is empty, has more than [`BANKS_PER_PAYMENT_MAX`] entries,
    /// or names a bank twice: the shell must build the list correctly.
    pub fn begin(banks: Vec<B>, deadline_ms: u64) -> (Payment<B>, Vec<Action<B>>) {
        let payment = Payment::new(banks, deadline_ms, PaymentState::Preparing, false);
        let mut actions = vec![Action::ForcePreparing];
        actions.extend(payment.banks.iter().map(|b| Action::Send(b.clone(), ToBank::Prepare)));
        (payment, actions)
    }

    /// Rebuilds a payment from the log after a restart: aborts it if it was
    /// still preparing, and sends its decision again if some bank may not have
    /// applied it yet.
    ///
    /// # Panics
    /// As [`Payment::begin`], on a malformed `banks` list.
    pub fn recover(
        banks: Vec<B>,
        deadline_ms: u64,
        state: PaymentState,
        finished: bool,
    ) -> (Payment<B>, Vec<Action<B>>) {
        let finished = finished && state != PaymentState::Preparing;
        let mut payment = Payment::new(banks, deadline_ms, state, finished);
        let actions = match on_restart(state) {
            Some(d) => payment.decide(d),
            None => payment.on_resend_timer(),
        };
        (payment, actions)
    }

    fn new(banks: Vec<B>, deadline_ms: u64, state: PaymentState, finished: bool) -> Payment<B> {
        assert!(
            (1..=BANKS_PER_PAYMENT_MAX).contains(&banks.len()),
            "a payment involves one or two banks, not {}",
            banks.len()
        );
        assert!(banks.len() < 2 || banks[0] != banks[1], "a bank is listed twice in one payment");
        let n = banks.len();
        Payment { banks, deadline_ms, state, votes: vec![None; n], acked: vec![false; n], finished }
    }

    /// A bank's vote. Decides as soon as the votes allow; a vote for a
    /// decided payment (late, repeated) or from a bank not involved changes
    /// nothing.
    pub fn on_vote(&mut self, from: &B, vote: Vote, now_ms: u64) -> Vec<Action<B>> {
        let Some(i) = self.position(from) else { return Vec::new() };
        if self.state != PaymentState::Preparing {
            return Vec::new();
        }
        self.votes[i] = Some(vote);
        match tally(&self.votes, now_ms >= self.deadline_ms) {
            Some(d) => self.decide(d),
            None => Vec::new(),
        }
    }

    /// The deadline timer. Aborts a payment still preparing once `now_ms` has
    /// reached the deadline; does nothing otherwise (so an early or repeated
    /// call is harmless).
    pub fn on_deadline(&mut self, now_ms: u64) -> Vec<Action<B>> {
        if self.state == PaymentState::Preparing && now_ms >= self.deadline_ms {
            self.decide(Decision::Abort)
        } else {
            Vec::new()
        }
    }

    /// A bank acknowledged the decision. Once every bank has, the payment is
    /// finished.
    pub fn on_ack(&mut self, from: &B) -> Vec<Action<B>> {
        let Some(i) = self.position(from) else { return Vec::new() };
        if !self.awaits_acks() {
            return Vec::new();
        }
        self.acked[i] = true;
        if self.acked.iter().all(|a| *a) {
            self.finished = true;
            vec![Action::MarkFinished]
        } else {
            Vec::new()
        }
    }

    /// The resend timer: sends the decision again to every bank that has not
    /// acknowledged it.
    pub fn on_resend_timer(&mut self) -> Vec<Action<B>> {
        let PaymentState::Decided(d) = self.state else { return Vec::new() };
        if self.finished {
            return Vec::new();
        }
        self.banks
            .iter()
            .zip(&self.acked)
            .filter(|(_, acked)| !**acked)
            .map(|(b, _)| Action::Send(b.clone(), ToBank::Decision(d)))
            .collect()
    }

    /// A bank asks what became of the payment (see [`on_inquiry`]).
    pub fn on_inquiry(&mut self, from: &B, now_ms: u64) -> Vec<Action<B>> {
        match on_inquiry(Some(self.state), now_ms >= self.deadline_ms) {
            // Deciding sends the decision to every bank, `from` included.
            (Some(d), _) => self.decide(d),
            (None, InquiryAnswer::Decided(d)) => vec![Action::Send(from.clone(), ToBank::Decision(d))],
            (None, InquiryAnswer::NotYet) => vec![Action::Send(from.clone(), ToBank::NotDecidedYet)],
        }
    }

    /// What the log says of the payment.
    pub fn state(&self) -> PaymentState {
        self.state
    }

    /// When the votes must all be in.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The banks involved, in the order the prepares went out.
    pub fn banks(&self) -> &[B] {
        &self.banks
    }

    /// Decided, and some bank has not acknowledged yet: the shell keeps a
    /// resend timer running.
    pub fn awaits_acks(&self) -> bool {
        matches!(self.state, PaymentState::Decided(_)) && !self.finished
    }

    /// Every bank acknowledged the decision.
    pub fn is_finished(&self) -> bool {
        self.finished
    }

    fn position(&self, bank: &B) -> Option<usize> {
        self.banks.iter().position(|b| b == bank)
    }

    fn decide(&mut self, d: Decision) -> Vec<Action<B>> {
        debug_assert_eq!(self.state, PaymentState::Preparing, "a payment is decided once");
        self.state = PaymentState::Decided(d);
        self.acked.iter_mut().for_each(|a| *a = false);
        let mut actions = vec![Action::ForceDecision(d)];
        actions.extend(self.banks.iter().map(|b| Action::Send(b.clone(), ToBank::Decision(d))));
        actions
    }
}

/// A one-phase payment as the coordinator drives it: both accounts are at
/// `bank`, which decides. The coordinator writes the payment (forced: see
/// [`OnePhase::begin`]), sends one [`ToBank::Transfer`], and records the
/// bank's answer lazily; it never decides on its own. Whenever the outcome
/// is unknown (the transfer failed or timed out, the deadline passed with
/// no answer, a restart), it asks the bank ([`ToBank::Resolve`]), which
/// fences a transfer it never heard of: so the payment has exactly one
/// decision, the bank's, and the coordinator learns it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OnePhase<B> {
    /// The bank that holds both accounts.
    bank: B,
    /// After it, the bank refuses the transfer, and an undecided payment
    /// is asked about.
    deadline_ms: u64,
    /// Mirrors the log once the shell carried out the actions (a lost
    /// [`Action::RecordOutcome`] leaves the log `Preparing`).
    state: PaymentState,
}

impl<B: Clone + PartialEq> OnePhase<B> {
    /// Starts a payment: write it as `Preparing` (marked one-phase), then
    /// send the transfer. The write must be **durable before the transfer
    /// goes out**: unlike under presumed abort, a lost record is not a
    /// harmless abort here, because the bank may commit as soon as it hears
    /// of the payment; a coordinator that lost the record would neither
    /// know of a committed payment nor stop the customer's retry from
    /// starting it again under a new transaction id.
    pub fn begin(bank: B, deadline_ms: u64) -> (OnePhase<B>, Vec<Action<B>>) {
        let actions = vec![Action::ForcePreparing, Action::Send(bank.clone(), ToBank::Transfer)];
        (OnePhase { bank, deadline_ms, state: PaymentState::Preparing }, actions)
    }

    /// Rebuilds a payment from the log after a restart. Nothing to do at
    /// once: an undecided one is asked about once its deadline passes
    /// ([`OnePhase::on_timer`]), when a transfer still in flight would be
    /// refused anyway; a decided one is finished.
    pub fn recover(bank: B, deadline_ms: u64, state: PaymentState) -> OnePhase<B> {
        OnePhase { bank, deadline_ms, state }
    }

    /// The bank's answer to the transfer or to a question about it: its
    /// decision, recorded lazily. A repeated answer changes nothing (the
    /// bank answers one decision per payment).
    pub fn on_outcome(&mut self, from: &B, decision: Decision) -> Vec<Action<B>> {
        if *from != self.bank || self.state != PaymentState::Preparing {
            return Vec::new();
        }
        self.state = PaymentState::Decided(decision);
        vec![Action::RecordOutcome(decision)]
    }

    /// The transfer call failed or timed out: whether the bank applied it
    /// is unknown. Ask it (the question fences a transfer it has not seen).
    pub fn on_transfer_failed(&mut self) -> Vec<Action<B>> {
        self.ask()
    }

    /// The deadline timer, and again every so often while undecided: once
    /// the deadline has passed with no answer, ask the bank.
    pub fn on_timer(&mut self, now_ms: u64) -> Vec<Action<B>> {
        if now_ms >= self.deadline_ms { self.ask() } else { Vec::new() }
    }

    /// A bank asks about the payment (see [`on_inquiry_one_phase`]).
    pub fn on_inquiry(&self, from: &B) -> Vec<Action<B>> {
        match on_inquiry_one_phase(Some(self.state)) {
            InquiryAnswer::Decided(d) => vec![Action::Send(from.clone(), ToBank::Decision(d))],
            InquiryAnswer::NotYet => vec![Action::Send(from.clone(), ToBank::NotDecidedYet)],
        }
    }

    fn ask(&self) -> Vec<Action<B>> {
        match self.state {
            PaymentState::Preparing => vec![Action::Send(self.bank.clone(), ToBank::Resolve)],
            PaymentState::Decided(_) => Vec::new(),
        }
    }

    /// What the coordinator knows of the payment.
    pub fn state(&self) -> PaymentState {
        self.state
    }

    /// When the bank stops accepting the transfer.
    pub fn deadline_ms(&self) -> u64 {
        self.deadline_ms
    }

    /// The bank that decides.
    pub fn bank(&self) -> &B {
        &self.bank
    }

    /// The bank's decision is known: nothing more to send.
    pub fn is_finished(&self) -> bool {
        matches!(self.state, PaymentState::Decided(_))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use Action::{ForceDecision, ForcePreparing, MarkFinished, RecordOutcome, Send};
    use Decision::{Abort, Commit};

    const DEADLINE_MS: u64 = 100;

    fn two_banks() -> Payment<&'static str> {
        let (p, actions) = Payment::begin(vec!["a", "b"], DEADLINE_MS);
        assert_eq!(actions, [ForcePreparing, Send("a", ToBank::Prepare), Send("b", ToBank::Prepare)]);
        p
    }

    fn decided(d: Decision) -> Vec<Action<&'static str>> {
        vec![ForceDecision(d), Send("a", ToBank::Decision(d)), Send("b", ToBank::Decision(d))]
    }

    #[test]
    fn tally_needs_every_yes_in_time() {
        use Vote::{No, Yes};
        assert_eq!(tally(&[Some(Yes), Some(Yes)], false), Some(Commit));
        assert_eq!(tally(&[Some(Yes)], false), Some(Commit));
        assert_eq!(tally(&[Some(Yes), None], false), None);
        assert_eq!(tally(&[None, Some(No)], false), Some(Abort));
        assert_eq!(tally(&[Some(Yes), None], true), Some(Abort));
        assert_eq!(tally(&[Some(Yes), Some(Yes)], true), Some(Abort), "yes after the deadline is too late");
    }

    #[test]
    fn all_yes_commits_with_the_decision_forced_first() {
        let mut p = two_banks();
        assert_eq!(p.on_vote(&"a", Vote::Yes, 10), []);
        assert_eq!(p.on_vote(&"a", Vote::Yes, 11), [], "a repeated vote changes nothing");
        assert_eq!(p.on_vote(&"b", Vote::Yes, 12), decided(Commit));
        assert_eq!(p.state(), PaymentState::Decided(Commit));
        assert!(p.awaits_acks());
    }

    #[test]
    fn one_no_aborts_and_late_votes_change_nothing() {
        let mut p = two_banks();
        assert_eq!(p.on_vote(&"b", Vote::No, 10), decided(Abort));
        assert_eq!(p.on_vote(&"a", Vote::Yes, 11), []);
        assert_eq!(p.on_vote(&"b", Vote::No, 12), []);
        assert_eq!(p.on_deadline(DEADLINE_MS), []);
        assert_eq!(p.state(), PaymentState::Decided(Abort));
    }

    #[test]
    fn the_deadline_aborts_a_payment_still_preparing() {
        let mut p = two_banks();
        assert_eq!(p.on_vote(&"a", Vote::Yes, 10), []);
        assert_eq!(p.on_deadline(DEADLINE_MS - 1), [], "too early");
        assert_eq!(p.on_deadline(DEADLINE_MS), decided(Abort));
        assert_eq!(p.on_deadline(DEADLINE_MS + 1), [], "once");
        assert_eq!(p.on_vote(&"b", Vote::Yes, DEADLINE_MS + 2), []);
    }

    #[test]
    fn the_last_yes_after_the_deadline_aborts() {
        let mut p = two_banks();
        p.on_vote(&"a", Vote::Yes, 10);
        assert_eq!(p.on_vote(&"b", Vote::Yes, DEADLINE_MS), decided(Abort));
    }

    #[test]
    fn votes_from_strangers_are_ignored() {
        let mut p = two_banks();
        assert_eq!(p.on_vote(&"c", Vote::No, 10), []);
        assert_eq!(p.on_ack(&"c"), []);
        assert_eq!(p.state(), PaymentState::Preparing);
    }

    #[test]
    fn decisions_are_resent_until_every_bank_acks() {
        let mut p = two_banks();
        assert_eq!(p.on_resend_timer(), [], "nothing to resend before the decision");
        assert_eq!(p.on_ack(&"a"), [], "an ack before the decision means nothing");
        p.on_vote(&"a", Vote::Yes, 1);
        p.on_vote(&"b", Vote::Yes, 2);
        assert_eq!(p.on_resend_timer(), decided(Commit)[1..]);
        assert_eq!(p.on_ack(&"b"), []);
        assert_eq!(p.on_ack(&"b"), []);
        assert_eq!(p.on_resend_timer(), [Send("a", ToBank::Decision(Commit))]);
        assert_eq!(p.on_ack(&"a"), [MarkFinished]);
        assert!(p.is_finished() && !p.awaits_acks());
        assert_eq!(p.on_ack(&"a"), [], "finished once");
        assert_eq!(p.on_resend_timer(), []);
    }

    #[test]
    fn inquiry_rules() {
        assert_eq!(on_inquiry(None, false), (None, InquiryAnswer::Decided(Abort)), "presumed abort");
        assert_eq!(on_inquiry(None, true), (None, InquiryAnswer::Decided(Abort)));
        for d in [Commit, Abort] {
            for past in [false, true] {
                let state = Some(PaymentState::Decided(d));
                assert_eq!(on_inquiry(state, past), (None, InquiryAnswer::Decided(d)));
            }
        }
        assert_eq!(on_inquiry(Some(PaymentState::Preparing), false), (None, InquiryAnswer::NotYet));
        assert_eq!(
            on_inquiry(Some(PaymentState::Preparing), true),
            (Some(Abort), InquiryAnswer::Decided(Abort)),
            "past the deadline the abort is forced before the answer"
        );
    }

    #[test]
    fn an_inquiry_past_the_deadline_forces_the_abort() {
        let mut p = two_banks();
        p.on_vote(&"a", Vote::Yes, 1);
        assert_eq!(p.on_inquiry(&"a", DEADLINE_MS - 1), [Send("a", ToBank::NotDecidedYet)]);
        assert_eq!(p.on_inquiry(&"a", DEADLINE_MS), decided(Abort));
        assert_eq!(p.on_vote(&"b", Vote::Yes, DEADLINE_MS + 1), [], "a late yes cannot commit");
        assert_eq!(p.on_inquiry(&"b", DEADLINE_MS + 2), [Send("b", ToBank::Decision(Abort))]);
    }

    #[test]
    fn an_inquiry_about_a_decided_payment_gets_the_decision() {
        let mut p = two_banks();
        p.on_vote(&"a", Vote::Yes, 1);
        p.on_vote(&"b", Vote::Yes, 2);
        assert_eq!(p.on_inquiry(&"b", 3), [Send("b", ToBank::Decision(Commit))]);
        assert_eq!(p.on_inquiry(&"b", DEADLINE_MS * 2), [Send("b", ToBank::Decision(Commit))]);
    }

    #[test]
    fn restart_aborts_what_was_preparing() {
        assert_eq!(on_restart(PaymentState::Preparing), Some(Abort));
        assert_eq!(on_restart(PaymentState::Decided(Commit)), None);
        let (p, actions) = Payment::recover(vec!["a", "b"], DEADLINE_MS, PaymentState::Preparing, false);
        assert_eq!(actions, decided(Abort));
        assert_eq!(p.state(), PaymentState::Decided(Abort));
    }

    #[test]
    fn restart_resends_unfinished_decisions_only() {
        let unfinished = PaymentState::Decided(Commit);
        let (mut p, actions) = Payment::recover(vec!["a", "b"], DEADLINE_MS, unfinished, false);
        assert_eq!(actions, decided(Commit)[1..], "the decision is on disk already: no new write");
        p.on_ack(&"a");
        assert_eq!(p.on_ack(&"b"), [MarkFinished]);

        let (p, actions) = Payment::recover(vec!["a"], DEADLINE_MS, PaymentState::Decided(Abort), true);
        assert_eq!(actions, []);
        assert!(p.is_finished());
    }

    #[test]
    fn one_bank_gets_one_prepare() {
        let (mut p, actions) = Payment::begin(vec![7_u32], DEADLINE_MS);
        assert_eq!(actions, [ForcePreparing, Send(7, ToBank::Prepare)]);
        assert_eq!(p.on_vote(&7, Vote::Yes, 1), [ForceDecision(Commit), Send(7, ToBank::Decision(Commit))]);
        assert_eq!(p.banks(), [7]);
        assert_eq!(p.deadline_ms(), DEADLINE_MS);
    }

    #[test]
    fn one_bank_that_applies_transfers_runs_in_one_phase() {
        assert_eq!(protocol_for(1, true), Protocol::OnePhase);
        assert_eq!(protocol_for(1, false), Protocol::TwoPhase, "a bank too old for transfers");
        assert_eq!(protocol_for(2, true), Protocol::TwoPhase);
    }

    #[test]
    fn an_abandoned_payment_is_aborted_only_under_two_phase_commit() {
        assert_eq!(on_abandoned(Protocol::TwoPhase, PaymentState::Preparing), Some(Abandoned::ForceAbort));
        assert_eq!(on_abandoned(Protocol::OnePhase, PaymentState::Preparing), Some(Abandoned::AskBank));
        for p in [Protocol::TwoPhase, Protocol::OnePhase] {
            for d in [Commit, Abort] {
                assert_eq!(on_abandoned(p, PaymentState::Decided(d)), None);
            }
        }
    }

    #[test]
    fn one_phase_writes_then_transfers_and_records_the_bank_s_decision() {
        let (mut p, actions) = OnePhase::begin("a", DEADLINE_MS);
        assert_eq!(actions, [ForcePreparing, Send("a", ToBank::Transfer)]);
        assert_eq!(p.on_outcome(&"b", Commit), [], "not the payment's bank");
        assert_eq!(p.on_outcome(&"a", Commit), [RecordOutcome(Commit)]);
        assert!(p.is_finished());
        assert_eq!(p.on_outcome(&"a", Commit), [], "a repeated answer records nothing");
        assert_eq!(p.on_timer(DEADLINE_MS * 2), [], "decided: nothing to ask");
        assert_eq!(p.on_transfer_failed(), []);
        assert_eq!(p.state(), PaymentState::Decided(Commit));
        assert_eq!((p.bank(), p.deadline_ms()), (&"a", DEADLINE_MS));
    }

    #[test]
    fn one_phase_never_decides_on_its_own_but_asks_the_bank() {
        let (mut p, _) = OnePhase::begin("a", DEADLINE_MS);
        assert_eq!(p.on_transfer_failed(), [Send("a", ToBank::Resolve)], "the outcome is unknown: ask");
        assert_eq!(p.on_timer(DEADLINE_MS - 1), [], "in time: the transfer may still be answered");
        assert_eq!(p.on_timer(DEADLINE_MS), [Send("a", ToBank::Resolve)]);
        assert_eq!(p.on_timer(DEADLINE_MS + 100), [Send("a", ToBank::Resolve)], "until it is answered");
        assert_eq!(p.state(), PaymentState::Preparing, "no decision of its own");
        assert_eq!(p.on_inquiry(&"a"), [Send("a", ToBank::NotDecidedYet)]);
        assert_eq!(p.on_outcome(&"a", Abort), [RecordOutcome(Abort)]);
        assert_eq!(p.on_inquiry(&"a"), [Send("a", ToBank::Decision(Abort))]);
    }

    #[test]
    fn one_phase_after_a_restart_asks_once_the_deadline_passed() {
        let mut p = OnePhase::recover("a", DEADLINE_MS, PaymentState::Preparing);
        assert_eq!(p.on_timer(DEADLINE_MS - 1), []);
        assert_eq!(p.on_timer(DEADLINE_MS), [Send("a", ToBank::Resolve)]);
        let p = OnePhase::recover("a", DEADLINE_MS, PaymentState::Decided(Commit));
        assert!(p.is_finished());
        assert_eq!(on_inquiry_one_phase(None), InquiryAnswer::NotYet, "never presumed aborted");
    }

    #[test]
    #[should_panic(expected = "listed twice")]
    fn a_bank_listed_twice_is_a_bug() {
        let _ = Payment::begin(vec!["a", "a"], DEADLINE_MS);
    }

    #[test]
    #[should_panic(expected = "one or two banks")]
    fn a_payment_without_banks_is_a_bug() {
        let _ = Payment::<&str>::begin(Vec::new(), DEADLINE_MS);
    }
}
