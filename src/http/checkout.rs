//! `/v1/checkout/sessions`: selling through the provider's hosted page.
//!
//! The order of work is what makes a checkout safe to retry and impossible
//! to lose: validate everything (nothing written for bad input), record the
//! session and the pending order, make sure the customer exists at the
//! provider, and only then ask the provider for the session, under an
//! Idempotency-Key derived from the request. If the provider fails, the
//! session is marked `expired` (with `last_error`) and its order
//! `canceled`; the client's retry with the same Idempotency-Key revives the
//! same session and order and reaches the provider as the same request, so
//! one checkout never becomes two sessions.

use std::collections::BTreeMap;

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::{Deserialize, Serialize};
use serde_json::Value;
use utoipa::ToSchema;

use super::error::{current_request_id, ApiError, ApiResult, ErrorBody, ErrorType};
use super::extract::{ApiJson, ApiPath, Principal, ReadKey, WriteKey};
use super::AppState;
use super::Json;
use crate::billing::checkout::{check_cart, CartLine, Mode};
use crate::ids::{new_id, ExternalId};
use crate::providers::stripe::{derived_idempotency_key, Form, StripeClientError};
use crate::store::checkout::{CheckoutLine, CheckoutRecord, NewCheckout, Recorded};
use crate::store::customers::CustomerRecord;

/// The only provider tollgate sells through so far.
pub(super) const PROVIDER: &str = "stripe";

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/checkout/sessions", post(create_checkout_session))
        .route("/v1/checkout/sessions/{id}", get(get_checkout_session))
}

/// One line of a checkout request.
#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct LineItemRequest {
    /// A catalog price id, as `GET /v1/prices` lists it (`card_pack_5`).
    #[schema(example = "card_pack_5")]
    pub price: String,
    /// 1 to 10,000; default 1.
    #[serde(default = "one")]
    pub quantity: i64,
}

fn one() -> i64 {
    1
}

#[derive(Debug, Deserialize, Serialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct CreateCheckoutSession {
    /// The application's id of the customer (as in `PUT /v1/customers/{external_id}`).
    #[schema(example = "user_42")]
    pub customer: String,
    pub mode: Mode,
    /// 1 to 100 lines; one-time prices in `payment` mode, recurring ones
    /// (on one interval) in `subscription` mode, all in one currency.
    pub line_items: Vec<LineItemRequest>,
    /// Where the provider sends the buyer after paying; default
    /// `PAYMENTSVC_SUCCESS_URL`. `{CHECKOUT_SESSION_ID}` is filled in by Stripe.
    pub success_url: Option<String>,
    /// Where the buyer goes on giving up; default `PAYMENTSVC_CANCEL_URL`.
    pub cancel_url: Option<String>,
    /// Subscription mode: days of free trial (1 to 730).
    pub trial_days: Option<i64>,
    /// Up to 40 keys of your own (not starting with `tollgate_`), kept on
    /// the session, the order and the provider's session.
    #[serde(default)]
    pub metadata: BTreeMap<String, String>,
    /// Subscription mode: open the checkout even though the customer already
    /// has a live subscription (`incomplete`, `trialing`, `active`,
    /// `past_due`, `unpaid` or `paused`), an open subscription checkout, or one
    /// completed within the last day whose subscription is not recorded yet,
    /// for one of its products. Without it such a checkout is refused with
    /// 409 `subscription_exists` or `subscription_checkout_open`: that is
    /// what a double click or a stale page usually means.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub allow_duplicate_subscription: bool,
}

/// One line of a checkout.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckoutLineItem {
    /// The catalog price.
    pub price: String,
    pub product: String,
    pub description: Option<String>,
    pub quantity: i64,
    /// Integer minor units.
    pub unit_amount: i64,
    pub amount_total: i64,
}

