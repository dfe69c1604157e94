//! The Stripe emulator, driven over HTTP as a Stripe client would.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::Value;
use sha2::Sha256;
use tokio_util::sync::CancellationToken;
use tollgate::providers::stripe_emulator::{DeliveryOptions, Emulator, EmulatorConfig};

use crate::helpers::*;

const KEY: &str = "sk_test_emulator";

struct Emu {
    base: String,
    client: reqwest::Client,
    shutdown: CancellationToken,
}

impl Drop for Emu {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn spawn_emulator(delivery: DeliveryOptions) -> Emu {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let emulator = Emulator::new(EmulatorConfig { public_url: base.clone(), api_key: None, delivery });
    let shutdown = CancellationToken::new();
    tokio::spawn(emulator.serve(listener, shutdown.clone()));
    let client = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    Emu { base, client, shutdown }
}

fn fast_retries() -> DeliveryOptions {
    DeliveryOptions { first_retry: Duration::from_millis(20), ..DeliveryOptions::default() }
}

impl Emu {
    async fn post(&self, path: &str, form: &[(&str, &str)]) -> (u16, Value) {
        let resp = self
            .client
            .post(format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .form(form)
            .send()
            .await
            .unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn ok(&self, path: &str, form: &[(&str, &str)]) -> Value {
        let (status, body) = self.post(path, form).await;
        assert_eq!(status, 200, "POST {path}: {body}");
        body
    }

    async fn get(&self, path: &str) -> (u16, Value) {
        let resp = self.client.get(format!("{}{path}", self.base)).bearer_auth(KEY).send().await.unwrap();
        let status = resp.status().as_u16();
        (status, resp.json().await.unwrap())
    }

    async fn fetch(&self, path: &str) -> Value {
        let (status, body) = self.get(path).await;
        assert_eq!(status, 200, "GET {path}: {body}");
        body
    }

    async fn delete(&self, path: &str) -> Value {
        self.client
            .delete(format!("{}{path}", self.base))
            .bearer_auth(KEY)
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    async fn price(&self, amount: &str, recurring: Option<&str>) -> String {
        let product = self.ok("/v1/products", &[("name", "Pro plan")]).await;
        let mut form =
            vec![("product", product["id"].as_str().unwrap()), ("unit_amount", amount), ("currency", "usd")];
        if let Some(interval) = recurring {
            form.push(("recurring[interval]", interval));
        }
        self.ok("/v1/prices", &form).await["id"].as_str().unwrap().to_owned()
    }

    /// Pays a session on its hosted page as a person would.
    async fn pay(&self, session: &Value, card: &str) -> reqwest::Response {
        let page_url = session["url"].as_str().unwrap();
        let html = self.client.get(page_url).send().await.unwrap().text().await.unwrap();
        assert!(html.contains(r#"name="card_number""#) && html.contains(">Pay<"), "a real card form: {html}");
        self.client
            .post(format!("{page_url}/pay"))
            .form(&[("card_number", card), ("email", "buyer@example.com")])
            .send()
            .await
            .unwrap()
    }

    async fn event_types(&self) -> Vec<String> {
        let events = self.fetch("/v1/events?limit=100").await;
        events["data"].as_array().unwrap().iter().map(|e| e["type"].as_str().unwrap().to_owned()).collect()
    }
}

/// A received delivery: its `Stripe-Signature` header and body.
type Received = (String, Vec<u8>);

/// A local webhook endpoint that records what it receives and can fail on purpose.
#[derive(Clone, Default)]
struct Receiver {
    received: Arc<Mutex<Vec<Received>>>,
    fail_first: Arc<AtomicUsize>,
    attempts: Arc<AtomicUsize>,
}

impl Receiver {
    async fn start(fail_first: usize) -> (Receiver, String) {
        let receiver = Receiver { fail_first: Arc::new(AtomicUsize::new(fail_first)), ..Receiver::default() };
        let r = receiver.clone();
        let app = axum::Router::new().route(
            "/hook",
            axum::routing::post(move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let r = r.clone();
                async move {
                    r.attempts.fetch_add(1, Ordering::SeqCst);
                    if r.fail_first.load(Ordering::SeqCst) > 0 {
                        r.fail_first.fetch_sub(1, Ordering::SeqCst);
                        return axum::http::StatusCode::INTERNAL_SERVER_ERROR;
                    }
                    let sig = headers
                        .get("stripe-signature")
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("")
                        .to_owned();
                    r.received.lock().unwrap().push((sig, body.to_vec()));
                    axum::http::StatusCode::OK
                }
            }),
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, url)
    }

    fn events(&self) -> Vec<Value> {
        self.received.lock().unwrap().iter().map(|(_, b)| serde_json::from_slice(b).unwrap()).collect()
    }

    async fn wait_for(&self, kind: &str) -> Value {
        eventually(Duration::from_secs(10), || async {
            self.events().into_iter().find(|e| e["type"] == kind)
        })
        .await
    }
}

/// Verifies a Stripe-Signature header independently of the emulator's code.
fn verify_stripe_signature(header: &str, body: &[u8], secret: &str) -> bool {
    let mut t = None;
    let mut sigs = Vec::new();
    for part in header.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = Some(v.to_owned()),
            Some(("v1", v)) => sigs.push(v.to_owned()),
            _ => {}
        }
    }
    let Some(t) = t else { return false };
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(body);
    let expected = hex::encode(mac.finalize().into_bytes());
    let fresh = (tollgate::store::now_unix() - t.parse::<i64>().unwrap_or(0)).abs() < 300;
    fresh && sigs.contains(&expected)
}

#[tokio::test]
async fn a_cart_checkout_is_paid_on_the_hosted_page_and_its_events_delivered_signed() {
    let emu = spawn_emulator(fast_retries()).await;
    let (receiver, url) = Receiver::start(0).await;
    let endpoint = emu.ok("/v1/webhook_endpoints", &[("url", &url), ("enabled_events[]", "*")]).await;
    let secret = endpoint["secret"].as_str().unwrap().to_owned();
    assert!(secret.starts_with("whsec_"));
    assert!(emu
        .fetch(&format!("/v1/webhook_endpoints/{}", endpoint["id"].as_str().unwrap()))
        .await
        .get("secret")
        .is_none());

    let customer = emu
        .ok("/v1/customers", &[("email", "ada@example.com"), ("metadata[tollgate_external_id]", "user_42")])
        .await;
    let (a, b) = (emu.price("1500", None).await, emu.price("500", None).await);
    let session = emu
        .ok(
            "/v1/checkout/sessions",
            &[
                ("mode", "payment"),
                ("customer", customer["id"].as_str().unwrap()),
                ("line_items[0][price]", &a),
                ("line_items[0][quantity]", "2"),
                ("line_items[1][price]", &b),
                ("success_url", "https://app.example.com/ok?session={CHECKOUT_SESSION_ID}"),
                ("cancel_url", "https://app.example.com/cancel"),
                ("client_reference_id", "order_7"),
                ("metadata[order]", "7"),
            ],
        )
        .await;
    let id = session["id"].as_str().unwrap().to_owned();
    assert!(id.starts_with("cs_test_"));
    assert_eq!(session["amount_total"], 3500);
    assert_eq!(session["status"], "open");
    assert_eq!(session["payment_status"], "unpaid");

    let resp = emu.pay(&session, "4242 4242 4242 4242").await;
    assert_eq!(resp.status(), 303);
    assert_eq!(resp.headers()["location"], format!("https://app.example.com/ok?session={id}").as_str());

    let paid =
        emu.fetch(&format!("/v1/checkout/sessions/{id}?expand[]=payment_intent&expand[]=line_items")).await;
    assert_eq!(paid["status"], "complete");
    assert_eq!(paid["payment_status"], "paid");
    assert_eq!(paid["client_reference_id"], "order_7");
    assert_eq!(paid["payment_intent"]["status"], "succeeded");
    assert_eq!(paid["payment_intent"]["amount"], 3500);
    assert_eq!(paid["line_items"]["data"].as_array().unwrap().len(), 2);
    let charge = emu
        .fetch(&format!("/v1/charges/{}", paid["payment_intent"]["latest_charge"].as_str().unwrap()))
        .await;
    assert_eq!(charge["paid"], true);
    assert_eq!(charge["payment_method_details"]["card"]["last4"], "4242");

    let types = emu.event_types().await;
    for t in
        ["checkout.session.completed", "payment_intent.succeeded", "charge.succeeded", "customer.created"]
    {
        assert!(types.contains(&t.to_owned()), "{t} in {types:?}");
    }
    let completed = receiver.wait_for("checkout.session.completed").await;
    assert_eq!(completed["data"]["object"]["id"], id.as_str());
    assert_eq!(completed["data"]["object"]["metadata"]["order"], "7");
    let received = receiver.received.lock().unwrap().clone();
    assert!(!received.is_empty());
    for (sig, body) in &received {
        assert!(verify_stripe_signature(sig, body, &secret), "signature verifies: {sig}");
        assert!(!verify_stripe_signature(sig, body, "whsec_wrong"));
    }
    // Paying twice is refused.
    let again = emu.pay_raw(&session, "4242424242424242").await;
    assert_ne!(again.status(), 303);
}

impl Emu {
    async fn pay_raw(&self, session: &Value, card: &str) -> reqwest::Response {
        let page_url = session["url"].as_str().unwrap();
        self.client.post(format!("{page_url}/pay")).form(&[("card_number", card)]).send().await.unwrap()
    }
}

#[tokio::test]
async fn a_declined_card_leaves_the_session_open_and_records_the_failure() {
    let emu = spawn_emulator(fast_retries()).await;
    let price = emu.price("900", None).await;
    let customer = emu.ok("/v1/customers", &[("email", "d@example.com")]).await;
    let session = emu
        .ok(
            "/v1/checkout/sessions",
            &[
                ("mode", "payment"),
                ("customer", customer["id"].as_str().unwrap()),
                ("line_items[0][price]", &price),
                ("success_url", "https://x.example/ok"),
            ],
        )
        .await;
    let resp = emu.pay(&session, "4000000000000002").await;
    assert_eq!(resp.status(), 402);
    assert!(resp.text().await.unwrap().contains("Your card was declined."));
    let s = emu.fetch(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await;
    assert_eq!(s["status"], "open");
    assert!(emu.event_types().await.contains(&"payment_intent.payment_failed".to_owned()));
    // A mistyped number never reaches the bank.
    let resp = emu.pay_raw(&session, "4242424242424241").await;
    assert!(resp.text().await.unwrap().contains("card number is incorrect"));
    // A good card then succeeds.
    assert_eq!(emu.pay_raw(&session, "4242424242424242").await.status(), 303);
}

async fn subscribe(
    emu: &Emu,
    clock_time: i64,
    card: &str,
    trial_days: Option<&str>,
) -> (String, String, Value) {
    let clock = emu.ok("/v1/test_helpers/test_clocks", &[("frozen_time", &clock_time.to_string())]).await;
    let clock_id = clock["id"].as_str().unwrap().to_owned();
    let customer = emu.ok("/v1/customers", &[("email", "sub@example.com"), ("test_clock", &clock_id)]).await;
    let price = emu.price("2500", Some("month")).await;
    let mut form = vec![
        ("mode", "subscription"),
        ("customer", customer["id"].as_str().unwrap()),
        ("line_items[0][price]", price.as_str()),
        ("success_url", "https://x.example/ok"),
        ("subscription_data[metadata][plan]", "pro"),
    ];
    if let Some(days) = trial_days {
        form.push(("subscription_data[trial_period_days]", days));
    }
    let session = emu.ok("/v1/checkout/sessions", &form).await;
    assert_eq!(emu.pay(&session, card).await.status(), 303);
    let session = emu.fetch(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await;
    let sub = emu.fetch(&format!("/v1/subscriptions/{}", session["subscription"].as_str().unwrap())).await;
    (clock_id, price, sub)
}

const T0: i64 = 1_767_225_600; // 2026-01-01T00:00:00Z

#[tokio::test]
async fn a_trial_subscription_renews_as_the_test_clock_advances() {
    let emu = spawn_emulator(fast_retries()).await;
    let (clock, _, sub) = subscribe(&emu, T0, "4242424242424242", Some("7")).await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    assert_eq!(sub["status"], "trialing");
    assert_eq!(sub["trial_end"], T0 + 7 * 86_400);
    assert_eq!(sub["metadata"]["plan"], "pro");
    assert_eq!(sub["items"]["data"][0]["current_period_end"], T0 + 7 * 86_400);
    assert!(sub.get("current_period_end").is_none(), "current API shape: periods live on items");
    let first = emu.fetch(&format!("/v1/invoices/{}", sub["latest_invoice"].as_str().unwrap())).await;
    assert_eq!((first["amount_due"].as_i64(), first["status"].as_str()), (Some(0), Some("paid")));
    assert_eq!(first["parent"]["subscription_details"]["subscription"], sub_id.as_str());

    emu.ok(
        &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
        &[("frozen_time", &(T0 + 8 * 86_400).to_string())],
    )
    .await;
    let sub = emu.fetch(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(sub["status"], "active");
    let invoice = emu.fetch(&format!("/v1/invoices/{}", sub["latest_invoice"].as_str().unwrap())).await;
    assert_eq!(invoice["amount_paid"], 2500);
    assert_eq!(invoice["billing_reason"], "subscription_cycle");
    let types = emu.event_types().await;
    for t in [
        "customer.subscription.trial_will_end",
        "invoice.paid",
        "invoice.payment_succeeded",
        "customer.subscription.updated",
    ] {
        assert!(types.contains(&t.to_owned()), "{t} in {types:?}");
    }

    // A month later: another paid cycle.
    emu.ok(
        &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
        &[("frozen_time", &(T0 + 40 * 86_400).to_string())],
    )
    .await;
    let invoices = emu.fetch(&format!("/v1/invoices?subscription={sub_id}")).await;
    let paid: Vec<&Value> =
        invoices["data"].as_array().unwrap().iter().filter(|i| i["amount_paid"] == 2500).collect();
    assert_eq!(paid.len(), 2, "{invoices}");
}

#[tokio::test]
async fn a_card_that_fails_later_makes_the_subscription_past_due_then_canceled() {
    let emu = spawn_emulator(fast_retries()).await;
    let (clock, _, sub) = subscribe(&emu, T0, "4000000000000341", Some("3")).await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    assert_eq!(sub["status"], "trialing", "the card attaches");

    emu.ok(
        &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
        &[("frozen_time", &(T0 + 4 * 86_400).to_string())],
    )
    .await;
    let sub = emu.fetch(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(sub["status"], "past_due");
    let invoice = emu.fetch(&format!("/v1/invoices/{}", sub["latest_invoice"].as_str().unwrap())).await;
    assert_eq!(invoice["status"], "open");
    assert_eq!(invoice["attempt_count"], 1);
    assert!(invoice["next_payment_attempt"].as_i64().is_some());
    assert!(emu.event_types().await.contains(&"invoice.payment_failed".to_owned()));

    // Retries 3, 5 and 7 days apart all fail: the subscription is canceled.
    emu.ok(
        &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
        &[("frozen_time", &(T0 + 25 * 86_400).to_string())],
    )
    .await;
    let (_, sub) = emu.get(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(sub["status"], "canceled");
    assert_eq!(sub["cancellation_details"]["reason"], "payment_failed");
    let invoice = emu.fetch(&format!("/v1/invoices/{}", sub["latest_invoice"].as_str().unwrap())).await;
    assert_eq!(invoice["attempt_count"], 4);
    assert!(emu.event_types().await.contains(&"customer.subscription.deleted".to_owned()));
}

#[tokio::test]
async fn subscriptions_change_plan_with_prorations_cancel_and_resume() {
    let emu = spawn_emulator(fast_retries()).await;
    let (_, _, sub) = subscribe(&emu, T0, "4242424242424242", None).await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    assert_eq!(sub["status"], "active");
    let bigger = emu.price("5000", Some("month")).await;
    let item = sub["items"]["data"][0]["id"].as_str().unwrap();
    let updated = emu
        .ok(
            &format!("/v1/subscriptions/{sub_id}"),
            &[
                ("items[0][id]", item),
                ("items[0][price]", &bigger),
                ("items[0][quantity]", "2"),
                ("proration_behavior", "always_invoice"),
            ],
        )
        .await;
    assert_eq!(updated["items"]["data"][0]["price"]["id"], bigger.as_str());
    assert_eq!(updated["items"]["data"][0]["quantity"], 2);
    let invoice = emu.fetch(&format!("/v1/invoices/{}", updated["latest_invoice"].as_str().unwrap())).await;
    assert_eq!(invoice["billing_reason"], "subscription_update");
    let due = invoice["amount_due"].as_i64().unwrap();
    assert!(due > 0 && due <= 7500, "a prorated charge for the rest of the period: {due}");

    let bad = emu.post(&format!("/v1/subscriptions/{sub_id}"), &[("proration_behavior", "sometimes")]).await;
    assert_eq!((bad.0, bad.1["error"]["param"].as_str()), (400, Some("proration_behavior")));

    let canceling = emu.ok(&format!("/v1/subscriptions/{sub_id}"), &[("cancel_at_period_end", "true")]).await;
    assert_eq!(canceling["cancel_at_period_end"], true);
    assert_eq!(canceling["status"], "active");
    let resumed = emu.ok(&format!("/v1/subscriptions/{sub_id}"), &[("cancel_at_period_end", "false")]).await;
    assert_eq!(resumed["cancel_at_period_end"], false);

    let canceled = emu.delete(&format!("/v1/subscriptions/{sub_id}")).await;
    assert_eq!(canceled["status"], "canceled");
    let types = emu.event_types().await;
    assert!(types.contains(&"customer.subscription.deleted".to_owned()));
    let listed = emu.fetch("/v1/subscriptions").await;
    assert!(listed["data"].as_array().unwrap().is_empty(), "canceled subscriptions are hidden by default");
    let listed = emu.fetch("/v1/subscriptions?status=canceled").await;
    assert_eq!(listed["data"].as_array().unwrap().len(), 1);
}

async fn paid_charge(emu: &Emu, card: &str, amount: &str) -> String {
    let price = emu.price(amount, None).await;
    let customer = emu.ok("/v1/customers", &[("email", "r@example.com")]).await;
    let session = emu
        .ok(
            "/v1/checkout/sessions",
            &[
                ("mode", "payment"),
                ("customer", customer["id"].as_str().unwrap()),
                ("line_items[0][price]", &price),
                ("success_url", "https://x.example/ok"),
            ],
        )
        .await;
    assert_eq!(emu.pay(&session, card).await.status(), 303);
    let session = emu
        .fetch(&format!("/v1/checkout/sessions/{}?expand[]=payment_intent", session["id"].as_str().unwrap()))
        .await;
    session["payment_intent"]["latest_charge"].as_str().unwrap().to_owned()
}

#[tokio::test]
async fn refunds_partial_then_full_and_never_more_than_was_paid() {
    let emu = spawn_emulator(fast_retries()).await;
    let charge = paid_charge(&emu, "4242424242424242", "2000").await;
    let r1 = emu
        .ok("/v1/refunds", &[("charge", &charge), ("amount", "500"), ("reason", "requested_by_customer")])
        .await;
    assert_eq!((r1["amount"].as_i64(), r1["status"].as_str()), (Some(500), Some("succeeded")));
    let c = emu.fetch(&format!("/v1/charges/{charge}")).await;
    assert_eq!((c["amount_refunded"].as_i64(), c["refunded"].as_bool()), (Some(500), Some(false)));

    let (status, body) = emu.post("/v1/refunds", &[("charge", &charge), ("amount", "1600")]).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("amount")));

    let r2 = emu.ok("/v1/refunds", &[("charge", &charge)]).await;
    assert_eq!(r2["amount"], 1500, "the rest by default");
    assert_eq!(emu.fetch(&format!("/v1/charges/{charge}")).await["refunded"], true);
    let (status, body) = emu.post("/v1/refunds", &[("charge", &charge)]).await;
    assert_eq!((status, body["error"]["code"].as_str()), (400, Some("charge_already_refunded")));

    let types = emu.event_types().await;
    assert_eq!(types.iter().filter(|t| *t == "charge.refunded").count(), 2);
    assert_eq!(types.iter().filter(|t| *t == "refund.created").count(), 2);
}

#[tokio::test]
async fn the_dispute_card_opens_a_dispute_that_can_be_lost_or_won() {
    let emu = spawn_emulator(fast_retries()).await;
    let charge = paid_charge(&emu, "4000000000000259", "3000").await;
    assert_eq!(emu.fetch(&format!("/v1/charges/{charge}")).await["disputed"], true);
    let disputes = emu.fetch(&format!("/v1/disputes?charge={charge}")).await;
    let dispute = disputes["data"][0].clone();
    assert_eq!(
        (dispute["status"].as_str(), dispute["amount"].as_i64()),
        (Some("needs_response"), Some(3000))
    );
    let won = emu
        .ok(
            &format!("/v1/disputes/{}", dispute["id"].as_str().unwrap()),
            &[("evidence[uncategorized_text]", "winning_evidence")],
        )
        .await;
    assert_eq!(won["status"], "won");
    let types = emu.event_types().await;
    assert!(
        types.contains(&"charge.dispute.created".to_owned())
            && types.contains(&"charge.dispute.closed".to_owned())
    );

    let charge = paid_charge(&emu, "4000000000000259", "1000").await;
    let disputes = emu.fetch(&format!("/v1/disputes?charge={charge}")).await;
    let lost =
        emu.ok(&format!("/v1/disputes/{}/close", disputes["data"][0]["id"].as_str().unwrap()), &[]).await;
    assert_eq!(lost["status"], "lost");
}

#[tokio::test]
async fn the_billing_portal_cancels_and_switches_plans() {
    let emu = spawn_emulator(fast_retries()).await;
    let (_, _, sub) = subscribe(&emu, T0, "4242424242424242", None).await;
    let sub_id = sub["id"].as_str().unwrap().to_owned();
    let other = emu.price("9900", Some("month")).await;
    let portal = emu
        .ok(
            "/v1/billing_portal/sessions",
            &[
                ("customer", sub["customer"].as_str().unwrap()),
                ("return_url", "https://app.example.com/account"),
            ],
        )
        .await;
    assert!(portal["id"].as_str().unwrap().starts_with("bps_"));
    let url = portal["url"].as_str().unwrap();
    let html = emu.client.get(url).send().await.unwrap().text().await.unwrap();
    assert!(
        html.contains("Cancel plan")
            && html.contains("Switch plan")
            && html.contains("https://app.example.com/account")
    );

    let resp = emu
        .client
        .post(format!("{url}/switch"))
        .form(&[("subscription", sub_id.as_str()), ("price", other.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(
        emu.fetch(&format!("/v1/subscriptions/{sub_id}")).await["items"]["data"][0]["price"]["id"],
        other.as_str()
    );

    let resp = emu
        .client
        .post(format!("{url}/cancel"))
        .form(&[("subscription", sub_id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 303);
    assert_eq!(emu.fetch(&format!("/v1/subscriptions/{sub_id}")).await["cancel_at_period_end"], true);

    // A portal session cannot touch another customer's subscription.
    let stranger = emu.ok("/v1/customers", &[("email", "s@example.com")]).await;
    let theirs =
        emu.ok("/v1/billing_portal/sessions", &[("customer", stranger["id"].as_str().unwrap())]).await;
    let resp = emu
        .client
        .post(format!("{}/cancel", theirs["url"].as_str().unwrap()))
        .form(&[("subscription", sub_id.as_str())])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

#[tokio::test]
async fn idempotency_keys_replay_and_refuse_other_parameters() {
    let emu = spawn_emulator(fast_retries()).await;
    let send = |email: &'static str| {
        emu.client
            .post(format!("{}/v1/customers", emu.base))
            .bearer_auth(KEY)
            .header("idempotency-key", "idem-1")
            .form(&[("email", email)])
            .send()
    };
    let first = send("a@example.com").await.unwrap();
    let first: Value = first.json().await.unwrap();
    let again = send("a@example.com").await.unwrap();
    assert_eq!(again.headers()["idempotent-replayed"], "true");
    let again: Value = again.json().await.unwrap();
    assert_eq!(first, again);
    let customers = emu.fetch("/v1/customers").await;
    assert_eq!(customers["data"].as_array().unwrap().len(), 1, "one customer created");
    let other = send("b@example.com").await.unwrap();
    assert_eq!(other.status(), 400);
    let body: Value = other.json().await.unwrap();
    assert_eq!(body["error"]["type"], "idempotency_error");
}

#[tokio::test]
async fn bad_requests_get_stripes_errors() {
    let emu = spawn_emulator(fast_retries()).await;
    let (status, body) = emu.post("/v1/prices", &[("currency", "usd"), ("unit_amount", "5")]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (400, Some("parameter_missing"), Some("product"))
    );
    let (status, body) = emu.post("/v1/customers", &[("colour", "red")]).await;
    assert_eq!(
        (status, body["error"]["code"].as_str(), body["error"]["param"].as_str()),
        (400, Some("parameter_unknown"), Some("colour"))
    );
    let (status, body) = emu.get("/v1/customers/cus_missing").await;
    assert_eq!((status, body["error"]["code"].as_str()), (404, Some("resource_missing")));
    let (status, body) = emu.post("/v1/customers", &[("metadata", "x"), ("metadata[a]", "b")]).await;
    assert_eq!(status, 400, "{body}");
    let (status, _) =
        emu.post("/v1/prices", &[("product", "prod_x"), ("currency", "usd"), ("unit_amount", "abc")]).await;
    assert_eq!(status, 400);
    let (status, _) = emu.get("/v1/nothing").await;
    assert_eq!(status, 404);

    let resp = emu.client.get(format!("{}/v1/customers", emu.base)).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    let resp = emu
        .client
        .get(format!("{}/v1/customers", emu.base))
        .bearer_auth("sk_live_nope")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401);
    let resp =
        emu.client.get(format!("{}/v1/customers", emu.base)).basic_auth(KEY, Some("")).send().await.unwrap();
    assert_eq!(resp.status(), 200, "curl -u sk_test_…: works");
    let resp = emu
        .client
        .post(format!("{}/v1/customers", emu.base))
        .bearer_auth(KEY)
        .json(&serde_json::json!({"email": "x"}))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 400, "JSON bodies are refused as on Stripe");

    let price = emu.price("100", Some("month")).await;
    let (status, body) = emu
        .post(
            "/v1/checkout/sessions",
            &[("mode", "payment"), ("line_items[0][price]", &price), ("success_url", "https://x.example")],
        )
        .await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("line_items[0][price]")));
}

#[tokio::test]
async fn lists_page_and_old_api_versions_get_old_shapes() {
    let emu = spawn_emulator(fast_retries()).await;
    for i in 0..5 {
        emu.ok("/v1/customers", &[("email", &format!("c{i}@example.com"))]).await;
    }
    let page = emu.fetch("/v1/customers?limit=2").await;
    assert_eq!(page["object"], "list");
    assert_eq!(page["has_more"], true);
    assert_eq!(page["data"][0]["email"], "c4@example.com", "newest first");
    let last = page["data"][1]["id"].as_str().unwrap();
    let next = emu.fetch(&format!("/v1/customers?limit=2&starting_after={last}")).await;
    assert_eq!(next["data"][0]["email"], "c2@example.com");
    let back = emu
        .fetch(&format!("/v1/customers?limit=2&ending_before={}", next["data"][0]["id"].as_str().unwrap()))
        .await;
    assert_eq!(back["data"], page["data"]);

    let (_, _, sub) = subscribe(&emu, T0, "4242424242424242", None).await;
    let old = emu
        .client
        .get(format!("{}/v1/invoices/{}", emu.base, sub["latest_invoice"].as_str().unwrap()))
        .bearer_auth(KEY)
        .header("stripe-version", "2017-08-15")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(old["subscription"], sub["id"], "top-level invoice.subscription for old versions");
    assert!(old["charge"].as_str().is_some_and(|c| c.starts_with("ch_")));
    let old_sub = emu
        .client
        .get(format!("{}/v1/subscriptions/{}", emu.base, sub["id"].as_str().unwrap()))
        .bearer_auth(KEY)
        .header("stripe-version", "2024-06-20")
        .send()
        .await
        .unwrap()
        .json::<Value>()
        .await
        .unwrap();
    assert_eq!(old_sub["current_period_end"], sub["items"]["data"][0]["current_period_end"]);
}

#[tokio::test]
async fn failed_deliveries_are_retried_and_the_duplicate_knob_doubles_them() {
    let emu = spawn_emulator(fast_retries()).await;
    let (receiver, url) = Receiver::start(2).await;
    emu.ok("/v1/webhook_endpoints", &[("url", &url), ("enabled_events[]", "customer.created")]).await;
    emu.ok("/v1/customers", &[("email", "retry@example.com")]).await;
    receiver.wait_for("customer.created").await;
    assert_eq!(receiver.attempts.load(Ordering::SeqCst), 3, "two failures, then success");
    let event_id = receiver.events()[0]["id"].as_str().unwrap().to_owned();
    eventually(Duration::from_secs(5), || async {
        let e = emu.fetch(&format!("/v1/events/{event_id}")).await;
        (e["pending_webhooks"] == 0).then_some(())
    })
    .await;

    let dup = spawn_emulator(DeliveryOptions { duplicate: true, ..fast_retries() }).await;
    let (receiver, url) = Receiver::start(0).await;
    dup.ok("/v1/webhook_endpoints", &[("url", &url), ("enabled_events[]", "customer.created")]).await;
    dup.ok("/v1/customers", &[("email", "dup@example.com")]).await;
    eventually(Duration::from_secs(5), || async { (receiver.events().len() == 2).then_some(()) }).await;
    let events = receiver.events();
    assert_eq!(events[0]["id"], events[1]["id"], "the same event twice");
}

#[tokio::test]
async fn serve_mounts_the_emulator_when_no_stripe_key_is_set() {
    let app = spawn_app().await;
    let resp =
        app.client.get(app.url("/emulator/stripe/v1/customers")).bearer_auth(KEY).send().await.unwrap();
    assert_eq!(resp.status(), 200);
    let body: Value = resp.json().await.unwrap();
    assert_eq!(body["object"], "list");

    let with_key = spawn_app_with(|c| {
        c.stripe_secret_key = Some(secrecy::SecretString::from("sk_test_real".to_owned()))
    })
    .await;
    let resp = with_key
        .client
        .get(with_key.url("/emulator/stripe/v1/customers"))
        .bearer_auth(KEY)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 404);
}

/// Random, hostile form bodies against every writing endpoint: always a
/// 4xx (or a 2xx when the noise happens to be valid), never a 5xx.
#[tokio::test]
async fn hostile_input_never_breaks_the_emulator() {
    use rand::{Rng, SeedableRng};
    let emu = spawn_emulator(fast_retries()).await;
    let price = emu.price("100", None).await;
    let customer = emu.ok("/v1/customers", &[]).await["id"].as_str().unwrap().to_owned();
    let paths = [
        "/v1/customers".to_owned(),
        format!("/v1/customers/{customer}"),
        "/v1/products".to_owned(),
        "/v1/prices".to_owned(),
        "/v1/checkout/sessions".to_owned(),
        "/v1/refunds".to_owned(),
        "/v1/webhook_endpoints".to_owned(),
        "/v1/test_helpers/test_clocks".to_owned(),
        "/v1/billing_portal/sessions".to_owned(),
    ];
    let keys = [
        "email",
        "metadata[a]",
        "metadata",
        "line_items[0][price]",
        "line_items[][x]",
        "amount",
        "mode",
        "a[b][c][d]",
        "expand[]",
        "currency",
        "unit_amount",
        "product",
        "url",
        "enabled_events[]",
        "frozen_time",
        "recurring[interval]",
        "customer",
        "[x]",
        "a[",
        "]",
    ];
    let values = [
        "",
        "0",
        "-1",
        "99999999999999999999",
        "payment",
        "subscription",
        "usd",
        "\u{0}",
        "%",
        "'; DROP",
        "https://x.example",
        "*",
        price.as_str(),
        customer.as_str(),
        "true",
        "😀",
    ];
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    for _ in 0..400 {
        let path = &paths[rng.gen_range(0..paths.len())];
        let n = rng.gen_range(0..5);
        let body: Vec<(String, String)> = (0..n)
            .map(|_| {
                (
                    keys[rng.gen_range(0..keys.len())].to_owned(),
                    values[rng.gen_range(0..values.len())].to_owned(),
                )
            })
            .collect();
        let resp =
            emu.client.post(format!("{}{path}", emu.base)).bearer_auth(KEY).form(&body).send().await.unwrap();
        let status = resp.status();
        let text = resp.text().await.unwrap();
        assert!(status.as_u16() < 500, "POST {path} {body:?} → {status}: {text}");
        if !status.is_success() {
            let v: Value = serde_json::from_str(&text).expect("errors are JSON");
            assert!(v["error"]["message"].is_string(), "{text}");
        }
    }
}

#[tokio::test]
async fn metadata_that_looks_like_an_object_and_odd_keys_do_not_break_old_versions() {
    let emu = spawn_emulator(fast_retries()).await;
    let (receiver, url) = Receiver::start(0).await;
    emu.ok(
        "/v1/webhook_endpoints",
        &[("url", &url), ("enabled_events[]", "customer.created"), ("api_version", "2017-08-15")],
    )
    .await;
    let c =
        emu.ok("/v1/customers", &[("metadata[object]", "subscription"), ("metadata[id]", "sub_fake")]).await;
    let old = emu
        .client
        .get(format!("{}/v1/customers/{}", emu.base, c["id"].as_str().unwrap()))
        .bearer_auth(KEY)
        .header("stripe-version", "2017-08-15")
        .send()
        .await
        .unwrap();
    assert_eq!(old.status(), 200);
    let old: Value = old.json().await.unwrap();
    assert_eq!(
        old["metadata"],
        serde_json::json!({ "object": "subscription", "id": "sub_fake" }),
        "metadata untouched"
    );
    let event = receiver.wait_for("customer.created").await;
    assert_eq!(event["api_version"], "2017-08-15");
    assert!(event.get("_stored_at").is_none(), "no private fields in deliveries");

    let resp = emu
        .client
        .get(format!("{}/v1/customers", emu.base))
        .basic_auth("€€€€€€€€€€€€", Some(""))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 401, "odd keys are refused, not a panic");
    let (status, body) =
        emu.post("/v1/test_helpers/test_clocks", &[("frozen_time", "9223372036854775807")]).await;
    assert_eq!((status, body["error"]["param"].as_str()), (400, Some("frozen_time")));
    // A refused request is not saved under its Idempotency-Key.
    let send = |form: &'static [(&'static str, &'static str)]| {
        emu.client
            .post(format!("{}/v1/products", emu.base))
            .bearer_auth(KEY)
            .header("idempotency-key", "retry-me")
            .form(form)
            .send()
    };
    assert_eq!(send(&[]).await.unwrap().status(), 400);
    assert_eq!(send(&[("name", "Fixed")]).await.unwrap().status(), 200);
}

#[tokio::test]
async fn a_one_time_price_in_a_subscription_checkout_is_billed_once() {
    let emu = spawn_emulator(fast_retries()).await;
    let clock = emu.ok("/v1/test_helpers/test_clocks", &[("frozen_time", &T0.to_string())]).await;
    let clock_id = clock["id"].as_str().unwrap().to_owned();
    let customer = emu.ok("/v1/customers", &[("test_clock", &clock_id)]).await;
    let setup_fee = emu.price("1000", None).await;
    let monthly = emu.price("2500", Some("month")).await;
    let session = emu
        .ok(
            "/v1/checkout/sessions",
            &[
                ("mode", "subscription"),
                ("customer", customer["id"].as_str().unwrap()),
                ("line_items[0][price]", &setup_fee),
                ("line_items[1][price]", &monthly),
                ("success_url", "https://x.example/ok"),
            ],
        )
        .await;
    assert_eq!(emu.pay(&session, "4242424242424242").await.status(), 303);
    let session = emu.fetch(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap())).await;
    let sub = emu.fetch(&format!("/v1/subscriptions/{}", session["subscription"].as_str().unwrap())).await;
    assert_eq!(sub["items"]["data"].as_array().unwrap().len(), 1, "only the recurring price is an item");
    assert_eq!(sub["items"]["data"][0]["current_period_end"], billing_month_after(T0));
    let first = emu.fetch(&format!("/v1/invoices/{}", sub["latest_invoice"].as_str().unwrap())).await;
    assert_eq!(first["amount_paid"], 3500);
    emu.ok(
        &format!("/v1/test_helpers/test_clocks/{clock_id}/advance"),
        &[("frozen_time", &(T0 + 35 * 86_400).to_string())],
    )
    .await;
    let sub = emu.fetch(&format!("/v1/subscriptions/{}", sub["id"].as_str().unwrap())).await;
    let renewal = emu.fetch(&format!("/v1/invoices/{}", sub["latest_invoice"].as_str().unwrap())).await;
    assert_eq!(renewal["amount_paid"], 2500, "the setup fee is not billed again");
}

fn billing_month_after(t: i64) -> i64 {
    tollgate::providers::stripe_emulator::billing::add_interval(t, "month", 1)
}
