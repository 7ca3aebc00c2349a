//! The bodies of the fuzz targets, written once. `fuzz/fuzz_targets/*.rs`
//! include this file with `#[path]` and libFuzzer drives it (nightly);
//! `tests/fuzz_smoke.rs` drives the very same functions with a seeded
//! generator on stable, so CI runs every check without a fuzzer.
//!
//! A body must not panic on any input. The asserts in it are the contracts:
//! a panic means that the code under test panicked or broke its contract.

use prost::Message;
use strife_bank::error::BankError;
use strife_core::limits::{
    ADDRESS_MAX, AMOUNT_MAX_MINOR, AMOUNT_TEXT_MAX, HISTORY_PAGE_MAX, PASSWORD_MAX, STORE_ID_MAX,
};
use strife_core::money::format_minor;
use strife_core::{Amount, PaymentId, Secret, UserRef, validate_bank_name, validate_user_name};
use strife_gateway::error::GatewayError;
use strife_gateway::tokens::{AUDIENCE, ISSUER, TokenKeys, now_secs};
use strife_proto::bank::v1 as bank;
use strife_proto::gateway::v1 as gw;

/// What one input reached, so that the smoke test can tell that it gets
/// past decoding and that validators both accept and refuse.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The bytes are not a message of the chosen type (or not UTF-8).
    Undecoded,
    /// A validator refused the input with an "invalid argument" error.
    Refused,
    /// A validator accepted the input, and its result met the contract.
    Accepted,
}

/// The RPC whose request the `requests` target decodes, chosen by the first
/// byte of the input (modulo [`Rpc::ALL`]'s length).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rpc {
    Login,
    Logout,
    GatewayBalance,
    Pay,
    GetPayment,
    GatewayHistory,
    RegisterBank,
    Inquire,
    Status,
    VerifyPassword,
    BankBalance,
    Prepare,
    Commit,
    Abort,
    BankHistory,
    Audit,
    /// Not an RPC: the bytes as a bearer token, as the gateway's
    /// interceptor verifies it before any customer RPC.
    Token,
}

impl Rpc {
    pub const ALL: [Rpc; 17] = [
        Rpc::Login,
        Rpc::Logout,
        Rpc::GatewayBalance,
        Rpc::Pay,
        Rpc::GetPayment,
        Rpc::GatewayHistory,
        Rpc::RegisterBank,
        Rpc::Inquire,
        Rpc::Status,
        Rpc::VerifyPassword,
        Rpc::BankBalance,
        Rpc::Prepare,
        Rpc::Commit,
        Rpc::Abort,
        Rpc::BankHistory,
        Rpc::Audit,
        Rpc::Token,
    ];

    /// The first byte that selects this RPC.
    pub fn selector(self) -> u8 {
        Rpc::ALL.iter().position(|r| *r == self).map_or(0, |i| i as u8)
    }
}

/// The customer every fuzzed payment is made by.
pub fn payer() -> UserRef {
    UserRef::new("user1", "BankA").expect("a valid customer name")
}

/// The token keys fuzzed tokens are verified with; the smoke test issues
/// valid tokens with the same keys and mutates them.
pub fn token_keys() -> TokenKeys {
    TokenKeys::new("k".into(), &Secret::new(vec![1; 32]), 60).expect("a 32-byte key")
}

/// Target `amount`: parsing arbitrary text and formatting any `i64`.
pub fn amount(data: &[u8]) -> Outcome {
    if let Some(head) = data.first_chunk::<8>() {
        check_format_minor(i64::from_le_bytes(*head));
    }
    let Ok(text) = std::str::from_utf8(data) else { return Outcome::Undecoded };
    match Amount::parse(text) {
        Ok(a) => {
            assert!((1..=AMOUNT_MAX_MINOR).contains(&a.minor()), "{text:?} parsed to {}", a.minor());
            assert!(text.len() <= AMOUNT_TEXT_MAX, "{text:?} is longer than the maximum");
            assert!(text.bytes().all(|b| b.is_ascii_digit() || b == b'.'), "{text:?} has a stray character");
            assert_eq!(Amount::parse(&a.to_string()), Ok(a), "{text:?} does not round-trip");
            Outcome::Accepted
        }
        Err(_) => Outcome::Refused,
    }
}

