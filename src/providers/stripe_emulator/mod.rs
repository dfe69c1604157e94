//! A stateful emulator of the part of Stripe's API that tollgate uses.
//!
//! It speaks Stripe's wire format (form-encoded requests with bracketed keys,
//! Stripe's JSON objects and errors, `Idempotency-Key`, `Stripe-Version`),
//! keeps objects in memory, serves a hosted checkout page and a billing
//! portal page, emits the events Stripe emits and delivers them to webhook
//! endpoints signed exactly as Stripe signs. Development, demos and tests
//! run against it through the same client code as production.
//!
//! Runs standalone (`tollgate stripe-emulator --port N`, API at `/v1`) or
//! mounted by `tollgate serve` under `/emulator/stripe` when no Stripe key is
//! configured.

use std::ops::{Deref, DerefMut};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, RawPathParams, Request, State as AxumState};
use axum::http::{header, HeaderMap, HeaderValue, Method, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::Router;
use base64::Engine;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use tokio::sync::Notify;

pub mod billing;
pub mod checkout;
pub mod delivery;
pub mod error;
pub mod form;
pub mod objects;
pub mod pages;
pub mod params;
pub mod payments;
pub mod persist;
pub mod state;

use error::{StripeError, StripeResult};
use params::Params;
use state::State;

/// The API version whose shapes the emulator returns by default.
pub const CURRENT_API_VERSION: &str = "2025-10-29.clover";
/// The first version with the "basil" shapes: subscription periods on items,
/// invoice subscription under `parent`, no `invoice.charge`.
const BASIL: &str = "2025-03-31";

#[derive(Debug, Clone)]
pub struct EmulatorConfig {
    /// Where the emulator is reachable, including any mount prefix: hosted
    /// page URLs are built from it.
    pub public_url: String,
    /// If set, the one secret key accepted; otherwise any `sk_test_…` key.
    pub api_key: Option<String>,
    pub delivery: DeliveryOptions,
}

/// How webhook deliveries behave. Stripe does not promise order or
/// uniqueness; the knobs let tests exercise both.
#[derive(Debug, Clone)]
pub struct DeliveryOptions {
    /// Deliver due events in random order.
    pub shuffle: bool,
    /// Deliver every event twice.
    pub duplicate: bool,
    pub max_attempts: u32,
    /// Delay before the first retry; doubled each attempt, capped at a minute.
    pub first_retry: Duration,
    pub timeout: Duration,
}

impl Default for DeliveryOptions {
    fn default() -> Self {
        Self {
            shuffle: false,
            duplicate: false,
            max_attempts: 8,
            first_retry: Duration::from_secs(1),
            timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Clone)]
pub struct Emulator {
    inner: Arc<Inner>,
}

struct Inner {
    state: Mutex<State>,
    fault: Mutex<Option<Fault>>,
    config: EmulatorConfig,
    /// Woken when deliveries are queued.
    wake: Notify,
    http: reqwest::Client,
    /// Set when the state is kept in a file.
    persist: Option<Persist>,
}

/// Where the state is saved and how the saver hears of changes.
struct Persist {
    path: PathBuf,
    /// Notified by every guard that handed out the state mutably.
    changed: Notify,
    /// Set with `changed`, cleared by a save: a process that changed
    /// nothing (a load test, a read-only session) never rewrites the file.
    dirty: std::sync::atomic::AtomicBool,
    /// One save at a time, so an older copy never replaces a newer one.
    writing: Mutex<()>,
}

/// The locked state. Handing it out mutably marks it changed, so the saver
/// writes only after something may have changed, never after a read.
pub struct StateGuard<'a> {
    guard: MutexGuard<'a, State>,
    persist: Option<&'a Persist>,
    touched: bool,
}

impl StateGuard<'_> {
    /// The state, mutable without marking it changed: for requests that
    /// only read, whose incidental changes the caller detects itself.
    fn untracked(&mut self) -> &mut State {
        &mut self.guard
    }

    /// Marks the state changed.
    fn touch(&mut self) {
        self.touched = true;
    }
}

