//! `strife audit`: cross-checks the gateway's log against every bank's
//! ledger. The gateway's log is read through its store (`gateway.store`: its
//! SQLite file, or the PostgreSQL database its replicas share). A bank's
//! ledger in SQLite is read from its file (safe while the servers run: WAL
//! readers never block writers); a bank the gateway knows whose ledger is
//! elsewhere (PostgreSQL) is asked for it over its `Audit` RPC, as the
//! gateway (with the gateway's certificate from `DIR/certs`), at the first of
//! its registered addresses (replicas) that answers.
//! Exit 0 only when the total of money is conserved, every payment has the
//! same outcome everywhere, and no hold is open.

use anyhow::Context;
use serde_json::json;
use std::path::Path;
use strife_bank::store::{Leg, LegState, Store as BankStore, Totals};
use strife_client::{Exit, Reply};
use strife_core::money::format_minor;
use strife_gateway::audit::{self as audit_rules, BankClient, LegSeen};
use strife_gateway::backend::{GatewayStore, SqliteStore, StoreUrl};
use strife_gateway::postgres::{Leases, PostgresStore};
use strife_gateway::store::PaymentState;
use strife_rpc::pki::CertDir;
use strife_rpc::tls::Tls;
use strife_rpc::{Config, Peer};

/// Rows read from a store at a time: the audit's memory is bounded by this
/// (times the number of banks), whatever the size of the ledgers. Debug
/// builds (the tests') read small pages, so that every test's audit
/// crosses page boundaries.
const AUDIT_PAGE_ROWS: u32 = if cfg!(debug_assertions) { 16 } else { 10_000 };
/// Problems listed in full; any more are counted.
const PROBLEMS_LISTED_MAX: usize = 1_000;

pub async fn run(dir: &Path) -> anyhow::Result<Reply> {
    let config = Config::load(dir, None)?;
    let default_file = config.gateway.data_dir(dir).join("gateway.db");
    let mut store = StoreUrl::parse("gateway.store", &config.gateway.store, default_file)?;
    // A cluster of `strife up --postgres` keeps its gateways' log there.
    if config.gateway.store.trim().is_empty()
        && let Some(url) = crate::up::databases::gateway_store(dir)
    {
        store = StoreUrl::Postgres(url);
    }
    let shown = store.redacted();
    match store {
        StoreUrl::Sqlite(path) => {
            anyhow::ensure!(path.exists(), "no gateway data at {}", path.display());
            let gateway = SqliteStore::open(&path).with_context(|| format!("opening {}", path.display()))?;
            audit(dir, &config, gateway).await
        }
        StoreUrl::Postgres(url) => {
            let leases = Leases::for_commit_timeout(config.gateway.commit_timeout());
            let gateway = PostgresStore::connect(&url, leases)
                .await
                .with_context(|| format!("opening the gateway's store in {shown}"))?;
            audit(dir, &config, gateway).await
        }
    }
}

/// Every bank the gateway registered, each with its addresses (one per
/// replica), newest first.
fn by_bank(registered: Vec<(String, String)>) -> Vec<(String, Vec<String>)> {
    let mut banks: Vec<(String, Vec<String>)> = Vec::new();
    // `registered` is by name, each name's newest address first.
    for (name, address) in registered {
        match banks.last_mut() {
            Some((last, addresses)) if *last == name => addresses.push(address),
            _ => banks.push((name, vec![address])),
        }
    }
    banks
}

