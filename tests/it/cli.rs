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

/// The real binary, as an operator runs it: JSON logs carrying request ids
/// and no secrets, and a clean exit on SIGTERM.
#[tokio::test(flavor = "multi_thread")]
async fn serve_logs_json_without_secrets_and_exits_cleanly_on_sigterm() {
    use std::io::{BufRead, BufReader};
    use std::time::{Duration, Instant};

    let db = TestDb::new().await;
    let out = tokio::task::block_in_place(|| {
        tollgate(&db, &["api-key", "create", "--name", "l", "--scope", "read"], &[])
    });
    let key = stdout(&out).trim().to_owned();

    let mut child = Command::new(env!("CARGO_BIN_EXE_tollgate"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", &db.url)
        .env("TOLLGATE_CATALOG", manifest_path("tollgate.toml"))
        .env("LOG_FORMAT", "json")
        .env("LOG_LEVEL", "info")
        .env("PORT", "0")
        .env("BIND_ADDRESS", "127.0.0.1")
        .arg("serve")
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let (lines_tx, lines_rx) = std::sync::mpsc::channel::<String>();
    let stderr_pipe = child.stderr.take().unwrap();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stderr_pipe).lines().map_while(Result::ok) {
            let _ = lines_tx.send(line);
        }
    });
    let mut lines = Vec::new();
    let address = loop {
        let line = lines_rx.recv_timeout(Duration::from_secs(20)).expect("server starts and logs");
        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_else(|_| panic!("not JSON: {line}"));
        lines.push(line);
        if v["message"] == "tollgate listening" {
            break v["address"].as_str().unwrap().to_owned();
        }
    };

    let client = reqwest::Client::new();
    let resp = client
        .get(format!("http://{address}/v1/customers"))
        .bearer_auth(&key)
        .header("x-request-id", "log-check-1")
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);

    let status = Command::new("kill").args(["-TERM", &child.id().to_string()]).status().unwrap();
    assert!(status.success());
    let deadline = Instant::now() + Duration::from_secs(15);
    let exit = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "tollgate did not exit after SIGTERM");
        std::thread::yield_now();
        let _ = lines_rx.recv_timeout(Duration::from_millis(20)).map(|l| lines.push(l));
    };
    assert!(exit.success(), "clean exit: {exit:?}");
    // The pipe closed with the process: read to its end.
    reader.join().unwrap();
    lines.extend(lines_rx.try_iter());

    for line in &lines {
        assert!(serde_json::from_str::<serde_json::Value>(line).is_ok(), "every line is JSON: {line}");
        assert!(!line.contains(&key[8..]), "the API key never appears in logs");
    }
    let request_line =
        lines.iter().find(|l| l.contains("log-check-1")).expect("the request is logged with its id");
    let v: serde_json::Value = serde_json::from_str(request_line).unwrap();
    assert_eq!(v["status"], 200);
    assert!(lines.iter().any(|l| l.contains("tollgate stopped")), "{lines:?}");
}

#[tokio::test(flavor = "multi_thread")]
async fn healthcheck_exits_zero_only_when_the_server_answers() {
    let app = spawn_app().await;
    let live = app.url("/livez");
    let out = tokio::task::block_in_place(|| tollgate(&app.db, &["healthcheck", "--url", &live], &[]));
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(stdout(&out).contains("healthy"), "{}", stdout(&out));

    let missing = app.url("/no-such-endpoint");
    let out = tokio::task::block_in_place(|| tollgate(&app.db, &["healthcheck", "--url", &missing], &[]));
    assert_eq!(out.status.code(), Some(1), "a non-2xx answer is unhealthy");
    assert!(stderr(&out).contains("404"), "{}", stderr(&out));

    // Nothing listens on a port that was just released.
    let port = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port();
    let out = tokio::task::block_in_place(|| {
        tollgate(&app.db, &["healthcheck", "--timeout-seconds", "2"], &[("PORT", &port.to_string())])
    });
    assert_eq!(out.status.code(), Some(1), "no server is unhealthy");
    assert!(stderr(&out).contains(&format!("127.0.0.1:{port}/livez")), "{}", stderr(&out));
}
