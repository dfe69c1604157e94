//! The OpenAPI document, generated from the handlers, and a `/docs` page.
//!
//! The page is a small hand-written renderer rather than Swagger UI or
//! Redoc: those crates either download their assets at build time or load
//! them from a CDN at run time, and tollgate's docs must work offline.

use axum::http::header;
use axum::response::{Html, IntoResponse};
use axum::routing::get;
use axum::{Json, Router};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::{Modify, OpenApi};

use super::AppState;

#[derive(OpenApi)]
#[openapi(
    info(
        title = "tollgate",
        description = "A self-hosted billing gateway. Errors follow Stripe's shape; every POST and PUT accepts `Idempotency-Key`; lists take `limit`, `starting_after` and `ending_before`; every response carries `Request-Id`."
    ),
    paths(
        super::customers::upsert_customer,
        super::customers::get_customer,
        super::customers::list_customers,
        super::entitlements::get_entitlements,
        super::entitlements::check_entitlement,
        super::entitlements::debit_balance,
        super::tokens::create_entitlement_token,
        super::tokens::get_jwks,
        super::orders::list_orders,
        super::orders::get_order,
        super::orders::create_refund,
        super::subscriptions::list_subscriptions,
        super::subscriptions::get_subscription,
        super::checkout::create_checkout_session,
        super::checkout::get_checkout_session,
        super::portal::create_portal_session,
        super::subscriptions::change_subscription,
        super::subscriptions::cancel_subscription,
        super::subscriptions::resume_subscription,
        super::catalog::list_products,
        super::catalog::list_prices,
        super::audit::list_audit_log,
        super::provider_events::list_provider_events,
        super::provider_events::get_provider_event,
        super::provider_events::replay_provider_event,
        super::events::list_events,
        super::events::get_event,
        super::webhook_endpoints::create_webhook_endpoint,
        super::webhook_endpoints::list_webhook_endpoints,
        super::webhook_endpoints::get_webhook_endpoint,
        super::webhook_endpoints::delete_webhook_endpoint,
        super::webhook_endpoints::rotate_webhook_endpoint_secret,
        super::webhook_endpoints::enable_webhook_endpoint,
        super::webhook_endpoints::list_deliveries,
        super::webhook_endpoints::retry_delivery,
        super::health::livez,
        super::health::readyz,
        super::health::health,
        super::health::metrics,
    ),
    components(schemas(super::error::ErrorBody, super::error::ErrorDetail, super::error::ErrorType)),
    modifiers(&BearerAuth, &RateLimited),
    tags(
        (name = "customers", description = "The application's users"),
        (name = "entitlements", description = "What customers may use now, and their credits"),
        (name = "orders", description = "One-time purchases, as the provider reported them"),
        (name = "subscriptions", description = "Subscriptions, mirrored from the provider"),
        (name = "checkout", description = "Selling: checkout sessions on the provider's hosted page, and the customer portal"),
        (name = "catalog", description = "Products and prices from tollgate.toml"),
        (name = "audit", description = "The tamper-evident change log (admin scope)"),
        (name = "provider events", description = "The inbox of provider webhooks (admin scope)"),
        (name = "events", description = "Canonical events, as the application's webhooks deliver them"),
        (name = "webhooks", description = "Where the application receives events, and every delivery (admin scope)"),
        (name = "operations", description = "Health and metrics, without an API key"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "api_key",
            SecurityScheme::Http(
                HttpBuilder::new()
                    .scheme(HttpAuthScheme::Bearer)
                    .bearer_format("tg_test_… or tg_live_…")
                    .description(Some(
                        "An API key from `tollgate api-key create`; scopes read ⊂ write ⊂ admin.",
                    ))
                    .build(),
            ),
        );
    }
}

/// Every `/v1` operation may be refused by a rate limit; documented once as
/// a shared response rather than repeated on each handler.
struct RateLimited;

impl Modify for RateLimited {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        use utoipa::openapi::content::ContentBuilder;
        use utoipa::openapi::header::HeaderBuilder;
        use utoipa::openapi::schema::{Object, Type};
        use utoipa::openapi::{Ref, RefOr, ResponseBuilder};

        let integer = |description: &str| {
            HeaderBuilder::new()
                .schema(Object::with_type(Type::Integer))
                .description(Some(description))
                .build()
        };
        let response = ResponseBuilder::new()
            .description(
                "Rate limited (`rate_limit_error`): too many requests for this API key \
                 (`RATE_LIMIT_PER_KEY`) or from this address (`RATE_LIMIT_PER_IP`). \
                 Every `/v1` response carries `RateLimit-Limit`, `RateLimit-Remaining` and \
                 `RateLimit-Reset` for the limit closest to running out.",
            )
            .header("Retry-After", integer("Seconds to wait before retrying (at least 1)."))
            .header("RateLimit-Limit", integer("Requests allowed at once (`RATE_LIMIT_BURST`)."))
            .header("RateLimit-Remaining", integer("Requests allowed now: 0."))
            .header("RateLimit-Reset", integer("Seconds until the full allowance is back."))
            .content(
                "application/json",
                ContentBuilder::new().schema(Some(Ref::from_schema_name("ErrorBody"))).build(),
            )
            .build();
        openapi
            .components
            .get_or_insert_with(Default::default)
            .responses
            .insert("RateLimited".to_owned(), response.into());
        for (path, item) in openapi.paths.paths.iter_mut() {
            if !path.starts_with("/v1/") {
                continue;
            }
            let operations =
                [&mut item.get, &mut item.put, &mut item.post, &mut item.delete, &mut item.patch];
            for operation in operations.into_iter().flatten() {
                operation
                    .responses
                    .responses
                    .insert("429".to_owned(), RefOr::Ref(Ref::from_response_name("RateLimited")));
            }
        }
    }
}

/// The document with the running version, as served and snapshot-tested.
pub fn openapi() -> utoipa::openapi::OpenApi {
    let mut doc = ApiDoc::openapi();
    doc.info.version = env!("CARGO_PKG_VERSION").to_owned();
    doc
}

pub fn router() -> Router<AppState> {
    Router::new().route("/openapi.json", get(|| async { Json(openapi()) })).route("/docs", get(docs_page))
}

const DOCS_PAGE: &str = include_str!("docs.html");

async fn docs_page() -> impl IntoResponse {
    (
        [(
            header::CONTENT_SECURITY_POLICY,
            "default-src 'none'; script-src 'unsafe-inline'; style-src 'unsafe-inline'; connect-src 'self'; frame-ancestors 'none'",
        )],
        Html(DOCS_PAGE),
    )
}
