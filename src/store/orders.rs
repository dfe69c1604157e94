//! Checkout sessions, orders and the provider's payment facts (payments,
//! refunds, disputes) behind them.
//!
//! Provider facts are stored as the latest snapshot of each provider object
//! (the caller has already checked the object's watermark). After any fact
//! changes, the orders it concerns are recomputed from all the facts (see
//! `billing::orders`), and the order's events are emitted from the change
//! in its state, so duplicates and any arrival order give one set of effects.

use serde::Serialize;
use serde_json::{json, Value};

use super::audit::{self, Actor, AuditRecord};
use super::events::{emit, NewEvent};
use super::{now_unix, sql, SqlxResultExt, Store, StoreResult, Tx};
use crate::billing::orders::{OrderFacts, RefundFact};
use crate::ids::new_id;
use crate::providers::stripe::objects::{CheckoutSession, Dispute, LineItem, Payment, Refund};

/// Where an applied change came from, for audit entries and events.
#[derive(Debug, Clone, Copy)]
pub struct Cause<'a> {
    pub provider: &'a str,
    /// The inbox id (`pe_…`) of the provider event being applied; `None`
    /// for a provider's answer to tollgate's own API call.
    pub provider_event_id: Option<&'a str>,
    /// The provider event's `created`.
    pub at: i64,
    pub actor: &'a Actor,
    /// What fulfilment grants and takes back.
    pub policy: &'a crate::billing::entitlements::Policy,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OrderRow {
    pub id: String,
    pub customer_id: String,
    pub provider: String,
    pub status: String,
    pub currency: String,
    pub amount_total: i64,
    pub amount_refunded: i64,
    pub checkout_session_id: Option<String>,
    pub provider_checkout_session_id: Option<String>,
    pub payment_key: Option<String>,
    pub paid_at: Option<i64>,
    pub payment_failed_at: Option<i64>,
    pub canceled_at: Option<i64>,
    pub created_at: i64,
    pub updated_at: i64,
}

const ORDER_COLUMNS: &str = "id, customer_id, provider, status, currency, amount_total, amount_refunded, \
     checkout_session_id, provider_checkout_session_id, payment_key, paid_at, payment_failed_at, canceled_at, \
     created_at, updated_at";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OrderLineRow {
    pub line_no: i64,
    pub price_id: Option<String>,
    pub product_id: Option<String>,
    pub provider_price_id: Option<String>,
    pub description: Option<String>,
    pub quantity: i64,
    pub unit_amount: i64,
    pub amount_total: i64,
}

