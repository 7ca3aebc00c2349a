//! The operator's dashboard (issue 13): server-rendered HTML pages on the
//! gateway's `admin.listen`, one small script for live updates (it polls
//! `/api/overview` and draws the charts as inline SVG), all embedded in the
//! binary. Access: see [`crate::admin_access`].
//!
//! Every page shows the whole cluster at every replica: counts, decline
//! reasons, payments and timelines come from the shared store; payments per
//! second, latency, decision conflicts, storage failures, the banks' health
//! and the list of replicas from every replica's heartbeat in the store,
//! merged ([`crate::cluster`]). Only the banks' legs in doubt are asked by
//! this replica, of the bank replicas it reaches.
//!
//! Every value from outside (queries, names, ids, messages) is escaped by
//! [`esc`] before it enters HTML.

use crate::admin_access::{Access, LinkRefused, SESSION_COOKIE, Session, same_secret};
use crate::backend::GatewayStore;
use crate::cluster::{self, BankView, ClusterView, Identity, ReplicaView};
use crate::coordinator::Gateway;
use crate::registry::ReplicaHealth;
use crate::store::{Cursor, PageQuery, PaymentEvent, PaymentFilter, PaymentRecord, PaymentState};
use axum::body::Body;
use axum::http::{HeaderValue, Method, Request, Response, StatusCode, header};
use std::fmt::Write as _;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;
use strife_core::UserRef;
use strife_rpc::metrics;

/// Payments per page of the list.
pub const PAGE_ROWS_MAX: u32 = 50;
/// Longest search query read.
pub const QUERY_MAX_BYTES: usize = 200;
/// Longest the overview waits for a bank's `GetStatus`.
const BANK_STATUS_TIMEOUT: Duration = Duration::from_millis(500);
/// Largest form body read (logout).
const FORM_MAX_BYTES: usize = 4096;

const SCRIPT: &str = include_str!("../assets/dashboard.js");
const STYLE: &str = include_str!("../assets/dashboard.css");

const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; form-action 'self'; frame-ancestors 'none'; base-uri 'none'";

/// The listener of `setting` (`admin.listen`), or `None` when it is `off`.
pub async fn bind(setting: &str) -> anyhow::Result<Option<tokio::net::TcpListener>> {
    use anyhow::Context;
    let setting = setting.trim();
    if setting.is_empty() || setting.eq_ignore_ascii_case(metrics::OFF) {
        return Ok(None);
    }
    let addr: std::net::SocketAddr =
        setting.parse().with_context(|| format!("admin.listen '{setting}' is not IP:PORT or off"))?;
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .with_context(|| format!("binding the admin dashboard's listener on {addr}"))?;
    Ok(Some(listener))
}

/// Prints `strife: gateway admin listening on ADDR`.
pub fn announce(addr: std::net::SocketAddr) {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "strife: gateway admin listening on {addr}");
    let _ = out.flush();
}

/// The dashboard of one gateway.
pub struct Dashboard<S> {
    gateway: Arc<Gateway<S>>,
    /// This replica's addresses and start, as the replicas table shows it.
    me: Identity,
    access: Access,
    /// Served over TLS (cookies are then `Secure`).
    tls: bool,
    /// An undecided payment older than this raises the alarm.
    in_doubt_alarm: Duration,
}

impl<S: GatewayStore> Dashboard<S> {
    pub fn new(
        gateway: Arc<Gateway<S>>,
        me: Identity,
        access: Access,
        tls: bool,
        in_doubt_alarm: Duration,
    ) -> Self {
        Dashboard { gateway, me, access, tls, in_doubt_alarm }
    }

    /// The cluster now: this replica's own figures and every other
    /// replica's last heartbeat (just its own when the store cannot be read).
    async fn cluster(&self) -> ClusterView {
        let own = ReplicaView {
            boot_id: self.gateway.boot_id.clone(),
            address: self.me.address.clone(),
            admin_address: self.me.admin_address.clone(),
            started_at_ms: self.me.started_at_ms,
            age_ms: 0,
            fresh: true,
            this: true,
            report: cluster::Report::own(&self.gateway),
        };
        let rows = match self.gateway.store.replicas(cluster::REPLICAS_LISTED_MAX).await {
            Ok(rows) => rows,
            Err(e) => {
                tracing::warn!(error = %e, "cannot read the other replicas' heartbeats");
                Vec::new()
            }
        };
        cluster::merge(own, rows, strife_core::unix_ms() / 1000)
    }

