//! Rate limits: per API key, per client address (and who the client is
//! behind a proxy), on failed webhooks, and shared through Redis by several
//! instances, with the local fallback when Redis is gone or hangs.

use std::time::{Duration, Instant};

use tollgate::config::ConnectionUrl;
use tollgate::Config;

use crate::helpers::*;

/// The Redis the shared-limit tests use (`TEST_REDIS_URL`, default the local one).
fn test_redis_url() -> String {
    std::env::var("TEST_REDIS_URL")
        .ok()
        .filter(|u| !u.is_empty())
        .unwrap_or_else(|| "redis://127.0.0.1:6379".to_owned())
}

/// A key prefix of its own, so tests running at once never share a bucket.
fn unique_prefix() -> String {
    format!("tollgate-test:{}:", ulid::Ulid::new().to_string().to_lowercase())
}

fn header(resp: &reqwest::Response, name: &str) -> Option<u64> {
    resp.headers().get(name).map(|v| v.to_str().unwrap().parse().expect("an integer header"))
}

/// Per key only: 1 request/s after a burst of `burst`.
fn per_key_only(c: &mut Config, burst: u32) {
    c.rate_limit_per_key = 1;
    c.rate_limit_per_ip = 0;
    c.rate_limit_burst = burst;
}

/// Sends requests (through `send`, given the attempt number) until one is
/// refused; returns how many were allowed first, and the refusal. Fails on
/// anything but 200 or 429, or if nothing is refused within `max`.
async fn allowed_until_refused<F, Fut>(max: usize, mut send: F) -> (usize, reqwest::Response)
where
    F: FnMut(usize) -> Fut,
    Fut: std::future::Future<Output = reqwest::Result<reqwest::Response>>,
{
    for n in 0..max {
        let resp = send(n).await.expect("a response");
        match resp.status().as_u16() {
            200 => {}
            429 => return (n, resp),
            other => panic!("request {n}: unexpected status {other}"),
        }
    }
    panic!("no request was refused within {max}");
}

/// The most a GCRA may allow in `elapsed`: the burst, plus what refilled.
fn most_allowed(burst: usize, per_second: usize, elapsed: Duration) -> usize {
    burst + per_second * (elapsed.as_secs() as usize + 1)
}

#[tokio::test]
async fn an_api_key_over_its_limit_gets_429_with_retry_after_and_ratelimit_headers() {
    let app = spawn_app_with(|c| per_key_only(c, 3)).await;

    let first = app.get("/v1/products", &app.read_key).send().await.unwrap();
    assert_eq!(first.status(), 200);
    assert_eq!(header(&first, "ratelimit-limit"), Some(3));
    assert_eq!(header(&first, "ratelimit-remaining"), Some(2));
    assert!(header(&first, "ratelimit-reset").is_some_and(|s| (1..=3).contains(&s)));

    let started = Instant::now();
    let (allowed, refused) =
        allowed_until_refused(20, |_| app.get("/v1/products", &app.read_key).send()).await;
    let total = allowed + 1;
    assert!((3..=most_allowed(3, 1, started.elapsed())).contains(&total), "{total} allowed");
    assert_eq!(header(&refused, "retry-after"), Some(1), "whole seconds, at least 1, at 1 request/s");
    assert_eq!(header(&refused, "ratelimit-remaining"), Some(0));
    assert_eq!(header(&refused, "ratelimit-limit"), Some(3));
    let error = expect_error(refused, 429, "rate_limit_error", "rate_limited").await;
    assert!(error["message"].as_str().unwrap().contains("API key"), "{error}");

    // Another key has its own allowance.
    let other = app.get("/v1/products", &app.write_key).send().await.unwrap();
    assert_eq!(other.status(), 200);
    assert_eq!(header(&other, "ratelimit-remaining"), Some(2));
}

