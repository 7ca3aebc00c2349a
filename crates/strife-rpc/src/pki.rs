//! Strife's private PKI: one CA and a certificate per identity, made with
//! rcgen. Files live in `DIR/certs`: `ca.pem` (+ `ca.key`), and
//! `NAME.pem` + `NAME.key` for `gateway`, `client` and each bank; the
//! index of issued certificates (`issued.json`) and the CRL (`crl.pem`)
//! that [`CertDir::revoke`] writes (see [`crate::revocation`]).

use crate::identity::Peer;
use crate::revocation::{self, CRL_FILE, ISSUED_FILE, IssuedEntry, Revoked, Serial};
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
/// Names that cannot be banks: their files are taken (`ca`, `gateway`,
/// `client`, `etcd`), or, as the common name etcd takes for a user name,
/// they would be another identity's etcd user (`gateway`, `client`, `root`).
const RESERVED_NAMES: [&str; 5] = ["ca", "gateway", "client", "etcd", "root"];
/// The file stem of the private etcd server's certificate.
const ETCD_SERVER_STEM: &str = "etcd";
/// The DNS name the private etcd server's certificate proves, which clients
/// verify (as a Strife server's identity name).
pub const ETCD_SERVER_DNS_NAME: &str = "etcd.strife";

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

/// A certificate just issued.
#[derive(Debug, Clone)]
pub struct Issued {
    pub files: IdentityFiles,
    pub serial: Serial,
}

/// What to revoke: every certificate issued to an identity, or one serial.
#[derive(Debug, Clone)]
pub enum RevokeTarget {
    Identity(Peer),
    Serial(Serial),
}

/// One certificate in the CRL, for the reply of a revocation.
#[derive(Debug, Clone)]
pub struct RevokedCertificate {
    pub serial: Serial,
    /// Whom it named, if the index knows the serial.
    pub identity: Option<String>,
    pub revoked_at: OffsetDateTime,
}

/// What a revocation did.
#[derive(Debug, Clone)]
pub struct Revocation {
    /// Revoked by this call.
    pub revoked: Vec<RevokedCertificate>,
    /// Named by this call but revoked before.
    pub already: Vec<RevokedCertificate>,
    /// The CRL file.
    pub crl: PathBuf,
    /// The CRL's number (each CRL written has a higher one).
    pub crl_number: u64,
    /// How many certificates the CRL lists in all.
    pub total: usize,
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

    /// The CRL: servers and clients refuse the certificates it lists.
    pub fn crl(&self) -> PathBuf {
        self.path.join(CRL_FILE)
    }

    /// The index of every certificate issued here.
    pub fn issued_index(&self) -> PathBuf {
        self.path.join(ISSUED_FILE)
    }

