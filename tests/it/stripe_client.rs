//! tollgate's Stripe client against the emulator on a bad day (lost
//! answers, 500s, a dead provider), `catalog sync` and `stripe setup`.

use std::time::{Duration, Instant};

use axum::response::IntoResponse;
use secrecy::SecretString;
use serde_json::Value;
use tokio_util::sync::CancellationToken;
use tollgate::billing::catalog::Catalog;
use tollgate::http::error::{ApiError, ErrorType};
use tollgate::ops::catalog_sync::{sync_stripe, CatalogSyncError};
use tollgate::ops::stripe_setup::{setup_stripe, webhook_url, SetupAction};
use tollgate::providers::stripe::{
    derived_idempotency_key, BreakerState, ClientOptions, Form, StripeClient, StripeClientError,
};
use tollgate::providers::stripe_emulator::{DeliveryOptions, Emulator, EmulatorConfig, Fault};
use tollgate::store::audit::Actor;

use crate::helpers::*;

const KEY: &str = "sk_test_client";

struct Emu {
    base: String,
    emulator: Emulator,
    shutdown: CancellationToken,
}

impl Drop for Emu {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

async fn emulator_on(listener: tokio::net::TcpListener) -> Emu {
    let base = format!("http://{}", listener.local_addr().unwrap());
    let delivery = DeliveryOptions { first_retry: Duration::from_millis(20), ..DeliveryOptions::default() };
    let emulator = Emulator::new(EmulatorConfig { public_url: base.clone(), api_key: None, delivery });
    let shutdown = CancellationToken::new();
    tokio::spawn(emulator.clone().serve(listener, shutdown.clone()));
    Emu { base, emulator, shutdown }
}

async fn start_emulator() -> Emu {
    emulator_on(tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap()).await
}

/// Fast retries and a quick breaker, so the tests take milliseconds.
fn fast() -> ClientOptions {
    ClientOptions {
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        max_retries: 2,
        base_delay: Duration::from_millis(5),
        max_delay: Duration::from_millis(20),
        breaker_failures: 3,
        breaker_cooldown: Duration::from_millis(300),
        ..ClientOptions::default()
    }
}

fn client(emu: &Emu) -> StripeClient {
    StripeClient::with_options(&emu.base, SecretString::from(KEY.to_owned()), fast())
}

fn count(emu: &Emu, kind: &str) -> usize {
    emu.emulator.lock().all(kind).len()
}

fn metric_line(name: &str, needles: &[&str]) -> Option<String> {
    tollgate::telemetry::metrics_handle()
        .render()
        .lines()
        .find(|l| l.starts_with(name) && needles.iter().all(|n| l.contains(n)))
        .map(str::to_owned)
}

#[tokio::test]
async fn a_post_whose_answer_was_lost_is_retried_with_the_same_key_and_creates_once() {
    let emu = start_emulator().await;
    let client = client(&emu);
    // The emulator creates the product, keeps the idempotent answer, then
    // answers 500: the retry must be recognised, not run again.
    emu.emulator.set_fault(Some(Fault { status: 500, times: Some(1), after_processing: true }));
    let product = client.post("/v1/products", &Form::new().set("name", "Pro"), None).await.unwrap();
    assert_eq!(count(&emu, "product"), 1, "one product despite the retry");
    let stored = emu.emulator.lock().all("product")[0]["id"].clone();
    assert_eq!(product["id"], stored);

    // A key derived from the caller's own Idempotency-Key: tollgate's caller
    // retrying reaches Stripe as the same request.
    let key = derived_idempotency_key(&["test", "key_1", "their-key"]);
    let form = Form::new().set("name", "Team").metadata([("tollgate_product", "team")]);
    let first = client.post("/v1/products", &form, Some(&key)).await.unwrap();
    let again = client.post("/v1/products", &form, Some(&key)).await.unwrap();
    assert_eq!(first["id"], again["id"]);
    assert_eq!(count(&emu, "product"), 2);
}

#[tokio::test]
async fn a_500_then_success_is_retried_and_counted() {
    let handle = tollgate::telemetry::metrics_handle();
    let emu = start_emulator().await;
    let client = client(&emu);
    emu.emulator.set_fault(Some(Fault { status: 500, times: Some(2), after_processing: false }));
    let listed = client.get("/v1/customers", &[]).await.expect("the third attempt succeeds");
    assert_eq!(listed["object"], "list");
    assert!(metric_line("provider_requests_total", &["GET /v1/customers", "server_error"]).is_some());
    assert!(
        metric_line("provider_request_duration_seconds_bucket", &["GET /v1/customers", "success"]).is_some()
    );
    drop(handle);

    // A 400 is the request's fault: not retried.
    let started = Instant::now();
    let err = client.post("/v1/prices", &Form::new().set("currency", "usd"), None).await.unwrap_err();
    assert!(matches!(err, StripeClientError::Api { status: 400, .. }), "{err}");
    assert!(started.elapsed() < Duration::from_secs(1));
    let api = ApiError::from(err);
    assert_eq!((api.status.as_u16(), api.code), (502, "provider_rejected_request"));
    assert!(!api.message.contains("Missing required param"), "Stripe's message stays in the logs");

    // More failures than retries: the error comes back, mapped to a 503.
    emu.emulator.set_fault(Some(Fault { status: 503, times: Some(3), after_processing: false }));
    let err = client.get("/v1/customers", &[]).await.unwrap_err();
    assert!(matches!(err, StripeClientError::Api { status: 503, .. }), "{err}");
    let api = ApiError::from(err);
    assert_eq!(
        (api.status.as_u16(), api.kind, api.code),
        (503, ErrorType::ProviderError, "provider_unavailable")
    );
    assert_eq!(client.breaker().state(), BreakerState::Open, "three failed attempts in a row");
}

#[tokio::test]
async fn a_declined_card_is_a_402_card_error_with_the_decline_code() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let t0 = 1_767_225_600_i64;
    let post = |path: &str, form: Form| {
        let client = client.clone();
        let path = path.to_owned();
        async move { client.post(&path, &form, None).await.unwrap() }
    };
    let clock = post("/v1/test_helpers/test_clocks", Form::new().set("frozen_time", t0)).await;
    let clock = clock["id"].as_str().unwrap().to_owned();
    let customer =
        post("/v1/customers", Form::new().set("email", "c@example.com").set("test_clock", &clock)).await;
    let product = post("/v1/products", Form::new().set("name", "Pro")).await;
    let price = post(
        "/v1/prices",
        Form::new()
            .set("product", product["id"].as_str().unwrap())
            .set("unit_amount", 2500)
            .set("currency", "usd")
            .set("recurring[interval]", "month"),
    )
    .await;
    let session = post(
        "/v1/checkout/sessions",
        Form::new()
            .set("mode", "subscription")
            .set("customer", customer["id"].as_str().unwrap())
            .objects("line_items", [&[("price", price["id"].as_str().unwrap().to_owned())][..]])
            .set("success_url", "https://x.example/ok")
            .set("subscription_data[trial_period_days]", 3),
    )
    .await;
    // The card attaches on the hosted page, and every later charge fails.
    let page = session["url"].as_str().unwrap();
    let http = reqwest::Client::builder().redirect(reqwest::redirect::Policy::none()).build().unwrap();
    let paid = http
        .post(format!("{page}/pay"))
        .form(&[("card_number", "4000000000000341"), ("email", "c@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(paid.status(), 303);
    post(
        &format!("/v1/test_helpers/test_clocks/{clock}/advance"),
        Form::new().set("frozen_time", t0 + 4 * 86_400),
    )
    .await;
    let session =
        client.get(&format!("/v1/checkout/sessions/{}", session["id"].as_str().unwrap()), &[]).await.unwrap();
    let sub = client
        .get(&format!("/v1/subscriptions/{}", session["subscription"].as_str().unwrap()), &[])
        .await
        .unwrap();
    assert_eq!(sub["status"], "past_due");

    let started = Instant::now();
    let err = client
        .post(&format!("/v1/invoices/{}/pay", sub["latest_invoice"].as_str().unwrap()), &Form::new(), None)
        .await
        .unwrap_err();
    assert!(started.elapsed() < Duration::from_secs(1), "a decline is not retried");
    let StripeClientError::Api { status: 402, ref decline_code, .. } = err else { panic!("{err}") };
    assert_eq!(decline_code.as_deref(), Some("generic_decline"));

    let api = ApiError::from(err);
    assert_eq!((api.status.as_u16(), api.kind, api.code), (402, ErrorType::CardError, "card_declined"));
    let body: Value =
        serde_json::from_slice(&axum::body::to_bytes(api.into_response().into_body(), 10_000).await.unwrap())
            .unwrap();
    assert_eq!(body["error"]["type"], "card_error");
    assert_eq!(body["error"]["decline_code"], "generic_decline");
}

/// Calls until the breaker refuses one, within a deadline.
async fn until_open(client: &StripeClient) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        match client.get("/v1/customers", &[]).await {
            Err(StripeClientError::CircuitOpen { .. }) => return,
            Ok(v) => panic!("the provider is meant to be failing: {v}"),
            Err(_) => assert!(Instant::now() < deadline, "the breaker never opened"),
        }
    }
}

async fn assert_fails_fast(client: &StripeClient) {
    let started = Instant::now();
    let err = client.get("/v1/customers", &[]).await.unwrap_err();
    assert!(started.elapsed() < Duration::from_millis(50), "took {:?}", started.elapsed());
    let response = ApiError::from(err).into_response();
    assert_eq!(response.status(), 503);
    let retry_after: u64 = response.headers()["retry-after"].to_str().unwrap().parse().unwrap();
    assert!(retry_after >= 1);
    let body: Value =
        serde_json::from_slice(&axum::body::to_bytes(response.into_body(), 10_000).await.unwrap()).unwrap();
    assert_eq!(body["error"]["type"], "provider_error");
}

/// Polls until a call gets through again (the breaker's half-open trial).
async fn recovers(client: &StripeClient) {
    eventually(Duration::from_secs(10), || async { client.get("/v1/customers", &[]).await.ok() }).await;
    assert_eq!(client.breaker().state(), BreakerState::Closed);
}

#[tokio::test]
async fn the_breaker_opens_on_500s_fails_fast_and_recovers_without_a_restart() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let other_caller = StripeClient::with_options(&emu.base, SecretString::from(KEY.to_owned()), fast());
    emu.emulator.set_fault(Some(Fault::always(500)));
    until_open(&client).await;
    assert_eq!(client.breaker().state(), BreakerState::Open);
    assert_fails_fast(&client).await;
    assert_fails_fast(&other_caller).await;
    assert!(metric_line("provider_requests_total", &["circuit_open"]).is_some());
    assert!(metric_line("provider_circuit_breaker_state", &["stripe"]).is_some());

