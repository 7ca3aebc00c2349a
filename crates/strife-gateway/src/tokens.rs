//! Customers' bearer tokens: HS256 JWTs naming user and bank, signed with a
//! key kept in `DIR/certs/token.key` (mode 0600) and identified by a key id.

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

/// The signing key and how long tokens live.
pub struct TokenKeys {
    kid: String,
    encoding: EncodingKey,
    decoding: DecodingKey,
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

/// Reads the key file, creating it (32 random bytes, mode 0600) if missing.
pub fn load_or_create_key(certs_dir: &Path) -> anyhow::Result<(String, Secret<Vec<u8>>)> {
    let path = certs_dir.join(KEY_FILE);
    if !path.exists() {
        let rng = ring::rand::SystemRandom::new();
        let secret: [u8; 32] =
            ring::rand::generate(&rng).map_err(|_| anyhow::anyhow!("no randomness"))?.expose();
        let kid: [u8; 4] = ring::rand::generate(&rng).map_err(|_| anyhow::anyhow!("no randomness"))?.expose();
        strife_rpc::pki::write_private(&path, &format!("{} {}\n", hex(&kid), hex(&secret)))?;
    }
    let text = std::fs::read_to_string(&path)?;
    let (kid, secret) =
        text.trim().split_once(' ').ok_or_else(|| anyhow::anyhow!("{} is malformed", path.display()))?;
    let secret = unhex(secret).ok_or_else(|| anyhow::anyhow!("{} is malformed", path.display()))?;
    if secret.len() < 32 {
        anyhow::bail!("{}: the signing key is shorter than 32 bytes", path.display());
    }
    Ok((kid.to_owned(), Secret::new(secret)))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(text.get(i..i + 2)?, 16).ok()).collect()
}

pub fn now_secs() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl TokenKeys {
    pub fn new(kid: String, secret: &Secret<Vec<u8>>, ttl_secs: u64) -> TokenKeys {
        let mut validation = Validation::new(Algorithm::HS256);
        validation.set_audience(&[AUDIENCE]);
        validation.set_issuer(&[ISSUER]);
        validation.set_required_spec_claims(&["exp", "sub", "aud", "iss"]);
        validation.leeway = LEEWAY_SECS;
        TokenKeys {
            kid,
            encoding: EncodingKey::from_secret(secret.expose()),
            decoding: DecodingKey::from_secret(secret.expose()),
            validation,
            ttl_secs,
        }
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
        if header.kid.as_deref() != Some(self.kid.as_str()) {
            return Err(TokenError::BadSignature);
        }
        let data = jsonwebtoken::decode::<Claims>(token, &self.decoding, &self.validation).map_err(|e| {
            use jsonwebtoken::errors::ErrorKind as K;
            match e.kind() {
                K::ExpiredSignature => TokenError::Expired,
                K::InvalidSignature | K::InvalidAlgorithm => TokenError::BadSignature,
                K::InvalidToken | K::Base64(_) | K::Json(_) | K::Utf8(_) => TokenError::Malformed,
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
        TokenKeys::new("k1".into(), &Secret::new(vec![secret; 32]), 60)
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
    fn expired_tokens_are_refused() {
        let k = TokenKeys::new("k1".into(), &Secret::new(vec![1; 32]), 0);
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
