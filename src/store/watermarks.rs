//! Per-object watermarks: the newest event applied to each provider object.

use super::{SqlxResultExt, StoreResult, Tx};
use crate::billing::ordering::Position;

/// Moves the object's watermark to `position` if it is newer, in one
/// statement (safe against concurrent appliers on both engines). `false`
/// means the event is stale and must change nothing.
pub async fn advance(tx: &mut Tx, provider: &str, object_id: &str, position: &Position) -> StoreResult<bool> {
    Ok(!advance_many(tx, &[(provider, object_id, position)]).await?.is_empty())
}

/// [`advance`] for many objects at once, one statement per 64 (an inbox
/// batch moves its objects' watermarks together instead of one round trip
/// per event). Each object must appear once. Answers the objects whose
/// watermark moved; the others' events are stale. Sorted, so concurrent
/// batches on PostgreSQL take the rows' locks in one order.
pub async fn advance_many(
    tx: &mut Tx,
    objects: &[(&str, &str, &Position)],
) -> StoreResult<std::collections::HashSet<(String, String)>> {
    let mut sorted = objects.to_vec();
    // The same lock order in every transaction (PostgreSQL).
    sorted.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)));
    let mut moved = std::collections::HashSet::with_capacity(sorted.len());
    for chunk in super::events::chunked(&sorted) {
        let rows = super::value_rows(tx.kind(), chunk.len(), 6);
        let sql = format!(
            "INSERT INTO provider_object_watermarks (provider, object_id, created, lifecycle, progress, event_id) \
             VALUES {rows} \
             ON CONFLICT (provider, object_id) DO UPDATE SET created = excluded.created, lifecycle = excluded.lifecycle, \
             progress = excluded.progress, event_id = excluded.event_id \
             WHERE (excluded.created, excluded.lifecycle, excluded.progress, excluded.event_id) > \
             (provider_object_watermarks.created, provider_object_watermarks.lifecycle, \
              provider_object_watermarks.progress, provider_object_watermarks.event_id) \
             RETURNING provider, object_id"
        );
        macro_rules! bind_rows {
            ($query:expr) => {{
                let mut q = $query;
                for (provider, object_id, position) in chunk {
                    q = q
                        .bind(*provider)
                        .bind(*object_id)
                        .bind(position.created)
                        .bind(i64::from(position.lifecycle))
                        .bind(i64::from(position.progress))
                        .bind(&position.event_id);
                }
                q
            }};
        }
        let rows: Vec<(String, String)> = match tx.exec() {
            super::Exec::Sqlite(c) => bind_rows!(sqlx::query_as(&sql)).fetch_all(c).await,
            super::Exec::Postgres(c) => bind_rows!(sqlx::query_as(&sql)).fetch_all(c).await,
        }
        .db()?;
        moved.extend(rows);
    }
    Ok(moved)
}