/// Audits with the gateway's log in `gateway`, whichever store holds it.
async fn audit<S: GatewayStore>(dir: &Path, config: &Config, gateway: S) -> anyhow::Result<Reply> {
    let registered = gateway.banks().await?;

    let mut problems = Problems::default();
    let banks_dir = config.bank.data_dir(dir, "");
    let mut banks: Vec<BankLegs> = Vec::new();
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
        let totals = store.totals()?;
        banks.push(BankLegs::new(name, LegSource::Local(store), totals));
    }
    let remote: Vec<(String, Vec<String>)> =
        by_bank(registered).into_iter().filter(|(name, _)| !banks.iter().any(|b| b.name == *name)).collect();
    if !remote.is_empty() {
        let tls = Tls::load(&CertDir::new(dir), &Peer::Gateway)
            .context("asking banks for their ledgers needs the gateway's certificate")?;
        for (name, addresses) in remote {
            // Replicas of a bank share its ledger: the first that answers serves.
            let mut failures = Vec::new();
            for address in &addresses {
                let first = async {
                    let mut client = bank_client(&tls, &name, address)?;
                    let (legs, totals) = audit_page_over_rpc(&mut client, None).await?;
                    anyhow::Ok((client, legs, totals))
                };
                match first.await {
                    Ok((client, legs, totals)) => {
                        let mut bank = BankLegs::new(name.clone(), LegSource::Remote(client), totals);
                        bank.take_page(legs);
                        banks.push(bank);
                        failures.clear();
                        break;
                    }
                    Err(e) => failures.push(format!("at {address}: {e:#}")),
                }
            }
            if !failures.is_empty() {
                problems.push(format!("cannot read the ledger of {name} ({})", failures.join("; ")));
            }
        }
        banks.sort_by(|a, b| a.name.cmp(&b.name));
    }

    // One pass over the gateway's payments and every bank's legs together,
    // all in transaction-id order (a merge join), a page at a time.
    let (mut payments, mut committed, mut declined) = (0u64, 0u64, 0u64);
    let mut after: Option<String> = None;
    loop {
        let page = gateway.payments_after(after.clone(), AUDIT_PAGE_ROWS).await?;
        let Some(last) = page.last() else { break };
        after = Some(last.txn_id.clone());
        for p in &page {
            payments += 1;
            let mut here: Vec<LegSeen<'_>> = Vec::new();
            for bank in &mut banks {
                // Legs before this payment's are of payments the gateway does not know.
                while let Some(leg) = bank.next_before(&p.txn_id).await? {
                    unknown_leg(&bank.name, &leg, &mut problems);
                }
                if let Some(leg) = bank.next_if(&p.txn_id).await? {
                    open_hold(&bank.name, &leg, &mut problems);
                    here.push(LegSeen {
                        bank: bank.name.as_str(),
                        state: leg.state,
                        amount_minor: leg.amount_minor,
                    });
                }
            }
            match p.state {
                PaymentState::Preparing => problems.push(format!(
                    "payment {} of {} is still undecided at the gateway",
                    p.payment_id, p.payer
                )),
                PaymentState::Committed => committed += 1,
                PaymentState::Aborted => declined += 1,
            }
            for problem in audit_rules::disagreements(p, &here) {
                problems.push(problem);
            }
        }
    }
    drop(gateway);
    for bank in &mut banks {
        while let Some(leg) = bank.next_before_end().await? {
            unknown_leg(&bank.name, &leg, &mut problems);
        }
        // The totals as of after the legs: on a cluster at rest, a hold is
        // exactly the prepared legs; a disagreement (or a cluster still
        // moving) is a problem, so a clean audit always reports held 0.
        bank.refresh_totals()?;
        if bank.totals.held_minor != bank.prepared_minor {
            problems.push(format!(
                "{} holds {} but its prepared legs add up to {}",
                bank.name,
                format_minor(bank.totals.held_minor),
                format_minor(bank.prepared_minor)
            ));
        }
    }
    let total_balance: i64 = banks.iter().map(|b| b.totals.balance_minor).sum();
    let total_opening: i64 = banks.iter().map(|b| b.totals.opening_minor).sum();
    let total_held: i64 = banks.iter().map(|b| b.totals.held_minor).sum();
    if total_balance != total_opening {
        problems.push(format!(
            "money is not conserved: balances sum to {}, accounts opened with {}",
            format_minor(total_balance),
            format_minor(total_opening)
        ));
    }

    let bank_json: Vec<_> = banks
        .iter()
        .map(|b| {
            json!({
                "name": b.name, "accounts": b.totals.accounts, "legs": b.legs_read,
                "balance": format_minor(b.totals.balance_minor), "held": format_minor(b.totals.held_minor),
            })
        })
        .collect();
    let ok = problems.count == 0;
    let mut text = format!(
        "audit of {}: {payments} payments ({committed} committed, {declined} declined), {} banks, total {} (opened with {}), held {}\n",
        dir.display(),
        banks.len(),
        format_minor(total_balance),
        format_minor(total_opening),
        format_minor(total_held)
    );
    if ok {
        text.push_str("everything agrees: money conserved, one outcome per payment everywhere, no open hold");
    } else {
        text.push_str(&format!("{} problem(s):\n", problems.count));
        for p in &problems.listed {
            text.push_str(&format!("  - {p}\n"));
        }
        if problems.count > problems.listed.len() {
            text.push_str(&format!("  … and {} more\n", problems.count - problems.listed.len()));
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
            "payments": payments, "committed": committed, "declined": declined,
            "banks": bank_json,
            "problems": problems.listed,
            "problem_count": problems.count,
        }),
        text: text.trim_end().to_owned(),
    })
}

/// What disagrees: the first [`PROBLEMS_LISTED_MAX`] in full, and how many.
#[derive(Default)]
struct Problems {
    listed: Vec<String>,
    count: usize,
}

impl Problems {
    fn push(&mut self, problem: String) {
        self.count += 1;
        if self.listed.len() < PROBLEMS_LISTED_MAX {
            self.listed.push(problem);
        }
    }
}

