//! `/v1/products` and `/v1/prices`: the catalog, as declared in `tollgate.toml`.

use std::collections::BTreeMap;

use axum::routing::get;
use axum::{extract::State, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::error::{ApiError, ApiResult};
use super::extract::{list_query, ApiQuery, ReadKey};
use super::Json;
use super::{AppState, ListResponse};
use crate::billing::catalog::{Grants, Recurring};
use crate::ids::CatalogKey;
use crate::store::catalog::{PriceFilter, PriceRecord, ProductRecord};

pub fn router() -> Router<AppState> {
    Router::new().route("/v1/products", get(list_products)).route("/v1/prices", get(list_prices))
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Product {
    /// The catalog key, e.g. `pro`.
    pub id: String,
    #[schema(example = "product")]
    pub object: &'static str,
    pub name: String,
    pub description: Option<String>,
    pub active: bool,
    /// What buying this product grants.
    pub grants: Grants,
    /// Provider name → the provider's product id.
    pub provider_ids: BTreeMap<String, String>,
    pub created: i64,
    pub updated: i64,
}

impl From<ProductRecord> for Product {
    fn from(r: ProductRecord) -> Self {
        Product {
            id: r.id,
            object: "product",
            name: r.name,
            description: r.description,
            active: r.active,
            grants: r.grants,
            provider_ids: r.provider_ids,
            created: r.created_at,
            updated: r.updated_at,
        }
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Price {
    /// The catalog key, e.g. `pro_monthly`.
    pub id: String,
    #[schema(example = "price")]
    pub object: &'static str,
    pub product: String,
    /// Lowercase ISO currency.
    pub currency: String,
    /// Integer minor units.
    pub unit_amount: i64,
    /// `one_time` or `recurring`.
    #[serde(rename = "type")]
    pub kind: &'static str,
    pub recurring: Option<Recurring>,
    pub trial_days: Option<i64>,
    pub nickname: Option<String>,
    pub active: bool,
    /// Provider name → the provider's price id.
    pub provider_ids: BTreeMap<String, String>,
    pub created: i64,
    pub updated: i64,
}

impl From<PriceRecord> for Price {
    fn from(r: PriceRecord) -> Self {
        Price {
            id: r.id,
            object: "price",
            product: r.product,
            currency: r.currency,
            unit_amount: r.unit_amount,
            kind: if r.recurring.is_some() { "recurring" } else { "one_time" },
            recurring: r.recurring,
            trial_days: r.trial_days,
            nickname: r.nickname,
            active: r.active,
            provider_ids: r.provider_ids,
            created: r.created_at,
            updated: r.updated_at,
        }
    }
}

list_query!(
    pub struct ProductListQuery {
        /// Only active (or only inactive) products.
        pub active: Option<bool>,
    }
);

/// List products, by catalog key
#[utoipa::path(
    get,
    path = "/v1/products",
    tag = "catalog",
    params(ProductListQuery),
    responses((status = 200, body = ListResponse<Product>)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_products(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiQuery(query): ApiQuery<ProductListQuery>,
) -> ApiResult<Json<ListResponse<Product>>> {
    let listed = state.store.list_products(&query.page()?, query.active).await?;
    Ok(Json(ListResponse::new("/v1/products", listed, Product::from)))
}

list_query!(
    pub struct PriceListQuery {
        /// Only active (or only inactive) prices.
        pub active: Option<bool>,
        /// Only prices of this product.
        pub product: Option<String>,
        /// `one_time` or `recurring`.
        #[serde(rename = "type")]
        #[param(rename = "type")]
        pub kind: Option<String>,
    }
);

/// List prices, by catalog key
#[utoipa::path(
    get,
    path = "/v1/prices",
    tag = "catalog",
    params(PriceListQuery),
    responses((status = 200, body = ListResponse<Price>)),
    security(("api_key" = []))
)]
#[tracing::instrument(skip_all)]
pub async fn list_prices(
    State(state): State<AppState>,
    ReadKey(_caller): ReadKey,
    ApiQuery(query): ApiQuery<PriceListQuery>,
) -> ApiResult<Json<ListResponse<Price>>> {
    let page = query.page()?;
    if let Some(kind) = &query.kind {
        if kind != "one_time" && kind != "recurring" {
            return Err(ApiError::invalid_param("type", "type must be one_time or recurring."));
        }
    }
    if let Some(product) = &query.product {
        CatalogKey::parse(product).map_err(|e| ApiError::invalid_param("product", e.0))?;
    }
    let filter = PriceFilter { active: query.active, product: query.product, kind: query.kind };
    let listed = state.store.list_prices(&page, &filter).await?;
    Ok(Json(ListResponse::new("/v1/prices", listed, Price::from)))
}
