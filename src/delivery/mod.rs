//! Outbound webhooks to the application (SPEC 5): canonical events signed
//! the Standard Webhooks way, retried on a fixed schedule, in order per
//! customer per endpoint, and never sent where server-side request forgery
//! could reach in production.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

pub mod declared;
pub mod listen;
pub mod signing;
pub mod worker;

/// Delays before the second to the eighth attempt (the first is
/// immediate); after the eighth failure a delivery is dead.
pub const RETRY_SCHEDULE: [Duration; 7] = [
    Duration::from_secs(5),
    Duration::from_secs(5 * 60),
    Duration::from_secs(30 * 60),
    Duration::from_secs(2 * 3600),
    Duration::from_secs(5 * 3600),
    Duration::from_secs(10 * 3600),
    Duration::from_secs(10 * 3600),
];

/// Where endpoints may point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TargetPolicy {
    /// Production without `ALLOW_PRIVATE_WEBHOOK_TARGETS`: https only, and
    /// only public addresses.
    pub strict: bool,
}

impl TargetPolicy {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self { strict: config.is_production() && !config.allow_private_webhook_targets }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TargetError {
    #[error("url must be an absolute http:// or https:// URL")]
    Invalid,
    #[error("url must use https in production")]
    NotHttps,
    #[error("url must not carry credentials")]
    Credentials,
    #[error("url resolves to a loopback, private or link-local address ({0}); set ALLOW_PRIVATE_WEBHOOK_TARGETS=true to allow it")]
    Private(IpAddr),
    #[error("url's host could not be resolved")]
    Unresolvable,
}

/// Checks what can be checked without DNS: scheme, shape, and an address
/// written in the URL itself.
pub fn check_url(raw: &str, policy: TargetPolicy) -> Result<reqwest::Url, TargetError> {
    let url = reqwest::Url::parse(raw).map_err(|_| TargetError::Invalid)?;
    match url.scheme() {
        "https" => {}
        "http" if !policy.strict => {}
        "http" => return Err(TargetError::NotHttps),
        _ => return Err(TargetError::Invalid),
    }
    if !url.username().is_empty() || url.password().is_some() {
        return Err(TargetError::Credentials);
    }
    if let Some(ip) = literal_ip(&url)? {
        check_ip(ip, policy)?;
    }
    Ok(url)
}

/// At creation: the URL's checks and every address its host resolves to now.
pub async fn check_target(raw: &str, policy: TargetPolicy) -> Result<reqwest::Url, TargetError> {
    let url = check_url(raw, policy)?;
    if !policy.strict {
        return Ok(url);
    }
    if literal_ip(&url)?.is_none() {
        let host = url.host_str().ok_or(TargetError::Invalid)?;
        let port = url.port_or_known_default().unwrap_or(443);
        let addrs: Vec<SocketAddr> =
            tokio::net::lookup_host((host, port)).await.map_err(|_| TargetError::Unresolvable)?.collect();
        if addrs.is_empty() {
            return Err(TargetError::Unresolvable);
        }
        for addr in addrs {
            check_ip(addr.ip(), policy)?;
        }
    }
    Ok(url)
}

/// The address written in the URL, if its host is one (reqwest connects to
/// those without asking the resolver).
fn literal_ip(url: &reqwest::Url) -> Result<Option<IpAddr>, TargetError> {
    let host = url.host_str().filter(|h| !h.is_empty()).ok_or(TargetError::Invalid)?;
    Ok(host.trim_start_matches('[').trim_end_matches(']').parse().ok())
}

pub fn check_ip(ip: IpAddr, policy: TargetPolicy) -> Result<(), TargetError> {
    if policy.strict && !is_public(ip) {
        return Err(TargetError::Private(ip));
    }
    Ok(())
}

/// Whether an address is on the public internet: not loopback, private,
/// link-local, shared (CGNAT), unspecified, multicast or broadcast, in
/// either family (IPv4-mapped IPv6 addresses are judged as IPv4).
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, ..] = v4.octets();
            !(v4.is_loopback()
                || v4.is_private()
                || v4.is_link_local()
                || v4.is_unspecified()
                || v4.is_broadcast()
                || v4.is_multicast()
                || v4.is_documentation()
                || a == 0
                || (a == 100 && (64..128).contains(&b)))
        }
        IpAddr::V6(v6) => {
            if let Some(v4) = v6.to_ipv4_mapped() {
                return is_public(IpAddr::V4(v4));
            }
            let first = v6.segments()[0];
            !(v6.is_loopback()
                || v6.is_unspecified()
                || v6.is_multicast()
                || (first & 0xfe00) == 0xfc00
                || (first & 0xffc0) == 0xfe80)
        }
    }
}

/// Resolves hostnames and drops every address the policy forbids, so the
/// check happens on the address actually connected to: a name that
/// resolved to a public address at creation cannot be re-pointed at an
/// internal one later (DNS rebinding). reqwest offers the hook; the policy
/// is ours.
struct GuardedResolver {
    policy: TargetPolicy,
}

impl reqwest::dns::Resolve for GuardedResolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let policy = self.policy;
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let all: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> =
                all.iter().copied().filter(|a| check_ip(a.ip(), policy).is_ok()).collect();
            if allowed.is_empty() {
                let err: Box<dyn std::error::Error + Send + Sync> = match all.first() {
                    Some(a) => Box::new(TargetError::Private(a.ip())),
                    None => Box::new(TargetError::Unresolvable),
                };
                return Err(err);
            }
            let addrs: reqwest::dns::Addrs = Box::new(allowed.into_iter());
            Ok(addrs)
        })
    }
}

