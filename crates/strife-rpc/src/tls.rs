//! Mutual TLS (rustls) for every link, with revocation and renewal that
//! need no restart.
//!
//! A process loads its identity (certificate and key), the CA and the CRL
//! from `DIR/certs`, checks its certificate, and builds one rustls server
//! config and one client config from them; both verifiers refuse the
//! certificates the CRL lists. Before each new connection, in or out, it
//! looks at those four files again (a `stat` each), and at most once per
//! [`RELOAD_CHECK_INTERVAL`] while traffic flows on established ones; when
//! one changed it loads them again, checked as at start, and swaps the
//! configs. New connections then get the renewed certificate and the new
//! CRL; established ones go on, unless the CRL now lists the certificate
//! of the peer at their other end, which closes them ([`Guarded`]).
//!
//! tonic's own TLS takes neither CRLs nor new files, so servers accept with
//! [`Tls::accept`] (see `serve::incoming`) and clients connect through the
//! connector of [`Tls::endpoint`]; tonic still sees rustls streams, so the
//! caller's certificate reaches handlers as before (`identity.rs`).

use crate::identity::Peer;
use crate::pki::CertDir;
use crate::revocation::{self, Serial};
use anyhow::{Context, bail};
use hyper_util::rt::TokioIo;
use rustls::client::WebPkiServerVerifier;
use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, CertificateRevocationListDer, PrivateKeyDer, ServerName, UnixTime};
use rustls::server::WebPkiClientVerifier;
use rustls::server::danger::{ClientCertVerified, ClientCertVerifier};
use rustls::{
    ClientConfig, DigitallySignedStruct, DistinguishedName, RootCertStore, ServerConfig, SignatureScheme,
};
use std::collections::HashSet;
use std::future::Future;
use std::io;
use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::task::{Context as TaskContext, Poll};
use std::time::{Duration, Instant};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tonic::transport::server::Connected;
use tonic::transport::{Channel, Endpoint};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long to wait for a TCP + TLS connection to come up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);
/// How long a server waits for a client to finish its TLS handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// While traffic flows on established connections, the files are looked
/// at no more often than this (new connections always look).
pub const RELOAD_CHECK_INTERVAL: Duration = Duration::from_secs(1);
/// Most refused certificates remembered so that each is logged at `warn`
/// once (then at `debug`): a refused peer retrying cannot flood the log.
const REFUSALS_REMEMBERED_MAX: usize = 1024;
/// How long a client waits for a server's first message after the
/// handshake (see [`Tls::connect`]) before going on without it.
const FIRST_MESSAGE_WAIT: Duration = Duration::from_secs(1);
/// Most bytes of that first message read at once (the rest is read later).
const FIRST_MESSAGE_BYTES_MAX: usize = 16 * 1024;
/// The only application protocol: gRPC is HTTP/2.
const ALPN_H2: &[u8] = b"h2";

/// One process's TLS material: the CA it trusts, the CRL it honours and the
/// identity it proves, loaded again whenever their files change. Clones
/// share it.
#[derive(Clone)]
pub struct Tls {
    /// Who this process is; checked against its own certificate on load.
    pub me: Peer,
    shared: Arc<Shared>,
}

struct Shared {
    certs: CertDir,
    material: RwLock<Arc<Material>>,
    /// Bumped at each reload, so that a connection knows when to look at
    /// the CRL again.
    generation: AtomicU64,
    /// When the files were last looked at, in ms since `epoch`.
    checked_ms: AtomicU64,
    epoch: Instant,
    /// Serialises reloads; holds the files that last failed to load, so
    /// that they are reported once and not read again until they change.
    failed: Mutex<Option<Stamp>>,
    refusals: Arc<Refusals>,
}

/// The configs built from one version of the files.
struct Material {
    stamp: Stamp,
    server: Arc<ServerConfig>,
    client: Arc<ClientConfig>,
    /// The serials the CRL lists.
    revoked: HashSet<Serial>,
    /// Our own certificate's serial.
    serial: Serial,
}

/// Which version of each file was read: device, inode (a rename makes a
/// new one), modification time and length; `None` for a missing file.
type FileStamp = Option<(u64, u64, i64, i64, u64)>;
#[derive(Debug, Clone, PartialEq, Eq)]
struct Stamp([FileStamp; 4]);