    emu.emulator.set_fault(None);
    recovers(&client).await;
    assert!(other_caller.get("/v1/customers", &[]).await.is_ok(), "one breaker for every caller");
}

#[tokio::test]
async fn the_breaker_opens_when_the_provider_is_gone_and_closes_when_it_is_back() {
    let emu = start_emulator().await;
    let address = emu.base.trim_start_matches("http://").to_owned();
    let client = client(&emu);
    client.get("/v1/customers", &[]).await.unwrap();
    emu.shutdown.cancel();
    drop(emu);
    until_open(&client).await;
    assert_fails_fast(&client).await;

    // The freed port can be taken for a while by another test's outgoing
    // connection (same ephemeral range); it comes back when that closes.
    let listener = eventually(Duration::from_secs(60), || async {
        tokio::net::TcpListener::bind(address.as_str()).await.ok()
    })
    .await;
    let _back = emulator_on(listener).await;
    recovers(&client).await;
}

const CATALOG: &str = r#"
[products.pro]
name = "Pro"
description = "For teams."
features = ["exports"]

[products.pack]
name = "Card pack"
credits = { cards = 5 }

[prices.pro_monthly]
product = "pro"
currency = "usd"
amount = 2900
interval = "month"

[prices.pro_yearly]
product = "pro"
currency = "usd"
amount = 29000
interval = "year"