#[tokio::test]
async fn the_address_limit_covers_unauthenticated_requests_but_not_operational_endpoints() {
    let app = spawn_app_with(|c| {
        c.rate_limit_per_key = 0;
        c.rate_limit_per_ip = 1;
        c.rate_limit_burst = 2;
    })
    .await;
    // Bad keys are answered 401 until the address is limited.
    let started = Instant::now();
    let mut unauthenticated = 0;
    let refused = loop {
        let resp = app.client.get(app.url("/v1/products")).bearer_auth("tg_test_wrong").send().await.unwrap();
        match resp.status().as_u16() {
            401 => {
                assert_eq!(header(&resp, "ratelimit-limit"), Some(2));
                unauthenticated += 1;
                assert!(unauthenticated <= 20, "never limited");
            }
            429 => break resp,
            other => panic!("unexpected status {other}"),
        }
    };
    assert!((2..=most_allowed(2, 1, started.elapsed())).contains(&unauthenticated), "{unauthenticated}");
    expect_error(refused, 429, "rate_limit_error", "rate_limited").await;

    // A valid key from the limited address is refused too, before the database is asked.
    let resp = app.get("/v1/products", &app.read_key).send().await.unwrap();
    assert!(header(&resp, "retry-after").is_some_and(|s| s >= 1));
    expect_error(resp, 429, "rate_limit_error", "rate_limited").await;

    for path in ["/livez", "/readyz", "/health", "/metrics", "/openapi.json"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        assert_eq!(resp.status(), 200, "{path} is not limited");
        assert!(resp.headers().get("ratelimit-limit").is_none(), "{path} carries no limit headers");
    }
}

