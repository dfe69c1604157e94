//! tollgate's Stripe client: reqwest (rustls) speaking Stripe's form
//! encoding, built to survive a bad day at the provider:
//! - a timeout on every call;
//! - retries with exponential backoff and jitter, only for transient
//!   failures (connection errors, timeouts, 429, 5xx), honouring
//!   `Retry-After` and `Stripe-Should-Retry`;
//! - every POST carries an `Idempotency-Key`, the same on each retry, so a
//!   retried POST whose first answer was lost cannot create or charge twice;
//! - a circuit breaker per provider, shared by every caller in the process:
//!   while it is open calls fail at once, and tollgate answers 503 with
//!   `Retry-After` instead of queueing requests behind a dead dependency.
//!
//! Written here rather than taken from async-stripe because that crate
//! generates the whole API (a large compile) while tollgate uses a dozen
//! endpoints, and its retry policy cannot be combined with a shared breaker.

use std::sync::Arc;
use std::time::{Duration, Instant};

use rand::Rng;
use reqwest::header::HeaderMap;
use reqwest::Method;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

pub mod breaker;
pub mod form;
pub mod objects;

pub use breaker::{BreakerState, CircuitBreaker};
pub use form::Form;

/// The API version tollgate pins, so payload shapes do not drift.
pub const API_VERSION: &str = "2025-10-29.clover";

const PROVIDER: &str = "stripe";

#[derive(Debug, thiserror::Error)]
pub enum StripeClientError {
    /// No answer: connection refused or reset, DNS, or the timeout.
    #[error("Stripe could not be reached: {0}")]
    Unreachable(String),
    /// Stripe answered with an error. `message` is Stripe's, with anything
    /// that looks like a key or secret masked; it is for operators' logs and
    /// terminals, never for tollgate's API clients (see `http::error`).
    #[error("Stripe answered {status} {kind}{}: {message}", code.as_deref().map(|c| format!(" ({c})")).unwrap_or_default())]
    Api {
        status: u16,
        /// Stripe's error `type`: `card_error`, `invalid_request_error`, `api_error`, …
        kind: String,
        code: Option<String>,
        decline_code: Option<String>,
        param: Option<String>,
        message: String,
        /// Stripe's `Request-Id`, to quote to Stripe's support.
        request_id: Option<String>,
        /// Seconds, from `Retry-After`.
        retry_after: Option<u64>,
    },
    #[error("Stripe's answer was not understood: {0}")]
    Decode(String),
    /// The circuit breaker is open: recent calls failed, this one was not tried.
    #[error("Stripe is failing; calls are suspended for {}s", retry_after.as_secs().max(1))]
    CircuitOpen { retry_after: Duration },
}

impl StripeClientError {
    /// Seconds a caller should wait before trying again, when Stripe is down
    /// or asked to slow down.
    pub fn retry_after_seconds(&self) -> Option<u64> {
        match self {
            StripeClientError::CircuitOpen { retry_after } => {
                Some(retry_after.as_secs_f64().ceil().max(1.0) as u64)
            }
            StripeClientError::Api { retry_after, status, .. } if *status == 429 || *status >= 500 => {
                Some(retry_after.unwrap_or(1).max(1))
            }
            StripeClientError::Unreachable(_) => Some(1),
            _ => None,
        }
    }
}

/// An object as Stripe answered it, with when Stripe answered.
#[derive(Debug, Clone)]
pub struct Answer {
    pub object: Value,
    /// Stripe's clock at the answer (its `Date` header, Unix seconds): the
    /// object is Stripe's state as of then, comparable with its events'
    /// `created`, whatever tollgate's own clock says.
    pub date: Option<i64>,
    /// `Idempotent-Replayed: true`: a stored answer to an earlier request
    /// with the same key, possibly older than events since.
    pub replayed: bool,
}

/// Timeouts, retries and breaker thresholds.
#[derive(Debug, Clone)]
pub struct ClientOptions {
    pub timeout: Duration,
    pub connect_timeout: Duration,
    /// Retries after the first attempt, for transient failures only.
    pub max_retries: u32,
    /// The first retry waits about this long; each further one twice as long.
    pub base_delay: Duration,
    pub max_delay: Duration,
    /// A `Retry-After` longer than this is not waited for: the error is
    /// returned with its hint instead of holding the caller.
    pub max_retry_after: Duration,
    pub breaker_failures: u32,
    pub breaker_cooldown: Duration,
    /// The budget of one logical call, retries and waits included: no retry
    /// starts that could not finish within it, so a caller waiting on
    /// Stripe gets an answer before its own request times out.
    pub max_elapsed: Duration,
}

