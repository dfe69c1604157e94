//! `tollgate backup`: a consistent copy of the live database, taken while it
//! serves, with a manifest that lets a restore drill prove the copy whole.
//!
//! SQLite: `VACUUM INTO` a new file (one read transaction), then the row
//! counts are read from that file. PostgreSQL: `pg_dump --format=custom`
//! bound to a snapshot exported from a repeatable-read transaction that
//! also counts the rows, so counts and dump are the same instant. Each
//! backup is `tollgate-<time>.{sqlite,pgdump}` plus
//! `tollgate-<time>.manifest.json`, written last: a backup without its
//! manifest is incomplete and ignored.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::store::{DbKind, Store, StoreError, StoreOptions};

pub const MANIFEST_SUFFIX: &str = ".manifest.json";
const MANIFEST_FORMAT: u32 = 1;

#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("{context}: {source}")]
    Io {
        context: String,
        #[source]
        source: std::io::Error,
    },
    #[error("{program} was not found on PATH: install the PostgreSQL client tools (the server's major version or newer), e.g. `apt-get install postgresql-client`")]
    ToolMissing { program: &'static str },
    #[error("{program} failed ({status}): {stderr}")]
    ToolFailed { program: &'static str, status: String, stderr: String },
    #[error("{0}")]
    Invalid(String),
}

pub(crate) fn io(context: impl Into<String>) -> impl FnOnce(std::io::Error) -> BackupError {
    let context = context.into();
    move |source| BackupError::Io { context, source }
}

/// What a backup holds, written next to it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format: u32,
    /// RFC 3339, UTC.
    pub created_at: String,
    pub created_unix: i64,
    pub database: DbKind,
    /// The backup file's name, in the manifest's directory.
    pub file: String,
    pub bytes: u64,
    /// SHA-256 of the backup file, hex.
    pub sha256: String,
    pub schema_version: i64,
    pub tollgate_version: String,
    /// Rows per table at the instant of the backup.
    pub tables: BTreeMap<String, i64>,
}

/// A manifest found on disk, with where it lies.
#[derive(Debug, Clone)]
pub struct Found {
    pub manifest: Manifest,
    pub manifest_path: PathBuf,
}

