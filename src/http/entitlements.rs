//! `/v1/customers/{external_id}/entitlements` and balances: what a customer
//! may use now, and consuming credits.

use std::collections::{BTreeMap, BTreeSet};

use axum::http::{HeaderMap, StatusCode};
use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::{Deserialize, Serialize};
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorBody, ErrorType};
use super::extract::{ApiJson, ApiPath, ReadKey, WriteKey};
use super::AppState;
use super::Json;
use crate::ids::{new_id, ExternalId};
use crate::store::cache::CustomerEntitlements;
use crate::store::entitlements::{DebitError, StoredEntitlements};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/customers/{external_id}/entitlements", get(get_entitlements))
        .route("/v1/customers/{external_id}/entitlements/{feature}", get(check_entitlement))
        .route("/v1/customers/{external_id}/balances/{key}/debit", post(debit_balance))
}

/// A customer's current entitlements.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementsResponse {
    #[schema(example = "entitlements")]
    pub object: &'static str,
    /// The application's id for the customer.
    pub customer: String,
    pub features: BTreeSet<String>,
    pub limits: BTreeMap<String, i64>,
    /// Credit balances; negative is a debt (credits revoked after being spent).
    pub balances: BTreeMap<String, i64>,
    /// Increases on every change.
    pub version: i64,
    /// Unix seconds of the last change (0: never had any).
    pub updated: i64,
}

impl EntitlementsResponse {
    fn new(customer: &ExternalId, stored: StoredEntitlements) -> Self {
        Self {
            object: "entitlements",
            customer: customer.to_string(),
            features: stored.entitlements.features,
            limits: stored.entitlements.limits,
            balances: stored.entitlements.balances,
            version: stored.version,
            updated: stored.updated_at,
        }
    }
}

/// One check: is the customer allowed `feature` (a flag, a limit or a balance).
#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementCheck {
    #[schema(example = "entitlement_check")]
    pub object: &'static str,
    pub customer: String,
    pub feature: String,
    pub allowed: bool,
    /// The limit, when `feature` names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub limit: Option<i64>,
    /// The balance, when `feature` names one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub balance: Option<i64>,
    pub version: i64,
}

async fn customer_id(state: &AppState, raw: &str) -> ApiResult<(ExternalId, String)> {
    let external = ExternalId::parse(raw).map_err(|e| ApiError::invalid_param("external_id", e.0))?;
    let customer = state
        .store
        .get_customer(&external)
        .await?
        .ok_or_else(|| ApiError::not_found("customer", external.as_str()))?;
    Ok((external, customer.id))
}

/// The entitlements a check reads, from memory when they are cached.
async fn cached_entitlements(
    state: &AppState,
    raw: String,
) -> ApiResult<(ExternalId, std::sync::Arc<CustomerEntitlements>)> {
    let external = ExternalId::try_from(raw).map_err(|e| ApiError::invalid_param("external_id", e.0))?;
    let found = state
        .store
        .customer_entitlements(&external)
        .await?
        .ok_or_else(|| ApiError::not_found("customer", external.as_str()))?;
    Ok((external, found))
}

