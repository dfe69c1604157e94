//! Applying stored provider events to tollgate's state, each in one
//! transaction with its inbox status, watermark and audit entries.

use serde_json::Value;

use crate::billing::ordering;
use crate::ids::ExternalId;
use crate::providers::stripe::objects;
use crate::providers::stripe::{StripeClient, StripeClientError};
use crate::store::audit::Actor;
use crate::store::customers::{
    adopt_guest, apply_provider_customer, resolve_provider_customer, ProviderCustomer,
};
use crate::store::orders::{self, Cause};
use crate::store::provider_events::{mark_applied, ProviderEventRecord};
use crate::store::subscriptions;
use crate::store::{watermarks, Store, StoreError};

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
        ("stripe", t) if STRIPE_HANDLED.contains(&t) => Disposition::Apply,
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

impl ApplyError {
    /// Lost a race with another worker applying a related event (both
    /// recording the same new customer or session, or a deadlock between
    /// them): running again at once sees the winner's commit and succeeds.
    pub fn is_conflict(&self) -> bool {
        match self {
            ApplyError::Store(StoreError::Conflict(_)) => true,
            ApplyError::Store(StoreError::Database(sqlx::Error::Database(db))) => db.is_unique_violation(),
            // PostgreSQL chose this transaction as a deadlock victim (or a
            // serialization failure): the other one has moved on.
            ApplyError::Store(StoreError::Unavailable(sqlx::Error::Database(db))) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
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
pub async fn refetch(client: &StripeClient, body: &mut Value) -> Result<(), ApplyError> {
    let Some(path) = object_path(&body["data"]["object"]) else { return Ok(()) };
    match client.get(&path, &[]).await {
        Ok(current) => {
            body["data"]["object"] = current;
            Ok(())
        }
        Err(StripeClientError::Api { status: 404, .. }) => Ok(()),
        Err(e) => Err(ApplyError::Payload(format!("refetch failed: {e}"))),
    }
}

/// What applying an event needs from outside the database, gathered before
/// any transaction opens (no network call holds a database lock).
#[derive(Debug)]
pub struct Prepared {
    disposition: Disposition,
    body: Value,
    line_items: Option<Vec<objects::LineItem>>,
}

/// Reads the event's payload and, from the provider's API, what the
/// payload leaves out (a foreign checkout's line items) and, with
/// `refetch`, the object's current state. `None`: the event is deferred.
pub async fn prepare(
    store: &Store,
    event: &ProviderEventRecord,
    stripe: Option<&StripeClient>,
    refetch: bool,
) -> Result<Option<Prepared>, ApplyError> {
    let disposition = disposition(&event.provider, &event.event_type);
    if disposition == Disposition::Defer {
        return Ok(None);
    }
    let mut body: Value =
        serde_json::from_str(&event.body).map_err(|e| ApplyError::Payload(e.to_string()))?;
    let mut line_items = None;
    if let (Some(client), Disposition::Apply, "stripe") = (stripe, disposition, event.provider.as_str()) {
        if refetch {
            self::refetch(client, &mut body).await?;
        }
        line_items = fetch_line_items_if_unknown(store, client, &event.event_type, &body).await?;
    }
    Ok(Some(Prepared { disposition, body, line_items }))
}

/// Applies one stored event in its own transaction. `stripe` is the
/// provider's API, used to read what a payload leaves out and, with
/// `refetch`, the object's current state.
pub async fn apply(
    store: &Store,
    event: &ProviderEventRecord,
    stripe: Option<&StripeClient>,
    refetch: bool,
    policy: &crate::billing::entitlements::Policy,
) -> Result<Applied, ApplyError> {
    let Some(prepared) = prepare(store, event, stripe, refetch).await? else { return Ok(Applied::Deferred) };
    let mut tx = store.begin().await?;
    let outcome = apply_in(&mut tx, event, &prepared, Marked::No, policy).await?;
    tx.commit().await?;
    Ok(outcome)
}

/// What the caller already did for the event in this transaction: a batch
/// marks its events done with one statement, and moves the watermarks of
/// the objects it names once with one more.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Marked {
    No,
    /// Marked done; its object's watermark is still to move.
    Yes,
    /// Marked done, and its object's watermark moved (`true`) or was
    /// already newer (`false`: the event is stale).
    WithWatermark(bool),
}

impl Prepared {
    /// Mapped, so applying it marks it `processed` (not `ignored`).
    pub fn is_applicable(&self) -> bool {
        self.disposition == Disposition::Apply
    }

    /// The provider customer whose owner applying the event looks up: the
    /// customer of a checkout session, subscription or invoice.
    pub fn provider_customer<'p>(&'p self, event: &ProviderEventRecord) -> Option<&'p str> {
        let t = event.event_type.as_str();
        if event.provider != "stripe"
            || !(t.starts_with("checkout.session.")
                || t.starts_with("customer.subscription.")
                || t.starts_with("invoice."))
        {
            return None;
        }
        let customer = &self.body["data"]["object"]["customer"];
        customer.as_str().or_else(|| customer["id"].as_str())
    }

