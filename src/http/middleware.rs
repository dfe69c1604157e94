//! Layers every request passes through: request ids and tracing, metrics,
//! JSON errors for bare statuses, authentication, and idempotency.

use std::cell::Cell;
use std::collections::HashMap;
use std::convert::Infallible;
use std::future::Future;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::pin::Pin;
use std::sync::{PoisonError, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use axum::body::{Body, HttpBody};
use axum::extract::{MatchedPath, Request};
use axum::http::{header, HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::future::RouteFuture;
use axum::routing::Route;
use axum::Router;
use bytes::Bytes;
use futures_util::future::Either;
use sha2::{Digest, Sha256};
use tower::{Layer, Service, ServiceExt};
use tower_http::cors::{Cors, CorsLayer};
use tracing::Instrument;

use super::error::{ApiError, ErrorType, RequestContext, REQUEST};
use super::extract::Principal;
use super::{ratelimit, AppState, InFlightGuard};
use crate::auth;
use crate::ratelimit::Decision;
use crate::store::cache::Ticket;
use crate::store::idempotency::{Claim, StoredResponse};

pub const REQUEST_ID_HEADER: &str = "request-id";
const REQUEST_ID_NAME: HeaderName = HeaderName::from_static(REQUEST_ID_HEADER);
const X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// Accepts a caller's `X-Request-Id` only if it is short and plain, so ids
/// can be logged and echoed without escaping.
fn incoming_request_id(headers: &HeaderMap) -> Option<HeaderValue> {
    let raw = headers.get(X_REQUEST_ID)?;
    let bytes = raw.as_bytes();
    let ok = !bytes.is_empty()
        && bytes.len() <= 128
        && bytes.iter().all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':'));
    ok.then(|| raw.clone())
}

/// The request's id: the caller's, or a new one of the request's arrival.
fn request_id(headers: &HeaderMap, arrived: Instant) -> HeaderValue {
    incoming_request_id(headers).unwrap_or_else(|| {
        // A new id is ASCII letters, digits and `_`, always a valid value.
        HeaderValue::from_bytes(crate::ids::new_request_id(arrived).as_bytes())
            .unwrap_or_else(|_| HeaderValue::from_static("req_"))
    })
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

/// The outermost layer, wrapped once around the whole router (not per
/// route): what were four layers (request id, tracing and metrics; JSON
/// errors; security headers; panic catching) plus CORS. axum boxes every
/// route once per `Router::layer` and clones each route's boxed stack for
/// every request, so the edge and CORS, outside the router, cost no box,
/// clone or boxed future of their own. It is shared behind an `Arc`:
/// hyper clones the whole service for every request, and CORS alone
/// (its origin list, its `Vary` names) is several allocations to clone.
pub struct Edge {
    state: AppState,
    router: Router,
    /// The same router behind CORS, for requests from browsers.
    cors: Cors<Router>,
}

/// Tells the edge which route matched; called by [`RouteLabelLayer`], the
/// outermost layer each route carries, when the router hands it the
/// request.
fn note_route<B>(req: &Request<B>) {
    if let Some(route) = req.extensions().get::<MatchedPath>() {
        let _ = REQUEST.try_with(|request| request.route.set(Some(route.clone())));
        tracing::Span::current().record("route", route.as_str());
    }
}

/// Notes the matched route for the edge (see [`note_route`]), outside
/// the route's limits, so their answers are counted under it too.
#[derive(Clone, Copy)]
pub struct RouteLabelLayer;

impl<S> Layer<S> for RouteLabelLayer {
    type Service = RouteLabel<S>;

    fn layer(&self, inner: S) -> RouteLabel<S> {
        RouteLabel(inner)
    }
}

#[derive(Clone)]
pub struct RouteLabel<S>(S);

impl<S, B> Service<Request<B>> for RouteLabel<S>
where
    S: Service<Request<B>>,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = S::Future;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.0.poll_ready(cx)
    }

    fn call(&mut self, req: Request<B>) -> S::Future {
        note_route(&req);
        self.0.call(req)
    }
}

impl Edge {
    pub fn new(state: AppState, router: Router, cors: CorsLayer) -> Self {
        Edge { state, cors: cors.layer(router.clone()), router }
    }

