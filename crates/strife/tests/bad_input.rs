//! Bad input gets a clear error with the right status (and the contract's
//! exit code at the CLI), and changes nothing. Real processes, real TLS.

mod common;

use common::grpc::{self, authed};
use common::*;
use strife_proto::bank::v1 as bankpb;
use strife_proto::gateway::v1 as pb;
use strife_rpc::Peer;
use tonic::Code;

/// Balances of the customers the tests touch, to prove nothing changed.
fn snapshot(c: &Cluster) -> Vec<(i64, i64)> {
    ["user1@BankA", "user2@BankB", "user3@BankA"].iter().map(|w| c.balance(w)).collect()
}

#[test]
fn cli_refuses_bad_input_and_changes_nothing() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    c.login("user3", "BankA");
    let before = snapshot(&c);
    let long = "x".repeat(5000);
    let long_payee = format!("{long}@BankB");
    let invalid: &[(&[&str], &str)] = &[
        (&["--amount", "0", "--to", "user2@BankB"], "greater than zero"),
        (&["--amount", "0.00", "--to", "user2@BankB"], "greater than zero"),
        (&["--amount", "-5", "--to", "user2@BankB"], "greater than zero"),
        (&["--amount", "abc", "--to", "user2@BankB"], "decimal number"),
        (&["--amount", "1e3", "--to", "user2@BankB"], "decimal number"),
        (&["--amount", "12.345", "--to", "user2@BankB"], "two digits"),
        (&["--amount", "1000000000.01", "--to", "user2@BankB"], "maximum"),
        (&["--amount", "", "--to", "user2@BankB"], "empty"),
        (&["--amount", "NaN", "--to", "user2@BankB"], "decimal number"),
        (&["--amount", "5", "--to", "user2"], "USER@BANK"),
        (&["--amount", "5", "--to", "user1@BankA"], "cannot pay yourself"),
        (&["--amount", "5", "--to", long_payee.as_str()], "longer than"),
        (&["--amount", "5", "--to", "user2@BankB", "--id", "not-a-uuid"], "UUID"),
    ];
    for (args, message) in invalid {
        let mut full = vec!["--as", "user1@BankA", "pay"];
        full.extend_from_slice(args);
        let r = c.cli(&full);
        assert_eq!(r.code, 6, "{args:?}: {r:?}");
        assert!(r.stderr.contains(message), "{args:?} should say {message:?}: {r:?}");
        let mut json = vec!["--json"];
        json.extend_from_slice(&full);
        let r = c.cli(&json);
        assert_eq!(r.code, 6, "{args:?} with --json: {r:?}");
        assert_eq!(r.json()["error"], "invalid_input");
    }
    // Unknown payee: a declined payment (the payee's bank says so), nothing moved.
    let r = c.pay("user1@BankA", "user9@BankB", "5");
    assert_eq!((r.code, r.json()["reason"].as_str()), (3, Some("unknown_payee")), "{r:?}");
    // Unknown bank: invalid input, refused before anything is recorded.
    let r = c.pay("user1@BankA", "user2@NoSuchBank", "5");
    assert_eq!((r.code, r.json()["error"].as_str()), (6, Some("invalid_input")), "{r:?}");
    assert!(r.json()["message"].as_str().is_some_and(|m| m.contains("no bank named NoSuchBank")), "{r:?}");
    // Usage errors exit 2.
    assert_eq!(c.cli(&["pay", "--amount", "5"]).code, 2);
    assert_eq!(c.cli(&["no-such-command"]).code, 2);
    // Authentication.
    let r = c.cli_env(&["login", "--bank", "BankA", "--user", "user1"], &[("STRIFE_PASSWORD", "wrong")]);
    assert_eq!(r.code, 5, "{r:?}");
    let wrong_password = r.stderr.clone();
    let r = c.cli_env(&["login", "--bank", "BankA", "--user", "nobody"], &[("STRIFE_PASSWORD", "wrong")]);
    assert_eq!((r.code, &r.stderr), (5, &wrong_password), "unknown user and wrong password look alike");
    let r = c.cli_env(&["login", "--bank", "NoSuchBank", "--user", "user1"], &[("STRIFE_PASSWORD", "pass1")]);
    assert_eq!(r.code, 6, "{r:?}");
    assert!(r.stderr.contains("no bank named NoSuchBank"), "{r:?}");
    let r = c.cli(&["--as", "user4@BankB", "balance"]);
    assert_eq!(r.code, 5, "no session: {r:?}");
    assert_eq!(snapshot(&c), before, "nothing changed");
}