    /// Takes the PKI's lock (a `flock` on `DIR/certs/.lock`), so that two
    /// `strife certs` commands do not lose each other's index entries or
    /// revocations. Released when the value is dropped.
    fn lock(&self) -> anyhow::Result<nix::fcntl::Flock<fs::File>> {
        let path = self.path.join(".lock");
        use std::os::unix::fs::OpenOptionsExt;
        let file = fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .mode(crate::files::FILE_MODE)
            .open(&path)
            .with_context(|| format!("opening {}", path.display()))?;
        nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockExclusive)
            .map_err(|(_, e)| anyhow::anyhow!("locking {}: {e}", path.display()))
    }

    fn ca_issuer(&self) -> anyhow::Result<Issuer<'static, KeyPair>> {
        let ca_key_pem = fs::read_to_string(self.ca_key())
            .with_context(|| format!("reading the CA key {}", self.ca_key().display()))?;
        let ca_cert_pem = fs::read_to_string(self.ca_cert())
            .with_context(|| format!("reading the CA certificate {}", self.ca_cert().display()))?;
        let ca_key = KeyPair::from_pem(&ca_key_pem)?;
        Ok(Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)?)
    }

    pub fn file_stem(peer: &Peer) -> String {
        match peer {
            Peer::Gateway => "gateway".to_owned(),
            Peer::Bank(name) => name.clone(),
            Peer::Client(name) => name.clone(),
        }
    }

    /// The common name of `peer`'s certificate, which etcd (with client
    /// certificate authentication) takes as the user name: `gateway`, the
    /// bank's name (never a reserved name), and `client` for every client,
    /// so that no client can be taken for a bank or the gateway there.
    pub fn common_name(peer: &Peer) -> String {
        match peer {
            Peer::Gateway => "gateway".to_owned(),
            Peer::Bank(name) => name.clone(),
            Peer::Client(_) => "client".to_owned(),
        }
    }

    /// The private etcd server's certificate and key (`strife up --etcd
    /// auto`).
    pub fn etcd_server(&self) -> IdentityFiles {
        IdentityFiles {
            cert: self.path.join(format!("{ETCD_SERVER_STEM}.pem")),
            key: self.path.join(format!("{ETCD_SERVER_STEM}.key")),
        }
    }

    /// Issues the private etcd server's certificate (unless it exists): a
    /// server on 127.0.0.1 proving [`ETCD_SERVER_DNS_NAME`], also a client
    /// of itself (etcd's members talk over mutual TLS). It names no Strife
    /// identity, so no Strife server accepts it.
    pub fn issue_etcd_server(&self) -> anyhow::Result<IdentityFiles> {
        let files = self.etcd_server();
        if files.cert.exists() && files.key.exists() {
            return Ok(files);
        }
        let _lock = self.lock()?;
        let issuer = self.ca_issuer()?;
        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, ETCD_SERVER_STEM);
        params.distinguished_name.push(DnType::OrganizationName, "Strife");
        params.subject_alt_names.push(SanType::DnsName(ETCD_SERVER_DNS_NAME.try_into()?));
        params.subject_alt_names.push(SanType::DnsName("localhost".try_into()?));
        params.subject_alt_names.push(SanType::IpAddress(IpAddr::V4(Ipv4Addr::LOCALHOST)));
        params.key_usages = vec![KeyUsagePurpose::DigitalSignature, KeyUsagePurpose::KeyEncipherment];
        params.extended_key_usages =
            vec![ExtendedKeyUsagePurpose::ServerAuth, ExtendedKeyUsagePurpose::ClientAuth];
        let now = OffsetDateTime::now_utc();
        params.not_before = now - Duration::days(1);
        params.not_after = now + Duration::days(LEAF_VALIDITY_DAYS);
        params.use_authority_key_identifier_extension = true;
        let cert = params.signed_by(&key, &issuer)?;
        write_private(&files.key, &key.serialize_pem())?;
        write_public_file(&files.cert, &cert.pem())?;
        Ok(files)
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
            // A CRL or index left from an earlier CA belongs to it: with it,
            // no certificate of the new CA could be checked.
            for stale in [self.crl(), self.issued_index()] {
                match fs::remove_file(&stale) {
                    Ok(()) => tracing::info!(file = %stale.display(), "removed a file of the previous CA"),
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(e) => return Err(e).with_context(|| format!("removing {}", stale.display())),
                }
            }
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

    /// Issues (or re-issues) the certificate of one identity, signed by the
    /// CA, and adds it to the index. Running processes of that identity
    /// serve the new one from their next connection on (see
    /// [`crate::tls::Tls`]).
    pub fn issue(&self, peer: &Peer) -> anyhow::Result<Issued> {
        if let Peer::Bank(name) = peer
            && RESERVED_NAMES.iter().any(|r| r.eq_ignore_ascii_case(name))
        {
            bail!("'{name}' cannot be a bank name: it is reserved");
        }
        let _lock = self.lock()?;
        let issuer = self.ca_issuer()?;

        let key = KeyPair::generate()?;
        let mut params = CertificateParams::new(Vec::<String>::new())?;
        params.distinguished_name.push(DnType::CommonName, CertDir::common_name(peer));
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
        let serial = Serial::of_certificate(cert.der()).context("reading back the new certificate")?;
        // In the index before the files: a certificate that exists is
        // always one that `revoke --bank/--client` finds.
        revocation::append_index(
            &self.issued_index(),
            IssuedEntry { serial: serial.to_string(), identity: peer.to_string(), issued_at: rfc3339(now) },
        )?;
        let files = self.identity(peer);
        write_private(&files.key, &key.serialize_pem())?;
        write_public_file(&files.cert, &cert.pem())?;
        Ok(Issued { files, serial })
    }

    /// The serial of `peer`'s certificate file, if it has one.
    pub fn current_serial(&self, peer: &Peer) -> Option<Serial> {
        let pem = fs::read(self.identity(peer).cert).ok()?;
        let (_, pem) = x509_parser::pem::parse_x509_pem(&pem).ok()?;
        Serial::of_certificate(&pem.contents)
    }

    /// Revokes `target`: every certificate the index (or the identity's
    /// file) says was issued to it, or one serial; writes the CRL again,
    /// signed by the CA, with what it listed before and a higher number.
    /// Revoking what is already revoked changes nothing.
    pub fn revoke(&self, target: &RevokeTarget) -> anyhow::Result<Revocation> {
        if !self.exists() {
            bail!("no CA in {}: run `strife certs init` first", self.path.display());
        }
        let _lock = self.lock()?;
        let index = revocation::read_index(&self.issued_index())?;
        let identity_of = |serial: &Serial| {
            let text = serial.to_string();
            index.iter().find(|e| e.serial == text).map(|e| e.identity.clone())
        };
        let serials: Vec<Serial> = match target {
            RevokeTarget::Serial(serial) => vec![serial.clone()],
            RevokeTarget::Identity(peer) => {
                let name = peer.to_string();
                let mut serials: Vec<Serial> = index
                    .iter()
                    .filter(|e| e.identity == name)
                    .filter_map(|e| e.serial.parse().ok())
                    .collect();
                // A PKI made before the index existed: its current file.
                serials.extend(self.current_serial(peer));
                serials.sort();
                serials.dedup();
                if serials.is_empty() {
                    bail!("no certificate was issued to {peer} in {}", self.path.display());
                }
                serials
            }
        };
        let crl = revocation::read_crl(&self.crl())?;
        let (number, mut listed) = crl.map_or((0, Vec::new()), |c| (c.number, c.revoked));
        let now = OffsetDateTime::now_utc();
        let (mut revoked, mut already) = (Vec::new(), Vec::new());
        for serial in serials {
            match listed.iter().find(|r| r.serial == serial) {
                Some(before) => already.push(RevokedCertificate {
                    identity: identity_of(&serial),
                    serial,
                    revoked_at: before.revoked_at,
                }),
                None => revoked.push(RevokedCertificate {
                    identity: identity_of(&serial),
                    serial,
                    revoked_at: now,
                }),
            }
        }
        let mut crl_number = number;
        if !revoked.is_empty() {
            listed.extend(
                revoked.iter().map(|r| Revoked { serial: r.serial.clone(), revoked_at: r.revoked_at }),
            );
            crl_number = number + 1;
            revocation::write_crl(&self.crl(), &self.ca_issuer()?, crl_number, &listed)?;
        }
        Ok(Revocation { revoked, already, crl: self.crl(), crl_number, total: listed.len() })
    }
}

