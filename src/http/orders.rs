//! `/v1/orders`: one-time purchases and what became of them.

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::checkout::{fingerprint, idempotency_key};
use super::error::{current_request_id, ApiError, ApiResult, ErrorBody};
use super::extract::{list_query, text_filter, ApiJson, ApiPath, ApiQuery, Principal, ReadKey, WriteKey};
use super::subscriptions::provider_key;
use super::Json;
use super::{AppState, ListResponse};
use crate::ids::ExternalId;
use crate::providers::stripe::{objects, Form, StripeClientError};
use crate::store::orders::{OrderLineRow, OrderRow};
use crate::store::refunds::{NewRefund, RefundRefusal, RefundRequestRow, Reservation};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/orders", get(list_orders))
        .route("/v1/orders/{id}", get(get_order))
        .route("/v1/orders/{id}/refunds", post(create_refund))
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

/// Why the money is given back, as Stripe names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum RefundReason {
    Duplicate,
    Fraudulent,
    RequestedByCustomer,
}

impl RefundReason {
    fn as_str(self) -> &'static str {
        match self {
            RefundReason::Duplicate => "duplicate",
            RefundReason::Fraudulent => "fraudulent",
            RefundReason::RequestedByCustomer => "requested_by_customer",
        }
    }
}

/// A full or partial refund of an order.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateRefund {
    /// Integer minor units in the order's currency, at most what is left
    /// (paid − refunded − refunds in flight). Default: everything left.
    pub amount: Option<i64>,
    pub reason: Option<RefundReason>,
}

/// A refund tollgate asked the provider for.
#[derive(Debug, Serialize, ToSchema)]
pub struct Refund {
    /// `rfr_…`
    pub id: String,
    #[schema(example = "refund")]
    pub object: &'static str,
    /// The order refunded (`ord_…`).
    pub order: String,
    /// Integer minor units.
    pub amount: i64,
    pub currency: String,
    pub reason: Option<String>,
    /// The provider refund's status (`succeeded`, `pending`,
    /// `requires_action`, `failed`, `canceled`); `pending` too while the
    /// provider has not answered, `failed` when it refused.
    pub status: String,
    /// Why the provider refused it, when it did.
    pub failure_code: Option<String>,
    pub provider: String,
    pub provider_refund: Option<String>,
    pub created: i64,
}

impl From<RefundRequestRow> for Refund {
    fn from(r: RefundRequestRow) -> Self {
        let status = match (r.status.as_str(), r.refund_status) {
            ("submitted", Some(s)) => s,
            ("submitted", None) => "pending".to_owned(),
            (other, _) => other.to_owned(),
        };
        Refund {
            id: r.id,
            object: "refund",
            order: r.order_id,
            amount: r.amount,
            currency: r.currency,
            reason: r.reason,
            status,
            failure_code: r.failure_code,
            provider: r.provider,
            provider_refund: r.provider_refund_id,
            created: r.created_at,
        }
    }
}

fn refusal_error(refusal: RefundRefusal, order: &str) -> ApiError {
    match refusal {
        RefundRefusal::OrderMissing => ApiError::not_found("order", order),
        RefundRefusal::NotPaid { status } => ApiError::invalid(
            "order_not_paid",
            format!("Order '{order}' is {status}: only a paid order can be refunded."),
        ),
        RefundRefusal::NoPayment => ApiError::invalid(
            "order_not_paid",
            format!("Order '{order}' was free: no payment was taken, so there is nothing to refund."),
        ),
        RefundRefusal::AlreadyRefunded => {
            ApiError::invalid("order_already_refunded", format!("Order '{order}' has been refunded in full."))
        }
        RefundRefusal::Disputed { status } => ApiError::invalid(
            "order_disputed",
            format!("Order '{order}' is {status}: a disputed payment is settled through the dispute, not refunded."),
        ),
        RefundRefusal::AmountTooLarge { requested, remaining, paid, refunded, pending } => ApiError::invalid(
            "amount_too_large",
            format!(
                "Refund amount ({requested}) is greater than what is left to refund on order '{order}' ({remaining}: \
                 paid {paid}, refunded {refunded}, refunds in flight {pending})."
            ),
        )
        .with_param("amount"),
    }
}

/// A refund the provider refused for the order's state: a clear 400 rather
/// than the generic "provider rejected the request".
fn provider_refusal(err: &StripeClientError, order: &str) -> Option<ApiError> {
    let StripeClientError::Api { status: 400, code: Some(code), .. } = err else { return None };
    match code.as_str() {
        "charge_already_refunded" => Some(refusal_error(RefundRefusal::AlreadyRefunded, order)),
        "amount_too_large" => Some(
            ApiError::invalid(
                "amount_too_large",
                format!(
                    "The payment provider says the refund is greater than what is left on order '{order}'."
                ),
            )
            .with_param("amount"),
        ),
        "charge_disputed" => {
            Some(refusal_error(RefundRefusal::Disputed { status: "disputed".into() }, order))
        }
        _ => None,
    }
}

