//! Conventions every `/v1` route shares: authentication and scopes, error
//! shape, request ids, body limits, CORS and security headers.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn requests_without_a_key_are_401() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/v1/customers")).send().await.unwrap();
    expect_error(resp, 401, "authentication_error", "invalid_api_key").await;
}

#[tokio::test]
async fn a_malformed_or_unknown_key_is_401() {
    let app = spawn_app().await;
    for key in ["nope", "tg_test_short", "tg_test_0000000000000000000000000000000000000000000"] {
        let resp = app.get("/v1/customers", key).send().await.unwrap();
        expect_error(resp, 401, "authentication_error", "invalid_api_key").await;
    }
    let resp = app
        .client
        .get(app.url("/v1/customers"))
        .header("authorization", format!("Basic {}", app.read_key))
        .send()
        .await
        .unwrap();
    expect_error(resp, 401, "authentication_error", "invalid_api_key").await;
}

#[tokio::test]
async fn a_revoked_key_stops_working() {
    let app = spawn_app().await;
    assert_eq!(app.get("/v1/customers", &app.read_key).send().await.unwrap().status(), 200);
    let store = app.db.store().await;
    let keys = store.list_api_keys().await.unwrap();
    let read = keys.iter().find(|k| k.scope == tollgate::auth::Scope::Read).unwrap();
    assert!(store.revoke_api_key(&read.id, &tollgate::store::audit::Actor::Cli).await.unwrap());
    let resp = app.get("/v1/customers", &app.read_key).send().await.unwrap();
    expect_error(resp, 401, "authentication_error", "invalid_api_key").await;
}

#[tokio::test]
async fn scopes_nest_and_too_small_a_scope_is_403() {
    let app = spawn_app().await;
    // read may read, not write
    assert_eq!(app.get("/v1/customers", &app.read_key).send().await.unwrap().status(), 200);
    let resp = app.put_json("/v1/customers/u1", &app.read_key, json!({})).send().await.unwrap();
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;
    // write may write, not read the audit log
    let resp = app.put_json("/v1/customers/u1", &app.write_key, json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 201);
    let resp = app.get("/v1/audit-log", &app.write_key).send().await.unwrap();
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;
    // admin may do all three
    assert_eq!(app.get("/v1/audit-log", &app.admin_key).send().await.unwrap().status(), 200);
    assert_eq!(app.get("/v1/customers/u1", &app.admin_key).send().await.unwrap().status(), 200);
    let resp = app.put_json("/v1/customers/u2", &app.admin_key, json!({})).send().await.unwrap();
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn every_response_carries_a_request_id_and_a_safe_incoming_one_is_kept() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/livez")).send().await.unwrap();
    let generated = resp.headers()["request-id"].to_str().unwrap().to_owned();
    assert!(generated.starts_with("req_"), "{generated}");

    let resp = app
        .client
        .get(app.url("/v1/nothing-here"))
        .header("x-request-id", "trace-abc.123")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.headers()["request-id"], "trace-abc.123");
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;

    let resp = app
        .client
        .get(app.url("/livez"))
        .header("x-request-id", "<script>alert(1)</script>")
        .send()
        .await
        .unwrap();
    assert!(resp.headers()["request-id"].to_str().unwrap().starts_with("req_"));
}