    /// The dashboard as an axum router.
    pub fn router(self: Arc<Self>) -> axum::Router {
        axum::Router::new().fallback(move |req: Request<Body>| {
            let dash = self.clone();
            async move { dash.handle(req).await }
        })
    }

    async fn handle(&self, req: Request<Body>) -> Response<Body> {
        let path = req.uri().path().to_owned();
        let query = req.uri().query().unwrap_or("").to_owned();
        let method = req.method().clone();
        match (method.clone(), path.as_str()) {
            (Method::GET, "/assets/dashboard.js") => {
                return respond(StatusCode::OK, "text/javascript; charset=utf-8", SCRIPT.to_owned());
            }
            (Method::GET, "/assets/dashboard.css") => {
                return respond(StatusCode::OK, "text/css; charset=utf-8", STYLE.to_owned());
            }
            (Method::GET, "/login") => return self.login(&query),
            _ => {}
        }
        if req.headers().contains_key(header::AUTHORIZATION) {
            return refused(
                StatusCode::UNAUTHORIZED,
                "Refused",
                "The dashboard does not take bearer tokens (a customer's token opens nothing here). \
                 Log in with a link from <code>strife admin url</code>.",
            );
        }
        let now = crate::tokens::now_secs();
        let Some((id, session)) =
            session_cookie(&req).and_then(|id| Some((id.clone(), self.access.session(&id, now)?)))
        else {
            return refused(
                StatusCode::UNAUTHORIZED,
                "Log in",
                "This is Strife's operator dashboard. Open a login link: run \
                 <code>strife admin url --dir DIR</code> on the machine that holds the cluster's directory.",
            );
        };
        let result = match (method, path.as_str()) {
            (Method::GET, "/") => self.overview(&session).await,
            (Method::GET, "/api/overview") => self.overview_json().await,
            (Method::GET, "/payments") => self.payments(&query).await,
            (Method::GET, p) if p.starts_with("/payments/") => self.payment(&p["/payments/".len()..]).await,
            (Method::POST, "/logout") => return self.logout(req, &id, &session).await,
            _ => return refused(StatusCode::NOT_FOUND, "Not found", "No such page."),
        };
        result.unwrap_or_else(|e| {
            tracing::warn!(error = %e, "dashboard page failed");
            refused(
                StatusCode::INTERNAL_SERVER_ERROR,
                "Error",
                "The page could not be made; see the gateway's log.",
            )
        })
    }

    fn login(&self, query: &str) -> Response<Body> {
        let token = param(query, "t").unwrap_or_default();
        match self.access.login(&token, crate::tokens::now_secs()) {
            Ok((id, _)) => {
                let secure = if self.tls { "; Secure" } else { "" };
                let cookie = format!(
                    "{SESSION_COOKIE}={id}; HttpOnly; SameSite=Strict; Path=/; Max-Age={}{secure}",
                    self.access.session_ttl().as_secs()
                );
                let mut r =
                    respond(StatusCode::SEE_OTHER, "text/plain; charset=utf-8", "logged in".to_owned());
                if let Ok(v) = HeaderValue::from_str(&cookie) {
                    r.headers_mut().insert(header::SET_COOKIE, v);
                }
                r.headers_mut().insert(header::LOCATION, HeaderValue::from_static("/"));
                r
            }
            Err(why) => {
                tracing::info!(reason = ?why, "dashboard login refused");
                let status = if why == LinkRefused::Busy {
                    StatusCode::SERVICE_UNAVAILABLE
                } else {
                    StatusCode::UNAUTHORIZED
                };
                refused(
                    status,
                    "Login refused",
                    &format!(
                        "{}. Make a new one with <code>strife admin url --dir DIR</code>.",
                        esc(why.message())
                    ),
                )
            }
        }
    }

