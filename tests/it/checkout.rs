//! Selling through tollgate's API against the emulator: checkouts paid on
//! the hosted page become paid orders and subscriptions through the
//! webhooks; retries open one session; a failing provider answers 503 at
//! once and recovers by itself; bad requests write nothing.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use secrecy::SecretString;
use serde_json::{json, Value};
use tollgate::billing::catalog::Catalog;
use tollgate::providers::stripe::StripeClient;
use tollgate::store::audit::Actor;

use crate::helpers::*;

/// The shipped catalog, plus a second one-time product and a price in
/// another currency, for carts.
fn shop_catalog() -> String {
    let mut text = std::fs::read_to_string(manifest_path("tollgate.toml")).unwrap();
    text.push_str(
        r#"
[products.sticker]
name = "Sticker"
features = ["stickers"]

[prices.sticker_1]
product = "sticker"
currency = "usd"
amount = 250

[prices.card_pack_eur]
product = "card_pack"
currency = "eur"
amount = 450
"#,
    );
    text
}

/// A tollgate on the emulator whose catalog has been synced to it, as
/// `tollgate catalog sync` does.
async fn spawn_shop() -> TestApp {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("tollgate.toml");
    std::fs::write(&path, shop_catalog()).unwrap();
    let app = spawn_app_with(|c| {
        unlimited(c);
        c.catalog_path = path.clone();
    })
    .await;
    let client =
        StripeClient::new(&app.url("/emulator/stripe"), SecretString::from("sk_test_shop".to_owned()));
    let catalog = Catalog::parse(&shop_catalog()).unwrap();
    tollgate::ops::catalog_sync::sync_stripe(&app.server_store, &client, &catalog, &Actor::Cli)
        .await
        .unwrap();
    app
}

impl TestApp {
    fn post_json(&self, path: &str, body: Value) -> reqwest::RequestBuilder {
        self.client.post(self.url(path)).bearer_auth(&self.write_key).json(&body)
    }

    async fn checkout(&self, body: Value) -> reqwest::Response {
        self.post_json("/v1/checkout/sessions", body).send().await.unwrap()
    }

    /// A checkout under an `Idempotency-Key`, as a shop's button sends it.
    async fn checkout_keyed(&self, body: Value, key: &str) -> reqwest::Response {
        self.post_json("/v1/checkout/sessions", body).header("idempotency-key", key).send().await.unwrap()
    }

    async fn read(&self, path: &str) -> Value {
        let resp = self.get(path, &self.read_key).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.unwrap()
    }

