//! The inbox of provider events.
//!
//! Inserts come in batches from the ingest path's group commit: one
//! transaction makes many webhooks durable at once, and each request learns
//! whether its event was new or a duplicate. Workers claim due events with a
//! lease (`locked_until`), so a crashed worker's events become claimable
//! again, and on PostgreSQL `FOR UPDATE SKIP LOCKED` keeps concurrent
//! workers on different events.

use serde::Serialize;

use super::{now_unix, sql, Listed, Page, SqlxResultExt, Store, StoreResult};
use crate::ids::new_id;

/// An event to store, already verified and parsed enough to index.
#[derive(Debug, Clone)]
pub struct NewProviderEvent {
    pub provider: &'static str,
    pub provider_event_id: String,
    pub event_type: String,
    pub object_id: Option<String>,
    pub provider_created: i64,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub body: String,
    pub source: &'static str,
    /// `received`, or `ignored` for a type tollgate does not use.
    pub initial_status: &'static str,
    /// When workers should first look at it: now, or (for a type this
    /// version cannot apply yet) far later, woken at the next start.
    pub first_attempt_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct ProviderEventRecord {
    pub id: String,
    pub provider: String,
    pub provider_event_id: String,
    pub event_type: String,
    pub object_id: Option<String>,
    pub provider_created: i64,
    pub api_version: Option<String>,
    pub livemode: bool,
    pub body: String,
    pub source: String,
    pub status: String,
    pub attempts: i64,
    pub last_error: Option<String>,
    pub next_attempt_at: i64,
    pub received_at: i64,
    pub processed_at: Option<i64>,
}

const COLUMNS: &str =
    "id, provider, provider_event_id, event_type, object_id, provider_created, api_version, livemode, \
     body, source, status, attempts, last_error, next_attempt_at, received_at, processed_at";

/// What happened to each event of a batch, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stored {
    New,
    Duplicate,
}

/// Leases waiting events to this worker until `until`, in one statement
/// (ids are tollgate's own, but bound, never spliced).
async fn lease(tx: &mut super::Tx, ids: &[&str], until: i64) -> StoreResult<()> {
    if ids.is_empty() {
        return Ok(());
    }
    let update = format!(
        "UPDATE provider_events SET locked_until = $1 WHERE status IN ('received', 'failed') AND {}",
        super::in_json_ids(tx.kind(), "id", "$2")
    );
    sql!(tx, fresh query(&update, until, serde_json::to_string(ids)?).execute).db()?;
    Ok(())
}

/// The advisory lock that serialises inbox claims on PostgreSQL.
const INBOX_CLAIM_LOCK: i64 = 0x746f_6c6c_6761_7465; // "tollgate"

impl Store {
    /// Stores a batch in one transaction. Duplicates (already in the inbox,
    /// or twice in the batch) change nothing.
    pub async fn insert_provider_events(&self, events: &[NewProviderEvent]) -> StoreResult<Vec<Stored>> {
        // Multi-row statements (one round trip per chunk) inside one
        // transaction (one commit, one fsync, for the whole batch).
        const COLUMNS_PER_ROW: usize = 14;
        const ROWS_PER_STATEMENT: usize = 256;
        let now = now_unix();
        let mut tx = self.begin().await?;
        let mut inserted = std::collections::HashSet::new();
        // Every writer inserts in the same key order, so two batches holding
        // the same events (several instances receiving one redelivery)
        // wait for each other instead of deadlocking.
        let mut ordered: Vec<&NewProviderEvent> = events.iter().collect();
        ordered.sort_by(|a, b| (a.provider, &a.provider_event_id).cmp(&(b.provider, &b.provider_event_id)));
        for chunk in ordered.chunks(ROWS_PER_STATEMENT) {
            let rows = super::value_rows(tx.kind(), chunk.len(), COLUMNS_PER_ROW);
            let sql = format!(
                "INSERT INTO provider_events (id, provider, provider_event_id, event_type, object_id, provider_created, \
                 api_version, livemode, body, source, status, next_attempt_at, received_at, processed_at) VALUES {rows} \
                 ON CONFLICT (provider, provider_event_id) DO NOTHING RETURNING provider_event_id"
            );
            macro_rules! bind_rows {
                ($query:expr) => {{
                    let mut q = $query;
                    for e in chunk {
                        q = q
                            .bind(new_id("pe"))
                            .bind(e.provider)
                            .bind(&e.provider_event_id)
                            .bind(&e.event_type)
                            .bind(&e.object_id)
                            .bind(e.provider_created)
                            .bind(&e.api_version)
                            .bind(e.livemode)
                            .bind(&e.body)
                            .bind(e.source)
                            .bind(e.initial_status)
                            .bind(e.first_attempt_at.max(now))
                            .bind(now)
                            .bind((e.initial_status == "ignored").then_some(now));
                    }
                    q
                }};
            }
            let returned: Vec<String> = match tx.exec() {
                super::Exec::Sqlite(c) => {
                    bind_rows!(sqlx::query_scalar::<_, String>(&sql)).fetch_all(c).await
                }
                super::Exec::Postgres(c) => {
                    bind_rows!(sqlx::query_scalar::<_, String>(&sql)).fetch_all(c).await
                }
            }
            .db()?;
            inserted.extend(returned);
        }
        tx.commit().await?;
        // An id inserted by this batch is new for its first occurrence only.
        Ok(events
            .iter()
            .map(|e| if inserted.remove(&e.provider_event_id) { Stored::New } else { Stored::Duplicate })
            .collect())
    }

