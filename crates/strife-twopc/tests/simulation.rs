//! A seeded, deterministic simulation of Strife's two-phase commit.
//!
//! One coordinator and three banks, driven only through the crate's pure state
//! machines, exchange messages over a simulated network that drops, delays,
//! duplicates and reorders them, while parties crash (keeping only what they
//! forced) and restart. Time is an integer clock; every event (a delivery, a
//! timer, a crash) sits in one queue ordered by (time, sequence number), so a
//! seed replays exactly. Each bank's clock is off by up to
//! `CLOCK_SKEW_MAX_MS` either way (it judges transfer deadlines by it).
//!
//! Payments within one bank run in one phase (`OnePhase`: the bank decides)
//! for most of a run's payments, and in two phases for the rest, as with a
//! bank too old for transfers. Customers ask again until they get an
//! answer, and every answer they get (the first one, and every replay) must
//! be the payment's one outcome.
//!
//! After every step the money is checked (conservation, no negative balance,
//! `0 <= held <= balance`) along with atomicity (a bank commits only what the
//! coordinator's log says is committed; the log never decides against what a
//! bank already did). After the faults stop and the queue drains, every payment
//! must have one outcome everywhere, no hold may remain, and the balances must
//! reflect each committed payment exactly once.
//!
//! - `STRIFE_SIM_SEEDS=<n>`: how many seeds `simulate_many_seeds` runs.
//! - `STRIFE_SIM_SEED=<n>`: run only that seed; `STRIFE_SIM_TRACE=1` prints
//!   every step.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::time::Instant;
use strife_twopc::coordinator::{
    self, Abandoned, Action, InquiryAnswer, OnePhase, Payment, PaymentState, Protocol, ToBank,
};
use strife_twopc::participant::{self, Account, Force, LegState, Side};
use strife_twopc::{Decision, Vote};

/// Seeds `simulate_many_seeds` runs: 15 to 23 s in a debug build on 2 busy
/// cores (about 700 steps a seed, customers asking again until answered).
const SEEDS_DEFAULT: u64 = 2_000;
/// Seeds a broken variant may take before the checker must have caught it.
const MUTATION_SEEDS_MAX: u64 = 200;

const BANK_COUNT: usize = 3;
const ACCOUNTS_PER_BANK: usize = 10;
const BALANCE_START_MAX_MINOR: u64 = 1_000;
/// Large next to the balances, so that some payments are declined for want of funds.
const AMOUNT_MAX_MINOR: u64 = 400;
const PAYMENTS_MIN: u64 = 20;
const PAYMENTS_MAX: u64 = 60;
/// Customers submit payments within this window.
const SUBMIT_WINDOW_MS: u64 = 2_500;
/// A customer asks again this often until the gateway has the payment.
const CLIENT_RETRY_MS: u64 = 150;
/// From this time on, no message is lost or duplicated and nobody crashes.
const HEAL_AT_MS: u64 = 3_000;
const DEADLINE_MS: u64 = 500;
/// A one-phase transfer not answered by then is asked about (the gateway's
/// call timeout), before the deadline: the question may overtake a slow
/// transfer and fence it.
const TRANSFER_TIMEOUT_MS: u64 = 300;
/// Most a bank's clock is ahead of or behind the simulation's.
const CLOCK_SKEW_MAX_MS: u64 = 150;
/// The gateway's lazy writes reach the disk within this (its next batch).
const LAZY_FLUSH_MAX_MS: u64 = 8;
/// The gateway looks for expired deadlines this often, so its deadline timer
/// fires up to this late; an inquiry or a vote may get there first.
const DEADLINE_SCAN_MS: u64 = 200;
const RESEND_MS: u64 = 100;
const INQUIRY_FIRST_MS: u64 = 150;
const INQUIRY_MAX_MS: u64 = 1_200;
/// The broken bank of `Mutation::BankReleasesHold` gives up after this many inquiries.
const GIVE_UP_ATTEMPTS: u32 = 1;
const CRASHES_PER_NODE_MAX: u64 = 3;
const DOWN_MAX_MS: u64 = 600;
/// Bound on the steps of one run: a run that does not settle is a failure.
const STEPS_MAX: u64 = 200_000;

/// SplitMix64: a tiny, well-mixed PRNG, so that a seed is all a run needs.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `lo..=hi`.
    fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next() % (hi - lo + 1)
    }

    fn permille(&mut self, p: u64) -> bool {
        self.next() % 1_000 < p
    }
}

/// A deliberately broken variant, to prove that the checks can fail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mutation {
    /// The real protocol.
    None,
    /// The coordinator sends its decision before forcing it.
    SendBeforeForce,
    /// A bank sends its vote before its prepared record is durable.
    VoteBeforeForce,
    /// A bank tired of waiting for the decision releases its hold by itself.
    BankReleasesHold,
    /// The coordinator aborts a one-phase payment on its own at its
    /// deadline, as presumed abort would, instead of asking the bank.
    OnePhaseAbortedAlone,
    /// A bank asked about a one-phase transfer it never saw answers abort
    /// without recording it, so the transfer may still commit later.
    ResolveWithoutFence,
}

type Txn = usize;
type Bank = usize;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Node {
    Coordinator,
    Bank(Bank),
}

/// An account at a bank. The index may be `ACCOUNTS_PER_BANK`: no such account.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AccountRef {
    bank: Bank,
    index: usize,
}

/// A payment as the customer asked for it (what `Prepare` carries).
#[derive(Debug, Clone)]
struct Spec {
    payer: AccountRef,
    payee: AccountRef,
    amount_minor: i64,
    /// How the gateway runs it: one phase only within one bank.
    protocol: Protocol,
}

impl Spec {
    fn banks(&self) -> Vec<Bank> {
        if self.payer.bank == self.payee.bank {
            vec![self.payer.bank]
        } else {
            vec![self.payer.bank, self.payee.bank]
        }
    }

    /// The accounts of this payment at `bank`, with their sides.
    fn sides(&self, bank: Bank) -> impl Iterator<Item = (Side, usize)> + use<> {
        let debit = (self.payer.bank == bank).then_some((Side::Debit, self.payer.index));
        let credit = (self.payee.bank == bank).then_some((Side::Credit, self.payee.index));
        debit.into_iter().chain(credit)
    }