    /// Polls `GET path` until `check` holds, saying what it saw last on failure.
    async fn read_until(&self, path: &str, check: impl Fn(&Value) -> bool) -> Value {
        let last = Mutex::new(Value::Null);
        let started = Instant::now();
        loop {
            let v = self.read(path).await;
            if check(&v) {
                return v;
            }
            *last.lock().unwrap() = v;
            assert!(
                started.elapsed() < Duration::from_secs(60),
                "GET {path} never matched; last: {}",
                last.lock().unwrap()
            );
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }
}

/// The audit log's entries about `object_id`, oldest first, as (action, data).
async fn audit_of(app: &TestApp, object_id: &str) -> Vec<(String, Value)> {
    let log: Value =
        app.get("/v1/audit-log?limit=100", &app.admin_key).send().await.unwrap().json().await.unwrap();
    let mut entries: Vec<(String, Value)> = log["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["object_id"] == object_id)
        .map(|e| (e["action"].as_str().unwrap().to_owned(), e["data"].clone()))
        .collect();
    entries.reverse();
    entries
}

fn payment(customer: &str, lines: Value) -> Value {
    json!({
        "customer": customer, "mode": "payment", "line_items": lines,
        "success_url": "https://shop.example/thanks?session={CHECKOUT_SESSION_ID}",
        "cancel_url": "https://shop.example/cart",
    })
}

async fn created(resp: reqwest::Response) -> Value {
    let status = resp.status();
    let body: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{body}");
    body
}

#[tokio::test]
async fn a_checkout_paid_on_the_hosted_page_makes_its_order_paid_and_fulfilled() {
    let app = spawn_shop().await;
    app.upsert_customer("u_ada", json!({ "email": "ada@example.com", "name": "Ada" })).await;

    let session =
        created(app.checkout(payment("u_ada", json!([{ "price": "card_pack_5", "quantity": 2 }]))).await)
            .await;
    assert!(session["id"].as_str().unwrap().starts_with("chk_"), "{session}");
    assert_eq!(
        (
            &session["status"],
            &session["mode"],
            &session["customer"],
            &session["amount_total"],
            &session["currency"]
        ),
        (&json!("open"), &json!("payment"), &json!("u_ada"), &json!(1000), &json!("usd"))
    );
    assert!(session["url"].as_str().unwrap().starts_with(&app.base), "the emulator's hosted page");
    assert!(session["expires_at"].as_i64().unwrap() > tollgate::store::now_unix());
    assert_eq!(session["line_items"][0]["quantity"], 2);
    let order_id = session["order"].as_str().expect("payment mode records an order").to_owned();

    // The pending order exists before anyone pays.
    let order = app.read(&format!("/v1/orders/{order_id}")).await;
    assert_eq!((order["status"].as_str(), order["amount_total"].as_i64()), (Some("pending"), Some(1000)));
    // The provider customer was created on first use and linked at once.
    let customer = app.read("/v1/customers/u_ada").await;
    let cus = customer["providers"]["stripe"].as_str().expect("linked").to_owned();
    let at_provider = emulator_get(&app, &format!("/v1/customers/{cus}")).await;
    assert_eq!(at_provider["metadata"]["tollgate_external_id"], "u_ada");
    assert_eq!(at_provider["email"], "ada@example.com");
    let provider_session = emulator_get(
        &app,
        &format!("/v1/checkout/sessions/{}", session["provider_session"].as_str().unwrap()),
    )
    .await;
    assert_eq!(provider_session["client_reference_id"], session["id"]);
    assert_eq!(provider_session["metadata"]["tollgate_checkout_session"], session["id"]);

    pay(&session, "4242424242424242").await;
    let order = app.read_until(&format!("/v1/orders/{order_id}"), |o| o["status"] == "fulfilled").await;
    assert_eq!(order["lines"][0]["price"], "card_pack_5");
    let intent =
        emulator_get(&app, &format!("/v1/payment_intents/{}", order["provider_payment"].as_str().unwrap()))
            .await;
    assert_eq!(intent["metadata"]["tollgate_order_id"], order_id.as_str());
    // The session's own event may be applied after the payment's.
    let done = app
        .read_until(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap()), |s| {
            s["status"] == "complete"
        })
        .await;
    assert_eq!(done["payment_status"], "paid");
    assert_eq!(done["url"], Value::Null, "a completed session has no page to pay");
    let e = app.read_until("/v1/customers/u_ada/entitlements", |e| e["balances"]["cards"] == 10).await;
    assert_eq!(e["balances"]["cards"], 10);

    // A second checkout reuses the provider customer.
    created(app.checkout(payment("u_ada", json!([{ "price": "card_pack_5" }]))).await).await;
    let customers = emulator_get(&app, "/v1/customers?limit=100").await;
    assert_eq!(customers["data"].as_array().unwrap().len(), 1, "{customers}");
    let resp = app.get("/v1/checkout/sessions/chk_missing", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
}

#[tokio::test]
async fn a_cart_of_several_items_becomes_one_order_with_a_line_each() {
    let app = spawn_shop().await;
    app.upsert_customer("u_cart", json!({ "email": "cart@example.com" })).await;
    let cart = json!([{ "price": "card_pack_5", "quantity": 3 }, { "price": "sticker_1", "quantity": 4 }]);
    let session = created(app.checkout(payment("u_cart", cart)).await).await;
    assert_eq!(session["amount_total"], 3 * 500 + 4 * 250);
    let at_provider = emulator_get(
        &app,
        &format!("/v1/checkout/sessions/{}", session["provider_session"].as_str().unwrap()),
    )
    .await;
    assert_eq!(at_provider["amount_total"], 2500, "the provider charges what tollgate recorded");

    pay(&session, "4242424242424242").await;
    let order_path = format!("/v1/orders/{}", session["order"].as_str().unwrap());
    let order = app.read_until(&order_path, |o| o["status"] == "fulfilled").await;
    let lines: Vec<(i64, &str, i64, i64, i64)> = order["lines"]
        .as_array()
        .unwrap()
        .iter()
        .map(|l| {
            (
                l["line"].as_i64().unwrap(),
                l["price"].as_str().unwrap(),
                l["quantity"].as_i64().unwrap(),
                l["unit_amount"].as_i64().unwrap(),
                l["amount_total"].as_i64().unwrap(),
            )
        })
        .collect();
    assert_eq!(lines, [(1, "card_pack_5", 3, 500, 1500), (2, "sticker_1", 4, 250, 1000)]);
    assert_eq!((order["amount_total"].as_i64(), order["currency"].as_str()), (Some(2500), Some("usd")));
    let e = app.read_until("/v1/customers/u_cart/entitlements", |e| e["balances"]["cards"] == 15).await;
    assert!(e["features"].as_array().unwrap().contains(&json!("stickers")), "{e}");
}

#[tokio::test]
async fn a_subscription_checkout_with_a_trial_starts_trialing() {
    let app = spawn_shop().await;
    app.upsert_customer("u_sub", json!({ "email": "sub@example.com" })).await;
    let session = created(
        app.checkout(json!({
            "customer": "u_sub", "mode": "subscription", "trial_days": 7,
            "line_items": [{ "price": "pro_monthly" }],
            "success_url": "https://shop.example/welcome", "metadata": { "campaign": "spring" },
        }))
        .await,
    )
    .await;
    assert_eq!((&session["order"], &session["trial_days"]), (&Value::Null, &json!(7)));
    assert_eq!(session["metadata"]["campaign"], "spring");
    pay(&session, "4242424242424242").await;

    let subs =
        app.read_until("/v1/subscriptions?customer=u_sub", |l| l["data"][0]["status"] == "trialing").await;
    let sub = &subs["data"][0];
    assert_eq!(sub["price"], "pro_monthly");
    assert_eq!(sub["trial_end"].as_i64().unwrap() - sub["trial_start"].as_i64().unwrap(), 7 * 86400);
    let at_provider =
        emulator_get(&app, &format!("/v1/subscriptions/{}", sub["provider_subscription"].as_str().unwrap()))
            .await;
    assert_eq!(at_provider["metadata"]["tollgate_external_id"], "u_sub");
    let done = app
        .read_until(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap()), |s| {
            s["subscription"].is_string()
        })
        .await;
    assert_eq!((&done["status"], &done["subscription"]), (&json!("complete"), &sub["id"]));
    let e = app.read("/v1/customers/u_sub/entitlements").await;
    assert!(e["features"].as_array().unwrap().contains(&json!("api_access")), "{e}");
}

fn subscription(customer: &str, price: &str) -> Value {
    json!({
        "customer": customer, "mode": "subscription", "line_items": [{ "price": price }],
        "success_url": "https://shop.example/welcome",
    })
}

#[tokio::test]
async fn a_second_subscription_checkout_for_a_product_is_refused_unless_the_caller_opts_in() {
    let app = spawn_shop().await;
    app.upsert_customer("u_twice", json!({})).await;
    let first = created(app.checkout_keyed(subscription("u_twice", "pro_monthly"), "click-1").await).await;

    // A double click (another key) while the first page is open: refused,
    // nothing recorded, here or at the provider.
    let resp = app.checkout_keyed(subscription("u_twice", "pro_monthly"), "click-2").await;
    let e = expect_error(resp, 409, "invalid_request_error", "subscription_checkout_open").await;
    assert!(e["message"].as_str().unwrap().contains(first["id"].as_str().unwrap()), "{e}");
    assert_eq!(e["param"], "line_items");
    // The same product on another price is the same product.
    let resp = app.checkout_keyed(subscription("u_twice", "pro_yearly"), "click-yearly").await;
    expect_error(resp, 409, "invalid_request_error", "subscription_checkout_open").await;
    let at_provider = emulator_get(&app, "/v1/checkout/sessions?limit=100").await;
    assert_eq!(at_provider["data"].as_array().unwrap().len(), 1, "{at_provider}");
    // The first request, retried, is still answered as before.
    let again = app.checkout_keyed(subscription("u_twice", "pro_monthly"), "click-1").await;
    assert_eq!(again.status(), 201);
    assert_eq!(again.json::<Value>().await.unwrap()["id"], first["id"]);
    // Another product, or a one-time purchase, is not a duplicate.
    created(app.checkout_keyed(subscription("u_twice", "starter_monthly"), "starter").await).await;
    created(app.checkout_keyed(payment("u_twice", json!([{ "price": "card_pack_5" }])), "pack").await).await;

    // Once subscribed, a new checkout for the product names the subscription.
    pay(&first, "4242424242424242").await;
    let subs = app
        .read_until("/v1/subscriptions?customer=u_twice", |l| {
            l["data"]
                .as_array()
                .unwrap()
                .iter()
                .any(|s| s["price"] == "pro_monthly" && s["status"] == "active")
        })
        .await;
    let sub = subs["data"].as_array().unwrap().iter().find(|s| s["price"] == "pro_monthly").unwrap().clone();
    let resp = app.checkout_keyed(subscription("u_twice", "pro_yearly"), "click-3").await;
    let e = expect_error(resp, 409, "invalid_request_error", "subscription_exists").await;
    assert!(e["message"].as_str().unwrap().contains(sub["id"].as_str().unwrap()), "{e}");

    // Asked for explicitly (under the refused request's key, which the
    // refusal left free), it is sold.
    let mut wanted = subscription("u_twice", "pro_yearly");
    wanted["allow_duplicate_subscription"] = json!(true);
    let second = created(app.checkout_keyed(wanted, "click-3").await).await;
    assert_ne!(second["id"], first["id"]);
    assert_eq!(second["status"], "open");
}

/// A Pro subscription checkout of `external`'s, completed at the provider
/// (announced by `checkout.session.completed` alone, its subscription
/// `sub`'s event not yet) and refused as a duplicate for Pro yearly.
async fn completed_before_its_subscription(app: &TestApp, external: &str, sub: &str) -> Value {
    app.upsert_customer(external, json!({})).await;
    let first =
        created(app.checkout_keyed(subscription(external, "pro_monthly"), &format!("{external}-1")).await)
            .await;
    let provider_session = first["provider_session"].as_str().unwrap().to_owned();
    let mut completed = emulator_get(app, &format!("/v1/checkout/sessions/{provider_session}")).await;
    completed["status"] = json!("complete");
    completed["payment_status"] = json!("paid");
    completed["subscription"] = json!(sub);
    let announced = crate::webhooks::inbox_event(
        &format!("evt_{external}_completed"),
        "checkout.session.completed",
        tollgate::store::now_unix(),
        completed,
    );
    app.server_store.insert_provider_events(&[announced]).await.unwrap();
    app.read_until(&format!("/v1/checkout/sessions/{}", first["id"].as_str().unwrap()), |s| {
        s["status"] == "complete"
    })
    .await;
    let resp = app.checkout_keyed(subscription(external, "pro_yearly"), &format!("{external}-2")).await;
    let e = expect_error(resp, 409, "invalid_request_error", "subscription_exists").await;
    assert!(e["message"].as_str().unwrap().contains(first["id"].as_str().unwrap()), "{e}");
    first
}

/// Stripe announces a completed checkout and the subscription it made in
/// separate events; between the two the customer is subscribed though no
/// subscription shows it yet, and a second checkout is still a duplicate.
#[tokio::test]
async fn a_completed_subscription_checkout_counts_until_its_subscription_is_recorded() {
    let app = spawn_shop().await;
    completed_before_its_subscription(&app, "u_window", "sub_window_not_yet_announced").await;
    // Another product is not a duplicate.
    created(app.checkout_keyed(subscription("u_window", "starter_monthly"), "window-3").await).await;

    // Once the subscription is recorded, it decides: here it was canceled
    // at once, so the product can be sold again.
    let customer = app.read("/v1/customers/u_window").await;
    let cus = customer["providers"]["stripe"].as_str().unwrap();
    let canceled =
        crate::billing_events::subscription("sub_window_not_yet_announced", cus, "canceled", json!({}));
    let announced = crate::webhooks::inbox_event(
        "evt_window_subscription",
        "customer.subscription.created",
        tollgate::store::now_unix(),
        canceled,
    );
    app.server_store.insert_provider_events(&[announced]).await.unwrap();
    app.read_until("/v1/subscriptions?customer=u_window", |l| {
        l["data"].as_array().is_some_and(|d| !d.is_empty())
    })
    .await;
    created(app.checkout_keyed(subscription("u_window", "pro_yearly"), "window-4").await).await;
}

/// A subscription event that never applies (a dead event to see to) does
/// not block the product for ever: the completed checkout counts for a day.
#[tokio::test]
async fn a_completed_checkout_whose_subscription_never_comes_counts_for_a_day() {
    let app = spawn_shop().await;
    let first = completed_before_its_subscription(&app, "u_dayold", "sub_dayold_never_announced").await;
    let aged = format!(
        "UPDATE checkout_sessions SET updated_at = updated_at - 86401 WHERE id = '{}'",
        first["id"].as_str().unwrap()
    );
    assert_eq!(app.server_store.execute_raw(&aged).await.unwrap(), 1);
    created(app.checkout_keyed(subscription("u_dayold", "pro_yearly"), "u_dayold-3").await).await;
}

#[tokio::test]
async fn two_subscription_checkouts_at_once_open_one_session() {
    let app = spawn_shop().await;
    app.upsert_customer("u_double", json!({})).await;
    let tasks: Vec<_> = (0..4)
        .map(|_| {
            let req = app.post_json("/v1/checkout/sessions", subscription("u_double", "pro_monthly"));
            tokio::spawn(async move { req.send().await.unwrap() })
        })
        .collect();
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap().status().as_u16());
    }
    statuses.sort();
    assert_eq!(statuses, [201, 409, 409, 409]);
    let at_provider = emulator_get(&app, "/v1/checkout/sessions?limit=100").await;
    assert_eq!(at_provider["data"].as_array().unwrap().len(), 1, "{at_provider}");
}

