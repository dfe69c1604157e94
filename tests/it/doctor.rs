//! `tollgate doctor` against real surroundings: the provider's API (the
//! emulator standing in for Stripe), the database, the backups, Redis.

use secrecy::SecretString;
use tokio_util::sync::CancellationToken;
use tollgate::ops::doctor;
use tollgate::ops::report::Status;
use tollgate::providers::stripe_emulator::{Emulator, EmulatorConfig};

use crate::helpers::*;

const LIVE_KEY: &str = "sk_live_doctor_test_key_0123456789";
const PUBLIC: &str = "https://billing.example.com";

/// Stripe, as far as doctor asks it: an emulator that accepts a live key.
async fn stripe(shutdown: &CancellationToken) -> (Emulator, String) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let base = format!("http://{}", listener.local_addr().unwrap());
    let emulator = Emulator::new(EmulatorConfig {
        public_url: base.clone(),
        api_key: Some(LIVE_KEY.to_owned()),
        delivery: Default::default(),
    });
    tokio::spawn(emulator.clone().serve(listener, shutdown.clone()));
    (emulator, base)
}

fn production(db: &TestDb, stripe_base: &str, backups: &std::path::Path) -> tollgate::Config {
    let mut c = test_config(db);
    c.environment = tollgate::config::Environment::Production;
    c.stripe_secret_key = Some(SecretString::from(LIVE_KEY.to_owned()));
    c.stripe_api_base = Some(stripe_base.to_owned());
    c.secret_key = Some(SecretString::from("q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sAx".to_owned()));
    c.public_url = Some(PUBLIC.to_owned());
    c.allowed_origins = vec!["https://app.example.com".to_owned()];
    c.allow_sqlite_in_production = true;
    c.backup_dir = backups.to_path_buf();
    c
}

#[tokio::test]
async fn a_ready_production_configuration_passes_every_check() {
    let shutdown = CancellationToken::new();
    let (emulator, base) = stripe(&shutdown).await;
    let secret = emulator.register_webhook_endpoint(&format!("{PUBLIC}/webhooks/stripe"));
    let db = TestDb::new().await;
    db.store().await.close().await; // migrated
    let backups = tempfile::tempdir().unwrap();
    let mut config = production(&db, &base, backups.path());
    config.stripe_webhook_secret = Some(SecretString::from(secret));
    tollgate::ops::backup::backup(&config, backups.path(), 3).await.unwrap();
    assert!(tollgate::ops::drill::run(&config, backups.path()).await.ok);

    let report = doctor::run(&config).await;
    assert!(report.ready, "{report}");
    let failing: Vec<_> = report.checks.0.iter().filter(|c| c.status != Status::Pass).collect();
    let names: Vec<&str> = failing.iter().map(|c| c.name.as_str()).collect();
    assert_eq!(names, ["PayPal", "Redis persistence"], "only the unused parts are skipped\n{report}");
    let endpoint = report.checks.get("webhook endpoint").unwrap();
    assert!(endpoint.detail.contains("all 23 events"), "{}", endpoint.detail);
    assert!(!report.to_string().contains(LIVE_KEY), "no secret printed");
    shutdown.cancel();
}

