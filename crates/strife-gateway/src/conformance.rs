//! The gateway store's conformance suite: what every backend of
//! [`GatewayStore`] must do, run by each backend's tests on a fresh store of
//! its own ([`conformance_suite!`]), so no backend can quietly mean
//! something else.
//!
//! Each case gets two instances of one fresh store, `a` and `b`, as two
//! gateway processes would open it: PostgreSQL, two pools on one database;
//! SQLite, whose file one process owns, the same instance twice. The cases
//! of [`replica_suite!`] hold only where several processes share a store
//! (PostgreSQL): who drives which payment.

use crate::backend::{BANK_ADDRESSES_MAX, GatewayStore};
use crate::page_token;
use crate::store::{Cursor, PageQuery, PaymentPage, PaymentRecord, PaymentState};
use crate::throttle::{Entry, Rule};
use crate::tokens::SigningKey;
use std::collections::BTreeSet;
use std::time::{Duration, Instant};
use strife_core::rng::SplitMix64;
use strife_core::{DeclineReason, Secret, UserRef};

/// Longest a case waits for something that happens without being forced
/// (a lazy write, a lease that lapses).
const EVENTUALLY: Duration = Duration::from_secs(10);

/// Generates one test per case of the suite, each on a fresh store from
/// `$fresh` (an async function returning two instances of one store and a
/// guard that keeps its storage alive).
macro_rules! conformance_suite {
    ($fresh:path) => {
        mod conformance {
            use super::*;
            $crate::conformance::conformance_suite!(@case $fresh,
                a_payment_id_is_recorded_once_and_replayed,
                a_payment_gets_one_decision,
                concurrent_begins_of_one_id_make_one_payment,
                concurrent_decisions_make_one,
                a_burst_of_begins_with_ids_twice_makes_one_payment_per_id,
                a_burst_of_decisions_racing_the_sweep_makes_one_per_payment,
                decided_payments_stay_unfinished_until_acknowledged,
                one_phase_payments_are_marked_and_their_outcome_recorded_lazily,
                a_listing_has_what_the_caller_sent_and_the_committed_payments_they_received,
                a_payment_is_found_by_id_by_whoever_made_or_received_it,
                paging_while_payments_arrive_skips_nothing_and_repeats_nothing,
                the_log_is_read_in_transaction_id_order,
                undecided_payments_are_found_by_age,
                counts_and_pruning,
                a_revocation_is_seen_by_every_instance,
                failed_logins_add_up_across_instances,
                one_cluster_id_for_every_instance,
                a_bank_keeps_each_address,
                the_dashboard_reads_timelines_recent_payments_and_declines,
                every_instance_reads_every_heartbeat);
        }
    };
    (@case $fresh:path, $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (a, b, _guard) = $fresh().await;
                $crate::conformance::$case(&a, &b).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;

/// The cases for stores that several processes share: `$fresh` returns two
/// instances whose leases last an hour, and a third (`quick`) whose
/// leases lapse at once, as if its process had died long ago.
macro_rules! replica_suite {
    ($fresh:path) => {
        mod replicas {
            use super::*;
            $crate::conformance::replica_suite!(@case $fresh,
                two_instances_never_claim_one_payment,
                a_lapsed_claim_is_taken_over,
                a_payment_is_left_to_the_instance_that_began_it,
                a_key_added_at_one_instance_signs_at_every_other);
        }
    };
    (@case $fresh:path, $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (a, b, quick, _guard) = $fresh().await;
                $crate::conformance::$case(&a, &b, &quick).await;
            }
        )*
    };
}
pub(crate) use replica_suite;

pub fn user(text: &str) -> UserRef {
    text.parse().expect("user@bank")
}

/// A UUID-shaped id from a number (`n < 2^48`), ordered like the number.
pub fn uuid_of(n: u64) -> String {
    format!("01990000-0000-7000-8000-{n:012x}")
}

/// A payment `txn` under id `id`, as the coordinator begins one, in `state`.
pub fn record(txn: u64, id: u64, payer: &UserRef, payee: &UserRef, state: PaymentState) -> PaymentRecord {
    PaymentRecord {
        txn_id: uuid_of(txn),
        payment_id: uuid_of(id),
        payer: payer.clone(),
        payee: payee.clone(),
        amount_minor: 100 + txn as i64,
        state,
        reason: None,
        acked: false,
        created_at_ms: 1_000 + txn as i64,
        deadline_at_ms: strife_core::unix_ms() + 3_600_000,
        fingerprint: vec![txn as u8; 32],
        one_phase: false,
    }
}

/// A payment that is new to the store.
async fn insert<S: GatewayStore>(s: &S, p: &PaymentRecord) {
    s.begin_payment(p.clone()).await.expect("begin").expect("a new payment");
}

pub(crate) fn txn_ids(payments: &[PaymentRecord]) -> Vec<String> {
    payments.iter().map(|p| p.txn_id.clone()).collect()
}

/// A bounded wait for something that happens without being forced.
pub(crate) struct Patience {
    give_up: Instant,
}

impl Patience {
    pub(crate) fn new() -> Patience {
        Patience { give_up: Instant::now() + EVENTUALLY }
    }

