//! Refunds asked for through tollgate's API.
//!
//! What is left to refund must count the refunds already at the provider
//! *and* the ones on their way there: a request is recorded `pending`, in the
//! transaction that checks the remaining amount (the order row locked on
//! PostgreSQL, the single writer on SQLite), before the provider is called.
//! Two concurrent requests therefore see each other, and a refund whose
//! answer or webhook has not come back yet still counts. Once the provider's
//! refund is known the request is `submitted` and the refund counts through
//! the `refunds` table (in the same transaction, so never twice); a refused
//! or abandoned request is `failed` and counts for nothing.

use serde_json::json;

use super::audit::{self, Actor, AuditRecord};
use super::orders::{self, Cause, OrderRow};
use super::{now_unix, sql, watermarks, DbKind, SqlxResultExt, Store, StoreResult, Tx};
use crate::billing::entitlements::Policy;
use crate::billing::ordering;
use crate::ids::new_id;
use crate::providers::stripe::derived_idempotency_key;
use crate::providers::stripe::objects::Refund;

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct RefundRequestRow {
    pub id: String,
    pub order_id: String,
    pub provider: String,
    pub amount: i64,
    pub currency: String,
    pub reason: Option<String>,
    pub status: String,
    pub provider_refund_id: Option<String>,
    /// What a retry of the same request finds the row by.
    pub idempotency_key: String,
    /// What the provider is called with; `None` on rows recorded before it
    /// was per row, which were sent `idempotency_key`.
    pub provider_idempotency_key: Option<String>,
    pub failure_code: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
    /// The provider refund's own status (`succeeded`, `pending`, `failed`…)
    /// once it is known.
    #[sqlx(default)]
    pub refund_status: Option<String>,
}

const REQUEST_COLUMNS: &str = "r.id, r.order_id, r.provider, r.amount, r.currency, r.reason, r.status, \
     r.provider_refund_id, r.idempotency_key, r.provider_idempotency_key, r.failure_code, r.created_at, r.updated_at, \
     (SELECT f.status FROM refunds f WHERE f.provider = r.provider AND f.provider_refund_id = r.provider_refund_id) \
     AS refund_status";

/// A refund an API caller asks for.
#[derive(Debug, Clone)]
pub struct NewRefund<'a> {
    pub order_id: &'a str,
    /// `None`: everything that is left.
    pub amount: Option<i64>,
    pub reason: Option<&'a str>,
    /// Derived from the caller's Idempotency-Key and the request: a retry of
    /// the same request finds its earlier row by it. (The provider is called
    /// with a key of the row, [`RefundRequestRow::provider_key`].)
    pub idempotency_key: &'a str,
    /// The key as derived before it included the request (without the
    /// body): a retry of a request recorded then still finds its row, if
    /// it asks for the same. Only needed for one key lifetime after the
    /// upgrade.
    pub legacy_idempotency_key: Option<&'a str>,
    /// Keys are kept as long as the API's Idempotency-Keys: a row recorded
    /// before this time no longer answers to its key.
    pub keys_valid_since: i64,
    pub actor: &'a Actor,
    pub request_id: Option<&'a str>,
}

/// Why a refund cannot be asked for. Nothing was recorded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RefundRefusal {
    OrderMissing,
    /// Not paid (yet, or ever): nothing to give back.
    NotPaid {
        status: String,
    },
    AlreadyRefunded,
    /// Paid with nothing charged (a free checkout): no payment to refund.
    NoPayment,
    /// A dispute is open or lost: the card network holds the money.
    Disputed {
        status: String,
    },
    AmountTooLarge {
        requested: i64,
        remaining: i64,
        paid: i64,
        refunded: i64,
        pending: i64,
    },
}

/// What the caller does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reservation {
    /// Recorded (or found) `pending`: ask the provider to refund
    /// `payment_key`.
    Pending {
        request: RefundRequestRow,
        payment_key: String,
    },
    /// This request was already carried out (a retry after a lost answer).
    Done(RefundRequestRow),
    Refused(RefundRefusal),
}

impl RefundRequestRow {
    /// The Idempotency-Key this request is sent to the provider with, the
    /// same on every retry of it.
    pub fn provider_key(&self) -> &str {
        self.provider_idempotency_key.as_deref().unwrap_or(&self.idempotency_key)
    }
}

