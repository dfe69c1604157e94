//! The hash-chained audit log: every change recorded in its transaction,
//! tampering detected.

use crate::helpers::*;
use serde_json::json;

#[tokio::test]
async fn api_changes_are_audited_with_actor_and_request_id() {
    let app = spawn_app().await;
    let resp = app
        .put_json("/v1/customers/audited", &app.write_key, json!({ "name": "A" }))
        .header("x-request-id", "req-audit-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 201);
    app.upsert_customer("audited", json!({ "name": "B" })).await;
    // An update that changes nothing records nothing.
    app.upsert_customer("audited", json!({ "name": "B" })).await;

    let v: serde_json::Value =
        app.get("/v1/audit-log?limit=100", &app.admin_key).send().await.unwrap().json().await.unwrap();
    let entries: Vec<&serde_json::Value> =
        v["data"].as_array().unwrap().iter().filter(|e| e["object_type"] == "customer").collect();
    assert_eq!(entries.len(), 2, "created and one real update: {entries:?}");
    let (updated, created) = (entries[0], entries[1]);
    assert_eq!(created["action"], "customer.created");
    assert_eq!(created["request_id"], "req-audit-1");
    assert!(created["actor"].as_str().unwrap().starts_with("api_key:key_"));
    assert_eq!(updated["action"], "customer.updated");
    assert_eq!(updated["data"]["changes"]["name"], json!(["A", "B"]));
    assert!(updated["seq"].as_i64() > created["seq"].as_i64());
}

#[tokio::test]
async fn the_chain_verifies_and_detects_tampering() {
    let app = spawn_app().await;
    for i in 0..5 {
        app.upsert_customer(&format!("c{i}"), json!({ "name": "x" })).await;
    }
    let store = app.db.store().await;
    let report = store.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
    assert!(report.entries >= 5);

    // The table refuses edits outright...
    let refused = store.execute_raw("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3").await;
    assert!(refused.is_err(), "audit_log is append-only");

    // ...and an attacker who removes that guard is still caught.
    let drop_guard = if app.db.is_postgres() {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_update"
    };
    store.execute_raw(drop_guard).await.unwrap();
    store.execute_raw("UPDATE audit_log SET actor = 'someone-else' WHERE seq = 3").await.unwrap();
    let report = store.verify_audit_chain().await.unwrap();
    let (seq, problem) = report.broken.expect("tampering detected");
    assert_eq!(seq, 3);
    assert!(problem.contains("altered"), "{problem}");
}

#[tokio::test]
async fn a_truncated_chain_is_detected() {
    let app = spawn_app().await;
    for i in 0..3 {
        app.upsert_customer(&format!("t{i}"), json!({})).await;
    }
    let store = app.db.store().await;
    let before = store.verify_audit_chain().await.unwrap();
    let drop_guard = if app.db.is_postgres() {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_delete"
    };
    store.execute_raw(drop_guard).await.unwrap();
    store.execute_raw(&format!("DELETE FROM audit_log WHERE seq = {}", before.entries)).await.unwrap();
    let report = store.verify_audit_chain().await.unwrap();
    let (_, problem) = report.broken.expect("truncation detected");
    assert!(problem.contains("removed"), "{problem}");
}

#[tokio::test]
async fn concurrent_writers_extend_one_linear_chain() {
    let app = spawn_app().await;
    let mut tasks = Vec::new();
    for i in 0..16 {
        let req = app.put_json(&format!("/v1/customers/par{i}"), &app.write_key, json!({ "name": "p" }));
        tasks.push(tokio::spawn(async move { req.send().await.unwrap().status() }));
    }
    for t in tasks {
        assert_eq!(t.await.unwrap(), 201);
    }
    let report = app.db.store().await.verify_audit_chain().await.unwrap();
    assert!(report.is_intact(), "{report:?}");
}

#[tokio::test]
async fn the_audit_log_pages_by_entry_id() {
    let app = spawn_app().await;
    for i in 0..4 {
        app.upsert_customer(&format!("p{i}"), json!({})).await;
    }
    let all: serde_json::Value =
        app.get("/v1/audit-log?limit=100", &app.admin_key).send().await.unwrap().json().await.unwrap();
    let all: Vec<i64> = all["data"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert!(all.windows(2).all(|w| w[0] > w[1]), "newest first: {all:?}");
    let first: serde_json::Value =
        app.get("/v1/audit-log?limit=2", &app.admin_key).send().await.unwrap().json().await.unwrap();
    let cursor = first["data"][1]["id"].as_str().unwrap();
    let next: serde_json::Value = app
        .get(&format!("/v1/audit-log?limit=2&starting_after={cursor}"), &app.admin_key)
        .send()
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    let seqs: Vec<i64> =
        next["data"].as_array().unwrap().iter().map(|e| e["seq"].as_i64().unwrap()).collect();
    assert_eq!(seqs, all[2..4]);
    let resp = app.get("/v1/audit-log?starting_after=aud_nope", &app.admin_key).send().await.unwrap();
    let e = expect_error(resp, 400, "invalid_request_error", "parameter_invalid").await;
    assert_eq!(e["param"], "starting_after");
}