#[tokio::test]
async fn zero_turns_the_limits_off_and_defaults_report_the_burst() {
    let off = spawn_app_with(|c| {
        c.rate_limit_per_key = 0;
        c.rate_limit_per_ip = 0;
        c.rate_limit_burst = 1;
    })
    .await;
    for _ in 0..30 {
        let resp = off.get("/v1/products", &off.read_key).send().await.unwrap();
        assert_eq!(resp.status(), 200);
        assert!(resp.headers().get("ratelimit-limit").is_none());
    }

    let defaults = spawn_app().await;
    let resp = defaults.get("/v1/products", &defaults.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(header(&resp, "ratelimit-limit"), Some(200));
    assert_eq!(header(&resp, "ratelimit-remaining"), Some(199));
}

#[tokio::test]
async fn x_forwarded_for_names_the_client_only_behind_a_trusted_proxy() {
    let limits = |c: &mut Config| {
        c.rate_limit_per_key = 0;
        c.rate_limit_per_ip = 1;
        c.rate_limit_burst = 1;
    };
    let behind_proxy = spawn_app_with(|c| {
        limits(c);
        c.trusted_proxies = vec!["127.0.0.0/8".to_owned()];
    })
    .await;
    let from = |app: &TestApp, client: &str| {
        app.get("/v1/products", &app.read_key).header("x-forwarded-for", client.to_owned()).send()
    };
    assert_eq!(from(&behind_proxy, "203.0.113.1").await.unwrap().status(), 200);
    assert_eq!(from(&behind_proxy, "203.0.113.1").await.unwrap().status(), 429);
    assert_eq!(from(&behind_proxy, "203.0.113.2").await.unwrap().status(), 200, "another client");
    // A client cannot escape by forging an entry in front of the proxy's.
    assert_eq!(from(&behind_proxy, "198.51.100.9, 203.0.113.1").await.unwrap().status(), 429);

    // Not behind a trusted proxy: the header is anyone's to forge, and ignored.
    let direct = spawn_app_with(limits).await;
    assert_eq!(from(&direct, "203.0.113.1").await.unwrap().status(), 200);
    assert_eq!(from(&direct, "203.0.113.2").await.unwrap().status(), 429);
}

#[tokio::test]
async fn failed_webhooks_are_limited_at_the_configured_rate() {
    let app = spawn_app_with(|c| {
        c.stripe_webhook_secret = Some(secrecy::SecretString::from("whsec_limits".to_owned()));
        c.rate_limit_webhook_failures = 3;
    })
    .await;
    let mut statuses = Vec::new();
    for _ in 0..4 {
        let resp = app
            .client
            .post(app.url("/webhooks/stripe"))
            .header("stripe-signature", "t=1,v1=00")
            .body("{}")
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
        if resp.status() == 429 {
            // 3 a minute: the next failure is allowed 20 s after the first.
            assert!(header(&resp, "retry-after").is_some_and(|s| (1..=20).contains(&s)));
            expect_error(resp, 429, "rate_limit_error", "too_many_failed_webhooks").await;
        }
    }
    assert_eq!(statuses, [400, 400, 400, 429]);
}

/// Two instances, one database and one Redis: the allowance is the sum, not
/// twice it, for API keys and for failed webhooks alike.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_instances_on_one_redis_share_the_limit() {
    let prefix = unique_prefix();
    let shared = |c: &mut Config| {
        per_key_only(c, 4);
        c.redis_url = Some(ConnectionUrl::new(test_redis_url()));
        c.redis_key_prefix = prefix.clone();
        // Generous, so a busy test machine never falls back and hides sharing.
        c.rate_limit_redis_timeout_ms = 2000;
        c.stripe_webhook_secret = Some(secrecy::SecretString::from("whsec_limits".to_owned()));
        c.rate_limit_webhook_failures = 4;
    };
    let a = spawn_app_with(shared).await;
    let db_url = a.db.url.clone();
    let b = spawn_app_with(|c| {
        shared(c);
        c.database_url = ConnectionUrl::new(db_url);
    })
    .await;
    let instances = [&a, &b];

    // One key, used alternately on both instances.
    let started = Instant::now();
    let (allowed, refused) = allowed_until_refused(20, |n| {
        let app = instances[n % 2];
        app.client.get(app.url("/v1/products")).bearer_auth(&a.read_key).send()
    })
    .await;
    let most = most_allowed(4, 1, started.elapsed());
    assert!((4..=most).contains(&allowed), "{allowed} allowed across both; at most {most} if shared");
    expect_error(refused, 429, "rate_limit_error", "rate_limited").await;

    // Failed webhooks from one address, alternately on both.
    let mut statuses = Vec::new();
    for n in 0..6 {
        let app = instances[n % 2];
        let resp = app
            .client
            .post(app.url("/webhooks/stripe"))
            .header("stripe-signature", "t=1,v1=00")
            .body("{}")
            .send()
            .await
            .unwrap();
        statuses.push(resp.status().as_u16());
    }
    assert_eq!(statuses, [400, 400, 400, 400, 429, 429]);

    // The counts live in Redis, under this test's prefix.
    let client = redis::Client::open(test_redis_url()).unwrap();
    let mut conn = client.get_multiplexed_async_connection().await.unwrap();
    let keys: Vec<String> =
        redis::cmd("KEYS").arg(format!("{prefix}*")).query_async(&mut conn).await.unwrap();
    assert!(keys.iter().any(|k| k.starts_with(&format!("{prefix}ratelimit:key:"))), "{keys:?}");
    assert!(keys.iter().any(|k| k == &format!("{prefix}ratelimit:webhook_failures:127.0.0.1")), "{keys:?}");
    let ttl: i64 = redis::cmd("PTTL").arg(&keys[0]).query_async(&mut conn).await.unwrap();
    assert!(ttl > 0, "limit keys expire");
}

