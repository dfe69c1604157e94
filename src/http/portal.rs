//! `/v1/portal/sessions`: a link to the provider's customer portal, where a
//! customer manages their subscription and payment methods. Nothing is
//! recorded: what the customer does there reaches tollgate by webhook.

use axum::http::{HeaderMap, StatusCode};
use axum::routing::post;
use axum::{extract::State, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::checkout::{customer_param, fingerprint, idempotency_key, url_param, PROVIDER};
use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiJson, WriteKey};
use super::AppState;
use super::Json;
use crate::providers::stripe::{derived_idempotency_key, Form};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/portal/sessions", post(create_portal_session))
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreatePortalSession {
    /// The application's id of the customer.
    #[schema(example = "user_42")]
    pub customer: String,
    /// Where the portal's "back" link goes; default `PAYMENTSVC_RETURN_URL`.
    pub return_url: Option<String>,
}

/// A short-lived link to the provider's customer portal.
#[derive(Debug, Serialize, ToSchema)]
pub struct PortalSession {
    /// The provider's id (`bps_…`).
    pub id: String,
    #[schema(example = "portal.session")]
    pub object: &'static str,
    /// The application's id of the customer.
    pub customer: String,
    /// Send the customer here.
    pub url: String,
    pub return_url: String,
    pub provider: &'static str,
    pub created: Option<i64>,
}

/// Create a customer portal session
///
/// The customer must have an account at the provider, which their first
/// checkout creates.
#[utoipa::path(
    post,
    path = "/v1/portal/sessions",
    tag = "checkout",
    request_body = CreatePortalSession,
    responses(
        (status = 201, body = PortalSession),
        (status = 400, description = "Bad input, or the customer has no account at the provider yet", body = ErrorBody),
        (status = 404, description = "No such customer", body = ErrorBody),
        (status = 503, description = "The provider is failing (`provider_error`, with Retry-After)", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn create_portal_session(
    State(state): State<AppState>,
    WriteKey(caller): WriteKey,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreatePortalSession>,
) -> ApiResult<(StatusCode, Json<PortalSession>)> {
    let customer = customer_param(&state, &body.customer).await?;
    let return_url = url_param("return_url", body.return_url.as_deref(), state.config.return_url.as_deref())?
        .ok_or_else(|| {
            ApiError::invalid(
                "return_url_missing",
                "Pass return_url, or configure a default with PAYMENTSVC_RETURN_URL.",
            )
            .with_param("return_url")
        })?;
    let Some(provider_customer) = customer.providers.get(PROVIDER) else {
        return Err(ApiError::invalid(
            "customer_not_at_provider",
            format!(
                "The customer '{}' has no account at the payment provider yet; it is created by their first checkout.",
                customer.external_id
            ),
        )
        .with_param("customer"));
    };
    let form = Form::new().set("customer", provider_customer).set("return_url", &return_url);
    // A retry of this request (same key and body) gets the same session.
    let key = idempotency_key(&headers)
        .map(|k| derived_idempotency_key(&["portal", caller.key_id(), &k, &fingerprint(&body)]));
    let session = state.stripe.post("/v1/billing_portal/sessions", &form, key.as_deref()).await?;
    let text = |field: &str| {
        session[field]
            .as_str()
            .map(str::to_owned)
            .ok_or_else(|| ApiError::internal(format!("the provider's portal session has no {field}")))
    };
    Ok((
        StatusCode::CREATED,
        Json(PortalSession {
            id: text("id")?,
            object: "portal.session",
            customer: customer.external_id,
            url: text("url")?,
            return_url,
            provider: PROVIDER,
            created: session["created"].as_i64(),
        }),
    ))
}