#[tokio::test]
async fn a_declined_card_leaves_the_order_pending_until_another_card_pays() {
    let app = spawn_shop().await;
    app.upsert_customer("u_declined", json!({})).await;
    let session =
        created(app.checkout(payment("u_declined", json!([{ "price": "card_pack_5" }]))).await).await;
    let order_path = format!("/v1/orders/{}", session["order"].as_str().unwrap());

    let page = session["url"].as_str().unwrap();
    let declined = app
        .client
        .post(format!("{page}/pay"))
        .form(&[("card_number", "4000000000000002")])
        .send()
        .await
        .unwrap();
    assert_eq!(declined.status(), 402, "the hosted page shows the decline");
    // The decline reaches tollgate as a failed payment naming the order.
    eventually(Duration::from_secs(60), || async {
        app.provider_events("")
            .await
            .iter()
            .any(|e| e["type"] == "payment_intent.payment_failed" && e["status"] == "processed")
            .then_some(())
    })
    .await;
    let order = app.read(&order_path).await;
    assert_eq!(order["status"], "pending", "a declined card does not end the checkout: {order}");
    let open = app.read(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await;
    assert_eq!(open["status"], "open");

    pay(&session, "4242424242424242").await;
    let order = app.read_until(&order_path, |o| o["status"] == "fulfilled").await;
    let paid = emulator_get(
        &app,
        &format!("/v1/checkout/sessions/{}", session["provider_session"].as_str().unwrap()),
    )
    .await;
    assert_eq!(
        order["provider_payment"], paid["payment_intent"],
        "the payment that succeeded is the order's"
    );
}

#[tokio::test]
async fn a_retried_checkout_with_the_same_idempotency_key_opens_one_session() {
    let app = spawn_shop().await;
    app.upsert_customer("u_retry", json!({})).await;
    let body = payment("u_retry", json!([{ "price": "card_pack_5", "quantity": 1 }]));
    let send =
        || app.post_json("/v1/checkout/sessions", body.clone()).header("idempotency-key", "order-77").send();
    let first = created(send().await.unwrap()).await;
    let again = send().await.unwrap();
    assert_eq!(again.status(), 201);
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(again["id"], first["id"]);
    // Another key is another checkout.
    let other = created(
        app.post_json("/v1/checkout/sessions", body.clone())
            .header("idempotency-key", "order-78")
            .send()
            .await
            .unwrap(),
    )
    .await;
    assert_ne!(other["id"], first["id"]);

    let sessions = emulator_get(&app, "/v1/checkout/sessions?limit=100").await;
    assert_eq!(sessions["data"].as_array().unwrap().len(), 2, "one provider session per request: {sessions}");
    let cust = app.read("/v1/customers/u_retry").await;
    let orders = app.server_store.orders_for_customer(cust["id"].as_str().unwrap()).await.unwrap();
    assert_eq!(orders.len(), 2);
}

#[tokio::test]
async fn an_idempotency_key_reused_after_its_lifetime_opens_a_new_checkout() {
    let app = spawn_shop().await;
    app.upsert_customer("u_later", json!({})).await;
    let body = payment("u_later", json!([{ "price": "card_pack_5" }]));
    let send =
        || app.post_json("/v1/checkout/sessions", body.clone()).header("idempotency-key", "cart-1").send();
    let first = created(send().await.unwrap()).await;
    // A day and more later, tollgate and the request's record have both
    // forgotten the key.
    let store = &app.server_store;
    store.execute_raw("UPDATE checkout_sessions SET created_at = created_at - 90000").await.unwrap();
    store.execute_raw("UPDATE idempotency_keys SET created_at = created_at - 90000").await.unwrap();
    let second = created(send().await.unwrap()).await;
    assert_ne!(second["id"], first["id"]);
    assert_ne!(second["provider_session"], first["provider_session"], "a new session at the provider too");
    assert_ne!(second["order"], first["order"]);
    // Within its lifetime the key finds the new one.
    let again = send().await.unwrap();
    assert_eq!(again.json::<Value>().await.unwrap()["id"], second["id"]);
    let old = app.read(&format!("/v1/checkout/sessions/{}", first["id"].as_str().unwrap())).await;
    assert_eq!(old["status"], "open", "the old checkout is untouched");
}

#[tokio::test]
async fn concurrent_first_checkouts_of_a_customer_create_one_provider_customer() {
    let app = spawn_shop().await;
    app.upsert_customer("u_eager", json!({ "email": "eager@example.com" })).await;
    // Five first checkouts at once, as a double-clicking buyer might.
    let tasks: Vec<_> = (0..5)
        .map(|_| {
            let req = app
                .post_json("/v1/checkout/sessions", payment("u_eager", json!([{ "price": "card_pack_5" }])));
            tokio::spawn(async move { req.send().await.unwrap() })
        })
        .collect();
    let mut sessions = Vec::new();
    for t in tasks {
        sessions.push(created(t.await.unwrap()).await);
    }
    let customers = emulator_get(&app, "/v1/customers?limit=100").await;
    assert_eq!(customers["data"].as_array().unwrap().len(), 1, "one provider customer: {customers}");
    let linked = app.read("/v1/customers/u_eager").await;
    assert_eq!(linked["providers"]["stripe"], customers["data"][0]["id"]);
    for s in &sessions {
        let at_provider =
            emulator_get(&app, &format!("/v1/checkout/sessions/{}", s["provider_session"].as_str().unwrap()))
                .await;
        assert_eq!(at_provider["customer"], customers["data"][0]["id"]);
    }
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("checkout_requests_total{") && l.contains("outcome=\"created\"")),
        "checkout_requests_total is exported"
    );
}

