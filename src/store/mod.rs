//! Persistence for both supported databases.
//!
//! One `Store` hides whether tollgate runs on SQLite or PostgreSQL. Queries are
//! written once in SQL that both engines accept (`$1` placeholders, `ON
//! CONFLICT`, `RETURNING`) and dispatched to the concrete pool by the `sql!`
//! macro, so the HTTP layer and the workers are compiled once, not once per
//! backend. Where the engines really differ (locking, migrations), the
//! difference is spelled out next to the query.

use std::str::FromStr;
use std::time::Duration;

use sqlx::postgres::{PgConnectOptions, PgPoolOptions};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{PgConnection, PgPool, Postgres, Sqlite, SqliteConnection, SqlitePool, Transaction};

pub mod api_keys;
pub mod audit;
pub mod cache;
pub mod catalog;
pub mod checkout;
pub mod customers;
pub mod deliveries;
pub mod entitlements;
pub mod events;
pub mod idempotency;
pub mod ops;
pub mod orders;
pub mod provider_events;
pub mod provider_webhooks;
pub mod refunds;
pub mod signing_keys;
pub mod subscriptions;
pub mod watermarks;
pub mod webhook_endpoints;

/// Runs one sqlx query on whichever backend `$target` holds.
///
/// `$target` is anything with an `exec()` method returning [`Exec`]: the read
/// side of a [`Store`] or an open [`Tx`]. The query text and binds are the
/// same tokens for both engines; each match arm is type-checked against its
/// own database.
macro_rules! sql {
    // The query, as a named (prepared and kept) statement on PostgreSQL
    // when `$named`; SQLite keeps every statement.
    (@run $named:literal, $target:expr, query ($sql:expr $(, $arg:expr)* $(,)?) . execute) => {
        // `execute` answers with the number of rows affected: the engines'
        // own result types differ.
        match $target.exec() {
            $crate::store::Exec::Sqlite(e) => {
                sqlx::query($sql) $(.bind($arg))* .execute(e).await.map(|r| r.rows_affected())
            }
            $crate::store::Exec::Postgres(e) => {
                sqlx::query($sql).persistent($named) $(.bind($arg))* .execute(e).await.map(|r| r.rows_affected())
            }
        }
    };
    (@run $named:literal, $target:expr, $kind:ident $(::<$ty:ty>)? ($sql:expr $(, $arg:expr)* $(,)?) . $method:ident) => {
        match $target.exec() {
            $crate::store::Exec::Sqlite(e) => {
                sqlx::$kind $(::<_, $ty>)? ($sql) $(.bind($arg))* .$method(e).await
            }
            $crate::store::Exec::Postgres(e) => {
                sqlx::$kind $(::<_, $ty>)? ($sql).persistent($named) $(.bind($arg))* .$method(e).await
            }
        }
    };
    // `fresh`: planned again at every execution on PostgreSQL (an unnamed
    // statement), for the queue statements whose best plan depends on how
    // many rows wait. A named statement's plan is made generic after five
    // runs and kept: made while a table was nearly empty, it scanned the
    // whole table (or the whole backlog) for every batch once it had grown,
    // until the next ANALYZE. One planning per batch costs far less.
    ($target:expr, fresh $($query:tt)+) => {
        $crate::store::sql!(@run false, $target, $($query)+)
    };
    ($target:expr, $($query:tt)+) => {
        $crate::store::sql!(@run true, $target, $($query)+)
    };
}
pub(crate) use sql;

