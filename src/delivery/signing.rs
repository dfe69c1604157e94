//! Standard Webhooks signing (<https://www.standardwebhooks.com>): secrets
//! are `whsec_` + base64 of random bytes, and a signature is
//! `v1,<base64 HMAC-SHA256 of "{id}.{timestamp}.{body}">` keyed with the
//! decoded bytes.
//!
//! Written here with `hmac`/`sha2`/`base64` rather than the
//! `standardwebhooks` crate: signing is a dozen lines, and that crate pulls
//! a second base64 major version and its own HMAC into the build. The tests
//! verify every delivery with that crate, as an independent check.

use base64::engine::general_purpose::STANDARD;
use base64::Engine;
use hmac::{Hmac, Mac};
use rand::RngCore;
use sha2::Sha256;

pub const SECRET_PREFIX: &str = "whsec_";
/// The spec asks for at least 24 bytes.
const SECRET_BYTES: usize = 32;

/// A fresh endpoint secret.
pub fn generate_secret() -> String {
    let mut bytes = [0u8; SECRET_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("{SECRET_PREFIX}{}", STANDARD.encode(bytes))
}

#[derive(Debug, thiserror::Error)]
#[error("webhook secret is not whsec_ followed by base64")]
pub struct BadSecret;

/// The HMAC key a secret stands for.
pub fn secret_key(secret: &str) -> Result<Vec<u8>, BadSecret> {
    let encoded = secret.strip_prefix(SECRET_PREFIX).unwrap_or(secret);
    STANDARD.decode(encoded).map_err(|_| BadSecret)
}

/// The `webhook-signature` header value for one message.
pub fn sign(key: &[u8], msg_id: &str, timestamp: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(key).expect("HMAC accepts any key length");
    mac.update(msg_id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    format!("v1,{}", STANDARD.encode(mac.finalize().into_bytes()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn matches_the_standard_webhooks_reference_vector() {
        // The example in the Standard Webhooks specification.
        let key = secret_key("whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw").unwrap();
        let sig = sign(&key, "msg_p5jXN8AQM9LWM0D4loKWxJek", 1614265330, br#"{"test": 2432232314}"#);
        assert_eq!(sig, "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=");
    }

    #[test]
    fn generated_secrets_decode_to_32_random_bytes() {
        let a = generate_secret();
        assert!(a.starts_with("whsec_"));
        assert_eq!(secret_key(&a).unwrap().len(), 32);
        assert_ne!(a, generate_secret());
        assert!(secret_key("whsec_not base64!").is_err());
    }
}
