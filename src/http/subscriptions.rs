//! `/v1/subscriptions`: the mirror of the providers' subscriptions.

use axum::http::HeaderMap;
use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::{Deserialize, Serialize};
use serde_json::{json, Value};
use utoipa::ToSchema;

use super::error::{current_request_id, ApiError, ApiResult, ErrorBody};
use super::extract::{list_query, ApiJson, ApiPath, ApiQuery, Principal, ReadKey, WriteKey};
use super::orders::customer_filter;
use super::Json;
use super::{AppState, ListResponse};
use crate::providers::stripe::{derived_idempotency_key, objects, Answer, Form};
use crate::store::subscriptions::{Answered, SubscriptionRow};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/subscriptions", get(list_subscriptions))
        .route("/v1/subscriptions/{id}", get(get_subscription))
        .route("/v1/subscriptions/{id}/change", post(change_subscription))
        .route("/v1/subscriptions/{id}/cancel", post(cancel_subscription))
        .route("/v1/subscriptions/{id}/resume", post(resume_subscription))
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

/// The Idempotency-Key for the provider call behind this request. Derived
/// from the caller's own Idempotency-Key when it sent one, so that its retry
/// (after tollgate's first answer was lost or was a 5xx, which is not
/// stored for replay) reaches the provider as the same request and cannot
/// act twice; otherwise from this request's id, each request its own.
pub(super) fn provider_key(
    headers: &HeaderMap,
    principal: &Principal,
    operation: &str,
    object: &str,
) -> String {
    let theirs = headers.get("idempotency-key").and_then(|v| v.to_str().ok());
    match theirs {
        Some(key) => derived_idempotency_key(&[operation, principal.key_id(), key, object]),
        None => {
            let request = current_request_id().unwrap_or_else(|| crate::ids::new_id("req"));
            derived_idempotency_key(&[operation, &request, object])
        }
    }
}

/// How a change is billed for the rest of the current period (Stripe's
/// `proration_behavior`).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Proration {
    /// Credit the unused time, charge the new price's remaining time on the
    /// next invoice.
    #[default]
    CreateProrations,
    /// No adjustment: the new price applies from the next period's invoice.
    None,
    /// As `create_prorations`, invoiced and charged now.
    AlwaysInvoice,
}

impl Proration {
    fn as_str(self) -> &'static str {
        match self {
            Proration::CreateProrations => "create_prorations",
            Proration::None => "none",
            Proration::AlwaysInvoice => "always_invoice",
        }
    }
}

/// An upgrade, downgrade or quantity change of a subscription's item.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangeSubscription {
    /// The catalog price to move to: recurring, in the subscription's
    /// currency, synced to the provider. Default: the current price.
    pub price: Option<String>,
    /// 1 to 999999. Default: the current quantity.
    pub quantity: Option<i64>,
    #[serde(default)]
    pub proration: Proration,
}

/// Cancel now, or at the end of the current period.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelSubscription {
    /// `true`: keep it until the period ends (undo with `resume`);
    /// `false` (the default): end it now.
    #[serde(default)]
    pub at_period_end: bool,
}

/// `resume` takes no parameters.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct ResumeSubscription {}

fn is_ended(status: &str) -> bool {
    matches!(status, "canceled" | "incomplete_expired")
}

fn ended_error(id: &str) -> ApiError {
    ApiError::invalid(
        "subscription_canceled",
        format!("Subscription '{id}' has ended; a canceled subscription cannot be changed. Start a new one through checkout."),
    )
}

/// The subscription as tollgate has it and as the provider has it now:
/// requests are checked against the provider's truth, not only the mirror,
/// which may be a webhook behind.
async fn load(state: &AppState, id: &str) -> ApiResult<(SubscriptionRow, Value)> {
    let sub =
        state.store.get_subscription(id).await?.ok_or_else(|| ApiError::not_found("subscription", id))?;
    if sub.provider != "stripe" {
        return Err(ApiError::invalid(
            "provider_unsupported",
            format!("Subscription '{id}' is billed by {}, which tollgate cannot change yet.", sub.provider),
        ));
    }
    if is_ended(&sub.status) {
        return Err(ended_error(id));
    }
    let current = state.stripe.get(&provider_path(&sub), &[]).await?;
    if current["status"].as_str().is_some_and(is_ended) {
        return Err(ended_error(id));
    }
    Ok((sub, current))
}

fn provider_path(sub: &SubscriptionRow) -> String {
    format!("/v1/subscriptions/{}", sub.provider_subscription_id)
}