[prices.pack_5]
product = "pack"
currency = "usd"
amount = 500
"#;

async fn lists(client: &StripeClient) -> (Vec<Value>, Vec<Value>) {
    (client.list_all("/v1/products", &[]).await.unwrap(), client.list_all("/v1/prices", &[]).await.unwrap())
}

#[tokio::test]
async fn catalog_sync_creates_once_and_a_second_run_changes_nothing() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let db = TestDb::new().await;
    let store = db.store().await;
    let catalog = Catalog::parse(CATALOG).unwrap();

    let first = sync_stripe(&store, &client, &catalog, &Actor::Cli).await.unwrap();
    assert_eq!((first.created.len(), first.updated.len(), first.deactivated.len()), (5, 0, 0), "{first}");
    let (products, prices) = lists(&client).await;
    assert_eq!((products.len(), prices.len()), (2, 3));
    let monthly = prices.iter().find(|p| p["lookup_key"] == "tollgate_pro_monthly").unwrap().clone();
    assert_eq!(
        (monthly["unit_amount"].as_i64(), monthly["metadata"]["tollgate_price"].as_str()),
        (Some(2900), Some("pro_monthly"))
    );

    let second = sync_stripe(&store, &client, &catalog, &Actor::Cli).await.unwrap();
    assert!(!second.changed_provider() && second.linked.is_empty(), "{second}");
    assert_eq!(lists(&client).await, (products, prices), "Stripe's lists are unchanged");

    // The mapping is what the API shows.
    let listed = store.list_prices(&tollgate::store::Page::first(10), &Default::default()).await.unwrap();
    let pro_monthly = listed.data.iter().find(|p| p.id == "pro_monthly").unwrap();
    assert_eq!(pro_monthly.provider_ids["stripe"], monthly["id"].as_str().unwrap());
}

