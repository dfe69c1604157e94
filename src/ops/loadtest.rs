//! `tollgate loadtest webhooks`: signed ~3 KB Stripe events from N
//! connections for T seconds against a tollgate (its own, in-process, by
//! default), then a check that the inbox holds every acknowledged event.
//!
//! `tollgate loadtest deliveries`: signed provider events at a steady rate,
//! and a local application endpoint that records when each resulting
//! outbound webhook arrives: provider event accepted → delivery received.
//!
//! The load generator shares the machine with the server, as SPEC 10 asks.

use std::collections::HashSet;
use std::future::IntoFuture;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use tokio::sync::Mutex;
use tokio_util::sync::CancellationToken;

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

/// What `tollgate loadtest deliveries` sends.
#[derive(Debug, Clone)]
pub struct DeliveryLoad {
    /// Provider events per second.
    pub rate: u32,
    pub duration: Duration,
    /// Distinct customers the events cycle through; `None`: one per event,
    /// so per-customer ordering never holds one back.
    pub customers: Option<usize>,
    /// Requests in flight at most (the generator falls behind the rate
    /// rather than open more).
    pub connections: usize,
    /// How long to wait for the stragglers after the last event.
    pub drain: Duration,
    /// A running tollgate (with `api_key`, an admin key, to register the
    /// receiver); otherwise one is started in-process on a scratch database.
    pub url: Option<String>,
    pub api_key: Option<String>,
}

/// What the receiving endpoint saw.
#[derive(Default)]
struct Arrivals {
    /// Provider subscription id → when its delivery arrived, and the
    /// canonical event's id.
    by_subscription: std::collections::HashMap<String, (Instant, String)>,
    duplicates: u64,
}

type SharedArrivals = Arc<std::sync::Mutex<Arrivals>>;

async fn record_arrival(
    axum::extract::State(arrivals): axum::extract::State<SharedArrivals>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> axum::http::StatusCode {
    let at = Instant::now();
    let event_id = headers.get("webhook-id").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let sub = serde_json::from_slice::<serde_json::Value>(&body)
        .ok()
        .and_then(|v| v["data"]["provider_subscription_id"].as_str().map(str::to_owned));
    if let Some(sub) = sub {
        let mut a = arrivals.lock().unwrap_or_else(|e| e.into_inner());
        match a.by_subscription.entry(sub) {
            std::collections::hash_map::Entry::Occupied(_) => a.duplicates += 1,
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert((at, event_id));
            }
        }
    }
    axum::http::StatusCode::NO_CONTENT
}

/// A Stripe `customer.subscription.created` event for a new subscription.
fn subscription_event(id: &str, sub: &str, customer: &str, created: i64) -> Vec<u8> {
    serde_json::to_vec(&serde_json::json!({
        "id": id, "object": "event", "api_version": "2025-10-29.clover", "created": created,
        "data": { "object": {
            "id": sub, "object": "subscription", "customer": customer, "status": "active",
            "cancel_at_period_end": false, "canceled_at": null, "ended_at": null, "created": created,
            "items": { "object": "list", "data": [{
                "id": format!("si_{sub}"), "object": "subscription_item", "quantity": 1,
                "price": { "id": "price_loadtest", "object": "price", "product": "prod_loadtest" },
                "current_period_start": created, "current_period_end": created + 30 * 86400,
            }]},
            "metadata": {},
        }},
        "livemode": false, "pending_webhooks": 1, "request": { "id": null, "idempotency_key": null },
        "type": "customer.subscription.created",
    }))
    .unwrap_or_default()
}

/// A database that exists for one run: a SQLite file in a temporary
/// directory, or a new database beside `DATABASE_URL`'s on PostgreSQL
/// (dropped afterwards).
struct ScratchDb {
    url: String,
    admin: Option<(String, String)>,
    _dir: Option<tempfile::TempDir>,
}

