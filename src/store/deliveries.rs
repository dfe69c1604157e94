//! Outbound deliveries: one row per (endpoint, event), queued in the
//! transaction that writes the event and drained by `delivery::worker`.
//!
//! Order per customer per endpoint is kept by the claim itself: a delivery
//! is claimable only while no earlier delivery (by event id, and event ids
//! sort in the order events happened) for the same endpoint and customer is
//! still pending or failed awaiting a retry. Dead deliveries no longer
//! block, so one poisoned event cannot stall a customer forever.

use serde::Serialize;

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, Listed, Page, SqlxResultExt, Store, StoreResult, Tx};
use crate::ids::new_id;

/// A bound value of a statement built at run time.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Value {
    Int(i64),
    OptInt(Option<i64>),
    Text(String),
    OptText(Option<String>),
}

macro_rules! bind_values {
    ($query:expr, $values:expr) => {{
        let mut q = $query;
        for v in $values {
            q = match v {
                Value::Int(i) => q.bind(*i),
                Value::OptInt(i) => q.bind(*i),
                Value::Text(t) => q.bind(t.as_str()),
                Value::OptText(t) => q.bind(t.as_deref()),
            };
        }
        q
    }};
}

/// Enabled endpoints and the event types each receives.
pub(crate) type EndpointFilters = std::sync::Arc<[(String, Vec<String>)]>;

/// The deliveries of events written together (see `events::flush`), in
/// multi-row statements. With delivery workers in this process, each is
/// leased to them and handed over at commit (no claim between the commit
/// and the send; see [`Handoff`]), unless an earlier delivery of its
/// customer's is unfinished at its endpoint: that one goes first, and this
/// one is claimed after it as usual (its lease stays NULL). Of several for
/// one customer and endpoint here, only the first can be leased. On SQLite
/// the earlier deliveries are looked for here; on PostgreSQL, where
/// another transaction's are not visible yet, when the worker takes the
/// handed ones.
pub(crate) async fn insert_pending(tx: &mut Tx, events: &[&super::events::PendingEvent]) -> StoreResult<()> {
    let now = now_unix();
    let until = tx.handoff.lease_seconds().map(|seconds| now + seconds);
    let check_earlier = until.is_some() && tx.kind() == super::DbKind::Sqlite;
    let mut first_of_pair = std::collections::HashSet::new();
    let mut rows: Vec<Vec<Value>> = Vec::new();
    for event in events {
        for (id, endpoint_id) in &event.deliveries {
            let mut row = vec![
                Value::Text(id.clone()),
                Value::Text(endpoint_id.clone()),
                Value::Text(event.id.clone()),
                Value::OptText(event.customer_id.clone()),
                Value::Int(now),
                Value::Int(now),
            ];
            // Deliveries without a customer keep no order among themselves.
            let first = until.is_some()
                && (event.customer_id.is_none()
                    || first_of_pair.insert((endpoint_id.as_str(), event.customer_id.as_deref())));
            if check_earlier {
                row.extend([
                    Value::Int(i64::from(first)),
                    Value::Text(endpoint_id.clone()),
                    Value::OptText(event.customer_id.clone()),
                    Value::OptInt(until),
                ]);
            } else {
                row.push(Value::OptInt(until.filter(|_| first)));
            }
            rows.push(row);
        }
    }
    if rows.is_empty() {
        return Ok(());
    }
    let row_sql = if check_earlier {
        "(?, ?, ?, ?, 'pending', 0, ?, ?, CASE WHEN ? = 1 AND NOT EXISTS (SELECT 1 FROM deliveries p \
         WHERE p.endpoint_id = ? AND p.customer_id = ? AND p.status IN ('pending', 'failed')) THEN ? END)"
    } else {
        "(?, ?, ?, ?, 'pending', 0, ?, ?, ?)"
    };
    for chunk in super::events::chunked(&rows) {
        let sql = numbered(
            tx.kind(),
            &format!(
                "INSERT INTO deliveries (id, endpoint_id, event_id, customer_id, status, attempts, next_attempt_at, \
                 created_at, locked_until) VALUES {} ON CONFLICT (endpoint_id, event_id) DO NOTHING \
                 RETURNING id, locked_until",
                vec![row_sql; chunk.len()].join(", ")
            ),
        );
        let values = chunk.iter().flatten();
        let written: Vec<(String, Option<i64>)> = match tx.exec() {
            super::Exec::Sqlite(c) => bind_values!(sqlx::query_as(&sql), values).fetch_all(c).await,
            super::Exec::Postgres(c) => bind_values!(sqlx::query_as(&sql), values).fetch_all(c).await,
        }
        .db()?;
        for (id, leased) in written {
            match leased {
                Some(until) => tx.handed.push(Handed { id, until }),
                // Any worker's claim sends it: wake them all at commit.
                None => tx.deliveries_queued = true,
            }
        }
    }
    Ok(())
}

