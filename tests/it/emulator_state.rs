//! The built-in Stripe emulator keeps its state in a file, so a development
//! tollgate restarted on the same database still finds the provider objects
//! its database names; a state file that cannot be read stops start-up with
//! a message naming it.

use std::path::{Path, PathBuf};
use std::time::Duration;

use secrecy::SecretString;
use serde_json::{json, Value};
use tokio_util::sync::CancellationToken;
use tollgate::app::Server;
use tollgate::billing::catalog::Catalog;
use tollgate::providers::stripe::StripeClient;
use tollgate::providers::stripe_emulator::{DeliveryOptions, Emulator, EmulatorConfig};
use tollgate::store::audit::Actor;

use crate::helpers::*;

const DEADLINE: Duration = Duration::from_secs(20);

/// Where the state goes: beside a SQLite file by default; with PostgreSQL
/// only where configured (in `dir`).
fn state_file(db: &TestDb, dir: &Path) -> (PathBuf, Option<String>) {
    match db.sqlite_file() {
        Some(file) => (PathBuf::from(format!("{}.stripe-emulator.json", file.display())), None),
        None => {
            let path = dir.join("emulator.json");
            (path.clone(), Some(path.display().to_string()))
        }
    }
}

async fn checkout(app: &TestApp, customer: &str, quantity: u32) -> Value {
    let body = json!({
        "customer": customer, "mode": "payment",
        "line_items": [{ "price": "card_pack_5", "quantity": quantity }],
        "success_url": "https://shop.example/thanks", "cancel_url": "https://shop.example/cart",
    });
    let resp = app
        .client
        .post(app.url("/v1/checkout/sessions"))
        .bearer_auth(&app.write_key)
        .json(&body)
        .send()
        .await
        .unwrap();
    let status = resp.status();
    let session: Value = resp.json().await.unwrap();
    assert_eq!(status, 201, "{session}");
    session
}

async fn read(app: &TestApp, path: &str) -> Value {
    let resp = app.get(path, &app.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 200, "GET {path}");
    resp.json().await.unwrap()
}

async fn wait_until(app: &TestApp, path: &str, check: impl Fn(&Value) -> bool) -> Value {
    eventually(DEADLINE, || async {
        let v = read(app, path).await;
        check(&v).then_some(v)
    })
    .await
}

/// A customer created at the emulator with an `Idempotency-Key`: its id,
/// and whether the answer was a replay.
async fn idempotent_customer(app: &TestApp) -> (String, bool) {
    let resp = app
        .client
        .post(app.url("/emulator/stripe/v1/customers"))
        .bearer_auth("sk_test_local")
        .header("Idempotency-Key", "restart-proof")
        .form(&[("email", "grace@example.com")])
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let replayed = resp.headers().get("idempotent-replayed").is_some_and(|v| v == "true");
    let body: Value = resp.json().await.unwrap();
    (body["id"].as_str().unwrap().to_owned(), replayed)
}

