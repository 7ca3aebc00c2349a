//! Mutual TLS (rustls, through tonic) for every link. A process loads its
//! own identity once, checked, and builds server and client configs from it.

use crate::identity::Peer;
use crate::pki::CertDir;
use anyhow::{Context, bail};
use std::fs;
use std::net::SocketAddr;
use std::time::Duration;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint, Identity, ServerTlsConfig};
use x509_parser::prelude::{FromDer, X509Certificate};

/// How long to wait for a TCP + TLS connection to come up.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(3);

/// One process's TLS material: the CA it trusts and the identity it proves.
#[derive(Clone)]
pub struct Tls {
    /// Who this process is; checked against its own certificate on load.
    pub me: Peer,
    ca: Certificate,
    identity: Identity,
}

impl Tls {
    /// Loads `me`'s certificate and key from `certs`, refusing a certificate
    /// that is expired, not yet valid, or names another identity.
    pub fn load(certs: &CertDir, me: &Peer) -> anyhow::Result<Tls> {
        let files = certs.identity(me);
        let ca_pem = fs::read(certs.ca_cert())
            .with_context(|| format!("reading the CA certificate {}", certs.ca_cert().display()))?;
        let cert_pem =
            fs::read(&files.cert).with_context(|| format!("reading certificate {}", files.cert.display()))?;
        let key_pem = fs::read(&files.key).with_context(|| format!("reading key {}", files.key.display()))?;
        check_certificate(&cert_pem, me).with_context(|| format!("certificate {}", files.cert.display()))?;
        Ok(Tls {
            me: me.clone(),
            ca: Certificate::from_pem(ca_pem),
            identity: Identity::from_pem(cert_pem, key_pem),
        })
    }

    /// Server side: present our identity, require a client certificate
    /// signed by our CA.
    pub fn server(&self) -> ServerTlsConfig {
        ServerTlsConfig::new().identity(self.identity.clone()).client_ca_root(self.ca.clone())
    }

    /// Client side: present our identity, and accept only a server whose
    /// certificate proves it is `server`.
    pub fn client_for(&self, server: &Peer) -> ClientTlsConfig {
        ClientTlsConfig::new()
            .ca_certificate(self.ca.clone())
            .identity(self.identity.clone())
            .domain_name(server.server_dns_name())
    }

    /// A channel to `server` at `addr`. It connects on first use and
    /// reconnects by itself after a failure.
    pub fn channel(&self, server: &Peer, addr: &str) -> anyhow::Result<Channel> {
        Ok(self.endpoint(server, addr)?.connect_lazy())
    }

    pub fn endpoint(&self, server: &Peer, addr: &str) -> anyhow::Result<Endpoint> {
        let sock: SocketAddr =
            addr.parse().with_context(|| format!("'{addr}' is not a host:port address"))?;
        Ok(Endpoint::from_shared(format!("https://{sock}"))?
            .tls_config(self.client_for(server))?
            .connect_timeout(CONNECT_TIMEOUT)
            .tcp_nodelay(true)
            .http2_keep_alive_interval(Duration::from_secs(10))
            .keep_alive_while_idle(true))
    }
}

/// Checks one PEM certificate: it names `me` and is valid now.
fn check_certificate(pem: &[u8], me: &Peer) -> anyhow::Result<()> {
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
    Ok(())
}
