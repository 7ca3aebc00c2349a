//! The ledger's conformance suite: what every backend of [`Ledger`] must do,
//! run by each backend's tests on a fresh ledger of its own
//! ([`conformance_suite!`]), so no backend can quietly mean something else.
//!
//! A fresh ledger belongs to bank `BankA` and has two accounts: `a` with
//! 10.00 and `b` with nothing.

use crate::accounts::{AccountSpec, Credential};
use crate::error::BankError;
use crate::ledger::{Decision, Ledger, LegRequest, LegState, Outcome, TransferRequest, Vote, state_name};
use std::collections::BTreeMap;
use std::future::Future;
use strife_core::{DeclineReason, Secret};

/// An account as stored: `(user, balance, held, incoming)`.
pub type AccountRow = (String, i64, i64, i64);
/// A leg as stored: `(txn_id, state, amount)`.
pub type LegRow = (String, String, i64);

/// What the suite reads straight from a backend's tables, to check it
/// against a model: every account and every leg, sorted.
pub trait Inspect: Ledger {
    fn accounts(&self) -> impl Future<Output = Vec<AccountRow>> + Send;
    fn legs(&self) -> impl Future<Output = Vec<LegRow>> + Send;
}

/// The accounts of every fresh ledger.
pub fn opening_accounts() -> Vec<AccountSpec> {
    [("a", 1000), ("b", 0)]
        .into_iter()
        .map(|(user, balance_minor)| AccountSpec {
            user: user.into(),
            // An Argon2id hash made elsewhere: the suite does not wait for hashing.
            credential: Credential::Hash(TEST_HASH.into()),
            balance_minor,
        })
        .collect()
}

/// `hash_password("p")`.
pub const TEST_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$zNN1IpHjTMK/wZcA6gFdbQ$2OwkE0ulxPNd4IrxXvWyR0OZtYHLdoMghVr2oB/Jz9o";

/// A leg between two accounts of `BankA`.
pub fn leg(txn: &str, from: &str, to: &str, amount: i64) -> LegRequest {
    LegRequest {
        txn_id: txn.into(),
        payment_id: txn.into(),
        payer_user: from.into(),
        payer_bank: "BankA".into(),
        payee_user: to.into(),
        payee_bank: "BankA".into(),
        amount_minor: amount,
    }
}

/// A one-phase transfer between two accounts of `BankA`, due far ahead.
pub fn transfer(txn: &str, from: &str, to: &str, amount: i64) -> TransferRequest {
    TransferRequest { leg: leg(txn, from, to, amount), deadline_ms: i64::MAX }
}

/// Generates one test per case of the suite, each on a fresh ledger from
/// `$fresh` (an async function returning the ledger and a guard that keeps
/// its storage alive); `$reopen` (an async function of that guard) opens
/// the same ledger again, as another process would.
macro_rules! conformance_suite {
    ($fresh:path, $reopen:path) => {
        mod conformance {
            use super::*;
            $crate::conformance::conformance_suite!(@case $fresh,
                hold_then_commit_moves_money_once,
                abort_releases_and_wins_over_a_late_prepare,
                unknown_accounts_vote_no,
                edges_of_a_new_leg_are_checked_alike,
                accounts_are_created_once,
                reads_answer_what_was_written,
                batches_answer_each_item_on_its_own,
                transfers_are_decided_once_at_the_bank,
                a_question_fences_a_transfer_never_seen,
                random_operations_keep_every_money_rule);

            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn the_ledger_id_is_made_once() {
                let (ledger, guard) = $fresh().await;
                let again = $reopen(&guard).await;
                let (other, _other_guard) = $fresh().await;
                $crate::conformance::the_ledger_id_is_made_once(&ledger, &again, &other).await;
            }
        }
    };
    (@case $fresh:path, $($case:ident),*) => {
        $(
            #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
            async fn $case() {
                let (ledger, _guard) = $fresh().await;
                $crate::conformance::$case(&ledger).await;
            }
        )*
    };
}
pub(crate) use conformance_suite;

/// `again` is the ledger of `s` opened a second time (while `s` is still
/// open), `other` another ledger: the id is made once, with the ledger, and
/// each ledger has its own.
pub async fn the_ledger_id_is_made_once<L: Inspect>(s: &L, again: &L, other: &L) {
    assert!(uuid::Uuid::parse_str(s.ledger_id()).is_ok(), "a UUID: {:?}", s.ledger_id());
    assert_eq!(again.ledger_id(), s.ledger_id(), "every opening of a ledger reads its one id");
    assert_ne!(other.ledger_id(), s.ledger_id(), "another ledger has its own id");
    assert_eq!(s.prepare(leg("t1", "a", "b", 100)).await.expect("prepare"), Vote::Yes);
    assert_eq!(again.balance("a".into()).await.expect("a"), (1000, 900), "and it is one ledger");
    assert_eq!(other.balance("a".into()).await.expect("a"), (1000, 1000));
}

pub async fn hold_then_commit_moves_money_once<L: Inspect>(s: &L) {
    assert_eq!(s.prepare(leg("t1", "a", "b", 600)).await.expect("prepare"), Vote::Yes);
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 400));
    assert_eq!(
        s.prepare(leg("t2", "a", "b", 600)).await.expect("prepare"),
        Vote::No(DeclineReason::InsufficientFunds)
    );
    assert_eq!(s.prepare(leg("t1", "a", "b", 600)).await.expect("again"), Vote::Yes, "prepare is idempotent");
    s.decide("t1".into(), Decision::Commit).await.expect("commit");
    s.decide("t1".into(), Decision::Commit).await.expect("commit is idempotent");
    assert_eq!(s.balance("a".into()).await.expect("a"), (400, 400));
    assert_eq!(s.balance("b".into()).await.expect("b"), (600, 600));
    assert!(
        matches!(s.decide("t1".into(), Decision::Abort).await, Err(BankError::Conflict(_))),
        "a committed leg cannot be aborted"
    );
    let (_, totals) = s.audit_page(None, u32::MAX).await.expect("audit");
    assert_eq!((totals.balance_minor, totals.held_minor), (1000, 0));
}

