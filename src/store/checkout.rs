//! Checkouts started through tollgate's API.
//!
//! A checkout is recorded (session row, and for payment mode the pending
//! order and its lines) *before* the provider is asked for a hosted page,
//! so the webhook side always finds what tollgate meant to sell. What the
//! provider answers is written afterwards: its session id, URL and expiry
//! on success; on failure the session is marked `expired` with
//! `last_error` and its order `canceled`, so no order that can never be
//! paid stays `pending`. A retry of the same request (same API key and
//! Idempotency-Key) revives that session and order instead of starting
//! another.

use serde::Serialize;
use serde_json::json;

use super::audit::{self, Actor, AuditRecord};
use super::customers::{apply_provider_customer, ProviderCustomer};
use super::{now_unix, sql, DbKind, SqlxResultExt, Store, StoreError, StoreResult, Tx};
use crate::billing::checkout::{is_live_subscription, CartPrice};
use crate::billing::entitlements::Policy;
use crate::ids::ExternalId;
use crate::providers::stripe::derived_idempotency_key;

/// A catalog price with what a checkout needs besides: its product's name
/// and the provider price it currently maps to.
#[derive(Debug, Clone)]
pub struct CheckoutPrice {
    pub cart: CartPrice,
    pub product_id: String,
    pub product_name: String,
    pub provider_price_id: Option<String>,
}

#[derive(sqlx::FromRow)]
struct PriceRow {
    id: String,
    product_id: String,
    product_name: String,
    currency: String,
    unit_amount: i64,
    kind: String,
    recurring_interval: Option<String>,
    interval_count: Option<i64>,
    active: bool,
    provider_price_id: Option<String>,
}

/// One line as recorded with the session (JSON in `line_items`) and, in
/// payment mode, as an order line.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct CheckoutLine {
    pub price: String,
    pub product: String,
    pub provider_price: Option<String>,
    pub description: Option<String>,
    pub quantity: i64,
    pub unit_amount: i64,
    pub amount_total: i64,
}

/// What `record_checkout` writes.
#[derive(Debug, Clone)]
pub struct NewCheckout<'a> {
    pub id: &'a str,
    pub provider: &'a str,
    pub customer_id: &'a str,
    pub mode: &'a str,
    /// Payment mode: the pending order to record with the session.
    pub order_id: Option<&'a str>,
    pub success_url: &'a str,
    pub cancel_url: Option<&'a str>,
    pub currency: &'a str,
    pub amount_total: i64,
    pub metadata: &'a serde_json::Value,
    pub lines: &'a [CheckoutLine],
    pub trial_days: Option<i64>,
    pub request_key: Option<&'a str>,
    /// The Idempotency-Key the provider is asked with, for this request
    /// and this session (a key reused after its lifetime is a new session
    /// here and at the provider).
    pub provider_idempotency_key: &'a str,
    /// A session recorded before this time under the same `request_key`
    /// is past the key's lifetime: it gives the key up.
    pub request_key_valid_since: i64,
    /// Subscription mode: record it even if the customer already has a
    /// live subscription, or an open checkout, for one of its products.
    pub allow_duplicate_subscription: bool,
}

/// What `record_checkout` did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Recorded {
    Recorded,
    /// Nothing was written: the customer already has this live subscription
    /// (`sub_…`) to one of the checkout's products.
    SubscriptionExists {
        subscription: String,
        product: String,
    },
    /// Nothing was written: this open subscription checkout (`chk_…`) is
    /// already selling one of the checkout's products to the customer.
    CheckoutOpen {
        session: String,
        product: String,
    },
    /// Nothing was written: this subscription checkout (`chk_…`) sold one
    /// of the checkout's products to the customer, and its subscription is
    /// not recorded yet (its own event is still to come).
    CheckoutCompleted {
        session: String,
        product: String,
    },
}