/// A stand-in for Stripe that fails with 500s until told to recover; then
/// it answers customers and checkout sessions, one per Idempotency-Key, as
/// Stripe does.
#[derive(Clone, Default)]
struct FlakyStripe {
    healthy: Arc<AtomicBool>,
    hits: Arc<AtomicUsize>,
    sessions: Arc<Mutex<HashMap<String, Value>>>,
}

impl FlakyStripe {
    async fn start(&self) -> String {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let this = self.clone();
        let app = axum::Router::new().fallback(move |req: axum::extract::Request| {
            let this = this.clone();
            async move { this.answer(req) }
        });
        tokio::spawn(async move { axum::serve(listener, app).await.unwrap() });
        base
    }

    fn answer(&self, req: axum::extract::Request) -> (axum::http::StatusCode, axum::Json<Value>) {
        use axum::http::StatusCode;
        self.hits.fetch_add(1, Ordering::SeqCst);
        if !self.healthy.load(Ordering::SeqCst) {
            let error = json!({ "error": { "type": "api_error", "message": "Something went wrong on Stripe's end." } });
            return (StatusCode::INTERNAL_SERVER_ERROR, axum::Json(error));
        }
        let key = req.headers().get("idempotency-key").and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
        let path = req.uri().path().to_owned();
        let mut sessions = self.sessions.lock().unwrap();
        let n = sessions.len();
        let object = sessions
            .entry(format!("{path} {key}"))
            .or_insert_with(|| match path.as_str() {
                "/v1/customers" => json!({ "id": format!("cus_flaky{n}"), "object": "customer" }),
                _ => json!({
                    "id": format!("cs_flaky{n}"), "object": "checkout.session",
                    "url": format!("https://pay.example/{n}"), "expires_at": tollgate::store::now_unix() + 86400,
                }),
            })
            .clone();
        (StatusCode::OK, axum::Json(object))
    }