/// `format_minor` shows exactly `minor`: an optional `-`, the whole part
/// without leading zeros, a point and two digits; a valid amount parses back.
fn check_format_minor(minor: i64) {
    let text = format_minor(minor);
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text.as_str()),
    };
    assert_eq!(negative, minor < 0, "format_minor({minor}) = {text:?}: wrong sign");
    let (whole, frac) =
        unsigned.split_once('.').unwrap_or_else(|| panic!("format_minor({minor}) = {text:?}: no point"));
    let digits = |s: &str| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit());
    assert!(digits(whole) && digits(frac) && frac.len() == 2, "format_minor({minor}) = {text:?}");
    assert!(whole == "0" || !whole.starts_with('0'), "format_minor({minor}) = {text:?}: leading zero");
    let magnitude = whole
        .parse::<i128>()
        .ok()
        .zip(frac.parse::<i128>().ok())
        .map(|(w, f)| w * 100 + f)
        .unwrap_or_else(|| panic!("format_minor({minor}) = {text:?}: not a number"));
    let value = if negative { -magnitude } else { magnitude };
    assert_eq!(value, i128::from(minor), "format_minor({minor}) = {text:?}: wrong value");
    if let Some(a) = Amount::from_minor(minor) {
        assert_eq!(a.to_string(), text);
        assert_eq!(Amount::parse(&text), Ok(a), "format_minor({minor}) does not parse back");
    }
}

/// Target `requests`: the first byte picks an RPC, the rest is decoded as
/// its request and, when it decodes, run through that RPC's pure validator.
pub fn requests(data: &[u8]) -> Outcome {
    let Some((&first, body)) = data.split_first() else { return Outcome::Undecoded };
    match Rpc::ALL[usize::from(first) % Rpc::ALL.len()] {
        Rpc::Login => decoded(gw::LoginRequest::decode(body), check_login),
        Rpc::Logout => decoded(gw::LogoutRequest::decode(body), |_| Outcome::Accepted),
        Rpc::GatewayBalance => decoded(gw::GetBalanceRequest::decode(body), |_| Outcome::Accepted),
        Rpc::Pay => decoded(gw::PayRequest::decode(body), check_pay),
        Rpc::GetPayment => decoded(gw::GetPaymentRequest::decode(body), |r| check_payment_id(&r.payment_id)),
        Rpc::GatewayHistory => decoded(gw::ListPaymentsRequest::decode(body), check_list_payments),
        Rpc::RegisterBank => decoded(gw::RegisterBankRequest::decode(body), check_register),
        Rpc::Inquire => decoded(gw::InquireRequest::decode(body), check_inquire),
        Rpc::Status => decoded(gw::StatusRequest::decode(body), |_| Outcome::Accepted),
        Rpc::VerifyPassword => decoded(bank::VerifyPasswordRequest::decode(body), |r| check_user(&r.user)),
        Rpc::BankBalance => decoded(bank::GetBalanceRequest::decode(body), |r| check_user(&r.user)),
        Rpc::Prepare => decoded(bank::PrepareRequest::decode(body), check_prepare),
        Rpc::Commit => decoded(bank::CommitRequest::decode(body), |r| check_txn_id(&r.txn_id)),
        Rpc::Abort => decoded(bank::AbortRequest::decode(body), |r| check_txn_id(&r.txn_id)),
        Rpc::BankHistory => decoded(bank::GetHistoryRequest::decode(body), |r| check_user(&r.user)),
        Rpc::Audit => decoded(bank::AuditRequest::decode(body), |_| Outcome::Accepted),
        Rpc::Token => match std::str::from_utf8(body) {
            Ok(token) => check_token(token),
            Err(_) => Outcome::Undecoded,
        },
    }
}

fn decoded<T>(message: Result<T, prost::DecodeError>, check: impl FnOnce(T) -> Outcome) -> Outcome {
    message.map_or(Outcome::Undecoded, check)
}

