//! The client commands. Each returns a [`Reply`] (JSON, text and exit code)
//! or a [`CliError`]; `main` prints them.

use crate::connect::gateway_addresses;
use crate::discovery;
use crate::exit::{CliError, Exit, Reply};
use crate::gateways::{CallError, Gateways};
use crate::instances::{self, Instance, Role};
use crate::state::{ClientState, Enqueued, Pending, Session};
use serde_json::{Value, json};
use std::future::Future;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;
use strife_core::money::format_minor;
use strife_core::{Amount, DeclineReason, PaymentId, Secret, UserRef};
use strife_proto::gateway::v1 as pb;
use strife_proto::gateway::v1::ErrorReason;
use strife_rpc::config::ClientConfig;
use strife_rpc::errors;
use strife_rpc::etcd::View;
use strife_rpc::trace::{TRACEPARENT, TraceContext};
use strife_rpc::wire::{account, decline_reason_from, rfc3339};
use tokio::sync::watch;
use tonic::metadata::{Ascii, MetadataValue};
use tonic::transport::Channel;

/// One client invocation: where its state is, which gateway, which session.
pub struct Client {
    pub dir: PathBuf,
    /// `--gateway`/`STRIFE_GATEWAY`, else `DIR/gateway.addr`.
    pub gateway: Option<String>,
    /// `--as USER@BANK`; None means the most recent login.
    pub as_user: Option<UserRef>,
    pub config: ClientConfig,
    /// `DIR/client.db`; None until a login creates it (commands that only
    /// read never create anything).
    state: Option<ClientState>,
    /// The etcd the gateways are found in (`--discovery`, `discovery.url`,
    /// `DIR/etcd.url`), used when no `gateway` list is given explicitly.
    pub discovery: Option<String>,
    /// The gateway replicas, made from `gateway` (or what etcd lists) at
    /// the first call and kept for the client's life (the shell's), with
    /// what calls learnt about each.
    gateways: OnceLock<Gateways>,
    /// The W3C trace this command's calls carry (`traceparent`): a new one
    /// per command (per action in the shell), or the one in
    /// `STRIFE_TRACEPARENT`. The gateway and the banks log its trace id on
    /// every line of the calls, so one payment can be followed through
    /// every log; the client prints it with `RUST_LOG=debug`.
    pub trace: TraceContext,
    /// A long-lived client's watch on the gateways' keys in etcd: each
    /// change becomes the set before the next call. Dropping the sender
    /// ends the watch.
    watch: Option<(std::sync::Mutex<watch::Receiver<View>>, watch::Sender<bool>)>,
}

/// What happened when a payment from the outbox was sent.
#[derive(Debug, Clone)]
pub enum Sent {
    /// The gateway decided: committed or declined. It left the outbox.
    Final { committed: bool, reason: Option<String>, replayed: bool },
    /// The gateway could not be reached, or cannot take payments now (its
    /// store fails); it stays in the outbox. Why, and the JSON `reason`.
    Queued(String, QueuedBecause),
    /// It cannot go now (no session, expired token); it stays in the outbox.
    Waiting(CliError),
    /// The gateway refused it for good (id reused, invalid); it left the outbox.
    Refused(CliError),
}

/// Why a payment stays queued.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum QueuedBecause {
    /// No gateway answered (or one is stopping).
    Unreachable,
    /// A gateway answered that it cannot write its store (disk full, I/O
    /// error): it took nothing, and the payment goes once that is fixed.
    StorageUnavailable,
}

impl QueuedBecause {
    /// The `reason` of a queued payment's JSON.
    pub fn code(self) -> &'static str {
        match self {
            QueuedBecause::Unreachable => "gateway_unreachable",
            QueuedBecause::StorageUnavailable => "storage_unavailable",
        }
    }
}

fn is_outage(code: tonic::Code) -> bool {
    matches!(
        code,
        tonic::Code::Unavailable
            | tonic::Code::DeadlineExceeded
            | tonic::Code::Cancelled
            | tonic::Code::Unknown
    )
}

/// The headers of a session's calls: its token, and the command's trace.
struct Auth {
    /// `authorization: Bearer …`.
    bearer: MetadataValue<Ascii>,
    /// `traceparent`: the command's trace (see [`Client::trace`]).
    trace: MetadataValue<Ascii>,
}

/// The `authorization` header of a session's calls, and the trace.
fn bearer(session: &Session, trace: &TraceContext) -> Result<Auth, CliError> {
    let bearer = format!("Bearer {}", session.token.expose())
        .parse()
        .map_err(|_| CliError::new(Exit::NotAllowed, "the stored session is corrupt: log in again"))?;
    Ok(Auth { bearer, trace: trace.metadata() })
}

/// A request carrying the session's token and the trace (made anew for
/// each attempt).
fn authed<T>(msg: T, auth: &Auth) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut().insert("authorization", auth.bearer.clone());
    req.metadata_mut().insert(TRACEPARENT, auth.trace.clone());
    req
}