/// An executor for one backend or the other; see [`sql!`].
pub enum Exec<S, P> {
    Sqlite(S),
    Postgres(P),
}

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The database could not be reached or did not answer in time: callers
    /// answer 503 so clients and providers retry.
    #[error("database unavailable: {0}")]
    Unavailable(#[source] sqlx::Error),
    #[error("database error: {0}")]
    Database(#[from] sqlx::Error),
    #[error("migration failed: {0}")]
    Migrate(#[from] sqlx::migrate::MigrateError),
    #[error("invalid DATABASE_URL: {0}")]
    InvalidUrl(String),
    #[error("stored data is inconsistent: {0}")]
    Corrupt(String),
    /// A uniqueness rule stopped the change; the caller may retry.
    #[error("conflict: {0}")]
    Conflict(String),
    /// A pagination cursor that names no object in the list.
    #[error("no such object: {id} (from {param})")]
    UnknownCursor { param: &'static str, id: String },
}

impl StoreError {
    /// Separates "try again later" from bugs, so the HTTP layer can answer 503
    /// for the first and log the second.
    pub fn from_sqlx(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::WorkerCrashed => StoreError::Unavailable(err),
            sqlx::Error::Database(db) => {
                // PostgreSQL: admin shutdown, cannot connect now, too many
                // connections. SQLite: busy or locked beyond the timeout.
                let code = db.code().unwrap_or_default();
                // 40001/40P01: serialization failure or deadlock, which a
                // retry resolves; answered like an outage so callers retry.
                if matches!(
                    &*code,
                    "57P01" | "57P02" | "57P03" | "53300" | "40001" | "40P01" | "5" | "6" | "517"
                ) {
                    StoreError::Unavailable(err)
                } else {
                    StoreError::Database(err)
                }
            }
            _ => StoreError::Database(err),
        }
    }

    pub fn is_unavailable(&self) -> bool {
        matches!(self, StoreError::Unavailable(_))
    }

    /// PostgreSQL chose this transaction as a deadlock victim, or it failed
    /// to serialise: the other transaction has moved on, and running this
    /// one again succeeds.
    pub fn is_lost_race(&self) -> bool {
        match self {
            StoreError::Unavailable(sqlx::Error::Database(db)) => {
                matches!(db.code().as_deref(), Some("40P01" | "40001"))
            }
            _ => false,
        }
    }
}

pub type StoreResult<T> = Result<T, StoreError>;

/// Turns sqlx results into store results with the availability distinction.
pub(crate) trait SqlxResultExt<T> {
    fn db(self) -> StoreResult<T>;
}

impl<T> SqlxResultExt<T> for Result<T, sqlx::Error> {
    fn db(self) -> StoreResult<T> {
        self.map_err(StoreError::from_sqlx)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DbKind {
    Sqlite,
    Postgres,
}

impl DbKind {
    pub fn from_url(url: &str) -> StoreResult<Self> {
        if url.starts_with("sqlite:") {
            if url.contains(":memory:") || url.contains("mode=memory") {
                return Err(StoreError::InvalidUrl(
                    "an in-memory SQLite database would be lost on restart and is not shared between connections; use a file".to_owned(),
                ));
            }
            Ok(DbKind::Sqlite)
        } else if url.starts_with("postgres://") || url.starts_with("postgresql://") {
            Ok(DbKind::Postgres)
        } else {
            Err(StoreError::InvalidUrl("expected sqlite://PATH or postgres://…".to_owned()))
        }
    }
}

#[derive(Debug, Clone)]
pub struct StoreOptions {
    pub max_connections: u32,
    pub acquire_timeout: Duration,
    /// SQLite only: fsync every commit (`true`, survives power loss) or
    /// only at checkpoints (`false`, survives a killed process but may lose
    /// the last commits on power loss or an OS crash).
    pub sqlite_full_sync: bool,
    /// Entries per in-memory cache (entitlements, API keys); 0 turns them off.
    pub cache_capacity: usize,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 10,
            acquire_timeout: Duration::from_secs(5),
            sqlite_full_sync: true,
            cache_capacity: 100_000,
        }
    }
}

#[derive(Clone)]
enum Backend {
    /// SQLite allows one writer at a time. Funnelling every write through a
    /// one-connection pool makes that explicit (writers queue in-process
    /// instead of failing with SQLITE_BUSY), while reads use their own pool
    /// and, thanks to WAL, never wait for the writer.
    Sqlite {
        writer: SqlitePool,
        reader: SqlitePool,
        /// Connections the writer's pool has opened: the cache's poller
        /// compares `data_version` readings of one connection only (see
        /// `cache::sqlite_sync`).
        writer_connections: std::sync::Arc<std::sync::atomic::AtomicU64>,
    },
    Postgres(PgPool),
}

/// The database, whichever it is. Cheap to clone.
#[derive(Clone)]
pub struct Store {
    backend: Backend,
    /// Signalled after a commit that queued outbound deliveries, so the
    /// delivery worker in this process sends them at once instead of at
    /// its next poll.
    delivery_wake: std::sync::Arc<tokio::sync::Notify>,
    /// Names this store in the cross-instance wake-up (PostgreSQL
    /// `NOTIFY`), so its own listener skips what `delivery_wake` already
    /// signalled.
    instance: std::sync::Arc<str>,
    /// The in-memory caches every transaction invalidates on commit.
    cache: std::sync::Arc<cache::CacheHub>,
    /// Deliveries leased to this process's workers at commit.
    handoff: std::sync::Arc<deliveries::Handoff>,
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store").field("kind", &self.kind()).finish()
    }
}

impl Store {
    /// Opens the pools without touching the schema.
    ///
    /// Each connection keeps up to [`STATEMENT_CACHE`] prepared statements:
    /// the single SQLite writer alone runs some 150 statement texts (the
    /// multi-row forms come in a few sizes each), and sqlx's default of 100
    /// would evict and prepare again the ones an inbox batch runs per event.
    pub async fn connect(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let backend = match DbKind::from_url(url)? {
            DbKind::Sqlite => {
                let connect = SqliteConnectOptions::from_str(url)
                    .map_err(|e| StoreError::InvalidUrl(e.to_string()))?
                    .create_if_missing(true)
                    .journal_mode(SqliteJournalMode::Wal)
                    // With WAL, NORMAL never corrupts the database and loses
                    // nothing when the process dies; FULL (the default) also
                    // keeps every acknowledged commit through power loss.
                    .synchronous(if options.sqlite_full_sync {
                        SqliteSynchronous::Full
                    } else {
                        SqliteSynchronous::Normal
                    })
                    .foreign_keys(true)
                    .busy_timeout(Duration::from_secs(5))
                    .statement_cache_capacity(STATEMENT_CACHE);
                let writer_connections = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(0));
                let counted = writer_connections.clone();
                let writer = SqlitePoolOptions::new()
                    .max_connections(1)
                    // Kept as long as it works: a new connection makes the
                    // cache's poller start over, clearing the caches.
                    .max_lifetime(None)
                    .idle_timeout(None)
                    .after_connect(move |_, _| {
                        counted.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
                        Box::pin(async { Ok(()) })
                    })
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect.clone())
                    .await
                    .db()?;
                let reader = SqlitePoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect.read_only(true))
                    .await
                    .db()?;
                Backend::Sqlite { writer, reader, writer_connections }
            }
            DbKind::Postgres => {
                // No JIT compilation: tollgate's statements each touch a
                // few rows, and a plan costed high (a table without
                // statistics yet, or the inbox claim's `enable_sort` off,
                // whose penalty counts as cost) was compiled at every
                // execution: 200 ms of JIT for a claim that runs in 1 ms.
                let connect = PgConnectOptions::from_str(url)
                    .map_err(|e| StoreError::InvalidUrl(e.to_string()))?
                    .application_name("tollgate")
                    .options([("jit", "off")])
                    .statement_cache_capacity(STATEMENT_CACHE);
                let pool = PgPoolOptions::new()
                    .max_connections(options.max_connections.max(1))
                    .acquire_timeout(options.acquire_timeout)
                    .connect_with(connect)
                    .await
                    .db()?;
                Backend::Postgres(pool)
            }
        };
        Ok(Store {
            backend,
            handoff: Default::default(),
            delivery_wake: Default::default(),
            instance: new_instance(),
            cache: std::sync::Arc::new(cache::CacheHub::new(options.cache_capacity)),
        })
    }

    /// This store with a PostgreSQL pool of its own (`max_connections`),
    /// for work on a runtime of its own: a connection serves the runtime it
    /// was opened on, so sharing the main pool would tie the two runtimes'
    /// connections together (and break the main one's when the other
    /// stops). SQLite's connections run on threads of their own: shared.
    pub async fn with_own_pool(&self, max_connections: u32) -> StoreResult<Store> {
        let backend = match &self.backend {
            Backend::Sqlite { .. } => return Ok(self.clone()),
            Backend::Postgres(pool) => Backend::Postgres(
                PgPoolOptions::new()
                    .max_connections(max_connections.max(1))
                    .acquire_timeout(pool.options().get_acquire_timeout())
                    .connect_with((*pool.connect_options()).clone())
                    .await
                    .db()?,
            ),
        };
        Ok(Store { backend, ..self.clone() })
    }

    /// Opens the pools and brings the schema up to date.
    pub async fn connect_and_migrate(url: &str, options: &StoreOptions) -> StoreResult<Self> {
        let store = Self::connect(url, options).await?;
        store.migrate().await?;
        Ok(store)
    }

    pub fn kind(&self) -> DbKind {
        match self.backend {
            Backend::Sqlite { .. } => DbKind::Sqlite,
            Backend::Postgres(_) => DbKind::Postgres,
        }
    }

    pub async fn migrate(&self) -> StoreResult<()> {
        match &self.backend {
            Backend::Sqlite { writer, .. } => sqlx::migrate!("./migrations/sqlite").run(writer).await?,
            Backend::Postgres(pool) => sqlx::migrate!("./migrations/postgres").run(pool).await?,
        }
        Ok(())
    }

    /// The newest migration applied, and whether every embedded migration is.
    pub async fn schema_status(&self) -> StoreResult<SchemaStatus> {
        let (expected, applied): (i64, Option<i64>) = match &self.backend {
            Backend::Sqlite { reader, .. } => {
                let m = sqlx::migrate!("./migrations/sqlite");
                let expected = m.iter().map(|m| m.version).max().unwrap_or(0);
                let applied = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(reader)
                    .await
                    .ok()
                    .flatten();
                (expected, applied)
            }
            Backend::Postgres(pool) => {
                let m = sqlx::migrate!("./migrations/postgres");
                let expected = m.iter().map(|m| m.version).max().unwrap_or(0);
                let applied = sqlx::query_scalar("SELECT MAX(version) FROM _sqlx_migrations WHERE success")
                    .fetch_one(pool)
                    .await
                    .ok()
                    .flatten();
                (expected, applied)
            }
        };
        Ok(SchemaStatus { expected_version: expected, applied_version: applied })
    }

    /// Runs SQL (one or more statements) outside any transaction, on the
    /// write side: maintenance that cannot run in a transaction, such as
    /// `CREATE DATABASE`.
    pub async fn execute_raw(&self, sql: &str) -> StoreResult<u64> {
        let result = match &self.backend {
            Backend::Sqlite { writer, .. } => {
                sqlx::raw_sql(sql).execute(writer).await.map(|r| r.rows_affected())
            }
            Backend::Postgres(pool) => sqlx::raw_sql(sql).execute(pool).await.map(|r| r.rows_affected()),
        };
        result.db()
    }

    /// Stripe's rule for cursors: one that names no object in the list is an
    /// error, not a silent position.
    pub(crate) async fn ensure_cursor(&self, table: &'static str, page: &Page) -> StoreResult<()> {
        let Some(id) = page.cursor() else { return Ok(()) };
        let sql = format!("SELECT id FROM {table} WHERE id = $1");
        let found = sql!(self, query_scalar::<String>(&sql, id).fetch_optional).db()?;
        match found {
            Some(_) => Ok(()),
            None => Err(StoreError::UnknownCursor { param: page.cursor_param(), id: id.to_owned() }),
        }
    }

    /// A round trip to the database, for readiness checks.
    pub async fn ping(&self) -> StoreResult<()> {
        sql!(self, query("SELECT 1").execute).db()?;
        Ok(())
    }

    pub async fn close(&self) {
        match &self.backend {
            Backend::Sqlite { writer, reader, .. } => {
                writer.close().await;
                reader.close().await;
            }
            Backend::Postgres(pool) => pool.close().await,
        }
    }

    /// The read side: on SQLite a separate pool, so reads never queue behind
    /// the single writer.
    pub(crate) fn exec(&self) -> Exec<&SqlitePool, &PgPool> {
        match &self.backend {
            Backend::Sqlite { reader, .. } => Exec::Sqlite(reader),
            Backend::Postgres(pool) => Exec::Postgres(pool),
        }
    }

    /// Starts a write transaction. On SQLite it is `BEGIN IMMEDIATE`, taking
    /// the write lock up front: a deferred transaction that reads first and
    /// writes later can fail at commit when another process wrote meanwhile.
    pub(crate) async fn begin(&self) -> StoreResult<Tx> {
        let inner = match &self.backend {
            Backend::Sqlite { writer, .. } => {
                TxInner::Sqlite(writer.begin_with("BEGIN IMMEDIATE").await.db()?)
            }
            Backend::Postgres(pool) => TxInner::Postgres(pool.begin().await.db()?),
        };
        Ok(Tx {
            inner,
            wake: self.delivery_wake.clone(),
            instance: self.instance.clone(),
            deliveries_queued: false,
            cache: self.cache.clone(),
            invalidates: Vec::new(),
            audit: Vec::new(),
            endpoints: None,
            price_links: Default::default(),
            pending_events: Vec::new(),
            entitlements_due: Vec::new(),
            provider_links: Default::default(),
            subscriptions_read: Default::default(),
            defer_rows: false,
            deferred: DeferredRows::default(),
            handoff: self.handoff.clone(),
            handed: Vec::new(),
            pg: match &self.backend {
                Backend::Postgres(pool) => Some(pool.clone()),
                Backend::Sqlite { .. } => None,
            },
        })
    }

    /// This process's caches: their counters, and its instance id.
    pub fn cache(&self) -> &cache::CacheHub {
        &self.cache
    }

    /// What the delivery worker waits on between polls.
    pub fn delivery_wake(&self) -> std::sync::Arc<tokio::sync::Notify> {
        self.delivery_wake.clone()
    }

    /// This store's name in cross-instance wake-ups.
    pub fn instance(&self) -> &str {
        &self.instance
    }

    /// The PostgreSQL pool, for what only PostgreSQL offers (`LISTEN`).
    pub fn postgres_pool(&self) -> Option<&PgPool> {
        match &self.backend {
            Backend::Postgres(pool) => Some(pool),
            Backend::Sqlite { .. } => None,
        }
    }
}