#[tokio::test]
async fn after_a_restart_the_catalog_customers_and_orders_still_work_at_the_emulator() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let (path, setting) = state_file(&db, dir.path());
    let configure = move |c: &mut tollgate::Config| {
        unlimited(c);
        c.stripe_emulator_state = setting.clone();
    };
    let app = spawn_on(db, configure.clone()).await;

    let client =
        StripeClient::new(&app.url("/emulator/stripe"), SecretString::from("sk_test_local".to_owned()));
    let catalog = Catalog::load(&manifest_path("tollgate.toml")).unwrap();
    tollgate::ops::catalog_sync::sync_stripe(&app.server_store, &client, &catalog, &Actor::Cli)
        .await
        .unwrap();
    app.upsert_customer("u_ada", json!({ "email": "ada@example.com" })).await;
    let first = checkout(&app, "u_ada", 2).await;
    pay(&first, "4242424242424242").await;
    let first_order = first["order"].as_str().unwrap().to_owned();
    wait_until(&app, &format!("/v1/orders/{first_order}"), |o| o["status"] == "fulfilled").await;
    let (idempotent_id, replayed) = idempotent_customer(&app).await;
    assert!(!replayed, "the first request runs");
    let cus = read(&app, "/v1/customers/u_ada").await["providers"]["stripe"].as_str().unwrap().to_owned();
    let endpoint_secret = {
        let em = emulator_get(&app, "/v1/webhook_endpoints").await;
        assert_eq!(em["data"].as_array().unwrap().len(), 1, "{em}");
        em["data"][0]["id"].as_str().unwrap().to_owned()
    };

    let app = app.restart(configure).await;
    assert!(path.exists(), "the state was saved to {}", path.display());

    // The price tollgate's database maps still resolves at the emulator.
    let prices = read(&app, "/v1/prices?limit=100").await;
    let price = prices["data"].as_array().unwrap().iter().find(|p| p["id"] == "card_pack_5").unwrap().clone();
    let provider_price = price["provider_ids"]["stripe"].as_str().unwrap();
    let at_emulator = emulator_get(&app, &format!("/v1/prices/{provider_price}")).await;
    assert_eq!(at_emulator["id"], provider_price, "{at_emulator}");
    assert_eq!(at_emulator["unit_amount"], 500);
    // tollgate's own webhook endpoint was reused, moved to the new address.
    let endpoints = emulator_get(&app, "/v1/webhook_endpoints").await;
    let endpoints = endpoints["data"].as_array().unwrap();
    assert_eq!(endpoints.len(), 1, "no second endpoint: {endpoints:?}");
    assert_eq!(endpoints[0]["id"], endpoint_secret.as_str());
    assert_eq!(endpoints[0]["url"], format!("{}/webhooks/stripe", app.base));

    // A second checkout for the same customer works end to end: the
    // provider customer is the same and the webhooks still verify.
    let second = checkout(&app, "u_ada", 1).await;
    pay(&second, "4242424242424242").await;
    let second_order = second["order"].as_str().unwrap().to_owned();
    let order = wait_until(&app, &format!("/v1/orders/{second_order}"), |o| o["status"] == "fulfilled").await;
    assert_eq!(order["amount_total"], 500);
    assert_eq!(read(&app, "/v1/customers/u_ada").await["providers"]["stripe"], cus.as_str());
    wait_until(&app, "/v1/customers/u_ada/entitlements", |e| e["balances"]["cards"] == 15).await;
    let first = read(&app, &format!("/v1/orders/{first_order}")).await;
    assert_eq!((first["status"].as_str(), first["amount_total"].as_i64()), (Some("fulfilled"), Some(1000)));
    let customers = emulator_get(&app, "/v1/customers?limit=100").await;
    let with_ada: Vec<&Value> = customers["data"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["metadata"]["tollgate_external_id"] == "u_ada")
        .collect();
    assert_eq!(with_ada.len(), 1, "one provider customer for u_ada: {customers}");

    // An Idempotency-Key used before the restart replays its answer.
    let (again, replayed) = idempotent_customer(&app).await;
    assert_eq!(again, idempotent_id);
    assert!(replayed, "answered from the saved idempotency record");
}

#[tokio::test]
async fn an_unreadable_state_file_stops_start_up_naming_the_file_and_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let db = TestDb::new().await;
    let path = dir.path().join("emulator.json");
    for (content, says) in [
        ("{\"version\": 1, \"objects\": {\"cus_1\": tru", "not valid JSON"),
        ("not json at all", "not valid JSON"),
        ("\"a string\"", "not an emulator state file"),
        ("{\"objects\": {}}", "no `version` field"),
        ("{\"version\": 99}", "format version 99"),
        ("{\"version\": 1, \"objects\": 5}", "damaged"),
    ] {
        std::fs::write(&path, content).unwrap();
        let mut config = test_config(&db);
        config.stripe_emulator_state = Some(path.display().to_string());
        let err = match Server::build(config, CancellationToken::new()).await {
            Ok(_) => panic!("started on a corrupt state file ({content})"),
            Err(e) => e.to_string(),
        };
        assert!(err.contains(&path.display().to_string()), "names the file: {err}");
        assert!(err.contains(says), "says what is wrong ({says}): {err}");
        assert!(err.contains("Delete the file"), "says how to reset: {err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), content, "the file is left for the operator");
    }
}

