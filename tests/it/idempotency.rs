//! `Idempotency-Key` with Stripe's semantics.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn the_same_key_and_body_replays_the_first_response() {
    let app = spawn_app().await;
    let send = |body: serde_json::Value| {
        app.put_json("/v1/customers/idem", &app.write_key, body).header("idempotency-key", "key-1").send()
    };
    let first = send(json!({ "name": "First" })).await.unwrap();
    assert_eq!(first.status(), 201);
    assert!(!first.headers().contains_key("idempotent-replayed"));
    let first_body: serde_json::Value = first.json().await.unwrap();

    // Someone changes the customer in between; the replay still shows the
    // original response, and the request does not run again.
    app.upsert_customer("idem", json!({ "name": "Changed" })).await;
    let again = send(json!({ "name": "First" })).await.unwrap();
    assert_eq!(again.status(), 201, "the stored status is replayed");
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again_body: serde_json::Value = again.json().await.unwrap();
    assert_eq!(again_body, first_body);
    let now: serde_json::Value =
        app.get("/v1/customers/idem", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(now["name"], "Changed", "the replay did not re-apply the change");
}

#[tokio::test]
async fn the_same_key_with_another_body_is_an_idempotency_error() {
    let app = spawn_app().await;
    let send = |path: &str, body: serde_json::Value| {
        app.put_json(path, &app.write_key, body).header("idempotency-key", "key-2").send()
    };
    assert_eq!(send("/v1/customers/a", json!({ "name": "A" })).await.unwrap().status(), 201);
    let resp = send("/v1/customers/a", json!({ "name": "B" })).await.unwrap();
    expect_error(resp, 422, "idempotency_error", "idempotency_key_reused").await;
    let resp = send("/v1/customers/b", json!({ "name": "A" })).await.unwrap();
    expect_error(resp, 422, "idempotency_error", "idempotency_key_reused").await;
    let resp = app.get("/v1/customers/b", &app.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 404, "the mismatched request did not run");
}

#[tokio::test]
async fn keys_are_scoped_to_the_api_key() {
    let app = spawn_app().await;
    let r1 = app
        .put_json("/v1/customers/x", &app.write_key, json!({ "name": "W" }))
        .header("idempotency-key", "shared")
        .send()
        .await
        .unwrap();
    assert_eq!(r1.status(), 201);
    let r2 = app
        .put_json("/v1/customers/y", &app.admin_key, json!({ "name": "A" }))
        .header("idempotency-key", "shared")
        .send()
        .await
        .unwrap();
    assert_eq!(r2.status(), 201, "another API key has its own key space");
}

#[tokio::test]
async fn a_request_still_in_flight_is_a_409() {
    let app = spawn_app().await;
    let store = app.db.store().await;
    let keys = store.list_api_keys().await.unwrap();
    let write = keys.iter().find(|k| k.scope == tollgate::auth::Scope::Write).unwrap();
    // Claim the key as a concurrent request would, with this exact request's
    // fingerprint, then send the request.
    let body = serde_json::to_vec(&json!({ "name": "slow" })).unwrap();
    let mut hasher = <sha2::Sha256 as sha2::Digest>::new();
    sha2::Digest::update(&mut hasher, b"PUT\0/v1/customers/slow\0");
    sha2::Digest::update(&mut hasher, &body);
    let fingerprint = hex::encode(sha2::Digest::finalize(hasher));
    let claim = store.claim_idempotency_key(&write.id, "busy", &fingerprint, 60, 86_400).await.unwrap();
    assert_eq!(claim, tollgate::store::idempotency::Claim::Acquired { first: true });

    let resp = app
        .client
        .put(app.url("/v1/customers/slow"))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .header("idempotency-key", "busy")
        .body(body.clone())
        .send()
        .await
        .unwrap();
    expect_error(resp, 409, "idempotency_error", "idempotency_key_in_use").await;

    // A lease that lapsed (its holder died) is taken over.
    let claim = store.claim_idempotency_key(&write.id, "dead", &fingerprint, -1, 86_400).await.unwrap();
    assert_eq!(claim, tollgate::store::idempotency::Claim::Acquired { first: true });
    let resp = app
        .client
        .put(app.url("/v1/customers/slow"))
        .bearer_auth(&app.write_key)
        .header("content-type", "application/json")
        .header("idempotency-key", "dead")
        .body(body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
}

#[tokio::test]
async fn an_invalid_key_is_refused() {
    let app = spawn_app().await;
    let resp = app
        .put_json("/v1/customers/z", &app.write_key, json!({}))
        .header("idempotency-key", "k".repeat(256))
        .send()
        .await
        .unwrap();
    expect_error(resp, 400, "idempotency_error", "idempotency_key_invalid").await;
}

#[tokio::test]
async fn expired_keys_are_pruned_and_reusable() {
    let app = spawn_app().await;
    let first = app
        .put_json("/v1/customers/old", &app.write_key, json!({ "name": "one" }))
        .header("idempotency-key", "old-key")
        .send()
        .await
        .unwrap();
    assert_eq!(first.status(), 201);
    let store = app.db.store().await;
    // Age every key past its TTL.
    store.execute_raw("UPDATE idempotency_keys SET created_at = created_at - 90000").await.unwrap();
    assert_eq!(store.prune_idempotency_keys(86_400).await.unwrap(), 1);
    let again = app
        .put_json("/v1/customers/old", &app.write_key, json!({ "name": "two" }))
        .header("idempotency-key", "old-key")
        .send()
        .await
        .unwrap();
    assert_eq!(again.status(), 200, "the key is free again and the request ran");
    assert!(!again.headers().contains_key("idempotent-replayed"));
}
