//! Health, readiness, metrics, docs, graceful shutdown.

use std::time::Duration;

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn livez_readyz_and_health_report_the_database() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/livez")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let health: serde_json::Value =
        app.client.get(app.url("/health")).send().await.unwrap().json().await.unwrap();
    assert_eq!(health["status"], "ok");
    assert_eq!(health["checks"]["database"]["status"], "ok");
    assert_eq!(health["checks"]["redis"]["status"], "not_configured");
    assert_eq!(health["version"], env!("CARGO_PKG_VERSION"));
    let ts = health["timestamp"].as_str().unwrap();
    assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
}

#[tokio::test]
async fn when_the_database_is_gone_readyz_fails_and_the_api_answers_503() {
    let app = spawn_app().await;
    app.server_store.close().await;
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["checks"]["database"]["status"], "failing");
    assert_eq!(body["checks"]["database"]["detail"], "database unreachable", "no connection details leak");

    let resp = app.get("/v1/customers", &app.read_key).send().await.unwrap();
    assert!(resp.headers().contains_key("retry-after"));
    expect_error(resp, 503, "api_error", "service_unavailable").await;
    // Still alive: the process did not crash.
    assert_eq!(app.client.get(app.url("/livez")).send().await.unwrap().status(), 200);
}

#[tokio::test]
async fn redis_is_checked_when_configured() {
    let app =
        spawn_app_with(|c| c.redis_url = Some(tollgate::config::ConnectionUrl::new("redis://127.0.0.1:1/")))
            .await;
    let resp = app.client.get(app.url("/readyz")).send().await.unwrap();
    assert_eq!(resp.status(), 503);
    let body: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(body["checks"]["redis"]["status"], "failing");
    assert_eq!(body["checks"]["database"]["status"], "ok");
}

#[tokio::test]
async fn metrics_count_requests_by_route_and_status_with_histograms() {
    let app = spawn_app().await;
    app.upsert_customer("metered", json!({})).await;
    let _ = app.get("/v1/customers/missing-one", &app.read_key).send().await.unwrap();
    let text = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("http_requests_total{")
            && l.contains(r#"route="/v1/customers/{external_id}""#)
            && l.contains(r#"status="404""#)),
        "{text}"
    );
    assert!(
        text.lines()
            .any(|l| l.starts_with("http_request_duration_seconds_bucket{") && l.contains(r#"method="PUT""#)),
        "latency is a histogram with buckets"
    );
}

#[tokio::test]
async fn the_docs_page_works_offline_and_the_openapi_document_is_served() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/docs")).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    assert!(resp.headers()["content-type"].to_str().unwrap().starts_with("text/html"));
    let html = resp.text().await.unwrap();
    assert!(html.contains("/openapi.json"));
    assert!(!html.contains("https://"), "no assets from the network");
    let doc: serde_json::Value =
        app.client.get(app.url("/openapi.json")).send().await.unwrap().json().await.unwrap();
    assert!(doc["paths"]["/v1/customers/{external_id}"]["put"].is_object());
}

#[tokio::test]
async fn shutdown_finishes_in_flight_requests_then_stops_accepting() {
    let mut app = spawn_app().await;
    // A request whose body is still arriving when shutdown begins.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    let body = reqwest::Body::wrap_stream(tokio_stream_from(rx));
    let req = app
        .client
        .put(app.url("/v1/customers/in_flight"))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .body(body)
        .send();
    let pending = tokio::spawn(req);
    tx.send(Ok(b"{\"name\":".to_vec())).await.unwrap();
    // Wait until the server is handling it: two requests in flight, the
    // PUT and the health check asking.
    eventually(Duration::from_secs(5), || async {
        let h: serde_json::Value = app.client.get(app.url("/health")).send().await.ok()?.json().await.ok()?;
        (h["in_flight_requests"].as_u64()? >= 2).then_some(())
    })
    .await;

    app.shutdown.cancel();
    tx.send(Ok(b"\"done\"}".to_vec())).await.unwrap();
    drop(tx);
    let resp = pending.await.unwrap().unwrap();
    assert_eq!(resp.status(), 201, "the in-flight request completed");

    app.stop().await;
    let refused = app.client.get(app.url("/livez")).send().await;
    assert!(refused.is_err(), "no longer accepting connections");
    let store = app.db.store().await;
    let c = store.get_customer(&tollgate::ids::ExternalId::parse("in_flight").unwrap()).await.unwrap();
    assert_eq!(c.unwrap().name.as_deref(), Some("done"));
}

fn tokio_stream_from(
    mut rx: tokio::sync::mpsc::Receiver<Result<Vec<u8>, std::io::Error>>,
) -> impl futures_util::Stream<Item = Result<Vec<u8>, std::io::Error>> {
    futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

#[tokio::test]
async fn a_request_that_outlives_the_timeout_gets_a_json_408() {
    let app = spawn_app_with(|c| c.request_timeout_seconds = 1).await;
    // A body that never finishes arriving.
    let (tx, rx) = tokio::sync::mpsc::channel::<Result<Vec<u8>, std::io::Error>>(1);
    tx.send(Ok(b"{\"name\":".to_vec())).await.unwrap();
    let resp = app
        .client
        .put(app.url("/v1/customers/stalled"))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .body(reqwest::Body::wrap_stream(tokio_stream_from(rx)))
        .send()
        .await
        .unwrap();
    expect_error(resp, 408, "api_error", "request_timeout").await;
    drop(tx);
    let resp = app.get("/v1/customers/stalled", &app.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 404, "nothing was half-written");
}
