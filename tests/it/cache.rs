//! The in-memory caches of entitlements and API keys: served from memory,
//! and never stale once a write has returned — on the instance that wrote
//! and, on PostgreSQL, on every other instance sharing the database.

use std::time::Duration;

use serde_json::{json, Value};

use crate::billing_events::{buy, emulator_price, entitlements_of, link_catalog, wait_entitlements};
use crate::helpers::*;

/// A customer of `app` holding ten `cards` credits, bought on the
/// emulator; returns the emulator's customer id.
async fn customer_with_cards(app: &TestApp, external: &str) -> String {
    let pack = emulator_price(app, "Card pack", "500", None).await;
    link_catalog(app, &[("card_pack_5", &pack)]).await;
    app.upsert_customer(external, json!({})).await;
    let customer = emulator(app, "/v1/customers", &[("metadata[tollgate_external_id]", external)]).await;
    buy(app, customer["id"].as_str().unwrap(), &pack, "4242424242424242").await;
    wait_entitlements(app, external, |e| e["balances"]["cards"] == 10).await;
    customer["id"].as_str().unwrap().to_owned()
}

async fn debit(app: &TestApp, external: &str, amount: i64) -> Value {
    let resp = app
        .client
        .post(app.url(&format!("/v1/customers/{external}/balances/cards/debit")))
        .bearer_auth(&app.write_key)
        .json(&json!({ "amount": amount }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "debit");
    resp.json().await.unwrap()
}

async fn check(app: &TestApp, external: &str, feature: &str) -> Value {
    app.get(&format!("/v1/customers/{external}/entitlements/{feature}"), &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap()
}

/// Waits until a check on `app` is answered from memory (a fill can lose to
/// an invalidation racing it, so one read is not always enough).
async fn wait_hit(app: &TestApp, external: &str, feature: &str) -> Value {
    eventually(Duration::from_secs(10), || async {
        let hits = app.server_store.cache().stats().hits;
        let found = check(app, external, feature).await;
        (app.server_store.cache().stats().hits > hits).then_some(found)
    })
    .await
}

/// Waits until the instance's cache may serve (its listener or poller runs).
async fn wait_serving(app: &TestApp) {
    eventually(Duration::from_secs(10), || async { app.server_store.cache().stats().serving.then_some(()) })
        .await;
}

#[tokio::test]
async fn a_check_is_answered_from_memory_and_is_fresh_as_soon_as_a_debit_returns() {
    let app = spawn_app_with(unlimited).await;
    customer_with_cards(&app, "u_cache").await;
    wait_serving(&app).await;

    let cached = wait_hit(&app, "u_cache", "cards").await;
    assert_eq!(cached["balance"].as_i64(), Some(10));

    for left in (5..10).rev() {
        let debited = debit(&app, "u_cache", 1).await;
        assert_eq!(debited["balances"]["cards"], left);
        // No wait: the cached entry was dropped before the debit returned.
        let now = check(&app, "u_cache", "cards").await;
        assert_eq!(now["balance"], left, "fresh right after the debit: {now}");
        assert_eq!(now["version"], debited["version"]);
        assert_eq!(entitlements_of(&app, "u_cache").await["balances"]["cards"], left);
    }
}

#[tokio::test]
async fn a_revoked_api_key_is_refused_at_once_and_when_another_process_revokes_it() {
    let app = spawn_app_with(unlimited).await;
    app.upsert_customer("u_keys", json!({})).await;
    wait_serving(&app).await;
    let key = create_key(&app.server_store, tollgate::auth::Scope::Read).await;
    let get = || app.get("/v1/customers/u_keys/entitlements", &key).send();
    // Two hits per request (key and entitlements) once both are cached.
    eventually(Duration::from_secs(10), || async {
        let hits = app.server_store.cache().stats().hits;
        assert_eq!(get().await.unwrap().status(), 200);
        (app.server_store.cache().stats().hits >= hits + 2).then_some(())
    })
    .await;

    // Revoked by the serving process: refused on the next request.
    let id = app.server_store.list_api_keys().await.unwrap().into_iter().last().unwrap().id;
    assert!(app.server_store.revoke_api_key(&id, &tollgate::store::audit::Actor::Cli).await.unwrap());
    assert_eq!(get().await.unwrap().status(), 401, "refused at once after revocation");

    // Revoked by another process (the CLI, with its own connection): the
    // database tells the server (a notification, or SQLite's data_version).
    let other = create_key(&app.server_store, tollgate::auth::Scope::Read).await;
    let get_other = || app.get("/v1/customers/u_keys/entitlements", &other).send();
    assert_eq!(get_other().await.unwrap().status(), 200);
    assert_eq!(get_other().await.unwrap().status(), 200);
    let cli = app.db.store().await;
    let id = cli.list_api_keys().await.unwrap().into_iter().last().unwrap().id;
    assert!(cli.revoke_api_key(&id, &tollgate::store::audit::Actor::Cli).await.unwrap());
    eventually(Duration::from_secs(5), || async {
        (get_other().await.unwrap().status() == 401).then_some(())
    })
    .await;
    cli.close().await;
}

/// The server's own writes are invalidated key by key and never clear the
/// whole cache: on SQLite, changes are polled for on the writer's own
/// connection, whose `data_version` only other processes' commits move
/// (polled on another connection, every write of the server's emptied the
/// cache at the next poll, so under write load checks went to the database).
#[tokio::test]
async fn the_servers_own_writes_never_clear_the_cache() {
    let app = spawn_app_with(unlimited).await;
    wait_serving(&app).await;
    let stats = || app.server_store.cache().stats();
    // The first poll clears what start-up may have cached.
    eventually(Duration::from_secs(10), || async { (stats().polls >= 2).then_some(()) }).await;
    let before = stats();
    let written = std::sync::atomic::AtomicUsize::new(0);
    // Writes between polls, until three more polls have looked.
    eventually(Duration::from_secs(10), || async {
        let n = written.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        app.upsert_customer(&format!("u_own_{n}"), json!({})).await;
        (stats().polls >= before.polls + 3).then_some(())
    })
    .await;
    assert!(written.into_inner() >= 2, "written between polls");
    assert_eq!(stats().resets, before.resets, "{:?}", stats());
}

#[tokio::test]
async fn a_customer_unknown_at_first_is_found_once_created() {
    let app = spawn_app_with(unlimited).await;
    wait_serving(&app).await;
    let resp = app.get("/v1/customers/u_later/entitlements", &app.read_key).send().await.unwrap();
    expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    app.upsert_customer("u_later", json!({})).await;
    let e = entitlements_of(&app, "u_later").await;
    assert_eq!((e["customer"].as_str(), e["version"].as_i64()), (Some("u_later"), Some(0)));
}

/// Two instances on one PostgreSQL database: B caches, A writes, and B's
/// next read is fresh the moment A's write has returned. Then B's listener
/// is cut: B reads from the database (still fresh) until it has
/// resubscribed, and serves from memory again afterwards.
#[tokio::test]
async fn a_second_instance_never_serves_entitlements_older_than_a_returned_write() {
    let db = TestDb::new().await;
    if !db.is_postgres() {
        eprintln!("skipped: two instances share a database only on PostgreSQL (set TEST_DATABASE_URL)");
        return;
    }
    let admin = db.store().await;
    let shared = db.another_handle();
    let a = spawn_on(db, unlimited).await;
    // One deployment, one Stripe: B's inbox worker applies A's emulator's
    // events too, and reads what they leave out (a checkout's line items)
    // from the same emulator, not from an emulator of its own that never
    // saw the checkout.
    let stripe_of_a = format!("{}/emulator/stripe", a.base);
    let b = spawn_on(shared, |c| {
        unlimited(c);
        c.stripe_secret_key = Some(secrecy::SecretString::from("sk_test_tollgate_emulator".to_owned()));
        c.stripe_api_base = Some(stripe_of_a);
    })
    .await;
    let provider_customer = customer_with_cards(&a, "u_two").await;
    wait_serving(&a).await;
    wait_serving(&b).await;

    // B caches the customer's entitlements (a hit on the second read).
    assert_eq!(wait_hit(&b, "u_two", "cards").await["balance"], 10, "B answers from memory");

    // Debits on A; B is read the instant each returns, never stale.
    for left in (6..10).rev() {
        let debited = debit(&a, "u_two", 1).await;
        let on_b = check(&b, "u_two", "cards").await;
        assert_eq!(on_b["balance"], left, "B is fresh once A's debit returned: {on_b}");
        assert_eq!(on_b["version"], debited["version"]);
        // And B caches the new value again.
        assert_eq!(wait_hit(&b, "u_two", "cards").await["balance"], left);
    }

    // A grant applied by A's inbox worker reaches B's cache too (B had
    // the old value cached; only the notification can drop it).
    let pack = emulator_price(&a, "Another pack", "500", None).await;
    link_catalog(&a, &[("card_pack_5", &pack)]).await;
    buy(&a, &provider_customer, &pack, "4242424242424242").await;
    // A first (the purchase may be slow under load: that is not what this
    // test is about), then B, which must follow within the acknowledgement
    // window: a B that missed the invalidation would stay stale for good
    // while it keeps hearing its own pings.
    let on_a = wait_entitlements(&a, "u_two", |e| e["balances"]["cards"] == 16).await;
    let stats = b.server_store.cache().stats();
    let followed = eventually_or(Duration::from_secs(5), || async {
        let on_b = entitlements_of(&b, "u_two").await;
        (on_b["balances"]["cards"] == 16).then_some(on_b)
    })
    .await;
    assert!(
        followed.is_some(),
        "B still serves {} five seconds after A served {on_a}; B's cache before: {stats:?}, now: {:?}",
        entitlements_of(&b, "u_two").await,
        b.server_store.cache().stats()
    );

    // A key revoked through A is refused by B at once.
    let key = create_key(&a.server_store, tollgate::auth::Scope::Read).await;
    let on_b = |key: String| {
        let b = &b;
        async move { b.get("/v1/customers/u_two/entitlements", &key).send().await.unwrap().status() }
    };
    assert_eq!(on_b(key.clone()).await, 200);
    assert_eq!(on_b(key.clone()).await, 200);
    let id = a.server_store.list_api_keys().await.unwrap().into_iter().last().unwrap().id;
    assert!(a.server_store.revoke_api_key(&id, &tollgate::store::audit::Actor::Cli).await.unwrap());
    assert_eq!(on_b(key).await, 401, "B refuses a key the moment A's revocation returned");

    // Cut B's listener: B stops serving from memory and reads the database.
    let name = b.server_store.cache().listener_name();
    admin
        .execute_raw(&format!(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = '{name}'"
        ))
        .await
        .unwrap();
    let bypassed = eventually(Duration::from_secs(10), || async {
        let before = b.server_store.cache().stats();
        let e = check(&b, "u_two", "cards").await;
        let after = b.server_store.cache().stats();
        // A bypassed read: counted as such, and no hit.
        (after.bypassed > before.bypassed && after.hits == before.hits).then_some(e)
    })
    .await;
    assert_eq!(bypassed["balance"], 16);
    let debited = debit(&a, "u_two", 2).await;
    assert_eq!(check(&b, "u_two", "cards").await["balance"], 14, "fresh while bypassing");
    assert_eq!(debited["balances"]["cards"], 14);

    // B resubscribes (and clears what it may have missed), then serves
    // from memory again, still fresh.
    eventually(Duration::from_secs(10), || async {
        let s = b.server_store.cache().stats();
        (s.listener_up && s.serving).then_some(())
    })
    .await;
    assert_eq!(wait_hit(&b, "u_two", "cards").await["balance"], 14, "B serves from memory again");
    let debited = debit(&a, "u_two", 1).await;
    let on_b = check(&b, "u_two", "cards").await;
    assert_eq!((on_b["balance"].as_i64(), &on_b["version"]), (Some(13), &debited["version"]));
    admin.close().await;
}

/// A peer listed as listening that never pings (its host vanished without a
/// TCP reset, so PostgreSQL still lists its connection) holds no lease:
/// once this instance has listened long enough to know it, writes stop
/// waiting for it.
#[tokio::test]
async fn a_listed_peer_that_never_pings_does_not_slow_writes() {
    let db = TestDb::new().await;
    if !db.is_postgres() {
        return;
    }
    // The ghost: a connection named like a cache listener, doing nothing.
    let ghost_url = format!(
        "{}{}application_name=tollgate-cache:ghost",
        db.url,
        if db.url.contains('?') { "&" } else { "?" }
    );
    let ghost = sqlx::PgPool::connect(&ghost_url).await.unwrap();
    sqlx::query("SELECT 1").execute(&ghost).await.unwrap();
    let app = spawn_on(db, |c| {
        c.rate_limit_per_ip = 0;
        c.rate_limit_per_key = 0;
    })
    .await;
    wait_serving(&app).await;
    customer_with_cards(&app, "u_ghost").await;
    // Every write waits for the ghost until this instance has heard two
    // leases' worth of pings without one from it; then none does.
    eventually(Duration::from_secs(20), || async {
        let before = app.server_store.cache().stats().ack_timeouts;
        debit(&app, "u_ghost", 1).await;
        (app.server_store.cache().stats().ack_timeouts == before).then_some(())
    })
    .await;
    let before = app.server_store.cache().stats().ack_timeouts;
    for _ in 0..3 {
        debit(&app, "u_ghost", 1).await;
    }
    assert_eq!(app.server_store.cache().stats().ack_timeouts, before, "the ghost is not waited for");
    ghost.close().await;
}
