//! `tollgate restore-drill`: proves the newest backup restores into a
//! working tollgate database.
//!
//! The backup is restored into a scratch database (a temporary SQLite file,
//! or a new PostgreSQL database with a random name on DATABASE_URL's server
//! or DRILL_DATABASE_URL), checked, and dropped again whatever happened. The
//! live database is only written to record the result, for `doctor`.

use std::path::Path;

use serde::Serialize;

use super::backup::{self, Found, LibpqTarget};
use super::report::{Check, Checks};
use crate::config::Config;
use crate::store::audit::Actor;
use crate::store::{now_unix, DbKind, Store};

/// The result file next to the backups, for operators (and `doctor`) who
/// cannot reach the database the drill reported to.
pub const RESULT_FILE: &str = "last-drill.json";
pub const RUN_KIND: &str = "restore_drill";

#[derive(Debug, Clone, Serialize)]
pub struct DrillReport {
    /// The backup file drilled, if one was found.
    pub backup: Option<String>,
    pub started_at: i64,
    pub finished_at: i64,
    pub ok: bool,
    pub checks: Checks,
}

impl std::fmt::Display for DrillReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "restore drill of {}", self.backup.as_deref().unwrap_or("(no backup)"))?;
        write!(f, "{}", self.checks)?;
        let verdict = if self.ok { "passed" } else { "FAILED" };
        writeln!(f, "restore drill {verdict}: {}", self.checks.summary())
    }
}

/// Drills the newest backup in `dir`, then records the result.
#[tracing::instrument(name = "ops.restore_drill", skip_all, fields(dir = %dir.display()))]
pub async fn run(config: &Config, dir: &Path) -> DrillReport {
    let started_at = now_unix();
    let mut checks = Checks::default();
    let newest = match backup::list(dir) {
        Ok(found) => found.into_iter().last(),
        Err(e) => {
            checks.push(Check::fail("manifest", e.to_string(), "check BACKUP_DIR"));
            None
        }
    };
    let backup_name = newest.as_ref().map(|f| f.manifest.file.clone());
    match newest {
        Some(found) => {
            checks.push(Check::pass(
                "manifest",
                format!(
                    "{} ({}, taken {}, schema {})",
                    found.manifest_path.display(),
                    serde_json::to_value(found.manifest.database).unwrap_or_default().as_str().unwrap_or(""),
                    found.manifest.created_at,
                    found.manifest.schema_version
                ),
            ));
            drill(config, &found, &mut checks).await;
        }
        None if checks.0.is_empty() => checks.push(Check::fail(
            "manifest",
            format!("no backup in {}", dir.display()),
            "run `tollgate backup` first (and check BACKUP_DIR)",
        )),
        None => {}
    }
    let report =
        DrillReport { backup: backup_name, started_at, finished_at: now_unix(), ok: checks.ok(), checks };
    record(config, dir, &report).await;
    report
}

/// The checks, in order; a check whose inputs are missing is skipped with
/// the reason. A later issue adds its checks to this list.
async fn drill(config: &Config, found: &Found, checks: &mut Checks) {
    let path = found.backup_path();
    match backup::sha256_file(&path) {
        Ok((bytes, digest)) if bytes == found.manifest.bytes && digest == found.manifest.sha256 => {
            checks.push(Check::pass("checksum", format!("SHA-256 matches the manifest ({bytes} bytes)")));
        }
        Ok((bytes, digest)) => {
            checks.push(Check::fail(
                "checksum",
                format!(
                    "{} is {bytes} bytes with SHA-256 {}…, the manifest says {} bytes, {}… (truncated or corrupted)",
                    path.display(),
                    &digest[..12],
                    found.manifest.bytes,
                    found.manifest.sha256.get(..12).unwrap_or("")
                ),
                "take a new backup; find out what damaged this one (disk, copy, storage)",
            ));
            checks.push(Check::skip("restore", "not run: the backup file is damaged"));
            return skip_rest(checks, "the backup file is damaged");
        }
        Err(e) => {
            checks.push(Check::fail(
                "checksum",
                format!("cannot read {}: {e}", path.display()),
                "the manifest names a file that is missing or unreadable",
            ));
            checks.push(Check::skip("restore", "not run: the backup file is missing"));
            return skip_rest(checks, "the backup file is missing");
        }
    }
    match found.manifest.database {
        DbKind::Sqlite => {
            let scratch = match tempfile::Builder::new().prefix("tollgate-drill-").tempdir() {
                Ok(d) => d,
                Err(e) => {
                    checks.push(Check::fail("restore", format!("no scratch directory: {e}"), "check TMPDIR"));
                    return skip_rest(checks, "nothing was restored");
                }
            };
            let file = scratch.path().join("restored.db");
            if let Err(e) = std::fs::copy(&path, &file) {
                checks.push(Check::fail("restore", format!("copy failed: {e}"), "check TMPDIR's free space"));
                return skip_rest(checks, "nothing was restored");
            }
            match open_scratch(&backup::sqlite_url(&file)).await {
                Ok(store) => {
                    checks.push(Check::pass("restore", "copied into a scratch SQLite file"));
                    verify(&store, found, checks).await;
                    store.close().await;
                }
                Err(e) => {
                    checks.push(Check::fail("restore", format!("the copy does not open: {e}"), ""));
                    skip_rest(checks, "nothing was restored");
                }
            }
            let removed = scratch.close();
            checks.push(match removed {
                Ok(()) => Check::pass("cleanup", "scratch file removed"),
                Err(e) => {
                    Check::fail("cleanup", format!("scratch file not removed: {e}"), "remove it by hand")
                }
            });
        }
        DbKind::Postgres => postgres_drill(config, found, checks).await,
    }
}

