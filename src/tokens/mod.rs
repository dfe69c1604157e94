//! Entitlement tokens: short-lived JWTs of a customer's entitlements, signed
//! with Ed25519 (`alg: EdDSA`), that applications verify offline against the
//! public keys at `/.well-known/jwks.json`.
//!
//! The JWS is written here, on `ring` directly, rather than through a JWT
//! crate: a compact JWS is three base64url segments and one signature, ring
//! (already built for rustls) does the cryptography, and keeping a JWT crate
//! out of the server lets the tests verify every token with one
//! (`jsonwebtoken`) that shares no code with the signer.
//!
//! Here: claims, signing, JWKs, reading a configured key and sealing
//! stored private keys, with no database. Which key signs, and how
//! instances share keys, is [`keys`].

use std::collections::{BTreeMap, BTreeSet};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine;
use ring::rand::SecureRandom;
use ring::signature::{Ed25519KeyPair, KeyPair};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use utoipa::ToSchema;

pub mod keys;

/// The one algorithm tokens are signed with.
pub const ALGORITHM: &str = "EdDSA";

/// How long verifiers may cache the JWKS. Short, because a rotation's new
/// key signs at once: verifiers should also refetch on an unknown `kid`.
/// A new `JWT_SECRET_KEY` waits this long after it is first published
/// before it signs, where a previous key can sign meanwhile.
pub const JWKS_MAX_AGE_SECONDS: u64 = 60;

/// An Ed25519 key pair that signs tokens, named by its `kid`.
pub struct SigningKey {
    kid: String,
    pair: Ed25519KeyPair,
}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").field("kid", &self.kid).finish_non_exhaustive()
    }
}

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct KeyError(pub String);

impl SigningKey {
    /// A new random key pair, with its PKCS#8 document for storage.
    pub fn generate() -> Result<(Self, Vec<u8>), KeyError> {
        let rng = ring::rand::SystemRandom::new();
        let pkcs8 = Ed25519KeyPair::generate_pkcs8(&rng)
            .map_err(|_| KeyError("the system random generator failed".to_owned()))?;
        let key = Self::from_pkcs8(pkcs8.as_ref())?;
        Ok((key, pkcs8.as_ref().to_vec()))
    }

    /// From a PKCS#8 document: v2 (ring's) or v1 (OpenSSL's
    /// `genpkey -algorithm ed25519`, which leaves out the public key).
    pub fn from_pkcs8(der: &[u8]) -> Result<Self, KeyError> {
        let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(der)
            .map_err(|e| KeyError(format!("not an Ed25519 private key in PKCS#8 ({e})")))?;
        Ok(Self::from_pair(pair))
    }

    /// A key pair derived from a high-entropy secret string (HKDF-SHA256), so
    /// that a `JWT_SECRET_KEY` given as a random string, as many deployments
    /// configure JWT secrets, still yields an asymmetric key.
    pub fn from_secret(secret: &str) -> Self {
        let seed = hkdf32(secret.as_bytes(), b"tollgate entitlement token signing key v1");
        let pair = Ed25519KeyPair::from_seed_unchecked(&seed).expect("any 32 bytes are an Ed25519 seed");
        Self::from_pair(pair)
    }

    fn from_pair(pair: Ed25519KeyPair) -> Self {
        let x = URL_SAFE_NO_PAD.encode(pair.public_key().as_ref());
        SigningKey { kid: thumbprint(&x), pair }
    }

    pub fn kid(&self) -> &str {
        &self.kid
    }

    /// base64url of the raw public key: the JWK's `x`.
    pub fn public_key(&self) -> String {
        URL_SAFE_NO_PAD.encode(self.pair.public_key().as_ref())
    }

    pub fn jwk(&self) -> Jwk {
        Jwk::ed25519(&self.kid, &self.public_key())
    }