#[tokio::test]
async fn a_changed_amount_makes_a_new_price_and_deactivates_the_old_one() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let db = TestDb::new().await;
    let store = db.store().await;
    sync_stripe(&store, &client, &Catalog::parse(CATALOG).unwrap(), &Actor::Cli).await.unwrap();
    let old = store.current_catalog_link("stripe", "price", "pro_monthly").await.unwrap().unwrap();

    let changed = Catalog::parse(&CATALOG.replace("amount = 2900\n", "amount = 3900\n")).unwrap();
    let report = sync_stripe(&store, &client, &changed, &Actor::Cli).await.unwrap();
    assert_eq!((report.created.len(), report.updated.len(), report.deactivated.len()), (1, 0, 1), "{report}");
    let new = store.current_catalog_link("stripe", "price", "pro_monthly").await.unwrap().unwrap();
    assert_ne!(new, old);
    let new_price = client.get(&format!("/v1/prices/{new}"), &[]).await.unwrap();
    assert_eq!((new_price["unit_amount"].as_i64(), new_price["active"].as_bool()), (Some(3900), Some(true)));
    assert_eq!(new_price["lookup_key"], "tollgate_pro_monthly", "the lookup key moved");
    let old_price = client.get(&format!("/v1/prices/{old}"), &[]).await.unwrap();
    assert_eq!((old_price["active"].as_bool(), old_price["lookup_key"].as_str()), (Some(false), None));
    assert_eq!(count(&emu, "product"), 2, "the product is reused");

    let again = sync_stripe(&store, &client, &changed, &Actor::Cli).await.unwrap();
    assert!(!again.changed_provider(), "{again}");
}

