//! Provider webhooks in: verification, the durable inbox, exactly-once
//! application and ordering.

use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;

use crate::helpers::*;

pub(crate) const SECRET_A: &str = "whsec_test_primary";
const SECRET_B: &str = "whsec_test_rotated";

pub(crate) async fn spawn_with_secrets() -> TestApp {
    spawn_app_with(|c| {
        // These tests poll the API while the inbox works; the /v1 limits
        // (tested on their own) would answer 429 under load.
        c.rate_limit_per_ip = 0;
        c.rate_limit_per_key = 0;
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(format!("{SECRET_A},{SECRET_B}")))
    })
    .await
}

/// [`spawn_with_secrets`] whose Stripe knows every checkout session and
/// lists no line items for it, for tests that send hand-made checkout
/// events of sessions tollgate did not start (their line items are read
/// from the provider, and a session the provider does not know fails).
pub(crate) async fn spawn_with_secrets_and_sessions() -> TestApp {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let stripe = axum::Router::new().route(
        "/v1/checkout/sessions/{id}/line_items",
        axum::routing::get(|axum::extract::Path(id): axum::extract::Path<String>| async move {
            let url = format!("/v1/checkout/sessions/{id}/line_items");
            axum::Json(json!({ "object": "list", "data": [], "has_more": false, "url": url }))
        }),
    );
    tokio::spawn(async move { axum::serve(listener, stripe).await.unwrap() });
    spawn_app_with(|c| {
        c.rate_limit_per_ip = 0;
        c.rate_limit_per_key = 0;
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(format!("{SECRET_A},{SECRET_B}")));
        c.stripe_secret_key = Some(secrecy::SecretString::from("sk_test_sessions".to_owned()));
        c.stripe_api_base = Some(base);
    })
    .await
}

pub(crate) fn sign(secret: &str, t: i64, body: &[u8]) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes()))
}

pub(crate) fn event(id: &str, kind: &str, created: i64, object: Value) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "id": id, "object": "event", "api_version": "2025-10-29.clover", "created": created,
        "data": { "object": object }, "livemode": false, "pending_webhooks": 1,
        "request": { "id": null, "idempotency_key": null }, "type": kind,
    }))
    .unwrap()
}

/// A Stripe event as the inbox stores it, for tests that put events in the
/// inbox directly and then run the worker by hand.
pub(crate) fn inbox_event(
    id: &str,
    kind: &str,
    created: i64,
    object: Value,
) -> tollgate::store::provider_events::NewProviderEvent {
    let body = event(id, kind, created, object.clone());
    tollgate::store::provider_events::NewProviderEvent {
        provider: "stripe",
        provider_event_id: id.to_owned(),
        event_type: kind.to_owned(),
        object_id: object["id"].as_str().map(str::to_owned),
        provider_created: created,
        api_version: None,
        livemode: false,
        body: String::from_utf8(body).unwrap(),
        source: "webhook",
        initial_status: "received",
        first_attempt_at: 0,
    }
}

fn customer(id: &str, external: Option<&str>, email: &str) -> Value {
    let metadata = match external {
        Some(e) => json!({ "tollgate_external_id": e }),
        None => json!({}),
    };
    json!({ "id": id, "object": "customer", "email": email, "name": null, "metadata": metadata })
}

impl TestApp {
    async fn deliver(&self, path: &str, body: &[u8], signature: Option<String>) -> reqwest::Response {
        let mut req =
            self.client.post(self.url(path)).header("content-type", "application/json").body(body.to_vec());
        if let Some(sig) = signature {
            req = req.header("stripe-signature", sig);
        }
        req.send().await.unwrap()
    }

    pub(crate) async fn deliver_signed(&self, body: &[u8]) -> reqwest::Response {
        self.deliver("/webhooks/stripe", body, Some(sign(SECRET_A, tollgate::store::now_unix(), body))).await
    }

