//! The HTTP surface: the `/v1` API for applications, operational endpoints,
//! and the layers that give every response the same conventions.

use std::convert::Infallible;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::extract::Request;
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::Router;
use futures_util::future::Either;
use metrics_exporter_prometheus::PrometheusHandle;
use serde::Serialize;
use tokio_util::sync::CancellationToken;
use tower::{Service, ServiceBuilder};
use tower_http::cors::{AllowOrigin, CorsLayer};

use crate::config::Config;
use crate::store::{Listed, Store};

pub mod audit;
pub mod catalog;
pub mod checkout;
pub mod customers;
pub mod docs;
pub mod entitlements;
pub mod error;
pub mod events;
pub mod extract;
pub mod health;
pub mod middleware;
pub mod orders;
pub mod portal;
pub mod provider_events;
pub mod ratelimit;
pub mod subscriptions;
pub mod tls;
pub mod tokens;
pub mod webhook_endpoints;

/// What every handler can reach: one pointer, because axum clones the
/// state for every layer and handler of every request (cloning the dozen
/// handles inside, each an atomic increment and decrement, was the
/// largest cost of an entitlement check).
#[derive(Clone)]
pub struct AppState(Arc<AppStateInner>);

impl AppState {
    pub fn new(inner: AppStateInner) -> Self {
        AppState(Arc::new(inner))
    }
}

impl std::ops::Deref for AppState {
    type Target = AppStateInner;

    fn deref(&self) -> &AppStateInner {
        &self.0
    }
}

/// The handles behind [`AppState`].
pub struct AppStateInner {
    pub store: Store,
    pub config: Arc<Config>,
    pub metrics: PrometheusHandle,
    pub redis: Option<redis::Client>,
    /// Cancelled when the process begins to shut down: readiness fails at
    /// once so load balancers drain us.
    pub shutdown: CancellationToken,
    pub https: bool,
    pub max_body_bytes: usize,
    pub request_timeout_seconds: i64,
    pub idempotency_ttl_seconds: i64,
    /// Requests being handled now, reported by `/health` so operators can
    /// watch a drain.
    pub in_flight: InFlight,
    /// The request counter and latency histogram of each route, method and
    /// status, built on first use.
    pub request_metrics: middleware::RequestMetrics,
    /// The built-in Stripe emulator, when no Stripe key is configured.
    pub emulator: Option<crate::providers::stripe_emulator::Emulator>,
    /// Where verified provider webhooks are made durable.
    pub inbox: crate::webhooks::inbox::Inbox,
    pub stripe_webhook_secrets: crate::webhooks::Secrets,
    /// Nudges the inbox workers when new events are stored.
    pub inbox_wake: Arc<tokio::sync::Notify>,
    pub rate_limits: Arc<crate::ratelimit::RateLimits>,
    /// Proxies whose `X-Forwarded-For` is believed (`TRUSTED_PROXIES`).
    pub trusted_proxies: Arc<[ipnet::IpNet]>,
    /// The provider's API (Stripe, or the built-in emulator), with its
    /// retries and circuit breaker.
    pub stripe: crate::providers::stripe::StripeClient,
    /// The keys that sign entitlement tokens.
    pub keys: crate::tokens::keys::KeyRing,
}

/// A counter of requests in progress, entered by [`InFlightGuard`].
#[derive(Default)]
pub struct InFlight(std::sync::atomic::AtomicUsize);

impl InFlight {
    pub fn count(&self) -> usize {
        self.0.load(std::sync::atomic::Ordering::Relaxed)
    }
}

/// Counts a request as in progress until dropped. It holds the state the
/// request's future keeps anyway, so counting costs no reference count of
/// its own (each one an atomic on a line both server threads write).
pub struct InFlightGuard(AppState);

impl InFlightGuard {
    pub fn enter(state: AppState) -> Self {
        state.in_flight.0.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        InFlightGuard(state)
    }
}

impl std::ops::Deref for InFlightGuard {
    type Target = AppState;

