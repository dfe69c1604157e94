//! The store API, directly, on whichever backend the run uses.

use crate::helpers::*;
use tollgate::billing::catalog::Catalog;
use tollgate::store::audit::Actor;
use tollgate::store::Page;

#[tokio::test]
async fn migrations_are_idempotent_and_current() {
    let db = TestDb::new().await;
    let store = db.store().await;
    store.migrate().await.unwrap();
    let status = store.schema_status().await.unwrap();
    assert!(status.is_current(), "{status:?}");
    store.ping().await.unwrap();
}

#[tokio::test]
async fn catalog_sync_is_idempotent() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let catalog = Catalog::load(&manifest_path("tollgate.toml")).unwrap();
    let first = store.sync_catalog(&catalog, &Actor::Cli).await.unwrap();
    assert_eq!(first.created.len(), catalog.products.len() + catalog.prices.len());
    let second = store.sync_catalog(&catalog, &Actor::Cli).await.unwrap();
    assert!(second.is_noop(), "{second:?}");
    let products = store.list_products(&Page::first(100), None).await.unwrap();
    assert_eq!(products.data.len(), catalog.products.len());
}

#[tokio::test]
async fn api_keys_are_stored_as_digests_and_revocable() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let key = tollgate::auth::generate_key(tollgate::auth::KeyMode::Test);
    let plaintext = tollgate::auth::reveal(&key).to_owned();
    let record = store
        .create_api_key("ci", tollgate::auth::Scope::Write, tollgate::auth::KeyMode::Test, &key, &Actor::Cli)
        .await
        .unwrap();
    let found = store.find_api_key_by_digest(&tollgate::auth::digest_key(&plaintext)).await.unwrap().unwrap();
    assert_eq!(found.id, record.id);
    // The plaintext is nowhere in the table.
    let stored = store.list_api_keys().await.unwrap();
    assert!(!serde_json::to_string(&stored).unwrap().contains(&plaintext[8..]));
    assert!(store.revoke_api_key(&record.id, &Actor::Cli).await.unwrap());
    assert!(!store.revoke_api_key(&record.id, &Actor::Cli).await.unwrap(), "already revoked");
    assert!(store.find_api_key_by_digest(&tollgate::auth::digest_key(&plaintext)).await.unwrap().is_none());
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
}

#[tokio::test]
async fn money_and_timestamps_are_integers_on_every_backend() {
    let db = TestDb::new().await;
    let store = db.store().await;
    let catalog = Catalog::parse(
        r#"
        [products.big]
        name = "Big"
        [prices.big_once]
        product = "big"
        currency = "jpy"
        amount = 999999999999
        "#,
    )
    .unwrap();
    store.sync_catalog(&catalog, &Actor::Cli).await.unwrap();
    let prices = store.list_prices(&Page::first(10), &Default::default()).await.unwrap();
    assert_eq!(prices.data[0].unit_amount, 999_999_999_999);
    assert!(prices.data[0].created_at > 1_700_000_000);
}

/// The claim walks waiting events oldest first, passes over one whose retry
/// is not due yet, and stops at its batch (it used to read and sort every
/// waiting event; now it follows `provider_events_waiting`).
#[tokio::test]
async fn the_inbox_claim_takes_due_events_oldest_first_up_to_its_batch() {
    use tollgate::store::provider_events::NewProviderEvent;
    let db = TestDb::new().await;
    let store = db.store().await;
    let now = tollgate::store::now_unix();
    // Inserted newest first, so insertion order is not what orders them.
    let events: Vec<NewProviderEvent> = (0..4)
        .rev()
        .map(|i| NewProviderEvent {
            provider: "stripe",
            provider_event_id: format!("evt_claim_{i}"),
            event_type: "customer.updated".into(),
            object_id: Some(format!("cus_claim_{i}")),
            provider_created: 1_000 + i,
            api_version: None,
            livemode: false,
            body: "{}".into(),
            source: "webhook",
            initial_status: "received",
            first_attempt_at: now,
        })
        .collect();
    store.insert_provider_events(&events).await.unwrap();
    let oldest = store.find_provider_event("stripe", "evt_claim_0").await.unwrap().unwrap();
    store.fail_provider_event(&oldest.id, "provider down", Some(now + 3_600)).await.unwrap();

    let claimed = store.claim_provider_events(2, 15).await.unwrap();
    let ids: Vec<&str> = claimed.iter().map(|e| e.provider_event_id.as_str()).collect();
    assert_eq!(ids, ["evt_claim_1", "evt_claim_2"], "due events, oldest first, no more than the batch");
}