/// The enabled endpoints and the event types each takes, read once per
/// transaction. The filter is matched in Rust rather than in SQL: endpoints
/// are few, and the two engines spell "JSON array contains" differently.
async fn endpoint_filters(tx: &mut Tx) -> StoreResult<EndpointFilters> {
    if let Some(known) = &tx.endpoints {
        return Ok(known.clone());
    }
    let rows: Vec<(String, String)> = sql!(
        tx,
        query_as::<(String, String)>(
            "SELECT id, events FROM webhook_endpoints WHERE status = 'enabled' AND deleted_at IS NULL ORDER BY id"
        )
        .fetch_all
    )
    .db()?;
    let parsed: EndpointFilters = rows
        .into_iter()
        .map(|(id, events)| (id, serde_json::from_str(&events).unwrap_or_default()))
        .collect();
    tx.endpoints = Some(parsed.clone());
    Ok(parsed)
}

fn subscribed(types: &[String], event_type: &str) -> bool {
    types.iter().any(|t| t == "*" || t == event_type)
}

/// The endpoints that take `event_type`, each with the id its delivery
/// will have, chosen when the event is emitted (see
/// [`super::events::emit`]).
pub(crate) async fn new_deliveries(tx: &mut Tx, event_type: &str) -> StoreResult<Vec<(String, String)>> {
    let endpoints = endpoint_filters(tx).await?;
    Ok(endpoints
        .iter()
        .filter(|(_, types)| subscribed(types, event_type))
        .map(|(endpoint_id, _)| (new_id("dlv"), endpoint_id.clone()))
        .collect())
}

/// A delivery handed to this process's workers, with the lease it was
/// given. A take or a release acts on it only while the row still holds
/// that lease: once it lapsed (the delivery waited in the queue), a claim
/// may have leased it again, and it is that claim's to send.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct Handed {
    pub(crate) id: String,
    pub(crate) until: i64,
}

/// Deliveries leased at commit to this process's delivery workers, so a
/// delivery leaves as soon as the transaction that queued it commits, with
/// no claim (on PostgreSQL a statement planned at each run, the largest
/// item of the delivery path's database time) in between.
///
/// Per-customer order: on SQLite the one writer runs transactions one
/// after another, so [`insert_pending`]'s check that no earlier delivery of
/// the customer's is unfinished sees every other commit. On PostgreSQL two
/// transactions could each miss the other's uncommitted delivery, so the
/// check is made when the worker takes the handed deliveries, after their
/// commit (see [`Store::take_handed_deliveries`]): one held back there is
/// released to the claim, which sends it after the earlier one.
#[derive(Debug, Default)]
pub(crate) struct Handoff {
    /// Live delivery workers in this process; none, nothing is handed off.
    workers: std::sync::atomic::AtomicUsize,
    /// How long a handed delivery is leased for (the workers' lease).
    lease_seconds: std::sync::atomic::AtomicI64,
    queue: std::sync::Mutex<std::collections::VecDeque<Handed>>,
    /// Woken when deliveries are handed over. Apart from the store's
    /// delivery wake-up, which makes the workers look for claimable ones: a
    /// commit that handed all its deliveries over leaves nothing to claim.
    ready: tokio::sync::Notify,
}

