//! Operational endpoints, without an API key: `/livez`, `/readyz`,
//! `/health` and `/metrics`.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{extract::State, Router};
use serde::Serialize;
use utoipa::ToSchema;

use super::AppState;
use super::Json;

pub fn router() -> Router<AppState> {
    Router::new()
        .route("/livez", get(livez))
        .route("/readyz", get(readyz))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
}

const CHECK_TIMEOUT: Duration = Duration::from_secs(2);

#[derive(Debug, Serialize, ToSchema)]
pub struct Check {
    /// `ok`, `failing` or `not_configured`.
    pub status: &'static str,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub latency_ms: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub detail: Option<String>,
}

impl Check {
    fn failing(detail: impl Into<String>) -> Self {
        Check { status: "failing", latency_ms: None, detail: Some(detail.into()) }
    }

    fn is_failing(&self) -> bool {
        self.status == "failing"
    }
}

#[derive(Debug, Serialize, ToSchema)]
pub struct Health {
    /// `ok` when every configured dependency answers, otherwise `failing`;
    /// `shutting_down` while draining.
    pub status: &'static str,
    pub checks: BTreeMap<&'static str, Check>,
    /// Requests being handled, this one included.
    pub in_flight_requests: usize,
    pub version: &'static str,
    /// RFC 3339, UTC.
    pub timestamp: String,
}

async fn timed<F, E>(check: F) -> Check
where
    F: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    let started = Instant::now();
    match tokio::time::timeout(CHECK_TIMEOUT, check).await {
        Ok(Ok(())) => Check {
            status: "ok",
            latency_ms: Some((started.elapsed().as_secs_f64() * 1000.0 * 100.0).round() / 100.0),
            detail: None,
        },
        Ok(Err(e)) => Check::failing(e.to_string()),
        Err(_) => Check::failing(format!("no answer within {}s", CHECK_TIMEOUT.as_secs())),
    }
}

async fn run_checks(state: &AppState) -> Health {
    let mut checks = BTreeMap::new();
    let database = timed(state.store.ping()).await;
    // The cause is logged, not published: it can name hosts and users.
    if let Some(detail) = &database.detail {
        tracing::warn!(error = %detail, "database check failed");
    }
    checks.insert(
        "database",
        Check { detail: database.is_failing().then(|| "database unreachable".to_owned()), ..database },
    );
    let redis = match &state.redis {
        None => Check { status: "not_configured", latency_ms: None, detail: None },
        Some(client) => {
            let client = client.clone();
            let check = timed(async move {
                let mut conn = client.get_multiplexed_async_connection().await?;
                redis::cmd("PING").query_async::<String>(&mut conn).await.map(|_| ())
            })
            .await;
            if let Some(detail) = &check.detail {
                tracing::warn!(error = %detail, "redis check failed");
            }
            Check { detail: check.is_failing().then(|| "redis unreachable".to_owned()), ..check }
        }
    };
    checks.insert("redis", redis);
    let failing = checks.values().any(Check::is_failing);
    let status = if state.shutdown.is_cancelled() {
        "shutting_down"
    } else if failing {
        "failing"
    } else {
        "ok"
    };
    Health {
        status,
        checks,
        in_flight_requests: state.in_flight.count(),
        version: env!("CARGO_PKG_VERSION"),
        timestamp: time::OffsetDateTime::now_utc()
            .format(&time::format_description::well_known::Rfc3339)
            .unwrap_or_default(),
    }
}

/// Liveness: the process is up and serving.
#[utoipa::path(get, path = "/livez", tag = "operations", responses((status = 200, description = "Alive")))]
pub async fn livez() -> Json<serde_json::Value> {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Readiness: every configured dependency answers, and tollgate is not
/// shutting down. Load balancers stop routing here on 503.
#[utoipa::path(
    get,
    path = "/readyz",
    tag = "operations",
    responses((status = 200, body = Health), (status = 503, body = Health))
)]
pub async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let health = run_checks(&state).await;
    let code = if health.status == "ok" { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(health))
}

/// Health: per-dependency checks, version and time, always 200 so that
/// dashboards can read the details.
#[utoipa::path(get, path = "/health", tag = "operations", responses((status = 200, body = Health)))]
pub async fn health(State(state): State<AppState>) -> Json<Health> {
    Json(run_checks(&state).await)
}

/// Prometheus metrics in the text exposition format.
#[utoipa::path(get, path = "/metrics", tag = "operations", responses((status = 200, description = "Prometheus text", content_type = "text/plain")))]
pub async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8")], state.metrics.render())
}