impl Deref for StateGuard<'_> {
    type Target = State;
    fn deref(&self) -> &State {
        &self.guard
    }
}

impl DerefMut for StateGuard<'_> {
    fn deref_mut(&mut self) -> &mut State {
        self.touched = true;
        &mut self.guard
    }
}

impl Drop for StateGuard<'_> {
    fn drop(&mut self) {
        if let (true, Some(persist)) = (self.touched, self.persist) {
            persist.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
            persist.changed.notify_one();
        }
    }
}

/// What a request carries besides its parameters.
#[derive(Debug, Clone)]
pub struct Ctx {
    pub version: String,
    pub path: Vec<String>,
    pub public_url: String,
}

impl Ctx {
    /// The first path parameter (`/v1/customers/{id}`).
    pub fn id(&self) -> &str {
        self.path.first().map(String::as_str).unwrap_or("")
    }
}

type Operation = fn(&mut State, &Ctx, &Params) -> StripeResult<Value>;

impl Emulator {
    /// An emulator whose state lives in memory only.
    pub fn new(config: EmulatorConfig) -> Self {
        Self::with_state(config, State::default(), None)
    }

    /// An emulator whose state is kept in `state_file` (loaded now if it
    /// exists, saved after changes by [`persist::run`] and by
    /// [`Emulator::save_now`]); in memory only when `None`.
    pub fn open(
        config: EmulatorConfig,
        state_file: Option<PathBuf>,
    ) -> Result<Self, persist::StateFileError> {
        let Some(path) = state_file else { return Ok(Self::new(config)) };
        let state = persist::load(&path)?;
        match &state {
            Some(s) => {
                tracing::info!(path = %path.display(), objects = s.object_count(), "Stripe emulator state loaded")
            }
            None => {
                tracing::info!(path = %path.display(), "Stripe emulator state will be kept in a new file")
            }
        }
        let persist =
            Persist { path, changed: Notify::new(), dirty: Default::default(), writing: Mutex::new(()) };
        Ok(Self::with_state(config, state.unwrap_or_default(), Some(persist)))
    }

    fn with_state(config: EmulatorConfig, mut state: State, persist: Option<Persist>) -> Self {
        let http = reqwest::Client::builder()
            .timeout(config.delivery.timeout)
            .user_agent("Stripe/1.0 (+https://stripe.com/docs/webhooks)")
            .build()
            .expect("HTTP client builds");
        state.duplicate_deliveries = config.delivery.duplicate;
        Emulator {
            inner: Arc::new(Inner {
                state: Mutex::new(state),
                fault: Mutex::new(None),
                config,
                wake: Notify::new(),
                http,
                persist,
            }),
        }
    }

    /// The file the state is kept in, if any.
    pub fn state_file(&self) -> Option<&std::path::Path> {
        self.inner.persist.as_ref().map(|p| p.path.as_path())
    }

    /// Writes the state to its file now if it changed since the last save
    /// (nothing without a file). Blocking: the lock is held only to clone
    /// the state, the writing happens after.
    pub fn save_now(&self) {
        let Some(persist) = self.inner.persist.as_ref() else { return };
        let _writing = persist.writing.lock().unwrap_or_else(|p| p.into_inner());
        // Cleared before the copy: a change made meanwhile is saved next time.
        if !persist.dirty.swap(false, std::sync::atomic::Ordering::SeqCst) {
            return;
        }
        let copy = self.inner.state.lock().unwrap_or_else(|p| p.into_inner()).clone();
        match persist::save(&persist.path, copy) {
            Ok(()) => tracing::debug!(path = %persist.path.display(), "Stripe emulator state saved"),
            Err(e) => {
                // Kept dirty, so the next change or the shutdown tries again.
                persist.dirty.store(true, std::sync::atomic::Ordering::SeqCst);
                tracing::warn!(path = %persist.path.display(), error = %e, "cannot save the Stripe emulator state")
            }
        }
    }

    pub fn config(&self) -> &EmulatorConfig {
        &self.inner.config
    }