impl Default for ClientOptions {
    fn default() -> Self {
        Self {
            timeout: Duration::from_secs(10),
            connect_timeout: Duration::from_secs(3),
            max_retries: 2,
            base_delay: Duration::from_millis(500),
            max_delay: Duration::from_secs(5),
            max_retry_after: Duration::from_secs(10),
            breaker_failures: 5,
            breaker_cooldown: Duration::from_secs(30),
            max_elapsed: Duration::from_secs(25),
        }
    }
}

impl ClientOptions {
    pub fn from_config(config: &crate::config::Config) -> Self {
        Self {
            timeout: Duration::from_secs(config.stripe_timeout_seconds.max(1)),
            connect_timeout: Duration::from_secs(config.stripe_timeout_seconds.clamp(1, 3)),
            max_retries: config.stripe_max_retries,
            breaker_failures: config.stripe_breaker_failures.max(1),
            breaker_cooldown: Duration::from_secs(config.stripe_breaker_cooldown_seconds.max(1)),
            // Inside the API's own request timeout, with a second to answer.
            max_elapsed: Duration::from_secs(config.request_timeout_seconds.saturating_sub(1).max(1)),
            ..Self::default()
        }
    }

    /// The wait before retry number `retry` (0 for the first): exponential,
    /// capped, with "equal jitter" (half fixed, half random) so that callers
    /// failing together do not retry together.
    pub fn backoff(&self, retry: u32) -> Duration {
        let exp = self.base_delay.saturating_mul(1u32 << retry.min(16)).min(self.max_delay);
        let half = exp / 2;
        half + half.mul_f64(rand::thread_rng().gen::<f64>())
    }
}

#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
    options: ClientOptions,
    breaker: Arc<CircuitBreaker>,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient").field("base", &self.base).finish()
    }
}

/// How one attempt ended, for retries, the breaker and metrics.
struct AttemptFailure {
    error: StripeClientError,
    retryable: bool,
    /// Counts against the provider's health.
    breaker_failure: bool,
    outcome: &'static str,
    retry_after: Option<Duration>,
}

impl StripeClient {
    pub fn new(base: &str, key: SecretString) -> Self {
        Self::with_options(base, key, ClientOptions::default())
    }

    pub fn with_options(base: &str, key: SecretString, options: ClientOptions) -> Self {
        let http = reqwest::Client::builder()
            .timeout(options.timeout)
            .connect_timeout(options.connect_timeout)
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        let base = base.trim_end_matches('/').to_owned();
        // Clients with the same options share one breaker (in production
        // every client is built from one configuration); a client with
        // other thresholds (a test's, at a reused port) gets its own
        // instead of silently inheriting the first one's.
        let breaker = CircuitBreaker::shared(
            &format!(
                "{PROVIDER} {base} {} {}",
                options.breaker_failures,
                options.breaker_cooldown.as_millis()
            ),
            PROVIDER,
            options.breaker_failures,
            options.breaker_cooldown,
        );
        StripeClient { http, base, key, options, breaker }
    }

