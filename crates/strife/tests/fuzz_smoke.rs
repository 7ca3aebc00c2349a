//! The fuzz targets' bodies (`fuzz_bodies/mod.rs`, the same code that
//! `fuzz/` runs under libFuzzer) on a few thousand seeded inputs, on stable:
//! random bytes, random fields from a pool of edge cases, and mutations of
//! valid encoded requests, so that every validator both accepts and refuses.
//!
//! The seed is printed; `STRIFE_FUZZ_SEED=<n>` replays a run. An input that
//! makes a body panic is printed in hex before the test fails.

mod common;
mod fuzz_bodies;

use common::{Rng, seed_from_env};
use fuzz_bodies::{Outcome, Rpc};
use prost::Message;
use strife_core::limits::AMOUNT_MAX_MINOR;
use strife_proto::bank::v1 as bank;
use strife_proto::gateway::v1 as gw;

/// Inputs per kind (random bytes, edge-case fields, mutated valid inputs).
const INPUTS_PER_KIND: u64 = 5_000;
/// Longest random input, in bytes.
const INPUT_LEN_MAX: u64 = 96;

const UUID: &str = "6f1c0f4e-3a47-4f63-9b9e-2f2c1a0e8d11";

/// Bytes that matter to the parsers under test.
const INTERESTING_BYTES: &[u8] = b"\x00\x01\x7f\x80\xff.-+@:[]0159aAfFe ,_{}\"";

#[test]
fn amount_body_holds_on_seeded_inputs() {
    let mut rng = Rng(seed_from_env("STRIFE_FUZZ_SEED"));
    let valid: Vec<Vec<u8>> = ["0.01", "7", "12.5", "12.50", "999999999.99", "1000000000", "1000000000.00"]
        .iter()
        .map(|s| s.as_bytes().to_vec())
        .collect();
    let edges =
        [i64::MIN, i64::MIN + 1, -100, -1, 0, 1, 99, 100, AMOUNT_MAX_MINOR, AMOUNT_MAX_MINOR + 1, i64::MAX];
    for minor in edges {
        run(fuzz_bodies::amount, &minor.to_le_bytes());
    }
    let mut accepted = 0;
    for _ in 0..INPUTS_PER_KIND {
        let len = 1 + rng.below(14);
        let digits = random_from(&mut rng, b"0123456789.", len);
        let base = pick(&mut rng, &valid).clone();
        let inputs = [random_bytes(&mut rng), digits, mutate(&mut rng, &base)];
        for input in inputs {
            accepted += u32::from(run(fuzz_bodies::amount, &input) == Outcome::Accepted);
        }
    }
    assert!(accepted > 100, "only {accepted} inputs were amounts");
}

#[test]
fn requests_body_holds_on_seeded_inputs() {
    let mut rng = Rng(seed_from_env("STRIFE_FUZZ_SEED"));
    let valid = valid_requests();
    let mut seen = [[0u32; 3]; Rpc::ALL.len()];
    let mut count = |input: &[u8], outcome: Outcome| {
        let rpc = input.first().map_or(0, |&b| usize::from(b) % Rpc::ALL.len());
        seen[rpc][outcome as usize] += 1;
    };
    for input in &valid {
        let outcome = run(fuzz_bodies::requests, input);
        assert_eq!(outcome, Outcome::Accepted, "a valid input: {input:?}");
        count(input, outcome);
    }
    for _ in 0..INPUTS_PER_KIND {
        let base = pick(&mut rng, &valid).clone();
        let inputs = [random_bytes(&mut rng), edge_case_request(&mut rng), mutate(&mut rng, &base)];
        for input in inputs {
            count(&input, run(fuzz_bodies::requests, &input));
        }
    }
    eprintln!("(undecoded, refused, accepted) per RPC: {:?}", Rpc::ALL.iter().zip(seen).collect::<Vec<_>>());
    // Every validator must have been reached with inputs it took and inputs
    // it refused; the RPCs without one only decode.
    let takes_everything = [Rpc::Logout, Rpc::GatewayBalance, Rpc::Status, Rpc::Audit, Rpc::GatewayHistory];
    for (rpc, [_, refused, accepted]) in Rpc::ALL.iter().zip(seen) {
        assert!(accepted > 0, "{rpc:?}: nothing accepted ({seen:?})");
        if !takes_everything.contains(rpc) {
            assert!(refused > 0, "{rpc:?}: nothing refused ({seen:?})");
        }
    }
}

/// Runs `body` on `input`, printing the input if it panics.
fn run(body: fn(&[u8]) -> Outcome, input: &[u8]) -> Outcome {
    std::panic::catch_unwind(|| body(input)).unwrap_or_else(|panic| {
        let hex: String = input.iter().map(|b| format!("{b:02x}")).collect();
        eprintln!(
            "panicking input ({} bytes): {hex}\n  as text: {:?}",
            input.len(),
            String::from_utf8_lossy(input)
        );
        std::panic::resume_unwind(panic)
    })
}

