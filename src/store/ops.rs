//! Operator bookkeeping (backup and restore-drill runs) and the SQL the
//! operator commands need: row counts, referential checks, retention.

use serde::Serialize;

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, DbKind, SqlxResultExt, Store, StoreResult};
use crate::ids::new_id;

/// What an operator command did, as `doctor` reads it back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct OpsRun {
    pub id: String,
    pub kind: String,
    pub started_at: i64,
    pub finished_at: i64,
    pub ok: bool,
    /// The run's report, as JSON text.
    pub report: String,
}

/// Parent links that must always resolve; a restored copy that breaks one
/// lost or mangled rows. Checked with the same query on both engines,
/// whatever each enforces (SQLite's `foreign_key_check` adds every declared
/// key there; PostgreSQL checks declared keys at restore). Kept as data so
/// a link that matters adds one line here.
pub const REFERENCES: &[(&str, &str, &str, &str)] = &[
    // (child table, child column, parent table, parent column)
    ("provider_customers", "customer_id", "customers", "id"),
    ("prices", "product_id", "products", "id"),
    ("orders", "customer_id", "customers", "id"),
    ("order_lines", "order_id", "orders", "id"),
    ("subscriptions", "customer_id", "customers", "id"),
    ("deliveries", "endpoint_id", "webhook_endpoints", "id"),
    ("deliveries", "event_id", "events", "id"),
    ("delivery_attempts", "delivery_id", "deliveries", "id"),
];