    fn deref(&self) -> &AppState {
        &self.0
    }
}

impl Drop for InFlightGuard {
    fn drop(&mut self) {
        self.0.in_flight.0.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
    }
}

/// Stripe's list envelope.
#[derive(Debug, Serialize, utoipa::ToSchema)]
pub struct ListResponse<T> {
    #[schema(example = "list")]
    pub object: &'static str,
    pub data: Vec<T>,
    /// Whether more objects lie beyond this page in the direction walked.
    pub has_more: bool,
    pub url: &'static str,
}

impl<T> ListResponse<T> {
    pub fn new<R>(url: &'static str, listed: Listed<R>, convert: impl FnMut(R) -> T) -> Self {
        ListResponse {
            object: "list",
            data: listed.data.into_iter().map(convert).collect(),
            has_more: listed.has_more,
            url,
        }
    }
}

/// A JSON answer, as `axum::Json` gives, sized for what happens to it on
/// the way out. axum's starts its header map with room for one header and
/// its body with 128 bytes, so every answer grew both: besides
/// `Content-Type`, up to thirteen headers are added (`Content-Length`,
/// security, `Vary`, `Request-Id`, rate limits, CORS), and an entitlement
/// check's body is longer than 128 bytes. Both growths were a
/// reallocation and a copy on every request. (The edge's `reserve` is then
/// free for these answers.)
pub struct Json<T>(pub T);

/// The headers an answer carries once the edge is done with it.
const ANSWER_HEADERS: usize = 14;

impl<T: Serialize> IntoResponse for Json<T> {
    fn into_response(self) -> Response {
        let mut body = Vec::with_capacity(512);
        if let Err(cause) = serde_json::to_writer(&mut body, &self.0) {
            // Only a `Serialize` implementation that refuses its own value
            // (a map with keys that are not strings) gets here.
            return error::ApiError::internal(cause).into_response();
        }
        let mut headers = HeaderMap::with_capacity(ANSWER_HEADERS);
        headers.insert(header::CONTENT_TYPE, HeaderValue::from_static("application/json"));
        let mut response = Response::new(axum::body::Body::from(body));
        *response.headers_mut() = headers;
        response
    }
}

/// Where `serve` mounts the Stripe emulator when no Stripe key is set.
pub const EMULATOR_PREFIX: &str = "/emulator/stripe";

/// The whole HTTP service: tollgate's router inside its edge (request ids,
/// logs, metrics, JSON errors, security headers, CORS), and the Stripe
/// emulator beside it when there is one. One `Arc`, because hyper clones
/// the service for every request.
#[derive(Clone)]
pub struct HttpService(Arc<Services>);

struct Services {
    edge: EdgeService,
    /// Requests under [`EMULATOR_PREFIX`], which the emulator answers; its
    /// fallback is the edge, so unknown paths there get tollgate's 404 as
    /// before.
    emulator: Option<Router>,
}

impl Service<Request> for HttpService {
    type Response = Response;
    type Error = Infallible;
    type Future = Either<middleware::EdgeFuture, RouteFuture<Infallible>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        match &self.0.emulator {
            Some(emulator) if is_emulator_path(req.uri().path()) => Either::Right(emulator.clone().call(req)),
            _ => Either::Left(self.0.edge.0.call(req)),
        }
    }
}

/// The edge as a service of its own, for the emulator's fallback.
#[derive(Clone)]
struct EdgeService(Arc<middleware::Edge>);

impl Service<Request> for EdgeService {
    type Response = Response;
    type Error = Infallible;
    type Future = middleware::EdgeFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request) -> Self::Future {
        self.0.call(req)
    }
}

fn is_emulator_path(path: &str) -> bool {
    path.strip_prefix(EMULATOR_PREFIX).is_some_and(|rest| rest.is_empty() || rest.starts_with('/'))
}

