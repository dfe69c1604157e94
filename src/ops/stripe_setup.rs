//! `tollgate stripe setup`: registers tollgate's webhook endpoint
//! (`{PUBLIC_URL}/webhooks/stripe`) with the event types tollgate handles,
//! and keeps the signing secret Stripe returns so webhook verification uses
//! it from the next start.
//!
//! Idempotent: an endpoint with that URL is updated (events, re-enabled),
//! never duplicated. Stripe shows a secret only when it creates the
//! endpoint, so an endpoint made elsewhere keeps its secret where it is: the
//! operator is told to put it in `STRIPE_WEBHOOK_SECRET`.

use std::collections::BTreeSet;

use secrecy::SecretString;
use serde_json::Value;

use crate::providers::stripe::{Form, StripeClient, StripeClientError, API_VERSION};
use crate::store::audit::Actor;
use crate::store::Store;
use crate::webhooks::apply::STRIPE_HANDLED;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SetupAction {
    Created,
    Updated,
    Unchanged,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SetupReport {
    pub endpoint_id: String,
    pub url: String,
    pub action: SetupAction,
    pub event_types: usize,
    /// Whether tollgate's database holds this endpoint's signing secret.
    pub secret_stored: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum SetupError {
    #[error(transparent)]
    Stripe(#[from] StripeClientError),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
    #[error("Stripe's answer was not understood: {0}")]
    Unexpected(&'static str),
}

pub fn webhook_url(public_url: &str) -> String {
    format!("{}/webhooks/stripe", public_url.trim_end_matches('/'))
}

#[tracing::instrument(name = "ops.stripe_setup", skip_all, fields(url = %url))]
pub async fn setup_stripe(
    store: &Store,
    client: &StripeClient,
    url: &str,
    actor: &Actor,
) -> Result<SetupReport, SetupError> {
    let wanted: BTreeSet<&str> = STRIPE_HANDLED.iter().copied().collect();
    let endpoints = client.list_all("/v1/webhook_endpoints", &[]).await?;
    let existing = endpoints.iter().find(|e| e["url"] == url);
    let report = |endpoint_id: String, action, secret_stored| SetupReport {
        endpoint_id,
        url: url.to_owned(),
        action,
        event_types: wanted.len(),
        secret_stored,
    };
    match existing {
        Some(endpoint) => {
            let id = endpoint["id"].as_str().ok_or(SetupError::Unexpected("an endpoint without an id"))?;
            let has: BTreeSet<&str> = endpoint["enabled_events"]
                .as_array()
                .into_iter()
                .flatten()
                .filter_map(Value::as_str)
                .collect();
            // `*` already covers every type; anything else must list ours exactly.
            let events_ok = has.contains("*") || has == wanted;
            let enabled = endpoint["status"] == "enabled";
            let action = if events_ok && enabled {
                SetupAction::Unchanged
            } else {
                let form = Form::new().list("enabled_events", wanted.iter()).set("disabled", false);
                client.post(&format!("/v1/webhook_endpoints/{id}"), &form, None).await?;
                SetupAction::Updated
            };
            let stored = store.has_provider_webhook_secret("stripe", id).await?;
            Ok(report(id.to_owned(), action, stored))
        }
        None => {
            let form = Form::new()
                .set("url", url)
                .list("enabled_events", wanted.iter())
                .set("api_version", API_VERSION)
                .set("description", "tollgate")
                .metadata([("tollgate", "true")]);
            let created = client.post("/v1/webhook_endpoints", &form, None).await?;
            let id = created["id"].as_str().ok_or(SetupError::Unexpected("an endpoint without an id"))?;
            let secret = created["secret"]
                .as_str()
                .filter(|s| !s.is_empty())
                .ok_or(SetupError::Unexpected("a new endpoint without its secret"))?;
            store
                .save_provider_webhook_endpoint(
                    "stripe",
                    id,
                    url,
                    &SecretString::from(secret.to_owned()),
                    actor,
                )
                .await?;
            Ok(report(id.to_owned(), SetupAction::Created, true))
        }
    }
}