const LINE_COLUMNS: &str =
    "line_no, price_id, product_id, provider_price_id, description, quantity, unit_amount, amount_total";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CheckoutSessionRow {
    pub id: String,
    pub provider: String,
    pub provider_session_id: Option<String>,
    pub customer_id: Option<String>,
    pub mode: String,
    pub status: String,
    pub payment_status: Option<String>,
    pub order_id: Option<String>,
    pub provider_subscription_id: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

const SESSION_COLUMNS: &str =
    "id, provider, provider_session_id, customer_id, mode, status, payment_status, \
     order_id, provider_subscription_id, created_at, updated_at";

/// The catalog price and product a provider price id maps to, if any.
pub async fn resolve_price(
    tx: &mut Tx,
    provider: &str,
    provider_price_id: Option<&str>,
) -> StoreResult<(Option<String>, Option<String>)> {
    let Some(provider_price_id) = provider_price_id else { return Ok((None, None)) };
    let memo_key = (provider.to_owned(), provider_price_id.to_owned());
    if let Some(known) = tx.price_links.get(&memo_key) {
        return Ok(known.clone());
    }
    let row: Option<(String, String)> = sql!(
        tx,
        query_as::<(String, String)>(
            "SELECT p.id, p.product_id FROM provider_catalog_links l JOIN prices p ON p.id = l.catalog_id \
             WHERE l.provider = $1 AND l.provider_id = $2 AND l.kind IN ('price', 'plan')",
            provider,
            provider_price_id
        )
        .fetch_optional
    )
    .db()?;
    let resolved = match row {
        Some((price, product)) => (Some(price), Some(product)),
        None => (None, None),
    };
    tx.price_links.insert(memo_key, resolved.clone());
    Ok(resolved)
}

impl Store {
    /// Whether tollgate already knows this provider session (by its id, or
    /// by the tollgate id it carries as `client_reference_id`): an unknown
    /// one needs its line items fetched before it can become an order.
    pub async fn knows_checkout_session(
        &self,
        provider: &str,
        provider_session_id: &str,
        client_reference_id: Option<&str>,
    ) -> StoreResult<bool> {
        let found: Option<String> = sql!(
            self,
            query_scalar::<String>(
                "SELECT id FROM checkout_sessions WHERE (provider = $1 AND provider_session_id = $2) OR id = $3 LIMIT 1",
                provider,
                provider_session_id,
                client_reference_id.unwrap_or("")
            )
            .fetch_optional
        )
        .db()?;
        Ok(found.is_some())
    }

    pub async fn get_order(&self, id: &str) -> StoreResult<Option<(OrderRow, Vec<OrderLineRow>)>> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1");
        let Some(order) = sql!(self, query_as::<OrderRow>(&sql, id).fetch_optional).db()? else {
            return Ok(None);
        };
        let sql = format!("SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = $1 ORDER BY line_no");
        let lines = sql!(self, query_as::<OrderLineRow>(&sql, id).fetch_all).db()?;
        Ok(Some((order, lines)))
    }

    /// A customer's orders, oldest first.
    pub async fn orders_for_customer(&self, customer_id: &str) -> StoreResult<Vec<OrderRow>> {
        let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE customer_id = $1 ORDER BY id");
        sql!(self, query_as::<OrderRow>(&sql, customer_id).fetch_all).db()
    }

    pub async fn checkout_session_by_provider_id(
        &self,
        provider: &str,
        provider_session_id: &str,
    ) -> StoreResult<Option<CheckoutSessionRow>> {
        let sql = format!(
            "SELECT {SESSION_COLUMNS} FROM checkout_sessions WHERE provider = $1 AND provider_session_id = $2"
        );
        sql!(self, query_as::<CheckoutSessionRow>(&sql, provider, provider_session_id).fetch_optional).db()
    }
}

async fn find_session(
    tx: &mut Tx,
    provider: &str,
    s: &CheckoutSession,
) -> StoreResult<Option<CheckoutSessionRow>> {
    let sql = format!(
        "SELECT {SESSION_COLUMNS} FROM checkout_sessions WHERE provider = $1 AND provider_session_id = $2"
    );
    if let Some(row) = sql!(tx, query_as::<CheckoutSessionRow>(&sql, provider, &s.id).fetch_optional).db()? {
        return Ok(Some(row));
    }
    // A session tollgate created carries tollgate's id as client_reference_id.
    let reference = s.client_reference_id.as_deref().or(s.metadata["tollgate_checkout_session"].as_str());
    let Some(reference) = reference.filter(|r| r.starts_with("chk_")) else { return Ok(None) };
    let sql = format!(
        "SELECT {SESSION_COLUMNS} FROM checkout_sessions WHERE id = $1 AND provider = $2 \
         AND (provider_session_id IS NULL OR provider_session_id = $3)"
    );
    sql!(tx, query_as::<CheckoutSessionRow>(&sql, reference, provider, &s.id).fetch_optional).db()
}

