//! The `tollgate` binary: API keys, migrations, audit verification and
//! start-up validation, as an operator runs them.

use std::process::{Command, Output};

use crate::helpers::*;

fn tollgate(db: &TestDb, args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_tollgate"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("TOLLGATE_CATALOG", manifest_path("tollgate.toml"))
        .env("LOG_LEVEL", "warn")
        .args(args);
    for (k, v) in env {
        cmd.env(k, v);
    }
    cmd.output().expect("run tollgate")
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

#[tokio::test(flavor = "multi_thread")]
async fn api_key_create_list_revoke() {
    let db = TestDb::new().await;
    let out = tokio::task::block_in_place(|| {
        tollgate(&db, &["api-key", "create", "--name", "backend", "--scope", "write"], &[])
    });
    assert!(out.status.success(), "{}", stderr(&out));
    let key = stdout(&out).trim().to_owned();
    assert!(tollgate::auth::looks_like_key(&key) && key.starts_with("tg_test_"), "{key}");
    assert!(stderr(&out).contains("not shown again"));

    let app = spawn_on(db, |_| {}).await;
    let resp = app.get("/v1/customers", &key).send().await.unwrap();
    assert_eq!(resp.status(), 200, "the printed key works");

    let out = tokio::task::block_in_place(|| tollgate(&app.db, &["api-key", "list", "--json"], &[]));
    assert!(out.status.success());
    let listed: serde_json::Value = serde_json::from_str(&stdout(&out)).unwrap();
    let mine = listed.as_array().unwrap().iter().find(|k| k["name"] == "backend").unwrap();
    assert_eq!(mine["scope"], "write");
    assert!(!stdout(&out).contains(&key[8..]), "list never shows secrets");
    let id = mine["id"].as_str().unwrap().to_owned();

    let out = tokio::task::block_in_place(|| tollgate(&app.db, &["api-key", "revoke", &id], &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    let resp = app.get("/v1/customers", &key).send().await.unwrap();
    expect_error(resp, 401, "authentication_error", "invalid_api_key").await;
    let out = tokio::task::block_in_place(|| tollgate(&app.db, &["api-key", "revoke", &id], &[]));
    assert!(!out.status.success(), "revoking twice is an error");
}

#[tokio::test(flavor = "multi_thread")]
async fn migrate_and_audit_verify() {
    let db = TestDb::new().await;
    let out = tokio::task::block_in_place(|| tollgate(&db, &["migrate"], &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("migrated"));
    let out = tokio::task::block_in_place(|| {
        tollgate(&db, &["api-key", "create", "--name", "a", "--scope", "read"], &[])
    });
    assert!(out.status.success());
    let out = tokio::task::block_in_place(|| tollgate(&db, &["audit", "verify"], &[]));
    assert!(out.status.success(), "{}", stdout(&out));
    assert!(stdout(&out).contains("intact"));

    let store = db.store().await;
    let drop_guard = if db.is_postgres() {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_update"
    };
    store.execute_raw(drop_guard).await.unwrap();
    store.execute_raw("UPDATE audit_log SET data = '{}' WHERE seq = 1").await.unwrap();
    let out = tokio::task::block_in_place(|| tollgate(&db, &["audit", "verify"], &[]));
    assert!(!out.status.success(), "tampering fails the command");
    assert!(stdout(&out).contains("broken at entry 1"), "{}", stdout(&out));
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_refuses_unsafe_configuration_with_one_line_per_problem() {
    let db = TestDb::new().await;
    let out = tokio::task::block_in_place(|| {
        tollgate(
            &db,
            &["serve", "--port", "0"],
            &[
                ("ENVIRONMENT", "production"),
                ("STRIPE_SECRET_KEY", "sk_test_abc"),
                ("ALLOWED_ORIGINS", "*"),
                ("SECRET_KEY", "short"),
                ("DATABASE_URL", "sqlite://never-created.db"),
            ],
        )
    });
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    let lines: Vec<&str> = err.lines().filter(|l| l.starts_with("error: ")).collect();
    for needle in
        ["test key", "STRIPE_WEBHOOK_SECRET", "wildcard", "SECRET_KEY is weak", "SQLite in production"]
    {
        assert!(lines.iter().any(|l| l.contains(needle)), "{needle} in {err}");
    }
    assert!(!err.contains("sk_test_abc"), "secrets are not echoed");

    let out = tokio::task::block_in_place(|| {
        tollgate(&db, &["serve", "--port", "0"], &[("STRIPE_SECRET_KEY", "sk_live_abc")])
    });
    assert_eq!(out.status.code(), Some(2));
    assert!(stderr(&out).contains("live key"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_broken_catalog_stops_start_up_with_the_reason() {
    let db = TestDb::new().await;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("bad.toml");
    std::fs::write(&path, "[prices.x]\nproduct = \"missing\"\ncurrency = \"usd\"\namount = 1\n").unwrap();
    let out = tokio::task::block_in_place(|| {
        tollgate(&db, &["serve", "--port", "0"], &[("TOLLGATE_CATALOG", path.to_str().unwrap())])
    });
    assert!(!out.status.success());
    assert!(stderr(&out).contains("price x: product \"missing\""), "{}", stderr(&out));
}
