//! Applying stored provider events to tollgate's state, each in one
//! transaction with its inbox status, watermark and audit entries.

use serde_json::Value;

use crate::billing::ordering;
use crate::ids::ExternalId;
use crate::store::audit::Actor;
use crate::store::customers::{apply_provider_customer, ProviderCustomer};
use crate::store::provider_events::{mark_applied, ProviderEventRecord};
use crate::store::{sql, watermarks, SqlxResultExt, Store, StoreError};

/// What the worker does with an event type.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Disposition {
    /// Mapped: apply it.
    Apply,
    /// A type tollgate does not use: stored, marked ignored, never an error.
    Ignore,
    /// A type tollgate will map (SPEC 4.6) but this version cannot apply
    /// yet: left in the inbox, untouched, for a version that can.
    Defer,
}

/// The Stripe event types tollgate must handle (SPEC 4.6).
pub const STRIPE_HANDLED: &[&str] = &[
    "checkout.session.completed",
    "checkout.session.async_payment_succeeded",
    "checkout.session.async_payment_failed",
    "checkout.session.expired",
    "customer.created",
    "customer.updated",
    "customer.deleted",
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
    "customer.subscription.paused",
    "customer.subscription.resumed",
    "customer.subscription.trial_will_end",
    "invoice.paid",
    "invoice.payment_succeeded",
    "invoice.payment_failed",
    "payment_intent.succeeded",
    "payment_intent.payment_failed",
    "charge.refunded",
    "refund.created",
    "refund.updated",
    "charge.dispute.created",
    "charge.dispute.closed",
];

pub fn disposition(provider: &str, event_type: &str) -> Disposition {
    match (provider, event_type) {
        ("stripe", "customer.created" | "customer.updated" | "customer.deleted") => Disposition::Apply,
        ("stripe", t) if STRIPE_HANDLED.contains(&t) => Disposition::Defer,
        _ => Disposition::Ignore,
    }
}

/// Why applying failed: retried later, or dead after too many attempts.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("payload: {0}")]
    Payload(String),
}

/// The outcome of one attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Applied {
    Processed,
    /// Older than what the object already reflects: recorded, no effect.
    Stale,
    Ignored,
    Deferred,
    /// Another worker finished it first.
    AlreadyDone,
}

/// The provider API path of an object, for refetching it.
fn object_path(object: &Value) -> Option<String> {
    let id = object["id"].as_str()?;
    let collection = match object["object"].as_str()? {
        "customer" => "customers",
        "subscription" => "subscriptions",
        "invoice" => "invoices",
        "charge" => "charges",
        "payment_intent" => "payment_intents",
        "checkout.session" => "checkout/sessions",
        "refund" => "refunds",
        "dispute" => "disputes",
        _ => return None,
    };
    Some(format!("/v1/{collection}/{id}"))
}

/// `STRIPE_REFETCH`: the object as the provider has it now, instead of the
/// payload's snapshot. Fetched before any transaction opens. An object the
/// provider no longer has (deleted) keeps the payload.
pub async fn refetch(
    client: &crate::providers::stripe::StripeClient,
    body: &mut Value,
) -> Result<(), ApplyError> {
    let Some(path) = object_path(&body["data"]["object"]) else { return Ok(()) };
    match client.get(&path, &[]).await {
        Ok(current) => {
            body["data"]["object"] = current;
            Ok(())
        }
        Err(crate::providers::stripe::StripeClientError::Api { status: 404, .. }) => Ok(()),
        Err(e) => Err(ApplyError::Payload(format!("refetch failed: {e}"))),
    }
}

pub async fn apply(
    store: &Store,
    event: &ProviderEventRecord,
    refetch_with: Option<&crate::providers::stripe::StripeClient>,
) -> Result<Applied, ApplyError> {
    let disposition = disposition(&event.provider, &event.event_type);
    if disposition == Disposition::Defer {
        return Ok(Applied::Deferred);
    }
    let mut body: Value =
        serde_json::from_str(&event.body).map_err(|e| ApplyError::Payload(e.to_string()))?;
    if let (Some(client), Disposition::Apply, "stripe") = (refetch_with, disposition, event.provider.as_str())
    {
        refetch(client, &mut body).await?;
    }
    let mut tx = store.begin().await?;
    // Claim the event for this transaction first: a second worker holding a
    // lapsed lease finds it done and changes nothing.
    let status = if disposition == Disposition::Ignore { "ignored" } else { "processed" };
    let won = sql!(
        tx,
        query(
            "UPDATE provider_events SET status = $1 WHERE id = $2 AND status IN ('received', 'failed')",
            status,
            &event.id
        )
        .execute
    )
    .db()?;
    if won == 0 {
        return Ok(Applied::AlreadyDone);
    }
    let outcome = match disposition {
        Disposition::Ignore => Applied::Ignored,
        _ => {
            let object = &body["data"]["object"];
            let position = ordering::position(
                event.provider_created,
                &event.event_type,
                object["status"].as_str(),
                &event.provider_event_id,
            );
            let object_id =
                event.object_id.clone().ok_or_else(|| ApplyError::Payload("data.object has no id".into()))?;
            if watermarks::advance(&mut tx, &event.provider, &object_id, &position).await? {
                apply_stripe(&mut tx, &event.event_type, object).await?;
                Applied::Processed
            } else {
                Applied::Stale
            }
        }
    };
    mark_applied(&mut tx, &event.id, status).await?;
    tx.commit().await?;
    Ok(outcome)
}

async fn apply_stripe(tx: &mut crate::store::Tx, event_type: &str, object: &Value) -> Result<(), ApplyError> {
    let actor = Actor::System("stripe");
    match event_type {
        "customer.created" | "customer.updated" | "customer.deleted" => {
            let id =
                object["id"].as_str().ok_or_else(|| ApplyError::Payload("customer without id".into()))?;
            let external_id =
                object["metadata"]["tollgate_external_id"].as_str().and_then(|e| ExternalId::parse(e).ok());
            let pc = ProviderCustomer {
                provider: "stripe",
                id: id.to_owned(),
                email: object["email"].as_str().map(str::to_owned),
                name: object["name"].as_str().map(str::to_owned),
                external_id,
                deleted: event_type == "customer.deleted" || object["deleted"] == true,
            };
            apply_provider_customer(tx, &pc, &actor).await?;
            Ok(())
        }
        other => Err(ApplyError::Payload(format!("no mapping for {other}"))),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_type_is_applied_or_deferred_and_others_ignored() {
        for t in STRIPE_HANDLED {
            assert_ne!(disposition("stripe", t), Disposition::Ignore, "{t}");
        }
        assert_eq!(disposition("stripe", "plan.created"), Disposition::Ignore);
        assert_eq!(disposition("stripe", "customer.created"), Disposition::Apply);
    }
}