impl Stamp {
    fn read(certs: &CertDir, me: &Peer) -> Stamp {
        let files = certs.identity(me);
        let stat = |p: &Path| {
            std::fs::metadata(p).ok().map(|m| (m.dev(), m.ino(), m.mtime(), m.mtime_nsec(), m.len()))
        };
        Stamp([stat(&certs.ca_cert()), stat(&files.cert), stat(&files.key), stat(&certs.crl())])
    }
}

impl Tls {
    /// Loads `me`'s certificate and key from `certs`, refusing a certificate
    /// that is expired, not yet valid, or names another identity.
    pub fn load(certs: &CertDir, me: &Peer) -> anyhow::Result<Tls> {
        let refusals = Arc::new(Refusals::default());
        let material = Material::load(certs, me, &refusals)?;
        let shared = Shared {
            certs: certs.clone(),
            material: RwLock::new(Arc::new(material)),
            generation: AtomicU64::new(0),
            checked_ms: AtomicU64::new(0),
            epoch: Instant::now(),
            failed: Mutex::new(None),
            refusals,
        };
        Ok(Tls { me: me.clone(), shared: Arc::new(shared) })
    }

    /// The serial of the certificate this process presents now.
    pub fn serial(&self) -> Serial {
        self.material().serial.clone()
    }

    /// Whether the CRL this process honours lists `serial`.
    pub fn is_revoked(&self, serial: &Serial) -> bool {
        self.material().revoked.contains(serial)
    }

    /// A channel to `server` at `addr`. It connects on first use and
    /// reconnects by itself after a failure.
    pub fn channel(&self, server: &Peer, addr: &str) -> anyhow::Result<Channel> {
        Ok(self.endpoint(server, addr)?.connect_lazy())
    }

    /// An endpoint for `server` at `addr`: mutual TLS with our identity,
    /// accepting only a certificate that proves `server` and that the CRL
    /// does not list.
    pub fn endpoint(&self, server: &Peer, addr: &str) -> anyhow::Result<TlsEndpoint> {
        self.endpoint_named(&server.server_dns_name(), addr)
            .with_context(|| format!("an endpoint for {server}"))
    }