/// A request carrying the trace only (no session yet, or none needed).
fn traced<T>(msg: T, trace: &TraceContext) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    trace.inject(&mut req);
    req
}

fn payments(channel: Channel) -> pb::payments_service_client::PaymentsServiceClient<Channel> {
    pb::payments_service_client::PaymentsServiceClient::new(channel)
}

impl From<CallError> for CliError {
    fn from(e: CallError) -> CliError {
        match e {
            CallError::Answered(status) => CliError::from_status(&status),
            CallError::Refused(m) => CliError::new(Exit::NotAllowed, m),
            other => CliError::new(Exit::Unexpected, other.to_string()),
        }
    }
}

fn not_logged_in() -> CliError {
    CliError::new(Exit::NotAllowed, "not logged in: run `strife login --bank BANK --user USER`")
}

fn storage_error(e: anyhow::Error) -> CliError {
    CliError::unexpected(format!("client storage: {e:#}"))
}

/// The JSON of a pay outcome, as the contract shapes it.
pub fn pay_json(id: &str, status: &str, reason: Option<&str>, replayed: bool) -> Value {
    json!({ "payment_id": id, "status": status, "reason": reason, "replayed": replayed })
}

impl Client {
    pub fn open(
        dir: PathBuf,
        gateway: Option<String>,
        as_user: Option<UserRef>,
        config: ClientConfig,
    ) -> Result<Client, CliError> {
        let state = ClientState::open_existing(&dir).map_err(storage_error)?;
        Ok(Client {
            dir,
            gateway,
            as_user,
            config,
            state,
            discovery: None,
            gateways: OnceLock::new(),
            trace: TraceContext::for_command(),
            watch: None,
        })
    }

    /// The client state, created if this directory has none yet.
    fn state_created(&mut self) -> Result<&mut ClientState, CliError> {
        let state = match self.state.take() {
            Some(state) => state,
            None => ClientState::create(&self.dir).map_err(storage_error)?,
        };
        Ok(self.state.insert(state))
    }

    /// The client state of a command that needs a session (so the state
    /// exists).
    fn state_mut(&mut self) -> Result<&mut ClientState, CliError> {
        self.state.as_mut().ok_or_else(not_logged_in)
    }

    /// The payments waiting in the outbox (none when there is no state).
    fn pending(&self) -> Result<Vec<Pending>, CliError> {
        Ok(self.state.as_ref().map(ClientState::pending).transpose()?.unwrap_or_default())
    }

    /// Every session in this directory, the most recent login first.
    pub fn sessions(&self) -> Result<Vec<Session>, CliError> {
        Ok(self.state.as_ref().map(ClientState::sessions).transpose()?.unwrap_or_default())
    }

    fn timeout(&self) -> Duration {
        Duration::from_millis(self.config.request_timeout_ms)
    }

    /// The gateway replicas this client calls: `--gateway`/`STRIFE_GATEWAY`
    /// (a list); else, with discovery, the gateways registered in etcd (one
    /// read), or the static set when etcd cannot be reached (said in one
    /// line on stderr); else `DIR/gateway.addr`. A watch
    /// ([`Client::watch_gateways`]) changes the set at run time.
    pub async fn gateways(&self) -> Result<&Gateways, CallError> {
        if let Some(gateways) = self.gateways.get() {
            return Ok(gateways);
        }
        let addresses = match (&self.gateway, &self.discovery) {
            (None, Some(url)) => self.discovered_addresses(url).await?,
            _ => gateway_addresses(&self.dir, self.gateway.as_deref())
                .map_err(|e| CallError::Setup(e.message))?,
        };
        let gateways = Gateways::open(&self.dir, &addresses)?;
        Ok(self.gateways.get_or_init(|| gateways))
    }

    /// The gateways etcd lists (possibly none), or the static set when it
    /// cannot be reached.
    async fn discovered_addresses(&self, url: &str) -> Result<Vec<String>, CallError> {
        let why = match discovery::gateway_addresses(&self.dir, url).await {
            Ok(list) => return Ok(list),
            Err(why) => why,
        };
        match discovery::static_gateways(&self.dir) {
            Some((list, from)) => {
                eprintln!("strife: etcd at {url} cannot be reached ({why}); using the gateways in {from}");
                Ok(list)
            }
            None => Err(CallError::Unreachable(format!(
                "etcd at {url} cannot be reached ({why}) and no gateway is known otherwise"
            ))),
        }
    }

    /// Keeps a watch on the gateways' keys in etcd for the rest of this
    /// client's life (the shell's): each change becomes the set before the
    /// next call. Nothing happens without discovery or with an explicit
    /// gateway list. Must run inside a tokio runtime.
    pub fn watch_gateways(&mut self) -> Result<(), CliError> {
        let (None, Some(url)) = (&self.gateway, &self.discovery) else { return Ok(()) };
        let (rx, stop) = discovery::watch_gateways(&self.dir, url)
            .map_err(|e| CliError::unexpected(format!("watching the gateways in etcd: {e:#}")))?;
        self.watch = Some((std::sync::Mutex::new(rx), stop));
        Ok(())
    }