    /// Gives the request an id, a span, a log line and metrics. Headers are
    /// not recorded, so keys and signatures never reach the logs.
    pub fn call(&self, req: Request) -> EdgeFuture {
        let started = Instant::now();
        let request_id = request_id(req.headers(), started);
        let method_label = method_label(req.method());
        // Kept for the message of an error a layer answers with a bare status.
        let (method, uri) = (req.method().clone(), req.uri().clone());
        let span = tracing::info_span!(
            "request",
            request_id = request_id.to_str().unwrap_or_default(),
            method = method_label,
            route = tracing::field::Empty,
            api_key = tracing::field::Empty
        );
        // Browsers send `Origin` on every cross-origin request and every
        // preflight (`OPTIONS`); without one, CORS would only add headers
        // no client reads (`Access-Control-Expose-Headers`), built anew
        // for each response.
        let cross_origin = *req.method() == Method::OPTIONS || req.headers().contains_key(header::ORIGIN);
        let state = InFlightGuard::enter(self.state.clone());
        // Panics are caught in `call` too, as tower-http's `CatchPanic` did.
        let inner = catch_unwind(AssertUnwindSafe(|| {
            // `Service::call` takes `&mut`: each request calls its own
            // handle on the router (one reference count), and browsers'
            // requests their own CORS (rarer, and dearer to clone).
            if cross_origin {
                Either::Left(self.cors.clone().call(req))
            } else {
                Either::Right(self.router.clone().call(req))
            }
        }));
        let answer = match inner {
            Ok(routed) => Either::Left(Caught(routed)),
            Err(panic) => Either::Right(std::future::ready(Err(panic))),
        };
        let answering = Answering { answer, method, uri, https: state.https, cross_origin };
        let context = RequestContext { id: Cell::new(Some(request_id)), route: Cell::new(None) };
        EdgeFuture {
            answering: Box::pin(REQUEST.scope(context, answering).instrument(span.clone())),
            span,
            state,
            started,
            method_label,
        }
    }
}

/// What the router (behind CORS for browsers' requests) answers with.
type Routed = Either<tower_http::cors::ResponseFuture<RouteFuture<Infallible>>, RouteFuture<Infallible>>;

/// The edge's future: the request's answer, then its metrics and log line.
/// Futures written out rather than `async` blocks: an `async` block keeps
/// a slot for each future it awaits beside the variables it was built
/// from, so the edge's was 2.5 kB, allocated and copied for every request;
/// this one is one allocation of what the request needs, which stays put
/// while it is polled.
pub struct EdgeFuture {
    answering: Pin<
        Box<
            tracing::instrument::Instrumented<
                tokio::task::futures::TaskLocalFuture<RequestContext, Answering>,
            >,
        >,
    >,
    span: tracing::Span,
    state: InFlightGuard,
    started: Instant,
    method_label: &'static str,
}

impl Future for EdgeFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Poll::Ready((response, route)) = this.answering.as_mut().poll(cx) else { return Poll::Pending };
        let elapsed = this.started.elapsed();
        let status = response.status();
        let route = route.as_ref().map_or("unmatched", MatchedPath::as_str);
        this.state.request_metrics.record(this.method_label, route, status, elapsed);
        this.span.record("route", route);
        this.span.in_scope(|| {
            let ms = elapsed.as_secs_f64() * 1000.0;
            if status.is_server_error() {
                tracing::warn!(status = status.as_u16(), duration_ms = ms, "request failed");
            } else {
                tracing::info!(status = status.as_u16(), duration_ms = ms, "request");
            }
        });
        Poll::Ready(Ok(response))
    }
}

/// The answer with the edge's conventions applied (JSON errors, security
/// headers, `Vary`, `Request-Id`), and the route that gave it; polled
/// inside the request's [`REQUEST`] scope.
pub struct Answering {
    answer: Either<Caught<Routed>, std::future::Ready<std::thread::Result<Result<Response, Infallible>>>>,
    /// Kept for the message of an error a layer answers with a bare status.
    method: Method,
    uri: Uri,
    https: bool,
    cross_origin: bool,
}

impl Future for Answering {
    type Output = (Response, Option<MatchedPath>);

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let Poll::Ready(answer) = Pin::new(&mut this.answer).poll(cx) else { return Poll::Pending };
        let response = match answer {
            Ok(Ok(response)) => response,
            Ok(Err(never)) => match never {},
            Err(panic) => response_for_panic(panic),
        };
        let mut response = json_errors(response, &this.method, &this.uri);
        // Room for what this layer and CORS add, in one allocation rather
        // than the map growing twice.
        response.headers_mut().reserve(8);
        security_headers(response.headers_mut(), this.https);
        if !this.cross_origin && may_be_stored(response.headers()) {
            // What CORS would answer depends on `Origin`, so a cache must
            // not reuse this response for a request that has one. (No cache
            // keeps a `no-store` answer, most of the API's, so it needs no
            // `Vary`: one header less to write and parse on each.)
            response.headers_mut().append(header::VARY, HeaderValue::from_static("origin"));
        }
        let (id, route) = REQUEST.with(|request| (request.id.take(), request.route.take()));
        if let Some(id) = id {
            response.headers_mut().insert(REQUEST_ID_NAME, id);
        }
        Poll::Ready((response, route))
    }
}