/// One valid input per RPC: the selector byte, then the encoded request.
fn valid_requests() -> Vec<Vec<u8>> {
    let party = |user: &str, bank: &str| Some(bank::Party { user: user.into(), bank: bank.into() });
    let token = fuzz_bodies::token_keys().issue(&fuzz_bodies::payer()).expect("issue a token").0;
    let pay = gw::PayRequest {
        payment_id: UUID.into(),
        payee: Some(gw::Account { user: "user2".into(), bank: "BankB".into() }),
        amount: "12.50".into(),
    };
    let inputs = [
        (
            Rpc::Login,
            gw::LoginRequest { bank: "BankA".into(), user: "user1".into(), password: "pass1".into() }
                .encode_to_vec(),
        ),
        (Rpc::Logout, gw::LogoutRequest {}.encode_to_vec()),
        (Rpc::GatewayBalance, gw::GetBalanceRequest {}.encode_to_vec()),
        (Rpc::Pay, pay.encode_to_vec()),
        (Rpc::GetPayment, gw::GetPaymentRequest { payment_id: UUID.into() }.encode_to_vec()),
        (
            Rpc::GatewayHistory,
            gw::ListPaymentsRequest { page_size: 10, ..Default::default() }.encode_to_vec(),
        ),
        (
            Rpc::RegisterBank,
            gw::RegisterBankRequest {
                name: "BankB".into(),
                address: "127.0.0.1:7001".into(),
                ledger_id: UUID.into(),
                cluster_id: UUID.into(),
                transfers: true,
            }
            .encode_to_vec(),
        ),
        (Rpc::Inquire, gw::InquireRequest { txn_id: UUID.into(), cluster_id: UUID.into() }.encode_to_vec()),
        (Rpc::Status, gw::StatusRequest {}.encode_to_vec()),
        (
            Rpc::VerifyPassword,
            bank::VerifyPasswordRequest { user: "user1".into(), password: "pass1".into() }.encode_to_vec(),
        ),
        (Rpc::BankBalance, bank::GetBalanceRequest { user: "user1".into() }.encode_to_vec()),
        (
            Rpc::Prepare,
            bank::PrepareRequest {
                txn_id: UUID.into(),
                payment_id: UUID.into(),
                payer: party("user1", "BankA"),
                payee: party("user2", "BankB"),
                amount_minor: 1250,
                traceparent: String::new(),
            }
            .encode_to_vec(),
        ),
        (Rpc::Commit, bank::CommitRequest { txn_id: UUID.into() }.encode_to_vec()),
        (Rpc::Abort, bank::AbortRequest { txn_id: UUID.into() }.encode_to_vec()),
        (Rpc::BankHistory, bank::GetHistoryRequest { user: "user1".into(), limit: 5 }.encode_to_vec()),
        (Rpc::Audit, bank::AuditRequest::default().encode_to_vec()),
        (Rpc::Token, token.expose().as_bytes().to_vec()),
    ];
    inputs.into_iter().map(|(rpc, body)| [vec![rpc.selector()], body].concat()).collect()
}

