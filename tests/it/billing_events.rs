//! Provider events mapped onto orders, subscriptions, invoices, refunds and
//! disputes: any delivery order converges, old payload shapes are read, and
//! a purchase on the emulator becomes a paid, refunded or disputed order.

use std::collections::BTreeMap;
use std::time::Duration;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};

use crate::helpers::*;
use crate::webhooks::{event, spawn_with_secrets_and_sessions, SECRET_A};

async fn spawn_app() -> TestApp {
    spawn_app_with(unlimited).await
}

async fn spawn_with_secrets() -> TestApp {
    spawn_app_with(|c| {
        unlimited(c);
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
    })
    .await
}

pub(crate) const T0: i64 = 1_800_000_000;

/// Waits until every one of `expected` stored events is applied (or
/// ignored), failing on any that failed.
pub(crate) async fn wait_applied(app: &TestApp, expected: i64) {
    eventually(Duration::from_secs(60), || async {
        let counts = app.server_store.provider_event_counts().await.ok()?;
        let failed = counts.get("failed").copied().unwrap_or(0) + counts.get("dead").copied().unwrap_or(0);
        assert_eq!(failed, 0, "no event may fail: {counts:?}");
        let done =
            counts.get("processed").copied().unwrap_or(0) + counts.get("ignored").copied().unwrap_or(0);
        (done == expected).then_some(())
    })
    .await
}

pub(crate) fn subscription(id: &str, customer: &str, status: &str, extra: Value) -> Value {
    let mut sub = json!({
        "id": id, "object": "subscription", "customer": customer, "status": status,
        "cancel_at_period_end": false, "canceled_at": null, "ended_at": null, "created": T0,
        "items": {"object": "list", "data": [{
            "id": format!("si_{id}"), "object": "subscription_item", "quantity": 1,
            "price": {"id": "price_perm", "object": "price", "product": "prod_perm"},
            "current_period_start": T0, "current_period_end": T0 + 30 * 86400,
        }]},
        "metadata": {},
    });
    if let (Some(s), Some(e)) = (sub.as_object_mut(), extra.as_object()) {
        for (k, v) in e {
            s.insert(k.clone(), v.clone());
        }
    }
    sub
}

pub(crate) fn invoice(id: &str, customer: &str, sub: &str, status: &str, attempts: i64) -> Value {
    json!({
        "id": id, "object": "invoice", "customer": customer, "status": status, "attempt_count": attempts,
        "amount_due": 2500, "amount_paid": if status == "paid" { 2500 } else { 0 }, "currency": "usd",
        "billing_reason": "subscription_cycle", "created": T0,
        "parent": {"type": "subscription_details", "subscription_details": {"subscription": sub}},
        "status_transitions": {"paid_at": if status == "paid" { json!(T0 + 7) } else { json!(null) }},
    })
}

/// What a subscription's final state is, without the ids that differ
/// between runs.
async fn final_state(app: &TestApp, sub: &str, invoices: &[&str]) -> Value {
    let row = app.server_store.subscription_by_provider_id("stripe", sub).await.unwrap().expect("mirrored");
    let mut doc = tollgate::store::subscriptions::subscription_json(&row);
    for k in ["id", "customer", "provider_subscription_id"] {
        doc.as_object_mut().unwrap().remove(k);
    }
    let mut invs = Vec::new();
    for inv in invoices {
        let i =
            app.server_store.invoice_by_provider_id("stripe", inv).await.unwrap().expect("invoice mirrored");
        invs.push(json!([i.status, i.attempt_count, i.amount_paid, i.paid_at]));
    }
    doc["invoices"] = json!(invs);
    doc
}

/// The sequence of the issue: create, update, payment failure, update,
/// cancel — with created/updated in one second and the last three in the
/// next, so the same-second tie-break decides.
fn lifecycle(k: usize) -> Vec<Vec<u8>> {
    let (cus, sub, inv) = (format!("cus_perm{k}"), format!("sub_perm{k}"), format!("in_perm{k}"));
    vec![
        event(
            &format!("evt_{k}_1"),
            "customer.subscription.created",
            T0,
            subscription(&sub, &cus, "incomplete", json!({})),
        ),
        event(
            &format!("evt_{k}_2"),
            "customer.subscription.updated",
            T0,
            subscription(&sub, &cus, "active", json!({})),
        ),
        event(&format!("evt_{k}_3"), "invoice.payment_failed", T0 + 1, invoice(&inv, &cus, &sub, "open", 1)),
        event(
            &format!("evt_{k}_4"),
            "customer.subscription.updated",
            T0 + 1,
            subscription(&sub, &cus, "past_due", json!({})),
        ),
        event(
            &format!("evt_{k}_5"),
            "customer.subscription.deleted",
            T0 + 1,
            subscription(&sub, &cus, "canceled", json!({"canceled_at": T0 + 1, "ended_at": T0 + 1})),
        ),
    ]
}

fn permutations(n: usize) -> Vec<Vec<usize>> {
    if n == 0 {
        return vec![vec![]];
    }
    let mut out = Vec::new();
    for p in permutations(n - 1) {
        for i in 0..=p.len() {
            let mut q = p.clone();
            q.insert(i, n - 1);
            out.push(q);
        }
    }
    out
}

#[tokio::test]
async fn every_delivery_order_of_a_subscription_lifecycle_ends_in_the_in_order_state() {
    let app = spawn_with_secrets().await;
    let orders = permutations(5);
    assert_eq!(orders.len(), 120);
    // Run 120 is delivered in order: it is the reference.
    let reference_run = orders.len();
    let mut sent = 0;
    for (k, order) in orders.iter().chain([(0..5).collect::<Vec<usize>>()].iter()).enumerate() {
        let events = lifecycle(k);
        for &i in order {
            assert_eq!(app.deliver_signed(&events[i]).await.status(), 200);
            sent += 1;
        }
    }
    wait_applied(&app, sent).await;
    let reference =
        final_state(&app, &format!("sub_perm{reference_run}"), &[&format!("in_perm{reference_run}")]).await;
    assert_eq!(reference["status"], "canceled");
    assert_eq!(reference["invoices"], json!([["open", 1, 0, null]]));
    assert_eq!(reference["past_due_since"], Value::Null, "a canceled subscription is no longer past due");
    for (k, order) in orders.iter().enumerate() {
        let state = final_state(&app, &format!("sub_perm{k}"), &[&format!("in_perm{k}")]).await;
        assert_eq!(state, reference, "delivery order {order:?}");
        let row = app
            .server_store
            .subscription_by_provider_id("stripe", &format!("sub_perm{k}"))
            .await
            .unwrap()
            .unwrap();
        let events = app.server_store.events_for_object(&row.id).await.unwrap();
        let types: Vec<&str> = events.iter().map(|e| e.event_type.as_str()).collect();
        assert_eq!(types.first(), Some(&"subscription.created"), "{types:?}");
        assert_eq!(types.iter().filter(|t| **t == "subscription.canceled").count(), 1, "{types:?}");
    }
    // In order, the application hears every step.
    let row = app
        .server_store
        .subscription_by_provider_id("stripe", &format!("sub_perm{reference_run}"))
        .await
        .unwrap()
        .unwrap();
    let types: Vec<String> = app
        .server_store
        .events_for_object(&row.id)
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.event_type)
        .collect();
    assert_eq!(
        types,
        ["subscription.created", "subscription.updated", "subscription.updated", "subscription.canceled"]
    );
    let failed = app.server_store.events_for_object(&format!("in_perm{reference_run}")).await.unwrap();
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0].event_type, "invoice.payment_failed");
}

