//! The delivery worker: claims due deliveries, sends them (outside any
//! database transaction), and records each attempt with its consequence.
//!
//! It is woken by the commit that queues a delivery (an in-process
//! `Notify`), so the first attempt leaves within milliseconds of the event;
//! deliveries queued by another instance, and scheduled retries, are found
//! by a short poll.

use std::time::{Duration, Instant};

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use super::{signing, TargetPolicy, RETRY_SCHEDULE};
use crate::store::deliveries::{AttemptOutcome, ClaimedDelivery};
use crate::store::{now_unix, Store};

#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    pub timeout: Duration,
    /// Delays before each retry; the spec's [`RETRY_SCHEDULE`] outside tests.
    pub schedule: Vec<Duration>,
    pub policy: TargetPolicy,
    pub batch: i64,
    pub idle_poll: Duration,
}

impl DeliveryOptions {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            timeout: Duration::from_secs(config.webhook_timeout_seconds.max(1)),
            schedule: config.webhook_retry_schedule.clone().unwrap_or_else(|| RETRY_SCHEDULE.to_vec()),
            policy: TargetPolicy::from_config(config),
            batch: 64,
            idle_poll: Duration::from_millis(config.webhook_delivery_poll_ms.max(1)),
        }
    }

    /// Longer than any send takes, so a live worker's claim never lapses;
    /// a crashed worker's lapses after it.
    fn lease_seconds(&self) -> i64 {
        self.timeout.as_secs() as i64 + 30
    }

    /// When to try again after `attempts` failed attempts; `None`: dead.
    pub fn retry_at(&self, attempts: i64) -> Option<i64> {
        let delay = self.schedule.get(usize::try_from(attempts - 1).ok()?)?;
        Some(now_unix() + delay.as_secs() as i64)
    }
}

#[tracing::instrument(name = "job.delivery", skip_all)]
pub async fn run(store: Store, options: DeliveryOptions, shutdown: CancellationToken) {
    let client = match super::client(options.policy, options.timeout) {
        Ok(c) => c,
        Err(e) => {
            tracing::error!(error = %e, "could not build the webhook HTTP client; outbound webhooks are off");
            return;
        }
    };
    let wake = store.delivery_wake();
    // Deliveries this process's commits lease to it as they queue them
    // are sent without a claim in between.
    let registration = store.register_for_handoff(options.lease_seconds());
    // Only where one process serves the database: on PostgreSQL the leases
    // may be other instances' (a previous run's lapse).
    if registration.first && store.kind() == crate::store::DbKind::Sqlite {
        if let Err(e) = store.reset_delivery_leases().await {
            tracing::warn!(error = %e, "could not release a previous run's delivery leases; they lapse");
        }
    }
    // What is being sent: a claim never starts a second send of one of
    // these (a handed delivery whose lease ran out while it waited).
    let mut sending: std::collections::HashSet<String> = Default::default();
    let mut last_gauge: Option<Instant> = None;
    // Sends run side by side, up to `batch` at once, and the worker claims
    // more as each finishes: a slow endpoint (up to the timeout) holds one
    // slot, not the whole queue. Claimed deliveries are leased, so no other
    // worker takes them meanwhile.
    let mut in_flight: JoinSet<Attempt> = JoinSet::new();
    // Finished sends not yet recorded. They are recorded together, in one
    // transaction, beside the sending (one recording at a time): at a
    // thousand deliveries a second that is a handful of commits instead of
    // a thousand (on SQLite each commit is an fsync on the one writer), and
    // new deliveries do not wait for it. A customer's next event, held back
    // until this one is recorded, is claimed once the recording ends.
    let mut finished: Vec<Attempt> = Vec::new();
    let mut recording: JoinSet<()> = JoinSet::new();
    // Whether the database may hold deliveries due that this worker has not
    // seen: after a wake-up, a poll interval, or a recording (which may
    // have unblocked a customer's next event). A finished send alone
    // changes nothing in the database, so it does not cost a query.
    let mut may_be_due = true;
    loop {
        while let Some(done) = in_flight.try_join_next() {
            finished.extend(done.ok());
        }
        for done in &finished {
            sending.remove(&done.delivery);
        }
        while recording.try_join_next().is_some() {
            may_be_due = true;
        }
        if recording.is_empty() && !finished.is_empty() {
            let (store, batch) = (store.clone(), std::mem::take(&mut finished));
            recording.spawn(async move { record(&store, batch).await });
        }
        if shutdown.is_cancelled() {
            break;
        }
        let mut room = options.batch - in_flight.len() as i64;
        let mut ready = Vec::new();
        if room > 0 {
            let lease_left = options.timeout.as_secs() as i64 + 5;
            match store.take_handed_deliveries(room as usize, lease_left).await {
                Ok(handed) => ready = handed,
                // Their leases lapse and a claim finds them.
                Err(e) => tracing::warn!(error = %e, "delivery worker could not read handed-off deliveries"),
            }
            room -= ready.len() as i64;
        }
        if room > 0 && may_be_due {
            match store.claim_deliveries(room, options.lease_seconds()).await {
                Ok(claimed) => {
                    // Fewer than asked for: nothing more is due until
                    // something changes.
                    may_be_due = claimed.len() as i64 == room;
                    ready.extend(claimed);
                }
                Err(e) => tracing::warn!(error = %e, "delivery worker could not claim deliveries; retrying"),
            }
        }
        ready.retain(|d| !sending.contains(&d.id));
        let worked = !ready.is_empty();
        for delivery in ready {
            sending.insert(delivery.id.clone());
            let (client, options) = (client.clone(), options.clone());
            in_flight.spawn(async move { attempt(&client, &options, delivery).await });
        }
        if last_gauge.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_gauge = Some(Instant::now());
            if let Ok(depth) = store.delivery_queue_depth().await {
                metrics::gauge!("webhook_delivery_queue_depth").set(depth as f64);
            }
        }
        if worked {
            continue;
        }
        tokio::select! {
            () = shutdown.cancelled() => {}
            () = wake.notified() => may_be_due = true,
            // Handed over: taken at the top of the loop, nothing to claim.
            () = registration.handed() => {}
            () = tokio::time::sleep(options.idle_poll) => may_be_due = true,
            // A finished send frees a slot and is recorded.
            Some(done) = in_flight.join_next(), if !in_flight.is_empty() => finished.extend(done.ok()),
            // A recorded attempt may have unblocked its customer's next event.
            Some(_) = recording.join_next(), if !recording.is_empty() => may_be_due = true,
        }
    }
    // Sends under way finish (within the timeout) and are recorded.
    while let Some(done) = in_flight.join_next().await {
        finished.extend(done.ok());
    }
    while recording.join_next().await.is_some() {}
    record(&store, finished).await;
    drop(registration);
    if let Err(e) = store.release_handed_deliveries().await {
        tracing::warn!(error = %e, "could not release handed-off deliveries; their leases lapse");
    }
}