    pub async fn get_provider_event(&self, id: &str) -> StoreResult<Option<ProviderEventRecord>> {
        let q = format!("SELECT {COLUMNS} FROM provider_events WHERE id = $1");
        sql!(self, query_as::<ProviderEventRecord>(&q, id).fetch_optional).db()
    }

    pub async fn find_provider_event(
        &self,
        provider: &str,
        provider_event_id: &str,
    ) -> StoreResult<Option<ProviderEventRecord>> {
        let q =
            format!("SELECT {COLUMNS} FROM provider_events WHERE provider = $1 AND provider_event_id = $2");
        sql!(self, query_as::<ProviderEventRecord>(&q, provider, provider_event_id).fetch_optional).db()
    }

    /// Newest first, optionally by status.
    pub async fn list_provider_events(
        &self,
        page: &Page,
        status: Option<&str>,
    ) -> StoreResult<Listed<ProviderEventRecord>> {
        self.ensure_cursor("provider_events", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let q = format!(
            "SELECT {COLUMNS} FROM provider_events WHERE ($1 IS NULL OR id {op} $1) AND ($2 IS NULL OR status = $2) \
             ORDER BY id {order} LIMIT $3"
        );
        let rows = sql!(
            self,
            query_as::<ProviderEventRecord>(&q, page.cursor(), status, page.fetch_limit()).fetch_all
        )
        .db()?;
        Ok(page.finish(rows))
    }

    /// Claims up to `limit` due events for `lease_seconds`, oldest first by
    /// the provider's clock. Claimed events are invisible to other workers
    /// until the lease lapses or the worker records an outcome.
    ///
    /// On SQLite the due events are only read, from the read side, with no
    /// lease: its one writer applies batches one after another, and the
    /// applying transaction marks each event done only if it still waits
    /// (`mark_processed`, `mark_applied`), so two workers cannot both apply
    /// one event, nor apply an object's events side by side. A lease would
    /// cost a write transaction (and an fsync) on that writer per batch,
    /// between the event's arrival and its effect.
    pub async fn claim_provider_events(
        &self,
        limit: i64,
        lease_seconds: i64,
    ) -> StoreResult<Vec<ProviderEventRecord>> {
        let now = now_unix();
        if self.kind() == super::DbKind::Sqlite {
            // Walks the waiting events in order and stops at `limit`; left to
            // itself, SQLite reads every due event and sorts them (see the
            // PostgreSQL claim below).
            let q = format!(
                "SELECT {COLUMNS} FROM provider_events INDEXED BY provider_events_waiting \
                 WHERE status IN ('received', 'failed') AND next_attempt_at <= $1 \
                 AND (locked_until IS NULL OR locked_until < $1) ORDER BY provider_created, id LIMIT $2"
            );
            return sql!(self, query_as::<ProviderEventRecord>(&q, now, limit).fetch_all).db();
        }
        let mut tx = self.begin().await?;
        let skip_locked = match tx.kind() {
            super::DbKind::Postgres => " FOR UPDATE SKIP LOCKED",
            super::DbKind::Sqlite => "",
        };
        if tx.kind() == super::DbKind::Postgres {
            // One claimer at a time (a claim is two short statements), so
            // each sees the others' committed leases below. And no sort in
            // this transaction: the claim must walk `provider_events_waiting`
            // in order and stop once its batch is full. Left to estimates,
            // the planner reads every waiting event and sorts them whenever
            // it believes few are waiting (no statistics yet, or a large
            // table whose waiting share was small when last analysed), which
            // is exactly when a backlog makes that read longest.
            sql!(
                tx,
                query(
                    "SELECT pg_advisory_xact_lock($1), set_config('enable_sort', 'off', true)",
                    INBOX_CLAIM_LOCK
                )
                .execute
            )
            .db()?;
        }
        // An object's events go to one worker at a time: none is claimed
        // while another event of its object is leased to a worker, so two
        // workers never apply one object's consecutive events side by side
        // (the older one would lose the race and be recorded as stale,
        // leaving the application without the event for the state between).
        let q = format!(
            "SELECT {COLUMNS} FROM provider_events pe \
             WHERE status IN ('received', 'failed') AND next_attempt_at <= $1 AND (locked_until IS NULL OR locked_until < $1) \
             AND NOT EXISTS (SELECT 1 FROM provider_events o WHERE o.provider = pe.provider AND o.object_id = pe.object_id \
             AND o.status IN ('received', 'failed') AND o.locked_until >= $1) \
             ORDER BY provider_created, id LIMIT $2{skip_locked}"
        );
        let rows: Vec<ProviderEventRecord> =
            sql!(tx, fresh query_as::<ProviderEventRecord>(&q, now, limit).fetch_all).db()?;
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        lease(&mut tx, &ids, now + lease_seconds).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Extends the leases of claimed events still waiting, for a batch whose
    /// provider calls took a good part of the lease before it could apply.
    pub async fn renew_provider_event_leases(&self, ids: &[&str], lease_seconds: i64) -> StoreResult<()> {
        if ids.is_empty() {
            return Ok(());
        }
        let mut tx = self.begin().await?;
        lease(&mut tx, ids, now_unix() + lease_seconds).await?;
        tx.commit().await
    }

    /// Records a failed attempt: retried at `retry_at`, or `dead` if out of attempts.
    pub async fn fail_provider_event(&self, id: &str, error: &str, retry_at: Option<i64>) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        let status = if retry_at.is_some() { "failed" } else { "dead" };
        sql!(
            tx,
            query(
                "UPDATE provider_events SET status = $1, attempts = attempts + 1, last_error = $2, \
                 next_attempt_at = $3, locked_until = NULL WHERE id = $4 AND status IN ('received', 'failed')",
                status,
                error,
                retry_at.unwrap_or(0),
                id
            )
            .execute
        )
        .db()?;
        tx.commit().await
    }

    /// Sends a dead, failed or ignored event back to be applied again now.
    pub async fn replay_provider_event(&self, id: &str, actor: &super::audit::Actor) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let changed = sql!(
            tx,
            query(
                "UPDATE provider_events SET status = 'received', next_attempt_at = $1, locked_until = NULL, last_error = NULL \
                 WHERE id = $2 AND status IN ('dead', 'failed', 'ignored', 'processed')",
                now_unix(),
                id
            )
            .execute
        )
        .db()?;
        if changed == 1 {
            super::audit::append(
                &mut tx,
                super::audit::AuditRecord {
                    actor,
                    action: "provider_event.replayed",
                    object_type: "provider_event",
                    object_id: id,
                    data: serde_json::json!({}),
                    request_id: None,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(changed == 1)
    }

    /// Leaves an event the running version cannot apply yet for later,
    /// without counting an attempt.
    pub async fn defer_provider_event(&self, id: &str, seconds: i64) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "UPDATE provider_events SET next_attempt_at = $1, locked_until = NULL WHERE id = $2",
                now_unix().saturating_add(seconds),
                id
            )
            .execute
        )
        .db()?;
        tx.commit().await
    }

