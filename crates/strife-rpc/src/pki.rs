//! Strife's private PKI: one CA and a certificate per identity, made with
//! rcgen. Files live in `DIR/certs`: `ca.pem` (+ `ca.key`), and
//! `NAME.pem` + `NAME.key` for `gateway`, `client` and each bank.

use crate::identity::Peer;
use anyhow::{Context, bail};
use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose, SanType,
};
use std::fs;
use std::io::Write;
use std::net::{IpAddr, Ipv4Addr};
use std::path::{Path, PathBuf};
use time::{Duration, OffsetDateTime};

/// How long the CA is valid.
const CA_VALIDITY_DAYS: i64 = 3650;
/// How long an identity's certificate is valid.
const LEAF_VALIDITY_DAYS: i64 = 825;
/// Names that cannot be banks because their files are taken.
const RESERVED_NAMES: [&str; 3] = ["ca", "gateway", "client"];

/// Where the PKI of a Strife directory lives.
#[derive(Debug, Clone)]
pub struct CertDir {
    pub path: PathBuf,
}

/// The PEM files of one identity.
#[derive(Debug, Clone)]
pub struct IdentityFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl CertDir {
    pub fn new(strife_dir: &Path) -> CertDir {
        CertDir { path: strife_dir.join("certs") }
    }

    pub fn ca_cert(&self) -> PathBuf {
        self.path.join("ca.pem")
    }

    fn ca_key(&self) -> PathBuf {
        self.path.join("ca.key")
    }

    pub fn file_stem(peer: &Peer) -> String {
        match peer {
            Peer::Gateway => "gateway".to_owned(),
            Peer::Bank(name) => name.clone(),
            Peer::Client(name) => name.clone(),
        }
    }

    pub fn identity(&self, peer: &Peer) -> IdentityFiles {
        let stem = Self::file_stem(peer);
        IdentityFiles {
            cert: self.path.join(format!("{stem}.pem")),
            key: self.path.join(format!("{stem}.key")),
        }
    }

    pub fn exists(&self) -> bool {
        self.ca_cert().exists() && self.ca_key().exists()
    }

    /// Creates the CA if missing, then every identity in `peers` that is
    /// missing. Existing files are never overwritten.
    pub fn init(&self, peers: &[Peer]) -> anyhow::Result<Vec<Peer>> {
        crate::files::create_private_dir_all(&self.path)
            .with_context(|| format!("creating {}", self.path.display()))?;
        if !self.exists() {
            let key = KeyPair::generate()?;
            let mut params = CertificateParams::new(Vec::<String>::new())?;
            params.distinguished_name.push(DnType::CommonName, "Strife CA");
            params.distinguished_name.push(DnType::OrganizationName, "Strife");
            params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
            params.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
            let now = OffsetDateTime::now_utc();
            params.not_before = now - Duration::days(1);
            params.not_after = now + Duration::days(CA_VALIDITY_DAYS);
            let cert = params.self_signed(&key)?;
            write_private(&self.ca_key(), &key.serialize_pem())?;
            write_public_file(&self.ca_cert(), &cert.pem())?;
        }
        let mut created = Vec::new();
        for peer in peers {
            let files = self.identity(peer);
            if files.cert.exists() && files.key.exists() {
                continue;
            }
            self.issue(peer)?;
            created.push(peer.clone());
        }
        Ok(created)
    }

