//! Outbound deliveries: one row per (endpoint, event), queued in the
//! transaction that writes the event and drained by `delivery::worker`.
//!
//! Order per customer per endpoint is kept by the claim itself: a delivery
//! is claimable only while no earlier delivery (by event id, and event ids
//! sort in the order events happened) for the same endpoint and customer is
//! still pending or failed awaiting a retry. Dead deliveries no longer
//! block, so one poisoned event cannot stall a customer forever.

use serde::Serialize;

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, Listed, Page, SqlxResultExt, Store, StoreResult, Tx};
use crate::ids::new_id;

/// Queues `event_id` for every enabled endpoint subscribed to `event_type`;
/// returns how many deliveries it queued.
/// Enabled endpoints and the event types each receives.
pub(crate) type EndpointFilters = std::sync::Arc<[(String, Vec<String>)]>;

pub(crate) async fn fan_out(
    tx: &mut Tx,
    event_id: &str,
    event_type: &str,
    customer_id: Option<&str>,
) -> StoreResult<usize> {
    // The filter is matched here rather than in SQL: endpoints are few, and
    // the two engines spell "JSON array contains" differently.
    let endpoints = match &tx.endpoints {
        Some(known) => known.clone(),
        None => {
            let rows: Vec<(String, String)> = sql!(
                tx,
                query_as::<(String, String)>(
                    "SELECT id, events FROM webhook_endpoints WHERE status = 'enabled' AND deleted_at IS NULL ORDER BY id"
                )
                .fetch_all
            )
            .db()?;
            let parsed: EndpointFilters = rows
                .into_iter()
                .map(|(id, events)| (id, serde_json::from_str(&events).unwrap_or_default()))
                .collect();
            tx.endpoints = Some(parsed.clone());
            parsed
        }
    };
    let now = now_unix();
    let mut queued = 0;
    for (endpoint_id, types) in endpoints.iter() {
        if !types.iter().any(|t| t == "*" || t == event_type) {
            continue;
        }
        sql!(
            tx,
            query(
                "INSERT INTO deliveries (id, endpoint_id, event_id, customer_id, status, attempts, next_attempt_at, created_at) \
                 VALUES ($1, $2, $3, $4, 'pending', 0, $5, $5) ON CONFLICT (endpoint_id, event_id) DO NOTHING",
                new_id("dlv"),
                endpoint_id,
                event_id,
                customer_id,
                now
            )
            .execute
        )
        .db()?;
        queued += 1;
    }
    Ok(queued)
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeliveryRecord {
    pub id: String,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

const DELIVERY_COLUMNS: &str =
    "d.id, d.endpoint_id, d.event_id, e.type AS event_type, d.customer_id, d.status, \
     d.attempts, d.next_attempt_at, d.last_status, d.last_error, d.created_at, d.delivered_at";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AttemptRecord {
    pub delivery_id: String,
    pub n: i64,
    pub at: i64,
    pub status_code: Option<i64>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub response: Option<String>,
}

/// A claimed delivery with everything needed to send it.
#[derive(Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: String,
    pub endpoint_id: String,
    pub url: String,
    pub secret: String,
    pub attempts: i64,
    pub event_id: String,
    pub event_type: String,
    /// The application's id for the customer (`external_id`).
    pub customer: Option<String>,
    pub data: String,
    pub event_created_at: i64,
}

impl std::fmt::Debug for ClaimedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedDelivery")
            .field("id", &self.id)
            .field("endpoint_id", &self.endpoint_id)
            .field("event_id", &self.event_id)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub status_code: Option<u16>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub response: Option<String>,
    /// `None`: delivered. `Some(Some(at))`: retry at `at`. `Some(None)`: dead.
    pub retry: Option<Option<i64>>,
    /// The endpoint asked not to be sent anything more (`410 Gone`): why.
    pub disable_endpoint: Option<String>,
}

impl Store {
    /// Claims up to `limit` due deliveries for `lease_seconds`: each the
    /// oldest unfinished one of its (endpoint, customer) queue.
    pub async fn claim_deliveries(
        &self,
        limit: i64,
        lease_seconds: i64,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let now = now_unix();
        // Most wake-ups find nothing new (every finished send wakes the
        // worker): a read on the read side answers those without taking
        // SQLite's single write lock or opening a PostgreSQL transaction.
        let due: Option<String> = sql!(
            self,
            query_scalar::<String>(
                "SELECT id FROM deliveries WHERE status IN ('pending', 'failed') AND next_attempt_at <= $1 \
                 AND (locked_until IS NULL OR locked_until < $1) LIMIT 1",
                now
            )
            .fetch_optional
        )
        .db()?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let mut tx = self.begin().await?;
        let lock = match tx.kind() {
            super::DbKind::Postgres => " FOR UPDATE OF d SKIP LOCKED",
            super::DbKind::Sqlite => "",
        };
        let q = format!(
            "SELECT d.id, d.endpoint_id, w.url, w.secret, d.attempts, d.event_id, e.type AS event_type, \
             c.external_id AS customer, e.data, e.created_at AS event_created_at \
             FROM deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id JOIN events e ON e.id = d.event_id \
             LEFT JOIN customers c ON c.id = d.customer_id \
             WHERE d.status IN ('pending', 'failed') AND d.next_attempt_at <= $1 \
             AND (d.locked_until IS NULL OR d.locked_until < $1) \
             AND w.status = 'enabled' AND w.deleted_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.endpoint_id = d.endpoint_id \
                 AND p.customer_id = d.customer_id AND p.status IN ('pending', 'failed') AND p.event_id < d.event_id) \
             ORDER BY d.event_id LIMIT $2{lock}"
        );
        let rows: Vec<ClaimedDelivery> =
            sql!(tx, query_as::<ClaimedDelivery>(&q, now, limit).fetch_all).db()?;
        for row in &rows {
            sql!(
                tx,
                query("UPDATE deliveries SET locked_until = $1 WHERE id = $2", now + lease_seconds, &row.id)
                    .execute
            )
            .db()?;
        }
        tx.commit().await?;
        Ok(rows)
    }