/// Applies a checkout session's snapshot: the session's status, and for a
/// payment, its order (created from `line_items` when tollgate did not start
/// the session). `customer_id` is the resolved tollgate customer, if any.
pub async fn apply_checkout_session(
    tx: &mut Tx,
    cause: Cause<'_>,
    s: &CheckoutSession,
    customer_id: Option<&str>,
    line_items: Option<&[LineItem]>,
    async_payment_failed: bool,
) -> StoreResult<()> {
    let now = now_unix();
    let (session_id, previous_status, mut order_id, customer_id) = match find_session(tx, cause.provider, s)
        .await?
    {
        Some(row) => {
            let customer = row.customer_id.clone().or(customer_id.map(str::to_owned));
            sql!(
                tx,
                query(
                    "UPDATE checkout_sessions SET provider_session_id = $1, status = $2, payment_status = $3, \
                     provider_subscription_id = COALESCE($4, provider_subscription_id), customer_id = $5, updated_at = $6 \
                     WHERE id = $7",
                    &s.id,
                    &s.status,
                    &s.payment_status,
                    &s.subscription,
                    &customer,
                    now,
                    &row.id
                )
                .execute
            )
            .db()?;
            (row.id, Some(row.status), row.order_id, customer)
        }
        None => {
            let id = new_id("chk");
            // Another worker may be recording the same session right now:
            // the loser waits for the winner's commit and takes its row.
            let inserted = sql!(
                tx,
                query(
                    "INSERT INTO checkout_sessions (id, provider, provider_session_id, customer_id, mode, status, \
                     payment_status, provider_subscription_id, currency, amount_total, metadata, expires_at, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $13) \
                     ON CONFLICT (provider, provider_session_id) DO NOTHING",
                    &id,
                    cause.provider,
                    &s.id,
                    customer_id,
                    if s.mode == "subscription" { "subscription" } else { "payment" },
                    &s.status,
                    &s.payment_status,
                    &s.subscription,
                    &s.currency,
                    s.amount_total,
                    s.metadata.to_string(),
                    s.expires_at,
                    now
                )
                .execute
            )
            .db()?;
            if inserted == 0 {
                return Err(super::StoreError::Conflict(format!(
                    "checkout session {} recorded concurrently",
                    s.id
                )));
            }
            audit::append(
                tx,
                AuditRecord {
                    actor: cause.actor,
                    action: "checkout_session.recorded",
                    object_type: "checkout_session",
                    object_id: &id,
                    data: json!({ "provider": cause.provider, "provider_session_id": s.id, "mode": s.mode }),
                    request_id: None,
                },
            )
            .await?;
            (id, None, None, customer_id.map(str::to_owned))
        }
    };
    if previous_status.as_deref() != Some(s.status.as_str()) && previous_status.is_some() {
        audit::append(
            tx,
            AuditRecord {
                actor: cause.actor,
                action: "checkout_session.updated",
                object_type: "checkout_session",
                object_id: &session_id,
                data: json!({ "status": s.status, "payment_status": s.payment_status }),
                request_id: None,
            },
        )
        .await?;
    }
    if s.status == "complete" && previous_status.as_deref() != Some("complete") {
        emit(
            tx,
            NewEvent {
                event_type: "checkout.completed",
                customer_id: customer_id.as_deref(),
                object_type: "checkout_session",
                object_id: &session_id,
                provider_event_id: cause.provider_event_id,
                data: json!({
                    "id": session_id, "mode": s.mode, "payment_status": s.payment_status,
                    "provider": cause.provider, "provider_session_id": s.id, "subscription": s.subscription,
                }),
                dedupe_key: Some(format!("checkout.completed:{session_id}")),
            },
        )
        .await?;
    }
    if s.mode != "payment" {
        return Ok(());
    }
    if order_id.is_none() {
        order_id = sql!(
            tx,
            query_scalar::<String>(
                "SELECT id FROM orders WHERE provider = $1 AND provider_checkout_session_id = $2",
                cause.provider,
                &s.id
            )
            .fetch_optional
        )
        .db()?;
    }
    if let Some(payment) = &s.payment_intent {
        lock_payment(tx, cause.provider, payment).await?;
    }
    let order_id = match (order_id, &customer_id) {
        (Some(id), _) => id,
        (None, Some(customer)) => {
            create_order_from_session(tx, cause, s, &session_id, customer, line_items.unwrap_or(&[])).await?
        }
        (None, None) => {
            // Without a customer there is nobody to own the order; the
            // session is recorded and `doctor` can list it.
            tracing::warn!(session = %s.id, "checkout session without a customer; no order recorded");
            return Ok(());
        }
    };
    // A free checkout (a 100 % discount) completes with nothing to pay: it
    // is paid, and no payment event will ever say so.
    let paid = matches!(s.payment_status.as_str(), "paid" | "no_payment_required");
    let paid_at = (s.status == "complete" && paid).then_some(cause.at);
    let failed_at = async_payment_failed.then_some(cause.at);
    let canceled_at = (s.status == "expired").then_some(cause.at);
    sql!(
        tx,
        query(
            // A completed session names the payment that paid it, which
            // replaces a declined attempt linked earlier.
            "UPDATE orders SET provider_checkout_session_id = COALESCE(provider_checkout_session_id, $1), \
             payment_key = CASE WHEN $7 THEN COALESCE($2, payment_key) ELSE COALESCE(payment_key, $2) END, \
             paid_at = COALESCE(paid_at, $3), \
             payment_failed_at = COALESCE(payment_failed_at, $4), canceled_at = COALESCE(canceled_at, $5) WHERE id = $6",
            &s.id,
            &s.payment_intent,
            paid_at,
            failed_at,
            canceled_at,
            &order_id,
            s.status == "complete"
        )
        .execute
    )
    .db()?;
    recompute_order(tx, cause, &order_id).await
}