impl ScratchDb {
    async fn create(base_url: &str) -> Result<Self, String> {
        match crate::store::DbKind::from_url(base_url).map_err(|e| e.to_string())? {
            crate::store::DbKind::Sqlite => {
                let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
                let url = format!("sqlite://{}", dir.path().join("loadtest.db").display());
                Ok(ScratchDb { url, admin: None, _dir: Some(dir) })
            }
            crate::store::DbKind::Postgres => {
                let name = format!("tollgate_loadtest_{}", ulid::Ulid::new().to_string().to_lowercase());
                let admin = crate::store::Store::connect(base_url, &Default::default())
                    .await
                    .map_err(|e| e.to_string())?;
                admin.execute_raw(&format!("CREATE DATABASE {name}")).await.map_err(|e| e.to_string())?;
                admin.close().await;
                let (head, query) = match base_url.split_once('?') {
                    Some((h, q)) => (h, format!("?{q}")),
                    None => (base_url, String::new()),
                };
                let server = head.rsplit_once('/').map_or(head, |(s, _)| s);
                Ok(ScratchDb {
                    url: format!("{server}/{name}{query}"),
                    admin: Some((base_url.to_owned(), name)),
                    _dir: None,
                })
            }
        }
    }

    async fn drop_database(self) {
        if let Some((admin_url, name)) = &self.admin {
            if let Ok(admin) = crate::store::Store::connect(admin_url, &Default::default()).await {
                let _ = admin.execute_raw(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
                admin.close().await;
            }
        }
    }
}

/// Runs the load and prints the report; an error if an accepted event's
/// delivery never arrived.
pub async fn deliveries(mut config: Config, load: DeliveryLoad) -> Result<String, String> {
    const SECRET: &str = "whsec_loadtest_local_secret";
    // The application's endpoint, in this process, so both ends of every
    // measurement read the same clock.
    let arrivals: SharedArrivals = Default::default();
    let receiver_listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
    let receiver_url = format!("http://{}/hook", receiver_listener.local_addr().map_err(|e| e.to_string())?);
    let receiver_app =
        axum::Router::new().route("/hook", axum::routing::post(record_arrival)).with_state(arrivals.clone());
    let receiver_stop = CancellationToken::new();
    let receiver_task = {
        let stop = receiver_stop.clone().cancelled_owned();
        tokio::spawn(async move {
            axum::serve(receiver_listener, receiver_app).with_graceful_shutdown(stop).await
        })
    };

    let shutdown = CancellationToken::new();
    let mut server_task = None;
    let mut scratch = None;
    let mut store = None;
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(load.connections)
        .timeout(Duration::from_secs(30))
        .build()
        .map_err(|e| e.to_string())?;
    let (base, secret, database) = match &load.url {
        Some(url) => {
            let base = url.trim_end_matches('/').to_owned();
            let key = load.api_key.clone().ok_or("--url needs --api-key, an admin key of that tollgate")?;
            let resp = client
                .post(format!("{base}/v1/webhook-endpoints"))
                .bearer_auth(key)
                .json(&serde_json::json!({ "url": receiver_url, "events": ["subscription.created"],
                    "description": "tollgate loadtest deliveries" }))
                .send()
                .await
                .map_err(|e| e.to_string())?;
            if !resp.status().is_success() {
                return Err(format!(
                    "could not register the receiver: {}",
                    resp.text().await.unwrap_or_default()
                ));
            }
            let secret = config
                .stripe_webhook_secrets()
                .first()
                .map(|s| secrecy::ExposeSecret::expose_secret(s).to_owned())
                .ok_or("--url needs STRIPE_WEBHOOK_SECRET, the secret that server verifies with")?;
            (base, secret, "remote".to_owned())
        }
        None => {
            let db = ScratchDb::create(config.database_url.expose()).await?;
            config.database_url = crate::config::ConnectionUrl::new(db.url.clone());
            config.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET.to_owned()));
            config.database_max_connections = config.database_max_connections.max(16);
            config.rate_limit_per_ip = 0;
            config.rate_limit_per_key = 0;
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.map_err(|e| e.to_string())?;
            let addr = listener.local_addr().map_err(|e| e.to_string())?;
            config.public_url = Some(format!("http://{addr}"));
            let server = crate::app::Server::build(config.clone(), shutdown.clone())
                .await
                .map_err(|e| e.to_string())?;
            server
                .store()
                .create_webhook_endpoint(
                    crate::store::webhook_endpoints::NewEndpoint {
                        url: &receiver_url,
                        description: Some("tollgate loadtest deliveries"),
                        events: &["subscription.created".to_owned()],
                        secret: &crate::delivery::signing::generate_secret(),
                    },
                    &crate::store::audit::Actor::Cli,
                    None,
                )
                .await
                .map_err(|e| e.to_string())?;
            store = Some(server.store().clone());
            server_task = Some(tokio::spawn(server.serve(listener)));
            let kind = crate::store::DbKind::from_url(&db.url).map(|k| format!("{k:?}")).unwrap_or_default();
            scratch = Some(db);
            (format!("http://{addr}"), SECRET.to_owned(), format!("{kind} (scratch, in-process)"))
        }
    };

    let run = ulid::Ulid::new().to_string().to_lowercase();
    let total = u64::from(load.rate) * load.duration.as_secs().max(1);
    let accepted: Arc<std::sync::Mutex<std::collections::HashMap<String, Instant>>> = Default::default();
    let statuses: Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>> = Default::default();
    let permits = Arc::new(tokio::sync::Semaphore::new(load.connections.max(1)));
    let mut senders = tokio::task::JoinSet::new();
    let started = Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
    let mut sent = 0u64;
    while sent < total {
        tick.tick().await;
        let due = ((started.elapsed().as_secs_f64() * f64::from(load.rate)) as u64).min(total);
        while sent < due {
            let Ok(permit) = permits.clone().acquire_owned().await else { break };
            let i = sent;
            sent += 1;
            let customer = match load.customers {
                Some(n) => format!("cus_ldl_{run}_{}", i % n.max(1) as u64),
                None => format!("cus_ldl_{run}_{i}"),
            };
            let sub = format!("sub_ldl_{run}_{i}");
            let event_id = format!("evt_ldl_{run}_{i}");
            let (client, base, secret, accepted, statuses) =
                (client.clone(), base.clone(), secret.clone(), accepted.clone(), statuses.clone());
            senders.spawn(async move {
                let _permit = permit;
                let now = crate::store::now_unix();
                let body = subscription_event(&event_id, &sub, &customer, now);
                let sig = format!("t={now},v1={}", hex::encode(expected_signature(&secret, now, &body)));
                let result = client
                    .post(format!("{base}/webhooks/stripe"))
                    .header("stripe-signature", sig)
                    .header("content-type", "application/json")
                    .body(body)
                    .send()
                    .await;
                let status = match result {
                    Ok(resp) => {
                        let s = resp.status();
                        let _ = resp.bytes().await;
                        if s.is_success() {
                            accepted.lock().unwrap_or_else(|e| e.into_inner()).insert(sub, Instant::now());
                        }
                        s.as_u16().to_string()
                    }
                    Err(e) if e.is_timeout() => "timeout".to_owned(),
                    Err(_) => "connection_error".to_owned(),
                };
                *statuses.lock().unwrap_or_else(|e| e.into_inner()).entry(status).or_default() += 1;
            });
            while senders.try_join_next().is_some() {}
        }
    }
    while senders.join_next().await.is_some() {}
    let send_elapsed = started.elapsed();
    let accepted = std::mem::take(&mut *accepted.lock().unwrap_or_else(|e| e.into_inner()));
    let received_at_end = arrivals.lock().unwrap_or_else(|e| e.into_inner()).by_subscription.len();
    let mut depths = String::new();
    if let Some(store) = &store {
        let inbox = store.provider_event_counts().await.map_err(|e| e.to_string())?;
        let queued = store.delivery_queue_depth().await.map_err(|e| e.to_string())?;
        depths = format!(
            " (inbox: {} provider events not yet applied; {queued} deliveries queued)",
            inbox.get("received").copied().unwrap_or(0) + inbox.get("failed").copied().unwrap_or(0)
        );
    }

    // Drain: every accepted event's delivery, or the deadline.
    let drain_started = Instant::now();
    loop {
        let got = arrivals.lock().unwrap_or_else(|e| e.into_inner()).by_subscription.len();
        if got >= accepted.len() || drain_started.elapsed() >= load.drain {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let arrivals = std::mem::take(&mut *arrivals.lock().unwrap_or_else(|e| e.into_inner()));
    receiver_stop.cancel();
    shutdown.cancel();
    if let Some(task) = server_task {
        let _ = task.await;
    }
    let _ = receiver_task.await;
    if let Some(db) = scratch {
        db.drop_database().await;
    }

    let mut end_to_end = Vec::with_capacity(accepted.len());
    let mut from_event = Vec::with_capacity(accepted.len());
    let wall = std::time::SystemTime::now();
    let now = Instant::now();
    let mut last_arrival = started;
    for (sub, at) in &accepted {
        if let Some((arrived, event_id)) = arrivals.by_subscription.get(sub) {
            end_to_end.push(arrived.saturating_duration_since(*at).as_micros() as u64);
            last_arrival = last_arrival.max(*arrived);
            // When the canonical event was written (its id is a ULID).
            let minted = event_id
                .split_once('_')
                .and_then(|(_, u)| ulid::Ulid::from_string(u).ok())
                .map(|u| std::time::UNIX_EPOCH + Duration::from_millis(u.timestamp_ms()));
            if let (Some(minted), Some(arrived_wall)) = (minted, wall.checked_sub(now - *arrived)) {
                if let Ok(d) = arrived_wall.duration_since(minted) {
                    from_event.push(d.as_micros() as u64);
                }
            }
        }
    }
    end_to_end.sort_unstable();
    from_event.sort_unstable();
    let delivered = end_to_end.len();
    let missing = accepted.len() - delivered;
    let statuses = std::mem::take(&mut *statuses.lock().unwrap_or_else(|e| e.into_inner()));
    let ms = |v: &[u64], p: f64| percentile(v, p) as f64 / 1000.0;
    let mut report = format!(
        "outbound deliveries: target {} provider events/s for {} s ({total} events), {} customers, database {database}\n\
         sent {sent} in {:.2} s: {:.0} events/s achieved; accepted {}; statuses {statuses:?}\n\
         backlog when the last event was accepted: {} deliveries not yet received{depths}\n\
         delivered {delivered} of {} accepted ({missing} missing after a {} s drain, {} duplicates); \
         last delivery {:.2} s after the first event\n\
         provider event accepted -> delivery received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms\n\
         canonical event written -> delivery received: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms (wall clock, ms resolution)\n",
        load.rate,
        load.duration.as_secs().max(1),
        load.customers.map_or("distinct".to_owned(), |n| n.to_string()),
        send_elapsed.as_secs_f64(),
        sent as f64 / send_elapsed.as_secs_f64(),
        accepted.len(),
        accepted.len().saturating_sub(received_at_end),
        accepted.len(),
        load.drain.as_secs(),
        arrivals.duplicates,
        last_arrival.saturating_duration_since(started).as_secs_f64(),
        ms(&end_to_end, 50.0),
        ms(&end_to_end, 99.0),
        end_to_end.last().copied().unwrap_or(0) as f64 / 1000.0,
        ms(&from_event, 50.0),
        ms(&from_event, 99.0),
        from_event.last().copied().unwrap_or(0) as f64 / 1000.0,
    );
    if missing > 0 {
        report.push_str("FAILED: accepted events whose delivery never arrived\n");
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
    /// This process's CPU time during the phase, when the platform
    /// reports it.
    cpu: Option<CpuTimes>,
    latencies_us: Vec<u64>,
    statuses: std::collections::BTreeMap<String, u64>,
}

impl Phase {
    /// Adds another slice of the same phase.
    fn absorb(&mut self, slice: Phase) {
        let first = self.seconds == 0.0;
        self.cpu = match (self.cpu, slice.cpu) {
            (Some(a), Some(b)) => Some(a + b),
            (None, b) if first => b,
            _ => None,
        };
        self.seconds += slice.seconds;
        // Sorted by the caller once every slice is in.
        self.latencies_us.extend(slice.latencies_us);
        for (status, n) in slice.statuses {
            *self.statuses.entry(status).or_default() += n;
        }
    }

    fn ok(&self) -> u64 {
        self.statuses.get("200").copied().unwrap_or(0)
    }

    fn rate(&self) -> f64 {
        self.ok() as f64 / self.seconds.max(f64::EPSILON)
    }

    fn ms(&self, p: f64) -> f64 {
        percentile(&self.latencies_us, p) as f64 / 1000.0
    }

    /// CPU microseconds per answered request.
    fn cpu_us(&self) -> Option<f64> {
        self.cpu.map(|c| self.per_request_us(c.all))
    }

    /// The servers' CPU microseconds per answered request.
    fn server_cpu_us(&self) -> Option<f64> {
        self.cpu.map(|c| self.per_request_us(c.servers()))
    }

    fn per_request_us(&self, cpu: Duration) -> f64 {
        cpu.as_secs_f64() * 1e6 / self.ok().max(1) as f64
    }

    fn line(&self) -> String {
        format!(
            "{:>9.0} req/s, p50 {:.3} ms, p99 {:.3} ms, max {:.2} ms, {}statuses {:?}",
            self.rate(),
            self.ms(50.0),
            self.ms(99.0),
            self.latencies_us.last().copied().unwrap_or(0) as f64 / 1000.0,
            self.cpu_us().map_or(String::new(), |us| format!("process CPU {us:.1} µs/request, ")),
            self.statuses
        )
    }
}

/// This process's CPU time so far (user and system), from `/proc` (Linux;
/// `None` elsewhere). On a machine shared with other work, a phase's
/// throughput depends on what the others take, but the CPU each request
/// costs does not, so the report gives both.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct CpuTimes {
    /// All threads, the generator's included.
    all: Duration,
    /// The load generator's threads (named [`GENERATOR_THREADS`]): the
    /// rest is what the servers cost (and, a little, the thread that
    /// starts the phases and gathers their results), which a client in
    /// another process (wrk) would not share.
    generator: Duration,
}

impl CpuTimes {
    fn read() -> Option<CpuTimes> {
        let all = stat_cpu(&std::fs::read_to_string("/proc/self/stat").ok()?)?;
        let mut generator = Duration::ZERO;
        for task in std::fs::read_dir("/proc/self/task").ok()?.flatten() {
            let path = task.path();
            let name = std::fs::read_to_string(path.join("comm")).unwrap_or_default();
            if name.starts_with(GENERATOR_THREADS) {
                let stat = std::fs::read_to_string(path.join("stat")).ok();
                generator += stat.as_deref().and_then(stat_cpu).unwrap_or_default();
            }
        }
        Some(CpuTimes { all, generator })
    }

    fn since(self, earlier: CpuTimes) -> CpuTimes {
        CpuTimes {
            all: self.all.saturating_sub(earlier.all),
            generator: self.generator.saturating_sub(earlier.generator),
        }
    }

    fn servers(self) -> Duration {
        self.all.saturating_sub(self.generator)
    }
}

impl std::ops::Add for CpuTimes {
    type Output = CpuTimes;

    fn add(self, other: CpuTimes) -> CpuTimes {
        CpuTimes { all: self.all + other.all, generator: self.generator + other.generator }
    }
}

/// The generator's threads' name prefix. The pacer's thread (fixed-rate
/// phases) carries it too, but it ends within its phase, and a thread that
/// has ended counts in the process's time only: the servers' share is
/// reported for the full-speed phases, which have no pacer.
const GENERATOR_THREADS: &str = "loadtest-";

/// utime + stime of a `/proc/…/stat` line.
fn stat_cpu(stat: &str) -> Option<Duration> {
    // After the command name (in parentheses, and it may hold spaces) come
    // fields 3 onwards; utime and stime are fields 14 and 15, in clock
    // ticks of 1/100 s (USER_HZ, 100 on Linux).
    let fields: Vec<&str> = stat.rsplit_once(')')?.1.split_whitespace().collect();
    let ticks = fields.get(11)?.parse::<u64>().ok()? + fields.get(12)?.parse::<u64>().ok()?;
    Some(Duration::from_millis(ticks * 10))
}

/// How often the pacer of a fixed-rate phase releases the sends that have
/// come due: fine enough that sends do not bunch (tokio's timers tick in
/// whole milliseconds), coarse enough that the pacer's own wake-ups cost
/// little CPU.
const PACER_TICK: Duration = Duration::from_micros(200);

/// How long each alternating slice of the full-speed phases lasts.
const FULL_SPEED_SLICE: Duration = Duration::from_secs(1);

/// `connections` clients sending GETs to `url` for `duration`: as fast as
/// answers come (`rate` None), or together on a fixed schedule offering
/// `rate` requests per second. Latency is measured from the moment a
/// request is sent.
///
/// On a schedule, a pacer thread releases the sends that have come due
/// every [`PACER_TICK`], and whichever connection is free sends next: an
/// open-loop generator at the stated rate (a late pacer or a busy server
/// does not lower it; sends that could not go out on time go as soon as a
/// connection is free). Each connection used to sleep on its own tokio
/// timer, and because those fire on millisecond ticks, the sends due
/// within a millisecond (about 18 to 38 at the rates measured) all left
/// together on the tick and queued behind each other: that burst, not the
/// server, set the p99 of the bare handler itself at ~1 ms.
///
/// The connections run on the generator's own runtime (see
/// [`GeneratorRuntime`]).
async fn drive(
    generator: &tokio::runtime::Handle,
    client: &reqwest::Client,
    url: &str,
    authorization: Option<&str>,
    connections: usize,
    duration: Duration,
    rate: Option<f64>,
) -> Phase {
    let stop = Arc::new(AtomicBool::new(false));
    let cpu_before = CpuTimes::read();
    let started = Instant::now();
    let due = rate.map(|rate| {
        let permits = Arc::new(tokio::sync::Semaphore::new(0));
        let (permits_for_pacer, stop) = (permits.clone(), stop.clone());
        let pacer = std::thread::Builder::new().name(format!("{GENERATOR_THREADS}pacer")).spawn(move || {
            let mut released: u64 = 0;
            while !stop.load(Ordering::Relaxed) {
                let owed = (started.elapsed().as_secs_f64() * rate) as u64;
                if owed > released {
                    permits_for_pacer.add_permits((owed - released) as usize);
                    released = owed;
                }
                std::thread::sleep(PACER_TICK);
            }
            // Wakes the connections still waiting, so they stop.
            permits_for_pacer.close();
        });
        (permits, pacer.expect("a thread for the pacer"))
    });
    let mut tasks = Vec::new();
    for _ in 0..connections {
        let (client, stop) = (client.clone(), stop.clone());
        let permits = due.as_ref().map(|(p, _)| p.clone());
        // Parsed once, as wrk would: the generator's own per-request cost
        // is part of what the machine spends, so it should not parse the
        // same URL and header on every request.
        let url = reqwest::Url::parse(url);
        let authorization = authorization.and_then(|a| reqwest::header::HeaderValue::from_str(a).ok());
        tasks.push(generator.spawn(async move {
            let mut local = Phase::default();
            while !stop.load(Ordering::Relaxed) {
                if let Some(permits) = &permits {
                    match permits.acquire().await {
                        Ok(permit) => permit.forget(),
                        Err(_) => break,
                    }
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                }
                let Ok(url) = &url else { break };
                let mut request = client.get(url.clone());
                if let Some(a) = &authorization {
                    request = request.header(reqwest::header::AUTHORIZATION, a.clone());
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
    if let Some((_, pacer)) = due {
        let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
    }
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
    phase.cpu = CpuTimes::read().zip(cpu_before).map(|(after, before)| after.since(before));
    phase.latencies_us.sort_unstable();
    phase
}

/// The load generator's own tokio runtime, with as many worker threads as
/// the servers' runtime, as a client in another process (wrk) would have.
///
/// The generator's connections used to run on the servers' runtime, so a
/// client task and the server task answering it shared the two worker
/// threads, which production never does. Where the scheduler put them
/// then mattered: in the runs that came out slow, `perf` showed the
/// allocator collecting frees made by the other thread, and every request
/// cost up to half as much CPU again.
///
/// Shut down without waiting when dropped: dropping a runtime inside
/// another one's task would panic.
struct GeneratorRuntime(Option<tokio::runtime::Runtime>);

impl GeneratorRuntime {
    fn start() -> Result<Self, String> {
        let workers = tokio::runtime::Handle::current().metrics().num_workers().max(1);
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(workers)
            .thread_name(format!("{GENERATOR_THREADS}client"))
            .enable_all()
            .build()
            .map_err(|e| e.to_string())?;
        Ok(GeneratorRuntime(Some(runtime)))
    }

    fn handle(&self) -> &tokio::runtime::Handle {
        self.0.as_ref().expect("present until dropped").handle()
    }
}

impl Drop for GeneratorRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
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
    // A client of its own, so that its connection (on this runtime) is not
    // among the generator's.
    let created = reqwest::Client::new()
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

    let generator = GeneratorRuntime::start()?;
    let g = generator.handle();
    // Warm up both (connections, caches, allocator), then measure.
    drive(g, &client, &bare_url, None, c, Duration::from_millis(500), None).await;
    drive(g, &client, &check_url, auth, c, Duration::from_millis(500), None).await;
    let before = store.cache().stats();
    // The full-speed phases in alternating slices (ABBA), so that both see
    // the same machine: here the CPU a request costs moved by a third
    // between consecutive 8 s phases, and back-to-back phases turned that
    // drift into the ratio (one run gave the check 104 % of bare axum).
    let (mut bare_full, mut check_full) = (Phase::default(), Phase::default());
    // An even number, so that each handler goes first as often.
    let slices = ((d.as_secs_f64() / FULL_SPEED_SLICE.as_secs_f64() / 2.0).ceil().max(1.0) as u32) * 2;
    for slice in 0..slices {
        let bare = || drive(g, &client, &bare_url, None, c, FULL_SPEED_SLICE, None);
        let check = || drive(g, &client, &check_url, auth, c, FULL_SPEED_SLICE, None);
        if slice % 2 == 0 {
            bare_full.absorb(bare().await);
            check_full.absorb(check().await);
        } else {
            check_full.absorb(check().await);
            bare_full.absorb(bare().await);
        }
    }
    bare_full.latencies_us.sort_unstable();
    check_full.latencies_us.sort_unstable();
    let half = bare_full.rate() / 2.0;
    let check_half = drive(g, &client, &check_url, auth, c, d, Some(half)).await;
    let bare_half = drive(g, &client, &bare_url, None, c, d, Some(half)).await;
    let after = store.cache().stats();

    shutdown.cancel();
    let _ = server_task.await;
    let _ = bare_task.await;

    let ratio = 100.0 * check_full.rate() / bare_full.rate().max(f64::EPSILON);
    // Both full-speed phases keep the two cores busy, so on a quiet machine
    // the rate ratio is the inverse of the CPU-per-request ratio; unlike
    // the rate, the CPU per request does not move with other work.
    let cpu_ratio = |what: &str, bare: Option<f64>, check: Option<f64>| match (bare, check) {
        (Some(bare), Some(check)) if check > 0.0 => {
            format!("by {what}: {:.1} % (bare {bare:.1} µs, check {check:.1} µs)\n", 100.0 * bare / check)
        }
        _ => String::new(),
    };
    let by_cpu = cpu_ratio(
        "the process's CPU per request, generator included",
        bare_full.cpu_us(),
        check_full.cpu_us(),
    );
    // The generator takes about half the machine, the same for both
    // handlers, which lifts the ratio toward 100 %. The servers' own
    // threads are what a client in another process (wrk) measures.
    let by_server_cpu = cpu_ratio(
        "the servers' CPU per request, the generator's threads left out",
        bare_full.server_cpu_us(),
        check_full.server_cpu_us(),
    );
    let verdict = |ok: bool| if ok { "met" } else { "NOT met" };
    let report = format!(
        "entitlement check vs bare axum: {c} connections, {:.0} s per phase \
         (the full-speed ones in alternating {}-second slices), database {}, {} build, one process \
         (the generator on a runtime of its own, {} threads)\n\
         bare axum \"hello\", full speed:          {}\n\
         entitlement check, full speed:         {}\n\
         check / bare: {ratio:.1} % (target >= 80 %: {})\n\
         {by_cpu}\
         {by_server_cpu}\
         at half the bare rate ({half:.0} req/s offered):\n\
         entitlement check:                     {} (target p99 < 1 ms: {})\n\
         bare axum \"hello\":                     {}\n\
         cache while measuring: {} hits, {} misses, {} bypassed\n",
        d.as_secs_f64(),
        FULL_SPEED_SLICE.as_secs(),
        crate::store::DbKind::from_url(config.database_url.expose())
            .map(|k| format!("{k:?}"))
            .unwrap_or_default(),
        if cfg!(debug_assertions) { "debug" } else { "release" },
        g.metrics().num_workers(),
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

    #[test]
    fn cpu_time_is_read_on_linux_and_the_generators_threads_are_told_apart() {
        if !cfg!(target_os = "linux") {
            return;
        }
        let spin = || {
            let started = Instant::now();
            let mut x = 0u64;
            while started.elapsed() < Duration::from_millis(60) {
                x = std::hint::black_box(x.wrapping_add(1));
            }
        };
        let before = CpuTimes::read().expect("/proc/self/stat");
        spin();
        let after = CpuTimes::read().expect("/proc/self/stat");
        assert!(after.all > before.all, "{before:?} -> {after:?} after 60 ms of spinning");
        let generator = std::thread::Builder::new()
            .name(format!("{GENERATOR_THREADS}test"))
            .spawn(move || {
                spin();
                // Read while the thread still exists: an exited thread's
                // time is the process's, no longer its own.
                CpuTimes::read().expect("/proc/self/stat")
            })
            .unwrap()
            .join()
            .unwrap();
        assert!(generator.since(after).generator >= Duration::from_millis(30), "{after:?} -> {generator:?}");
    }

    #[test]
    fn subscription_events_are_stripe_shaped() {
        let v: serde_json::Value =
            serde_json::from_slice(&subscription_event("evt_1", "sub_1", "cus_1", 5)).unwrap();
        assert_eq!(v["type"], "customer.subscription.created");
        assert_eq!(v["data"]["object"]["customer"], "cus_1");
        assert_eq!(v["data"]["object"]["items"]["data"][0]["price"]["id"], "price_loadtest");
    }
}
