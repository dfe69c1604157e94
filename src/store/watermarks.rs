//! Per-object watermarks: the newest event applied to each provider object.

use super::{sql, SqlxResultExt, StoreResult, Tx};
use crate::billing::ordering::Position;

/// Moves the object's watermark to `position` if it is newer, in one
/// statement (safe against concurrent appliers on both engines). `false`
/// means the event is stale and must change nothing.
pub async fn advance(tx: &mut Tx, provider: &str, object_id: &str, position: &Position) -> StoreResult<bool> {
    let changed = sql!(
        tx,
        query(
            "INSERT INTO provider_object_watermarks (provider, object_id, created, lifecycle, progress, event_id) \
             VALUES ($1, $2, $3, $4, $5, $6) \
             ON CONFLICT (provider, object_id) DO UPDATE SET created = excluded.created, lifecycle = excluded.lifecycle, \
             progress = excluded.progress, event_id = excluded.event_id \
             WHERE (excluded.created, excluded.lifecycle, excluded.progress, excluded.event_id) > \
             (provider_object_watermarks.created, provider_object_watermarks.lifecycle, \
              provider_object_watermarks.progress, provider_object_watermarks.event_id)",
            provider,
            object_id,
            position.created,
            i64::from(position.lifecycle),
            i64::from(position.progress),
            &position.event_id
        )
        .execute
    )
    .db()?;
    Ok(changed == 1)
}