    /// The other bank of a cross-bank payment.
    fn other_bank(&self, bank: Bank) -> Option<Bank> {
        match (self.payer.bank, self.payee.bank) {
            (payer, payee) if payer == payee => None,
            (payer, payee) => Some(if bank == payer { payee } else { payer }),
        }
    }
}

/// What a bank tells the coordinator about a payment.
#[derive(Debug, Clone, Copy)]
enum FromBank {
    Vote(Vote),
    Ack,
    Inquiry,
    /// One phase: the bank's decision (the answer to a transfer or to a
    /// question about one).
    Outcome(Decision),
}

#[derive(Debug, Clone, Copy)]
enum CoordinatorTimer {
    Deadline,
    Resend,
    /// One phase: the transfer call's timeout.
    TransferTimeout,
}

/// Everything that happens, in the order of the queue. Timers carry the
/// incarnation (epoch) of the party that set them: a crash cancels them.
#[derive(Debug, Clone, Copy)]
enum Event {
    /// A customer asks the gateway to make a payment.
    Submit(Txn),
    /// A message reaches a bank (unless it is down).
    AtBank(Bank, Txn, ToBank),
    /// A message from a bank reaches the coordinator (unless it is down).
    AtCoordinator(Bank, Txn, FromBank),
    CoordinatorTimer(u64, Txn, CoordinatorTimer),
    /// A prepared leg's inquiry number `attempt` is due.
    InquiryTimer(Bank, u64, Txn, u32),
    /// The coordinator's lazy writes of incarnation `.0` reach the disk.
    Flush(u64),
    Crash(Node),
    Restart(Node),
}

/// The coordinator's durable record of a payment.
#[derive(Debug, Clone)]
struct LogRecord {
    banks: Vec<Bank>,
    deadline_ms: u64,
    state: PaymentState,
    finished: bool,
    protocol: Protocol,
}

/// A payment in the coordinator's memory, by its protocol.
#[derive(Debug, Clone)]
enum Driven {
    Two(Payment<Bank>),
    One(OnePhase<Bank>),
}

impl Driven {
    fn state(&self) -> PaymentState {
        match self {
            Driven::Two(p) => p.state(),
            Driven::One(p) => p.state(),
        }
    }

    fn deadline_ms(&self) -> u64 {
        match self {
            Driven::Two(p) => p.deadline_ms(),
            Driven::One(p) => p.deadline_ms(),
        }
    }

    fn is_finished(&self) -> bool {
        match self {
            Driven::Two(p) => p.is_finished(),
            Driven::One(p) => p.is_finished(),
        }
    }
}

/// A lazy write of the coordinator, not on disk yet: lost in a crash.
#[derive(Debug, Clone, Copy)]
enum LazyWrite {
    Finished(Txn),
    Outcome(Txn, Decision),
}

struct CoordinatorNode {
    up: bool,
    /// Bumped at every crash, so that timers of a dead incarnation are ignored.
    epoch: u64,
    /// Durable: survives crashes.
    log: BTreeMap<Txn, LogRecord>,
    /// Lazy writes not on disk yet.
    unflushed: Vec<LazyWrite>,
    /// Memory only.
    payments: BTreeMap<Txn, Driven>,
    /// Memory only: payments with a resend timer running.
    resend_armed: BTreeSet<Txn>,
}

struct BankNode {
    up: bool,
    epoch: u64,
    /// How far this bank's clock is ahead of the simulation's (negative:
    /// behind).
    skew_ms: i64,
    /// Durable.
    accounts: Vec<Account>,
    /// Durable.
    legs: BTreeMap<Txn, LegState>,
    /// Durable: one-phase payments aborted by a question (fenced).
    fenced: BTreeSet<Txn>,
}

/// How hostile one run's world is.
#[derive(Debug)]
struct Faults {
    drop_permille: u64,
    duplicate_permille: u64,
    /// Messages that take long enough to be overtaken by later ones.
    slow_permille: u64,
    /// Chance of a crash before each action a party carries out.
    crash_point_permille: u64,
    /// Chance that a payment within one bank runs in one phase.
    one_phase_permille: u64,
}

/// How often each interesting path ran, to show what the seeds exercise.
type Coverage = BTreeMap<&'static str, u64>;

/// Paths every batch of seeds must take at least once.
const PATHS: [&str; 25] = [
    "committed",
    "aborted",
    "crash",
    "vote no",
    "abort at the deadline",
    "abort forced by an inquiry",
    "abort on a vote after the deadline",
    "abort at a restart",
    "decision resent after a restart",
    "inquiry",
    "inquiry answered not yet",
    "decision resent on a timer",
    "tombstone",
    "late prepare refused",
    "lazy write lost",
    "one phase",
    "transfer committed",
    "transfer declined",
    "transfer refused past its deadline",
    "transfer repeated",
    "fence",
    "late transfer refused",
    "one-phase outcome asked for",
    "one-phase commit learnt by asking",
    "one-phase outcome lost in a crash",
];

/// What a finished run looks like; equal for two runs of one seed.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Summary {
    steps: u64,
    end_ms: u64,
    balances: Vec<Vec<i64>>,
    coverage: Coverage,
}

struct Sim {
    mutation: Mutation,
    /// What each customer was told, once told: every later answer must agree.
    told: BTreeMap<Txn, Decision>,
    trace: bool,
    rng: Rng,
    faults: Faults,
    now_ms: u64,
    seq: u64,
    queue: BTreeMap<(u64, u64), Event>,
    specs: Vec<Spec>,
    coordinator: CoordinatorNode,
    banks: Vec<BankNode>,
    start: Vec<Vec<Account>>,
    start_total_minor: i64,
    coverage: Coverage,
}

type Checked = Result<(), String>;

fn ensure(ok: bool, why: impl FnOnce() -> String) -> Checked {
    if ok { Ok(()) } else { Err(why()) }
}

fn run(seed: u64, mutation: Mutation, trace: bool) -> Result<Summary, String> {
    let mut sim = Sim::new(seed, mutation, trace);
    let mut steps = 0;
    while let Some(((at_ms, _), event)) = sim.queue.pop_first() {
        steps += 1;
        sim.now_ms = at_ms;
        if sim.trace {
            eprintln!("{at_ms:>6} ms #{steps:<6} {event:?}");
        }
        let checked = if steps > STEPS_MAX {
            Err(format!("no quiescence after {STEPS_MAX} steps"))
        } else {
            sim.step(event).and_then(|()| sim.check_money())
        };
        checked.map_err(|e| format!("at {at_ms} ms, step {steps} ({event:?}): {e}"))?;
    }
    sim.check_end().map_err(|e| format!("after {steps} steps, at the end: {e}"))?;
    for txn in 0..sim.specs.len() {
        match sim.decision(txn)? {
            Decision::Commit => sim.cover("committed"),
            Decision::Abort => sim.cover("aborted"),
        }
    }
    Ok(Summary {
        steps,
        end_ms: sim.now_ms,
        coverage: sim.coverage,
        balances: sim.banks.iter().map(|b| b.accounts.iter().map(|a| a.balance_minor).collect()).collect(),
    })
}

