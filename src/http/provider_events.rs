//! `/v1/provider-events`: the inbox of provider webhooks (admin scope).

use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{list_query, AdminKey, ApiPath, ApiQuery};
use super::Json;
use super::{AppState, ListResponse};
use crate::store::provider_events::ProviderEventRecord;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/provider-events", get(list_provider_events))
        .route("/v1/provider-events/{id}", get(get_provider_event))
        .route("/v1/provider-events/{id}/replay", post(replay_provider_event))
}

/// A provider webhook as received, and what became of it.
#[derive(Debug, Serialize, ToSchema)]
pub struct ProviderEvent {
    /// `pe_…`
    pub id: String,
    #[schema(example = "provider_event")]
    pub object: &'static str,
    /// `stripe` or `paypal`.
    pub provider: String,
    /// The provider's id (`evt_…`).
    pub provider_event_id: String,
    #[serde(rename = "type")]
    pub event_type: String,
    /// `received`, `processed`, `ignored`, `failed` or `dead`.
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    /// `webhook` or `reconcile`.
    pub source: String,
    /// The provider's timestamp (Unix seconds).
    pub provider_created: i64,
    pub received: i64,
    pub processed: Option<i64>,
    pub next_attempt: Option<i64>,
    /// The event exactly as the provider sent it.
    #[schema(value_type = Object)]
    pub payload: serde_json::Value,
}

impl From<ProviderEventRecord> for ProviderEvent {
    fn from(r: ProviderEventRecord) -> Self {
        let pending = matches!(r.status.as_str(), "received" | "failed");
        ProviderEvent {
            id: r.id,
            object: "provider_event",
            provider: r.provider,
            provider_event_id: r.provider_event_id,
            event_type: r.event_type,
            attempts: r.attempts,
            last_error: r.last_error,
            source: r.source,
            provider_created: r.provider_created,
            received: r.received_at,
            processed: r.processed_at,
            next_attempt: pending.then_some(r.next_attempt_at),
            payload: serde_json::from_str(&r.body).unwrap_or(serde_json::Value::Null),
            status: r.status,
        }
    }
}

list_query!(
    pub struct ProviderEventListQuery {
        /// `received`, `processed`, `ignored`, `failed` or `dead`.
        pub status: Option<String>,
    }
);

/// List provider events, newest first
#[utoipa::path(
    get,
    path = "/v1/provider-events",
    tag = "provider events",
    params(ProviderEventListQuery),
    responses((status = 200, body = ListResponse<ProviderEvent>)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_provider_events(
    State(state): State<AppState>,
    AdminKey(_caller): AdminKey,
    ApiQuery(query): ApiQuery<ProviderEventListQuery>,
) -> ApiResult<Json<ListResponse<ProviderEvent>>> {
    if let Some(s) = &query.status {
        if !["received", "processed", "ignored", "failed", "dead"].contains(&s.as_str()) {
            return Err(ApiError::invalid_param(
                "status",
                "status must be received, processed, ignored, failed or dead.",
            ));
        }
    }
    let listed = state.store.list_provider_events(&query.page()?, query.status.as_deref()).await?;
    Ok(Json(ListResponse::new("/v1/provider-events", listed, ProviderEvent::from)))
}

/// Retrieve a provider event
#[utoipa::path(
    get,
    path = "/v1/provider-events/{id}",
    tag = "provider events",
    params(("id" = String, Path, description = "pe_…")),
    responses((status = 200, body = ProviderEvent), (status = 404, body = super::error::ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_provider_event(
    State(state): State<AppState>,
    AdminKey(_caller): AdminKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ProviderEvent>> {
    let event = find(&state, &id).await?;
    Ok(Json(event.into()))
}

async fn find(state: &AppState, id: &str) -> ApiResult<ProviderEventRecord> {
    state.store.get_provider_event(id).await?.ok_or_else(|| ApiError::not_found("provider event", id))
}

/// Replay a provider event
///
/// Sends a dead, failed, ignored or processed event back to the workers to
/// be applied again now. Applying is idempotent: an event whose effects are
/// already in place changes nothing.
#[utoipa::path(
    post,
    path = "/v1/provider-events/{id}/replay",
    tag = "provider events",
    params(("id" = String, Path, description = "pe_…")),
    responses((status = 200, body = ProviderEvent), (status = 404, body = super::error::ErrorBody), (status = 409, body = super::error::ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn replay_provider_event(
    State(state): State<AppState>,
    AdminKey(caller): AdminKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<ProviderEvent>> {
    let existing = find(&state, &id).await?;
    if !state.store.replay_provider_event(&id, &caller.actor()).await? {
        return Err(ApiError::new(
            axum::http::StatusCode::CONFLICT,
            super::error::ErrorType::InvalidRequestError,
            "provider_event_pending",
            format!("Provider event {id} is {} and will be applied anyway.", existing.status),
        ));
    }
    state.inbox_wake.notify_one();
    let event = find(&state, &id).await?;
    Ok(Json(event.into()))
}