    /// Issues (or re-issues) the certificate of one identity, signed by the CA.
    pub fn issue(&self, peer: &Peer) -> anyhow::Result<IdentityFiles> {
        if let Peer::Bank(name) = peer
            && RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(name))
        {
            bail!("'{name}' cannot be a bank name: it is reserved");
        }
        let ca_key_pem = fs::read_to_string(self.ca_key())
            .with_context(|| format!("reading the CA key {}", self.ca_key().display()))?;
        let ca_cert_pem = fs::read_to_string(self.ca_cert())
            .with_context(|| format!("reading the CA certificate {}", self.ca_cert().display()))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)?;

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, CertDir::file_stem(peer));
        params.distinguished_name.push(DnType::OrganizationName, "Strife");
        params.subject_alt_names.push(SanType::URI(peer.uri().try_into()?));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        if matches!(peer, Peer::Gateway | Peer::Bank(_)) {
            params.subject_alt_names.push(SanType::DnsName(peer.server_dns_name().try_into()?));
            params.subject_alt_names.push(SanType::DnsName("localhost".try_into()?));
            params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
            params.extended_key_usages.push(ExtendedKeyUsagePurpose::ServerAuth);
        }
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        let files = self.identity(peer);
        write_private(&files.key, &key.serialize_pem())?;
        write_public_file(&files.cert, &cert.pem())?;
        Ok(files)
    }
}

/// Writes a non-secret file atomically (temp file, sync, rename).
pub fn write_public_file(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, 0o644)
}

/// Writes a secret with mode 0600 from the start (never readable by others,
/// not even for a moment), then syncs it.
pub fn write_private(path: &Path, text: &str) -> anyhow::Result<()> {
    write_file(path, text, 0o600)
}

fn write_file(path: &Path, text: &str, mode: u32) -> anyhow::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // A temporary name of this write alone: several processes may write one
    // file at once (each gateway of `up` writes `gateway.addr`), and the
    // last rename wins whole.
    static WRITES: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    let n = WRITES.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = path.with_file_name(format!(".{name}.{}.{n}.tmp", std::process::id()));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(mode)
        .open(&tmp)
        .with_context(|| format!("writing {}", tmp.display()))?;
    f.write_all(text.as_bytes())?;
    f.sync_all()?;
    if let Err(e) = fs::rename(&tmp, path) {
        let _ = fs::remove_file(&tmp);
        return Err(e).with_context(|| format!("writing {}", path.display()));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn issues_identities_that_name_themselves() {
        let dir = std::env::temp_dir().join(format!("strife-pki-{}", std::process::id()));
        let certs = CertDir::new(&dir);
        let peers = [Peer::Gateway, Peer::Bank("BankA".into()), Peer::Client("client".into())];
        let created = certs.init(&peers).expect("init");
        assert_eq!(created.len(), 3);
        assert!(certs.init(&peers).expect("again").is_empty(), "init never overwrites");
        for peer in &peers {
            let pem = fs::read_to_string(certs.identity(peer).cert).expect("cert");
            let der = x509_parser::pem::parse_x509_pem(pem.as_bytes()).expect("pem").1.contents;
            assert_eq!(Peer::from_der(&der).as_ref(), Some(peer));
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(certs.identity(peer).key).expect("key").permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(certs.issue(&Peer::Bank("gateway".into())).is_err());
        let _ = fs::remove_dir_all(dir);
    }

    #[test]
    fn writers_of_one_file_at_once_all_succeed_and_one_wins_whole() {
        let dir = std::env::temp_dir().join(format!("strife-pki-writes-{}", std::process::id()));
        fs::create_dir_all(&dir).expect("dir");
        let file = dir.join("gateway.addr");
        let texts: Vec<String> = (0..8).map(|i| format!("127.0.0.1:{}\n", 5000 + i)).collect();
        std::thread::scope(|s| {
            for text in &texts {
                let file = &file;
                s.spawn(move || {
                    for _ in 0..50 {
                        write_public_file(file, text).expect("every write succeeds");
                    }
                });
            }
        });
        let written = fs::read_to_string(&file).expect("read");
        assert!(texts.contains(&written), "{written:?}");
        let left: Vec<_> =
            fs::read_dir(&dir).expect("dir").filter_map(Result::ok).map(|e| e.file_name()).collect();
        assert_eq!(left.len(), 1, "no temporary file is left: {left:?}");
        let _ = fs::remove_dir_all(dir);
    }
}