impl Sim {
    fn new(seed: u64, mutation: Mutation, trace: bool) -> Sim {
        let mut rng = Rng(seed);
        let faults = Faults {
            drop_permille: rng.range(0, 100),
            duplicate_permille: rng.range(0, 100),
            slow_permille: rng.range(0, 60),
            crash_point_permille: rng.range(0, 8),
            one_phase_permille: rng.range(500, 1_000),
        };
        let start: Vec<Vec<Account>> = (0..BANK_COUNT)
            .map(|_| {
                (0..ACCOUNTS_PER_BANK)
                    .map(|_| Account {
                        balance_minor: minor(rng.range(0, BALANCE_START_MAX_MINOR)),
                        held_minor: 0,
                    })
                    .collect()
            })
            .collect();
        let start_total_minor = start.iter().flatten().map(|a| a.balance_minor).sum();
        let mut sim = Sim {
            mutation,
            trace,
            rng,
            faults,
            now_ms: 0,
            seq: 0,
            queue: BTreeMap::new(),
            specs: Vec::new(),
            coordinator: CoordinatorNode {
                up: true,
                epoch: 0,
                log: BTreeMap::new(),
                unflushed: Vec::new(),
                payments: BTreeMap::new(),
                resend_armed: BTreeSet::new(),
            },
            banks: Vec::new(),
            start,
            start_total_minor,
            coverage: Coverage::new(),
            told: BTreeMap::new(),
        };
        for b in 0..BANK_COUNT {
            let skew_ms = minor(sim.rng.range(0, 2 * CLOCK_SKEW_MAX_MS)) - minor(CLOCK_SKEW_MAX_MS);
            sim.banks.push(BankNode {
                up: true,
                epoch: 0,
                skew_ms,
                accounts: sim.start[b].clone(),
                legs: BTreeMap::new(),
                fenced: BTreeSet::new(),
            });
        }
        if trace {
            eprintln!("seed {seed}, {mutation:?}, {:?}", sim.faults);
        }
        let payments = index(sim.rng.range(PAYMENTS_MIN, PAYMENTS_MAX));
        for txn in 0..payments {
            let spec = sim.random_spec();
            if trace {
                eprintln!("payment {txn}: {spec:?}");
            }
            sim.specs.push(spec);
            let at_ms = sim.rng.range(0, SUBMIT_WINDOW_MS);
            sim.schedule(at_ms, Event::Submit(txn));
        }
        let nodes = std::iter::once(Node::Coordinator).chain((0..BANK_COUNT).map(Node::Bank));
        for node in nodes {
            for _ in 0..sim.rng.range(0, CRASHES_PER_NODE_MAX) {
                let at_ms = sim.rng.range(0, HEAL_AT_MS - 1);
                sim.schedule(at_ms, Event::Crash(node));
            }
        }
        sim
    }

    fn random_spec(&mut self) -> Spec {
        let payer = AccountRef {
            bank: index(self.rng.range(0, BANK_COUNT as u64 - 1)),
            index: index(self.rng.range(0, ACCOUNTS_PER_BANK as u64 - 1)),
        };
        let same_bank = self.rng.permille(333);
        let payee_bank =
            if same_bank { payer.bank } else { (payer.bank + self.random_other_bank()) % BANK_COUNT };
        // Now and then, an account that does not exist: the payee's bank votes no.
        let missing = self.rng.permille(40);
        let payee_index =
            if missing { ACCOUNTS_PER_BANK } else { self.random_other_account(payer, payee_bank) };
        let one_phase = same_bank && self.rng.permille(self.faults.one_phase_permille);
        Spec {
            payer,
            payee: AccountRef { bank: payee_bank, index: payee_index },
            amount_minor: minor(self.rng.range(1, AMOUNT_MAX_MINOR)),
            protocol: coordinator::protocol_for(if same_bank { 1 } else { 2 }, one_phase),
        }
    }

    fn random_other_bank(&mut self) -> usize {
        index(self.rng.range(1, BANK_COUNT as u64 - 1))
    }

    fn random_other_account(&mut self, payer: AccountRef, bank: Bank) -> usize {
        let i = index(self.rng.range(0, ACCOUNTS_PER_BANK as u64 - 1));
        if bank == payer.bank && i == payer.index { (i + 1) % ACCOUNTS_PER_BANK } else { i }
    }

    fn schedule(&mut self, at_ms: u64, event: Event) {
        self.seq += 1;
        self.queue.insert((at_ms, self.seq), event);
    }

    fn faulty(&self) -> bool {
        self.now_ms < HEAL_AT_MS
    }

    /// Whether a party crashes right here, before its next action.
    fn crash_point(&mut self) -> bool {
        self.faulty() && self.rng.permille(self.faults.crash_point_permille)
    }

    /// Puts a message (an `AtBank` or `AtCoordinator` event) on the network.
    fn send(&mut self, msg: Event) {
        let copies = if !self.faulty() {
            1
        } else if self.rng.permille(self.faults.drop_permille) {
            0
        } else if self.rng.permille(self.faults.duplicate_permille) {
            2
        } else {
            1
        };
        for _ in 0..copies {
            let delay_ms = if !self.faulty() {
                self.rng.range(1, 20)
            } else if self.rng.permille(self.faults.slow_permille) {
                self.rng.range(50, 800)
            } else {
                self.rng.range(1, 30)
            };
            self.schedule(self.now_ms + delay_ms, msg);
        }
    }