/// A prepared leg is a hold nobody has decided.
fn open_hold(bank: &str, leg: &Leg, problems: &mut Problems) {
    if leg.state == LegState::Prepared {
        problems.push(format!(
            "open hold at {bank}: payment {} ({}) is prepared and undecided",
            leg.payment_id,
            format_minor(leg.amount_minor)
        ));
    }
}

/// A leg of a payment the gateway has no record of: money moved for it is
/// a problem, and so is a hold.
fn unknown_leg(bank: &str, leg: &Leg, problems: &mut Problems) {
    open_hold(bank, leg, problems);
    if let Some(problem) = audit_rules::unknown_leg(bank, &leg.payment_id, leg.state) {
        problems.push(problem);
    }
}

/// Where a bank's legs come from, a page at a time: its SQLite file, or its
/// `Audit` RPC.
enum LegSource {
    Local(BankStore),
    Remote(BankClient),
}

/// One bank's legs in transaction-id order, a page at a time.
struct BankLegs {
    name: String,
    source: LegSource,
    totals: Totals,
    /// The page being read.
    page: std::collections::VecDeque<Leg>,
    /// The last transaction id read from the source.
    last: Option<String>,
    /// The source has no more legs.
    done: bool,
    legs_read: u64,
    /// The sum of the prepared legs read: what the bank should hold.
    prepared_minor: i64,
}

impl BankLegs {
    fn new(name: String, source: LegSource, totals: Totals) -> BankLegs {
        BankLegs {
            name,
            source,
            totals,
            page: Default::default(),
            last: None,
            done: false,
            legs_read: 0,
            prepared_minor: 0,
        }
    }

    /// Takes `page`, the legs after the last ones read.
    fn take_page(&mut self, page: Vec<Leg>) {
        self.done = page.len() < AUDIT_PAGE_ROWS as usize;
        self.last = page.last().map(|l| l.txn_id.clone()).or(self.last.take());
        self.legs_read += page.len() as u64;
        self.prepared_minor +=
            page.iter().filter(|l| l.state == LegState::Prepared).map(|l| l.amount_minor).sum::<i64>();
        self.page.extend(page);
    }

    /// The next leg, reading the next page when this one is used up.
    async fn peek(&mut self) -> anyhow::Result<Option<&Leg>> {
        if self.page.is_empty() && !self.done {
            let page = match &mut self.source {
                LegSource::Local(store) => store.legs_after(self.last.as_deref(), AUDIT_PAGE_ROWS)?,
                LegSource::Remote(client) => {
                    let (legs, totals) = audit_page_over_rpc(client, self.last.as_deref()).await?;
                    self.totals = totals;
                    legs
                }
            };
            self.take_page(page);
        }
        Ok(self.page.front())
    }

    /// The totals as they are now (a bank read over RPC: as of its last page).
    fn refresh_totals(&mut self) -> anyhow::Result<()> {
        if let LegSource::Local(store) = &self.source {
            self.totals = store.totals()?;
        }
        Ok(())
    }

    /// The next leg if its transaction id sorts before `txn_id`.
    async fn next_before(&mut self, txn_id: &str) -> anyhow::Result<Option<Leg>> {
        Ok(match self.peek().await? {
            Some(leg) if leg.txn_id.as_str() < txn_id => self.page.pop_front(),
            _ => None,
        })
    }

    /// The next leg if it is `txn_id`'s.
    async fn next_if(&mut self, txn_id: &str) -> anyhow::Result<Option<Leg>> {
        Ok(match self.peek().await? {
            Some(leg) if leg.txn_id == txn_id => self.page.pop_front(),
            _ => None,
        })
    }

    /// The next leg, whatever its id (after the gateway's last payment).
    async fn next_before_end(&mut self) -> anyhow::Result<Option<Leg>> {
        self.peek().await?;
        Ok(self.page.pop_front())
    }
}

/// A client for a bank's `Audit` RPC, as the gateway.
fn bank_client(tls: &Tls, name: &str, address: &str) -> anyhow::Result<BankClient> {
    let channel = tls.channel(&Peer::Bank(name.to_owned()), address)?;
    Ok(BankClient::new(channel).max_decoding_message_size(audit_rules::AUDIT_MESSAGE_MAX_BYTES))
}

/// One page of a bank's legs (after `after`, in transaction-id order) and
/// its totals, from its `Audit` RPC.
async fn audit_page_over_rpc(
    client: &mut BankClient,
    after: Option<&str>,
) -> anyhow::Result<(Vec<Leg>, Totals)> {
    let answer = audit_rules::ledger_page(client, after, AUDIT_PAGE_ROWS).await?;
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