async fn create_order_from_session(
    tx: &mut Tx,
    cause: Cause<'_>,
    s: &CheckoutSession,
    session_id: &str,
    customer_id: &str,
    line_items: &[LineItem],
) -> StoreResult<String> {
    let now = now_unix();
    let id = new_id("ord");
    let lines_total: i64 = line_items.iter().map(|l| l.amount_total).sum();
    let amount_total = s.amount_total.unwrap_or(lines_total).max(0);
    sql!(
        tx,
        query(
            "INSERT INTO orders (id, customer_id, provider, status, currency, amount_total, checkout_session_id, \
             provider_checkout_session_id, payment_key, metadata, created_at, updated_at) \
             VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $9, $10, $10)",
            &id,
            customer_id,
            cause.provider,
            &s.currency,
            amount_total,
            session_id,
            &s.id,
            &s.payment_intent,
            s.metadata.to_string(),
            now
        )
        .execute
    )
    .db()?;
    for (n, line) in line_items.iter().enumerate() {
        let (price_id, product_id) = resolve_price(tx, cause.provider, line.price.as_deref()).await?;
        sql!(
            tx,
            query(
                "INSERT INTO order_lines (order_id, line_no, price_id, product_id, provider_price_id, description, \
                 quantity, unit_amount, amount_total) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                &id,
                n as i64 + 1,
                &price_id,
                &product_id,
                &line.price,
                &line.description,
                line.quantity,
                line.unit_amount,
                line.amount_total
            )
            .execute
        )
        .db()?;
    }
    sql!(tx, query("UPDATE checkout_sessions SET order_id = $1 WHERE id = $2", &id, session_id).execute)
        .db()?;
    audit::append(
        tx,
        AuditRecord {
            actor: cause.actor,
            action: "order.created",
            object_type: "order",
            object_id: &id,
            data: json!({ "from_provider_session": s.id, "amount_total": amount_total, "currency": s.currency, "lines": line_items.len() }),
            request_id: None,
        },
    )
    .await?;
    Ok(id)
}