#[test]
fn tokens_are_checked_and_logout_revokes_durably() {
    let mut c = Cluster::start(&["BankA", "BankB"]);
    let rt = grpc::runtime();
    let dir = c.path().to_path_buf();
    let addr = c.gateway.addr.clone();
    let token = rt.block_on(async {
        let ch = grpc::client_channel(&dir, &addr).await;
        let token = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        // The token works and names its own customer only.
        let b = grpc::balance(&ch, &token).await.expect("balance");
        let account = b.account.expect("account");
        assert_eq!((account.user.as_str(), account.bank.as_str()), ("user1", "BankA"));

        let mut p = grpc::payments(&ch);
        let missing = p.get_balance(pb::GetBalanceRequest {}).await.expect_err("no token");
        assert_eq!(missing.code(), Code::Unauthenticated);
        for bad in ["", "garbage", "a.b.c", &format!("{token}x"), &"y".repeat(5000)] {
            let e = grpc::balance(&ch, bad).await.expect_err("bad token");
            assert_eq!(e.code(), Code::Unauthenticated, "{bad:.20}");
        }
        // A token signed with another key, and one with tampered claims.
        let who = strife_core::UserRef::new("user2", "BankB").expect("name");
        let foreign =
            strife_gateway::tokens::TokenKeys::new("k".into(), &strife_core::Secret::new(vec![7; 32]), 60)
                .expect("keys");
        let forged = foreign.issue(&who).expect("forge").0;
        assert_eq!(
            grpc::balance(&ch, forged.expose()).await.expect_err("forged").code(),
            Code::Unauthenticated
        );
        let parts: Vec<&str> = token.split('.').collect();
        let tampered = format!("{}.{}.{}", parts[0], parts[1].replacen('e', "f", 1), parts[2]);
        assert_eq!(grpc::balance(&ch, &tampered).await.expect_err("tampered").code(), Code::Unauthenticated);
        // An expired token signed with the real key.
        let (kid, secret) = strife_gateway::tokens::load_or_create_key(&dir.join("certs")).expect("key");
        let real = strife_gateway::tokens::TokenKeys::new(kid, &secret, 60).expect("keys");
        let old = real.issue_at(&who, 1_000_000).expect("old").0;
        let e = grpc::balance(&ch, old.expose()).await.expect_err("expired");
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("expired"), "{e:?}");

        p.logout(authed(pb::LogoutRequest {}, &token)).await.expect("logout");
        let e = grpc::balance(&ch, &token).await.expect_err("revoked");
        assert_eq!(e.code(), Code::Unauthenticated);
        assert!(e.message().contains("logged out"), "{e:?}");
        token
    });
    c.restart_gateway();
    let addr = c.gateway.addr.clone();
    rt.block_on(async {
        let ch = grpc::client_channel(&dir, &addr).await;
        let e = grpc::balance(&ch, &token).await.expect_err("still revoked after a restart");
        assert_eq!(e.code(), Code::Unauthenticated);
    });
}

#[test]
fn the_api_refuses_bad_requests_with_the_right_status() {
    let c = Cluster::start(&["BankA", "BankB"]);
    c.login("user1", "BankA");
    c.login("user2", "BankB");
    let before = snapshot_two(&c);
    let rt = grpc::runtime();
    let dir = c.path().to_path_buf();
    let addr = c.gateway.addr.clone();
    rt.block_on(async {
        let ch = grpc::client_channel(&dir, &addr).await;
        let token = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let id = grpc::new_id();
        let long = "u".repeat(100);
        let cases: &[(&str, &str, &str, &str, Code)] = &[
            (&id, "user2", "BankB", "-1", Code::InvalidArgument),
            (&id, "user2", "BankB", "0", Code::InvalidArgument),
            (&id, "user2", "BankB", "1.001", Code::InvalidArgument),
            (&id, "user2", "BankB", "ten", Code::InvalidArgument),
            (&id, "user2", "BankB", "99999999999999999999999", Code::InvalidArgument),
            (&id, &long, "BankB", "1", Code::InvalidArgument),
            (&id, "user2", "Bank_B", "1", Code::InvalidArgument),
            (&id, "", "BankB", "1", Code::InvalidArgument),
            ("", "user2", "BankB", "1", Code::InvalidArgument),
            ("123", "user2", "BankB", "1", Code::InvalidArgument),
            (&id, "user1", "BankA", "1", Code::InvalidArgument),
        ];
        for (id, user, bank, amount, code) in cases {
            let e = grpc::pay(&ch, &token, id, user, bank, amount).await.expect_err("refused");
            assert_eq!(e.code(), *code, "{user:.10}@{bank} {amount}: {e:?}");
            assert!(!e.message().is_empty());
        }
        // A message over the size limit is refused before it is read.
        let huge = "9".repeat(100 * 1024);
        let e = grpc::pay(&ch, &token, &grpc::new_id(), "user2", "BankB", &huge).await.expect_err("huge");
        assert!(
            matches!(e.code(), Code::OutOfRange | Code::ResourceExhausted | Code::InvalidArgument),
            "{e:?}"
        );
        // Oversized login fields.
        let e = grpc::login(&ch, "BankA", &"u".repeat(65), "x").await.expect_err("long user");
        assert_eq!(e.code(), Code::InvalidArgument);
        let e = grpc::login(&ch, "BankA", "user1", &"p".repeat(300)).await.expect_err("long password");
        assert_eq!(e.code(), Code::InvalidArgument);
        // History pages are capped; a negative size is refused.
        let page = |page_size| pb::ListPaymentsRequest { page_size, ..Default::default() };
        let h = grpc::payments(&ch).list_payments(authed(page(1_000_000), &token)).await.expect("history");
        assert!(h.into_inner().payments.is_empty());
        let e = grpc::payments(&ch).list_payments(authed(page(-1), &token)).await.expect_err("negative");
        assert_eq!(e.code(), Code::InvalidArgument);
    });
    assert_eq!(snapshot_two(&c), before, "nothing changed");
}