    /// The set the watch saw last, applied if it changed since the last
    /// call. While etcd cannot be reached the watch holds the last known
    /// set; before its first read, nothing is applied.
    fn apply_watch(&self, gateways: &Gateways) -> Result<(), CallError> {
        let Some((rx, _)) = &self.watch else { return Ok(()) };
        let mut rx = rx.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        if !rx.has_changed().unwrap_or(false) {
            return Ok(());
        }
        let view = rx.borrow_and_update().clone();
        if !view.loaded {
            return Ok(());
        }
        gateways.replace(&discovery::addresses(&view.parsed()))
    }

    /// One RPC at the gateway replicas, failing over between them, within
    /// the request timeout (see [`Gateways::call`]). With discovery and no
    /// gateway registered, that is an outage like every gateway being down.
    async fn call<T, F, Fut>(&self, op: F) -> Result<T, CallError>
    where
        F: FnMut(Channel) -> Fut,
        Fut: Future<Output = Result<T, tonic::Status>>,
    {
        let gateways = self.gateways().await?;
        self.apply_watch(gateways)?;
        tracing::debug!(traceparent = %self.trace, trace_id = %self.trace.trace_id_hex(), "calling the gateway");
        if let (None, Some(url)) = (&self.gateway, &self.discovery)
            && gateways.members().is_empty()
        {
            return Err(CallError::Unreachable(format!("no gateway is registered in etcd at {url}")));
        }
        gateways.call(self.timeout(), op).await
    }

    /// The session a command acts for.
    pub fn session(&self) -> Result<Session, CliError> {
        let found = match &self.state {
            Some(state) => state.session(self.as_user.as_ref())?,
            None => None,
        };
        found.ok_or_else(|| match &self.as_user {
            Some(who) => {
                CliError::new(Exit::NotAllowed, format!("not logged in as {who}: run `strife login`"))
            }
            None => not_logged_in(),
        })
    }

    pub async fn login(
        &mut self,
        bank: &str,
        user: &str,
        password: Secret<String>,
    ) -> Result<Reply, CliError> {
        let who = UserRef::new(user, bank).map_err(|e| CliError::new(Exit::Invalid, e.to_string()))?;
        let req = pb::LoginRequest {
            bank: who.bank.clone(),
            user: who.user.clone(),
            password: password.expose().clone(),
        };
        let resp = self
            .call(|channel| {
                let req = traced(req.clone(), &self.trace);
                async move {
                    let mut client = pb::session_service_client::SessionServiceClient::new(channel);
                    client.login(req).await.map(tonic::Response::into_inner)
                }
            })
            .await?;
        let expires_at = rfc3339(resp.expire_time.as_ref());
        let session =
            Session { who: who.clone(), token: Secret::new(resp.token), expires_at: expires_at.clone() };
        let state = self.state_created()?;
        state.save_session(&session)?;
        let waiting = state.pending()?.into_iter().filter(|p| p.payer == who).count();
        let mut text = format!("Logged in as {who} until {expires_at}.");
        if waiting > 0 {
            text.push_str(&format!(
                "\n{waiting} queued payment(s) of {who} can go now: run `strife outbox flush`."
            ));
        }
        Ok(Reply::done(json!({ "user": who.user, "bank": who.bank, "expires_at": expires_at }), text))
    }

    pub async fn logout(&mut self) -> Result<Reply, CliError> {
        let session = self.session()?;
        let who = session.who.clone();
        let auth = bearer(&session, &self.trace)?;
        let logout = self
            .call(|channel| {
                let req = authed(pb::LogoutRequest {}, &auth);
                async move { payments(channel).logout(req).await.map(|_| ()) }
            })
            .await;
        match logout {
            // An already invalid token is as good as logged out.
            Ok(()) => {}
            Err(CallError::Answered(s)) if s.code() == tonic::Code::Unauthenticated => {}
            Err(e) => return Err(e.into()),
        }
        self.state_mut()?.delete_session(&who)?;
        Ok(Reply::done(
            json!({ "user": who.user, "bank": who.bank, "logged_out": true }),
            format!("Logged out {who}."),
        ))
    }

