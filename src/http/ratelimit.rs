//! Rate limits on `/v1`: per client address around authentication (so a
//! flood of bad keys never reaches the database), per API key inside it.
//! Limited routes carry `RateLimit-Limit`, `RateLimit-Remaining` and
//! `RateLimit-Reset` (IETF httpapi draft) for the tighter of the two; a
//! refusal is a 429 `rate_limit_error` with `Retry-After`.

use std::net::{IpAddr, SocketAddr};

use axum::extract::{ConnectInfo, FromRequestParts};
use axum::http::request::Parts;
use axum::http::Extensions;
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use ipnet::IpNet;

use super::error::{ApiError, ErrorType};
use super::AppState;
use crate::ratelimit::{AddressKey, Decision, Limiter};

pub const LIMIT: &str = "ratelimit-limit";
pub const REMAINING: &str = "ratelimit-remaining";
pub const RESET: &str = "ratelimit-reset";

/// The client's address: the peer, or, when the peer is a trusted proxy,
/// the nearest address in `X-Forwarded-For` that is not itself a trusted
/// proxy. Only trusted proxies are believed, since anyone can send the header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ClientAddr(pub IpAddr);

impl ClientAddr {
    fn of(extensions: &Extensions, headers: &HeaderMap, state: &AppState) -> Self {
        // Without connection info (a router driven directly, as in unit
        // tests and the bench) there is no peer; the unspecified address
        // stands for it.
        let peer =
            extensions.get::<ConnectInfo<SocketAddr>>().map_or(IpAddr::from([0, 0, 0, 0]), |c| c.0.ip());
        ClientAddr(client_address(peer, headers, &state.trusted_proxies))
    }
}

impl FromRequestParts<AppState> for ClientAddr {
    type Rejection = std::convert::Infallible;

    async fn from_request_parts(parts: &mut Parts, state: &AppState) -> Result<Self, Self::Rejection> {
        Ok(ClientAddr::of(&parts.extensions, &parts.headers, state))
    }
}

pub fn client_address(peer: IpAddr, headers: &HeaderMap, trusted: &[IpNet]) -> IpAddr {
    let is_trusted = |ip: &IpAddr| trusted.iter().any(|net| net.contains(&canonical(*ip)));
    if !is_trusted(&peer) {
        return peer;
    }
    // Walk from the nearest hop outwards; the first untrusted hop is the
    // client. Hops further out were written by the client and prove nothing.
    let mut client = peer;
    for value in headers.get_all("x-forwarded-for").iter().rev() {
        let Ok(value) = value.to_str() else { return client };
        for hop in value.rsplit(',') {
            let Some(ip) = parse_hop(hop) else { return client };
            if !is_trusted(&ip) {
                return ip;
            }
            client = ip;
        }
    }
    client
}

/// IPv4-mapped IPv6 (`::ffff:10.0.0.1`, what a dual-stack socket reports)
/// compares as the IPv4 address it carries.
fn canonical(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// One `X-Forwarded-For` entry: an address, possibly with a port
/// (`1.2.3.4:5678`, `[2001:db8::1]:443`).
fn parse_hop(hop: &str) -> Option<IpAddr> {
    let hop = hop.trim();
    hop.parse::<IpAddr>().ok().or_else(|| hop.parse::<SocketAddr>().ok().map(|s| s.ip())).map(canonical)
}

/// The limit per client address, on every `/v1` request, authenticated or
/// not: the decision to report on the response (`None`: no such limit), or
/// the refusal.
pub(super) async fn check_address(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Result<Option<Decision>, Refusal> {
    let Some((limiter, address)) = address_limit(state, extensions, headers) else { return Ok(None) };
    // Boxed: without it the limiter's state is part of every `/v1`
    // request's future, limits on or off.
    admit(Box::pin(limiter.check(&address)).await, FROM_ADDRESS)
}

/// The limit per client address and this request's bucket in it (`None`:
/// no such limit).
fn address_limit<'a>(
    state: &'a AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Option<(&'a Limiter<AddressKey>, AddressKey)> {
    let limiter = state.rate_limits.per_address.as_ref()?;
    let ClientAddr(ip) = ClientAddr::of(extensions, headers, state);
    Some((limiter, AddressKey::new(ip)))
}

/// The limit per API key, once authenticated; as [`check_address`].
pub(super) async fn check_key(state: &AppState, key_id: &String) -> Result<Option<Decision>, Refusal> {
    let Some(limiter) = &state.rate_limits.per_key else { return Ok(None) };
    admit(Box::pin(limiter.check(key_id)).await, FOR_KEY)
}

/// Whether both limits above decide without waiting (each off, or kept in
/// this process), so that the `_here` checks below stand for them.
pub(super) fn decided_here(state: &AppState) -> bool {
    let limits = &state.rate_limits;
    limits.per_address.as_ref().is_none_or(|l| l.is_local())
        && limits.per_key.as_ref().is_none_or(|l| l.is_local())
}

/// [`check_address`], when [`decided_here`].
pub(super) fn check_address_here(
    state: &AppState,
    extensions: &Extensions,
    headers: &HeaderMap,
) -> Result<Option<Decision>, Refusal> {
    let Some((limiter, address)) = address_limit(state, extensions, headers) else { return Ok(None) };
    admit(limiter.check_here(&address), FROM_ADDRESS)
}

/// [`check_key`], when [`decided_here`].
pub(super) fn check_key_here(state: &AppState, key_id: &String) -> Result<Option<Decision>, Refusal> {
    let Some(limiter) = &state.rate_limits.per_key else { return Ok(None) };
    admit(limiter.check_here(key_id), FOR_KEY)
}

const FROM_ADDRESS: &str = "from this address";
const FOR_KEY: &str = "for this API key";

fn admit(decision: Decision, whom: &'static str) -> Result<Option<Decision>, Refusal> {
    if !decision.allowed {
        return Err(Refusal { decision, whom });
    }
    Ok(Some(decision))
}

/// A limit's refusal: a 429 with `Retry-After` and the limit's headers.
pub(super) struct Refusal {
    decision: Decision,
    whom: &'static str,
}

impl IntoResponse for Refusal {
    fn into_response(self) -> Response {
        too_many_requests(&self.decision, self.whom)
    }
}

fn too_many_requests(decision: &Decision, whom: &str) -> Response {
    let seconds = decision.retry_after_seconds();
    let mut error = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorType::RateLimitError,
        "rate_limited",
        format!("Too many requests {whom}; retry after {seconds} s."),
    );
    error.retry_after = Some(seconds);
    let mut response = error.into_response();
    report(response.headers_mut(), decision);
    response
}

