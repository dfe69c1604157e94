//! Changing, cancelling and resuming subscriptions and refunding orders
//! through tollgate's API, against the emulator: tollgate asks the provider,
//! and its state follows the provider's answer and webhooks.

use std::time::Duration;

use serde_json::{json, Value};

use crate::billing_events::{buy, emulator_price, link_catalog, print_failing_events, wait_entitlements};
use crate::helpers::*;

async fn spawn() -> TestApp {
    spawn_app_with(unlimited).await
}

impl TestApp {
    async fn post_v1(&self, path: &str, key: &str, body: Value) -> reqwest::Response {
        self.client.post(self.url(path)).bearer_auth(key).json(&body).send().await.unwrap()
    }

    async fn ok_v1(&self, path: &str, body: Value) -> Value {
        let resp = self.post_v1(path, &self.write_key, body).await;
        let status = resp.status();
        let body: Value = resp.json().await.unwrap();
        assert_eq!(status, 200, "{path}: {body}");
        body
    }

    async fn read_v1(&self, path: &str) -> Value {
        self.get(path, &self.read_key).send().await.unwrap().json().await.unwrap()
    }
}

/// A customer of the application, known to tollgate and created at the
/// provider by the application itself (tollgate links the two from the
/// metadata), optionally on a test clock.
async fn provider_customer(app: &TestApp, external: &str, clock: Option<&str>) -> String {
    app.upsert_customer(external, json!({})).await;
    let mut form = vec![("metadata[tollgate_external_id]", external)];
    if let Some(clock) = clock {
        form.push(("test_clock", clock));
    }
    emulator(app, "/v1/customers", &form).await["id"].as_str().unwrap().to_owned()
}

/// Subscribes on the emulator's hosted page and waits for tollgate's mirror.
async fn subscribe(
    app: &TestApp,
    customer: &str,
    external: &str,
    price: &str,
    card: &str,
    trial: Option<&str>,
) -> Value {
    let mut form = vec![
        ("mode", "subscription"),
        ("customer", customer),
        ("line_items[0][price]", price),
        ("success_url", "https://shop.example/ok"),
    ];
    if let Some(days) = trial {
        form.push(("subscription_data[trial_period_days]", days));
    }
    let session = emulator(app, "/v1/checkout/sessions", &form).await;
    pay(&session, card).await;
    subscription_where(app, external, |s| matches!(s["status"].as_str(), Some("active" | "trialing"))).await
}

/// The customer's one subscription, once `check` holds for it.
async fn subscription_where(app: &TestApp, external: &str, check: impl Fn(&Value) -> bool) -> Value {
    let started = std::time::Instant::now();
    let reported = std::sync::atomic::AtomicBool::new(false);
    eventually(Duration::from_secs(60), || async {
        let listed = app.read_v1(&format!("/v1/subscriptions?customer={external}")).await;
        let sub = listed["data"].get(0).cloned().filter(|s| check(s));
        if sub.is_none()
            && started.elapsed() > Duration::from_secs(15)
            && !reported.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("waiting for the subscription of {external}; now {listed}");
            print_failing_events(app).await;
        }
        sub
    })
    .await
}

/// Every provider event delivered so far is applied, none failed.
async fn inbox_drained(app: &TestApp) {
    eventually(Duration::from_secs(60), || async {
        let counts = app.server_store.provider_event_counts().await.ok()?;
        let failed = counts.get("failed").copied().unwrap_or(0) + counts.get("dead").copied().unwrap_or(0);
        assert_eq!(failed, 0, "no event may fail: {counts:?}");
        (counts.get("received").copied().unwrap_or(0) == 0).then_some(())
    })
    .await
}

fn invoices_of(list: &Value, reason: &str) -> Vec<Value> {
    list["data"].as_array().unwrap().iter().filter(|i| i["billing_reason"] == reason).cloned().collect()
}