/// A gateway validator may refuse only with `Invalid` (INVALID_ARGUMENT),
/// never with an internal error.
fn gateway_refusal(what: &str, e: &GatewayError) -> Outcome {
    assert!(matches!(e, GatewayError::Invalid { .. }), "{what} refused with {e:?}");
    Outcome::Refused
}

fn bank_refusal(what: &str, e: &BankError) -> Outcome {
    assert!(matches!(e, BankError::Invalid { .. }), "{what} refused with {e:?}");
    Outcome::Refused
}

fn valid_user_ref(who: &UserRef) -> bool {
    UserRef::new(&who.user, &who.bank).is_ok()
}

fn check_login(req: gw::LoginRequest) -> Outcome {
    match strife_gateway::validate::login(req.clone()) {
        Ok((who, password)) => {
            assert!(valid_user_ref(&who), "login accepted {who:?}");
            assert_eq!((who.user.as_str(), who.bank.as_str()), (req.user.as_str(), req.bank.as_str()));
            assert_eq!(password.expose(), &req.password);
            assert!((1..=PASSWORD_MAX).contains(&req.password.len()), "login accepted a bad password length");
            Outcome::Accepted
        }
        Err(e) => gateway_refusal("login", &e),
    }
}

fn check_pay(req: gw::PayRequest) -> Outcome {
    let payer = payer();
    match strife_gateway::validate::pay(&payer, &req) {
        Ok(pay) => {
            let minor = pay.amount.minor();
            assert!((1..=AMOUNT_MAX_MINOR).contains(&minor), "pay accepted {minor} minor units");
            assert_eq!(Amount::parse(&req.amount), Ok(pay.amount));
            assert_ne!(pay.payee, payer, "pay accepted a payment to oneself");
            assert_eq!(pay.payer, payer);
            assert!(valid_user_ref(&pay.payee), "pay accepted payee {:?}", pay.payee);
            let payee = req.payee.as_ref().expect("pay accepted a payment with no payee");
            assert_eq!((pay.payee.user.as_str(), pay.payee.bank.as_str()), (&*payee.user, &*payee.bank));
            assert_canonical_id(&req.payment_id, pay.payment_id);
            Outcome::Accepted
        }
        Err(e) => gateway_refusal("pay", &e),
    }
}

/// An accepted payment id is a hyphenated UUID whose canonical form is its
/// lower-case text, so one payment cannot hide under two spellings.
fn assert_canonical_id(text: &str, id: PaymentId) {
    assert_eq!(text.len(), 36, "payment id {text:?} accepted");
    assert_eq!(id.to_string(), text.to_ascii_lowercase(), "payment id {text:?} is not canonical");
    assert_eq!(id.to_string().parse::<PaymentId>(), Ok(id));
}

fn check_payment_id(text: &str) -> Outcome {
    match strife_gateway::validate::payment_id(text) {
        Ok(id) => {
            assert_canonical_id(text, id);
            Outcome::Accepted
        }
        Err(e) => gateway_refusal("payment_id", &e),
    }
}

fn check_list_payments(req: gw::ListPaymentsRequest) -> Outcome {
    let size = req.page_size;
    match strife_gateway::validate::list_payments(&req) {
        Ok(query) => {
            assert!(size >= 0, "page_size {size} accepted");
            assert!((1..=HISTORY_PAGE_MAX).contains(&query.limit), "page_size {size} gave {}", query.limit);
            if u32::try_from(size).is_ok_and(|l| (1..=HISTORY_PAGE_MAX).contains(&l)) {
                assert_eq!(i64::from(query.limit), i64::from(size), "a valid page_size was changed");
            }
            if let (Some(start), Some(end)) = (query.start_ms, query.end_ms) {
                assert!(start <= end, "time bounds accepted {start} > {end}");
            }
            assert_eq!(query.after.is_some(), !req.page_token.is_empty(), "a page token was ignored");
            Outcome::Accepted
        }
        Err(e) => gateway_refusal("list_payments", &e),
    }
}