impl Handoff {
    fn lease_seconds(&self) -> Option<i64> {
        use std::sync::atomic::Ordering;
        (self.workers.load(Ordering::Acquire) > 0).then(|| self.lease_seconds.load(Ordering::Acquire))
    }

    pub(crate) fn push(&self, ids: Vec<Handed>) {
        self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner).extend(ids);
        self.ready.notify_waiters();
        self.ready.notify_one();
    }

    fn take(&self, limit: usize) -> Vec<Handed> {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        let n = limit.min(queue.len());
        queue.drain(..n).collect()
    }

    /// Puts taken ids back in front, in their order (a read that failed).
    fn put_back(&self, ids: Vec<Handed>) {
        let mut queue = self.queue.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        for id in ids.into_iter().rev() {
            queue.push_front(id);
        }
    }
}

/// A delivery worker's registration for handed-off deliveries; dropping it
/// (the worker stopping) stops the handoff once no worker is left.
#[derive(Debug)]
pub struct HandoffRegistration {
    handoff: std::sync::Arc<Handoff>,
    /// No other worker of this process was registered.
    pub first: bool,
}

impl HandoffRegistration {
    /// Resolves when deliveries have been handed over (or were, since the
    /// last wait).
    pub async fn handed(&self) {
        self.handoff.ready.notified().await;
    }
}

impl Drop for HandoffRegistration {
    fn drop(&mut self) {
        self.handoff.workers.fetch_sub(1, std::sync::atomic::Ordering::AcqRel);
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct DeliveryRecord {
    pub id: String,
    pub endpoint_id: String,
    pub event_id: String,
    pub event_type: String,
    pub customer_id: Option<String>,
    pub status: String,
    pub attempts: i64,
    pub next_attempt_at: i64,
    pub last_status: Option<i64>,
    pub last_error: Option<String>,
    pub created_at: i64,
    pub delivered_at: Option<i64>,
}

const DELIVERY_COLUMNS: &str =
    "d.id, d.endpoint_id, d.event_id, e.type AS event_type, d.customer_id, d.status, \
     d.attempts, d.next_attempt_at, d.last_status, d.last_error, d.created_at, d.delivered_at";

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct AttemptRecord {
    pub delivery_id: String,
    pub n: i64,
    pub at: i64,
    pub status_code: Option<i64>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub response: Option<String>,
}

/// What a [`ClaimedDelivery`] is read from, up to its `WHERE`: the
/// delivery rows `rows` (the table, or the rows a claim just leased), as
/// `d`, with what their send needs.
fn claimed_from(rows: &str) -> String {
    format!(
        "d.id, d.endpoint_id, w.url, w.secret, d.attempts, d.event_id, e.type AS event_type, \
         c.external_id AS customer, e.data, e.created_at AS event_created_at \
         FROM {rows} d JOIN webhook_endpoints w ON w.id = d.endpoint_id JOIN events e ON e.id = d.event_id \
         LEFT JOIN customers c ON c.id = d.customer_id"
    )
}

/// A claimed delivery with everything needed to send it.
#[derive(Clone, sqlx::FromRow)]
pub struct ClaimedDelivery {
    pub id: String,
    pub endpoint_id: String,
    pub url: String,
    pub secret: String,
    pub attempts: i64,
    pub event_id: String,
    pub event_type: String,
    /// The application's id for the customer (`external_id`).
    pub customer: Option<String>,
    pub data: String,
    pub event_created_at: i64,
    /// The row's lease as read, where a read selects it (handed deliveries).
    #[sqlx(default)]
    lease: Option<i64>,
}

impl std::fmt::Debug for ClaimedDelivery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClaimedDelivery")
            .field("id", &self.id)
            .field("endpoint_id", &self.endpoint_id)
            .field("event_id", &self.event_id)
            .field("attempts", &self.attempts)
            .finish_non_exhaustive()
    }
}