impl Store {
    pub async fn refund_request(&self, id: &str) -> StoreResult<Option<RefundRequestRow>> {
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM refund_requests r WHERE r.id = $1");
        sql!(self, query_as::<RefundRequestRow>(&sql, id).fetch_optional).db()
    }

    /// Checks what is left to refund and records the request as `pending`,
    /// in one transaction with its audit entry.
    pub async fn reserve_refund(&self, new: NewRefund<'_>) -> StoreResult<Reservation> {
        super::retry_lost_races(|| self.reserve_refund_once(new.clone())).await
    }

    async fn reserve_refund_once(&self, new: NewRefund<'_>) -> StoreResult<Reservation> {
        let mut tx = self.begin().await?;
        let lock = if tx.kind() == DbKind::Postgres { " FOR UPDATE" } else { "" };
        let sql = format!(
            "SELECT id, customer_id, provider, status, currency, amount_total, amount_refunded, checkout_session_id, \
             provider_checkout_session_id, payment_key, paid_at, payment_failed_at, canceled_at, created_at, updated_at \
             FROM orders WHERE id = $1{lock}"
        );
        let Some(order) = sql!(tx, query_as::<OrderRow>(&sql, new.order_id).fetch_optional).db()? else {
            return Ok(Reservation::Refused(RefundRefusal::OrderMissing));
        };
        let sql = format!("SELECT {REQUEST_COLUMNS} FROM refund_requests r WHERE r.idempotency_key = $1");
        let mut earlier =
            sql!(tx, query_as::<RefundRequestRow>(&sql, new.idempotency_key).fetch_optional).db()?;
        if let Some(expired) = earlier.as_ref().filter(|e| e.created_at < new.keys_valid_since) {
            // Past its lifetime the key names nothing: the old row keeps its
            // history under a retired key, and this is a new request.
            sql!(
                tx,
                query(
                    "UPDATE refund_requests SET idempotency_key = idempotency_key || ':expired:' || id WHERE id = $1",
                    &expired.id
                )
                .execute
            )
            .db()?;
            earlier = None;
        }
        if let (None, Some(legacy)) = (&earlier, new.legacy_idempotency_key) {
            earlier = sql!(tx, query_as::<RefundRequestRow>(&sql, legacy).fetch_optional).db()?.filter(|e| {
                e.created_at >= new.keys_valid_since
                    && e.reason.as_deref() == new.reason
                    && new.amount.is_none_or(|a| a == e.amount)
            });
        }
        if let Some(earlier) = earlier.as_ref().filter(|e| e.order_id == order.id) {
            match earlier.status.as_str() {
                "submitted" => return Ok(Reservation::Done(earlier.clone())),
                // Already counted: ask the provider again under the same key,
                // which either finds the refund it made or makes it now.
                "pending" => {
                    let payment_key = order.payment_key.clone().unwrap_or_default();
                    return Ok(Reservation::Pending { request: earlier.clone(), payment_key });
                }
                // Failed: counted for nothing, so it must pass the check again.
                _ => {}
            }
        }
        let payment_key = match refusal(&order) {
            Some(refusal) => return Ok(Reservation::Refused(refusal)),
            None => order.payment_key.clone().unwrap_or_default(),
        };
        let pending: i64 = sql!(
            tx,
            query_scalar::<i64>(
                "SELECT CAST(COALESCE(SUM(amount), 0) AS BIGINT) FROM refund_requests \
                 WHERE order_id = $1 AND status = 'pending'",
                &order.id
            )
            .fetch_one
        )
        .db()?;
        let remaining = order.amount_total - order.amount_refunded - pending;
        if remaining <= 0 && new.amount.is_none() && pending == 0 {
            return Ok(Reservation::Refused(RefundRefusal::AlreadyRefunded));
        }
        let amount = new.amount.unwrap_or(remaining);
        if amount <= 0 || amount > remaining {
            return Ok(Reservation::Refused(RefundRefusal::AmountTooLarge {
                requested: amount,
                remaining: remaining.max(0),
                paid: order.amount_total,
                refunded: order.amount_refunded,
                pending,
            }));
        }
        let now = now_unix();
        let request = match earlier {
            Some(earlier) => {
                sql!(
                    tx,
                    query(
                        "UPDATE refund_requests SET status = 'pending', amount = $1, reason = $2, failure_code = NULL, \
                         updated_at = $3 WHERE id = $4",
                        amount,
                        new.reason,
                        now,
                        &earlier.id
                    )
                    .execute
                )
                .db()?;
                RefundRequestRow { status: "pending".into(), amount, failure_code: None, ..earlier }
            }
            None => {
                let id = new_id("rfr");
                let row = RefundRequestRow {
                    provider_idempotency_key: Some(derived_idempotency_key(&[
                        "refund",
                        new.idempotency_key,
                        &id,
                    ])),
                    id,
                    order_id: order.id.clone(),
                    provider: order.provider.clone(),
                    amount,
                    currency: order.currency.clone(),
                    reason: new.reason.map(str::to_owned),
                    status: "pending".into(),
                    provider_refund_id: None,
                    idempotency_key: new.idempotency_key.to_owned(),
                    failure_code: None,
                    created_at: now,
                    updated_at: now,
                    refund_status: None,
                };
                sql!(
                    tx,
                    query(
                        "INSERT INTO refund_requests (id, order_id, provider, amount, currency, reason, status, \
                         idempotency_key, provider_idempotency_key, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, 'pending', $7, $8, $9, $9)",
                        &row.id,
                        &row.order_id,
                        &row.provider,
                        row.amount,
                        &row.currency,
                        &row.reason,
                        &row.idempotency_key,
                        &row.provider_idempotency_key,
                        now
                    )
                    .execute
                )
                .db()?;
                row
            }
        };
        audit::append(
            &mut tx,
            AuditRecord {
                actor: new.actor,
                action: "refund.requested",
                object_type: "order",
                object_id: &order.id,
                data: json!({
                    "refund_request": request.id, "amount": amount, "currency": order.currency,
                    "reason": new.reason, "remaining_before": remaining,
                }),
                request_id: new.request_id,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(Reservation::Pending { request, payment_key })
    }

    /// Applies the provider's refund (its answer to tollgate's call) through
    /// the webhook's code path: the refund's watermark decides whether it is
    /// newer than what its webhooks already said; the order is recomputed
    /// (refunded state, revoked grants, events) and the request settled.
    pub async fn settle_refund_request(
        &self,
        request_id: &str,
        refund: &Refund,
        answered_at: i64,
        actor: &Actor,
        http_request_id: Option<&str>,
        policy: &Policy,
    ) -> StoreResult<()> {
        super::retry_lost_races(|| {
            self.settle_refund_request_once(request_id, refund, answered_at, actor, http_request_id, policy)
        })
        .await
    }

    async fn settle_refund_request_once(
        &self,
        request_id: &str,
        refund: &Refund,
        answered_at: i64,
        actor: &Actor,
        http_request_id: Option<&str>,
        policy: &Policy,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let position = ordering::api_answer_position(answered_at, None, &new_id("api"));
        if watermarks::advance(&mut tx, "stripe", &refund.id, &position).await? {
            let cause = Cause { provider: "stripe", provider_event_id: None, at: answered_at, actor, policy };
            orders::apply_refunds(&mut tx, cause, std::slice::from_ref(refund), false).await?;
        }
        // The audit chain before the request's row, as the inbox's refund
        // path takes them.
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "refund.submitted",
                object_type: "refund_request",
                object_id: request_id,
                data: json!({ "provider_refund_id": refund.id, "status": refund.status, "amount": refund.amount }),
                request_id: http_request_id,
            },
        )
        .await?;
        link_request(&mut tx, "stripe", request_id, &refund.id).await?;
        tx.commit().await
    }