/// `http_requests_total` and `http_request_duration_seconds` by method,
/// route and status. The handles are built once per series and kept:
/// `metrics::counter!` with owned label strings built a key, hashed it and
/// looked it up in the registry on every request. Routes are `MatchedPath`
/// templates or `unmatched` and methods a fixed set, so the map is bounded.
/// Its keys are those templates, never a caller's text, so it hashes with
/// foldhash rather than SipHash (which resists collisions crafted by
/// callers, at several times the cost per request).
#[derive(Default)]
pub struct RequestMetrics(RwLock<HashMap<Box<str>, Vec<Series>, foldhash::fast::RandomState>>);

struct Series {
    method: &'static str,
    status: u16,
    requests: metrics::Counter,
    duration: metrics::Histogram,
}

impl RequestMetrics {
    fn record(&self, method: &'static str, route: &str, status: StatusCode, elapsed: Duration) {
        let status = status.as_u16();
        let seconds = elapsed.as_secs_f64();
        let find = |all: &[Series]| all.iter().position(|s| s.method == method && s.status == status);
        {
            let routes = self.0.read().unwrap_or_else(PoisonError::into_inner);
            if let Some(all) = routes.get(route) {
                if let Some(i) = find(all) {
                    all[i].requests.increment(1);
                    all[i].duration.record(seconds);
                    return;
                }
            }
        }
        let labels =
            [("method", method.to_owned()), ("route", route.to_owned()), ("status", status.to_string())];
        let series = Series {
            method,
            status,
            requests: metrics::counter!("http_requests_total", &labels),
            duration: metrics::histogram!("http_request_duration_seconds", &labels),
        };
        series.requests.increment(1);
        series.duration.record(seconds);
        let mut routes = self.0.write().unwrap_or_else(PoisonError::into_inner);
        let all = routes.entry(route.into()).or_default();
        if find(all).is_none() {
            all.push(series);
        }
    }
}

/// Any token is a valid HTTP method; only known ones become label values,
/// so junk requests cannot mint unbounded metric series.
fn method_label(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::HEAD => "HEAD",
        Method::POST => "POST",
        Method::PUT => "PUT",
        Method::PATCH => "PATCH",
        Method::DELETE => "DELETE",
        Method::OPTIONS => "OPTIONS",
        _ => "other",
    }
}

/// Polls a future, turning a panic into an error instead of unwinding
/// through the server.
pub struct Caught<F>(F);

impl<F: Future + Unpin> Future for Caught<F> {
    type Output = std::thread::Result<F::Output>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let future = &mut self.get_mut().0;
        match catch_unwind(AssertUnwindSafe(|| Pin::new(&mut *future).poll(cx))) {
            Ok(Poll::Ready(output)) => Poll::Ready(Ok(output)),
            Ok(Poll::Pending) => Poll::Pending,
            Err(panic) => Poll::Ready(Err(panic)),
        }
    }
}

/// What tower-http's `CatchPanic` answered (logged, then a bare 500 that
/// [`json_errors`] turns into the API's opaque internal error).
fn response_for_panic(panic: Box<dyn std::any::Any + Send>) -> Response {
    if let Some(s) = panic.downcast_ref::<String>() {
        tracing::error!("Service panicked: {}", s);
    } else if let Some(s) = panic.downcast_ref::<&str>() {
        tracing::error!("Service panicked: {}", s);
    } else {
        tracing::error!("Service panicked but `CatchPanic` was unable to downcast the panic info");
    }
    let mut response = Response::new(Body::from("Service panicked"));
    *response.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
    response
        .headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static("text/plain; charset=utf-8"));
    response
}

/// Layers outside the handlers (routing fallback, 405, body limits, timeouts,
/// panic catching) answer with bare statuses; this rewrites any error that is
/// not already JSON into the API's error shape.
fn json_errors(response: Response, method: &Method, uri: &Uri) -> Response {
    let status = response.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return response;
    }
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|ct| ct.as_bytes().starts_with(b"application/json"));
    if is_json {
        return response;
    }
    // Keep the layers' headers (Allow, Retry-After, CORS, security); swap
    // the body and its type.
    let (mut parts, _) = response.into_parts();
    let replacement = ApiError::for_status(status, method.as_str(), uri.path()).into_response();
    let (new_parts, body) = replacement.into_parts();
    parts.headers.remove(header::CONTENT_LENGTH);
    if let Some(ct) = new_parts.headers.get(header::CONTENT_TYPE) {
        parts.headers.insert(header::CONTENT_TYPE, ct.clone());
    }
    Response::from_parts(parts, body)
}

/// Whether a cache may keep this answer (it is not `no-store`).
fn may_be_stored(headers: &HeaderMap) -> bool {
    let directives = headers.get_all(header::CACHE_CONTROL).iter().filter_map(|v| v.to_str().ok());
    !directives.flat_map(|v| v.split(',')).any(|d| d.trim().eq_ignore_ascii_case("no-store"))
}

