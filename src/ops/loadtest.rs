//! `tollgate loadtest webhooks`: signed ~3 KB Stripe events from N
//! connections for T seconds against a tollgate (its own, in-process, by
//! default), then a check that the inbox holds every acknowledged event.
//!
//! The load generator shares the machine with the server, as SPEC 10 asks.

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

use std::future::IntoFuture;

use crate::config::Config;
use crate::store::audit::Actor;
use crate::webhooks::stripe_signature::expected_signature;

#[derive(Debug, Clone)]
pub struct WebhookLoad {
    pub connections: usize,
    pub duration: Duration,
    pub event_bytes: usize,
    /// An already running tollgate; otherwise one is started in-process.
    pub url: Option<String>,
}

#[derive(Debug, Default)]
struct Tally {
    latencies_us: Vec<u64>,
    statuses: std::collections::BTreeMap<String, u64>,
    acknowledged: Vec<String>,
}

fn event_body(id: &str, created: i64, size: usize) -> Vec<u8> {
    let mut event = serde_json::json!({
        "id": id, "object": "event", "api_version": "2025-10-29.clover", "created": created,
        "data": { "object": { "id": format!("in_{id}"), "object": "invoice", "amount_due": 2500, "currency": "usd",
            "customer": "cus_loadtest", "status": "paid", "metadata": { "padding": "" } } },
        "livemode": false, "pending_webhooks": 1, "request": { "id": null, "idempotency_key": null },
        "type": "invoice.paid",
    });
    let base = serde_json::to_vec(&event).map(|v| v.len()).unwrap_or(0);
    event["data"]["object"]["metadata"]["padding"] = serde_json::json!("x".repeat(size.saturating_sub(base)));
    serde_json::to_vec(&event).unwrap_or_default()
}

fn percentile(sorted: &[u64], p: f64) -> u64 {
    if sorted.is_empty() {
        return 0;
    }
    let rank = ((p / 100.0) * (sorted.len() - 1) as f64).round() as usize;
    sorted[rank.min(sorted.len() - 1)]
}

/// Runs the load and prints the report; an error if the inbox disagrees
/// with what was acknowledged.
pub async fn webhooks(mut config: Config, load: WebhookLoad) -> Result<String, String> {
    const SECRET: &str = "whsec_loadtest_local_secret";
    let shutdown = CancellationToken::new();
    let mut server_task = None;
    let base = match &load.url {
        Some(url) => url.trim_end_matches('/').to_owned(),
        None => {
            config.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET.to_owned()));
            config.database_max_connections = config.database_max_connections.max(16);
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            config.public_url = Some(format!("http://{addr}"));
            let server = crate::app::Server::build(config.clone(), shutdown.clone())
                .await
                .map_err(|e| e.to_string())?;
            server_task = Some(tokio::spawn(server.serve(listener)));
            format!("http://{addr}")
        }
    };
    let secret = match &load.url {
        Some(_) => config
            .stripe_webhook_secrets()
            .first()
            .map(|s| secrecy::ExposeSecret::expose_secret(s).to_owned())
            .ok_or("--url needs STRIPE_WEBHOOK_SECRET, the secret that server verifies with")?,
        None => SECRET.to_owned(),
    };
    let run = ulid::Ulid::new().to_string().to_lowercase();
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(load.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let tally = Arc::new(Mutex::new(Tally::default()));
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..load.connections {
        let (client, tally, stop, base, secret, run) =
            (client.clone(), tally.clone(), stop.clone(), base.clone(), secret.clone(), run.clone());
        let size = load.event_bytes;
        tasks.push(tokio::spawn(async move {
            let mut local = Tally::default();
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let id = format!("evt_load_{run}_{worker}_{n}");
                n += 1;
                let now = crate::store::now_unix();
                let body = event_body(&id, now, size);
                let sig = format!("t={now},v1={}", hex::encode(expected_signature(&secret, now, &body)));
                let sent = Instant::now();
                let result = client
                    .post(format!("{base}/webhooks/stripe"))
                    .header("stripe-signature", sig)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let elapsed = sent.elapsed().as_micros() as u64;
                let status = match result {
                    Ok(resp) => {
                        let s = resp.status();
                        let _ = resp.bytes().await;
                        if s.is_success() {
                            local.acknowledged.push(id);
                        }
                        s.as_u16().to_string()
                    }
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    Err(_) => "connection_error".to_owned(),
                };
                local.latencies_us.push(elapsed);
                *local.statuses.entry(status).or_default() += 1;
            }
            let mut t = tally.lock().await;
            t.latencies_us.extend(local.latencies_us);
            t.acknowledged.extend(local.acknowledged);
            for (k, v) in local.statuses {
                *t.statuses.entry(k).or_default() += v;
            }
        }));
    }
    tokio::time::sleep(load.duration).await;
    stop.store(true, Ordering::Relaxed);
    for t in tasks {
        let _ = t.await;
    }
    let elapsed = started.elapsed().as_secs_f64();
    let mut tally = Arc::try_unwrap(tally).map_err(|_| "tasks still running")?.into_inner();
    tally.latencies_us.sort_unstable();
    let total: u64 = tally.statuses.values().sum();
    let acked = tally.acknowledged.len();

    // Every acknowledged event must be in the inbox.
    let store =
        crate::store::Store::connect(config.database_url.expose(), &crate::app::store_options(&config))
            .await
            .map_err(|e| e.to_string())?;
    let stored: HashSet<String> = store
        .provider_event_ids_with_prefix(&format!("evt_load_{run}_"))
        .await
        .map_err(|e| e.to_string())?
        .into_iter()
        .collect();
    let missing = tally.acknowledged.iter().filter(|id| !stored.contains(*id)).count();
    store.close().await;
    shutdown.cancel();
    if let Some(task) = server_task {
        let _ = task.await;
    }

    let mut report = format!(
        "webhook ingest: {} connections, {:.1} s, ~{} B events, database {}\n\
         requests {total}, acknowledged {acked}, {:.0} acknowledged events/s\n\
         latency p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms\n\
         statuses {:?}\n\
         inbox check: {} acknowledged events stored, {missing} missing, {} stored in all\n",
        load.connections,
        elapsed,
        load.event_bytes,
        crate::store::DbKind::from_url(config.database_url.expose())
            .map(|k| format!("{k:?}"))
            .unwrap_or_default(),
        acked as f64 / elapsed,
        percentile(&tally.latencies_us, 50.0) as f64 / 1000.0,
        percentile(&tally.latencies_us, 99.0) as f64 / 1000.0,
        tally.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
        tally.statuses,
        acked - missing,
        stored.len(),
    );
    if missing > 0 {
        report.push_str("FAILED: acknowledged events are missing from the inbox\n");
        return Err(report);
    }
    Ok(report)
}