    /// The provider refused the refund, or it was never sent: it counts for
    /// nothing from now on.
    pub async fn fail_refund_request(
        &self,
        request_id: &str,
        failure_code: &str,
        actor: &Actor,
        http_request_id: Option<&str>,
    ) -> StoreResult<()> {
        super::retry_lost_races(|| {
            self.fail_refund_request_once(request_id, failure_code, actor, http_request_id)
        })
        .await
    }

    async fn fail_refund_request_once(
        &self,
        request_id: &str,
        failure_code: &str,
        actor: &Actor,
        http_request_id: Option<&str>,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let changed = sql!(
            tx,
            query(
                "UPDATE refund_requests SET status = 'failed', failure_code = $1, updated_at = $2 \
                 WHERE id = $3 AND status = 'pending'",
                failure_code,
                now_unix(),
                request_id
            )
            .execute
        )
        .db()?;
        if changed == 1 {
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "refund.failed",
                    object_type: "refund_request",
                    object_id: request_id,
                    data: json!({ "failure_code": failure_code }),
                    request_id: http_request_id,
                },
            )
            .await?;
        }
        tx.commit().await
    }

    /// Requests of an order still `pending` since before `cutoff`: their
    /// caller gave up without an answer (the provider was unreachable) and
    /// no webhook has named them since.
    pub async fn refund_requests_stale(
        &self,
        order_id: &str,
        cutoff: i64,
    ) -> StoreResult<Vec<RefundRequestRow>> {
        let sql = format!(
            "SELECT {REQUEST_COLUMNS} FROM refund_requests r WHERE r.order_id = $1 AND r.status = 'pending' \
             AND r.updated_at < $2 ORDER BY r.id"
        );
        sql!(self, query_as::<RefundRequestRow>(&sql, order_id, cutoff).fetch_all).db()
    }
}

