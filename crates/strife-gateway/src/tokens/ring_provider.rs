//! jsonwebtoken's signing and verifying done by `ring`, which already does
//! all of Strife's other cryptography, so no second crypto stack is linked.
//! Only HS256, the one algorithm Strife's tokens use: every other algorithm
//! is refused with [`ErrorKind::InvalidAlgorithm`].

use jsonwebtoken::crypto::{CryptoProvider, JwtSigner, JwtVerifier, KeyUtils};
use jsonwebtoken::errors::{ErrorKind, Result};
use jsonwebtoken::signature::{self, Signer, Verifier};
use jsonwebtoken::{Algorithm, AlgorithmFamily, DecodingKey, EncodingKey};
use ring::hmac;

/// The provider. Its JWK helpers are left unimplemented (they panic): they
/// serve only `jsonwebtoken::jwk`, which Strife never calls.
static PROVIDER: CryptoProvider = CryptoProvider {
    signer_factory: new_signer,
    verifier_factory: new_verifier,
    key_utils: KeyUtils::new_unimplemented(),
};

/// Makes [`PROVIDER`] the process's provider. Idempotent and safe to race;
/// fails only if some other provider was installed first.
pub(super) fn install() -> anyhow::Result<()> {
    match PROVIDER.install_default() {
        Ok(()) => Ok(()),
        Err(installed) if std::ptr::eq(installed, &PROVIDER) => Ok(()),
        Err(_) => anyhow::bail!("another JWT crypto provider is installed"),
    }
}

fn new_signer(algorithm: &Algorithm, key: &EncodingKey) -> Result<Box<dyn JwtSigner>> {
    if *algorithm != Algorithm::HS256 {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    if key.family() != AlgorithmFamily::Hmac {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(Hs256(hmac::Key::new(hmac::HMAC_SHA256, key.as_bytes()))))
}

fn new_verifier(algorithm: &Algorithm, key: &DecodingKey) -> Result<Box<dyn JwtVerifier>> {
    if *algorithm != Algorithm::HS256 {
        return Err(ErrorKind::InvalidAlgorithm.into());
    }
    if key.family() != AlgorithmFamily::Hmac {
        return Err(ErrorKind::InvalidKeyFormat.into());
    }
    Ok(Box::new(Hs256(hmac::Key::new(hmac::HMAC_SHA256, key.try_get_as_bytes()?))))
}

/// An HMAC-SHA256 key that signs and verifies.
struct Hs256(hmac::Key);

impl Signer<Vec<u8>> for Hs256 {
    fn try_sign(&self, msg: &[u8]) -> std::result::Result<Vec<u8>, signature::Error> {
        Ok(hmac::sign(&self.0, msg).as_ref().to_vec())
    }
}

impl JwtSigner for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

impl Verifier<Vec<u8>> for Hs256 {
    /// Constant-time: `ring::hmac::verify` compares without early exit.
    fn verify(&self, msg: &[u8], tag: &Vec<u8>) -> std::result::Result<(), signature::Error> {
        hmac::verify(&self.0, msg, tag).map_err(|_| signature::Error::new())
    }
}

impl JwtVerifier for Hs256 {
    fn algorithm(&self) -> Algorithm {
        Algorithm::HS256
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_hs256_is_provided() {
        install().expect("install");
        install().expect("installing twice is harmless");
        let enc = EncodingKey::from_secret(&[1; 32]).expect("key");
        let dec = DecodingKey::from_secret(&[1; 32]).expect("key");
        for alg in [
            Algorithm::HS384,
            Algorithm::HS512,
            Algorithm::ES256,
            Algorithm::ES384,
            Algorithm::RS256,
            Algorithm::RS384,
            Algorithm::RS512,
            Algorithm::PS256,
            Algorithm::PS384,
            Algorithm::PS512,
            Algorithm::EdDSA,
        ] {
            let signer = new_signer(&alg, &enc).err().map(|e| e.into_kind());
            let verifier = new_verifier(&alg, &dec).err().map(|e| e.into_kind());
            assert!(matches!(signer, Some(ErrorKind::InvalidAlgorithm)), "{alg:?} signs");
            assert!(matches!(verifier, Some(ErrorKind::InvalidAlgorithm)), "{alg:?} verifies");
        }
        let mut header = jsonwebtoken::Header::new(Algorithm::HS512);
        header.kid = Some("k1".into());
        let encoded = jsonwebtoken::encode(&header, &std::collections::BTreeMap::from([("sub", "x")]), &enc);
        assert!(matches!(encoded.map_err(|e| e.into_kind()), Err(ErrorKind::InvalidAlgorithm)));
    }

    #[test]
    fn hs256_matches_rfc_4231() {
        // RFC 4231 test case 2: key "Jefe".
        let tag = Hs256(hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"))
            .try_sign(b"what do ya want for nothing?")
            .expect("sign");
        let hex: String = tag.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(hex, "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843");
        let key = Hs256(hmac::Key::new(hmac::HMAC_SHA256, b"Jefe"));
        assert!(key.verify(b"what do ya want for nothing?", &tag).is_ok());
        let mut bad = tag.clone();
        bad[31] ^= 1;
        assert!(key.verify(b"what do ya want for nothing?", &bad).is_err());
        assert!(key.verify(b"what do ya want for nothing?", &tag[..31].to_vec()).is_err());
    }
}