impl Found {
    pub fn backup_path(&self) -> PathBuf {
        self.manifest_path.with_file_name(&self.manifest.file)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct BackupReport {
    pub manifest: Manifest,
    pub path: PathBuf,
    /// Older backups deleted by `BACKUP_KEEP`.
    pub removed: Vec<String>,
}

/// Takes a backup of `DATABASE_URL` into `dir` and keeps the newest `keep`.
#[tracing::instrument(skip_all, fields(dir = %dir.display()))]
pub async fn backup(config: &Config, dir: &Path, keep: usize) -> Result<BackupReport, BackupError> {
    std::fs::create_dir_all(dir).map_err(io(format!("cannot create {}", dir.display())))?;
    let now = time::OffsetDateTime::now_utc();
    let stem = format!(
        "tollgate-{:04}{:02}{:02}T{:02}{:02}{:02}{:03}Z",
        now.year(),
        u8::from(now.month()),
        now.day(),
        now.hour(),
        now.minute(),
        now.second(),
        now.millisecond()
    );
    let url = config.database_url.expose();
    let kind = DbKind::from_url(url)?;
    let ext = match kind {
        DbKind::Sqlite => "sqlite",
        DbKind::Postgres => "pgdump",
    };
    let file = format!("{stem}.{ext}");
    let path = dir.join(&file);
    // Written under a temporary name and renamed, so a crash never leaves
    // a half-written file under a backup's name.
    let partial = dir.join(format!("{file}.partial"));
    let result = match kind {
        DbKind::Sqlite => sqlite_backup(config, &partial).await,
        DbKind::Postgres => postgres_backup(config, &partial).await,
    };
    let (tables, schema_version) = match result {
        Ok(r) => r,
        Err(e) => {
            let _ = std::fs::remove_file(&partial);
            return Err(e);
        }
    };
    std::fs::rename(&partial, &path).map_err(io(format!("cannot rename {}", partial.display())))?;
    let (bytes, sha256) = sha256_file(&path).map_err(io(format!("cannot read {}", path.display())))?;
    let manifest = Manifest {
        format: MANIFEST_FORMAT,
        created_at: now
            .format(&time::format_description::well_known::Rfc3339)
            .map_err(|e| BackupError::Invalid(e.to_string()))?,
        created_unix: now.unix_timestamp(),
        database: kind,
        file,
        bytes,
        sha256,
        schema_version,
        tollgate_version: env!("CARGO_PKG_VERSION").to_owned(),
        tables,
    };
    write_manifest(&dir.join(format!("{stem}{MANIFEST_SUFFIX}")), &manifest)?;
    let removed = prune(dir, keep.max(1))?;
    Ok(BackupReport { manifest, path, removed })
}

async fn sqlite_backup(config: &Config, target: &Path) -> Result<(BTreeMap<String, i64>, i64), BackupError> {
    let live = super::drill::open_live(config)
        .await?
        .ok_or_else(|| BackupError::Invalid(format!("{} does not exist", config.database_url.redacted())))?;
    let copied = live.vacuum_into(target).await;
    live.close().await;
    copied?;
    // Counted from the copy itself: it is exactly what was captured.
    let copy = Store::open_sqlite_read_only(target).await?;
    let counted =
        async { Ok::<_, StoreError>((copy.row_counts().await?, copy.schema_status().await?)) }.await;
    copy.close().await;
    let (tables, schema) = counted?;
    Ok((tables, schema.applied_version.unwrap_or(0)))
}

async fn postgres_backup(
    config: &Config,
    target: &Path,
) -> Result<(BTreeMap<String, i64>, i64), BackupError> {
    let live = Store::connect(config.database_url.expose(), &small_pool()).await?;
    let snapshot = live.export_snapshot().await?;
    let conn = LibpqTarget::from_url(config.database_url.expose())?;
    let args = vec![
        "--format=custom".to_owned(),
        format!("--snapshot={}", snapshot.id),
        format!("--file={}", target.display()),
        format!("--dbname={}", conn.uri),
    ];
    let dumped = run_tool("pg_dump", args, conn.password.clone()).await;
    let (counts, schema_version) = (snapshot.counts.clone(), snapshot.schema_version);
    // The snapshot must stay open until pg_dump has finished with it.
    snapshot.release().await?;
    live.close().await;
    dumped?;
    Ok((counts, schema_version))
}

/// Pools for a one-off command: no more connections than it uses.
pub(crate) fn small_pool() -> StoreOptions {
    StoreOptions { max_connections: 2, ..StoreOptions::default() }
}

pub(crate) fn sqlite_url(path: &Path) -> String {
    format!("sqlite://{}", path.display())
}

/// A PostgreSQL URL as libpq tools take it: the password moved out of the
/// URI (it would show in the process list) into `PGPASSWORD`.
pub(crate) struct LibpqTarget {
    pub uri: String,
    pub password: Option<String>,
}

impl LibpqTarget {
    pub fn from_url(url: &str) -> Result<Self, BackupError> {
        let mut parsed =
            reqwest::Url::parse(url).map_err(|e| BackupError::Invalid(format!("DATABASE_URL: {e}")))?;
        let password = parsed
            .password()
            .map(|p| percent_encoding::percent_decode_str(p).decode_utf8_lossy().into_owned());
        let _ = parsed.set_password(None);
        Ok(LibpqTarget { uri: parsed.to_string(), password })
    }

    /// The same server, another database.
    pub fn with_database(url: &str, database: &str) -> Result<String, BackupError> {
        let mut parsed =
            reqwest::Url::parse(url).map_err(|e| BackupError::Invalid(format!("database URL: {e}")))?;
        parsed.set_path(&format!("/{database}"));
        Ok(parsed.to_string())
    }
}

/// Runs a PostgreSQL client tool to completion; its stderr is the error.
pub(crate) async fn run_tool(
    program: &'static str,
    args: Vec<String>,
    password: Option<String>,
) -> Result<(), BackupError> {
    let output = tokio::task::spawn_blocking(move || {
        let mut cmd = std::process::Command::new(program);
        cmd.args(&args).stdin(std::process::Stdio::null());
        if let Some(p) = password {
            cmd.env("PGPASSWORD", p);
        }
        cmd.output()
    })
    .await
    .map_err(|e| BackupError::Invalid(format!("{program}: {e}")))?;
    let output = match output {
        Ok(o) => o,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err(BackupError::ToolMissing { program })
        }
        Err(e) => return Err(io(format!("cannot run {program}"))(e)),
    };
    if output.status.success() {
        Ok(())
    } else {
        let stderr = String::from_utf8_lossy(&output.stderr);
        Err(BackupError::ToolFailed {
            program,
            status: output.status.to_string(),
            stderr: stderr.lines().take(5).collect::<Vec<_>>().join(" / "),
        })
    }
}

pub fn sha256_file(path: &Path) -> std::io::Result<(u64, String)> {
    let mut file = std::fs::File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 1 << 16];
    let mut total = 0u64;
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            break;
        }
        total += n as u64;
        hasher.update(&buf[..n]);
    }
    Ok((total, hex::encode(hasher.finalize())))
}