    /// Records finished attempts, each with its consequence (delivered,
    /// retried later, dead, its endpoint disabled by a 410), in one
    /// transaction. Answers, for each, whether it disabled its endpoint.
    pub async fn record_delivery_attempts(
        &self,
        attempts: &[(&str, &str, &AttemptOutcome)],
    ) -> StoreResult<Vec<bool>> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let mut disabled = Vec::with_capacity(attempts.len());
        for (id, endpoint_id, outcome) in attempts {
            sql!(
                tx,
                query(
                    "INSERT INTO delivery_attempts (delivery_id, n, at, status_code, duration_ms, error, response) \
                     SELECT $1, COALESCE(MAX(n), 0) + 1, $2, $3, $4, $5, $6 FROM delivery_attempts WHERE delivery_id = $1",
                    id,
                    now,
                    outcome.status_code.map(i64::from),
                    outcome.duration_ms,
                    &outcome.error,
                    &outcome.response
                )
                .execute
            )
            .db()?;
            let (status, next, delivered) = match outcome.retry {
                None => ("succeeded", now, Some(now)),
                Some(Some(at)) => ("failed", at, None),
                Some(None) => ("dead", now, None),
            };
            sql!(
                tx,
                query(
                    "UPDATE deliveries SET status = $1, attempts = attempts + 1, next_attempt_at = $2, locked_until = NULL, \
                     last_status = $3, last_error = $4, delivered_at = $5 WHERE id = $6",
                    status,
                    next,
                    outcome.status_code.map(i64::from),
                    &outcome.error,
                    delivered,
                    id
                )
                .execute
            )
            .db()?;
            disabled.push(match &outcome.disable_endpoint {
                Some(reason) => super::webhook_endpoints::disable(&mut tx, endpoint_id, reason).await?,
                None => false,
            });
        }
        tx.commit().await?;
        Ok(disabled)
    }

    pub async fn get_delivery(&self, id: &str) -> StoreResult<Option<DeliveryRecord>> {
        let q = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = $1"
        );
        sql!(self, query_as::<DeliveryRecord>(&q, id).fetch_optional).db()
    }

    /// An endpoint's deliveries, newest first.
    pub async fn list_deliveries(
        &self,
        endpoint_id: &str,
        page: &Page,
    ) -> StoreResult<Listed<DeliveryRecord>> {
        self.ensure_cursor("deliveries", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let q = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.endpoint_id = $1 AND ($2 IS NULL OR d.id {op} $2) ORDER BY d.id {order} LIMIT $3"
        );
        let rows = sql!(
            self,
            query_as::<DeliveryRecord>(&q, endpoint_id, page.cursor(), page.fetch_limit()).fetch_all
        )
        .db()?;
        Ok(page.finish(rows))
    }

    /// A delivery's attempts, first first.
    pub async fn delivery_attempts(&self, delivery_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        sql!(
            self,
            query_as::<AttemptRecord>(
                "SELECT delivery_id, n, at, status_code, duration_ms, error, response FROM delivery_attempts \
                 WHERE delivery_id = $1 ORDER BY n",
                delivery_id
            )
            .fetch_all
        )
        .db()
    }

    /// Sends a dead or failed delivery again now. `false` when it is in
    /// another state.
    pub async fn retry_delivery(
        &self,
        id: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let n = sql!(
            tx,
            query(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, locked_until = NULL \
                 WHERE id = $2 AND status IN ('dead', 'failed')",
                now_unix(),
                id
            )
            .execute
        )
        .db()?;
        if n == 1 {
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "delivery.retried",
                    object_type: "delivery",
                    object_id: id,
                    data: serde_json::json!({}),
                    request_id,
                },
            )
            .await?;
            tx.deliveries_queued = true;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Deliveries waiting to be sent to enabled endpoints (due or not).
    pub async fn delivery_queue_depth(&self) -> StoreResult<i64> {
        sql!(
            self,
            query_scalar::<i64>(
                "SELECT COUNT(*) FROM deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                 WHERE d.status IN ('pending', 'failed') AND w.status = 'enabled' AND w.deleted_at IS NULL"
            )
            .fetch_one
        )
        .db()
    }
}