#[tokio::test]
async fn upgrades_and_downgrades_are_prorated_by_the_provider_and_mirrored_from_its_answer() {
    let app = spawn().await;
    let starter = emulator_price(&app, "Starter", "900", Some("month")).await;
    let pro = emulator_price(&app, "Pro", "2900", Some("month")).await;
    link_catalog(&app, &[("starter_monthly", &starter), ("pro_monthly", &pro)]).await;
    let customer = provider_customer(&app, "u_changer", None).await;
    let sub = subscribe(&app, &customer, "u_changer", &starter, "4242424242424242", None).await;
    let (id, provider_sub) = (sub["id"].as_str().unwrap(), sub["provider_subscription"].as_str().unwrap());
    assert_eq!((sub["price"].as_str(), sub["quantity"].as_i64()), (Some("starter_monthly"), Some(1)));
    let change = format!("/v1/subscriptions/{id}/change");

    // Upgrade, invoiced now: the provider charges the difference for the
    // rest of the period, and tollgate answers with the new price at once.
    let upgraded = app.ok_v1(&change, json!({ "price": "pro_monthly", "proration": "always_invoice" })).await;
    assert_eq!((upgraded["price"].as_str(), upgraded["quantity"].as_i64()), (Some("pro_monthly"), Some(1)));
    assert_eq!(upgraded["status"], "active");
    let at_provider = emulator_get(&app, &format!("/v1/subscriptions/{provider_sub}")).await;
    assert_eq!(at_provider["items"]["data"][0]["price"]["id"], pro.as_str());
    let invoices = emulator_get(&app, &format!("/v1/invoices?subscription={provider_sub}")).await;
    let prorated = invoices_of(&invoices, "subscription_update");
    assert_eq!(prorated.len(), 1, "{invoices}");
    let charged = prorated[0]["amount_paid"].as_i64().unwrap();
    assert!(charged > 1900 && charged <= 2000, "about the whole month's difference: {charged}");
    assert_eq!(prorated[0]["lines"]["data"][0]["parent"]["subscription_item_details"]["proration"], true);
    wait_entitlements(&app, "u_changer", |e| {
        e["features"].as_array().is_some_and(|f| f.contains(&json!("api_access")))
    })
    .await;

    // Downgrade to two starters, invoiced now: the unused time becomes a
    // credit on the customer's balance.
    let downgraded = app
        .ok_v1(&change, json!({ "price": "starter_monthly", "quantity": 2, "proration": "always_invoice" }))
        .await;
    assert_eq!(
        (downgraded["price"].as_str(), downgraded["quantity"].as_i64()),
        (Some("starter_monthly"), Some(2))
    );
    let balance = emulator_get(&app, &format!("/v1/customers/{customer}")).await["balance"].as_i64().unwrap();
    assert!((-1100..-1000).contains(&balance), "about 2900 − 1800 credited: {balance}");

    // Quantity only, without proration: nothing is invoiced now.
    let before = invoices_of(
        &emulator_get(&app, &format!("/v1/invoices?subscription={provider_sub}")).await,
        "subscription_update",
    )
    .len();
    let three = app.ok_v1(&change, json!({ "quantity": 3, "proration": "none" })).await;
    assert_eq!((three["price"].as_str(), three["quantity"].as_i64()), (Some("starter_monthly"), Some(3)));
    let after = invoices_of(
        &emulator_get(&app, &format!("/v1/invoices?subscription={provider_sub}")).await,
        "subscription_update",
    )
    .len();
    assert_eq!(before, after, "proration none invoices nothing");

    // The webhooks that follow agree with the answers: nothing moves back.
    inbox_drained(&app).await;
    let mirrored = subscription_where(&app, "u_changer", |s| s["quantity"] == 3).await;
    assert_eq!(
        (mirrored["price"].as_str(), mirrored["status"].as_str()),
        (Some("starter_monthly"), Some("active"))
    );
    let e = wait_entitlements(&app, "u_changer", |e| e["features"] == json!(["exports"])).await;
    assert_eq!(e["limits"]["projects"], 3);
    let invoice = app
        .server_store
        .invoice_by_provider_id("stripe", prorated[0]["id"].as_str().unwrap())
        .await
        .unwrap()
        .expect("the proration invoice is mirrored");
    assert_eq!((invoice.status.as_str(), invoice.amount_paid), ("paid", charged));
    let audit = app.server_store.events_for_object(id).await.unwrap();
    assert!(audit.iter().filter(|e| e.event_type == "subscription.updated").count() >= 3);
}