    async fn logout(&self, req: Request<Body>, id: &str, session: &Session) -> Response<Body> {
        let body = match axum::body::to_bytes(req.into_body(), FORM_MAX_BYTES).await {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(_) => return refused(StatusCode::PAYLOAD_TOO_LARGE, "Refused", "The form is too large."),
        };
        let csrf = param(&body, "csrf").unwrap_or_default();
        if !same_secret(&csrf, &session.csrf) {
            return refused(StatusCode::FORBIDDEN, "Refused", "The form's CSRF token is missing or wrong.");
        }
        self.access.logout(id);
        let mut r =
            refused(StatusCode::OK, "Logged out", "You are logged out. Open a new login link to come back.");
        let secure = if self.tls { "; Secure" } else { "" };
        if let Ok(v) = HeaderValue::from_str(&format!(
            "{SESSION_COOKIE}=; HttpOnly; SameSite=Strict; Path=/; Max-Age=0{secure}"
        )) {
            r.headers_mut().insert(header::SET_COOKIE, v);
        }
        r
    }

    /// What the overview shows, read now.
    async fn facts(&self) -> anyhow::Result<Facts> {
        let store = &self.gateway.store;
        let counts = store.counts().await?;
        let declines = store.decline_counts().await?;
        let now_ms = strife_core::unix_ms();
        let oldest = store.preparing_before(now_ms, 1).await?;
        let oldest_undecided_secs = oldest.first().map(|p| (now_ms - p.created_at_ms).max(0) / 1000);
        let cluster = self.cluster().await;
        let banks = bank_statuses(&cluster.banks, self.gateway.registry.health()).await;
        let conflicts = cluster.conflicts;
        let undelivered = counts.undelivered;
        let mut alarms = Vec::new();
        if conflicts > 0 {
            alarms.push((
                "decision-conflict",
                format!("{conflicts} decision(s) contradicted by a bank: a bank and the gateway disagree; run strife audit"),
            ));
        }
        if let Some(age) = oldest_undecided_secs
            && age >= i64::try_from(self.in_doubt_alarm.as_secs()).unwrap_or(i64::MAX)
        {
            alarms.push((
                "in-doubt",
                format!("a payment has been undecided for {age} s: its banks hold legs in doubt"),
            ));
        }
        let alarm_ms = i64::try_from(self.in_doubt_alarm.as_millis()).unwrap_or(i64::MAX);
        for b in &banks {
            if !b.view.reachable {
                alarms.push((
                    "bank-unreachable",
                    format!("bank {} at {} is unreachable", b.view.name, b.view.address),
                ));
            }
            if let Some((legs, Some(oldest))) = b.in_doubt
                && now_ms - oldest >= alarm_ms
            {
                alarms.push((
                    "in-doubt-leg",
                    format!(
                        "bank {} at {} holds {legs} leg(s) in doubt, the oldest for {} s",
                        b.view.name,
                        b.view.address,
                        (now_ms - oldest) / 1000
                    ),
                ));
            }
        }
        if cluster.audit.problems > 0 {
            alarms.push((
                "audit-failing",
                format!(
                    "the audit found {} payment(s) whose decision and a bank's leg disagree: {}",
                    cluster.audit.problems,
                    cluster.audit.listed.join("; ")
                ),
            ));
        }
        for (replica, failures) in &cluster.storage_failures {
            alarms.push((
                "storage",
                format!("{failures} storage failure(s) at the gateway at {replica} (disk full or I/O errors); see its log"),
            ));
        }
        Ok(Facts {
            committed: counts.committed,
            declined: counts.aborted,
            preparing: counts.preparing,
            oldest_undecided_secs,
            declines,
            banks,
            undelivered,
            conflicts,
            alarms,
            cluster,
        })
    }