/// A checkout session: a request to pay on the provider's hosted page.
#[derive(Debug, Serialize, ToSchema)]
pub struct CheckoutSession {
    /// `chk_…`
    pub id: String,
    #[schema(example = "checkout.session")]
    pub object: &'static str,
    /// The application's id of the customer.
    pub customer: Option<String>,
    /// `payment` or `subscription`.
    pub mode: String,
    /// `open` (the URL can be paid), `complete`, or `expired` (timed out,
    /// or the provider could not open it: see `last_error`).
    pub status: String,
    /// The provider's `paid`, `unpaid` or `no_payment_required`, once known.
    pub payment_status: Option<String>,
    /// The hosted payment page, while the session is open.
    pub url: Option<String>,
    pub expires_at: Option<i64>,
    /// Payment mode: the order (`ord_…`), pending until paid.
    pub order: Option<String>,
    /// Subscription mode: the subscription (`sub_…`), once the provider has
    /// reported it.
    pub subscription: Option<String>,
    pub line_items: Vec<CheckoutLineItem>,
    /// Integer minor units.
    pub amount_total: Option<i64>,
    pub currency: Option<String>,
    pub success_url: Option<String>,
    pub cancel_url: Option<String>,
    pub trial_days: Option<i64>,
    pub metadata: BTreeMap<String, String>,
    pub provider: String,
    /// The provider's session id (`cs_…`).
    pub provider_session: Option<String>,
    /// Why the provider did not open the session (an error code), if it did not.
    pub last_error: Option<String>,
    pub created: i64,
    pub updated: i64,
}

impl From<CheckoutRecord> for CheckoutSession {
    fn from(r: CheckoutRecord) -> Self {
        let lines = r.lines();
        // The provider expires sessions on its own schedule and says so by
        // webhook; past its time, a session is shown as expired at once.
        let timed_out = r.status == "open" && r.expires_at.is_some_and(|t| t <= crate::store::now_unix());
        let status = if timed_out { "expired".to_owned() } else { r.status };
        CheckoutSession {
            object: "checkout.session",
            customer: r.external_id,
            mode: r.mode,
            payment_status: r.payment_status,
            url: r.url.filter(|_| status == "open"),
            status,
            expires_at: r.expires_at,
            order: r.order_id,
            subscription: r.subscription_id,
            line_items: lines
                .into_iter()
                .map(|l| CheckoutLineItem {
                    price: l.price,
                    product: l.product,
                    description: l.description,
                    quantity: l.quantity,
                    unit_amount: l.unit_amount,
                    amount_total: l.amount_total,
                })
                .collect(),
            amount_total: r.amount_total,
            currency: r.currency,
            success_url: r.success_url,
            cancel_url: r.cancel_url,
            trial_days: r.trial_days,
            metadata: serde_json::from_str(&r.metadata).unwrap_or_default(),
            provider: r.provider,
            provider_session: r.provider_session_id,
            last_error: r.last_error,
            created: r.created_at,
            updated: r.updated_at,
            id: r.id,
        }
    }
}

/// Create a checkout session
///
/// Records the checkout (and, in payment mode, its pending order) and
/// returns the provider's hosted payment page as `url`. The customer's
/// provider account is created on their first checkout. Retry a failed
/// request with the same `Idempotency-Key`: it resumes the same checkout.
#[utoipa::path(
    post,
    path = "/v1/checkout/sessions",
    tag = "checkout",
    request_body = CreateCheckoutSession,
    responses(
        (status = 201, body = CheckoutSession),
        (status = 200, description = "This request (same Idempotency-Key and body) already opened this session", body = CheckoutSession),
        (status = 400, description = "Bad input; nothing was recorded", body = ErrorBody),
        (status = 402, description = "The provider declined a card", body = ErrorBody),
        (status = 404, description = "No such customer", body = ErrorBody),
        (status = 409, description = "Subscription mode: the customer already has a live subscription, or a checkout completed within the last day whose subscription is not recorded yet (`subscription_exists`), or an open checkout (`subscription_checkout_open`) for one of these products; nothing was recorded. Pass `allow_duplicate_subscription: true` to sell it anyway. Also `checkout_prices_changed` (`idempotency_error`): a retry whose prices changed since its first attempt", body = ErrorBody),
        (status = 503, description = "The provider is failing (`provider_error`, with Retry-After); retry with the same Idempotency-Key", body = ErrorBody),
    ),
    params(("Idempotency-Key" = Option<String>, Header, description = "Makes a retry resume this checkout instead of starting another")),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all, fields(mode = body.mode.as_str()))]
