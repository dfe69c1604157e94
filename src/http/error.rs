//! The API's one error type, in Stripe's shape:
//! `{"error": {"type", "code", "message", "param", "request_id"}}`.
//!
//! Client errors say exactly what was wrong. Anything else is logged once,
//! where it happened, and answered with an opaque message: internal causes
//! never reach the client.

use std::cell::Cell;

use axum::extract::MatchedPath;
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::providers::stripe::StripeClientError;
use crate::store::StoreError;

tokio::task_local! {
    /// What the edge knows of the request being answered, for the code
    /// answering it. One task-local rather than one per field: every poll
    /// of a request's future swaps each task-local in and out.
    pub static REQUEST: RequestContext;
}

pub struct RequestContext {
    /// The request's id, so any error built while handling it can carry it
    /// without threading it through every call. The edge takes it when it
    /// answers, as the `Request-Id` header, so it is not copied.
    pub id: Cell<Option<HeaderValue>>,
    /// The route template the router matched, noted from inside the router
    /// (`middleware::note_route`: the edge sees the request before routing)
    /// and taken by the edge for the request's metrics and log line.
    /// Requests no route takes (unknown paths, CORS preflights) have none.
    pub route: Cell<Option<MatchedPath>>,
}

pub fn current_request_id() -> Option<String> {
    REQUEST
        .try_with(|request| {
            let id = request.id.take();
            let text = id.as_ref().and_then(|v| v.to_str().ok()).map(str::to_owned);
            request.id.set(id);
            text
        })
        .ok()
        .flatten()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorType {
    InvalidRequestError,
    AuthenticationError,
    PermissionError,
    RateLimitError,
    IdempotencyError,
    ApiError,
    ProviderError,
    /// The payment provider declined the card; `decline_code` says why.
    CardError,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
    /// For a `card_error`: the provider's decline code (`insufficient_funds`, …).
    pub decline_code: Option<String>,
}

/// The body of every error response.
#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorBody {
    pub error: ErrorDetail,
}

#[derive(Serialize, utoipa::ToSchema)]
pub struct ErrorDetail {
    #[serde(rename = "type")]
    pub kind: ErrorType,
    /// Stable, machine-readable reason, e.g. `resource_missing`.
    pub code: String,
    /// For humans; may change.
    pub message: String,
    /// The request parameter at fault, if one is.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub param: Option<String>,
    pub request_id: Option<String>,
    /// For a `card_error`: why the card was declined, as the provider says
    /// (`generic_decline`, `insufficient_funds`, …).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub decline_code: Option<String>,
}

impl ApiError {
    pub fn new(status: StatusCode, kind: ErrorType, code: &'static str, message: impl Into<String>) -> Self {
        Self {
            status,
            kind,
            code,
            message: message.into(),
            param: None,
            retry_after: None,
            decline_code: None,
        }
    }

    pub fn with_param(mut self, param: impl Into<String>) -> Self {
        self.param = Some(param.into());
        self
    }

    /// 400: the request is wrong in a way the message explains.
    pub fn invalid(code: &'static str, message: impl Into<String>) -> Self {
        Self::new(StatusCode::BAD_REQUEST, ErrorType::InvalidRequestError, code, message)
    }

    /// 400 about one parameter.
    pub fn invalid_param(param: impl Into<String>, message: impl Into<String>) -> Self {
        Self::invalid("parameter_invalid", message).with_param(param)
    }

    pub fn not_found(what: &str, id: &str) -> Self {
        Self::new(
            StatusCode::NOT_FOUND,
            ErrorType::InvalidRequestError,
            "resource_missing",
            format!("No such {what}: '{id}'"),
        )
    }

    pub fn unauthenticated(message: impl Into<String>) -> Self {
        Self::new(StatusCode::UNAUTHORIZED, ErrorType::AuthenticationError, "invalid_api_key", message)
    }

    pub fn forbidden(message: impl Into<String>) -> Self {
        Self::new(StatusCode::FORBIDDEN, ErrorType::PermissionError, "insufficient_scope", message)
    }