    /// An endpoint for a server at `addr` whose certificate, from our CA and
    /// not listed by the CRL, proves the DNS name `dns_name` (a server that
    /// is no Strife identity, as the private etcd).
    pub fn endpoint_named(&self, dns_name: &str, addr: &str) -> anyhow::Result<TlsEndpoint> {
        let sock: SocketAddr =
            addr.parse().with_context(|| format!("'{addr}' is not a host:port address"))?;
        let server_name = ServerName::try_from(dns_name.to_owned())
            .with_context(|| format!("'{dns_name}' is not a DNS name to verify"))?;
        // The scheme is `http` because the connector does the TLS itself.
        let endpoint = Endpoint::from_shared(format!("http://{sock}"))?
            .connect_timeout(CONNECT_TIMEOUT)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true);
        Ok(TlsEndpoint { endpoint, connector: Connector { tls: self.clone(), addr: sock, server_name } })
    }

    /// The server side of one new connection: the TLS handshake with the
    /// files as they are now, requiring a client certificate from our CA
    /// that the CRL does not list.
    pub async fn accept(
        &self,
        tcp: TcpStream,
    ) -> io::Result<Guarded<tokio_rustls::server::TlsStream<TcpStream>>> {
        let config = self.fresh().server.clone();
        let stream = tokio_rustls::TlsAcceptor::from(config).accept(tcp).await?;
        let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        Guarded::new(stream, self.clone(), peer.as_deref(), false)
    }

    async fn connect(
        &self,
        addr: SocketAddr,
        server_name: ServerName<'static>,
    ) -> io::Result<Guarded<tokio_rustls::client::TlsStream<TcpStream>>> {
        let config = self.fresh().client.clone();
        let tcp = TcpStream::connect(addr).await?;
        tcp.set_nodelay(true)?;
        let mut stream = tokio_rustls::TlsConnector::from(config).connect(server_name, tcp).await?;
        // In TLS 1.3 the server checks our certificate once our side of the
        // handshake is done: wait for its first message (its HTTP/2
        // settings; a Strife server speaks first) or its refusal, before
        // anything is written, so that a refusal is read as such and not
        // lost in a reset. What it sent is replayed to HTTP/2.
        let mut first = vec![0; FIRST_MESSAGE_BYTES_MAX];
        let n = match tokio::time::timeout(FIRST_MESSAGE_WAIT, stream.read(&mut first)).await {
            Ok(Ok(0)) => {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the server closed the connection after the handshake",
                ));
            }
            Ok(Ok(n)) => n,
            Ok(Err(e)) => {
                note_refusal_by_server(&e, &self.me);
                return Err(e);
            }
            Err(_) => 0,
        };
        first.truncate(n);
        if n > 0 {
            *REFUSED_BY_SERVER.lock().unwrap_or_else(PoisonError::into_inner) = None;
        }
        let peer = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).map(|c| c.to_vec());
        let mut guarded = Guarded::new(stream, self.clone(), peer.as_deref(), true)?;
        guarded.replay = first;
        Ok(guarded)
    }

    fn material(&self) -> Arc<Material> {
        self.shared.material.read().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The material after looking at the files (for a new connection).
    fn fresh(&self) -> Arc<Material> {
        self.refresh();
        self.material()
    }

    /// Looks at the files if that was last done [`RELOAD_CHECK_INTERVAL`]
    /// ago or more.
    fn refresh_if_due(&self) {
        let now = u64::try_from(self.shared.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        let last = self.shared.checked_ms.load(Ordering::Relaxed);
        let interval = u64::try_from(RELOAD_CHECK_INTERVAL.as_millis()).unwrap_or(u64::MAX);
        if now.saturating_sub(last) >= interval
            && self
                .shared
                .checked_ms
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            self.refresh();
        }
    }

    /// Loads the files again if any changed since they were last loaded.
    fn refresh(&self) {
        let now = u64::try_from(self.shared.epoch.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.shared.checked_ms.store(now, Ordering::Relaxed);
        let stamp = Stamp::read(&self.shared.certs, &self.me);
        if self.material().stamp == stamp {
            return;
        }
        let mut failed = self.shared.failed.lock().unwrap_or_else(PoisonError::into_inner);
        if failed.as_ref() == Some(&stamp) || self.material().stamp == stamp {
            return;
        }
        match Material::load(&self.shared.certs, &self.me, &self.shared.refusals) {
            Ok(new) => {
                let old = self.material();
                if new.serial != old.serial {
                    tracing::info!(serial = %new.serial, previous = %old.serial,
                        "presenting a renewed certificate on new connections");
                }
                if new.revoked != old.revoked {
                    tracing::info!(revoked = new.revoked.len(), "read a new CRL");
                }
                *self.shared.material.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(new);
                self.shared.generation.fetch_add(1, Ordering::Release);
                *failed = None;
            }
            Err(e) => {
                // A certificate and its key are written one after the other:
                // until both are, keep what we had.
                tracing::warn!(error = %format!("{e:#}"), "cannot load the changed TLS files; keeping the previous ones");
                *failed = Some(stamp);
            }
        }
    }
}

impl Material {
    fn load(certs: &CertDir, me: &Peer, refusals: &Arc<Refusals>) -> anyhow::Result<Material> {
        let stamp = Stamp::read(certs, me);
        let files = certs.identity(me);
        let ca_pem = std::fs::read(certs.ca_cert())
            .with_context(|| format!("reading the CA certificate {}", certs.ca_cert().display()))?;
        let cert_pem = std::fs::read(&files.cert)
            .with_context(|| format!("reading certificate {}", files.cert.display()))?;
        let key_pem =
            std::fs::read(&files.key).with_context(|| format!("reading key {}", files.key.display()))?;
        let serial = check_certificate(&cert_pem, me)
            .with_context(|| format!("certificate {}", files.cert.display()))?;
        let mut roots = RootCertStore::empty();
        for ca in CertificateDer::pem_slice_iter(&ca_pem) {
            roots.add(ca.with_context(|| format!("reading {}", certs.ca_cert().display()))?)?;
        }
        let roots = Arc::new(roots);
        let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&cert_pem)
            .collect::<Result<_, _>>()
            .with_context(|| format!("reading {}", files.cert.display()))?;
        let key = PrivateKeyDer::from_pem_slice(&key_pem)
            .with_context(|| format!("reading {}", files.key.display()))?;
        let crl = revocation::read_crl(&certs.crl())?;
        let revoked: HashSet<Serial> =
            crl.as_ref().map(|c| c.revoked.iter().map(|r| r.serial.clone()).collect()).unwrap_or_default();
        let crls: Vec<CertificateRevocationListDer<'static>> =
            crl.map(|c| CertificateRevocationListDer::from(c.der)).into_iter().collect();
        if revoked.contains(&serial) && me.role() != crate::PeerRole::Client {
            tracing::error!(%serial, "this process's own certificate is revoked: peers refuse it; \
                issue a new one with `strife certs issue` (it is used without a restart)");
        }

        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let client_verifier = WebPkiClientVerifier::builder_with_provider(roots.clone(), provider.clone())
            .with_crls(crls.clone())
            .only_check_end_entity_revocation()
            .build()
            .context("building the client certificate verifier")?;
        let mut server = ServerConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()?
            .with_client_cert_verifier(Arc::new(LoggedClientVerifier {
                inner: client_verifier,
                refusals: refusals.clone(),
            }))
            .with_single_cert(chain.clone(), key.clone_key())
            .context("our certificate and key do not go together")?;
        server.alpn_protocols = vec![ALPN_H2.to_vec()];
        let server_verifier = WebPkiServerVerifier::builder_with_provider(roots, provider.clone())
            .with_crls(crls)
            .only_check_end_entity_revocation()
            .build()
            .context("building the server certificate verifier")?;
        let mut client = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(LoggedServerVerifier {
                inner: server_verifier,
                refusals: refusals.clone(),
            }))
            .with_client_auth_cert(chain, key)
            .context("our certificate and key do not go together")?;
        client.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(Material { stamp, server: Arc::new(server), client: Arc::new(client), revoked, serial })
    }
}