pub async fn create_checkout_session(
    State(state): State<AppState>,
    WriteKey(caller): WriteKey,
    headers: HeaderMap,
    ApiJson(body): ApiJson<CreateCheckoutSession>,
) -> ApiResult<(StatusCode, Json<CheckoutSession>)> {
    let mode = body.mode;
    let result = create(&state, &caller, idempotency_key(&headers), body).await;
    let outcome = match &result {
        Ok((StatusCode::CREATED, _)) => "created",
        Ok(_) => "resumed",
        Err(e) => outcome_of(e),
    };
    metrics::counter!("checkout_requests_total", "mode" => mode.as_str(), "outcome" => outcome).increment(1);
    result
}

/// The metric label of a failed request.
pub(super) fn outcome_of(e: &ApiError) -> &'static str {
    match e.kind {
        ErrorType::ProviderError => "provider_error",
        ErrorType::CardError => "card_error",
        _ if e.status.is_client_error() => "invalid",
        _ => "error",
    }
}

pub(super) fn idempotency_key(headers: &HeaderMap) -> Option<String> {
    headers.get("idempotency-key").and_then(|v| v.to_str().ok()).map(str::to_owned)
}

/// A stable digest of a request body, so that a key reused with another
/// body (after tollgate forgot the key) starts a new checkout.
pub(super) fn fingerprint(body: &impl Serialize) -> String {
    use sha2::{Digest, Sha256};
    hex::encode(Sha256::digest(serde_json::to_vec(body).unwrap_or_default()))
}

