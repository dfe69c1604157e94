//! Stripe's error shape: `{"error": {"type", "code", "message", "param", …}}`
//! with Stripe's status codes, so SDKs raise the exception they would raise
//! against Stripe.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, PartialEq)]
pub struct StripeError {
    pub status: StatusCode,
    pub kind: &'static str,
    pub code: Option<&'static str>,
    pub decline_code: Option<&'static str>,
    pub message: String,
    pub param: Option<String>,
    /// Extra fields Stripe includes (e.g. `charge`, `payment_intent` on card errors).
    pub extra: Box<Map<String, Value>>,
}

impl StripeError {
    fn new(status: StatusCode, kind: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code: None,
            decline_code: None,
            message: message.into(),
            param: None,
            extra: Box::default(),
        }
    }

    pub fn invalid(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "invalid_request_error", message)
    }

    pub fn param(param: &str, message: impl Into<String>) -> Self {
        Self { param: Some(param.to_owned()), code: Some("parameter_invalid"), ..Self::invalid(message) }
    }

    pub fn missing(param: &str) -> Self {
        Self {
            param: Some(param.to_owned()),
            code: Some("parameter_missing"),
            ..Self::invalid(format!("Missing required param: {param}."))
        }
    }

    pub fn unknown(param: &str) -> Self {
        Self {
            param: Some(param.to_owned()),
            code: Some("parameter_unknown"),
            ..Self::invalid(format!("Received unknown parameter: {param}"))
        }
    }

    pub fn no_such(kind: &str, id: &str, param: &str) -> Self {
        Self {
            status: StatusCode::NOT_FOUND,
            code: Some("resource_missing"),
            param: Some(param.to_owned()),
            ..Self::invalid(format!("No such {kind}: '{id}'"))
        }
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, "invalid_request_error", message)
    }

    pub fn idempotency(message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, "idempotency_error", message)
    }

    /// A declined card: 402 `card_error` with Stripe's decline code.
    pub fn card_declined(decline_code: &'static str, message: &str) -> Self {
        Self {
            code: Some("card_declined"),
            decline_code: Some(decline_code),
            ..Self::new(StatusCode::PAYMENT_REQUIRED, "card_error", message)
        }
    }

    pub fn with_extra(mut self, key: &str, value: Value) -> Self {
        self.extra.insert(key.to_owned(), value);
        self
    }

    pub fn body(&self) -> Value {
        let mut error = Map::new();
        error.insert("type".into(), json!(self.kind));
        error.insert("message".into(), json!(self.message));
        if let Some(code) = self.code {
            error.insert("code".into(), json!(code));
            error.insert(
                "doc_url".into(),
                json!(format!("https://stripe.com/docs/error-codes/{}", code.replace('_', "-"))),
            );
        }
        if let Some(d) = self.decline_code {
            error.insert("decline_code".into(), json!(d));
        }
        if let Some(p) = &self.param {
            error.insert("param".into(), json!(p));
        }
        error.extend(self.extra.as_ref().clone());
        json!({ "error": error })
    }
}

impl IntoResponse for StripeError {
    fn into_response(self) -> Response {
        (self.status, axum::Json(self.body())).into_response()
    }
}

pub type StripeResult<T> = Result<T, StripeError>;