    /// The object the event is about, and the event's place in that
    /// object's history (see [`ordering`]).
    pub fn watermark<'e>(
        &self,
        event: &'e ProviderEventRecord,
    ) -> Result<(&'e str, ordering::Position), ApplyError> {
        let object = &self.body["data"]["object"];
        let position = ordering::position(
            event.provider_created,
            &event.event_type,
            object["status"].as_str(),
            &event.provider_event_id,
        );
        let object_id =
            event.object_id.as_deref().ok_or_else(|| ApplyError::Payload("data.object has no id".into()))?;
        Ok((object_id, position))
    }
}

/// Applies one prepared event inside `tx`, which may hold other events of
/// a batch: everything the event changes, its inbox status included,
/// commits or rolls back with `tx` (or with the caller's savepoint).
pub async fn apply_in(
    tx: &mut crate::store::Tx,
    event: &ProviderEventRecord,
    prepared: &Prepared,
    marked: Marked,
    policy: &crate::billing::entitlements::Policy,
) -> Result<Applied, ApplyError> {
    let Prepared { disposition, body, line_items } = prepared;
    let disposition = *disposition;
    // Claim the event for this transaction first, marking it done: a second
    // worker holding a lapsed lease finds it done and changes nothing, and a
    // failure below rolls the mark back with everything else.
    let status = if disposition == Disposition::Ignore { "ignored" } else { "processed" };
    if marked == Marked::No && !mark_applied(tx, &event.id, status).await? {
        return Ok(Applied::AlreadyDone);
    }
    let outcome = match disposition {
        Disposition::Ignore => Applied::Ignored,
        _ => {
            let object = &body["data"]["object"];
            let advanced = match marked {
                Marked::WithWatermark(advanced) => advanced,
                Marked::No | Marked::Yes => {
                    let (object_id, position) = prepared.watermark(event)?;
                    watermarks::advance(tx, &event.provider, object_id, &position).await?
                }
            };
            if advanced {
                let cause = Cause {
                    provider: "stripe",
                    provider_event_id: Some(&event.id),
                    at: event.provider_created,
                    actor: &Actor::System("stripe"),
                    policy,
                };
                apply_stripe(tx, cause, &event.event_type, object, line_items.as_deref()).await?;
                Applied::Processed
            } else {
                Applied::Stale
            }
        }
    };
    Ok(outcome)
}

/// A checkout tollgate did not start becomes an order only with its line
/// items, which Stripe leaves out of the event: read them before the
/// transaction opens (no network call holds a database lock).
async fn fetch_line_items_if_unknown(
    store: &Store,
    client: &StripeClient,
    event_type: &str,
    body: &Value,
) -> Result<Option<Vec<objects::LineItem>>, ApplyError> {
    let object = &body["data"]["object"];
    if !event_type.starts_with("checkout.session.") || object["mode"].as_str().is_some_and(|m| m != "payment")
    {
        return Ok(None);
    }
    let Ok(session) = objects::checkout_session(object) else { return Ok(None) };
    if store.knows_checkout_session("stripe", &session.id, session.client_reference_id.as_deref()).await? {
        return Ok(None);
    }
    let path = format!("/v1/checkout/sessions/{}/line_items", session.id);
    match client.list_all(&path, &[]).await {
        Ok(items) => Ok(Some(items.iter().map(objects::line_item).collect())),
        // Unknown to the provider tollgate asks (a key of another account
        // or mode, or another Stripe than the one that sent the event): a
        // completed checkout recorded without its lines would take the
        // money and grant nothing, silently. That event fails instead, is
        // retried, and ends dead and replayable once the configuration is
        // fixed. An expired or failed one sells nothing: its order is
        // recorded without lines, and said so.
        Err(StripeClientError::Api { status: 404, .. }) if session.status != "complete" => {
            tracing::warn!(session = %session.id, "line items unknown to the provider; the unpaid order is recorded without lines");
            Ok(Some(Vec::new()))
        }
        Err(StripeClientError::Api { status: 404, .. }) => {
            let cause = match (body["livemode"].as_bool(), client.is_live()) {
                (Some(true), false) => "the event is from live mode and STRIPE_SECRET_KEY is a test key",
                (Some(false), true) => "the event is from test mode and STRIPE_SECRET_KEY is a live key",
                _ => "is STRIPE_SECRET_KEY the key of the account (and mode) that sent this event?",
            };
            Err(ApplyError::Payload(format!(
                "checkout session {} is unknown to the provider, so its line items cannot be read: {cause}",
                session.id
            )))
        }
        Err(e) => Err(ApplyError::Payload(format!("line items could not be read: {e}"))),
    }
}