/// What one attempt came to.
#[derive(Debug, Clone)]
pub struct AttemptOutcome {
    pub status_code: Option<u16>,
    pub duration_ms: i64,
    pub error: Option<String>,
    pub response: Option<String>,
    /// `None`: delivered. `Some(Some(at))`: retry at `at`. `Some(None)`: dead.
    pub retry: Option<Option<i64>>,
    /// The endpoint asked not to be sent anything more (`410 Gone`): why.
    pub disable_endpoint: Option<String>,
}

impl Store {
    /// Claims up to `limit` due deliveries for `lease_seconds`: each the
    /// oldest unfinished one of its (endpoint, customer) queue.
    pub async fn claim_deliveries(
        &self,
        limit: i64,
        lease_seconds: i64,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let now = now_unix();
        // Most wake-ups find nothing new (every finished send wakes the
        // worker): a read on the read side answers those without taking
        // SQLite's single write lock or opening a PostgreSQL transaction.
        let due: Option<String> = sql!(
            self,
            fresh query_scalar::<String>(
                "SELECT id FROM deliveries WHERE status IN ('pending', 'failed') AND next_attempt_at <= $1 \
                 AND (locked_until IS NULL OR locked_until < $1) LIMIT 1",
                now
            )
            .fetch_optional
        )
        .db()?;
        if due.is_none() {
            return Ok(Vec::new());
        }
        let due = "d.status IN ('pending', 'failed') AND d.next_attempt_at <= $1 \
             AND (d.locked_until IS NULL OR d.locked_until < $1) \
             AND w.status = 'enabled' AND w.deleted_at IS NULL \
             AND NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.endpoint_id = d.endpoint_id \
                 AND p.customer_id = d.customer_id AND p.status IN ('pending', 'failed') AND p.event_id < d.event_id)";
        if self.kind() == super::DbKind::Postgres {
            // One statement, its own transaction: one round trip where a
            // transaction of a read and an update took four, on the path
            // from an event's commit to its send. The send reads the rows
            // as leased (`RETURNING`), the versions the lock was taken on.
            let q = format!(
                "WITH claimed AS ( \
                   SELECT d.id FROM deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                   WHERE {due} ORDER BY d.event_id LIMIT $2 FOR UPDATE OF d SKIP LOCKED), \
                 leased AS (UPDATE deliveries SET locked_until = $3 WHERE id IN (SELECT id FROM claimed) \
                   RETURNING id, endpoint_id, attempts, event_id, customer_id) \
                 SELECT {} ORDER BY d.event_id",
                claimed_from("leased")
            );
            return sql!(self, fresh query_as::<ClaimedDelivery>(&q, now, limit, now + lease_seconds).fetch_all)
                .db();
        }
        let mut tx = self.begin().await?;
        let q = format!("SELECT {} WHERE {due} ORDER BY d.event_id LIMIT $2", claimed_from("deliveries"));
        let rows: Vec<ClaimedDelivery> =
            sql!(tx, fresh query_as::<ClaimedDelivery>(&q, now, limit).fetch_all).db()?;
        let ids: Vec<&str> = rows.iter().map(|r| r.id.as_str()).collect();
        set_where_id_in(&mut tx, "locked_until = ?", &[Value::Int(now + lease_seconds)], &ids).await?;
        tx.commit().await?;
        Ok(rows)
    }

    /// Registers a delivery worker for handed-off deliveries (see
    /// [`Handoff`]).
    pub fn register_for_handoff(&self, lease_seconds: i64) -> HandoffRegistration {
        let handoff = self.handoff.clone();
        handoff.lease_seconds.fetch_max(lease_seconds, std::sync::atomic::Ordering::AcqRel);
        let before = handoff.workers.fetch_add(1, std::sync::atomic::Ordering::AcqRel);
        HandoffRegistration { handoff, first: before == 0 }
    }

