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