/// The HTTP client deliveries go through: no redirects (a 3xx is a
/// failure, not an invitation elsewhere), no proxy from the environment (it
/// would bypass the address check), the policy's resolver, and the timeout.
pub fn client(policy: TargetPolicy, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .no_proxy()
        .dns_resolver(Arc::new(GuardedResolver { policy }))
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .pool_idle_timeout(Duration::from_secs(60))
        .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
        .build()
}

/// The body sent for an event. Documented in README ("Webhooks to your
/// application").
pub fn body(event_id: &str, event_type: &str, created: i64, customer: Option<&str>, data: &str) -> Vec<u8> {
    let data: serde_json::Value = serde_json::from_str(data).unwrap_or(serde_json::Value::Null);
    serde_json::to_vec(&serde_json::json!({
        "id": event_id,
        "type": event_type,
        "created": created,
        "customer": customer,
        "data": data,
    }))
    .unwrap_or_default()
}

/// The canonical event types an endpoint may subscribe to.
pub const EVENT_TYPES: &[&str] = &[
    "checkout.completed",
    "order.paid",
    "order.refunded",
    "order.disputed",
    "order.dispute_closed",
    "subscription.created",
    "subscription.updated",
    "subscription.canceled",
    "invoice.paid",
    "invoice.payment_failed",
    "entitlements.updated",
];

/// An endpoint's event filter as stored: known types only, sorted and
/// deduplicated, `["*"]` when it names all (absent: all). The error says
/// what is wrong, for the API and for the config file alike.
pub fn normalize_events(events: Option<Vec<String>>) -> Result<Vec<String>, String> {
    let mut events = events.unwrap_or_else(|| vec!["*".to_owned()]);
    if events.is_empty() {
        return Err("events must list at least one type, or \"*\".".to_owned());
    }
    if let Some(bad) = events.iter().find(|t| *t != "*" && !EVENT_TYPES.contains(&t.as_str())) {
        return Err(format!(
            "Unknown event type '{bad}'; expected \"*\" or one of {}.",
            EVENT_TYPES.join(", ")
        ));
    }
    events.sort();
    events.dedup();
    if events.iter().any(|t| t == "*") {
        events = vec!["*".to_owned()];
    }
    Ok(events)
}

/// The URL rules shared by the API and the config file: length, no
/// control characters, then [`check_target`].
pub async fn check_endpoint_url(raw: &str, policy: TargetPolicy) -> Result<reqwest::Url, String> {
    if raw.len() > 2048 || raw.chars().any(char::is_control) {
        return Err("url must be at most 2048 characters.".to_owned());
    }
    check_target(raw, policy).await.map_err(|e| format!("{e}."))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_filters_are_checked_and_normalised() {
        assert_eq!(normalize_events(None).unwrap(), ["*"]);
        assert_eq!(
            normalize_events(Some(vec!["order.paid".into(), "invoice.paid".into(), "order.paid".into()]))
                .unwrap(),
            ["invoice.paid", "order.paid"]
        );
        assert_eq!(normalize_events(Some(vec!["order.paid".into(), "*".into()])).unwrap(), ["*"]);
        assert!(normalize_events(Some(vec![])).is_err());
        assert!(normalize_events(Some(vec!["order.shipped".into()])).unwrap_err().contains("order.shipped"));
    }

    const STRICT: TargetPolicy = TargetPolicy { strict: true };
    const LAX: TargetPolicy = TargetPolicy { strict: false };

    #[test]
    fn production_refuses_http_and_private_literals() {
        assert_eq!(check_url("http://example.com/hook", STRICT), Err(TargetError::NotHttps));
        assert!(check_url("https://example.com/hook", STRICT).is_ok());
        for bad in [
            "https://127.0.0.1/",
            "https://10.1.2.3/",
            "https://192.168.0.1/",
            "https://172.16.5.4/",
            "https://169.254.169.254/latest/meta-data",
            "https://[::1]/",
            "https://[fe80::1]/",
            "https://[fd00::1]/",
            "https://[::ffff:127.0.0.1]/",
            "https://0.0.0.0/",
            "https://100.64.0.1/",
        ] {
            assert!(matches!(check_url(bad, STRICT), Err(TargetError::Private(_))), "{bad}");
        }
        assert_eq!(check_url("https://u:p@example.com/", STRICT), Err(TargetError::Credentials));
        assert_eq!(check_url("ftp://example.com/", STRICT), Err(TargetError::Invalid));
        assert_eq!(check_url("not a url", STRICT), Err(TargetError::Invalid));
    }

    #[test]
    fn development_allows_local_http() {
        assert!(check_url("http://127.0.0.1:9000/hook", LAX).is_ok());
        assert!(check_url("https://8.8.8.8/", STRICT).is_ok());
    }

    #[tokio::test]
    async fn production_refuses_names_that_resolve_to_loopback() {
        assert!(matches!(check_target("https://localhost/hook", STRICT).await, Err(TargetError::Private(_))));
        assert!(check_target("http://localhost/hook", LAX).await.is_ok());
    }

    #[test]
    fn the_schedule_is_the_specs() {
        let secs: Vec<u64> = RETRY_SCHEDULE.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [5, 300, 1800, 7200, 18000, 36000, 36000]);
    }
}