/// Prepared statements kept per connection (see [`Store::connect`]).
const STATEMENT_CACHE: usize = 400;

pub(crate) fn new_instance() -> std::sync::Arc<str> {
    crate::ids::new_id("inst").into()
}

#[derive(Debug, Clone, Copy, serde::Serialize)]
pub struct SchemaStatus {
    pub expected_version: i64,
    pub applied_version: Option<i64>,
}

impl SchemaStatus {
    pub fn is_current(&self) -> bool {
        self.applied_version == Some(self.expected_version)
    }
}

enum TxInner {
    Sqlite(Transaction<'static, Sqlite>),
    Postgres(Transaction<'static, Postgres>),
}

/// A write transaction on either backend. Dropped without `commit`, it rolls back.
pub struct Tx {
    inner: TxInner,
    wake: std::sync::Arc<tokio::sync::Notify>,
    instance: std::sync::Arc<str>,
    /// Set when it queued deliveries for any worker's claim (not handed
    /// to this process's workers): committing wakes the delivery workers,
    /// on PostgreSQL every instance's.
    deliveries_queued: bool,
    cache: std::sync::Arc<cache::CacheHub>,
    /// Cache keys whose entries this transaction changes (encoded).
    invalidates: Vec<String>,
    /// Audit entries recorded so far, chained at commit (see [`audit::append`]).
    pub(crate) audit: Vec<audit::PendingEntry>,
    /// The enabled webhook endpoints and their event filters, read once per
    /// transaction by the first event it emits (an inbox batch emits
    /// dozens); forgotten when the transaction changes an endpoint.
    pub(crate) endpoints: Option<deliveries::EndpointFilters>,
    /// The catalog price and product each provider price maps to, read once
    /// per transaction (see `orders::resolve_price`): an inbox batch often
    /// names the same few prices dozens of times; cleared by
    /// [`Tx::catalog_changed`].
    pub(crate) price_links: std::collections::HashMap<(String, String), (Option<String>, Option<String>)>,
    /// Events emitted but not yet written (see [`events::PendingEvent`]).
    pub(crate) pending_events: Vec<events::PendingEvent>,
    /// Customers whose entitlements are recomputed when the events are
    /// written (see [`entitlements::recompute_later`]).
    pub(crate) entitlements_due: Vec<entitlements::DueRecompute>,
    /// Provider customers' links read ahead for an inbox batch (see
    /// [`customers::read_links`]); `None`: not linked when read. Every
    /// write of a link in the transaction replaces or forgets its entry
    /// (a claim that moves links forgets them all: [`Tx::owners_changed`]).
    pub(crate) provider_links: std::collections::HashMap<(String, String), Option<String>>,
    /// Subscriptions read ahead for an inbox batch (see
    /// [`subscriptions::read_many`]), each used once.
    pub(crate) subscriptions_read:
        std::collections::HashMap<(String, String), Option<subscriptions::SubscriptionRow>>,
    /// Set by the inbox while it applies a batch's subscription events:
    /// the rows those events create or replace (placeholder
    /// customers, their links, subscription snapshots) wait in
    /// [`Tx::deferred`] and are written together before any statement could
    /// read them (see [`Tx::write_deferred`]).
    pub(crate) defer_rows: bool,
    pub(crate) deferred: DeferredRows,
    /// Where deliveries leased at commit go, and those queued so far.
    pub(crate) handoff: std::sync::Arc<deliveries::Handoff>,
    pub(crate) handed: Vec<deliveries::Handed>,
    /// The pool it came from (PostgreSQL), for what its commit asks after.
    pg: Option<PgPool>,
}

/// Rows a transaction writes later, together (see [`Tx::defer_rows`]).
/// Each was one statement per provider event, a round trip (on SQLite
/// through the one writer); written together, a batch's rows of each table
/// take one multi-row statement per [`events::CHUNKS`] size.
#[derive(Default)]
pub(crate) struct DeferredRows {
    pub(crate) customers: Vec<customers::DeferredCustomer>,
    pub(crate) links: Vec<customers::DeferredLink>,
    pub(crate) subscriptions: Vec<subscriptions::DeferredSubscription>,
}

/// A point inside a [`Tx`] to roll back to, undoing one unit of work (one
/// provider event of a batch) without losing the rest.
#[must_use]
pub(crate) struct Savepoint {
    audit_len: usize,
    handed_len: usize,
}

impl Tx {
    /// Names a cached entry this transaction changes: committing drops it
    /// here and, through the database, in every other instance (see
    /// [`cache`]). Every write to entitlements, to the customer an
    /// external id names, or to an API key's validity must call this.
    pub(crate) fn invalidate(&mut self, key: cache::CacheKey) {
        let key = key.encode();
        if !self.invalidates.contains(&key) {
            self.invalidates.push(key);
        }
    }

    /// Called by a transaction that writes the catalog or its provider
    /// links: what it resolved before no longer holds.
    pub(crate) fn catalog_changed(&mut self) {
        self.price_links.clear();
    }

    /// Called by a transaction that moves what customers own (a merge):
    /// links read ahead no longer hold.
    pub(crate) fn owners_changed(&mut self) {
        self.provider_links.clear();
        self.subscriptions_read.clear();
    }

    /// Writes the rows held back (see [`Tx::defer_rows`]), owners before
    /// what they own. Every statement that could read those tables calls
    /// this first: the entitlements recomputation (so every flush of
    /// events, savepoint and commit), reads of customers and links, and the
    /// inbox before it applies an event of another kind. A row that
    /// conflicts (the application owns a customer with that external id,
    /// or on PostgreSQL another transaction wrote the row since the batch
    /// read) fails the statement and so the batch, which is then applied
    /// event by event without deferring (`inbox_batch_fallbacks_total`).
    pub(crate) async fn write_deferred(&mut self) -> StoreResult<()> {
        if self.deferred.customers.is_empty()
            && self.deferred.links.is_empty()
            && self.deferred.subscriptions.is_empty()
        {
            return Ok(());
        }
        let rows = std::mem::take(&mut self.deferred);
        customers::write_deferred(self, &rows.customers, &rows.links).await?;
        subscriptions::write_deferred(self, &rows.subscriptions).await
    }

    /// Called by every write to `webhook_endpoints` in this transaction.
    pub(crate) fn endpoints_changed(&mut self) {
        self.endpoints = None;
    }

    /// Marks where the next unit of work starts. Both engines nest
    /// savepoints of one name as a stack; tollgate uses one level.
    pub(crate) async fn savepoint(&mut self) -> StoreResult<Savepoint> {
        // Events held back so far are written before the savepoint: written
        // inside it (by a later flush), a rollback to it would lose them.
        events::flush(self).await?;
        sql!(self, query("SAVEPOINT unit").execute).db()?;
        Ok(Savepoint { audit_len: self.audit.len(), handed_len: self.handed.len() })
    }

    /// Keeps the unit's work in the transaction.
    pub(crate) async fn release(&mut self, _point: Savepoint) -> StoreResult<()> {
        sql!(self, query("RELEASE SAVEPOINT unit").execute).db()?;
        Ok(())
    }

    /// Undoes the unit's work, including the audit entries it recorded.
    /// (Cache keys it named stay named: invalidating too much is harmless.)
    pub(crate) async fn rollback_to(&mut self, point: Savepoint) -> StoreResult<()> {
        sql!(self, query("ROLLBACK TO SAVEPOINT unit").execute).db()?;
        sql!(self, query("RELEASE SAVEPOINT unit").execute).db()?;
        self.audit.truncate(point.audit_len);
        self.handed.truncate(point.handed_len);
        // None were held (or due) when the savepoint was taken. What was
        // read ahead may have been read or changed by the undone unit.
        self.pending_events.clear();
        self.entitlements_due.clear();
        self.deferred = DeferredRows::default();
        self.owners_changed();
        Ok(())
    }

    pub(crate) fn exec(&mut self) -> Exec<&mut SqliteConnection, &mut PgConnection> {
        match &mut self.inner {
            TxInner::Sqlite(tx) => Exec::Sqlite(&mut **tx),
            TxInner::Postgres(tx) => Exec::Postgres(&mut **tx),
        }
    }

    pub(crate) fn kind(&self) -> DbKind {
        match self.inner {
            TxInner::Sqlite(_) => DbKind::Sqlite,
            TxInner::Postgres(_) => DbKind::Postgres,
        }
    }

    /// Commits; then drops the cache entries the transaction changed,
    /// here and in every instance that may serve them (on PostgreSQL it
    /// returns only once they have acknowledged, or their leases ran out),
    /// and only then wakes the delivery worker. See [`cache`].
    pub async fn commit(mut self) -> StoreResult<()> {
        events::flush(&mut self).await?;
        let pending = std::mem::take(&mut self.audit);
        audit::flush(&mut self, pending).await?;
        let Tx {
            mut inner,
            wake,
            instance,
            deliveries_queued,
            cache,
            invalidates: keys,
            handoff,
            handed,
            pg,
            ..
        } = self;
        if let (true, TxInner::Postgres(tx)) = (deliveries_queued, &mut inner) {
            // Inside the transaction: PostgreSQL delivers it on commit, and
            // not at all on rollback, so other instances' delivery workers
            // wake exactly when there is something to claim.
            sqlx::query("SELECT pg_notify($1, $2)")
                .bind(crate::delivery::listen::CHANNEL)
                .bind(&*instance)
                .execute(&mut **tx)
                .await
                .map_err(StoreError::from_sqlx)?;
        }
        let mut seq = None;
        if !keys.is_empty() {
            cache.pin(&keys);
            if let TxInner::Postgres(tx) = &mut inner {
                let (s, payload) = cache.begin_commit(&keys);
                let sent = sqlx::query("SELECT pg_notify($1, $2)")
                    .bind(cache::CHANNEL)
                    .bind(payload)
                    .execute(&mut **tx)
                    .await;
                if let Err(e) = sent {
                    cache.unpin(&keys);
                    cache.abandon_commit(s);
                    return Err(StoreError::from_sqlx(e));
                }
                seq = Some(s);
            }
        }
        let hand_over = HandOver { handoff, handed };
        let committed = match inner {
            TxInner::Sqlite(tx) => tx.commit().await.db(),
            TxInner::Postgres(tx) => tx.commit().await.db(),
        };
        if !keys.is_empty() {
            cache.unpin(&keys);
        }
        if let Err(e) = committed {
            if let Some(s) = seq {
                cache.abandon_commit(s);
            }
            return Err(e);
        }
        match seq {
            Some(s) => cache.await_peers(s, pg.as_ref()).await,
            None if !keys.is_empty() => cache.await_sqlite_server().await,
            None => {}
        }
        drop(hand_over);
        if deliveries_queued {
            wake.notify_waiters();
            wake.notify_one();
        }
        Ok(())
    }
}

/// Hands a commit's leased deliveries to this process's workers when
/// dropped: after the commit's cache acknowledgements on the way to `Ok`
/// (a delivery must not overtake the invalidation of what it announces),
/// at once if the commit failed or its caller stopped waiting (a request
/// timed out). Left out, they would stay leased to nobody until the lease
/// lapsed, holding back their customers' later deliveries; one whose
/// transaction did not commit is simply not found by the take.
struct HandOver {
    handoff: std::sync::Arc<deliveries::Handoff>,
    handed: Vec<deliveries::Handed>,
}

impl Drop for HandOver {
    fn drop(&mut self) {
        if !self.handed.is_empty() {
            self.handoff.push(std::mem::take(&mut self.handed));
        }
    }
}

/// `column` is one of the ids in the JSON array bound at `param` (`$2`, or
/// `?`): one statement text whatever the list's length, so one prepared
/// statement (a placeholder per id would prepare a new statement for every
/// length), and one statement, one round trip (on SQLite to the one
/// writer's thread), for a whole batch's list. On PostgreSQL the list is
/// an array (`= ANY`), not an `IN` subquery: the planner cannot see a
/// subquery's length and joined it against every row matching the rest of
/// the `WHERE` (a whole backlog of waiting events, for 32 ids), where an
/// array is looked up in the column's index.
///
/// On PostgreSQL, run such a statement `fresh` (see [`sql!`]): planned
/// once and kept, its generic plan made while the table was small scans
/// the whole table for every list once the table has grown (an inbox
/// batch's read-ahead statements, lists in a named statement, took 25 ms
/// each that way in the delivery loadtest; docs/performance.md, session
/// 10). Where the list's column is not first in its index, see
/// [`provider_rows_in`].
pub(crate) fn in_json_ids(kind: DbKind, column: &str, param: &str) -> String {
    match kind {
        DbKind::Sqlite => format!("{column} IN (SELECT value FROM json_each({param}))"),
        DbKind::Postgres => {
            format!("{column} = ANY(ARRAY(SELECT jsonb_array_elements_text({param}::jsonb)))")
        }
    }
}

/// A statement reading the rows of `table` (a provider's objects, keyed by
/// `provider` and `column`, with a unique index on both) whose `column`
/// is one of the ids in the JSON array bound at `$2`, `provider` at `$1`;
/// held `FOR SHARE` on PostgreSQL when `share` (in the order of the ids).
///
/// On PostgreSQL each id is looked up in the index on its own (a lateral
/// subquery the planner cannot flatten): with a list in the `WHERE`, a
/// table not analysed yet (a new database's first minute) is thought to
/// hold a handful of rows per provider, so the index was used for
/// `provider` alone and every row of the provider was read and filtered,
/// about a millisecond per 3,000 rows for every inbox batch. This plan is
/// the same whatever the statistics, so the statement is kept prepared.
pub(crate) fn provider_rows_in(
    kind: DbKind,
    columns: &str,
    table: &str,
    column: &str,
    share: bool,
) -> String {
    match kind {
        DbKind::Sqlite => format!(
            "SELECT {columns} FROM {table} WHERE provider = $1 AND {column} IN (SELECT value FROM json_each($2))"
        ),
        DbKind::Postgres => {
            let fence = if share { "FOR SHARE" } else { "OFFSET 0" };
            format!(
                "SELECT found.* FROM jsonb_array_elements_text(CAST($2 AS JSONB)) AS listed(id) \
                 CROSS JOIN LATERAL (SELECT {columns} FROM {table} \
                 WHERE provider = $1 AND {column} = listed.id {fence}) found"
            )
        }
    }
}

/// The `VALUES` list of a multi-row statement: `(?, ?), (?, ?)` on SQLite,
/// which resolves a numbered parameter's name with a linear search (so
/// hundreds of `$n` are quadratic) while plain `?` is positional;
/// `($1, $2), ($3, $4)` on PostgreSQL.
pub(crate) fn value_rows(kind: DbKind, rows: usize, columns: usize) -> String {
    let row = |r: usize| {
        let params: Vec<String> = (1..=columns)
            .map(|c| match kind {
                DbKind::Sqlite => "?".to_owned(),
                DbKind::Postgres => format!("${}", r * columns + c),
            })
            .collect();
        format!("({})", params.join(", "))
    };
    (0..rows).map(row).collect::<Vec<_>>().join(", ")
}

/// Seconds since the Unix epoch: the unit every stored timestamp uses, so
/// that comparisons and sorting behave the same on both engines.
pub fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs() as i64)
        .unwrap_or(0)
}