fn write_manifest(path: &Path, manifest: &Manifest) -> Result<(), BackupError> {
    let text = serde_json::to_string_pretty(manifest).map_err(|e| BackupError::Invalid(e.to_string()))?;
    let partial = path.with_extension("partial");
    std::fs::write(&partial, text).map_err(io(format!("cannot write {}", partial.display())))?;
    std::fs::rename(&partial, path).map_err(io(format!("cannot write {}", path.display())))
}

/// Every complete backup in `dir`, oldest first. Unreadable manifests are
/// skipped with a warning: one bad file must not hide the others.
pub fn list(dir: &Path) -> Result<Vec<Found>, BackupError> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(io(format!("cannot read {}", dir.display()))(e)),
    };
    let mut found = Vec::new();
    for entry in entries {
        let path = entry.map_err(io(format!("cannot read {}", dir.display())))?.path();
        if !path.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.ends_with(MANIFEST_SUFFIX)) {
            continue;
        }
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|t| serde_json::from_str::<Manifest>(&t).map_err(|e| e.to_string()));
        match parsed {
            Ok(manifest) => found.push(Found { manifest, manifest_path: path }),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable backup manifest skipped")
            }
        }
    }
    found.sort_by(|a, b| {
        (a.manifest.created_unix, &a.manifest.file).cmp(&(b.manifest.created_unix, &b.manifest.file))
    });
    Ok(found)
}

/// Deletes all but the newest `keep` backups: the manifest first, so a
/// crash in between leaves a stray file, never a manifest without its file.
fn prune(dir: &Path, keep: usize) -> Result<Vec<String>, BackupError> {
    let found = list(dir)?;
    let excess = found.len().saturating_sub(keep);
    let mut removed = Vec::new();
    for old in &found[..excess] {
        std::fs::remove_file(&old.manifest_path)
            .map_err(io(format!("cannot remove {}", old.manifest_path.display())))?;
        match std::fs::remove_file(old.backup_path()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(io(format!("cannot remove {}", old.backup_path().display()))(e)),
        }
        removed.push(old.manifest.file.clone());
    }
    Ok(removed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_password_leaves_the_uri_for_pgpassword() {
        let t = LibpqTarget::from_url(
            "postgres://tollgate:p%40ss%2Fw0rd@db.internal:5432/tollgate?sslmode=require",
        )
        .unwrap();
        assert_eq!(t.uri, "postgres://tollgate@db.internal:5432/tollgate?sslmode=require");
        assert_eq!(t.password.as_deref(), Some("p@ss/w0rd"));
        let t = LibpqTarget::from_url("postgres://postgres@127.0.0.1/postgres").unwrap();
        assert_eq!(t.password, None);
        assert_eq!(
            LibpqTarget::with_database("postgres://u:pw@h:5432/live?sslmode=require", "tollgate_drill_x")
                .unwrap(),
            "postgres://u:pw@h:5432/tollgate_drill_x?sslmode=require"
        );
    }
}