/// A longer life: trial, activation, renewals, a failed then recovered
/// payment, a plan change and a cancellation.
fn long_life(k: usize) -> Vec<Vec<u8>> {
    let (cus, sub) = (format!("cus_long{k}"), format!("sub_long{k}"));
    let (a, b) = (format!("in_long{k}a"), format!("in_long{k}b"));
    let s = |status: &str, extra: Value| subscription(&sub, &cus, status, extra);
    let ev = |n: usize, kind: &str, t: i64, obj: Value| event(&format!("evt_long{k}_{n}"), kind, t, obj);
    vec![
        ev(1, "customer.subscription.created", T0, s("trialing", json!({"trial_end": T0 + 100}))),
        ev(2, "customer.subscription.trial_will_end", T0 + 50, s("trialing", json!({"trial_end": T0 + 100}))),
        ev(3, "customer.subscription.updated", T0 + 100, s("active", json!({"trial_end": T0 + 100}))),
        ev(4, "invoice.paid", T0 + 100, invoice(&a, &cus, &sub, "paid", 1)),
        ev(
            5,
            "customer.subscription.updated",
            T0 + 200,
            s("active", json!({"items": {"data": [{"quantity": 3, "price": {"id": "price_big"}}]}})),
        ),
        ev(6, "invoice.payment_failed", T0 + 300, invoice(&b, &cus, &sub, "open", 1)),
        ev(
            7,
            "customer.subscription.updated",
            T0 + 300,
            s("past_due", json!({"items": {"data": [{"quantity": 3, "price": {"id": "price_big"}}]}})),
        ),
        ev(8, "invoice.payment_failed", T0 + 400, invoice(&b, &cus, &sub, "open", 2)),
        ev(9, "invoice.paid", T0 + 500, invoice(&b, &cus, &sub, "paid", 3)),
        ev(
            10,
            "customer.subscription.updated",
            T0 + 500,
            s("active", json!({"items": {"data": [{"quantity": 3, "price": {"id": "price_big"}}]}})),
        ),
        ev(
            11,
            "customer.subscription.updated",
            T0 + 600,
            s(
                "active",
                json!({"cancel_at_period_end": true, "items": {"data": [{"quantity": 3, "price": {"id": "price_big"}}]}}),
            ),
        ),
        ev(
            12,
            "customer.subscription.deleted",
            T0 + 700,
            s(
                "canceled",
                json!({"canceled_at": T0 + 700, "ended_at": T0 + 700, "items": {"data": [{"quantity": 3, "price": {"id": "price_big"}}]}}),
            ),
        ),
    ]
}

#[tokio::test]
async fn random_orders_with_duplicates_of_a_long_life_converge() {
    let app = spawn_with_secrets().await;
    let mut rng = rand::rngs::StdRng::seed_from_u64(0x7011_6a7e);
    let runs = 25;
    let mut sent = BTreeMap::new();
    for k in 0..runs {
        let events = long_life(k);
        let mut order: Vec<usize> = (0..events.len()).collect();
        if k > 0 {
            order.shuffle(&mut rng);
            for _ in 0..4 {
                let dup = rng.gen_range(0..events.len());
                let at = rng.gen_range(0..=order.len());
                order.insert(at, dup);
            }
        }
        for i in order {
            assert_eq!(app.deliver_signed(&events[i]).await.status(), 200);
            sent.insert((k, i), ());
        }
    }
    wait_applied(&app, sent.len() as i64).await;
    let state = |k: usize| {
        let app = &app;
        async move {
            final_state(app, &format!("sub_long{k}"), &[&format!("in_long{k}a"), &format!("in_long{k}b")])
                .await
        }
    };
    let reference = state(0).await;
    assert_eq!((reference["status"].as_str(), reference["quantity"].as_i64()), (Some("canceled"), Some(3)));
    assert_eq!(reference["cancel_at_period_end"], false);
    assert_eq!(reference["invoices"], json!([["paid", 1, 2500, T0 + 7], ["paid", 3, 2500, T0 + 7]]));
    for k in 1..runs {
        assert_eq!(state(k).await, reference, "run {k}");
    }
    // One invoice.paid per invoice, however often it was delivered.
    for k in 0..runs {
        let b = app.server_store.events_for_object(&format!("in_long{k}b")).await.unwrap();
        assert_eq!(b.iter().filter(|e| e.event_type == "invoice.paid").count(), 1, "run {k}");
    }
}