#[tokio::test]
async fn entries_removed_from_the_file_are_deactivated_at_stripe() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let db = TestDb::new().await;
    let store = db.store().await;
    sync_stripe(&store, &client, &Catalog::parse(CATALOG).unwrap(), &Actor::Cli).await.unwrap();
    let pack_price = store.current_catalog_link("stripe", "price", "pack_5").await.unwrap().unwrap();
    let pack = store.current_catalog_link("stripe", "product", "pack").await.unwrap().unwrap();

    let cut = CATALOG.find("[prices.pro_monthly]").unwrap();
    let without_pack = CATALOG[..cut]
        .replace("[products.pack]\nname = \"Card pack\"\ncredits = { cards = 5 }\n", "")
        + &CATALOG[cut..CATALOG.find("[prices.pack_5]").unwrap()];
    let report =
        sync_stripe(&store, &client, &Catalog::parse(&without_pack).unwrap(), &Actor::Cli).await.unwrap();
    assert_eq!((report.created.len(), report.deactivated.len()), (0, 2), "{report}");
    for id in [&pack_price, &pack] {
        let path = if id.starts_with("price_") { "prices" } else { "products" };
        let object = client.get(&format!("/v1/{path}/{id}"), &[]).await.unwrap();
        assert_eq!(object["active"], false, "{object}");
    }
    let again =
        sync_stripe(&store, &client, &Catalog::parse(&without_pack).unwrap(), &Actor::Cli).await.unwrap();
    assert!(!again.changed_provider(), "{again}");
}

#[tokio::test]
async fn a_sync_that_stopped_half_way_finds_what_it_created() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let db = TestDb::new().await;
    let store = db.store().await;
    // What a run that crashed after Stripe answered, before tollgate
    // recorded anything, leaves behind.
    let product = client
        .post(
            "/v1/products",
            &Form::new()
                .set("name", "Pro")
                .set("description", "For teams.")
                .metadata([("tollgate_product", "pro")]),
            None,
        )
        .await
        .unwrap();
    let price = client
        .post(
            "/v1/prices",
            &Form::new()
                .set("product", product["id"].as_str().unwrap())
                .set("currency", "usd")
                .set("unit_amount", 2900)
                .set("recurring[interval]", "month")
                .metadata([("tollgate_price", "pro_monthly")]),
            None,
        )
        .await
        .unwrap();

    let report = sync_stripe(&store, &client, &Catalog::parse(CATALOG).unwrap(), &Actor::Cli).await.unwrap();
    assert_eq!(report.created.len(), 3, "only what was missing: {report}");
    assert_eq!((count(&emu, "product"), count(&emu, "price")), (2, 3));
    assert_eq!(
        store.current_catalog_link("stripe", "product", "pro").await.unwrap().as_deref(),
        product["id"].as_str()
    );
    assert_eq!(
        store.current_catalog_link("stripe", "price", "pro_monthly").await.unwrap().as_deref(),
        price["id"].as_str()
    );
}