    async fn overview(&self, session: &Session) -> anyhow::Result<Response<Body>> {
        let f = self.facts().await?;
        let now_ms = strife_core::unix_ms();
        let mut h = String::new();
        h.push_str(&alarm_banner(&f.alarms));
        let _ = write!(
            h,
            r#"<section><h2>Payments (whole cluster)</h2>
<table class="kv"><tr><th>Committed</th><td id="count-committed">{}</td></tr>
<tr><th>Declined</th><td id="count-declined">{}</td></tr>
<tr><th>Undecided now</th><td id="count-preparing">{}</td></tr>
<tr><th>Oldest undecided</th><td id="in-doubt-oldest">{}</td></tr>
<tr><th>Undelivered decisions</th><td id="undelivered">{}</td></tr>
<tr><th>Decision conflicts</th><td id="decision-conflicts">{}</td></tr>
<tr><th>Audit</th><td id="audit">{}</td></tr></table>
</section>
<section><h2>Payments per second and latency (every replica, last 5 minutes)</h2>
<svg id="chart-rate" data-testid="chart-rate" viewBox="0 0 600 120" width="600" height="120"></svg>
<svg id="chart-latency" data-testid="chart-latency" viewBox="0 0 600 120" width="600" height="120"></svg>
<p class="legend">Rate: <span class="committed">committed</span>, <span class="declined">declined</span>. Latency: <span class="p50">p50</span>, <span class="p99">p99</span> (<span id="latency-now">–</span>).</p>
</section>
"#,
            f.committed,
            f.declined,
            f.preparing,
            f.oldest_undecided_secs.map_or_else(|| "none".to_owned(), |s| format!("{s} s")),
            f.undelivered,
            f.conflicts,
            esc(&audit_cell(&f.cluster.audit)),
        );
        h.push_str("<section><h2>Decline reasons</h2><table id=\"declines\"><tr><th>Reason</th><th>Payments</th></tr>");
        for (reason, n) in &f.declines {
            let r = esc(reason);
            let _ = write!(
                h,
                r#"<tr data-testid="decline-reason" data-reason="{r}"><td>{r}</td><td id="decline-{r}">{n}</td></tr>"#
            );
        }
        h.push_str("</table></section>");
        h.push_str(
            "<section><h2>Banks (as every gateway replica sees them)</h2><table id=\"banks\"><tr><th>Bank</th><th>Address</th>\
             <th>Health</th><th>Last heartbeat</th><th>Legs in doubt</th><th>Oldest in doubt</th></tr>",
        );
        for b in &f.banks {
            let (n, a) = (esc(&b.view.name), esc(&b.view.address));
            let health = if b.view.reachable { "up" } else { "unreachable" };
            let (legs, oldest) = in_doubt_cells(b.in_doubt, now_ms);
            let _ = write!(
                h,
                r#"<tr data-testid="bank-row" data-bank="{n}"><td>{n}</td><td>{a}</td><td data-testid="bank-health" data-bank="{n}" class="{health}">{health}</td><td>{}</td><td data-testid="bank-in-doubt" data-bank="{n}">{legs}</td><td data-testid="bank-in-doubt-oldest" data-bank="{n}">{oldest}</td></tr>"#,
                b.view
                    .last_seen_ms
                    .map_or_else(|| "never".to_owned(), |ms| format!("{:.1} s ago", ms as f64 / 1000.0)),
            );
        }
        h.push_str("</table></section>");
        let _ = write!(
            h,
            r#"<section><h2>Gateway replicas</h2><p class="note">Cluster {}. A replica whose heartbeat is older than {} s is stale: listed, its figures left out.</p>
<table id="replicas"><tr><th>Address</th><th>Dashboard</th><th>Boot id</th><th>Started</th><th>Last heartbeat</th><th>State</th><th>Undelivered</th><th>Conflicts</th></tr>"#,
            esc(&self.gateway.cluster_id),
            cluster::REPLICA_FRESH_MAX_MS / 1000,
        );
        for r in &f.cluster.replicas {
            let state = replica_state(r);
            let _ = write!(
                h,
                r#"<tr data-testid="replica-row" data-boot-id="{boot}" data-state="{state}"><td>{}</td><td>{}</td><td>{boot}</td><td>{}</td><td>{}</td><td class="{state}">{state}</td><td>{}</td><td>{}</td></tr>"#,
                esc(&r.address),
                esc(&r.admin_address),
                rfc3339(r.started_at_ms),
                if r.this { "now".to_owned() } else { format!("{:.1} s ago", r.age_ms as f64 / 1000.0) },
                r.report.undelivered,
                r.report.conflicts,
                boot = esc(&r.boot_id),
            );
        }
        h.push_str("</table></section>");
        Ok(page("Overview", &h, Some(session)))
    }