    fn step(&mut self, event: Event) -> Checked {
        match event {
            Event::Submit(txn) => self.submit(txn),
            Event::Crash(node) => {
                self.crash(node);
                Ok(())
            }
            Event::Restart(Node::Coordinator) => self.restart_coordinator(),
            Event::Restart(Node::Bank(b)) => {
                self.restart_bank(b);
                Ok(())
            }
            Event::AtCoordinator(b, txn, msg) if self.coordinator.up => {
                self.coordinator_receives(b, txn, msg)
            }
            Event::AtBank(b, txn, msg) if self.banks[b].up => self.bank_receives(b, txn, msg),
            Event::CoordinatorTimer(epoch, txn, timer) if epoch == self.coordinator.epoch => {
                self.coordinator_timer(txn, timer)
            }
            Event::InquiryTimer(b, epoch, txn, attempt) if epoch == self.banks[b].epoch => {
                self.bank_inquiry_timer(b, txn, attempt)
            }
            Event::Flush(epoch) if epoch == self.coordinator.epoch => self.flush_lazy_writes(),
            // Sent to a party that is down, or a timer of a dead incarnation.
            Event::AtCoordinator(..)
            | Event::AtBank(..)
            | Event::CoordinatorTimer(..)
            | Event::InquiryTimer(..)
            | Event::Flush(..) => Ok(()),
        }
    }

    // ---- crashes ----

    fn crash(&mut self, node: Node) {
        let up = match node {
            Node::Coordinator => &mut self.coordinator.up,
            Node::Bank(b) => &mut self.banks[b].up,
        };
        if !*up {
            return;
        }
        *up = false;
        self.cover("crash");
        match node {
            Node::Coordinator => {
                let c = &mut self.coordinator;
                c.epoch += 1;
                let lost = !c.unflushed.is_empty();
                let outcome_lost = c.unflushed.iter().any(|w| matches!(w, LazyWrite::Outcome(..)));
                c.unflushed.clear();
                c.payments.clear();
                c.resend_armed.clear();
                if lost {
                    self.cover("lazy write lost");
                }
                if outcome_lost {
                    self.cover("one-phase outcome lost in a crash");
                }
            }
            Node::Bank(b) => self.banks[b].epoch += 1,
        }
        if self.trace {
            eprintln!("         crash of {node:?}");
        }
        let down_ms = self.rng.range(1, DOWN_MAX_MS);
        self.schedule(self.now_ms + down_ms, Event::Restart(node));
    }

    fn restart_coordinator(&mut self) -> Checked {
        let c = &mut self.coordinator;
        c.up = true;
        let records: Vec<(Txn, LogRecord)> = c.log.iter().map(|(t, r)| (*t, r.clone())).collect();
        for (txn, r) in records {
            let abandoned = coordinator::on_abandoned(r.protocol, r.state);
            if r.protocol == Protocol::OnePhase {
                let payment = OnePhase::recover(r.banks[0], r.deadline_ms, r.state);
                ensure(abandoned != Some(Abandoned::ForceAbort), || {
                    format!("payment {txn}: a one-phase payment must never be aborted by the coordinator")
                })?;
                self.coordinator.payments.insert(txn, Driven::One(payment));
                if abandoned == Some(Abandoned::AskBank) {
                    // Asked about once its deadline passed (the deadline sweep).
                    let at_ms = self.now_ms.max(r.deadline_ms) + self.rng.range(0, DEADLINE_SCAN_MS);
                    let epoch = self.coordinator.epoch;
                    self.schedule(at_ms, Event::CoordinatorTimer(epoch, txn, CoordinatorTimer::Deadline));
                }
                continue;
            }
            let (payment, actions) = Payment::recover(r.banks, r.deadline_ms, r.state, r.finished);
            if actions.iter().any(|a| matches!(a, Action::ForceDecision(_))) {
                ensure(abandoned == Some(Abandoned::ForceAbort), || {
                    format!("payment {txn}: aborted at a restart against the rule {abandoned:?}")
                })?;
                self.cover("abort at a restart");
            } else if !actions.is_empty() {
                self.cover("decision resent after a restart");
            }
            self.coordinator.payments.insert(txn, Driven::Two(payment));
            self.coordinator_act(txn, actions)?;
            if !self.coordinator.up {
                break; // crashed again while recovering
            }
        }
        Ok(())
    }

    fn restart_bank(&mut self, b: Bank) {
        let bank = &mut self.banks[b];
        bank.up = true;
        let epoch = bank.epoch;
        let open: Vec<Txn> = bank
            .legs
            .iter()
            .filter(|(_, s)| participant::awaits_decision(Some(**s)))
            .map(|(t, _)| *t)
            .collect();
        for txn in open {
            self.arm_inquiry(b, epoch, txn, 0);
        }
    }

    // ---- the coordinator's shell ----

    /// The customer's answer (the first, or a replay): always the payment's
    /// one outcome.
    fn tell(&mut self, txn: Txn, d: Decision) -> Checked {
        let earlier = *self.told.entry(txn).or_insert(d);
        ensure(earlier == d, || format!("payment {txn}: the customer was told {earlier:?}, then {d:?}"))
    }

    fn submit(&mut self, txn: Txn) -> Checked {
        if self.told.contains_key(&txn) {
            return Ok(()); // answered: the customer is done
        }
        let logged = self.coordinator.log.get(&txn).map(|r| r.state);
        match (self.coordinator.up, logged) {
            // A replay: the gateway answers from its log.
            (true, Some(PaymentState::Decided(d))) => return self.tell(txn, d),
            // Still being decided (or its decision's record was lost): wait.
            (_, Some(PaymentState::Preparing)) | (false, _) => {}
            (true, None) => self.begin(txn)?,
        }
        if !self.told.contains_key(&txn) {
            // Not answered (yet): the customer asks again.
            self.schedule(self.now_ms + CLIENT_RETRY_MS, Event::Submit(txn));
        }
        Ok(())
    }

    fn begin(&mut self, txn: Txn) -> Checked {
        let deadline_ms = self.now_ms + DEADLINE_MS;
        let spec = &self.specs[txn];
        let (driven, actions) = match spec.protocol {
            Protocol::TwoPhase => {
                let (p, actions) = Payment::begin(spec.banks(), deadline_ms);
                (Driven::Two(p), actions)
            }
            Protocol::OnePhase => {
                let (p, actions) = OnePhase::begin(spec.payer.bank, deadline_ms);
                (Driven::One(p), actions)
            }
        };
        let one_phase = spec.protocol == Protocol::OnePhase;
        self.coordinator.payments.insert(txn, driven);
        let epoch = self.coordinator.epoch;
        self.coordinator_act(txn, actions)?;
        let at_ms = deadline_ms + self.rng.range(0, DEADLINE_SCAN_MS);
        self.schedule(at_ms, Event::CoordinatorTimer(epoch, txn, CoordinatorTimer::Deadline));
        if one_phase {
            let at_ms = self.now_ms + TRANSFER_TIMEOUT_MS;
            self.schedule(at_ms, Event::CoordinatorTimer(epoch, txn, CoordinatorTimer::TransferTimeout));
        }
        Ok(())
    }