    fn checkout_sessions(&self) -> usize {
        self.sessions.lock().unwrap().keys().filter(|k| k.starts_with("/v1/checkout/sessions")).count()
    }
}

#[tokio::test]
async fn while_the_provider_fails_checkouts_fail_fast_with_503_and_recover_without_a_restart() {
    let stripe = FlakyStripe::default();
    let base = stripe.start().await;
    let app = spawn_app_with(|c| {
        unlimited(c);
        c.stripe_secret_key = Some(SecretString::from("sk_test_flaky".to_owned()));
        c.stripe_api_base = Some(base.clone());
        c.stripe_max_retries = 0;
        c.stripe_breaker_failures = 2;
        c.stripe_breaker_cooldown_seconds = 1;
    })
    .await;
    let text = std::fs::read_to_string(manifest_path("tollgate.toml"))
        .unwrap()
        .replace("[prices.card_pack_5]\n", "[prices.card_pack_5]\nstripe_price = \"price_flaky\"\n");
    app.server_store.sync_catalog(&Catalog::parse(&text).unwrap(), &Actor::Cli).await.unwrap();
    let cust = app.upsert_customer("u_flaky", json!({})).await["id"].as_str().unwrap().to_owned();
    let body = payment("u_flaky", json!([{ "price": "card_pack_5" }]));
    let send = |key: Option<&'static str>| {
        let mut req = app.post_json("/v1/checkout/sessions", body.clone());
        if let Some(k) = key {
            req = req.header("idempotency-key", k);
        }
        req.send()
    };
    let provider_error = |resp: reqwest::Response| async move {
        let retry_after =
            resp.headers().get("retry-after").map(|v| v.to_str().unwrap().parse::<u64>().unwrap());
        expect_error(resp, 503, "provider_error", "provider_unavailable").await;
        assert!(retry_after.is_some_and(|s| s >= 1), "503 carries Retry-After");
    };

    // Two failures open the breaker; each failed checkout is left expired,
    // its order canceled, not pending forever.
    provider_error(send(Some("first")).await.unwrap()).await;
    provider_error(send(None).await.unwrap()).await;
    let orders = app.server_store.orders_for_customer(&cust).await.unwrap();
    assert_eq!(orders.iter().map(|o| o.status.as_str()).collect::<Vec<_>>(), ["canceled", "canceled"]);
    let failed = app
        .read(&format!("/v1/checkout/sessions/{}", orders[0].checkout_session_id.as_deref().unwrap()))
        .await;
    assert_eq!(
        (&failed["status"], &failed["last_error"]),
        (&json!("expired"), &json!("provider_unavailable"))
    );

    // Open: answered at once, without calling the provider or writing anything.
    let hits = stripe.hits.load(Ordering::SeqCst);
    let started = Instant::now();
    provider_error(send(None).await.unwrap()).await;
    assert!(started.elapsed() < Duration::from_millis(500), "fails fast: {:?}", started.elapsed());
    assert_eq!(stripe.hits.load(Ordering::SeqCst), hits, "the provider was not called");
    assert_eq!(app.server_store.orders_for_customer(&cust).await.unwrap().len(), 2, "nothing recorded");

    // The provider recovers; the client's retry of its first request goes
    // through once the cool-down ends, and resumes that same checkout.
    stripe.healthy.store(true, Ordering::SeqCst);
    let session = eventually(Duration::from_secs(20), || async {
        let resp = send(Some("first")).await.unwrap();
        if resp.status() == 503 {
            return None;
        }
        Some(created(resp).await)
    })
    .await;
    assert_eq!(
        session["id"].as_str(),
        orders[0].checkout_session_id.as_deref(),
        "the same checkout, revived"
    );
    assert_eq!((&session["status"], &session["last_error"]), (&json!("open"), &Value::Null));
    assert_eq!(session["url"], "https://pay.example/1");
    let order = app.read(&format!("/v1/orders/{}", orders[0].id)).await;
    assert_eq!(order["status"], "pending", "its order is payable again");
    // Both of the order's moves are in the audit log, as a webhook's are.
    let moves: Vec<(String, Value, Value)> = audit_of(&app, &orders[0].id)
        .await
        .into_iter()
        .filter(|(action, _)| action == "order.updated")
        .map(|(_, d)| {
            (d["reason"].as_str().unwrap().to_owned(), d["previous_status"].clone(), d["status"].clone())
        })
        .collect();
    assert_eq!(
        moves,
        [
            ("checkout_failed".to_owned(), json!("pending"), json!("canceled")),
            ("checkout_retried".to_owned(), json!("canceled"), json!("pending")),
        ]
    );
    assert_eq!(stripe.checkout_sessions(), 1);
    // And new checkouts work as before, without a restart.
    created(send(Some("later")).await.unwrap()).await;
    assert_eq!(stripe.checkout_sessions(), 2);
}

