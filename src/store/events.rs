//! tollgate's own events (the outbox): written in the transaction of the
//! change they announce, so an event exists exactly when its change does.

use serde::Serialize;

use super::{now_unix, sql, SqlxResultExt, StoreResult, Tx};
use crate::ids::new_id;

/// An event to record with a state change.
#[derive(Debug, Clone)]
pub struct NewEvent<'a> {
    pub event_type: &'a str,
    pub customer_id: Option<&'a str>,
    pub object_type: &'a str,
    pub object_id: &'a str,
    /// The inbox id (`pe_…`) of the provider event that caused it.
    pub provider_event_id: Option<&'a str>,
    pub data: serde_json::Value,
    /// For facts that happen once (an order is paid once): a second event
    /// with the same key is not recorded, whatever retries or races occur.
    pub dedupe_key: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow)]
pub struct EventRecord {
    pub id: String,
    #[sqlx(rename = "type")]
    pub event_type: String,
    pub customer_id: Option<String>,
    pub object_type: String,
    pub object_id: String,
    pub provider_event_id: Option<String>,
    pub data: String,
    pub created_at: i64,
    /// The customer's `external_id`, where a query joins it in.
    #[sqlx(default)]
    pub customer_external_id: Option<String>,
}

pub const EVENT_COLUMNS: &str =
    "id, type, customer_id, object_type, object_id, provider_event_id, data, created_at";

const EXTERNAL_ID: &str =
    "(SELECT c.external_id FROM customers c WHERE c.id = events.customer_id) AS customer_external_id";

/// An event without a dedupe key, kept by its transaction until commit
/// (or until a statement must see it, see [`flush`]) and then written with
/// the others in one multi-row statement, its deliveries in another: an
/// inbox batch emits two or three events per provider event, and each
/// written alone cost a round trip through the one writer (SQLite) or a
/// statement's overhead (PostgreSQL).
#[derive(Debug)]
pub(crate) struct PendingEvent {
    pub(crate) id: String,
    event_type: String,
    pub(crate) customer_id: Option<String>,
    object_type: String,
    object_id: String,
    provider_event_id: Option<String>,
    data: String,
    dedupe_key: Option<String>,
    created_at: i64,
    /// Its deliveries (delivery id, endpoint id), chosen when it was
    /// emitted, with the endpoints as the transaction saw them then.
    pub(crate) deliveries: Vec<(String, String)>,
}

/// Rows per multi-row statement, largest first: a few statement texts
/// (each prepared once per connection) rather than one per count, and, up
/// to 127 rows, at most one statement per size (8 rows were two statements
/// of 4 with sizes 64, 16, 4 and 1; each statement is a round trip through
/// the one SQLite writer).
pub(crate) const CHUNKS: [usize; 7] = [64, 32, 16, 8, 4, 2, 1];

/// Splits `rows` into chunks of the sizes in [`CHUNKS`], largest first.
pub(crate) fn chunked<T>(rows: &[T]) -> Vec<&[T]> {
    let mut out = Vec::new();
    let mut rest = rows;
    for size in CHUNKS {
        while rest.len() >= size {
            let (chunk, tail) = rest.split_at(size);
            out.push(chunk);
            rest = tail;
        }
    }
    out
}

/// Writes the events `tx` holds back (and their deliveries). Called at
/// commit, before an event is written at once (so events are written in
/// the order they were emitted, which the deliveries' per-customer order
/// relies on), and by any statement of the transaction that reads or moves
/// events.
pub(crate) async fn flush(tx: &mut Tx) -> StoreResult<()> {
    super::entitlements::recompute_due(tx).await?;
    write_held(tx).await.map(|_| ())
}

/// [`flush`], answering the ids of the events recorded (not those whose
/// dedupe key was used already).
async fn write_held(tx: &mut Tx) -> StoreResult<std::collections::HashSet<String>> {
    if tx.pending_events.is_empty() {
        return Ok(Default::default());
    }
    let pending = std::mem::take(&mut tx.pending_events);
    let mut written = std::collections::HashSet::with_capacity(pending.len());
    for chunk in chunked(&pending) {
        let rows = super::value_rows(tx.kind(), chunk.len(), 9);
        let sql = format!(
            "INSERT INTO events (id, type, customer_id, object_type, object_id, provider_event_id, data, dedupe_key, \
             created_at) VALUES {rows} ON CONFLICT (dedupe_key) DO NOTHING RETURNING id"
        );
        macro_rules! bind_rows {
            ($query:expr) => {{
                let mut q = $query;
                for e in chunk {
                    q = q
                        .bind(&e.id)
                        .bind(&e.event_type)
                        .bind(&e.customer_id)
                        .bind(&e.object_type)
                        .bind(&e.object_id)
                        .bind(&e.provider_event_id)
                        .bind(&e.data)
                        .bind(&e.dedupe_key)
                        .bind(e.created_at);
                }
                q
            }};
        }
        let ids: Vec<String> = match tx.exec() {
            super::Exec::Sqlite(c) => bind_rows!(sqlx::query_scalar(&sql)).fetch_all(c).await,
            super::Exec::Postgres(c) => bind_rows!(sqlx::query_scalar(&sql)).fetch_all(c).await,
        }
        .db()?;
        written.extend(ids);
    }
    // An event whose dedupe key was used already is not recorded, and
    // neither are its deliveries.
    let recorded: Vec<&PendingEvent> = pending.iter().filter(|e| written.contains(&e.id)).collect();
    super::deliveries::insert_pending(tx, &recorded).await?;
    Ok(written)
}