    async fn overview_json(&self) -> anyhow::Result<Response<Body>> {
        let f = self.facts().await?;
        let now_ms = strife_core::unix_ms();
        let samples: Vec<serde_json::Value> = f
            .cluster
            .samples
            .iter()
            .map(|s| {
                serde_json::json!({
                    "t": s.at_secs, "committed": s.committed, "declined": s.declined,
                    "p50_ms": s.p50_micros as f64 / 1000.0, "p99_ms": s.p99_micros as f64 / 1000.0,
                })
            })
            .collect();
        let body = serde_json::json!({
            "counts": {"committed": f.committed, "declined": f.declined, "preparing": f.preparing},
            "oldest_undecided_secs": f.oldest_undecided_secs,
            "undelivered": f.undelivered,
            "decision_conflicts": f.conflicts,
            "declines": f.declines.iter().map(|(r, n)| serde_json::json!({"reason": r, "count": n})).collect::<Vec<_>>(),
            "banks": f.banks.iter().map(|b| {
                let (legs, oldest) = in_doubt_cells(b.in_doubt, now_ms);
                serde_json::json!({
                    "name": b.view.name, "address": b.view.address, "reachable": b.view.reachable,
                    "last_seen_secs": b.view.last_seen_ms.map(|ms| ms as f64 / 1000.0),
                    "in_doubt": legs, "in_doubt_oldest": oldest,
                })
            }).collect::<Vec<_>>(),
            "replicas": f.cluster.replicas.iter().map(|r| serde_json::json!({
                "boot_id": r.boot_id, "address": r.address, "admin_address": r.admin_address,
                "started_at": rfc3339(r.started_at_ms), "last_heartbeat_secs": r.age_ms as f64 / 1000.0,
                "state": replica_state(r), "this": r.this,
                "undelivered": r.report.undelivered, "decision_conflicts": r.report.conflicts,
                "storage_failures": r.report.storage_failures,
                "audit": r.report.audit.as_ref().map(|a| serde_json::json!({
                    "last_run": rfc3339(a.last_run_ms), "checked_last_run": a.checked_last_run,
                    "checked_total": a.checked_total, "problems": a.problems, "error": a.error,
                })),
            })).collect::<Vec<_>>(),
            "audit": {
                "last_run": (f.cluster.audit.last_run_ms > 0).then(|| rfc3339(f.cluster.audit.last_run_ms)),
                "problems": f.cluster.audit.problems,
                "listed": f.cluster.audit.listed,
                "errors": f.cluster.audit.errors.iter()
                    .map(|(replica, why)| serde_json::json!({"replica": replica, "error": why}))
                    .collect::<Vec<_>>(),
            },
            "alarms": f.alarms.iter().map(|(code, msg)| serde_json::json!({"code": code, "message": msg})).collect::<Vec<_>>(),
            "samples": samples,
        });
        Ok(respond(StatusCode::OK, "application/json", body.to_string()))
    }