pub fn router(state: AppState) -> HttpService {
    let config = state.config.clone();
    let emulator = state.emulator.clone();
    // Each `Router::layer` boxes every route once more, and every request
    // clones the boxed stack below each box, so layers are composed with
    // `ServiceBuilder` (plain nested services) into as few boxes as the
    // routing allows: one per route (its limits and, on `/v1`, the API
    // layer), the edge and CORS outside the router. Outer to inner: the
    // body limit, the request timeout (both JSON-ed by the edge), then, on
    // `/v1`, the address limit, authentication, the key limit and
    // idempotency. Each route's outermost layer tells the edge which route
    // matched, so an answer from the limits (a 413 before any body is
    // read) is counted under its route too.
    let limits = middleware::RouteLimitsLayer {
        max_body_bytes: config.max_body_bytes,
        timeout: Duration::from_secs(config.request_timeout_seconds.max(1)),
    };
    let v1 = Router::new()
        .merge(customers::router())
        .merge(entitlements::router())
        .merge(orders::router())
        .merge(subscriptions::router())
        .merge(catalog::router())
        .merge(checkout::router())
        .merge(portal::router())
        .merge(audit::router())
        .merge(provider_events::router())
        .merge(events::router())
        .merge(webhook_endpoints::router())
        .merge(tokens::router())
        .layer(
            ServiceBuilder::new()
                .layer(middleware::RouteLabelLayer)
                .layer(limits)
                .layer(middleware::ApiLayer(state.clone())),
        );
    let operational = Router::new()
        .merge(health::router())
        .merge(tokens::public_router())
        .merge(docs::router())
        .layer(ServiceBuilder::new().layer(middleware::RouteLabelLayer).layer(limits));

    // `/v1` routes carry their prefix rather than being nested: `nest` adds
    // two more layers to every route (prefix stripping, nested path) that
    // each request paid for. Matched paths are the same strings.
    let app = Router::new()
        .merge(v1)
        .merge(operational)
        // Webhooks enforce their own size limit, answering 400 as providers
        // expect. Merging a router whose fallback is the default takes its
        // fallback, so merged last, the 404 for unknown paths (`/v1/…` too)
        // is the webhooks router's: outside the limits and `/v1` layers.
        .merge(crate::webhooks::router().layer(middleware::RouteLabelLayer))
        .with_state(state.clone());
    let edge = EdgeService(Arc::new(middleware::Edge::new(state, app, cors(&config))));
    // The emulator speaks Stripe's conventions, not tollgate's, so it sits
    // outside tollgate's layers.
    let emulator =
        emulator.map(|em| Router::new().nest(EMULATOR_PREFIX, em.router()).fallback_service(edge.clone()));
    HttpService(Arc::new(Services { edge, emulator }))
}

/// CORS for browser callers from `ALLOWED_ORIGINS`; none listed, none allowed.
fn cors(config: &Config) -> CorsLayer {
    let origins: Vec<HeaderValue> = config
        .allowed_origins
        .iter()
        .map(|o| o.trim())
        .filter(|o| !o.is_empty() && *o != "*")
        .filter_map(|o| HeaderValue::from_str(o).ok())
        .collect();
    let allow = if config.allowed_origins.iter().any(|o| o.trim() == "*") && !config.is_production() {
        AllowOrigin::any()
    } else {
        AllowOrigin::list(origins)
    };
    CorsLayer::new()
        .allow_origin(allow)
        .allow_methods([Method::GET, Method::POST, Method::PUT, Method::DELETE])
        .allow_headers([
            header::AUTHORIZATION,
            header::CONTENT_TYPE,
            HeaderName::from_static("idempotency-key"),
            HeaderName::from_static("x-request-id"),
        ])
        .expose_headers([
            HeaderName::from_static("request-id"),
            HeaderName::from_static("idempotent-replayed"),
            header::RETRY_AFTER,
            HeaderName::from_static(ratelimit::LIMIT),
            HeaderName::from_static(ratelimit::REMAINING),
            HeaderName::from_static(ratelimit::RESET),
        ])
        .max_age(Duration::from_secs(600))
}