    fn coordinator_receives(&mut self, b: Bank, txn: Txn, msg: FromBank) -> Checked {
        let now_ms = self.now_ms;
        let Some(payment) = self.coordinator.payments.get_mut(&txn) else {
            // Not in memory means not in the log either (a restart recovers
            // them all): only an inquiry gets an answer, presumed abort.
            let state = self.coordinator.log.get(&txn).map(|r| r.state);
            ensure(state.is_none(), || format!("payment {txn} is logged but not in memory"))?;
            if let FromBank::Inquiry = msg {
                let answer = coordinator::on_inquiry(state, false);
                ensure(answer == (None, InquiryAnswer::Decided(Decision::Abort)), || {
                    format!("an unknown payment must be presumed aborted, not {answer:?}")
                })?;
                self.send(Event::AtBank(b, txn, ToBank::Decision(Decision::Abort)));
            }
            return Ok(());
        };
        let payment = match payment {
            Driven::Two(p) => p,
            Driven::One(p) => {
                let actions = match msg {
                    FromBank::Outcome(d) => {
                        let actions = p.on_outcome(&b, d);
                        if !actions.is_empty() {
                            // The customer is answered as soon as the bank
                            // has: its decision is durable there.
                            self.tell(txn, d)?;
                        }
                        actions
                    }
                    FromBank::Inquiry => p.on_inquiry(&b),
                    FromBank::Vote(_) | FromBank::Ack => {
                        return Err(format!("payment {txn} runs in one phase, yet bank {b} sent {msg:?}"));
                    }
                };
                return self.coordinator_act(txn, actions);
            }
        };
        let (actions, path) = match msg {
            FromBank::Vote(vote) => {
                let late = now_ms >= payment.deadline_ms();
                let actions = payment.on_vote(&b, vote, now_ms);
                (actions, late.then_some("abort on a vote after the deadline"))
            }
            FromBank::Ack => (payment.on_ack(&b), None),
            FromBank::Inquiry => {
                let actions = payment.on_inquiry(&b, now_ms);
                let forced = actions.iter().any(|a| matches!(a, Action::ForceDecision(_)));
                (actions, forced.then_some("abort forced by an inquiry"))
            }
            FromBank::Outcome(_) => {
                return Err(format!("payment {txn} runs in two phases, yet bank {b} sent {msg:?}"));
            }
        };
        if let Some(path) = path.filter(|_| !actions.is_empty()) {
            self.cover(path);
        }
        self.coordinator_act(txn, actions)
    }

    fn coordinator_timer(&mut self, txn: Txn, timer: CoordinatorTimer) -> Checked {
        let now_ms = self.now_ms;
        let mutation = self.mutation;
        if let CoordinatorTimer::Resend = timer {
            self.coordinator.resend_armed.remove(&txn);
        }
        let (actions, path) = match (self.coordinator.payments.get_mut(&txn), timer) {
            (None, _) => (Vec::new(), ""),
            (Some(Driven::Two(p)), CoordinatorTimer::Deadline) => {
                (p.on_deadline(now_ms), "abort at the deadline")
            }
            (Some(Driven::Two(p)), CoordinatorTimer::Resend) => {
                (p.on_resend_timer(), "decision resent on a timer")
            }
            (Some(Driven::Two(_)), CoordinatorTimer::TransferTimeout) => (Vec::new(), ""),
            (Some(Driven::One(p)), CoordinatorTimer::Deadline)
                if mutation == Mutation::OnePhaseAbortedAlone && p.state() == PaymentState::Preparing =>
            {
                // Broken: presumed abort applied to a payment the bank decides.
                (p.on_outcome(&p.bank().clone(), Decision::Abort), "")
            }
            (Some(Driven::One(p)), CoordinatorTimer::Deadline | CoordinatorTimer::Resend) => {
                (p.on_timer(now_ms), "one-phase outcome asked for")
            }
            (Some(Driven::One(p)), CoordinatorTimer::TransferTimeout) => {
                (p.on_transfer_failed(), "one-phase outcome asked for")
            }
        };
        if let Some(Action::RecordOutcome(d)) = actions.first() {
            self.tell(txn, *d)?; // the broken variant answers its own abort
        }
        if !actions.is_empty() && !path.is_empty() {
            self.cover(path);
        }
        self.coordinator_act(txn, actions)
    }

    /// Carries out the actions in order, as the gateway's IO shell would, with
    /// a chance of crashing before each one.
    fn coordinator_act(&mut self, txn: Txn, mut actions: Vec<Action<Bank>>) -> Checked {
        if self.mutation == Mutation::SendBeforeForce {
            // Broken: the decision reaches the banks before it is on disk.
            actions.sort_by_key(|a| matches!(a, Action::ForceDecision(_)));
        }
        if self.faulty() && self.rng.permille(250) {
            self.flush_lazy_writes()?; // a background checkpoint
        }
        let mut asked = false;
        for action in actions {
            if self.crash_point() {
                self.crash(Node::Coordinator);
                return Ok(());
            }
            match action {
                Action::ForcePreparing => {
                    let spec = &self.specs[txn];
                    let record = LogRecord {
                        banks: spec.banks(),
                        deadline_ms: self.coordinator.payments[&txn].deadline_ms(),
                        state: PaymentState::Preparing,
                        finished: false,
                        protocol: spec.protocol,
                    };
                    let earlier = self.coordinator.log.insert(txn, record);
                    ensure(earlier.is_none(), || format!("payment {txn} began twice"))?;
                    self.flush_lazy_writes()?;
                }
                Action::ForceDecision(d) => self.force_decision(txn, d)?,
                Action::Send(b, msg) => {
                    asked |= msg == ToBank::Resolve;
                    self.send(Event::AtBank(b, txn, msg));
                }
                Action::MarkFinished => self.lazily(LazyWrite::Finished(txn)),
                Action::RecordOutcome(d) => self.lazily(LazyWrite::Outcome(txn, d)),
            }
        }
        let resend = match self.coordinator.payments.get(&txn) {
            Some(Driven::Two(p)) => p.awaits_acks(),
            // Asked, and the answer may be lost: ask again until it comes.
            Some(Driven::One(p)) => asked && !p.is_finished(),
            None => false,
        };
        if resend && self.coordinator.resend_armed.insert(txn) {
            let at_ms = self.now_ms + RESEND_MS;
            let epoch = self.coordinator.epoch;
            self.schedule(at_ms, Event::CoordinatorTimer(epoch, txn, CoordinatorTimer::Resend));
        }
        Ok(())
    }

