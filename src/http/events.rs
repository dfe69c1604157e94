//! `/v1/events`: tollgate's canonical events, the same ones its webhooks
//! deliver, so an application can catch up on what it missed.

use axum::routing::get;
use axum::{extract::State, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{list_query, text_filter, ApiPath, ApiQuery, ReadKey};
use super::Json;
use super::{AppState, ListResponse};
use crate::ids::ExternalId;
use crate::store::events::EventRecord;

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/events", get(list_events)).route("/v1/events/{id}", get(get_event))
}

/// Something that happened, as the application's webhooks announce it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Event {
    /// `ev_…`; also the `webhook-id` of its deliveries.
    pub id: String,
    #[schema(example = "event")]
    pub object: &'static str,
    #[serde(rename = "type")]
    #[schema(example = "order.paid")]
    pub event_type: String,
    /// Unix seconds.
    pub created: i64,
    /// The customer's `external_id`, if the event is about one.
    pub customer: Option<String>,
    pub related_object: RelatedObject,
    /// The inbox id (`pe_…`) of the provider event that caused it.
    pub provider_event: Option<String>,
    /// The object as it was when the event happened.
    #[schema(value_type = Object)]
    pub data: serde_json::Value,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct RelatedObject {
    /// `order`, `subscription`, `invoice`, `checkout_session`, …
    #[serde(rename = "type")]
    pub object_type: String,
    pub id: String,
}

impl From<EventRecord> for Event {
    fn from(r: EventRecord) -> Self {
        Event {
            id: r.id,
            object: "event",
            event_type: r.event_type,
            created: r.created_at,
            customer: r.customer_external_id,
            related_object: RelatedObject { object_type: r.object_type, id: r.object_id },
            provider_event: r.provider_event_id,
            data: serde_json::from_str(&r.data).unwrap_or(serde_json::Value::Null),
        }
    }
}

list_query!(
    pub struct EventListQuery {
        /// Only events of this type, e.g. `order.paid`.
        #[serde(rename = "type")]
        #[param(rename = "type")]
        pub event_type: Option<String>,
        /// Only events about this customer (its `external_id`).
        pub customer: Option<String>,
    }
);

/// List events, newest first
#[utoipa::path(
    get,
    path = "/v1/events",
    tag = "events",
    params(EventListQuery),
    responses((status = 200, body = ListResponse<Event>), (status = 400, body = super::error::ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_events(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiQuery(query): ApiQuery<EventListQuery>,
) -> ApiResult<Json<ListResponse<Event>>> {
    let page = query.page()?;
    let event_type = text_filter("type", query.event_type)?;
    if let Some(t) = &event_type {
        if !crate::delivery::EVENT_TYPES.contains(&t.as_str()) {
            return Err(ApiError::invalid_param("type", format!("Unknown event type '{t}'.")));
        }
    }
    let customer_id = match &query.customer {
        None => None,
        Some(raw) => {
            let external = ExternalId::parse(raw).map_err(|e| ApiError::invalid_param("customer", e.0))?;
            match state.store.get_customer(&external).await? {
                Some(c) => Some(c.id),
                // No such customer: no events, rather than an error, as
                // for any filter that matches nothing.
                None => {
                    return Ok(Json(ListResponse::new(
                        "/v1/events",
                        page.finish(Vec::<EventRecord>::new()),
                        Event::from,
                    )))
                }
            }
        }
    };
    let listed = state.store.list_events(&page, event_type.as_deref(), customer_id.as_deref()).await?;
    Ok(Json(ListResponse::new("/v1/events", listed, Event::from)))
}

/// Retrieve an event
#[utoipa::path(
    get,
    path = "/v1/events/{id}",
    tag = "events",
    params(("id" = String, Path, description = "ev_…")),
    responses((status = 200, body = Event), (status = 404, body = super::error::ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_event(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Event>> {
    let event = state.store.get_event(&id).await?.ok_or_else(|| ApiError::not_found("event", &id))?;
    Ok(Json(event.into()))
}
