//! The attack suite: one row per attack against real processes, each with
//! the exact gRPC status (and CLI exit code where the CLI can express it),
//! and a check that no balance, hold or payment record changed. Ends with a
//! scan of every log file for passwords and tokens.

mod common;

use common::grpc::{self, authed};
use common::*;
use strife_proto::bank::v1 as bankpb;
use strife_proto::gateway::v1 as pb;
use strife_rpc::Peer;
use strife_rpc::etcd::{self, Etcd};
use strife_rpc::etcd_server::EtcdServer;
use tonic::Code;

/// Everything that must not change: every account's balance and available
/// balance, and the gateway's payment counts.
fn state(c: &Cluster) -> (Vec<(i64, i64)>, serde_json::Value) {
    let mut balances = Vec::new();
    for bank in ["BankA", "BankB"] {
        for n in 1..=5 {
            balances.push(c.balance(&format!("user{n}@{bank}")));
        }
    }
    let s = c.cli(&["--json", "status"]).json();
    (balances, serde_json::json!([s["payments_committed"], s["payments_declined"], s["payments_pending"]]))
}

struct Table {
    rows: Vec<(String, String, String, bool)>,
}

impl Table {
    /// One attack and the status it must get. A refusal made by a Strife
    /// server (not by TLS or the gRPC framework) must also carry the
    /// `ErrorInfo` reason that integrators match on.
    fn row(&mut self, attack: &str, expected: Code, got: Result<(), tonic::Status>) {
        let (got_text, ok) = match &got {
            Ok(()) => ("OK".to_owned(), expected == Code::Ok),
            Err(s) => {
                let reason = strife_rpc::errors::reason_of(s);
                let framework = matches!(s.code(), Code::OutOfRange | Code::Unavailable | Code::Unknown);
                let text = format!(
                    "{:?} ({}): {}",
                    s.code(),
                    reason.map_or("no ErrorInfo", strife_rpc::errors::reason_code),
                    s.message()
                );
                (text, s.code() == expected && (reason.is_some() || framework))
            }
        };
        self.rows.push((attack.to_owned(), format!("{expected:?}"), got_text, ok));
    }
    /// A refusal by a server that is not Strife's (etcd): its status code
    /// only, as it carries no Strife `ErrorInfo`.
    fn row_foreign(&mut self, attack: &str, expected: Code, got: Result<(), tonic::Status>) {
        let (text, ok) = match &got {
            Ok(()) => ("OK".to_owned(), expected == Code::Ok),
            Err(s) => (format!("{:?} (etcd): {}", s.code(), s.message()), s.code() == expected),
        };
        self.rows.push((attack.to_owned(), format!("{expected:?}"), text, ok));
    }

    fn cli(&mut self, attack: &str, expected: i32, got: &Run) {
        self.rows.push((
            attack.to_owned(),
            format!("exit {expected}"),
            format!("exit {}", got.code),
            got.code == expected,
        ));
    }
    fn finish(self) {
        let mut failed = 0;
        for (attack, want, got, ok) in &self.rows {
            eprintln!("{} {attack:<58} want {want:<18} got {got}", if *ok { "PASS" } else { "FAIL" });
            failed += usize::from(!ok);
        }
        assert_eq!(failed, 0, "{failed} attack(s) did not get the expected answer");
    }
}

fn drop_ok<T>(r: Result<T, tonic::Status>) -> Result<(), tonic::Status> {
    r.map(|_| ())
}