/// Stores a payment's latest snapshot and recomputes the orders it pays.
pub async fn apply_payment(tx: &mut Tx, cause: Cause<'_>, p: &Payment) -> StoreResult<()> {
    let now = now_unix();
    sql!(
        tx,
        query(
            "INSERT INTO payments (provider, payment_key, charge_id, provider_customer_id, provider_invoice_id, status, \
             amount, amount_refunded, currency, failure_code, failure_message, metadata, created_at, updated_at, \
             amount_refunded_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, COALESCE($8, 0), $9, $10, $11, $12, $13, $13, \
             CASE WHEN $8 IS NULL THEN 0 ELSE $14 END) \
             ON CONFLICT (provider, payment_key) DO UPDATE SET charge_id = COALESCE(excluded.charge_id, payments.charge_id), \
             provider_customer_id = COALESCE(excluded.provider_customer_id, payments.provider_customer_id), \
             provider_invoice_id = COALESCE(excluded.provider_invoice_id, payments.provider_invoice_id), \
             status = excluded.status, amount = excluded.amount, \
             amount_refunded = COALESCE($8, payments.amount_refunded), \
             amount_refunded_at = CASE WHEN $8 IS NULL THEN payments.amount_refunded_at ELSE $14 END, \
             currency = excluded.currency, \
             failure_code = excluded.failure_code, failure_message = excluded.failure_message, \
             metadata = excluded.metadata, updated_at = excluded.updated_at",
            cause.provider,
            &p.key,
            &p.charge,
            &p.customer,
            &p.invoice,
            &p.status,
            p.amount,
            p.amount_refunded,
            &p.currency,
            &p.failure_code,
            &p.failure_message,
            p.metadata.to_string(),
            now,
            cause.at
        )
        .execute
    )
    .db()?;
    // A payment tollgate started names its order; link it if the session's
    // completion has not done so yet. A declined attempt leaves the
    // checkout open for another card: the payment that succeeds then
    // takes the declined one's place.
    if let Some(order_id) = p.metadata["tollgate_order_id"].as_str() {
        sql!(
            tx,
            query(
                "UPDATE orders SET payment_key = $1 WHERE id = $2 AND provider = $3 AND (payment_key IS NULL \
                 OR ($4 AND payment_key <> $1 AND NOT EXISTS (SELECT 1 FROM payments f WHERE f.provider = orders.provider \
                 AND f.payment_key = orders.payment_key AND f.status = 'succeeded')))",
                &p.key,
                order_id,
                cause.provider,
                p.status == "succeeded"
            )
            .execute
        )
        .db()?;
    }
    recompute_orders_paid_by(tx, cause, &p.key).await
}

/// The payment key a refund or dispute belongs to: old payloads name only
/// the charge, which a stored payment may map to its payment intent.
async fn payment_key_for(
    tx: &mut Tx,
    provider: &str,
    key: &str,
    charge: Option<&str>,
) -> StoreResult<String> {
    if key.starts_with("pi_") {
        return Ok(key.to_owned());
    }
    let Some(charge) = charge else { return Ok(key.to_owned()) };
    let found: Option<String> = sql!(
        tx,
        query_scalar::<String>(
            "SELECT payment_key FROM payments WHERE provider = $1 AND charge_id = $2 LIMIT 1",
            provider,
            charge
        )
        .fetch_optional
    )
    .db()?;
    Ok(found.unwrap_or_else(|| key.to_owned()))
}

/// Stores refunds. `listed` refunds come from a charge's snapshot, which may
/// be older than the refund's own latest event: they only fill gaps.
pub async fn apply_refunds(
    tx: &mut Tx,
    cause: Cause<'_>,
    refunds: &[Refund],
    listed: bool,
) -> StoreResult<()> {
    let now = now_unix();
    let mut keys = Vec::new();
    for r in refunds {
        let key = payment_key_for(tx, cause.provider, &r.payment_key, r.charge.as_deref()).await?;
        // The refund's own events are ordered by its watermark; a copy from
        // a charge snapshot only replaces an older fact (an old API version
        // may never send the refund's own update).
        let newer = if listed { "<" } else { "<=" };
        let sql = format!(
            "INSERT INTO refunds (provider, provider_refund_id, payment_key, charge_id, amount, currency, status, reason, \
             created_at, updated_at, provider_created, status_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9, $10, $11) \
             ON CONFLICT (provider, provider_refund_id) DO UPDATE SET status = excluded.status, amount = excluded.amount, \
             reason = excluded.reason, payment_key = excluded.payment_key, updated_at = excluded.updated_at, \
             provider_created = excluded.provider_created, status_at = excluded.status_at \
             WHERE refunds.status_at {newer} excluded.status_at"
        );
        sql!(
            tx,
            query(
                &sql,
                cause.provider,
                &r.id,
                &key,
                &r.charge,
                r.amount,
                &r.currency,
                &r.status,
                &r.reason,
                now,
                r.created,
                cause.at
            )
            .execute
        )
        .db()?;
        if !keys.contains(&key) {
            keys.push(key);
        }
    }
    for key in keys {
        recompute_orders_paid_by(tx, cause, &key).await?;
    }
    // A refund tollgate asked for stops counting as pending in the same
    // transaction that makes it count as a refund (after the payment's and
    // order's locks, taken above, as every path takes them).
    for r in refunds {
        if let Some(request) = &r.request {
            super::refunds::link_request(tx, cause.provider, request, &r.id).await?;
        }
    }
    Ok(())
}