    /// Pauses before the next look, or fails the case once out of patience.
    pub(crate) async fn wait(&self, what: &str) {
        assert!(Instant::now() < self.give_up, "{what}: not within {EVENTUALLY:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

pub async fn a_payment_id_is_recorded_once_and_replayed<S: GatewayStore>(a: &S, b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let first = record(1, 10, &x, &y, PaymentState::Preparing);
    assert_eq!(a.begin_payment(first.clone()).await.expect("begin"), Ok(()));
    assert_eq!(a.find_txn(first.txn_id.clone()).await.expect("find"), Some(first.clone()), "read as written");
    // The same id again, at either instance: the first record, whole.
    let again = record(2, 10, &x, &y, PaymentState::Preparing);
    assert_eq!(a.begin_payment(again.clone()).await.expect("begin"), Err(first.clone()));
    assert_eq!(b.begin_payment(again.clone()).await.expect("begin"), Err(first.clone()));
    assert_eq!(b.find_txn(again.txn_id).await.expect("find"), None, "the copy left no record");
    assert_eq!(b.find_payment(x.clone(), uuid_of(10)).await.expect("find"), Some(first.clone()));
    // The id is scoped to the payer.
    let other_payer = record(3, 10, &y, &x, PaymentState::Preparing);
    assert_eq!(b.begin_payment(other_payer.clone()).await.expect("begin"), Ok(()));
    assert_eq!(a.find_payment(y, uuid_of(10)).await.expect("find"), Some(other_payer));
    assert_eq!(a.find_payment(x, uuid_of(11)).await.expect("find"), None);
}

pub async fn a_payment_gets_one_decision<S: GatewayStore>(a: &S, b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let p = record(1, 1, &x, &y, PaymentState::Preparing);
    insert(a, &p).await;
    let decided = a.decide(p.txn_id.clone(), PaymentState::Committed, None).await.expect("decide");
    assert_eq!(decided, PaymentState::Committed);
    let late = b.decide(p.txn_id.clone(), PaymentState::Aborted, Some(DeclineReason::Timeout)).await;
    assert_eq!(late.expect("decide"), PaymentState::Committed, "the first decision stands");
    let stored = b.find_txn(p.txn_id.clone()).await.expect("find").expect("exists");
    assert_eq!((stored.state, stored.reason), (PaymentState::Committed, None));

    let q = record(2, 2, &x, &y, PaymentState::Preparing);
    insert(a, &q).await;
    let decided =
        b.decide(q.txn_id.clone(), PaymentState::Aborted, Some(DeclineReason::InsufficientFunds)).await;
    assert_eq!(decided.expect("decide"), PaymentState::Aborted);
    let late = a.decide(q.txn_id.clone(), PaymentState::Committed, None).await;
    assert_eq!(late.expect("decide"), PaymentState::Aborted);
    let stored = a.find_txn(q.txn_id.clone()).await.expect("find").expect("exists");
    assert_eq!(
        (stored.state, stored.reason),
        (PaymentState::Aborted, Some(DeclineReason::InsufficientFunds))
    );

    assert!(a.decide(uuid_of(99), PaymentState::Aborted, None).await.is_err(), "no such payment");
}

pub async fn concurrent_begins_of_one_id_make_one_payment<S: GatewayStore>(a: &S, b: &S) {
    const COPIES: u64 = 16;
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    for id in 0..4 {
        let tasks: Vec<_> = (0..COPIES)
            .map(|n| {
                let store = if n % 2 == 0 { a.clone() } else { b.clone() };
                let copy = record(id * 100 + n, id, &x, &y, PaymentState::Preparing);
                tokio::spawn(async move { store.begin_payment(copy).await.expect("begin") })
            })
            .collect();
        let mut results = Vec::new();
        for t in tasks {
            results.push(t.await.expect("task"));
        }
        let winners: Vec<u64> = (0..COPIES).filter(|&n| results[n as usize].is_ok()).collect();
        assert_eq!(winners.len(), 1, "id {id}: exactly one begin wins: {results:?}");
        let winner = uuid_of(id * 100 + winners[0]);
        for r in results.iter().filter_map(|r| r.as_ref().err()) {
            assert_eq!(r.txn_id, winner, "id {id}: every other copy reads the winner's record");
        }
        let stored = a.find_payment(x.clone(), uuid_of(id)).await.expect("find").expect("exists");
        assert_eq!(stored.txn_id, winner);
    }
}

pub async fn concurrent_decisions_make_one<S: GatewayStore>(a: &S, b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    for n in 0..20 {
        let p = record(n, n, &x, &y, PaymentState::Preparing);
        insert(a, &p).await;
        let (sa, sb, txn) = (a.clone(), b.clone(), p.txn_id.clone());
        let commit = tokio::spawn(async move { sa.decide(txn, PaymentState::Committed, None).await });
        let (sb2, txn) = (sb.clone(), p.txn_id.clone());
        let abort = tokio::spawn(async move {
            sb2.decide(txn, PaymentState::Aborted, Some(DeclineReason::Timeout)).await
        });
        let (c, d) =
            (commit.await.expect("task").expect("commit"), abort.await.expect("task").expect("abort"));
        assert_eq!(c, d, "payment {n}: both deciders learn the one decision");
        let stored = sb.find_txn(p.txn_id.clone()).await.expect("find").expect("exists");
        assert_eq!(stored.state, c, "payment {n}");
    }
}

/// Many begins at once on one instance, as concurrent payments reach one
/// gateway: where the store batches them, one batch holds an id twice.
/// Exactly one begin per id wins, and the others read its payment.
pub async fn a_burst_of_begins_with_ids_twice_makes_one_payment_per_id<S: GatewayStore>(a: &S, _b: &S) {
    const IDS: u64 = 64;
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    // Each id twice (txn n and n + 1000), all queued before any is answered.
    let tasks: Vec<_> = (0..2 * IDS)
        .map(|n| {
            let (store, id) = (a.clone(), n % IDS);
            let copy = record(id + (n / IDS) * 1000, id, &x, &y, PaymentState::Preparing);
            tokio::spawn(async move { (id, store.begin_payment(copy).await.expect("begin")) })
        })
        .collect();
    let mut winners = std::collections::BTreeMap::new();
    let mut replays = Vec::new();
    for t in tasks {
        match t.await.expect("task") {
            (id, Ok(())) => assert!(winners.insert(id, ()).is_none(), "id {id}: two begins won"),
            (id, Err(existing)) => replays.push((id, existing)),
        }
    }
    assert_eq!(winners.len() as u64, IDS, "every id has one payment");
    assert_eq!(replays.len() as u64, IDS, "and one replay");
    for (id, existing) in replays {
        let stored = a.find_payment(x.clone(), uuid_of(id)).await.expect("find").expect("exists");
        assert_eq!(existing.txn_id, stored.txn_id, "id {id}: the replay answers the winner");
        assert_eq!(existing.payment_id, uuid_of(id));
    }
    let counts = a.counts().await.expect("counts");
    assert_eq!(counts.preparing, IDS, "no payment twice");
}

/// Many payments decided at once on one instance, each by its own task
/// (commit) and by the deadline sweep (abort): where the store batches
/// decisions, both may sit in one batch. Each payment gets one decision,
/// and both deciders learn it.
pub async fn a_burst_of_decisions_racing_the_sweep_makes_one_per_payment<S: GatewayStore>(a: &S, _b: &S) {
    const PAYMENTS: u64 = 64;
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    for n in 0..PAYMENTS {
        insert(a, &record(n, n, &x, &y, PaymentState::Preparing)).await;
    }
    let tasks: Vec<_> = (0..PAYMENTS)
        .flat_map(|n| {
            let (task, sweep) = (a.clone(), a.clone());
            [
                tokio::spawn(async move { task.decide(uuid_of(n), PaymentState::Committed, None).await }),
                tokio::spawn(async move {
                    sweep.decide(uuid_of(n), PaymentState::Aborted, Some(DeclineReason::Timeout)).await
                }),
            ]
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.expect("task").expect("decide"));
    }
    for n in 0..PAYMENTS {
        let (task, sweep) = (answers[2 * n as usize], answers[2 * n as usize + 1]);
        assert_eq!(task, sweep, "payment {n}: both deciders learn the one decision");
        let stored = a.find_txn(uuid_of(n)).await.expect("find").expect("exists");
        assert_eq!(stored.state, task, "payment {n}: the decision that stands is stored");
        if stored.state == PaymentState::Aborted {
            assert_eq!(stored.reason, Some(DeclineReason::Timeout), "payment {n}: the sweep's reason");
        }
    }
    // A payment that does not exist is an error, not a decision.
    assert!(a.decide(uuid_of(999_999), PaymentState::Committed, None).await.is_err());
}

pub async fn decided_payments_stay_unfinished_until_acknowledged<S: GatewayStore>(a: &S, _b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let ps: Vec<PaymentRecord> = (0..5).map(|n| record(n, n, &x, &y, PaymentState::Preparing)).collect();
    for p in &ps {
        insert(a, p).await;
    }
    assert!(a.claim_unfinished(10).await.expect("claim").is_empty(), "undecided payments are not unfinished");
    for p in &ps[..4] {
        a.decide(p.txn_id.clone(), PaymentState::Committed, None).await.expect("decide");
    }
    assert_eq!(txn_ids(&a.claim_unfinished(2).await.expect("claim")), txn_ids(&ps[..2]), "oldest first");
    assert_eq!(txn_ids(&a.claim_unfinished(10).await.expect("claim")), txn_ids(&ps[..4]), "again");
    a.mark_acked(ps[0].txn_id.clone()).await.expect("ack");
    a.mark_acked(ps[4].txn_id.clone()).await.expect("an undecided payment is not acknowledged");
    assert!(!a.find_txn(ps[4].txn_id.clone()).await.expect("find").expect("exists").acked);
    assert_eq!(txn_ids(&a.claim_unfinished(10).await.expect("claim")), txn_ids(&ps[1..4]));
    a.mark_acked_lazily(ps[1].txn_id.clone());
    a.mark_acked_lazily(ps[2].txn_id.clone());
    let (left, patience) = (txn_ids(&ps[3..4]), Patience::new());
    while txn_ids(&a.claim_unfinished(10).await.expect("claim")) != left {
        patience.wait("lazy acknowledgements").await;
    }
    let acked = a.find_txn(ps[1].txn_id.clone()).await.expect("find").expect("exists");
    assert_eq!((acked.state, acked.acked), (PaymentState::Committed, true));
}

/// One phase: the mark travels with the record (every read has it), the
/// bank's decision is recorded lazily with the acknowledgement (never over
/// a decision already made, and never claimed for delivery), and an
/// undecided one is found by age like any other, for the sweep to ask its
/// bank.
pub async fn one_phase_payments_are_marked_and_their_outcome_recorded_lazily<S: GatewayStore>(a: &S, b: &S) {
    let x = user("x@BankA");
    let y = user("y@BankA");
    let one = |n: u64| PaymentRecord { one_phase: true, ..record(n, n, &x, &y, PaymentState::Preparing) };
    let ones: Vec<PaymentRecord> = (0..4).map(one).collect();
    for p in &ones {
        insert(a, p).await;
    }
    insert(a, &record(4, 4, &x, &y, PaymentState::Preparing)).await;
    let read = b.find_txn(uuid_of(0)).await.expect("find").expect("exists");
    assert_eq!(read, ones[0], "read as written, marked");
    assert!(b.find_payment(x.clone(), uuid_of(1)).await.expect("find").expect("exists").one_phase);
    let old = b.preparing_before(i64::MAX, 10).await.expect("preparing");
    let marks: Vec<bool> = old.iter().map(|p| p.one_phase).collect();
    assert_eq!(marks, [true, true, true, true, false], "found by age with their mark");
    let logged = b.payments_after(None, 10).await.expect("log");
    assert_eq!(logged.iter().filter(|p| p.one_phase).count(), 4);

    // The bank's decisions, recorded lazily; a decision made before stands.
    b.decide(uuid_of(2), PaymentState::Aborted, Some(DeclineReason::Timeout)).await.expect("decide");
    a.record_outcome_lazily(uuid_of(0), PaymentState::Committed, None);
    a.record_outcome_lazily(uuid_of(1), PaymentState::Aborted, Some(DeclineReason::InsufficientFunds));
    a.record_outcome_lazily(uuid_of(2), PaymentState::Committed, None);
    let patience = Patience::new();
    loop {
        let read = |n| async move { b.find_txn(uuid_of(n)).await.expect("find").expect("exists") };
        let (p0, p1) = (read(0).await, read(1).await);
        if p0.state != PaymentState::Preparing && p1.state != PaymentState::Preparing {
            assert_eq!((p0.state, p0.reason, p0.acked), (PaymentState::Committed, None, true));
            assert_eq!(
                (p1.state, p1.reason, p1.acked),
                (PaymentState::Aborted, Some(DeclineReason::InsufficientFunds), true)
            );
            break;
        }
        patience.wait("lazy one-phase outcomes").await;
    }
    let kept = b.find_txn(uuid_of(2)).await.expect("find").expect("exists");
    assert_eq!((kept.state, kept.reason), (PaymentState::Aborted, Some(DeclineReason::Timeout)), "stands");
    let unfinished = txn_ids(&a.claim_unfinished(10).await.expect("claim"));
    assert_eq!(unfinished, [uuid_of(2)], "recorded outcomes need no delivery");
    let undecided = txn_ids(&b.preparing_before(i64::MAX, 10).await.expect("preparing"));
    assert_eq!(undecided, [uuid_of(3), uuid_of(4)]);
}

pub async fn a_listing_has_what_the_caller_sent_and_the_committed_payments_they_received<S: GatewayStore>(
    s: &S,
    _b: &S,
) {
    let (me, other, third) = (user("me@BankA"), user("other@BankB"), user("third@BankA"));
    let rows = [
        (&me, &other, PaymentState::Committed),
        (&me, &other, PaymentState::Aborted),
        (&me, &third, PaymentState::Preparing),
        (&other, &me, PaymentState::Committed),
        (&other, &me, PaymentState::Aborted),
        (&third, &me, PaymentState::Preparing),
        (&other, &third, PaymentState::Committed),
    ];
    for (n, (payer, payee, state)) in rows.into_iter().enumerate() {
        insert(s, &record(n as u64, 100 + n as u64, payer, payee, state)).await;
    }
    let list = |q: PageQuery| s.list_payments(me.clone(), q);
    let all = list(PageQuery { limit: 10, ..PageQuery::default() }).await.expect("list");
    assert_eq!(txn_ids(&all.payments), [uuid_of(3), uuid_of(2), uuid_of(1), uuid_of(0)], "newest first");
    assert_eq!(all.next, None, "one page holds them all");

    let first = list(PageQuery { limit: 3, ..PageQuery::default() }).await.expect("list");
    assert_eq!(first.payments, all.payments[..3]);
    assert_eq!(first.next, Some(Cursor::after(&all.payments[2])));
    let rest = list(PageQuery { limit: 3, after: first.next, ..PageQuery::default() }).await;
    assert_eq!(rest.expect("list"), PaymentPage { payments: all.payments[3..].to_vec(), next: None });
    let zero = list(PageQuery { limit: 0, ..PageQuery::default() }).await.expect("list");
    assert_eq!(zero.payments.len(), 1, "a page always has a bounded, non-zero size");
    let huge = list(PageQuery { limit: u32::MAX, ..PageQuery::default() }).await.expect("list");
    assert_eq!(huge.payments, all.payments);

    let bounded = PageQuery { limit: 10, start_ms: Some(1_001), end_ms: Some(1_003), ..PageQuery::default() };
    let page = list(bounded.clone()).await.expect("list");
    assert_eq!(txn_ids(&page.payments), [uuid_of(2), uuid_of(1)], "start inclusive, end exclusive");
    let nobody = s.list_payments(user("nobody@BankA"), bounded).await.expect("list");
    assert!(nobody.payments.is_empty());
}

pub async fn a_payment_is_found_by_id_by_whoever_made_or_received_it<S: GatewayStore>(s: &S, _b: &S) {
    let (me, a, b) = (user("me@BankA"), user("a@BankB"), user("b@BankA"));
    let at = |n: u64, ms: i64, payer: &UserRef, payee: &UserRef| PaymentRecord {
        created_at_ms: ms,
        ..record(n, 7, payer, payee, PaymentState::Committed)
    };
    let find = |who: &UserRef, id: u64| s.find_payment_for(who.clone(), uuid_of(id));
    // Two payers used the same id to pay me; then I used it too.
    insert(s, &at(1, 10, &a, &me)).await;
    insert(s, &at(2, 20, &b, &me)).await;
    let newest = find(&me, 7).await.expect("find").expect("received");
    assert_eq!(newest.txn_id, uuid_of(2), "the newest payment received under that id");
    insert(s, &at(3, 5, &me, &a)).await;
    let mine = find(&me, 7).await.expect("find").expect("made");
    assert_eq!(mine.txn_id, uuid_of(3), "the one I made comes first");
    assert_eq!(s.find_payment(me.clone(), uuid_of(7)).await.expect("find"), Some(mine));
    let bs = s.find_payment(b.clone(), uuid_of(7)).await.expect("find");
    assert_eq!(bs.map(|p| p.txn_id), Some(uuid_of(2)));

    insert(s, &record(4, 8, &a, &me, PaymentState::Aborted)).await;
    assert_eq!(find(&me, 8).await.expect("find"), None, "declined: not the payee's");
    assert!(find(&a, 8).await.expect("find").is_some(), "but the payer's");
    assert_eq!(find(&user("c@BankB"), 7).await.expect("find"), None, "a stranger's");
    assert_eq!(find(&me, 99).await.expect("find"), None);
}

/// What the caller may see in a listing: what they sent, and what they
/// received once it committed.
fn visible(me: &UserRef, p: &PaymentRecord) -> bool {
    p.payer == *me || (p.payee == *me && p.state == PaymentState::Committed)
}

/// Payments arriving in a test: now (often at the same instant as the
/// newest) or, one time in five, back in the past (a clock step).
struct Arrivals {
    customers: Vec<UserRef>,
    serial: u64,
    now_ms: i64,
    /// Every payment made so far.
    made: Vec<PaymentRecord>,
}

impl Arrivals {
    async fn arrive<S: GatewayStore>(&mut self, s: &S, rng: &mut SplitMix64, initial: bool) {
        let n = self.customers.len() as u64;
        let payer = rng.below(n) as usize;
        let payee = (payer + 1 + rng.below(n - 1) as usize) % self.customers.len();
        let state = match rng.below(10) {
            0..=6 => PaymentState::Committed,
            7 | 8 => PaymentState::Aborted,
            _ => PaymentState::Preparing,
        };
        self.serial += 1;
        // Random txn ids, and few distinct instants: many ties on
        // created_at, broken by txn_id in no relation to arrival.
        let txn = uuid::Uuid::from_u128((u128::from(rng.next()) << 64) | u128::from(self.serial)).to_string();
        let at = if initial || rng.below(5) == 0 {
            rng.range(0, self.now_ms as u64) as i64
        } else {
            self.now_ms += rng.below(2) as i64;
            self.now_ms
        };
        let p = PaymentRecord {
            txn_id: txn,
            created_at_ms: at,
            ..record(0, self.serial, &self.customers[payer], &self.customers[payee], state)
        };
        insert(s, &p).await;
        self.made.push(p);
    }
}

/// A seeded random history among a few customers, paged through with small
/// pages while new payments (at any time, even in the past) keep arriving:
/// every payment that existed at the first page is listed exactly once, in
/// strictly decreasing (created_at, txn_id) order, inside the time bounds.
/// The seed is printed; replay with `STRIFE_PROP_SEED`.
pub async fn paging_while_payments_arrive_skips_nothing_and_repeats_nothing<S: GatewayStore>(s: &S, b: &S) {
    let seed = strife_core::rng::seed_from_env("STRIFE_PROP_SEED");
    let mut rng = SplitMix64(seed);
    let customers = vec![user("a@BankA"), user("b@BankA"), user("a@BankB"), user("c@BankB")];
    let mut arrivals = Arrivals { customers: customers.clone(), serial: 0, now_ms: 60, made: Vec::new() };
    for _ in 0..rng.range(0, 300) {
        arrivals.arrive(s, &mut rng, true).await;
    }
    for round in 0..30 {
        let me = &customers[rng.below(customers.len() as u64) as usize];
        let (lo, hi) = (rng.range(0, 40) as i64, rng.range(20, 80) as i64);
        let (start_ms, end_ms) = match rng.below(4) {
            0 => (None, None),
            1 => (Some(lo), None),
            2 => (None, Some(hi)),
            _ => (Some(lo), Some(hi)),
        };
        let within = |at: i64| start_ms.is_none_or(|s| at >= s) && end_ms.is_none_or(|e| at < e);
        let expected: BTreeSet<String> = arrivals
            .made
            .iter()
            .filter(|p| visible(me, p) && within(p.created_at_ms))
            .map(|p| p.txn_id.clone())
            .collect();
        let limit = rng.range(1, 7) as u32;
        let at = format!("seed {seed}, round {round}, {me}, limit {limit}, bounds {start_ms:?}..{end_ms:?}");
        let (mut listed, mut seen) = (Vec::new(), BTreeSet::new());
        let mut token: Option<String> = None;
        for pages in 0.. {
            assert!(pages < 10_000, "{at}: paging does not end");
            let after = token
                .as_deref()
                .map(|t| page_token::decode(t, start_ms, end_ms).unwrap_or_else(|e| panic!("{at}: {e}")));
            // Pages come from either instance, as a customer's would from any gateway.
            let reader = if pages % 2 == 0 { s } else { b };
            let page = reader
                .list_payments(me.clone(), PageQuery { limit, after, start_ms, end_ms })
                .await
                .expect("page");
            assert!(page.payments.len() <= limit as usize, "{at}");
            for p in &page.payments {
                assert!(visible(me, p) && within(p.created_at_ms), "{at}: {p:?} does not belong");
                assert!(seen.insert(p.txn_id.clone()), "{at}: {} shown twice", p.txn_id);
                listed.push((p.created_at_ms, p.txn_id.clone()));
            }
            for _ in 0..rng.below(3) {
                arrivals.arrive(s, &mut rng, false).await;
            }
            match page.next {
                Some(next) => {
                    assert_eq!(page.payments.len(), limit as usize, "{at}: a short page is the last");
                    token = Some(page_token::encode(&next, start_ms, end_ms));
                }
                None => break,
            }
        }
        assert!(listed.windows(2).all(|w| w[0] > w[1]), "{at}: not strictly newest first: {listed:?}");
        let skipped: Vec<&String> = expected.difference(&seen).collect();
        assert!(skipped.is_empty(), "{at}: skipped {skipped:?}");
    }
}

pub async fn the_log_is_read_in_transaction_id_order<S: GatewayStore>(s: &S, _b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    // Made out of order, read in order.
    for n in [5u64, 1, 4, 2, 3, 6, 0] {
        insert(s, &record(n, n, &x, &y, PaymentState::Committed)).await;
    }
    let mut read = Vec::new();
    let mut after = None;
    loop {
        let page = s.payments_after(after.clone(), 3).await.expect("page");
        assert!(page.len() <= 3);
        let Some(last) = page.last() else { break };
        after = Some(last.txn_id.clone());
        read.extend(txn_ids(&page));
    }
    assert_eq!(read, (0..7).map(uuid_of).collect::<Vec<_>>());
}

pub async fn undecided_payments_are_found_by_age<S: GatewayStore>(s: &S, b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    for n in 0..6 {
        insert(s, &record(n, n, &x, &y, PaymentState::Preparing)).await;
    }
    b.decide(uuid_of(1), PaymentState::Committed, None).await.expect("decide");
    // created_at = 1,000 + n
    let old = b.preparing_before(1_004, 10).await.expect("preparing");
    assert_eq!(txn_ids(&old), [uuid_of(0), uuid_of(2), uuid_of(3)], "oldest first, undecided only");
    assert_eq!(txn_ids(&s.preparing_before(1_004, 2).await.expect("preparing")), [uuid_of(0), uuid_of(2)]);
}

pub async fn counts_and_pruning<S: GatewayStore>(s: &S, b: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let states =
        [PaymentState::Preparing, PaymentState::Committed, PaymentState::Committed, PaymentState::Aborted];
    for (n, state) in states.into_iter().enumerate() {
        insert(s, &record(n as u64, n as u64, &x, &y, state)).await;
    }
    insert(s, &PaymentRecord { acked: true, ..record(4, 4, &x, &y, PaymentState::Committed) }).await;
    insert(s, &PaymentRecord { acked: true, ..record(5, 5, &x, &y, PaymentState::Aborted) }).await;
    let c = b.counts().await.expect("counts");
    assert_eq!((c.committed, c.aborted, c.preparing), (3, 2, 1));
    assert_eq!(c.undelivered, 3, "decided, not acknowledged");
    // created_at = 1,000 + n: only finished payments before the bound go.
    assert_eq!(b.prune(1_005).await.expect("prune"), 1);
    assert_eq!(s.find_txn(uuid_of(4)).await.expect("find"), None);
    assert!(s.find_txn(uuid_of(5)).await.expect("find").is_some(), "younger than the bound");
    assert!(s.find_txn(uuid_of(1)).await.expect("find").is_some(), "not acknowledged yet");
    assert_eq!(s.prune(i64::MAX).await.expect("prune"), 1);
    let c = s.counts().await.expect("counts");
    assert_eq!((c.committed, c.aborted, c.preparing), (2, 1, 1));
}

pub async fn the_dashboard_reads_timelines_recent_payments_and_declines<S: GatewayStore>(s: &S, b: &S) {
    use crate::store::{PaymentEvent, PaymentFilter};
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    for n in [2u64, 0, 1, 3] {
        insert(s, &record(n, n, &x, &y, PaymentState::Preparing)).await;
    }
    b.decide(uuid_of(1), PaymentState::Aborted, Some(DeclineReason::InsufficientFunds))
        .await
        .expect("decide");
    b.decide(uuid_of(2), PaymentState::Aborted, Some(DeclineReason::InsufficientFunds))
        .await
        .expect("decide");
    b.decide(uuid_of(3), PaymentState::Aborted, Some(DeclineReason::UnknownPayee)).await.expect("decide");
    assert_eq!(
        b.decline_counts().await.expect("declines"),
        [("insufficient_funds".to_owned(), 2), ("unknown_payee".to_owned(), 1)]
    );
    // Newest first, a page at a time; by payment id.
    let first = b.recent_payments(PaymentFilter::All, None, 3).await.expect("recent");
    assert_eq!(txn_ids(&first), [uuid_of(3), uuid_of(2), uuid_of(1)]);
    let next = first.last().map(Cursor::after);
    assert_eq!(txn_ids(&b.recent_payments(PaymentFilter::All, next, 3).await.expect("rest")), [uuid_of(0)]);
    let by_id = b.recent_payments(PaymentFilter::PaymentId(uuid_of(2)), None, 3).await.expect("by id");
    assert_eq!(txn_ids(&by_id), [uuid_of(2)]);
    // The timeline: written lazily, read in time order.
    let txn = uuid_of(1);
    s.record_events(vec![
        PaymentEvent::new(&txn, 10, "begin", None, String::new()),
        PaymentEvent::new(&txn, 12, "vote", Some("BankB"), "no: insufficient_funds".into()),
        PaymentEvent::new(&txn, 11, "vote", Some("BankA"), "yes".into()),
    ]);
    s.record_events(vec![PaymentEvent::new(&txn, 13, "decision", None, "x".repeat(1000))]);
    let patience = Patience::new();
    let events = loop {
        let events = b.payment_events(txn.clone()).await.expect("events");
        if events.len() == 4 {
            break events;
        }
        patience.wait("the timeline written").await;
    };
    let kinds: Vec<_> = events.iter().map(|e| (e.at_ms, e.kind, e.bank.as_deref())).collect();
    assert_eq!(
        kinds,
        [
            (10, "begin", None),
            (11, "vote", Some("BankA")),
            (12, "vote", Some("BankB")),
            (13, "decision", None)
        ]
    );
    assert_eq!(events[3].detail.len(), crate::store::EVENT_DETAIL_MAX, "long details are cut");
    assert!(b.payment_events(uuid_of(0)).await.expect("none").is_empty());
}

/// Each replica's heartbeat is one row (rewritten, not added), read by every
/// instance with its age; the heartbeat need not be durable when it
/// resolves (SQLite queues it), so the reads wait for it.
pub async fn every_instance_reads_every_heartbeat<S: GatewayStore>(a: &S, b: &S) {
    use crate::store::Heartbeat;
    let beat = |boot: &str, report: &str| Heartbeat {
        boot_id: boot.into(),
        address: format!("127.0.0.1:{}", boot.len()),
        admin_address: String::new(),
        started_at_ms: 42,
        report: report.into(),
    };
    a.heartbeat(beat("one", "{}")).await.expect("heartbeat");
    b.heartbeat(beat("two", "{}")).await.expect("heartbeat");
    a.heartbeat(beat("one", r#"{"conflicts":1}"#)).await.expect("heartbeat");
    let patience = Patience::new();
    loop {
        let rows = b.replicas(crate::cluster::REPLICAS_LISTED_MAX).await.expect("replicas");
        let one = rows.iter().find(|r| r.beat.boot_id == "one");
        if rows.len() == 2 && one.is_some_and(|r| r.beat.report.contains("conflicts")) {
            let one = one.expect("one");
            assert_eq!((one.beat.started_at_ms, one.beat.address.as_str()), (42, "127.0.0.1:3"));
            assert!((0..60_000).contains(&one.age_ms), "{one:?}");
            break;
        }
        patience.wait("both heartbeats, the second one's report rewritten").await;
    }
    assert_eq!(a.replicas(1).await.expect("replicas").len(), 1, "the limit holds");
}

pub async fn a_revocation_is_seen_by_every_instance<S: GatewayStore>(a: &S, b: &S) {
    let expires = strife_core::unix_ms() / 1000 + 3_600;
    assert!(!b.is_revoked("j1".into()).await.expect("revoked?"));
    a.revoke("j1".into(), expires).await.expect("revoke");
    assert!(a.is_revoked("j1".into()).await.expect("revoked?"));
    assert!(b.is_revoked("j1".into()).await.expect("revoked?"), "at once, at every instance");
    b.revoke("j1".into(), expires).await.expect("revoking twice is fine");
    assert!(!a.is_revoked("j2".into()).await.expect("revoked?"));
    // Many lookups at once (one batch where the store batches them): each
    // token gets its own answer.
    for n in (0..64).step_by(2) {
        a.revoke(format!("burst{n}"), expires).await.expect("revoke");
    }
    let lookups: Vec<_> = (0..64)
        .map(|n| {
            let b = b.clone();
            tokio::spawn(async move { b.is_revoked(format!("burst{n}")).await.expect("revoked?") })
        })
        .collect();
    for (n, lookup) in lookups.into_iter().enumerate() {
        assert_eq!(lookup.await.expect("task"), n % 2 == 0, "token burst{n}");
    }
}

/// Failed logins counted at two instances at once add up to one count (no
/// lost update), lock the key for both, and a success clears the count
/// but not the lock history.
pub async fn failed_logins_add_up_across_instances<S: GatewayStore>(a: &S, b: &S) {
    let key = "account:u@BankA".to_owned();
    let counting = Rule { failures_max: 1_000, lock: Duration::from_secs(60) };
    let now = 1_000_000;
    let mut tasks = Vec::new();
    for i in 0..20 {
        let (s, key) = (if i % 2 == 0 { a.clone() } else { b.clone() }, key.clone());
        tasks.push(tokio::spawn(
            async move { s.throttle_failure(key, counting, now).await.expect("failure") },
        ));
    }
    for t in tasks {
        t.await.expect("task");
    }
    let other = "peer:127.0.0.1".to_owned();
    let seen = b.throttle_entries(vec![key.clone(), other.clone()]).await.expect("entries");
    assert_eq!(seen[0].failures, 20, "every failure counted once: {seen:?}");
    assert_eq!(seen[1], Entry::default(), "a key never seen is fresh");

    let locking = Rule { failures_max: 22, lock: Duration::from_secs(60) };
    a.throttle_failure(key.clone(), locking, now).await.expect("21st");
    let locked = b.throttle_failure(key.clone(), locking, now).await.expect("22nd");
    assert_eq!((locked.failures, locked.locks, locked.locked_until_ms), (0, 1, now + 60_000));
    assert_eq!(a.throttle_entries(vec![key.clone()]).await.expect("entries")[0], locked);
    a.throttle_failure(key.clone(), locking, now).await.expect("one more");
    b.throttle_success(key.clone()).await.expect("success");
    let after = a.throttle_entries(vec![key]).await.expect("entries")[0];
    assert_eq!((after.failures, after.locks), (0, 1), "a success clears failures, not locks");
}

/// Every instance of one store answers one cluster id, made with it.
pub async fn one_cluster_id_for_every_instance<S: GatewayStore>(a: &S, b: &S) {
    let id = a.cluster_id().await.expect("cluster id");
    assert_eq!(id.len(), 36, "a UUID: {id}");
    assert_eq!(b.cluster_id().await.expect("cluster id"), id);
    assert_eq!(a.cluster_id().await.expect("again"), id, "stable");
}

pub async fn a_bank_keeps_each_address<S: GatewayStore>(a: &S, b: &S) {
    a.save_bank("BankA".into(), "127.0.0.1:1".into()).await.expect("save");
    b.save_bank("BankA".into(), "127.0.0.1:2".into()).await.expect("save");
    a.save_bank("BankB".into(), "127.0.0.1:3".into()).await.expect("save");
    a.save_bank("BankA".into(), "127.0.0.1:1".into()).await.expect("save again");
    let banks: BTreeSet<(String, String)> = b.banks().await.expect("banks").into_iter().collect();
    let want: BTreeSet<(String, String)> =
        [("BankA", "127.0.0.1:1"), ("BankA", "127.0.0.1:2"), ("BankB", "127.0.0.1:3")]
            .into_iter()
            .map(|(n, a)| (n.to_owned(), a.to_owned()))
            .collect();
    assert_eq!(banks, want, "two replicas of BankA, one of BankB");
    let names: Vec<String> = a.banks().await.expect("banks").into_iter().map(|(n, _)| n).collect();
    assert_eq!(names, ["BankA", "BankA", "BankB"], "by name");
    for port in 10..10 + BANK_ADDRESSES_MAX + 3 {
        a.save_bank("BankC".into(), format!("127.0.0.1:{port}")).await.expect("save");
    }
    let kept = a.banks().await.expect("banks").into_iter().filter(|(n, _)| n == "BankC").count();
    assert_eq!(kept, BANK_ADDRESSES_MAX as usize, "a bounded number of addresses per bank");
}

/// Payments begun by `quick` (whose process is long gone: its leases have
/// lapsed) and decided, unfinished: `a` and `b` claim them at once, again
/// and again, in small claims, and acknowledge what they claimed, as their
/// finishers would; no payment is claimed by both, and every one by one of
/// them. A claim holds: its claimer gets it again, nobody else does.
pub async fn two_instances_never_claim_one_payment<S: GatewayStore>(a: &S, b: &S, quick: &S) {
    const PAYMENTS: u64 = 60;
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let abandoned =
        |n: u64| PaymentRecord { deadline_at_ms: 0, ..record(n, n, &x, &y, PaymentState::Preparing) };
    for n in 0..PAYMENTS {
        insert(quick, &abandoned(n)).await;
        quick.decide(uuid_of(n), PaymentState::Committed, None).await.expect("decide");
    }
    let (mut by_a, mut by_b) = (BTreeSet::new(), BTreeSet::new());
    let patience = Patience::new();
    while by_a.len() + by_b.len() < PAYMENTS as usize {
        let (ca, cb) = tokio::join!(a.claim_unfinished(7), b.claim_unfinished(7));
        for (claimed, by, store) in [(ca, &mut by_a, a), (cb, &mut by_b, b)] {
            for txn in txn_ids(&claimed.expect("claim")) {
                store.mark_acked(txn.clone()).await.expect("ack");
                by.insert(txn);
            }
        }
        let both: Vec<&String> = by_a.intersection(&by_b).collect();
        assert!(both.is_empty(), "claimed by both: {both:?}");
        if by_a.len() + by_b.len() < PAYMENTS as usize {
            patience.wait("every payment claimed").await;
        }
    }
    let all: BTreeSet<String> = by_a.union(&by_b).cloned().collect();
    assert_eq!(all, (0..PAYMENTS).map(uuid_of).collect::<BTreeSet<_>>());

    for n in [100, 101] {
        insert(quick, &abandoned(n)).await;
        quick.decide(uuid_of(n), PaymentState::Aborted, None).await.expect("decide");
    }
    let patience = Patience::new();
    while txn_ids(&a.claim_unfinished(10).await.expect("claim")) != [uuid_of(100), uuid_of(101)] {
        patience.wait("both claimed").await;
    }
    assert!(b.claim_unfinished(10).await.expect("claim").is_empty(), "a live claim is not taken");
    assert!(quick.claim_unfinished(10).await.expect("claim").is_empty(), "a live claim is not taken");
    assert_eq!(txn_ids(&a.claim_unfinished(10).await.expect("claim")), [uuid_of(100), uuid_of(101)]);
}

/// A claim that lapsed (its process stopped renewing it) is taken over.
pub async fn a_lapsed_claim_is_taken_over<S: GatewayStore>(a: &S, _b: &S, quick: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let p = PaymentRecord { deadline_at_ms: 0, ..record(1, 1, &x, &y, PaymentState::Preparing) };
    insert(quick, &p).await;
    quick
        .decide(p.txn_id.clone(), PaymentState::Aborted, Some(DeclineReason::Timeout))
        .await
        .expect("decide");
    assert_eq!(txn_ids(&quick.claim_unfinished(10).await.expect("claim")), [p.txn_id.as_str()]);
    // quick's claim lapses at once: a takes the payment over.
    let patience = Patience::new();
    while txn_ids(&a.claim_unfinished(10).await.expect("claim")) != [p.txn_id.clone()] {
        patience.wait("the lapsed claim taken over").await;
    }
    assert!(quick.claim_unfinished(10).await.expect("claim").is_empty(), "now a holds it");
    a.mark_acked(p.txn_id.clone()).await.expect("ack");
    assert!(a.claim_unfinished(10).await.expect("claim").is_empty());
}

/// A payment is driven by the instance that began it until its deadline
/// plus the commit timeout; only then may another claim it.
pub async fn a_payment_is_left_to_the_instance_that_began_it<S: GatewayStore>(a: &S, b: &S, quick: &S) {
    let (x, y) = (user("x@BankA"), user("y@BankB"));
    let mine = record(1, 1, &x, &y, PaymentState::Preparing);
    insert(a, &mine).await;
    b.decide(mine.txn_id.clone(), PaymentState::Committed, None).await.expect("decided elsewhere");
    assert!(b.claim_unfinished(10).await.expect("claim").is_empty(), "a is still on it");
    assert!(quick.claim_unfinished(10).await.expect("claim").is_empty(), "a is still on it");
    assert_eq!(txn_ids(&a.claim_unfinished(10).await.expect("claim")), [mine.txn_id.as_str()]);
    // Begun by a process whose lease has lapsed: anyone may finish it.
    let abandoned = PaymentRecord { deadline_at_ms: 0, ..record(2, 2, &x, &y, PaymentState::Preparing) };
    insert(quick, &abandoned).await;
    a.decide(abandoned.txn_id.clone(), PaymentState::Aborted, None).await.expect("decide");
    let patience = Patience::new();
    while txn_ids(&b.claim_unfinished(10).await.expect("claim")) != [abandoned.txn_id.clone()] {
        patience.wait("the abandoned payment claimed").await;
    }
}

/// Token keys are the cluster's: a key added to one instance's key file
/// signs at every instance, the three newest verify, and an instance whose
/// file lags behind still gets the newest.
pub async fn a_key_added_at_one_instance_signs_at_every_other<S: GatewayStore>(a: &S, b: &S, _quick: &S) {
    let key = |kid: &str| (kid.to_owned(), Secret::new(kid.as_bytes().repeat(8)));
    let kids = |keys: Vec<SigningKey>| keys.into_iter().map(|(kid, _)| kid).collect::<Vec<_>>();
    assert_eq!(kids(a.token_keys(vec![key("k1")]).await.expect("keys")), ["k1"]);
    assert_eq!(
        kids(b.token_keys(vec![key("k1")]).await.expect("keys")),
        ["k1"],
        "the same file adds nothing"
    );
    assert_eq!(
        kids(b.token_keys(vec![key("k2"), key("k1")]).await.expect("keys")),
        ["k2", "k1"],
        "rotated at b"
    );
    assert_eq!(
        kids(a.token_keys(vec![key("k1")]).await.expect("keys")),
        ["k2", "k1"],
        "a signs with b's new key"
    );
    let keys = a.token_keys(vec![key("k4"), key("k3"), key("k2"), key("k1")]).await.expect("keys");
    assert_eq!(keys[0].1.expose(), key("k4").1.expose(), "the secret travels with its id");
    assert_eq!(kids(keys), ["k4", "k3", "k2"], "the newest three");
}
