//! Webhook delivery: every queued event is POSTed to its endpoint, signed as
//! Stripe signs (`Stripe-Signature: t=…,v1=…`, HMAC-SHA256 over
//! `"{t}.{body}"` keyed by the endpoint secret), and retried with backoff
//! until a 2xx or the attempt limit.

use std::time::{Duration, Instant};

use hmac::{Hmac, Mac};
use rand::seq::SliceRandom;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;

use super::state::{real_now, Delivery};
use super::{shape_for_version, Emulator, CURRENT_API_VERSION};

/// The `Stripe-Signature` header value for `payload` at time `t`.
pub fn sign(secret: &str, t: i64, payload: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes any key length");
    mac.update(t.to_string().as_bytes());
    mac.update(b".");
    mac.update(payload);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

/// Runs until `shutdown`, delivering whatever is due.
pub async fn run(em: Emulator, shutdown: CancellationToken) {
    loop {
        // Sessions expire on time even when nobody reads them, with their event.
        super::checkout::expire_due(&mut em.lock());
        let (due, next) = take_due(&em);
        for (flight, delivery) in due {
            tokio::spawn(deliver(em.clone(), flight, delivery));
        }
        let wait = next
            .map(|at| at.saturating_duration_since(Instant::now()))
            .unwrap_or(Duration::from_secs(30))
            .min(Duration::from_secs(30));
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = em.inner.wake.notified() => {}
            () = tokio::time::sleep(wait) => {}
        }
    }
}

/// Moves the deliveries due now into flight and returns them (shuffled if
/// asked) with their flight numbers, and when the next one falls due.
fn take_due(em: &Emulator) -> (Vec<(u64, Delivery)>, Option<Instant>) {
    let now = Instant::now();
    let mut state = em.lock();
    // Read first: the state only counts as changed (and is saved) when
    // something is due.
    if !state.deliveries.iter().any(|d| d.due <= now) {
        return (Vec::new(), state.deliveries.iter().map(|d| d.due).min());
    }
    let (due, later): (Vec<Delivery>, Vec<Delivery>) = state.deliveries.drain(..).partition(|d| d.due <= now);
    let next = later.iter().map(|d| d.due).min();
    state.deliveries.extend(later);
    let mut due: Vec<(u64, Delivery)> = due.into_iter().map(|d| (state.start_flight(d.clone()), d)).collect();
    drop(state);
    if em.config().delivery.shuffle {
        due.shuffle(&mut rand::thread_rng());
    }
    (due, next)
}

async fn deliver(em: Emulator, flight: u64, delivery: Delivery) {
    let prepared = {
        let state = em.lock();
        let endpoint = state.get(&delivery.endpoint_id).cloned();
        let event = state.get(&delivery.event_id).cloned();
        match (endpoint, event) {
            (Some(endpoint), Some(mut event)) if endpoint["status"] == "enabled" => {
                // The payload follows the endpoint's API version.
                let version = endpoint["api_version"].as_str().unwrap_or(CURRENT_API_VERSION).to_owned();
                super::state::strip_private(&mut event);
                shape_for_version(&state, &mut event, &version);
                event["api_version"] = serde_json::json!(version);
                let secret = endpoint["secret"].as_str().unwrap_or_default().to_owned();
                let url = endpoint["url"].as_str().unwrap_or_default().to_owned();
                Some((url, secret, serde_json::to_vec(&event).unwrap_or_default()))
            }
            _ => None,
        }
    };
    let Some((url, secret, body)) = prepared else {
        em.lock().in_flight.remove(&flight);
        return;
    };
    let signature = sign(&secret, real_now(), &body);
    let result = em
        .inner
        .http
        .post(&url)
        .header("content-type", "application/json; charset=utf-8")
        .header("stripe-signature", signature)
        .body(body)
        .send()
        .await;
    let delivered = matches!(&result, Ok(r) if r.status().is_success());
    let mut state = em.lock();
    state.in_flight.remove(&flight);
    if delivered {
        if let Some(event) = state.get_mut(&delivery.event_id) {
            let pending = event["pending_webhooks"].as_i64().unwrap_or(1);
            event["pending_webhooks"] = serde_json::json!((pending - 1).max(0));
        }
        return;
    }
    let options = &em.config().delivery;
    let attempt = delivery.attempt + 1;
    if attempt >= options.max_attempts {
        tracing::warn!(endpoint = %delivery.endpoint_id, event = %delivery.event_id, "emulator gave up delivering an event");
        return;
    }
    let backoff = options.first_retry.saturating_mul(1 << attempt.min(6)).min(Duration::from_secs(60));
    state.deliveries.push_back(Delivery { attempt, due: Instant::now() + backoff, ..delivery });
    drop(state);
    em.wake_delivery();
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_stripes_documented_scheme() {
        // HMAC-SHA256("whsec_test", "1700000000.{}") computed independently.
        let sig = sign("whsec_test", 1_700_000_000, b"{}");
        let mut mac = Hmac::<Sha256>::new_from_slice(b"whsec_test").unwrap();
        mac.update(b"1700000000.{}");
        assert_eq!(sig, format!("t=1700000000,v1={}", hex::encode(mac.finalize().into_bytes())));
    }
}