    async fn payments(&self, query: &str) -> anyhow::Result<Response<Body>> {
        let mut q = param(query, "q").unwrap_or_default();
        if q.len() > QUERY_MAX_BYTES {
            let mut end = QUERY_MAX_BYTES;
            while !q.is_char_boundary(end) {
                end -= 1;
            }
            q.truncate(end);
        }
        let q = q.trim().to_owned();
        let before = param(query, "before").and_then(|c| parse_cursor(&c));
        let store = &self.gateway.store;
        let mut note = String::new();
        let (rows, next) = if q.contains('@') {
            match UserRef::from_str(&q) {
                Ok(who) => {
                    let page = store
                        .list_payments(
                            who,
                            PageQuery { limit: PAGE_ROWS_MAX, after: before, ..PageQuery::default() },
                        )
                        .await?;
                    (page.payments, page.next)
                }
                Err(_) => {
                    note = "not a customer (user@bank)".to_owned();
                    (Vec::new(), None)
                }
            }
        } else {
            let filter = if q.is_empty() { PaymentFilter::All } else { PaymentFilter::PaymentId(q.clone()) };
            let mut rows = store.recent_payments(filter, before, PAGE_ROWS_MAX + 1).await?;
            let more = rows.len() > PAGE_ROWS_MAX as usize;
            rows.truncate(PAGE_ROWS_MAX as usize);
            let next = if more { rows.last().map(Cursor::after) } else { None };
            (rows, next)
        };
        let mut h = String::new();
        let _ = write!(
            h,
            r#"<section><h2>Payments</h2><form method="get" action="/payments" id="search-form">
<input id="search" name="q" value="{}" placeholder="payment id or user@bank" maxlength="{QUERY_MAX_BYTES}">
<button type="submit">Search</button></form>"#,
            esc(&q)
        );
        if !q.is_empty() {
            let _ = write!(h, r#"<p id="search-query">Results for <q>{}</q> {}</p>"#, esc(&q), esc(&note));
        }
        h.push_str(
            "<table id=\"payments\"><tr><th>When</th><th>Payment id</th><th>From</th><th>To</th><th>Amount</th>\
             <th>State</th><th>Reason</th></tr>",
        );
        for p in &rows {
            h.push_str(&payment_row(p));
        }
        h.push_str("</table>");
        let _ = write!(h, r#"<p id="payment-count" data-count="{}">{} shown</p>"#, rows.len(), rows.len());
        if let Some(c) = next {
            let _ = write!(
                h,
                r#"<p><a id="next-page" href="/payments?q={}&amp;before={}.{}">Older payments</a></p>"#,
                esc(&url_encode(&q)),
                c.created_at_ms,
                esc(&c.txn_id)
            );
        }
        h.push_str("</section>");
        Ok(page("Payments", &h, None))
    }

    async fn payment(&self, txn_id: &str) -> anyhow::Result<Response<Body>> {
        if uuid::Uuid::parse_str(txn_id).is_err() {
            return Ok(refused(StatusCode::NOT_FOUND, "Not found", "No such payment."));
        }
        let store = &self.gateway.store;
        let Some(p) = store.find_txn(txn_id.to_owned()).await? else {
            return Ok(refused(StatusCode::NOT_FOUND, "Not found", "No such payment."));
        };
        let events = store.payment_events(txn_id.to_owned()).await?;
        let mut h = String::new();
        let _ = write!(
            h,
            r#"<section><h2>Payment {}</h2><table class="kv">
<tr><th>Payment id</th><td id="payment-id">{}</td></tr>
<tr><th>Transaction</th><td id="payment-txn">{}</td></tr>
<tr><th>From</th><td id="payment-payer">{}</td></tr>
<tr><th>To</th><td id="payment-payee">{}</td></tr>
<tr><th>Amount</th><td id="payment-amount">{}</td></tr>
<tr><th>State</th><td id="payment-state">{}</td></tr>
<tr><th>Reason</th><td id="payment-reason">{}</td></tr>
<tr><th>Every bank acknowledged</th><td id="payment-acked">{}</td></tr>
<tr><th>Protocol</th><td id="payment-protocol">{}</td></tr>
<tr><th>Created</th><td>{}</td></tr></table>
<h3>{} timeline</h3><ol id="timeline">"#,
            esc(&p.payment_id),
            esc(&p.payment_id),
            esc(&p.txn_id),
            esc(&p.payer.to_string()),
            esc(&p.payee.to_string()),
            amount(p.amount_minor),
            state_name(&p),
            p.reason.map_or("", |r| r.code()),
            if p.acked { "yes" } else { "no" },
            if p.one_phase {
                format!("one phase: decided by {}", esc(&p.payer.bank))
            } else {
                "two-phase commit".to_owned()
            },
            rfc3339(p.created_at_ms),
            if p.one_phase { "One-phase commit" } else { "Two-phase commit" },
        );
        for e in &events {
            h.push_str(&event_row(e, p.created_at_ms));
        }
        h.push_str("</ol>");
        if events.is_empty() {
            h.push_str(
                r#"<p class="note">No timeline recorded (it is best-effort: a crash may lose it).</p>"#,
            );
        }
        h.push_str("</section>");
        Ok(page("Payment", &h, None))
    }
}

/// What the overview and its JSON show.
struct Facts {
    committed: u64,
    declined: u64,
    preparing: u64,
    oldest_undecided_secs: Option<i64>,
    declines: Vec<(String, u64)>,
    banks: Vec<BankStatus>,
    undelivered: u64,
    conflicts: u64,
    alarms: Vec<(&'static str, String)>,
    /// Every replica's heartbeat, merged.
    cluster: ClusterView,
}

/// The overview's audit cell.
fn audit_cell(a: &cluster::ClusterAudit) -> String {
    if a.last_run_ms == 0 {
        return "no pass yet (admin.audit_interval_secs)".to_owned();
    }
    let mut text = match a.problems {
        0 => format!("clean, last pass {}", rfc3339(a.last_run_ms)),
        n => format!("{n} problem(s), last pass {}", rfc3339(a.last_run_ms)),
    };
    for (replica, why) in &a.errors {
        let _ = write!(text, "; the pass at {replica} could not finish: {why}");
    }
    text
}

/// `this`, `fresh` or `stale`.
fn replica_state(r: &ReplicaView) -> &'static str {
    if r.this {
        "this"
    } else if r.fresh {
        "fresh"
    } else {
        "stale"
    }
}

/// A bank replica as the cluster sees it, and what it said of its legs in
/// doubt.
struct BankStatus {
    view: BankView,
    /// `(legs, when the oldest was prepared)`; `None` when it did not answer.
    in_doubt: Option<(i64, Option<i64>)>,
}

/// Asks every bank replica of `banks` that this replica reaches (`mine`)
/// for its legs in doubt (`GetStatus`), all at once, each for at most
/// [`BANK_STATUS_TIMEOUT`].
async fn bank_statuses(banks: &[BankView], mine: Vec<ReplicaHealth>) -> Vec<BankStatus> {
    let mut asks = tokio::task::JoinSet::new();
    for (i, b) in banks.iter().enumerate() {
        let Some(r) = mine.iter().find(|r| r.reachable && r.name == b.name && r.address == b.address) else {
            continue;
        };
        let mut client = r.client.clone();
        asks.spawn(async move {
            let answer = tokio::time::timeout(
                BANK_STATUS_TIMEOUT,
                client.get_status(strife_proto::bank::v1::GetStatusRequest {}),
            )
            .await;
            let doubt = match answer {
                Ok(Ok(resp)) => {
                    let s = resp.into_inner();
                    let oldest =
                        (s.oldest_in_doubt_prepared_at_ms > 0).then_some(s.oldest_in_doubt_prepared_at_ms);
                    Some((s.in_doubt_legs, oldest))
                }
                _ => None,
            };
            (i, doubt)
        });
    }
    let mut out: Vec<BankStatus> =
        banks.iter().map(|view| BankStatus { view: view.clone(), in_doubt: None }).collect();
    while let Some(done) = asks.join_next().await {
        if let Ok((i, doubt)) = done
            && let Some(slot) = out.get_mut(i)
        {
            slot.in_doubt = doubt;
        }
    }
    out
}

/// The "legs in doubt" and "oldest" cells of a bank.
fn in_doubt_cells(in_doubt: Option<(i64, Option<i64>)>, now_ms: i64) -> (String, String) {
    match in_doubt {
        None => ("?".to_owned(), "?".to_owned()),
        Some((legs, None)) => (legs.to_string(), "none".to_owned()),
        Some((legs, Some(at))) => (legs.to_string(), format!("{} s", (now_ms - at).max(0) / 1000)),
    }
}

fn alarm_banner(alarms: &[(&'static str, String)]) -> String {
    let mut h = format!(
        r#"<section id="alarm-banner" data-testid="alarm-banner" role="alert" data-alarms="{}" class="{}">"#,
        alarms.len(),
        if alarms.is_empty() { "ok" } else { "alarm" }
    );
    if alarms.is_empty() {
        h.push_str("<p>Nothing needs a person.</p>");
    } else {
        h.push_str("<ul>");
        for (code, msg) in alarms {
            let _ = write!(h, r#"<li data-testid="alarm" data-alarm="{code}">{}</li>"#, esc(msg));
        }
        h.push_str("</ul>");
    }
    h.push_str("</section>");
    h
}

fn payment_row(p: &PaymentRecord) -> String {
    let txn = esc(&p.txn_id);
    format!(
        r#"<tr data-testid="payment-row" data-txn="{txn}"><td>{}</td><td><a href="/payments/{txn}">{}</a></td><td>{}</td><td>{}</td><td>{}</td><td class="state">{}</td><td>{}</td></tr>"#,
        rfc3339(p.created_at_ms),
        esc(&p.payment_id),
        esc(&p.payer.to_string()),
        esc(&p.payee.to_string()),
        amount(p.amount_minor),
        state_name(p),
        p.reason.map_or("", |r| r.code()),
    )
}

fn event_row(e: &PaymentEvent, start_ms: i64) -> String {
    let bank = e.bank.as_deref().map(esc).unwrap_or_default();
    let what = match e.kind {
        "begin" if e.detail.is_empty() => "begin".to_owned(),
        "begin" => format!("begin ({})", esc(&e.detail)),
        "vote" => format!("{bank} votes {}", esc(&e.detail)),
        "decision" => format!("decision: {}", esc(&e.detail)),
        "ack" => format!("{bank} acknowledges: {}", esc(&e.detail)),
        "transfer" => format!("{bank} decides: {}", esc(&e.detail)),
        "resolve" => format!("asked {bank} what it decided: {}", esc(&e.detail)),
        other => format!("{other} {bank} {}", esc(&e.detail)),
    };
    format!(
        r#"<li data-testid="timeline-row" data-kind="{}" data-bank="{bank}"><time>{}</time> <span class="offset">+{} ms</span> {what}</li>"#,
        e.kind,
        rfc3339(e.at_ms),
        e.at_ms - start_ms,
    )
}

fn state_name(p: &PaymentRecord) -> &'static str {
    match p.state {
        PaymentState::Committed => "committed",
        PaymentState::Aborted => "declined",
        PaymentState::Preparing => "undecided",
    }
}

fn amount(minor: i64) -> String {
    strife_core::Amount::from_minor(minor).map_or_else(|| minor.to_string(), |a| a.to_string())
}

fn rfc3339(ms: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_default()
}

fn parse_cursor(text: &str) -> Option<Cursor> {
    let (at, txn) = text.split_once('.')?;
    uuid::Uuid::parse_str(txn).ok()?;
    Some(Cursor { created_at_ms: at.parse().ok()?, txn_id: txn.to_owned() })
}

/// A whole page around `body`.
fn page(title: &str, body: &str, session: Option<&Session>) -> Response<Body> {
    let logout = session.map_or_else(String::new, |s| {
        format!(
            r#"<form method="post" action="/logout" id="logout-form"><input type="hidden" name="csrf" id="csrf" value="{}"><button type="submit" id="logout">Log out</button></form>"#,
            esc(&s.csrf)
        )
    });
    let html = format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{} · Strife</title>
<link rel="stylesheet" href="/assets/dashboard.css"><script src="/assets/dashboard.js" defer></script></head>
<body><header><h1>Strife</h1><nav><a href="/" id="nav-overview">Overview</a> <a href="/payments" id="nav-payments">Payments</a></nav>{logout}</header>
<main>{body}</main></body></html>"#,
        esc(title)
    );
    respond(StatusCode::OK, "text/html; charset=utf-8", html)
}

/// A short page saying why (its message is trusted HTML: callers escape).
fn refused(status: StatusCode, title: &str, message_html: &str) -> Response<Body> {
    let mut r = page(
        title,
        &format!(r#"<section id="message"><h2>{}</h2><p>{message_html}</p></section>"#, esc(title)),
        None,
    );
    *r.status_mut() = status;
    r
}

/// A response with the headers every dashboard answer carries.
fn respond(status: StatusCode, content_type: &'static str, body: String) -> Response<Body> {
    let mut r = Response::new(Body::from(body));
    *r.status_mut() = status;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(header::CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    r
}

fn session_cookie(req: &Request<Body>) -> Option<String> {
    req.headers().get_all(header::COOKIE).iter().filter_map(|v| v.to_str().ok()).find_map(|v| {
        v.split(';').find_map(|c| {
            let (k, val) = c.trim().split_once('=')?;
            (k == SESSION_COOKIE && !val.is_empty()).then(|| val.to_owned())
        })
    })
}

/// HTML-escapes text for an element or a quoted attribute.
pub fn esc(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            c => out.push(c),
        }
    }
    out
}

/// The value of `name` in a query string or form body, decoded.
fn param(query: &str, name: &str) -> Option<String> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (url_decode(k) == name).then(|| url_decode(v))
    })
}

fn url_decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                match std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok())
                {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn url_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~@".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escaping_and_query_decoding() {
        assert_eq!(esc(r#"<script>"a'&"#), "&lt;script&gt;&quot;a&#39;&amp;");
        assert_eq!(param("q=%3Cscript%3E+x&b=1", "q").as_deref(), Some("<script> x"));
        assert_eq!(param("q=50%", "q").as_deref(), Some("50%"));
        assert_eq!(param("q=%4", "q").as_deref(), Some("%4"));
        assert_eq!(url_decode(&url_encode("a b<@>")), "a b<@>");
    }
}
