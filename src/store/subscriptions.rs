//! The mirror of provider subscriptions and their invoices.
//!
//! Each apply stores the object's latest snapshot (the caller has checked
//! its watermark, so an older snapshot never lands) and announces what
//! changed compared with what was stored.

use serde::Serialize;
use serde_json::json;

use super::audit::{self, Actor, AuditRecord};
use super::customers::resolve_provider_customer;
use super::events::{emit, emit_now, NewEvent};
use super::orders::{resolve_price, Cause};
use super::{now_unix, sql, watermarks, SqlxResultExt, Store, StoreResult, Tx};
use crate::billing::ordering;
use crate::ids::{new_id, ExternalId};
use crate::providers::stripe::objects::{Invoice, Subscription};

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct SubscriptionRow {
    pub id: String,
    pub provider: String,
    pub provider_subscription_id: String,
    pub customer_id: String,
    pub status: String,
    pub price_id: Option<String>,
    pub provider_price_id: Option<String>,
    pub quantity: i64,
    pub items: String,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<i64>,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub trial_start: Option<i64>,
    pub trial_end: Option<i64>,
    pub past_due_since: Option<i64>,
    pub latest_invoice_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

const SUBSCRIPTION_COLUMNS: &str = "id, provider, provider_subscription_id, customer_id, status, price_id, \
     provider_price_id, quantity, items, current_period_start, current_period_end, cancel_at_period_end, cancel_at, \
     canceled_at, ended_at, trial_start, trial_end, past_due_since, latest_invoice_id, created_at, updated_at";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct InvoiceRow {
    pub provider_invoice_id: String,
    pub customer_id: Option<String>,
    pub provider_subscription_id: Option<String>,
    pub status: String,
    pub billing_reason: Option<String>,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub attempt_count: i64,
    pub payment_key: Option<String>,
    pub paid_at: Option<i64>,
}

const INVOICE_COLUMNS: &str =
    "provider_invoice_id, customer_id, provider_subscription_id, status, billing_reason, \
     currency, amount_due, amount_paid, attempt_count, payment_key, paid_at";

impl Store {
    pub async fn subscription_by_provider_id(
        &self,
        provider: &str,
        provider_subscription_id: &str,
    ) -> StoreResult<Option<SubscriptionRow>> {
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE provider = $1 AND provider_subscription_id = $2"
        );
        sql!(self, query_as::<SubscriptionRow>(&sql, provider, provider_subscription_id).fetch_optional).db()
    }

    pub async fn subscriptions_for_customer(&self, customer_id: &str) -> StoreResult<Vec<SubscriptionRow>> {
        let sql =
            format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE customer_id = $1 ORDER BY id");
        sql!(self, query_as::<SubscriptionRow>(&sql, customer_id).fetch_all).db()
    }

    pub async fn invoice_by_provider_id(&self, provider: &str, id: &str) -> StoreResult<Option<InvoiceRow>> {
        let sql = format!(
            "SELECT {INVOICE_COLUMNS} FROM invoices WHERE provider = $1 AND provider_invoice_id = $2"
        );
        sql!(self, query_as::<InvoiceRow>(&sql, provider, id).fetch_optional).db()
    }
}

/// The fields an application cares about, for "what changed".
fn summary(row: &SubscriptionRow) -> serde_json::Value {
    json!({
        "status": row.status,
        "price": row.price_id,
        "provider_price": row.provider_price_id,
        "quantity": row.quantity,
        "items": serde_json::from_str::<serde_json::Value>(&row.items).unwrap_or_default(),
        "current_period_start": row.current_period_start,
        "current_period_end": row.current_period_end,
        "cancel_at_period_end": row.cancel_at_period_end,
        "cancel_at": row.cancel_at,
        "canceled_at": row.canceled_at,
        "ended_at": row.ended_at,
        "trial_end": row.trial_end,
    })
}