/// Whether an error is a unique-constraint violation, on either engine.
pub(crate) fn is_unique_violation(err: &sqlx::Error) -> bool {
    matches!(err, sqlx::Error::Database(db) if db.is_unique_violation())
}

/// Which way a list walks from its cursor.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Cursor {
    None,
    /// `starting_after`: the page after this object, in list order.
    After(String),
    /// `ending_before`: the page before this object, in list order.
    Before(String),
}

/// A validated page request (Stripe's `limit`, `starting_after`,
/// `ending_before`). Queries fetch one row more than asked to learn
/// `has_more` without a count.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Page {
    limit: i64,
    cursor: Cursor,
}

/// One page of results in list order, and whether more lie beyond it in the
/// direction walked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listed<T> {
    pub data: Vec<T>,
    pub has_more: bool,
}

impl Page {
    pub const DEFAULT_LIMIT: i64 = 10;
    pub const MAX_LIMIT: i64 = 100;

    pub fn first(limit: i64) -> Self {
        Self { limit: limit.clamp(1, Self::MAX_LIMIT), cursor: Cursor::None }
    }

    pub fn after(limit: i64, id: String) -> Self {
        Self { cursor: Cursor::After(id), ..Self::first(limit) }
    }

    pub fn before(limit: i64, id: String) -> Self {
        Self { cursor: Cursor::Before(id), ..Self::first(limit) }
    }