    /// The state, for the hosted pages and tests. Never held across an await.
    pub fn lock(&self) -> StateGuard<'_> {
        StateGuard {
            guard: self.inner.state.lock().unwrap_or_else(|poisoned| poisoned.into_inner()),
            persist: self.inner.persist.as_ref(),
            touched: false,
        }
    }

    /// Registers a webhook endpoint for every event type and returns its
    /// signing secret: how `tollgate serve` subscribes itself in development.
    ///
    /// With a saved state the endpoint usually exists already: the one for
    /// `url`, or the one an earlier run registered for itself at another
    /// address (another port), is reused with its secret, moved to `url` and
    /// enabled, rather than a second endpoint being added.
    pub fn register_webhook_endpoint(&self, url: &str) -> String {
        const OWN: &str = "tollgate_self";
        let mut state = self.lock();
        let endpoints = state.all("webhook_endpoint");
        let existing = endpoints
            .iter()
            .find(|e| e["url"] == url)
            .or_else(|| endpoints.iter().find(|e| e["metadata"][OWN] == "true"))
            .map(|e| e["id"].as_str().unwrap_or_default().to_owned());
        if let Some(id) = existing {
            let mut changes = serde_json::Map::new();
            changes.insert("url".into(), json!(url));
            changes.insert("status".into(), json!("enabled"));
            changes.insert("enabled_events".into(), json!(["*"]));
            let (endpoint, _) = state.update(&id, changes);
            return endpoint["secret"].as_str().unwrap_or_default().to_owned();
        }
        let params = Params::new(json!({ "url": url, "enabled_events": ["*"], "metadata": { OWN: "true" } }));
        let ctx = Ctx {
            version: CURRENT_API_VERSION.to_owned(),
            path: vec![],
            public_url: self.config().public_url.clone(),
        };
        let endpoint = objects::create_webhook_endpoint(&mut state, &ctx, &params).expect("a valid endpoint");
        endpoint["secret"].as_str().unwrap_or_default().to_owned()
    }

    /// Test-only failure injection: the API answers `fault.status` (500,
    /// 503, 429, …) as Stripe does on a bad day, until cleared with `None`
    /// or `fault.times` requests have failed. Not reachable over HTTP.
    pub fn set_fault(&self, fault: Option<Fault>) {
        *self.inner.fault.lock().unwrap_or_else(|p| p.into_inner()) = fault;
    }

    /// The fault for this request, if one is armed, counting it down.
    fn take_fault(&self) -> Option<Fault> {
        let mut slot = self.inner.fault.lock().unwrap_or_else(|p| p.into_inner());
        let fault = slot.clone()?;
        match fault.times {
            Some(0) => {
                *slot = None;
                return None;
            }
            Some(n) => slot.as_mut().expect("armed").times = Some(n - 1),
            None => {}
        }
        Some(fault)
    }

    pub(crate) fn wake_delivery(&self) {
        self.inner.wake.notify_one();
    }

    /// Runs one API operation: authentication, idempotency, the operation
    /// itself under the state lock, `expand[]`, and version shaping.
    async fn handle(&self, req: ApiRequest, op: Operation) -> Response {
        let ApiRequest { method, key, idempotency_key, ctx, params, fingerprint } = req;
        // Stored responses are found by a hash of the key, so a saved state
        // file holds no API keys.
        let key = hex::encode(Sha256::digest(key.as_bytes()));
        let fault = self.take_fault();
        if let Some(f) = fault.as_ref().filter(|f| !f.after_processing) {
            return f.response();
        }
        let expand = params.expand();
        let (status, body, replayed) = {
            let mut state = self.lock();
            let idem = idempotency_key.filter(|_| method == Method::POST || method == Method::DELETE);
            match idem.as_ref().and_then(|k| state.idempotency.get(&(key.clone(), k.clone())).cloned()) {
                Some(stored) if stored.fingerprint != fingerprint => {
                    let k = idem.as_deref().unwrap_or_default();
                    let e = StripeError::idempotency(format!(
                        "Keys for idempotent requests can only be used with the same parameters they were first used with. Try using a key other than '{k}' if you meant to execute a different request."
                    ));
                    (e.status, e.body(), false)
                }
                Some(stored) => {
                    (StatusCode::from_u16(stored.status).unwrap_or(StatusCode::OK), stored.body, true)
                }
                None => {
                    // A read changes nothing worth saving at once, except
                    // what it sets off (a session expiring emits its event).
                    let before = state.object_count();
                    let outcome = if method == Method::GET {
                        op(state.untracked(), &ctx, &params)
                    } else {
                        op(&mut state, &ctx, &params)
                    };
                    if state.object_count() != before {
                        state.touch();
                    }
                    let (status, body) = match outcome {
                        Ok(mut value) => {
                            shape_for_version(&state, &mut value, &ctx.version);
                            for path in &expand {
                                expand_path(&state, &mut value, path);
                            }
                            shape_for_version(&state, &mut value, &ctx.version);
                            state::strip_private(&mut value);
                            (StatusCode::OK, value)
                        }
                        Err(e) => (e.status, e.body()),
                    };
                    if let Some(k) = idem {
                        // As on Stripe: a request refused before it ran (400,
                        // 401, 404) is not saved; one that ran (2xx, 402) is.
                        if status.is_success() || status == StatusCode::PAYMENT_REQUIRED {
                            state.idempotency.insert(
                                (key, k),
                                state::StoredResponse {
                                    fingerprint,
                                    status: status.as_u16(),
                                    body: body.clone(),
                                },
                            );
                        }
                    }
                    (status, body, false)
                }
            }
        };
        self.wake_delivery();
        if let Some(f) = fault {
            // The work is done and its idempotent answer kept; the answer is lost.
            return f.response();
        }
        let mut response = (status, axum::Json(body)).into_response();
        response
            .headers_mut()
            .insert("request-id", HeaderValue::from_str(&state::new_id("req")).expect("ascii"));
        response.headers_mut().insert(
            "stripe-version",
            HeaderValue::from_str(&ctx.version).unwrap_or(HeaderValue::from_static(CURRENT_API_VERSION)),
        );
        if replayed {
            response.headers_mut().insert("idempotent-replayed", HeaderValue::from_static("true"));
        }
        response
    }

    pub fn router(&self) -> Router {
        fn api(
            op: Operation,
        ) -> impl Fn(
            AxumState<Emulator>,
            ApiRequest,
        ) -> std::pin::Pin<Box<dyn std::future::Future<Output = Response> + Send>>
               + Clone
               + Send
               + Sync
               + 'static {
            move |AxumState(em): AxumState<Emulator>, req: ApiRequest| {
                Box::pin(async move { em.handle(req, op).await })
            }
        }
        use billing as b;
        use checkout as c;
        use objects as o;
        use payments as p;
        Router::new()
            .route("/v1/customers", get(api(o::list_customers)).post(api(o::create_customer)))
            .route("/v1/customers/{id}", get(api(o::get_customer)).post(api(o::update_customer)).delete(api(o::delete_customer)))
            .route("/v1/products", get(api(o::list_products)).post(api(o::create_product)))
            .route("/v1/products/{id}", get(api(o::get_product)).post(api(o::update_product)))
            .route("/v1/prices", get(api(o::list_prices)).post(api(o::create_price)))
            .route("/v1/prices/{id}", get(api(o::get_price)).post(api(o::update_price)))
            .route("/v1/events", get(api(o::list_events)))
            .route("/v1/events/{id}", get(api(o::get_event)))
            .route("/v1/webhook_endpoints", get(api(o::list_webhook_endpoints)).post(api(o::create_webhook_endpoint)))
            .route(
                "/v1/webhook_endpoints/{id}",
                get(api(o::get_webhook_endpoint)).post(api(o::update_webhook_endpoint)).delete(api(o::delete_webhook_endpoint)),
            )
            .route("/v1/checkout/sessions", get(api(c::list_sessions)).post(api(c::create_session)))
            .route("/v1/checkout/sessions/{id}", get(api(c::get_session)))
            .route("/v1/checkout/sessions/{id}/expire", post(api(c::expire_session)))
            .route("/v1/checkout/sessions/{id}/line_items", get(api(c::session_line_items)))
            .route("/v1/payment_intents", get(api(p::list_payment_intents)))
            .route("/v1/payment_intents/{id}", get(api(p::get_payment_intent)))
            .route("/v1/payment_methods/{id}", get(api(p::get_payment_method)))
            .route("/v1/charges", get(api(p::list_charges)))
            .route("/v1/charges/{id}", get(api(p::get_charge)))
            .route("/v1/refunds", get(api(p::list_refunds)).post(api(p::create_refund)))
            .route("/v1/refunds/{id}", get(api(p::get_refund)))
            .route("/v1/disputes", get(api(p::list_disputes)))
            .route("/v1/disputes/{id}", get(api(p::get_dispute)).post(api(p::update_dispute)))
            .route("/v1/disputes/{id}/close", post(api(p::close_dispute)))
            .route("/v1/subscriptions", get(api(b::list_subscriptions)))
            .route(
                "/v1/subscriptions/{id}",
                get(api(b::get_subscription)).post(api(b::update_subscription)).delete(api(b::cancel_subscription)),
            )
            .route("/v1/subscriptions/{id}/resume", post(api(b::resume_subscription)))
            .route("/v1/invoices", get(api(b::list_invoices)))
            .route("/v1/invoices/{id}", get(api(b::get_invoice)))
            .route("/v1/invoices/{id}/pay", post(api(b::pay_invoice)))
            .route("/v1/billing_portal/sessions", post(api(b::create_portal_session)))
            .route("/v1/test_helpers/test_clocks", get(api(b::list_clocks)).post(api(b::create_clock)))
            .route("/v1/test_helpers/test_clocks/{id}", get(api(b::get_clock)).delete(api(b::delete_clock)))
            .route("/v1/test_helpers/test_clocks/{id}/advance", post(api(b::advance_clock)))
            .merge(pages::router())
            .fallback(|method: Method, uri: axum::http::Uri| async move {
                StripeError {
                    status: StatusCode::NOT_FOUND,
                    ..StripeError::invalid(format!(
                        "Unrecognized request URL ({method}: {}). Please see https://stripe.com/docs or we can help at https://support.stripe.com/.",
                        uri.path()
                    ))
                }
            })
            .with_state(self.clone())
    }

    /// Serves the emulator alone on `listener` (API at `/v1`), delivering
    /// webhooks, until `shutdown`.
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: tokio_util::sync::CancellationToken,
    ) -> std::io::Result<()> {
        let deliveries = tokio::spawn(delivery::run(self.clone(), shutdown.clone()));
        let saver = tokio::spawn(persist::run(self.clone(), shutdown.clone()));
        axum::serve(listener, self.router()).with_graceful_shutdown(shutdown.cancelled_owned()).await?;
        let _ = deliveries.await;
        let _ = saver.await;
        let em = self.clone();
        let _ = tokio::task::spawn_blocking(move || em.save_now()).await;
        Ok(())
    }
}

