//! Backups and restore drills, on whichever backend the run uses: a good
//! backup passes every check; a damaged one fails, naming the check.

use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::{json, Value};
use tollgate::ops::backup;
use tollgate::ops::drill;
use tollgate::ops::report::Status;

use crate::helpers::*;

/// A running tollgate with some customers (and so audit entries), and a
/// backup directory.
async fn app_with_data() -> (TestApp, tempfile::TempDir) {
    let app = spawn_app().await;
    for (id, email) in [("ada", "ada@example.com"), ("grace", "grace@example.com")] {
        app.upsert_customer(id, json!({ "email": email })).await;
    }
    (app, tempfile::tempdir().unwrap())
}

fn config_of(app: &TestApp) -> tollgate::Config {
    test_config(&app.db)
}

fn newest(dir: &Path) -> backup::Found {
    backup::list(dir).unwrap().pop().expect("a backup")
}

#[track_caller]
fn status_of(report: &drill::DrillReport, check: &str) -> Status {
    report.checks.get(check).unwrap_or_else(|| panic!("no check {check} in\n{report}")).status
}

fn manifest_edit(found: &backup::Found, edit: impl FnOnce(&mut Value)) {
    let mut m: Value = serde_json::from_str(&std::fs::read_to_string(&found.manifest_path).unwrap()).unwrap();
    edit(&mut m);
    std::fs::write(&found.manifest_path, serde_json::to_string(&m).unwrap()).unwrap();
}

#[tokio::test]
async fn a_backup_taken_while_serving_passes_every_drill_check() {
    let (app, dir) = app_with_data().await;
    let config = config_of(&app);
    let taken = backup::backup(&config, dir.path(), 14).await.unwrap();
    // The manifest describes the file and the data at that instant.
    assert_eq!(taken.manifest.tables["customers"], 2);
    assert!(taken.manifest.tables["audit_log"] >= 5, "{:?}", taken.manifest.tables);
    let (bytes, digest) = backup::sha256_file(&taken.path).unwrap();
    assert_eq!((bytes, digest.as_str()), (taken.manifest.bytes, taken.manifest.sha256.as_str()));
    let leftovers: Vec<PathBuf> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.to_string_lossy().contains("partial"))
        .collect();
    assert!(leftovers.is_empty(), "{leftovers:?}");

    let report = drill::run(&config, dir.path()).await;
    assert!(report.ok, "{report}");
    for check in [
        "manifest",
        "checksum",
        "restore",
        "row_counts",
        "schema_version",
        "integrity",
        "audit_chain",
        "write_read",
        "cleanup",
    ] {
        assert_eq!(status_of(&report, check), Status::Pass, "{check} in\n{report}");
    }
    let entitlements = report.checks.get("entitlements").unwrap();
    assert_eq!(entitlements.status, Status::Skip);
    assert!(entitlements.detail.contains("not built yet"), "{}", entitlements.detail);

    // The scratch database is gone, the live one untouched but for the record.
    if app.db.is_postgres() {
        let detail = &report.checks.get("restore").unwrap().detail;
        let name = detail.split_whitespace().last().unwrap();
        assert!(name.starts_with("tollgate_drill_"), "{detail}");
        let admin = tollgate::store::Store::connect(
            &std::env::var("TEST_DATABASE_URL").unwrap(),
            &tollgate::store::StoreOptions::default(),
        )
        .await
        .unwrap();
        // The name is free again: the scratch database was dropped.
        let gone = admin.execute_raw(&format!("CREATE DATABASE {name}")).await;
        assert!(gone.is_ok(), "the scratch database still exists: {gone:?}");
        admin.execute_raw(&format!("DROP DATABASE {name}")).await.unwrap();
        admin.close().await;
    }
    let live = app.db.store().await;
    let counts = live.row_counts().await.unwrap();
    assert_eq!(counts["customers"], 2);
    let run = live.last_ops_run("restore_drill").await.unwrap().expect("the drill is recorded");
    assert!(run.ok);
    assert!(live.verify_audit_chain().await.unwrap().is_intact());
    assert!(dir.path().join(drill::RESULT_FILE).exists());
}

#[tokio::test]
async fn a_truncated_or_corrupted_backup_fails_the_checksum_check() {
    let (app, dir) = app_with_data().await;
    let config = config_of(&app);
    backup::backup(&config, dir.path(), 14).await.unwrap();
    let found = newest(dir.path());
    let path = found.backup_path();
    let original = std::fs::read(&path).unwrap();

    std::fs::write(&path, &original[..original.len() / 2]).unwrap();
    let report = drill::run(&config, dir.path()).await;
    assert!(!report.ok);
    assert_eq!(status_of(&report, "checksum"), Status::Fail, "{report}");
    assert!(report.to_string().contains("✗ checksum"), "{report}");
    assert_eq!(status_of(&report, "restore"), Status::Skip);

    let mut flipped = original.clone();
    let middle = flipped.len() / 2;
    flipped[middle] ^= 0xff;
    std::fs::write(&path, &flipped).unwrap();
    let report = drill::run(&config, dir.path()).await;
    assert_eq!(status_of(&report, "checksum"), Status::Fail, "{report}");

    // The doctor sees that the last drill failed.
    let run = app.db.store().await.last_ops_run("restore_drill").await.unwrap().unwrap();
    assert!(!run.ok);
}

