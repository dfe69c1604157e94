//! Outbound webhooks to the application: every delivery verified by the
//! independent `standardwebhooks` crate, retries, order per customer, `410`
//! disabling, dead deliveries retried by API, event filters, the production
//! address rules, and the events API.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use bytes::Bytes;
use serde_json::{json, Value};

use crate::billing_events::{buy, emulator_price, invoice, link_catalog, subscription, wait_applied, T0};
use crate::helpers::*;
use crate::webhooks::{event, SECRET_A};

/// A local application receiving tollgate's webhooks.
#[derive(Clone, Default)]
struct Receiver {
    state: Arc<Mutex<ReceiverState>>,
    base: String,
}

#[derive(Default)]
struct ReceiverState {
    /// Every request, with the status it was answered.
    received: Vec<(HeaderMap, Bytes, u16, u64)>,
    /// Answer this many requests 500 before succeeding.
    fail_next: usize,
    /// Answer every request with this status.
    always: Option<u16>,
    /// Answer the next request only once this is notified.
    hold_next: Option<Arc<tokio::sync::Notify>>,
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64
}

/// When an `ev_…` id was minted, in Unix milliseconds.
fn minted_ms(id: &str) -> u64 {
    ulid::Ulid::from_string(id.trim_start_matches("ev_")).unwrap().timestamp_ms()
}

async fn receive(State(r): State<Receiver>, headers: HeaderMap, body: Bytes) -> StatusCode {
    let (status, hold) = {
        let mut s = r.state.lock().unwrap();
        let status = if let Some(code) = s.always {
            code
        } else if s.fail_next > 0 {
            s.fail_next -= 1;
            500
        } else {
            200
        };
        s.received.push((headers, body, status, now_ms()));
        (status, s.hold_next.take())
    };
    if let Some(hold) = hold {
        hold.notified().await;
    }
    StatusCode::from_u16(status).unwrap()
}

impl Receiver {
    async fn start() -> Receiver {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let receiver =
            Receiver { base: format!("http://{}", listener.local_addr().unwrap()), ..Default::default() };
        let app =
            axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver.clone());
        tokio::spawn(async move { axum::serve(listener, app).await });
        receiver
    }

    fn url(&self) -> String {
        format!("{}/hook", self.base)
    }

    fn set(&self, f: impl FnOnce(&mut ReceiverState)) {
        f(&mut self.state.lock().unwrap())
    }

    /// (event id, status, when) of every request, in arrival order.
    fn log(&self) -> Vec<(String, u16, u64)> {
        let s = self.state.lock().unwrap();
        s.received
            .iter()
            .map(|(h, _, status, at)| (h["webhook-id"].to_str().unwrap().to_owned(), *status, *at))
            .collect()
    }

    fn count(&self) -> usize {
        self.state.lock().unwrap().received.len()
    }

    /// The bodies of the requests answered 2xx, in arrival order, after
    /// checking each request (answered or not) with `standardwebhooks`.
    fn delivered(&self, secret: &str) -> Vec<Value> {
        let verifier = standardwebhooks::Webhook::new(secret).expect("a whsec_ secret");
        let s = self.state.lock().unwrap();
        let mut out = Vec::new();
        for (headers, body, status, _) in &s.received {
            verifier
                .verify(body, headers)
                .unwrap_or_else(|e| panic!("standardwebhooks rejects a delivery: {e:?}"));
            let doc: Value = serde_json::from_slice(body).unwrap();
            assert_eq!(headers["webhook-id"], doc["id"].as_str().unwrap(), "webhook-id is the event id");
            if (200..300).contains(status) {
                out.push(doc);
            }
        }
        out
    }
}

impl TestApp {
    pub(crate) async fn create_endpoint(&self, url: &str, events: Value) -> Value {
        let resp = self
            .client
            .post(self.url("/v1/webhook-endpoints"))
            .bearer_auth(&self.admin_key)
            .json(&json!({ "url": url, "events": events, "description": "test receiver" }))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 201);
        resp.json().await.unwrap()
    }

    async fn admin_get(&self, path: &str) -> Value {
        let resp = self.get(path, &self.admin_key).send().await.unwrap();
        assert_eq!(resp.status(), 200, "GET {path}");
        resp.json().await.unwrap()
    }

    pub(crate) async fn deliveries(&self, endpoint: &str) -> Vec<Value> {
        let v = self.admin_get(&format!("/v1/webhook-endpoints/{endpoint}/deliveries?limit=100")).await;
        v["data"].as_array().unwrap().clone()
    }
}

/// A subscription's life at Stripe for customer `cus`, in order: four
/// subscription events and a failed invoice.
fn life(cus: &str, k: usize) -> Vec<Vec<u8>> {
    let (sub, inv) = (format!("sub_{cus}"), format!("in_{cus}"));
    let t = T0 + 10 * k as i64;
    vec![
        event(
            &format!("evt_{cus}_1"),
            "customer.subscription.created",
            t,
            subscription(&sub, cus, "incomplete", json!({})),
        ),
        event(
            &format!("evt_{cus}_2"),
            "customer.subscription.updated",
            t + 1,
            subscription(&sub, cus, "active", json!({})),
        ),
        event(&format!("evt_{cus}_3"), "invoice.payment_failed", t + 2, invoice(&inv, cus, &sub, "open", 1)),
        event(
            &format!("evt_{cus}_4"),
            "customer.subscription.updated",
            t + 3,
            subscription(&sub, cus, "past_due", json!({})),
        ),
        event(
            &format!("evt_{cus}_5"),
            "customer.subscription.deleted",
            t + 4,
            subscription(&sub, cus, "canceled", json!({"canceled_at": t + 4, "ended_at": t + 4})),
        ),
    ]
}