/// A failure the emulator is told to answer with (see [`Emulator::set_fault`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fault {
    pub status: u16,
    /// How many requests fail; `None`: every one until cleared.
    pub times: Option<u32>,
    /// Run the request (effects and idempotent response kept), then answer
    /// the error: a response lost on its way back.
    pub after_processing: bool,
}

impl Fault {
    /// `status` for every request until cleared.
    pub fn always(status: u16) -> Self {
        Fault { status, times: None, after_processing: false }
    }

    fn response(&self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let kind = if status == StatusCode::TOO_MANY_REQUESTS { "rate_limit_error" } else { "api_error" };
        let body = json!({ "error": { "type": kind, "message": "An unknown error occurred (emulator fault injection)." } });
        (status, axum::Json(body)).into_response()
    }
}

/// A decoded Stripe API request.
pub struct ApiRequest {
    method: Method,
    key: String,
    idempotency_key: Option<String>,
    ctx: Ctx,
    params: Params,
    fingerprint: String,
}

fn api_key(headers: &HeaderMap, expected: Option<&str>) -> StripeResult<String> {
    let raw = headers.get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).ok_or_else(|| {
        StripeError::unauthenticated(
            "You did not provide an API key. You need to provide your API key in the Authorization header, using Bearer auth (e.g. 'Authorization: Bearer YOUR_SECRET_KEY').",
        )
    })?;
    let key = if let Some(k) = raw.strip_prefix("Bearer ") {
        k.trim().to_owned()
    } else if let Some(b) = raw.strip_prefix("Basic ") {
        let decoded = base64::engine::general_purpose::STANDARD.decode(b.trim()).unwrap_or_default();
        String::from_utf8_lossy(&decoded).split(':').next().unwrap_or_default().to_owned()
    } else {
        return Err(StripeError::unauthenticated("Invalid API Key provided: use Bearer authentication."));
    };
    let chars: Vec<char> = key.chars().collect();
    let head: String = chars.iter().take(8).collect();
    let tail: String = chars.iter().skip(chars.len().saturating_sub(4)).collect();
    let masked = format!("{head}****{tail}");
    let valid = match expected {
        Some(e) => key == e,
        None => key.starts_with("sk_test_") || key.starts_with("rk_test_"),
    };
    if valid {
        Ok(key)
    } else {
        Err(StripeError::unauthenticated(format!("Invalid API Key provided: {masked}")))
    }
}

