//! Identifiers.
//!
//! tollgate's own ids are a short type prefix and a ULID (`cust_01J…`): the
//! prefix tells a reader what an id names, and the ULID sorts by creation
//! time, which is what cursor pagination orders by. Ids from outside (the
//! application's `external_id`, catalog keys) are validated newtypes, so no
//! unchecked string travels past the HTTP layer.

use std::cell::Cell;
use std::fmt;
use std::time::{Duration, Instant, SystemTime};

use serde::{Deserialize, Serialize};

/// A newly minted tollgate id with the given prefix (without the underscore).
///
/// Monotonic within the process: ids minted in the same millisecond still
/// sort in minting order, so "ordered by id" means "in the order they
/// happened" for events written one after another.
pub fn new_id(prefix: &str) -> String {
    static GENERATOR: std::sync::Mutex<ulid::Generator> = std::sync::Mutex::new(ulid::Generator::new());
    let ulid = match GENERATOR.lock().ok().and_then(|mut g| g.generate().ok()) {
        Some(ulid) => ulid,
        // Overflow of 2^80 ids in one millisecond, or a poisoned lock: a
        // random id is still unique, just not ordered within the millisecond.
        // (Not `unwrap_or_default`: a default ULID is the nil id.)
        None => ulid::Ulid::new(),
    };
    format!("{prefix}_{ulid}")
}

/// A request id: `req_` and a ULID. Not [`new_id`]: request ids need no
/// order across threads, and `new_id`'s process-wide lock (taken by both
/// server threads on every request) and `format!` were measurable on an
/// entitlement check. Ordered within each thread. Kept on the stack: the
/// edge copies it once, into the header value it answers with. Its time is
/// the request's arrival, `at`, which the edge reads anyway for the
/// request's duration (see [`wall_clock`]).
pub fn new_request_id(at: Instant) -> RequestId {
    thread_local! {
        static GENERATOR: std::cell::RefCell<ulid::Generator> =
            const { std::cell::RefCell::new(ulid::Generator::new()) };
    }
    let time = wall_clock(at);
    let generated =
        GENERATOR.try_with(|g| g.try_borrow_mut().ok().and_then(|mut g| g.generate_from_datetime(time).ok()));
    let ulid = match generated {
        Ok(Some(ulid)) => ulid,
        // As in `new_id`: still unique, just not ordered (and not the nil
        // id that `unwrap_or_default` would give).
        _ => ulid::Ulid::new(),
    };
    let mut text = [0u8; ulid::ULID_LEN];
    ulid.array_to_str(&mut text);
    let mut id = [0u8; REQUEST_ID_LEN];
    id[..4].copy_from_slice(b"req_");
    id[4..].copy_from_slice(&text);
    RequestId(id)
}

const REQUEST_ID_LEN: usize = 4 + ulid::ULID_LEN;

/// The wall-clock time of the monotonic instant `at`, from a reading of
/// both clocks taken on this thread within the last second: a request id's
/// time is for people and ordering, and reading the wall clock for each
/// request was one of the few clock reads left on a cached check. Read
/// again every second, so that a step of the wall clock (NTP, a resumed
/// host) shows in the ids within a second.
fn wall_clock(at: Instant) -> SystemTime {
    thread_local! {
        static ORIGIN: Cell<Option<(Instant, SystemTime)>> = const { Cell::new(None) };
    }
    let read_both = || (Instant::now(), SystemTime::now());
    let (instant, wall) = ORIGIN
        .try_with(|origin| match origin.get() {
            Some(pair) if at.saturating_duration_since(pair.0) < Duration::from_secs(1) => pair,
            _ => {
                let pair = read_both();
                origin.set(Some(pair));
                pair
            }
        })
        .unwrap_or_else(|_| read_both());
    match at.checked_duration_since(instant) {
        Some(since) => wall + since,
        None => wall.checked_sub(instant - at).unwrap_or(wall),
    }
}

/// A request id from [`new_request_id`]: ASCII letters, digits and `_`.
pub struct RequestId([u8; REQUEST_ID_LEN]);

impl RequestId {
    pub fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidId(pub String);

/// The application's own key for a customer: what it already calls its user.
///
/// 1–255 characters of printable ASCII without spaces or `/`: the id travels
/// in URL paths and in provider metadata, both of which mangle anything else.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct ExternalId(String);

impl ExternalId {
    pub const MAX_LEN: usize = 255;

    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        Self::check(raw)?;
        Ok(Self(raw.to_owned()))
    }