/// Requests whose caller never heard back (the provider was unreachable)
/// and that no webhook has named since would hold their amount forever:
/// ask the provider which of them it carried out, settle those and fail the
/// rest. Only requests older than any request can run are considered.
async fn resolve_stale_requests(state: &AppState, order_id: &str, principal: &Principal) -> ApiResult<()> {
    let cutoff = crate::store::now_unix() - state.request_timeout_seconds - 60;
    let stale = state.store.refund_requests_stale(order_id, cutoff).await?;
    if stale.is_empty() {
        return Ok(());
    }
    let Some((order, _)) = state.store.get_order(order_id).await? else { return Ok(()) };
    let Some(payment_key) = order.payment_key else { return Ok(()) };
    let by = if payment_key.starts_with("pi_") { "payment_intent" } else { "charge" };
    let listed = state.stripe.list_all("/v1/refunds", &[(by, payment_key.clone())]).await?;
    let policy = state.config.fulfilment_policy();
    let request_id = current_request_id();
    for request in stale {
        let found = listed
            .iter()
            .filter_map(|r| objects::refund(r).ok())
            .find(|r| r.request.as_deref() == Some(request.id.as_str()));
        match found {
            // Positioned at the refund's creation: newer news from its own
            // webhooks wins.
            Some(refund) => {
                state
                    .store
                    .settle_refund_request(
                        &request.id,
                        &refund,
                        refund.created,
                        &principal.actor(),
                        request_id.as_deref(),
                        &policy,
                    )
                    .await?
            }
            None => {
                state
                    .store
                    .fail_refund_request(&request.id, "abandoned", &principal.actor(), request_id.as_deref())
                    .await?
            }
        }
    }
    Ok(())
}

/// Refund an order, in full or in part
///
/// Never more than what is left: paid − refunded − refunds in flight (asked
/// for and not yet confirmed). The refund is recorded before the provider is
/// called, so concurrent requests cannot together refund more than was
/// paid. The order's refunded state and any revoked grants come from the
/// provider's answer, applied as its webhook would be.
#[utoipa::path(
    post,
    path = "/v1/orders/{id}/refunds",
    tag = "orders",
    params(("id" = String, Path, description = "`ord_…`")),
    request_body = CreateRefund,
    responses(
        (status = 200, body = Refund),
        (status = 400, description = "Not paid, already refunded, disputed, or more than is left", body = ErrorBody),
        (status = 404, description = "No such order", body = ErrorBody),
        (status = 503, description = "The payment provider is unavailable; retry with the same Idempotency-Key", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all, fields(order = %id))]
pub async fn create_refund(
    State(state): State<AppState>,
    WriteKey(principal): WriteKey,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CreateRefund>,
) -> ApiResult<Json<Refund>> {
    if let Some(amount) = body.amount.filter(|a| *a <= 0) {
        return Err(ApiError::invalid_param(
            "amount",
            format!("amount must be a positive integer in the order's minor units, not {amount}."),
        ));
    }
    resolve_stale_requests(&state, &id, &principal).await?;
    // The body is part of the key: a retry that asks for something else
    // (possible once the caller's key is forgotten) is another refund,
    // never answered with the first one's amount by tollgate or Stripe.
    let key = provider_key(&headers, &principal, "orders.refund", &format!("{id}\0{}", fingerprint(&body)));
    let legacy_key =
        idempotency_key(&headers).map(|_| provider_key(&headers, &principal, "orders.refund", &id));
    let request_id = current_request_id();
    let actor = principal.actor();
    let reservation = state
        .store
        .reserve_refund(NewRefund {
            order_id: &id,
            amount: body.amount,
            reason: body.reason.map(RefundReason::as_str),
            idempotency_key: &key,
            legacy_idempotency_key: legacy_key.as_deref(),
            keys_valid_since: crate::store::now_unix() - state.idempotency_ttl_seconds,
            actor: &actor,
            request_id: request_id.as_deref(),
        })
        .await?;
    let (request, payment_key) = match reservation {
        Reservation::Refused(refusal) => return Err(refusal_error(refusal, &id)),
        Reservation::Done(request) => return Ok(Json(request.into())),
        Reservation::Pending { request, payment_key } => (request, payment_key),
    };
    let by = if payment_key.starts_with("pi_") { "payment_intent" } else { "charge" };
    let form = Form::new()
        .set(by, &payment_key)
        .set("amount", request.amount)
        .set_opt("reason", request.reason.as_deref())
        .metadata([("tollgate_order_id", id.as_str()), ("tollgate_refund_request", request.id.as_str())]);
    let answer = match state.stripe.post_answer("/v1/refunds", &form, Some(request.provider_key())).await {
        Ok(answer) => answer,
        Err(err) => {
            // Refused, or never sent: the amount is free again. Anything else
            // (no answer, a 5xx) may have refunded: the request stays pending
            // until a retry, a webhook or a later request settles it.
            let settled_failure = match &err {
                StripeClientError::CircuitOpen { .. } => Some("not_sent".to_owned()),
                StripeClientError::Api { status, code, .. }
                    if (400..500).contains(status) && *status != 409 && *status != 429 =>
                {
                    Some(code.clone().unwrap_or_else(|| "provider_refused".to_owned()))
                }
                _ => None,
            };
            if let Some(code) = settled_failure {
                state.store.fail_refund_request(&request.id, &code, &actor, request_id.as_deref()).await?;
            }
            return Err(provider_refusal(&err, &id).unwrap_or_else(|| err.into()));
        }
    };
    // A replayed answer may be older than the refund's events since.
    let answer = match (answer.replayed, objects::id_of(&answer.object["id"])) {
        (true, Some(refund_id)) => state.stripe.get_answer(&format!("/v1/refunds/{refund_id}")).await?,
        _ => answer,
    };
    let refund = objects::refund(&answer.object).map_err(ApiError::internal)?;
    let policy = state.config.fulfilment_policy();
    state
        .store
        .settle_refund_request(
            &request.id,
            &refund,
            answer.date.unwrap_or_else(crate::store::now_unix),
            &actor,
            request_id.as_deref(),
            &policy,
        )
        .await?;
    let settled = state
        .store
        .refund_request(&request.id)
        .await?
        .ok_or_else(|| ApiError::internal(format!("refund request {} vanished", request.id)))?;
    Ok(Json(settled.into()))
}
