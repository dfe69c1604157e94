//! Extractors whose rejections are API errors, so that malformed input of
//! any kind is a 4xx in the documented shape, naming the parameter at fault.

use axum::extract::{FromRequest, FromRequestParts, Request};
use axum::http::request::Parts;
use axum::http::{header, StatusCode};
use bytes::Bytes;
use serde::de::DeserializeOwned;

use super::error::{ApiError, ApiResult, ErrorType};
use std::sync::Arc;

use crate::auth::{KeyMode, Scope};
use crate::store::api_keys::ApiKeyRecord;
use crate::store::audit::Actor;
use crate::store::Page;

/// A JSON body: strict about syntax, types and (where the type says so)
/// unknown fields. An empty body reads as `{}`.
pub struct ApiJson<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for ApiJson<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let is_json = req.headers().get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).map(|ct| {
            let mime = ct.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
        });
        let bytes = Bytes::from_request(req, state).await.map_err(|rejection| {
            if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
                ApiError::for_status(StatusCode::PAYLOAD_TOO_LARGE, "", "")
            } else {
                ApiError::invalid("body_unreadable", "The request body could not be read.")
            }
        })?;
        if bytes.is_empty() {
            return parse_json(b"{}").map(ApiJson);
        }
        if is_json == Some(false) {
            return Err(ApiError::new(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                ErrorType::InvalidRequestError,
                "unsupported_media_type",
                "Send the body as JSON with Content-Type: application/json.",
            ));
        }
        parse_json(&bytes).map(ApiJson)
    }
}

/// Parses JSON, turning serde's complaint into an error that names the field.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> ApiResult<T> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let value: Result<T, _> = serde_path_to_error::deserialize(&mut de);
    if value.is_ok() {
        de.end().map_err(|e| {
            ApiError::invalid("body_invalid_json", format!("The request body is not valid JSON: {e}."))
        })?;
    }
    value.map_err(|err| {
        let path = err.path().to_string();
        let inner = err.into_inner();
        use serde_json::error::Category;
        match inner.classify() {
            Category::Syntax | Category::Eof | Category::Io => ApiError::invalid(
                "body_invalid_json",
                format!("The request body is not valid JSON: {inner}."),
            ),
            Category::Data => {
                let message = inner.to_string();
                // serde reports unknown fields by name in its message; the path
                // points at the object holding it.
                if let Some(field) =
                    message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next())
                {
                    let param = if path == "." {
                        field.to_owned()
                    } else if path == field || path.ends_with(&format!(".{field}")) {
                        path.clone()
                    } else {
                        format!("{path}.{field}")
                    };
                    return ApiError::invalid(
                        "parameter_unknown",
                        format!("Received unknown parameter: {param}"),
                    )
                    .with_param(param);
                }
                let message = strip_position(&message);
                if path == "." {
                    ApiError::invalid("parameter_invalid", format!("Invalid request body: {message}."))
                } else {
                    ApiError::invalid_param(path.clone(), format!("Invalid value for {path}: {message}."))
                }
            }
        }
    })
}

/// serde_json appends "at line 1 column 17", noise in an API error.
fn strip_position(message: &str) -> &str {
    message.split(" at line ").next().unwrap_or(message)
}

/// Query parameters, with the same error shape as bodies.
pub struct ApiQuery<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequestParts<S> for ApiQuery<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or("");
        let de = serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(de).map(ApiQuery).map_err(|err| {
            let path = err.path().to_string();
            let message = err.into_inner().to_string();
            if let Some(field) =
                message.strip_prefix("unknown field `").and_then(|rest| rest.split('`').next())
            {
                return ApiError::invalid(
                    "parameter_unknown",
                    format!("Received unknown parameter: {field}"),
                )
                .with_param(field.to_owned());
            }
            if path == "." {
                ApiError::invalid("parameter_invalid", format!("Invalid query string: {message}."))
            } else {
                ApiError::invalid_param(path.clone(), format!("Invalid value for {path}: {message}."))
            }
        })
    }
}

/// Path parameters; undecodable ones are a 400, not axum's plain text.
pub struct ApiPath<T>(pub T);

impl<T: DeserializeOwned + Send, S: Send + Sync> FromRequestParts<S> for ApiPath<T> {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state).await.map(|p| ApiPath(p.0)).map_err(
            |rejection| {
                ApiError::invalid("path_invalid", format!("Invalid URL path: {}", rejection.body_text()))
            },
        )
    }
}