#[tokio::test]
async fn a_subscription_change_refuses_bad_input_and_changes_nothing() {
    let app = spawn().await;
    let starter = emulator_price(&app, "Starter", "900", Some("month")).await;
    link_catalog(&app, &[("starter_monthly", &starter)]).await;
    let customer = provider_customer(&app, "u_picky", None).await;
    let sub = subscribe(&app, &customer, "u_picky", &starter, "4242424242424242", None).await;
    let id = sub["id"].as_str().unwrap();
    let change = format!("/v1/subscriptions/{id}/change");
    let post = |body: Value| app.post_v1(&change, &app.write_key, body);

    let e = expect_error(post(json!({})).await, 400, "invalid_request_error", "parameter_missing").await;
    assert!(e["message"].as_str().unwrap().contains("price"));
    let e =
        expect_error(post(json!({ "quantity": 0 })).await, 400, "invalid_request_error", "parameter_invalid")
            .await;
    assert_eq!(e["param"], "quantity");
    let e = expect_error(
        post(json!({ "price": "card_pack_5" })).await,
        400,
        "invalid_request_error",
        "parameter_invalid",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("one-time"), "{e}");
    let e = expect_error(
        post(json!({ "price": "gold" })).await,
        400,
        "invalid_request_error",
        "resource_missing",
    )
    .await;
    assert_eq!(e["param"], "price");
    // In the catalog but never synced to the provider.
    let e = expect_error(
        post(json!({ "price": "pro_yearly" })).await,
        400,
        "invalid_request_error",
        "price_not_synced",
    )
    .await;
    assert!(e["message"].as_str().unwrap().contains("catalog sync"));
    expect_error(
        post(json!({ "quantity": 2, "proration": "sometimes" })).await,
        400,
        "invalid_request_error",
        "parameter_invalid",
    )
    .await;
    expect_error(
        post(json!({ "quantity": 2, "colour": "red" })).await,
        400,
        "invalid_request_error",
        "parameter_unknown",
    )
    .await;
    expect_error(post(json!({ "quantity": "two" })).await, 400, "invalid_request_error", "parameter_invalid")
        .await;
    let resp = app.post_v1(&change, &app.read_key, json!({ "quantity": 2 })).await;
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;
    let resp =
        app.post_v1("/v1/subscriptions/sub_nope/change", &app.write_key, json!({ "quantity": 2 })).await;
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    let resp = app.post_v1(&format!("/v1/subscriptions/{id}/resume"), &app.write_key, json!({})).await;
    expect_error(resp, 400, "invalid_request_error", "subscription_not_resumable").await;

    let now = app.read_v1(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!((now["quantity"].as_i64(), now["price"].as_str()), (Some(1), Some("starter_monthly")));
    let at_provider =
        emulator_get(&app, &format!("/v1/subscriptions/{}", sub["provider_subscription"].as_str().unwrap()))
            .await;
    assert_eq!(at_provider["items"]["data"][0]["quantity"], 1, "nothing reached the provider");
}

#[tokio::test]
async fn a_cancellation_at_period_end_is_resumed_and_a_cancellation_now_ends_the_entitlements() {
    let app = spawn().await;
    let pro = emulator_price(&app, "Pro", "2900", Some("month")).await;
    link_catalog(&app, &[("pro_monthly", &pro)]).await;
    let customer = provider_customer(&app, "u_leaver", None).await;
    let sub = subscribe(&app, &customer, "u_leaver", &pro, "4242424242424242", None).await;
    let (id, provider_sub) = (sub["id"].as_str().unwrap(), sub["provider_subscription"].as_str().unwrap());
    wait_entitlements(&app, "u_leaver", |e| {
        e["features"].as_array().is_some_and(|f| f.contains(&json!("api_access")))
    })
    .await;

    let pending =
        app.ok_v1(&format!("/v1/subscriptions/{id}/cancel"), json!({ "at_period_end": true })).await;
    assert_eq!(
        (pending["status"].as_str(), pending["cancel_at_period_end"].as_bool()),
        (Some("active"), Some(true))
    );
    assert_eq!(pending["cancel_at"], pending["current_period_end"]);
    let at_provider = emulator_get(&app, &format!("/v1/subscriptions/{provider_sub}")).await;
    assert_eq!(at_provider["cancel_at_period_end"], true);
    // Still entitled until the period ends.
    assert!(crate::billing_events::entitlements_of(&app, "u_leaver").await["features"]
        .as_array()
        .unwrap()
        .contains(&json!("api_access")));

    let resumed = app.ok_v1(&format!("/v1/subscriptions/{id}/resume"), json!({})).await;
    assert_eq!(
        (resumed["status"].as_str(), resumed["cancel_at_period_end"].as_bool()),
        (Some("active"), Some(false))
    );
    assert_eq!(resumed["cancel_at"], Value::Null);
    inbox_drained(&app).await;
    let mirrored = app.read_v1(&format!("/v1/subscriptions/{id}")).await;
    assert_eq!(mirrored["cancel_at_period_end"], false, "late webhooks do not undo the resume");

    // Now: ended at the provider, and the entitlements with it.
    let ended = app.ok_v1(&format!("/v1/subscriptions/{id}/cancel"), json!({})).await;
    assert_eq!(ended["status"], "canceled");
    assert!(ended["ended_at"].as_i64().is_some());
    let e = wait_entitlements(&app, "u_leaver", |e| e["features"] == json!([])).await;
    assert_eq!(e["limits"], json!({}));
    assert_eq!(emulator_get(&app, &format!("/v1/subscriptions/{provider_sub}")).await["status"], "canceled");
    for (path, body) in [("cancel", json!({})), ("resume", json!({})), ("change", json!({ "quantity": 2 }))] {
        let resp = app.post_v1(&format!("/v1/subscriptions/{id}/{path}"), &app.write_key, body).await;
        expect_error(resp, 400, "invalid_request_error", "subscription_canceled").await;
    }
    inbox_drained(&app).await;
    let events = app.server_store.events_for_object(id).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.event_type == "subscription.canceled").count(), 1);
    let log: Value =
        app.get("/v1/audit-log?limit=100", &app.admin_key).send().await.unwrap().json().await.unwrap();
    let actions: Vec<&str> =
        log["data"].as_array().unwrap().iter().filter_map(|e| e["action"].as_str()).collect();
    assert_eq!(actions.iter().filter(|a| **a == "subscription.cancel").count(), 2, "{actions:?}");
    assert!(actions.contains(&"subscription.resume"));
}