    fn force_decision(&mut self, txn: Txn, d: Decision) -> Checked {
        let record =
            self.coordinator.log.get_mut(&txn).ok_or(format!("payment {txn} decided without a record"))?;
        ensure(record.state == PaymentState::Preparing, || format!("payment {txn} decided twice"))?;
        ensure(record.protocol == Protocol::TwoPhase, || {
            format!("the coordinator decided payment {txn} itself, which its bank decides")
        })?;
        record.state = PaymentState::Decided(d);
        // Atomicity: the log never decides against what a bank already did.
        let contradicted = match d {
            Decision::Commit => LegState::Aborted,
            Decision::Abort => LegState::Committed,
        };
        for (b, bank) in self.banks.iter().enumerate() {
            ensure(bank.legs.get(&txn) != Some(&contradicted), || {
                format!(
                    "the coordinator decided {d:?} for payment {txn}, which bank {b} has {contradicted:?}"
                )
            })?;
        }
        if self.trace {
            eprintln!("         coordinator forces {d:?} for payment {txn}");
        }
        self.tell(txn, d)?;
        self.flush_lazy_writes()
    }

    /// Queues a lazy write: on disk with the next batch, unless a crash
    /// comes first.
    fn lazily(&mut self, write: LazyWrite) {
        self.coordinator.unflushed.push(write);
        let at_ms = self.now_ms + self.rng.range(1, LAZY_FLUSH_MAX_MS);
        let epoch = self.coordinator.epoch;
        self.schedule(at_ms, Event::Flush(epoch));
    }

    fn flush_lazy_writes(&mut self) -> Checked {
        let writes: Vec<LazyWrite> = self.coordinator.unflushed.drain(..).collect();
        for write in writes {
            match write {
                LazyWrite::Finished(txn) => {
                    if let Some(r) = self.coordinator.log.get_mut(&txn) {
                        r.finished = true;
                    }
                }
                LazyWrite::Outcome(txn, d) => self.record_outcome(txn, d)?,
            }
        }
        Ok(())
    }

    /// The bank's decision of a one-phase payment reaches the log: the
    /// payment's one decision, which the bank holds already.
    fn record_outcome(&mut self, txn: Txn, d: Decision) -> Checked {
        let record =
            self.coordinator.log.get_mut(&txn).ok_or(format!("payment {txn} decided without a record"))?;
        ensure(record.protocol == Protocol::OnePhase, || {
            format!("payment {txn}: an outcome for a 2PC payment")
        })?;
        match record.state {
            PaymentState::Preparing => record.state = PaymentState::Decided(d),
            PaymentState::Decided(earlier) => {
                ensure(earlier == d, || format!("payment {txn} recorded as {earlier:?}, then as {d:?}"))?;
            }
        }
        record.finished = true;
        let bank = record.banks[0];
        let leg = self.banks[bank].legs.get(&txn).copied();
        let wanted = match d {
            Decision::Commit => LegState::Committed,
            Decision::Abort => LegState::Aborted,
        };
        ensure(leg == Some(wanted), || {
            format!(
                "the coordinator recorded {d:?} for one-phase payment {txn}, which bank {bank} has as {leg:?}"
            )
        })?;
        if self.trace {
            eprintln!("         coordinator records {d:?} for payment {txn}");
        }
        Ok(())
    }

    // ---- the banks' shell ----

    fn bank_receives(&mut self, b: Bank, txn: Txn, msg: ToBank) -> Checked {
        match msg {
            ToBank::Prepare => self.bank_prepares(b, txn),
            ToBank::Transfer => self.bank_transfers(b, txn),
            ToBank::Resolve => self.bank_resolves(b, txn),
            ToBank::Decision(d) => {
                let current = self.banks[b].legs.get(&txn).copied();
                if current.is_none() && d == Decision::Abort {
                    self.cover("tombstone");
                }
                let force = participant::on_decision(current, d)
                    .map_err(|v| format!("protocol violation at bank {b}, payment {txn}: {v}"))?;
                if let Some(force) = force {
                    // Atomicity: a bank applies only a decision that is on the coordinator's disk.
                    let logged = self.coordinator.log.get(&txn).map(|r| r.state);
                    ensure(logged == Some(PaymentState::Decided(d)), || {
                        format!(
                            "bank {b} applies {d:?} to payment {txn}, which the coordinator's log has as {logged:?}"
                        )
                    })?;
                    self.bank_forces(b, txn, force)?;
                }
                if self.crash_point() {
                    self.crash(Node::Bank(b));
                } else {
                    self.send(Event::AtCoordinator(b, txn, FromBank::Ack));
                }
                Ok(())
            }
            ToBank::NotDecidedYet => {
                self.cover("inquiry answered not yet");
                Ok(()) // the inquiry timer asks again
            }
        }
    }

    /// The bank's local check for a new leg of `txn`.
    fn precondition_ok(&self, b: Bank, txn: Txn) -> bool {
        let spec = &self.specs[txn];
        let bank = &self.banks[b];
        spec.sides(b).all(|(side, i)| match (side, bank.accounts.get(i)) {
            (Side::Debit, Some(account)) => account.can_debit(spec.amount_minor),
            (Side::Credit, Some(_)) => true,
            (_, None) => false,
        })
    }