    fn check(raw: &str) -> Result<(), InvalidId> {
        if raw.is_empty() || raw.len() > Self::MAX_LEN {
            return Err(InvalidId(format!("external_id must be 1 to {} characters", Self::MAX_LEN)));
        }
        if let Some(bad) = raw.chars().find(|c| !c.is_ascii_graphic() || *c == '/') {
            return Err(InvalidId(format!(
                "external_id may contain printable ASCII other than '/' and spaces; found {bad:?}"
            )));
        }
        Ok(())
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for ExternalId {
    type Error = InvalidId;
    /// Keeps the string it is given: ids from paths and bodies are
    /// already owned, and copying one is an allocation per request.
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::check(&value)?;
        Ok(Self(value))
    }
}

impl From<ExternalId> for String {
    fn from(value: ExternalId) -> Self {
        value.0
    }
}

impl fmt::Display for ExternalId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A key in the catalog file (`pro`, `pro_monthly`, `cards_5`): lowercase
/// letters, digits, `_` and `-`, starting with a letter, at most 64 long.
/// Stable forever, because orders and grants refer to it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct CatalogKey(String);

impl CatalogKey {
    pub fn parse(raw: &str) -> Result<Self, InvalidId> {
        let valid = !raw.is_empty()
            && raw.len() <= 64
            && raw.starts_with(|c: char| c.is_ascii_lowercase())
            && raw.chars().all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-');
        if valid {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidId(format!(
                "{raw:?} is not a valid catalog key: use 1 to 64 lowercase letters, digits, '_' or '-', starting with a letter"
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for CatalogKey {
    type Error = InvalidId;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<CatalogKey> for String {
    fn from(value: CatalogKey) -> Self {
        value.0
    }
}

impl fmt::Display for CatalogKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// Whether a string looks like one of tollgate's ids with this prefix:
/// cheap rejection of garbage cursors before they reach SQL.
pub fn is_tollgate_id(raw: &str, prefix: &str) -> bool {
    raw.strip_prefix(prefix)
        .and_then(|rest| rest.strip_prefix('_'))
        .is_some_and(|ulid| ulid::Ulid::from_string(ulid).is_ok())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn new_ids_sort_by_creation() {
        let a = new_id("cust");
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = new_id("cust");
        assert!(a < b, "{a} should sort before {b}");
        assert!(is_tollgate_id(&a, "cust"));
        assert!(!is_tollgate_id(&a, "ord"));
    }

    #[test]
    fn a_request_ids_time_is_the_wall_clock_at_its_instant() {
        let close = |a: SystemTime, b: SystemTime| {
            a.duration_since(b).or_else(|e| Ok::<_, ()>(e.duration())).unwrap() < Duration::from_millis(200)
        };
        let now = Instant::now();
        assert!(close(wall_clock(now), SystemTime::now()));
        // An instant before the thread's last reading of the clocks.
        let earlier = now - Duration::from_secs(5);
        assert!(close(wall_clock(earlier), SystemTime::now() - Duration::from_secs(5)));
    }

    #[test]
    fn request_ids_are_prefixed_ulids_and_distinct() {
        let text = |id: RequestId| String::from_utf8(id.as_bytes().to_vec()).unwrap();
        let a = text(new_request_id(Instant::now()));
        let b = text(new_request_id(Instant::now()));
        assert!(is_tollgate_id(&a, "req"), "{a}");
        assert_eq!(a, format!("req_{}", ulid::Ulid::from_string(&a[4..]).unwrap()));
        assert!(a < b, "ordered within a thread: {a} {b}");
    }

    #[test]
    fn external_id_rejects_what_breaks_urls() {
        assert!(ExternalId::parse("user_42").is_ok());
        assert!(ExternalId::parse("a@b.example").is_ok());
        assert!(ExternalId::parse("").is_err());
        assert!(ExternalId::parse("has space").is_err());
        assert!(ExternalId::parse("a/b").is_err());
        assert!(ExternalId::parse("é").is_err());
        assert!(ExternalId::parse(&"x".repeat(256)).is_err());
    }

    #[test]
    fn catalog_keys_are_lowercase_slugs() {
        assert!(CatalogKey::parse("pro_monthly").is_ok());
        assert!(CatalogKey::parse("Pro").is_err());
        assert!(CatalogKey::parse("1pro").is_err());
        assert!(CatalogKey::parse("pro monthly").is_err());
    }

    proptest! {
        #[test]
        fn external_id_parse_never_panics_and_round_trips(raw in ".{0,300}") {
            if let Ok(id) = ExternalId::parse(&raw) {
                prop_assert_eq!(id.as_str(), raw.as_str());
            }
        }

        #[test]
        fn catalog_key_parse_never_panics(raw in ".{0,80}") {
            let _ = CatalogKey::parse(&raw);
        }
    }
}