#[tokio::test]
async fn a_renewal_on_a_test_clock_advances_the_period_and_a_failing_one_makes_it_past_due() {
    let app = spawn().await;
    let starter = emulator_price(&app, "Starter", "900", Some("month")).await;
    link_catalog(&app, &[("starter_monthly", &starter)]).await;
    let start = tollgate::store::now_unix();
    let clock = |name: &'static str| {
        let app = &app;
        async move {
            emulator(
                app,
                "/v1/test_helpers/test_clocks",
                &[("frozen_time", &start.to_string()), ("name", name)],
            )
            .await["id"]
                .as_str()
                .unwrap()
                .to_owned()
        }
    };

    // Renews and pays.
    let good_clock = clock("renews").await;
    let customer = provider_customer(&app, "u_renews", Some(&good_clock)).await;
    let sub = subscribe(&app, &customer, "u_renews", &starter, "4242424242424242", None).await;
    let first_end = sub["current_period_end"].as_i64().unwrap();
    assert!(first_end > start + 27 * 86_400);
    emulator(
        &app,
        &format!("/v1/test_helpers/test_clocks/{good_clock}/advance"),
        &[("frozen_time", &(first_end + 3600).to_string())],
    )
    .await;
    let renewed = subscription_where(&app, "u_renews", |s| s["current_period_start"] == first_end).await;
    assert_eq!(renewed["status"], "active");
    assert!(renewed["current_period_end"].as_i64().unwrap() > first_end + 27 * 86_400);
    let provider_sub = renewed["provider_subscription"].as_str().unwrap();
    let invoices = emulator_get(&app, &format!("/v1/invoices?subscription={provider_sub}")).await;
    let cycle = invoices_of(&invoices, "subscription_cycle");
    assert_eq!(cycle.len(), 1);
    let cycle_id = cycle[0]["id"].as_str().unwrap().to_owned();
    let mirrored = eventually(Duration::from_secs(60), || async {
        app.server_store
            .invoice_by_provider_id("stripe", &cycle_id)
            .await
            .ok()?
            .filter(|i| i.status == "paid")
    })
    .await;
    assert_eq!(mirrored.amount_paid, 900);
    let paid_events = app.server_store.events_for_object(&cycle_id).await.unwrap();
    assert_eq!(paid_events.iter().filter(|e| e.event_type == "invoice.paid").count(), 1);

    // A card that attaches but fails later: the trial ends, the renewal
    // fails, the subscription is past due.
    let bad_clock = clock("fails").await;
    let customer = provider_customer(&app, "u_fails", Some(&bad_clock)).await;
    let sub = subscribe(&app, &customer, "u_fails", &starter, "4000000000000341", Some("3")).await;
    assert_eq!(sub["status"], "trialing");
    emulator(
        &app,
        &format!("/v1/test_helpers/test_clocks/{bad_clock}/advance"),
        &[("frozen_time", &(start + 4 * 86_400).to_string())],
    )
    .await;
    let past_due = subscription_where(&app, "u_fails", |s| s["status"] == "past_due").await;
    assert!(past_due["past_due_since"].as_i64().is_some());
    inbox_drained(&app).await;
    let customer_id = past_due["customer"].as_str().unwrap();
    let failed = app.server_store.events_for_customer(customer_id).await.unwrap();
    assert!(failed.iter().any(|e| e.event_type == "invoice.payment_failed"));
}