pub async fn apply_dispute(tx: &mut Tx, cause: Cause<'_>, d: &Dispute) -> StoreResult<()> {
    let now = now_unix();
    let key = payment_key_for(tx, cause.provider, &d.payment_key, d.charge.as_deref()).await?;
    sql!(
        tx,
        query(
            "INSERT INTO disputes (provider, provider_dispute_id, payment_key, charge_id, amount, currency, status, reason, \
             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $9) \
             ON CONFLICT (provider, provider_dispute_id) DO UPDATE SET status = excluded.status, amount = excluded.amount, \
             reason = excluded.reason, payment_key = excluded.payment_key, updated_at = excluded.updated_at",
            cause.provider,
            &d.id,
            &key,
            &d.charge,
            d.amount,
            &d.currency,
            &d.status,
            &d.reason,
            now
        )
        .execute
    )
    .db()?;
    recompute_orders_paid_by(tx, cause, &key).await
}

/// Serialises, on PostgreSQL, everything that links an order to a payment or
/// records a fact about that payment: whichever transaction comes second
/// finds the other's link and facts committed. Without it a refund and the
/// late session completion that links its order could each miss the other.
async fn lock_payment(tx: &mut Tx, provider: &str, payment_key: &str) -> StoreResult<()> {
    if tx.kind() == super::DbKind::Postgres {
        let key = format!("{provider}:{payment_key}");
        sql!(tx, query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &key).execute).db()?;
    }
    Ok(())
}

async fn recompute_orders_paid_by(tx: &mut Tx, cause: Cause<'_>, payment_key: &str) -> StoreResult<()> {
    lock_payment(tx, cause.provider, payment_key).await?;
    let orders: Vec<String> = sql!(
        tx,
        query_scalar::<String>(
            "SELECT id FROM orders WHERE provider = $1 AND payment_key = $2",
            cause.provider,
            payment_key
        )
        .fetch_all
    )
    .db()?;
    for id in orders {
        recompute_order(tx, cause, &id).await?;
    }
    Ok(())
}