async fn create(
    state: &AppState,
    caller: &Principal,
    idempotency_key: Option<String>,
    body: CreateCheckoutSession,
) -> ApiResult<(StatusCode, Json<CheckoutSession>)> {
    let request_key = idempotency_key
        .as_deref()
        .map(|k| derived_idempotency_key(&["checkout", caller.key_id(), k, &fingerprint(&body)]));
    let customer = customer_param(state, &body.customer).await?;
    let external = ExternalId::parse(&customer.external_id).map_err(|e| ApiError::internal(e.0))?;
    let success_url =
        url_param("success_url", body.success_url.as_deref(), state.config.success_url.as_deref())?
            .ok_or_else(|| {
                ApiError::invalid(
                    "success_url_missing",
                    "Pass success_url, or configure a default with PAYMENTSVC_SUCCESS_URL.",
                )
                .with_param("success_url")
            })?;
    let cancel_url = url_param("cancel_url", body.cancel_url.as_deref(), state.config.cancel_url.as_deref())?;
    check_metadata(&body.metadata)?;

    // The cart, checked against the catalog before anything is written.
    if body.line_items.len() > crate::billing::checkout::MAX_LINE_ITEMS {
        return Err(ApiError::invalid_param(
            "line_items",
            format!("line_items may list at most {} prices.", crate::billing::checkout::MAX_LINE_ITEMS),
        ));
    }
    let mut prices = Vec::with_capacity(body.line_items.len());
    for (i, item) in body.line_items.iter().enumerate() {
        if item.price.is_empty() || item.price.len() > 255 || item.price.chars().any(char::is_control) {
            return Err(ApiError::invalid_param(
                format!("line_items[{i}][price]"),
                "price must be a catalog price id (see GET /v1/prices).",
            ));
        }
        prices.push(state.store.checkout_price(PROVIDER, &item.price).await?);
    }
    let cart_lines: Vec<CartLine> = body
        .line_items
        .iter()
        .zip(&prices)
        .map(|(item, p)| CartLine {
            requested: &item.price,
            price: p.as_ref().map(|p| &p.cart),
            quantity: item.quantity,
        })
        .collect();
    let cart = check_cart(body.mode, &cart_lines, body.trial_days)
        .map_err(|e| ApiError::invalid_param(e.param, e.message))?;
    let mut lines = Vec::with_capacity(prices.len());
    for (i, (price, total)) in prices.into_iter().zip(&cart.lines).enumerate() {
        let price = price.ok_or_else(|| ApiError::internal("a checked cart line has no price"))?;
        let Some(provider_price) = price.provider_price_id else {
            return Err(ApiError::invalid(
                "price_not_synced",
                format!(
                    "The price '{}' is not set up at the payment provider yet: run `tollgate catalog sync`.",
                    price.cart.id
                ),
            )
            .with_param(format!("line_items[{i}][price]")));
        };
        lines.push(CheckoutLine {
            price: price.cart.id,
            product: price.product_id,
            provider_price: Some(provider_price),
            description: Some(price.product_name),
            quantity: total.quantity,
            unit_amount: total.unit_amount,
            amount_total: total.amount_total,
        });
    }

    // While the provider is known to be failing, answer at once and record
    // nothing: a checkout that cannot be opened is not worth a row.
    if let Some(wait) = state.stripe.breaker().refusing_for() {
        return Err(StripeClientError::CircuitOpen { retry_after: wait }.into());
    }
    let actor = caller.actor();
    let request_id = current_request_id();
    let metadata = serde_json::to_value(&body.metadata).map_err(ApiError::internal)?;
    // A retry of a request already recorded resumes it.
    let keys_valid_since = crate::store::now_unix() - state.idempotency_ttl_seconds;
    let existing = match &request_key {
        Some(k) => state.store.checkout_by_request_key(k, keys_valid_since).await?,
        None => None,
    };
    let (session_id, order_id, stripe_key) = match existing {
        Some(rec) if rec.provider_session_id.is_some() => return Ok((StatusCode::OK, Json(rec.into()))),
        Some(rec) => {
            // The order recorded what the first attempt priced; a retry
            // must open the same sale, not today's catalog.
            let recorded = rec.lines();
            let same_sale = recorded.len() == lines.len()
                && recorded.iter().zip(&lines).all(|(a, b)| {
                    (&a.price, a.quantity, a.unit_amount, &a.provider_price)
                        == (&b.price, b.quantity, b.unit_amount, &b.provider_price)
                });
            if !same_sale {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    ErrorType::IdempotencyError,
                    "checkout_prices_changed",
                    "The catalog's prices changed since this checkout was first requested with this \
                     Idempotency-Key; send the request again with a new key.",
                ));
            }
            if rec.last_error.is_some() {
                state.store.reopen_checkout(&rec.id, &actor, request_id.as_deref()).await?;
            }
            let stripe_key = rec.provider_key();
            (rec.id, rec.order_id, stripe_key)
        }
        None => {
            let session_id = new_id("chk");
            let order_id = (body.mode == Mode::Payment).then(|| new_id("ord"));
            let stripe_key = derived_idempotency_key(&[
                "checkout",
                request_key.as_deref().unwrap_or(&session_id),
                &session_id,
            ]);
            let recorded = state
                .store
                .record_checkout(
                    &NewCheckout {
                        id: &session_id,
                        provider: PROVIDER,
                        customer_id: &customer.id,
                        mode: body.mode.as_str(),
                        order_id: order_id.as_deref(),
                        success_url: &success_url,
                        cancel_url: cancel_url.as_deref(),
                        currency: &cart.currency,
                        amount_total: cart.amount_total,
                        metadata: &metadata,
                        lines: &lines,
                        trial_days: body.trial_days,
                        request_key: request_key.as_deref(),
                        request_key_valid_since: keys_valid_since,
                        provider_idempotency_key: &stripe_key,
                        allow_duplicate_subscription: body.allow_duplicate_subscription,
                    },
                    &actor,
                    request_id.as_deref(),
                )
                .await?;
            if let Some(e) = duplicate_subscription_error(recorded, &body.customer) {
                return Err(e);
            }
            (session_id, order_id, stripe_key)
        }
    };

    let opened = open_at_provider(
        state,
        &customer,
        &external,
        OpenRequest {
            session_id: &session_id,
            order_id: order_id.as_deref(),
            mode: body.mode,
            lines: &lines,
            success_url: &success_url,
            cancel_url: cancel_url.as_deref(),
            trial_days: body.trial_days,
            metadata: &body.metadata,
            stripe_key: &stripe_key,
        },
        &actor,
    )
    .await;
    let session = match opened {
        Ok(session) => session,
        Err(e) => {
            if let Err(store_error) =
                state.store.checkout_failed(&session_id, e.code, &actor, request_id.as_deref()).await
            {
                // The session stays `open` without a URL; the provider's
                // expiry (or a retry) settles it.
                tracing::warn!(error = %store_error, session = %session_id, "could not record a failed checkout");
            }
            return Err(e);
        }
    };
    let provider_session = session["id"]
        .as_str()
        .ok_or_else(|| ApiError::internal("the provider's checkout session has no id"))?;
    state
        .store
        .checkout_opened(
            &session_id,
            provider_session,
            session["url"].as_str(),
            session["expires_at"].as_i64(),
            &actor,
            request_id.as_deref(),
        )
        .await?;
    let record = state
        .store
        .get_checkout(&session_id)
        .await?
        .ok_or_else(|| ApiError::internal("a recorded checkout session vanished"))?;
    tracing::info!(session = %session_id, provider_session, "checkout session opened");
    Ok((StatusCode::CREATED, Json(record.into())))
}