pub fn subscription_json(row: &SubscriptionRow) -> serde_json::Value {
    let mut doc = summary(row);
    doc["id"] = json!(row.id);
    doc["object"] = json!("subscription");
    doc["customer"] = json!(row.customer_id);
    doc["provider"] = json!(row.provider);
    doc["provider_subscription_id"] = json!(row.provider_subscription_id);
    doc["past_due_since"] = json!(row.past_due_since);
    doc
}

/// Reads the subscriptions an inbox batch's events name, in one statement,
/// for [`apply_subscription`] to use (each once) instead of one round trip
/// per event. Ones not stored yet are remembered as such. Only
/// `apply_subscription` writes a subscription, after taking its entry;
/// a merge, which moves subscriptions, forgets them all.
pub async fn read_many(tx: &mut Tx, provider: &str, provider_subscription_ids: &[&str]) -> StoreResult<()> {
    let mut ids = provider_subscription_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    let sql = super::provider_rows_in(
        tx.kind(),
        SUBSCRIPTION_COLUMNS,
        "subscriptions",
        "provider_subscription_id",
        false,
    );
    let found: Vec<SubscriptionRow> =
        sql!(tx, query_as::<SubscriptionRow>(&sql, provider, serde_json::to_string(&ids)?).fetch_all).db()?;
    let mut found: std::collections::HashMap<String, SubscriptionRow> =
        found.into_iter().map(|row| (row.provider_subscription_id.clone(), row)).collect();
    for id in ids {
        let row = found.remove(id);
        tx.subscriptions_read.insert((provider.to_owned(), id.to_owned()), row);
    }
    Ok(())
}