    /// At the first delivery worker's start (SQLite, served by one
    /// process): deliveries a previous run leased and did not finish (it
    /// stopped or crashed with them handed over or in flight) are due at
    /// once instead of after their lease.
    pub async fn reset_delivery_leases(&self) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "UPDATE deliveries SET locked_until = NULL \
                 WHERE status IN ('pending', 'failed') AND locked_until IS NOT NULL"
            )
            .execute
        )
        .db()?;
        tx.commit().await
    }

    /// Up to `limit` deliveries handed to this process's workers at commit,
    /// read from the read side: they are already leased to this process.
    /// One whose lease has less than `lease_left` seconds to run (it waited
    /// in the queue) is released to the claim rather than sent under a
    /// lease that could lapse during its send. One whose row no longer
    /// holds the lease it was handed with is a claim's already.
    ///
    /// On PostgreSQL one with an earlier delivery of its customer's still
    /// unfinished at its endpoint (queued by a transaction that committed
    /// meanwhile; see [`Handoff`]) is released to the claim instead, and
    /// the workers woken to claim it once the earlier one is done.
    pub async fn take_handed_deliveries(
        &self,
        limit: usize,
        lease_left: i64,
    ) -> StoreResult<Vec<ClaimedDelivery>> {
        let handoff = &self.handoff;
        let valid_until = now_unix() + lease_left;
        let (handed, waited): (Vec<Handed>, Vec<Handed>) =
            handoff.take(limit).into_iter().partition(|h| h.until >= valid_until);
        // Waited too long in the queue (the workers were full) to be sent
        // under this lease: any worker's claim takes them now, here or in
        // another instance, instead of once the lease lapses.
        if let Err(e) = self.release_handed(&waited).await {
            tracing::warn!(error = %e, "could not release deliveries that waited; their leases lapse");
        }
        if handed.is_empty() {
            return Ok(Vec::new());
        }
        let ids: Vec<&str> = handed.iter().map(|h| h.id.as_str()).collect();
        let listed = serde_json::to_string(&ids)?;
        let read = match self.kind() {
            super::DbKind::Sqlite => {
                let q = format!(
                    "SELECT d.locked_until AS lease, {} WHERE d.id IN (SELECT value FROM json_each($1)) \
                     AND d.status = 'pending' AND w.status = 'enabled' AND w.deleted_at IS NULL ORDER BY d.event_id",
                    claimed_from("deliveries"),
                );
                sql!(self, query_as::<ClaimedDelivery>(&q, &listed).fetch_all).db()
            }
            super::DbKind::Postgres => self.take_handed_in_order(&listed).await,
        };
        let read = match read {
            Ok(read) => read,
            Err(e) => {
                // Still leased to this process: tried again at the next turn.
                handoff.put_back(handed);
                return Err(e);
            }
        };
        let leases: std::collections::HashMap<&str, i64> =
            handed.iter().map(|h| (h.id.as_str(), h.until)).collect();
        let taken: Vec<ClaimedDelivery> = read
            .into_iter()
            .filter(|d| d.lease.is_some() && d.lease == leases.get(d.id.as_str()).copied())
            .collect();
        if self.kind() == super::DbKind::Postgres && taken.len() < handed.len() {
            let taken_ids: std::collections::HashSet<&str> = taken.iter().map(|d| d.id.as_str()).collect();
            let held_back: Vec<Handed> =
                handed.into_iter().filter(|h| !taken_ids.contains(h.id.as_str())).collect();
            // Those whose lease is still the one handed over (the rest are
            // another worker's, or done): the claim sends them in order.
            if let Err(e) = self.release_handed(&held_back).await {
                // The claim finds them once their leases lapse.
                tracing::warn!(error = %e, "could not release held-back deliveries; their leases lapse");
            }
        }
        Ok(taken)
    }

    /// PostgreSQL's read of handed deliveries (the JSON array of ids
    /// `listed`), with their leases: those pending with no earlier delivery
    /// of their customer's unfinished at their endpoint.
    ///
    /// Every row is looked up by its key on its own (lateral subqueries the
    /// planner cannot flatten, an `EXISTS` it cannot turn into a join), so
    /// the plan is the same whatever the tables' sizes and the statement is
    /// kept prepared: a generic plan made while `deliveries` was nearly
    /// empty must not scan it once it has grown (docs/performance.md,
    /// session 11).
    async fn take_handed_in_order(&self, listed: &str) -> StoreResult<Vec<ClaimedDelivery>> {
        const TAKE: &str = "SELECT d.id, d.endpoint_id, w.url, w.secret, d.attempts, d.event_id, \
             e.type AS event_type, c.external_id AS customer, e.data, e.created_at AS event_created_at, \
             d.locked_until AS lease \
             FROM jsonb_array_elements_text(CAST($1 AS JSONB)) AS handed(id) \
             CROSS JOIN LATERAL (SELECT id, endpoint_id, event_id, customer_id, attempts, locked_until \
                 FROM deliveries WHERE id = handed.id AND status = 'pending' OFFSET 0) d \
             CROSS JOIN LATERAL (SELECT url, secret FROM webhook_endpoints \
                 WHERE id = d.endpoint_id AND status = 'enabled' AND deleted_at IS NULL OFFSET 0) w \
             CROSS JOIN LATERAL (SELECT type, data, created_at FROM events WHERE id = d.event_id OFFSET 0) e \
             LEFT JOIN LATERAL (SELECT external_id FROM customers WHERE id = d.customer_id OFFSET 0) c ON true \
             WHERE NOT EXISTS (SELECT 1 FROM deliveries p WHERE p.endpoint_id = d.endpoint_id \
                 AND p.customer_id = d.customer_id AND p.status IN ('pending', 'failed') \
                 AND p.event_id < d.event_id OFFSET 0) \
             ORDER BY d.event_id";
        sql!(self, query_as::<ClaimedDelivery>(TAKE, listed).fetch_all).db()
    }

    /// Gives `handed` deliveries back to any worker's claim, those whose row
    /// still holds the lease they were handed with (the rest are a claim's
    /// now, or done), and wakes the workers here and, on PostgreSQL, in
    /// every instance.
    async fn release_handed(&self, handed: &[Handed]) -> StoreResult<()> {
        if handed.is_empty() {
            return Ok(());
        }
        let listed = serde_json::to_string(handed)?;
        let mut tx = self.begin().await?;
        // Rare (a customer's events queued by transactions side by side, a
        // shutdown): planned at each run on PostgreSQL.
        let released = match tx.kind() {
            super::DbKind::Sqlite => sql!(
                tx,
                query(
                    "UPDATE deliveries SET locked_until = NULL \
                     WHERE id IN (SELECT json_extract(value, '$.id') FROM json_each($1)) AND status = 'pending' \
                     AND locked_until = (SELECT json_extract(value, '$.until') FROM json_each($1) \
                         WHERE json_extract(value, '$.id') = deliveries.id)",
                    &listed
                )
                .execute
            ),
            super::DbKind::Postgres => sql!(
                tx,
                fresh query(
                    "UPDATE deliveries SET locked_until = NULL \
                     FROM jsonb_to_recordset(CAST($1 AS JSONB)) AS held(id TEXT, until BIGINT) \
                     WHERE deliveries.id = held.id AND deliveries.status = 'pending' \
                     AND deliveries.locked_until = held.until",
                    &listed
                )
                .execute
            ),
        }
        .db()?;
        if released > 0 {
            tx.deliveries_queued = true;
        }
        tx.commit().await
    }

    /// Gives handed-off deliveries no worker will send (the last worker
    /// stopped) back to any worker's claim at once, instead of after their
    /// lease.
    pub async fn release_handed_deliveries(&self) -> StoreResult<()> {
        if self.handoff.workers.load(std::sync::atomic::Ordering::Acquire) > 0 {
            return Ok(());
        }
        let handed = self.handoff.take(usize::MAX);
        self.release_handed(&handed).await
    }

    /// Records finished attempts, each with its consequence (delivered,
    /// retried later, dead, its endpoint disabled by a 410), in one
    /// transaction. Answers, for each, whether it disabled its endpoint.
    pub async fn record_delivery_attempts(
        &self,
        attempts: &[(&str, &str, &AttemptOutcome)],
    ) -> StoreResult<Vec<bool>> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        // Few statements for many attempts (each is a round trip to the one
        // writer on SQLite): the attempt rows in one insert, and the
        // deliveries in one update per distinct consequence (usually one:
        // delivered, 200).
        for chunk in attempts.chunks(ATTEMPT_ROWS_PER_STATEMENT) {
            insert_attempts(&mut tx, chunk, now).await?;
        }
        let mut groups: Vec<(Vec<Value>, Vec<&str>)> = Vec::new();
        for (id, _, outcome) in attempts {
            let (status, next, delivered) = match outcome.retry {
                None => ("succeeded", now, Some(now)),
                Some(Some(at)) => ("failed", at, None),
                Some(None) => ("dead", now, None),
            };
            let values = vec![
                Value::Text(status.to_owned()),
                Value::Int(next),
                Value::OptInt(outcome.status_code.map(i64::from)),
                Value::OptText(outcome.error.clone()),
                Value::OptInt(delivered),
            ];
            match groups.iter_mut().find(|(v, _)| *v == values) {
                Some((_, ids)) => ids.push(id),
                None => groups.push((values, vec![id])),
            }
        }
        for (values, ids) in &groups {
            set_where_id_in(
                &mut tx,
                "status = ?, attempts = attempts + 1, next_attempt_at = ?, locked_until = NULL, \
                 last_status = ?, last_error = ?, delivered_at = ?",
                values,
                ids,
            )
            .await?;
        }
        let mut disabled = Vec::with_capacity(attempts.len());
        for (_, endpoint_id, outcome) in attempts {
            disabled.push(match &outcome.disable_endpoint {
                Some(reason) => super::webhook_endpoints::disable(&mut tx, endpoint_id, reason).await?,
                None => false,
            });
        }
        tx.commit().await?;
        Ok(disabled)
    }

    pub async fn get_delivery(&self, id: &str) -> StoreResult<Option<DeliveryRecord>> {
        let q = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id WHERE d.id = $1"
        );
        sql!(self, query_as::<DeliveryRecord>(&q, id).fetch_optional).db()
    }

    /// An endpoint's deliveries, newest first.
    pub async fn list_deliveries(
        &self,
        endpoint_id: &str,
        page: &Page,
    ) -> StoreResult<Listed<DeliveryRecord>> {
        self.ensure_cursor("deliveries", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let q = format!(
            "SELECT {DELIVERY_COLUMNS} FROM deliveries d JOIN events e ON e.id = d.event_id \
             WHERE d.endpoint_id = $1 AND ($2 IS NULL OR d.id {op} $2) ORDER BY d.id {order} LIMIT $3"
        );
        let rows = sql!(
            self,
            query_as::<DeliveryRecord>(&q, endpoint_id, page.cursor(), page.fetch_limit()).fetch_all
        )
        .db()?;
        Ok(page.finish(rows))
    }

    /// A delivery's attempts, first first.
    pub async fn delivery_attempts(&self, delivery_id: &str) -> StoreResult<Vec<AttemptRecord>> {
        sql!(
            self,
            query_as::<AttemptRecord>(
                "SELECT delivery_id, n, at, status_code, duration_ms, error, response FROM delivery_attempts \
                 WHERE delivery_id = $1 ORDER BY n",
                delivery_id
            )
            .fetch_all
        )
        .db()
    }

    /// Sends a dead or failed delivery again now. `false` when it is in
    /// another state.
    pub async fn retry_delivery(
        &self,
        id: &str,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let n = sql!(
            tx,
            query(
                "UPDATE deliveries SET status = 'pending', next_attempt_at = $1, locked_until = NULL \
                 WHERE id = $2 AND status IN ('dead', 'failed')",
                now_unix(),
                id
            )
            .execute
        )
        .db()?;
        if n == 1 {
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "delivery.retried",
                    object_type: "delivery",
                    object_id: id,
                    data: serde_json::json!({}),
                    request_id,
                },
            )
            .await?;
            tx.deliveries_queued = true;
        }
        tx.commit().await?;
        Ok(n == 1)
    }

    /// Deliveries waiting to be sent to enabled endpoints (due or not).
    pub async fn delivery_queue_depth(&self) -> StoreResult<i64> {
        sql!(
            self,
            query_scalar::<i64>(
                "SELECT COUNT(*) FROM deliveries d JOIN webhook_endpoints w ON w.id = d.endpoint_id \
                 WHERE d.status IN ('pending', 'failed') AND w.status = 'enabled' AND w.deleted_at IS NULL"
            )
            .fetch_one
        )
        .db()
    }
}

