//! `strife audit`: cross-checks the gateway's log against every bank's
//! ledger. A bank's ledger in SQLite is read from its file (safe while the
//! servers run: WAL readers never block writers); a bank the gateway knows
//! whose ledger is elsewhere (PostgreSQL) is asked for it over its `Audit`
//! RPC, as the gateway (with the gateway's certificate from `DIR/certs`).
//! Exit 0 only when the total of money is conserved, every payment has the
//! same outcome everywhere, and no hold is open.

use anyhow::Context;
use serde_json::json;
use std::collections::HashMap;
use std::path::Path;
use std::time::Duration;
use strife_bank::store::{Leg, LegState, Store as BankStore, Totals, state_name};
use strife_client::{Exit, Reply};
use strife_core::money::format_minor;
use strife_gateway::store::{PaymentState, Store as GatewayStore};
use strife_proto::bank::v1 as bank_pb;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use strife_rpc::{Config, Peer};

/// Longest wait for one bank's `Audit` answer.
const AUDIT_CALL_TIMEOUT: Duration = Duration::from_secs(30);
/// Largest `Audit` answer read (every leg of a bank in one message).
const AUDIT_MESSAGE_MAX_BYTES: usize = 256 * 1024 * 1024;

pub async fn run(dir: &Path) -> anyhow::Result<Reply> {
    let config = Config::load(dir, None)?;
    let gw_db = config.gateway.data_dir(dir).join("gateway.db");
    anyhow::ensure!(gw_db.exists(), "no gateway data at {}", gw_db.display());
    let gateway = GatewayStore::open(&gw_db).with_context(|| format!("opening {}", gw_db.display()))?;
    let payments = gateway.all_payments()?;
    let registered = gateway.banks()?;
    drop(gateway);

    let mut problems: Vec<String> = Vec::new();
    let banks_dir = config.bank.data_dir(dir, "");
    let mut banks: Vec<(String, Vec<Leg>, Totals)> = Vec::new();
    let mut entries: Vec<_> = match std::fs::read_dir(&banks_dir) {
        Ok(entries) => entries.filter_map(Result::ok).collect(),
        // Banks whose ledgers are all elsewhere leave no directory here.
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Vec::new(),
        Err(e) => return Err(e).with_context(|| format!("reading {}", banks_dir.display())),
    };
    entries.sort_by_key(|e| e.file_name());
    for entry in entries {
        let name = entry.file_name().to_string_lossy().into_owned();
        let db = entry.path().join("bank.db");
        if !db.exists() {
            continue;
        }
        let store = BankStore::open(&db, &name).with_context(|| format!("opening {}", db.display()))?;
        let (legs, totals) = store.audit()?;
        banks.push((name, legs, totals));
    }
    let remote: Vec<(String, String)> =
        registered.into_iter().filter(|(name, _)| !banks.iter().any(|b| b.0 == *name)).collect();
    if !remote.is_empty() {
        let tls = Tls::load(&CertDir::new(dir), &Peer::Gateway)
            .context("asking banks for their ledgers needs the gateway's certificate")?;
        for (name, address) in remote {
            match audit_over_rpc(&tls, &name, &address).await {
                Ok((legs, totals)) => banks.push((name, legs, totals)),
                Err(e) => problems.push(format!("cannot read the ledger of {name} at {address}: {e:#}")),
            }
        }
        banks.sort_by(|a, b| a.0.cmp(&b.0));
    }

    let total_balance: i64 = banks.iter().map(|b| b.2.balance_minor).sum();
    let total_opening: i64 = banks.iter().map(|b| b.2.opening_minor).sum();
    let total_held: i64 = banks.iter().map(|b| b.2.held_minor).sum();
    if total_balance != total_opening {
        problems.push(format!(
            "money is not conserved: balances sum to {}, accounts opened with {}",
            format_minor(total_balance),
            format_minor(total_opening)
        ));
    }

    // Every leg, by bank and transaction id.
    let mut legs: HashMap<(&str, &str), &Leg> = HashMap::new();
    for (name, bank_legs, _) in &banks {
        for leg in bank_legs {
            legs.insert((name.as_str(), leg.txn_id.as_str()), leg);
            if leg.state == LegState::Prepared {
                problems.push(format!(
                    "open hold at {name}: payment {} ({}) is prepared and undecided",
                    leg.payment_id,
                    format_minor(leg.amount_minor)
                ));
            }
        }
    }
    let mut known = std::collections::HashSet::new();
    let (mut committed, mut declined) = (0u64, 0u64);
    for p in &payments {
        known.insert(p.txn_id.as_str());
        let involved = strife_core::banks_involved(&p.payer, &p.payee);
        match p.state {
            PaymentState::Preparing => problems
                .push(format!("payment {} of {} is still undecided at the gateway", p.payment_id, p.payer)),
            PaymentState::Committed => {
                committed += 1;
                for bank in &involved {
                    let state = legs.get(&(*bank, p.txn_id.as_str())).map(|l| l.state);
                    if state != Some(LegState::Committed) {
                        problems.push(format!(
                            "payment {} is committed at the gateway but {} at {bank}",
                            p.payment_id,
                            state.map_or("unknown", state_name)
                        ));
                    }
                }
            }
            PaymentState::Aborted => {
                declined += 1;
                for bank in &involved {
                    if legs.get(&(*bank, p.txn_id.as_str())).is_some_and(|l| l.state == LegState::Committed) {
                        problems.push(format!(
                            "payment {} is aborted at the gateway but committed at {bank}",
                            p.payment_id
                        ));
                    }
                }
            }
        }
    }
    for ((bank, txn), leg) in &legs {
        if !known.contains(txn) && leg.state == LegState::Committed {
            problems.push(format!(
                "payment {} is committed at {bank} but unknown to the gateway",
                leg.payment_id
            ));
        }
    }

    let bank_json: Vec<_> = banks
        .iter()
        .map(|(name, legs, t)| {
            json!({
                "name": name, "accounts": t.accounts, "legs": legs.len(),
                "balance": format_minor(t.balance_minor), "held": format_minor(t.held_minor),
            })
        })
        .collect();
    let ok = problems.is_empty();
    let mut text = format!(
        "audit of {}: {} payments ({committed} committed, {declined} declined), {} banks, total {} (opened with {}), held {}\n",
        dir.display(),
        payments.len(),
        banks.len(),
        format_minor(total_balance),
        format_minor(total_opening),
        format_minor(total_held)
    );
    if ok {
        text.push_str("everything agrees: money conserved, one outcome per payment everywhere, no open hold");
    } else {
        text.push_str(&format!("{} problem(s):\n", problems.len()));
        for p in &problems {
            text.push_str(&format!("  - {p}\n"));
        }
    }
    Ok(Reply {
        exit: if ok { Exit::Done } else { Exit::Unexpected },
        json: json!({
            "ok": ok,
            "conserved": total_balance == total_opening,
            "total": format_minor(total_balance),
            "opening_total": format_minor(total_opening),
            "held": format_minor(total_held),
            "payments": payments.len(), "committed": committed, "declined": declined,
            "banks": bank_json,
            "problems": problems,
        }),
        text: text.trim_end().to_owned(),
    })
}