#[tokio::test]
async fn http_layer_errors_are_json_too() {
    let app = spawn_app().await;
    let resp = app.client.get(app.url("/no/such/path")).send().await.unwrap();
    let e = expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    assert!(e["message"].as_str().unwrap().contains("/no/such/path"));

    let resp = app.get("/v1/no-such-resource", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;

    let resp = app.client.delete(app.url("/livez")).send().await.unwrap();
    assert!(resp.headers().contains_key("allow"));
    expect_error(resp, 405, "invalid_request_error", "method_not_allowed").await;

    let resp = app
        .client
        .post(app.url("/v1/customers"))
        .bearer_auth(&app.write_key)
        .json(&json!({}))
        .send()
        .await
        .unwrap();
    expect_error(resp, 405, "invalid_request_error", "method_not_allowed").await;
}

#[tokio::test]
async fn oversize_bodies_are_413_and_change_nothing() {
    let app = spawn_app_with(|c| c.max_body_bytes = 4096).await;
    let big = json!({ "name": "x".repeat(10_000) });
    let resp = app.put_json("/v1/customers/big", &app.write_key, big).send().await.unwrap();
    expect_error(resp, 413, "invalid_request_error", "body_too_large").await;
    let resp = app.get("/v1/customers/big", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
}

#[tokio::test]
async fn security_headers_are_set() {
    let app = spawn_app().await;
    for path in ["/livez", "/no-such-page", "/docs"] {
        let resp = app.client.get(app.url(path)).send().await.unwrap();
        let h = resp.headers();
        assert_eq!(h["x-content-type-options"], "nosniff", "{path}");
        assert_eq!(h["x-frame-options"], "DENY", "{path}");
        assert!(h["content-security-policy"].to_str().unwrap().contains("frame-ancestors 'none'"), "{path}");
        assert!(!h.contains_key("strict-transport-security"), "no HSTS over plain http");
        // A referrer policy governs what a document links to: the HTML
        // docs have one, JSON answers do not.
        let html = h["content-type"].to_str().unwrap().starts_with("text/html");
        assert_eq!(
            h.get("referrer-policy").map(|v| v.to_str().unwrap()),
            html.then_some("no-referrer"),
            "{path}"
        );
        // JSON answers are never kept by a browser or proxy cache.
        if h["content-type"].to_str().unwrap().starts_with("application/json") {
            assert_eq!(h["cache-control"], "no-store", "{path}");
        }
    }
    let entitlements = app
        .client
        .get(app.url("/v1/customers/u_nobody/entitlements"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(entitlements.headers()["cache-control"], "no-store");
    // The key set is meant to be cached: its own policy stands.
    let jwks = app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap();
    assert_ne!(jwks.headers()["cache-control"], "no-store");
    let https = spawn_app_with(|c| c.public_url = Some("https://billing.example.com".into())).await;
    let resp = https.client.get(https.url("/livez")).send().await.unwrap();
    assert!(resp.headers()["strict-transport-security"].to_str().unwrap().contains("max-age="));
}

#[tokio::test]
async fn cors_allows_only_configured_origins() {
    let app = spawn_app_with(|c| c.allowed_origins = vec!["https://app.example.com".into()]).await;
    let preflight = |origin: &'static str| {
        app.client
            .request(reqwest::Method::OPTIONS, app.url("/v1/customers"))
            .header("origin", origin)
            .header("access-control-request-method", "GET")
            .header("access-control-request-headers", "authorization")
            .send()
    };
    let ok = preflight("https://app.example.com").await.unwrap();
    assert_eq!(ok.headers()["access-control-allow-origin"], "https://app.example.com");
    let denied = preflight("https://evil.example.net").await.unwrap();
    assert!(!denied.headers().contains_key("access-control-allow-origin"));

    let none = spawn_app().await;
    let resp =
        none.client.get(none.url("/livez")).header("origin", "https://app.example.com").send().await.unwrap();
    assert!(!resp.headers().contains_key("access-control-allow-origin"));

    // An allowed origin's request is answered with CORS headers; a request
    // with no origin gets none, but an answer a cache may keep says it
    // depends on Origin (a `no-store` answer is kept by no cache).
    let cors = app
        .client
        .get(app.url("/v1/customers"))
        .bearer_auth(&app.read_key)
        .header("origin", "https://app.example.com")
        .send()
        .await
        .unwrap();
    assert_eq!(cors.status(), 200);
    assert_eq!(cors.headers()["access-control-allow-origin"], "https://app.example.com");
    assert!(cors.headers()["access-control-expose-headers"].to_str().unwrap().contains("request-id"));
    let varies_by_origin = |resp: &reqwest::Response| {
        resp.headers()
            .get_all("vary")
            .iter()
            .any(|v| v.to_str().unwrap().split(',').any(|name| name.trim().eq_ignore_ascii_case("origin")))
    };
    let plain = app.client.get(app.url("/v1/customers")).bearer_auth(&app.read_key).send().await.unwrap();
    assert_eq!(plain.status(), 200);
    assert!(!plain.headers().contains_key("access-control-expose-headers"));
    assert!(!plain.headers().contains_key("access-control-allow-origin"));
    assert_eq!(plain.headers()["cache-control"], "no-store");
    assert!(!varies_by_origin(&plain), "{:?}", plain.headers());
    let stored = app.client.get(app.url("/.well-known/jwks.json")).send().await.unwrap();
    assert_eq!(stored.status(), 200);
    assert!(!stored.headers()["cache-control"].to_str().unwrap().contains("no-store"));
    assert!(varies_by_origin(&stored), "{:?}", stored.headers());
}

#[tokio::test]
async fn bad_json_of_every_kind_is_a_400_naming_the_problem() {
    let app = spawn_app().await;
    let put = |body: &'static str, content_type: &'static str| {
        app.client
            .put(app.url("/v1/customers/u_bad"))
            .bearer_auth(&app.write_key)
            .header("content-type", content_type)
            .body(body)
            .send()
    };
    let e = expect_error(
        put("{not json", "application/json").await.unwrap(),
        400,
        "invalid_request_error",
        "body_invalid_json",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("not valid JSON"));
    let e = expect_error(
        put(r#"{"email": 42}"#, "application/json").await.unwrap(),
        400,
        "invalid_request_error",
        "parameter_invalid",
    )
    .await;
    assert_eq!(e["param"], "email");
    let e = expect_error(
        put(r#"{"colour": "red"}"#, "application/json").await.unwrap(),
        400,
        "invalid_request_error",
        "parameter_unknown",
    )
    .await;
    assert_eq!(e["param"], "colour");
    let e = expect_error(
        put(r#"{"metadata": {"a": 1}}"#, "application/json").await.unwrap(),
        400,
        "invalid_request_error",
        "parameter_invalid",
    )
    .await;
    assert_eq!(e["param"], "metadata.a");
    expect_error(
        put(r#"[1,2,3]"#, "application/json").await.unwrap(),
        400,
        "invalid_request_error",
        "parameter_invalid",
    )
    .await;
    expect_error(
        put("email=a", "application/x-www-form-urlencoded").await.unwrap(),
        415,
        "invalid_request_error",
        "unsupported_media_type",
    )
    .await;
    // None of it created the customer.
    let resp = app.get("/v1/customers/u_bad", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
}

#[tokio::test]
async fn hostile_strings_are_refused_or_stored_verbatim_never_a_500() {
    let app = spawn_app().await;
    let hostile = [
        "'; DROP TABLE customers; --",
        "<script>alert(1)</script>",
        "\u{202e}reversed",
        "😀 emoji",
        "ünïcödé",
    ];
    for (i, s) in hostile.iter().enumerate() {
        let resp = app
            .put_json(
                &format!("/v1/customers/h{i}"),
                &app.write_key,
                json!({ "name": s, "metadata": { "k": s } }),
            )
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201, "{s}");
        let got: serde_json::Value = app
            .get(&format!("/v1/customers/h{i}"), &app.read_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(got["name"], *s);
        assert_eq!(got["metadata"]["k"], *s);
    }
    // Control characters in a name and a NUL in JSON are refused cleanly.
    let resp = app
        .put_json("/v1/customers/h_nul", &app.write_key, json!({ "name": "a\u{0}b" }))
        .send()
        .await
        .unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "name");
    // Ids that are not ids.
    for bad in ["a%20b", "%2F", &"x".repeat(300), "%C3%A9"] {
        let resp = app.get(&format!("/v1/customers/{bad}"), &app.read_key).send().await.unwrap();
        let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
        assert_eq!(e["param"], "external_id");
    }
}