#[test]
fn every_attack_is_refused_and_changes_nothing() {
    let mut c = Cluster::start_with(&["BankA", "BankB"], &[("STRIFE_GATEWAY_LOGIN_LOCK_SECS", "1")]);
    for bank in ["BankA", "BankB"] {
        for n in 1..=5 {
            c.login(&format!("user{n}"), bank);
        }
    }
    let before = state(&c);
    let mut t = Table { rows: Vec::new() };
    let mut tokens_issued: Vec<String> = Vec::new();
    let rt = grpc::runtime();
    let dir = c.path().to_path_buf();
    let gw = c.gateway.addr.clone();
    let bank_a = c.banks[c.bank_index("BankA")].addr.clone();
    let ledger_a: String = rusqlite::Connection::open(dir.join("banks/BankA/bank.db"))
        .expect("BankA's ledger")
        .query_row("SELECT id FROM ledger", [], |r| r.get(0))
        .expect("its id");

    let revoked = rt.block_on(async {
        let ch = grpc::client_channel(&dir, &gw).await;
        let user1 = grpc::login(&ch, "BankA", "user1", "pass1").await.expect("login");
        let user1_b = grpc::login(&ch, "BankB", "user1", "pass1").await.expect("login");
        tokens_issued.extend([user1.clone(), user1_b.clone()]);
        let who = strife_core::UserRef::new("user1", "BankA").expect("who");

        // Forged tokens.
        let foreign =
            strife_gateway::tokens::TokenKeys::new("k1".into(), &strife_core::Secret::new(vec![9; 32]), 60)
                .expect("keys");
        let forged = foreign.issue(&who).expect("forge").0;
        t.row(
            "forged token (another key)",
            Code::Unauthenticated,
            drop_ok(grpc::balance(&ch, forged.expose()).await),
        );
        let parts: Vec<&str> = user1.split('.').collect();
        // {"alg":"none","typ":"JWT"} with the real claims and no signature.
        let none = format!("eyJhbGciOiJub25lIiwidHlwIjoiSldUIn0.{}.", parts[1]);
        t.row("token with alg: none", Code::Unauthenticated, drop_ok(grpc::balance(&ch, &none).await));
        let claims = String::from_utf8(base64_decode(parts[1])).expect("claims");
        let tampered_claims = claims.replace("\"user1\"", "\"user2\"");
        let tampered = format!("{}.{}.{}", parts[0], base64_encode(tampered_claims.as_bytes()), parts[2]);
        t.row(
            "token with tampered claims (sub: user2)",
            Code::Unauthenticated,
            drop_ok(grpc::balance(&ch, &tampered).await),
        );
        let (kid, secret) = strife_gateway::tokens::load_or_create_key(&dir.join("certs")).expect("key");
        let real = strife_gateway::tokens::TokenKeys::new(kid, &secret, 60).expect("keys");
        let expired = real.issue_at(&who, 1_000_000).expect("old").0;
        t.row("expired token", Code::Unauthenticated, drop_ok(grpc::balance(&ch, expired.expose()).await));
        t.row(
            "no token",
            Code::Unauthenticated,
            drop_ok(grpc::payments(&ch).get_balance(pb::GetBalanceRequest {}).await),
        );
        t.row("garbage token", Code::Unauthenticated, drop_ok(grpc::balance(&ch, "abc.def.ghi").await));

        // A token reaches only its own account: there is no field to name another.
        let own =
            grpc::balance(&ch, &user1).await.map(|b| b.account.map(|a| (a.user, a.bank)).unwrap_or_default());
        t.row(
            "user1's token asking for a balance gets user1@BankA's only",
            Code::Ok,
            own.and_then(|w| {
                if w == ("user1".into(), "BankA".into()) {
                    Ok(())
                } else {
                    Err(tonic::Status::internal(format!("{w:?}")))
                }
            }),
        );
        let own_b = grpc::balance(&ch, &user1_b).await.map(|b| b.account.map(|a| a.bank).unwrap_or_default());
        t.row(
            "user1@BankB's token reaches BankB's user1, not BankA's",
            Code::Ok,
            own_b.and_then(|b| if b == "BankB" { Ok(()) } else { Err(tonic::Status::internal(b)) }),
        );
        let hist = grpc::payments(&ch)
            .list_payments(authed(pb::ListPaymentsRequest { page_size: 10, ..Default::default() }, &user1))
            .await;
        t.row(
            "user1's token reads only user1's history (empty)",
            Code::Ok,
            hist.and_then(|h| {
                if h.get_ref().payments.is_empty() {
                    Ok(())
                } else {
                    Err(tonic::Status::internal("not empty"))
                }
            }),
        );
        t.row(
            "user1's token asking for another customer's payment id",
            Code::NotFound,
            drop_ok(
                grpc::payments(&ch)
                    .get_payment(authed(pb::GetPaymentRequest { payment_id: grpc::new_id() }, &user1))
                    .await,
            ),
        );

        // Bad payments.
        t.row(
            "paying oneself",
            Code::InvalidArgument,
            drop_ok(grpc::pay(&ch, &user1, &grpc::new_id(), "user1", "BankA", "1").await),
        );
        for amount in [
            "0",
            "-1",
            "-0.01",
            "0.001",
            "1.234",
            "1e5",
            "0x10",
            " 1",
            "1 ",
            "1,5",
            "NaN",
            "inf",
            "",
            "1000000000.01",
            "99999999999999999999999999",
        ] {
            t.row(
                &format!("amount {amount:?}"),
                Code::InvalidArgument,
                drop_ok(grpc::pay(&ch, &user1, &grpc::new_id(), "user2", "BankB", amount).await),
            );
        }
        t.row(
            "unknown bank",
            Code::NotFound,
            drop_ok(grpc::pay(&ch, &user1, &grpc::new_id(), "user2", "BankZ", "1").await),
        );
        t.row(
            "oversized payee name (10 KB)",
            Code::InvalidArgument,
            drop_ok(grpc::pay(&ch, &user1, &grpc::new_id(), &"u".repeat(10_000), "BankB", "1").await),
        );
        t.row(
            "oversized payment id",
            Code::InvalidArgument,
            drop_ok(grpc::pay(&ch, &user1, &"7".repeat(5000), "user2", "BankB", "1").await),
        );
        let huge = grpc::pay(&ch, &user1, &grpc::new_id(), "user2", "BankB", &"1".repeat(200 * 1024)).await;
        t.row("oversized message (200 KB)", Code::OutOfRange, drop_ok(huge));
        t.row(
            "oversized password at login",
            Code::InvalidArgument,
            drop_ok(grpc::login(&ch, "BankA", "user1", &"p".repeat(10_000)).await),
        );
        t.row(
            "oversized token (10 KB)",
            Code::Unauthenticated,
            drop_ok(grpc::balance(&ch, &"t".repeat(10_000)).await),
        );

        // Wrong identities for the service.
        let as_client_to_bank =
            grpc::channel(&dir, Peer::Client("client".into()), Peer::Bank("BankA".into()), &bank_a)
                .await
                .expect("tls");
        let mut bank = bankpb::bank_service_client::BankServiceClient::new(as_client_to_bank);
        let leg = || bankpb::PrepareRequest {
            txn_id: grpc::new_id(),
            payment_id: grpc::new_id(),
            payer: Some(bankpb::Party { user: "user1".into(), bank: "BankA".into() }),
            payee: Some(bankpb::Party { user: "user2".into(), bank: "BankA".into() }),
            amount_minor: 100,
            traceparent: String::new(),
        };
        t.row(
            "client certificate calling a bank's Prepare",
            Code::PermissionDenied,
            drop_ok(bank.prepare(leg()).await),
        );
        t.row(
            "client certificate calling a bank's Commit",
            Code::PermissionDenied,
            drop_ok(bank.commit(bankpb::CommitRequest { txn_id: grpc::new_id() }).await),
        );
        t.row(
            "client certificate calling a bank's PrepareBatch",
            Code::PermissionDenied,
            drop_ok(bank.prepare_batch(bankpb::PrepareBatchRequest { legs: vec![leg()] }).await),
        );
        t.row(
            "client certificate calling a bank's DecideBatch",
            Code::PermissionDenied,
            drop_ok(
                bank.decide_batch(bankpb::DecideBatchRequest {
                    decisions: vec![bankpb::Decision {
                        txn_id: grpc::new_id(),
                        commit: true,
                        traceparent: String::new(),
                    }],
                })
                .await,
            ),
        );
        t.row(
            "client certificate calling a bank's VerifyPassword",
            Code::PermissionDenied,
            drop_ok(
                bank.verify_password(bankpb::VerifyPasswordRequest {
                    user: "user1".into(),
                    password: "pass1".into(),
                })
                .await,
            ),
        );
        let as_bank = grpc::channel(&dir, Peer::Bank("BankA".into()), Peer::Gateway, &gw).await.expect("tls");
        t.row(
            "bank certificate calling Login",
            Code::PermissionDenied,
            drop_ok(grpc::login(&as_bank, "BankA", "user1", "pass1").await),
        );
        t.row(
            "bank certificate calling Pay",
            Code::PermissionDenied,
            drop_ok(grpc::pay(&as_bank, &user1, &grpc::new_id(), "user2", "BankB", "1").await),
        );
        t.row(
            "bank certificate calling Status",
            Code::PermissionDenied,
            drop_ok(
                pb::admin_service_client::AdminServiceClient::new(as_bank.clone())
                    .status(pb::StatusRequest {})
                    .await,
            ),
        );
        let mut reg = pb::registry_service_client::RegistryServiceClient::new(as_bank.clone());
        t.row(
            "BankA registering as BankB",
            Code::PermissionDenied,
            drop_ok(
                reg.register_bank(pb::RegisterBankRequest {
                    name: "BankB".into(),
                    address: "127.0.0.1:9".into(),
                    ..Default::default()
                })
                .await,
            ),
        );
        // Only BankA holds BankA's key, but that does not make a second
        // process of it a replica: it must serve the same ledger, or it
        // would hold and move money of its own (a second BankA started by
        // mistake on another database).
        let second = |ledger_id: &str, cluster_id: &str| pb::RegisterBankRequest {
            name: "BankA".into(),
            address: "127.0.0.1:9".into(),
            ledger_id: ledger_id.into(),
            cluster_id: cluster_id.into(),
            transfers: false,
        };
        t.row(
            "a second live BankA elsewhere, on another ledger",
            Code::AlreadyExists,
            drop_ok(reg.register_bank(second(&grpc::new_id(), "")).await),
        );
        t.row(
            "a second live BankA elsewhere, naming no ledger",
            Code::AlreadyExists,
            drop_ok(reg.register_bank(second("", "")).await),
        );
        t.row(
            "BankA registering, naming another cluster",
            Code::FailedPrecondition,
            drop_ok(reg.register_bank(second(&ledger_a, &grpc::new_id())).await),
        );
        t.row(
            "BankA inquiring, naming another cluster",
            Code::FailedPrecondition,
            drop_ok(
                reg.inquire(pb::InquireRequest { txn_id: grpc::new_id(), cluster_id: grpc::new_id() }).await,
            ),
        );
        // Not an attack: another address serving BankA's ledger is another
        // replica of BankA. Nothing answers there: from now on the
        // gateway's calls to BankA that go there are answered by the other.
        t.row(
            "a second BankA on BankA's ledger (a replica: OK)",
            Code::Ok,
            drop_ok(reg.register_bank(second(&ledger_a, "")).await),
        );
        t.row(
            "registering an unknown bank with a client certificate",
            Code::PermissionDenied,
            drop_ok(
                pb::registry_service_client::RegistryServiceClient::new(ch.clone())
                    .register_bank(pb::RegisterBankRequest {
                        name: "BankX".into(),
                        address: "127.0.0.1:9".into(),
                        ..Default::default()
                    })
                    .await,
            ),
        );
        let as_bank_to_bank =
            grpc::channel(&dir, Peer::Bank("BankA".into()), Peer::Bank("BankA".into()), &bank_a)
                .await
                .expect("tls");
        t.row(
            "bank certificate calling another bank's Commit",
            Code::PermissionDenied,
            drop_ok(
                bankpb::bank_service_client::BankServiceClient::new(as_bank_to_bank.clone())
                    .commit(bankpb::CommitRequest { txn_id: grpc::new_id() })
                    .await,
            ),
        );
        t.row(
            "bank certificate calling another bank's DecideBatch",
            Code::PermissionDenied,
            drop_ok(
                bankpb::bank_service_client::BankServiceClient::new(as_bank_to_bank)
                    .decide_batch(bankpb::DecideBatchRequest {
                        decisions: vec![bankpb::Decision {
                            txn_id: grpc::new_id(),
                            commit: true,
                            traceparent: String::new(),
                        }],
                    })
                    .await,
            ),
        );

        // Logout revokes.
        let victim = grpc::login(&ch, "BankB", "user3", "pass3").await.expect("login");
        tokens_issued.push(victim.clone());
        grpc::payments(&ch).logout(authed(pb::LogoutRequest {}, &victim)).await.expect("logout");
        t.row(
            "revoked token after logout",
            Code::Unauthenticated,
            drop_ok(grpc::balance(&ch, &victim).await),
        );
        victim
    });

    // No client certificate, and a certificate from a foreign CA: refused at the TLS layer.
    let foreign = TempDir::new("foreign-ca");
    assert_eq!(run_cli(&foreign.0, &["certs", "init"], &[]).code, 0);
    rt.block_on(async {
        let ca = std::fs::read(dir.join("certs/ca.pem")).expect("ca");
        let mut tls = tonic::transport::ClientTlsConfig::new()
            .ca_certificate(tonic::transport::Certificate::from_pem(&ca))
            .domain_name("gateway.strife");
        let endpoint = |tls| {
            tonic::transport::Endpoint::from_shared(format!("https://{gw}"))
                .expect("e")
                .tls_config(tls)
                .expect("tls")
        };
        let no_cert = match endpoint(tls.clone()).connect().await {
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            Ok(ch) => drop_ok(grpc::login(&ch, "BankA", "user1", "pass1").await),
        };
        t.row("no client certificate", Code::Unavailable, no_cert.map_err(tls_layer));
        tls = tls.identity(tonic::transport::Identity::from_pem(
            std::fs::read(foreign.0.join("certs/client.pem")).expect("cert"),
            std::fs::read(foreign.0.join("certs/client.key")).expect("key"),
        ));
        let foreign_ca = match endpoint(tls).connect().await {
            Err(e) => Err(tonic::Status::unavailable(e.to_string())),
            Ok(ch) => drop_ok(grpc::login(&ch, "BankA", "user1", "pass1").await),
        };
        t.row("client certificate from a foreign CA", Code::Unavailable, foreign_ca.map_err(tls_layer));
    });
    let r = run_cli(
        &foreign.0,
        &["--gateway", &gw, "login", "--bank", "BankA", "--user", "user1"],
        &[("STRIFE_PASSWORD", "pass1")],
    );
    t.cli("CLI with a foreign PKI", 1, &r);

    // The CLI's view of some of the same attacks.
    t.cli(
        "CLI: paying oneself",
        6,
        &c.cli(&["--as", "user1@BankA", "pay", "--to", "user1@BankA", "--amount", "1"]),
    );
    t.cli(
        "CLI: negative amount",
        6,
        &c.cli(&["--as", "user1@BankA", "pay", "--to", "user2@BankB", "--amount", "-1"]),
    );
    t.cli(
        "CLI: unknown bank",
        6,
        &c.cli(&["--as", "user1@BankA", "pay", "--to", "user2@BankZ", "--amount", "1"]),
    );
    t.cli(
        "CLI: wrong password",
        5,
        &c.cli_env(&["login", "--bank", "BankA", "--user", "user4"], &[("STRIFE_PASSWORD", "nope")]),
    );
    t.cli("CLI: acting for a customer not logged in here", 5, &c.cli(&["--as", "user9@BankA", "balance"]));

    // 50 wrong passwords in a row: throttled, then locked, then the right one works after the lock.
    rt.block_on(async {
        let ch = grpc::client_channel(&dir, &gw).await;
        let mut refusals = Vec::new();
        for _ in 0..50 {
            refusals.push(grpc::login(&ch, "BankB", "user5", "wrong").await.expect_err("wrong"));
        }
        let count = |code| refusals.iter().filter(|s| s.code() == code).count();
        let (unauth, exhausted) = (count(Code::Unauthenticated), count(Code::ResourceExhausted));
        t.row(
            &format!("50 wrong passwords ({unauth} refused, {exhausted} throttled)"),
            Code::ResourceExhausted,
            Err(refusals.pop().expect("refusals")),
        );
        let locked = grpc::login(&ch, "BankB", "user5", "pass5").await;
        let hint = locked.as_ref().err().and_then(|e| e.metadata().get("retry-after").cloned());
        t.row(
            "the right password while locked (with RetryInfo and retry-after)",
            Code::ResourceExhausted,
            match (locked, hint) {
                (Err(e), Some(_)) if strife_rpc::errors::retry_after(&e).is_some() => Err(e),
                (other, _) => Err(tonic::Status::internal(format!("{other:?}"))),
            },
        );
        let deadline = std::time::Instant::now() + WAIT;
        let after = loop {
            match grpc::login(&ch, "BankB", "user5", "pass5").await {
                Err(e) if e.code() == Code::ResourceExhausted && std::time::Instant::now() < deadline => {
                    tokio::time::sleep(std::time::Duration::from_millis(100)).await
                }
                other => break other,
            }
        };
        if let Ok(tok) = &after {
            tokens_issued.push(tok.clone());
        }
        t.row("the right password after the lock expired", Code::Ok, drop_ok(after));
        // An unknown user gets the same answer as a wrong password.
        let a = grpc::login(&ch, "BankA", "nosuchuser", "x").await.expect_err("unknown");
        let b = grpc::login(&ch, "BankA", "user2", "x").await.expect_err("wrong");
        t.row(
            "unknown user answered like a wrong password",
            Code::Unauthenticated,
            if a.message() == b.message() && a.code() == b.code() { Err(a) } else { Ok(()) },
        );
    });

    // Revocation survives a gateway restart.
    c.restart_gateway();
    rt.block_on(async {
        let ch = grpc::client_channel(&dir, &c.gateway.addr).await;
        t.row(
            "revoked token after a gateway restart",
            Code::Unauthenticated,
            drop_ok(grpc::balance(&ch, &revoked).await),
        );
    });

    let after = state(&c);

    // Revoked certificates: `strife certs revoke` refuses them at once, in
    // the running gateway, at the TLS layer. After the state check: the
    // renewal of BankA's certificate makes its links reconnect.
    let certs = |args: &[&str]| {
        let r = c.cli(args);
        assert_eq!(r.code, 0, "{args:?}: {r:?}");
        r.json()
    };
    certs(&["--json", "certs", "issue", "--client", "mallory"]);
    let leaked = TempDir::new("leaked-bank-key");
    std::fs::create_dir_all(leaked.0.join("certs")).expect("certs");
    for file in ["ca.pem", "BankA.pem", "BankA.key"] {
        std::fs::copy(dir.join("certs").join(file), leaked.0.join("certs").join(file)).expect("copy");
    }
    rt.block_on(async {
        let mallory = Peer::Client("mallory".into());
        let status = |ch: tonic::transport::Channel| async move {
            drop_ok(pb::admin_service_client::AdminServiceClient::new(ch).status(pb::StatusRequest {}).await)
        };
        let connected = grpc::channel(&dir, mallory.clone(), Peer::Gateway, &gw).await.expect("tls");
        t.row(
            "client certificate before its revocation (accepted)",
            Code::Ok,
            status(connected.clone()).await,
        );
        certs(&["--json", "certs", "revoke", "--client", "mallory"]);
        let refused = match grpc::channel(&dir, mallory, Peer::Gateway, &gw).await {
            Err(e) => Err(revoked_alert(e)),
            Ok(ch) => status(ch).await,
        };
        t.row("revoked client certificate, new connection", Code::Unavailable, refused.map_err(tls_layer));
        t.row(
            "revoked client certificate, connection made before the revocation",
            Code::Unavailable,
            status(connected).await.map_err(tls_layer),
        );

        // BankA's key leaks: BankA gets a new certificate, the old one is
        // revoked by its serial, and whoever holds the old one cannot
        // register as BankA; BankA itself goes on with the new one.
        let issued = certs(&["--json", "certs", "issue", "--bank", "BankA"]);
        let old_serial = {
            let text = std::fs::read_to_string(dir.join("certs/issued.json")).expect("index");
            let index: serde_json::Value = serde_json::from_str(&text).expect("json");
            let first = index["certificates"]
                .as_array()
                .expect("list")
                .iter()
                .find(|e| e["identity"] == "bank:BankA");
            first.expect("BankA")["serial"].as_str().expect("serial").to_owned()
        };
        assert_ne!(issued["serial"].as_str(), Some(old_serial.as_str()));
        certs(&["--json", "certs", "revoke", "--serial", &old_serial]);
        let register = |ch: tonic::transport::Channel| {
            let address = bank_a.clone();
            async move {
                drop_ok(
                    pb::registry_service_client::RegistryServiceClient::new(ch)
                        .register_bank(pb::RegisterBankRequest {
                            name: "BankA".into(),
                            address,
                            ..Default::default()
                        })
                        .await,
                )
            }
        };
        let refused = match grpc::channel(&leaked.0, Peer::Bank("BankA".into()), Peer::Gateway, &gw).await {
            Err(e) => Err(revoked_alert(e)),
            Ok(ch) => register(ch).await,
        };
        t.row(
            "revoked bank certificate registering as its bank",
            Code::Unavailable,
            refused.map_err(tls_layer),
        );
        let renewed = grpc::channel(&dir, Peer::Bank("BankA".into()), Peer::Gateway, &gw).await.expect("tls");
        t.row("BankA's renewed certificate registering (accepted)", Code::Ok, register(renewed).await);
    });

    // Discovery through etcd (issue 12): who may write which keys is etcd's
    // check (a user per certificate common name, a role each), and an entry
    // only says where: a forged one leads to a TLS refusal.
    let certs_dir = strife_rpc::pki::CertDir::new(&dir);
    certs(&["--json", "certs", "issue", "--client", "BankB"]);
    let etcd_server = rt
        .block_on(EtcdServer::start(
            &dir.join("etcd"),
            &certs_dir,
            "127.0.0.1",
            &["BankA".into(), "BankB".into()],
        ))
        .unwrap_or_else(|e| panic!("{e:#}"));
    rt.block_on(async {
        let url = etcd_server.url();
        let entry = serde_json::to_vec(&etcd::Entry::new("127.0.0.1:9", "forged")).expect("json");
        let as_peer = |p: Peer| {
            Etcd::connect(&strife_rpc::tls::Tls::load(&certs_dir, &p).expect("tls"), &url).expect("etcd")
        };
        let client = as_peer(Peer::Client("client".into()));
        let bank_a_etcd = as_peer(Peer::Bank("BankA".into()));
        let lookalike = as_peer(Peer::Client("BankB".into()));
        let attempts = [
            ("client certificate registers a gateway in etcd", &client, etcd::gateway_key("forged")),
            ("client certificate registers as BankA in etcd", &client, etcd::bank_key("BankA", "forged")),
            (
                "BankA's certificate registers as BankB in etcd",
                &bank_a_etcd,
                etcd::bank_key("BankB", "forged"),
            ),
            ("BankA's certificate registers a gateway in etcd", &bank_a_etcd, etcd::gateway_key("forged")),
            (
                "client certificate named BankB registers as BankB in etcd",
                &lookalike,
                etcd::bank_key("BankB", "x"),
            ),
        ];
        for (attack, who, key) in attempts {
            t.row_foreign(attack, Code::PermissionDenied, who.put(&key, entry.clone(), 0).await);
        }
        t.row_foreign(
            "BankA's certificate registers BankA in etcd (accepted)",
            Code::Ok,
            bank_a_etcd.put(&etcd::bank_key("BankA", "a1"), entry.clone(), 0).await,
        );
        // A forged entry under BankB's name with BankA's address: whoever
        // follows it wants BankB's certificate, and BankA's is refused.
        let forged = match grpc::channel(&dir, Peer::Gateway, Peer::Bank("BankB".into()), &bank_a).await {
            Err(e) => Err(tonic::Status::unavailable(format!("TLS refused the server: {e:?}"))),
            Ok(ch) => drop_ok(
                bankpb::bank_service_client::BankServiceClient::new(ch)
                    .get_balance(bankpb::GetBalanceRequest { user: "user1".into() })
                    .await,
            ),
        };
        t.row("a forged entry (BankB's key, BankA's address) followed as BankB", Code::Unavailable, forged);
    });
    drop(etcd_server);

    t.rows.push((
        "no balance, hold or payment record changed".into(),
        "unchanged".into(),
        if after == before { "unchanged".into() } else { format!("{before:?} -> {after:?}") },
        after == before,
    ));

    // No sample password and no issued token in any log.
    let mut leaks = Vec::new();
    for entry in std::fs::read_dir(dir.join("logs")).expect("logs") {
        let path = entry.expect("entry").path();
        let text = std::fs::read_to_string(&path).expect("log");
        for n in 1..=5 {
            if text.contains(&format!("pass{n}")) {
                leaks.push(format!("pass{n} in {}", path.display()));
            }
        }
        for tok in &tokens_issued {
            let sig = tok.rsplit('.').next().unwrap_or(tok);
            if text.contains(tok.as_str()) || text.contains(sig) {
                leaks.push(format!("a token in {}", path.display()));
            }
        }
    }
    t.rows.push((
        "scan of every log for passwords and tokens".into(),
        "none".into(),
        if leaks.is_empty() { "none".into() } else { leaks.join(", ") },
        leaks.is_empty(),
    ));
    t.finish();
}