/// Security headers on every response: OWASP's set for API responses
/// (`nosniff`, framing refused by CSP and, for browsers without CSP
/// Level 2, `X-Frame-Options`; HSTS only when tollgate is served over
/// https, where browsers honour it). `Referrer-Policy` governs the
/// requests a document makes, so it goes only on what a browser may treat
/// as one (the HTML docs, plain text), not on JSON, which is most
/// responses: each header is written, sent and parsed on every request.
/// JSON answers are `Cache-Control: no-store` unless their handler said
/// otherwise (the JWKS is meant to be cached): they carry a customer's
/// entitlements, tokens and orders, which no browser or proxy cache should
/// keep or hand to someone else.
fn security_headers(h: &mut HeaderMap, https: bool) {
    h.insert(header::X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(header::X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    let json = h.get(header::CONTENT_TYPE).is_some_and(|ct| ct.as_bytes().starts_with(b"application/json"));
    if !json {
        h.insert(header::REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    } else if !h.contains_key(header::CACHE_CONTROL) {
        h.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    }
    if !h.contains_key(header::CONTENT_SECURITY_POLICY) {
        h.insert(
            header::CONTENT_SECURITY_POLICY,
            HeaderValue::from_static("default-src 'none'; frame-ancestors 'none'"),
        );
    }
    if https {
        h.insert(
            header::STRICT_TRANSPORT_SECURITY,
            HeaderValue::from_static("max-age=63072000; includeSubDomains"),
        );
    }
}

/// The limits on every route but the providers' webhooks (which enforce
/// their own size, answering as providers expect), in one layer: the
/// body's size and the request's time. Limits outside the handlers answer
/// with a bare status, which the edge turns into the API's JSON error.
///
/// The size: a declared `Content-Length` over the limit is a 413 before
/// anything is read; a longer body than declared, or one sent in chunks,
/// fails when read past the limit (a 413 from the extractors). tower-http's
/// `RequestBodyLimit` did the same, but wrapped every request's body and
/// every response's body in its own type, which axum then boxed: two
/// allocations per request, though most requests (every entitlement
/// check) have no body at all. Here an empty body is left as it is and a
/// response is not touched.
///
/// The time: a bare 408 when the request is not done within the limit, as
/// tower-http's `TimeoutLayer` did. Unlike it, the timer is armed only once
/// the request has had to wait: tower-http polls a fresh timer before the
/// request on every call, so every request inserted an entry into the
/// runtime's timer wheel and removed it again, though most requests are
/// answered on their first poll. For the same reason the limit counts from
/// the request's first wait, not from its arrival: reading the clock is a
/// measurable share of a cached check. The work before that first wait is
/// not limited; it is short (a request stops at the first thing it waits
/// for), and no handler computes for long without waiting.
#[derive(Clone, Copy)]
pub struct RouteLimitsLayer {
    pub max_body_bytes: usize,
    pub timeout: Duration,
}

impl<S> Layer<S> for RouteLimitsLayer {
    type Service = RouteLimits<S>;

    fn layer(&self, inner: S) -> RouteLimits<S> {
        RouteLimits { inner, limits: *self }
    }
}

#[derive(Clone)]
pub struct RouteLimits<S> {
    inner: S,
    limits: RouteLimitsLayer,
}

impl<S> Service<Request> for RouteLimits<S>
where
    S: Service<Request, Response = Response>,
    S::Future: Unpin,
{
    type Response = Response;
    type Error = S::Error;
    type Future = Either<std::future::Ready<Result<Response, S::Error>>, TimeoutFuture<S::Future>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, req: Request) -> Self::Future {
        let max = self.limits.max_body_bytes;
        let declared = req
            .headers()
            .get(header::CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|length| length > max as u64) {
            return Either::Left(std::future::ready(Ok(bare(StatusCode::PAYLOAD_TOO_LARGE))));
        }
        let req = if req.body().is_end_stream() {
            req
        } else {
            req.map(|body| Body::new(http_body_util::Limited::new(body, max)))
        };
        Either::Right(TimeoutFuture {
            inner: self.inner.call(req),
            timeout: self.limits.timeout,
            sleep: None,
        })
    }
}

fn bare(status: StatusCode) -> Response {
    let mut response = Response::new(Body::empty());
    *response.status_mut() = status;
    response
}

pub struct TimeoutFuture<F> {
    inner: F,
    timeout: Duration,
    /// Created on the first poll that leaves the request waiting.
    sleep: Option<Pin<Box<tokio::time::Sleep>>>,
}

impl<F, E> Future for TimeoutFuture<F>
where
    F: Future<Output = Result<Response, E>> + Unpin,
{
    type Output = Result<Response, E>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = &mut *self;
        if let Poll::Ready(output) = Pin::new(&mut this.inner).poll(cx) {
            return Poll::Ready(output);
        }
        let timeout = this.timeout;
        let sleep = this.sleep.get_or_insert_with(|| Box::pin(tokio::time::sleep(timeout)));
        match sleep.as_mut().poll(cx) {
            Poll::Ready(()) => Poll::Ready(Ok(bare(StatusCode::REQUEST_TIMEOUT))),
            Poll::Pending => Poll::Pending,
        }
    }
}

/// The `/v1` layer (see [`api`]), as a plain `tower` layer for the same
/// reason as [`Edge`].
#[derive(Clone)]
pub struct ApiLayer(pub AppState);

impl Layer<Route> for ApiLayer {
    type Service = Api;

    fn layer(&self, inner: Route) -> Api {
        Api { state: self.0.clone(), inner }
    }
}

#[derive(Clone)]
pub struct Api {
    state: AppState,
    inner: Route,
}

impl<B> Service<Request<B>> for Api
where
    B: HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = Infallible;
    type Future = ApiFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
        Poll::Ready(Ok(()))
    }

    /// Most requests are admitted without waiting for anything: their key
    /// is in the cache, the limits are kept in this process, and they carry
    /// no idempotency key. Those are decided here and go to their route
    /// as they are; the others take [`api`]'s path, boxed. The request,
    /// two hundred bytes and more, was otherwise moved through four nested
    /// futures, and the route cloned twice, on every request.
    fn call(&mut self, req: Request<B>) -> ApiFuture {
        let req = req.map(Body::new);
        // Looked up here only when the limits decide at once: behind a
        // shared limit, a key is looked up after the wait for it, as a
        // key revoked meanwhile must not be served.
        let caller = if !is_idempotent_write(&req) && ratelimit::decided_here(&self.state) {
            match identify(&self.state, req.headers()) {
                Caller::Known(principal) => return self.admit_here(req, Ok(principal)),
                Caller::Refused(error) => return self.admit_here(req, Err(error)),
                unread => Some(unread),
            }
        } else {
            None
        };
        // The inner call comes after awaiting checks, so the future owns
        // the route.
        let next = self.inner.clone();
        let state = self.state.clone();
        ApiFuture::Waiting(Box::pin(async move { Ok(api(state, req, next, caller).await) }))
    }
}