/// Stores the subscription's snapshot for `customer_id` and announces it:
/// `subscription.created` the first time tollgate sees it,
/// `subscription.canceled` when it ends, `subscription.updated` otherwise.
pub async fn apply_subscription(
    tx: &mut Tx,
    cause: Cause<'_>,
    s: &Subscription,
    customer_id: &str,
) -> StoreResult<()> {
    let now = now_unix();
    let first = s.items.first();
    // The subscription's price is its first item's.
    let mut price_id = None;
    let mut items = Vec::new();
    for (index, item) in s.items.iter().enumerate() {
        let (price, product) = resolve_price(tx, cause.provider, item.price.as_deref()).await?;
        if index == 0 {
            price_id = price.clone();
        }
        items.push(json!({
            "price": price, "product": product, "provider_price": item.price,
            "provider_product": item.product, "quantity": item.quantity,
        }));
    }
    let previous = match tx.subscriptions_read.remove(&(cause.provider.to_owned(), s.id.clone())) {
        // Read with the batch's other subscriptions.
        Some(read) => read,
        None => {
            tx.write_deferred().await?;
            let sql = format!(
                "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE provider = $1 AND provider_subscription_id = $2"
            );
            sql!(tx, query_as::<SubscriptionRow>(&sql, cause.provider, &s.id).fetch_optional).db()?
        }
    };
    // Grace periods count from when payment started failing, which the
    // provider reports as the first past_due snapshot.
    let past_due_since = match (&previous, s.status.as_str()) {
        (Some(p), "past_due") => p.past_due_since.or(Some(cause.at)),
        (None, "past_due") => Some(cause.at),
        _ => None,
    };
    let row = SubscriptionRow {
        id: previous.as_ref().map(|p| p.id.clone()).unwrap_or_else(|| new_id("sub")),
        provider: cause.provider.to_owned(),
        provider_subscription_id: s.id.clone(),
        customer_id: customer_id.to_owned(),
        status: s.status.clone(),
        price_id,
        provider_price_id: first.and_then(|i| i.price.clone()),
        quantity: first.map(|i| i.quantity).unwrap_or(1),
        items: serde_json::Value::Array(items).to_string(),
        current_period_start: s.current_period_start,
        current_period_end: s.current_period_end,
        cancel_at_period_end: s.cancel_at_period_end,
        cancel_at: s.cancel_at,
        canceled_at: s.canceled_at,
        ended_at: s.ended_at,
        trial_start: s.trial_start,
        trial_end: s.trial_end,
        past_due_since,
        latest_invoice_id: s.latest_invoice.clone(),
        created_at: previous.as_ref().map(|p| p.created_at).unwrap_or(now),
        updated_at: now,
    };
    if previous.as_ref().is_some_and(|p| summary(p) == summary(&row) && p.customer_id == row.customer_id) {
        return Ok(());
    }
    let written = DeferredSubscription {
        row: row.clone(),
        metadata: s.metadata.to_string(),
        provider_created: s.created,
    };
    if tx.defer_rows {
        // A later event of the batch about this subscription finds this
        // snapshot as its previous one, as it would have found the row.
        tx.subscriptions_read
            .insert((row.provider.clone(), row.provider_subscription_id.clone()), Some(row.clone()));
        // Written once, as the batch's last event about it left it.
        let held = &mut tx.deferred.subscriptions;
        let same = |h: &&mut DeferredSubscription| {
            h.row.provider == row.provider && h.row.provider_subscription_id == row.provider_subscription_id
        };
        match held.iter_mut().find(same) {
            Some(earlier) => *earlier = written,
            None => held.push(written),
        }
    } else {
        upsert(tx, std::slice::from_ref(&written)).await?;
    }
    let (action, event_type) = match (&previous, row.status.as_str()) {
        (None, _) => ("subscription.created", "subscription.created"),
        (Some(p), "canceled" | "incomplete_expired") if p.status != row.status => {
            ("subscription.canceled", "subscription.canceled")
        }
        _ => ("subscription.updated", "subscription.updated"),
    };
    let mut data = subscription_json(&row);
    if let Some(p) = &previous {
        data["previous"] = summary(p);
    }
    audit::append(
        tx,
        AuditRecord {
            actor: cause.actor,
            action,
            object_type: "subscription",
            object_id: &row.id,
            data: json!({ "provider_subscription_id": row.provider_subscription_id, "status": row.status }),
            request_id: None,
        },
    )
    .await?;
    let announce = |event_type| NewEvent {
        event_type,
        customer_id: Some(customer_id),
        object_type: "subscription",
        object_id: &row.id,
        provider_event_id: cause.provider_event_id,
        data: data.clone(),
        dedupe_key: None,
    };
    emit(tx, announce(event_type)).await?;
    // First seen already ended (its earlier events were lost or are older):
    // the application still hears both that it existed and that it ended.
    if previous.is_none() && matches!(row.status.as_str(), "canceled" | "incomplete_expired") {
        emit(tx, announce("subscription.canceled")).await?;
    }
    super::entitlements::recompute_later(tx, customer_id, cause.provider_event_id, cause.actor, cause.policy);
    if let Some(p) = previous.as_ref().filter(|p| p.customer_id != customer_id) {
        // Moved to another customer (a placeholder was claimed): the old
        // one loses what it had.
        super::entitlements::recompute_later(
            tx,
            &p.customer_id,
            cause.provider_event_id,
            cause.actor,
            cause.policy,
        );
    }
    Ok(())
}

/// A subscription snapshot held back by an inbox batch (see
/// `Tx::defer_rows`), with what `SubscriptionRow` does not carry.
pub(crate) struct DeferredSubscription {
    row: SubscriptionRow,
    metadata: String,
    provider_created: i64,
}

/// Writes the held-back snapshots (one per subscription, see
/// [`apply_subscription`]).
pub(crate) async fn write_deferred(tx: &mut Tx, subscriptions: &[DeferredSubscription]) -> StoreResult<()> {
    for chunk in super::events::chunked(subscriptions) {
        upsert(tx, chunk).await?;
    }
    Ok(())
}