/// A bank's legs and totals from its `Audit` RPC.
async fn audit_over_rpc(tls: &Tls, name: &str, address: &str) -> anyhow::Result<(Vec<Leg>, Totals)> {
    let channel = tls.channel(&Peer::Bank(name.to_owned()), address)?;
    let mut client = bank_pb::bank_service_client::BankServiceClient::new(channel)
        .max_decoding_message_size(AUDIT_MESSAGE_MAX_BYTES);
    let answer = tokio::time::timeout(AUDIT_CALL_TIMEOUT, client.audit(bank_pb::AuditRequest {}))
        .await
        .context("no answer in time")?
        .map_err(|s| anyhow::anyhow!("{}: {}", s.code(), s.message()))?
        .into_inner();
    let legs = answer
        .legs
        .into_iter()
        .map(|e| {
            let (payer, payee) = (e.payer.unwrap_or_default(), e.payee.unwrap_or_default());
            Ok(Leg {
                state: strife_bank::ledger::parse_state(&e.state)?,
                txn_id: e.txn_id,
                payment_id: e.payment_id,
                payer_user: payer.user,
                payer_bank: payer.bank,
                payee_user: payee.user,
                payee_bank: payee.bank,
                amount_minor: e.amount_minor,
                prepared_at_ms: e.at_unix_ms,
            })
        })
        .collect::<Result<Vec<_>, strife_bank::error::BankError>>()?;
    let totals = Totals {
        accounts: answer.accounts,
        balance_minor: answer.total_balance_minor,
        held_minor: answer.total_held_minor,
        opening_minor: answer.total_opening_minor,
    };
    Ok((legs, totals))
}