#[tokio::test]
async fn a_failed_checkout_retried_after_its_prices_changed_is_a_409_and_changes_nothing() {
    let stripe = FlakyStripe::default();
    let base = stripe.start().await;
    let app = spawn_app_with(|c| {
        unlimited(c);
        c.stripe_secret_key = Some(SecretString::from("sk_test_flaky".to_owned()));
        c.stripe_api_base = Some(base.clone());
        c.stripe_max_retries = 0;
    })
    .await;
    let catalog = |amount: i64| {
        let text = std::fs::read_to_string(manifest_path("tollgate.toml"))
            .unwrap()
            .replace("[prices.card_pack_5]\n", "[prices.card_pack_5]\nstripe_price = \"price_flaky\"\n");
        assert!(text.contains("amount = 500\n"));
        Catalog::parse(&text.replace("amount = 500\n", &format!("amount = {amount}\n"))).unwrap()
    };
    app.server_store.sync_catalog(&catalog(500), &Actor::Cli).await.unwrap();
    let cust = app.upsert_customer("u_repriced", json!({})).await["id"].as_str().unwrap().to_owned();
    let body = payment("u_repriced", json!([{ "price": "card_pack_5", "quantity": 2 }]));
    let send = |key: &'static str| {
        app.post_json("/v1/checkout/sessions", body.clone()).header("idempotency-key", key).send()
    };
    let resp = send("cart-9").await.unwrap();
    expect_error(resp, 503, "provider_error", "provider_unavailable").await;
    let failed = app.server_store.orders_for_customer(&cust).await.unwrap();
    assert_eq!((failed.len(), failed[0].amount_total, failed[0].status.as_str()), (1, 1000, "canceled"));

    // The price changes before the client retries: the recorded sale is not
    // today's, so the retry is refused rather than opened at either price.
    app.server_store.sync_catalog(&catalog(600), &Actor::Cli).await.unwrap();
    stripe.healthy.store(true, Ordering::SeqCst);
    let resp = send("cart-9").await.unwrap();
    let e = expect_error(resp, 409, "idempotency_error", "checkout_prices_changed").await;
    assert!(e["message"].as_str().unwrap().contains("new key"), "{e}");
    assert_eq!(stripe.checkout_sessions(), 0, "nothing asked of the provider");
    let orders = app.server_store.orders_for_customer(&cust).await.unwrap();
    assert_eq!(
        orders.iter().map(|o| (o.id.as_str(), o.status.as_str(), o.amount_total)).collect::<Vec<_>>(),
        [(failed[0].id.as_str(), "canceled", 1000)],
        "the failed checkout stays as it was"
    );
    let session = app
        .read(&format!("/v1/checkout/sessions/{}", failed[0].checkout_session_id.as_deref().unwrap()))
        .await;
    assert_eq!(
        (&session["status"], &session["last_error"]),
        (&json!("expired"), &json!("provider_unavailable"))
    );

    // The first attempt ran under the key (its session and order exist),
    // so the 409 does not free it for a different request.
    let other = payment("u_repriced", json!([{ "price": "card_pack_5", "quantity": 1 }]));
    let resp = app
        .post_json("/v1/checkout/sessions", other)
        .header("idempotency-key", "cart-9")
        .send()
        .await
        .unwrap();
    expect_error(resp, 422, "idempotency_error", "idempotency_key_reused").await;

    // A new key is a new checkout, at today's price.
    let fresh = created(send("cart-10").await.unwrap()).await;
    assert_eq!(fresh["amount_total"], 1200);
    assert_eq!(stripe.checkout_sessions(), 1);
}