/// Inserts or replaces subscription snapshots, one statement for all.
async fn upsert(tx: &mut Tx, chunk: &[DeferredSubscription]) -> StoreResult<()> {
    let rows = super::value_rows(tx.kind(), chunk.len(), 23);
    let sql = format!(
        "INSERT INTO subscriptions (id, provider, provider_subscription_id, customer_id, status, price_id, \
         provider_price_id, quantity, items, current_period_start, current_period_end, cancel_at_period_end, \
         cancel_at, canceled_at, ended_at, trial_start, trial_end, past_due_since, latest_invoice_id, metadata, \
         provider_created, created_at, updated_at) VALUES {rows} \
         ON CONFLICT (provider, provider_subscription_id) DO UPDATE SET customer_id = excluded.customer_id, \
         status = excluded.status, price_id = excluded.price_id, provider_price_id = excluded.provider_price_id, \
         quantity = excluded.quantity, items = excluded.items, current_period_start = excluded.current_period_start, \
         current_period_end = excluded.current_period_end, cancel_at_period_end = excluded.cancel_at_period_end, \
         cancel_at = excluded.cancel_at, canceled_at = excluded.canceled_at, ended_at = excluded.ended_at, \
         trial_start = excluded.trial_start, trial_end = excluded.trial_end, past_due_since = excluded.past_due_since, \
         latest_invoice_id = excluded.latest_invoice_id, metadata = excluded.metadata, updated_at = excluded.updated_at"
    );
    macro_rules! bind_rows {
        ($query:expr) => {{
            let mut q = $query;
            for d in chunk {
                let DeferredSubscription { row, metadata, provider_created } = d;
                q = q
                    .bind(&row.id)
                    .bind(&row.provider)
                    .bind(&row.provider_subscription_id)
                    .bind(&row.customer_id)
                    .bind(&row.status)
                    .bind(&row.price_id)
                    .bind(&row.provider_price_id)
                    .bind(row.quantity)
                    .bind(&row.items)
                    .bind(row.current_period_start)
                    .bind(row.current_period_end)
                    .bind(row.cancel_at_period_end)
                    .bind(row.cancel_at)
                    .bind(row.canceled_at)
                    .bind(row.ended_at)
                    .bind(row.trial_start)
                    .bind(row.trial_end)
                    .bind(row.past_due_since)
                    .bind(&row.latest_invoice_id)
                    .bind(metadata)
                    .bind(*provider_created)
                    .bind(row.created_at)
                    .bind(row.updated_at);
            }
            q
        }};
    }
    match tx.exec() {
        super::Exec::Sqlite(c) => bind_rows!(sqlx::query(&sql)).execute(c).await.map(|_| ()),
        super::Exec::Postgres(c) => bind_rows!(sqlx::query(&sql)).execute(c).await.map(|_| ()),
    }
    .db()
}

