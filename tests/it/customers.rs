//! `/v1/customers`: upsert, retrieve, list with cursors.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn upsert_creates_then_updates_only_what_is_given() {
    let app = spawn_app().await;
    let resp = app
        .put_json(
            "/v1/customers/user_42",
            &app.write_key,
            json!({ "email": "ada@example.com", "name": "Ada", "metadata": { "plan": "trial" } }),
        )
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    let created: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(created["object"], "customer");
    assert_eq!(created["external_id"], "user_42");
    assert!(created["id"].as_str().unwrap().starts_with("cust_"));
    assert_eq!(created["metadata"]["plan"], "trial");

    // Only the name changes; email and metadata stay.
    let resp = app
        .put_json("/v1/customers/user_42", &app.write_key, json!({ "name": "Ada Lovelace" }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let updated: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(updated["id"], created["id"]);
    assert_eq!(updated["name"], "Ada Lovelace");
    assert_eq!(updated["email"], "ada@example.com");
    assert_eq!(updated["metadata"]["plan"], "trial");

    // An explicit null clears.
    let cleared = app.upsert_customer("user_42", json!({ "email": null })).await;
    assert_eq!(cleared["email"], serde_json::Value::Null);
    assert_eq!(cleared["name"], "Ada Lovelace");

    let fetched: serde_json::Value =
        app.get("/v1/customers/user_42", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(fetched, cleared);
}

#[tokio::test]
async fn an_unknown_customer_is_404() {
    let app = spawn_app().await;
    let resp = app.get("/v1/customers/nobody", &app.read_key).send().await.unwrap();
    let e = expect_error(resp, 404, "invalid_request_error", "resource_missing").await;
    assert!(e["message"].as_str().unwrap().contains("nobody"));
}

#[tokio::test]
async fn invalid_fields_are_rejected_with_their_param() {
    let app = spawn_app().await;
    let cases = [
        (json!({ "email": "not-an-email" }), "email"),
        (json!({ "email": "a@b" }), "email"),
        (json!({ "name": "x".repeat(256) }), "name"),
        (json!({ "metadata": { "k".repeat(41): "v" } }), &*format!("metadata.{}", "k".repeat(41))),
        (json!({ "metadata": { "k": "v".repeat(501) } }), "metadata.k"),
    ];
    for (body, param) in cases {
        let resp = app.put_json("/v1/customers/c1", &app.write_key, body.clone()).send().await.unwrap();
        let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
        assert_eq!(e["param"], param, "{body}");
    }
    let too_many: serde_json::Map<String, serde_json::Value> =
        (0..51).map(|i| (format!("k{i}"), json!("v"))).collect();
    let resp = app
        .put_json("/v1/customers/c1", &app.write_key, json!({ "metadata": too_many }))
        .send()
        .await
        .unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "metadata");
    let resp = app.get("/v1/customers/c1", &app.read_key).send().await.unwrap();
    assert_eq!(resp.status(), 404, "nothing was created");
}

#[tokio::test]
async fn lists_page_newest_first_with_both_cursors() {
    let app = spawn_app().await;
    let mut ids = Vec::new();
    for i in 0..7 {
        let c = app.upsert_customer(&format!("u{i}"), json!({ "email": format!("u{i}@example.com") })).await;
        ids.push(c["id"].as_str().unwrap().to_owned());
    }
    ids.reverse(); // newest first

    let list = |query: String| {
        let req = app.get(&format!("/v1/customers?{query}"), &app.read_key);
        async move {
            let v: serde_json::Value = req.send().await.unwrap().json().await.unwrap();
            let got: Vec<String> =
                v["data"].as_array().unwrap().iter().map(|c| c["id"].as_str().unwrap().to_owned()).collect();
            (got, v["has_more"].as_bool().unwrap(), v)
        }
    };
    let (page1, more, raw) = list("limit=3".into()).await;
    assert_eq!(raw["object"], "list");
    assert_eq!(raw["url"], "/v1/customers");
    assert_eq!(page1, ids[0..3]);
    assert!(more);
    let (page2, more, _) = list(format!("limit=3&starting_after={}", page1[2])).await;
    assert_eq!(page2, ids[3..6]);
    assert!(more);
    let (page3, more, _) = list(format!("limit=3&starting_after={}", page2[2])).await;
    assert_eq!(page3, ids[6..7]);
    assert!(!more);
    // Walking back from the third page.
    let (back, more, _) = list(format!("limit=3&ending_before={}", page3[0])).await;
    assert_eq!(back, ids[3..6]);
    assert!(more);
    let (back, more, _) = list(format!("limit=3&ending_before={}", ids[2])).await;
    assert_eq!(back, ids[0..2]);
    assert!(!more);
    // Default limit and filtering.
    let (all, more, _) = list(String::new()).await;
    assert_eq!(all, ids);
    assert!(!more);
    let (one, _, _) = list("email=u3@example.com".into()).await;
    assert_eq!(one, vec![ids[3].clone()]);
}

#[tokio::test]
async fn list_parameters_are_validated() {
    let app = spawn_app().await;
    for (query, param) in [("limit=0", "limit"), ("limit=101", "limit"), ("limit=abc", "limit")] {
        let resp = app.get(&format!("/v1/customers?{query}"), &app.read_key).send().await.unwrap();
        let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
        assert_eq!(e["param"], param, "{query}");
    }
    let resp = app.get("/v1/customers?starting_after=a&ending_before=b", &app.read_key).send().await.unwrap();
    expect_error(resp, 400, "invalid_request_error", "parameters_exclusive").await;

    let resp = app.get("/v1/customers?limt=5", &app.read_key).send().await.unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_unknown").await;
    assert_eq!(e["param"], "limt");
    let resp = app.get("/v1/customers?email=a%00b", &app.read_key).send().await.unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "email");
    for param in ["starting_after", "ending_before"] {
        let resp =
            app.get(&format!("/v1/customers?{param}=cust_01NOSUCH"), &app.read_key).send().await.unwrap();
        let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
        assert_eq!(e["param"], param);
    }
    let resp = app.get("/v1/prices?product=%00", &app.read_key).send().await.unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "product");
}

#[tokio::test]
async fn concurrent_first_upserts_make_one_customer() {
    let app = spawn_app().await;
    let mut tasks = Vec::new();
    for i in 0..8 {
        let req = app.put_json("/v1/customers/racer", &app.write_key, json!({ "name": format!("n{i}") }));
        tasks.push(tokio::spawn(async move { req.send().await.unwrap().status().as_u16() }));
    }
    let mut statuses = Vec::new();
    for t in tasks {
        statuses.push(t.await.unwrap());
    }
    assert_eq!(statuses.iter().filter(|s| **s == 201).count(), 1, "{statuses:?}");
    assert!(statuses.iter().all(|s| *s == 200 || *s == 201), "{statuses:?}");
    let v: serde_json::Value =
        app.get("/v1/customers", &app.read_key).send().await.unwrap().json().await.unwrap();
    assert_eq!(v["data"].as_array().unwrap().len(), 1);
}