/// Sends each provider event and waits for it to be applied, so the
/// canonical events happen in the order given.
async fn send_in_order(app: &TestApp, events: &[Vec<u8>]) {
    for body in events {
        assert_eq!(app.deliver_signed(body).await.status(), 200);
        let id = serde_json::from_slice::<Value>(body).unwrap()["id"].as_str().unwrap().to_owned();
        app.wait_status(&id, "processed").await;
    }
}

/// Rate limits are off: these tests poll the API, and limits have their own tests.
fn unlimited(c: &mut tollgate::Config) {
    c.rate_limit_per_key = 0;
    c.rate_limit_per_ip = 0;
}

/// The non-entitlement types, in order (entitlements events come and go
/// with what the catalog grants).
fn billing_types(events: &[Value]) -> Vec<&str> {
    events.iter().map(|e| e["type"].as_str().unwrap()).filter(|t| *t != "entitlements.updated").collect()
}

async fn spawn(adjust: impl FnOnce(&mut tollgate::Config)) -> TestApp {
    spawn_app_with(|c| {
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
        unlimited(c);
        adjust(c);
    })
    .await
}

async fn all_events(app: &TestApp, query: &str) -> Vec<Value> {
    let v: Value = app
        .get(&format!("/v1/events?limit=100{query}"), &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    v["data"].as_array().unwrap().clone()
}

#[tokio::test]
async fn every_delivery_is_signed_as_standard_webhooks_verifies_and_events_are_listed() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::start().await;
    let endpoint = app.create_endpoint(&receiver.url(), json!(["*"])).await;
    let secret = endpoint["secret"].as_str().expect("the secret is shown at creation").to_owned();
    assert!(secret.starts_with("whsec_"));
    let id = endpoint["id"].as_str().unwrap();
    // Never shown again.
    let fetched = app.admin_get(&format!("/v1/webhook-endpoints/{id}")).await;
    assert_eq!(fetched["secret"], Value::Null);
    assert_eq!(fetched["status"], "enabled");
    let listed = app.admin_get("/v1/webhook-endpoints").await;
    assert_eq!(listed["data"][0]["id"], id);
    assert_eq!(listed["data"][0]["secret"], Value::Null);

    send_in_order(&app, &life("cus_sign", 0)).await;
    let events = all_events(&app, "").await;
    let n = events.len();
    assert!(n >= 5, "{events:#?}");
    let delivered = eventually(Duration::from_secs(10), || async {
        let d = receiver.delivered(&secret);
        (d.len() == n).then_some(d)
    })
    .await;
    // Oldest first, exactly the listed events (newest first), each once.
    let mut listed_ids: Vec<&str> = events.iter().map(|e| e["id"].as_str().unwrap()).collect();
    listed_ids.reverse();
    let delivered_ids: Vec<&str> = delivered.iter().map(|e| e["id"].as_str().unwrap()).collect();
    assert_eq!(delivered_ids, listed_ids);
    assert_eq!(
        billing_types(&delivered),
        [
            "subscription.created",
            "subscription.updated",
            "invoice.payment_failed",
            "subscription.updated",
            "subscription.canceled"
        ]
    );
    let first = &delivered[0];
    assert!(first["customer"].is_string(), "{first}");
    assert!(first["created"].is_i64() && first["data"].is_object(), "{first}");

    // The events API: customer, related object, provider event.
    let newest = events.iter().find(|e| e["type"] != "entitlements.updated").unwrap();
    assert_eq!(newest["object"], "event");
    assert_eq!(newest["type"], "subscription.canceled");
    assert_eq!(newest["customer"], first["customer"]);
    assert_eq!(newest["related_object"]["type"], "subscription");
    assert!(newest["provider_event"].as_str().unwrap().starts_with("pe_"));
    let one = app.admin_get(&format!("/v1/events/{}", newest["id"].as_str().unwrap())).await;
    assert_eq!(one["id"], newest["id"]);
    let failed = all_events(&app, "&type=invoice.payment_failed").await;
    assert_eq!(failed.len(), 1);
    assert_eq!(failed[0]["related_object"]["type"], "invoice");
    let customer = first["customer"].as_str().unwrap();
    assert_eq!(all_events(&app, &format!("&customer={customer}")).await.len(), n);
    assert!(all_events(&app, "&customer=nobody").await.is_empty());
    let page: Value =
        app.get("/v1/events?limit=2", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(page["has_more"], true);
    let resp = app.get("/v1/events?type=order.shipped", &app.read_key).send().await.unwrap();
    expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    let resp = app.get("/v1/events/ev_missing", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;

    // Each delivery succeeded on its first attempt, logged.
    let deliveries = app.deliveries(id).await;
    assert_eq!(deliveries.len(), n);
    for d in &deliveries {
        assert_eq!(d["status"], "succeeded", "{d}");
        assert_eq!(d["attempts"], 1);
        assert_eq!(d["attempt_log"][0]["status_code"], 200);
    }

    // Retention removes delivered ones once old enough, not before.
    let actor = tollgate::store::audit::Actor::System("retention");
    let now = tollgate::store::now_unix();
    assert_eq!(app.server_store.prune_delivered_messages(now - 60, &actor).await.unwrap(), 0);
    assert_eq!(app.deliveries(id).await.len(), n);

    // The metrics say so too.
    let metrics = app.client.get(app.url("/metrics")).send().await.unwrap().text().await.unwrap();
    for name in ["webhook_deliveries_total", "webhook_delivery_seconds", "webhook_event_to_delivery_seconds"]
    {
        assert!(metrics.contains(name), "{name} in /metrics");
    }
}

#[tokio::test]
async fn an_endpoint_that_fails_three_times_then_recovers_receives_every_event_in_order() {
    // Retries a second apart: long enough for every later event to be
    // written, and to wait, while the first ones fail.
    let app = spawn(|c| c.webhook_retry_schedule = Some(vec![Duration::from_secs(1); 7])).await;
    let receiver = Receiver::start().await;
    receiver.set(|s| s.fail_next = 3);
    let endpoint = app.create_endpoint(&receiver.url(), json!(["*"])).await;
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    // Two customers' lives, interleaved.
    let (a, b) = (life("cus_ord_a", 0), life("cus_ord_b", 1));
    let interleaved: Vec<Vec<u8>> = a.iter().zip(&b).flat_map(|(x, y)| [x.clone(), y.clone()]).collect();
    send_in_order(&app, &interleaved).await;
    let n = all_events(&app, "").await.len();
    assert!(n >= 10);
    let delivered = eventually(Duration::from_secs(20), || async {
        let d = receiver.delivered(&secret);
        (d.len() == n).then_some(d)
    })
    .await;
    assert_eq!(receiver.count(), n + 3, "three failures, then each event once");
    // Per customer, the order in which they happened (event ids sort so).
    let mut by_customer: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for d in &delivered {
        by_customer
            .entry(d["customer"].as_str().unwrap().to_owned())
            .or_default()
            .push(d["id"].as_str().unwrap().to_owned());
    }
    assert_eq!(by_customer.len(), 2);
    for (customer, ids) in &by_customer {
        let mut sorted = ids.clone();
        sorted.sort();
        assert_eq!(ids, &sorted, "{customer}'s events arrive in order");
        let listed: Vec<String> = all_events(&app, &format!("&customer={customer}"))
            .await
            .iter()
            .rev()
            .map(|e| e["id"].as_str().unwrap().to_owned())
            .collect();
        assert_eq!(ids, &listed, "every event of {customer}, once");
    }
    // The ones that failed held back their customer's later events: nothing
    // newer of that customer was sent before the retried one got through,
    // though the newer ones existed by then.
    let log = receiver.log();
    let customer_of: BTreeMap<String, String> = delivered
        .iter()
        .map(|d| (d["id"].as_str().unwrap().to_owned(), d["customer"].as_str().unwrap().to_owned()))
        .collect();
    let mut held_back = 0;
    for (event, _, _) in log.iter().filter(|(_, status, _)| *status == 500) {
        let customer = &customer_of[event];
        let success_at = log.iter().find(|(e, s, _)| e == event && *s == 200).unwrap().2;
        let later: Vec<&String> = by_customer[customer].iter().filter(|e| *e > event).collect();
        for (e, _, at) in &log {
            if later.contains(&e) {
                assert!(*at >= success_at, "{e} was sent before {event} got through");
            }
        }
        held_back += later.iter().filter(|e| minted_ms(e) < success_at).count();
    }
    assert!(held_back > 0, "some later event existed while an earlier one was failing: {log:?}");
    // The first delivery shows its three failures, then the success.
    let deliveries = app.deliveries(endpoint["id"].as_str().unwrap()).await;
    let retried: Vec<&Value> = deliveries.iter().filter(|d| d["attempts"].as_i64() > Some(1)).collect();
    let attempts: i64 = retried.iter().map(|d| d["attempts"].as_i64().unwrap() - 1).sum();
    assert_eq!(attempts, 3, "{deliveries:#?}");
    for d in &deliveries {
        assert_eq!(d["status"], "succeeded");
        let log = d["attempt_log"].as_array().unwrap();
        assert_eq!(log.len() as i64, d["attempts"].as_i64().unwrap());
        assert_eq!(log.last().unwrap()["status_code"], 200);
        for failed in &log[..log.len() - 1] {
            assert_eq!(failed["status_code"], 500);
        }
    }
}

/// A customer's next delivery is queued (on PostgreSQL, leased to this
/// process's worker by a transaction that cannot see whether an earlier
/// one is unfinished) while the previous one is still being sent: it waits
/// for that answer instead of overtaking it.
#[tokio::test]
async fn a_customers_next_event_waits_while_its_previous_delivery_is_unanswered() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::start().await;
    let answer = Arc::new(tokio::sync::Notify::new());
    receiver.set(|s| s.hold_next = Some(answer.clone()));
    app.create_endpoint(&receiver.url(), json!(["subscription.created", "subscription.updated"])).await;
    let (cus, sub) = ("cus_held", "sub_held");
    let created = subscription(sub, cus, "active", json!({}));
    send_in_order(&app, &[event("evt_held_1", "customer.subscription.created", T0, created)]).await;
    eventually(Duration::from_secs(10), || async { (receiver.count() == 1).then_some(()) }).await;
    let updated = subscription(sub, cus, "past_due", json!({}));
    send_in_order(&app, &[event("evt_held_2", "customer.subscription.updated", T0 + 1, updated)]).await;
    // Applied and committed; a second and a half for the worker to
    // (wrongly) send it, far longer than a handed delivery takes to leave.
    let early =
        eventually_or(Duration::from_millis(1500), || async { (receiver.count() > 1).then_some(()) }).await;
    assert!(early.is_none(), "sent before the previous one was answered: {:?}", receiver.log());
    answer.notify_one();
    eventually(Duration::from_secs(10), || async { (receiver.count() == 2).then_some(()) }).await;
    let log = receiver.log();
    assert!(log[0].0 < log[1].0, "in the order they happened: {log:?}");
    assert!(log.iter().all(|(_, status, _)| *status == 200));
}

#[tokio::test]
async fn a_410_disables_the_endpoint_and_its_deliveries_stay_pending() {
    let app = spawn(|c| c.webhook_retry_schedule = Some(vec![Duration::ZERO; 7])).await;
    let receiver = Receiver::start().await;
    receiver.set(|s| s.always = Some(410));
    let endpoint = app.create_endpoint(&receiver.url(), json!(["*"])).await;
    let id = endpoint["id"].as_str().unwrap();
    send_in_order(&app, &life("cus_gone", 0)[..1]).await;
    let disabled = eventually(Duration::from_secs(10), || async {
        let e = app.admin_get(&format!("/v1/webhook-endpoints/{id}")).await;
        (e["status"] == "disabled").then_some(e)
    })
    .await;
    assert!(disabled["disabled_reason"].as_str().unwrap().contains("410"));
    // Later events are not queued for it, and the one it refused stays
    // visible, waiting (retries are immediate in this test, so any would
    // have happened by the time the later events are applied).
    let queued = app.deliveries(id).await.len();
    send_in_order(&app, &life("cus_gone", 0)[1..3]).await;
    assert_eq!(receiver.count(), 1, "one attempt, then nothing");
    let deliveries = app.deliveries(id).await;
    assert_eq!(deliveries.len(), queued, "{deliveries:#?}");
    let refused: Vec<&Value> = deliveries.iter().filter(|d| d["attempts"] == 1).collect();
    assert_eq!(refused.len(), 1, "{deliveries:#?}");
    assert_eq!(refused[0]["status"], "failed");
    assert_eq!(refused[0]["last_status"], 410);
    for d in deliveries.iter().filter(|d| d["attempts"] == 0) {
        assert_eq!(d["status"], "pending", "the rest wait: {d}");
    }
    // Retention keeps what was never delivered, however old.
    let actor = tollgate::store::audit::Actor::System("retention");
    let later = tollgate::store::now_unix() + 86_400;
    assert_eq!(app.server_store.prune_delivered_messages(later, &actor).await.unwrap(), 0);
    assert_eq!(app.deliveries(id).await.len(), queued);
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    assert!(audit["data"].as_array().unwrap().iter().any(|e| e["action"] == "webhook_endpoint.disabled"));
}

#[tokio::test]
async fn a_dead_delivery_is_retried_by_the_api() {
    let app = spawn(|c| c.webhook_retry_schedule = Some(vec![Duration::ZERO; 7])).await;
    let receiver = Receiver::start().await;
    receiver.set(|s| s.always = Some(503));
    let endpoint = app.create_endpoint(&receiver.url(), json!(["subscription.created"])).await;
    let (id, secret) = (endpoint["id"].as_str().unwrap(), endpoint["secret"].as_str().unwrap());
    send_in_order(&app, &life("cus_dead", 0)[..1]).await;
    let dead = eventually(Duration::from_secs(10), || async {
        let d = app.deliveries(id).await;
        (d.len() == 1 && d[0]["status"] == "dead").then(|| d[0].clone())
    })
    .await;
    assert_eq!(dead["attempts"], 8, "the first attempt and seven retries");
    assert_eq!(dead["attempt_log"].as_array().unwrap().len(), 8);
    assert_eq!(dead["last_status"], 503);
    assert_eq!(receiver.count(), 8);

    receiver.set(|s| s.always = None);
    let dlv = dead["id"].as_str().unwrap();
    let resp = app
        .client
        .post(app.url(&format!("/v1/deliveries/{dlv}/retry")))
        .bearer_auth(&app.write_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;
    let resp = app
        .client
        .post(app.url(&format!("/v1/deliveries/{dlv}/retry")))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let succeeded = eventually(Duration::from_secs(10), || async {
        let d = app.deliveries(id).await;
        (d[0]["status"] == "succeeded").then(|| d[0].clone())
    })
    .await;
    assert_eq!(succeeded["attempts"], 9);
    assert_eq!(receiver.delivered(secret).len(), 1);
    // A delivered one is not retried.
    let resp = app
        .client
        .post(app.url(&format!("/v1/deliveries/{dlv}/retry")))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 409, "invalid_request_error", "delivery_not_retryable").await;
    let resp = app
        .client
        .post(app.url("/v1/deliveries/dlv_missing/retry"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    assert!(audit["data"].as_array().unwrap().iter().any(|e| e["action"] == "delivery.retried"));
}

#[tokio::test]
async fn endpoints_receive_only_the_types_they_subscribe_to() {
    let app = spawn(|_| {}).await;
    let (only, all) = (Receiver::start().await, Receiver::start().await);
    let e_only =
        app.create_endpoint(&only.url(), json!(["subscription.canceled", "invoice.payment_failed"])).await;
    let e_all = app.create_endpoint(&all.url(), json!(["*"])).await;
    assert_eq!(e_only["events"], json!(["invoice.payment_failed", "subscription.canceled"]));
    send_in_order(&app, &life("cus_filter", 0)).await;
    let got = eventually(Duration::from_secs(10), || async {
        let d = only.delivered(e_only["secret"].as_str().unwrap());
        (d.len() == 2).then_some(d)
    })
    .await;
    // Counted once the last event (the cancellation) is out, so no event
    // of the life is still being applied.
    let n = all_events(&app, "").await.len();
    eventually(Duration::from_secs(10), || async {
        (all.delivered(e_all["secret"].as_str().unwrap()).len() == n).then_some(())
    })
    .await;
    let types: Vec<&str> = got.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types, ["invoice.payment_failed", "subscription.canceled"]);
    assert_eq!(app.deliveries(e_only["id"].as_str().unwrap()).await.len(), 2);
    // A send is recorded as succeeded a moment after the endpoint has it
    // (attempts are recorded in batches beside the sending).
    eventually(Duration::from_secs(10), || async {
        let mut recorded = app.deliveries(e_all["id"].as_str().unwrap()).await;
        recorded.extend(app.deliveries(e_only["id"].as_str().unwrap()).await);
        (recorded.len() == n + 2 && recorded.iter().all(|d| d["status"] == "succeeded")).then_some(())
    })
    .await;
    // Retention removes delivered ones (and their attempts) past the cutoff.
    let actor = tollgate::store::audit::Actor::System("retention");
    let later = tollgate::store::now_unix() + 86_400;
    assert_eq!(app.server_store.prune_delivered_messages(later, &actor).await.unwrap(), (n + 2) as u64);
    assert!(app.deliveries(e_only["id"].as_str().unwrap()).await.is_empty());

    // A deleted endpoint receives nothing more and is gone from the API.
    let resp = app
        .client
        .delete(app.url(&format!("/v1/webhook-endpoints/{}", e_all["id"].as_str().unwrap())))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let resp = app
        .get(&format!("/v1/webhook-endpoints/{}", e_all["id"].as_str().unwrap()), &app.admin_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
}

#[tokio::test]
async fn bad_endpoints_are_refused_with_a_clear_error_and_nothing_is_created() {
    let app = spawn(|_| {}).await;
    let post = |key: &str, body: Value| {
        app.client.post(app.url("/v1/webhook-endpoints")).bearer_auth(key.to_owned()).json(&body).send()
    };
    let resp = post(&app.write_key, json!({"url": "http://127.0.0.1:1/hook"})).await.unwrap();
    expect_error(resp, 403, "permission_error", "insufficient_scope").await;
    let resp = post(&app.admin_key, json!({"url": "http://127.0.0.1:1/hook", "events": ["order.shipped"]}))
        .await
        .unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "events");
    let resp = post(&app.admin_key, json!({"url": "http://127.0.0.1:1/hook", "events": []})).await.unwrap();
    expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    let resp = post(&app.admin_key, json!({"url": "ftp://example.com/"})).await.unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "url_invalid").await;
    assert_eq!(e["param"], "url");
    let resp =
        post(&app.admin_key, json!({"url": "http://127.0.0.1:1/hook", "colour": "red"})).await.unwrap();
    expect_error(resp, 400, "invalid_request_error", "parameter_unknown").await;
    let resp = post(&app.admin_key, json!({"events": ["*"]})).await.unwrap();
    expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    let listed = app.admin_get("/v1/webhook-endpoints").await;
    assert_eq!(listed["data"], json!([]));
}

#[tokio::test]
async fn production_refuses_http_and_private_targets() {
    let app = spawn(|c| {
        c.environment = tollgate::config::Environment::Production;
        c.stripe_secret_key = Some(secrecy::SecretString::from("sk_live_delivery_test".to_owned()));
        c.secret_key = Some(secrecy::SecretString::from("q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sA".to_owned()));
        c.allow_sqlite_in_production = true;
        c.reconcile_interval_seconds = 0;
    })
    .await;
    for (url, why) in [
        ("http://example.com/hook", "https"),
        ("https://127.0.0.1/hook", "private"),
        ("https://10.0.0.8/hook", "private"),
        ("https://169.254.169.254/latest", "private"),
        ("https://[::1]/hook", "private"),
        ("https://localhost/hook", "private"),
    ] {
        let resp = app
            .client
            .post(app.url("/v1/webhook-endpoints"))
            .bearer_auth(&app.admin_key)
            .json(&json!({ "url": url }))
            .send()
            .await
            .unwrap();
        let e = expect_error(resp, 400, "invalid_request_error", "url_invalid").await;
        assert!(e["message"].as_str().unwrap().contains(why), "{url}: {e}");
    }
    let listed = app.admin_get("/v1/webhook-endpoints").await;
    assert_eq!(listed["data"], json!([]), "nothing was created");
}

#[tokio::test]
async fn a_name_that_resolves_to_a_private_address_is_refused_at_delivery_time() {
    fn production(c: &mut tollgate::Config, allow_private: bool) {
        c.environment = tollgate::config::Environment::Production;
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
        c.stripe_secret_key = Some(secrecy::SecretString::from("sk_live_delivery_test".to_owned()));
        c.secret_key = Some(secrecy::SecretString::from("q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sA".to_owned()));
        c.allow_sqlite_in_production = true;
        c.reconcile_interval_seconds = 0;
        c.allow_private_webhook_targets = allow_private;
        unlimited(c);
    }
    let receiver = Receiver::start().await;
    let url = receiver.url().replace("http://127.0.0.1", "https://localhost");
    // Created while private targets were allowed...
    let mut app = spawn_on(TestDb::new().await, |c| production(c, true)).await;
    let endpoint = app.create_endpoint(&url, json!(["*"])).await;
    app.stop().await;
    let db = std::mem::replace(&mut app.db, TestDb::new().await);
    // ...and delivered after they no longer are: the resolver refuses the
    // address, so nothing connects.
    let app = spawn_on(db, |c| production(c, false)).await;
    send_in_order(&app, &life("cus_rebind", 0)[..1]).await;
    let d = eventually(Duration::from_secs(10), || async {
        let d = app.deliveries(endpoint["id"].as_str().unwrap()).await;
        d.into_iter().find(|d| d["attempts"] == 1)
    })
    .await;
    assert_eq!(d["status"], "failed");
    assert_eq!(d["last_status"], Value::Null, "no response: no connection was made");
    assert!(d["last_error"].as_str().unwrap().contains("private"), "{d}");
    assert_eq!(receiver.count(), 0);
}

#[tokio::test]
async fn order_paid_is_delivered_once_when_the_provider_sends_the_payment_five_times() {
    let app = spawn(|_| {}).await;
    let receiver = Receiver::start().await;
    let endpoint = app.create_endpoint(&receiver.url(), json!(["order.paid", "order.refunded"])).await;
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    // A card pack bought on the emulator's hosted page.
    let pack = emulator_price(&app, "Card pack", "500", None).await;
    link_catalog(&app, &[("card_pack_5", &pack)]).await;
    app.upsert_customer("u_five", json!({ "email": "five@example.com" })).await;
    let customer = emulator(&app, "/v1/customers", &[("metadata[tollgate_external_id]", "u_five")]).await;
    buy(&app, customer["id"].as_str().unwrap(), &pack, "4242424242424242").await;
    // The emulator's events for it, sent five times each as Stripe's
    // retries would (tollgate trusts SECRET_A here, so the emulator's own
    // deliveries do not reach it: the test plays the provider).
    let events = emulator_get(&app, "/v1/events?limit=100").await;
    let bodies: Vec<Vec<u8>> = events["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["type"] != "checkout.session.expired")
        .map(|e| serde_json::to_vec(e).unwrap())
        .collect();
    let paying: Vec<&str> =
        events["data"].as_array().unwrap().iter().filter_map(|e| e["type"].as_str()).collect();
    assert!(
        paying.contains(&"checkout.session.completed") && paying.contains(&"payment_intent.succeeded"),
        "{paying:?}"
    );
    // Once in the order they happened, then four more times each, all at once.
    let mut oldest_first = bodies.clone();
    oldest_first.reverse();
    for body in &oldest_first {
        assert_eq!(app.deliver_signed(body).await.status(), 200);
        let id = serde_json::from_slice::<Value>(body).unwrap()["id"].as_str().unwrap().to_owned();
        eventually(Duration::from_secs(20), || async {
            app.provider_events("").await.into_iter().find(|e| {
                e["provider_event_id"] == id.as_str()
                    && (e["status"] == "processed" || e["status"] == "ignored")
            })
        })
        .await;
    }
    let mut tasks = Vec::new();
    for _ in 0..4 {
        for body in &bodies {
            let (client, url, body) = (app.client.clone(), app.url("/webhooks/stripe"), body.clone());
            let sig = crate::webhooks::sign(SECRET_A, tollgate::store::now_unix(), &body);
            tasks.push(tokio::spawn(async move {
                client.post(url).header("stripe-signature", sig).body(body).send().await.unwrap().status()
            }));
        }
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 200);
    }
    wait_applied(&app, bodies.len() as i64).await;
    let delivered = eventually(Duration::from_secs(20), || async {
        let d = receiver.delivered(&secret);
        (!d.is_empty()).then_some(d)
    })
    .await;
    // Everything is applied and the queue is empty: what was sent is all
    // that will be.
    eventually(Duration::from_secs(10), || async {
        (app.server_store.delivery_queue_depth().await.ok()? == 0).then_some(())
    })
    .await;
    let delivered_now = receiver.delivered(&secret);
    assert_eq!(delivered_now.len(), delivered.len());
    let paid: Vec<&Value> = delivered_now.iter().filter(|e| e["type"] == "order.paid").collect();
    assert_eq!(paid.len(), 1, "order.paid once: {delivered_now:#?}");
    assert_eq!(receiver.count(), delivered_now.len(), "no request failed or was repeated");
    assert_eq!(paid[0]["customer"], "u_five");
    assert_eq!(paid[0]["data"]["grants"][0]["grants"]["credits"]["cards"], 10, "{}", paid[0]);
}

/// A second tollgate on the test's database, as another replica would be.
async fn second_instance(
    db: &TestDb,
    adjust: impl FnOnce(&mut tollgate::Config),
) -> (tokio_util::sync::CancellationToken, tokio::task::JoinHandle<Result<(), tollgate::app::StartError>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let mut config = test_config(db);
    config.port = listener.local_addr().unwrap().port();
    unlimited(&mut config);
    adjust(&mut config);
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server =
        tollgate::app::Server::build(config, shutdown.clone()).await.expect("second instance builds");
    (shutdown, tokio::spawn(server.serve(listener)))
}

#[tokio::test]
async fn a_delivery_queued_by_one_instance_is_sent_at_once_by_another() {
    // Instance A sends nothing; B polls only once a minute on PostgreSQL,
    // so a prompt delivery there can only come from A's NOTIFY. (SQLite has
    // no cross-process signal: B's poll finds it.)
    let app = spawn(|c| {
        c.webhook_delivery_workers = Some(0);
        c.webhook_retry_schedule = Some(vec![Duration::from_secs(3600); 7]);
    })
    .await;
    let poll = if app.db.is_postgres() { 60_000 } else { 100 };
    let receiver = Receiver::start().await;
    receiver.set(|s| s.fail_next = 1);
    let endpoint = app.create_endpoint(&receiver.url(), json!(["subscription.created"])).await;
    let (id, secret) = (endpoint["id"].as_str().unwrap(), endpoint["secret"].as_str().unwrap());
    send_in_order(&app, &life("cus_twin", 0)[..1]).await;
    assert_eq!(app.server_store.delivery_queue_depth().await.unwrap(), 1);
    assert_eq!(receiver.count(), 0, "instance A has no delivery workers");

    let (b, b_task) = second_instance(&app.db, |c| {
        c.webhook_delivery_poll_ms = poll;
        c.webhook_retry_schedule = Some(vec![Duration::from_secs(3600); 7]);
    })
    .await;
    // B sends what was waiting when it started; the receiver fails it, and
    // its retry is an hour away.
    let failed = eventually(Duration::from_secs(10), || async {
        let d = app.deliveries(id).await;
        (d[0]["status"] == "failed").then(|| d[0].clone())
    })
    .await;
    assert_eq!(receiver.count(), 1);
    // A retries it by API: A's transaction notifies, B sends now.
    let retried_at = std::time::Instant::now();
    let resp = app
        .client
        .post(app.url(&format!("/v1/deliveries/{}/retry", failed["id"].as_str().unwrap())))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    eventually(Duration::from_secs(20), || async { (receiver.delivered(secret).len() == 1).then_some(()) })
        .await;
    let waited = retried_at.elapsed();
    if app.db.is_postgres() {
        assert!(waited < Duration::from_secs(20), "woken by NOTIFY, not its one-minute poll: {waited:?}");
    }
    b.cancel();
    b_task.await.unwrap().unwrap();
}

#[tokio::test]
async fn a_disabled_endpoint_is_enabled_by_the_api_and_what_waited_goes_out_in_order() {
    // Retries an hour apart: only enabling can make the refused one due now.
    let app = spawn(|c| c.webhook_retry_schedule = Some(vec![Duration::from_secs(3600); 7])).await;
    let receiver = Receiver::start().await;
    receiver.set(|s| s.always = Some(410));
    let endpoint = app.create_endpoint(&receiver.url(), json!(["*"])).await;
    let (id, secret) = (endpoint["id"].as_str().unwrap(), endpoint["secret"].as_str().unwrap());
    let life = life("cus_back", 0);
    send_in_order(&app, &life[..2]).await;
    eventually(Duration::from_secs(10), || async {
        let e = app.admin_get(&format!("/v1/webhook-endpoints/{id}")).await;
        (e["status"] == "disabled").then_some(())
    })
    .await;
    let waiting = app.deliveries(id).await.len();
    // While disabled: later events are not queued for it.
    send_in_order(&app, &life[2..3]).await;
    assert_eq!(app.deliveries(id).await.len(), waiting);
    assert_eq!(receiver.count(), 1);

    let enable = |key: &str, body: Option<Value>| {
        let mut req = app
            .client
            .post(app.url(&format!("/v1/webhook-endpoints/{id}/enable")))
            .bearer_auth(key.to_owned());
        if let Some(b) = body {
            req = req.json(&b);
        }
        req.send()
    };
    expect_error(enable(&app.write_key, None).await.unwrap(), 403, "permission_error", "insufficient_scope")
        .await;
    let e = expect_error(
        enable(&app.admin_key, Some(json!({"retry_dead": "yes"}))).await.unwrap(),
        400,
        "invalid_request_error",
        "parameter_invalid",
    )
    .await;
    assert_eq!(e["param"], "retry_dead");
    let resp = app
        .client
        .post(app.url("/v1/webhook-endpoints/we_missing/enable"))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    assert_eq!(app.admin_get(&format!("/v1/webhook-endpoints/{id}")).await["status"], "disabled");

    receiver.set(|s| s.always = None);
    let resp = enable(&app.admin_key, None).await.unwrap();
    assert_eq!(resp.status(), 200);
    let enabled: Value = resp.json().await.unwrap();
    assert_eq!(enabled["status"], "enabled");
    assert_eq!(enabled["disabled_reason"], Value::Null);
    assert_eq!(enabled["requeued_dead_deliveries"], 0);
    // What waited goes out now, in order, the refused one first.
    let delivered = eventually(Duration::from_secs(10), || async {
        let d = receiver.delivered(secret);
        (d.len() == waiting).then_some(d)
    })
    .await;
    let ids: Vec<&str> = delivered.iter().map(|d| d["id"].as_str().unwrap()).collect();
    let mut sorted = ids.clone();
    sorted.sort();
    assert_eq!(ids, sorted);
    assert_eq!(receiver.log()[0].0, receiver.log()[1].0, "the refused event is the first sent again");
    // Events from now on are queued for it again.
    send_in_order(&app, &life[3..4]).await;
    eventually(Duration::from_secs(10), || async {
        (receiver.delivered(secret).len() > waiting).then_some(())
    })
    .await;
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    let entry = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "webhook_endpoint.enabled")
        .cloned()
        .expect("an audit entry");
    assert_eq!(entry["object_id"], id);
    // Enabling an enabled endpoint changes nothing and audits nothing.
    assert_eq!(enable(&app.admin_key, None).await.unwrap().status(), 200);
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    let n = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["action"] == "webhook_endpoint.enabled")
        .count();
    assert_eq!(n, 1);
}