    /// The compact JWS of `claims`: `header.payload.signature`, each base64url.
    pub fn sign<T: Serialize>(&self, claims: &T) -> String {
        let header = serde_json::json!({ "alg": ALGORITHM, "typ": "JWT", "kid": self.kid });
        let payload = serde_json::to_vec(claims).expect("claims serialize");
        let mut token =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(header.to_string()), URL_SAFE_NO_PAD.encode(payload));
        let signature = self.pair.sign(token.as_bytes());
        token.push('.');
        token.push_str(&URL_SAFE_NO_PAD.encode(signature.as_ref()));
        token
    }
}

/// HKDF-SHA256 to 32 bytes: one derivation per purpose (`info`), so the
/// same secret never serves two.
fn hkdf32(secret: &[u8], info: &[u8]) -> [u8; 32] {
    struct Len32;
    impl ring::hkdf::KeyType for Len32 {
        fn len(&self) -> usize {
            32
        }
    }
    let prk = ring::hkdf::Salt::new(ring::hkdf::HKDF_SHA256, b"tollgate").extract(secret);
    let mut out = [0u8; 32];
    let infos = [info];
    prk.expand(&infos, Len32).and_then(|okm| okm.fill(&mut out)).expect("32 bytes is a valid HKDF length");
    out
}

/// RFC 7638 JWK thumbprint of an Ed25519 public key: a `kid` every verifier
/// can recompute, identical on every instance that holds the key.
pub fn thumbprint(x: &str) -> String {
    let canonical = format!(r#"{{"crv":"Ed25519","kty":"OKP","x":"{x}"}}"#);
    URL_SAFE_NO_PAD.encode(Sha256::digest(canonical.as_bytes()))
}

/// One public key, as RFC 8037 writes Ed25519 keys.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Jwk {
    #[schema(example = "OKP")]
    pub kty: String,
    #[schema(example = "Ed25519")]
    pub crv: String,
    /// The public key, base64url.
    pub x: String,
    /// The key's RFC 7638 thumbprint; tokens name it in their header.
    pub kid: String,
    #[schema(example = "EdDSA")]
    pub alg: String,
    #[serde(rename = "use")]
    #[schema(example = "sig")]
    pub use_: String,
}

impl Jwk {
    pub fn ed25519(kid: &str, x: &str) -> Self {
        Jwk {
            kty: "OKP".to_owned(),
            crv: "Ed25519".to_owned(),
            x: x.to_owned(),
            kid: kid.to_owned(),
            alg: ALGORITHM.to_owned(),
            use_: "sig".to_owned(),
        }
    }
}

/// The keys that may have signed a live token.
#[derive(Debug, Clone, Serialize, Deserialize, ToSchema)]
pub struct Jwks {
    pub keys: Vec<Jwk>,
}

/// A token's claims: the registered ones, then the entitlements.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct Claims {
    /// `PUBLIC_URL`.
    pub iss: String,
    /// The customer's `external_id`.
    pub sub: String,
    /// `ENTITLEMENT_TOKEN_AUDIENCE`, when configured.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub aud: Option<String>,
    pub iat: i64,
    pub exp: i64,
    /// Unique per token, for verifiers that refuse replays.
    pub jti: String,
    pub entitlements: TokenEntitlements,
}

/// The entitlements as of `iat`, in the shape of
/// `GET /v1/customers/{external_id}/entitlements`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
pub struct TokenEntitlements {
    pub features: BTreeSet<String>,
    pub limits: BTreeMap<String, i64>,
    pub balances: BTreeMap<String, i64>,
    pub version: i64,
}

/// What a token is issued with, besides the entitlements.
#[derive(Debug, Clone)]
pub struct Issue<'a> {
    pub issuer: &'a str,
    pub audience: Option<&'a str>,
    pub subject: &'a str,
    pub now: i64,
    pub ttl_seconds: i64,
    pub jti: String,
}

pub fn claims(issue: Issue<'_>, entitlements: TokenEntitlements) -> Claims {
    Claims {
        iss: issue.issuer.to_owned(),
        sub: issue.subject.to_owned(),
        aud: issue.audience.map(str::to_owned),
        iat: issue.now,
        exp: issue.now.saturating_add(issue.ttl_seconds),
        jti: issue.jti,
        entitlements,
    }
}

