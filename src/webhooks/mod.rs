//! Provider webhooks in: verified on the raw bytes, stored durably in the
//! inbox, and only then acknowledged.
//!
//! Each provider contributes a verifier and a parser behind [`Provider`];
//! `/webhooks/payments` picks the provider from the request's headers.
//! Storage goes through [`inbox::Inbox`], which groups concurrent requests
//! into shared transactions.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use axum::body::Body;
use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{Json, Router};
use secrecy::ExposeSecret;
use serde_json::Value;

use crate::http::error::{ApiError, ErrorType};
use crate::http::ratelimit::ClientAddr;
use crate::http::AppState;
use crate::ratelimit::AddressKey;
use crate::store::provider_events::{NewProviderEvent, Stored};

pub mod apply;
pub mod inbox;
pub mod stripe_signature;

/// Larger than any event Stripe sends; anything bigger is refused unread.
pub const MAX_WEBHOOK_BYTES: usize = 1024 * 1024;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/webhooks/stripe", post(receive_stripe))
        .route("/webhooks/payments", post(receive_any))
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Provider {
    Stripe,
    PayPal,
}

impl Provider {
    pub fn name(self) -> &'static str {
        match self {
            Provider::Stripe => "stripe",
            Provider::PayPal => "paypal",
        }
    }

    /// Which provider sent a request, from the headers only it sends.
    pub fn recognise(headers: &HeaderMap) -> Option<Provider> {
        if headers.contains_key("stripe-signature") {
            Some(Provider::Stripe)
        } else if headers.contains_key("paypal-transmission-id") {
            Some(Provider::PayPal)
        } else {
            None
        }
    }
}

fn reject(provider: Provider, reason: &'static str, message: impl Into<String>) -> ApiError {
    metrics::counter!("webhooks_rejected_total", "provider" => provider.name(), "reason" => reason)
        .increment(1);
    ApiError::invalid(reason, message)
}

/// Counts a failed delivery against its address (`RATE_LIMIT_WEBHOOK_FAILURES`
/// a minute, shared through Redis when configured), so a forger cannot use
/// tollgate as a signature oracle or a CPU sink: once the allowance is
/// spent, rejections become 429s.
async fn limited(state: &AppState, ip: IpAddr, error: ApiError) -> ApiError {
    // Only the sender's failures count: a 503 is ours (misconfiguration, an outage).
    let Some(limiter) =
        state.rate_limits.webhook_failures.as_ref().filter(|_| !error.status.is_server_error())
    else {
        return error;
    };
    let decision = limiter.check(&AddressKey::new(ip)).await;
    if decision.allowed {
        return error;
    }
    let mut e = ApiError::new(
        StatusCode::TOO_MANY_REQUESTS,
        ErrorType::RateLimitError,
        "too_many_failed_webhooks",
        "Too many failed webhook deliveries from this address; slow down.",
    );
    e.retry_after = Some(decision.retry_after_seconds());
    e
}

#[tracing::instrument(name = "webhook.stripe", skip_all)]
async fn receive_stripe(
    State(state): State<AppState>,
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    receive(state, ip, Provider::Stripe, headers, body).await
}

#[tracing::instrument(name = "webhook.payments", skip_all)]
async fn receive_any(
    State(state): State<AppState>,
    ClientAddr(ip): ClientAddr,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    match Provider::recognise(&headers) {
        Some(provider) => receive(state, ip, provider, headers, body).await,
        None => Err(limited(
            &state,
            ip,
            ApiError::invalid(
                "provider_unrecognised",
                "No provider signature header (Stripe-Signature or PAYPAL-TRANSMISSION-ID).",
            ),
        )
        .await),
    }
}

