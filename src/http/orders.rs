//! `/v1/orders`: one-time purchases and what became of them.

use axum::routing::get;
use axum::{extract::State, Json, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{list_query, text_filter, ApiPath, ApiQuery, ReadKey};
use super::{AppState, ListResponse};
use crate::ids::ExternalId;
use crate::store::orders::{OrderLineRow, OrderRow};

pub fn router() -> Router<AppState> {
    Router::new().route("/orders", get(list_orders)).route("/orders/{id}", get(get_order))
}

/// One line of an order.
#[derive(Debug, Serialize, ToSchema)]
pub struct OrderLine {
    pub line: i64,
    /// The catalog price, when the provider's price is in the catalog.
    pub price: Option<String>,
    pub product: Option<String>,
    pub provider_price: Option<String>,
    pub description: Option<String>,
    pub quantity: i64,
    /// Integer minor units.
    pub unit_amount: i64,
    pub amount_total: i64,
}

/// A one-time purchase.
#[derive(Debug, Serialize, ToSchema)]
pub struct Order {
    /// `ord_…`
    pub id: String,
    #[schema(example = "order")]
    pub object: &'static str,
    /// tollgate's customer id (`cust_…`).
    pub customer: String,
    /// `pending`, `paid`, `fulfilled`, `partially_refunded`, `refunded`,
    /// `disputed`, `dispute_lost`, `dispute_won`, `canceled` or `payment_failed`.
    pub status: String,
    pub currency: String,
    /// Integer minor units.
    pub amount_total: i64,
    pub amount_refunded: i64,
    pub lines: Vec<OrderLine>,
    pub provider: String,
    pub provider_checkout_session: Option<String>,
    /// The provider's payment (payment intent, or charge for old payments).
    pub provider_payment: Option<String>,
    pub paid_at: Option<i64>,
    pub created: i64,
    pub updated: i64,
}

impl Order {
    fn new(order: OrderRow, lines: Vec<OrderLineRow>) -> Self {
        Order {
            id: order.id,
            object: "order",
            customer: order.customer_id,
            status: order.status,
            currency: order.currency,
            amount_total: order.amount_total,
            amount_refunded: order.amount_refunded,
            lines: lines
                .into_iter()
                .map(|l| OrderLine {
                    line: l.line_no,
                    price: l.price_id,
                    product: l.product_id,
                    provider_price: l.provider_price_id,
                    description: l.description,
                    quantity: l.quantity,
                    unit_amount: l.unit_amount,
                    amount_total: l.amount_total,
                })
                .collect(),
            provider: order.provider,
            provider_checkout_session: order.provider_checkout_session_id,
            provider_payment: order.payment_key,
            paid_at: order.paid_at,
            created: order.created_at,
            updated: order.updated_at,
        }
    }
}

/// The tollgate customer id behind an application's id, for list filters.
pub(super) async fn customer_filter(state: &AppState, external: Option<String>) -> ApiResult<Option<String>> {
    let Some(raw) = text_filter("customer", external)? else { return Ok(None) };
    let external = ExternalId::parse(&raw).map_err(|e| ApiError::invalid_param("customer", e.0))?;
    let customer = state
        .store
        .get_customer(&external)
        .await?
        .ok_or_else(|| ApiError::not_found("customer", external.as_str()).with_param("customer"))?;
    Ok(Some(customer.id))
}

list_query!(
    pub struct OrderListQuery {
        /// Only this customer's orders (the application's id).
        pub customer: Option<String>,
    }
);

/// List orders, newest first
#[utoipa::path(
    get,
    path = "/v1/orders",
    tag = "orders",
    params(OrderListQuery),
    responses(
        (status = 200, body = ListResponse<Order>),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_orders(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiQuery(query): ApiQuery<OrderListQuery>,
) -> ApiResult<Json<ListResponse<Order>>> {
    let page = query.page()?;
    let customer = customer_filter(&state, query.customer).await?;
    let listed = state.store.list_orders(&page, customer.as_deref()).await?;
    Ok(Json(ListResponse::new("/v1/orders", listed, |(o, l)| Order::new(o, l))))
}

/// Retrieve an order
#[utoipa::path(
    get,
    path = "/v1/orders/{id}",
    tag = "orders",
    params(("id" = String, Path, description = "`ord_…`")),
    responses(
        (status = 200, body = Order),
        (status = 404, description = "No such order", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_order(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<Order>> {
    let (order, lines) =
        state.store.get_order(&id).await?.ok_or_else(|| ApiError::not_found("order", &id))?;
    Ok(Json(Order::new(order, lines)))
}