/// Why an order cannot be refunded, if it cannot.
fn refusal(order: &OrderRow) -> Option<RefundRefusal> {
    match order.status.as_str() {
        "paid" | "fulfilled" | "partially_refunded" | "dispute_won" if order.payment_key.is_some() => None,
        "paid" | "fulfilled" => Some(RefundRefusal::NoPayment),
        "refunded" => Some(RefundRefusal::AlreadyRefunded),
        "disputed" | "dispute_lost" => Some(RefundRefusal::Disputed { status: order.status.clone() }),
        other => Some(RefundRefusal::NotPaid { status: other.to_owned() }),
    }
}

/// Marks a request as carried out by the provider's refund: from here on the
/// refund counts through the `refunds` table, not as pending.
pub(crate) async fn link_request(
    tx: &mut Tx,
    provider: &str,
    request_id: &str,
    provider_refund_id: &str,
) -> StoreResult<()> {
    sql!(
        tx,
        query(
            "UPDATE refund_requests SET status = 'submitted', provider_refund_id = $1, failure_code = NULL, updated_at = $2 \
             WHERE id = $3 AND provider = $4 AND (status <> 'submitted' OR provider_refund_id IS NULL)",
            provider_refund_id,
            now_unix(),
            request_id,
            provider
        )
        .execute
    )
    .db()?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn order(status: &str, payment_key: Option<&str>) -> OrderRow {
        OrderRow {
            id: "ord_1".into(),
            customer_id: "cust_1".into(),
            provider: "stripe".into(),
            status: status.into(),
            currency: "usd".into(),
            amount_total: 1000,
            amount_refunded: 0,
            checkout_session_id: None,
            provider_checkout_session_id: None,
            payment_key: payment_key.map(str::to_owned),
            paid_at: None,
            payment_failed_at: None,
            canceled_at: None,
            created_at: 0,
            updated_at: 0,
        }
    }

    #[test]
    fn only_paid_undisputed_orders_with_a_payment_can_be_refunded() {
        for status in ["paid", "fulfilled", "partially_refunded", "dispute_won"] {
            assert_eq!(refusal(&order(status, Some("pi_1"))), None, "{status}");
        }
        assert_eq!(refusal(&order("refunded", Some("pi_1"))), Some(RefundRefusal::AlreadyRefunded));
        for status in ["disputed", "dispute_lost"] {
            assert!(matches!(refusal(&order(status, Some("pi_1"))), Some(RefundRefusal::Disputed { .. })));
        }
        for status in ["pending", "canceled", "payment_failed"] {
            assert!(matches!(refusal(&order(status, Some("pi_1"))), Some(RefundRefusal::NotPaid { .. })));
        }
        // Paid without a payment to refund (a free checkout): nothing to give back.
        assert_eq!(refusal(&order("paid", None)), Some(RefundRefusal::NoPayment));
    }
}
