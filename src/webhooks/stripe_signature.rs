//! Stripe's webhook signature, verified on the raw bytes before anything
//! is parsed.
//!
//! `Stripe-Signature: t=<unix seconds>,v1=<hex>[,v1=<hex>…][,v0=…]`, where
//! each `v1` is HMAC-SHA256 keyed with the endpoint secret *string as given*
//! (`whsec_…`, not base64-decoded) over `"{t}.{raw body}"`. Every `v1` is
//! compared, in constant time, against every configured secret, so secrets
//! can be rotated without downtime; the timestamp must be within the
//! tolerance in either direction.

use hmac::{Hmac, Mac};
use sha2::Sha256;
use subtle::ConstantTimeEq;

/// Why a signature was refused; each is a distinct, stable error code.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignatureError {
    Missing,
    Malformed,
    /// `t` is further from now than the tolerance, in either direction.
    OutsideTolerance,
    Mismatch,
}

impl SignatureError {
    pub fn code(self) -> &'static str {
        match self {
            SignatureError::Missing => "signature_missing",
            SignatureError::Malformed => "signature_malformed",
            SignatureError::OutsideTolerance => "signature_timestamp_out_of_tolerance",
            SignatureError::Mismatch => "signature_mismatch",
        }
    }

    pub fn message(self) -> &'static str {
        match self {
            SignatureError::Missing => "The Stripe-Signature header is missing.",
            SignatureError::Malformed => {
                "The Stripe-Signature header is malformed: expected t=<timestamp>,v1=<hex signature>."
            }
            SignatureError::OutsideTolerance => {
                "The signature timestamp is outside the accepted tolerance (replayed or clock skew)."
            }
            SignatureError::Mismatch => "No signature matches any configured webhook secret.",
        }
    }
}

/// The parts of a `Stripe-Signature` header that matter.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParsedHeader {
    pub timestamp: i64,
    pub v1: Vec<[u8; 32]>,
}

/// Parses the header strictly: one integer `t`, at least one well-formed
/// `v1` (64 hex digits); unknown schemes such as `v0` are ignored.
pub fn parse_header(header: &str) -> Result<ParsedHeader, SignatureError> {
    if header.len() > 4096 {
        return Err(SignatureError::Malformed);
    }
    let mut timestamp = None;
    let mut v1 = Vec::new();
    for part in header.split(',') {
        let (key, value) = part.trim().split_once('=').ok_or(SignatureError::Malformed)?;
        match key {
            "t" => {
                if timestamp.is_some() {
                    return Err(SignatureError::Malformed);
                }
                let t: i64 = value.parse().map_err(|_| SignatureError::Malformed)?;
                if t <= 0 {
                    return Err(SignatureError::Malformed);
                }
                timestamp = Some(t);
            }
            "v1" => {
                let mut sig = [0u8; 32];
                hex::decode_to_slice(value, &mut sig).map_err(|_| SignatureError::Malformed)?;
                v1.push(sig);
            }
            _ => {}
        }
    }
    match (timestamp, v1.is_empty()) {
        (Some(timestamp), false) => Ok(ParsedHeader { timestamp, v1 }),
        _ => Err(SignatureError::Malformed),
    }
}

pub fn expected_signature(secret: &str, timestamp: i64, body: &[u8]) -> [u8; 32] {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC accepts any key length");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac.finalize().into_bytes().into()
}