/// Attempt rows per insert: 8 parameters each, well under both engines' limits.
const ATTEMPT_ROWS_PER_STATEMENT: usize = 100;

/// `?` placeholders numbered for PostgreSQL (`$1`, `$2`, …); SQLite keeps
/// them positional (see `value_rows` for why).
fn numbered(kind: super::DbKind, sql: &str) -> String {
    match kind {
        super::DbKind::Sqlite => sql.to_owned(),
        super::DbKind::Postgres => {
            let mut out = String::with_capacity(sql.len() + 16);
            let mut n = 0;
            for c in sql.chars() {
                if c == '?' {
                    n += 1;
                    out.push_str(&format!("${n}"));
                } else {
                    out.push(c);
                }
            }
            out
        }
    }
}

/// `UPDATE deliveries SET <set> WHERE id IN (<ids>)`, `set` written with
/// `?` for `values`: one statement for many deliveries.
async fn set_where_id_in(tx: &mut Tx, set: &str, values: &[Value], ids: &[&str]) -> StoreResult<()> {
    let list = super::in_json_ids(tx.kind(), "id", "?");
    let sql = numbered(tx.kind(), &format!("UPDATE deliveries SET {set} WHERE {list}"));
    let all: Vec<Value> = values.iter().cloned().chain([Value::Text(serde_json::to_string(ids)?)]).collect();
    match tx.exec() {
        super::Exec::Sqlite(c) => bind_values!(sqlx::query(&sql), &all).execute(c).await.map(|_| ()),
        // Planned afresh: see `sql!`'s `fresh`.
        super::Exec::Postgres(c) => {
            bind_values!(sqlx::query(&sql).persistent(false), &all).execute(c).await.map(|_| ())
        }
    }
    .db()?;
    Ok(())
}