    /// The client for this configuration: Stripe itself, or the built-in
    /// emulator when no key is set.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let options = ClientOptions::from_config(config);
        match &config.stripe_secret_key {
            Some(key) => Self::with_options(
                config.stripe_api_base.as_deref().unwrap_or("https://api.stripe.com"),
                key.clone(),
                options,
            ),
            None => Self::with_options(
                &format!("{}{}", config.public_url(), crate::http::EMULATOR_PREFIX),
                SecretString::from("sk_test_tollgate_emulator".to_owned()),
                options,
            ),
        }
    }

    /// The same client (provider, key, options, circuit breaker) with its
    /// own connections, for a task on another runtime: a pooled connection
    /// is served by a task on the runtime that opened it.
    pub fn with_own_connections(&self) -> Self {
        Self::with_options(&self.base, self.key.clone(), self.options.clone())
    }

    /// Whether the key is a live-mode one (`sk_live_…`, `rk_live_…`), to
    /// tell an event from the other mode by its `livemode`.
    pub fn is_live(&self) -> bool {
        let key = self.key.expose_secret();
        key.starts_with("sk_live_") || key.starts_with("rk_live_")
    }

    pub fn breaker(&self) -> &CircuitBreaker {
        &self.breaker
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, StripeClientError> {
        self.send(Method::GET, path, query, None, None).await.map(|a| a.object)
    }

    /// A GET with when Stripe answered, for applying the object as current state.
    pub async fn get_answer(&self, path: &str) -> Result<Answer, StripeClientError> {
        self.send(Method::GET, path, &[], None, None).await
    }

    /// A POST. `idempotency_key`: pass one derived from what the caller is
    /// doing (see [`derived_idempotency_key`]) so that a retry by *tollgate's*
    /// caller also reaches Stripe as the same request; without one, a key is
    /// generated for this call and reused by its retries.
    pub async fn post(
        &self,
        path: &str,
        form: &Form,
        idempotency_key: Option<&str>,
    ) -> Result<Value, StripeClientError> {
        self.post_answer(path, form, idempotency_key).await.map(|a| a.object)
    }

    /// A POST (see [`Self::post`]) with when Stripe answered and whether the
    /// answer was replayed.
    pub async fn post_answer(
        &self,
        path: &str,
        form: &Form,
        idempotency_key: Option<&str>,
    ) -> Result<Answer, StripeClientError> {
        let key = idempotency_key
            .map(str::to_owned)
            .unwrap_or_else(|| format!("tollgate-{}", ulid::Ulid::new().to_string().to_lowercase()));
        self.send(Method::POST, path, &[], Some(form), Some(key)).await
    }

    /// A DELETE (cancelling a subscription now). Stripe's DELETEs are
    /// idempotent by nature; the key is sent all the same, so a retry is
    /// recognisable in Stripe's logs.
    pub async fn delete_answer(
        &self,
        path: &str,
        idempotency_key: &str,
    ) -> Result<Answer, StripeClientError> {
        self.send(Method::DELETE, path, &[], None, Some(idempotency_key.to_owned())).await
    }

    /// Every object of a list endpoint, page by page.
    pub async fn list_all(
        &self,
        path: &str,
        query: &[(&str, String)],
    ) -> Result<Vec<Value>, StripeClientError> {
        let mut out = Vec::new();
        let mut after: Option<String> = None;
        loop {
            let mut q: Vec<(&str, String)> = query.to_vec();
            q.push(("limit", "100".to_owned()));
            if let Some(a) = &after {
                q.push(("starting_after", a.clone()));
            }
            let page = self.get(path, &q).await?;
            let data = page["data"]
                .as_array()
                .ok_or_else(|| StripeClientError::Decode(format!("{path}: no data array")))?;
            out.extend(data.iter().cloned());
            match (page["has_more"].as_bool(), data.last().and_then(|o| o["id"].as_str())) {
                (Some(true), Some(last)) => after = Some(last.to_owned()),
                _ => return Ok(out),
            }
        }
    }

    /// One page of events created at or after `since`, newest first.
    pub async fn list_events(
        &self,
        since: i64,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), StripeClientError> {
        let mut query = vec![("limit", "100".to_owned()), ("created[gte]", since.to_string())];
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        let page = self.get("/v1/events", &query).await?;
        let data = page["data"]
            .as_array()
            .cloned()
            .ok_or_else(|| StripeClientError::Decode("no data array".into()))?;
        Ok((data, page["has_more"].as_bool().unwrap_or(false)))
    }

    async fn send(
        &self,
        method: Method,
        path: &str,
        query: &[(&str, String)],
        form: Option<&Form>,
        idempotency_key: Option<String>,
    ) -> Result<Answer, StripeClientError> {
        let operation = operation_name(&method, path);
        let deadline = Instant::now() + self.options.max_elapsed;
        let mut retry = 0;
        loop {
            let permit = match self.breaker.acquire() {
                Ok(p) => p,
                Err(wait) => {
                    metrics::counter!("provider_requests_total", "provider" => PROVIDER, "operation" => operation.clone(), "outcome" => "circuit_open")
                        .increment(1);
                    return Err(StripeClientError::CircuitOpen { retry_after: wait });
                }
            };
            let started = Instant::now();
            let budget = deadline.saturating_duration_since(started).min(self.options.timeout);
            let result = self.attempt(&method, path, query, form, idempotency_key.as_deref(), budget).await;
            let outcome = match &result {
                Ok(_) => "success",
                Err(f) => f.outcome,
            };
            metrics::counter!("provider_requests_total", "provider" => PROVIDER, "operation" => operation.clone(), "outcome" => outcome)
                .increment(1);
            metrics::histogram!("provider_request_duration_seconds", "provider" => PROVIDER, "operation" => operation.clone(), "outcome" => outcome)
                .record(started.elapsed().as_secs_f64());
            let failure = match result {
                Ok(value) => {
                    permit.record(true);
                    return Ok(value);
                }
                Err(f) => f,
            };
            permit.record(!failure.breaker_failure);
            if !failure.retryable || retry >= self.options.max_retries {
                return Err(failure.error);
            }
            let mut wait = self.options.backoff(retry);
            if let Some(asked) = failure.retry_after {
                if asked > self.options.max_retry_after {
                    return Err(failure.error);
                }
                wait = wait.max(asked);
            }
            if Instant::now() + wait >= deadline {
                return Err(failure.error);
            }
            tracing::warn!(
                operation = %operation,
                outcome,
                retry = retry + 1,
                wait_ms = wait.as_millis() as u64,
                "Stripe call failed; retrying"
            );
            tokio::time::sleep(wait).await;
            retry += 1;
        }
    }

    async fn attempt(
        &self,
        method: &Method,
        path: &str,
        query: &[(&str, String)],
        form: Option<&Form>,
        idempotency_key: Option<&str>,
        timeout: Duration,
    ) -> Result<Answer, AttemptFailure> {
        let mut request = self
            .http
            .request(method.clone(), format!("{}{path}", self.base))
            .timeout(timeout)
            .bearer_auth(self.key.expose_secret())
            .header("stripe-version", API_VERSION);
        if !query.is_empty() {
            request = request.query(query);
        }
        if let Some(form) = form {
            request = request.form(form.pairs());
        }
        if let Some(key) = idempotency_key {
            request = request.header("idempotency-key", key);
        }
        let unreachable = |e: reqwest::Error| AttemptFailure {
            outcome: if e.is_timeout() { "timeout" } else { "unreachable" },
            // Without the error's URL: it is ours, but keep logs lean.
            error: StripeClientError::Unreachable(e.without_url().to_string()),
            retryable: true,
            breaker_failure: true,
            retry_after: None,
        };
        let response = request.send().await.map_err(unreachable)?;
        let status = response.status().as_u16();
        let headers = response.headers().clone();
        // A body cut off mid-way is as transient as a refused connection.
        let bytes = response.bytes().await.map_err(unreachable)?;
        if (200..300).contains(&status) {
            let object = serde_json::from_slice(&bytes).map_err(|e| AttemptFailure {
                error: StripeClientError::Decode(e.to_string()),
                retryable: false,
                breaker_failure: false,
                outcome: "invalid_response",
                retry_after: None,
            })?;
            let date = headers
                .get(reqwest::header::DATE)
                .and_then(|v| v.to_str().ok())
                .and_then(|v| httpdate::parse_http_date(v).ok())
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map(|d| d.as_secs() as i64);
            let replayed = headers.get("idempotent-replayed").is_some_and(|v| v.as_bytes() == b"true");
            return Ok(Answer { object, date, replayed });
        }
        Err(classify_failure(status, &headers, &bytes))
    }
}