/// Checks one PEM certificate: it names `me` and is valid now. Returns its
/// serial.
fn check_certificate(pem: &[u8], me: &Peer) -> anyhow::Result<Serial> {
    let (_, pem) =
        x509_parser::pem::parse_x509_pem(pem).map_err(|e| anyhow::anyhow!("not a PEM file: {e}"))?;
    let (_, cert) =
        X509Certificate::from_der(&pem.contents).map_err(|e| anyhow::anyhow!("not a certificate: {e}"))?;
    match Peer::from_der(&pem.contents) {
        Some(ref named) if named == me => {}
        Some(named) => bail!("names {named}, but this process is {me}"),
        None => bail!("names no Strife identity (expected {me})"),
    }
    let validity = cert.validity();
    let now = x509_parser::time::ASN1Time::now();
    if now < validity.not_before {
        bail!("is not valid before {}", validity.not_before);
    }
    if now > validity.not_after {
        bail!("expired on {}; issue a new one with `strife certs issue`", validity.not_after);
    }
    Ok(Serial::from_bytes(cert.raw_serial()))
}

/// An endpoint whose connections are made by our connector (TLS with the
/// current files, guarded by the CRL). The subset of tonic's `Endpoint`
/// that Strife uses.
#[derive(Clone)]
pub struct TlsEndpoint {
    endpoint: Endpoint,
    connector: Connector,
}

impl TlsEndpoint {
    /// A deadline for every request on the channel.
    pub fn timeout(mut self, timeout: Duration) -> TlsEndpoint {
        self.endpoint = self.endpoint.timeout(timeout);
        self
    }

    /// HTTP/2 pings this often on the channel's connection.
    pub fn http2_keep_alive_interval(mut self, interval: Duration) -> TlsEndpoint {
        self.endpoint = self.endpoint.http2_keep_alive_interval(interval);
        self
    }

    /// Drops the connection when a ping is not answered within `timeout`.
    pub fn keep_alive_timeout(mut self, timeout: Duration) -> TlsEndpoint {
        self.endpoint = self.endpoint.keep_alive_timeout(timeout);
        self
    }