/// Redis refusing connections, or accepting and never answering: requests
/// are still limited, by the instance's own limiter, and never fail.
#[tokio::test]
async fn without_an_answering_redis_the_local_limiter_takes_over() {
    let closed_port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let silent = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let silent_port = silent.local_addr().unwrap().port();
    let hold = tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = silent.accept().await {
            held.push(socket);
        }
    });

    for port in [closed_port, silent_port] {
        let app = spawn_app_with(|c| {
            per_key_only(c, 2);
            c.redis_url = Some(ConnectionUrl::new(format!("redis://127.0.0.1:{port}")));
            c.redis_key_prefix = unique_prefix();
        })
        .await;
        let started = Instant::now();
        let (allowed, refused) = allowed_until_refused(20, |_| async {
            let sent = Instant::now();
            let resp = app.get("/v1/products", &app.read_key).send().await;
            assert!(sent.elapsed() < Duration::from_secs(2), "a dead Redis must not stall requests");
            resp
        })
        .await;
        assert!((2..=most_allowed(2, 1, started.elapsed())).contains(&allowed), "port {port}: {allowed}");
        expect_error(refused, 429, "rate_limit_error", "rate_limited").await;
        let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
        assert!(metrics.contains("rate_limit_redis_fallback_total"), "the fallback is counted");
        assert!(metrics.contains("rate_limited_total{scope=\"key\"}"), "refusals are counted");
    }
    hold.abort();
}

/// The Redis script and the local limiter make the same decisions.
#[tokio::test]
async fn redis_decisions_match_the_local_ones() {
    use tollgate::ratelimit::{Limiter, Policy, Scope, SharedStore};
    let client = redis::Client::open(test_redis_url()).unwrap();
    let shared = std::sync::Arc::new(SharedStore::new(client, &unique_prefix(), Duration::from_secs(2)));
    let policy = Policy::per_second(1, 3).unwrap();
    let remote = Limiter::new(Scope::ApiKey, policy, Some(shared));
    let local = Limiter::new(Scope::ApiKey, policy, None);
    let key = "key_same".to_owned();
    for expected_remaining in [2, 1, 0] {
        let (r, l) = (remote.check(&key).await, local.check(&key).await);
        assert!(r.allowed && l.allowed);
        assert_eq!((r.limit, r.remaining), (3, expected_remaining));
        assert_eq!((l.limit, l.remaining), (3, expected_remaining));
        assert_eq!(r.reset_seconds(), l.reset_seconds());
    }
    let (r, l) = (remote.check(&key).await, local.check(&key).await);
    assert!(!r.allowed && !l.allowed);
    for d in [r, l] {
        assert!(
            d.retry_after > Duration::from_millis(500) && d.retry_after <= Duration::from_secs(1),
            "{d:?}"
        );
        assert_eq!((d.remaining, d.retry_after_seconds()), (0, 1));
        assert!(d.reset_seconds() >= 3, "{d:?}");
    }
}

/// A Redis that comes back is used again: the circuit lets one check
/// through after a second, and it reconnects.
#[tokio::test]
async fn shared_limits_resume_when_redis_comes_back() {
    use tollgate::ratelimit::{Policy, Scope, SharedStore};
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let client = redis::Client::open(format!("redis://127.0.0.1:{port}")).unwrap();
    let shared = SharedStore::new(client, &unique_prefix(), Duration::from_millis(200));
    let policy = Policy::per_second(10, 10).unwrap();

    assert_eq!(shared.check(Scope::Address, "203.0.113.1", policy).await, Err("error"));
    assert_eq!(
        shared.check(Scope::Address, "203.0.113.1", policy).await,
        Err("circuit_open"),
        "no second attempt while the circuit is open"
    );

    struct Child(std::process::Child);
    impl Drop for Child {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let _redis = Child(
        std::process::Command::new("redis-server")
            .args(["--port", &port.to_string(), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"])
            .stdout(std::process::Stdio::null())
            .spawn()
            .expect("redis-server on PATH"),
    );
    let decision = eventually(Duration::from_secs(10), || async {
        shared.check(Scope::Address, "203.0.113.1", policy).await.ok()
    })
    .await;
    assert!(decision.allowed && decision.remaining == 9, "a fresh shared bucket: {decision:?}");
}