    /// At start-up: events an older version deferred whose type this version
    /// applies (`types`) are due now.
    pub async fn wake_deferred_provider_events(&self, provider: &str, types: &[&str]) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let of_types = super::in_json_ids(tx.kind(), "event_type", "$3");
        let q = format!(
            "UPDATE provider_events SET next_attempt_at = $1 WHERE provider = $2 AND status = 'received' \
             AND next_attempt_at > $1 AND {of_types}"
        );
        let n = sql!(tx, query(&q, now_unix(), provider, serde_json::to_string(types)?).execute).db()?;
        tx.commit().await?;
        Ok(n)
    }

    /// Provider event ids starting with `prefix` (load tests check their own).
    pub async fn provider_event_ids_with_prefix(&self, prefix: &str) -> StoreResult<Vec<String>> {
        let pattern = format!("{}%", prefix.replace('%', "").replace('_', "\\_"));
        sql!(
            self,
            query_scalar::<String>(
                "SELECT provider_event_id FROM provider_events WHERE provider_event_id LIKE $1 ESCAPE '\\'",
                pattern
            )
            .fetch_all
        )
        .db()
    }

    /// How many events the inbox holds in each status.
    pub async fn provider_event_counts(&self) -> StoreResult<std::collections::BTreeMap<String, i64>> {
        let rows: Vec<(String, i64)> = sql!(
            self,
            query_as::<(String, i64)>("SELECT status, COUNT(*) FROM provider_events GROUP BY status")
                .fetch_all
        )
        .db()?;
        Ok(rows.into_iter().collect())
    }

    /// How many events are due to be applied now, and the oldest one's age
    /// (deferred events are not due). Answered from the `provider_events_due`
    /// index alone.
    pub async fn inbox_depth(&self) -> StoreResult<(i64, Option<i64>)> {
        let (count, oldest): (i64, Option<i64>) = sql!(
            self,
            query_as::<(i64, Option<i64>)>(
                "SELECT COUNT(*), MIN(received_at) FROM provider_events \
                 WHERE status IN ('received', 'failed') AND next_attempt_at <= $1",
                now_unix()
            )
            .fetch_one
        )
        .db()?;
        Ok((count, oldest.map(|t| now_unix() - t)))
    }
}