#[tokio::test]
async fn payloads_of_2017_08_15_and_of_the_fixtures_are_read() {
    let app = spawn_with_secrets_and_sessions().await;
    // 2017-08-15: one plan at the top of the subscription, `invoice.subscription`
    // and `invoice.charge` at the top, `paid` instead of `status`.
    let old_sub = json!({
        "id": "sub_old", "object": "subscription", "customer": "cus_old", "status": "active",
        "plan": {"id": "gold_monthly", "object": "plan", "amount": 900, "interval": "month", "product": "prod_old"},
        "quantity": 2, "current_period_start": T0, "current_period_end": T0 + 86400 * 30, "start": T0,
        "cancel_at_period_end": false, "items": {"object": "list", "data": [{"id": "si_old", "plan": {"id": "gold_monthly"}, "quantity": 2}]},
        "metadata": {},
    });
    let old_invoice = json!({
        "id": "in_old", "object": "invoice", "customer": "cus_old", "subscription": "sub_old", "charge": "ch_old",
        "paid": true, "closed": true, "forgiven": false, "amount_due": 1800, "amount_paid": 1800, "currency": "usd",
        "attempt_count": 1, "date": T0, "billing_reason": null,
    });
    let mut bodies = vec![
        event("evt_old_1", "customer.subscription.created", T0, old_sub),
        event("evt_old_2", "invoice.payment_succeeded", T0 + 1, old_invoice),
    ];
    for b in &mut bodies {
        let mut v: Value = serde_json::from_slice(b).unwrap();
        v["api_version"] = json!("2017-08-15");
        *b = serde_json::to_vec(&v).unwrap();
    }
    // Stripe's own example objects, as today's API sends them.
    let fixtures: Value = serde_json::from_str(
        &std::fs::read_to_string(manifest_path("../shared/fixtures/stripe/fixtures3.json")).unwrap(),
    )
    .unwrap();
    let r = &fixtures["resources"];
    for (n, (kind, object)) in [
        ("customer.subscription.updated", &r["subscription"]),
        ("invoice.payment_failed", &r["invoice"]),
        ("checkout.session.completed", &r["checkout.session"]),
        ("payment_intent.succeeded", &r["payment_intent"]),
        ("charge.refunded", &r["charge"]),
        ("refund.created", &r["refund"]),
        ("charge.dispute.created", &r["dispute"]),
    ]
    .into_iter()
    .enumerate()
    {
        bodies.push(event(&format!("evt_fixture_{n}"), kind, T0 + 10, object.clone()));
    }
    for b in &bodies {
        assert_eq!(app.deliver_signed(b).await.status(), 200);
    }
    wait_applied(&app, bodies.len() as i64).await;

    let sub = app.server_store.subscription_by_provider_id("stripe", "sub_old").await.unwrap().unwrap();
    assert_eq!((sub.status.as_str(), sub.quantity), ("active", 2));
    assert_eq!(sub.provider_price_id.as_deref(), Some("gold_monthly"), "the legacy plan id");
    assert_eq!(sub.current_period_end, Some(T0 + 86400 * 30));
    let inv = app.server_store.invoice_by_provider_id("stripe", "in_old").await.unwrap().unwrap();
    assert_eq!(inv.status, "paid");
    assert_eq!(inv.provider_subscription_id.as_deref(), Some("sub_old"));
    assert_eq!(inv.payment_key.as_deref(), Some("ch_old"), "the top-level charge");
    let paid = app.server_store.events_for_object("in_old").await.unwrap();
    assert_eq!(paid.len(), 1);
    let data: Value = serde_json::from_str(&paid[0].data).unwrap();
    // Workers apply different objects in parallel: the invoice may land
    // before its subscription, so the provider's id is the stable link.
    assert_eq!(
        (paid[0].event_type.as_str(), data["provider_subscription_id"].as_str()),
        ("invoice.paid", Some("sub_old"))
    );

    let fixture_sub = r["subscription"]["id"].as_str().unwrap();
    let mirrored =
        app.server_store.subscription_by_provider_id("stripe", fixture_sub).await.unwrap().unwrap();
    assert_eq!(
        mirrored.provider_price_id.as_deref(),
        r["subscription"]["items"]["data"][0]["price"]["id"].as_str()
    );
}

/// A price at the emulator for a new product: one-time, or recurring every `interval`.
pub(crate) async fn emulator_price(
    app: &TestApp,
    product: &str,
    amount: &str,
    interval: Option<&str>,
) -> String {
    let product = emulator(app, "/v1/products", &[("name", product)]).await;
    let mut form =
        vec![("product", product["id"].as_str().unwrap()), ("unit_amount", amount), ("currency", "usd")];
    if let Some(interval) = interval {
        form.push(("recurring[interval]", interval));
    }
    emulator(app, "/v1/prices", &form).await["id"].as_str().unwrap().to_owned()
}

/// Two of `price` bought by `customer` on the hosted page with `card`: the
/// session as the emulator has it afterwards.
pub(crate) async fn buy(app: &TestApp, customer: &str, price: &str, card: &str) -> Value {
    let session = emulator(
        app,
        "/v1/checkout/sessions",
        &[
            ("mode", "payment"),
            ("customer", customer),
            ("line_items[0][price]", price),
            ("line_items[0][quantity]", "2"),
            ("success_url", "https://shop.example/ok"),
        ],
    )
    .await;
    pay(&session, card).await;
    emulator_get(app, &format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await
}

/// Slow under load is fine; a failing or stuck event is not: a long wait
/// says which (every event that failed or is still waiting, and how many
/// the inbox holds, so an event that never arrived shows as well).
pub(crate) async fn print_failing_events(app: &TestApp) {
    let events = app.provider_events("").await;
    eprintln!("  {} events listed (at most the newest 100)", events.len());
    for pe in events {
        if pe["last_error"].is_string() || !matches!(pe["status"].as_str(), Some("processed" | "ignored")) {
            eprintln!("  {} {} attempts {}: {}", pe["type"], pe["status"], pe["attempts"], pe["last_error"]);
        }
    }
}

pub(crate) async fn order_in_status(
    app: &TestApp,
    customer_id: &str,
    nth: usize,
    status: &str,
) -> tollgate::store::orders::OrderRow {
    let started = std::time::Instant::now();
    let reported = std::sync::atomic::AtomicBool::new(false);
    eventually(Duration::from_secs(60), || async {
        let orders = app.server_store.orders_for_customer(customer_id).await.ok()?;
        let found = orders.get(nth).filter(|o| o.status == status).cloned();
        if found.is_none()
            && started.elapsed() > Duration::from_secs(15)
            && !reported.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("waiting for order {nth} of {customer_id} to be {status}; orders: {orders:?}");
            print_failing_events(app).await;
        }
        found
    })
    .await
}

fn count(events: &[tollgate::store::events::EventRecord], kind: &str) -> usize {
    events.iter().filter(|e| e.event_type == kind).count()
}