    pub(crate) async fn provider_events(&self, query: &str) -> Vec<Value> {
        let v: Value = self
            .get(&format!("/v1/provider-events?limit=100{query}"), &self.admin_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        v["data"].as_array().unwrap().clone()
    }

    pub(crate) async fn wait_status(&self, provider_event_id: &str, status: &str) -> Value {
        eventually(Duration::from_secs(10), || async {
            self.provider_events("")
                .await
                .into_iter()
                .find(|e| e["provider_event_id"] == provider_event_id && e["status"] == status)
        })
        .await
    }
}

#[tokio::test]
async fn a_signed_event_is_stored_before_the_2xx_and_applied_once() {
    let app = spawn_with_secrets().await;
    let body = event(
        "evt_link_1",
        "customer.created",
        1_800_000_000,
        customer("cus_link1", Some("u_hook"), "hook@example.com"),
    );
    let resp = app.deliver_signed(&body).await;
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap(), json!({ "received": true, "duplicate": false }));
    let again = app.deliver_signed(&body).await;
    assert_eq!(again.json::<Value>().await.unwrap()["duplicate"], true);

    let stored = app.wait_status("evt_link_1", "processed").await;
    assert_eq!(stored["type"], "customer.created");
    assert_eq!(stored["payload"]["data"]["object"]["id"], "cus_link1", "the body is kept as received");
    assert_eq!(app.provider_events("").await.len(), 1);

    let c: Value = app.get("/v1/customers/u_hook", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["providers"]["stripe"], "cus_link1");
    assert_eq!(c["email"], Value::Null, "tollgate's customers keep the application's own fields");
}

#[tokio::test]
async fn ten_concurrent_deliveries_of_one_event_have_one_effect() {
    let app = spawn_with_secrets().await;
    let body =
        event("evt_dup", "customer.created", 1_800_000_000, customer("cus_dup", None, "dup@example.com"));
    let mut tasks = Vec::new();
    for _ in 0..10 {
        let (client, url, body) = (app.client.clone(), app.url("/webhooks/stripe"), body.clone());
        let sig = sign(SECRET_A, tollgate::store::now_unix(), &body);
        tasks.push(tokio::spawn(async move {
            let resp = client.post(url).header("stripe-signature", sig).body(body).send().await.unwrap();
            assert_eq!(resp.status(), 200);
            resp.json::<Value>().await.unwrap()["duplicate"].as_bool().unwrap()
        }));
    }
    let mut fresh = 0;
    for t in tasks {
        if !t.await.unwrap() {
            fresh += 1;
        }
    }
    assert_eq!(fresh, 1, "exactly one delivery stored the event");
    app.wait_status("evt_dup", "processed").await;
    // Adopted: a customer created outside tollgate, keyed by the provider id.
    let c: Value =
        app.get("/v1/customers/cus_dup", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["email"], "dup@example.com");
    let audit: Value =
        app.get("/v1/audit-log?limit=100", &app.admin_key).send().await.unwrap().json().await.unwrap();
    let links = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "customer.provider_linked")
        .count();
    assert_eq!(links, 1, "one effect");
}