    pub fn unavailable(message: impl Into<String>) -> Self {
        let mut e =
            Self::new(StatusCode::SERVICE_UNAVAILABLE, ErrorType::ApiError, "service_unavailable", message);
        e.retry_after = Some(1);
        e
    }

    /// A failure that is our fault: logged here with its cause and where it
    /// happened, answered without either.
    #[track_caller]
    pub fn internal(cause: impl std::fmt::Display) -> Self {
        let at = std::panic::Location::caller();
        tracing::error!(error = %cause, location = %at, "internal error");
        Self::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorType::ApiError,
            "internal_error",
            "An internal error occurred; it has been logged. Retry later or contact the operator with the request id.",
        )
    }

    /// The generic error for a bare HTTP status produced by a layer that
    /// knows nothing of JSON (404 fallback, 405, 413, timeouts, panics).
    pub fn for_status(status: StatusCode, method: &str, path: &str) -> Self {
        match status {
            StatusCode::NOT_FOUND => Self::new(
                status,
                ErrorType::InvalidRequestError,
                "resource_missing",
                format!("Unrecognized request URL ({method}: {path})."),
            ),
            StatusCode::METHOD_NOT_ALLOWED => Self::new(
                status,
                ErrorType::InvalidRequestError,
                "method_not_allowed",
                format!("{method} is not allowed on {path}."),
            ),
            StatusCode::PAYLOAD_TOO_LARGE => Self::new(
                status,
                ErrorType::InvalidRequestError,
                "body_too_large",
                "The request body is larger than this server accepts.",
            ),
            StatusCode::REQUEST_TIMEOUT => Self::new(
                status,
                ErrorType::ApiError,
                "request_timeout",
                "The request took too long and was abandoned; retry it (with the same Idempotency-Key, if it had one).",
            ),
            StatusCode::UNSUPPORTED_MEDIA_TYPE => Self::new(
                status,
                ErrorType::InvalidRequestError,
                "unsupported_media_type",
                "Send the body as application/json.",
            ),
            StatusCode::TOO_MANY_REQUESTS => Self::new(
                status,
                ErrorType::RateLimitError,
                "rate_limited",
                "Too many requests; slow down and retry after the Retry-After interval.",
            ),
            s if s.is_client_error() => Self::new(
                s,
                ErrorType::InvalidRequestError,
                "invalid_request",
                s.canonical_reason().unwrap_or("Invalid request").to_owned(),
            ),
            s => Self::new(
                s,
                ErrorType::ApiError,
                "internal_error",
                "An internal error occurred; it has been logged.",
            ),
        }
    }

    pub fn body(&self) -> ErrorBody {
        ErrorBody {
            error: ErrorDetail {
                kind: self.kind,
                code: self.code.to_owned(),
                message: self.message.clone(),
                param: self.param.clone(),
                request_id: current_request_id(),
                decline_code: self.decline_code.clone(),
            },
        }
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{} {}: {}", self.status.as_u16(), self.code, self.message)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut response = (self.status, super::Json(self.body())).into_response();
        if let Some(seconds) = self.retry_after {
            response.headers_mut().insert(axum::http::header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<StoreError> for ApiError {
    #[track_caller]
    fn from(err: StoreError) -> Self {
        match err {
            StoreError::Unavailable(cause) => {
                tracing::warn!(error = %cause, "database unavailable");
                ApiError::unavailable("The database is unavailable; retry shortly.")
            }
            StoreError::UnknownCursor { param, id } => {
                ApiError::invalid_param(param, format!("No object with id '{id}' in this list to page from."))
            }
            StoreError::Conflict(message) => {
                ApiError::new(StatusCode::CONFLICT, ErrorType::InvalidRequestError, "conflict", message)
            }
            other => ApiError::internal(other),
        }
    }
}

impl From<StripeClientError> for ApiError {
    /// Stripe's failures in tollgate's terms. Stripe's own message is never
    /// passed on (it can echo parameters or masked keys), except a card
    /// error's, which Stripe writes for the card holder.
    #[track_caller]
    fn from(err: StripeClientError) -> Self {
        let unavailable = |code: &'static str, message: &str, retry_after: u64| {
            let mut e =
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, ErrorType::ProviderError, code, message);
            e.retry_after = Some(retry_after.max(1));
            e
        };
        let retry_after = err.retry_after_seconds().unwrap_or(1);
        match &err {
            StripeClientError::CircuitOpen { .. } => unavailable(
                "provider_unavailable",
                "The payment provider is failing; calls to it are suspended. Retry after the Retry-After interval.",
                retry_after,
            ),
            StripeClientError::Unreachable(cause) => {
                tracing::warn!(error = %cause, "Stripe unreachable");
                unavailable(
                    "provider_unavailable",
                    "The payment provider could not be reached; retry shortly (with the same Idempotency-Key).",
                    retry_after,
                )
            }
            StripeClientError::Api { status, kind, code, decline_code, param, request_id, .. } => {
                tracing::warn!(
                    stripe_status = status,
                    stripe_type = %kind,
                    stripe_code = code.as_deref().unwrap_or(""),
                    stripe_request_id = request_id.as_deref().unwrap_or(""),
                    "Stripe refused a call"
                );
                match (*status, kind.as_str()) {
                    (402, _) | (_, "card_error") => {
                        let message = match &err {
                            StripeClientError::Api { message, .. } if !message.is_empty() => message.clone(),
                            _ => "The card was declined.".to_owned(),
                        };
                        let mut e = ApiError::new(
                            StatusCode::PAYMENT_REQUIRED,
                            ErrorType::CardError,
                            card_code(code.as_deref()),
                            message,
                        );
                        e.decline_code = decline_code.clone().or_else(|| code.clone());
                        e.param = param.clone();
                        e
                    }
                    (429, _) => unavailable(
                        "provider_rate_limited",
                        "The payment provider is limiting tollgate's requests; retry after the Retry-After interval.",
                        retry_after,
                    ),
                    (s, _) if s >= 500 => unavailable(
                        "provider_unavailable",
                        "The payment provider failed to answer; retry shortly (with the same Idempotency-Key).",
                        retry_after,
                    ),
                    (404, _) => ApiError::new(
                        StatusCode::NOT_FOUND,
                        ErrorType::InvalidRequestError,
                        "resource_missing",
                        "The payment provider has no such object.",
                    ),
                    (400, "idempotency_error") => ApiError::new(
                        StatusCode::UNPROCESSABLE_ENTITY,
                        ErrorType::IdempotencyError,
                        "idempotency_error",
                        "This Idempotency-Key was already used for a different request.",
                    ),
                    // Our key, our request: an operator's problem, not the caller's.
                    _ => {
                        tracing::error!(stripe_status = status, "Stripe rejected a request tollgate built");
                        ApiError::new(
                            StatusCode::BAD_GATEWAY,
                            ErrorType::ProviderError,
                            "provider_rejected_request",
                            "The payment provider rejected the request; it has been logged for the operator.",
                        )
                    }
                }
            }
            StripeClientError::Decode(cause) => {
                tracing::error!(error = %cause, "Stripe's answer was not understood");
                ApiError::new(
                    StatusCode::BAD_GATEWAY,
                    ErrorType::ProviderError,
                    "provider_invalid_response",
                    "The payment provider's answer was not understood; it has been logged.",
                )
            }
        }
    }
}

/// Stripe's card error codes, kept as they are (clients switch on them);
/// anything else is a `card_declined`.
fn card_code(code: Option<&str>) -> &'static str {
    const KNOWN: [&str; 9] = [
        "card_declined",
        "expired_card",
        "incorrect_cvc",
        "incorrect_number",
        "incorrect_zip",
        "insufficient_funds",
        "invalid_cvc",
        "invalid_expiry_month",
        "processing_error",
    ];
    code.and_then(|c| KNOWN.iter().find(|k| **k == c).copied()).unwrap_or("card_declined")
}

pub type ApiResult<T> = Result<T, ApiError>;