fn snapshot_two(c: &Cluster) -> Vec<(i64, i64)> {
    ["user1@BankA", "user2@BankB"].iter().map(|w| c.balance(w)).collect()
}

#[test]
fn identities_are_enforced_by_certificate() {
    let c = Cluster::start(&["BankA", "BankB"]);
    let rt = grpc::runtime();
    let dir = c.path().to_path_buf();
    let gw = c.gateway.addr.clone();
    let bank_a = c.banks[c.bank_index("BankA")].addr.clone();
    rt.block_on(async {
        // A client certificate cannot call a bank's 2PC RPCs.
        let ch = grpc::channel(&dir, Peer::Client("client".into()), Peer::Bank("BankA".into()), &bank_a)
            .await
            .expect("TLS itself is fine");
        let mut bank = bankpb::bank_service_client::BankServiceClient::new(ch);
        let e =
            bank.commit(bankpb::CommitRequest { txn_id: grpc::new_id() }).await.expect_err("client->bank");
        assert_eq!(e.code(), Code::PermissionDenied, "{e:?}");
        let e = bank
            .get_balance(bankpb::GetBalanceRequest { user: "user1".into() })
            .await
            .expect_err("client->bank balance");
        assert_eq!(e.code(), Code::PermissionDenied);

        // A bank certificate cannot call customer RPCs or log in.
        let ch = grpc::channel(&dir, Peer::Bank("BankA".into()), Peer::Gateway, &gw).await.expect("tls");
        let e = grpc::login(&ch, "BankA", "user1", "pass1").await.expect_err("bank->login");
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = grpc::balance(&ch, "x").await.expect_err("bank->balance");
        assert_eq!(e.code(), Code::PermissionDenied);
        // ... nor register under another bank's name.
        let mut reg = pb::registry_service_client::RegistryServiceClient::new(ch.clone());
        let e = reg
            .register_bank(pb::RegisterBankRequest {
                name: "BankB".into(),
                address: bank_a.clone(),
                ..Default::default()
            })
            .await
            .expect_err("wrong name");
        assert_eq!(e.code(), Code::PermissionDenied);
        assert!(e.message().contains("BankB"));
        // A client certificate cannot register a bank.
        let ch = grpc::client_channel(&dir, &gw).await;
        let mut reg = pb::registry_service_client::RegistryServiceClient::new(ch);
        let e = reg
            .register_bank(pb::RegisterBankRequest {
                name: "BankA".into(),
                address: bank_a.clone(),
                ..Default::default()
            })
            .await
            .expect_err("client registering");
        assert_eq!(e.code(), Code::PermissionDenied);

        // The gateway checks it reaches the bank it means to: BankB's name on BankA's address fails TLS.
        let wrong = grpc::channel(&dir, Peer::Gateway, Peer::Bank("BankB".into()), &bank_a).await;
        assert!(wrong.is_err(), "BankA's certificate does not prove BankB");
    });
    // A client without a certificate, and one from a foreign CA, fail at the TLS layer.
    let foreign = TempDir::new("foreign");
    assert_eq!(run_cli(&foreign.0, &["certs", "init"], &[]).code, 0);
    rt.block_on(async {
        let ca = std::fs::read(dir.join("certs/ca.pem")).expect("ca");
        let no_cert = tonic::transport::Endpoint::from_shared(format!("https://{gw}"))
            .expect("endpoint")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                    .domain_name("gateway.strife"),
            )
            .expect("tls");
        let refused = match no_cert.connect().await {
            Err(_) => true,
            Ok(ch) => tls_refused(grpc::login(&ch, "BankA", "user1", "pass1").await),
        };
        assert!(refused, "no client certificate");
        // Foreign client identity, trusting our CA for the server.
        let cert = std::fs::read(foreign.0.join("certs/client.pem")).expect("cert");
        let key = std::fs::read(foreign.0.join("certs/client.key")).expect("key");
        let foreign_client = tonic::transport::Endpoint::from_shared(format!("https://{gw}"))
            .expect("endpoint")
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
                    .identity(tonic::transport::Identity::from_pem(cert, key))
                    .domain_name("gateway.strife"),
            )
            .expect("tls");
        let refused = match foreign_client.connect().await {
            Err(_) => true,
            Ok(ch) => tls_refused(grpc::login(&ch, "BankA", "user1", "pass1").await),
        };
        assert!(refused, "a certificate from a foreign CA");
    });
    // The CLI with a foreign PKI cannot reach the gateway either (exit 1, no session made).
    let r = run_cli(
        &foreign.0,
        &["--gateway", &gw, "login", "--bank", "BankA", "--user", "user1"],
        &[("STRIFE_PASSWORD", "pass1")],
    );
    assert_eq!(r.code, 1, "{r:?}");
}