/// The key `JWT_SECRET_KEY` names, or why it cannot be used.
///
/// Accepted, in this order: a PKCS#8 PEM (`-----BEGIN PRIVATE KEY-----…`),
/// the path of a file holding one, or a random secret of at least 32
/// characters from which the key pair is derived.
pub fn configured_key(raw: &str) -> Result<(SigningKey, ConfiguredFrom), KeyError> {
    let raw_trimmed = raw.trim();
    if raw_trimmed.starts_with("-----BEGIN") {
        // Env files and secret stores often hold a PEM on one line with
        // literal `\n`s.
        return Ok((pem_key(&raw_trimmed.replace("\\n", "\n"))?, ConfiguredFrom::Pem));
    }
    let path = std::path::Path::new(raw_trimmed);
    // A random secret may begin with `/` (base64 does one time in 64): only
    // an existing file, or a name that can only be a key file, is a path,
    // and only such a name is ever quoted in an error.
    let names_a_key_file = raw_trimmed.ends_with(".pem") || raw_trimmed.ends_with(".key");
    if path.is_file() || names_a_key_file {
        let shown = if names_a_key_file { format!("{raw_trimmed:?}") } else { "(the path given)".to_owned() };
        let text = std::fs::read_to_string(path)
            .map_err(|e| KeyError(format!("JWT_SECRET_KEY: cannot read the key file {shown}: {e}")))?;
        let key = pem_key(text.trim()).map_err(|e| KeyError(format!("{e} (in {shown})")))?;
        return Ok((key, ConfiguredFrom::File));
    }
    if raw_trimmed.chars().count() < 32 {
        return Err(KeyError(
            "JWT_SECRET_KEY must be an Ed25519 private key in PKCS#8 PEM (inline or the path of a file; \
             `openssl genpkey -algorithm ed25519`) or a random secret of at least 32 characters"
                .to_owned(),
        ));
    }
    // Trimmed, so a trailing newline from a secret file or env file gives
    // every instance the same key.
    Ok((SigningKey::from_secret(raw_trimmed), ConfiguredFrom::Secret))
}

/// Where a configured key came from, for `doctor`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfiguredFrom {
    Pem,
    File,
    Secret,
}

/// PEM is a base64 body between marker lines; the `pem` crate would add a
/// dependency for these few lines.
fn pem_key(text: &str) -> Result<SigningKey, KeyError> {
    let mut lines = text.lines().map(str::trim).filter(|l| !l.is_empty());
    let begin = lines.next().unwrap_or_default();
    if begin != "-----BEGIN PRIVATE KEY-----" {
        return Err(KeyError(format!(
            "JWT_SECRET_KEY: expected a PKCS#8 PEM (-----BEGIN PRIVATE KEY-----), found {:?}",
            begin.chars().take(40).collect::<String>()
        )));
    }
    let mut body = String::new();
    let mut ended = false;
    for line in lines {
        if line == "-----END PRIVATE KEY-----" {
            ended = true;
            break;
        }
        body.push_str(line);
    }
    if !ended {
        return Err(KeyError("JWT_SECRET_KEY: the PEM has no -----END PRIVATE KEY----- line".to_owned()));
    }
    let der =
        STANDARD.decode(body).map_err(|e| KeyError(format!("JWT_SECRET_KEY: the PEM is not base64: {e}")))?;
    SigningKey::from_pkcs8(&der).map_err(|e| KeyError(format!("JWT_SECRET_KEY: {e}")))
}

/// Seals generated private keys for storage with a key derived from
/// `SECRET_KEY` (ChaCha20-Poly1305, from ring, already in the build), the
/// key's `kid` as associated data so a sealed key cannot be moved to
/// another row. Without `SECRET_KEY` (development), keys are stored in
/// clear and say so.
#[derive(Clone)]
pub struct Sealer {
    key: Option<[u8; 32]>,
}

const SEALED: &str = "aead:v1:";
const PLAIN: &str = "plain:";

impl Sealer {
    pub fn new(secret_key: Option<&str>) -> Self {
        Sealer { key: secret_key.map(|s| hkdf32(s.as_bytes(), b"tollgate signing key storage v1")) }
    }

