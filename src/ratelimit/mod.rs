//! Rate limits: per API key and per client address on `/v1`, and on failed
//! webhook signatures per address.
//!
//! Every limit is a GCRA (a token bucket without a timer): `burst` requests
//! at once, then one every `interval`. Each instance has a local limiter
//! (governor). With Redis configured the count lives in Redis instead, so
//! several instances share one allowance; when Redis cannot answer in time,
//! the instance falls back to its local limiter (logged, and counted in
//! `rate_limit_redis_fallback_total`) rather than refusing everything or
//! limiting nothing.

use std::fmt::Display;
use std::hash::Hash;
use std::net::IpAddr;
use std::num::NonZeroU32;
use std::sync::Arc;
use std::time::Duration;

use governor::clock::{Clock, DefaultClock};
use governor::middleware::StateInformationMiddleware;
use governor::state::keyed::DefaultKeyedStateStore;
use governor::{Quota, RateLimiter};

use crate::config::Config;

pub mod shared;

pub use shared::SharedStore;

/// What a limit guards, used in Redis keys and as the `scope` label of
/// `rate_limited_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    ApiKey,
    Address,
    WebhookFailures,
}

impl Scope {
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::ApiKey => "key",
            Scope::Address => "ip",
            Scope::WebhookFailures => "webhook_failures",
        }
    }
}

/// `burst` requests at once, then one per `interval`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Policy {
    pub interval: Duration,
    pub burst: NonZeroU32,
}

impl Policy {
    /// `None` when `per_second` is 0: the limit is off.
    pub fn per_second(per_second: u32, burst: u32) -> Option<Self> {
        let per_second = NonZeroU32::new(per_second)?;
        Some(Policy {
            interval: Duration::from_nanos(1_000_000_000 / u64::from(per_second.get()))
                .max(Duration::from_micros(1)),
            burst: NonZeroU32::new(burst.max(1)).expect("at least 1"),
        })
    }

    /// `n` per minute, all of which may come at once.
    pub fn per_minute(n: u32) -> Option<Self> {
        let n = NonZeroU32::new(n)?;
        Some(Policy { interval: Duration::from_secs(60) / n.get(), burst: n })
    }

    fn quota(&self) -> Quota {
        Quota::with_period(self.interval).expect("interval is non-zero").allow_burst(self.burst)
    }

    /// Time until an emptied-by-`used` bucket is full again.
    fn refill(&self, used: u32) -> Duration {
        self.interval * used
    }
}

/// The outcome of one check, with what the `RateLimit-*` headers report.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Decision {
    pub allowed: bool,
    /// The bucket size.
    pub limit: u32,
    /// Requests that would be allowed right now, after this one.
    pub remaining: u32,
    /// When refused: how long until one request would be allowed.
    pub retry_after: Duration,
    /// How long until the bucket is full again.
    pub reset_after: Duration,
}

impl Decision {
    /// Whole seconds for `Retry-After`: rounded up, at least 1.
    pub fn retry_after_seconds(&self) -> u64 {
        ceil_seconds(self.retry_after).max(1)
    }

    pub fn reset_seconds(&self) -> u64 {
        ceil_seconds(self.reset_after)
    }
}

fn ceil_seconds(d: Duration) -> u64 {
    d.as_secs() + u64::from(d.subsec_nanos() > 0)
}

type LocalLimiter<K> = RateLimiter<K, DefaultKeyedStateStore<K>, DefaultClock, StateInformationMiddleware>;

/// One keyed limit, local or shared through Redis.
pub struct Limiter<K: Hash + Eq + Clone> {
    scope: Scope,
    policy: Policy,
    local: LocalLimiter<K>,
    shared: Option<Arc<SharedStore>>,
}

impl<K: Hash + Eq + Clone + Display> Limiter<K> {
    pub fn new(scope: Scope, policy: Policy, shared: Option<Arc<SharedStore>>) -> Self {
        let local = RateLimiter::keyed(policy.quota()).with_middleware::<StateInformationMiddleware>();
        Limiter { scope, policy, local, shared }
    }