/// Stores the invoice's snapshot and announces `invoice.paid` once and
/// `invoice.payment_failed` once per failed attempt.
pub async fn apply_invoice(
    tx: &mut Tx,
    cause: Cause<'_>,
    inv: &Invoice,
    customer_id: Option<&str>,
    payment_failed: bool,
) -> StoreResult<()> {
    let now = now_unix();
    let payment_key = inv.payment_intent.clone().or_else(|| inv.charge.clone());
    let last_error = payment_failed.then_some("payment failed");
    sql!(
        tx,
        query(
            "INSERT INTO invoices (provider, provider_invoice_id, customer_id, provider_subscription_id, status, billing_reason, \
             currency, amount_due, amount_paid, attempt_count, payment_key, period_start, period_end, hosted_invoice_url, \
             paid_at, last_payment_error, provider_created, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14, $15, $16, $17, $18, $18) \
             ON CONFLICT (provider, provider_invoice_id) DO UPDATE SET customer_id = COALESCE(excluded.customer_id, invoices.customer_id), \
             provider_subscription_id = COALESCE(excluded.provider_subscription_id, invoices.provider_subscription_id), \
             status = excluded.status, billing_reason = excluded.billing_reason, currency = excluded.currency, \
             amount_due = excluded.amount_due, amount_paid = excluded.amount_paid, attempt_count = excluded.attempt_count, \
             payment_key = COALESCE(excluded.payment_key, invoices.payment_key), period_start = excluded.period_start, \
             period_end = excluded.period_end, hosted_invoice_url = excluded.hosted_invoice_url, \
             paid_at = COALESCE(invoices.paid_at, excluded.paid_at), \
             last_payment_error = COALESCE(excluded.last_payment_error, invoices.last_payment_error), updated_at = excluded.updated_at",
            cause.provider,
            &inv.id,
            customer_id,
            &inv.subscription,
            &inv.status,
            &inv.billing_reason,
            &inv.currency,
            inv.amount_due,
            inv.amount_paid,
            inv.attempt_count,
            &payment_key,
            inv.period_start,
            inv.period_end,
            &inv.hosted_invoice_url,
            (inv.status == "paid").then(|| inv.paid_at.unwrap_or(cause.at)),
            last_error,
            inv.created,
            now
        )
        .execute
    )
    .db()?;
    let subscription_id: Option<String> = match &inv.subscription {
        Some(provider_sub) => sql!(
            tx,
            query_scalar::<String>(
                "SELECT id FROM subscriptions WHERE provider = $1 AND provider_subscription_id = $2",
                cause.provider,
                provider_sub
            )
            .fetch_optional
        )
        .db()?,
        None => None,
    };
    let data = json!({
        "id": inv.id, "object": "invoice", "provider": cause.provider, "customer": customer_id,
        "subscription": subscription_id, "provider_subscription_id": inv.subscription, "status": inv.status,
        "billing_reason": inv.billing_reason, "amount_due": inv.amount_due, "amount_paid": inv.amount_paid,
        "currency": inv.currency, "attempt_count": inv.attempt_count, "hosted_invoice_url": inv.hosted_invoice_url,
        "period_start": inv.period_start, "period_end": inv.period_end,
    });
    let (event_type, dedupe_key) = if inv.status == "paid" {
        ("invoice.paid", format!("invoice.paid:{}:{}", cause.provider, inv.id))
    } else if payment_failed {
        (
            "invoice.payment_failed",
            format!("invoice.payment_failed:{}:{}:{}", cause.provider, inv.id, inv.attempt_count),
        )
    } else {
        return Ok(());
    };
    let emitted = emit_now(
        tx,
        NewEvent {
            event_type,
            customer_id,
            object_type: "invoice",
            object_id: &inv.id,
            provider_event_id: cause.provider_event_id,
            data,
            dedupe_key: Some(dedupe_key),
        },
    )
    .await?;
    if emitted.is_some() {
        audit::append(
            tx,
            AuditRecord {
                actor: cause.actor,
                action: event_type,
                object_type: "invoice",
                object_id: &inv.id,
                data: json!({ "provider": cause.provider, "status": inv.status, "attempt_count": inv.attempt_count }),
                request_id: None,
            },
        )
        .await?;
    }
    Ok(())
}

/// A change tollgate asked the provider for, and the provider's answer.
#[derive(Debug, Clone, Copy)]
pub struct Answered<'a> {
    /// tollgate's subscription (`sub_…`), for the audit entry.
    pub subscription_id: &'a str,
    /// `subscription.change`, `subscription.cancel`, `subscription.resume`.
    pub action: &'a str,
    /// What was asked, for the audit entry.
    pub asked: &'a serde_json::Value,
    /// The provider's clock when it answered.
    pub at: i64,
    pub actor: &'a Actor,
    pub request_id: Option<&'a str>,
    pub policy: &'a crate::billing::entitlements::Policy,
}

impl Store {
    /// Applies the provider's answer to a change tollgate asked for, through
    /// the webhook's code path and watermark: an answer never overwrites a
    /// newer webhook already applied, and an older webhook arriving later
    /// is stale against it. The audit entry of the request is written in the
    /// same transaction whether or not the answer was newer. Returns the
    /// subscription as tollgate now reports it.
    pub async fn apply_subscription_answer(
        &self,
        s: &Subscription,
        answered: Answered<'_>,
    ) -> StoreResult<Option<SubscriptionRow>> {
        super::retry_lost_races(|| self.apply_subscription_answer_once(s, answered)).await?;
        self.subscription_by_provider_id("stripe", &s.id).await
    }