#[tokio::test]
async fn bad_checkout_and_portal_requests_are_refused_and_write_nothing() {
    let app = spawn_shop().await;
    app.upsert_customer("u_bad", json!({})).await;
    let line = |price: &str, quantity: i64| json!([{ "price": price, "quantity": quantity }]);
    let cases: Vec<(Value, u16, &str, Option<&str>)> = vec![
        (payment("u_bad", line("no_such_price", 1)), 400, "parameter_invalid", Some("line_items[0][price]")),
        (payment("u_bad", line("pro_monthly", 1)), 400, "parameter_invalid", Some("line_items[0][price]")),
        (
            json!({ "customer": "u_bad", "mode": "subscription", "line_items": line("card_pack_5", 1), "success_url": "https://shop.example/ok" }),
            400,
            "parameter_invalid",
            Some("line_items[0][price]"),
        ),
        (
            payment("u_bad", json!([{ "price": "card_pack_5" }, { "price": "card_pack_eur" }])),
            400,
            "parameter_invalid",
            Some("line_items[1][price]"),
        ),
        (
            payment("u_bad", line("card_pack_5", 1_000_000)),
            400,
            "parameter_invalid",
            Some("line_items[0][quantity]"),
        ),
        (payment("u_bad", line("card_pack_5", 0)), 400, "parameter_invalid", Some("line_items[0][quantity]")),
        (payment("u_bad", json!([])), 400, "parameter_invalid", Some("line_items")),
        (payment("u_nobody", line("card_pack_5", 1)), 404, "resource_missing", Some("customer")),
        (
            json!({ "customer": "u_bad", "mode": "payment", "line_items": line("card_pack_5", 1), "success_url": "javascript:alert(1)" }),
            400,
            "url_invalid",
            Some("success_url"),
        ),
        (
            json!({ "customer": "u_bad", "mode": "payment", "line_items": line("card_pack_5", 1) }),
            400,
            "success_url_missing",
            Some("success_url"),
        ),
        (
            json!({ "customer": "u_bad", "mode": "payment", "line_items": line("card_pack_5", 1), "success_url": "https://shop.example/ok", "trial_days": 3 }),
            400,
            "parameter_invalid",
            Some("trial_days"),
        ),
        (
            json!({ "customer": "u_bad", "mode": "rent", "line_items": line("card_pack_5", 1), "success_url": "https://shop.example/ok" }),
            400,
            "parameter_invalid",
            Some("mode"),
        ),
        (
            json!({ "customer": "u_bad", "mode": "payment", "line_items": line("card_pack_5", 1), "success_url": "https://shop.example/ok", "coupon": "FREE" }),
            400,
            "parameter_unknown",
            Some("coupon"),
        ),
        (
            json!({ "customer": "u_bad", "mode": "payment", "line_items": line("card_pack_5", 1), "success_url": "https://shop.example/ok", "metadata": { "tollgate_order_id": "ord_x" } }),
            400,
            "parameter_invalid",
            Some("metadata[tollgate_order_id]"),
        ),
    ];
    for (body, status, code, param) in cases {
        let resp = app.checkout(body.clone()).await;
        let error = expect_error(resp, status, "invalid_request_error", code).await;
        assert_eq!(error["param"].as_str(), param, "{body} → {error}");
    }
    let resp = app
        .client
        .post(app.url("/v1/checkout/sessions"))
        .bearer_auth(&app.read_key)
        .json(&payment("u_bad", line("card_pack_5", 1)))
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;

    // The portal needs an account at the provider, which a checkout creates.
    let portal = |body: Value| app.post_json("/v1/portal/sessions", body).send();
    let resp =
        portal(json!({ "customer": "u_bad", "return_url": "https://shop.example/account" })).await.unwrap();
    let error = expect_error(resp, 400, "invalid_request_error", "customer_not_at_provider").await;
    assert_eq!(error["param"], "customer");
    let resp = portal(json!({ "customer": "u_nobody", "return_url": "https://shop.example/account" }))
        .await
        .unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    let resp = portal(json!({ "customer": "u_bad", "return_url": "ftp://shop.example" })).await.unwrap();
    expect_error(resp, 400, "invalid_request_error", "url_invalid").await;

    // Nothing was written, here or at the provider.
    let cust = app.read("/v1/customers/u_bad").await;
    assert!(app.server_store.orders_for_customer(cust["id"].as_str().unwrap()).await.unwrap().is_empty());
    assert_eq!(cust["providers"], json!({}), "no provider customer for a refused checkout");
    assert!(emulator_get(&app, "/v1/customers").await["data"].as_array().unwrap().is_empty());
    let log: Value =
        app.get("/v1/audit-log?limit=100", &app.admin_key).send().await.unwrap().json().await.unwrap();
    assert!(
        !log["data"]
            .as_array()
            .unwrap()
            .iter()
            .any(|e| e["action"].as_str().unwrap().starts_with("checkout_session.")),
        "no checkout recorded"
    );

    // After a checkout, the portal opens.
    created(app.checkout(payment("u_bad", line("card_pack_5", 1))).await).await;
    let resp =
        portal(json!({ "customer": "u_bad", "return_url": "https://shop.example/account" })).await.unwrap();
    let session = created(resp).await;
    let url = session["url"].as_str().unwrap();
    assert!(url.starts_with(&app.base) && url.contains("/portal/"), "{session}");
    assert_eq!(app.client.get(url).send().await.unwrap().status(), 200, "the portal page");
}

