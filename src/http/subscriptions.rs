//! `/v1/subscriptions`: the mirror of the providers' subscriptions.

use axum::routing::get;
use axum::{extract::State, Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{list_query, ApiPath, ApiQuery, ReadKey};
use super::orders::customer_filter;
use super::{AppState, ListResponse};
use crate::store::subscriptions::SubscriptionRow;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/subscriptions", get(list_subscriptions))
        .route("/subscriptions/{id}", get(get_subscription))
}

/// One priced item of a subscription.
#[derive(Debug, Serialize, ToSchema)]
pub struct SubscriptionItem {
    /// The catalog price, when the provider's price is in the catalog.
    pub price: Option<String>,
    pub product: Option<String>,
    pub provider_price: Option<String>,
    pub quantity: i64,
}

/// A subscription as the provider last reported it.
#[derive(Debug, Serialize, ToSchema)]
pub struct Subscription {
    /// `sub_…` (tollgate's id).
    pub id: String,
    #[schema(example = "subscription")]
    pub object: &'static str,
    /// tollgate's customer id (`cust_…`).
    pub customer: String,
    /// `incomplete`, `incomplete_expired`, `trialing`, `active`, `past_due`,
    /// `unpaid`, `paused` or `canceled`.
    pub status: String,
    /// The first item's catalog price and quantity.
    pub price: Option<String>,
    pub quantity: i64,
    pub items: Vec<SubscriptionItem>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<i64>,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub trial_start: Option<i64>,
    pub trial_end: Option<i64>,
    /// When payment started failing (the grace period counts from here).
    pub past_due_since: Option<i64>,
    pub provider: String,
    pub provider_subscription: String,
    pub created: i64,
    pub updated: i64,
}

impl From<SubscriptionRow> for Subscription {
    fn from(r: SubscriptionRow) -> Self {
        let items: Vec<serde_json::Value> = serde_json::from_str(&r.items).unwrap_or_default();
        Subscription {
            id: r.id,
            object: "subscription",
            customer: r.customer_id,
            status: r.status,
            price: r.price_id,
            quantity: r.quantity,
            items: items
                .iter()
                .map(|i| SubscriptionItem {
                    price: i["price"].as_str().map(str::to_owned),
                    product: i["product"].as_str().map(str::to_owned),
                    provider_price: i["provider_price"].as_str().map(str::to_owned),
                    quantity: i["quantity"].as_i64().unwrap_or(1),
                })
                .collect(),
            current_period_start: r.current_period_start,
            current_period_end: r.current_period_end,
            cancel_at_period_end: r.cancel_at_period_end,
            cancel_at: r.cancel_at,
            canceled_at: r.canceled_at,
            ended_at: r.ended_at,
            trial_start: r.trial_start,
            trial_end: r.trial_end,
            past_due_since: r.past_due_since,
            provider: r.provider,
            provider_subscription: r.provider_subscription_id,
            created: r.created_at,
            updated: r.updated_at,
        }
    }
}

list_query!(
    pub struct SubscriptionListQuery {
        /// Only this customer's subscriptions (the application's id).
        pub customer: Option<String>,
    }
);

/// List subscriptions, newest first
#[utoipa::path(
    get,
    path = "/v1/subscriptions",
    tag = "subscriptions",
    params(SubscriptionListQuery),
    responses(
        (status = 200, body = ListResponse<Subscription>),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_subscriptions(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiQuery(query): ApiQuery<SubscriptionListQuery>,
) -> ApiResult<Json<ListResponse<Subscription>>> {
    let page = query.page()?;
    let customer = customer_filter(&state, query.customer).await?;
    let listed = state.store.list_subscriptions(&page, customer.as_deref()).await?;
    Ok(Json(ListResponse::new("/v1/subscriptions", listed, Subscription::from)))
}

/// Retrieve a subscription
#[utoipa::path(
    get,
    path = "/v1/subscriptions/{id}",
    tag = "subscriptions",
    params(("id" = String, Path, description = "`sub_…` (tollgate's id)")),
    responses(
        (status = 200, body = Subscription),
        (status = 404, description = "No such subscription", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_subscription(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Subscription>> {
    let sub =
        state.store.get_subscription(&id).await?.ok_or_else(|| ApiError::not_found("subscription", &id))?;
    Ok(Json(sub.into()))
}