/// A well-formed request of a random RPC whose fields come from a pool of
/// edge cases, so that the validators see much more than decoding errors.
fn edge_case_request(rng: &mut Rng) -> Vec<u8> {
    let rpc = *pick(rng, &Rpc::ALL);
    let mut f = || edge_case_field(rng);
    let body = match rpc {
        Rpc::Login => gw::LoginRequest { bank: f(), user: f(), password: f() }.encode_to_vec(),
        Rpc::Pay => {
            let payee = Some(gw::Account { user: f(), bank: f() });
            gw::PayRequest { payment_id: f(), payee, amount: f() }.encode_to_vec()
        }
        Rpc::GetPayment => gw::GetPaymentRequest { payment_id: f() }.encode_to_vec(),
        Rpc::RegisterBank => gw::RegisterBankRequest {
            name: f(),
            address: f(),
            ledger_id: f(),
            cluster_id: f(),
            transfers: true,
        }
        .encode_to_vec(),
        Rpc::Inquire => gw::InquireRequest { txn_id: f(), cluster_id: f() }.encode_to_vec(),
        Rpc::VerifyPassword => bank::VerifyPasswordRequest { user: f(), password: f() }.encode_to_vec(),
        Rpc::BankBalance => bank::GetBalanceRequest { user: f() }.encode_to_vec(),
        Rpc::Commit => bank::CommitRequest { txn_id: f() }.encode_to_vec(),
        Rpc::Abort => bank::AbortRequest { txn_id: f() }.encode_to_vec(),
        Rpc::BankHistory => bank::GetHistoryRequest { user: f(), limit: 0 }.encode_to_vec(),
        Rpc::Token => f().into_bytes(),
        Rpc::Prepare => {
            let payer = Some(bank::Party { user: f(), bank: f() });
            let payee = Some(bank::Party { user: f(), bank: f() });
            let (txn_id, payment_id) = (f(), f());
            let amount_minor = match rng.below(4) {
                0 => rng.next() as i64,
                1 => [i64::MIN, -1, 0, 1, AMOUNT_MAX_MINOR, AMOUNT_MAX_MINOR + 1, i64::MAX]
                    [rng.below(7) as usize],
                _ => 1 + rng.below(AMOUNT_MAX_MINOR as u64) as i64,
            };
            bank::PrepareRequest {
                txn_id,
                payment_id,
                payer,
                payee,
                amount_minor,
                traceparent: String::new(),
            }
            .encode_to_vec()
        }
        Rpc::GatewayHistory => {
            let page_size = (rng.next() as u32 >> rng.below(32)) as i32;
            let at = |rng: &mut Rng| {
                (rng.below(2) == 0).then(|| prost_types::Timestamp {
                    seconds: rng.next() as i64 >> rng.below(64),
                    nanos: (rng.next() as i32) >> rng.below(32),
                })
            };
            let (start_time, end_time) = (at(rng), at(rng));
            let page_token = edge_case_field(rng);
            gw::ListPaymentsRequest { page_size, page_token, start_time, end_time }.encode_to_vec()
        }
        Rpc::Logout | Rpc::GatewayBalance | Rpc::Status | Rpc::Audit => Vec::new(),
    };
    [vec![rpc.selector()], body].concat()
}

/// A string field: mostly valid values of some field, else an edge case.
fn edge_case_field(rng: &mut Rng) -> String {
    const POOL: &[&str] = &[
        "user1",
        "user2",
        "BankA",
        "BankB",
        "pass1",
        UUID,
        "6F1C0F4E-3A47-4F63-9B9E-2F2C1A0E8D11",
        "6f1c0f4e3a474f639b9e2f2c1a0e8d11",
        "{6f1c0f4e-3a47-4f63-9b9e-2f2c1a0e8d11}",
        "urn:uuid:6f1c0f4e-3a47-4f63-9b9e-2f2c1a0e8d11",
        "6f1c0f4e-3a47-4f63-9b9e-2f2c1a0e8d1g",
        "12.50",
        "0.01",
        "1000000000",
        "1000000000.01",
        "-1",
        "1e3",
        "127.0.0.1:7001",
        "[::1]:7001",
        "localhost:7001",
        "127.0.0.1:99999",
        "",
        " ",
        "a@b",
        "Bank.A",
        "ü",
        "user\u{0}1",
        "eyJhbGciOiJub25lIn0.e30.",
    ];
    match rng.below(5) {
        0 => {
            let len = rng.below(70);
            random_from(rng, b"abcXYZ019.-_@:", len).into_iter().map(char::from).collect()
        }
        1 => "x".repeat([31, 32, 33, 63, 64, 65, 256, 257][rng.below(8) as usize]),
        _ => (*pick(rng, POOL)).to_owned(),
    }
}

fn random_bytes(rng: &mut Rng) -> Vec<u8> {
    let len = rng.below(INPUT_LEN_MAX + 1);
    (0..len).map(|_| rng.next() as u8).collect()
}

fn random_from(rng: &mut Rng, alphabet: &[u8], len: u64) -> Vec<u8> {
    (0..len).map(|_| *pick(rng, alphabet)).collect()
}

fn pick<'a, T>(rng: &mut Rng, items: &'a [T]) -> &'a T {
    &items[rng.below(items.len() as u64) as usize]
}

/// One to four byte-level mutations, as a fuzzer makes them. The first byte
/// (an RPC selector) is kept most of the time.
fn mutate(rng: &mut Rng, input: &[u8]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let start = usize::from(!out.is_empty() && rng.below(16) != 0);
        let at = start + rng.below((out.len() + 1 - start) as u64) as usize;
        match rng.below(6) {
            0 if at < out.len() => out[at] ^= 1 << rng.below(8),
            1 if at < out.len() => out[at] = *pick(rng, INTERESTING_BYTES),
            2 => out.insert(at, *pick(rng, INTERESTING_BYTES)),
            3 if at < out.len() => {
                out.remove(at);
            }
            4 => out.truncate(at),
            _ => {
                let end = (at + 1 + rng.below(8) as usize).min(out.len());
                let copy = out[at..end].to_vec();
                out.splice(at..at, copy);
            }
        }
    }
    out
}
