//! `/v1/customers`: the application's users, keyed by its own ids.

use std::collections::BTreeMap;

use axum::http::StatusCode;
use axum::routing::get;
use axum::{extract::State, Router};
use serde::{Deserialize, Deserializer, Serialize};
use utoipa::ToSchema;

use super::error::{current_request_id, ApiError, ApiResult, ErrorBody};
use super::extract::{list_query, text_filter, ApiJson, ApiPath, ApiQuery, ReadKey, WriteKey};
use super::Json;
use super::{AppState, ListResponse};
use crate::ids::ExternalId;
use crate::store::customers::{CustomerChanges, CustomerRecord, Upserted};

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/v1/customers", get(list_customers))
        .route("/v1/customers/{external_id}", get(get_customer).put(upsert_customer))
}

/// A customer of the application, linked to its provider customers.
#[derive(Debug, Serialize, ToSchema)]
pub struct Customer {
    /// tollgate's id (`cust_…`).
    pub id: String,
    /// Always `customer`.
    #[schema(example = "customer")]
    pub object: &'static str,
    /// The application's own id for this user.
    pub external_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Provider name → the provider's customer id (e.g. `{"stripe": "cus_…"}`).
    pub providers: BTreeMap<String, String>,
    /// Unix seconds.
    pub created: i64,
    /// Unix seconds.
    pub updated: i64,
}

impl From<CustomerRecord> for Customer {
    fn from(r: CustomerRecord) -> Self {
        Customer {
            id: r.id,
            object: "customer",
            external_id: r.external_id,
            email: r.email,
            name: r.name,
            metadata: r.metadata,
            providers: r.providers,
            created: r.created_at,
            updated: r.updated_at,
        }
    }
}

/// Fields to set. An absent field is left as it is; `null` clears it.
#[derive(Debug, Default, Deserialize, ToSchema)]
#[serde(deny_unknown_fields)]
pub struct UpsertCustomer {
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "ada@example.com")]
    pub email: Option<Option<String>>,
    #[serde(default, deserialize_with = "present")]
    #[schema(value_type = Option<String>, example = "Ada Lovelace")]
    pub name: Option<Option<String>>,
    /// Replaces the whole metadata map: up to 50 keys of at most 40
    /// characters, string values of at most 500.
    pub metadata: Option<BTreeMap<String, String>>,
}

/// Tells an explicit `null` (`Some(None)`) from an absent field (`None`).
fn present<'de, T: Deserialize<'de>, D: Deserializer<'de>>(d: D) -> Result<Option<Option<T>>, D::Error> {
    Option::<T>::deserialize(d).map(Some)
}

impl UpsertCustomer {
    fn validate(self) -> ApiResult<CustomerChanges> {
        if let Some(Some(email)) = &self.email {
            let valid = email.len() <= 254
                && !email.chars().any(|c| c.is_whitespace() || c.is_control())
                && matches!(email.split_once('@'), Some((local, domain))
                    if !local.is_empty() && domain.contains('.') && !domain.contains('@')
                        && !domain.starts_with('.') && !domain.ends_with('.'));
            if !valid {
                return Err(ApiError::invalid_param("email", "email must be a valid email address."));
            }
        }
        if let Some(Some(name)) = &self.name {
            if name.chars().count() > 255 || name.chars().any(char::is_control) {
                return Err(ApiError::invalid_param(
                    "name",
                    "name must be at most 255 characters, without control characters.",
                ));
            }
        }
        if let Some(metadata) = &self.metadata {
            if metadata.len() > 50 {
                return Err(ApiError::invalid_param("metadata", "metadata may have at most 50 keys."));
            }
            for (k, v) in metadata {
                if k.is_empty()
                    || k.chars().count() > 40
                    || k.contains(['[', ']'])
                    || k.chars().any(char::is_control)
                {
                    return Err(ApiError::invalid_param(
                        format!("metadata.{k}"),
                        "metadata keys must be 1 to 40 characters, without square brackets or control characters.",
                    ));
                }
                if v.contains('\0') {
                    return Err(ApiError::invalid_param(
                        format!("metadata.{k}"),
                        "metadata values may not contain NUL characters.",
                    ));
                }
                if v.chars().count() > 500 {
                    return Err(ApiError::invalid_param(
                        format!("metadata.{k}"),
                        "metadata values must be at most 500 characters.",
                    ));
                }
            }
        }
        Ok(CustomerChanges { email: self.email, name: self.name, metadata: self.metadata })
    }
}

fn parse_external_id(raw: &str) -> ApiResult<ExternalId> {
    ExternalId::parse(raw).map_err(|e| ApiError::invalid_param("external_id", e.0))
}

/// Create or update a customer
///
/// Creates the customer if the external id is new (201), otherwise applies
/// the given fields (200). Safe to call on every sign-in.
#[utoipa::path(
    put,
    path = "/v1/customers/{external_id}",
    tag = "customers",
    params(("external_id" = String, Path, description = "The application's id for the user")),
    request_body = UpsertCustomer,
    responses(
        (status = 201, description = "Created", body = Customer),
        (status = 200, description = "Updated or unchanged", body = Customer),
        (status = 400, description = "Invalid input", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn upsert_customer(
    State(state): State<AppState>,
    WriteKey(principal): WriteKey,
    ApiPath(external_id): ApiPath<String>,
    ApiJson(body): ApiJson<UpsertCustomer>,
) -> ApiResult<(StatusCode, Json<Customer>)> {
    let external_id = parse_external_id(&external_id)?;
    let changes = body.validate()?;
    let request_id = current_request_id();
    let outcome = state
        .store
        .upsert_customer(&external_id, &changes, &principal.actor(), request_id.as_deref())
        .await?;
    let status = if matches!(outcome, Upserted::Created(_)) { StatusCode::CREATED } else { StatusCode::OK };
    Ok((status, Json(outcome.record().clone().into())))
}

/// Retrieve a customer
#[utoipa::path(
    get,
    path = "/v1/customers/{external_id}",
    tag = "customers",
    params(("external_id" = String, Path, description = "The application's id for the user")),
    responses(
        (status = 200, body = Customer),
        (status = 404, description = "No such customer", body = ErrorBody),
    ),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn get_customer(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiPath(external_id): ApiPath<String>,
) -> ApiResult<Json<Customer>> {
    let external_id = parse_external_id(&external_id)?;
    let customer = state
        .store
        .get_customer(&external_id)
        .await?
        .ok_or_else(|| ApiError::not_found("customer", external_id.as_str()))?;
    Ok(Json(customer.into()))
}

list_query!(
    pub struct CustomerListQuery {
        /// Only customers with exactly this email.
        pub email: Option<String>,
    }
);

/// List customers, newest first
#[utoipa::path(
    get,
    path = "/v1/customers",
    tag = "customers",
    params(CustomerListQuery),
    responses((status = 200, body = ListResponse<Customer>)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_customers(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiQuery(query): ApiQuery<CustomerListQuery>,
) -> ApiResult<Json<ListResponse<Customer>>> {
    let page = query.page()?;
    let email = text_filter("email", query.email)?;
    let listed = state.store.list_customers(&page, email.as_deref()).await?;
    Ok(Json(ListResponse::new("/v1/customers", listed, Customer::from)))
}