    /// Connects now.
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        self.endpoint.connect_with_connector(self.connector.clone()).await
    }

    /// Connects on first use, and again after a failure.
    pub fn connect_lazy(&self) -> Channel {
        self.endpoint.connect_with_connector_lazy(self.connector.clone())
    }
}

/// Makes the connections of a [`TlsEndpoint`]: TCP to one address, then TLS
/// verifying that the server proves `server_name`.
#[derive(Clone)]
struct Connector {
    tls: Tls,
    addr: SocketAddr,
    server_name: ServerName<'static>,
}

impl tower::Service<http::Uri> for Connector {
    type Response = TokioIo<Guarded<tokio_rustls::client::TlsStream<TcpStream>>>;
    type Error = io::Error;
    type Future = Pin<Box<dyn Future<Output = io::Result<Self::Response>> + Send>>;

    fn poll_ready(&mut self, _cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, _uri: http::Uri) -> Self::Future {
        let (tls, addr, server_name) = (self.tls.clone(), self.addr, self.server_name.clone());
        Box::pin(async move { tls.connect(addr, server_name).await.map(TokioIo::new) })
    }
}

/// A TLS connection that closes itself once the CRL lists the certificate
/// of the peer at its other end: each read or write first checks whether
/// the files were loaded again since it last looked (and looks at the files
/// if that is due), so that an identity revoked while connected is cut off
/// at its next message.
pub struct Guarded<S> {
    inner: S,
    tls: Tls,
    /// Who the peer is and its certificate's serial, for the check and the log.
    peer: Option<(String, Serial)>,
    /// The material generation last checked against.
    checked: u64,
    closed: bool,
    /// We connected (the peer is a server).
    client_side: bool,
    /// Bytes already read from `inner` (the server's first message), to
    /// be read again first.
    replay: Vec<u8>,
    replayed: usize,
}

impl<S> Guarded<S> {
    /// Wraps a finished handshake; refuses at once a peer whose certificate
    /// the CRL lists (a resumed session is not verified again by rustls).
    fn new(inner: S, tls: Tls, peer_der: Option<&[u8]>, client_side: bool) -> io::Result<Guarded<S>> {
        let peer = peer_der.and_then(|der| {
            let who =
                Peer::from_der(der).map_or_else(|| "an unnamed certificate".to_owned(), |p| p.to_string());
            Some((who, Serial::of_certificate(der)?))
        });
        let checked = tls.shared.generation.load(Ordering::Acquire);
        let mut guarded = Guarded {
            inner,
            tls,
            peer,
            checked,
            closed: false,
            client_side,
            replay: Vec::new(),
            replayed: 0,
        };
        guarded.refuse_if_revoked()?;
        Ok(guarded)
    }

    fn refuse_if_revoked(&mut self) -> io::Result<()> {
        if self.closed {
            return Err(io::Error::new(io::ErrorKind::PermissionDenied, "the peer's certificate is revoked"));
        }
        if let Some((who, serial)) = &self.peer
            && self.tls.is_revoked(serial)
        {
            tracing::warn!(peer = %who, %serial, "closing a connection: the peer's certificate is revoked");
            self.closed = true;
            return Err(io::Error::new(
                io::ErrorKind::PermissionDenied,
                format!("the certificate of {who} (serial {serial}) is revoked"),
            ));
        }
        Ok(())
    }