impl Api {
    /// [`api`]'s steps, when none of them waits (see [`Api::call`]).
    fn admit_here(&mut self, mut req: Request, caller: Result<Principal, ApiError>) -> ApiFuture {
        let answered = |response| ApiFuture::Answered(std::future::ready(Ok(response)));
        let by_address = match ratelimit::check_address_here(&self.state, req.extensions(), req.headers()) {
            Ok(decision) => decision,
            Err(refused) => return answered(refused.into_response()),
        };
        let principal = match caller {
            Ok(principal) => principal,
            Err(error) => return answered(reported(error.into_response(), [None, by_address])),
        };
        note_caller(&principal);
        let by_key = match ratelimit::check_key_here(&self.state, &principal.record().id) {
            Ok(decision) => decision,
            Err(refused) => return answered(reported(refused.into_response(), [None, by_address])),
        };
        req.extensions_mut().insert(principal);
        ApiFuture::Admitted { route: self.inner.call(req), limits: [by_key, by_address] }
    }
}

/// [`Api`]'s answer: decided before any route ran (a refusal), a route's
/// answer that the limits' headers are added to, or [`api`]'s path.
// The large variant is the common one: a route's future, unboxed on purpose.
#[allow(clippy::large_enum_variant)]
pub enum ApiFuture {
    Answered(std::future::Ready<Result<Response, Infallible>>),
    Admitted { route: RouteFuture<Infallible>, limits: [Option<Decision>; 2] },
    Waiting(BoxFuture<Result<Response, Infallible>>),
}

impl Future for ApiFuture {
    type Output = Result<Response, Infallible>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        match self.get_mut() {
            ApiFuture::Answered(answer) => Pin::new(answer).poll(cx),
            ApiFuture::Admitted { route, limits } => match Pin::new(route).poll(cx) {
                Poll::Ready(Ok(response)) => Poll::Ready(Ok(reported(response, *limits))),
                Poll::Ready(Err(never)) => match never {},
                Poll::Pending => Poll::Pending,
            },
            ApiFuture::Waiting(future) => future.as_mut().poll(cx),
        }
    }
}

/// Adds the `RateLimit-*` headers of the limits passed, innermost first:
/// the limit per key, then per address, as [`api`] does.
fn reported(mut response: Response, limits: [Option<Decision>; 2]) -> Response {
    for decision in limits.iter().flatten() {
        ratelimit::report(response.headers_mut(), decision);
    }
    response
}