async fn postgres_drill(config: &Config, found: &Found, checks: &mut Checks) {
    let server = match (&config.drill_database_url, DbKind::from_url(config.database_url.expose())) {
        (Some(url), _) => url.expose().to_owned(),
        (None, Ok(DbKind::Postgres)) => config.database_url.expose().to_owned(),
        (None, _) => {
            checks.push(Check::fail(
                "restore",
                "a PostgreSQL backup needs a PostgreSQL server to restore into",
                "set DRILL_DATABASE_URL (or DATABASE_URL) to a postgres:// URL with CREATEDB rights",
            ));
            return skip_rest(checks, "nothing was restored");
        }
    };
    let name = format!("tollgate_drill_{}", ulid::Ulid::new().to_string().to_lowercase());
    let admin = match Store::connect(&server, &backup::small_pool()).await {
        Ok(s) => s,
        Err(e) => {
            checks.push(Check::fail("restore", format!("cannot reach the server: {e}"), ""));
            return skip_rest(checks, "nothing was restored");
        }
    };
    if let Err(e) = admin.execute_raw(&format!("CREATE DATABASE {name}")).await {
        checks.push(Check::fail(
            "restore",
            format!("cannot create a scratch database: {e}"),
            "the role needs CREATEDB, or point DRILL_DATABASE_URL at a server where it has it",
        ));
        admin.close().await;
        return skip_rest(checks, "nothing was restored");
    }
    let restored = async {
        let url = LibpqTarget::with_database(&server, &name)?;
        let target = LibpqTarget::from_url(&url)?;
        backup::run_tool(
            "pg_restore",
            vec![
                "--no-owner".to_owned(),
                "--no-privileges".to_owned(),
                "--exit-on-error".to_owned(),
                format!("--dbname={}", target.uri),
                found.backup_path().display().to_string(),
            ],
            target.password,
        )
        .await?;
        Ok::<_, backup::BackupError>(url)
    }
    .await;
    match restored {
        Ok(url) => match open_scratch(&url).await {
            Ok(store) => {
                checks.push(Check::pass("restore", format!("pg_restore into scratch database {name}")));
                verify(&store, found, checks).await;
                store.close().await;
            }
            Err(e) => {
                checks.push(Check::fail("restore", format!("the scratch database does not open: {e}"), ""));
                skip_rest(checks, "nothing was restored");
            }
        },
        Err(e) => {
            checks.push(Check::fail("restore", e.to_string(), ""));
            skip_rest(checks, "nothing was restored");
        }
    }
    let dropped = admin.execute_raw(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)")).await;
    admin.close().await;
    checks.push(match dropped {
        Ok(_) => Check::pass("cleanup", format!("scratch database {name} dropped")),
        Err(e) => Check::fail("cleanup", format!("{name} not dropped: {e}"), format!("DROP DATABASE {name}")),
    });
}

async fn open_scratch(url: &str) -> Result<Store, crate::store::StoreError> {
    let store = Store::connect(url, &backup::small_pool()).await?;
    // A file that is not a database opens lazily; make it answer now.
    store.table_names().await?;
    Ok(store)
}

const AFTER_RESTORE: [&str; 6] =
    ["row_counts", "schema_version", "integrity", "audit_chain", "entitlements", "write_read"];

fn skip_rest(checks: &mut Checks, why: &str) {
    for name in AFTER_RESTORE {
        checks.push(Check::skip(name, format!("not run: {why}")));
    }
}