#[tokio::test]
async fn a_checkout_abandoned_before_the_provider_answered_is_expired_by_the_sweeper() {
    use tollgate::store::checkout::{CheckoutLine, NewCheckout, Recorded};
    let app = spawn_shop().await;
    let customer = app.upsert_customer("u_gone", json!({})).await["id"].as_str().unwrap().to_owned();
    let store = &app.server_store;
    let sweeper = Actor::System("checkout_sweeper");
    // What a checkout handler records before calling the provider; then
    // the handler is gone (the process died, or the request was cancelled).
    let line = CheckoutLine {
        price: "card_pack_5".into(),
        product: "card_pack".into(),
        provider_price: Some("price_x".into()),
        description: Some("Card pack".into()),
        quantity: 1,
        unit_amount: 500,
        amount_total: 500,
    };
    let recorded = store
        .record_checkout(
            &NewCheckout {
                id: "chk_gone",
                provider: "stripe",
                customer_id: &customer,
                mode: "payment",
                order_id: Some("ord_gone"),
                success_url: "https://shop.example/ok",
                cancel_url: None,
                currency: "usd",
                amount_total: 500,
                metadata: &json!({}),
                lines: std::slice::from_ref(&line),
                trial_days: None,
                request_key: Some("rk_gone"),
                request_key_valid_since: 0,
                provider_idempotency_key: "tollgate-gone",
                allow_duplicate_subscription: false,
            },
            &Actor::Cli,
            None,
        )
        .await
        .unwrap();
    assert_eq!(recorded, Recorded::Recorded);
    // And a checkout that was opened, as old.
    let opened = created(app.checkout(payment("u_gone", json!([{ "price": "card_pack_5" }]))).await).await;
    let cutoff = tollgate::store::now_unix() - 90;

    // While a request could still be working on it, it is left alone.
    store.expire_abandoned_checkouts(cutoff, &sweeper).await.unwrap();
    assert_eq!(app.read("/v1/checkout/sessions/chk_gone").await["status"], "open");
    assert_eq!(app.read("/v1/orders/ord_gone").await["status"], "pending");

    store.execute_raw("UPDATE checkout_sessions SET updated_at = updated_at - 3600").await.unwrap();
    store.expire_abandoned_checkouts(cutoff, &sweeper).await.unwrap();
    let session = app.read("/v1/checkout/sessions/chk_gone").await;
    assert_eq!((&session["status"], &session["last_error"]), (&json!("expired"), &json!("abandoned")));
    assert_eq!(app.read("/v1/orders/ord_gone").await["status"], "canceled");
    let actions: Vec<String> = audit_of(&app, "chk_gone").await.into_iter().map(|(a, _)| a).collect();
    assert_eq!(actions, ["checkout_session.created", "checkout_session.abandoned"]);
    let order_audit = audit_of(&app, "ord_gone").await;
    let (action, data) = order_audit.last().unwrap();
    assert_eq!(
        (action.as_str(), &data["previous_status"], &data["status"], &data["reason"]),
        ("order.updated", &json!("pending"), &json!("canceled"), &json!("checkout_abandoned"))
    );
    // The opened checkout is the provider's to expire, not the sweeper's.
    let still = app.read(&format!("/v1/checkout/sessions/{}", opened["id"].as_str().unwrap())).await;
    assert_eq!(still["status"], "open");
    assert_eq!(
        app.read(&format!("/v1/orders/{}", opened["order"].as_str().unwrap())).await["status"],
        "pending"
    );
    // Done once: a second pass finds nothing.
    assert_eq!(store.expire_abandoned_checkouts(cutoff, &sweeper).await.unwrap(), 0);
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
}