/// `tollgate loadtest entitlements`: the options.
#[derive(Debug, Clone)]
pub struct EntitlementLoad {
    pub connections: usize,
    /// Per phase (there are four).
    pub duration: Duration,
}

/// One phase's outcome.
#[derive(Debug, Default)]
struct Phase {
    seconds: f64,
    latencies_us: Vec<u64>,
    statuses: std::collections::BTreeMap<String, u64>,
}

impl Phase {
    fn ok(&self) -> u64 {
        self.statuses.get("200").copied().unwrap_or(0)
    }

    fn rate(&self) -> f64 {
        self.ok() as f64 / self.seconds.max(f64::EPSILON)
    }

    fn ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }

    fn line(&self) -> String {
        format!(
            "{:>9.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms, statuses {:?}",
            self.rate(),
            self.ms(50.0),
            self.ms(99.0),
            self.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
            self.statuses
        )
    }
}

/// `connections` clients sending GETs to `url` for `duration`: as fast as
/// answers come (`rate` None), or each on a fixed schedule so that all
/// together offer `rate` requests per second. Latency is measured from
/// the moment a request is sent.
async fn drive(
    client: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let started = Instant::now();
    let mut tasks = Vec::new();
    for worker in 0..connections {
        let (client, stop) = (client.clone(), stop.clone());
        let (url, authorization) = (url.to_owned(), authorization.map(str::to_owned));
        let period = rate.map(|r| Duration::from_secs_f64(connections as f64 / r.max(1.0)));
        tasks.push(tokio::spawn(async move {
            let mut local = Phase::default();
            let mut next = tokio::time::Instant::now()
                + period.map(|p| p.mul_f64(worker as f64 / connections as f64)).unwrap_or_default();
            while !stop.load(Ordering::Relaxed) {
                if let Some(p) = period {
                    tokio::time::sleep_until(next).await;
                    next += p;
                }
                let mut request = client.get(&url);
                if let Some(a) = &authorization {
                    request = request.header("authorization", a);
                }
                let sent = Instant::now();
                let status = match request.send().await {
                    Ok(resp) => {
                        let s = resp.status().as_u16().to_string();
                        let _ = resp.bytes().await;
                        s
                    }
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    Err(_) => "connection_error".to_owned(),
                };
                local.latencies_us.push(sent.elapsed().as_micros() as u64);
                *local.statuses.entry(status).or_default() += 1;
            }
            local
        }));
    }
    tokio::time::sleep(duration).await;
    stop.store(true, Ordering::Relaxed);
    let mut phase = Phase::default();
    for task in tasks {
        if let Ok(local) = task.await {
            phase.latencies_us.extend(local.latencies_us);
            for (k, v) in local.statuses {
                *phase.statuses.entry(k).or_default() += v;
            }
        }
    }
    phase.seconds = started.elapsed().as_secs_f64();
    phase.latencies_us.sort_unstable();
    phase
}