pub async fn abort_releases_and_wins_over_a_late_prepare<L: Inspect>(s: &L) {
    assert_eq!(s.prepare(leg("t1", "a", "b", 600)).await.expect("prepare"), Vote::Yes);
    s.decide("t1".into(), Decision::Abort).await.expect("abort");
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 1000));
    assert!(matches!(s.decide("t1".into(), Decision::Commit).await, Err(BankError::Conflict(_))));
    s.decide("t9".into(), Decision::Abort).await.expect("abort of an unknown payment");
    assert_eq!(s.prepare(leg("t9", "a", "b", 10)).await.expect("late"), Vote::No(DeclineReason::Timeout));
    assert!(s.open_legs(i64::MAX, 10).await.expect("open").is_empty());
    assert!(
        matches!(s.decide("t8".into(), Decision::Commit).await, Err(BankError::Conflict(_))),
        "a commit for a leg never prepared is refused"
    );
    assert!(!s.legs().await.iter().any(|l| l.0 == "t8"), "and leaves no record");
}

pub async fn unknown_accounts_vote_no<L: Inspect>(s: &L) {
    assert_eq!(s.prepare(leg("t1", "zz", "b", 1)).await.expect("p"), Vote::No(DeclineReason::UnknownPayer));
    assert_eq!(s.prepare(leg("t2", "a", "zz", 1)).await.expect("p"), Vote::No(DeclineReason::UnknownPayee));
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 1000));
    assert!(matches!(s.balance("zz".into()).await, Err(BankError::UnknownAccount(_))));
    let other_bank =
        LegRequest { payer_bank: "BankB".into(), payee_bank: "BankC".into(), ..leg("t3", "a", "b", 1) };
    assert!(matches!(s.prepare(other_bank).await, Err(BankError::Invalid { .. })), "no leg at this bank");
}

/// The edges of the check of a new leg and of a repeated prepare, which
/// each backend makes its own way (SQLite in Rust, PostgreSQL in a function
/// of its schema): the payee's maximum counts prepared credits, a leg may
/// have one side here, a repeat keeps its first vote and reason, and a
/// repeat with another amount is refused and changes nothing.
pub async fn edges_of_a_new_leg_are_checked_alike<L: Inspect>(s: &L) {
    use strife_core::limits::BALANCE_MAX_MINOR;
    let rich = AccountSpec {
        user: "rich".into(),
        credential: Credential::Hash(TEST_HASH.into()),
        balance_minor: BALANCE_MAX_MINOR - 10,
    };
    assert_eq!(s.create_accounts(vec![rich]).await.expect("rich"), 1);
    assert_eq!(
        s.prepare(leg("t1", "a", "rich", 11)).await.expect("p"),
        Vote::No(DeclineReason::BalanceLimit)
    );
    assert_eq!(s.prepare(leg("t2", "a", "rich", 6)).await.expect("p"), Vote::Yes);
    assert_eq!(
        s.prepare(leg("t3", "a", "rich", 5)).await.expect("p"),
        Vote::No(DeclineReason::BalanceLimit),
        "a prepared credit counts against the maximum"
    );
    assert_eq!(
        s.prepare(leg("t4", "a", "rich", 4)).await.expect("p"),
        Vote::Yes,
        "up to the maximum exactly"
    );
    // The payer elsewhere: only the credit is checked and reserved here.
    let credit_only = LegRequest { payer_bank: "BankB".into(), ..leg("t5", "nobody", "b", 2_000) };
    assert_eq!(s.prepare(credit_only.clone()).await.expect("p"), Vote::Yes);
    // The payee elsewhere: only the debit is checked and held here.
    let debit_only = LegRequest { payee_bank: "BankB".into(), ..leg("t6", "a", "nobody", 990) };
    assert_eq!(s.prepare(debit_only.clone()).await.expect("p"), Vote::Yes);
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 0));
    let again_more = LegRequest { amount_minor: 991, ..debit_only.clone() };
    assert!(matches!(s.prepare(again_more).await, Err(BankError::Conflict(_))), "another amount");
    let short = LegRequest { payee_bank: "BankB".into(), ..leg("t7", "a", "nobody", 1) };
    assert_eq!(s.prepare(short.clone()).await.expect("p"), Vote::No(DeclineReason::InsufficientFunds));
    assert_eq!(
        s.prepare(short.clone()).await.expect("again"),
        Vote::No(DeclineReason::InsufficientFunds),
        "a repeat keeps its reason"
    );
    // A declined leg is aborted with nothing held: a repeat with another
    // amount gets the same no, an abort changes nothing, a commit is refused.
    let short_more = LegRequest { amount_minor: 2, ..short };
    assert_eq!(s.prepare(short_more).await.expect("p"), Vote::No(DeclineReason::InsufficientFunds));
    s.decide("t7".into(), Decision::Abort).await.expect("abort");
    assert!(matches!(s.decide("t7".into(), Decision::Commit).await, Err(BankError::Conflict(_))));
    s.decide("t5".into(), Decision::Commit).await.expect("commit");
    s.decide("t6".into(), Decision::Commit).await.expect("commit");
    assert_eq!(s.balance("a".into()).await.expect("a"), (10, 0));
    assert_eq!(s.balance("b".into()).await.expect("b"), (2_000, 2_000));
    let rows = s.accounts().await;
    let rich = rows.iter().find(|r| r.0 == "rich").expect("rich");
    assert_eq!((rich.1, rich.2, rich.3), (BALANCE_MAX_MINOR - 10, 0, 10), "two credits reserved");
    let legs = s.legs().await;
    let state = |txn: &str| legs.iter().find(|l| l.0 == txn).map(|l| l.1.clone());
    assert_eq!(state("t1").as_deref(), Some(state_name(LegState::Aborted)));
    assert_eq!(state("t7").as_deref(), Some(state_name(LegState::Aborted)));
    assert_eq!(state("t5").as_deref(), Some(state_name(LegState::Committed)));
}