/// A finished send, to record.
struct Attempt {
    delivery: String,
    endpoint: String,
    outcome: AttemptOutcome,
}

/// Records finished attempts in one transaction. If that fails, their
/// leases lapse and they are sent again (receivers deduplicate by
/// `webhook-id`, as Standard Webhooks asks).
async fn record(store: &Store, attempts: Vec<Attempt>) {
    if attempts.is_empty() {
        return;
    }
    let batch: Vec<(&str, &str, &AttemptOutcome)> =
        attempts.iter().map(|a| (a.delivery.as_str(), a.endpoint.as_str(), &a.outcome)).collect();
    let disabled = match store.record_delivery_attempts(&batch).await {
        Ok(disabled) => disabled,
        // One attempt that cannot be recorded must not take the others
        // with it: record each on its own.
        Err(e) if batch.len() > 1 => {
            tracing::warn!(error = %e, attempts = batch.len(), "could not record delivery attempts together; recording them one by one");
            let mut disabled = Vec::with_capacity(batch.len());
            for one in &batch {
                match store.record_delivery_attempts(std::slice::from_ref(one)).await {
                    Ok(d) => disabled.extend(d),
                    Err(e) => {
                        tracing::warn!(error = %e, delivery = %one.0, "could not record a delivery attempt; it will be retried");
                        disabled.push(false);
                    }
                }
            }
            disabled
        }
        Err(e) => {
            tracing::warn!(error = %e, "could not record a delivery attempt; it will be retried");
            return;
        }
    };
    for a in attempts.iter().zip(disabled).filter_map(|(a, d)| d.then_some(a)) {
        tracing::warn!(endpoint = %a.endpoint, delivery = %a.delivery, "endpoint answered 410 Gone; disabled");
    }
}

/// Text from an endpoint, storable in any database: PostgreSQL refuses
/// NUL in text columns, and an endpoint may answer anything.
fn storable(text: String) -> String {
    if text.contains('\0') {
        text.replace('\0', "\u{FFFD}")
    } else {
        text
    }
}

