//! `/v1/webhook-endpoints` and `/v1/deliveries`: where the application
//! receives tollgate's events, and what became of each delivery (admin
//! scope: an endpoint and its secret decide who learns about payments).

use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{current_request_id, ApiError, ApiResult, ErrorBody, ErrorType};
use super::extract::{AdminKey, ApiJson, ApiPath, ApiQuery, ListParams};
use super::Json;
use super::{AppState, ListResponse};
use crate::delivery::{self, signing, TargetPolicy};
use crate::store::deliveries::{AttemptRecord, DeliveryRecord};
use crate::store::webhook_endpoints::{EndpointRecord, NewEndpoint};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/webhook-endpoints", post(create_webhook_endpoint).get(list_webhook_endpoints))
        .route("/v1/webhook-endpoints/{id}", get(get_webhook_endpoint).delete(delete_webhook_endpoint))
        .route("/v1/webhook-endpoints/{id}/rotate-secret", post(rotate_webhook_endpoint_secret))
        .route("/v1/webhook-endpoints/{id}/enable", post(enable_webhook_endpoint))
        .route("/v1/webhook-endpoints/{id}/deliveries", get(list_deliveries))
        .route("/v1/deliveries/{id}/retry", post(retry_delivery))
}

/// An application URL that receives events.
#[derive(Debug, Serialize, ToSchema)]
pub struct WebhookEndpoint {
    /// `we_…`
    pub id: String,
    #[schema(example = "webhook_endpoint")]
    pub object: &'static str,
    pub url: String,
    pub description: Option<String>,
    /// Event types sent to it; `["*"]` for all.
    pub events: Vec<String>,
    /// `enabled`, or `disabled` (it answered `410 Gone`).
    pub status: String,
    pub disabled_reason: Option<String>,
    /// The `[webhook_endpoints.<key>]` entry of the config file that
    /// manages it (its secret comes from the environment; it is changed or
    /// removed there, not by API); null when created by API.
    pub config_key: Option<String>,
    /// `whsec_…`: only in the responses that create or rotate it.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub secret: Option<String>,
    pub created: i64,
    pub updated: i64,
}