async fn receive(
    state: AppState,
    ip: IpAddr,
    provider: Provider,
    headers: HeaderMap,
    body: Body,
) -> Result<Json<Value>, ApiError> {
    let started = Instant::now();
    metrics::counter!("webhooks_received_total", "provider" => provider.name()).increment(1);
    let bytes = match axum::body::to_bytes(body, MAX_WEBHOOK_BYTES).await {
        Ok(bytes) => bytes,
        Err(_) => {
            let error =
                reject(provider, "body_too_large", format!("The body exceeds {MAX_WEBHOOK_BYTES} bytes."));
            return Err(limited(&state, ip, error).await);
        }
    };
    let verified = match provider {
        Provider::Stripe => verify_stripe(&state, &headers, &bytes),
        Provider::PayPal => {
            Err(reject(provider, "provider_not_configured", "PayPal webhooks are not supported yet."))
        }
    };
    let event = match verified {
        Ok(event) => event,
        Err(e) => return Err(limited(&state, ip, e).await),
    };
    metrics::counter!("webhooks_verified_total", "provider" => provider.name()).increment(1);

    let outcome = state.inbox.submit(event).await.map_err(|e| {
        if e.is_unavailable() {
            tracing::warn!(error = %e, "inbox unavailable; the provider will retry");
            ApiError::unavailable("The event could not be stored; retry later.")
        } else {
            ApiError::internal(e)
        }
    })?;
    metrics::histogram!("webhook_ingest_seconds", "provider" => provider.name())
        .record(started.elapsed().as_secs_f64());
    let duplicate = outcome == Stored::Duplicate;
    if duplicate {
        metrics::counter!("webhooks_duplicates_total", "provider" => provider.name()).increment(1);
    } else {
        state.inbox_wake.notify_one();
    }
    Ok(Json(serde_json::json!({ "received": true, "duplicate": duplicate })))
}

fn verify_stripe(state: &AppState, headers: &HeaderMap, body: &[u8]) -> Result<NewProviderEvent, ApiError> {
    let provider = Provider::Stripe;
    let secrets = state.stripe_webhook_secrets.clone();
    if secrets.is_empty() {
        // Misconfiguration, not bad input: 503 so Stripe keeps the event and retries.
        tracing::error!("a Stripe webhook arrived but STRIPE_WEBHOOK_SECRET is not set");
        return Err(ApiError::unavailable("Webhook verification is not configured on this server."));
    }
    let header = match headers.get("stripe-signature") {
        None => None,
        Some(v) => Some(v.to_str().map_err(|_| {
            reject(provider, "signature_malformed", "The Stripe-Signature header is not ASCII.")
        })?),
    };
    let exposed: Vec<&str> = secrets.iter().map(|s| s.expose_secret()).collect();
    stripe_signature::verify(
        header,
        body,
        &exposed,
        crate::store::now_unix(),
        state.config.webhook_tolerance_seconds as i64,
    )
    .map_err(|e| reject(provider, e.code(), e.message()))?;
    parse_stripe_event(body).map_err(|message| reject(provider, "event_invalid", message))
}

/// The fields tollgate indexes, from a verified Stripe event.
pub fn parse_stripe_event(body: &[u8]) -> Result<NewProviderEvent, String> {
    let value: Value = serde_json::from_slice(body).map_err(|e| format!("The body is not JSON: {e}."))?;
    let id = value["id"]
        .as_str()
        .filter(|id| id.starts_with("evt_") && id.len() <= 255)
        .ok_or("The event has no valid `id` (evt_…).")?;
    let kind = value["type"]
        .as_str()
        .filter(|t| !t.is_empty() && t.len() <= 255)
        .ok_or("The event has no `type`.")?;
    let created =
        value["created"].as_i64().filter(|c| *c > 0).ok_or("The event has no `created` timestamp.")?;
    let object = value["data"]["object"].as_object().ok_or("The event has no `data.object`.")?;
    let body = String::from_utf8(body.to_vec()).map_err(|_| "The body is not UTF-8.".to_owned())?;
    if body.contains('\0') {
        return Err("The body contains a NUL character.".to_owned());
    }
    // Decided at ingest, so workers only ever see events they can apply.
    let (initial_status, first_attempt_at) = match apply::disposition(Provider::Stripe.name(), kind) {
        apply::Disposition::Apply => ("received", 0),
        apply::Disposition::Ignore => ("ignored", 0),
        apply::Disposition::Defer => ("received", i64::MAX / 2),
    };
    Ok(NewProviderEvent {
        initial_status,
        first_attempt_at,
        provider: Provider::Stripe.name(),
        provider_event_id: id.to_owned(),
        event_type: kind.to_owned(),
        object_id: object.get("id").and_then(Value::as_str).map(str::to_owned),
        provider_created: created,
        api_version: value["api_version"].as_str().map(str::to_owned),
        livemode: value["livemode"].as_bool().unwrap_or(false),
        body,
        source: "webhook",
    })
}

/// Shared pieces of webhook state kept in [`AppState`].
pub type Secrets = Arc<Vec<secrecy::SecretString>>;