fn classify_failure(status: u16, headers: &HeaderMap, body: &[u8]) -> AttemptFailure {
    let body: Value = serde_json::from_slice(body).unwrap_or(Value::Null);
    let error = &body["error"];
    let text = |v: &Value| v.as_str().map(str::to_owned);
    let retry_after = headers
        .get(reqwest::header::RETRY_AFTER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<u64>().ok());
    let should_retry = headers.get("stripe-should-retry").and_then(|v| v.to_str().ok());
    let transient = status == 429 || status >= 500;
    let retryable = match should_retry {
        Some("true") => true,
        Some("false") => false,
        _ => transient,
    };
    let outcome = match status {
        402 => "card_error",
        429 => "rate_limited",
        s if s >= 500 => "server_error",
        _ => "client_error",
    };
    AttemptFailure {
        error: StripeClientError::Api {
            status,
            kind: text(&error["type"]).unwrap_or_else(|| {
                if status >= 500 { "api_error" } else { "invalid_request_error" }.to_owned()
            }),
            code: text(&error["code"]),
            decline_code: text(&error["decline_code"]),
            param: text(&error["param"]),
            message: redact(error["message"].as_str().unwrap_or("")),
            request_id: headers.get("request-id").and_then(|v| v.to_str().ok()).map(str::to_owned),
            retry_after,
        },
        retryable,
        // A 4xx (a decline, a bad parameter, even a 429) comes from a
        // working provider; only 5xx counts against its health.
        breaker_failure: status >= 500,
        outcome,
        retry_after: retry_after.map(Duration::from_secs),
    }
}

/// An Idempotency-Key for Stripe derived from what tollgate is doing, e.g.
/// `derived_idempotency_key(&["checkout", api_key_id, their_idempotency_key])`:
/// the same parts give the same key, so a client retrying tollgate's request
/// reaches Stripe as the same request. Hashed, so it stays within Stripe's
/// 255 characters and does not carry the caller's key verbatim.
pub fn derived_idempotency_key(parts: &[&str]) -> String {
    use sha2::{Digest, Sha256};
    let mut hasher = Sha256::new();
    for part in parts {
        hasher.update(part.as_bytes());
        hasher.update([0]);
    }
    format!("tollgate-{}", &hex::encode(hasher.finalize())[..40])
}

