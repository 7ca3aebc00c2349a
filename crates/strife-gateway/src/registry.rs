//! The live banks: name, address, a channel to each, and when it last
//! registered. Persisted in the store so that a restarted gateway can reach
//! banks (to finish payments) before they register again.

use crate::link::BankLink;
use std::collections::HashMap;
use std::sync::RwLock;
use std::time::{Duration, Instant};
use strife_proto::bank::v1::bank_service_client::BankServiceClient;
use strife_rpc::Peer;
use strife_rpc::tls::Tls;
use tonic::transport::Channel;

/// One bank the gateway knows.
#[derive(Clone)]
pub struct BankEntry {
    pub address: String,
    /// A client on a lazily connected channel that verifies the server's
    /// certificate names this bank.
    pub client: BankServiceClient<Channel>,
    /// The channel itself, for health checks.
    pub channel: Channel,
    /// Batched 2PC calls on that channel.
    pub link: BankLink,
    /// When it last registered; `None` if only known from the store.
    pub last_seen: Option<Instant>,
}

pub struct Registry {
    /// Our TLS identity, to make channels to banks.
    tls: Tls,
    banks: RwLock<HashMap<String, BankEntry>>,
    /// A bank that has not registered for this long is shown as unreachable.
    stale_after: Duration,
    /// How long a batched prepare or decision call may take.
    prepare_timeout: Duration,
    decide_timeout: Duration,
}

pub enum Registered {
    /// First registration, or a new address: the caller persists it.
    Changed,
    Unchanged,
    /// The bank is registered from another address and was seen lately:
    /// the caller checks whether that one still runs before replacing it.
    LiveElsewhere(Box<BankEntry>),
}

impl Registry {
    /// Batched calls to a bank give up after `prepare_timeout` (phase one)
    /// or `decide_timeout` (phase two).
    pub fn new(
        tls: Tls,
        register_interval: Duration,
        prepare_timeout: Duration,
        decide_timeout: Duration,
    ) -> Registry {
        Registry {
            tls,
            banks: RwLock::new(HashMap::new()),
            stale_after: register_interval * 3,
            prepare_timeout,
            decide_timeout,
        }
    }

    /// Adds or refreshes a bank. Unless `replace` is set, a bank seen
    /// lately at another address is not replaced.
    pub fn register(&self, name: &str, address: &str, replace: bool) -> anyhow::Result<Registered> {
        {
            let mut banks = self.banks.write().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
            if let Some(entry) = banks.get_mut(name) {
                if entry.address == address {
                    entry.last_seen = Some(Instant::now());
                    return Ok(Registered::Unchanged);
                }
                if !replace && entry.last_seen.is_some_and(|t| t.elapsed() < self.stale_after) {
                    return Ok(Registered::LiveElsewhere(Box::new(entry.clone())));
                }
            }
        }
        let channel = self.tls.channel(&Peer::Bank(name.to_owned()), address)?;
        let client = BankServiceClient::new(channel.clone())
            .max_decoding_message_size(strife_core::limits::MESSAGE_MAX_BYTES * 64);
        let link = BankLink::start(client.clone(), self.prepare_timeout, self.decide_timeout);
        let entry =
            BankEntry { address: address.to_owned(), client, channel, link, last_seen: Some(Instant::now()) };
        let mut banks = self.banks.write().map_err(|_| anyhow::anyhow!("registry lock poisoned"))?;
        if banks.len() >= strife_core::limits::BANKS_MAX && !banks.contains_key(name) {
            anyhow::bail!("the gateway already knows {} banks", strife_core::limits::BANKS_MAX);
        }
        banks.insert(name.to_owned(), entry);
        Ok(Registered::Changed)
    }

    /// Restores a bank from the store, not yet seen in this run.
    pub fn restore(&self, name: &str, address: &str) -> anyhow::Result<()> {
        self.register(name, address, true)?;
        if let Ok(mut banks) = self.banks.write()
            && let Some(entry) = banks.get_mut(name)
        {
            entry.last_seen = None;
        }
        Ok(())
    }

    pub fn get(&self, name: &str) -> Option<BankEntry> {
        self.banks.read().ok()?.get(name).cloned()
    }

    /// `(name, address, reachable)` of every bank, sorted by name.
    pub fn status(&self) -> Vec<(String, String, bool)> {
        let Ok(banks) = self.banks.read() else { return Vec::new() };
        let mut out: Vec<_> = banks
            .iter()
            .map(|(name, e)| {
                let live = e.last_seen.is_some_and(|t| t.elapsed() < self.stale_after);
                (name.clone(), e.address.clone(), live)
            })
            .collect();
        out.sort();
        out
    }
}