/// An order of two card packs (1000 cents) paid on the emulator, with the
/// provider's payment intent.
async fn paid_order(app: &TestApp, external: &str) -> (String, String) {
    let pack = emulator_price(app, "Card pack", "500", None).await;
    link_catalog(app, &[("card_pack_5", &pack)]).await;
    let customer = provider_customer(app, external, None).await;
    let session = buy(app, &customer, &pack, "4242424242424242").await;
    wait_entitlements(app, external, |e| e["balances"]["cards"] == 10).await;
    let orders = app.read_v1(&format!("/v1/orders?customer={external}")).await;
    let order = orders["data"][0]["id"].as_str().unwrap().to_owned();
    (order, session["payment_intent"].as_str().unwrap().to_owned())
}

async fn provider_refunds(app: &TestApp, payment_intent: &str) -> Vec<Value> {
    emulator_get(app, &format!("/v1/refunds?payment_intent={payment_intent}")).await["data"]
        .as_array()
        .unwrap()
        .clone()
}

#[tokio::test]
async fn an_order_is_refunded_in_part_then_in_full_and_never_beyond_what_was_paid() {
    let app = spawn().await;
    let (order, pi) = paid_order(&app, "u_refunds").await;
    let refunds = format!("/v1/orders/{order}/refunds");

    // Part: 300 of 1000, with an Idempotency-Key the client retries.
    let ask = |key: &'static str| {
        app.client
            .post(app.url(&refunds))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", key)
            .json(&json!({ "amount": 300, "reason": "requested_by_customer" }))
            .send()
    };
    let first = ask("refund-part-1").await.unwrap();
    assert_eq!(first.status(), 200);
    let refund: Value = first.json().await.unwrap();
    assert_eq!((refund["amount"].as_i64(), refund["status"].as_str()), (Some(300), Some("succeeded")));
    assert_eq!((refund["object"].as_str(), refund["order"].as_str()), (Some("refund"), Some(order.as_str())));
    assert_eq!(refund["reason"], "requested_by_customer");
    let again = ask("refund-part-1").await.unwrap();
    assert_eq!(again.headers().get("idempotent-replayed").map(|v| v.to_str().unwrap()), Some("true"));
    assert_eq!(again.json::<Value>().await.unwrap()["id"], refund["id"]);
    let at_provider = provider_refunds(&app, &pi).await;
    assert_eq!(at_provider.len(), 1, "the retry refunded nothing more");
    assert_eq!(at_provider[0]["metadata"]["tollgate_order_id"], order.as_str());
    assert_eq!(at_provider[0]["id"], refund["provider_refund"]);
    let o = app.read_v1(&format!("/v1/orders/{order}")).await;
    assert_eq!(
        (o["status"].as_str(), o["amount_refunded"].as_i64()),
        (Some("partially_refunded"), Some(300))
    );
    wait_entitlements(&app, "u_refunds", |e| e["balances"]["cards"] == 7).await;

    // More than is left: refused, nothing changed anywhere.
    let resp = app.post_v1(&refunds, &app.write_key, json!({ "amount": 701 })).await;
    let e = expect_error(resp, 400, "invalid_request_error", "amount_too_large").await;
    assert_eq!(e["param"], "amount");
    assert!(e["message"].as_str().unwrap().contains("700"), "{e}");
    assert_eq!(provider_refunds(&app, &pi).await.len(), 1);
    let o = app.read_v1(&format!("/v1/orders/{order}")).await;
    assert_eq!(
        (o["status"].as_str(), o["amount_refunded"].as_i64()),
        (Some("partially_refunded"), Some(300))
    );

    // Two full refunds at once: one refunds the 700 left, the other is told
    // there is nothing left.
    let (a, b) = tokio::join!(
        app.post_v1(&refunds, &app.write_key, json!({})),
        app.post_v1(&refunds, &app.write_key, json!({}))
    );
    let mut statuses = [a.status().as_u16(), b.status().as_u16()];
    statuses.sort();
    assert_eq!(statuses, [200, 400], "exactly one refund of what was left");
    let winner: Value = if a.status() == 200 { a.json().await.unwrap() } else { b.json().await.unwrap() };
    assert_eq!(winner["amount"], 700);
    let at_provider = provider_refunds(&app, &pi).await;
    assert_eq!(at_provider.iter().map(|r| r["amount"].as_i64().unwrap()).sum::<i64>(), 1000);
    let o = app.read_v1(&format!("/v1/orders/{order}")).await;
    assert_eq!((o["status"].as_str(), o["amount_refunded"].as_i64()), (Some("refunded"), Some(1000)));
    // All ten cards taken back: no balance left.
    wait_entitlements(&app, "u_refunds", |e| e["balances"].get("cards").is_none_or(|c| c == 0)).await;
    let resp = app.post_v1(&refunds, &app.write_key, json!({ "amount": 1 })).await;
    expect_error(resp, 400, "invalid_request_error", "order_already_refunded").await;

    // The webhooks that follow agree: refunded once, 1000 in total.
    inbox_drained(&app).await;
    let o = app.read_v1(&format!("/v1/orders/{order}")).await;
    assert_eq!((o["status"].as_str(), o["amount_refunded"].as_i64()), (Some("refunded"), Some(1000)));
    let events = app.server_store.events_for_object(&order).await.unwrap();
    assert_eq!(events.iter().filter(|e| e.event_type == "order.refunded").count(), 2);
    assert!(app.server_store.verify_audit_chain().await.unwrap().is_intact());
}