/// Retrieve a customer's entitlements
///
/// Derived from active and trialing subscriptions (and past-due ones within
/// the grace period), unrevoked one-time grants and the credits ledger.
#[utoipa::path(
    get,
    path = "/v1/customers/{external_id}/entitlements",
    tag = "entitlements",
    params(("external_id" = String, Path, description = "The application's id for the user")),
    responses(
        (status = 200, body = EntitlementsResponse),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_entitlements(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(external_id): ApiPath<String>,
) -> ApiResult<Json<EntitlementsResponse>> {
    let (external, found) = cached_entitlements(&state, external_id).await?;
    Ok(Json(EntitlementsResponse::new(&external, found.stored.clone())))
}

/// Check one entitlement
#[utoipa::path(
    get,
    path = "/v1/customers/{external_id}/entitlements/{feature}",
    tag = "entitlements",
    params(
        ("external_id" = String, Path, description = "The application's id for the user"),
        ("feature" = String, Path, description = "A feature flag, limit or balance key"),
    ),
    responses(
        (status = 200, body = EntitlementCheck),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn check_entitlement(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath((external_id, feature)): ApiPath<(String, String)>,
) -> ApiResult<Json<EntitlementCheck>> {
    if feature.is_empty() || feature.len() > 128 || feature.chars().any(char::is_control) {
        return Err(ApiError::invalid_param("feature", "feature must be 1 to 128 printable characters."));
    }
    let (external, found) = cached_entitlements(&state, external_id).await?;
    let stored = &found.stored;
    let e = &stored.entitlements;
    let limit = e.limits.get(&feature).copied();
    let balance = e.balances.get(&feature).copied();
    let allowed =
        e.features.contains(&feature) || limit.is_some_and(|l| l > 0) || balance.is_some_and(|b| b > 0);
    Ok(Json(EntitlementCheck {
        object: "entitlement_check",
        customer: external.into(),
        feature,
        allowed,
        limit,
        balance,
        version: stored.version,
    }))
}

/// Credits to consume.
#[derive(Debug, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct DebitRequest {
    /// How many credits, at least 1.
    #[schema(example = 1)]
    pub amount: i64,
}

/// Consume credits
///
/// Atomic and never below zero: a debit larger than the balance is refused
/// with 402 `insufficient_balance` and changes nothing. With an
/// `Idempotency-Key`, a retried debit consumes once.
#[utoipa::path(
    post,
    path = "/v1/customers/{external_id}/balances/{key}/debit",
    tag = "entitlements",
    params(
        ("external_id" = String, Path, description = "The application's id for the user"),
        ("key" = String, Path, description = "The balance, e.g. `cards`"),
    ),
    request_body = DebitRequest,
    responses(
        (status = 200, description = "Debited; the entitlements after it", body = EntitlementsResponse),
        (status = 402, description = "Not enough credits", body = ErrorBody),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn debit_balance(
    State(state): State<AppState>,
    WriteKey(principal): WriteKey,
    ApiPath((external_id, key)): ApiPath<(String, String)>,
    headers: HeaderMap,
    ApiJson(body): ApiJson<DebitRequest>,
) -> ApiResult<Json<EntitlementsResponse>> {
    if !(1..=1_000_000_000).contains(&body.amount) {
        return Err(ApiError::invalid_param(
            "amount",
            "amount must be a whole number from 1 to 1,000,000,000.",
        ));
    }
    if key.is_empty()
        || key.len() > 64
        || !key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        return Err(ApiError::invalid_param("key", "key must be 1 to 64 letters, digits, '_' or '-'."));
    }
    let (external, id) = customer_id(&state, &external_id).await?;
    // The ledger entry is keyed by the caller's Idempotency-Key (per API
    // key), so even a replay that outlived the idempotency store consumes once.
    let entry_key = match headers.get("idempotency-key").and_then(|v| v.to_str().ok()) {
        Some(k) => format!("debit:{}:{k}", principal.key_id()),
        None => format!("debit:{}", new_id("dbt")),
    };
    let policy = state.config.fulfilment_policy();
    match state.store.debit_balance(&id, &key, body.amount, &entry_key, &principal.actor(), &policy).await {
        Ok(stored) => Ok(Json(EntitlementsResponse::new(&external, stored))),
        Err(DebitError::Insufficient { balance }) => Err(ApiError::new(
            StatusCode::PAYMENT_REQUIRED,
            ErrorType::InvalidRequestError,
            "insufficient_balance",
            format!("The balance '{key}' has {balance} left; {} requested.", body.amount),
        )
        .with_param("amount")),
        Err(DebitError::Store(e)) => Err(e.into()),
    }
}