/// A password that cannot appear in a PHC hash string by chance: `-` is not
/// in its base64 alphabet (a two-letter one, as before, sometimes did).
const PLAIN_C: &str = "plain-password-of-c";

pub async fn accounts_are_created_once<L: Inspect>(s: &L) {
    assert_eq!(s.account_count().await.expect("count"), 2);
    let again = vec![
        AccountSpec { user: "a".into(), credential: Credential::Hash(TEST_HASH.into()), balance_minor: 5 },
        AccountSpec {
            user: "c".into(),
            credential: Credential::Password(Secret::new(PLAIN_C.into())),
            balance_minor: 7,
        },
    ];
    assert_eq!(s.create_accounts(again.clone()).await.expect("create"), 1, "only the missing one");
    assert_eq!(s.create_accounts(again).await.expect("again"), 0);
    assert_eq!(s.account_count().await.expect("count"), 3);
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 1000), "an existing account is untouched");
    assert_eq!(s.balance("c".into()).await.expect("c"), (7, 7));
    assert_eq!(s.password_hash("a".into()).await.expect("hash").as_deref(), Some(TEST_HASH));
    let hash = s.password_hash("c".into()).await.expect("hash").expect("c has a hash");
    assert!(
        hash.starts_with("$argon2id$") && !hash.contains(PLAIN_C),
        "a plaintext password is stored hashed"
    );
    assert_eq!(s.password_hash("zz".into()).await.expect("hash"), None);
    let (_, totals) = s.audit_page(None, u32::MAX).await.expect("audit");
    assert_eq!((totals.accounts, totals.opening_minor, totals.balance_minor), (3, 1007, 1007));
}

pub async fn reads_answer_what_was_written<L: Inspect>(s: &L) {
    for (txn, amount) in [("t1", 100), ("t2", 200), ("t3", 300)] {
        assert_eq!(s.prepare(leg(txn, "a", "b", amount)).await.expect("prepare"), Vote::Yes);
    }
    s.decide("t1".into(), Decision::Commit).await.expect("commit");
    s.decide("t2".into(), Decision::Abort).await.expect("abort");
    s.decide("t4".into(), Decision::Abort).await.expect("an abort record");

    let history = s.history("a".into(), 10).await.expect("history");
    assert_eq!(history.iter().map(|l| l.txn_id.as_str()).collect::<Vec<_>>(), ["t1"], "committed legs only");
    let h = &history[0];
    assert_eq!((h.payer_user.as_str(), h.payee_user.as_str(), h.amount_minor), ("a", "b", 100));
    assert_eq!((h.payer_bank.as_str(), h.state), ("BankA", LegState::Committed));
    assert!(h.prepared_at_ms > 0);
    assert_eq!(s.history("b".into(), 10).await.expect("history").len(), 1, "the payee sees it too");
    assert!(s.history("b".into(), 0).await.expect("history").is_empty(), "the limit holds");

    assert_eq!(s.open_legs(i64::MAX, 10).await.expect("open"), ["t3"]);
    assert!(s.open_legs(0, 10).await.expect("open").is_empty(), "only legs prepared before the bound");

    let (legs, totals) = s.audit_page(None, u32::MAX).await.expect("audit");
    let mut seen: Vec<(&str, &str)> = legs.iter().map(|l| (l.txn_id.as_str(), state_name(l.state))).collect();
    seen.sort();
    assert_eq!(seen, [("t1", "committed"), ("t2", "aborted"), ("t3", "prepared")], "no bare abort records");
    assert_eq!(
        (totals.accounts, totals.balance_minor, totals.held_minor, totals.opening_minor),
        (2, 1000, 300, 1000)
    );
    // Page by page: the same legs, in transaction-id order, and the same totals.
    let (mut paged, mut after) = (Vec::new(), None);
    loop {
        let (page, page_totals) = s.audit_page(after.clone(), 2).await.expect("audit page");
        assert_eq!((page_totals.balance_minor, page_totals.held_minor), (1000, 300));
        let last_page = page.len() < 2;
        after = page.last().map(|l| l.txn_id.clone()).or(after);
        paged.extend(page.into_iter().map(|l| l.txn_id));
        if last_page {
            break;
        }
    }
    assert_eq!(paged, ["t1", "t2", "t3"]);
}