impl WebhookEndpoint {
    fn from_record(r: EndpointRecord, reveal: bool) -> Self {
        WebhookEndpoint {
            events: r.event_types(),
            secret: reveal.then(|| r.secret.clone()),
            id: r.id,
            object: "webhook_endpoint",
            url: r.url,
            description: r.description,
            status: r.status,
            disabled_reason: r.disabled_reason,
            config_key: r.config_key,
            created: r.created_at,
            updated: r.updated_at,
        }
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateWebhookEndpoint {
    /// Where to POST events. In production: https, on a public address.
    #[schema(example = "https://app.example.com/webhooks/tollgate")]
    pub url: String,
    /// Event types to send; `["*"]` (the default) for all.
    #[serde(default)]
    pub events: Option<Vec<String>>,
    pub description: Option<String>,
}

/// Create a webhook endpoint
///
/// The response carries the signing `secret`, shown this once.
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints",
    tag = "webhooks",
    request_body = CreateWebhookEndpoint,
    responses((status = 201, body = WebhookEndpoint), (status = 400, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn create_webhook_endpoint(
    State(state): State<AppState>,
    AdminKey(caller): AdminKey,
    ApiJson(body): ApiJson<CreateWebhookEndpoint>,
) -> ApiResult<(StatusCode, Json<WebhookEndpoint>)> {
    if body.url.len() > 2048 || body.url.chars().any(char::is_control) {
        return Err(ApiError::invalid_param("url", "url must be at most 2048 characters."));
    }
    let url = delivery::check_target(&body.url, TargetPolicy::from_config(&state.config))
        .await
        .map_err(|e| ApiError::invalid("url_invalid", format!("{e}.")).with_param("url"))?;
    let events = delivery::normalize_events(body.events).map_err(|e| ApiError::invalid_param("events", e))?;
    let description = super::extract::text_filter("description", body.description)?;
    let secret = signing::generate_secret();
    let request_id = current_request_id();
    let record = state
        .store
        .create_webhook_endpoint(
            NewEndpoint {
                url: url.as_str(),
                description: description.as_deref(),
                events: &events,
                secret: &secret,
            },
            &caller.actor(),
            request_id.as_deref(),
        )
        .await?;
    Ok((StatusCode::CREATED, Json(WebhookEndpoint::from_record(record, true))))
}

/// List webhook endpoints, newest first
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints",
    tag = "webhooks",
    params(ListParams),
    responses((status = 200, body = ListResponse<WebhookEndpoint>)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_webhook_endpoints(
    State(state): State<AppState>,
    AdminKey(_caller): AdminKey,
    ApiQuery(query): ApiQuery<ListParams>,
) -> ApiResult<Json<ListResponse<WebhookEndpoint>>> {
    let listed = state.store.list_webhook_endpoints(&query.page()?).await?;
    Ok(Json(ListResponse::new("/v1/webhook-endpoints", listed, |r| WebhookEndpoint::from_record(r, false))))
}

async fn find(state: &AppState, id: &str) -> ApiResult<EndpointRecord> {
    state.store.get_webhook_endpoint(id).await?.ok_or_else(|| ApiError::not_found("webhook endpoint", id))
}

/// Retrieve a webhook endpoint
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "we_…")),
    responses((status = 200, body = WebhookEndpoint), (status = 404, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_webhook_endpoint(
    State(state): State<AppState>,
    AdminKey(_caller): AdminKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<WebhookEndpoint>> {
    Ok(Json(WebhookEndpoint::from_record(find(&state, &id).await?, false)))
}

/// The answer to a deletion, as Stripe gives it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Deleted {
    pub id: String,
    #[schema(example = "webhook_endpoint")]
    pub object: &'static str,
    pub deleted: bool,
}

/// Delete a webhook endpoint
///
/// Nothing more is sent to it, including deliveries still pending; its
/// deliveries stay in the audit trail. An endpoint declared in the config
/// file is refused with 409 `endpoint_config_managed`: remove its
/// declaration and restart instead.
#[utoipa::path(
    delete,
    path = "/v1/webhook-endpoints/{id}",
    tag = "webhooks",
    params(("id" = String, Path, description = "we_…")),
    responses((status = 200, body = Deleted), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn delete_webhook_endpoint(
    State(state): State<AppState>,
    AdminKey(caller): AdminKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Deleted>> {
    refuse_config_managed(&find(&state, &id).await?, "deleted")?;
    let request_id = current_request_id();
    if !state.store.delete_webhook_endpoint(&id, &caller.actor(), request_id.as_deref()).await? {
        return Err(ApiError::not_found("webhook endpoint", &id));
    }
    Ok(Json(Deleted { id, object: "webhook_endpoint", deleted: true }))
}

/// Rotate a webhook endpoint's secret
///
/// The response carries the new `secret`, shown this once; the old one
/// stops signing at once. An endpoint declared in the config file takes its
/// secret from the environment: 409 `endpoint_config_managed`.
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints/{id}/rotate-secret",
    tag = "webhooks",
    params(("id" = String, Path, description = "we_…")),
    responses((status = 200, body = WebhookEndpoint), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn rotate_webhook_endpoint_secret(
    State(state): State<AppState>,
    AdminKey(caller): AdminKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<WebhookEndpoint>> {
    refuse_config_managed(&find(&state, &id).await?, "given a new secret")?;
    let secret = signing::generate_secret();
    let request_id = current_request_id();
    let record = state
        .store
        .rotate_webhook_endpoint_secret(&id, &secret, &caller.actor(), request_id.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id))?;
    Ok(Json(WebhookEndpoint::from_record(record, true)))
}

/// The config file owns what it declares; the API says where to change it.
fn refuse_config_managed(endpoint: &EndpointRecord, what: &str) -> ApiResult<()> {
    match &endpoint.config_key {
        None => Ok(()),
        Some(key) => Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequestError,
            "endpoint_config_managed",
            format!(
                "Webhook endpoint {} is declared in the config file ([webhook_endpoints.{key}]) and cannot be {what} \
                 by API; change the declaration and restart.",
                endpoint.id
            ),
        )),
    }
}

#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct EnableWebhookEndpoint {
    /// Also queue this endpoint's dead deliveries again (default false).
    #[serde(default)]
    pub retry_dead: bool,
}

/// The endpoint, and what enabling it set in motion.
#[derive(Debug, Serialize, ToSchema)]
pub struct EnabledWebhookEndpoint {
    #[serde(flatten)]
    pub endpoint: WebhookEndpoint,
    /// Dead deliveries queued again by `retry_dead`.
    pub requeued_dead_deliveries: u64,
}

/// Enable a webhook endpoint
///
/// Sends to an endpoint again after it was disabled (it answered `410
/// Gone`). Its deliveries still waiting, queued before it was disabled and
/// including the one it refused, become due now and go out in order per
/// customer. Events that happened while it was disabled were not queued for
/// it (`GET /v1/events` lists them). Deliveries do not die while their
/// endpoint is disabled; ones that died before can be queued again with
/// `retry_dead`. Enabling an enabled endpoint changes nothing. Works for
/// endpoints declared in the config file too.
#[utoipa::path(
    post,
    path = "/v1/webhook-endpoints/{id}/enable",
    tag = "webhooks",
    params(("id" = String, Path, description = "we_…")),
    request_body(content = Option<EnableWebhookEndpoint>, description = "Optional: an empty body enables only."),
    responses((status = 200, body = EnabledWebhookEndpoint), (status = 404, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn enable_webhook_endpoint(
    State(state): State<AppState>,
    AdminKey(caller): AdminKey,
    ApiPath(id): ApiPath<String>,
    ApiJson(options): ApiJson<EnableWebhookEndpoint>,
) -> ApiResult<Json<EnabledWebhookEndpoint>> {
    let request_id = current_request_id();
    let enabled = state
        .store
        .enable_webhook_endpoint(&id, options.retry_dead, &caller.actor(), request_id.as_deref())
        .await?
        .ok_or_else(|| ApiError::not_found("webhook endpoint", &id))?;
    Ok(Json(EnabledWebhookEndpoint {
        endpoint: WebhookEndpoint::from_record(enabled.endpoint, false),
        requeued_dead_deliveries: enabled.requeued_dead,
    }))
}

/// One event's delivery to one endpoint.
#[derive(Debug, Serialize, ToSchema)]
pub struct Delivery {
    /// `dlv_…`
    pub id: String,
    #[schema(example = "delivery")]
    pub object: &'static str,
    pub endpoint: String,
    /// `ev_…`: the `webhook-id` header of every attempt.
    pub event: String,
    pub event_type: String,
    /// `pending`, `succeeded`, `failed` (a retry is scheduled) or `dead`.
    pub status: String,
    pub attempts: i64,
    /// When the next attempt is due, while one is.
    pub next_attempt: Option<i64>,
    /// The last response's status code, if one came.
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created: i64,
    pub delivered: Option<i64>,
    /// Every attempt, first first.
    pub attempt_log: Vec<DeliveryAttempt>,
}

#[derive(Debug, Serialize, ToSchema)]
pub struct DeliveryAttempt {
    pub n: i64,
    pub at: i64,
    /// The response's status code; null when none came.
    pub status_code: Option<i64>,
    pub duration_ms: i64,
    pub error: Option<String>,
    /// The start of the response body.
    pub response: Option<String>,
}

impl Delivery {
    fn new(r: DeliveryRecord, attempts: Vec<AttemptRecord>) -> Self {
        let pending = matches!(r.status.as_str(), "pending" | "failed");
        Delivery {
            id: r.id,
            object: "delivery",
            endpoint: r.endpoint_id,
            event: r.event_id,
            event_type: r.event_type,
            status: r.status,
            attempts: r.attempts,
            next_attempt: pending.then_some(r.next_attempt_at),
            last_status: r.last_status,
            last_error: r.last_error,
            created: r.created_at,
            delivered: r.delivered_at,
            attempt_log: attempts
                .into_iter()
                .map(|a| DeliveryAttempt {
                    n: a.n,
                    at: a.at,
                    status_code: a.status_code,
                    duration_ms: a.duration_ms,
                    error: a.error,
                    response: a.response,
                })
                .collect(),
        }
    }
}

/// List an endpoint's deliveries, newest first, each with its attempts
#[utoipa::path(
    get,
    path = "/v1/webhook-endpoints/{id}/deliveries",
    tag = "webhooks",
    params(("id" = String, Path, description = "we_…"), ListParams),
    responses((status = 200, body = ListResponse<Delivery>), (status = 404, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_deliveries(
    State(state): State<AppState>,
    AdminKey(_caller): AdminKey,
    ApiPath(id): ApiPath<String>,
    ApiQuery(query): ApiQuery<ListParams>,
) -> ApiResult<Json<ListResponse<Delivery>>> {
    let page = query.page()?;
    find(&state, &id).await?;
    let listed = state.store.list_deliveries(&id, &page).await?;
    let mut data = Vec::with_capacity(listed.data.len());
    for d in listed.data {
        let attempts = state.store.delivery_attempts(&d.id).await?;
        data.push(Delivery::new(d, attempts));
    }
    Ok(Json(ListResponse {
        object: "list",
        data,
        has_more: listed.has_more,
        url: "/v1/webhook-endpoints/{id}/deliveries",
    }))
}

/// Retry a delivery
///
/// A dead or failed delivery is sent again now. A dead one gets one more
/// attempt; if that fails too it is dead again.
#[utoipa::path(
    post,
    path = "/v1/deliveries/{id}/retry",
    tag = "webhooks",
    params(("id" = String, Path, description = "dlv_…")),
    responses((status = 200, body = Delivery), (status = 404, body = ErrorBody), (status = 409, body = ErrorBody)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn retry_delivery(
    State(state): State<AppState>,
    AdminKey(caller): AdminKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Delivery>> {
    let existing =
        state.store.get_delivery(&id).await?.ok_or_else(|| ApiError::not_found("delivery", &id))?;
    let request_id = current_request_id();
    if !state.store.retry_delivery(&id, &caller.actor(), request_id.as_deref()).await? {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            ErrorType::InvalidRequestError,
            "delivery_not_retryable",
            format!("Delivery {id} is {}; only dead or failed deliveries can be retried.", existing.status),
        ));
    }
    let record = state.store.get_delivery(&id).await?.ok_or_else(|| ApiError::not_found("delivery", &id))?;
    let attempts = state.store.delivery_attempts(&id).await?;
    Ok(Json(Delivery::new(record, attempts)))
}