impl Store {
    /// Records a finished run with its audit entry, in one transaction.
    pub async fn record_ops_run(
        &self,
        kind: &str,
        started_at: i64,
        ok: bool,
        report: &serde_json::Value,
        actor: &Actor,
    ) -> StoreResult<OpsRun> {
        let run = OpsRun {
            id: new_id("run"),
            kind: kind.to_owned(),
            started_at,
            finished_at: now_unix(),
            ok,
            report: report.to_string(),
        };
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "INSERT INTO ops_runs (id, kind, started_at, finished_at, ok, report) VALUES ($1, $2, $3, $4, $5, $6)",
                &run.id,
                &run.kind,
                run.started_at,
                run.finished_at,
                run.ok,
                &run.report
            )
            .execute
        )
        .db()?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: &format!("ops.{kind}"),
                object_type: "ops_run",
                object_id: &run.id,
                data: serde_json::json!({ "ok": ok }),
                request_id: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(run)
    }

    pub async fn get_ops_run(&self, id: &str) -> StoreResult<Option<OpsRun>> {
        sql!(
            self,
            query_as::<OpsRun>(
                "SELECT id, kind, started_at, finished_at, ok, report FROM ops_runs WHERE id = $1",
                id
            )
            .fetch_optional
        )
        .db()
    }

    /// The newest run of a kind, passed or not.
    pub async fn last_ops_run(&self, kind: &str) -> StoreResult<Option<OpsRun>> {
        sql!(
            self,
            query_as::<OpsRun>(
                "SELECT id, kind, started_at, finished_at, ok, report FROM ops_runs WHERE kind = $1 \
                 ORDER BY finished_at DESC, id DESC LIMIT 1",
                kind
            )
            .fetch_optional
        )
        .db()
    }

    /// The application's tables (migration bookkeeping included), sorted.
    pub async fn table_names(&self) -> StoreResult<Vec<String>> {
        let q = match self.kind() {
            DbKind::Sqlite => {
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name NOT LIKE 'sqlite_%' ORDER BY name"
            }
            DbKind::Postgres => {
                "SELECT table_name::text FROM information_schema.tables \
                 WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name"
            }
        };
        sql!(self, query_scalar::<String>(q).fetch_all).db()
    }

    /// Rows per table. Names come from [`Store::table_names`], never from input.
    pub async fn row_counts(&self) -> StoreResult<std::collections::BTreeMap<String, i64>> {
        let mut counts = std::collections::BTreeMap::new();
        for table in self.table_names().await? {
            let q = format!("SELECT COUNT(*) FROM \"{table}\"");
            let n = sql!(self, query_scalar::<i64>(&q).fetch_one).db()?;
            counts.insert(table, n);
        }
        Ok(counts)
    }

    /// Broken links, one line each: [`REFERENCES`], then the engine's own
    /// checks (SQLite: page integrity and declared foreign keys).
    pub async fn integrity_problems(&self) -> StoreResult<Vec<String>> {
        let mut problems = Vec::new();
        for (child, column, parent, key) in REFERENCES {
            let q = format!(
                "SELECT COUNT(*) FROM {child} c WHERE c.{column} IS NOT NULL AND NOT EXISTS \
                 (SELECT 1 FROM {parent} p WHERE p.{key} = c.{column})"
            );
            let orphans = sql!(self, query_scalar::<i64>(&q).fetch_one).db()?;
            if orphans > 0 {
                problems.push(format!("{orphans} {child} row(s) whose {column} names no {parent}"));
            }
        }
        if self.kind() == DbKind::Sqlite {
            let pages: Vec<String> =
                sql!(self, query_scalar::<String>("PRAGMA integrity_check").fetch_all).db()?;
            if pages != ["ok"] {
                problems.push(format!("integrity_check: {}", pages.join("; ")));
            }
            let fks: Vec<(String, i64)> = sql!(
                self,
                query_as::<(String, i64)>(
                    "SELECT \"table\", COUNT(*) FROM pragma_foreign_key_check GROUP BY \"table\""
                )
                .fetch_all
            )
            .db()?;
            for (table, n) in fks {
                problems.push(format!("{n} {table} row(s) break a foreign key"));
            }
        }
        let (head_seq, max_seq): (i64, Option<i64>) = sql!(
            self,
            query_as::<(i64, Option<i64>)>(
                "SELECT h.seq, (SELECT MAX(seq) FROM audit_log) FROM audit_head h WHERE h.id = 1"
            )
            .fetch_one
        )
        .db()?;
        if head_seq != max_seq.unwrap_or(0) {
            problems.push(format!(
                "audit_head records entry {head_seq} but the newest audit entry is {}",
                max_seq.unwrap_or(0)
            ));
        }
        Ok(problems)
    }

    /// Deletes finished provider events (`processed`, `ignored`) that
    /// finished before `cutoff`, in batches, each with its audit entry.
    /// `received`, `failed` and `dead` events are never pruned: they are
    /// work still owed or evidence an operator needs. Watermarks live in
    /// their own table, so a redelivery of a pruned event is still stale.
    pub async fn prune_provider_events(&self, cutoff: i64, actor: &Actor) -> StoreResult<u64> {
        const BATCH: i64 = 1000;
        let mut total = 0;
        loop {
            let mut tx = self.begin().await?;
            let n = sql!(
                tx,
                query(
                    "DELETE FROM provider_events WHERE id IN (SELECT id FROM provider_events \
                     WHERE status IN ('processed', 'ignored') AND processed_at < $1 ORDER BY id LIMIT $2)",
                    cutoff,
                    BATCH
                )
                .execute
            )
            .db()?;
            if n > 0 {
                audit::append(
                    &mut tx,
                    AuditRecord {
                        actor,
                        action: "retention.pruned",
                        object_type: "provider_event",
                        object_id: "*",
                        data: serde_json::json!({ "count": n, "finished_before": cutoff }),
                        request_id: None,
                    },
                )
                .await?;
            }
            tx.commit().await?;
            total += n;
            if (n as i64) < BATCH {
                return Ok(total);
            }
        }
    }

    /// Outbound deliveries that succeeded before `cutoff`, with their
    /// attempts, in batches like [`Store::prune_provider_events`]. Pending,
    /// failed and dead ones are kept whatever their age: someone may still
    /// need to retry or inspect them.
    pub async fn prune_delivered_messages(&self, cutoff: i64, actor: &Actor) -> StoreResult<u64> {
        const BATCH: i64 = 1000;
        let mut total = 0;
        loop {
            let mut tx = self.begin().await?;
            let ids: Vec<String> = sql!(
                tx,
                query_scalar::<String>(
                    "SELECT id FROM deliveries WHERE status = 'succeeded' AND delivered_at < $1 ORDER BY id LIMIT $2",
                    cutoff,
                    BATCH
                )
                .fetch_all
            )
            .db()?;
            let list = serde_json::to_string(&ids)?;
            let attempts_of = super::in_json_ids(tx.kind(), "delivery_id", "$1");
            let these = super::in_json_ids(tx.kind(), "id", "$1");
            sql!(tx, query(&format!("DELETE FROM delivery_attempts WHERE {attempts_of}"), &list).execute)
                .db()?;
            let n = sql!(tx, query(&format!("DELETE FROM deliveries WHERE {these}"), &list).execute).db()?;
            if n > 0 {
                audit::append(
                    &mut tx,
                    AuditRecord {
                        actor,
                        action: "retention.pruned",
                        object_type: "delivery",
                        object_id: "*",
                        data: serde_json::json!({ "count": n, "finished_before": cutoff }),
                        request_id: None,
                    },
                )
                .await?;
            }
            tx.commit().await?;
            total += n;
            if (n as i64) < BATCH {
                return Ok(total);
            }
        }
    }
}