/// Recomputes an order from its facts; writes, audits and announces what
/// changed.
pub async fn recompute_order(tx: &mut Tx, cause: Cause<'_>, order_id: &str) -> StoreResult<()> {
    // Lock the order before reading its facts: a concurrent recompute from
    // another fact then reads after this one commits, and sees its fact.
    let lock = if tx.kind() == super::DbKind::Postgres { " FOR UPDATE" } else { "" };
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1{lock}");
    let Some(order) = sql!(tx, query_as::<OrderRow>(&sql, order_id).fetch_optional).db()? else {
        return Ok(());
    };
    let key = order.payment_key.clone().unwrap_or_default();
    let payment: Option<(String, i64, i64)> = sql!(
        tx,
        query_as::<(String, i64, i64)>(
            "SELECT status, amount_refunded, amount_refunded_at FROM payments WHERE provider = $1 AND payment_key = $2",
            &order.provider,
            &key
        )
        .fetch_optional
    )
    .db()?;
    let refunds: Vec<(i64, String, i64, i64)> = sql!(
        tx,
        query_as::<(i64, String, i64, i64)>(
            "SELECT amount, status, provider_created, status_at FROM refunds \
             WHERE provider = $1 AND payment_key = $2 ORDER BY provider_refund_id",
            &order.provider,
            &key
        )
        .fetch_all
    )
    .db()?;
    let refunds = refunds
        .into_iter()
        .map(|(amount, status, created, status_at)| RefundFact { amount, status, created, status_at })
        .collect();
    let disputes: Vec<String> = sql!(
        tx,
        query_scalar::<String>(
            "SELECT status FROM disputes WHERE provider = $1 AND payment_key = $2 ORDER BY provider_dispute_id",
            &order.provider,
            &key
        )
        .fetch_all
    )
    .db()?;
    let payment_succeeded = payment.as_ref().is_some_and(|(s, _, _)| s == "succeeded");
    let facts = OrderFacts {
        amount_total: order.amount_total,
        paid: order.paid_at.is_some() || payment_succeeded,
        // A declined card on the hosted page does not end the checkout (the
        // buyer may try another card), so the order stays pending; only a
        // session whose payment failed after completing fails it.
        payment_failed: order.payment_failed_at.is_some(),
        canceled: order.canceled_at.is_some(),
        charge_amount_refunded: payment.as_ref().map(|(_, r, _)| *r).unwrap_or(0),
        charge_snapshot_at: payment.as_ref().map(|(_, _, at)| *at).unwrap_or(0),
        refunds,
        disputes,
    };
    let status = facts.status();
    let amount_refunded = facts.amount_refunded();
    let paid_at = order.paid_at.or(facts.paid.then_some(cause.at));
    // `fulfilled` is set by fulfilment and means "paid and delivered": a
    // recomputed `paid` does not undo it.
    let status = if status == "paid" && order.status == "fulfilled" { "fulfilled" } else { status };
    // Disputes are announced from the dispute facts, not from the status: a
    // dispute on a refunded order changes no status but is still news.
    let disputes_known = facts.disputes.len();
    let disputes_closed =
        facts.disputes.iter().filter(|s| !crate::billing::orders::dispute_is_open(s)).count();
    if status == order.status && amount_refunded == order.amount_refunded && paid_at == order.paid_at {
        return announce_disputes(tx, cause, &order, disputes_known, disputes_closed).await;
    }
    sql!(
        tx,
        query(
            "UPDATE orders SET status = $1, amount_refunded = $2, paid_at = $3, updated_at = $4 WHERE id = $5",
            status,
            amount_refunded,
            paid_at,
            now_unix(),
            order_id
        )
        .execute
    )
    .db()?;
    audit::append(
        tx,
        AuditRecord {
            actor: cause.actor,
            action: "order.updated",
            object_type: "order",
            object_id: order_id,
            data: json!({ "status": status, "previous_status": order.status, "amount_refunded": amount_refunded }),
            request_id: None,
        },
    )
    .await?;
    // Fulfil (or revoke) before announcing, so `order.paid` carries the
    // grants it delivered.
    let granted_now = super::entitlements::sync_order_grants(tx, cause, order_id).await?;
    // An order back to `paid` after a refund failed or a dispute was won has
    // delivered its grants already: it reads `fulfilled` again.
    let delivered_before = status == "paid"
        && !granted_now
        && sql!(
            tx,
            query_scalar::<i64>("SELECT COUNT(*) FROM grants WHERE order_id = $1", order_id).fetch_one
        )
        .db()?
            > 0;
    if granted_now || delivered_before {
        sql!(
            tx,
            query("UPDATE orders SET status = 'fulfilled' WHERE id = $1 AND status = 'paid'", order_id)
                .execute
        )
        .db()?;
    }
    let data = order_document(tx, order_id).await?;
    let announce = |event_type: &'static str, dedupe_key: Option<String>| NewEvent {
        event_type,
        customer_id: Some(&order.customer_id),
        object_type: "order",
        object_id: order_id,
        provider_event_id: cause.provider_event_id,
        data: data.clone(),
        dedupe_key,
    };
    // Keyed by the order, so announcing on every recompute that finds it
    // paid still announces it exactly once, whichever fact made it paid.
    if paid_at.is_some() {
        emit(tx, announce("order.paid", Some(format!("order.paid:{order_id}")))).await?;
    }
    if amount_refunded > order.amount_refunded {
        // Keyed by the amount and the refunds known, so a refund that failed
        // and a new one of the same amount are both announced, while
        // recomputing the same facts announces nothing twice.
        let refunds_known = facts.refunds.len();
        let key = format!("order.refunded:{order_id}:{amount_refunded}:{refunds_known}");
        emit(tx, announce("order.refunded", Some(key))).await?;
    }
    announce_disputes(tx, cause, &order, disputes_known, disputes_closed).await
}