pub async fn batches_answer_each_item_on_its_own<L: Inspect>(s: &L) {
    assert_eq!(s.prepare(leg("t0", "a", "b", 50)).await.expect("prepare"), Vote::Yes);
    let other_bank =
        LegRequest { payer_bank: "BankB".into(), payee_bank: "BankC".into(), ..leg("tx", "a", "b", 1) };
    // The items of a batch are independent (a backend may run them in any
    // order, or at once): these answers hold in every order.
    let votes = s
        .prepare_batch(vec![
            leg("t1", "a", "b", 100),
            leg("t0", "a", "b", 51),
            other_bank,
            leg("t2", "a", "b", 2_000),
            leg("t3", "a", "b", 800),
            leg("t1", "a", "b", 100),
        ])
        .await
        .expect("batch");
    assert_eq!(votes.len(), 6);
    assert!(matches!(votes[0], Ok(Vote::Yes)));
    assert!(matches!(votes[1], Err(BankError::Conflict(_))), "{:?}", votes[1]);
    assert!(matches!(votes[2], Err(BankError::Invalid { .. })), "{:?}", votes[2]);
    assert!(matches!(votes[3], Ok(Vote::No(DeclineReason::InsufficientFunds))), "{:?}", votes[3]);
    assert!(matches!(votes[4], Ok(Vote::Yes)), "{:?}", votes[4]);
    assert!(matches!(votes[5], Ok(Vote::Yes)), "a repeat inside the batch: {:?}", votes[5]);
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 50), "t0, t1 and t3 hold 950");
    // One more leg than the money left: the holds of the batch count.
    let over = s.prepare_batch(vec![leg("t4", "a", "b", 51)]).await.expect("batch");
    assert!(matches!(over[0], Ok(Vote::No(DeclineReason::InsufficientFunds))), "{over:?}");

    let results = s
        .decide_batch(vec![
            ("t0".into(), Decision::Commit),
            ("t1".into(), Decision::Abort),
            ("t2".into(), Decision::Commit),
            ("t3".into(), Decision::Commit),
        ])
        .await
        .expect("batch");
    assert_eq!(results.len(), 4);
    assert!(results[0].is_ok() && results[1].is_ok() && results[3].is_ok(), "{results:?}");
    assert!(matches!(results[2], Err(BankError::Conflict(_))), "t2 voted no: {:?}", results[2]);
    let late = s.decide_batch(vec![("t0".into(), Decision::Abort)]).await.expect("batch");
    assert!(matches!(late[0], Err(BankError::Conflict(_))), "t0 is committed: {late:?}");
    assert_eq!(s.balance("a".into()).await.expect("a"), (150, 150));
    assert_eq!(s.balance("b".into()).await.expect("b"), (850, 850));
    assert!(s.prepare_batch(Vec::new()).await.expect("empty").is_empty());
}

/// One transfer through `transfer_batch`.
async fn transfer_one<L: Ledger>(s: &L, t: TransferRequest) -> Result<Outcome, BankError> {
    let mut answers = s.transfer_batch(vec![t]).await.expect("batch");
    assert_eq!(answers.len(), 1);
    answers.remove(0)
}

/// One phase: the bank decides a payment within itself, once, durably;
/// a repeat answers the record; a transfer past its deadline is refused
/// whatever the funds; a side at another bank, another amount, or a leg
/// prepared under two-phase commit is refused and changes nothing.
pub async fn transfers_are_decided_once_at_the_bank<L: Inspect>(s: &L) {
    use strife_core::limits::BALANCE_MAX_MINOR;
    assert_eq!(transfer_one(s, transfer("t1", "a", "b", 600)).await.expect("t1"), Outcome::Committed);
    assert_eq!(s.balance("a".into()).await.expect("a"), (400, 400), "no hold: the money moved");
    assert_eq!(s.balance("b".into()).await.expect("b"), (600, 600));
    assert_eq!(transfer_one(s, transfer("t1", "a", "b", 600)).await.expect("again"), Outcome::Committed);
    assert_eq!(s.balance("a".into()).await.expect("a"), (400, 400), "a repeat moves nothing");
    let more = transfer("t1", "a", "b", 601);
    assert!(matches!(transfer_one(s, more).await, Err(BankError::Conflict(_))), "another amount");

    let short = Outcome::Aborted(DeclineReason::InsufficientFunds);
    assert_eq!(transfer_one(s, transfer("t2", "a", "b", 401)).await.expect("t2"), short);
    assert_eq!(transfer_one(s, transfer("t2", "a", "b", 1)).await.expect("again"), short, "its reason kept");
    let late = TransferRequest { deadline_ms: 0, ..transfer("t3", "a", "b", 1) };
    assert_eq!(transfer_one(s, late).await.expect("t3"), Outcome::Aborted(DeclineReason::Timeout));
    assert_eq!(
        transfer_one(s, transfer("t3", "a", "b", 1)).await.expect("again"),
        Outcome::Aborted(DeclineReason::Timeout),
        "refused for good"
    );
    let unknown = |r| Outcome::Aborted(r);
    assert_eq!(
        transfer_one(s, transfer("t4", "a", "zz", 1)).await.expect("t4"),
        unknown(DeclineReason::UnknownPayee)
    );
    assert_eq!(
        transfer_one(s, transfer("t5", "zz", "b", 1)).await.expect("t5"),
        unknown(DeclineReason::UnknownPayer)
    );
    let rich = AccountSpec {
        user: "rich".into(),
        credential: Credential::Hash(TEST_HASH.into()),
        balance_minor: BALANCE_MAX_MINOR - 10,
    };
    assert_eq!(s.create_accounts(vec![rich]).await.expect("rich"), 1);
    assert_eq!(s.prepare(leg("p0", "a", "rich", 6)).await.expect("p0"), Vote::Yes);
    assert_eq!(
        transfer_one(s, transfer("t6", "a", "rich", 5)).await.expect("t6"),
        unknown(DeclineReason::BalanceLimit),
        "a prepared credit counts against the payee's maximum"
    );
    assert_eq!(
        transfer_one(s, transfer("t7", "a", "b", 395)).await.expect("t7"),
        short,
        "a prepared debit's hold is not available"
    );
    s.decide("p0".into(), Decision::Abort).await.expect("abort p0");

    let elsewhere = TransferRequest {
        leg: LegRequest { payee_bank: "BankB".into(), ..leg("t8", "a", "b", 1) },
        deadline_ms: i64::MAX,
    };
    assert!(
        matches!(transfer_one(s, elsewhere).await, Err(BankError::Invalid { .. })),
        "not within the bank"
    );
    assert_eq!(s.prepare(leg("p1", "a", "b", 100)).await.expect("p1"), Vote::Yes);
    let before = (s.accounts().await, s.legs().await);
    assert!(matches!(transfer_one(s, transfer("p1", "a", "b", 100)).await, Err(BankError::Conflict(_))));
    assert!(matches!(
        s.resolve_transfer("p1".into(), DeclineReason::Timeout).await,
        Err(BankError::Conflict(_))
    ));
    assert_eq!((s.accounts().await, s.legs().await), before, "refusals change nothing");
    s.decide("p1".into(), Decision::Abort).await.expect("abort p1");
    assert!(s.transfer_batch(Vec::new()).await.expect("empty").is_empty());

    assert_eq!(s.history("a".into(), 10).await.expect("history").len(), 1, "t1, committed");
    let (legs, totals) = s.audit_page(None, u32::MAX).await.expect("audit");
    let states: BTreeMap<&str, &str> =
        legs.iter().map(|l| (l.txn_id.as_str(), state_name(l.state))).collect();
    assert_eq!(states.get("t1"), Some(&"committed"));
    assert_eq!(states.get("t2"), Some(&"aborted"));
    assert!(s.open_legs(i64::MAX, 10).await.expect("open").is_empty(), "a transfer is never in doubt");
    assert_eq!((totals.balance_minor - totals.opening_minor, totals.held_minor), (0, 0));
}