/// A checkout session with its customer's external id, as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct CheckoutRecord {
    pub id: String,
    pub provider: String,
    pub provider_session_id: Option<String>,
    pub customer_id: Option<String>,
    pub external_id: Option<String>,
    pub mode: String,
    pub status: String,
    pub payment_status: Option<String>,
    pub order_id: Option<String>,
    pub provider_subscription_id: Option<String>,
    /// tollgate's id of the subscription, once its webhook has been applied.
    pub subscription_id: Option<String>,
    pub url: Option<String>,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    pub currency: Option<String>,
    pub amount_total: Option<i64>,
    pub metadata: String,
    pub expires_at: Option<i64>,
    pub line_items: Option<String>,
    pub trial_days: Option<i64>,
    pub last_error: Option<String>,
    /// What the provider was asked with; `None` on sessions recorded before
    /// it was stored (see [`CheckoutRecord::provider_key`]).
    pub provider_idempotency_key: Option<String>,
    pub request_key: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl CheckoutRecord {
    pub fn lines(&self) -> Vec<CheckoutLine> {
        self.line_items.as_deref().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default()
    }

    /// The Idempotency-Key a retry of this checkout asks the provider with:
    /// the one its first attempt used.
    pub fn provider_key(&self) -> String {
        self.provider_idempotency_key.clone().unwrap_or_else(|| {
            derived_idempotency_key(&["checkout", self.request_key.as_deref().unwrap_or(&self.id)])
        })
    }
}

const RECORD_SELECT: &str =
    "SELECT s.id, s.provider, s.provider_session_id, s.customer_id, c.external_id, s.mode, \
     s.status, s.payment_status, s.order_id, s.provider_subscription_id, \
     (SELECT sub.id FROM subscriptions sub WHERE sub.provider = s.provider \
        AND sub.provider_subscription_id = s.provider_subscription_id) AS subscription_id, \
     s.url, s.success_url, s.cancel_url, s.currency, s.amount_total, s.metadata, s.expires_at, s.line_items, \
     s.trial_days, s.last_error, s.provider_idempotency_key, s.request_key, s.created_at, s.updated_at \
     FROM checkout_sessions s LEFT JOIN customers c ON c.id = s.customer_id";

/// How long a completed subscription checkout whose subscription is not
/// recorded yet counts as the customer's subscription.
const COMPLETED_CHECKOUT_COUNTS_SECONDS: i64 = 86_400;

/// The customer's live subscription, or open subscription checkout (or one
/// completed moments ago), that sells one of `c`'s products already;
/// `Recorded::Recorded` if none.
async fn duplicate_subscription(tx: &mut Tx, c: &NewCheckout<'_>, now: i64) -> StoreResult<Recorded> {
    if tx.kind() == DbKind::Postgres {
        let key = format!("tollgate:subscription_checkout:{}", c.customer_id);
        sql!(tx, query("SELECT pg_advisory_xact_lock(hashtextextended($1, 0))", &key).execute).db()?;
    }
    let wanted = |product: &str| c.lines.iter().any(|l| l.product == product);
    // The checkouts are read before the subscriptions: on PostgreSQL each
    // statement sees what had committed when it started, so a subscription
    // recorded in between (which stops its completed checkout counting) is
    // seen by the second read. Read the other way round, it could be missed
    // by both.
    //
    // Open and not past its time: the hosted page can still be paid. One
    // without a URL yet is a checkout being opened right now. Complete
    // within the last day, with a subscription not recorded yet: the
    // provider announces the checkout and its subscription in separate
    // events, and between the two the customer is subscribed though no
    // subscription shows it (a day covers the provider's retries and the
    // reconciliation; a subscription event that never applies is a dead
    // event to see to, and blocks the product no longer than that).
    let sessions: Vec<(String, String, Option<String>)> = sql!(
        tx,
        query_as::<(String, String, Option<String>)>(
            "SELECT s.id, s.status, s.line_items FROM checkout_sessions s \
             WHERE s.customer_id = $1 AND s.provider = $2 AND s.mode = 'subscription' \
             AND ((s.status = 'open' AND (s.expires_at IS NULL OR s.expires_at > $3)) \
               OR (s.status = 'complete' AND s.updated_at > $4 AND s.provider_subscription_id IS NOT NULL \
                 AND NOT EXISTS (SELECT 1 FROM subscriptions sub WHERE sub.provider = s.provider \
                   AND sub.provider_subscription_id = s.provider_subscription_id))) \
             ORDER BY s.id",
            c.customer_id,
            c.provider,
            now,
            now - COMPLETED_CHECKOUT_COUNTS_SECONDS
        )
        .fetch_all
    )
    .db()?;
    let subscriptions: Vec<(String, String, String, Option<String>)> = sql!(
        tx,
        query_as::<(String, String, String, Option<String>)>(
            "SELECT s.id, s.status, s.items, (SELECT p.product_id FROM prices p WHERE p.id = s.price_id) \
             FROM subscriptions s WHERE s.customer_id = $1 AND s.provider = $2 ORDER BY s.id",
            c.customer_id,
            c.provider
        )
        .fetch_all
    )
    .db()?;
    for (id, status, items, main_product) in subscriptions {
        if !is_live_subscription(&status) {
            continue;
        }
        let items: Vec<serde_json::Value> = serde_json::from_str(&items).unwrap_or_default();
        let products =
            items.iter().filter_map(|i| i["product"].as_str().map(str::to_owned)).chain(main_product);
        if let Some(product) = products.into_iter().find(|p| wanted(p)) {
            return Ok(Recorded::SubscriptionExists { subscription: id, product });
        }
    }
    for (id, status, line_items) in sessions {
        let lines: Vec<CheckoutLine> =
            line_items.as_deref().and_then(|l| serde_json::from_str(l).ok()).unwrap_or_default();
        if let Some(line) = lines.into_iter().find(|l| wanted(&l.product)) {
            return Ok(match status.as_str() {
                "complete" => Recorded::CheckoutCompleted { session: id, product: line.product },
                _ => Recorded::CheckoutOpen { session: id, product: line.product },
            });
        }
    }
    Ok(Recorded::Recorded)
}

