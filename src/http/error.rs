//! The API's one error type, in Stripe's shape:
//! `{"error": {"type", "code", "message", "param", "request_id"}}`.
//!
//! Client errors say exactly what was wrong. Anything else is logged once,
//! where it happened, and answered with an opaque message: internal causes
//! never reach the client.

use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use serde::Serialize;

use crate::store::StoreError;

tokio::task_local! {
    /// The current request's id, so any error built while handling it can
    /// carry it without threading it through every call.
    pub static REQUEST_ID: String;
}

pub fn current_request_id() -> Option<String> {
    REQUEST_ID.try_with(Clone::clone).ok()
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
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: StatusCode,
    pub kind: ErrorType,
    pub code: &'static str,
    pub message: String,
    pub param: Option<String>,
    pub retry_after: Option<u64>,
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
}

impl ApiError {
    pub fn new(status: StatusCode, kind: ErrorType, code: &'static str, message: impl Into<String>) -> Self {
        Self { status, kind, code, message: message.into(), param: None, retry_after: None }
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
        let mut response = (self.status, axum::Json(self.body())).into_response();
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

pub type ApiResult<T> = Result<T, ApiError>;
