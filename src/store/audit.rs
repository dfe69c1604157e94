//! The audit log: an append-only, hash-chained record of every state change
//! and admin action.
//!
//! Each entry's hash covers its own fields and the previous entry's hash, so
//! editing, deleting or reordering any entry breaks every hash after it.
//! Appends happen inside the caller's transaction (the change and its record
//! commit together or not at all) and take the chain's head row for update,
//! so concurrent writers chain in commit order instead of forking.

use serde::Serialize;
use sha2::{Digest, Sha256};

use super::{now_unix, sql, SqlxResultExt, Store, StoreError, StoreResult, Tx};
use crate::ids::new_id;

pub const GENESIS_HASH: &str = "0000000000000000000000000000000000000000000000000000000000000000";

/// Who did it: an API key, an operator at the CLI, or tollgate itself.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Actor {
    ApiKey(String),
    Cli,
    System(&'static str),
}

impl Actor {
    pub fn as_string(&self) -> String {
        match self {
            Actor::ApiKey(id) => format!("api_key:{id}"),
            Actor::Cli => "cli".to_owned(),
            Actor::System(what) => format!("system:{what}"),
        }
    }
}

/// One change to record.
#[derive(Debug, Clone)]
pub struct AuditRecord<'a> {
    pub actor: &'a Actor,
    pub action: &'a str,
    pub object_type: &'a str,
    pub object_id: &'a str,
    pub data: serde_json::Value,
    pub request_id: Option<&'a str>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, sqlx::FromRow, utoipa::ToSchema)]
pub struct AuditEntry {
    pub seq: i64,
    pub id: String,
    pub at: i64,
    pub actor: String,
    pub action: String,
    pub object_type: String,
    pub object_id: String,
    /// The change, as JSON text.
    pub data: String,
    pub request_id: Option<String>,
    pub prev_hash: String,
    pub hash: String,
}

/// The hash of an entry: SHA-256 over a JSON array of its fields, an
/// unambiguous encoding (no field can bleed into the next).
pub fn entry_hash(e: &AuditEntry) -> String {
    let canonical = serde_json::json!([
        e.seq,
        e.id,
        e.at,
        e.actor,
        e.action,
        e.object_type,
        e.object_id,
        e.data,
        e.request_id,
        e.prev_hash
    ]);
    hex::encode(Sha256::digest(canonical.to_string().as_bytes()))
}

/// An entry recorded in a transaction, placed in the chain when the
/// transaction commits.
#[derive(Debug, Clone)]
pub(crate) struct PendingEntry {
    id: String,
    at: i64,
    actor: String,
    action: String,
    object_type: String,
    object_id: String,
    data: String,
    request_id: Option<String>,
}

/// Records one entry within `tx`: it commits with the change or not at all.
///
/// The entry joins the hash chain only when `tx` commits ([`flush`]), so a
/// transaction holds the chain's head (one row every writer needs) for the
/// few statements before its commit instead of from its first entry: on
/// PostgreSQL writers that touch different customers no longer queue behind
/// each other, and no writer waits for a customer's rows while holding the
/// head, so no lock order involving the head can deadlock.
pub async fn append(tx: &mut Tx, record: AuditRecord<'_>) -> StoreResult<()> {
    tx.audit.push(PendingEntry {
        id: new_id("aud"),
        at: now_unix(),
        actor: record.actor.as_string(),
        action: record.action.to_owned(),
        object_type: record.object_type.to_owned(),
        object_id: record.object_id.to_owned(),
        data: record.data.to_string(),
        request_id: record.request_id.map(str::to_owned),
    });
    Ok(())
}

/// Links a committing transaction's entries into the chain: takes the head
/// (`FOR UPDATE` on PostgreSQL, held to the commit that follows, so the
/// chain's order is commit order; SQLite's writer is already exclusive),
/// inserts the entries with a few multi-row statements, moves the head.
pub(crate) async fn flush(tx: &mut Tx, pending: Vec<PendingEntry>) -> StoreResult<()> {
    const COLUMNS_PER_ROW: usize = 11;
    const ROWS_PER_STATEMENT: usize = 128;
    if pending.is_empty() {
        return Ok(());
    }
    let head_sql = match tx.kind() {
        super::DbKind::Postgres => "SELECT seq, hash FROM audit_head WHERE id = 1 FOR UPDATE",
        super::DbKind::Sqlite => "SELECT seq, hash FROM audit_head WHERE id = 1",
    };
    let (mut seq, mut prev_hash): (i64, String) =
        sql!(tx, query_as::<(i64, String)>(head_sql).fetch_one).db()?;
    let entries: Vec<AuditEntry> = pending
        .into_iter()
        .map(|p| {
            seq += 1;
            let mut entry = AuditEntry {
                seq,
                id: p.id,
                at: p.at,
                actor: p.actor,
                action: p.action,
                object_type: p.object_type,
                object_id: p.object_id,
                data: p.data,
                request_id: p.request_id,
                prev_hash: std::mem::take(&mut prev_hash),
                hash: String::new(),
            };
            entry.hash = entry_hash(&entry);
            prev_hash = entry.hash.clone();
            entry
        })
        .collect();
    for chunk in entries.chunks(ROWS_PER_STATEMENT) {
        let rows = super::value_rows(tx.kind(), chunk.len(), COLUMNS_PER_ROW);
        let sql = format!(
            "INSERT INTO audit_log (seq, id, at, actor, action, object_type, object_id, data, request_id, prev_hash, hash) \
             VALUES {rows}"
        );
        macro_rules! bind_rows {
            ($query:expr) => {{
                let mut q = $query;
                for e in chunk {
                    q = q
                        .bind(e.seq)
                        .bind(&e.id)
                        .bind(e.at)
                        .bind(&e.actor)
                        .bind(&e.action)
                        .bind(&e.object_type)
                        .bind(&e.object_id)
                        .bind(&e.data)
                        .bind(&e.request_id)
                        .bind(&e.prev_hash)
                        .bind(&e.hash);
                }
                q
            }};
        }
        match tx.exec() {
            super::Exec::Sqlite(c) => bind_rows!(sqlx::query(&sql)).execute(c).await.map(|_| ()),
            super::Exec::Postgres(c) => bind_rows!(sqlx::query(&sql)).execute(c).await.map(|_| ()),
        }
        .db()?;
    }
    sql!(tx, query("UPDATE audit_head SET seq = $1, hash = $2 WHERE id = 1", seq, &prev_hash).execute)
        .db()?;
    Ok(())
}