/// Records `event` in `tx`, and its deliveries to the endpoints that take
/// it, with the transaction's other events (see [`PendingEvent`]); an event
/// whose dedupe key was used already is not recorded. A caller that needs
/// to know uses [`emit_now`].
pub async fn emit(tx: &mut Tx, event: NewEvent<'_>) -> StoreResult<()> {
    hold(tx, event).await.map(|_| ())
}

/// [`emit`], written at once (with whatever the transaction held before
/// it): `None` when its dedupe key was already used.
pub async fn emit_now(tx: &mut Tx, event: NewEvent<'_>) -> StoreResult<Option<String>> {
    // Entitlements changed before this event are announced before it, as
    // they were when each change was recomputed at once.
    super::entitlements::recompute_due(tx).await?;
    let id = hold(tx, event).await?;
    let recorded = write_held(tx).await?;
    Ok(recorded.contains(&id).then_some(id))
}

/// Adds `event` to what `tx` holds back; answers its id.
async fn hold(tx: &mut Tx, event: NewEvent<'_>) -> StoreResult<String> {
    let deliveries = super::deliveries::new_deliveries(tx, event.event_type).await?;
    let id = new_id("ev");
    tx.pending_events.push(PendingEvent {
        id: id.clone(),
        event_type: event.event_type.to_owned(),
        customer_id: event.customer_id.map(str::to_owned),
        object_type: event.object_type.to_owned(),
        object_id: event.object_id.to_owned(),
        provider_event_id: event.provider_event_id.map(str::to_owned),
        data: event.data.to_string(),
        dedupe_key: event.dedupe_key,
        created_at: now_unix(),
        deliveries,
    });
    Ok(id)
}

impl super::Store {
    pub async fn get_event(&self, id: &str) -> StoreResult<Option<EventRecord>> {
        let sql = format!("SELECT {EVENT_COLUMNS}, {EXTERNAL_ID} FROM events WHERE id = $1");
        sql!(self, query_as::<EventRecord>(&sql, id).fetch_optional).db()
    }

    /// Newest first, optionally of one type and for one customer (tollgate's id).
    pub async fn list_events(
        &self,
        page: &super::Page,
        event_type: Option<&str>,
        customer_id: Option<&str>,
    ) -> StoreResult<super::Listed<EventRecord>> {
        self.ensure_cursor("events", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let sql = format!(
            "SELECT {EVENT_COLUMNS}, {EXTERNAL_ID} FROM events WHERE ($1 IS NULL OR id {op} $1) AND ($2 IS NULL OR type = $2) \
             AND ($3 IS NULL OR customer_id = $3) ORDER BY id {order} LIMIT $4"
        );
        let rows = sql!(
            self,
            query_as::<EventRecord>(&sql, page.cursor(), event_type, customer_id, page.fetch_limit())
                .fetch_all
        )
        .db()?;
        Ok(page.finish(rows))
    }

    /// Every event about one object, oldest first (tests and support).
    pub async fn events_for_object(&self, object_id: &str) -> StoreResult<Vec<EventRecord>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE object_id = $1 ORDER BY id");
        sql!(self, query_as::<EventRecord>(&sql, object_id).fetch_all).db()
    }

    /// Every event for one customer, oldest first.
    pub async fn events_for_customer(&self, customer_id: &str) -> StoreResult<Vec<EventRecord>> {
        let sql = format!("SELECT {EVENT_COLUMNS} FROM events WHERE customer_id = $1 ORDER BY id");
        sql!(self, query_as::<EventRecord>(&sql, customer_id).fetch_all).db()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn chunks_cover_every_row_once_in_order_with_few_sizes() {
        for n in 0..200usize {
            let rows: Vec<usize> = (0..n).collect();
            let chunks = chunked(&rows);
            let joined: Vec<usize> = chunks.iter().flat_map(|c| c.iter().copied()).collect();
            assert_eq!(joined, rows, "{n} rows");
            assert!(chunks.iter().all(|c| CHUNKS.contains(&c.len())), "{n} rows");
            assert!(chunks.len() <= n / 64 + 9, "{n} rows in {} statements", chunks.len());
        }
    }
}
