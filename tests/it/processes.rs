//! The real binary as separate processes: killed mid-load (kill -9) and
//! restarted, and three instances on one database.

use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use hmac::{Hmac, Mac};
use serde_json::{json, Value};
use sha2::Sha256;
use tollgate::ids::ExternalId;

use crate::helpers::*;

const SECRET: &str = "whsec_process_tests";

struct Proc {
    child: Child,
    base: String,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

async fn start(db: &TestDb) -> Proc {
    let port = free_port();
    let child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("TOLLGATE_CATALOG", manifest_path("tollgate.toml"))
        .env("STRIPE_WEBHOOK_SECRET", SECRET)
        .env("PORT", port.to_string())
        .env("BIND_ADDRESS", "127.0.0.1")
        .env("LOG_LEVEL", "error")
        .arg("serve")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let base = format!("http://127.0.0.1:{port}");
    let client = reqwest::Client::new();
    eventually(Duration::from_secs(30), || async {
        let r = client.get(format!("{base}/readyz")).send().await.ok()?;
        r.status().is_success().then_some(())
    })
    .await;
    Proc { child, base }
}

fn signed(id: &str, customer: &str) -> (Vec<u8>, String) {
    let body = serde_json::to_vec(&json!({
        "id": id, "object": "event", "created": 1_800_000_000, "type": "customer.created", "livemode": false,
        "data": { "object": { "id": customer, "object": "customer", "email": format!("{customer}@example.com"), "metadata": {} } },
    }))
    .unwrap();
    let t = tollgate::store::now_unix();
    let mut mac = Hmac::<Sha256>::new_from_slice(SECRET.as_bytes()).unwrap();
    mac.update(format!("{t}.").as_bytes());
    mac.update(&body);
    (body, format!("t={t},v1={}", hex::encode(mac.finalize().into_bytes())))
}

async fn post(client: &reqwest::Client, base: &str, id: &str, customer: &str) -> Option<u16> {
    let (body, sig) = signed(id, customer);
    let resp = client
        .post(format!("{base}/webhooks/stripe"))
        .header("stripe-signature", sig)
        .body(body)
        .send()
        .await
        .ok()?;
    Some(resp.status().as_u16())
}

/// Waits until every listed event is applied, then checks each had exactly
/// one effect.
async fn assert_applied_exactly_once(db: &TestDb, acknowledged: &[(String, String)]) {
    let store = db.store().await;
    eventually(Duration::from_secs(60), || async {
        for (id, _) in acknowledged {
            let e = store.find_provider_event("stripe", id).await.ok()??;
            if e.status != "processed" {
                return None;
            }
        }
        Some(())
    })
    .await;
    let mut page = tollgate::store::Page::first(100);
    let mut links = std::collections::HashMap::<String, usize>::new();
    loop {
        let listed = store.list_audit_entries(&page).await.unwrap();
        for e in &listed.data {
            if e.action == "customer.provider_linked" {
                let data: Value = serde_json::from_str(&e.data).unwrap();
                *links.entry(data["provider_customer_id"].as_str().unwrap().to_owned()).or_default() += 1;
            }
        }
        match (listed.has_more, listed.data.last()) {
            (true, Some(last)) => page = tollgate::store::Page::after(100, last.id.clone()),
            _ => break,
        }
    }
    for (id, customer) in acknowledged {
        assert_eq!(links.get(customer), Some(&1), "{id}: applied exactly once");
        let c = store.get_customer(&ExternalId::parse(customer).unwrap()).await.unwrap();
        assert!(c.is_some_and(|c| c.providers.get("stripe") == Some(customer)), "{customer} linked");
    }
    assert!(store.verify_audit_chain().await.unwrap().is_intact());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_acknowledged_event_survives_kill_9_and_is_applied_once() {
    let db = TestDb::new().await;
    let server = start(&db).await;
    let pid = server.child.id();
    let acknowledged = Arc::new(Mutex::new(Vec::<(String, String)>::new()));
    let client = reqwest::Client::builder().timeout(Duration::from_secs(5)).build().unwrap();
    let mut senders = Vec::new();
    for worker in 0..8 {
        let (client, base, acked) = (client.clone(), server.base.clone(), acknowledged.clone());
        senders.push(tokio::spawn(async move {
            for n in 0..400 {
                let (id, customer) = (format!("evt_crash_{worker}_{n}"), format!("cus_crash_{worker}_{n}"));
                match post(&client, &base, &id, &customer).await {
                    Some(200) => acked.lock().unwrap().push((id, customer)),
                    Some(_) => {}
                    None => return, // the server is gone
                }
            }
        }));
    }
    // Kill it while events are flowing.
    eventually(Duration::from_secs(30), || async {
        (acknowledged.lock().unwrap().len() >= 100).then_some(())
    })
    .await;
    let killed = Command::new("kill").args(["-KILL", &pid.to_string()]).status().unwrap();
    assert!(killed.success());
    for s in senders {
        s.await.unwrap();
    }
    drop(server);
    let acknowledged = acknowledged.lock().unwrap().clone();
    assert!(acknowledged.len() >= 100);

    let _restarted = start(&db).await;
    assert_applied_exactly_once(&db, &acknowledged).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn three_instances_on_one_database_apply_each_event_once() {
    let db = TestDb::new().await;
    let instances = [start(&db).await, start(&db).await, start(&db).await];
    let client = reqwest::Client::builder().timeout(Duration::from_secs(20)).build().unwrap();
    let mut acknowledged = Vec::new();
    let mut deliveries = Vec::new();
    for n in 0..40 {
        let (id, customer) = (format!("evt_multi_{n}"), format!("cus_multi_{n}"));
        for instance in &instances {
            let (client, base, id, customer) =
                (client.clone(), instance.base.clone(), id.clone(), customer.clone());
            deliveries.push(tokio::spawn(async move { post(&client, &base, &id, &customer).await }));
        }
        acknowledged.push((id, customer));
    }
    for d in deliveries {
        assert_eq!(d.await.unwrap(), Some(200), "every instance acknowledges every delivery");
    }
    assert_applied_exactly_once(&db, &acknowledged).await;
    let store = db.store().await;
    assert_eq!(store.provider_event_ids_with_prefix("evt_multi_").await.unwrap().len(), 40);
}