#[tokio::test]
async fn a_refund_refuses_bad_input_and_unpaid_orders() {
    let app = spawn().await;
    let (order, pi) = paid_order(&app, "u_refund_input").await;
    let refunds = format!("/v1/orders/{order}/refunds");
    let post = |body: Value| app.post_v1(&refunds, &app.write_key, body);
    for (body, code, param) in [
        (json!({ "amount": 0 }), "parameter_invalid", "amount"),
        (json!({ "amount": -5 }), "parameter_invalid", "amount"),
        (json!({ "amount": "5" }), "parameter_invalid", "amount"),
        (json!({ "amount": 1.5 }), "parameter_invalid", "amount"),
        (json!({ "reason": "because" }), "parameter_invalid", "reason"),
        (json!({ "amount": 100, "currency": "usd" }), "parameter_unknown", "currency"),
    ] {
        let e = expect_error(post(body.clone()).await, 400, "invalid_request_error", code).await;
        assert_eq!(e["param"], param, "{body}");
    }
    expect_error(
        app.post_v1(&refunds, &app.read_key, json!({})).await,
        403,
        "permission_error",
        "insufficient_scope",
    )
    .await;
    let resp = app.post_v1("/v1/orders/ord_nope/refunds", &app.write_key, json!({})).await;
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    assert!(provider_refunds(&app, &pi).await.is_empty());
    let o = app.read_v1(&format!("/v1/orders/{order}")).await;
    assert_eq!(o["amount_refunded"], 0);

    // An order whose checkout expired unpaid has nothing to refund.
    let pack = emulator_price(&app, "Card pack", "500", None).await;
    let customer =
        emulator_get(&app, "/v1/customers?limit=1").await["data"][0]["id"].as_str().unwrap().to_owned();
    let session = emulator(
        &app,
        "/v1/checkout/sessions",
        &[
            ("mode", "payment"),
            ("customer", &customer),
            ("line_items[0][price]", &pack),
            ("success_url", "https://shop.example/ok"),
        ],
    )
    .await;
    emulator(&app, &format!("/v1/checkout/sessions/{}/expire", session["id"].as_str().unwrap()), &[]).await;
    let canceled = eventually(Duration::from_secs(60), || async {
        let orders = app.read_v1("/v1/orders?customer=u_refund_input").await;
        orders["data"].as_array()?.iter().find(|o| o["status"] == "canceled").cloned()
    })
    .await;
    let resp = app
        .post_v1(
            &format!("/v1/orders/{}/refunds", canceled["id"].as_str().unwrap()),
            &app.write_key,
            json!({}),
        )
        .await;
    let e = expect_error(resp, 400, "invalid_request_error", "order_not_paid").await;
    assert!(e["message"].as_str().unwrap().contains("canceled"));
}