#[test]
fn a_bank_with_another_banks_certificate_refuses_to_start() {
    let c = Cluster::start(&["BankA"]);
    let certs = c.path().join("certs");
    std::fs::copy(certs.join("BankA.pem"), certs.join("BankC.pem")).expect("copy");
    std::fs::copy(certs.join("BankA.key"), certs.join("BankC.key")).expect("copy");
    let out = std::process::Command::new(BIN)
        .arg("--dir")
        .arg(c.path())
        .args(["bank", "--name", "BankC", "--listen", "127.0.0.1:0", "--gateway", &c.gateway.addr])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("BankC.pem") && err.contains("names bank:BankA"), "{err}");
}

/// True when a call failed because the TLS layer refused the connection
/// (TLS 1.3 lets the client finish its handshake before the server checks
/// the client's certificate, so the refusal shows on the first call).
fn tls_refused(result: Result<String, tonic::Status>) -> bool {
    match result {
        Ok(_) => false,
        Err(e) => {
            eprintln!("refused with {:?}: {}", e.code(), e.message());
            matches!(e.code(), Code::Cancelled | Code::Unavailable | Code::Unknown)
        }
    }
}

/// A batched call answers each leg or decision as the single call would
/// have: a bad item is refused alone, the others go through, and a batch
/// over the limit is refused whole and changes nothing.
#[test]
fn a_banks_batches_answer_each_item_alone() {
    let c = Cluster::start(&["BankA", "BankB"]);
    let rt = grpc::runtime();
    let dir = c.path().to_path_buf();
    let bank_a = c.banks[c.bank_index("BankA")].addr.clone();
    let leg =
        |txn_id: &str, payer: (&str, &str), payee: (&str, &str), amount_minor: i64| bankpb::PrepareRequest {
            txn_id: txn_id.to_owned(),
            payment_id: grpc::new_id(),
            payer: Some(bankpb::Party { user: payer.0.into(), bank: payer.1.into() }),
            payee: Some(bankpb::Party { user: payee.0.into(), bank: payee.1.into() }),
            amount_minor,
            traceparent: String::new(),
        };
    rt.block_on(async {
        let ch = grpc::channel(&dir, Peer::Gateway, Peer::Bank("BankA".into()), &bank_a).await.expect("tls");
        let mut bank = bankpb::bank_service_client::BankServiceClient::new(ch);
        let balance = |mut bank: bankpb::bank_service_client::BankServiceClient<_>, user: &'static str| async move {
            let b = bank.get_balance(bankpb::GetBalanceRequest { user: user.into() }).await.expect("balance");
            let b = b.into_inner();
            (b.balance_minor, b.available_minor)
        };
        let before = (balance(bank.clone(), "user1").await, balance(bank.clone(), "user3").await);

        // Over the limit: refused whole, nothing prepared.
        let too_many = (0..=strife_core::limits::BANK_BATCH_MAX)
            .map(|_| leg(&grpc::new_id(), ("user1", "BankA"), ("user3", "BankA"), 1))
            .collect();
        let e = bank
            .prepare_batch(bankpb::PrepareBatchRequest { legs: too_many })
            .await
            .expect_err("too many legs");
        assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
        assert!(e.message().contains("at most"), "{e:?}");
        assert_eq!((balance(bank.clone(), "user1").await, balance(bank.clone(), "user3").await), before);

        let good = grpc::new_id();
        let poor = grpc::new_id();
        let results = bank
            .prepare_batch(bankpb::PrepareBatchRequest {
                legs: vec![
                    leg(&good, ("user1", "BankA"), ("user3", "BankA"), 100),
                    leg("not-a-uuid", ("user1", "BankA"), ("user3", "BankA"), 100),
                    leg(&poor, ("user1", "BankA"), ("user3", "BankA"), before.0.0 + 1),
                    leg(&grpc::new_id(), ("user2", "BankB"), ("user4", "BankB"), 100),
                ],
            })
            .await
            .expect("batch")
            .into_inner()
            .results;
        assert_eq!(results.len(), 4);
        let vote = |i: usize| results[i].vote.clone().map(|v| (v.vote(), v.reason));
        let refused = |i: usize| results[i].refusal.clone().map(|r| Code::from_i32(r.code));
        assert_eq!(vote(0), Some((bankpb::Vote::Yes, String::new())));
        assert_eq!(refused(1), Some(Code::InvalidArgument), "{:?}", results[1]);
        assert_eq!(vote(2), Some((bankpb::Vote::No, "insufficient_funds".into())));
        assert_eq!(refused(3), Some(Code::InvalidArgument), "no leg at this bank: {:?}", results[3]);
        // Only the good leg holds money.
        assert_eq!(balance(bank.clone(), "user1").await, (before.0.0, before.0.1 - 100));

        let decide = |txn_id: &str, commit: bool| bankpb::Decision { txn_id: txn_id.to_owned(), commit, traceparent: String::new() };
        let never_prepared = grpc::new_id();
        let results = bank
            .decide_batch(bankpb::DecideBatchRequest {
                decisions: vec![decide(&good, true), decide(&poor, true), decide(&never_prepared, false)],
            })
            .await
            .expect("decide")
            .into_inner()
            .results;
        let codes: Vec<Option<Code>> =
            results.iter().map(|r| r.refusal.as_ref().map(|r| Code::from_i32(r.code))).collect();
        // Committing a leg that voted no contradicts it: refused alone.
        assert_eq!(codes, vec![None, Some(Code::FailedPrecondition), None]);
        let after = (balance(bank.clone(), "user1").await, balance(bank.clone(), "user3").await);
        assert_eq!(after, ((before.0.0 - 100, before.0.1 - 100), (before.1.0 + 100, before.1.1 + 100)));

        // Decisions are idempotent in a batch as well; a prepare after the
        // abort of a never-prepared payment votes no.
        let results = bank
            .decide_batch(bankpb::DecideBatchRequest { decisions: vec![decide(&good, true)] })
            .await
            .expect("again")
            .into_inner()
            .results;
        assert!(results[0].refusal.is_none(), "{results:?}");
        let late = bank
            .prepare_batch(bankpb::PrepareBatchRequest {
                legs: vec![leg(&never_prepared, ("user1", "BankA"), ("user3", "BankA"), 100)],
            })
            .await
            .expect("late prepare")
            .into_inner()
            .results;
        assert_eq!(late[0].vote.as_ref().map(|v| v.vote()), Some(bankpb::Vote::No), "{late:?}");
        assert_eq!((balance(bank.clone(), "user1").await, balance(bank.clone(), "user3").await), after);

        // Only the gateway may send batches.
        let as_client =
            grpc::channel(&dir, Peer::Client("client".into()), Peer::Bank("BankA".into()), &bank_a)
                .await
                .expect("tls");
        let mut bank = bankpb::bank_service_client::BankServiceClient::new(as_client);
        let e = bank
            .prepare_batch(bankpb::PrepareBatchRequest {
                legs: vec![leg(&grpc::new_id(), ("user1", "BankA"), ("user3", "BankA"), 100)],
            })
            .await
            .expect_err("client cert");
        assert_eq!(e.code(), Code::PermissionDenied);
        let e = bank
            .decide_batch(bankpb::DecideBatchRequest { decisions: vec![decide(&good, false)] })
            .await
            .expect_err("client cert");
        assert_eq!(e.code(), Code::PermissionDenied);
    });
}