    pub fn encrypts(&self) -> bool {
        self.key.is_some()
    }

    pub fn seal(&self, kid: &str, pkcs8: &[u8]) -> Result<String, KeyError> {
        let Some(key) = &self.key else { return Ok(format!("{PLAIN}{}", URL_SAFE_NO_PAD.encode(pkcs8))) };
        let mut nonce = [0u8; 12];
        ring::rand::SystemRandom::new()
            .fill(&mut nonce)
            .map_err(|_| KeyError("the system random generator failed".to_owned()))?;
        let mut buf = pkcs8.to_vec();
        aead_key(key)
            .seal_in_place_append_tag(
                ring::aead::Nonce::assume_unique_for_key(nonce),
                ring::aead::Aad::from(kid.as_bytes()),
                &mut buf,
            )
            .map_err(|_| KeyError("sealing the private key failed".to_owned()))?;
        let mut out = nonce.to_vec();
        out.extend_from_slice(&buf);
        Ok(format!("{SEALED}{}", URL_SAFE_NO_PAD.encode(out)))
    }

    /// The PKCS#8 document of a stored key.
    pub fn open(&self, kid: &str, stored: &str) -> Result<Vec<u8>, KeyError> {
        if let Some(plain) = stored.strip_prefix(PLAIN) {
            return URL_SAFE_NO_PAD
                .decode(plain)
                .map_err(|_| KeyError(format!("the stored signing key {kid} is corrupt")));
        }
        let Some(sealed) = stored.strip_prefix(SEALED) else {
            return Err(KeyError(format!("the stored signing key {kid} has an unknown format")));
        };
        let Some(key) = &self.key else {
            return Err(KeyError(format!(
                "the signing key {kid} is stored encrypted with SECRET_KEY, which is not set"
            )));
        };
        let raw = URL_SAFE_NO_PAD
            .decode(sealed)
            .map_err(|_| KeyError(format!("the stored signing key {kid} is corrupt")))?;
        if raw.len() < 12 + 16 {
            return Err(KeyError(format!("the stored signing key {kid} is corrupt")));
        }
        let (nonce, rest) = raw.split_at(12);
        let mut buf = rest.to_vec();
        let nonce = ring::aead::Nonce::try_assume_unique_for_key(nonce).expect("12 bytes");
        let plain = aead_key(key)
            .open_in_place(nonce, ring::aead::Aad::from(kid.as_bytes()), &mut buf)
            .map_err(|_| {
                KeyError(format!(
                    "the signing key {kid} cannot be decrypted with this SECRET_KEY (was SECRET_KEY changed?): \
                     restore the previous SECRET_KEY, or run `tollgate keys rotate` to replace the key"
                ))
            })?;
        Ok(plain.to_vec())
    }
}