/// An emulator of its own, so the test can make it lose answers and fail.
struct OwnEmulator {
    base: String,
    emulator: tollgate::providers::stripe_emulator::Emulator,
    shutdown: tokio_util::sync::CancellationToken,
    http: reqwest::Client,
}

impl Drop for OwnEmulator {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

impl OwnEmulator {
    async fn start() -> Self {
        use tollgate::providers::stripe_emulator::{DeliveryOptions, Emulator, EmulatorConfig};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let base = format!("http://{}", listener.local_addr().unwrap());
        let emulator = Emulator::new(EmulatorConfig {
            public_url: base.clone(),
            api_key: None,
            delivery: DeliveryOptions::default(),
        });
        let shutdown = tokio_util::sync::CancellationToken::new();
        tokio::spawn(emulator.clone().serve(listener, shutdown.clone()));
        OwnEmulator { base, emulator, shutdown, http: reqwest::Client::new() }
    }

    async fn post(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let resp = self
            .http
            .post(format!("{}{path}", self.base))
            .bearer_auth("sk_test_own")
            .form(form)
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 200, "{path}");
        resp.json().await.unwrap()
    }

    async fn get(&self, path: &str) -> Value {
        self.http
            .get(format!("{}{path}", self.base))
            .bearer_auth("sk_test_own")
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }
}