/// Verifies `header` for `body` against any of `secrets` at time `now`.
/// Returns the index of the secret that matched.
pub fn verify(
    header: Option<&str>,
    body: &[u8],
    secrets: &[&str],
    now: i64,
    tolerance_seconds: i64,
) -> Result<usize, SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let parsed = parse_header(header)?;
    if parsed.timestamp.abs_diff(now) > tolerance_seconds.unsigned_abs() {
        return Err(SignatureError::OutsideTolerance);
    }
    for (index, secret) in secrets.iter().enumerate() {
        let expected = expected_signature(secret, parsed.timestamp, body);
        // Check every candidate, not just until the first match, so timing
        // says nothing about which one matched.
        let matched = parsed.v1.iter().fold(subtle::Choice::from(0), |acc, sig| acc | sig.ct_eq(&expected));
        if bool::from(matched) {
            return Ok(index);
        }
    }
    Err(SignatureError::Mismatch)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    const NOW: i64 = 1_800_000_000;

    fn header_for(secret: &str, t: i64, body: &[u8]) -> String {
        format!("t={t},v1={}", hex::encode(expected_signature(secret, t, body)))
    }

    #[test]
    fn accepts_a_correct_signature_with_any_configured_secret() {
        let body = br#"{"id":"evt_1"}"#;
        let h = header_for("whsec_new", NOW, body);
        assert_eq!(verify(Some(&h), body, &["whsec_new"], NOW, 300), Ok(0));
        assert_eq!(verify(Some(&h), body, &["whsec_old", "whsec_new"], NOW, 300), Ok(1));
        // Several v1 entries (Stripe sends one per active secret during rotation).
        let two = format!(
            "t={NOW},v1={},v1={}",
            "00".repeat(32),
            hex::encode(expected_signature("whsec_new", NOW, body))
        );
        assert_eq!(verify(Some(&two), body, &["whsec_new"], NOW, 300), Ok(0));
        // v0 and unknown schemes are ignored.
        let with_v0 = format!("{h},v0=abc,x=1");
        assert_eq!(verify(Some(&with_v0), body, &["whsec_new"], NOW, 300), Ok(0));
    }

    #[test]
    fn refuses_each_kind_of_bad_signature() {
        let body = b"{}";
        let good = header_for("whsec_a", NOW, body);
        assert_eq!(verify(None, body, &["whsec_a"], NOW, 300), Err(SignatureError::Missing));
        assert_eq!(verify(Some(&good), body, &["whsec_b"], NOW, 300), Err(SignatureError::Mismatch));
        assert_eq!(verify(Some(&good), b"{} ", &["whsec_a"], NOW, 300), Err(SignatureError::Mismatch));
        assert_eq!(
            verify(Some(&good), body, &["whsec_a"], NOW + 301, 300),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(
            verify(Some(&good), body, &["whsec_a"], NOW - 301, 300),
            Err(SignatureError::OutsideTolerance)
        );
        assert_eq!(verify(Some(&good), body, &["whsec_a"], NOW + 300, 300), Ok(0));
        for bad in [
            "",
            "t=1",
            "v1=00",
            "t=abc,v1=00",
            &format!("t={NOW},v1=zz"),
            &format!("t={NOW},t={NOW},v1={}", "0".repeat(64)),
            "garbage",
            &format!("t=-5,v1={}", "0".repeat(64)),
        ] {
            assert_eq!(
                verify(Some(bad), body, &["whsec_a"], NOW, 300),
                Err(SignatureError::Malformed),
                "{bad}"
            );
        }
        assert_eq!(verify(Some(&good), body, &[], NOW, 300), Err(SignatureError::Mismatch));
    }

    #[test]
    fn matches_stripes_published_scheme() {
        // Computed independently: HMAC-SHA256(key="whsec_test_secret", "1614556800.{\"id\":\"evt_test\"}").
        let body = br#"{"id":"evt_test"}"#;
        let sig = expected_signature("whsec_test_secret", 1_614_556_800, body);
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_test_secret").unwrap();
        mac.update(b"1614556800.{\"id\":\"evt_test\"}");
        assert_eq!(sig.to_vec(), mac.finalize().into_bytes().to_vec());
    }

    proptest! {
        #[test]
        fn parse_never_panics(header in ".{0,300}") {
            let _ = parse_header(&header);
        }

        #[test]
        fn a_signature_verifies_only_for_its_own_body(body in proptest::collection::vec(any::<u8>(), 0..512), flip in 0usize..512, t in 1i64..4_000_000_000) {
            let h = header_for("whsec_prop", t, &body);
            prop_assert_eq!(verify(Some(&h), &body, &["whsec_prop"], t, 300), Ok(0));
            if !body.is_empty() {
                let mut tampered = body.clone();
                let i = flip % tampered.len();
                tampered[i] ^= 0x01;
                prop_assert_eq!(verify(Some(&h), &tampered, &["whsec_prop"], t, 300), Err(SignatureError::Mismatch));
            }
        }

        #[test]
        fn tolerance_is_symmetric(skew in -1000i64..1000) {
            let h = header_for("whsec_t", NOW, b"x");
            let result = verify(Some(&h), b"x", &["whsec_t"], NOW + skew, 300);
            if skew.abs() <= 300 { prop_assert_eq!(result, Ok(0)); } else { prop_assert_eq!(result, Err(SignatureError::OutsideTolerance)); }
        }
    }
}