    /// One phase: the bank decides, forces, then answers its decision.
    fn bank_transfers(&mut self, b: Bank, txn: Txn) -> Checked {
        let bank_now_ms = self.now_ms.saturating_add_signed(self.banks[b].skew_ms);
        let deadline_ms = self.coordinator.log.get(&txn).map(|r| r.deadline_ms);
        let deadline_ms = deadline_ms.ok_or(format!("bank {b} got a transfer for unlogged payment {txn}"))?;
        let past_deadline = bank_now_ms >= deadline_ms;
        let ok = self.precondition_ok(b, txn);
        let current = self.banks[b].legs.get(&txn).copied();
        let (force, d) = participant::on_transfer(current, ok, past_deadline)
            .map_err(|v| format!("protocol violation at bank {b}, payment {txn}: {v}"))?;
        self.cover("one phase");
        match (current, force) {
            (Some(_), _) if self.banks[b].fenced.contains(&txn) => self.cover("late transfer refused"),
            (Some(_), _) => self.cover("transfer repeated"),
            (None, _) if past_deadline => self.cover("transfer refused past its deadline"),
            (None, _) if d == Decision::Commit => self.cover("transfer committed"),
            (None, _) => self.cover("transfer declined"),
        }
        if let Some(force) = force {
            self.bank_forces(b, txn, force)?;
        }
        if self.crash_point() {
            self.crash(Node::Bank(b));
        } else {
            self.send(Event::AtCoordinator(b, txn, FromBank::Outcome(d)));
        }
        Ok(())
    }

    /// One phase: what became of a transfer; one never seen is fenced first.
    fn bank_resolves(&mut self, b: Bank, txn: Txn) -> Checked {
        let current = self.banks[b].legs.get(&txn).copied();
        let (force, d) = participant::on_resolve(current)
            .map_err(|v| format!("protocol violation at bank {b}, payment {txn}: {v}"))?;
        if d == Decision::Commit {
            self.cover("one-phase commit learnt by asking");
        }
        if let Some(force) = force.filter(|_| self.mutation != Mutation::ResolveWithoutFence) {
            self.cover("fence");
            self.bank_forces(b, txn, force)?;
            self.banks[b].fenced.insert(txn);
        }
        if self.crash_point() {
            self.crash(Node::Bank(b));
        } else {
            self.send(Event::AtCoordinator(b, txn, FromBank::Outcome(d)));
        }
        Ok(())
    }

    fn bank_prepares(&mut self, b: Bank, txn: Txn) -> Checked {
        let precondition_ok = self.precondition_ok(b, txn);
        let current = self.banks[b].legs.get(&txn).copied();
        let (force, vote) = participant::on_prepare(current, precondition_ok);
        if current == Some(LegState::Aborted) {
            self.cover("late prepare refused");
        } else if vote == Vote::No {
            self.cover("vote no");
        }
        if self.mutation == Mutation::VoteBeforeForce {
            // Broken: the vote goes out before the record is durable.
            self.send(Event::AtCoordinator(b, txn, FromBank::Vote(vote)));
            if self.crash_point() {
                self.crash(Node::Bank(b));
                return Ok(());
            }
        }
        if let Some(force) = force {
            self.bank_forces(b, txn, force)?;
            if force.state == LegState::Prepared {
                let epoch = self.banks[b].epoch;
                self.arm_inquiry(b, epoch, txn, 0);
            }
        }
        if self.mutation != Mutation::VoteBeforeForce {
            if self.crash_point() {
                self.crash(Node::Bank(b));
            } else {
                self.send(Event::AtCoordinator(b, txn, FromBank::Vote(vote)));
            }
        }
        Ok(())
    }

    /// One durable transaction at a bank: the leg's state and its money.
    fn bank_forces(&mut self, b: Bank, txn: Txn, force: Force) -> Checked {
        let spec = &self.specs[txn];
        let bank = &mut self.banks[b];
        bank.legs.insert(txn, force.state);
        if let Some(effect) = force.effect {
            for (side, i) in spec.sides(b) {
                let account = bank.accounts.get_mut(i).ok_or(format!("bank {b} has no account {i}"))?;
                *account = account.apply(effect, side, spec.amount_minor);
            }
        }
        if self.trace {
            eprintln!("         bank {b} forces payment {txn}: {force:?}");
        }
        Ok(())
    }

    fn arm_inquiry(&mut self, b: Bank, epoch: u64, txn: Txn, attempt: u32) {
        let at_ms = self.now_ms + participant::inquiry_delay_ms(attempt, INQUIRY_FIRST_MS, INQUIRY_MAX_MS);
        self.schedule(at_ms, Event::InquiryTimer(b, epoch, txn, attempt));
    }

    fn bank_inquiry_timer(&mut self, b: Bank, txn: Txn, attempt: u32) -> Checked {
        let current = self.banks[b].legs.get(&txn).copied();
        if !participant::awaits_decision(current) {
            return Ok(());
        }
        if self.mutation == Mutation::BankReleasesHold && attempt >= GIVE_UP_ATTEMPTS {
            // Broken: the bank decides on its own.
            let force = participant::on_abort(current).map_err(|v| v.to_string())?;
            return force.map_or(Ok(()), |f| self.bank_forces(b, txn, f));
        }
        self.send(Event::AtCoordinator(b, txn, FromBank::Inquiry));
        self.cover("inquiry");
        let epoch = self.banks[b].epoch;
        self.arm_inquiry(b, epoch, txn, attempt + 1);
        Ok(())
    }

    // ---- checks ----

    /// After every step: no account is overdrawn; each bank's books agree with
    /// its legs (a balance moves only by committed legs, `held` is exactly the
    /// prepared debits); and no money is created or destroyed. A cross-bank
    /// payment commits at its two banks at different moments, so the money
    /// between them ("in flight") is counted with the balances.
    fn check_money(&self) -> Checked {
        let mut total = 0;
        let mut in_flight = 0;
        for (b, bank) in self.banks.iter().enumerate() {
            let mut books = self.start[b].clone();
            for (txn, state) in &bank.legs {
                let spec = &self.specs[*txn];
                for (side, i) in spec.sides(b) {
                    // A leg for a missing account can only be aborted: it voted no.
                    let Some(account) = books.get_mut(i) else { continue };
                    match (state, side) {
                        (LegState::Prepared, Side::Debit) => account.held_minor += spec.amount_minor,
                        (LegState::Committed, Side::Debit) => account.balance_minor -= spec.amount_minor,
                        (LegState::Committed, Side::Credit) => account.balance_minor += spec.amount_minor,
                        (LegState::Prepared, Side::Credit) | (LegState::Aborted, _) => {}
                    }
                }
                // Committed here and not yet at the other bank: on its way.
                let other = spec.other_bank(b).filter(|_| *state == LegState::Committed);
                if other.is_some_and(|o| self.banks[o].legs.get(txn) != Some(&LegState::Committed)) {
                    let sent = spec.payer.bank == b;
                    in_flight += if sent { spec.amount_minor } else { -spec.amount_minor };
                }
            }
            for (i, a) in bank.accounts.iter().enumerate() {
                ensure(a.balance_minor >= 0 && a.is_consistent(), || {
                    format!("account {i} at bank {b} breaks 0 <= held <= balance: {a:?}")
                })?;
                ensure(*a == books[i], || {
                    format!("account {i} at bank {b} is {a:?}, but its legs give {:?}", books[i])
                })?;
                total += a.balance_minor;
            }
        }
        ensure(total + in_flight == self.start_total_minor, || {
            format!(
                "money is not conserved: {total} in the accounts and {in_flight} in flight, {} at the start",
                self.start_total_minor
            )
        })
    }