fn is_idempotent_write(req: &Request) -> bool {
    matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH)
        && req.headers().contains_key(IDEMPOTENCY_HEADER)
}

/// Everything `/v1` does before its handlers, as one layer: each layer
/// costs every request a boxed clone of the route and a boxed future, and
/// four of them were a large part of an entitlement check. In order: the
/// limit by client address (so a flood of bad keys never reaches a
/// database lookup), authentication, the limit by API key, then
/// idempotency for POST, PUT and PATCH (its keys live under the
/// authenticated API key). Each step's refusal carries the `RateLimit-*`
/// headers of the limits already passed, as when they were separate
/// layers. [`Api::admit_here`] takes the same steps when none waits.
async fn api(state: AppState, req: Request, next: Route, caller: Option<Caller>) -> Response {
    let by_address = match ratelimit::check_address(&state, req.extensions(), req.headers()).await {
        Ok(decision) => decision,
        Err(refused) => return refused.into_response(),
    };
    let response = match authenticated(&state, req, next, caller).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    reported(response, [None, by_address])
}

/// Authentication, the limit by API key and idempotency.
async fn authenticated(
    state: &AppState,
    mut req: Request,
    next: Route,
    caller: Option<Caller>,
) -> Result<Response, ApiError> {
    let caller = caller.unwrap_or_else(|| identify(state, req.headers()));
    let principal = authenticate(state, caller).await?;
    let by_key = match ratelimit::check_key(state, &principal.record().id).await {
        Ok(decision) => decision,
        Err(refused) => return Ok(refused.into_response()),
    };
    req.extensions_mut().insert(principal);
    // Boxed, and only for writes that carry a key: its state (request
    // body, database calls) would otherwise be part of every request's
    // future, allocated and moved on every read.
    let outcome = if is_idempotent_write(&req) {
        Box::pin(idempotency(state, req, next)).await
    } else {
        Ok(run(next, req).await)
    };
    let response = match outcome {
        Ok(response) => response,
        Err(error) => error.into_response(),
    };
    Ok(reported(response, [by_key, None]))
}

/// Who the `Authorization: Bearer tg_…` header says is calling, as far as
/// memory tells without waiting. Every `/v1` route requires a valid,
/// unrevoked key (401 otherwise); scope is checked by each handler's
/// extractor.
enum Caller {
    /// A live key the cache holds.
    Known(Principal),
    /// A key of the right shape that the cache could not answer for: it is
    /// read from the database (and cached when the ticket allows).
    Unread { digest: auth::KeyDigest, ticket: Option<Ticket> },
    /// No key, or not one tollgate issues.
    Refused(ApiError),
}

fn identify(state: &AppState, headers: &HeaderMap) -> Caller {
    let Some(header) = headers.get(header::AUTHORIZATION) else {
        return Caller::Refused(ApiError::unauthenticated(
            "No API key provided. Send Authorization: Bearer tg_…",
        ));
    };
    let token = header
        .to_str()
        .ok()
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let Some(token) = token else {
        return Caller::Refused(ApiError::unauthenticated("The Authorization header must be 'Bearer tg_…'."));
    };
    if !auth::looks_like_key(token) {
        return Caller::Refused(invalid_key());
    }
    let digest = auth::KeyDigest::of(token);
    match state.store.cached_api_key(digest.as_str()) {
        Ok(record) => Caller::Known(Principal::new(record)),
        Err(ticket) => Caller::Unread { digest, ticket },
    }
}

async fn authenticate(state: &AppState, caller: Caller) -> Result<Principal, ApiError> {
    let principal = match caller {
        Caller::Known(principal) => principal,
        Caller::Refused(error) => return Err(error),
        Caller::Unread { digest, ticket } => {
            let record = Box::pin(state.store.read_api_key(digest.as_str(), ticket)).await?;
            Principal::new(record.ok_or_else(invalid_key)?)
        }
    };
    note_caller(&principal);
    Ok(principal)
}

fn invalid_key() -> ApiError {
    ApiError::unauthenticated("Invalid API key provided.")
}

/// Names the caller's key (its id, never the key) in the request's span.
fn note_caller(principal: &Principal) {
    tracing::Span::current().record("api_key", principal.key_id());
}

const IDEMPOTENCY_HEADER: &str = "idempotency-key";