    pub fn policy(&self) -> Policy {
        self.policy
    }

    /// Counts one request for `key` and says whether it may proceed.
    pub async fn check(&self, key: &K) -> Decision {
        let decision = match &self.shared {
            Some(shared) => match shared.check(self.scope, &key.to_string(), self.policy).await {
                Ok(decision) => decision,
                Err(reason) => {
                    metrics::counter!("rate_limit_redis_fallback_total", "reason" => reason).increment(1);
                    self.check_local(key)
                }
            },
            None => self.check_local(key),
        };
        self.counted(decision)
    }

    /// Whether this limiter decides in this process alone (no shared
    /// store), so that [`check_here`](Self::check_here) stands for
    /// [`check`](Self::check) without waiting.
    pub fn is_local(&self) -> bool {
        self.shared.is_none()
    }

    /// Counts one request for `key` in this process's buckets.
    pub fn check_here(&self, key: &K) -> Decision {
        self.counted(self.check_local(key))
    }

    fn counted(&self, decision: Decision) -> Decision {
        if !decision.allowed {
            metrics::counter!("rate_limited_total", "scope" => self.scope.as_str()).increment(1);
        }
        decision
    }

    fn check_local(&self, key: &K) -> Decision {
        let limit = self.policy.burst.get();
        match self.local.check_key(key) {
            Ok(snapshot) => {
                let remaining = snapshot.remaining_burst_capacity();
                Decision {
                    allowed: true,
                    limit,
                    remaining,
                    retry_after: Duration::ZERO,
                    reset_after: self.policy.refill(limit - remaining),
                }
            }
            Err(not_until) => {
                let retry_after = not_until.wait_time_from(self.local.clock().now());
                Decision {
                    allowed: false,
                    limit,
                    remaining: 0,
                    retry_after,
                    reset_after: retry_after + self.policy.refill(limit - 1),
                }
            }
        }
    }

    /// Forgets keys whose buckets are full again, so the local state does
    /// not grow with every address ever seen.
    fn prune(&self) {
        self.local.retain_recent();
        self.local.shrink_to_fit();
    }
}

/// The key of a client address: IPv6 clients are limited per /64, the
/// smallest block a single subscriber is usually given, so one machine
/// cannot dodge its limit by rotating through its own addresses.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct AddressKey(IpAddr);

impl AddressKey {
    pub fn new(ip: IpAddr) -> Self {
        match ip {
            IpAddr::V4(_) => AddressKey(ip),
            IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
                Some(v4) => AddressKey(IpAddr::V4(v4)),
                None => {
                    let masked = u128::from(v6) & !((1u128 << 64) - 1);
                    AddressKey(IpAddr::V6(masked.into()))
                }
            },
        }
    }
}

impl Display for AddressKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.0 {
            IpAddr::V4(ip) => write!(f, "{ip}"),
            IpAddr::V6(ip) => write!(f, "{ip}/64"),
        }
    }
}

/// Every limit of one tollgate process.
pub struct RateLimits {
    /// Per API key id, on authenticated `/v1` requests; `None`: off.
    pub per_key: Option<Limiter<String>>,
    /// Per client address, on every `/v1` request; `None`: off.
    pub per_address: Option<Limiter<AddressKey>>,
    /// Per client address, counting only failed webhook verifications.
    pub webhook_failures: Option<Limiter<AddressKey>>,
}

impl RateLimits {
    pub fn from_config(config: &Config, shared: Option<Arc<SharedStore>>) -> Self {
        let burst = config.rate_limit_burst;
        RateLimits {
            per_key: Policy::per_second(config.rate_limit_per_key, burst)
                .map(|p| Limiter::new(Scope::ApiKey, p, shared.clone())),
            per_address: Policy::per_second(config.rate_limit_per_ip, burst)
                .map(|p| Limiter::new(Scope::Address, p, shared.clone())),
            webhook_failures: Policy::per_minute(config.rate_limit_webhook_failures)
                .map(|p| Limiter::new(Scope::WebhookFailures, p, shared)),
        }
    }