#[tokio::test]
async fn an_unready_configuration_fails_each_line_with_its_fix() {
    let shutdown = CancellationToken::new();
    let (_emulator, base) = stripe(&shutdown).await;
    // Registered for tollgate's (plain http) address, with too few events.
    let resp = reqwest::Client::new()
        .post(format!("{base}/v1/webhook_endpoints"))
        .bearer_auth(LIVE_KEY)
        .header("content-type", "application/x-www-form-urlencoded")
        .body("url=http://billing.example.com/webhooks/stripe&enabled_events[]=customer.created")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200, "{}", resp.text().await.unwrap());
    let db = TestDb::new().await;
    let backups = tempfile::tempdir().unwrap();
    let mut config = production(&db, &base, backups.path());
    config.stripe_webhook_secret = None;
    config.secret_key = Some(SecretString::from("changeme".to_owned()));
    config.allowed_origins = vec!["*".to_owned()];
    config.public_url = Some("http://billing.example.com".to_owned());
    config.redis_url = Some(tollgate::config::ConnectionUrl::new("redis://127.0.0.1:1/"));
    config.rate_limit_per_ip = 0;

    let report = doctor::run(&config).await;
    assert!(!report.ready, "{report}");
    for name in [
        "STRIPE_WEBHOOK_SECRET",
        "webhook endpoint",
        "SECRET_KEY",
        "backups",
        "restore drill",
        "ALLOWED_ORIGINS",
        "PUBLIC_URL",
        "Redis persistence",
        "rate limits",
    ] {
        let check = report.checks.get(name).unwrap_or_else(|| panic!("no {name} line\n{report}"));
        assert_eq!(check.status, Status::Fail, "{name}\n{report}");
        assert!(check.fix.as_deref().is_some_and(|f| !f.is_empty()), "{name} has a fix\n{report}");
    }
    // Never migrated: a SQLite file that does not exist, or an empty PostgreSQL database.
    let unmigrated = if db.is_postgres() { "migrations" } else { "database" };
    assert_eq!(report.checks.get(unmigrated).unwrap().status, Status::Fail, "{report}");
    assert!(report.checks.get("webhook endpoint").unwrap().detail.contains("lacks 22 event(s)"), "{report}");
    assert!(report.summary.contains("failed"), "{}", report.summary);
    shutdown.cancel();
}

#[tokio::test(flavor = "multi_thread")]
async fn doctor_json_is_for_machines_and_exits_non_zero_when_not_ready() {
    let db = TestDb::new().await;
    db.store().await.close().await;
    let out = tokio::task::block_in_place(|| {
        std::process::Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .env_clear()
            .env("DATABASE_URL", &db.url)
            .env("BACKUP_DIR", "/nonexistent/backups")
            .env("STRIPE_SECRET_KEY", "sk_test_doctor_cli")
            .env("STRIPE_API_BASE", "http://127.0.0.1:1")
            .env("LOG_LEVEL", "error")
            .args(["doctor", "--json"])
            .output()
            .unwrap()
    });
    assert_eq!(out.status.code(), Some(1));
    let report: serde_json::Value = serde_json::from_slice(&out.stdout).expect("JSON on stdout");
    assert_eq!(report["ready"], false);
    let checks = report["checks"].as_array().unwrap();
    let line = |name: &str| checks.iter().find(|c| c["name"] == name).unwrap().clone();
    assert_eq!(line("environment")["status"], "fail");
    assert_eq!(line("migrations")["status"], "pass");
    assert_eq!(line("webhook endpoint")["status"], "fail");
    assert!(line("webhook endpoint")["fix"].as_str().is_some());
    assert!(!String::from_utf8_lossy(&out.stdout).contains("sk_test_doctor_cli"), "no secret printed");
}

/// Against the local Redis, when there is one: the line says what
/// `CONFIG GET appendonly` says.
#[tokio::test]
async fn redis_persistence_is_read_from_the_server() {
    let Ok(client) = redis::Client::open("redis://127.0.0.1:6379/") else { return };
    let Ok(mut conn) = client.get_multiplexed_async_connection().await else { return };
    let appendonly: redis::RedisResult<Vec<String>> =
        redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await;
    let db = TestDb::new().await;
    let mut config = test_config(&db);
    config.redis_url = Some(tollgate::config::ConnectionUrl::new("redis://127.0.0.1:6379/"));
    let report = doctor::run(&config).await;
    let line = report.checks.get("Redis persistence").unwrap();
    let expected = match appendonly.as_ref().map(|v| v.get(1).map(String::as_str)) {
        Ok(Some("yes")) => Status::Pass,
        Ok(_) => Status::Fail,
        Err(_) => Status::Warn,
    };
    assert_eq!(line.status, expected, "{report}");
}