/// Applies the provider's answer as tollgate's new state (never anything
/// tollgate assumed): through the webhook's code path and watermark. A
/// replayed answer (the provider's stored answer to the same key) may be
/// older than events since, so the current object is read instead.
async fn apply_answer(
    state: &AppState,
    principal: &Principal,
    sub: &SubscriptionRow,
    answer: Answer,
    action: &str,
    asked: Value,
) -> ApiResult<Json<Subscription>> {
    let answer = if answer.replayed { state.stripe.get_answer(&provider_path(sub)).await? } else { answer };
    let object = objects::subscription(&answer.object).map_err(ApiError::internal)?;
    let request_id = current_request_id();
    let policy = state.config.fulfilment_policy();
    let answered = Answered {
        subscription_id: &sub.id,
        action,
        asked: &asked,
        at: answer.date.unwrap_or_else(crate::store::now_unix),
        actor: &principal.actor(),
        request_id: request_id.as_deref(),
        policy: &policy,
    };
    let row = state
        .store
        .apply_subscription_answer(&object, answered)
        .await?
        .ok_or_else(|| ApiError::internal(format!("subscription {} vanished", sub.id)))?;
    Ok(Json(row.into()))
}

/// Change a subscription's price or quantity
///
/// Upgrades, downgrades and quantity changes of the subscription's item,
/// prorated as asked. tollgate's state changes only from the provider's
/// answer (and its webhooks): the response is the subscription as tollgate
/// reports it once the provider confirmed.
#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}/change",
    tag = "subscriptions",
    params(("id" = String, Path, description = "`sub_…` (tollgate's id)")),
    request_body = ChangeSubscription,
    responses(
        (status = 200, body = Subscription),
        (status = 400, description = "Invalid change, or the subscription has ended", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "The payment provider is unavailable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all, fields(subscription = %id))]
pub async fn change_subscription(
    State(state): State<AppState>,
    WriteKey(principal): WriteKey,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<ChangeSubscription>,
) -> ApiResult<Json<Subscription>> {
    if body.price.is_none() && body.quantity.is_none() {
        return Err(ApiError::invalid("parameter_missing", "Pass the new price, the new quantity, or both."));
    }
    if let Some(q) = body.quantity.filter(|q| !(1..=999_999).contains(q)) {
        return Err(ApiError::invalid_param(
            "quantity",
            format!("quantity must be between 1 and 999999, not {q}."),
        ));
    }
    if let Some(p) =
        body.price.as_deref().filter(|p| p.is_empty() || p.len() > 255 || p.chars().any(char::is_control))
    {
        return Err(ApiError::invalid_param(
            "price",
            format!("price must be a catalog price id, not '{}'.", p.escape_debug()),
        ));
    }
    let (sub, current) = load(&state, &id).await?;
    let items = current["items"]["data"].as_array().map(Vec::as_slice).unwrap_or_default();
    let [item] = items else {
        return Err(ApiError::invalid(
            "subscription_items_unsupported",
            format!(
                "Subscription '{id}' has {} items; tollgate changes subscriptions of one item.",
                items.len()
            ),
        ));
    };
    let item_id = item["id"].as_str().ok_or_else(|| ApiError::internal("subscription item without id"))?;
    let provider_price = match &body.price {
        Some(price) => {
            let found = state.store.price_for_change(price, "stripe").await?.ok_or_else(|| {
                ApiError::invalid("resource_missing", format!("No such price: '{price}'")).with_param("price")
            })?;
            if !found.recurring {
                return Err(ApiError::invalid_param(
                    "price",
                    format!(
                        "Price '{price}' is one-time; a subscription can only move to a recurring price."
                    ),
                ));
            }
            if !found.active {
                return Err(ApiError::invalid_param("price", format!("Price '{price}' is no longer sold.")));
            }
            let currency = current["currency"]
                .as_str()
                .or(item["price"]["currency"].as_str())
                .unwrap_or_default()
                .to_ascii_lowercase();
            if found.currency != currency {
                return Err(ApiError::invalid_param(
                    "price",
                    format!(
                        "Price '{price}' is in {}, the subscription in {currency}; a subscription keeps its currency.",
                        found.currency
                    ),
                ));
            }
            found.provider_price.ok_or_else(|| {
                ApiError::invalid(
                    "price_not_synced",
                    format!(
                        "Price '{price}' is not yet at the payment provider; run `tollgate catalog sync`."
                    ),
                )
                .with_param("price")
            })?
        }
        None => objects::id_of(&item["price"])
            .map(str::to_owned)
            .ok_or_else(|| ApiError::internal("subscription item without price"))?,
    };
    let quantity = body.quantity.or(item["quantity"].as_i64()).unwrap_or(1);
    let form = Form::new()
        .set("items[0][id]", item_id)
        .set("items[0][price]", &provider_price)
        .set("items[0][quantity]", quantity)
        .set("proration_behavior", body.proration.as_str());
    let key = provider_key(&headers, &principal, "subscriptions.change", &sub.id);
    let answer = state.stripe.post_answer(&provider_path(&sub), &form, Some(&key)).await?;
    let asked = json!({ "price": body.price, "provider_price": provider_price, "quantity": quantity, "proration": body.proration });
    apply_answer(&state, &principal, &sub, answer, "subscription.change", asked).await
}

/// Cancel a subscription, now or at the end of its period
///
/// Cancelling one that has ended is a 400, except for a request with an
/// `Idempotency-Key` whose cancellation already holds (a retry of a cancel
/// whose answer was lost), which is answered with the subscription.
#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}/cancel",
    tag = "subscriptions",
    params(("id" = String, Path, description = "`sub_…` (tollgate's id)")),
    request_body = CancelSubscription,
    responses(
        (status = 200, body = Subscription),
        (status = 400, description = "The subscription has already ended", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "The payment provider is unavailable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all, fields(subscription = %id))]
pub async fn cancel_subscription(
    State(state): State<AppState>,
    WriteKey(principal): WriteKey,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(body): ApiJson<CancelSubscription>,
) -> ApiResult<Json<Subscription>> {
    let asked = json!({ "at_period_end": body.at_period_end });
    // A retry (same Idempotency-Key) whose first attempt reached Stripe but
    // lost its answer finds the work done: it answers the state, as the
    // first attempt would have, instead of a 400.
    let retrying = headers.contains_key("idempotency-key");
    let (sub, current) = match load(&state, &id).await {
        Err(e) if retrying && !body.at_period_end && e.code == "subscription_canceled" => {
            let sub = state
                .store
                .get_subscription(&id)
                .await?
                .ok_or_else(|| ApiError::not_found("subscription", &id))?;
            let answer = state.stripe.get_answer(&provider_path(&sub)).await?;
            return apply_answer(&state, &principal, &sub, answer, "subscription.cancel", asked).await;
        }
        loaded => loaded?,
    };
    if retrying && body.at_period_end && current["cancel_at_period_end"] == true {
        let answer = state.stripe.get_answer(&provider_path(&sub)).await?;
        return apply_answer(&state, &principal, &sub, answer, "subscription.cancel", asked).await;
    }
    let key = provider_key(&headers, &principal, "subscriptions.cancel", &sub.id);
    let answer = if body.at_period_end {
        let form = Form::new().set("cancel_at_period_end", "true");
        state.stripe.post_answer(&provider_path(&sub), &form, Some(&key)).await?
    } else {
        state.stripe.delete_answer(&provider_path(&sub), &key).await?
    };
    apply_answer(&state, &principal, &sub, answer, "subscription.cancel", asked).await
}

/// Resume a subscription
///
/// Undoes what can be undone: a cancellation pending at the period's end is
/// withdrawn (`cancel_at_period_end` becomes false), and a paused
/// subscription is resumed (Stripe's resume). A subscription that is neither
/// has nothing to resume (400), except for a request with an
/// `Idempotency-Key`, which is answered with the subscription as it is (a
/// retry of a resume whose answer was lost must not fail); one that has
/// ended cannot be resumed (400): start a new one.
#[utoipa::path(
    post,
    path = "/v1/subscriptions/{id}/resume",
    tag = "subscriptions",
    params(("id" = String, Path, description = "`sub_…` (tollgate's id)")),
    request_body = ResumeSubscription,
    responses(
        (status = 200, body = Subscription),
        (status = 400, description = "Nothing to resume, or the subscription has ended", body = ErrorBody),
        (status = 404, description = "No such subscription", body = ErrorBody),
        (status = 503, description = "The payment provider is unavailable", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all, fields(subscription = %id))]
pub async fn resume_subscription(
    State(state): State<AppState>,
    WriteKey(principal): WriteKey,
    headers: HeaderMap,
    ApiPath(id): ApiPath<String>,
    ApiJson(_body): ApiJson<ResumeSubscription>,
) -> ApiResult<Json<Subscription>> {
    let (sub, current) = load(&state, &id).await?;
    let key = provider_key(&headers, &principal, "subscriptions.resume", &sub.id);
    let (answer, undid) = if current["status"] == "paused" {
        let path = format!("{}/resume", provider_path(&sub));
        (state.stripe.post_answer(&path, &Form::new(), Some(&key)).await?, "pause")
    } else if current["cancel_at_period_end"] == true {
        let form = Form::new().set("cancel_at_period_end", "false");
        (state.stripe.post_answer(&provider_path(&sub), &form, Some(&key)).await?, "cancel_at_period_end")
    } else if headers.contains_key("idempotency-key") {
        // A retry whose first attempt resumed it but lost the answer: the
        // work is done; answer the state.
        let answer = state.stripe.get_answer(&provider_path(&sub)).await?;
        return apply_answer(
            &state,
            &principal,
            &sub,
            answer,
            "subscription.resume",
            json!({ "undid": null }),
        )
        .await;
    } else {
        return Err(ApiError::invalid(
            "subscription_not_resumable",
            format!("Subscription '{id}' is neither paused nor set to cancel at the period's end: there is nothing to resume."),
        ));
    };
    apply_answer(&state, &principal, &sub, answer, "subscription.resume", json!({ "undid": undid })).await
}