    /// Forgets full buckets; run every minute by `jobs::rate_limits`.
    pub fn prune(&self) {
        if let Some(l) = &self.per_key {
            l.prune();
        }
        if let Some(l) = &self.per_address {
            l.prune();
        }
        if let Some(l) = &self.webhook_failures {
            l.prune();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_local_limit_allows_the_burst_then_refuses_with_a_wait() {
        let limiter = Limiter::new(Scope::ApiKey, Policy::per_second(1, 3).unwrap(), None);
        let key = "key_a".to_owned();
        let remaining: Vec<u32> =
            [limiter.check(&key).await, limiter.check(&key).await, limiter.check(&key).await]
                .iter()
                .inspect(|d| assert!(d.allowed && d.limit == 3))
                .map(|d| d.remaining)
                .collect();
        assert_eq!(remaining, [2, 1, 0]);
        let refused = limiter.check(&key).await;
        assert!(!refused.allowed);
        assert!(
            refused.retry_after > Duration::from_millis(500) && refused.retry_after <= Duration::from_secs(1)
        );
        assert_eq!(refused.retry_after_seconds(), 1);
        assert!(refused.reset_seconds() >= 3);
        assert!(limiter.check(&"key_b".to_owned()).await.allowed, "keys are independent");
    }

    #[tokio::test]
    async fn pruning_forgets_buckets_that_are_full_again() {
        let limiter = Limiter::new(Scope::Address, Policy::per_second(1000, 1).unwrap(), None);
        let busy = Limiter::new(Scope::Address, Policy::per_second(1, 5).unwrap(), None);
        let key = AddressKey::new("203.0.113.1".parse().unwrap());
        limiter.check(&key).await;
        busy.check(&key).await;
        assert_eq!((limiter.local.len(), busy.local.len()), (1, 1));
        // Polled with a deadline: the 1 ms bucket refills almost at once.
        let started = std::time::Instant::now();
        while !limiter.local.is_empty() {
            assert!(started.elapsed() < Duration::from_secs(5), "never pruned");
            tokio::time::sleep(Duration::from_millis(2)).await;
            limiter.prune();
        }
        busy.prune();
        assert_eq!(busy.local.len(), 1, "a bucket still refilling is kept");
    }

    #[test]
    fn zero_turns_a_limit_off() {
        assert_eq!(Policy::per_second(0, 10), None);
        assert_eq!(Policy::per_minute(0), None);
        let p = Policy::per_second(20, 0).unwrap();
        assert_eq!((p.interval, p.burst.get()), (Duration::from_millis(50), 1));
        assert_eq!(Policy::per_minute(60).unwrap().interval, Duration::from_secs(1));
    }

    #[test]
    fn ipv6_clients_share_their_64_and_mapped_ipv4_is_ipv4() {
        let a = AddressKey::new("2001:db8:1:2:aaaa::1".parse().unwrap());
        let b = AddressKey::new("2001:db8:1:2:bbbb::9".parse().unwrap());
        let c = AddressKey::new("2001:db8:1:3::1".parse().unwrap());
        assert_eq!(a, b);
        assert_ne!(a, c);
        assert_eq!(a.to_string(), "2001:db8:1:2::/64");
        let mapped = AddressKey::new("::ffff:203.0.113.9".parse().unwrap());
        assert_eq!(mapped, AddressKey::new("203.0.113.9".parse().unwrap()));
        assert_eq!(mapped.to_string(), "203.0.113.9");
    }

    #[test]
    fn seconds_round_up() {
        let d = Decision {
            allowed: false,
            limit: 1,
            remaining: 0,
            retry_after: Duration::from_millis(1),
            reset_after: Duration::from_millis(1500),
        };
        assert_eq!((d.retry_after_seconds(), d.reset_seconds()), (1, 2));
    }
}
