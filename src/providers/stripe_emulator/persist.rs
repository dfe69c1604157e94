//! The emulator's state kept in a file, so a development tollgate survives a
//! restart: its database names provider objects (the catalog's prices,
//! customers, subscriptions) that must still exist at the emulator
//! afterwards.
//!
//! The whole state is one JSON document (`version` first), rewritten
//! atomically (temporary file in the same directory, then rename) by a
//! background task at most every [`SAVE_EVERY`] after a change, and once more
//! at shutdown. Requests only mark the state changed; the saver holds the
//! state lock just long enough to clone it.
//!
//! Webhook deliveries still owed (queued or in flight) are saved too and
//! fall due again at start-up, as Stripe keeps retrying across an outage of
//! the receiver; a delivery may therefore arrive twice, which Stripe also
//! allows.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio_util::sync::CancellationToken;

use super::state::{Delivery, State, StoredResponse};
use super::Emulator;

/// The file format this build writes and reads.
pub const FORMAT_VERSION: u32 = 1;

/// Changes are coalesced: one write per this interval at most.
pub const SAVE_EVERY: Duration = Duration::from_millis(200);

/// A state file that cannot be used, named, with the way out.
#[derive(Debug, thiserror::Error)]
#[error(
    "cannot load the Stripe emulator state from {path}: {cause}. Delete the file to start the emulator afresh (objects tollgate's database links to will then be missing; start with a fresh database too), or set STRIPE_EMULATOR_STATE=none to run without one"
)]
pub struct StateFileError {
    pub path: PathBuf,
    pub cause: String,
}

/// A delivery as saved: its due time is not kept (an `Instant` means nothing
/// in another process); every saved delivery is due at start-up.
#[derive(Serialize, Deserialize)]
struct SavedDelivery {
    endpoint_id: String,
    event_id: String,
    attempt: u32,
}

#[derive(Serialize, Deserialize)]
struct SavedResponse {
    /// SHA-256 of the API key the request used, never the key itself.
    api_key_hash: String,
    idempotency_key: String,
    fingerprint: String,
    status: u16,
    body: Value,
}

/// The file's content.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    version: u32,
    saved_at: i64,
    objects: HashMap<String, Value>,
    order: HashMap<String, Vec<String>>,
    cards: HashMap<String, String>,
    line_items: HashMap<String, Vec<Value>>,
    pending_invoice_items: HashMap<String, Vec<Value>>,
    idempotency: Vec<SavedResponse>,
    deliveries: Vec<SavedDelivery>,
}

impl Snapshot {
    fn of(mut state: State) -> Snapshot {
        let (objects, order) = state.take_objects_and_order();
        let deliveries = state
            .deliveries
            .into_iter()
            .chain(state.in_flight.into_values())
            .map(|d| SavedDelivery { endpoint_id: d.endpoint_id, event_id: d.event_id, attempt: d.attempt })
            .collect();
        let idempotency = state
            .idempotency
            .into_iter()
            .map(|((api_key_hash, idempotency_key), r)| SavedResponse {
                api_key_hash,
                idempotency_key,
                fingerprint: r.fingerprint,
                status: r.status,
                body: r.body,
            })
            .collect();
        Snapshot {
            version: FORMAT_VERSION,
            saved_at: super::state::real_now(),
            objects,
            order,
            cards: state.cards,
            line_items: state.line_items,
            pending_invoice_items: state.pending_invoice_items,
            idempotency,
            deliveries,
        }
    }

    fn into_state(self) -> State {
        let mut state = State::from_objects(self.objects, self.order);
        state.cards = self.cards;
        state.line_items = self.line_items;
        state.pending_invoice_items = self.pending_invoice_items;
        state.idempotency = self
            .idempotency
            .into_iter()
            .map(|r| {
                let stored = StoredResponse { fingerprint: r.fingerprint, status: r.status, body: r.body };
                ((r.api_key_hash, r.idempotency_key), stored)
            })
            .collect();
        let now = Instant::now();
        state.deliveries = self
            .deliveries
            .into_iter()
            .map(|d| Delivery {
                endpoint_id: d.endpoint_id,
                event_id: d.event_id,
                attempt: d.attempt,
                due: now,
            })
            .collect();
        state
    }
}

/// The state saved at `path`, or `None` when there is no file yet.
pub fn load(path: &Path) -> Result<Option<State>, StateFileError> {
    let fail = |cause: String| StateFileError { path: path.to_owned(), cause };
    let bytes = match std::fs::read(path) {
        Ok(b) => b,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(fail(e.to_string())),
    };
    // The version is read on its own first, so a newer format is named as
    // such rather than as a parse error somewhere inside it.
    #[derive(Deserialize)]
    struct Version {
        version: Option<u32>,
    }
    let version = serde_json::from_slice::<Version>(&bytes)
        .map_err(|e| match e.classify() {
            serde_json::error::Category::Eof | serde_json::error::Category::Syntax => {
                fail(format!("it is not valid JSON, perhaps cut short ({e})"))
            }
            _ => fail(format!("it is not an emulator state file ({e})")),
        })?
        .version;
    match version {
        Some(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(fail(format!(
                "it has format version {v}, this tollgate reads version {FORMAT_VERSION}"
            )))
        }
        None => return Err(fail("it has no `version` field".to_owned())),
    }
    let snapshot: Snapshot =
        serde_json::from_slice(&bytes).map_err(|e| fail(format!("it is damaged ({e})")))?;
    Ok(Some(snapshot.into_state()))
}

/// Writes `state` to `path` atomically: readers (and a crash) see the old
/// file or the new one, never half of one.
pub fn save(path: &Path, state: State) -> std::io::Result<()> {
    let snapshot = Snapshot::of(state);
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => Path::new("."),
    };
    let mut file = tempfile::NamedTempFile::new_in(dir)?;
    serde_json::to_writer(std::io::BufWriter::new(file.as_file_mut()), &snapshot)?;
    file.as_file_mut().flush()?;
    file.as_file().sync_all()?;
    file.persist(path).map_err(|e| e.error)?;
    Ok(())
}

/// Saves the emulator's state whenever it has changed, at most every
/// [`SAVE_EVERY`], until `shutdown`. The final save is the caller's, once
/// requests have stopped (see [`Emulator::save_now`]).
pub async fn run(em: Emulator, shutdown: CancellationToken) {
    let Some(persist) = em.inner.persist.as_ref() else { return };
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = persist.changed.notified() => {}
        }
        // Let a burst of changes gather into one write.
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(SAVE_EVERY) => {}
        }
        let em = em.clone();
        let _ = tokio::task::spawn_blocking(move || em.save_now()).await;
    }
}