#[tokio::test]
async fn a_refund_whose_answer_is_lost_or_fails_is_made_once_and_counted_while_in_flight() {
    use tollgate::providers::stripe_emulator::Fault;
    let emu = OwnEmulator::start().await;
    let base = emu.base.clone();
    let app = spawn_app_with(move |c| {
        unlimited(c);
        c.stripe_secret_key = Some(secrecy::SecretString::from("sk_test_own".to_owned()));
        c.stripe_api_base = Some(base);
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(crate::webhooks::SECRET_A.to_owned()));
    })
    .await;
    // A paid order, told to tollgate as the provider's webhooks would.
    let customer = emu.post("/v1/customers", &[("metadata[tollgate_external_id]", "u_flaky")]).await;
    let product = emu.post("/v1/products", &[("name", "Card pack")]).await;
    let price = emu
        .post(
            "/v1/prices",
            &[("product", product["id"].as_str().unwrap()), ("unit_amount", "500"), ("currency", "usd")],
        )
        .await;
    let session = emu
        .post(
            "/v1/checkout/sessions",
            &[
                ("mode", "payment"),
                ("customer", customer["id"].as_str().unwrap()),
                ("line_items[0][price]", price["id"].as_str().unwrap()),
                ("line_items[0][quantity]", "2"),
                ("success_url", "https://shop.example/ok"),
            ],
        )
        .await;
    pay(&session, "4242424242424242").await;
    let session = emu.get(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await;
    let pi = session["payment_intent"].as_str().unwrap().to_owned();
    let now = tollgate::store::now_unix();
    for body in [
        crate::webhooks::event("evt_flaky_c", "customer.created", now, customer.clone()),
        crate::webhooks::event("evt_flaky_s", "checkout.session.completed", now, session.clone()),
    ] {
        assert_eq!(app.deliver_signed(&body).await.status(), 200);
    }
    let order = eventually(Duration::from_secs(60), || async {
        let orders = app.read_v1("/v1/orders?customer=u_flaky").await;
        orders["data"].as_array()?.iter().find(|o| o["status"] == "paid").cloned()
    })
    .await;
    let refunds = format!("/v1/orders/{}/refunds", order["id"].as_str().unwrap());
    let ask = |amount: i64, key: &'static str| {
        app.client
            .post(app.url(&refunds))
            .bearer_auth(&app.write_key)
            .header("idempotency-key", key)
            .json(&json!({ "amount": amount }))
            .send()
    };

    // The provider refunds, but its answer is lost: the client's retry,
    // under the same key, gets the stored answer; one refund is made.
    emu.emulator.set_fault(Some(Fault { status: 500, times: Some(1), after_processing: true }));
    let resp = ask(400, "flaky-400").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["status"], "succeeded");
    let made = emu.get(&format!("/v1/refunds?payment_intent={pi}")).await;
    assert_eq!(made["data"].as_array().unwrap().len(), 1, "{made}");

    // The provider fails outright: no answer, so the 100 stays in flight
    // and counts against what is left.
    emu.emulator.set_fault(Some(Fault::always(500)));
    let resp = ask(100, "flaky-100").await.unwrap();
    expect_error(resp, 503, "provider_error", "provider_unavailable").await;
    emu.emulator.set_fault(None);
    let resp = app.post_v1(&refunds, &app.write_key, json!({ "amount": 600 })).await;
    let e = expect_error(resp, 400, "invalid_request_error", "amount_too_large").await;
    assert!(e["message"].as_str().unwrap().contains("in flight 100"), "{e}");
    // The client retries with its key: the same request reaches the provider.
    let resp = ask(100, "flaky-100").await.unwrap();
    assert_eq!(resp.status(), 200);
    let first_100: Value = resp.json().await.unwrap();
    let refunded = || async {
        let made = emu.get(&format!("/v1/refunds?payment_intent={pi}")).await;
        made["data"].as_array().unwrap().iter().map(|r| r["amount"].as_i64().unwrap()).sum::<i64>()
    };
    assert_eq!(refunded().await, 500);
    let o = app.read_v1(&format!("/v1/orders/{}", order["id"].as_str().unwrap())).await;
    assert_eq!(
        (o["status"].as_str(), o["amount_refunded"].as_i64()),
        (Some("partially_refunded"), Some(500))
    );

    // After a 5xx, the same key with another amount is refused like any
    // reuse of a key: the failed attempt may have refunded.
    emu.emulator.set_fault(Some(Fault::always(500)));
    expect_error(ask(50, "flaky-50").await.unwrap(), 503, "provider_error", "provider_unavailable").await;
    emu.emulator.set_fault(None);
    expect_error(ask(60, "flaky-50").await.unwrap(), 422, "idempotency_error", "idempotency_key_reused")
        .await;
    assert_eq!(refunded().await, 500);
    // Once tollgate has forgotten the key, the other amount is another
    // refund, of its own amount (not answered with the first one's), and
    // the first is still in flight.
    app.server_store.execute_raw("DELETE FROM idempotency_keys").await.unwrap();
    let resp = ask(60, "flaky-50").await.unwrap();
    assert_eq!(resp.status(), 200);
    let sixty: Value = resp.json().await.unwrap();
    assert_eq!((sixty["amount"].as_i64(), sixty["status"].as_str()), (Some(60), Some("succeeded")));
    assert_eq!(refunded().await, 560);
    app.server_store.execute_raw("DELETE FROM idempotency_keys").await.unwrap();
    let resp = ask(50, "flaky-50").await.unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["amount"], 50);
    assert_eq!(refunded().await, 610);

    // Past the key's lifetime, the same key and body is a new refund, here
    // and at the provider (not the old one replayed).
    app.server_store.execute_raw("UPDATE refund_requests SET created_at = created_at - 90000").await.unwrap();
    app.server_store
        .execute_raw("UPDATE idempotency_keys SET created_at = created_at - 90000")
        .await
        .unwrap();
    let resp = ask(100, "flaky-100").await.unwrap();
    assert_eq!(resp.status(), 200);
    let second_100: Value = resp.json().await.unwrap();
    assert_ne!(second_100["id"], first_100["id"]);
    assert_ne!(second_100["provider_refund"], first_100["provider_refund"]);
    assert_eq!(refunded().await, 710);
    let o = app.read_v1(&format!("/v1/orders/{}", order["id"].as_str().unwrap())).await;
    assert_eq!(o["amount_refunded"], 710);
}