    pub async fn balance(&self) -> Result<Reply, CliError> {
        let session = self.session()?;
        let auth = bearer(&session, &self.trace)?;
        let resp = self
            .call(|channel| {
                let req = authed(pb::GetBalanceRequest {}, &auth);
                async move { payments(channel).get_balance(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
        let account = resp.account.unwrap_or_else(|| account(&session.who));
        let text = format!(
            "{}@{}: balance {}, available {}",
            account.user, account.bank, resp.balance, resp.available
        );
        Ok(Reply::done(
            json!({ "user": account.user, "bank": account.bank, "balance": resp.balance, "available": resp.available }),
            text,
        ))
    }

    /// `strife pay`: validates, records the payment in the outbox, sends it.
    pub async fn pay(&mut self, to: &str, amount: &str, id: Option<&str>) -> Result<Reply, CliError> {
        let session = self.session()?;
        let amount = Amount::parse(amount).map_err(|e| CliError::new(Exit::Invalid, e.to_string()))?;
        let payee: UserRef =
            to.parse().map_err(|e: strife_core::NameError| CliError::new(Exit::Invalid, e.to_string()))?;
        let payment_id = match id {
            Some(text) => {
                text.parse::<PaymentId>().map_err(|e| CliError::new(Exit::Invalid, e.to_string()))?
            }
            None => PaymentId::new_random(),
        };
        if payee == session.who {
            return Err(CliError::new(Exit::Invalid, "you cannot pay yourself"));
        }
        let pending = Pending {
            payment_id: payment_id.to_string(),
            payer: session.who.clone(),
            payee,
            amount_minor: amount.minor(),
            attempts: 0,
            last_error: None,
        };
        if let Enqueued::Taken { payer, payee, amount_minor, decided } =
            self.state_mut()?.enqueue(&pending)?
        {
            let mut diff = Vec::new();
            if payer != pending.payer {
                diff.push("payer");
            }
            if payee != pending.payee {
                diff.push("payee");
            }
            if amount_minor != pending.amount_minor {
                diff.push("amount");
            }
            let was = if decided { "was already used for" } else { "is already queued for" };
            let message = format!(
                "payment id {payment_id} {was} a different payment ({})",
                strife_core::differences_text(&diff)
            );
            return Err(CliError {
                reason: Some(errors::reason_code(ErrorReason::PaymentIdReused)),
                fields: diff.into_iter().map(str::to_owned).collect(),
                ..CliError::new(Exit::IdReused, message)
            });
        }
        let sent = self.send(&pending, true).await?;
        Ok(describe(&pending, &sent))
    }

    /// Sends one payment from the outbox and records what happened.
    pub async fn send(&mut self, p: &Pending, reported: bool) -> Result<Sent, CliError> {
        let Some(session) = self.state_mut()?.session(Some(&p.payer))? else {
            let e = CliError::new(Exit::NotAllowed, format!("waiting for {} to log in", p.payer));
            self.state_mut()?.record_attempt(&p.payment_id, &e.message)?;
            return Ok(Sent::Waiting(e));
        };
        let auth = bearer(&session, &self.trace)?;
        let req = pb::PayRequest {
            payment_id: p.payment_id.clone(),
            payee: Some(account(&p.payee)),
            amount: format_minor(p.amount_minor),
        };
        // Every attempt, at whichever replica, carries the same payment id.
        let answer = self
            .call(|channel| {
                let req = authed(req.clone(), &auth);
                async move { payments(channel).pay(req).await }
            })
            .await;
        let answer = match answer {
            Ok(resp) => Ok(resp),
            Err(CallError::Answered(s)) => Err(s),
            Err(CallError::Unreachable(why)) => {
                self.state_mut()?.record_attempt(&p.payment_id, &format!("gateway unreachable: {why}"))?;
                return Ok(Sent::Queued(why, QueuedBecause::Unreachable));
            }
            Err(CallError::Refused(why)) => return self.wait_for_certificate(p, &why),
            Err(e @ CallError::Setup(_)) => return Err(e.into()),
        };
        match answer {
            Ok(resp) => {
                let resp = resp.into_inner();
                let committed = resp.status() == pb::PaymentStatus::Committed;
                let reason = decline_reason_from(resp.reason()).map(|r| r.code().to_owned());
                let status = if committed { "committed" } else { "declined" };
                self.state_mut()?.finish(p, status, reason.as_deref(), reported)?;
                Ok(Sent::Final { committed, reason, replayed: resp.replayed })
            }
            // The gateway refused our certificate: not an outage.
            Err(s) if strife_rpc::tls::refused_by_server().is_some() => {
                self.wait_for_certificate(p, &CliError::from_status(&s).message)
            }
            Err(s) if is_outage(s.code()) => {
                let why = if s.message().is_empty() {
                    "the gateway is unreachable".to_owned()
                } else {
                    s.message().to_owned()
                };
                self.state_mut()?.record_attempt(&p.payment_id, &why)?;
                let because = if errors::reason_of(&s) == Some(ErrorReason::StorageUnavailable) {
                    QueuedBecause::StorageUnavailable
                } else {
                    QueuedBecause::Unreachable
                };
                Ok(Sent::Queued(why, because))
            }
            Err(s) if s.code() == tonic::Code::Unauthenticated => {
                let e = CliError::new(
                    Exit::NotAllowed,
                    format!("{}; the payment waits in the outbox until {} logs in", s.message(), p.payer),
                );
                self.state_mut()?
                    .record_attempt(&p.payment_id, &format!("waiting for login: {}", s.message()))?;
                Ok(Sent::Waiting(e))
            }
            Err(s) => {
                let e = CliError::from_status(&s);
                if matches!(e.exit, Exit::IdReused | Exit::Invalid) {
                    self.state_mut()?.finish(p, "refused", Some(&e.message), reported)?;
                    Ok(Sent::Refused(e))
                } else {
                    self.state_mut()?.record_attempt(&p.payment_id, &e.message)?;
                    Ok(Sent::Waiting(e))
                }
            }
        }
    }

    /// The gateway refused this client's certificate (revoked): the payment
    /// stays in the outbox, to go with the same id once there is a valid one.
    fn wait_for_certificate(&mut self, p: &Pending, why: &str) -> Result<Sent, CliError> {
        self.state_mut()?.record_attempt(&p.payment_id, why)?;
        Ok(Sent::Waiting(CliError::new(
            Exit::NotAllowed,
            format!("{why}; the payment waits in the outbox until this client has a valid certificate"),
        )))
    }

    /// `strife history`: one page of `page.size` payments from `page.token`
    /// (the first page without one), or every page with `page.all`.
    pub async fn history(&self, page: HistoryPage) -> Result<Reply, CliError> {
        let session = self.session()?;
        let auth = bearer(&session, &self.trace)?;
        let mut listed = Vec::new();
        let mut token = page.token.unwrap_or_default();
        loop {
            // Page tokens mean the same at every replica: each page may
            // come from another.
            let req = pb::ListPaymentsRequest {
                page_size: i32::try_from(page.size).unwrap_or(i32::MAX),
                page_token: token,
                start_time: None,
                end_time: None,
            };
            let resp = self
                .call(|channel| {
                    let req = authed(req.clone(), &auth);
                    async move { payments(channel).list_payments(req).await.map(tonic::Response::into_inner) }
                })
                .await?;
            listed.extend(resp.payments.iter().map(PaymentView::of));
            token = resp.next_page_token;
            if token.is_empty() || !page.all {
                break;
            }
        }
        let mut text = format!("History of {}:\n{}\n", session.who, history_table(&listed));
        if !token.is_empty() {
            text.push_str(&format!("More: strife history --page-token {token}\n"));
        }
        let next = (!token.is_empty()).then_some(token);
        Ok(Reply::done(
            json!({ "payments": listed.iter().map(PaymentView::json).collect::<Vec<_>>(), "next_page_token": next }),
            text.trim_end().to_owned(),
        ))
    }

    pub fn outbox_list(&mut self) -> Result<Reply, CliError> {
        let pending = self.pending()?;
        let finished = match self.state.as_mut() {
            Some(state) => state.take_unreported()?,
            None => Vec::new(),
        };
        let mut text = String::new();
        for f in &finished {
            text.push_str(&format!(
                "Finished: {} {} from {} to {}: {}{}\n",
                f.payment_id,
                format_minor(f.amount_minor),
                f.payer,
                f.payee,
                f.status,
                f.reason.as_deref().map(|r| format!(" ({r})")).unwrap_or_default()
            ));
        }
        if pending.is_empty() {
            text.push_str("The outbox is empty: every payment has an outcome.");
        } else {
            text.push_str(&format!("{} payment(s) waiting:\n", pending.len()));
            for p in &pending {
                text.push_str(&format!(
                    "  {}  {} from {} to {}  attempts {}  {}\n",
                    p.payment_id,
                    format_minor(p.amount_minor),
                    p.payer,
                    p.payee,
                    p.attempts,
                    p.last_error.as_deref().unwrap_or("not sent yet")
                ));
            }
        }
        let json = json!({
            "pending": pending.iter().map(pending_json).collect::<Vec<_>>(),
            "finished": finished.iter().map(|f| json!({
                "payment_id": f.payment_id, "from": f.payer.to_string(), "to": f.payee.to_string(),
                "amount": format_minor(f.amount_minor), "status": f.status, "reason": f.reason,
            })).collect::<Vec<_>>(),
        });
        Ok(Reply::done(json, text.trim_end().to_owned()))
    }

    /// One quiet try for every queued payment whose customer is logged in
    /// (outcomes are recorded as not yet shown).
    pub async fn send_pending_once(&mut self) {
        let Ok(pending) = self.pending() else { return };
        for p in pending {
            if matches!(self.send(&p, false).await, Ok(Sent::Queued(..)) | Err(_)) {
                return;
            }
        }
    }

    /// Sends every queued payment now: up to `retry_burst_max` tries each
    /// while the gateway is unreachable, with backoff and jitter between.
    pub async fn outbox_flush(&mut self) -> Result<Reply, CliError> {
        let mut results = Vec::new();
        let mut text = String::new();
        let mut unreachable = false;
        for p in self.pending()? {
            let mut delay = Duration::from_millis(self.config.retry_first_delay_ms);
            let mut tries = 0;
            let sent = loop {
                tries += 1;
                let sent = self.send(&p, true).await?;
                if !matches!(sent, Sent::Queued(..)) || tries >= self.config.retry_burst_max.max(1) {
                    break sent;
                }
                tokio::time::sleep(jitter(delay)).await;
                delay = (delay * 2).min(Duration::from_millis(self.config.retry_max_delay_ms));
            };
            let reply = describe(&p, &sent);
            text.push_str(&reply.text);
            text.push('\n');
            results.push(reply.json);
            if matches!(sent, Sent::Queued(..)) {
                unreachable = true;
                break;
            }
        }
        let pending = self.pending()?;
        if results.is_empty() {
            text.push_str("The outbox is empty.");
        } else if !pending.is_empty() {
            text.push_str(&format!("{} payment(s) still waiting in the outbox.", pending.len()));
        }
        let exit = if pending.is_empty() {
            Exit::Done
        } else if unreachable {
            Exit::Queued
        } else {
            Exit::NotAllowed
        };
        Ok(Reply {
            exit,
            json: json!({ "results": results, "pending": pending.iter().map(pending_json).collect::<Vec<_>>() }),
            text: text.trim_end().to_owned(),
        })
    }

    /// Flushes until the outbox is empty (or only holds payments that wait
    /// for a login), backing off between rounds; stops early on `stop`.
    pub async fn outbox_watch(
        &mut self,
        stop: impl std::future::Future<Output = ()>,
    ) -> Result<Reply, CliError> {
        tokio::pin!(stop);
        let mut delay = Duration::from_millis(self.config.retry_first_delay_ms);
        let mut all = Vec::new();
        loop {
            let reply = self.outbox_flush().await?;
            if let Some(results) = reply.json["results"].as_array() {
                if !results.is_empty() {
                    eprintln!("{}", reply.text);
                }
                all.extend(results.iter().cloned());
            }
            if reply.exit != Exit::Queued {
                let pending = self.pending()?;
                let text = if pending.is_empty() {
                    "The outbox is empty: every payment has an outcome.".to_owned()
                } else {
                    format!("{} payment(s) wait for their customer to log in.", pending.len())
                };
                return Ok(Reply {
                    exit: reply.exit,
                    json: json!({ "results": all, "pending": pending.iter().map(pending_json).collect::<Vec<_>>() }),
                    text,
                });
            }
            tokio::select! {
                _ = tokio::time::sleep(jitter(delay)) => {}
                _ = &mut stop => {
                    let pending = self.pending()?;
                    return Ok(Reply {
                        exit: Exit::Queued,
                        json: json!({ "results": all, "pending": pending.iter().map(pending_json).collect::<Vec<_>>() }),
                        text: format!("Stopped; {} payment(s) still waiting.", pending.len()),
                    });
                }
            }
            delay = (delay * 2).min(Duration::from_millis(self.config.retry_max_delay_ms));
        }
    }

    /// The outcome of one of the session's payments, by id.
    pub async fn payment(&self, id: &str) -> Result<Reply, CliError> {
        let session = self.session()?;
        let id: PaymentId =
            id.parse().map_err(|e: strife_core::NameError| CliError::new(Exit::Invalid, e.to_string()))?;
        let auth = bearer(&session, &self.trace)?;
        let resp = self
            .call(|channel| {
                let req = authed(pb::GetPaymentRequest { payment_id: id.to_string() }, &auth);
                async move { payments(channel).get_payment(req).await.map(tonic::Response::into_inner) }
            })
            .await?;
        let p = resp.payment.ok_or_else(|| CliError::unexpected("the gateway sent no payment"))?;
        let p = PaymentView::of(&p);
        Ok(Reply::done(
            p.json(),
            format!(
                "Payment {}: {} {} {} {}, {}{} at {}",
                p.payment_id,
                p.amount,
                p.direction,
                if p.direction == "sent" { "to" } else { "from" },
                p.counterparty,
                p.status,
                p.reason.map(|r| format!(" ({r})")).unwrap_or_default(),
                p.at
            ),
        ))
    }

    /// The gateway's view of the cluster.
    pub async fn status(&self) -> Result<Reply, CliError> {
        let s = self
            .call(|channel| {
                let req = traced(pb::StatusRequest {}, &self.trace);
                async move {
                    let mut client = pb::admin_service_client::AdminServiceClient::new(channel);
                    client.status(req).await.map(tonic::Response::into_inner)
                }
            })
            .await?;
        let mut text = format!(
            "gateway up (boot {}): {} committed, {} declined, {} in progress\n",
            s.gateway_boot_id, s.payments_committed, s.payments_declined, s.payments_pending
        );
        for b in &s.banks {
            text.push_str(&format!(
                "  {:<12} {:<22} {}\n",
                b.name,
                b.address,
                if b.reachable { "up" } else { "not seen lately" }
            ));
        }
        let banks: Vec<Value> = s
            .banks
            .iter()
            .map(|b| json!({ "name": b.name, "address": b.address, "reachable": b.reachable }))
            .collect();
        let known: Vec<String> = self.gateways().await?.members().into_iter().map(|m| m.address).collect();
        let instances = self.instances(&s.banks, known)?;
        let healthy = instances::health(&self.dir, &instances).await;
        let seen = match &self.discovery {
            Some(url) if self.gateway.is_none() => Some(discovery::status(&self.dir, url).await),
            _ => None,
        };
        text.push_str("instances:\n");
        let mut listed = Vec::new();
        for (instance, healthy) in instances.iter().zip(healthy) {
            let pid = instance.pid.filter(|p| instances::is_running(*p));
            let registered = seen.as_ref().map(|seen| seen.find(instance));
            text.push_str(&format!(
                "  {:<8} {:<12} #{:<2} {:<22} {:<11} {}{}\n",
                instance.role.as_str(),
                instance.name,
                instance.replica,
                instance.address,
                pid.map_or_else(|| "pid -".to_owned(), |p| format!("pid {p}")),
                if healthy { "healthy" } else { "not answering" },
                match &registered {
                    Some(Some(seen)) => format!(", in etcd for {}", discovery::age(seen.lease_age_ms)),
                    Some(None) if instance.role.registers() => ", not in etcd".to_owned(),
                    _ => String::new(),
                }
            ));
            let mut entry = json!({
                "role": instance.role.as_str(), "name": instance.name, "replica": instance.replica,
                "address": instance.address, "pid": pid, "healthy": healthy,
                "metrics": instance.metrics, "admin": instance.admin,
            });
            if let Some(registered) = &registered
                && instance.role.registers()
            {
                entry["registered"] = json!(registered.is_some());
                entry["lease_age_ms"] = json!(registered.as_ref().map(|r| r.lease_age_ms));
            }
            listed.push(entry);
        }
        let mut reply = json!({
            "gateway_boot_id": s.gateway_boot_id, "banks": banks,
            "payments_committed": s.payments_committed, "payments_declined": s.payments_declined,
            "payments_pending": s.payments_pending, "instances": listed,
        });
        if let Some(seen) = seen {
            text.push_str(&seen.text());
            reply["discovery"] = seen.json();
        }
        Ok(Reply::done(reply, text.trim_end().to_owned()))
    }

    /// The cluster's processes: the list `strife up` keeps in DIR, else
    /// the gateways this client uses and the banks registered with them.
    fn instances(
        &self,
        registered: &[pb::BankStatus],
        gateways: Vec<String>,
    ) -> Result<Vec<Instance>, CliError> {
        if let Some(list) = instances::read(&self.dir).map_err(|e| CliError::unexpected(format!("{e:#}")))? {
            return Ok(list);
        }
        let gateways = gateways.into_iter().zip(1..).map(|(address, replica)| Instance {
            role: Role::Gateway,
            name: "gateway".to_owned(),
            replica,
            address,
            pid: None,
            metrics: None,
            admin: None,
        });
        let banks = registered.iter().map(|b| Instance {
            role: Role::Bank,
            name: b.name.clone(),
            replica: 1,
            address: b.address.clone(),
            pid: None,
            metrics: None,
            admin: None,
        });
        Ok(gateways.chain(banks).collect())
    }
}

/// Which history page `strife history` shows.
#[derive(Debug, Clone, Default)]
pub struct HistoryPage {
    /// Payments per page (the gateway caps it).
    pub size: u32,
    /// Where to start: a `next_page_token` from an earlier page.
    pub token: Option<String>,
    /// Follow the pages to the end.
    pub all: bool,
}

/// A payment as the contract shows it: words and text, not API enums.
struct PaymentView {
    payment_id: String,
    direction: &'static str,
    counterparty: String,
    amount: String,
    status: &'static str,
    reason: Option<&'static str>,
    at: String,
}

impl PaymentView {
    fn of(p: &pb::Payment) -> PaymentView {
        let status = match p.status() {
            pb::PaymentStatus::Committed => "committed",
            pb::PaymentStatus::Declined => "declined",
            pb::PaymentStatus::Pending | pb::PaymentStatus::Unspecified => "pending",
        };
        PaymentView {
            payment_id: p.payment_id.clone(),
            direction: if p.direction() == pb::Direction::Received { "received" } else { "sent" },
            counterparty: p
                .counterparty
                .as_ref()
                .map(|a| format!("{}@{}", a.user, a.bank))
                .unwrap_or_default(),
            amount: p.amount.clone(),
            status,
            reason: decline_reason_from(p.reason()).map(DeclineReason::code),
            at: rfc3339(p.create_time.as_ref()),
        }
    }

    /// The contract's history shape.
    fn json(&self) -> Value {
        json!({
            "payment_id": self.payment_id, "direction": self.direction, "counterparty": self.counterparty,
            "amount": self.amount, "status": self.status, "reason": self.reason, "at": self.at,
        })
    }
}

/// The history as a table for people: one payment a line, every column
/// aligned whatever the lengths of the counterparty, and of the status with
/// its reason.
fn history_table(payments: &[PaymentView]) -> String {
    if payments.is_empty() {
        return "  (no payments yet)".to_owned();
    }
    let cells: Vec<[String; 6]> = payments
        .iter()
        .map(|p| {
            let arrow = if p.direction == "sent" { "sent to" } else { "received from" };
            let status = match p.reason {
                Some(r) => format!("{} ({r})", p.status),
                None => p.status.to_owned(),
            };
            [
                p.at.clone(),
                p.amount.clone(),
                arrow.to_owned(),
                p.counterparty.clone(),
                status,
                p.payment_id.clone(),
            ]
        })
        .collect();
    let width = |i: usize| cells.iter().map(|c| c[i].chars().count()).max().unwrap_or(0);
    let (at, amount, arrow, counterparty, status) = (width(0), width(1), width(2), width(3), width(4));
    cells
        .iter()
        .map(|[t, a, d, c, s, id]| {
            format!("  {t:<at$}  {a:>amount$}  {d:<arrow$}  {c:<counterparty$}  {s:<status$}  {id}")
        })
        .collect::<Vec<_>>()
        .join("\n")
}

fn pending_json(p: &Pending) -> Value {
    json!({
        "payment_id": p.payment_id, "from": p.payer.to_string(), "to": p.payee.to_string(),
        "amount": format_minor(p.amount_minor), "attempts": p.attempts, "last_error": p.last_error,
    })
}

/// `d` plus up to 25 % random jitter, so that clients do not retry in step.
fn jitter(d: Duration) -> Duration {
    let spread = u64::try_from(d.as_millis() / 4).unwrap_or(0).max(1);
    let r = u64::try_from(uuid::Uuid::new_v4().as_u128() % u128::from(spread)).unwrap_or(0);
    d + Duration::from_millis(r)
}

/// The reply for one payment's outcome.
pub fn describe(p: &Pending, sent: &Sent) -> Reply {
    let amount = format_minor(p.amount_minor);
    match sent {
        Sent::Final { committed: true, replayed, .. } => Reply {
            exit: Exit::Done,
            json: pay_json(&p.payment_id, "committed", None, *replayed),
            text: format!(
                "Paid {amount} to {} (payment {}).{}",
                p.payee,
                p.payment_id,
                if *replayed {
                    " Replayed: this payment had already been made; nothing moved again."
                } else {
                    ""
                }
            ),
        },
        Sent::Final { committed: false, reason, replayed } => {
            let code = reason.as_deref().unwrap_or("declined");
            let why =
                DeclineReason::from_code(code).map_or_else(|| code.to_owned(), |r| r.explain().to_owned());
            let mut text = format!("Declined: {why} ({code}). Nothing moved (payment {}).", p.payment_id);
            if code == DeclineReason::BankUnavailable.code() || code == DeclineReason::Timeout.code() {
                text.push_str(" This payment id is closed: to try again, pay again (a new id is made).");
            }
            Reply {
                exit: Exit::Declined,
                json: pay_json(&p.payment_id, "declined", Some(code), *replayed),
                text,
            }
        }
        Sent::Queued(why, because) => {
            let mut json = pay_json(&p.payment_id, "queued", Some(because.code()), false);
            json["message"] = json!(why);
            let what = match because {
                QueuedBecause::Unreachable => format!("the gateway is unreachable ({why})"),
                QueuedBecause::StorageUnavailable => why.clone(),
            };
            Reply {
                exit: Exit::Queued,
                json,
                text: format!(
                    "Queued: {what}. Payment {} of {amount} to {} waits in the outbox; \
                     `strife outbox flush` sends it with the same id, so it can never be paid twice.",
                    p.payment_id, p.payee
                ),
            }
        }
        Sent::Waiting(e) | Sent::Refused(e) => e.to_reply(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(
        id: &'static str,
        direction: &'static str,
        counterparty: &str,
        amount: &str,
        status: &'static str,
        reason: Option<&'static str>,
    ) -> PaymentView {
        PaymentView {
            payment_id: id.to_owned(),
            direction,
            counterparty: counterparty.to_owned(),
            amount: amount.to_owned(),
            status,
            reason,
            at: "2026-11-29T15:04:48Z".to_owned(),
        }
    }

    #[test]
    fn history_columns_line_up_whatever_the_status_and_reason() {
        let (committed, declined) = ("committed", "declined");
        let rows = [
            row("id-1", "sent", "user2@BankB", "1.00", committed, None),
            row("id-2", "sent", "user9@BankB", "100000.00", declined, Some("insufficient_funds")),
            row("id-3", "received", "user10@BankLongName", "12.50", committed, None),
            row("id-4", "sent", "user2@BankB", "3.00", declined, Some("unknown_payee")),
        ];
        let table = history_table(&rows);
        let lines: Vec<&str> = table.lines().collect();
        assert_eq!(lines.len(), 4, "{table}");
        let column = |needle: &str| -> Vec<usize> {
            lines.iter().map(|l| l.find(needle).expect("in every line")).collect()
        };
        let ids = column("id-");
        assert!(ids.iter().all(|&i| i == ids[0]), "ids in one column:\n{table}");
        let at = column("2026-");
        assert!(at.iter().all(|&i| i == at[0]), "{table}");
        // Amounts are right-aligned: they end in one column.
        let ends: Vec<usize> = rows
            .iter()
            .zip(&lines)
            .map(|(r, l)| l.find(&r.amount).expect("amount") + r.amount.len())
            .collect();
        assert!(ends.iter().all(|&e| e == ends[0]), "{table}");
        assert!(lines[1].contains("declined (insufficient_funds)"), "{table}");
        assert_eq!(history_table(&[]), "  (no payments yet)");
    }
}