/// The 409 for a subscription checkout the customer most likely has already.
fn duplicate_subscription_error(recorded: Recorded, customer: &str) -> Option<ApiError> {
    let (code, message) = match recorded {
        Recorded::Recorded => return None,
        Recorded::SubscriptionExists { subscription, product } => (
            "subscription_exists",
            format!(
                "Customer '{customer}' already has subscription '{subscription}' to product '{product}'. \
                 To sell a second one anyway, pass allow_duplicate_subscription: true."
            ),
        ),
        Recorded::CheckoutCompleted { session, product } => (
            "subscription_exists",
            format!(
                "Customer '{customer}' has just subscribed to product '{product}' through checkout session \
                 '{session}'; the subscription is being recorded. To sell a second one anyway, pass \
                 allow_duplicate_subscription: true."
            ),
        ),
        Recorded::CheckoutOpen { session, product } => (
            "subscription_checkout_open",
            format!(
                "Customer '{customer}' already has checkout session '{session}' open for product '{product}': \
                 send them to its url, or pass allow_duplicate_subscription: true to open another."
            ),
        ),
    };
    Some(
        ApiError::new(StatusCode::CONFLICT, ErrorType::InvalidRequestError, code, message)
            .with_param("line_items"),
    )
}

struct OpenRequest<'a> {
    session_id: &'a str,
    order_id: Option<&'a str>,
    mode: Mode,
    lines: &'a [CheckoutLine],
    success_url: &'a str,
    cancel_url: Option<&'a str>,
    trial_days: Option<i64>,
    metadata: &'a BTreeMap<String, String>,
    stripe_key: &'a str,
}

/// Creates the provider's checkout session, and the provider customer first
/// if this customer has none.
async fn open_at_provider(
    state: &AppState,
    customer: &CustomerRecord,
    external: &ExternalId,
    r: OpenRequest<'_>,
    actor: &crate::store::audit::Actor,
) -> ApiResult<Value> {
    let provider_customer = provider_customer(state, customer, external, actor).await?;
    let items: Vec<Vec<(&str, String)>> = r
        .lines
        .iter()
        .map(|l| {
            vec![
                ("price", l.provider_price.clone().unwrap_or_default()),
                ("quantity", l.quantity.to_string()),
            ]
        })
        .collect();
    let mut form = Form::new()
        .set("mode", r.mode.as_str())
        .set("customer", &provider_customer)
        .set("client_reference_id", r.session_id)
        .set("success_url", r.success_url)
        .set_opt("cancel_url", r.cancel_url)
        .objects("line_items", items.iter().map(Vec::as_slice))
        .metadata(r.metadata.iter())
        .metadata([("tollgate_checkout_session", r.session_id), ("tollgate_external_id", external.as_str())]);
    match r.mode {
        Mode::Payment => {
            form = form
                .set("payment_intent_data[metadata][tollgate_order_id]", r.order_id.unwrap_or_default())
                .set("payment_intent_data[metadata][tollgate_checkout_session]", r.session_id)
                .set("payment_intent_data[metadata][tollgate_external_id]", external.as_str());
        }
        Mode::Subscription => {
            form = form
                .set("subscription_data[metadata][tollgate_external_id]", external.as_str())
                .set("subscription_data[metadata][tollgate_checkout_session]", r.session_id)
                .set_opt("subscription_data[trial_period_days]", r.trial_days);
        }
    }
    state.stripe.post("/v1/checkout/sessions", &form, Some(r.stripe_key)).await.map_err(missing_at_provider)
}