/// `order.disputed` once per dispute opened and `order.dispute_closed` once
/// per dispute closed, whatever the order's status and however often it is
/// recomputed (keyed by the count: disputes are never deleted).
async fn announce_disputes(
    tx: &mut Tx,
    cause: Cause<'_>,
    order: &OrderRow,
    known: usize,
    closed: usize,
) -> StoreResult<()> {
    if known == 0 {
        return Ok(());
    }
    let data = order_document(tx, &order.id).await?;
    let mut due = vec![("order.disputed", format!("order.disputed:{}:{known}", order.id))];
    if closed > 0 {
        due.push(("order.dispute_closed", format!("order.dispute_closed:{}:{closed}", order.id)));
    }
    for (event_type, key) in due {
        let event = NewEvent {
            event_type,
            customer_id: Some(&order.customer_id),
            object_type: "order",
            object_id: &order.id,
            provider_event_id: cause.provider_event_id,
            data: data.clone(),
            dedupe_key: Some(key),
        };
        emit(tx, event).await?;
    }
    Ok(())
}

/// The order as events carry it: its state and lines.
async fn order_document(tx: &mut Tx, order_id: &str) -> StoreResult<Value> {
    let sql = format!("SELECT {ORDER_COLUMNS} FROM orders WHERE id = $1");
    let order = sql!(tx, query_as::<OrderRow>(&sql, order_id).fetch_one).db()?;
    let sql = format!("SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = $1 ORDER BY line_no");
    let lines = sql!(tx, query_as::<OrderLineRow>(&sql, order_id).fetch_all).db()?;
    let grants = super::entitlements::grants_of_order(tx, order_id).await?;
    let mut doc = order_json(&order, &lines);
    doc["grants"] = grants.iter().map(|g| g.json()).collect();
    Ok(doc)
}

pub fn order_json(order: &OrderRow, lines: &[OrderLineRow]) -> Value {
    json!({
        "id": order.id,
        "object": "order",
        "customer": order.customer_id,
        "status": order.status,
        "amount_total": order.amount_total,
        "amount_refunded": order.amount_refunded,
        "currency": order.currency,
        "paid_at": order.paid_at,
        "lines": lines,
        "provider": order.provider,
        "provider_checkout_session_id": order.provider_checkout_session_id,
        "created_at": order.created_at,
    })
}

impl Store {
    /// Orders, newest first, optionally of one customer, with their lines.
    pub async fn list_orders(
        &self,
        page: &super::Page,
        customer_id: Option<&str>,
    ) -> StoreResult<super::Listed<(OrderRow, Vec<OrderLineRow>)>> {
        self.ensure_cursor("orders", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let sql = format!(
            "SELECT {ORDER_COLUMNS} FROM orders WHERE ($1 IS NULL OR id {op} $1) AND ($2 IS NULL OR customer_id = $2) \
             ORDER BY id {order} LIMIT $3"
        );
        let cursor = page.cursor().map(str::to_owned);
        let rows: Vec<OrderRow> =
            sql!(self, query_as::<OrderRow>(&sql, cursor, customer_id, page.fetch_limit()).fetch_all).db()?;
        let listed = page.finish(rows);
        let mut data = Vec::with_capacity(listed.data.len());
        let sql = format!("SELECT {LINE_COLUMNS} FROM order_lines WHERE order_id = $1 ORDER BY line_no");
        for order in listed.data {
            let lines = sql!(self, query_as::<OrderLineRow>(&sql, &order.id).fetch_all).db()?;
            data.push((order, lines));
        }
        Ok(super::Listed { data, has_more: listed.has_more })
    }
}