#[tokio::test]
async fn every_bad_delivery_is_a_400_saying_why_and_stores_nothing() {
    let app = spawn_with_secrets().await;
    let now = tollgate::store::now_unix();
    let body = event("evt_bad", "customer.created", now, customer("cus_bad", None, "b@example.com"));
    let cases: Vec<(&str, Vec<u8>, Option<String>)> = vec![
        ("signature_missing", body.clone(), None),
        ("signature_malformed", body.clone(), Some("t=abc,v1=zz".into())),
        ("signature_malformed", body.clone(), Some("nonsense".into())),
        ("signature_timestamp_out_of_tolerance", body.clone(), Some(sign(SECRET_A, now - 301, &body))),
        ("signature_timestamp_out_of_tolerance", body.clone(), Some(sign(SECRET_A, now + 301, &body))),
        ("signature_mismatch", body.clone(), Some(sign("whsec_forged", now, &body))),
        ("signature_mismatch", b"{\"tampered\":1}".to_vec(), Some(sign(SECRET_A, now, &body))),
        ("event_invalid", b"not json".to_vec(), Some(sign(SECRET_A, now, b"not json"))),
        ("event_invalid", b"{\"id\":\"evt_1\"}".to_vec(), Some(sign(SECRET_A, now, b"{\"id\":\"evt_1\"}"))),
        ("event_invalid", b"[1,2]".to_vec(), Some(sign(SECRET_A, now, b"[1,2]"))),
    ];
    for (code, body, sig) in cases {
        let resp = app.deliver("/webhooks/stripe", &body, sig).await;
        let e = expect_error(resp, 400, "invalid_request_error", code).await;
        assert!(e["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    let big = vec![b' '; tollgate::webhooks::MAX_WEBHOOK_BYTES + 10];
    let resp = app.deliver("/webhooks/stripe", &big, Some(sign(SECRET_A, now, &big))).await;
    expect_error(resp, 400, "invalid_request_error", "body_too_large").await;
    let resp = app.deliver("/webhooks/payments", &body, None).await;
    expect_error(resp, 400, "invalid_request_error", "provider_unrecognised").await;

    assert!(app.provider_events("").await.is_empty(), "nothing stored");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"webhooks_rejected_total{provider="stripe",reason="signature_mismatch"}"#),
        "{metrics}"
    );
}

#[tokio::test]
async fn rotated_secrets_both_verify_and_payments_recognises_stripe() {
    let app = spawn_with_secrets().await;
    let body = event("evt_rot", "plan.created", 1_800_000_000, json!({ "id": "plan_1", "object": "plan" }));
    let resp = app
        .deliver("/webhooks/payments", &body, Some(sign(SECRET_B, tollgate::store::now_unix(), &body)))
        .await;
    assert_eq!(resp.status(), 200);
    let ignored = app.wait_status("evt_rot", "ignored").await;
    assert_eq!(ignored["provider"], "stripe");
}

#[tokio::test]
async fn an_address_that_keeps_failing_is_rate_limited() {
    let app = spawn_with_secrets().await;
    let mut statuses = Vec::new();
    for _ in 0..70 {
        statuses
            .push(app.deliver("/webhooks/stripe", b"{}", Some("t=1,v1=00".into())).await.status().as_u16());
    }
    assert!(statuses[..50].iter().all(|s| *s == 400), "{statuses:?}");
    assert_eq!(*statuses.last().unwrap(), 429);
}

#[tokio::test]
async fn unknown_types_are_ignored_and_mapped_types_are_applied() {
    let app = spawn_with_secrets().await;
    let mapped =
        event("evt_inv", "invoice.paid", 1_700_000_000, json!({ "id": "in_1", "object": "invoice" }));
    let unknown =
        event("evt_unknown", "radar.early_fraud_warning.created", 1_700_000_001, json!({ "id": "issfr_1" }));
    assert_eq!(app.deliver_signed(&mapped).await.status(), 200);
    assert_eq!(app.deliver_signed(&unknown).await.status(), 200);
    let ignored = app.wait_status("evt_unknown", "ignored").await;
    assert_eq!(ignored["attempts"], 0, "an ignored type is never attempted");
    app.wait_status("evt_inv", "processed").await;
    assert!(app.provider_events("&status=received").await.is_empty());
}

#[tokio::test]
async fn any_delivery_order_of_a_customers_events_ends_the_same() {
    let app = spawn_with_secrets().await;
    let kinds = ["customer.created", "customer.updated", "customer.deleted"];
    let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
    for (n, order) in orders.iter().enumerate() {
        let cus = format!("cus_perm{n}");
        for (step, &k) in order.iter().enumerate() {
            // All in the same second: the tie-break decides.
            let body = event(
                &format!("evt_p{n}_{k}"),
                kinds[k],
                1_800_000_000,
                customer(&cus, None, &format!("v{k}@example.com")),
            );
            assert_eq!(app.deliver_signed(&body).await.status(), 200, "permutation {n} step {step}");
            app.wait_status(&format!("evt_p{n}_{k}"), "processed").await;
        }
        let c: Value = app
            .get(&format!("/v1/customers/{cus}"), &app.read_key)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap();
        assert_eq!(c["providers"], json!({}), "permutation {order:?}: unlinked at the end");
        assert_eq!(
            c["email"], "v2@example.com",
            "permutation {order:?}: the deleted event's data is the last word"
        );
    }
    // An older event after a newer one changes nothing.
    let newer =
        event("evt_new", "customer.updated", 1_800_000_100, customer("cus_order", None, "new@example.com"));
    let older =
        event("evt_old", "customer.updated", 1_800_000_050, customer("cus_order", None, "old@example.com"));
    app.deliver_signed(&newer).await;
    app.wait_status("evt_new", "processed").await;
    app.deliver_signed(&older).await;
    app.wait_status("evt_old", "processed").await;
    let c: Value =
        app.get("/v1/customers/cus_order", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["email"], "new@example.com");
}

#[tokio::test]
async fn an_event_that_keeps_failing_goes_dead_and_can_be_replayed() {
    let app = spawn_app_with(|c| {
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
        c.provider_event_max_attempts = 1;
    })
    .await;
    // A customer event whose object has an id no external id can hold.
    let body = event(
        "evt_broken",
        "customer.created",
        1_800_000_000,
        json!({ "id": "cus with spaces", "object": "customer" }),
    );
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    let dead = app.wait_status("evt_broken", "dead").await;
    assert_eq!(dead["attempts"], 1);
    assert!(dead["last_error"].as_str().is_some_and(|e| !e.is_empty()));
    let id = dead["id"].as_str().unwrap();
    let resp = app
        .client
        .post(app.url(&format!("/v1/provider-events/{id}/replay")))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // It fails again (the data is still bad) and is dead again, with one more attempt.
    eventually(Duration::from_secs(10), || async {
        let e = app.provider_events("&status=dead").await.into_iter().next()?;
        (e["attempts"] == 2).then_some(())
    })
    .await;
    let resp = app
        .client
        .post(app.url("/v1/provider-events/pe_nope/replay"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    let resp = app.get("/v1/provider-events", &app.write_key).send().await.unwrap();
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;
}

#[tokio::test]
async fn storage_unavailable_answers_503_so_the_provider_retries() {
    let app = spawn_with_secrets().await;
    app.server_store.close().await;
    let body =
        event("evt_down", "customer.created", 1_800_000_000, customer("cus_down", None, "d@example.com"));
    let resp = app.deliver_signed(&body).await;
    assert!(resp.headers().contains_key("retry-after"));
    expect_error(resp, 503, "api_error", "service_unavailable").await;
}

#[tokio::test]
async fn the_built_in_emulator_delivers_to_tollgate_end_to_end() {
    let app = spawn_app().await;
    let resp = app
        .client
        .post(app.url("/emulator/stripe/v1/customers"))
        .bearer_auth("sk_test_local")
        .form(&[("email", "e2e@example.com"), ("metadata[tollgate_external_id]", "u_e2e")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let cus: Value = resp.json().await.unwrap();
    let c = eventually(Duration::from_secs(10), || async {
        let c: Value = app.get("/v1/customers/u_e2e", &app.read_key).send().await.ok()?.json().await.ok()?;
        (c["providers"]["stripe"] == cus["id"]).then_some(c)
    })
    .await;
    assert_eq!(c["external_id"], "u_e2e");
}

#[tokio::test]
async fn reconciliation_ingests_events_whose_webhooks_never_arrived() {
    let app = spawn_app().await;
    let em = |path: &str| app.url(&format!("/emulator/stripe{path}"));
    // Tollgate's own endpoint at the emulator stops receiving.
    let endpoints: Value = app
        .client
        .get(em("/v1/webhook_endpoints"))
        .bearer_auth("sk_test_x")
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let endpoint = endpoints["data"][0]["id"].as_str().unwrap().to_owned();
    let resp = app
        .client
        .post(em(&format!("/v1/webhook_endpoints/{endpoint}")))
        .bearer_auth("sk_test_x")
        .form(&[("disabled", "true")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .client
        .post(em("/v1/customers"))
        .bearer_auth("sk_test_x")
        .form(&[("email", "missed@example.com"), ("metadata[tollgate_external_id]", "u_missed")])
        .send()
        .await
        .unwrap();
    let cus: Value = resp.json().await.unwrap();
    assert!(app.provider_events("").await.is_empty(), "no webhook arrived");

    let config = {
        let mut c = test_config(&app.db);
        c.public_url = Some(app.base.clone());
        c
    };
    let client = tollgate::providers::stripe::StripeClient::from_config(&config);
    let store = app.db.store().await;
    let report =
        tollgate::ops::reconcile::reconcile_stripe(&store, &client, tollgate::store::now_unix() - 3600)
            .await
            .unwrap();
    assert!(report.ingested >= 1, "{report:?}");
    let again =
        tollgate::ops::reconcile::reconcile_stripe(&store, &client, tollgate::store::now_unix() - 3600)
            .await
            .unwrap();
    assert_eq!(again.ingested, 0, "a second pass finds nothing new");

    let c = eventually(Duration::from_secs(15), || async {
        let c: Value =
            app.get("/v1/customers/u_missed", &app.read_key).send().await.ok()?.json().await.ok()?;
        (c["providers"]["stripe"] == cus["id"]).then_some(c)
    })
    .await;
    assert_eq!(c["external_id"], "u_missed");
    let events = app.provider_events("").await;
    assert!(events.iter().all(|e| e["source"] == "reconcile"));
}

#[tokio::test]
async fn refetch_mode_applies_the_providers_current_object_not_the_payload() {
    let app = spawn_app_with(|c| {
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
        c.stripe_refetch = true;
    })
    .await;
    // The customer as the provider has it now.
    let resp = app
        .client
        .post(app.url("/emulator/stripe/v1/customers"))
        .bearer_auth("sk_test_x")
        .form(&[("email", "current@example.com")])
        .send()
        .await
        .unwrap();
    let cus: Value = resp.json().await.unwrap();
    let id = cus["id"].as_str().unwrap();
    // A delivery whose snapshot is out of date.
    let body =
        event("evt_refetch", "customer.updated", 1_800_000_000, customer(id, None, "stale@example.com"));
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    app.wait_status("evt_refetch", "processed").await;
    let c: Value =
        app.get(&format!("/v1/customers/{id}"), &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["email"], "current@example.com", "the refetched object wins over the payload");
    assert_eq!(c["providers"]["stripe"], id);
}

#[tokio::test]
async fn retention_prunes_only_finished_events_and_a_pruned_event_coming_back_changes_nothing() {
    let app = spawn_app_with(|c| {
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
        c.retention_interval_seconds = 1;
        c.retention_provider_events_days = 31;
    })
    .await;
    let newer =
        event("evt_r_new", "customer.updated", 1_800_000_100, customer("cus_r", None, "new@example.com"));
    let older =
        event("evt_r_old", "customer.updated", 1_800_000_050, customer("cus_r", None, "old@example.com"));
    app.deliver_signed(&newer).await;
    app.wait_status("evt_r_new", "processed").await;
    app.deliver_signed(&older).await;
    app.wait_status("evt_r_old", "processed").await;

    // Work still owed and evidence, all as old as the finished events.
    let store = app.db.store().await;
    let owed: Vec<tollgate::store::provider_events::NewProviderEvent> =
        ["evt_k_received", "evt_k_failed", "evt_k_dead"]
            .iter()
            .map(|id| tollgate::store::provider_events::NewProviderEvent {
                provider: "stripe",
                provider_event_id: (*id).to_owned(),
                event_type: "customer.updated".to_owned(),
                object_id: Some("cus_other".to_owned()),
                provider_created: 1_800_000_000,
                api_version: None,
                livemode: false,
                body: "{}".to_owned(),
                source: "webhook",
                initial_status: "received",
                first_attempt_at: tollgate::store::now_unix() + 86_400,
            })
            .collect();
    store.insert_provider_events(&owed).await.unwrap();
    store
        .execute_raw("UPDATE provider_events SET status = 'failed' WHERE provider_event_id = 'evt_k_failed'")
        .await
        .unwrap();
    store
        .execute_raw("UPDATE provider_events SET status = 'dead' WHERE provider_event_id = 'evt_k_dead'")
        .await
        .unwrap();
    let audit_before = store.verify_audit_chain().await.unwrap().entries;
    store
        .execute_raw(
            "UPDATE provider_events SET received_at = received_at - 40 * 86400, \
             processed_at = COALESCE(processed_at, received_at) - 40 * 86400",
        )
        .await
        .unwrap();

    // The job prunes the finished ones, and only those.
    let statuses = eventually(Duration::from_secs(10), || async {
        let mut left: Vec<String> =
            app.provider_events("").await.iter().map(|e| e["status"].as_str().unwrap().to_owned()).collect();
        left.sort();
        (left.len() == 3).then_some(left)
    })
    .await;
    assert_eq!(statuses, ["dead", "failed", "received"]);
    let chain = store.verify_audit_chain().await.unwrap();
    assert!(chain.is_intact());
    assert_eq!(chain.entries, audit_before + 1, "one audit entry for the pruning, none removed");
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(metrics.contains(r#"retention_pruned_total{kind="provider_events"}"#), "{metrics}");

    // Stripe redelivers the older event: the inbox no longer knows it, the
    // watermark still does, so it changes nothing.
    let again = app.deliver_signed(&older).await;
    assert_eq!(again.status(), 200);
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["duplicate"], false, "the pruned event is new to the inbox");
    app.wait_status("evt_r_old", "processed").await;
    let c: Value = app.get("/v1/customers/cus_r", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["email"], "new@example.com");
}

/// A claimed batch is applied in one transaction: an event that fails
/// half-way is rolled back alone (its inbox status and watermark too) and
/// retried on its own schedule, while the events around it are applied and
/// the audit chain stays whole.
#[tokio::test]
async fn a_failing_event_in_a_batch_is_rolled_back_alone() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let inbox = |id: &str, object: Value| inbox_event(id, "customer.created", 1_800_000_000, object);
    store
        .insert_provider_events(&[
            inbox("evt_batch_1", customer("cus_batch_1", Some("u_batch_1"), "one@example.com")),
            // Fails after its watermark moved: no external id can hold this id.
            inbox("evt_batch_2", json!({ "id": "cus with spaces", "object": "customer" })),
            inbox("evt_batch_3", customer("cus_batch_3", Some("u_batch_3"), "three@example.com")),
        ])
        .await
        .unwrap();
    let options = tollgate::jobs::inbox::InboxWorkerOptions::default();
    let handled = tollgate::jobs::inbox::work_once(&store, &options).await.unwrap();
    assert_eq!(handled, 3);

    let status = |id: &'static str| {
        let store = store.clone();
        async move { store.find_provider_event("stripe", id).await.unwrap().unwrap() }
    };
    for id in ["evt_batch_1", "evt_batch_3"] {
        let e = status(id).await;
        assert_eq!((e.status.as_str(), e.attempts), ("processed", 1), "{id}");
    }
    let broken = status("evt_batch_2").await;
    assert_eq!((broken.status.as_str(), broken.attempts), ("failed", 1), "rolled back, then failed once");
    assert!(broken.last_error.is_some_and(|e| !e.is_empty()));
    for external in ["u_batch_1", "u_batch_3"] {
        let id = tollgate::ids::ExternalId::parse(external).unwrap();
        assert!(store.get_customer(&id).await.unwrap().is_some(), "{external}");
    }
    let chain = store.verify_audit_chain().await.unwrap();
    assert!(chain.is_intact(), "{chain:?}");
    assert!(chain.entries >= 2, "the applied events' entries are chained: {chain:?}");
}

/// One batch, as the inbox applies it under load: objects named once move
/// their watermarks together, an object named twice moves event by event in
/// order, two subscriptions of one new provider customer find the one
/// placeholder the first adopted, and an event older than what a previous
/// batch applied changes nothing.
#[tokio::test]
async fn a_batch_applies_each_objects_events_in_order_and_finds_what_its_earlier_events_made() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let subscription = |id: &str, status: &str| {
        json!({
            "id": id, "object": "subscription", "customer": "cus_batch_owner", "status": status,
            "cancel_at_period_end": false, "canceled_at": null, "ended_at": null, "created": 1_800_000_000,
            "items": { "object": "list", "data": [{
                "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
                "price": { "id": "price_batch", "object": "price", "product": "prod_batch" },
                "current_period_start": 1_800_000_000, "current_period_end": 1_802_592_000,
            }]},
            "metadata": {},
        })
    };
    let inbox = inbox_event;
    let t = 1_800_000_000;
    store
        .insert_provider_events(&[
            inbox("evt_b_a1", "customer.subscription.created", t, subscription("sub_batch_a", "active")),
            inbox(
                "evt_b_b1",
                "customer.subscription.created",
                t + 1,
                subscription("sub_batch_b", "trialing"),
            ),
            inbox(
                "evt_b_a2",
                "customer.subscription.updated",
                t + 2,
                subscription("sub_batch_a", "past_due"),
            ),
        ])
        .await
        .unwrap();
    let options = tollgate::jobs::inbox::InboxWorkerOptions::default();
    assert_eq!(tollgate::jobs::inbox::work_once(&store, &options).await.unwrap(), 3);
    let a = store.subscription_by_provider_id("stripe", "sub_batch_a").await.unwrap().unwrap();
    assert_eq!(a.status, "past_due", "the object's later event in the batch applied after its first");
    // In a second batch: one event older than what sub_batch_b already
    // reflects (recorded, no effect) and one newer for sub_batch_a.
    store
        .insert_provider_events(&[
            inbox(
                "evt_b_b0",
                "customer.subscription.updated",
                t - 10,
                subscription("sub_batch_b", "canceled"),
            ),
            inbox("evt_b_a3", "customer.subscription.updated", t + 3, subscription("sub_batch_a", "active")),
        ])
        .await
        .unwrap();
    assert_eq!(tollgate::jobs::inbox::work_once(&store, &options).await.unwrap(), 2);

    for id in ["evt_b_a1", "evt_b_b1", "evt_b_a2", "evt_b_b0", "evt_b_a3"] {
        let e = store.find_provider_event("stripe", id).await.unwrap().unwrap();
        assert_eq!(e.status, "processed", "{id}");
    }
    let a = store.subscription_by_provider_id("stripe", "sub_batch_a").await.unwrap().unwrap();
    let b = store.subscription_by_provider_id("stripe", "sub_batch_b").await.unwrap().unwrap();
    assert_eq!(a.status, "active", "each of the object's events applied in order");
    assert_eq!(b.status, "trialing", "the stale event changed nothing");
    assert_eq!(a.customer_id, b.customer_id, "one placeholder for the provider customer");
    let owner = tollgate::ids::ExternalId::parse("cus_batch_owner").unwrap();
    let customer = store.get_customer(&owner).await.unwrap().expect("the adopted placeholder");
    assert_eq!(customer.id, a.customer_id);
    let stored = store.entitlements(&a.customer_id).await.unwrap();
    assert!(stored.version >= 1, "recomputed when the batch wrote its events: {stored:?}");
    let updated = store
        .events_for_customer(&a.customer_id)
        .await
        .unwrap()
        .into_iter()
        .filter(|e| e.event_type == "entitlements.updated")
        .count();
    assert_eq!(updated as i64, stored.version, "one entitlements.updated per stored version");
    let chain = store.verify_audit_chain().await.unwrap();
    assert!(chain.is_intact(), "{chain:?}");
}

/// On SQLite a batch holds back the rows its subscription events create
/// (placeholders, links, snapshots) and writes them together. What reads
/// them first gets them written: here a customer event of the same batch
/// that names the placeholder's owner. A held-back placeholder that clashes
/// with a customer the application made fails the batch, which is then
/// applied event by event with the outcome an unbatched run has.
#[tokio::test]
async fn rows_a_batch_holds_back_are_written_before_anything_reads_them() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let subscription = |id: &str, customer: &str| {
        json!({
            "id": id, "object": "subscription", "customer": customer, "status": "active",
            "cancel_at_period_end": false, "canceled_at": null, "ended_at": null, "created": 1_800_000_000,
            "items": { "object": "list", "data": [{
                "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
                "price": { "id": "price_held", "object": "price", "product": "prod_held" },
                "current_period_start": 1_800_000_000, "current_period_end": 1_802_592_000,
            }]},
            "metadata": {},
        })
    };
    let t = 1_800_000_000;
    let options = tollgate::jobs::inbox::InboxWorkerOptions::default();
    store
        .insert_provider_events(&[
            inbox_event(
                "evt_h_1",
                "customer.subscription.created",
                t,
                subscription("sub_held_1", "cus_held"),
            ),
            inbox_event(
                "evt_h_2",
                "customer.updated",
                t + 1,
                customer("cus_held", Some("app_held"), "h@example.com"),
            ),
            inbox_event(
                "evt_h_3",
                "customer.subscription.created",
                t + 2,
                subscription("sub_held_2", "cus_held"),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(tollgate::jobs::inbox::work_once(&store, &options).await.unwrap(), 3);
    let owner = store
        .get_customer(&tollgate::ids::ExternalId::parse("app_held").unwrap())
        .await
        .unwrap()
        .expect("the placeholder, claimed by the application's id");
    for sub in ["sub_held_1", "sub_held_2"] {
        let s = store.subscription_by_provider_id("stripe", sub).await.unwrap().unwrap();
        assert_eq!(s.customer_id, owner.id, "{sub} belongs to the claimed placeholder");
    }
    let placeholder = tollgate::ids::ExternalId::parse("cus_held").unwrap();
    assert!(store.get_customer(&placeholder).await.unwrap().is_none(), "the placeholder's id was claimed");

    // The application already has a customer whose id is the provider's.
    let taken = tollgate::ids::ExternalId::parse("cus_taken").unwrap();
    let app_customer = match store
        .upsert_customer(&taken, &Default::default(), &tollgate::store::audit::Actor::Cli, None)
        .await
        .unwrap()
    {
        tollgate::store::customers::Upserted::Created(c) => c,
        other => panic!("{other:?}"),
    };
    store
        .insert_provider_events(&[
            inbox_event(
                "evt_h_4",
                "customer.subscription.created",
                t + 3,
                subscription("sub_held_3", "cus_fresh"),
            ),
            inbox_event(
                "evt_h_5",
                "customer.subscription.created",
                t + 4,
                subscription("sub_held_4", "cus_taken"),
            ),
        ])
        .await
        .unwrap();
    assert_eq!(tollgate::jobs::inbox::work_once(&store, &options).await.unwrap(), 2);
    for id in ["evt_h_1", "evt_h_2", "evt_h_3", "evt_h_4", "evt_h_5"] {
        let e = store.find_provider_event("stripe", id).await.unwrap().unwrap();
        assert_eq!(e.status, "processed", "{id}");
    }
    let taken_sub = store.subscription_by_provider_id("stripe", "sub_held_4").await.unwrap().unwrap();
    assert_eq!(taken_sub.customer_id, app_customer.id, "adopted by the customer with that id");
    let fresh_sub = store.subscription_by_provider_id("stripe", "sub_held_3").await.unwrap().unwrap();
    let fresh = store
        .get_customer(&tollgate::ids::ExternalId::parse("cus_fresh").unwrap())
        .await
        .unwrap()
        .expect("a placeholder for the new provider customer");
    assert_eq!(fresh_sub.customer_id, fresh.id);
    let chain = store.verify_audit_chain().await.unwrap();
    assert!(chain.is_intact(), "{chain:?}");
}
