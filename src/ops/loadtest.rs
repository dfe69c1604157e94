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

use crate::config::Config;
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
