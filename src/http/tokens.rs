//! Entitlement tokens: `POST /v1/customers/{external_id}/entitlement-token`
//! issues a short-lived signed JWT of a customer's entitlements, and
//! `GET /.well-known/jwks.json` publishes the keys that verify it, so an
//! application (or its front end, or another service) can check
//! entitlements offline.

use axum::http::{header, HeaderValue};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{extract::State, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult, ErrorBody};
use super::extract::{ApiPath, ReadKey};
use super::AppState;
use super::Json;
use crate::ids::{new_id, ExternalId};
use crate::store::now_unix;
use crate::tokens::keys::KeyRingError;
use crate::tokens::{self, Issue, Jwks, TokenEntitlements, JWKS_MAX_AGE_SECONDS};

/// `/v1` routes.
pub fn router() -> Router<AppState> {
    Router::new().route("/v1/customers/{external_id}/entitlement-token", post(create_entitlement_token))
}

/// Public routes, outside `/v1`: no API key.
pub fn public_router() -> Router<AppState> {
    Router::new().route("/.well-known/jwks.json", get(get_jwks))
}

/// A signed snapshot of a customer's entitlements.
#[derive(Debug, Serialize, ToSchema)]
pub struct EntitlementToken {
    #[schema(example = "entitlement_token")]
    pub object: &'static str,
    pub customer: String,
    /// A JWT (compact JWS, `alg: EdDSA`), verifiable with the keys at
    /// `/.well-known/jwks.json`. Claims: `iss`, `sub` (the customer's
    /// external id), `aud` (if configured), `iat`, `exp`, `jti`, and
    /// `entitlements` (`features`, `limits`, `balances`, `version`).
    pub token: String,
    /// Unix seconds; the token's `exp`.
    pub expires_at: i64,
    /// The signing key's id, as in the token's header and the JWKS.
    pub kid: String,
    /// The entitlements version the token carries.
    pub version: i64,
}

impl From<KeyRingError> for ApiError {
    #[track_caller]
    fn from(err: KeyRingError) -> Self {
        match err {
            KeyRingError::Store(e) => e.into(),
            KeyRingError::Key(e) => ApiError::internal(e),
        }
    }
}

/// Issue an entitlement token
///
/// A short-lived JWT (`ENTITLEMENT_TOKEN_TTL_SECONDS`, default 5 minutes)
/// of the customer's current entitlements, signed with Ed25519. A `read`
/// key suffices: the token says nothing a read key cannot already ask, and
/// issuing one changes nothing.
#[utoipa::path(
    post,
    path = "/v1/customers/{external_id}/entitlement-token",
    tag = "entitlements",
    params(("external_id" = String, Path, description = "The application's id for the user")),
    responses(
        (status = 200, body = EntitlementToken),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn create_entitlement_token(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(external_id): ApiPath<String>,
) -> ApiResult<Json<EntitlementToken>> {
    let external =
        ExternalId::parse(&external_id).map_err(|e| ApiError::invalid_param("external_id", e.0))?;
    let customer = state
        .store
        .get_customer(&external)
        .await?
        .ok_or_else(|| ApiError::not_found("customer", external.as_str()))?;
    let stored = state.store.entitlements(&customer.id).await?;
    let signer = state.keys.signer().await?;
    let issuer = state.config.public_url();
    let claims = tokens::claims(
        Issue {
            issuer: &issuer,
            audience: state.config.entitlement_token_audience.as_deref(),
            subject: external.as_str(),
            now: now_unix(),
            ttl_seconds: state.config.entitlement_token_ttl_seconds as i64,
            jti: new_id("etk"),
        },
        TokenEntitlements {
            features: stored.entitlements.features,
            limits: stored.entitlements.limits,
            balances: stored.entitlements.balances,
            version: stored.version,
        },
    );
    metrics::counter!("entitlement_tokens_issued_total").increment(1);
    Ok(Json(EntitlementToken {
        object: "entitlement_token",
        customer: external.to_string(),
        token: signer.sign(&claims),
        expires_at: claims.exp,
        kid: signer.kid().to_owned(),
        version: claims.entitlements.version,
    }))
}

/// The public keys of entitlement tokens
///
/// Every key that may have signed a token still alive: the active key, and
/// a retired one until its last token has expired. Cacheable for a minute;
/// refetch when a token names an unknown `kid`.
#[utoipa::path(
    get,
    path = "/.well-known/jwks.json",
    tag = "entitlements",
    responses((status = 200, body = Jwks)),
)]
#[tracing::instrument(skip_all)]
pub async fn get_jwks(State(state): State<AppState>) -> ApiResult<Response> {
    let jwks = state.keys.jwks().await?;
    let mut response = Json(jwks).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_str(&format!("public, max-age={JWKS_MAX_AGE_SECONDS}")).expect("ascii"),
    );
    Ok(response)
}