#[tokio::test]
async fn damage_the_checksum_cannot_see_fails_a_later_check() {
    let (app, dir) = app_with_data().await;
    let config = config_of(&app);
    backup::backup(&config, dir.path(), 14).await.unwrap();
    let found = newest(dir.path());

    // Rows the manifest promised are missing: the row counts disagree.
    manifest_edit(&found, |m| m["tables"]["customers"] = json!(3));
    let report = drill::run(&config, dir.path()).await;
    assert_eq!(status_of(&report, "checksum"), Status::Pass, "{report}");
    assert_eq!(status_of(&report, "row_counts"), Status::Fail, "{report}");
    assert!(report.checks.get("row_counts").unwrap().detail.contains("customers: manifest 3, restored 2"));

    // Garbage written before the checksum was taken: the restore breaks.
    let path = found.backup_path();
    let mut bytes = std::fs::read(&path).unwrap();
    let len = bytes.len();
    for b in &mut bytes[len / 4..len - 64] {
        *b = 0x5a;
    }
    std::fs::write(&path, &bytes).unwrap();
    let (n, digest) = backup::sha256_file(&path).unwrap();
    manifest_edit(&found, |m| {
        m["bytes"] = json!(n);
        m["sha256"] = json!(digest);
    });
    let report = drill::run(&config, dir.path()).await;
    assert!(!report.ok, "{report}");
    assert_eq!(status_of(&report, "checksum"), Status::Pass);
    let failed: Vec<&str> =
        report.checks.0.iter().filter(|c| c.status == Status::Fail).map(|c| c.name.as_str()).collect();
    assert!(
        failed.iter().any(|f| ["restore", "row_counts", "integrity", "audit_chain"].contains(f)),
        "{report}"
    );
    assert_eq!(status_of(&report, "cleanup"), Status::Pass, "scratch dropped even on failure\n{report}");
}

#[tokio::test]
async fn an_altered_audit_log_in_the_backup_fails_the_audit_chain_check() {
    let (app, dir) = app_with_data().await;
    let config = config_of(&app);
    let store = app.db.store().await;
    let unguard = if app.db.is_postgres() {
        "DROP TRIGGER audit_log_no_update ON audit_log"
    } else {
        "DROP TRIGGER audit_log_no_update"
    };
    store.execute_raw(unguard).await.unwrap();
    store.execute_raw("UPDATE audit_log SET data = '{\"forged\":true}' WHERE seq = 2").await.unwrap();
    backup::backup(&config, dir.path(), 14).await.unwrap();
    let report = drill::run(&config, dir.path()).await;
    assert!(!report.ok);
    assert_eq!(status_of(&report, "audit_chain"), Status::Fail, "{report}");
    assert!(report.checks.get("audit_chain").unwrap().detail.contains("entry 2"), "{report}");
}

#[tokio::test]
async fn backups_keep_the_newest_k_and_a_drill_without_backups_fails() {
    let (app, dir) = app_with_data().await;
    let config = config_of(&app);
    let report = drill::run(&config, dir.path()).await;
    assert_eq!(status_of(&report, "manifest"), Status::Fail, "{report}");

    let mut files = Vec::new();
    for _ in 0..3 {
        let b = backup::backup(&config, dir.path(), 2).await.unwrap();
        files.push(b.manifest.file.clone());
        // Names carry the millisecond: let the clock move on before the next.
        let done = now_ms();
        eventually(std::time::Duration::from_secs(2), || async { (now_ms() > done).then_some(()) }).await;
    }
    let kept: Vec<String> = backup::list(dir.path()).unwrap().into_iter().map(|f| f.manifest.file).collect();
    assert_eq!(kept, files[1..], "the oldest is removed");
    assert!(!dir.path().join(&files[0]).exists());
}

fn now_ms() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_commands_exit_non_zero_on_failure_and_say_when_pg_dump_is_missing() {
    let (app, dir) = app_with_data().await;
    let run = |args: &[&str], path: &str| {
        Command::new(env!("CARGO_BIN_EXE_tollgate"))
            .env_clear()
            .env("PATH", path)
            .env("DATABASE_URL", &app.db.url)
            .env("BACKUP_DIR", dir.path())
            .env("LOG_LEVEL", "error")
            .args(args)
            .output()
            .unwrap()
    };
    let path = std::env::var("PATH").unwrap_or_default();
    let out = tokio::task::block_in_place(|| run(&["backup"], &path));
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let out = tokio::task::block_in_place(|| run(&["restore-drill"], &path));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(out.status.success(), "{stdout}");
    assert!(stdout.contains("✓ audit_chain") && stdout.contains("restore drill passed"), "{stdout}");

    let found = newest(dir.path());
    std::fs::write(found.backup_path(), b"truncated").unwrap();
    let out = tokio::task::block_in_place(|| run(&["restore-drill"], &path));
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(stdout.contains("✗ checksum") && stdout.contains("FAILED"), "{stdout}");

    if app.db.is_postgres() {
        let out = tokio::task::block_in_place(|| run(&["backup"], "/nonexistent"));
        assert!(!out.status.success());
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("pg_dump was not found"), "{stderr}");
        assert_eq!(backup::list(dir.path()).unwrap().len(), 1, "a failed backup leaves nothing behind");
    }
}