/// Stripe's `Idempotency-Key` semantics for every POST, PUT and PATCH:
/// the first response (below 500) is stored and replayed for the same key
/// and request; another request under the key is refused; a concurrent
/// duplicate is told to wait. Keys are per API key.
///
/// A 5xx (or an abandoned request) is not stored, so the same request
/// retried runs again; but the key stays bound to that request, since the
/// failed attempt may have had effects. Only a 409 or 429, refused before
/// anything happened, frees the key for another request.
async fn idempotency(state: &AppState, req: Request, next: Route) -> Result<Response, ApiError> {
    if !matches!(*req.method(), Method::POST | Method::PUT | Method::PATCH) {
        return Ok(run(next, req).await);
    }
    let Some(raw_key) = req.headers().get(IDEMPOTENCY_HEADER) else {
        return Ok(run(next, req).await);
    };
    let key = raw_key
        .to_str()
        .ok()
        .filter(|k| !k.is_empty() && k.len() <= 255 && k.bytes().all(|b| b.is_ascii_graphic() || b == b' '))
        .ok_or_else(|| {
            ApiError::new(
                StatusCode::BAD_REQUEST,
                ErrorType::IdempotencyError,
                "idempotency_key_invalid",
                "Idempotency-Key must be 1 to 255 printable ASCII characters.",
            )
        })?
        .to_owned();
    let Some(principal) = req.extensions().get::<Principal>().cloned() else {
        return Ok(run(next, req).await);
    };

    let (parts, body) = req.into_parts();
    let bytes = axum::body::to_bytes(body, state.max_body_bytes)
        .await
        .map_err(|_| ApiError::for_status(StatusCode::PAYLOAD_TOO_LARGE, "", ""))?;
    let mut hasher = Sha256::new();
    hasher.update(parts.method.as_str().as_bytes());
    hasher.update([0]);
    // The path the client sent, whatever a nesting router made of it.
    let uri = parts.extensions.get::<axum::extract::OriginalUri>().map_or(&parts.uri, |o| &o.0);
    hasher.update(uri.path().as_bytes());
    hasher.update([0]);
    hasher.update(&bytes);
    let fingerprint = hex::encode(hasher.finalize());

    let ttl = state.idempotency_ttl_seconds;
    let lease = state.request_timeout_seconds + 30;
    let first = match state
        .store
        .claim_idempotency_key(principal.key_id(), &key, &fingerprint, lease, ttl)
        .await?
    {
        Claim::Acquired { first } => first,
        Claim::Replay(stored) => return Ok(replay(stored)),
        Claim::InFlight => {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                ErrorType::IdempotencyError,
                "idempotency_key_in_use",
                "A request with this Idempotency-Key is still being processed; retry shortly.",
            ))
        }
        Claim::Mismatch => {
            return Err(ApiError::new(
                StatusCode::UNPROCESSABLE_ENTITY,
                ErrorType::IdempotencyError,
                "idempotency_key_reused",
                "This Idempotency-Key was already used with a different request; use a new key for a new request.",
            ))
        }
    };

    // If the request is abandoned (timeout, client gone, panic), the guard
    // frees the key so that the client's retry runs instead of waiting out
    // the lease.
    let mut guard = ReleaseOnDrop {
        store: state.store.clone(),
        api_key_id: principal.key_id().to_owned(),
        key,
        armed: true,
        forget: false,
    };
    let response = run(next, Request::from_parts(parts, Body::from(bytes))).await;
    let status = response.status();
    if status == StatusCode::TOO_MANY_REQUESTS || status == StatusCode::CONFLICT {
        // Refused, nothing done: the key is free again, for any request;
        // unless an earlier attempt ran under it (a 5xx, an abandoned
        // request), whose effects keep it bound to this request.
        guard.forget = first;
        guard.release_now().await;
        return Ok(response);
    }
    if status.is_server_error() {
        // Not an answer worth keeping: let a retry run the request again.
        // Released before the answer leaves, so a client retrying at once
        // is not told the key is still in use.
        guard.release_now().await;
        return Ok(response);
    }
    let (parts, body) = response.into_parts();
    let body = axum::body::to_bytes(body, usize::MAX).await.map_err(ApiError::internal)?;
    let stored = StoredResponse {
        status: status.as_u16(),
        content_type: parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned),
        body: body.to_vec(),
    };
    // The effect has happened; if recording the response fails, the lease
    // lapses and a retry re-runs the (idempotent by design) handler.
    guard.armed = false;
    if let Err(e) = state.store.complete_idempotency_key(&guard.api_key_id, &guard.key, &stored).await {
        tracing::warn!(error = %e, "could not store idempotent response");
    }
    Ok(Response::from_parts(parts, Body::from(body)))
}

async fn run(next: Route, req: Request) -> Response {
    next.oneshot(req).await.unwrap_or_else(|never| match never {})
}

/// Releases an idempotency claim unless disarmed: runs on every path that
/// does not store a response, including the request future being dropped.
/// Released, the key stays bound to its request; forgotten, it is free.
struct ReleaseOnDrop {
    store: crate::store::Store,
    api_key_id: String,
    key: String,
    armed: bool,
    forget: bool,
}

