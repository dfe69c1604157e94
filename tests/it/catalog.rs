//! `/v1/products` and `/v1/prices`, mirrored from tollgate.toml.

use crate::helpers::*;

#[tokio::test]
async fn products_and_prices_come_from_the_catalog_file() {
    let app = spawn_app().await;
    let v: serde_json::Value =
        app.get("/v1/products?limit=100", &app.read_key).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["card_pack", "pro", "starter"]);
    let pro = &v["data"][1];
    assert_eq!(pro["object"], "product");
    assert_eq!(pro["grants"]["limits"]["projects"], 50);
    assert!(pro["grants"]["features"].as_array().unwrap().contains(&"exports".into()));
    let cards = &v["data"][0];
    assert_eq!(cards["grants"]["credits"]["cards"], 5);

    let v: serde_json::Value =
        app.get("/v1/prices?product=pro", &app.read_key).send().await.unwrap().json().await.unwrap();
    let prices = v["data"].as_array().unwrap();
    assert_eq!(prices.len(), 2);
    let monthly = prices.iter().find(|p| p["id"] == "pro_monthly").unwrap();
    assert_eq!(monthly["unit_amount"], 2900);
    assert_eq!(monthly["currency"], "usd");
    assert_eq!(monthly["type"], "recurring");
    assert_eq!(monthly["recurring"]["interval"], "month");
    assert_eq!(monthly["trial_days"], 14);

    let v: serde_json::Value =
        app.get("/v1/prices?type=one_time", &app.read_key).send().await.unwrap().json().await.unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["card_pack_5"]);

    let resp = app.get("/v1/prices?type=weekly", &app.read_key).send().await.unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "type");
}

#[tokio::test]
async fn catalog_lists_page_by_key() {
    let app = spawn_app().await;
    let v: serde_json::Value =
        app.get("/v1/prices?limit=2", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["has_more"], true);
    let last = v["data"][1]["id"].as_str().unwrap().to_owned();
    let v: serde_json::Value = app
        .get(&format!("/v1/prices?limit=2&starting_after={last}"), &app.read_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let ids: Vec<&str> = v["data"].as_array().unwrap().iter().map(|p| p["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["pro_yearly", "starter_monthly"]);
    assert_eq!(v["has_more"], false);
}

#[tokio::test]
async fn a_changed_catalog_file_updates_and_deactivates_on_restart() {
    let db = TestDb::new().await;
    {
        let mut app = spawn_on(db, |_| {}).await;
        app.stop().await;
        let db = std::mem::replace(&mut app.db, TestDb::new().await);
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.toml");
        std::fs::write(
            &path,
            r#"
            [products.pro]
            name = "Pro (renamed)"
            features = ["exports"]
            [prices.pro_monthly]
            product = "pro"
            currency = "usd"
            amount = 3900
            interval = "month"
            stripe_price = "price_existing123"
            "#,
        )
        .unwrap();
        let app = spawn_on(db, |c| c.catalog_path = path.clone()).await;
        let v: serde_json::Value =
            app.get("/v1/products?limit=100", &app.read_key).send().await.unwrap().json().await.unwrap();
        let by_id = |id: &str| v["data"].as_array().unwrap().iter().find(|p| p["id"] == id).unwrap().clone();
        assert_eq!(by_id("pro")["name"], "Pro (renamed)");
        assert_eq!(by_id("pro")["active"], true);
        assert_eq!(by_id("starter")["active"], false, "dropped from the file: deactivated, not deleted");
        let v: serde_json::Value =
            app.get("/v1/prices?active=true", &app.read_key).send().await.unwrap().json().await.unwrap();
        assert_eq!(v["data"].as_array().unwrap().len(), 1);
        assert_eq!(v["data"][0]["unit_amount"], 3900);
        assert_eq!(v["data"][0]["provider_ids"]["stripe"], "price_existing123");
    }
}