/// The attempt rows of finished sends, each numbered one past its
/// delivery's last attempt.
async fn insert_attempts(
    tx: &mut Tx,
    attempts: &[(&str, &str, &AttemptOutcome)],
    at: i64,
) -> StoreResult<()> {
    if attempts.is_empty() {
        return Ok(());
    }
    let row =
        "(?, (SELECT COALESCE(MAX(n), 0) + 1 FROM delivery_attempts WHERE delivery_id = ?), ?, ?, ?, ?, ?)";
    let rows = vec![row; attempts.len()].join(", ");
    let sql = numbered(
        tx.kind(),
        &format!(
            "INSERT INTO delivery_attempts (delivery_id, n, at, status_code, duration_ms, error, response) VALUES {rows}"
        ),
    );
    let mut values = Vec::with_capacity(attempts.len() * 7);
    for (id, _, outcome) in attempts {
        values.extend([
            Value::Text((*id).to_owned()),
            Value::Text((*id).to_owned()),
            Value::Int(at),
            Value::OptInt(outcome.status_code.map(i64::from)),
            Value::Int(outcome.duration_ms),
            Value::OptText(outcome.error.clone()),
            Value::OptText(outcome.response.clone()),
        ]);
    }
    match tx.exec() {
        super::Exec::Sqlite(c) => bind_values!(sqlx::query(&sql), &values).execute(c).await.map(|_| ()),
        super::Exec::Postgres(c) => bind_values!(sqlx::query(&sql), &values).execute(c).await.map(|_| ()),
    }
    .db()?;
    Ok(())
}