/// Declares a list endpoint's query: Stripe's `limit`, `starting_after` and
/// `ending_before` plus the endpoint's own filters, in one struct that
/// refuses unknown parameters (serde's `flatten` cannot be combined with
/// that, hence a macro).
macro_rules! list_query {
    ($(#[$meta:meta])* pub struct $name:ident { $($(#[$fmeta:meta])* pub $field:ident : $ty:ty),* $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Default, serde::Deserialize, utoipa::IntoParams)]
        #[serde(deny_unknown_fields)]
        #[into_params(parameter_in = Query)]
        pub struct $name {
            /// 1 to 100, default 10.
            pub limit: Option<i64>,
            /// An object id: return the page after it.
            pub starting_after: Option<String>,
            /// An object id: return the page before it.
            pub ending_before: Option<String>,
            $($(#[$fmeta])* pub $field: $ty,)*
        }

        impl $name {
            pub fn page(&self) -> $crate::http::error::ApiResult<$crate::store::Page> {
                $crate::http::extract::page_from(self.limit, &self.starting_after, &self.ending_before)
            }
        }
    };
}
pub(crate) use list_query;

list_query!(
    /// A list with no filters of its own.
    pub struct ListParams {}
);

/// Validates Stripe's list parameters into a [`Page`].
pub fn page_from(
    limit: Option<i64>,
    starting_after: &Option<String>,
    ending_before: &Option<String>,
) -> ApiResult<Page> {
    let limit = limit.unwrap_or(Page::DEFAULT_LIMIT);
    if !(1..=Page::MAX_LIMIT).contains(&limit) {
        return Err(ApiError::invalid_param(
            "limit",
            format!("limit must be between 1 and {}.", Page::MAX_LIMIT),
        ));
    }
    let check = |name: &str, id: &String| {
        if id.is_empty() || id.len() > 255 || !id.bytes().all(|b| b.is_ascii_graphic()) {
            Err(ApiError::invalid_param(name.to_owned(), format!("{name} must be an object id.")))
        } else {
            Ok(())
        }
    };
    match (starting_after, ending_before) {
        (Some(_), Some(_)) => Err(ApiError::invalid(
            "parameters_exclusive",
            "Pass at most one of starting_after and ending_before.",
        )),
        (Some(id), None) => check("starting_after", id).map(|_| Page::after(limit, id.clone())),
        (None, Some(id)) => check("ending_before", id).map(|_| Page::before(limit, id.clone())),
        (None, None) => Ok(Page::first(limit)),
    }
}

/// A free-text filter value: no control characters (PostgreSQL refuses NUL
/// in text, and no legitimate filter has any).
pub fn text_filter(param: &str, value: Option<String>) -> ApiResult<Option<String>> {
    match value {
        Some(v) if v.chars().any(char::is_control) || v.len() > 512 => Err(ApiError::invalid_param(
            param.to_owned(),
            format!("{param} must be at most 512 characters, without control characters."),
        )),
        other => Ok(other),
    }
}

/// The authenticated caller, placed in the request by the auth middleware:
/// the API key's cached record itself, so that neither authentication nor
/// a handler's extractor copies the key's id (two allocations of every
/// request).
#[derive(Debug, Clone)]
pub struct Principal(Arc<ApiKeyRecord>);

impl Principal {
    pub fn new(key: Arc<ApiKeyRecord>) -> Self {
        Principal(key)
    }

    pub fn key_id(&self) -> &str {
        &self.0.id
    }

    pub fn record(&self) -> &ApiKeyRecord {
        &self.0
    }

    pub fn scope(&self) -> Scope {
        self.0.scope
    }

    pub fn mode(&self) -> KeyMode {
        self.0.mode
    }

    pub fn actor(&self) -> Actor {
        Actor::ApiKey(self.0.id.clone())
    }
}

fn principal_with(parts: &Parts, needed: Scope) -> ApiResult<Principal> {
    let principal =
        parts.extensions.get::<Principal>().cloned().ok_or_else(|| {
            ApiError::unauthenticated("No API key provided. Send Authorization: Bearer tg_…")
        })?;
    if principal.scope().allows(needed) {
        Ok(principal)
    } else {
        Err(ApiError::forbidden(format!(
            "This API key has scope '{}'; this request needs '{}'.",
            principal.scope(),
            needed
        )))
    }
}

macro_rules! scoped_key {
    ($(#[$doc:meta])* $name:ident, $scope:expr) => {
        $(#[$doc])*
        pub struct $name(pub Principal);

        impl<S: Send + Sync> FromRequestParts<S> for $name {
            type Rejection = ApiError;

            async fn from_request_parts(parts: &mut Parts, _state: &S) -> Result<Self, Self::Rejection> {
                principal_with(parts, $scope).map($name)
            }
        }
    };
}

scoped_key!(
    /// A caller whose key has at least `read` scope.
    ReadKey,
    Scope::Read
);
scoped_key!(
    /// A caller whose key has at least `write` scope.
    WriteKey,
    Scope::Write
);
scoped_key!(
    /// A caller whose key has `admin` scope.
    AdminKey,
    Scope::Admin
);

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, serde::Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Body {
        name: String,
        count: Option<u32>,
    }

    #[test]
    fn json_errors_name_the_parameter() {
        let e = parse_json::<Body>(br#"{"name": 5}"#).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), ("parameter_invalid", Some("name")));
        let e = parse_json::<Body>(br#"{"name": "a", "colour": 1}"#).unwrap_err();
        assert_eq!((e.code, e.param.as_deref()), ("parameter_unknown", Some("colour")));
        let e = parse_json::<Body>(br#"{"name": "a""#).unwrap_err();
        assert_eq!(e.code, "body_invalid_json");
        let e = parse_json::<Body>(br#"{"name": "a"} trailing"#).unwrap_err();
        assert_eq!(e.code, "body_invalid_json");
        let e = parse_json::<Body>(br#"{"name": "a", "count": -1}"#).unwrap_err();
        assert_eq!(e.param.as_deref(), Some("count"));
        assert!(parse_json::<Body>(br#"{"name": "a"}"#).is_ok());
    }

    #[test]
    fn list_params_are_bounded() {
        let p = |limit, after: Option<&str>, before: Option<&str>| ListParams {
            limit,
            starting_after: after.map(str::to_owned),
            ending_before: before.map(str::to_owned),
        };
        assert!(p(None, None, None).page().is_ok());
        assert_eq!(p(Some(0), None, None).page().unwrap_err().param.as_deref(), Some("limit"));
        assert_eq!(p(Some(101), None, None).page().unwrap_err().param.as_deref(), Some("limit"));
        assert!(p(Some(100), Some("a"), None).page().is_ok());
        assert!(p(None, Some("a"), Some("b")).page().is_err());
        assert!(p(None, Some("a b"), None).page().is_err());
    }

    proptest! {
        #[test]
        fn parse_json_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let _ = parse_json::<Body>(&bytes);
            let _ = parse_json::<serde_json::Value>(&bytes);
        }
    }
}