#[tokio::test]
async fn enabling_with_retry_dead_queues_the_dead_deliveries_again() {
    let app = spawn(|c| c.webhook_retry_schedule = Some(vec![Duration::ZERO; 7])).await;
    let receiver = Receiver::start().await;
    receiver.set(|s| s.always = Some(503));
    let endpoint = app.create_endpoint(&receiver.url(), json!(["subscription.created"])).await;
    let (id, secret) = (endpoint["id"].as_str().unwrap(), endpoint["secret"].as_str().unwrap());
    send_in_order(&app, &life("cus_dead_a", 0)[..1]).await;
    send_in_order(&app, &life("cus_dead_b", 1)[..1]).await;
    eventually(Duration::from_secs(20), || async {
        let d = app.deliveries(id).await;
        (d.len() == 2 && d.iter().all(|d| d["status"] == "dead")).then_some(())
    })
    .await;
    receiver.set(|s| s.always = None);
    let resp = app
        .client
        .post(app.url(&format!("/v1/webhook-endpoints/{id}/enable")))
        .bearer_auth(&app.admin_key)
        .json(&json!({ "retry_dead": true }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["requeued_dead_deliveries"], 2);
    assert_eq!(body["status"], "enabled");
    eventually(Duration::from_secs(10), || async { (receiver.delivered(secret).len() == 2).then_some(()) })
        .await;
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    let entry = audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["action"] == "webhook_endpoint.enabled")
        .cloned()
        .unwrap();
    assert_eq!(entry["data"]["requeued_dead"], 2, "{entry}");
}