/// A connection refused by the server with the TLS alert
/// `CertificateRevoked` as UNAVAILABLE naming it; any other failure as
/// INTERNAL, so that the row fails.
fn revoked_alert(e: tonic::transport::Error) -> tonic::Status {
    match strife_rpc::tls::refused_by_server() {
        Some(alert) if alert == "CertificateRevoked" => tonic::Status::unavailable(format!("{e}: {alert}")),
        other => tonic::Status::internal(format!("{e}, alert {other:?}")),
    }
}

/// Normalizes a TLS-layer refusal (the connection is closed during or just
/// after the handshake) to UNAVAILABLE; anything else is kept as is.
fn tls_layer(e: tonic::Status) -> tonic::Status {
    match e.code() {
        Code::Unavailable | Code::Cancelled | Code::Unknown => tonic::Status::unavailable(e.message()),
        _ => e,
    }
}

/// base64url, as in a JWT.
fn base64_decode(s: &str) -> Vec<u8> {
    common::decode_base64(s, b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")
}

fn base64_encode(data: &[u8]) -> String {
    let alphabet = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
    let mut out = String::new();
    let mut bits = 0u32;
    let mut n = 0;
    for &b in data {
        bits = (bits << 8) | u32::from(b);
        n += 8;
        while n >= 6 {
            n -= 6;
            out.push(alphabet[((bits >> n) & 63) as usize] as char);
        }
        bits &= (1 << n) - 1;
    }
    if n > 0 {
        out.push(alphabet[((bits << (6 - n)) & 63) as usize] as char);
    }
    out
}