fn check_register(req: gw::RegisterBankRequest) -> Outcome {
    match strife_gateway::validate::register(&req) {
        Ok(()) => {
            assert!(validate_bank_name(&req.name).is_ok(), "register accepted bank {:?}", req.name);
            assert!(req.address.len() <= ADDRESS_MAX, "register accepted a long address");
            assert!(
                req.address.parse::<std::net::SocketAddr>().is_ok(),
                "register accepted {:?}",
                req.address
            );
            for id in [&req.ledger_id, &req.cluster_id] {
                assert!(id_like(id), "register accepted the id {id:?}");
            }
            Outcome::Accepted
        }
        Err(e) => gateway_refusal("register", &e),
    }
}

fn check_inquire(req: gw::InquireRequest) -> Outcome {
    match strife_gateway::validate::inquire(&req) {
        Ok(()) => {
            assert!(req.txn_id.parse::<PaymentId>().is_ok(), "inquire accepted {:?}", req.txn_id);
            assert!(id_like(&req.cluster_id), "inquire accepted the id {:?}", req.cluster_id);
            Outcome::Accepted
        }
        Err(e) => gateway_refusal("inquire", &e),
    }
}

/// What a ledger or cluster id may be: empty, or a short run of letters,
/// digits and '-'.
fn id_like(id: &str) -> bool {
    id.len() <= STORE_ID_MAX && id.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
}

fn check_user(user: &str) -> Outcome {
    match strife_bank::service::check_user(user) {
        Ok(()) => {
            assert!(validate_user_name(user).is_ok(), "check_user accepted {user:?}");
            Outcome::Accepted
        }
        Err(e) => bank_refusal("check_user", &e),
    }
}

fn check_txn_id(txn_id: &str) -> Outcome {
    match strife_bank::service::check_txn_id(txn_id) {
        Ok(()) => {
            assert!(txn_id.parse::<PaymentId>().is_ok(), "check_txn_id accepted {txn_id:?}");
            Outcome::Accepted
        }
        Err(e) => bank_refusal("check_txn_id", &e),
    }
}

fn check_prepare(req: bank::PrepareRequest) -> Outcome {
    match strife_bank::service::prepare_request(req.clone()) {
        Ok(leg) => {
            assert!(leg.txn_id.parse::<PaymentId>().is_ok(), "prepare accepted txn id {:?}", leg.txn_id);
            assert!(
                (1..=AMOUNT_MAX_MINOR).contains(&leg.amount_minor),
                "prepare accepted {}",
                leg.amount_minor
            );
            assert!(leg.payment_id.len() <= 64, "prepare accepted a long payment id");
            for (user, bank) in [(&leg.payer_user, &leg.payer_bank), (&leg.payee_user, &leg.payee_bank)] {
                assert!(
                    validate_user_name(user).is_ok() && validate_bank_name(bank).is_ok(),
                    "prepare accepted {user:?}@{bank:?}"
                );
            }
            let payer = req.payer.unwrap_or_default();
            let payee = req.payee.unwrap_or_default();
            assert_eq!(
                (&*leg.txn_id, &*leg.payment_id, leg.amount_minor),
                (&*req.txn_id, &*req.payment_id, req.amount_minor)
            );
            assert_eq!((&*leg.payer_user, &*leg.payer_bank), (&*payer.user, &*payer.bank));
            assert_eq!((&*leg.payee_user, &*leg.payee_bank), (&*payee.user, &*payee.bank));
            Outcome::Accepted
        }
        Err(e) => bank_refusal("prepare", &e),
    }
}

fn check_token(token: &str) -> Outcome {
    match token_keys().verify(token) {
        Ok(claims) => {
            assert!(valid_user_ref(&claims.customer()), "token accepted for {:?}", claims.customer());
            assert!(!claims.jti.is_empty(), "token accepted without a jti");
            // Some slack over the verifier's leeway: its clock was read first.
            assert!(claims.exp + 10 >= now_secs(), "token accepted after it expired");
            assert_eq!((claims.iss.as_str(), claims.aud.as_str()), (ISSUER, AUDIENCE));
            Outcome::Accepted
        }
        Err(_) => Outcome::Refused,
    }
}