#[tokio::test]
async fn declared_stripe_ids_are_checked_not_created_and_a_mismatch_names_the_entry() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let db = TestDb::new().await;
    let store = db.store().await;
    let product = client.post("/v1/products", &Form::new().set("name", "Legacy Pro"), None).await.unwrap();
    let product = product["id"].as_str().unwrap().to_owned();
    let price = client
        .post(
            "/v1/prices",
            &Form::new()
                .set("product", &product)
                .set("currency", "usd")
                .set("unit_amount", 2900)
                .set("recurring[interval]", "month"),
            None,
        )
        .await
        .unwrap();
    let price = price["id"].as_str().unwrap().to_owned();
    let declared = format!(
        "[products.pro]\nname = \"Pro\"\nstripe_product = \"{product}\"\n\
         [prices.pro_monthly]\nproduct = \"pro\"\ncurrency = \"usd\"\namount = 2900\ninterval = \"month\"\nstripe_price = \"{price}\"\n"
    );
    let report =
        sync_stripe(&store, &client, &Catalog::parse(&declared).unwrap(), &Actor::Cli).await.unwrap();
    assert_eq!(report.checked.len(), 2, "{report}");
    assert!(!report.changed_provider(), "{report}");
    assert_eq!((count(&emu, "product"), count(&emu, "price")), (1, 1));

    let wrong = declared
        .replace("amount = 2900", "amount = 3100")
        .replace("interval = \"month\"", "interval = \"year\"");
    let err = sync_stripe(&store, &client, &Catalog::parse(&wrong).unwrap(), &Actor::Cli).await.unwrap_err();
    let CatalogSyncError::Mismatch(problems) = err else { panic!("{err}") };
    assert_eq!(problems.len(), 1, "{problems:?}");
    assert!(problems[0].starts_with("price pro_monthly: stripe_price"), "{problems:?}");
    assert!(
        problems[0].contains("amount is 2900 at Stripe, 3100") && problems[0].contains("every year"),
        "{problems:?}"
    );

    let missing = declared.replace(&product, "prod_missing");
    let err =
        sync_stripe(&store, &client, &Catalog::parse(&missing).unwrap(), &Actor::Cli).await.unwrap_err();
    assert!(err.to_string().contains("product pro: stripe_product \"prod_missing\" does not exist"), "{err}");
    assert_eq!((count(&emu, "product"), count(&emu, "price")), (1, 1), "nothing was created");
}

