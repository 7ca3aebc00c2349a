//! Who is on the other end of a connection, read from its certificate.
//!
//! Every certificate Strife issues names exactly one identity in a URI SAN:
//! `strife://gateway`, `strife://bank/<name>` or `strife://client/<name>`.
//! The TLS layer has already checked the chain to our CA; this module only
//! reads the name, and [`require`] is the one check every server uses.

use crate::errors;
use std::collections::HashMap;
use std::fmt;
use std::sync::{Mutex, OnceLock};
use strife_proto::gateway::v1::ErrorReason;
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tonic::{Code, Status};
use x509_parser::prelude::{FromDer, GeneralName, X509Certificate};

const URI_PREFIX: &str = "strife://";
/// Most certificates remembered by [`Peer::from_extensions`].
const PEER_CACHE_MAX: usize = 1024;
/// Certificates (DER) already read, and whom they name.
type PeerCache = Mutex<HashMap<Box<[u8]>, Option<Peer>>>;
static PEER_CACHE: OnceLock<PeerCache> = OnceLock::new();

/// The identity a certificate proves.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Peer {
    Gateway,
    Bank(String),
    Client(String),
}

/// The kind of a peer, for authorization rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerRole {
    Gateway,
    Bank,
    Client,
}

impl Peer {
    pub fn role(&self) -> PeerRole {
        match self {
            Peer::Gateway => PeerRole::Gateway,
            Peer::Bank(_) => PeerRole::Bank,
            Peer::Client(_) => PeerRole::Client,
        }
    }

    /// The URI SAN that names this identity in its certificate.
    pub fn uri(&self) -> String {
        match self {
            Peer::Gateway => format!("{URI_PREFIX}gateway"),
            Peer::Bank(name) => format!("{URI_PREFIX}bank/{name}"),
            Peer::Client(name) => format!("{URI_PREFIX}client/{name}"),
        }
    }

    /// The DNS name a server with this identity is verified against, so
    /// that a client checks it reached the server it meant to.
    pub fn server_dns_name(&self) -> String {
        match self {
            Peer::Gateway => "gateway.strife".to_owned(),
            Peer::Bank(name) => format!("{}.bank.strife", name.to_ascii_lowercase()),
            Peer::Client(name) => format!("{}.client.strife", name.to_ascii_lowercase()),
        }
    }

    fn from_uri(uri: &str) -> Option<Peer> {
        let rest = uri.strip_prefix(URI_PREFIX)?;
        match rest.split_once('/') {
            None if rest == "gateway" => Some(Peer::Gateway),
            Some(("bank", name)) if strife_core::validate_bank_name(name).is_ok() => {
                Some(Peer::Bank(name.to_owned()))
            }
            Some(("client", name)) if strife_core::validate_user_name(name).is_ok() => {
                Some(Peer::Client(name.to_owned()))
            }
            _ => None,
        }
    }

    /// Reads the identity from a DER certificate; `None` when it names none.
    pub fn from_der(der: &[u8]) -> Option<Peer> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        let san = cert.subject_alternative_name().ok()??;
        let mut found = san.value.general_names.iter().filter_map(|n| match n {
            GeneralName::URI(uri) => Peer::from_uri(uri),
            _ => None,
        });
        let peer = found.next()?;
        // A certificate that names two identities proves neither.
        found.next().is_none().then_some(peer)
    }

    /// The identity of the caller of a request, from the TLS connection.
    /// Certificates already read are remembered (the chain was verified by
    /// TLS; only the parsing is saved), so a call costs a lookup.
    pub fn from_extensions(ext: &http::Extensions) -> Option<Peer> {
        if let Some(peer) = ext.get::<Peer>() {
            return Some(peer.clone());
        }
        let certs = ext.get::<TlsConnectInfo<TcpConnectInfo>>()?.peer_certs()?;
        let der: &[u8] = certs.first()?;
        let cache = PEER_CACHE.get_or_init(|| Mutex::new(HashMap::new()));
        if let Some(hit) = cache.lock().ok()?.get(der) {
            return hit.clone();
        }
        let peer = Peer::from_der(der);
        if let Ok(mut map) = cache.lock() {
            if map.len() >= PEER_CACHE_MAX {
                map.clear();
            }
            map.insert(der.into(), peer.clone());
        }
        peer
    }
}

impl fmt::Display for Peer {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Peer::Gateway => f.write_str("gateway"),
            Peer::Bank(name) => write!(f, "bank:{name}"),
            Peer::Client(name) => write!(f, "client:{name}"),
        }
    }
}

/// The caller's identity if its role is one of `allowed`, else
/// PERMISSION_DENIED (UNAUTHENTICATED when the certificate names nobody).
pub fn require<T>(req: &tonic::Request<T>, allowed: &[PeerRole]) -> Result<Peer, Status> {
    let peer = Peer::from_extensions(req.extensions()).ok_or_else(|| {
        errors::status(
            Code::Unauthenticated,
            ErrorReason::WrongCertificate,
            "the client certificate names no Strife identity",
        )
    })?;
    if allowed.contains(&peer.role()) {
        Ok(peer)
    } else {
        Err(errors::status(
            Code::PermissionDenied,
            ErrorReason::WrongCertificate,
            format!("{peer} may not call this service"),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uris_round_trip() {
        for p in [Peer::Gateway, Peer::Bank("BankA".into()), Peer::Client("client".into())] {
            assert_eq!(Peer::from_uri(&p.uri()), Some(p));
        }
        assert_eq!(Peer::from_uri("strife://bank/"), None);
        assert_eq!(Peer::from_uri("strife://bank/a/b"), None);
        assert_eq!(Peer::from_uri("https://gateway"), None);
        assert_eq!(Peer::from_uri("strife://root"), None);
    }
}