/// The provider no longer has an object tollgate's mapping names (a price
/// deleted in its dashboard, or the built-in emulator, which forgets
/// everything when tollgate restarts): say which, and what fixes it,
/// rather than an opaque rejection.
fn missing_at_provider(e: StripeClientError) -> ApiError {
    if let StripeClientError::Api { status: 400 | 404, code: Some(code), param: Some(param), .. } = &e {
        if code == "resource_missing" {
            tracing::error!(param = %param, "the provider has no object tollgate's mapping names");
            let message = if param.starts_with("line_items") {
                format!(
                    "The payment provider has no price for {param} as tollgate maps it; run `tollgate catalog sync` \
                     (the built-in emulator forgets its prices when tollgate restarts)."
                )
            } else {
                format!(
                    "The payment provider has no {param} as tollgate linked it (the built-in emulator forgets \
                     everything when tollgate restarts: start again with a fresh database)."
                )
            };
            return ApiError::new(
                StatusCode::BAD_GATEWAY,
                ErrorType::ProviderError,
                "provider_object_missing",
                message,
            )
            .with_param(param.clone());
        }
    }
    e.into()
}

/// The customer's account at the provider, created on first use with
/// `metadata[tollgate_external_id]` and linked at once. The Idempotency-Key
/// is derived from the customer, so two first checkouts racing reach the
/// provider as one request and get one provider customer.
pub(super) async fn provider_customer(
    state: &AppState,
    customer: &CustomerRecord,
    external: &ExternalId,
    actor: &crate::store::audit::Actor,
) -> ApiResult<String> {
    if let Some(id) = customer.providers.get(PROVIDER) {
        return Ok(id.clone());
    }
    let email = customer.email.as_deref().unwrap_or("");
    let name = customer.name.as_deref().unwrap_or("");
    let form = Form::new()
        .set_opt("email", customer.email.as_deref())
        .set_opt("name", customer.name.as_deref())
        .metadata([("tollgate_external_id", external.as_str()), ("tollgate_customer", customer.id.as_str())]);
    let deleted = state.store.deleted_provider_customers(&customer.id, PROVIDER).await?.to_string();
    let key = derived_idempotency_key(&["customer", &customer.id, email, name, &deleted]);
    let created = state.stripe.post("/v1/customers", &form, Some(&key)).await?;
    let id = created["id"].as_str().ok_or_else(|| ApiError::internal("the provider's customer has no id"))?;
    let linked = state
        .store
        .link_provider_customer(
            &customer.id,
            external,
            PROVIDER,
            id,
            actor,
            &state.config.fulfilment_policy(),
        )
        .await?;
    Ok(linked)
}

/// The customer a request names by its external id; 404 naming `customer`.
pub(super) async fn customer_param(state: &AppState, raw: &str) -> ApiResult<CustomerRecord> {
    let external = ExternalId::parse(raw).map_err(|e| ApiError::invalid_param("customer", e.0))?;
    state.store.get_customer(&external).await?.ok_or_else(|| {
        let mut e = ApiError::not_found("customer", external.as_str()).with_param("customer");
        e.message.push_str("; create it first with PUT /v1/customers/{external_id}.");
        e
    })
}

/// An absolute http(s) URL from the request, else the configured default.
/// Sent on as given (Stripe fills in `{CHECKOUT_SESSION_ID}` templates).
pub(super) fn url_param(
    param: &str,
    given: Option<&str>,
    default: Option<&str>,
) -> ApiResult<Option<String>> {
    let (raw, from) = match (given, default) {
        (Some(g), _) => (g, "".to_owned()),
        (None, Some(d)) => (d, " (the configured default)".to_owned()),
        (None, None) => return Ok(None),
    };
    let bad = |why: &str| ApiError::invalid("url_invalid", format!("{param}{from} {why}.")).with_param(param);
    if raw.len() > 2048 || raw.chars().any(char::is_control) {
        return Err(bad("must be at most 2048 characters, without control characters"));
    }
    let url = reqwest::Url::parse(raw)
        .map_err(|_| bad("must be an absolute URL such as https://shop.example/thanks"))?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(bad("must be an http:// or https:// URL with a host"));
    }
    Ok(Some(raw.to_owned()))
}