/// RFC 3339, to the second.
pub fn rfc3339(t: OffsetDateTime) -> String {
    t.replace_nanosecond(0)
        .unwrap_or(t)
        .format(&time::format_description::well_known::Rfc3339)
        .unwrap_or_default()
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
    fn revocations_cover_every_certificate_of_a_name_and_accumulate() {
        let dir = std::env::temp_dir().join(format!("strife-pki-revoke-{}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        let certs = CertDir::new(&dir);
        let bank = Peer::Bank("BankA".into());
        certs.init(&[Peer::Gateway, bank.clone(), Peer::Client("client".into())]).expect("init");
        let first = certs.current_serial(&bank).expect("serial");
        let renewed = certs.issue(&bank).expect("renew").serial;
        assert_ne!(first, renewed);
        assert_eq!(certs.current_serial(&bank), Some(renewed.clone()));

        let done = certs.revoke(&RevokeTarget::Identity(bank.clone())).expect("revoke");
        let mut serials: Vec<Serial> = done.revoked.iter().map(|r| r.serial.clone()).collect();
        serials.sort();
        let mut expected = vec![first, renewed];
        expected.sort();
        assert_eq!(serials, expected, "every certificate ever issued to the name");
        assert!(done.revoked.iter().all(|r| r.identity.as_deref() == Some("bank:BankA")));
        assert_eq!((done.crl_number, done.total), (1, 2));

        let again = certs.revoke(&RevokeTarget::Identity(bank.clone())).expect("again");
        assert!(again.revoked.is_empty());
        assert_eq!((again.already.len(), again.crl_number, again.total), (2, 1, 2), "nothing rewritten");

        let gateway = certs.current_serial(&Peer::Gateway).expect("gateway");
        let unknown: Serial = "0badc0de".parse().expect("serial");
        let more = certs.revoke(&RevokeTarget::Serial(gateway.clone())).expect("by serial");
        assert_eq!(more.revoked[0].identity.as_deref(), Some("gateway"));
        let last = certs.revoke(&RevokeTarget::Serial(unknown.clone())).expect("unknown serial");
        assert_eq!(last.revoked[0].identity, None);
        assert_eq!((last.crl_number, last.total), (3, 4), "revocations accumulate");

        let crl = revocation::read_crl(&certs.crl()).expect("read").expect("crl");
        let listed: Vec<Serial> = crl.revoked.iter().map(|r| r.serial.clone()).collect();
        assert!(listed.contains(&gateway) && listed.contains(&unknown) && listed.len() == 4);
        assert!(certs.revoke(&RevokeTarget::Identity(Peer::Bank("BankZ".into()))).is_err(), "never issued");

        // A new CA starts with no CRL: the old one could check none of its certificates.
        fs::remove_file(certs.ca_cert()).expect("rm");
        certs.init(&[]).expect("new CA");
        assert!(!certs.crl().exists() && !certs.issued_index().exists());
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