/// A question about a transfer: its decision, or, for one never seen, a
/// fence (aborted with the reason given) that the transfer then meets.
pub async fn a_question_fences_a_transfer_never_seen<L: Inspect>(s: &L) {
    let fenced = Outcome::Aborted(DeclineReason::BankUnavailable);
    assert_eq!(s.resolve_transfer("f1".into(), DeclineReason::BankUnavailable).await.expect("f1"), fenced);
    assert_eq!(transfer_one(s, transfer("f1", "a", "b", 100)).await.expect("late"), fenced, "refused");
    assert_eq!(s.resolve_transfer("f1".into(), DeclineReason::Timeout).await.expect("again"), fenced);
    assert_eq!(s.balance("a".into()).await.expect("a"), (1000, 1000), "nothing moved");
    assert!(s.history("a".into(), 10).await.expect("history").is_empty());

    assert_eq!(transfer_one(s, transfer("t1", "a", "b", 100)).await.expect("t1"), Outcome::Committed);
    assert_eq!(
        s.resolve_transfer("t1".into(), DeclineReason::Timeout).await.expect("t1"),
        Outcome::Committed
    );
    let short = Outcome::Aborted(DeclineReason::InsufficientFunds);
    assert_eq!(transfer_one(s, transfer("t2", "a", "b", 5_000)).await.expect("t2"), short);
    assert_eq!(s.resolve_transfer("t2".into(), DeclineReason::Timeout).await.expect("t2"), short);
    assert_eq!(s.balance("a".into()).await.expect("a"), (900, 900));

    // A batch: each transfer on its own, a repeat inside it answered alike.
    let answers = s
        .transfer_batch(vec![
            transfer("t3", "a", "b", 500),
            transfer("t3", "a", "b", 500),
            transfer("t4", "a", "b", 500),
            transfer("f1", "a", "b", 1),
            TransferRequest {
                leg: LegRequest { payer_bank: "BankB".into(), ..leg("t5", "a", "b", 1) },
                deadline_ms: i64::MAX,
            },
        ])
        .await
        .expect("batch");
    assert_eq!(answers.len(), 5);
    assert!(matches!(answers[0], Ok(Outcome::Committed)), "{:?}", answers[0]);
    assert!(matches!(answers[1], Ok(Outcome::Committed)), "{:?}", answers[1]);
    assert!(
        matches!(answers[2], Ok(o) if o == short),
        "the batch's earlier transfer counts: {:?}",
        answers[2]
    );
    assert!(matches!(answers[3], Ok(o) if o == fenced), "{:?}", answers[3]);
    assert!(matches!(answers[4], Err(BankError::Invalid { .. })), "{:?}", answers[4]);
    assert_eq!(s.balance("a".into()).await.expect("a"), (400, 400));
    assert_eq!(s.balance("b".into()).await.expect("b"), (600, 600));
    let legs = s.legs().await;
    let f1 = legs.iter().find(|l| l.0 == "f1").expect("the fence is a record");
    assert_eq!((f1.1.as_str(), f1.2), ("aborted", 0), "a bare abort record, no amount");
}