#[tracing::instrument(skip_all, fields(delivery = %d.id, endpoint = %d.endpoint_id, event = %d.event_id))]
async fn attempt(client: &reqwest::Client, options: &DeliveryOptions, d: ClaimedDelivery) -> Attempt {
    let body = super::body(&d.event_id, &d.event_type, d.event_created_at, d.customer.as_deref(), &d.data);
    let started = Instant::now();
    let sent = send(client, options, &d, body).await;
    let elapsed = started.elapsed();
    metrics::histogram!("webhook_delivery_seconds").record(elapsed.as_secs_f64());
    let attempts = d.attempts + 1;
    let (status_code, error, response) = match sent {
        Ok((status, excerpt)) => (Some(status), None, excerpt),
        Err(e) => (None, Some(e), None),
    };
    let ok = status_code.is_some_and(|s| (200..300).contains(&s));
    let gone = status_code == Some(410);
    let error = match (ok, error, status_code) {
        (true, _, _) => None,
        (false, Some(e), _) => Some(e),
        (false, None, Some(s)) => Some(format!("endpoint answered {s}")),
        (false, None, None) => Some("no response".to_owned()),
    };
    let retry = if ok { None } else { Some(options.retry_at(attempts)) };
    let outcome = match retry {
        None => "succeeded",
        Some(Some(_)) => "failed",
        Some(None) => "dead",
    };
    metrics::counter!("webhook_deliveries_total", "outcome" => outcome).increment(1);
    if ok {
        if let Some(ms) = ulid_ms(&d.event_id) {
            let now_ms = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|t| t.as_millis() as u64)
                .unwrap_or(ms);
            metrics::histogram!("webhook_event_to_delivery_seconds")
                .record(now_ms.saturating_sub(ms) as f64 / 1000.0);
        }
    } else if outcome == "dead" {
        metrics::counter!("webhook_deliveries_dead_total").increment(1);
        tracing::error!(attempts, error = error.as_deref().unwrap_or(""), "delivery is dead");
    } else {
        tracing::info!(attempts, error = error.as_deref().unwrap_or(""), "delivery failed; will retry");
    }
    Attempt {
        delivery: d.id,
        endpoint: d.endpoint_id,
        outcome: AttemptOutcome {
            status_code,
            duration_ms: elapsed.as_millis() as i64,
            error: error.map(storable),
            response: response.map(storable),
            retry,
            disable_endpoint: gone.then(|| "the endpoint answered 410 Gone".to_owned()),
        },
    }
}

/// One HTTP attempt: the status and the start of the response, or why
/// there was no response.
async fn send(
    client: &reqwest::Client,
    options: &DeliveryOptions,
    d: &ClaimedDelivery,
    body: Vec<u8>,
) -> Result<(u16, Option<String>), String> {
    // The address check for URLs that name an address (the resolver sees
    // only names); also catches an endpoint created before a policy change.
    let url = super::check_url(&d.url, options.policy).map_err(|e| e.to_string())?;
    let key = signing::secret_key(&d.secret).map_err(|e| e.to_string())?;
    let timestamp = now_unix();
    let signature = signing::sign(&key, &d.event_id, timestamp, &body);
    let mut response = client
        .post(url)
        .header("content-type", "application/json")
        .header("webhook-id", &d.event_id)
        .header("webhook-timestamp", timestamp.to_string())
        .header("webhook-signature", signature)
        .body(body)
        .send()
        .await
        .map_err(describe)?;
    let status = response.status().as_u16();
    // Enough of the answer to debug the receiver, without storing whatever
    // it chose to send back.
    const EXCERPT: usize = 512;
    let mut excerpt = Vec::new();
    while excerpt.len() < EXCERPT {
        match response.chunk().await {
            Ok(Some(chunk)) => excerpt.extend_from_slice(&chunk),
            _ => break,
        }
    }
    excerpt.truncate(EXCERPT);
    let text = String::from_utf8_lossy(&excerpt).into_owned();
    Ok((status, (!text.is_empty()).then_some(text)))
}

/// reqwest's error without the URL (which may carry a token in its query),
/// with its cause.
fn describe(e: reqwest::Error) -> String {
    let kind = if e.is_timeout() {
        "timed out"
    } else if e.is_connect() {
        "could not connect"
    } else {
        "request failed"
    };
    let mut cause = String::new();
    let mut source = std::error::Error::source(&e);
    while let Some(s) = source {
        cause = s.to_string();
        source = s.source();
    }
    if cause.is_empty() {
        kind.to_owned()
    } else {
        format!("{kind}: {cause}")
    }
}

/// When an id's ULID was minted, in Unix milliseconds.
fn ulid_ms(id: &str) -> Option<u64> {
    let (_, ulid) = id.split_once('_')?;
    ulid::Ulid::from_string(ulid).ok().map(|u| u.timestamp_ms())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoint_text_with_nul_becomes_storable() {
        assert_eq!(storable("ok\0body".to_owned()), "ok\u{FFFD}body");
        assert_eq!(storable("plain".to_owned()), "plain");
    }

    #[test]
    fn eight_attempts_then_dead() {
        let options = DeliveryOptions {
            timeout: Duration::from_secs(15),
            schedule: RETRY_SCHEDULE.to_vec(),
            policy: TargetPolicy { strict: true },
            batch: 1,
            idle_poll: Duration::from_millis(10),
        };
        let now = now_unix();
        let first_retry = options.retry_at(1).unwrap();
        assert!((now + 5..=now + 6).contains(&first_retry));
        assert!(options.retry_at(7).unwrap() >= now + 36000);
        assert_eq!(options.retry_at(8), None);
    }

    #[test]
    fn event_ids_tell_when_they_were_minted() {
        let id = crate::ids::new_id("ev");
        let ms = ulid_ms(&id).unwrap();
        let now =
            std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        assert!(now.abs_diff(ms) < 5_000);
    }
}
