//! Customers' bearer tokens: HS256 JWTs naming user and bank, signed with a
//! key kept in `DIR/certs/token.key` (mode 0600) and identified by a key id.
//! The HMAC is computed by `ring` through [`ring_provider`].

mod ring_provider;

use crate::hex;
use jsonwebtoken::{Algorithm, DecodingKey, EncodingKey, Header, Validation};
use serde::{Deserialize, Serialize};
use std::path::Path;
use strife_core::{Secret, UserRef};

pub const ISSUER: &str = "strife-gateway";
pub const AUDIENCE: &str = "strife";
/// The key file's name in `DIR/certs`.
pub const KEY_FILE: &str = "token.key";
/// Clock skew tolerated when checking expiry.
const LEEWAY_SECS: u64 = 5;

/// What a token says.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct Claims {
    /// The user name.
    pub sub: String,
    /// The user's bank.
    pub bank: String,
    pub iat: u64,
    pub exp: u64,
    /// A unique id, so that one token can be revoked.
    pub jti: String,
    pub iss: String,
    pub aud: String,
}

impl Claims {
    pub fn customer(&self) -> UserRef {
        UserRef { user: self.sub.clone(), bank: self.bank.clone() }
    }
}

/// The signing keys and how long tokens live.
pub struct TokenKeys {
    /// The id of the key that signs new tokens.
    kid: String,
    encoding: EncodingKey,
    /// Every key that verifies, by key id (the signing key among them).
    decoding: Vec<(String, DecodingKey)>,
    validation: Validation,
    pub ttl_secs: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("the token is malformed")]
    Malformed,
    #[error("the token was not signed by this gateway")]
    BadSignature,
    #[error("the token has expired; log in again")]
    Expired,
    #[error("the token is not valid: {0}")]
    Invalid(String),
}

/// A signing key: its id and its secret.
pub type SigningKey = (String, Secret<Vec<u8>>);

/// How many signing keys the key file keeps: the newest signs, every one
/// verifies, so a rotation logs nobody out.
pub const KEYS_MAX: usize = 3;

fn random_key_line() -> anyhow::Result<String> {
    let rng = ring::rand::SystemRandom::new();
    let secret: [u8; 32] = ring::rand::generate(&rng).map_err(|_| anyhow::anyhow!("no randomness"))?.expose();
    let kid: [u8; 4] = ring::rand::generate(&rng).map_err(|_| anyhow::anyhow!("no randomness"))?.expose();
    Ok(format!("{} {}", hex::encode(&kid), hex::encode(&secret)))
}

/// Every key in the key file, newest first, creating the file (one key of
/// 32 random bytes, mode 0600) if it is missing. One `KID HEX` per line.
pub fn load_keys(certs_dir: &Path) -> anyhow::Result<Vec<(String, Secret<Vec<u8>>)>> {
    let path = certs_dir.join(KEY_FILE);
    if !path.exists() {
        strife_rpc::pki::write_private(&path, &format!("{}\n", random_key_line()?))?;
    }
    let text = std::fs::read_to_string(&path)?;
    let mut keys = Vec::new();
    for line in text.lines().filter(|l| !l.trim().is_empty()) {
        let (kid, secret) =
            line.trim().split_once(' ').ok_or_else(|| anyhow::anyhow!("{} is malformed", path.display()))?;
        let secret = hex::decode(secret).ok_or_else(|| anyhow::anyhow!("{} is malformed", path.display()))?;
        if secret.len() < 32 {
            anyhow::bail!("{}: a signing key is shorter than 32 bytes", path.display());
        }
        keys.push((kid.to_owned(), Secret::new(secret)));
    }
    if keys.is_empty() {
        anyhow::bail!("{} holds no key", path.display());
    }
    Ok(keys)
}

/// The current signing key (creating the key file if missing).
pub fn load_or_create_key(certs_dir: &Path) -> anyhow::Result<(String, Secret<Vec<u8>>)> {
    let mut keys = load_keys(certs_dir)?;
    Ok(keys.swap_remove(0))
}