/// A checkout's own order moving between `pending` and `canceled`.
struct OrderChange<'a> {
    session: &'a str,
    from: &'static str,
    to: &'static str,
    reason: &'static str,
}

/// Moves the checkout's order (one nothing has paid) from `from` to `to`,
/// with the audit entry the webhook path writes for an order's status
/// change (`order.updated`). No order, or one in another state: nothing.
async fn set_order_status(
    tx: &mut Tx,
    change: OrderChange<'_>,
    now: i64,
    actor: &Actor,
    request_id: Option<&str>,
) -> StoreResult<()> {
    let order: Option<String> = sql!(
        tx,
        query_scalar::<String>(
            "SELECT id FROM orders WHERE checkout_session_id = $1 AND status = $2 AND payment_key IS NULL",
            change.session,
            change.from
        )
        .fetch_optional
    )
    .db()?;
    let Some(order) = order else { return Ok(()) };
    let canceled_at = (change.to == "canceled").then_some(now);
    sql!(
        tx,
        query(
            "UPDATE orders SET status = $1, canceled_at = $2, updated_at = $3 WHERE id = $4 AND status = $5",
            change.to,
            canceled_at,
            now,
            &order,
            change.from
        )
        .execute
    )
    .db()?;
    audit::append(
        tx,
        AuditRecord {
            actor,
            action: "order.updated",
            object_type: "order",
            object_id: &order,
            data: json!({
                "status": change.to, "previous_status": change.from,
                "checkout_session": change.session, "reason": change.reason,
            }),
            request_id,
        },
    )
    .await?;
    Ok(())
}

impl Store {
    /// The catalog price `id` with its product and current provider price.
    pub async fn checkout_price(&self, provider: &str, id: &str) -> StoreResult<Option<CheckoutPrice>> {
        let row: Option<PriceRow> = sql!(
            self,
            query_as::<PriceRow>(
                "SELECT p.id, p.product_id, pr.name AS product_name, p.currency, p.unit_amount, p.kind, \
                 p.recurring_interval, p.interval_count, (p.active AND pr.active) AS active, \
                 (SELECT l.provider_id FROM provider_catalog_links l WHERE l.provider = $2 AND l.catalog_id = p.id \
                    AND l.kind IN ('price', 'plan') AND l.superseded_at IS NULL \
                    ORDER BY l.created_at DESC, l.provider_id LIMIT 1) AS provider_price_id \
                 FROM prices p JOIN products pr ON pr.id = p.product_id WHERE p.id = $1",
                id,
                provider
            )
            .fetch_optional
        )
        .db()?;
        Ok(row.map(|r| CheckoutPrice {
            cart: CartPrice {
                recurring: (r.kind == "recurring")
                    .then(|| (r.recurring_interval.unwrap_or_default(), r.interval_count.unwrap_or(1))),
                id: r.id,
                currency: r.currency,
                unit_amount: r.unit_amount,
                active: r.active,
            },
            product_id: r.product_id,
            product_name: r.product_name,
            provider_price_id: r.provider_price_id,
        }))
    }

