//! API keys: format, scopes and the digest that is all tollgate stores.
//!
//! A key is `tg_test_` or `tg_live_` followed by 43 base62 characters drawn
//! from 256 random bits. The mode prefix lets secret scanners and humans tell
//! keys apart; only the SHA-256 digest is stored, so a database leak leaks no
//! usable key (the same choice as crates.io's tokens). A plain digest, not a
//! slow password hash, is right here: the input already has 256 bits of
//! entropy, and every request has to check it.

use std::fmt;

use rand::RngCore;
use secrecy::{ExposeSecret, SecretString};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a key may do. Scopes nest: `admin` ⊇ `write` ⊇ `read`.
#[derive(
    Debug,
    Clone,
    Copy,
    PartialEq,
    Eq,
    PartialOrd,
    Ord,
    Serialize,
    Deserialize,
    utoipa::ToSchema,
    clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Read,
    Write,
    Admin,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Read => "read",
            Scope::Write => "write",
            Scope::Admin => "admin",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "read" => Some(Scope::Read),
            "write" => Some(Scope::Write),
            "admin" => Some(Scope::Admin),
            _ => None,
        }
    }

    /// Whether a key with this scope may do what `needed` guards.
    pub fn allows(self, needed: Scope) -> bool {
        self >= needed
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Test keys belong with test provider keys, live with live: a key's mode
/// follows the environment it was created for.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum KeyMode {
    Test,
    Live,
}

impl KeyMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KeyMode::Test => "test",
            KeyMode::Live => "live",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "test" => Some(KeyMode::Test),
            "live" => Some(KeyMode::Live),
            _ => None,
        }
    }
}

const BASE62: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";
/// 256 bits need 43 base62 digits (62^43 > 2^256).
const SECRET_LEN: usize = 43;

/// A freshly generated key: the plaintext, shown once, and what is stored.
pub struct NewApiKey {
    pub plaintext: SecretString,
    pub digest: String,
    /// The first characters, stored so `api-key list` can tell keys apart
    /// without revealing enough to use one.
    pub display_prefix: String,
}

pub fn generate_key(mode: KeyMode) -> NewApiKey {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    let plaintext = format!("tg_{}_{}", mode.as_str(), base62_encode(&bytes));
    let digest = digest_key(&plaintext);
    let display_prefix = plaintext[..plaintext.len().min(16)].to_owned();
    NewApiKey { plaintext: SecretString::from(plaintext), digest, display_prefix }
}

/// Big-endian base62 of the whole 256-bit number, left-padded to a fixed
/// width so every key has the same length. Written here because it is ten
/// lines and no crate would make it clearer.
fn base62_encode(bytes: &[u8; 32]) -> String {
    let mut digits = bytes.to_vec();
    let mut out = Vec::with_capacity(SECRET_LEN);
    while out.len() < SECRET_LEN {
        let mut remainder = 0u32;
        for d in digits.iter_mut() {
            let acc = (remainder << 8) | u32::from(*d);
            *d = (acc / 62) as u8;
            remainder = acc % 62;
        }
        out.push(BASE62[remainder as usize]);
    }
    out.reverse();
    String::from_utf8(out).expect("base62 alphabet is ASCII")
}

/// Lowercase hex of the key's SHA-256, as stored. Every API request
/// computes one, so it is encoded straight into one buffer
/// (`hex::encode` goes through a char iterator, ten times slower).
pub fn digest_key(plaintext: &str) -> String {
    KeyDigest::of(plaintext).as_str().to_owned()
}

/// [`digest_key`] on the stack: every API request computes one, and as a
/// `String` it was an allocation of its own.
pub struct KeyDigest([u8; 64]);

impl KeyDigest {
    pub fn of(plaintext: &str) -> Self {
        // By hand rather than `hex::encode_to_slice`, whose general loop
        // was a fifth of the cost of authenticating a cached key.
        const DIGITS: &[u8; 16] = b"0123456789abcdef";
        let mut hex = [0u8; 64];
        for (pair, byte) in hex.chunks_exact_mut(2).zip(Sha256::digest(plaintext.as_bytes())) {
            pair[0] = DIGITS[usize::from(byte >> 4)];
            pair[1] = DIGITS[usize::from(byte & 0x0f)];
        }
        KeyDigest(hex)
    }

    pub fn as_str(&self) -> &str {
        std::str::from_utf8(&self.0).expect("hex digits are ASCII")
    }
}

/// Cheap shape check before any database lookup, so junk never costs a query.
pub fn looks_like_key(candidate: &str) -> bool {
    let rest = candidate.strip_prefix("tg_test_").or_else(|| candidate.strip_prefix("tg_live_"));
    rest.is_some_and(|r| r.len() == SECRET_LEN && r.bytes().all(|b| b.is_ascii_alphanumeric()))
}

/// Shows the key to the operator; the only place a plaintext key is exposed.
pub fn reveal(key: &NewApiKey) -> &str {
    key.plaintext.expose_secret()
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn a_digest_is_the_lowercase_hex_sha256() {
        assert_eq!(digest_key("abc"), "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad");
    }

    #[test]
    fn generated_keys_have_the_documented_shape() {
        let a = generate_key(KeyMode::Test);
        let b = generate_key(KeyMode::Live);
        assert!(reveal(&a).starts_with("tg_test_") && looks_like_key(reveal(&a)));
        assert!(reveal(&b).starts_with("tg_live_") && looks_like_key(reveal(&b)));
        assert_eq!(a.digest, digest_key(reveal(&a)));
        assert_ne!(reveal(&a)[8..], reveal(&generate_key(KeyMode::Test))[8..]);
        assert!(!format!("{:?}", a.plaintext).contains(&reveal(&a)[8..]));
    }

    #[test]
    fn scopes_nest() {
        assert!(Scope::Admin.allows(Scope::Write) && Scope::Admin.allows(Scope::Read));
        assert!(Scope::Write.allows(Scope::Read) && !Scope::Write.allows(Scope::Admin));
        assert!(!Scope::Read.allows(Scope::Write));
    }

    #[test]
    fn base62_of_extremes_is_fixed_width() {
        assert_eq!(base62_encode(&[0; 32]), "0".repeat(SECRET_LEN));
        let max = base62_encode(&[0xff; 32]);
        assert_eq!(max.len(), SECRET_LEN);
        assert_ne!(max, base62_encode(&[0xfe; 32]));
    }

    proptest! {
        #[test]
        fn looks_like_key_never_panics(s in ".{0,80}") {
            let _ = looks_like_key(&s);
        }

        #[test]
        fn distinct_bytes_give_distinct_keys(a in any::<[u8; 32]>(), b in any::<[u8; 32]>()) {
            prop_assume!(a != b);
            prop_assert_ne!(base62_encode(&a), base62_encode(&b));
        }
    }
}
