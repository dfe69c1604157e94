//! `/v1/audit-log`: the hash-chained record of every change (admin scope).

use axum::routing::get;
use axum::{extract::State, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::ApiResult;
use super::extract::{AdminKey, ApiQuery, ListParams};
use super::Json;
use super::{AppState, ListResponse};
use crate::store::audit::AuditEntry as StoredEntry;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/audit-log", get(list_audit_log))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct AuditEntry {
    /// `aud_…`; the pagination cursor.
    pub id: String,
    #[schema(example = "audit_entry")]
    pub object: &'static str,
    /// Position in the chain, from 1.
    pub seq: i64,
    /// Unix seconds.
    pub created: i64,
    /// `api_key:key_…`, `cli` or `system:…`.
    pub actor: String,
    /// e.g. `customer.updated`.
    pub action: String,
    pub object_type: String,
    pub object_id: String,
    /// What changed.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
    pub request_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

impl From<StoredEntry> for AuditEntry {
    fn from(e: StoredEntry) -> Self {
        AuditEntry {
            id: e.id,
            object: "audit_entry",
            seq: e.seq,
            created: e.at,
            actor: e.actor,
            action: e.action,
            object_type: e.object_type,
            object_id: e.object_id,
            data: serde_json::from_str(&e.data).unwrap_or(serde_json::Value::String(e.data)),
            request_id: e.request_id,
            prev_hash: e.prev_hash,
            hash: e.hash,
        }
    }
}

/// List audit entries, newest first
#[utoipa::path(
    get,
    path = "/v1/audit-log",
    tag = "audit",
    params(ListParams),
    responses((status = 200, body = ListResponse<AuditEntry>)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_audit_log(
    State(state): State<AppState>,
    AdminKey(_caller): AdminKey,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult<Json<ListResponse<AuditEntry>>> {
    let listed = state.store.list_audit_entries(&params.page()?).await?;
    Ok(Json(ListResponse::new("/v1/audit-log", listed, AuditEntry::from)))
}