    /// After the faults stopped and every timer ran out.
    fn check_end(&self) -> Checked {
        ensure(self.coordinator.up && self.banks.iter().all(|b| b.up), || "a party is still down".into())?;
        let mut expected = self.start.clone();
        for (txn, spec) in self.specs.iter().enumerate() {
            let d = self.decision(txn)?;
            let payment = &self.coordinator.payments[&txn];
            ensure(payment.is_finished(), || format!("payment {txn}: not every bank acknowledged {d:?}"))?;
            let told = self.told.get(&txn).copied();
            ensure(told == Some(d), || {
                format!("payment {txn} is {d:?}, but its customer was told {told:?}")
            })?;
            let involved = spec.banks();
            for (b, bank) in self.banks.iter().enumerate() {
                let leg = bank.legs.get(&txn).copied();
                let wanted = match (involved.contains(&b), d) {
                    (false, _) => None,
                    (true, Decision::Commit) => Some(LegState::Committed),
                    (true, Decision::Abort) => Some(LegState::Aborted),
                };
                ensure(leg == wanted, || {
                    format!("payment {txn} is {d:?} at the coordinator but {leg:?} at bank {b}")
                })?;
            }
            if d == Decision::Commit {
                expected[spec.payer.bank][spec.payer.index].balance_minor -= spec.amount_minor;
                expected[spec.payee.bank][spec.payee.index].balance_minor += spec.amount_minor;
            }
        }
        for (b, bank) in self.banks.iter().enumerate() {
            ensure(bank.accounts.iter().all(|a| a.held_minor == 0), || {
                format!("a hold remains at bank {b}")
            })?;
            ensure(bank.accounts == expected[b], || {
                format!(
                    "bank {b} ends with {:?}, but its committed payments give {:?}",
                    bank.accounts, expected[b]
                )
            })?;
        }
        Ok(())
    }

    /// The payment's one decision, the same in the log and in memory.
    fn decision(&self, txn: Txn) -> Result<Decision, String> {
        let logged = self.coordinator.log.get(&txn).map(|r| r.state);
        let in_memory = self.coordinator.payments.get(&txn).map(Driven::state);
        match (logged, in_memory) {
            (Some(PaymentState::Decided(d)), Some(PaymentState::Decided(m))) if d == m => Ok(d),
            other => Err(format!("payment {txn} has no single decision (log, memory): {other:?}")),
        }
    }

    fn cover(&mut self, path: &'static str) {
        debug_assert!(PATHS.contains(&path), "unknown path {path}");
        *self.coverage.entry(path).or_default() += 1;
    }
}

fn minor(n: u64) -> i64 {
    i64::try_from(n).expect("small amounts")
}

fn index(n: u64) -> usize {
    usize::try_from(n).expect("small indices")
}

fn env_u64(name: &str) -> Option<u64> {
    let value = std::env::var(name).ok()?;
    Some(value.trim().parse().unwrap_or_else(|_| panic!("{name}={value} is not a number")))
}

fn replay_hint(seed: u64, test: &str) -> String {
    format!(
        "replay: STRIFE_SIM_SEED={seed} STRIFE_SIM_TRACE=1 cargo test -p strife-twopc --test simulation {test} -- --nocapture"
    )
}

impl fmt::Display for Summary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} steps, {} ms, {:?}", self.steps, self.end_ms, self.coverage)
    }
}

#[test]
fn simulate_many_seeds() {
    if let Some(seed) = env_u64("STRIFE_SIM_SEED") {
        let trace = std::env::var("STRIFE_SIM_TRACE").is_ok_and(|v| v == "1");
        match run(seed, Mutation::None, trace) {
            Ok(summary) => eprintln!("seed {seed}: ok, {summary}"),
            Err(e) => panic!("seed {seed} failed: {e}\n{}", replay_hint(seed, "simulate_many_seeds")),
        }
        return;
    }
    let seeds = env_u64("STRIFE_SIM_SEEDS").unwrap_or(SEEDS_DEFAULT);
    let started = Instant::now();
    let mut steps = 0;
    let mut coverage = Coverage::new();
    for seed in 0..seeds {
        match run(seed, Mutation::None, false) {
            Ok(s) => {
                steps += s.steps;
                for (path, n) in s.coverage {
                    *coverage.entry(path).or_default() += n;
                }
            }
            Err(e) => panic!("seed {seed} failed: {e}\n{}", replay_hint(seed, "simulate_many_seeds")),
        }
    }
    eprintln!("{seeds} seeds in {:.1?}: {steps} steps", started.elapsed());
    for (path, n) in &coverage {
        eprintln!("{n:>10}  {path}");
    }
    if seeds >= 100 {
        let missed: Vec<_> = PATHS.iter().filter(|p| !coverage.contains_key(*p)).collect();
        assert!(missed.is_empty(), "{seeds} seeds never took these paths: {missed:?}");
    }
}

#[test]
fn a_seed_replays_exactly() {
    for seed in [1, 7, 1_234] {
        let first = run(seed, Mutation::None, false);
        assert_eq!(first, run(seed, Mutation::None, false), "seed {seed} is not deterministic");
        assert!(first.is_ok(), "seed {seed}: {first:?}");
    }
}

#[test]
fn the_checks_catch_broken_protocols() {
    for mutation in [
        Mutation::SendBeforeForce,
        Mutation::VoteBeforeForce,
        Mutation::BankReleasesHold,
        Mutation::OnePhaseAbortedAlone,
        Mutation::ResolveWithoutFence,
    ] {
        let caught =
            (0..MUTATION_SEEDS_MAX).find_map(|seed| run(seed, mutation, false).err().map(|e| (seed, e)));
        match caught {
            Some((seed, why)) => eprintln!("{mutation:?} caught by seed {seed}: {why}"),
            None => panic!("{mutation:?} went unnoticed for {MUTATION_SEEDS_MAX} seeds"),
        }
    }
}
