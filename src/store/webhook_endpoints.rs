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
    /// The `[webhook_endpoints.<key>]` entry of tollgate.toml that manages
    /// it; `None` for endpoints created through the API.
    pub config_key: Option<String>,
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
            .field("config_key", &self.config_key)
            .finish_non_exhaustive()
    }
}

impl EndpointRecord {
    pub fn event_types(&self) -> Vec<String> {
        serde_json::from_str(&self.events).unwrap_or_default()
    }
}

const COLUMNS: &str =
    "id, url, description, events, secret, status, disabled_reason, config_key, created_at, updated_at";

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
        tx.endpoints_changed();
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
    /// stays for the audit. `false` when there was no such endpoint, or it
    /// is declared in the config file (removing the declaration removes it).
    pub async fn delete_webhook_endpoint(
        &self,
        id: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        tx.endpoints_changed();
        let n = sql!(
            tx,
            query(
                "UPDATE webhook_endpoints SET deleted_at = $1, updated_at = $1 \
                 WHERE id = $2 AND deleted_at IS NULL AND config_key IS NULL",
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
    /// `None` when there is no such endpoint or its secret comes from the
    /// config file.
    pub async fn rotate_webhook_endpoint_secret(
        &self,
        id: &str,
        secret: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<Option<EndpointRecord>> {
        let mut tx = self.begin().await?;
        tx.endpoints_changed();
        let n = sql!(
            tx,
            query(
                "UPDATE webhook_endpoints SET secret = $1, updated_at = $2 \
                 WHERE id = $3 AND deleted_at IS NULL AND config_key IS NULL",
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
    tx.endpoints_changed();
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

/// What re-enabling an endpoint did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Enabled {
    pub endpoint: EndpointRecord,
    /// Whether it was disabled until now.
    pub was_disabled: bool,
    /// Dead deliveries queued again (only when asked to).
    pub requeued_dead: u64,
}

/// An endpoint as the config file declares it, secret resolved.
#[derive(Clone, PartialEq, Eq)]
pub struct DeclaredEndpoint {
    pub key: String,
    pub url: String,
    pub description: Option<String>,
    /// Sorted, deduplicated; `["*"]` for all.
    pub events: Vec<String>,
    pub secret: String,
}

impl std::fmt::Debug for DeclaredEndpoint {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DeclaredEndpoint")
            .field("key", &self.key)
            .field("url", &self.url)
            .field("events", &self.events)
            .field("secret", &"[REDACTED]")
            .finish_non_exhaustive()
    }
}

/// What start-up changed to make the stored endpoints match the file, by
/// config key.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DeclaredReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub removed: Vec<String>,
}

impl DeclaredReport {
    pub fn is_noop(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.removed.is_empty()
    }
}

impl Store {
    /// Sends to a disabled endpoint again. Its deliveries still waiting
    /// (queued before it was disabled, including the one it answered
    /// `410`) become due at once and go out in order; with `retry_dead`,
    /// its dead deliveries are queued again too. Events that happened while
    /// it was disabled were never queued for it. `None`: no such endpoint.
    pub async fn enable_webhook_endpoint(
        &self,
        id: &str,
        retry_dead: bool,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<Option<Enabled>> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let q = format!("SELECT {COLUMNS} FROM webhook_endpoints WHERE id = $1 AND deleted_at IS NULL");
        let Some(before) = sql!(tx, query_as::<EndpointRecord>(&q, id).fetch_optional).db()? else {
            return Ok(None);
        };
        let was_disabled = before.status == "disabled";
        if was_disabled {
            tx.endpoints_changed();
            sql!(
                tx,
                query(
                    "UPDATE webhook_endpoints SET status = 'enabled', disabled_reason = NULL, updated_at = $1 \
                     WHERE id = $2",
                    now,
                    id
                )
                .execute
            )
            .db()?;
            sql!(
                tx,
                query(
                    "UPDATE deliveries SET next_attempt_at = $1 \
                     WHERE endpoint_id = $2 AND status IN ('pending', 'failed') AND next_attempt_at > $1",
                    now,
                    id
                )
                .execute
            )
            .db()?;
        }
        let requeued_dead = if retry_dead {
            sql!(
                tx,
                query(
                    "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, locked_until = NULL \
                     WHERE endpoint_id = $2 AND status = 'dead'",
                    now,
                    id
                )
                .execute
            )
            .db()?
        } else {
            0
        };
        if was_disabled || requeued_dead > 0 {
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "webhook_endpoint.enabled",
                    object_type: "webhook_endpoint",
                    object_id: id,
                    data: serde_json::json!({
                        "was_disabled": was_disabled,
                        "previous_reason": before.disabled_reason,
                        "retry_dead": retry_dead,
                        "requeued_dead": requeued_dead,
                    }),
                    request_id,
                },
            )
            .await?;
            tx.deliveries_queued = true;
        }
        let endpoint = fetch(&mut tx, id)
            .await?
            .ok_or_else(|| super::StoreError::Corrupt(format!("endpoint {id} vanished")))?;
        tx.commit().await?;
        Ok(Some(Enabled { endpoint, was_disabled, requeued_dead }))
    }

    /// Makes the config-managed endpoints match `declared`, in one
    /// transaction: new keys are created, changed ones updated (url,
    /// events, description, secret), keys no longer declared deleted.
    /// Running it again with the same declarations changes nothing. An
    /// endpoint disabled by a `410` stays disabled: re-enabling is an
    /// operator's decision, by API.
    pub async fn reconcile_declared_webhook_endpoints(
        &self,
        declared: &[DeclaredEndpoint],
        actor: &Actor,
    ) -> StoreResult<DeclaredReport> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        if tx.kind() == super::DbKind::Postgres {
            // Instances starting together reconcile one after the other
            // (SQLite's write lock already does this).
            sql!(
                tx,
                query("SELECT pg_advisory_xact_lock(hashtextextended('tollgate:declared_webhook_endpoints', 0))")
                    .execute
            )
            .db()?;
        }
        let q = format!(
            "SELECT {COLUMNS} FROM webhook_endpoints WHERE config_key IS NOT NULL AND deleted_at IS NULL"
        );
        let stored: Vec<EndpointRecord> = sql!(tx, query_as::<EndpointRecord>(&q).fetch_all).db()?;
        let mut report = DeclaredReport::default();
        for d in declared {
            let events = serde_json::to_string(&d.events)?;
            let existing = stored.iter().find(|s| s.config_key.as_deref() == Some(d.key.as_str()));
            let (id, action, data) = match existing {
                None => {
                    let id = new_id("we");
                    tx.endpoints_changed();
                    sql!(
                        tx,
                        query(
                            "INSERT INTO webhook_endpoints (id, url, description, events, secret, status, config_key, \
                             created_at, updated_at) VALUES ($1, $2, $3, $4, $5, 'enabled', $6, $7, $7)",
                            &id,
                            &d.url,
                            &d.description,
                            &events,
                            &d.secret,
                            &d.key,
                            now
                        )
                        .execute
                    )
                    .db()?;
                    report.created.push(d.key.clone());
                    let data = serde_json::json!({ "config_key": d.key, "url": d.url, "events": d.events });
                    (id, "webhook_endpoint.created", data)
                }
                Some(s)
                    if s.url == d.url
                        && s.description == d.description
                        && s.events == events
                        && s.secret == d.secret =>
                {
                    continue
                }
                Some(s) => {
                    tx.endpoints_changed();
                    sql!(
                        tx,
                        query(
                            "UPDATE webhook_endpoints SET url = $1, description = $2, events = $3, secret = $4, \
                             updated_at = $5 WHERE id = $6",
                            &d.url,
                            &d.description,
                            &events,
                            &d.secret,
                            now,
                            &s.id
                        )
                        .execute
                    )
                    .db()?;
                    report.updated.push(d.key.clone());
                    let data = serde_json::json!({
                        "config_key": d.key, "url": d.url, "events": d.events,
                        "secret_changed": s.secret != d.secret,
                    });
                    (s.id.clone(), "webhook_endpoint.updated", data)
                }
            };
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action,
                    object_type: "webhook_endpoint",
                    object_id: &id,
                    data,
                    request_id: None,
                },
            )
            .await?;
        }
        for s in &stored {
            let key = s.config_key.as_deref().unwrap_or_default();
            if declared.iter().any(|d| d.key == key) {
                continue;
            }
            tx.endpoints_changed();
            sql!(
                tx,
                query(
                    "UPDATE webhook_endpoints SET deleted_at = $1, updated_at = $1 WHERE id = $2",
                    now,
                    &s.id
                )
                .execute
            )
            .db()?;
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "webhook_endpoint.deleted",
                    object_type: "webhook_endpoint",
                    object_id: &s.id,
                    data: serde_json::json!({ "config_key": key, "reason": "no longer declared in the config file" }),
                    request_id: None,
                },
            )
            .await?;
            report.removed.push(key.to_owned());
        }
        tx.commit().await?;
        Ok(report)
    }
}