impl ReleaseOnDrop {
    /// Releases (or forgets) the key now, before the response is sent.
    /// (Dropped half-way, the guard is still armed and releases it as usual.)
    async fn release_now(&mut self) {
        let done = if self.forget {
            self.store.forget_idempotency_key(&self.api_key_id, &self.key).await
        } else {
            self.store.release_idempotency_key(&self.api_key_id, &self.key).await
        };
        self.armed = false;
        if let Err(e) = done {
            tracing::warn!(error = %e, "could not release idempotency key");
        }
    }
}

impl Drop for ReleaseOnDrop {
    fn drop(&mut self) {
        if !self.armed {
            return;
        }
        let (store, api_key_id, key) =
            (self.store.clone(), std::mem::take(&mut self.api_key_id), std::mem::take(&mut self.key));
        let forget = self.forget;
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            runtime.spawn(async move {
                let done = if forget {
                    store.forget_idempotency_key(&api_key_id, &key).await
                } else {
                    store.release_idempotency_key(&api_key_id, &key).await
                };
                if let Err(e) = done {
                    tracing::warn!(error = %e, "could not release idempotency key");
                }
            });
        }
    }
}

fn replay(stored: StoredResponse) -> Response {
    let mut response = Response::new(Body::from(stored.body));
    *response.status_mut() = StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK);
    if let Some(ct) = stored.content_type.and_then(|ct| HeaderValue::from_str(&ct).ok()) {
        response.headers_mut().insert(header::CONTENT_TYPE, ct);
    }
    response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
    response
}

#[cfg(test)]
mod tests {
    use axum::extract::FromRequest;

    use super::super::extract::ApiJson;
    use super::*;

    #[tokio::test]
    async fn a_panic_while_handling_becomes_the_opaque_json_500() {
        let outcome = Caught(Box::pin(async {
            tokio::task::yield_now().await;
            panic!("handler bug");
        }))
        .await;
        let Err(panic) = outcome else { panic!("the panic was not caught") };
        let response = json_errors(response_for_panic(panic), &Method::GET, &Uri::from_static("/v1/x"));
        assert_eq!(response.status(), StatusCode::INTERNAL_SERVER_ERROR);
        assert_eq!(response.headers()[header::CONTENT_TYPE], "application/json");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "internal_error");
        assert!(!body.to_string().contains("handler bug"), "the panic message stays in the log");
    }

    /// The limits' service over a handler that reads a JSON body as the
    /// API's handlers do, answering its error or 200.
    fn limited(max_body_bytes: usize) -> impl Service<Request, Response = Response, Error = Infallible> {
        let reads_the_body = tower::service_fn(|req: Request| async move {
            let read = ApiJson::<serde_json::Value>::from_request(req, &()).await;
            Ok::<_, Infallible>(read.map_or_else(IntoResponse::into_response, |_| bare(StatusCode::OK)))
        });
        RouteLimitsLayer { max_body_bytes, timeout: Duration::from_secs(5) }
            .layer(reads_the_body.map_future(Box::pin))
    }

    #[tokio::test]
    async fn bodies_over_the_limit_are_refused_whether_declared_or_streamed() {
        let declared =
            Request::post("/").header(header::CONTENT_LENGTH, "9").body(Body::from("123456789")).unwrap();
        assert_eq!(limited(8).oneshot(declared).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
        // Chunks with no declared length: refused when read past the limit.
        let chunks =
            futures_util::stream::iter([r#"{"a":"#, "12345}"].map(|c| Ok::<_, Infallible>(Bytes::from(c))));
        let streamed = Request::post("/").body(Body::from_stream(chunks)).unwrap();
        assert_eq!(limited(8).oneshot(streamed).await.unwrap().status(), StatusCode::PAYLOAD_TOO_LARGE);
        let within = Request::post("/").body(Body::from(r#"{"a":1}"#)).unwrap();
        assert_eq!(limited(8).oneshot(within).await.unwrap().status(), StatusCode::OK);
        let empty = Request::get("/").body(Body::empty()).unwrap();
        assert_eq!(limited(0).oneshot(empty).await.unwrap().status(), StatusCode::OK);
    }

    #[tokio::test]
    async fn a_bare_layer_error_is_rewritten_and_keeps_its_headers() {
        let mut bare = Response::new(Body::empty());
        *bare.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
        bare.headers_mut().insert(header::ALLOW, HeaderValue::from_static("GET"));
        let response = json_errors(bare, &Method::DELETE, &Uri::from_static("/livez"));
        assert_eq!(response.headers()[header::ALLOW], "GET");
        let body = axum::body::to_bytes(response.into_body(), usize::MAX).await.unwrap();
        let body: serde_json::Value = serde_json::from_slice(&body).unwrap();
        assert_eq!(body["error"]["code"], "method_not_allowed");
        assert_eq!(body["error"]["message"], "DELETE is not allowed on /livez.");
    }
}