async fn endpoint_audit_entries(app: &TestApp) -> usize {
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    audit["data"].as_array().unwrap().iter().filter(|e| e["object_type"] == "webhook_endpoint").count()
}

/// The shipped catalog plus `extra`, in a file of its own.
fn config_file(extra: &str) -> tempfile::NamedTempFile {
    let text = std::fs::read_to_string(manifest_path("tollgate.toml")).unwrap();
    let file = tempfile::NamedTempFile::new().unwrap();
    std::fs::write(file.path(), format!("{text}\n{extra}")).unwrap();
    file
}

/// A fresh whsec_ secret in an environment variable only this test uses.
fn secret_in_env() -> (String, String) {
    let name = format!("TOLLGATE_TEST_WHSEC_{}", ulid::Ulid::new());
    let secret = format!(
        "whsec_{}",
        base64::Engine::encode(&base64::engine::general_purpose::STANDARD, rand::random::<[u8; 32]>())
    );
    std::env::set_var(&name, &secret);
    (name, secret)
}

#[tokio::test]
async fn endpoints_declared_in_the_config_file_are_reconciled_at_start_up() {
    let receiver = Receiver::start().await;
    let (var, secret) = secret_in_env();
    let declare = |url: &str, events: &str| {
        config_file(&format!(
            "[webhook_endpoints.app]\nurl = \"{url}\"\nevents = {events}\ndescription = \"The shop\"\nsecret_env = \"{var}\"\n"
        ))
    };
    let file = declare(&receiver.url(), "[\"subscription.created\"]");
    let path = file.path().to_owned();
    let mut app = spawn_on(TestDb::new().await, |c| {
        c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
        c.catalog_path = path.clone();
        unlimited(c);
    })
    .await;
    let listed = app.admin_get("/v1/webhook-endpoints").await;
    let endpoints = listed["data"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1);
    let e = &endpoints[0];
    let id = e["id"].as_str().unwrap().to_owned();
    assert_eq!((e["config_key"].as_str(), e["url"].as_str()), (Some("app"), Some(receiver.url().as_str())));
    assert_eq!(e["events"], json!(["subscription.created"]));
    assert_eq!(e["secret"], Value::Null);
    // Signed with the secret from the environment.
    send_in_order(&app, &life("cus_declared", 0)[..1]).await;
    eventually(Duration::from_secs(10), || async { (receiver.delivered(&secret).len() == 1).then_some(()) })
        .await;

    // The API does not change what the file declares.
    let resp = app
        .client
        .delete(app.url(&format!("/v1/webhook-endpoints/{id}")))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    let err = expect_error(resp, 409, "invalid_request_error", "endpoint_config_managed").await;
    assert!(err["message"].as_str().unwrap().contains("[webhook_endpoints.app]"), "{err}");
    let resp = app
        .client
        .post(app.url(&format!("/v1/webhook-endpoints/{id}/rotate-secret")))
        .bearer_auth(&app.admin_key)
        .send()
        .await
        .unwrap();
    expect_error(resp, 409, "invalid_request_error", "endpoint_config_managed").await;
    assert_eq!(app.admin_get(&format!("/v1/webhook-endpoints/{id}")).await["status"], "enabled");

    assert_eq!(endpoint_audit_entries(&app).await, 1, "created once");

    // Restarted with the same file: nothing changes.
    app.stop().await;
    let db = std::mem::replace(&mut app.db, TestDb::new().await);
    let start = |db: TestDb, path: std::path::PathBuf| {
        spawn_on(db, move |c| {
            c.stripe_webhook_secret = Some(secrecy::SecretString::from(SECRET_A.to_owned()));
            c.catalog_path = path;
            unlimited(c);
        })
    };
    let mut app = start(db, path.clone()).await;
    let listed = app.admin_get("/v1/webhook-endpoints").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
    assert_eq!(listed["data"][0]["id"], id.as_str());
    assert_eq!(endpoint_audit_entries(&app).await, 1, "an unchanged declaration writes nothing");

    // A changed declaration updates the same endpoint.
    let other = Receiver::start().await;
    let changed = declare(&other.url(), "[\"*\"]");
    app.stop().await;
    let db = std::mem::replace(&mut app.db, TestDb::new().await);
    let mut app = start(db, changed.path().to_owned()).await;
    let e = app.admin_get(&format!("/v1/webhook-endpoints/{id}")).await;
    assert_eq!((e["url"].as_str(), e["events"].clone()), (Some(other.url().as_str()), json!(["*"])));
    assert_eq!(app.admin_get("/v1/webhook-endpoints").await["data"].as_array().unwrap().len(), 1);

    // A bad declaration stops start-up with a message naming it.
    app.stop().await;
    let db = std::mem::replace(&mut app.db, TestDb::new().await);
    let bad = config_file("[webhook_endpoints.app]\nurl = \"http://127.0.0.1:1/\"\nsecret_env = \"TOLLGATE_TEST_UNSET_VARIABLE\"\n");
    let mut config = test_config(&db);
    config.catalog_path = bad.path().to_owned();
    let err = tollgate::app::Server::build(config, Default::default()).await.err().expect("refused");
    let message = err.to_string();
    assert!(
        message.contains("[webhook_endpoints.app]") && message.contains("TOLLGATE_TEST_UNSET_VARIABLE"),
        "{message}"
    );

    // Removed from the file: removed from tollgate.
    let mut app = start(db, manifest_path("tollgate.toml")).await;
    assert_eq!(app.admin_get("/v1/webhook-endpoints").await["data"], json!([]));
    let audit = app.admin_get("/v1/audit-log?limit=100").await;
    assert!(audit["data"]
        .as_array()
        .unwrap()
        .iter()
        .any(|e| e["action"] == "webhook_endpoint.deleted" && e["object_id"] == id.as_str()));
    app.stop().await;
}