/// A low-cardinality metric label: `POST /v1/prices/{id}`. A path segment is
/// a word if it is lowercase letters and underscores (`test_helpers`,
/// `webhook_endpoints`); anything else is an object id.
fn operation_name(method: &Method, path: &str) -> String {
    let path = path.split('?').next().unwrap_or("");
    let shape: Vec<&str> = path
        .split('/')
        .map(|seg| {
            if seg.chars().all(|c| c.is_ascii_lowercase() || c == '_') || seg == "v1" {
                seg
            } else {
                "{id}"
            }
        })
        .collect();
    format!("{method} {}", shape.join("/"))
}

/// Masks anything in a Stripe message that looks like a key or secret
/// (`sk_live_…`, `rk_test_…`, `whsec_…`), keeping its prefix.
pub fn redact(message: &str) -> String {
    const PREFIXES: [&str; 7] =
        ["sk_live_", "sk_test_", "rk_live_", "rk_test_", "pk_live_", "pk_test_", "whsec_"];
    let mut out = String::with_capacity(message.len());
    let mut rest = message;
    while let Some((at, prefix)) =
        PREFIXES.iter().filter_map(|p| rest.find(p).map(|i| (i, *p))).min_by_key(|(i, _)| *i)
    {
        out.push_str(&rest[..at + prefix.len()]);
        out.push_str("***");
        rest = &rest[at + prefix.len()..];
        let end = rest.find(|c: char| !(c.is_ascii_alphanumeric() || c == '*')).unwrap_or(rest.len());
        rest = &rest[end..];
    }
    out.push_str(rest);
    out.chars().take(500).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_name_shapes_not_ids() {
        assert_eq!(operation_name(&Method::GET, "/v1/events"), "GET /v1/events");
        assert_eq!(operation_name(&Method::POST, "/v1/prices/price_1Abc9"), "POST /v1/prices/{id}");
        assert_eq!(
            operation_name(&Method::POST, "/v1/test_helpers/test_clocks/clock_X1/advance"),
            "POST /v1/test_helpers/test_clocks/{id}/advance"
        );
    }

    #[test]
    fn secrets_in_messages_are_masked() {
        assert_eq!(
            redact("Invalid API Key provided: sk_live_abc123XYZ, and whsec_9f8e."),
            "Invalid API Key provided: sk_live_***, and whsec_***."
        );
        assert_eq!(redact("No such price: 'price_1'"), "No such price: 'price_1'");
    }

    #[test]
    fn backoff_grows_is_capped_and_jittered() {
        let o = ClientOptions {
            base_delay: Duration::from_millis(100),
            max_delay: Duration::from_millis(1000),
            ..ClientOptions::default()
        };
        for retry in 0..6 {
            let exp = Duration::from_millis(100 * (1 << retry)).min(Duration::from_millis(1000));
            let d = o.backoff(retry);
            assert!(d >= exp / 2 && d <= exp, "retry {retry}: {d:?} within [{:?}, {exp:?}]", exp / 2);
        }
    }

    #[test]
    fn transient_failures_retry_and_stripe_can_say_otherwise() {
        let mut h = HeaderMap::new();
        assert!(classify_failure(500, &h, b"{}").retryable);
        assert!(classify_failure(429, &h, b"{}").retryable);
        assert!(!classify_failure(400, &h, b"{}").retryable);
        assert!(!classify_failure(402, &h, b"{}").breaker_failure);
        h.insert("stripe-should-retry", "false".parse().unwrap());
        assert!(!classify_failure(500, &h, b"{}").retryable);
        h.insert("stripe-should-retry", "true".parse().unwrap());
        h.insert("retry-after", "3".parse().unwrap());
        let f = classify_failure(409, &h, b"{}");
        assert!(f.retryable);
        assert_eq!(f.retry_after, Some(Duration::from_secs(3)));
    }

    #[test]
    fn derived_keys_are_stable_and_distinct() {
        let a = derived_idempotency_key(&["checkout", "key_1", "abc"]);
        assert_eq!(a, derived_idempotency_key(&["checkout", "key_1", "abc"]));
        assert_ne!(a, derived_idempotency_key(&["checkout", "key_1a", "bc"]));
        assert!(a.len() < 255 && !a.contains("abc"));
    }
}