/// Finishes an event inside the transaction that applied it, so the effect
/// and the inbox status commit together.
/// Marks an event applied (or ignored) inside the transaction that applies
/// it, if it is still waiting: `false` when another worker already did.
/// [`mark_applied`] for a batch's applicable events at once, `processed`:
/// one statement instead of one per event. Returns the ids this
/// transaction won (the others another worker finished first).
pub async fn mark_processed(
    tx: &mut super::Tx,
    ids: &[&str],
) -> StoreResult<std::collections::HashSet<String>> {
    if ids.is_empty() {
        return Ok(Default::default());
    }
    let update = format!(
        "UPDATE provider_events SET status = 'processed', processed_at = $1, attempts = attempts + 1, \
         locked_until = NULL, last_error = NULL WHERE status IN ('received', 'failed') AND {} RETURNING id",
        super::in_json_ids(tx.kind(), "id", "$2")
    );
    let won: Vec<String> =
        sql!(tx, fresh query_scalar::<String>(&update, now_unix(), serde_json::to_string(ids)?).fetch_all)
            .db()?;
    Ok(won.into_iter().collect())
}

pub async fn mark_applied(tx: &mut super::Tx, id: &str, status: &str) -> StoreResult<bool> {
    let won = sql!(
        tx,
        query(
            "UPDATE provider_events SET status = $1, processed_at = $2, attempts = attempts + 1, locked_until = NULL, \
             last_error = NULL WHERE id = $3 AND status IN ('received', 'failed')",
            status,
            now_unix(),
            id
        )
        .execute
    )
    .db()?;
    Ok(won == 1)
}