    pub fn cursor(&self) -> Option<&str> {
        match &self.cursor {
            Cursor::None => None,
            Cursor::After(id) | Cursor::Before(id) => Some(id),
        }
    }

    /// The query parameter the cursor came from, for error messages.
    pub fn cursor_param(&self) -> &'static str {
        match self.cursor {
            Cursor::Before(_) => "ending_before",
            _ => "starting_after",
        }
    }

    /// `ending_before` walks against list order: the query sorts the other
    /// way and [`Page::finish`] puts the rows back.
    pub fn is_backwards(&self) -> bool {
        matches!(self.cursor, Cursor::Before(_))
    }

    pub fn fetch_limit(&self) -> i64 {
        self.limit + 1
    }

    pub fn finish<T>(&self, mut rows: Vec<T>) -> Listed<T> {
        let has_more = rows.len() as i64 > self.limit;
        rows.truncate(self.limit as usize);
        if self.is_backwards() {
            rows.reverse();
        }
        Listed { data: rows, has_more }
    }
}

/// Runs a transaction again (a few times, after a short random pause) when it
/// lost a race to a concurrent one (see [`StoreError::is_lost_race`]): an API
/// request applying a provider's answer can meet the inbox worker applying
/// the same object's webhook, and the caller should not see a 503 for it.
pub(crate) async fn retry_lost_races<T, F, Fut>(mut attempt: F) -> StoreResult<T>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = StoreResult<T>>,
{
    let mut tries = 0u32;
    loop {
        match attempt().await {
            Err(e) if tries < 5 && e.is_lost_race() => {
                tries += 1;
                let pause = rand::random::<u64>() % (10 * u64::from(tries)) + 1;
                tokio::time::sleep(std::time::Duration::from_millis(pause)).await;
            }
            other => return other,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn value_rows_number_postgres_parameters_across_rows_and_keep_sqlite_positional() {
        assert_eq!(value_rows(DbKind::Postgres, 2, 3), "($1, $2, $3), ($4, $5, $6)");
        assert_eq!(value_rows(DbKind::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(value_rows(DbKind::Postgres, 1, 1), "($1)");
    }
}