fn aead_key(key: &[u8; 32]) -> ring::aead::LessSafeKey {
    let unbound = ring::aead::UnboundKey::new(&ring::aead::CHACHA20_POLY1305, key).expect("32-byte key");
    ring::aead::LessSafeKey::new(unbound)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn verify(token: &str, key: &SigningKey) -> bool {
        let Some((signed, sig)) = token.rsplit_once('.') else { return false };
        let Ok(sig) = URL_SAFE_NO_PAD.decode(sig) else { return false };
        let public =
            ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, key.pair.public_key());
        public.verify(signed.as_bytes(), &sig).is_ok()
    }

    #[test]
    fn a_signed_token_verifies_and_names_its_key() {
        let (key, _) = SigningKey::generate().unwrap();
        let token = key.sign(&serde_json::json!({ "sub": "u1" }));
        assert!(verify(&token, &key));
        let header: serde_json::Value =
            serde_json::from_slice(&URL_SAFE_NO_PAD.decode(token.split('.').next().unwrap()).unwrap())
                .unwrap();
        assert_eq!(header["alg"], "EdDSA");
        assert_eq!(header["kid"], key.kid());
        let (other, _) = SigningKey::generate().unwrap();
        assert!(!verify(&token, &other));
    }

    #[test]
    fn the_kid_is_the_rfc7638_thumbprint() {
        // RFC 8037 appendix A.3: the thumbprint of its example Ed25519 key.
        assert_eq!(
            thumbprint("11qYAYKxCrfVS_7TyWQHOg7hcvPapiMlrwIaaPcHURo"),
            "kPrK_qmxVWaYVA9wwBF6Iuo3vVzz7TxHCTwXBygrS4k"
        );
    }

    #[test]
    fn keys_round_trip_through_pkcs8_and_pem() {
        let (key, der) = SigningKey::generate().unwrap();
        assert_eq!(SigningKey::from_pkcs8(&der).unwrap().kid(), key.kid());
        let pem =
            format!("-----BEGIN PRIVATE KEY-----\n{}\n-----END PRIVATE KEY-----\n", STANDARD.encode(&der));
        let (configured, from) = configured_key(&pem).unwrap();
        assert_eq!((configured.kid(), from), (key.kid(), ConfiguredFrom::Pem));
        let one_line = pem.trim().replace('\n', "\\n");
        assert_eq!(
            configured_key(&one_line).unwrap().0.kid(),
            key.kid(),
            "escaped newlines, as in env files"
        );
    }

    #[test]
    fn an_openssl_pkcs8_v1_key_is_accepted() {
        // `openssl genpkey -algorithm ed25519`: RFC 8410's example key.
        let pem = "-----BEGIN PRIVATE KEY-----\nMC4CAQAwBQYDK2VwBCIEINTuctv5E1hK1bbY8fdp+K06/nwoy/HU++CXqI9EdVhC\n-----END PRIVATE KEY-----";
        let (key, _) = configured_key(pem).unwrap();
        assert_eq!(key.public_key(), "Gb9ECWmEzf6FQbrBZ9w7lshQhqowtrbLDFw4rXAxZuE");
    }

    #[test]
    fn bad_configured_keys_are_refused_with_a_reason() {
        let err = |raw: &str| configured_key(raw).unwrap_err().0;
        assert!(err("changeme").contains("at least 32 characters"));
        assert!(err("/nonexistent/jwt.pem").contains("cannot read the key file"));
        assert!(err("-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----").contains("PKCS#8"));
        assert!(err("-----BEGIN RSA PRIVATE KEY-----\nAAAA").contains("expected a PKCS#8 PEM"));
        let secret = "4mB9zQ2xLr7Kp0vWc5Ty8Hn3Js6Fd1Ge";
        let (a, from) = configured_key(secret).unwrap();
        assert_eq!(from, ConfiguredFrom::Secret);
        assert_eq!(a.kid(), configured_key(secret).unwrap().0.kid(), "derived deterministically");
        assert_eq!(
            a.kid(),
            configured_key(&format!("{secret}\n")).unwrap().0.kid(),
            "a trailing newline is not the key"
        );
        // A random secret that happens to start with `/` is a secret, and is never echoed.
        let slash = "/4mB9zQ2xLr7Kp0vWc5Ty8Hn3Js6Fd1Ge+q";
        assert_eq!(configured_key(slash).unwrap().1, ConfiguredFrom::Secret);
    }

    #[test]
    fn sealed_keys_open_only_with_the_same_secret_and_kid() {
        let sealer = Sealer::new(Some("q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sA"));
        let stored = sealer.seal("kid1", b"pkcs8 bytes").unwrap();
        assert!(stored.starts_with(SEALED) && !stored.contains("pkcs8"));
        assert_eq!(sealer.open("kid1", &stored).unwrap(), b"pkcs8 bytes");
        assert!(sealer.open("kid2", &stored).is_err(), "bound to its kid");
        assert!(Sealer::new(Some("another secret entirely, 32+ chars")).open("kid1", &stored).is_err());
        assert!(Sealer::new(None).open("kid1", &stored).is_err());
        let plain = Sealer::new(None).seal("kid1", b"pkcs8 bytes").unwrap();
        assert_eq!(sealer.open("kid1", &plain).unwrap(), b"pkcs8 bytes", "clear keys stay readable");
    }
}