#[tokio::test]
async fn stripe_setup_is_idempotent_and_its_stored_secret_verifies_deliveries() {
    let emu = start_emulator().await;
    let client = client(&emu);
    let db = TestDb::new().await;
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let url = webhook_url(&format!("http://127.0.0.1:{port}"));

    let store = db.store().await;
    let first = setup_stripe(&store, &client, &url, &Actor::Cli).await.unwrap();
    assert_eq!((first.action, first.secret_stored), (SetupAction::Created, true));
    let second = setup_stripe(&store, &client, &url, &Actor::Cli).await.unwrap();
    assert_eq!(
        (second.action, second.endpoint_id.as_str()),
        (SetupAction::Unchanged, first.endpoint_id.as_str())
    );
    let endpoints = client.list_all("/v1/webhook_endpoints", &[]).await.unwrap();
    assert_eq!(endpoints.len(), 1, "not duplicated");
    let events: Vec<&str> =
        endpoints[0]["enabled_events"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    assert!(events.contains(&"invoice.paid") && events.contains(&"charge.dispute.created"));
    assert_eq!(events.len(), tollgate::webhooks::apply::STRIPE_HANDLED.len());

    // Someone narrows the events in the dashboard: setup puts them back.
    client
        .post(
            &format!("/v1/webhook_endpoints/{}", first.endpoint_id),
            &Form::new().list("enabled_events", ["invoice.paid"]),
            None,
        )
        .await
        .unwrap();
    let third = setup_stripe(&store, &client, &url, &Actor::Cli).await.unwrap();
    assert_eq!(third.action, SetupAction::Updated);
    store.close().await;

    // tollgate starts with no STRIPE_WEBHOOK_SECRET and verifies with the stored one.
    let mut config = test_config(&db);
    config.port = port;
    config.stripe_secret_key = Some(SecretString::from(KEY.to_owned()));
    config.stripe_api_base = Some(emu.base.clone());
    config.reconcile_interval_seconds = 0;
    let shutdown = CancellationToken::new();
    let server =
        tollgate::app::Server::build(config, shutdown.clone()).await.expect("starts with the stored secret");
    let server_store = server.store().clone();
    let _guard = shutdown.clone().drop_guard();
    tokio::spawn(server.serve(listener));

    client.post("/v1/customers", &Form::new().set("email", "hook@example.com"), None).await.unwrap();
    let event = eventually(Duration::from_secs(10), || async {
        let listed = server_store.list_provider_events(&tollgate::store::Page::first(10), None).await.ok()?;
        listed.data.into_iter().find(|e| e.event_type == "customer.created")
    })
    .await;
    assert_eq!(event.source, "webhook", "delivered by the emulator, verified with the stored secret");
}

fn tollgate_cli(db: &TestDb, emu: &Emu, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("TOLLGATE_CATALOG", manifest_path("tollgate.toml"))
        .env("STRIPE_SECRET_KEY", KEY)
        .env("STRIPE_API_BASE", &emu.base)
        .env("PUBLIC_URL", "https://billing.example.com")
        .env("LOG_LEVEL", "warn")
        .args(args)
        .output()
        .expect("run tollgate")
}

#[tokio::test(flavor = "multi_thread")]
async fn the_commands_as_an_operator_runs_them() {
    let emu = start_emulator().await;
    let db = TestDb::new().await;
    let run = |args: &[&str]| {
        let out = tokio::task::block_in_place(|| tollgate_cli(&db, &emu, args));
        let text =
            format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
        assert!(out.status.success(), "{args:?}: {text}");
        text
    };
    let first = run(&["catalog", "sync"]);
    assert!(first.contains("catalog sync: 7 created, 0 updated, 0 deactivated"), "{first}");
    let second = run(&["catalog", "sync"]);
    assert!(second.contains("catalog sync: 0 created, 0 updated, 0 deactivated"), "{second}");
    assert_eq!((count(&emu, "product"), count(&emu, "price")), (3, 4));

    let setup = run(&["stripe", "setup"]);
    assert!(
        setup.contains("registered: we_") && setup.contains("https://billing.example.com/webhooks/stripe")
    );
    assert!(setup.contains("STRIPE_WEBHOOK_SECRET"), "tells the operator how to use the environment instead");
    let secret = emu.emulator.lock().all("webhook_endpoint")[0]["secret"].as_str().unwrap().to_owned();
    assert!(!setup.contains(&secret) && !setup.contains("whsec_"), "the secret is never printed: {setup}");
    let again = run(&["stripe", "setup"]);
    assert!(again.contains("already registered"), "{again}");
    assert_eq!(count(&emu, "webhook_endpoint"), 1);
}

#[tokio::test]
async fn production_starts_on_a_stored_webhook_secret_and_is_refused_without_any() {
    let db = TestDb::new().await;
    let production = || {
        let mut config = test_config(&db);
        config.environment = tollgate::config::Environment::Production;
        config.stripe_secret_key = Some(SecretString::from("sk_live_abc".to_owned()));
        config.secret_key = Some(SecretString::from("q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sA".to_owned()));
        config.allow_sqlite_in_production = true;
        config.reconcile_interval_seconds = 0;
        config
    };
    let refused = tollgate::app::Server::build(production(), CancellationToken::new()).await.err();
    assert!(
        refused.as_ref().is_some_and(|e| e.to_string().contains("STRIPE_WEBHOOK_SECRET is missing")),
        "{refused:?}"
    );

    let store = db.store().await;
    let secret = SecretString::from("whsec_stored_by_setup".to_owned());
    store
        .save_provider_webhook_endpoint(
            "stripe",
            "we_1",
            "https://x.example/webhooks/stripe",
            &secret,
            &Actor::Cli,
        )
        .await
        .unwrap();
    let shutdown = CancellationToken::new();
    let server = tollgate::app::Server::build(production(), shutdown.clone()).await;
    assert!(server.is_ok(), "a stored secret is enough: {:?}", server.err());
    shutdown.cancel();
    let audit = store.list_audit_entries(&tollgate::store::Page::first(100)).await.unwrap();
    let text = format!("{audit:?}");
    assert!(text.contains("provider.webhook_endpoint.registered") && !text.contains("whsec_stored_by_setup"));
}