#[tokio::test]
async fn a_purchase_on_the_emulator_is_paid_refunded_and_disputed_through_its_webhooks() {
    let app = spawn_app().await;
    let price = emulator_price(&app, "Card pack", "500", None).await;
    let customer = emulator(
        &app,
        "/v1/customers",
        &[("email", "buyer@example.com"), ("metadata[tollgate_external_id]", "u_buyer")],
    )
    .await;
    let customer = customer["id"].as_str().unwrap().to_owned();
    let checkout = |card| buy(&app, &customer, &price, card);

    // Paid: the order appears from the session, with its lines read from
    // the provider, and is announced once.
    let session = checkout("4242424242424242").await;
    let tollgate_customer: Value = eventually(Duration::from_secs(20), || async {
        let c: Value =
            app.get("/v1/customers/u_buyer", &app.read_key).send().await.ok()?.json().await.ok()?;
        c["id"].as_str().is_some().then_some(c)
    })
    .await;
    let cust_id = tollgate_customer["id"].as_str().unwrap().to_owned();
    let order = order_in_status(&app, &cust_id, 0, "paid").await;
    assert_eq!((order.amount_total, order.currency.as_str()), (1000, "usd"));
    assert_eq!(order.provider_checkout_session_id.as_deref(), session["id"].as_str());
    let (_, lines) = app.server_store.get_order(&order.id).await.unwrap().unwrap();
    assert_eq!(lines.len(), 1);
    assert_eq!((lines[0].quantity, lines[0].unit_amount, lines[0].amount_total), (2, 500, 1000));
    assert_eq!(lines[0].provider_price_id.as_deref(), Some(price.as_str()));

    // Refunded in two steps.
    let pi = session["payment_intent"].as_str().unwrap();
    emulator(&app, "/v1/refunds", &[("payment_intent", pi), ("amount", "300")]).await;
    let order = order_in_status(&app, &cust_id, 0, "partially_refunded").await;
    assert_eq!(order.amount_refunded, 300);
    emulator(&app, "/v1/refunds", &[("payment_intent", pi)]).await;
    let order = order_in_status(&app, &cust_id, 0, "refunded").await;
    assert_eq!(order.amount_refunded, 1000);

    // Disputed, then lost.
    let disputed = checkout("4000000000000259").await;
    let second = order_in_status(&app, &cust_id, 1, "disputed").await;
    assert_eq!(second.provider_checkout_session_id.as_deref(), disputed["id"].as_str());
    let disputes = emulator_get(
        &app,
        &format!("/v1/disputes?payment_intent={}", disputed["payment_intent"].as_str().unwrap()),
    )
    .await;
    let dispute = disputes["data"][0]["id"].as_str().expect("a dispute").to_owned();
    emulator(&app, &format!("/v1/disputes/{dispute}/close"), &[]).await;
    order_in_status(&app, &cust_id, 1, "dispute_lost").await;

    let first = app.server_store.events_for_object(&order.id).await.unwrap();
    assert_eq!(count(&first, "order.paid"), 1);
    assert_eq!(count(&first, "order.refunded"), 2);
    let second = app.server_store.events_for_object(&second.id).await.unwrap();
    assert_eq!(
        (
            count(&second, "order.paid"),
            count(&second, "order.disputed"),
            count(&second, "order.dispute_closed")
        ),
        (1, 1, 1)
    );
    let all = app.server_store.events_for_customer(&cust_id).await.unwrap();
    assert_eq!(count(&all, "checkout.completed"), 2);

    // The application reads the same through the API.
    let listed: Value =
        app.get("/v1/orders?customer=u_buyer", &app.read_key).send().await.unwrap().json().await.unwrap();
    let statuses: Vec<&str> =
        listed["data"].as_array().unwrap().iter().map(|o| o["status"].as_str().unwrap()).collect();
    assert_eq!(statuses, ["dispute_lost", "refunded"], "newest first");
    let one: Value = app
        .get(&format!("/v1/orders/{}", order.id), &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(
        (one["amount_refunded"].as_i64(), one["lines"][0]["quantity"].as_i64()),
        (Some(1000), Some(2))
    );
    let resp = app.get("/v1/orders?customer=u_nobody", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    let resp = app.get("/v1/orders/ord_missing", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
}

/// A completed, paid payment-mode checkout session made outside tollgate.
fn paid_session(id: &str, customer: &str, payment_intent: &str, amount: i64) -> Value {
    json!({
        "id": id, "object": "checkout.session", "mode": "payment", "status": "complete",
        "payment_status": "paid", "customer": customer, "payment_intent": payment_intent, "amount_total": amount,
        "currency": "usd", "metadata": {}, "client_reference_id": null,
    })
}

/// The orders of the customer tollgate knows under `external`.
async fn orders_of(app: &TestApp, external: &str) -> Vec<tollgate::store::orders::OrderRow> {
    let customer: Value = app.customer_json(external).await;
    app.server_store.orders_for_customer(customer["id"].as_str().unwrap()).await.unwrap()
}

/// Delivers every body at once, each signed; all must be acknowledged.
async fn deliver_concurrently(app: &TestApp, bodies: impl IntoIterator<Item = Vec<u8>>) {
    let mut tasks = Vec::new();
    for b in bodies {
        let (client, url) = (app.client.clone(), app.url("/webhooks/stripe"));
        let sig = crate::webhooks::sign(SECRET_A, tollgate::store::now_unix(), &b);
        tasks.push(tokio::spawn(async move {
            client.post(url).header("stripe-signature", sig).body(b).send().await.unwrap().status().as_u16()
        }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
}

#[tokio::test]
async fn an_order_paid_event_is_emitted_once_when_the_payment_is_announced_five_times() {
    let app = spawn_with_secrets_and_sessions().await;
    let session = paid_session("cs_test_dup", "cus_five", "pi_five", 700);
    let intent = json!({
        "id": "pi_five", "object": "payment_intent", "status": "succeeded", "amount": 700, "currency": "usd",
        "customer": "cus_five", "latest_charge": "ch_five", "metadata": {},
    });
    let mut bodies = Vec::new();
    for n in 0..5 {
        // Five distinct provider events (Stripe retries mint new ids when
        // an object is re-announced), delivered twice each, concurrently.
        bodies.push(event(&format!("evt_five_s{n}"), "checkout.session.completed", T0 + n, session.clone()));
        bodies.push(event(&format!("evt_five_p{n}"), "payment_intent.succeeded", T0 + n, intent.clone()));
    }
    deliver_concurrently(&app, bodies.iter().chain(bodies.iter()).cloned()).await;
    wait_applied(&app, bodies.len() as i64).await;
    let orders = orders_of(&app, "cus_five").await;
    assert_eq!(orders.len(), 1, "one order for one session");
    assert_eq!(orders[0].status, "paid");
    let events = app.server_store.events_for_object(&orders[0].id).await.unwrap();
    assert_eq!(count(&events, "order.paid"), 1);
}

#[tokio::test]
async fn a_refund_that_fails_after_the_charge_counted_it_is_given_back() {
    let app = spawn_with_secrets_and_sessions().await;
    let session = paid_session("cs_test_m2", "cus_m2", "pi_m2", 700);
    let intent = json!({
        "id": "pi_m2", "object": "payment_intent", "status": "succeeded", "amount": 700, "currency": "usd",
        "customer": "cus_m2", "latest_charge": "ch_m2", "metadata": {},
    });
    let charge = json!({
        "id": "ch_m2", "object": "charge", "payment_intent": "pi_m2", "status": "succeeded", "paid": true,
        "amount": 700, "amount_refunded": 300, "refunded": false, "currency": "usd", "customer": "cus_m2",
        "metadata": {},
    });
    let refund = |status: &str| {
        json!({
            "id": "re_m2", "object": "refund", "payment_intent": "pi_m2", "charge": "ch_m2", "amount": 300,
            "currency": "usd", "status": status, "created": T0 + 9,
        })
    };
    let steps = [
        event("evt_m2_s", "checkout.session.completed", T0, session),
        event("evt_m2_p", "payment_intent.succeeded", T0 + 1, intent),
        event("evt_m2_r1", "refund.created", T0 + 9, refund("pending")),
        event("evt_m2_c", "charge.refunded", T0 + 10, charge),
    ];
    for (n, b) in steps.iter().enumerate() {
        assert_eq!(app.deliver_signed(b).await.status(), 200);
        wait_applied(&app, n as i64 + 1).await;
    }
    let orders = orders_of(&app, "cus_m2").await;
    assert_eq!((orders[0].status.as_str(), orders[0].amount_refunded), ("partially_refunded", 300));

    // The bank refused the refund: Stripe sends only the refund's update.
    let failed = event("evt_m2_r2", "refund.updated", T0 + 20, refund("failed"));
    assert_eq!(app.deliver_signed(&failed).await.status(), 200);
    wait_applied(&app, 5).await;
    let orders = orders_of(&app, "cus_m2").await;
    assert_eq!((orders[0].status.as_str(), orders[0].amount_refunded), ("paid", 0));

    // A new refund of the same amount is news again.
    let again = json!({
        "id": "re_m2b", "object": "refund", "payment_intent": "pi_m2", "charge": "ch_m2", "amount": 300,
        "currency": "usd", "status": "succeeded", "created": T0 + 30,
    });
    let body = event("evt_m2_r3", "refund.created", T0 + 30, again);
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    wait_applied(&app, 6).await;
    let orders = orders_of(&app, "cus_m2").await;
    assert_eq!((orders[0].status.as_str(), orders[0].amount_refunded), ("partially_refunded", 300));
    let events = app.server_store.events_for_object(&orders[0].id).await.unwrap();
    assert_eq!(count(&events, "order.refunded"), 2, "both refunds of 300 are announced");
}

#[tokio::test]
async fn a_dispute_closing_on_a_partly_refunded_order_is_announced() {
    let app = spawn_with_secrets_and_sessions().await;
    let session = paid_session("cs_test_dw", "cus_dw", "pi_dw", 1000);
    let refund = json!({
        "id": "re_dw", "object": "refund", "payment_intent": "pi_dw", "amount": 300, "currency": "usd",
        "status": "succeeded", "created": T0 + 2,
    });
    let dispute = |status: &str| {
        json!({ "id": "dp_dw", "object": "dispute", "payment_intent": "pi_dw", "charge": "ch_dw",
                "amount": 700, "currency": "usd", "status": status, "reason": "fraudulent", "created": T0 + 3 })
    };
    let steps = [
        event("evt_dw_s", "checkout.session.completed", T0, session),
        event("evt_dw_r", "refund.created", T0 + 2, refund),
        event("evt_dw_d1", "charge.dispute.created", T0 + 3, dispute("needs_response")),
        event("evt_dw_d2", "charge.dispute.closed", T0 + 9, dispute("won")),
    ];
    for (n, b) in steps.iter().enumerate() {
        assert_eq!(app.deliver_signed(b).await.status(), 200);
        wait_applied(&app, n as i64 + 1).await;
    }
    let orders = orders_of(&app, "cus_dw").await;
    assert_eq!(orders[0].status, "partially_refunded");
    let events = app.server_store.events_for_object(&orders[0].id).await.unwrap();
    assert_eq!((count(&events, "order.disputed"), count(&events, "order.dispute_closed")), (1, 1));
}

#[tokio::test]
async fn a_setup_session_sells_nothing_and_is_not_an_error() {
    let app = spawn_with_secrets().await;
    let session = json!({
        "id": "cs_test_setup", "object": "checkout.session", "mode": "setup", "status": "complete",
        "payment_status": "no_payment_required", "customer": "cus_setup", "payment_intent": null,
        "setup_intent": "seti_1", "amount_total": null, "currency": null, "metadata": {},
    });
    let body = event("evt_setup", "checkout.session.completed", T0, session);
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    wait_applied(&app, 1).await;
    let orders = app.server_store.list_orders(&tollgate::store::Page::first(10), None).await.unwrap();
    assert!(orders.data.is_empty(), "no order for a saved card");
}

/// A paid checkout tollgate did not start becomes an order only with the
/// line items the provider lists for it. A session the provider does not
/// know (a key of another account or mode) fails the event with the
/// reason, to be retried and replayed, rather than becoming a paid order
/// that grants nothing.
#[tokio::test]
async fn a_checkout_the_provider_does_not_know_fails_with_the_reason_and_records_nothing() {
    let app = spawn_with_secrets().await;
    let session = json!({
        "id": "cs_test_elsewhere", "object": "checkout.session", "mode": "payment", "status": "complete",
        "payment_status": "paid", "customer": "cus_elsewhere", "payment_intent": "pi_elsewhere",
        "amount_total": 1000, "currency": "usd", "metadata": {}, "client_reference_id": null,
    });
    let body = event("evt_elsewhere", "checkout.session.completed", T0, session);
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    let failed = app.wait_status("evt_elsewhere", "failed").await;
    let reason = failed["last_error"].as_str().unwrap_or_default();
    assert!(
        reason.contains("cs_test_elsewhere is unknown to the provider")
            && reason.contains("STRIPE_SECRET_KEY"),
        "{failed}"
    );
    // From the other mode, the reason says so.
    let mut live: Value = serde_json::from_slice(&event(
        "evt_elsewhere_live",
        "checkout.session.completed",
        T0,
        json!({ "id": "cs_live_elsewhere", "object": "checkout.session", "mode": "payment", "status": "complete",
                "payment_status": "paid", "customer": "cus_elsewhere", "payment_intent": "pi_live_elsewhere",
                "amount_total": 1000, "currency": "usd", "metadata": {}, "client_reference_id": null }),
    ))
    .unwrap();
    live["livemode"] = json!(true);
    let body = serde_json::to_vec(&live).unwrap();
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    let failed = app.wait_status("evt_elsewhere_live", "failed").await;
    let reason = failed["last_error"].as_str().unwrap_or_default();
    assert!(reason.contains("the event is from live mode and STRIPE_SECRET_KEY is a test key"), "{failed}");
    let orders = app.server_store.list_orders(&tollgate::store::Page::first(10), None).await.unwrap();
    assert!(orders.data.is_empty(), "no order without its lines");
    let customers =
        app.get("/v1/customers", &app.read_key).send().await.unwrap().json::<Value>().await.unwrap();
    assert_eq!(customers["data"], json!([]), "nothing half-written");
}

#[tokio::test]
async fn a_guest_payment_without_a_provider_customer_is_recorded_and_owned() {
    let app = spawn_with_secrets_and_sessions().await;
    app.upsert_customer("u_named", json!({})).await;
    let session = |id: &str, pi: &str, metadata: Value| {
        json!({
            "id": id, "object": "checkout.session", "mode": "payment", "status": "complete",
            "payment_status": "paid", "customer": null, "payment_intent": pi, "amount_total": 900,
            "currency": "usd", "metadata": metadata, "client_reference_id": null,
            "customer_details": { "email": "guest@example.com" },
        })
    };
    let bodies = [
        event("evt_g1", "checkout.session.completed", T0, session("cs_test_guest", "pi_g1", json!({}))),
        event(
            "evt_g2",
            "checkout.session.completed",
            T0,
            session("cs_test_named", "pi_g2", json!({ "tollgate_external_id": "u_named" })),
        ),
    ];
    for b in &bodies {
        assert_eq!(app.deliver_signed(b).await.status(), 200);
    }
    wait_applied(&app, 2).await;
    for (external, email) in [("cs_test_guest", Some("guest@example.com")), ("u_named", None)] {
        let c: Value = app.customer_json(external).await;
        assert_eq!(c["email"].as_str(), email, "{c}");
        let orders = app.server_store.orders_for_customer(c["id"].as_str().unwrap()).await.unwrap();
        assert_eq!((orders.len(), orders[0].status.as_str(), orders[0].amount_total), (1, "paid", 900));
    }
}

/// A provider customer created outside tollgate whose own event and another
/// object's event are applied at the same time (two workers on PostgreSQL):
/// whichever makes the placeholder, it keeps the email and name that only
/// the customer's own event carries.
#[tokio::test]
async fn an_adoption_racing_another_event_of_its_provider_customer_keeps_its_email() {
    let app = spawn_with_secrets().await;
    let rounds = 12;
    let mut bodies = Vec::new();
    for n in 0..rounds {
        bodies.push(event(
            &format!("evt_ae{n}"),
            "customer.created",
            T0,
            json!({ "id": format!("cus_adopt{n}"), "object": "customer",
                    "email": format!("adopt{n}@example.com"), "name": "Ada", "metadata": {} }),
        ));
        bodies.push(event(
            &format!("evt_as{n}"),
            "customer.subscription.created",
            T0,
            subscription(&format!("sub_adopt{n}"), &format!("cus_adopt{n}"), "active", json!({})),
        ));
    }
    deliver_concurrently(&app, bodies).await;
    wait_applied(&app, 2 * rounds).await;
    for n in 0..rounds {
        let c: Value = app.customer_json(&format!("cus_adopt{n}")).await;
        let expected = format!("adopt{n}@example.com");
        assert_eq!((c["email"].as_str(), c["name"].as_str()), (Some(expected.as_str()), Some("Ada")), "{c}");
    }
}

/// A claim of an adopted placeholder racing another object's event for the
/// same provider customer: whichever commits first, nothing stays with the
/// placeholder (on PostgreSQL the link read is held until commit).
#[tokio::test]
async fn a_claim_racing_another_event_of_its_provider_customer_leaves_nothing_behind() {
    let app = spawn_with_secrets().await;
    let rounds = 12;
    for n in 0..rounds {
        app.upsert_customer(&format!("u_race{n}"), json!({})).await;
    }
    // Each provider customer is adopted first, through a subscription.
    for n in 0..rounds {
        let b = event(
            &format!("evt_ra{n}"),
            "customer.subscription.created",
            T0,
            subscription(&format!("sub_ra{n}"), &format!("cus_race{n}"), "active", json!({})),
        );
        assert_eq!(app.deliver_signed(&b).await.status(), 200);
    }
    wait_applied(&app, rounds).await;
    // Then its own event (the claim) and a second subscription, together.
    let mut bodies = Vec::new();
    for n in 0..rounds {
        bodies.push(event(
            &format!("evt_rc{n}"),
            "customer.created",
            T0 + 1,
            json!({ "id": format!("cus_race{n}"), "object": "customer", "email": null,
                    "metadata": { "tollgate_external_id": format!("u_race{n}") } }),
        ));
        bodies.push(event(
            &format!("evt_rb{n}"),
            "customer.subscription.created",
            T0 + 1,
            subscription(&format!("sub_rb{n}"), &format!("cus_race{n}"), "active", json!({})),
        ));
    }
    deliver_concurrently(&app, bodies).await;
    wait_applied(&app, 3 * rounds).await;
    for n in 0..rounds {
        let c: Value = app.customer_json(&format!("u_race{n}")).await;
        for sub in [format!("sub_ra{n}"), format!("sub_rb{n}")] {
            let row = app.server_store.subscription_by_provider_id("stripe", &sub).await.unwrap().unwrap();
            assert_eq!(row.customer_id, c["id"].as_str().unwrap(), "{sub} belongs to u_race{n}");
        }
    }
}

#[tokio::test]
async fn a_customer_adopted_before_its_own_event_is_handed_to_the_application_customer() {
    let app = spawn_with_secrets().await;
    // The subscriptions' price is Pro's: each grants its features.
    link_catalog(&app, &[("pro_monthly", "price_perm")]).await;
    // An endpoint that never answers: every delivery stays to be sent.
    let endpoint = app.create_endpoint("http://127.0.0.1:9/never", json!(["*"])).await;
    // The application knows u_known; u_new it has not told tollgate about.
    app.upsert_customer("u_known", json!({ "email": "known@example.com" })).await;
    let sub_for = |cus: &str, id: &str| {
        event(
            &format!("evt_{id}"),
            "customer.subscription.created",
            T0,
            subscription(id, cus, "active", json!({})),
        )
    };
    let customer_event = |cus: &str, external: &str| {
        event(
            &format!("evt_c_{cus}"),
            "customer.created",
            T0 + 5,
            json!({ "id": cus, "object": "customer", "email": null, "metadata": { "tollgate_external_id": external } }),
        )
    };
    // The subscriptions arrive before their customers' own events.
    for b in [sub_for("cus_known", "sub_known"), sub_for("cus_new", "sub_new")] {
        assert_eq!(app.deliver_signed(&b).await.status(), 200);
    }
    wait_applied(&app, 2).await;
    for b in [customer_event("cus_known", "u_known"), customer_event("cus_new", "u_new")] {
        assert_eq!(app.deliver_signed(&b).await.status(), 200);
    }
    wait_applied(&app, 4).await;

    for (external, provider_customer, sub) in
        [("u_known", "cus_known", "sub_known"), ("u_new", "cus_new", "sub_new")]
    {
        let c: Value = app.customer_json(external).await;
        assert_eq!(c["providers"]["stripe"], provider_customer, "{c}");
        let row = app.server_store.subscription_by_provider_id("stripe", sub).await.unwrap().unwrap();
        assert_eq!(row.customer_id, c["id"].as_str().unwrap(), "the subscription follows its customer");
    }
    // The placeholder that stood in for cus_known is gone, and what it
    // owned, deliveries not yet sent included, is u_known's, except its
    // `entitlements.updated` events: snapshots of its own id's entitlements,
    // numbered in its own sequence, they stay its own with their deliveries.
    let resp = app.get("/v1/customers/cus_known", &app.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let mut owners = std::collections::BTreeSet::new();
    for external in ["u_known", "u_new"] {
        let c: Value = app.customer_json(external).await;
        owners.insert(c["id"].as_str().unwrap().to_owned());
    }
    let deliveries = app.deliveries(endpoint["id"].as_str().unwrap()).await;
    assert!(deliveries.len() >= 4, "{deliveries:?}");
    let mut kept_by_placeholder = Vec::new();
    for d in &deliveries {
        let stored = app.server_store.get_delivery(d["id"].as_str().unwrap()).await.unwrap().unwrap();
        let event = app.server_store.get_event(&stored.event_id).await.unwrap().unwrap();
        assert_eq!(event.customer_id, stored.customer_id, "a delivery follows its event: {stored:?}");
        let owner = stored.customer_id.clone().unwrap_or_default();
        if !owners.contains(&owner) {
            assert_eq!(event.event_type, "entitlements.updated", "{stored:?}");
            kept_by_placeholder.push(serde_json::from_str::<Value>(&event.data).unwrap());
        }
    }
    // What the application was told under the placeholder's id is taken
    // back under it: Pro, then, in the next version, nothing.
    kept_by_placeholder.sort_by_key(|data| data["version"].as_i64());
    let versions: Vec<i64> = kept_by_placeholder.iter().map(|d| d["version"].as_i64().unwrap()).collect();
    assert_eq!(
        versions,
        [1, 2],
        "the placeholder's entitlements.updated stays its own: {kept_by_placeholder:?}"
    );
    assert_eq!(
        kept_by_placeholder[0]["entitlements"]["features"],
        json!(["api_access", "exports", "priority_support"])
    );
    assert_eq!(
        kept_by_placeholder[1]["entitlements"],
        json!({ "features": [], "limits": {}, "balances": {} })
    );
    assert_eq!(
        entitlements_of(&app, "u_known").await["features"],
        json!(["api_access", "exports", "priority_support"])
    );
    // Each application customer's events hold each entitlements version once.
    for external in ["u_known", "u_new"] {
        let listed = app.read_json(&format!("/v1/events?customer={external}&limit=100")).await;
        let mut versions: Vec<i64> = listed["data"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|e| e["type"] == "entitlements.updated")
            .map(|e| e["data"]["version"].as_i64().unwrap())
            .collect();
        assert!(!versions.is_empty(), "{external}: {listed}");
        versions.sort_unstable();
        let listed_count = versions.len();
        versions.dedup();
        assert_eq!(versions.len(), listed_count, "{external}: one event per version: {listed}");
    }
    assert!(app.server_store.verify_audit_chain().await.unwrap().is_intact());
}

#[tokio::test]
async fn a_deleted_or_second_provider_customer_keeps_finding_its_owner() {
    let app = spawn_with_secrets().await;
    let alice = app.upsert_customer("u_alice", json!({ "email": "alice@example.com" })).await;
    let customer_event = |evt: &str, kind: &str, cus: &str, at: i64| {
        event(
            evt,
            kind,
            at,
            json!({ "id": cus, "object": "customer", "email": null, "metadata": { "tollgate_external_id": "u_alice" } }),
        )
    };
    let sub_event = |evt: &str, sub: &str, cus: &str, status: &str, at: i64| {
        event(evt, "customer.subscription.updated", at, subscription(sub, cus, status, json!({})))
    };
    // Alice's first Stripe customer, then a second one made for her on the
    // dashboard; each has a subscription.
    let first = [
        customer_event("evt_c1", "customer.created", "cus_one", T0),
        customer_event("evt_c2", "customer.created", "cus_two", T0 + 1),
        sub_event("evt_s1", "sub_one", "cus_one", "active", T0 + 2),
        sub_event("evt_s2", "sub_two", "cus_two", "active", T0 + 3),
    ];
    for b in &first {
        assert_eq!(app.deliver_signed(b).await.status(), 200);
    }
    wait_applied(&app, 4).await;
    // The first is deleted on Stripe; a late update of its subscription
    // (canceled with it) arrives afterwards.
    let later = [
        customer_event("evt_c1_del", "customer.deleted", "cus_one", T0 + 10),
        sub_event("evt_s1_late", "sub_one", "cus_one", "canceled", T0 + 11),
    ];
    for b in &later {
        assert_eq!(app.deliver_signed(b).await.status(), 200);
    }
    wait_applied(&app, 6).await;

    for sub in ["sub_one", "sub_two"] {
        let row = app.server_store.subscription_by_provider_id("stripe", sub).await.unwrap().unwrap();
        assert_eq!(row.customer_id, alice["id"].as_str().unwrap(), "{sub} stays Alice's");
    }
    let c: Value =
        app.get("/v1/customers/u_alice", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(c["providers"]["stripe"], "cus_two", "the live provider customer is shown: {c}");
    // No stranger was adopted for the deleted provider customer.
    let resp = app.get("/v1/customers/cus_one", &app.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 404);
    let listed: Value =
        app.get("/v1/customers?limit=100", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1, "{listed}");
}

/// Maps emulator prices onto catalog prices, as `stripe_price` lines in the
/// catalog file do for a team already selling on Stripe.
pub(crate) async fn link_catalog(app: &TestApp, links: &[(&str, &str)]) {
    let mut text = std::fs::read_to_string(manifest_path("tollgate.toml")).unwrap();
    for (catalog_price, stripe_price) in links {
        let header = format!("[prices.{catalog_price}]\n");
        text = text.replace(&header, &format!("{header}stripe_price = \"{stripe_price}\"\n"));
    }
    let catalog = tollgate::billing::catalog::Catalog::parse(&text).unwrap();
    app.server_store.sync_catalog(&catalog, &tollgate::store::audit::Actor::Cli).await.unwrap();
}

pub(crate) async fn entitlements_of(app: &TestApp, external: &str) -> Value {
    app.read_json(&format!("/v1/customers/{external}/entitlements")).await
}

pub(crate) async fn wait_entitlements(
    app: &TestApp,
    external: &str,
    check: impl Fn(&Value) -> bool,
) -> Value {
    let started = std::time::Instant::now();
    let reported = std::sync::atomic::AtomicBool::new(false);
    eventually(Duration::from_secs(60), || async {
        let e = entitlements_of(app, external).await;
        let done = check(&e);
        if !done
            && started.elapsed() > Duration::from_secs(15)
            && !reported.swap(true, std::sync::atomic::Ordering::Relaxed)
        {
            eprintln!("waiting for the entitlements of {external}; now {e}");
            print_failing_events(app).await;
        }
        done.then_some(e)
    })
    .await
}

#[tokio::test]
async fn a_card_pack_grants_credits_once_that_are_debited_and_taken_back_by_refunds_and_lost_disputes() {
    let app = spawn_app().await;
    let pack = emulator_price(&app, "Card pack", "500", None).await;
    link_catalog(&app, &[("card_pack_5", &pack)]).await;
    app.upsert_customer("u_cards", json!({ "email": "cards@example.com" })).await;
    let customer = emulator(&app, "/v1/customers", &[("metadata[tollgate_external_id]", "u_cards")]).await;
    let customer = customer["id"].as_str().unwrap().to_owned();
    // Buy once the provider customer's own event has linked it, as an
    // application would: otherwise an event of a purchase may name it
    // first and adopt a placeholder that its `customer.created` then merges
    // into u_cards, bringing the placeholder's own first entitlements
    // version along (that race and the merge have their own tests).
    eventually(Duration::from_secs(10), || async {
        let c: Value =
            app.get("/v1/customers/u_cards", &app.read_key).send().await.unwrap().json().await.unwrap();
        (c["providers"]["stripe"] == customer.as_str()).then_some(())
    })
    .await;
    let buy = |card| buy(&app, &customer, &pack, card);

    // Two packs of five: ten cards, granted once.
    let session = buy("4242424242424242").await;
    let e = wait_entitlements(&app, "u_cards", |e| e["balances"]["cards"] == 10).await;
    let v1 = e["version"].as_i64().unwrap();
    let cust = app.upsert_customer("u_cards", json!({})).await["id"].as_str().unwrap().to_owned();
    let order = order_in_status(&app, &cust, 0, "fulfilled").await;
    let events = app.server_store.events_for_object(&order.id).await.unwrap();
    let paid: Vec<_> = events.iter().filter(|e| e.event_type == "order.paid").collect();
    assert_eq!(paid.len(), 1);
    let data: Value = serde_json::from_str(&paid[0].data).unwrap();
    assert_eq!(data["grants"][0]["grants"]["credits"]["cards"], 10, "order.paid carries its grants: {data}");
    assert_eq!(app.server_store.grants_for_customer(&cust).await.unwrap().len(), 1);

    // Debits: atomic, idempotent, never below zero.
    let debit = |amount: i64, key: Option<&'static str>| {
        let app = &app;
        async move {
            let mut req = app
                .client
                .post(app.url("/v1/customers/u_cards/balances/cards/debit"))
                .bearer_auth(&app.write_key)
                .json(&json!({ "amount": amount }));
            if let Some(k) = key {
                req = req.header("idempotency-key", k);
            }
            req.send().await.unwrap()
        }
    };
    let r = debit(3, Some("use-1")).await;
    assert_eq!(r.status(), 200);
    assert_eq!(r.json::<Value>().await.unwrap()["balances"]["cards"], 7);
    let again = debit(3, Some("use-1")).await;
    assert_eq!(again.status(), 200);
    assert_eq!(
        entitlements_of(&app, "u_cards").await["balances"]["cards"],
        7,
        "a retried debit consumes once"
    );
    expect_error(debit(8, None).await, 402, "invalid_request_error", "insufficient_balance").await;
    let e = entitlements_of(&app, "u_cards").await;
    assert_eq!(e["balances"]["cards"], 7, "a refused debit changes nothing");
    assert!(e["version"].as_i64().unwrap() > v1);
    let check: Value = app
        .get("/v1/customers/u_cards/entitlements/cards", &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((check["allowed"].as_bool(), check["balance"].as_i64()), (Some(true), Some(7)));

    // A 30 % refund takes back 3 of the 10 cards; the rest of the refund the
    // other 7, leaving a debt of the 3 already used.
    let pi = session["payment_intent"].as_str().unwrap();
    emulator(&app, "/v1/refunds", &[("payment_intent", pi), ("amount", "300")]).await;
    wait_entitlements(&app, "u_cards", |e| e["balances"]["cards"] == 4).await;
    emulator(&app, "/v1/refunds", &[("payment_intent", pi)]).await;
    let e = wait_entitlements(&app, "u_cards", |e| e["balances"]["cards"] == -3).await;
    assert_eq!(e["features"], json!([]));
    let grants = app.server_store.grants_for_customer(&cust).await.unwrap();
    assert_eq!(
        (grants[0].status.as_str(), grants[0].revoke_reason.as_deref()),
        ("revoked", Some("refunded"))
    );

    // A dispute keeps the grant while open (the default) and takes it when lost.
    let disputed = buy("4000000000000259").await;
    order_in_status(&app, &cust, 1, "disputed").await;
    wait_entitlements(&app, "u_cards", |e| e["balances"]["cards"] == 7).await;
    let disputes = emulator_get(
        &app,
        &format!("/v1/disputes?payment_intent={}", disputed["payment_intent"].as_str().unwrap()),
    )
    .await;
    emulator(&app, &format!("/v1/disputes/{}/close", disputes["data"][0]["id"].as_str().unwrap()), &[]).await;
    wait_entitlements(&app, "u_cards", |e| e["balances"]["cards"] == -3).await;
    let updates = app.server_store.events_for_customer(&cust).await.unwrap();
    let versions: Vec<i64> = updates
        .iter()
        .filter(|e| e.event_type == "entitlements.updated")
        .map(|e| serde_json::from_str::<Value>(&e.data).unwrap()["version"].as_i64().unwrap())
        .collect();
    assert!(versions.windows(2).all(|w| w[1] == w[0] + 1), "one event per version, in order: {versions:?}");
}

#[tokio::test]
async fn a_subscription_grants_its_products_features_until_it_ends() {
    let app = spawn_app().await;
    let price = emulator_price(&app, "Pro", "2900", Some("month")).await;
    link_catalog(&app, &[("pro_monthly", &price)]).await;
    let customer = emulator(&app, "/v1/customers", &[("metadata[tollgate_external_id]", "u_pro")]).await;
    let session = emulator(
        &app,
        "/v1/checkout/sessions",
        &[
            ("mode", "subscription"),
            ("customer", customer["id"].as_str().unwrap()),
            ("line_items[0][price]", &price),
            ("success_url", "https://shop.example/ok"),
        ],
    )
    .await;
    pay(&session, "4242424242424242").await;
    let e = wait_entitlements(&app, "u_pro", |e| {
        e["features"].as_array().is_some_and(|f| f.contains(&json!("api_access")))
    })
    .await;
    assert_eq!(e["limits"]["projects"], 50);
    let check: Value = app
        .get("/v1/customers/u_pro/entitlements/api_access", &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(check["allowed"], true);

    let session =
        emulator_get(&app, &format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await;
    let sub = session["subscription"].as_str().unwrap();
    let resp = app
        .client
        .delete(app.url(&format!("/emulator/stripe/v1/subscriptions/{sub}")))
        .bearer_auth("sk_test_local")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let e = wait_entitlements(&app, "u_pro", |e| e["features"] == json!([])).await;
    assert_eq!(e["limits"], json!({}));
    let listed: Value = app
        .get("/v1/subscriptions?customer=u_pro", &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    let sub_id = listed["data"][0]["id"].as_str().unwrap();
    let one: Value = app
        .get(&format!("/v1/subscriptions/{sub_id}"), &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!((one["status"].as_str(), one["price"].as_str()), (Some("canceled"), Some("pro_monthly")));
    assert_eq!(one["provider_subscription"], sub);
    let check: Value = app
        .get("/v1/customers/u_pro/entitlements/api_access", &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    assert_eq!(check["allowed"], false);
}

#[tokio::test]
async fn a_free_checkout_is_paid_though_no_payment_event_will_come() {
    let app = spawn_with_secrets_and_sessions().await;
    let session = json!({
        "id": "cs_test_free", "object": "checkout.session", "mode": "payment", "status": "complete",
        "payment_status": "no_payment_required", "customer": "cus_free", "payment_intent": null,
        "amount_total": 0, "currency": "usd", "metadata": {}, "client_reference_id": null,
    });
    let body = event("evt_free", "checkout.session.completed", T0, session);
    assert_eq!(app.deliver_signed(&body).await.status(), 200);
    wait_applied(&app, 1).await;
    let orders = orders_of(&app, "cus_free").await;
    assert_eq!((orders.len(), orders[0].status.as_str()), (1, "paid"));
    let events = app.server_store.events_for_object(&orders[0].id).await.unwrap();
    assert_eq!(count(&events, "order.paid"), 1);
}