/// Stripe's metadata limits, less the keys tollgate adds itself.
fn check_metadata(metadata: &BTreeMap<String, String>) -> ApiResult<()> {
    if metadata.len() > 40 {
        return Err(ApiError::invalid_param("metadata", "metadata may have at most 40 keys."));
    }
    for (k, v) in metadata {
        let param = format!("metadata[{k}]");
        if k.is_empty() || k.len() > 40 || k.chars().any(|c| c.is_control() || c == '[' || c == ']') {
            return Err(ApiError::invalid_param(
                "metadata",
                "metadata keys must be 1 to 40 characters, without brackets or control characters.",
            ));
        }
        if k.starts_with("tollgate_") {
            return Err(ApiError::invalid_param(
                param,
                "metadata keys starting with tollgate_ are reserved.",
            ));
        }
        if v.len() > 500 || v.contains('\0') {
            return Err(ApiError::invalid_param(param, "metadata values must be at most 500 characters."));
        }
    }
    Ok(())
}

/// Retrieve a checkout session
#[utoipa::path(
    get,
    path = "/v1/checkout/sessions/{id}",
    tag = "checkout",
    params(("id" = String, Path, description = "`chk_…`")),
    responses(
        (status = 200, body = CheckoutSession),
        (status = 404, description = "No such checkout session", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_checkout_session(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(id): ApiPath<String>,
) -> ApiResult<Json<CheckoutSession>> {
    let record =
        state.store.get_checkout(&id).await?.ok_or_else(|| ApiError::not_found("checkout session", &id))?;
    Ok(Json(record.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_absolute_http_and_templates_survive() {
        let ok =
            url_param("success_url", Some("https://shop.example/ok?s={CHECKOUT_SESSION_ID}"), None).unwrap();
        assert_eq!(ok.as_deref(), Some("https://shop.example/ok?s={CHECKOUT_SESSION_ID}"));
        assert_eq!(
            url_param("success_url", None, Some("http://localhost:3000/ok")).unwrap().as_deref(),
            Some("http://localhost:3000/ok")
        );
        assert_eq!(url_param("cancel_url", None, None).unwrap(), None);
        for bad in ["/relative", "ftp://shop.example/x", "javascript:alert(1)", "https://", "not a url"] {
            let e = url_param("success_url", Some(bad), None).unwrap_err();
            assert_eq!((e.code, e.param.as_deref()), ("url_invalid", Some("success_url")), "{bad}");
        }
    }

    #[test]
    fn a_mapped_object_missing_at_the_provider_says_what_to_do() {
        let missing = |param: &str| StripeClientError::Api {
            status: 400,
            kind: "invalid_request_error".into(),
            code: Some("resource_missing".into()),
            decline_code: None,
            param: Some(param.into()),
            message: "No such price".into(),
            request_id: None,
            retry_after: None,
        };
        let e = missing_at_provider(missing("line_items[0][price]"));
        assert_eq!((e.code, e.param.as_deref()), ("provider_object_missing", Some("line_items[0][price]")));
        assert!(e.message.contains("tollgate catalog sync"), "{}", e.message);
        let e = missing_at_provider(StripeClientError::CircuitOpen {
            retry_after: std::time::Duration::from_secs(3),
        });
        assert_eq!((e.status.as_u16(), e.retry_after), (503, Some(3)));
    }

    #[test]
    fn metadata_keys_of_tollgate_are_reserved() {
        let m = |k: &str, v: &str| BTreeMap::from([(k.to_owned(), v.to_owned())]);
        assert!(check_metadata(&m("campaign", "spring")).is_ok());
        assert!(check_metadata(&m("tollgate_order_id", "x")).is_err());
        assert!(check_metadata(&m("a[b]", "x")).is_err());
        assert!(check_metadata(&m("k", &"v".repeat(501))).is_err());
        let many: BTreeMap<String, String> = (0..41).map(|i| (format!("k{i}"), "v".to_owned())).collect();
        assert!(check_metadata(&many).is_err());
    }
}
