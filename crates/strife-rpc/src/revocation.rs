//! Revocation: serial numbers, the index of every certificate the CA has
//! issued (`DIR/certs/issued.json`), and the certificate revocation list
//! (`DIR/certs/crl.pem`), signed by the CA. The CRL is the record of what
//! is revoked: each revocation reads it, adds to it and writes it whole,
//! with a higher CRL number, so revocations accumulate.

use anyhow::{Context, bail};
use rcgen::{CertificateRevocationListParams, Issuer, KeyIdMethod, RevokedCertParams, SigningKey};
use serde::{Deserialize, Serialize};
use std::fmt;
use std::path::Path;
use std::str::FromStr;
use time::OffsetDateTime;
use x509_parser::prelude::{FromDer, X509Certificate};

/// The CRL's file name in `DIR/certs`.
pub const CRL_FILE: &str = "crl.pem";
/// The index of issued certificates in `DIR/certs`.
pub const ISSUED_FILE: &str = "issued.json";
/// The longest serial number RFC 5280 allows, in bytes.
pub const SERIAL_BYTES_MAX: usize = 20;
/// How long a CRL says it is current. Servers do not enforce it (the file
/// is read again whenever it changes), but X.509 requires a next update.
const CRL_VALIDITY_DAYS: i64 = 825;

/// A certificate's serial number: big-endian bytes without leading zeros,
/// written in lower-case hex (as `openssl x509 -serial` shows it, but
/// lower-case).
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Serial(Vec<u8>);

impl Serial {
    /// From the bytes of a DER INTEGER (a leading zero byte is dropped).
    pub fn from_bytes(raw: &[u8]) -> Serial {
        let start = raw.iter().position(|b| *b != 0).unwrap_or(raw.len().saturating_sub(1));
        Serial(raw.get(start..).unwrap_or_default().to_vec())
    }

    /// The serial of a DER certificate; `None` if it does not parse.
    pub fn of_certificate(der: &[u8]) -> Option<Serial> {
        let (_, cert) = X509Certificate::from_der(der).ok()?;
        Some(Serial::from_bytes(cert.raw_serial()))
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Display for Serial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            return f.write_str("0");
        }
        self.0.iter().try_for_each(|b| write!(f, "{b:02x}"))
    }
}

impl FromStr for Serial {
    type Err = anyhow::Error;

    /// Hex, with or without `0x` and `:` between bytes, any case.
    fn from_str(text: &str) -> anyhow::Result<Serial> {
        let digits: String = text.trim().trim_start_matches("0x").chars().filter(|c| *c != ':').collect();
        if digits.is_empty() || !digits.chars().all(|c| c.is_ascii_hexdigit()) {
            bail!("'{text}' is not a serial number (hex digits, as `strife certs issue` prints it)");
        }
        let padded = if digits.len() % 2 == 1 { format!("0{digits}") } else { digits };
        let bytes = (0..padded.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&padded[i..i + 2], 16))
            .collect::<Result<Vec<u8>, _>>()?;
        let serial = Serial::from_bytes(&bytes);
        if serial.0.len() > SERIAL_BYTES_MAX {
            bail!("'{text}' is longer than a serial number ({SERIAL_BYTES_MAX} bytes)");
        }
        Ok(serial)
    }
}

/// One certificate the CA issued.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct IssuedEntry {
    /// Its serial, as [`Serial`] writes it.
    pub serial: String,
    /// Whom it names, as [`crate::Peer`] shows it (`gateway`, `bank:BankA`, `client:client`).
    pub identity: String,
    /// When it was issued (RFC 3339).
    pub issued_at: String,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct IssuedIndex {
    certificates: Vec<IssuedEntry>,
}