/// Sets the `RateLimit-*` headers, unless an inner limit already reported
/// fewer remaining requests: clients see whichever limit binds first.
pub(super) fn report(headers: &mut HeaderMap, decision: &Decision) {
    let inner_remaining =
        headers.get(REMAINING).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u32>().ok());
    if inner_remaining.is_some_and(|inner| inner <= decision.remaining) {
        return;
    }
    headers.insert(LIMIT, HeaderValue::from(decision.limit));
    headers.insert(REMAINING, HeaderValue::from(decision.remaining));
    headers.insert(RESET, HeaderValue::from(decision.reset_seconds()));
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(xff: &[&str]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for v in xff {
            h.append("x-forwarded-for", HeaderValue::from_str(v).unwrap());
        }
        h
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn forwarded_for_is_ignored_from_an_untrusted_peer() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        let h = headers(&["203.0.113.7"]);
        assert_eq!(client_address(ip("198.51.100.1"), &h, &trusted), ip("198.51.100.1"));
        assert_eq!(client_address(ip("198.51.100.1"), &h, &[]), ip("198.51.100.1"));
    }

    #[test]
    fn the_nearest_untrusted_hop_is_the_client() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        // The client forged the first entry; the proxies appended the rest.
        let h = headers(&["1.1.1.1, 203.0.113.7", "10.0.0.2"]);
        assert_eq!(client_address(ip("10.0.0.1"), &h, &trusted), ip("203.0.113.7"));
        let h = headers(&["[2001:db8::5]:443, 10.1.1.1:8080"]);
        assert_eq!(client_address(ip("::ffff:10.0.0.1"), &h, &trusted), ip("2001:db8::5"));
    }

    #[test]
    fn junk_or_all_trusted_hops_stop_at_the_last_good_one() {
        let trusted: Vec<IpNet> = vec!["10.0.0.0/8".parse().unwrap()];
        assert_eq!(client_address(ip("10.0.0.1"), &headers(&[]), &trusted), ip("10.0.0.1"));
        assert_eq!(client_address(ip("10.0.0.1"), &headers(&["junk, 10.0.0.3"]), &trusted), ip("10.0.0.3"));
        assert_eq!(client_address(ip("10.0.0.1"), &headers(&["10.0.0.4"]), &trusted), ip("10.0.0.4"));
    }

    #[test]
    fn the_tighter_limit_is_reported() {
        let mut h = HeaderMap::new();
        let d = |remaining| Decision {
            allowed: true,
            limit: 10,
            remaining,
            retry_after: std::time::Duration::ZERO,
            reset_after: std::time::Duration::from_millis(100),
        };
        report(&mut h, &d(3));
        report(&mut h, &d(7));
        assert_eq!(h[REMAINING], "3");
        report(&mut h, &d(1));
        assert_eq!(
            (h[LIMIT].to_str().unwrap(), h[REMAINING].to_str().unwrap(), h[RESET].to_str().unwrap()),
            ("10", "1", "1")
        );
    }
}