/// A seeded random run of prepares, commits and aborts (duplicated, out of
/// order, contradictory, for unknown ids) against a real ledger, with the
/// money rules checked after every operation. The seed is printed (shown on
/// failure); `STRIFE_PROP_SEED=<n>` replays a run.
pub async fn random_operations_keep_every_money_rule<L: Inspect>(s: &L) {
    const OPERATIONS: u32 = 3_000;
    // The distinct cases of the model below (the names passed to `hit`).
    const CASES: usize = 23;
    const USERS: [&str; 5] = ["a", "b", "c", "d", "e"];

    /// A leg as the test expects the store to hold it.
    #[derive(Debug, Clone, Copy, PartialEq)]
    enum Expect {
        Prepared,
        Committed,
        /// Aborted; a repeated prepare votes no with this reason.
        Aborted(DeclineReason),
    }
    #[derive(Debug, Clone, Copy)]
    struct Model {
        payer: usize,
        payee: usize,
        amount: i64,
        state: Expect,
    }

    use strife_core::rng::SplitMix64 as Rng;

    type Snapshot = (Vec<AccountRow>, Vec<LegRow>);
    async fn snapshot<L: Inspect>(s: &L) -> Snapshot {
        (s.accounts().await, s.legs().await)
    }

    /// Every money rule, and the store against the model.
    async fn check<L: Inspect>(
        s: &L,
        balances: &[i64],
        legs: &BTreeMap<String, Model>,
        total: i64,
        at: &str,
    ) {
        let accounts = s.accounts().await;
        let sum: i64 = accounts.iter().map(|a| a.1).sum();
        assert_eq!(sum, total, "{at}: the sum of balances changed");
        for (i, (user, balance, held, incoming)) in accounts.iter().enumerate() {
            let open = || legs.values().filter(|l| l.state == Expect::Prepared);
            let debits: i64 = open().filter(|l| l.payer == i).map(|l| l.amount).sum();
            let credits: i64 = open().filter(|l| l.payee == i).map(|l| l.amount).sum();
            assert!(*balance >= 0, "{at}: {user} has a negative balance {balance}");
            assert!(0 <= *held && held <= balance, "{at}: {user} holds {held} of {balance}");
            assert_eq!(*held, debits, "{at}: {user}'s hold is not the sum of its prepared debits");
            assert_eq!(*incoming, credits, "{at}: {user}'s incoming is not the sum of its prepared credits");
            assert_eq!(*balance, balances[i], "{at}: {user}'s balance");
            assert_eq!(
                s.balance(user.clone()).await.expect("balance"),
                (*balance, balance - held),
                "{at}: {user}"
            );
        }
        let (_, totals) = s.audit_page(None, u32::MAX).await.expect("audit");
        let held: i64 = legs.values().filter(|l| l.state == Expect::Prepared).map(|l| l.amount).sum();
        assert_eq!((totals.balance_minor, totals.held_minor), (total, held), "{at}: audit totals");
    }
    /// How an operation reaches the ledger: alone, as a batch of one, or as
    /// a batch of it twice (the repeat must get the first one's answer).
    async fn prepare_via<L: Inspect>(s: &L, via: u64, leg: LegRequest, at: &str) -> Result<Vote, BankError> {
        match via {
            0 => s.prepare(leg).await,
            1 => one(s.prepare_batch(vec![leg]).await.expect("batch")),
            _ => twice(s.prepare_batch(vec![leg.clone(), leg]).await.expect("batch"), at),
        }
    }
    async fn decide_via<L: Inspect>(
        s: &L,
        via: u64,
        txn: &str,
        d: Decision,
        at: &str,
    ) -> Result<(), BankError> {
        match via {
            0 => s.decide(txn.to_owned(), d).await,
            1 => one(s.decide_batch(vec![(txn.to_owned(), d)]).await.expect("batch")),
            _ => twice(
                s.decide_batch(vec![(txn.to_owned(), d), (txn.to_owned(), d)]).await.expect("batch"),
                at,
            ),
        }
    }
    fn one<T>(answers: Vec<Result<T, BankError>>) -> Result<T, BankError> {
        assert_eq!(answers.len(), 1);
        answers.into_iter().next().expect("an answer")
    }
    fn twice<T: PartialEq + std::fmt::Debug>(
        answers: Vec<Result<T, BankError>>,
        at: &str,
    ) -> Result<T, BankError> {
        assert_eq!(answers.len(), 2);
        match (&answers[0], &answers[1]) {
            (Ok(x), Ok(y)) => assert_eq!(x, y, "{at}: a repeat in a batch answered otherwise"),
            (Err(x), Err(y)) => assert_eq!(
                std::mem::discriminant(x),
                std::mem::discriminant(y),
                "{at}: a repeat in a batch failed otherwise: {x:?}, {y:?}"
            ),
            (x, y) => panic!("{at}: a repeat in a batch answered otherwise: {x:?}, {y:?}"),
        }
        answers.into_iter().next().expect("an answer")
    }
    fn legs_held_by(legs: &BTreeMap<String, Model>, payer: usize) -> i64 {
        legs.values().filter(|l| l.state == Expect::Prepared && l.payer == payer).map(|l| l.amount).sum()
    }

    let seed = strife_core::rng::seed_from_env("STRIFE_PROP_SEED");
    let mut rng = Rng(seed);
    let more: Vec<AccountSpec> = USERS[2..]
        .iter()
        .map(|u| AccountSpec {
            user: (*u).into(),
            credential: Credential::Hash(TEST_HASH.into()),
            balance_minor: rng.below(5_000) as i64,
        })
        .collect();
    s.create_accounts(more).await.expect("accounts");
    let mut balances = Vec::new();
    for u in USERS {
        balances.push(s.balance(u.into()).await.expect("balance").0);
    }
    let total: i64 = balances.iter().sum();
    let mut legs: BTreeMap<String, Model> = BTreeMap::new();
    // How often each case was met: every one must be, or the run proves little.
    let mut hits: BTreeMap<&str, u32> = BTreeMap::new();
    // Ids the store must not know: a commit for one is refused and leaves
    // no record.
    let mut fresh = 0u32;

    // At least OPERATIONS; past them, on until every case has come up
    // (several come up only five to ten times in OPERATIONS, so a seed
    // now and then meets one of them never), at most four times as many.
    let mut step = 0;
    while step < OPERATIONS || (hits.len() < CASES && step < 4 * OPERATIONS) {
        step += 1;
        let open: Vec<&String> =
            legs.iter().filter(|(_, l)| l.state == Expect::Prepared).map(|(t, _)| t).collect();
        // The leg an operation is about: mostly an open one, else any known
        // one, else one the store never heard of.
        let known_txn = match rng.below(10) {
            0..6 if !open.is_empty() => Some(open[rng.below(open.len() as u64) as usize].clone()),
            0..9 if !legs.is_empty() => legs.keys().nth(rng.below(legs.len() as u64) as usize).cloned(),
            _ => None,
        };
        let txn = known_txn.unwrap_or_else(|| {
            fresh += 1;
            format!("t{fresh}")
        });
        let known = legs.get(&txn).copied();
        let op = rng.below(13);
        let via = rng.below(3);
        let at = format!("seed {seed}, step {step}, op {op} via {via} on {txn} ({known:?})");
        let before = snapshot(s).await;
        let mut hit = |case| *hits.entry(case).or_default() += 1;
        match op {
            // Prepare: a new leg, or a repeated one (same or other amount).
            0..4 => {
                let payer = rng.below(USERS.len() as u64) as usize;
                let payee = (payer + 1 + rng.below(USERS.len() as u64 - 1) as usize) % USERS.len();
                let available = balances[payer] - legs_held_by(&legs, payer);
                let amount = match rng.below(4) {
                    0 => available + 1 + rng.below(100) as i64,
                    1 => available.max(1),
                    _ => 1 + rng.below(balances[payer].max(1) as u64 * 2) as i64,
                };
                let (payer, payee, amount) = match known {
                    Some(l) if rng.below(4) != 0 => (l.payer, l.payee, l.amount),
                    _ => (payer, payee, amount),
                };
                let got = prepare_via(s, via, leg(&txn, USERS[payer], USERS[payee], amount), &at).await;
                match known {
                    None => {
                        let available = balances[payer] - legs_held_by(&legs, payer);
                        let (want, state) = if amount <= available {
                            (Vote::Yes, Expect::Prepared)
                        } else {
                            let r = DeclineReason::InsufficientFunds;
                            (Vote::No(r), Expect::Aborted(r))
                        };
                        assert_eq!(got.expect("prepare"), want, "{at}: amount {amount}");
                        hit(if want == Vote::Yes { "prepare: yes" } else { "prepare: no" });
                        legs.insert(txn.clone(), Model { payer, payee, amount, state });
                    }
                    Some(Model { state: Expect::Aborted(r), .. }) => {
                        assert_eq!(got.expect("prepare"), Vote::No(r), "{at}");
                        hit("prepare again: no");
                    }
                    Some(l) if l.amount == amount => {
                        assert_eq!(got.expect("prepare"), Vote::Yes, "{at}");
                        hit("prepare again: yes");
                    }
                    Some(_) => {
                        assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                        assert_eq!(snapshot(s).await, before, "{at}: a refused prepare changed something");
                        hit("prepare again: other amount, refused");
                    }
                }
            }
            // Commit.
            4..7 => {
                let got = decide_via(s, via, &txn, Decision::Commit, &at).await;
                match known {
                    Some(l) if l.state == Expect::Prepared => {
                        got.expect("commit");
                        balances[l.payer] -= l.amount;
                        balances[l.payee] += l.amount;
                        legs.insert(txn.clone(), Model { state: Expect::Committed, ..l });
                        hit("commit");
                    }
                    Some(Model { state: Expect::Committed, .. }) => {
                        got.expect("a repeated commit");
                        assert_eq!(snapshot(s).await.0, before.0, "{at}: a repeated commit moved money");
                        hit("commit again");
                    }
                    _ => {
                        assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                        assert_eq!(snapshot(s).await, before, "{at}: a refused commit changed something");
                        hit(if known.is_some() {
                            "commit after abort, refused"
                        } else {
                            "commit unknown, refused"
                        });
                    }
                }
            }
            // Abort.
            7..10 => {
                let got = decide_via(s, via, &txn, Decision::Abort, &at).await;
                match known {
                    Some(l) if l.state == Expect::Prepared => {
                        got.expect("abort");
                        let state = Expect::Aborted(DeclineReason::Timeout);
                        legs.insert(txn.clone(), Model { state, ..l });
                        hit("abort");
                    }
                    Some(Model { state: Expect::Aborted(_), .. }) => {
                        got.expect("a repeated abort");
                        assert_eq!(snapshot(s).await.0, before.0, "{at}: a repeated abort moved money");
                        hit("abort again");
                    }
                    Some(_) => {
                        assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                        assert_eq!(snapshot(s).await, before, "{at}: a refused abort changed something");
                        hit("abort after commit, refused");
                    }
                    None => {
                        got.expect("abort of an unknown leg");
                        let state = Expect::Aborted(DeclineReason::Timeout);
                        legs.insert(txn.clone(), Model { payer: 0, payee: 1, amount: 0, state });
                        assert_eq!(snapshot(s).await.0, before.0, "{at}: an unknown abort moved money");
                        hit("abort unknown");
                    }
                }
            }
            // One phase: a transfer, new (sometimes past its deadline) or repeated.
            10..12 => {
                let payer = rng.below(USERS.len() as u64) as usize;
                let payee = (payer + 1 + rng.below(USERS.len() as u64 - 1) as usize) % USERS.len();
                let available = balances[payer] - legs_held_by(&legs, payer);
                let amount = match rng.below(3) {
                    0 => available + 1 + rng.below(100) as i64,
                    _ => 1 + rng.below(available.max(1) as u64) as i64,
                };
                let (payer, payee, amount) = match known {
                    Some(l) if rng.below(4) != 0 => (l.payer, l.payee, l.amount.max(1)),
                    _ => (payer, payee, amount),
                };
                let late = rng.below(8) == 0;
                let deadline_ms = if late { 0 } else { i64::MAX };
                let t = TransferRequest { leg: leg(&txn, USERS[payer], USERS[payee], amount), deadline_ms };
                let got = transfer_one(s, t).await;
                match known {
                    None => {
                        let available = balances[payer] - legs_held_by(&legs, payer);
                        let state = if late {
                            Expect::Aborted(DeclineReason::Timeout)
                        } else if amount <= available {
                            Expect::Committed
                        } else {
                            Expect::Aborted(DeclineReason::InsufficientFunds)
                        };
                        match state {
                            Expect::Aborted(r) => {
                                assert_eq!(
                                    got.expect("transfer"),
                                    Outcome::Aborted(r),
                                    "{at}: amount {amount}"
                                );
                                hit(if late { "transfer: past its deadline" } else { "transfer: declined" });
                            }
                            _ => {
                                assert_eq!(
                                    got.expect("transfer"),
                                    Outcome::Committed,
                                    "{at}: amount {amount}"
                                );
                                balances[payer] -= amount;
                                balances[payee] += amount;
                                hit("transfer: committed");
                            }
                        }
                        legs.insert(txn.clone(), Model { payer, payee, amount, state });
                    }
                    Some(Model { state: Expect::Prepared, .. }) => {
                        assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                        assert_eq!(snapshot(s).await, before, "{at}: a refused transfer changed something");
                        hit("transfer on a prepared leg, refused");
                    }
                    Some(Model { state: Expect::Aborted(r), .. }) => {
                        assert_eq!(got.expect("transfer"), Outcome::Aborted(r), "{at}");
                        hit("transfer again: aborted");
                    }
                    Some(l) if l.amount == amount => {
                        assert_eq!(got.expect("transfer"), Outcome::Committed, "{at}");
                        assert_eq!(snapshot(s).await, before, "{at}: a repeated transfer changed something");
                        hit("transfer again: committed");
                    }
                    Some(_) => {
                        assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                        assert_eq!(snapshot(s).await, before, "{at}: a refused transfer changed something");
                        hit("transfer again: other amount, refused");
                    }
                }
            }
            // One phase: a question about a transfer.
            _ => {
                let reason =
                    if rng.below(2) == 0 { DeclineReason::Timeout } else { DeclineReason::BankUnavailable };
                let got = s.resolve_transfer(txn.clone(), reason).await;
                match known {
                    None => {
                        assert_eq!(got.expect("resolve"), Outcome::Aborted(reason), "{at}");
                        let state = Expect::Aborted(reason);
                        legs.insert(txn.clone(), Model { payer: 0, payee: 1, amount: 0, state });
                        assert_eq!(snapshot(s).await.0, before.0, "{at}: a fence moved money");
                        hit("resolve unknown: fenced");
                    }
                    Some(Model { state: Expect::Prepared, .. }) => {
                        assert!(matches!(got, Err(BankError::Conflict(_))), "{at}: {got:?}");
                        assert_eq!(snapshot(s).await, before, "{at}: a refused question changed something");
                        hit("resolve a prepared leg, refused");
                    }
                    Some(Model { state: Expect::Committed, .. }) => {
                        assert_eq!(got.expect("resolve"), Outcome::Committed, "{at}");
                        hit("resolve known");
                    }
                    Some(Model { state: Expect::Aborted(r), .. }) => {
                        assert_eq!(got.expect("resolve"), Outcome::Aborted(r), "{at}");
                        hit("resolve known");
                    }
                }
            }
        }
        check(s, &balances, &legs, total, &at).await;
    }
    assert_eq!(hits.len(), CASES, "seed {seed}: some cases never came up in {step} operations: {hits:?}");

    // Decide every open leg; then no hold and no reservation remains.
    let open: Vec<(String, Model)> =
        legs.iter().filter(|(_, l)| l.state == Expect::Prepared).map(|(t, l)| (t.clone(), *l)).collect();
    for (txn, l) in open {
        let at = format!("seed {seed}, deciding {txn}");
        if rng.below(2) == 0 {
            s.decide(txn.clone(), Decision::Commit).await.expect("commit");
            balances[l.payer] -= l.amount;
            balances[l.payee] += l.amount;
            legs.insert(txn, Model { state: Expect::Committed, ..l });
        } else {
            s.decide(txn.clone(), Decision::Abort).await.expect("abort");
            legs.insert(txn, Model { state: Expect::Aborted(DeclineReason::Timeout), ..l });
        }
        check(s, &balances, &legs, total, &at).await;
    }
    let accounts = s.accounts().await;
    assert!(accounts.iter().all(|a| a.2 == 0 && a.3 == 0), "seed {seed}: a hold remains: {accounts:?}");
    assert!(s.open_legs(i64::MAX, u32::MAX).await.expect("open legs").is_empty(), "seed {seed}: an open leg");
}
