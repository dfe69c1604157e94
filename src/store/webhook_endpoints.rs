//! The application's webhook endpoints: where canonical events are sent.
//!
//! The signing secret is stored in clear because signing needs it; it is
//! returned once, at creation, and never listed or logged afterwards.

use serde::Serialize;

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, Listed, Page, SqlxResultExt, Store, StoreResult, Tx};
use crate::ids::new_id;

#[derive(Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EndpointRecord {
    pub id: String,
    pub url: String,
    pub description: Option<String>,
    /// A JSON array of event types, `["*"]` for all.
    pub events: String,
    #[serde(skip)]
    pub secret: String,
    pub status: String,
    pub disabled_reason: Option<String>,
    pub created_at: i64,
    pub updated_at: i64,
}

impl std::fmt::Debug for EndpointRecord {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndpointRecord")
            .field("id", &self.id)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"[REDACTED]")
            .field("status", &self.status)
            .finish_non_exhaustive()
    }
}

impl EndpointRecord {
    pub fn event_types(&self) -> Vec<String> {
        serde_json::from_str(&self.events).unwrap_or_default()
    }
}

const COLUMNS: &str = "id, url, description, events, secret, status, disabled_reason, created_at, updated_at";

pub struct NewEndpoint<'a> {
    pub url: &'a str,
    pub description: Option<&'a str>,
    pub events: &'a [String],
    pub secret: &'a str,
}

impl Store {
    pub async fn create_webhook_endpoint(
        &self,
        new: NewEndpoint<'_>,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<EndpointRecord> {
        let id = new_id("we");
        let now = now_unix();
        let events = serde_json::to_string(new.events)?;
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "INSERT INTO webhook_endpoints (id, url, description, events, secret, status, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, 'enabled', $6, $6)",
                &id,
                new.url,
                new.description,
                &events,
                new.secret,
                now
            )
            .execute
        )
        .db()?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "webhook_endpoint.created",
                object_type: "webhook_endpoint",
                object_id: &id,
                data: serde_json::json!({ "url": new.url, "events": new.events }),
                request_id,
            },
        )
        .await?;
        let row = fetch(&mut tx, &id).await?;
        tx.commit().await?;
        row.ok_or_else(|| super::StoreError::Corrupt(format!("endpoint {id} vanished")))
    }

    /// A live (not deleted) endpoint.
    pub async fn get_webhook_endpoint(&self, id: &str) -> StoreResult<Option<EndpointRecord>> {
        let q = format!("SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL");
        sql!(self, query_as::<EndpointRecord>(&q, id).fetch_optional).db()
    }

    /// Newest first.
    pub async fn list_webhook_endpoints(&self, page: &Page) -> StoreResult<Listed<EndpointRecord>> {
        self.ensure_cursor("webhook_endpoints", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let q = format!(
            "SELECT {COLUMNS} FROM webhook_endpoints WHERE ($1 IS NULL OR id {op} $1) AND deleted_at IS NULL \
             ORDER BY id {order} LIMIT $2"
        );
        let rows =
            sql!(self, query_as::<EndpointRecord>(&q, page.cursor(), page.fetch_limit()).fetch_all).db()?;
        Ok(page.finish(rows))
    }

    /// Deletes an endpoint: nothing more is sent to it, and its history
    /// stays for the audit. `false` when there was no such endpoint.
    pub async fn delete_webhook_endpoint(
        &self,
        id: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let n = sql!(
            tx,
            query(
                "UPDATE webhook_endpoints SET deleted_at = $1, updated_at = $1 WHERE id = $2 AND deleted_at IS NULL",
                now,
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
                    action: "webhook_endpoint.deleted",
                    object_type: "webhook_endpoint",
                    object_id: id,
                    data: serde_json::json!({}),
                    request_id,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Replaces the signing secret; the old one stops working at once.
    pub async fn rotate_webhook_endpoint_secret(
        &self,
        id: &str,
        secret: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<Option<EndpointRecord>> {
        let mut tx = self.begin().await?;
        let n = sql!(
            tx,
            query(
                "UPDATE webhook_endpoints SET secret = $1, updated_at = $2 WHERE id = $3 AND deleted_at IS NULL",
                secret,
                now_unix(),
                id
            )
            .execute
        )
        .db()?;
        if n == 0 {
            return Ok(None);
        }
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "webhook_endpoint.secret_rotated",
                object_type: "webhook_endpoint",
                object_id: id,
                data: serde_json::json!({}),
                request_id,
            },
        )
        .await?;
        let row = fetch(&mut tx, id).await?;
        tx.commit().await?;
        Ok(row)
    }
}

/// Stops deliveries to an endpoint that told us to (`410 Gone`). Its
/// undelivered events stay pending and visible.
pub(crate) async fn disable(tx: &mut Tx, id: &str, reason: &str) -> StoreResult<bool> {
    let n = sql!(
        tx,
        query(
            "UPDATE webhook_endpoints SET status = 'disabled', disabled_reason = $1, updated_at = $2 \
             WHERE id = $3 AND status = 'enabled'",
            reason,
            now_unix(),
            id
        )
        .execute
    )
    .db()?;
    if n == 1 {
        audit::append(
            tx,
            AuditRecord {
                actor: &Actor::System("delivery"),
                action: "webhook_endpoint.disabled",
                object_type: "webhook_endpoint",
                object_id: id,
                data: serde_json::json!({ "reason": reason }),
                request_id: None,
            },
        )
        .await?;
    }
    Ok(n == 1)
}

async fn fetch(tx: &mut Tx, id: &str) -> StoreResult<Option<EndpointRecord>> {
    let q = format!("SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1");
    sql!(tx, query_as::<EndpointRecord>(&q, id).fetch_optional).db()
}