/// Seconds since the epoch, `days` ago.
pub fn days_ago(days: u64) -> i64 {
    now_unix() - (days as i64) * 86_400
}

/// A PostgreSQL snapshot held open for `pg_dump --snapshot`, with the row
/// counts and schema version read in that same snapshot, so the manifest
/// describes exactly what the dump contains. Dropping it ends the snapshot.
pub struct PgSnapshot {
    tx: sqlx::Transaction<'static, sqlx::Postgres>,
    pub id: String,
    pub counts: std::collections::BTreeMap<String, i64>,
    pub schema_version: i64,
}

impl PgSnapshot {
    pub async fn release(self) -> StoreResult<()> {
        self.tx.commit().await.db()
    }
}

impl Store {
    /// A SQLite file opened strictly read-only (`immutable`): no journal
    /// mode change, no `-wal`/`-shm` files, not one byte written, so a
    /// backup's checksum is unchanged by counting its rows.
    pub async fn open_sqlite_read_only(path: &std::path::Path) -> StoreResult<Store> {
        let options =
            sqlx::sqlite::SqliteConnectOptions::new().filename(path).read_only(true).immutable(true);
        let pool =
            sqlx::sqlite::SqlitePoolOptions::new().max_connections(1).connect_with(options).await.db()?;
        Ok(Store {
            backend: super::Backend::Sqlite {
                writer: pool.clone(),
                reader: pool,
                writer_connections: Default::default(),
            },
            delivery_wake: Default::default(),
            instance: super::new_instance(),
            cache: std::sync::Arc::new(super::cache::CacheHub::new(0)),
            handoff: Default::default(),
        })
    }

    /// SQLite: a consistent copy of the live database into `target` (a new
    /// file) while it keeps serving. Runs on the read side: the copy is one
    /// read transaction, so writers are not held up.
    pub async fn vacuum_into(&self, target: &std::path::Path) -> StoreResult<()> {
        let super::Backend::Sqlite { reader, .. } = &self.backend else {
            return Err(super::StoreError::InvalidUrl("VACUUM INTO needs SQLite".to_owned()));
        };
        let path =
            target.to_str().ok_or_else(|| super::StoreError::InvalidUrl("non-UTF-8 path".to_owned()))?;
        sqlx::query(&format!("VACUUM INTO '{}'", path.replace('\'', "''"))).execute(reader).await.db()?;
        Ok(())
    }

    /// PostgreSQL: opens a repeatable-read snapshot, exports it and counts
    /// every table in it.
    pub async fn export_snapshot(&self) -> StoreResult<PgSnapshot> {
        let super::Backend::Postgres(pool) = &self.backend else {
            return Err(super::StoreError::InvalidUrl("snapshots need PostgreSQL".to_owned()));
        };
        let mut tx = pool.begin_with("BEGIN ISOLATION LEVEL REPEATABLE READ READ ONLY").await.db()?;
        let id: String = sqlx::query_scalar("SELECT pg_export_snapshot()").fetch_one(&mut *tx).await.db()?;
        let tables: Vec<String> = sqlx::query_scalar(
            "SELECT table_name::text FROM information_schema.tables \
             WHERE table_schema = current_schema() AND table_type = 'BASE TABLE' ORDER BY table_name",
        )
        .fetch_all(&mut *tx)
        .await
        .db()?;
        let mut counts = std::collections::BTreeMap::new();
        for table in tables {
            let n: i64 = sqlx::query_scalar(&format!("SELECT COUNT(*) FROM \"{table}\""))
                .fetch_one(&mut *tx)
                .await
                .db()?;
            counts.insert(table, n);
        }
        let schema_version: Option<i64> =
            sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                .fetch_one(&mut *tx)
                .await
                .db()?;
        Ok(PgSnapshot { tx, id, counts, schema_version: schema_version.unwrap_or(0) })
    }
}