impl FromRequest<Emulator> for ApiRequest {
    type Rejection = StripeError;

    async fn from_request(req: Request, em: &Emulator) -> Result<Self, Self::Rejection> {
        let (mut parts, body) = req.into_parts();
        let path = RawPathParams::from_request_parts(&mut parts, em)
            .await
            .map(|p| p.iter().map(|(_, v)| v.to_owned()).collect())
            .unwrap_or_default();
        let key = api_key(&parts.headers, em.config().api_key.as_deref())?;
        let version = parts
            .headers
            .get("stripe-version")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
            .unwrap_or_else(|| CURRENT_API_VERSION.to_owned());
        let idempotency_key = match parts.headers.get("idempotency-key") {
            None => None,
            Some(v) => match v.to_str() {
                Ok(k) if !k.is_empty() && k.len() <= 255 => Some(k.to_owned()),
                _ => {
                    return Err(StripeError::idempotency(
                        "Idempotency-Key must be 1 to 255 printable characters.",
                    ))
                }
            },
        };
        let bytes = Bytes::from_request(Request::from_parts(parts.clone(), body), em)
            .await
            .map_err(|_| StripeError::invalid("The request body could not be read (it may be too large)."))?;
        let text = std::str::from_utf8(&bytes)
            .map_err(|_| StripeError::invalid("The request body is not UTF-8."))?;
        let is_json = parts
            .headers
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| ct.starts_with("application/json"));
        if is_json && !text.trim().is_empty() {
            return Err(StripeError::invalid(
                "Invalid request: Stripe's API takes form-encoded bodies (application/x-www-form-urlencoded), not JSON.",
            ));
        }
        let mut params =
            Params::new(form::decode(text).map_err(|e| StripeError::param(&e.param, e.message))?);
        if let Some(query) = parts.uri.query() {
            params.merge(Params::new(
                form::decode(query).map_err(|e| StripeError::param(&e.param, e.message))?,
            ));
        }
        let mut hasher = Sha256::new();
        hasher.update(parts.method.as_str());
        hasher.update([0]);
        hasher.update(parts.uri.path());
        hasher.update([0]);
        hasher.update(&bytes);
        Ok(ApiRequest {
            method: parts.method,
            key,
            idempotency_key,
            ctx: Ctx { version, path, public_url: em.config().public_url.clone() },
            params,
            fingerprint: hex::encode(hasher.finalize()),
        })
    }
}