/// SPEC 10's entitlement check figure, measured in one run on one machine
/// with one load generator: a bare axum "hello" handler and tollgate's
/// `GET /v1/customers/{id}/entitlements/{feature}` (API key, rate limits
/// off, in-process tollgate on `DATABASE_URL`), each at full speed; then
/// the check at half the bare rate, where its p99 should stay under 1 ms.
pub async fn entitlements(mut config: Config, load: EntitlementLoad) -> Result<String, String> {
    use axum::routing::get;

    let shutdown = CancellationToken::new();
    // The baseline: the least an axum handler can do, on the same runtime.
    let bare_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let bare_addr = bare_listener.local_addr().map_err(|e| e.to_string())?;
    let bare = axum::Router::new().route("/hello", get(|| async { "hello" }));
    let bare_task = tokio::spawn(
        axum::serve(bare_listener, bare)
            .with_graceful_shutdown(shutdown.clone().cancelled_owned())
            .into_future(),
    );

    config.rate_limit_per_ip = 0;
    config.rate_limit_per_key = 0;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let addr = listener.local_addr().map_err(|e| e.to_string())?;
    config.public_url = Some(format!("http://{addr}"));
    let server =
        crate::app::Server::build(config.clone(), shutdown.clone()).await.map_err(|e| e.to_string())?;
    let store = server.store().clone();
    let server_task = tokio::spawn(server.serve(listener));
    let key = crate::auth::generate_key(crate::auth::KeyMode::Test);
    store
        .create_api_key("loadtest", crate::auth::Scope::Write, crate::auth::KeyMode::Test, &key, &Actor::Cli)
        .await
        .map_err(|e| e.to_string())?;
    let authorization = format!("Bearer {}", crate::auth::reveal(&key));
    let base = format!("http://{addr}");
    let customer = format!("u_loadtest_{}", ulid::Ulid::new().to_string().to_lowercase());

    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(load.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let created = client
        .put(format!("{base}/v1/customers/{customer}"))
        .header("authorization", &authorization)
        .json(&serde_json::json!({}))
        .send()
        .await
        .map_err(|e| e.to_string())?;
    if !created.status().is_success() {
        return Err(format!("creating the load test customer failed: {}", created.status()));
    }
    let bare_url = format!("http://{bare_addr}/hello");
    let check_url = format!("{base}/v1/customers/{customer}/entitlements/exports");
    let auth = Some(authorization.as_str());
    let (c, d) = (load.connections, load.duration);

    // Warm up both (connections, caches, allocator), then measure.
    drive(&client, &bare_url, None, c, Duration::from_millis(500), None).await;
    drive(&client, &check_url, auth, c, Duration::from_millis(500), None).await;
    let before = store.cache().stats();
    let bare_full = drive(&client, &bare_url, None, c, d, None).await;
    let check_full = drive(&client, &check_url, auth, c, d, None).await;
    let half = bare_full.rate() / 2.0;
    let check_half = drive(&client, &check_url, auth, c, d, Some(half)).await;
    let bare_half = drive(&client, &bare_url, None, c, d, Some(half)).await;
    let after = store.cache().stats();

    shutdown.cancel();
    let _ = server_task.await;
    let _ = bare_task.await;

    let ratio = 100.0 * check_full.rate() / bare_full.rate().max(f64::EPSILON);
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let report = format!(
        "entitlement check vs bare axum: {c} connections, {:.0} s per phase, database {}, {} build, one process\n\
         bare axum \"hello\", full speed:          {}\n\
         entitlement check, full speed:         {}\n\
         check / bare: {ratio:.1} % (target >= 80 %: {})\n\
         at half the bare rate ({half:.0} req/s offered):\n\
         entitlement check:                     {} (target p99 < 1 ms: {})\n\
         bare axum \"hello\":                     {}\n\
         cache while measuring: {} hits, {} misses, {} bypassed\n",
        d.as_secs_f64(),
        crate::store::DbKind::from_url(config.database_url.expose())
            .map(|k| format!("{k:?}"))
            .unwrap_or_default(),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        bare_full.line(),
        check_full.line(),
        verdict(ratio >= 80.0),
        check_half.line(),
        verdict(check_half.ms(99.0) < 1.0),
        bare_half.line(),
        after.hits - before.hits,
        after.misses - before.misses,
        after.bypassed - before.bypassed,
    );
    let failed = [&bare_full, &check_full, &check_half, &bare_half]
        .iter()
        .any(|p| p.ok() == 0 || p.statuses.len() > 1);
    if failed {
        return Err(format!("{report}FAILED: some requests were not answered 200\n"));
    }
    Ok(report)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_have_the_requested_size_and_percentiles_are_sane() {
        let body = event_body("evt_x", 1, 3000);
        assert!((2990..=3010).contains(&body.len()), "{}", body.len());
        let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(v["id"], "evt_x");
        let data: Vec<u64> = (1..=100).collect();
        assert_eq!(percentile(&data, 50.0), 51);
        assert_eq!(percentile(&data, 99.0), 99);
        assert_eq!(percentile(&[], 99.0), 0);
    }
}