fn read<T>(parsed: Result<T, objects::ReadError>) -> Result<T, ApplyError> {
    parsed.map_err(|e| ApplyError::Payload(e.to_string()))
}

/// The tollgate customer an object belongs to: its provider customer, linked
/// (or adopted) on first sight, with the application's id from metadata when
/// tollgate put it there.
async fn customer_for(
    tx: &mut crate::store::Tx,
    cause: Cause<'_>,
    provider_customer: &str,
    metadata: &Value,
) -> Result<String, ApplyError> {
    let external = metadata["tollgate_external_id"].as_str().and_then(|e| ExternalId::parse(e).ok());
    Ok(resolve_provider_customer(tx, "stripe", provider_customer, external, cause.actor, cause.policy)
        .await?)
}

async fn apply_stripe(
    tx: &mut crate::store::Tx,
    cause: Cause<'_>,
    event_type: &str,
    object: &Value,
    line_items: Option<&[objects::LineItem]>,
) -> Result<(), ApplyError> {
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
            apply_provider_customer(tx, &pc, cause.actor, cause.policy).await?;
        }
        t if t.starts_with("checkout.session.") => {
            let mut session = read(objects::checkout_session(object))?;
            if session.mode == "setup" {
                // Saving a card sells nothing: no order, no subscription.
                return Ok(());
            }
            if object["status"].is_null() && t == "checkout.session.expired" {
                // Payloads from before `status` existed: the event says it.
                session.status = "expired".to_owned();
            }
            let customer = match &session.customer {
                Some(c) => Some(customer_for(tx, cause, c, &session.metadata).await?),
                // A guest payment (a session made outside tollgate without a
                // customer) still has an owner the application can find.
                None if session.mode == "payment" && session.status == "complete" => {
                    let external = session.metadata["tollgate_external_id"]
                        .as_str()
                        .and_then(|e| ExternalId::parse(e).ok());
                    Some(
                        adopt_guest(
                            tx,
                            "stripe",
                            &session.id,
                            external,
                            session.customer_email.clone(),
                            cause.actor,
                        )
                        .await?,
                    )
                }
                None => None,
            };
            let failed = t == "checkout.session.async_payment_failed";
            orders::apply_checkout_session(tx, cause, &session, customer.as_deref(), line_items, failed)
                .await?;
        }
        t if t.starts_with("customer.subscription.") => {
            let sub = read(objects::subscription(object))?;
            let customer = customer_for(tx, cause, &sub.customer, &sub.metadata).await?;
            subscriptions::apply_subscription(tx, cause, &sub, &customer).await?;
        }
        t if t.starts_with("invoice.") => {
            let inv = read(objects::invoice(object))?;
            let customer = match &inv.customer {
                Some(c) => Some(customer_for(tx, cause, c, &Value::Null).await?),
                None => None,
            };
            let failed = t == "invoice.payment_failed";
            subscriptions::apply_invoice(tx, cause, &inv, customer.as_deref(), failed).await?;
        }
        t if t.starts_with("payment_intent.") => {
            orders::apply_payment(tx, cause, &read(objects::payment_intent(object))?).await?;
        }
        "charge.refunded" => {
            let charge = read(objects::charge(object))?;
            orders::apply_payment(tx, cause, &charge).await?;
            orders::apply_refunds(tx, cause, &objects::charge_refunds(object), true).await?;
        }
        t if t.starts_with("refund.") => {
            orders::apply_refunds(tx, cause, &[read(objects::refund(object))?], false).await?;
        }
        t if t.starts_with("charge.dispute.") => {
            orders::apply_dispute(tx, cause, &read(objects::dispute(object))?).await?;
        }
        other => return Err(ApplyError::Payload(format!("no mapping for {other}"))),
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spec_type_is_applied_and_others_ignored() {
        for t in STRIPE_HANDLED {
            assert_eq!(disposition("stripe", t), Disposition::Apply, "{t}");
        }
        assert_eq!(disposition("stripe", "plan.created"), Disposition::Ignore);
        assert_eq!(disposition("stripe", "customer.created"), Disposition::Apply);
    }
}