#[tokio::test]
async fn state_none_keeps_the_emulator_in_memory() {
    let db = TestDb::new().await;
    let file = db.sqlite_file();
    let app = spawn_on(db, |c| c.stripe_emulator_state = Some("none".to_owned())).await;
    emulator(&app, "/v1/customers", &[("email", "a@example.com")]).await;
    let app = app.restart(|c| c.stripe_emulator_state = Some("none".to_owned())).await;
    let customers = emulator_get(&app, "/v1/customers").await;
    assert_eq!(customers["data"].as_array().unwrap().len(), 0, "{customers}");
    if let Some(file) = file {
        let beside = PathBuf::from(format!("{}.stripe-emulator.json", file.display()));
        assert!(!beside.exists(), "no state file with STRIPE_EMULATOR_STATE=none");
    }
}

async fn post_form(client: &reqwest::Client, url: String, form: &[(&str, &str)]) -> Value {
    let resp = client.post(&url).bearer_auth("sk_test_x").form(form).send().await.unwrap();
    assert_eq!(resp.status(), 200, "{url}");
    resp.json().await.unwrap()
}

/// A standalone emulator on a state file, serving until `shutdown`.
async fn start_standalone(
    path: &Path,
) -> (String, Emulator, CancellationToken, tokio::task::JoinHandle<std::io::Result<()>>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let config = EmulatorConfig {
        public_url: base.clone(),
        api_key: None,
        // A failed delivery is retried only after the test is over.
        delivery: DeliveryOptions { first_retry: Duration::from_secs(600), ..DeliveryOptions::default() },
    };
    let emulator = Emulator::open(config, Some(path.to_owned())).unwrap();
    let shutdown = CancellationToken::new();
    let handle = tokio::spawn(emulator.clone().serve(listener, shutdown.clone()));
    (base, emulator, shutdown, handle)
}

/// The standalone emulator with a state file: objects survive, and a
/// webhook delivery still owed at shutdown (the receiver was failing) is
/// delivered after the restart, as Stripe keeps retrying.
#[tokio::test]
async fn the_standalone_emulator_keeps_objects_and_owed_deliveries_across_a_restart() {
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex};

    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("state.json");
    // The receiver fails until told to recover; it records every attempt.
    let healthy = Arc::new(AtomicBool::new(false));
    let attempts = Arc::new(Mutex::new(Vec::<(bool, Value)>::new()));
    let receiver = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let hook = format!("http://{}/hook", receiver.local_addr().unwrap());
    let (h, a) = (healthy.clone(), attempts.clone());
    let router = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::Json<Value>| async move {
            let ok = h.load(Ordering::SeqCst);
            a.lock().unwrap().push((ok, body.0));
            if ok {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::INTERNAL_SERVER_ERROR
            }
        }),
    );
    tokio::spawn(async move { axum::serve(receiver, router).await });

    let client = reqwest::Client::new();
    let (base, em, shutdown, handle) = start_standalone(&path).await;
    post_form(
        &client,
        format!("{base}/v1/webhook_endpoints"),
        &[("url", hook.as_str()), ("enabled_events[]", "customer.created")],
    )
    .await;
    let customer = post_form(&client, format!("{base}/v1/customers"), &[("email", "b@example.com")]).await;
    // The first attempt failed; the retry is far away.
    eventually(DEADLINE, || async {
        let state = em.lock();
        (attempts.lock().unwrap().len() == 1 && state.deliveries.len() == 1 && state.in_flight.is_empty())
            .then_some(())
    })
    .await;
    shutdown.cancel();
    handle.await.unwrap().unwrap();
    drop(em);

    healthy.store(true, Ordering::SeqCst);
    let (base, _em, shutdown, handle) = start_standalone(&path).await;
    let resp = client
        .get(format!("{base}/v1/customers/{}", customer["id"].as_str().unwrap()))
        .bearer_auth("sk_test_x")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    assert_eq!(resp.json::<Value>().await.unwrap()["email"], "b@example.com");
    let delivered = eventually(DEADLINE, || async {
        attempts.lock().unwrap().iter().find(|(ok, _)| *ok).map(|(_, event)| event.clone())
    })
    .await;
    let first_attempt = attempts.lock().unwrap()[0].1.clone();
    assert_eq!(delivered["id"], first_attempt["id"], "the same event, retried");
    assert_eq!(delivered["type"], "customer.created");
    assert_eq!(delivered["data"]["object"]["id"], customer["id"]);
    shutdown.cancel();
    handle.await.unwrap().unwrap();
}