async fn verify(store: &Store, found: &Found, checks: &mut Checks) {
    let manifest = &found.manifest;
    // Counted before anything below writes to the scratch copy.
    checks.push(match store.row_counts().await {
        Ok(counts) if counts == manifest.tables => Check::pass(
            "row_counts",
            format!("{} tables, {} rows, as in the manifest", counts.len(), counts.values().sum::<i64>()),
        ),
        Ok(counts) => {
            let mut diffs = Vec::new();
            for table in
                manifest.tables.keys().chain(counts.keys()).collect::<std::collections::BTreeSet<_>>()
            {
                let (want, got) = (manifest.tables.get(table), counts.get(table));
                if want != got {
                    diffs.push(format!(
                        "{table}: manifest {}, restored {}",
                        want.map_or("—".to_owned(), i64::to_string),
                        got.map_or("—".to_owned(), i64::to_string)
                    ));
                }
            }
            Check::fail(
                "row_counts",
                diffs.join("; "),
                "the backup lost or gained rows: take a new backup and investigate",
            )
        }
        Err(e) => Check::fail("row_counts", e.to_string(), ""),
    });
    checks.push(match store.schema_status().await {
        Ok(s) if s.applied_version != Some(manifest.schema_version) => Check::fail(
            "schema_version",
            format!("restored schema {:?}, the manifest says {}", s.applied_version, manifest.schema_version),
            "",
        ),
        Ok(s) if s.is_current() => Check::pass("schema_version", format!("{} (current)", s.expected_version)),
        Ok(s) if s.applied_version.unwrap_or(0) > s.expected_version => Check::fail(
            "schema_version",
            format!(
                "backup schema {} is newer than this tollgate's {}",
                s.applied_version.unwrap_or(0),
                s.expected_version
            ),
            "run the drill with the tollgate version that took the backup",
        ),
        Ok(s) => match store.migrate().await {
            Ok(()) => Check::pass(
                "schema_version",
                format!(
                    "{} migrates cleanly to the current {}",
                    s.applied_version.unwrap_or(0),
                    s.expected_version
                ),
            ),
            Err(e) => Check::fail("schema_version", format!("migrating the restored copy failed: {e}"), ""),
        },
        Err(e) => Check::fail("schema_version", e.to_string(), ""),
    });
    checks.push(match store.integrity_problems().await {
        Ok(p) if p.is_empty() => Check::pass("integrity", "foreign keys and invariants hold"),
        Ok(p) => Check::fail("integrity", p.join("; "), ""),
        Err(e) => Check::fail("integrity", e.to_string(), ""),
    });
    checks.push(match store.verify_audit_chain().await {
        Ok(r) if r.is_intact() => Check::pass("audit_chain", format!("{} entries, head {}…", r.entries, &r.head_hash[..12])),
        Ok(r) => {
            let (seq, problem) = r.broken.unwrap_or_default();
            Check::fail("audit_chain", format!("broken at entry {seq}: {problem}"), "the audit log was altered before the backup: compare with `tollgate audit verify` on the live database")
        }
        Err(e) => Check::fail("audit_chain", e.to_string(), ""),
    });
    checks.push(Check::skip(
        "entitlements",
        "entitlements are not built yet (issue 6): nothing to recompute and compare",
    ));
    checks.push(write_read(store).await);
}

/// A write with its audit entry, read back: the restored copy is usable,
/// not just readable.
async fn write_read(store: &Store) -> Check {
    let probe = serde_json::json!({ "probe": "restore drill write check" });
    let result = async {
        let written =
            store.record_ops_run(RUN_KIND, now_unix(), true, &probe, &Actor::System("restore-drill")).await?;
        let read = store.get_ops_run(&written.id).await?;
        Ok::<_, crate::store::StoreError>((written, read))
    }
    .await;
    match result {
        Ok((w, Some(r))) if w == r => {
            Check::pass("write_read", "a write with its audit entry committed and read back")
        }
        Ok(_) => Check::fail("write_read", "the row written was not read back", ""),
        Err(e) => Check::fail("write_read", e.to_string(), ""),
    }
}

/// Records the result in the live database (for `doctor`) and next to the
/// backups. Neither failing changes the drill's verdict; both are reported.
async fn record(config: &Config, dir: &Path, report: &DrillReport) {
    let value = serde_json::to_value(report).unwrap_or_default();
    match open_live(config).await {
        Ok(Some(store)) => {
            if let Err(e) =
                store.record_ops_run(RUN_KIND, report.started_at, report.ok, &value, &Actor::Cli).await
            {
                eprintln!("warning: the drill's result was not recorded in the database: {e}");
            }
            store.close().await;
        }
        Ok(None) => {
            eprintln!("warning: the drill's result was not recorded: DATABASE_URL's file does not exist")
        }
        Err(e) => eprintln!("warning: the drill's result was not recorded in the database: {e}"),
    }
    if std::fs::create_dir_all(dir).is_ok() {
        let file = dir.join(RESULT_FILE);
        if let Err(e) = std::fs::write(&file, serde_json::to_string_pretty(&value).unwrap_or_default()) {
            eprintln!("warning: cannot write {}: {e}", file.display());
        }
    }
}

/// The live database, without creating or migrating it: operator checks
/// must not change what they look at.
pub(crate) async fn open_live(config: &Config) -> Result<Option<Store>, crate::store::StoreError> {
    let url = config.database_url.expose();
    if DbKind::from_url(url)? == DbKind::Sqlite {
        let path = url.trim_start_matches("sqlite://").trim_start_matches("sqlite:");
        let path = path.split('?').next().unwrap_or(path);
        if !Path::new(path).exists() {
            return Ok(None);
        }
    }
    Ok(Some(Store::connect(url, &backup::small_pool()).await?))
}