/// Replaces the id at `path` (`customer`, `data.customer`,
/// `latest_invoice.payment_intent`) with the object it names.
pub fn expand_path(state: &State, value: &mut Value, path: &str) {
    let (head, rest) = match path.split_once('.') {
        Some((h, r)) => (h, Some(r)),
        None => (path, None),
    };
    if let Value::Array(items) = value {
        for item in items {
            expand_path(state, item, path);
        }
        return;
    }
    let Some(field) = value.get_mut(head) else { return };
    if let Some(id) = field.as_str() {
        if let Some(object) = state.get(id) {
            *field = object.clone();
        }
    }
    if let Some(rest) = rest {
        expand_path(state, field, rest);
    }
}

/// Adds the fields that requests pinned to versions before 2025-03-31 still
/// expect, where the current version moved them.
pub fn shape_for_version(state: &State, value: &mut Value, version: &str) {
    if version.get(..10).is_none_or(|date| date >= BASIL) {
        return;
    }
    legacy_fields(state, value);
}

fn legacy_fields(state: &State, value: &mut Value) {
    match value {
        Value::Array(items) => items.iter_mut().for_each(|v| legacy_fields(state, v)),
        Value::Object(map) => {
            for (key, v) in map.iter_mut() {
                // Metadata is the user's; previous attributes are partial.
                if key != "metadata" && key != "previous_attributes" && (v.is_object() || v.is_array()) {
                    legacy_fields(state, v);
                }
            }
            let id = map.get("id").and_then(Value::as_str).unwrap_or("");
            let kind = map.get("object").and_then(Value::as_str).unwrap_or("");
            // A nested field, or null when any step is missing.
            let pointer = |m: &serde_json::Map<String, Value>, path: &str| {
                let mut steps = path.trim_start_matches('/').split('/');
                let first = steps.next().and_then(|k| m.get(k));
                steps
                    .try_fold(first, |v, k| {
                        Some(v?.get(k).or_else(|| k.parse::<usize>().ok().and_then(|i| v?.get(i))))
                    })
                    .flatten()
                    .cloned()
                    .unwrap_or(Value::Null)
            };
            if kind == "subscription" && id.starts_with("sub_") {
                map.insert("current_period_start".into(), pointer(map, "/items/data/0/current_period_start"));
                map.insert("current_period_end".into(), pointer(map, "/items/data/0/current_period_end"));
                let plan = plan_from_price(&pointer(map, "/items/data/0/price"));
                map.insert("plan".into(), plan);
            } else if kind == "invoice" && id.starts_with("in_") {
                map.insert("subscription".into(), pointer(map, "/parent/subscription_details/subscription"));
                let pi = pointer(map, "/payments/data/0/payment/payment_intent");
                let charge = pi
                    .as_str()
                    .and_then(|id| state.get(id))
                    .map(|p| p["latest_charge"].clone())
                    .unwrap_or(Value::Null);
                map.insert("payment_intent".into(), pi);
                map.insert("charge".into(), charge);
                let paid = map.get("status").and_then(Value::as_str) == Some("paid");
                map.insert("paid".into(), json!(paid));
            } else if kind == "subscription_item" && id.starts_with("si_") {
                let plan = plan_from_price(map.get("price").unwrap_or(&Value::Null));
                map.insert("plan".into(), plan);
            }
        }
        _ => {}
    }
}

/// The legacy `plan` object older clients read, built from a recurring price.
fn plan_from_price(price: &Value) -> Value {
    if !price.is_object() {
        return Value::Null;
    }
    json!({
        "id": price["id"], "object": "plan", "active": price["active"], "amount": price["unit_amount"],
        "amount_decimal": price["unit_amount_decimal"], "billing_scheme": "per_unit", "created": price["created"],
        "currency": price["currency"], "interval": price["recurring"]["interval"],
        "interval_count": price["recurring"]["interval_count"], "livemode": false, "metadata": price["metadata"],
        "nickname": price["nickname"], "product": price["product"], "trial_period_days": null, "usage_type": "licensed",
    })
}