/// Adds a new signing key in front, keeping at most [`KEYS_MAX`]. Tokens
/// signed with the older keys stay valid until they expire (or until their
/// key falls off the end). A running gateway reads the file again every
/// finisher pass (about a second).
pub fn rotate_key(certs_dir: &Path) -> anyhow::Result<String> {
    let mut lines = vec![random_key_line()?];
    let old = std::fs::read_to_string(certs_dir.join(KEY_FILE)).unwrap_or_default();
    lines.extend(old.lines().filter(|l| !l.trim().is_empty()).map(str::to_owned).take(KEYS_MAX - 1));
    strife_rpc::pki::write_private(&certs_dir.join(KEY_FILE), &format!("{}\n", lines.join("\n")))?;
    Ok(lines[0].split(' ').next().unwrap_or_default().to_owned())
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenKeys {
    pub fn new(kid: String, secret: &Secret<Vec<u8>>, ttl_secs: u64) -> anyhow::Result<TokenKeys> {
        TokenKeys::with_keys(&[(kid, secret.clone())], ttl_secs)
    }

    /// The first key signs; every key verifies tokens that name its id.
    /// Fails on an empty secret.
    pub fn with_keys(keys: &[(String, Secret<Vec<u8>>)], ttl_secs: u64) -> anyhow::Result<TokenKeys> {
        assert!(!keys.is_empty(), "at least one signing key");
        // Before the first encode or decode, which would panic without it.
        ring_provider::install()?;
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.leeway = LEEWAY_SECS;
        Ok(TokenKeys {
            kid: keys[0].0.clone(),
            encoding: EncodingKey::from_secret(keys[0].1.expose())?,
            decoding: keys
                .iter()
                .map(|(kid, s)| Ok((kid.clone(), DecodingKey::from_secret(s.expose())?)))
                .collect::<anyhow::Result<_>>()?,
            validation,
            ttl_secs,
        })
    }

    /// The key ids, the signing key first.
    pub fn key_ids(&self) -> Vec<&str> {
        self.decoding.iter().map(|(kid, _)| kid.as_str()).collect()
    }

    /// Issues a token for `who`.
    pub fn issue(&self, who: &UserRef) -> anyhow::Result<(Secret<String>, Claims)> {
        self.issue_at(who, now_secs())
    }

    /// Issues a token as if the time were `now` (seconds since the epoch);
    /// tests use it to make tokens that have already expired.
    pub fn issue_at(&self, who: &UserRef, now: u64) -> anyhow::Result<(Secret<String>, Claims)> {
        let claims = Claims {
            sub: who.user.clone(),
            bank: who.bank.clone(),
            iat: now,
            exp: now + self.ttl_secs,
            jti: uuid::Uuid::new_v4().to_string(),
            iss: ISSUER.to_owned(),
            aud: AUDIENCE.to_owned(),
        };
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some(self.kid.clone());
        let token = jsonwebtoken::encode(&header, &claims, &self.encoding)?;
        Ok((Secret::new(token), claims))
    }

    /// Checks signature, algorithm, key id, issuer, audience and expiry.
    pub fn verify(&self, token: &str) -> Result<Claims, TokenError> {
        let header = jsonwebtoken::decode_header(token).map_err(|_| TokenError::Malformed)?;
        let key = self
            .decoding
            .iter()
            .find(|(kid, _)| Some(kid.as_str()) == header.kid.as_deref())
            .map(|(_, k)| k)
            .ok_or(TokenError::BadSignature)?;
        let data = jsonwebtoken::decode::<Claims>(token, key, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::InvalidSignature | K::InvalidAlgorithm => TokenError::BadSignature,
                // A claim of the wrong type (a string `exp`) is malformed, as
                // when it failed to deserialise before the library checked it.
                K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) | K::InvalidClaimFormat(_) => {
                    TokenError::Malformed
                }
                other => TokenError::Invalid(format!("{other:?}")),
            }
        })?;
        let claims = data.claims;
        if strife_core::validate_user_name(&claims.sub).is_err()
            || strife_core::validate_bank_name(&claims.bank).is_err()
            || claims.jti.is_empty()
        {
            return Err(TokenError::Invalid("bad claims".into()));
        }
        Ok(claims)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn keys(secret: u8) -> TokenKeys {
        TokenKeys::new("k1".into(), &Secret::new(vec![secret; 32]), 60).expect("keys")
    }

    #[test]
    fn issued_tokens_verify_and_forgeries_do_not() {
        let who = UserRef::new("user1", "BankA").expect("name");
        let (token, claims) = keys(1).issue(&who).expect("issue");
        assert_eq!(keys(1).verify(token.expose()).expect("valid"), claims);
        assert!(matches!(keys(2).verify(token.expose()), Err(TokenError::BadSignature)));
        assert!(keys(1).verify("not.a.token").is_err());
        // alg: none, with the same claims
        let parts: Vec<&str> = token.expose().split('.').collect();
        let none_header = "eyJhbGciOiJub25lIiwidHlwIjoiSldUIiwia2lkIjoiazEifQ";
        assert!(keys(1).verify(&format!("{none_header}.{}.", parts[1])).is_err());
    }

    #[test]
    fn a_changed_signature_or_another_algorithm_is_refused() {
        let who = UserRef::new("user1", "BankA").expect("name");
        let (token, _) = keys(1).issue(&who).expect("issue");
        let (rest, sig) = token.expose().rsplit_once('.').expect("three parts");
        let flipped =
            if sig.starts_with('A') { sig.replacen('A', "B", 1) } else { format!("A{}", &sig[1..]) };
        assert!(matches!(keys(1).verify(&format!("{rest}.{flipped}")), Err(TokenError::BadSignature)));
        assert!(matches!(keys(1).verify(&format!("{rest}.{sig}AAAA")), Err(TokenError::BadSignature)));
        // {"alg":"HS512","typ":"JWT","kid":"k1"} over the same claims.
        let payload = rest.split_once('.').expect("two parts").1;
        let hs512 = format!("eyJhbGciOiJIUzUxMiIsInR5cCI6IkpXVCIsImtpZCI6ImsxIn0.{payload}.{sig}");
        assert!(matches!(keys(1).verify(&hs512), Err(TokenError::BadSignature)));
    }

    #[test]
    fn tokens_are_unchanged_across_library_versions() {
        // Issued by jsonwebtoken 9 with key [7; 32]: sessions saved before an
        // upgrade stay valid, and the same claims still give the same token.
        let old = "eyJ0eXAiOiJKV1QiLCJhbGciOiJIUzI1NiIsImtpZCI6ImsxIn0.eyJzdWIiOiJ1c2VyMSIsImJhbmsiOiJCYW5rQSIsImlhdCI6MSwiZXhwIjo0MDAwMDAwMDAwLCJqdGkiOiJqIiwiaXNzIjoic3RyaWZlLWdhdGV3YXkiLCJhdWQiOiJzdHJpZmUifQ.sUp_r3CtGvJiU9y-6MSZLejK2dw-zgZvv9YTiVCe5QE";
        let k = TokenKeys::new("k1".into(), &Secret::new(vec![7; 32]), 60).expect("keys");
        let claims = k.verify(old).expect("an old token verifies");
        assert_eq!(
            (claims.sub.as_str(), claims.bank.as_str(), claims.exp),
            ("user1", "BankA", 4_000_000_000)
        );
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        assert_eq!(jsonwebtoken::encode(&header, &claims, &k.encoding).expect("encode"), old);
    }

    #[test]
    fn rotation_keeps_older_tokens_valid() {
        let dir = std::env::temp_dir().join(format!("strife-keys-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("dir");
        let who = UserRef::new("user1", "BankA").expect("name");
        let before = TokenKeys::with_keys(&load_keys(&dir).expect("keys"), 60).expect("keys");
        let (old_token, _) = before.issue(&who).expect("issue");
        let new_kid = rotate_key(&dir).expect("rotate");
        let after = TokenKeys::with_keys(&load_keys(&dir).expect("keys"), 60).expect("keys");
        assert_eq!(after.kid, new_kid);
        assert!(after.verify(old_token.expose()).is_ok(), "a rotation logs nobody out");
        for _ in 0..KEYS_MAX {
            rotate_key(&dir).expect("rotate");
        }
        let much_later = TokenKeys::with_keys(&load_keys(&dir).expect("keys"), 60).expect("keys");
        assert_eq!(load_keys(&dir).expect("keys").len(), KEYS_MAX);
        assert!(much_later.verify(old_token.expose()).is_err(), "retired keys verify nothing");
        let _ = std::fs::remove_dir_all(dir);
    }

    #[test]
    fn expired_tokens_are_refused() {
        let k = TokenKeys::new("k1".into(), &Secret::new(vec![1; 32]), 0).expect("keys");
        let mut header = Header::new(Algorithm::HS256);
        header.kid = Some("k1".into());
        let claims = Claims {
            sub: "user1".into(),
            bank: "BankA".into(),
            iat: 1,
            exp: now_secs() - 3600,
            jti: "j".into(),
            iss: ISSUER.into(),
            aud: AUDIENCE.into(),
        };
        let token = jsonwebtoken::encode(&header, &claims, &k.encoding).expect("encode");
        assert!(matches!(k.verify(&token), Err(TokenError::Expired)));
    }
}