    /// Locks in the inbox's order (the object's watermark first, the audit
    /// chain last), so that it rarely deadlocks with a worker applying the
    /// same object's webhook.
    async fn apply_subscription_answer_once(
        &self,
        s: &Subscription,
        answered: Answered<'_>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let position = ordering::api_answer_position(answered.at, Some(&s.status), &new_id("api"));
        let applied = watermarks::advance(&mut tx, "stripe", &s.id, &position).await?;
        if applied {
            let cause = Cause {
                provider: "stripe",
                provider_event_id: None,
                at: answered.at,
                actor: answered.actor,
                policy: answered.policy,
            };
            let external =
                s.metadata["tollgate_external_id"].as_str().and_then(|e| ExternalId::parse(e).ok());
            let customer = resolve_provider_customer(
                &mut tx,
                "stripe",
                &s.customer,
                external,
                answered.actor,
                answered.policy,
            )
            .await?;
            apply_subscription(&mut tx, cause, s, &customer).await?;
        }
        audit::append(
            &mut tx,
            AuditRecord {
                actor: answered.actor,
                action: answered.action,
                object_type: "subscription",
                object_id: answered.subscription_id,
                data: json!({ "asked": answered.asked, "provider_status": s.status, "newer_than_known": applied }),
                request_id: answered.request_id,
            },
        )
        .await?;
        tx.commit().await
    }

    /// A catalog price as a subscription change needs it: its currency,
    /// whether it recurs and is still sold, and the provider price it maps to.
    pub async fn price_for_change(
        &self,
        price_id: &str,
        provider: &str,
    ) -> StoreResult<Option<PriceForChange>> {
        let row: Option<(String, String, bool)> = sql!(
            self,
            query_as::<(String, String, bool)>(
                "SELECT currency, kind, active FROM prices WHERE id = $1",
                price_id
            )
            .fetch_optional
        )
        .db()?;
        let Some((currency, kind, active)) = row else { return Ok(None) };
        // A team selling on a legacy plan id names it as `stripe_plan`;
        // Stripe accepts a plan id wherever a price id goes.
        let provider_price = match self.current_catalog_link(provider, "price", price_id).await? {
            Some(price) => Some(price),
            None => self.current_catalog_link(provider, "plan", price_id).await?,
        };
        Ok(Some(PriceForChange { currency, recurring: kind == "recurring", active, provider_price }))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PriceForChange {
    pub currency: String,
    pub recurring: bool,
    pub active: bool,
    pub provider_price: Option<String>,
}

impl Store {
    /// One subscription by tollgate's id (`sub_…` minted by tollgate).
    pub async fn get_subscription(&self, id: &str) -> StoreResult<Option<SubscriptionRow>> {
        let sql = format!("SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE id = $1");
        sql!(self, query_as::<SubscriptionRow>(&sql, id).fetch_optional).db()
    }

    /// Subscriptions, newest first, optionally of one customer.
    pub async fn list_subscriptions(
        &self,
        page: &super::Page,
        customer_id: Option<&str>,
    ) -> StoreResult<super::Listed<SubscriptionRow>> {
        self.ensure_cursor("subscriptions", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let sql = format!(
            "SELECT {SUBSCRIPTION_COLUMNS} FROM subscriptions WHERE ($1 IS NULL OR id {op} $1) \
             AND ($2 IS NULL OR customer_id = $2) ORDER BY id {order} LIMIT $3"
        );
        let cursor = page.cursor().map(str::to_owned);
        let rows: Vec<SubscriptionRow> =
            sql!(self, query_as::<SubscriptionRow>(&sql, cursor, customer_id, page.fetch_limit()).fetch_all)
                .db()?;
        Ok(page.finish(rows))
    }
}