    /// Records a checkout about to be opened at the provider: the session
    /// and, in payment mode, its pending order and lines, with their audit
    /// entries, in one transaction. A `request_key` already recorded is a
    /// `Conflict` (the caller looks it up first; this is the race's loser).
    ///
    /// A subscription checkout is refused (nothing written) while the
    /// customer has a live subscription or an open subscription checkout
    /// for one of its products, unless `allow_duplicate_subscription`. The
    /// check and the insert are one transaction, serialised per customer
    /// (SQLite's single writer; an advisory lock on PostgreSQL), so two
    /// clicks at once cannot both pass it.
    pub async fn record_checkout(
        &self,
        c: &NewCheckout<'_>,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<Recorded> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        if c.mode == "subscription" && !c.allow_duplicate_subscription {
            let found = duplicate_subscription(&mut tx, c, now).await?;
            if found != Recorded::Recorded {
                return Ok(found);
            }
        }
        let lines_json = serde_json::to_string(c.lines)?;
        if let Some(key) = c.request_key {
            sql!(
                tx,
                query(
                    "UPDATE checkout_sessions SET request_key = NULL WHERE request_key = $1 AND created_at < $2",
                    key,
                    c.request_key_valid_since
                )
                .execute
            )
            .db()?;
        }
        sql!(
            tx,
            query(
                "INSERT INTO checkout_sessions (id, provider, customer_id, mode, status, order_id, success_url, \
                 cancel_url, currency, amount_total, metadata, line_items, trial_days, request_key, \
                 provider_idempotency_key, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, 'open', $5, $6, $7, $8, $9, $10, $11, $12, $13, $15, $14, $14)",
                c.id,
                c.provider,
                c.customer_id,
                c.mode,
                c.order_id,
                c.success_url,
                c.cancel_url,
                c.currency,
                c.amount_total,
                c.metadata.to_string(),
                &lines_json,
                c.trial_days,
                c.request_key,
                now,
                c.provider_idempotency_key
            )
            .execute
        )
        .map_err(|e| {
            if super::is_unique_violation(&e) {
                StoreError::Conflict("this checkout request is being recorded concurrently; retry".into())
            } else {
                StoreError::from_sqlx(e)
            }
        })?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "checkout_session.created",
                object_type: "checkout_session",
                object_id: c.id,
                data: json!({
                    "mode": c.mode, "customer": c.customer_id, "order": c.order_id, "currency": c.currency,
                    "amount_total": c.amount_total, "lines": c.lines, "trial_days": c.trial_days,
                }),
                request_id,
            },
        )
        .await?;
        if let Some(order_id) = c.order_id {
            sql!(
                tx,
                query(
                    "INSERT INTO orders (id, customer_id, provider, status, currency, amount_total, checkout_session_id, \
                     metadata, created_at, updated_at) VALUES ($1, $2, $3, 'pending', $4, $5, $6, $7, $8, $8)",
                    order_id,
                    c.customer_id,
                    c.provider,
                    c.currency,
                    c.amount_total,
                    c.id,
                    c.metadata.to_string(),
                    now
                )
                .execute
            )
            .db()?;
            for (n, line) in c.lines.iter().enumerate() {
                sql!(
                    tx,
                    query(
                        "INSERT INTO order_lines (order_id, line_no, price_id, product_id, provider_price_id, description, \
                         quantity, unit_amount, amount_total) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9)",
                        order_id,
                        n as i64 + 1,
                        &line.price,
                        &line.product,
                        &line.provider_price,
                        &line.description,
                        line.quantity,
                        line.unit_amount,
                        line.amount_total
                    )
                    .execute
                )
                .db()?;
            }
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "order.created",
                    object_type: "order",
                    object_id: order_id,
                    data: json!({ "checkout_session": c.id, "amount_total": c.amount_total, "currency": c.currency, "lines": c.lines.len() }),
                    request_id,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(Recorded::Recorded)
    }

    pub async fn get_checkout(&self, id: &str) -> StoreResult<Option<CheckoutRecord>> {
        let sql = format!("{RECORD_SELECT} WHERE s.id = $1");
        sql!(self, query_as::<CheckoutRecord>(&sql, id).fetch_optional).db()
    }

    /// The checkout a request recorded, if recorded since `valid_since`:
    /// request keys live as long as the API's Idempotency-Keys.
    pub async fn checkout_by_request_key(
        &self,
        request_key: &str,
        valid_since: i64,
    ) -> StoreResult<Option<CheckoutRecord>> {
        let sql = format!("{RECORD_SELECT} WHERE s.request_key = $1 AND s.created_at >= $2");
        sql!(self, query_as::<CheckoutRecord>(&sql, request_key, valid_since).fetch_optional).db()
    }

    /// A retried request whose first attempt failed at the provider: the
    /// session is open again and its order pending again, until the
    /// provider answers this time. `false` if it was not a failed one.
    pub async fn reopen_checkout(
        &self,
        id: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let reopened = sql!(
            tx,
            query(
                "UPDATE checkout_sessions SET status = 'open', last_error = NULL, updated_at = $1 \
                 WHERE id = $2 AND provider_session_id IS NULL AND last_error IS NOT NULL AND status = 'expired'",
                now,
                id
            )
            .execute
        )
        .db()?;
        if reopened == 0 {
            return Ok(false);
        }
        set_order_status(
            &mut tx,
            OrderChange { session: id, from: "canceled", to: "pending", reason: "checkout_retried" },
            now,
            actor,
            request_id,
        )
        .await?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "checkout_session.reopened",
                object_type: "checkout_session",
                object_id: id,
                data: json!({ "reason": "retried with the same Idempotency-Key" }),
                request_id,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// The provider opened the session: its id, hosted page and expiry.
    pub async fn checkout_opened(
        &self,
        id: &str,
        provider_session_id: &str,
        url: Option<&str>,
        expires_at: Option<i64>,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<()> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        // The session's own webhook may have linked it already; the status
        // is the webhook's to set.
        sql!(
            tx,
            query(
                "UPDATE checkout_sessions SET provider_session_id = COALESCE(provider_session_id, $1), url = $2, \
                 expires_at = $3, updated_at = $4 WHERE id = $5",
                provider_session_id,
                url,
                expires_at,
                now,
                id
            )
            .execute
        )
        .db()?;
        sql!(
            tx,
            query(
                "UPDATE orders SET provider_checkout_session_id = COALESCE(provider_checkout_session_id, $1) \
                 WHERE checkout_session_id = $2",
                provider_session_id,
                id
            )
            .execute
        )
        .db()?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "checkout_session.opened",
                object_type: "checkout_session",
                object_id: id,
                data: json!({ "provider_session_id": provider_session_id, "expires_at": expires_at }),
                request_id,
            },
        )
        .await?;
        tx.commit().await
    }

    /// The provider did not open the session: it is `expired` with the
    /// reason, and its order `canceled` (both revived by a retry of the same
    /// request, see [`Store::reopen_checkout`]).
    pub async fn checkout_failed(
        &self,
        id: &str,
        error_code: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<()> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let failed = sql!(
            tx,
            query(
                "UPDATE checkout_sessions SET status = 'expired', last_error = $1, updated_at = $2 \
                 WHERE id = $3 AND provider_session_id IS NULL AND status = 'open'",
                error_code,
                now,
                id
            )
            .execute
        )
        .db()?;
        if failed == 0 {
            return Ok(());
        }
        set_order_status(
            &mut tx,
            OrderChange { session: id, from: "pending", to: "canceled", reason: "checkout_failed" },
            now,
            actor,
            request_id,
        )
        .await?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "checkout_session.failed",
                object_type: "checkout_session",
                object_id: id,
                data: json!({ "error": error_code }),
                request_id,
            },
        )
        .await?;
        tx.commit().await
    }

    /// Repairs checkouts whose request was dropped between
    /// [`Store::record_checkout`] and the provider's answer (the process
    /// died, or the handler was cancelled): the session is `open` without a
    /// provider session and its order `pending`, and nothing else would
    /// ever settle them. Each one last touched before `cutoff` (chosen
    /// beyond any request's lifetime, so no handler still owns it) is marked
    /// `expired` with `last_error = "abandoned"` and its order `canceled`,
    /// one transaction per session with the audit entries. Like a failed
    /// checkout, a retry of the same request revives it. Returns how many.
    pub async fn expire_abandoned_checkouts(&self, cutoff: i64, actor: &Actor) -> StoreResult<u64> {
        let ids: Vec<String> = sql!(
            self,
            query_scalar::<String>(
                "SELECT id FROM checkout_sessions WHERE status = 'open' AND provider_session_id IS NULL \
                 AND updated_at < $1 ORDER BY updated_at, id LIMIT 500",
                cutoff
            )
            .fetch_all
        )
        .db()?;
        let mut expired = 0;
        for id in ids {
            if self.expire_abandoned_checkout(&id, cutoff, actor).await? {
                expired += 1;
            }
        }
        Ok(expired)
    }

    async fn expire_abandoned_checkout(&self, id: &str, cutoff: i64, actor: &Actor) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        // Re-checked here: a retry may have revived or opened it meanwhile.
        let changed = sql!(
            tx,
            query(
                "UPDATE checkout_sessions SET status = 'expired', last_error = 'abandoned', updated_at = $1 \
                 WHERE id = $2 AND status = 'open' AND provider_session_id IS NULL AND updated_at < $3",
                now,
                id,
                cutoff
            )
            .execute
        )
        .db()?;
        if changed == 0 {
            return Ok(false);
        }
        set_order_status(
            &mut tx,
            OrderChange { session: id, from: "pending", to: "canceled", reason: "checkout_abandoned" },
            now,
            actor,
            None,
        )
        .await?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "checkout_session.abandoned",
                object_type: "checkout_session",
                object_id: id,
                data: json!({ "error": "abandoned", "untouched_since_before": cutoff }),
                request_id: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// How many of a customer's provider customers were deleted at the
    /// provider: part of the key that creates the next one, so Stripe does
    /// not replay the deleted one for a day.
    pub async fn deleted_provider_customers(&self, customer_id: &str, provider: &str) -> StoreResult<i64> {
        sql!(
            self,
            query_scalar::<i64>(
                "SELECT COUNT(*) FROM provider_customers \
                 WHERE customer_id = $1 AND provider = $2 AND deleted_at IS NOT NULL",
                customer_id,
                provider
            )
            .fetch_one
        )
        .db()
    }

    /// Links a provider customer tollgate just created for `external_id`,
    /// as its `customer.created` event would (whichever comes first wins,
    /// the other finds the link). Returns the provider customer the
    /// tollgate customer is linked to now: another one, if a concurrent
    /// checkout linked its own first.
    pub async fn link_provider_customer(
        &self,
        customer_id: &str,
        external_id: &ExternalId,
        provider: &'static str,
        provider_customer_id: &str,
        actor: &Actor,
        policy: &Policy,
    ) -> StoreResult<String> {
        let mut tx = self.begin().await?;
        let pc = ProviderCustomer {
            provider,
            id: provider_customer_id.to_owned(),
            external_id: Some(external_id.clone()),
            ..Default::default()
        };
        apply_provider_customer(&mut tx, &pc, actor, policy).await?;
        let linked: Option<String> = sql!(
            tx,
            query_scalar::<String>(
                "SELECT provider_customer_id FROM provider_customers \
                 WHERE customer_id = $1 AND provider = $2 AND deleted_at IS NULL \
                 ORDER BY created_at, provider_customer_id LIMIT 1",
                customer_id,
                provider
            )
            .fetch_optional
        )
        .db()?;
        tx.commit().await?;
        linked.ok_or_else(|| {
            StoreError::Corrupt(format!("provider customer {provider_customer_id} could not be linked"))
        })
    }
}