/// Every certificate in the index at `path` (none if there is no file).
pub fn read_index(path: &Path) -> anyhow::Result<Vec<IssuedEntry>> {
    match std::fs::read(path) {
        Ok(bytes) => {
            let index: IssuedIndex =
                serde_json::from_slice(&bytes).with_context(|| format!("reading {}", path.display()))?;
            Ok(index.certificates)
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
        Err(e) => Err(e).with_context(|| format!("reading {}", path.display())),
    }
}

/// Adds `entry` to the index at `path` (the caller holds the PKI lock).
pub fn append_index(path: &Path, entry: IssuedEntry) -> anyhow::Result<()> {
    let mut certificates = read_index(path)?;
    certificates.push(entry);
    let text = serde_json::to_string_pretty(&IssuedIndex { certificates })?;
    crate::pki::write_public_file(path, &format!("{text}\n"))
}

/// One revoked certificate.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Revoked {
    pub serial: Serial,
    pub revoked_at: OffsetDateTime,
}

/// A CRL as read from its file.
#[derive(Debug, Clone)]
pub struct CrlFile {
    /// Its CRL number: each new CRL has a higher one.
    pub number: u64,
    pub revoked: Vec<Revoked>,
    /// The CRL itself (DER), for the TLS verifiers.
    pub der: Vec<u8>,
}

/// Reads the CRL at `path`; `None` if there is none.
pub fn read_crl(path: &Path) -> anyhow::Result<Option<CrlFile>> {
    let pem = match std::fs::read(path) {
        Ok(pem) => pem,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let (_, pem) = x509_parser::pem::parse_x509_pem(&pem)
        .map_err(|e| anyhow::anyhow!("{}: not a PEM file: {e}", path.display()))?;
    let (_, crl) = x509_parser::parse_x509_crl(&pem.contents)
        .map_err(|e| anyhow::anyhow!("{}: not a CRL: {e}", path.display()))?;
    let number = crl.crl_number().and_then(|n| u64::try_from(n).ok()).unwrap_or(0);
    let revoked = crl
        .iter_revoked_certificates()
        .map(|r| {
            let revoked_at = OffsetDateTime::from_unix_timestamp(r.revocation_date.timestamp())
                .unwrap_or(OffsetDateTime::UNIX_EPOCH);
            Revoked { serial: Serial::from_bytes(r.raw_serial()), revoked_at }
        })
        .collect();
    Ok(Some(CrlFile { number, revoked, der: pem.contents.clone() }))
}

/// Writes a CRL numbered `number` that lists `revoked`, signed by `issuer`.
pub fn write_crl(
    path: &Path,
    issuer: &Issuer<'_, impl SigningKey>,
    number: u64,
    revoked: &[Revoked],
) -> anyhow::Result<()> {
    let now = OffsetDateTime::now_utc();
    let params = CertificateRevocationListParams {
        this_update: now,
        next_update: now + time::Duration::days(CRL_VALIDITY_DAYS),
        crl_number: number.into(),
        issuing_distribution_point: None,
        revoked_certs: revoked
            .iter()
            .map(|r| RevokedCertParams {
                serial_number: rcgen::SerialNumber::from_slice(r.serial.as_bytes()),
                revocation_time: r.revoked_at,
                reason_code: None,
                invalidity_date: None,
            })
            .collect(),
        key_identifier_method: KeyIdMethod::Sha256,
    };
    let crl = params.signed_by(issuer).context("signing the CRL")?;
    crate::pki::write_public_file(path, &crl.pem()?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn serials_read_back_as_written() {
        for text in ["1", "7f", "0a1b2c", "0x0A:1B:2C", "00ff"] {
            let serial: Serial = text.parse().expect(text);
            assert_eq!(serial.to_string().parse::<Serial>().expect("again"), serial, "{text}");
        }
        assert_eq!("0x0A:1B:2C".parse::<Serial>().expect("hex").to_string(), "0a1b2c");
        assert_eq!("00ff".parse::<Serial>().expect("hex").to_string(), "ff");
        assert_eq!(Serial::from_bytes(&[0, 0x80, 1]).to_string(), "8001");
        for bad in ["", "0x", "xyz", "12 34", &"ab".repeat(21)] {
            assert!(bad.parse::<Serial>().is_err(), "{bad:?}");
        }
    }
}