    /// Before each read or write: the files may have changed.
    fn check(&mut self) -> io::Result<()> {
        self.tls.refresh_if_due();
        let generation = self.tls.shared.generation.load(Ordering::Acquire);
        if generation != self.checked || self.closed {
            self.checked = generation;
            self.refuse_if_revoked()?;
        }
        Ok(())
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Guarded<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.check()?;
        if let Some(left) = self.replay.get(self.replayed..)
            && !left.is_empty()
        {
            let n = left.len().min(buf.remaining());
            buf.put_slice(&left[..n]);
            self.replayed += n;
            if self.replayed == self.replay.len() {
                self.replay = Vec::new();
                self.replayed = 0;
            }
            return Poll::Ready(Ok(()));
        }
        let read = Pin::new(&mut self.inner).poll_read(cx, buf);
        if let Poll::Ready(Err(e)) = &read
            && self.client_side
        {
            note_refusal_by_server(e, &self.tls.me);
        }
        read
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Guarded<S> {
    fn poll_write(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut TaskContext<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.check()?;
        Pin::new(&mut self.inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut TaskContext<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.inner).poll_shutdown(cx)
    }
}

/// The caller's certificate reaches tonic (and `identity.rs`) as from a
/// plain rustls stream.
impl<S: Connected> Connected for Guarded<S> {
    type ConnectInfo = S::ConnectInfo;

    fn connect_info(&self) -> Self::ConnectInfo {
        self.inner.connect_info()
    }
}

/// Refused certificates already logged at `warn`.
#[derive(Debug, Default)]
struct Refusals {
    seen: Mutex<HashSet<(Serial, String)>>,
}

impl Refusals {
    /// Logs that the certificate `der` of a `side` was refused with `error`.
    fn note(&self, side: &str, der: &[u8], error: &rustls::Error) {
        let who = Peer::from_der(der).map_or_else(|| "an unnamed certificate".to_owned(), |p| p.to_string());
        let serial = Serial::of_certificate(der).map_or_else(|| "unreadable".to_owned(), |s| s.to_string());
        let first = {
            let mut seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
            if seen.len() >= REFUSALS_REMEMBERED_MAX {
                seen.clear();
            }
            seen.insert((Serial::of_certificate(der).unwrap_or(Serial::from_bytes(&[])), error.to_string()))
        };
        if first {
            tracing::warn!(peer = %who, %serial, %error, "refused a {side} certificate at the TLS handshake");
        } else {
            tracing::debug!(peer = %who, %serial, %error, "refused a {side} certificate at the TLS handshake");
        }
    }
}

/// The webpki client verifier (CA, CRL), logging whom it refuses.
#[derive(Debug)]
struct LoggedClientVerifier {
    inner: Arc<dyn ClientCertVerifier>,
    refusals: Arc<Refusals>,
}

impl ClientCertVerifier for LoggedClientVerifier {
    fn offer_client_auth(&self) -> bool {
        self.inner.offer_client_auth()
    }

    fn client_auth_mandatory(&self) -> bool {
        self.inner.client_auth_mandatory()
    }

    fn root_hint_subjects(&self) -> &[DistinguishedName] {
        self.inner.root_hint_subjects()
    }

    fn verify_client_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        now: UnixTime,
    ) -> Result<ClientCertVerified, rustls::Error> {
        self.inner
            .verify_client_cert(end_entity, intermediates, now)
            .inspect_err(|e| self.refusals.note("client", end_entity, e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The webpki server verifier (CA, CRL, the name of the server meant),
/// logging whom it refuses.
#[derive(Debug)]
struct LoggedServerVerifier {
    inner: Arc<WebPkiServerVerifier>,
    refusals: Arc<Refusals>,
}

impl ServerCertVerifier for LoggedServerVerifier {
    fn verify_server_cert(
        &self,
        end_entity: &CertificateDer<'_>,
        intermediates: &[CertificateDer<'_>],
        server_name: &ServerName<'_>,
        ocsp_response: &[u8],
        now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        self.inner
            .verify_server_cert(end_entity, intermediates, server_name, ocsp_response, now)
            .inspect_err(|e| self.refusals.note("server", end_entity, e))
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls12_signature(message, cert, dss)
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        self.inner.verify_tls13_signature(message, cert, dss)
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.inner.supported_verify_schemes()
    }
}

/// The alert of the last server that refused this process's certificate
/// during a handshake, if one did (see [`refused_by_server`]).
static REFUSED_BY_SERVER: Mutex<Option<String>> = Mutex::new(None);

/// Whether a server refused this process's certificate (e.g.
/// `CertificateRevoked`): the alert it sent. In TLS 1.3 a server checks the
/// client's certificate after the client has finished its handshake, so
/// the refusal comes as the first message read, and gRPC only reports a
/// closed connection; a client process asks here why.
pub fn refused_by_server() -> Option<String> {
    REFUSED_BY_SERVER.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// Records `error`, read on a client connection, if it is a server's alert
/// about our certificate.
fn note_refusal_by_server(error: &io::Error, me: &Peer) {
    use rustls::AlertDescription as A;
    let alert = error.get_ref().and_then(|e| e.downcast_ref::<rustls::Error>());
    if let Some(rustls::Error::AlertReceived(
        alert @ (A::CertificateRevoked
        | A::BadCertificate
        | A::CertificateExpired
        | A::CertificateUnknown
        | A::UnknownCA
        | A::UnsupportedCertificate
        | A::CertificateRequired
        | A::AccessDenied),
    )) = alert
    {
        let text = format!("{alert:?}");
        let before = REFUSED_BY_SERVER.lock().unwrap_or_else(PoisonError::into_inner).replace(text.clone());
        // Said once until a server accepts us again; a command says so in
        // its error.
        if before.as_ref() == Some(&text) || me.role() == crate::PeerRole::Client {
            tracing::debug!(alert = %text, "the server refused this process's certificate");
        } else {
            tracing::warn!(alert = %text, "the server refused this process's certificate");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pki::RevokeTarget;
    use tonic_health::pb::HealthCheckRequest;
    use tonic_health::pb::health_client::HealthClient;

    /// The serial of the certificate a server presents to a new connection.
    async fn served_serial(client: &Tls, addr: SocketAddr) -> Serial {
        let tcp = TcpStream::connect(addr).await.expect("tcp");
        let name = ServerName::try_from(Peer::Gateway.server_dns_name()).expect("name");
        let stream = tokio_rustls::TlsConnector::from(client.fresh().client.clone())
            .connect(name, tcp)
            .await
            .expect("handshake");
        let der = stream.get_ref().1.peer_certificates().and_then(|c| c.first()).expect("cert").to_vec();
        Serial::of_certificate(&der).expect("serial")
    }

    async fn healthy(channel: &Channel) -> bool {
        HealthClient::new(channel.clone()).check(HealthCheckRequest { service: String::new() }).await.is_ok()
    }

    #[tokio::test]
    async fn renewal_reaches_new_connections_and_revocation_cuts_established_ones() {
        let dir = std::env::temp_dir().join(format!("strife-tls-reload-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let certs = CertDir::new(&dir);
        let client = Peer::Client("client".into());
        certs.init(&[Peer::Gateway, client.clone()]).expect("certs");
        let server_tls = Tls::load(&certs, &Peer::Gateway).expect("server tls");
        let (listener, addr) = crate::serve::bind("127.0.0.1:0").await.expect("bind");
        let (_reporter, health) = tonic_health::server::health_reporter();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let server = tokio::spawn(crate::serve::builder().add_service(health).serve_with_incoming_shutdown(
            crate::serve::incoming(listener, &server_tls),
            async {
                let _ = stopped.await;
            },
        ));
        let client_tls = Tls::load(&certs, &client).expect("client tls");
        let established =
            client_tls.endpoint(&Peer::Gateway, &addr.to_string()).expect("endpoint").connect().await;
        let established = established.expect("connect");
        assert!(healthy(&established).await);
        let first = served_serial(&client_tls, addr).await;
        assert_eq!(first, server_tls.serial());

        // Renewed: new connections get the new certificate; the established one goes on.
        let renewed = certs.issue(&Peer::Gateway).expect("renew").serial;
        assert_eq!(served_serial(&client_tls, addr).await, renewed);
        assert!(healthy(&established).await, "the established connection goes on");

        // Revoked: a new connection is refused (the server looks at its
        // files for each one), and then the established one is cut at its
        // next message (the files were loaded again).
        certs.revoke(&RevokeTarget::Identity(client.clone())).expect("revoke");
        let other = Tls::load(&CertDir::new(&dir), &client).expect("tls");
        let refused = other.endpoint(&Peer::Gateway, &addr.to_string()).expect("endpoint").connect().await;
        assert!(refused.is_err(), "a new connection with a revoked certificate is refused");
        assert_eq!(refused_by_server().as_deref(), Some("CertificateRevoked"));
        assert!(!healthy(&established).await, "the established connection is cut");

        let _ = stop.send(());
        let _ = server.await;
        let _ = std::fs::remove_dir_all(dir);
    }
}