/// The outcome of walking the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ChainReport {
    pub entries: i64,
    pub head_hash: String,
    /// The first broken link, if any: its sequence number and what is wrong.
    pub broken: Option<(i64, String)>,
}

impl ChainReport {
    pub fn is_intact(&self) -> bool {
        self.broken.is_none()
    }
}

impl Store {
    /// Walks the chain in pages, recomputing every hash, up to the head as
    /// it was when the walk began (entries appended meanwhile are not
    /// judged), and checks the last entry is the one the head records, so a
    /// truncated tail is detected.
    pub async fn verify_audit_chain(&self) -> StoreResult<ChainReport> {
        const PAGE: i64 = 1000;
        const COLUMNS: &str =
            "seq, id, at, actor, action, object_type, object_id, data, request_id, prev_hash, hash";
        let (head_seq, head_hash): (i64, String) =
            sql!(self, query_as::<(i64, String)>("SELECT seq, hash FROM audit_head WHERE id = 1").fetch_one)
                .db()?;
        let mut expected_prev = GENESIS_HASH.to_owned();
        let mut expected_seq = 1i64;
        let mut entries = 0i64;
        let page_sql =
            format!("SELECT {COLUMNS} FROM audit_log WHERE seq >= $1 AND seq <= $2 ORDER BY seq LIMIT $3");
        loop {
            let page: Vec<AuditEntry> =
                sql!(self, query_as::<AuditEntry>(&page_sql, expected_seq, head_seq, PAGE).fetch_all).db()?;
            let done = (page.len() as i64) < PAGE;
            for e in page {
                let problem = if e.seq != expected_seq {
                    Some(format!("expected entry {expected_seq}, found {} (entries missing)", e.seq))
                } else if e.prev_hash != expected_prev {
                    Some("prev_hash does not match the previous entry".to_owned())
                } else if entry_hash(&e) != e.hash {
                    Some("hash does not match the entry's contents (entry altered)".to_owned())
                } else {
                    None
                };
                if let Some(problem) = problem {
                    return Ok(ChainReport {
                        entries,
                        head_hash: expected_prev,
                        broken: Some((expected_seq, problem)),
                    });
                }
                expected_prev = e.hash;
                expected_seq += 1;
                entries += 1;
            }
            if done {
                break;
            }
        }
        let broken = (entries != head_seq || expected_prev != head_hash).then(|| {
            (
                entries + 1,
                format!(
                    "chain ends at entry {entries} but the head records entry {head_seq} (entries removed from the end)"
                ),
            )
        });
        Ok(ChainReport { entries, head_hash: expected_prev, broken })
    }

    /// Newest first, with the same cursor rules as every list. The cursor is
    /// an entry id; entries are ordered by their place in the chain.
    pub async fn list_audit_entries(&self, page: &super::Page) -> StoreResult<super::Listed<AuditEntry>> {
        const COLUMNS: &str =
            "seq, id, at, actor, action, object_type, object_id, data, request_id, prev_hash, hash";
        let cursor_seq = match page.cursor() {
            None => None,
            Some(id) => Some(
                sql!(self, query_scalar::<i64>("SELECT seq FROM audit_log WHERE id = $1", id).fetch_optional)
                    .db()?
                    .ok_or_else(|| StoreError::UnknownCursor {
                        param: page.cursor_param(),
                        id: id.to_owned(),
                    })?,
            ),
        };
        let rows: Vec<AuditEntry> = if page.is_backwards() {
            let sql = format!("SELECT {COLUMNS} FROM audit_log WHERE seq > $1 ORDER BY seq ASC LIMIT $2");
            sql!(self, query_as::<AuditEntry>(&sql, cursor_seq.unwrap_or(0), page.fetch_limit()).fetch_all)
        } else {
            let sql = format!("SELECT {COLUMNS} FROM audit_log WHERE seq < $1 ORDER BY seq DESC LIMIT $2");
            sql!(
                self,
                query_as::<AuditEntry>(&sql, cursor_seq.unwrap_or(i64::MAX), page.fetch_limit()).fetch_all
            )
        }
        .db()?;
        Ok(page.finish(rows))
    }
}

impl From<serde_json::Error> for StoreError {
    fn from(err: serde_json::Error) -> Self {
        StoreError::Corrupt(err.to_string())
    }
}
