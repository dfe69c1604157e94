//! API keys as stored: a digest, never the key.

use serde::Serialize;

use std::sync::Arc;

use super::audit::{self, Actor, AuditRecord};
use super::cache::{CacheKey, Lookup, Ticket};
use super::{now_unix, sql, SqlxResultExt, Store, StoreResult};
use crate::auth::{KeyMode, NewApiKey, Scope};
use crate::ids::new_id;

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ApiKeyRecord {
    pub id: String,
    pub name: String,
    pub scope: Scope,
    pub mode: KeyMode,
    pub prefix: String,
    pub created_at: i64,
    pub revoked_at: Option<i64>,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    name: String,
    scope: String,
    mode: String,
    prefix: String,
    created_at: i64,
    revoked_at: Option<i64>,
}

impl TryFrom<Row> for ApiKeyRecord {
    type Error = super::StoreError;
    fn try_from(r: Row) -> Result<Self, Self::Error> {
        let corrupt = |what: &str| super::StoreError::Corrupt(format!("api key {}: bad {what}", r.id));
        Ok(ApiKeyRecord {
            scope: Scope::parse(&r.scope).ok_or_else(|| corrupt("scope"))?,
            mode: KeyMode::parse(&r.mode).ok_or_else(|| corrupt("mode"))?,
            id: r.id,
            name: r.name,
            prefix: r.prefix,
            created_at: r.created_at,
            revoked_at: r.revoked_at,
        })
    }
}

const COLUMNS: &str = "id, name, scope, mode, prefix, created_at, revoked_at";

impl Store {
    pub async fn create_api_key(
        &self,
        name: &str,
        scope: Scope,
        mode: KeyMode,
        key: &NewApiKey,
        actor: &Actor,
    ) -> StoreResult<ApiKeyRecord> {
        let record = ApiKeyRecord {
            id: new_id("key"),
            name: name.to_owned(),
            scope,
            mode,
            prefix: key.display_prefix.clone(),
            created_at: now_unix(),
            revoked_at: None,
        };
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "INSERT INTO api_keys (id, name, scope, mode, digest, prefix, created_at) VALUES ($1, $2, $3, $4, $5, $6, $7)",
                &record.id,
                &record.name,
                scope.as_str(),
                mode.as_str(),
                &key.digest,
                &record.prefix,
                record.created_at,
            )
            .execute
        )
        .db()?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "api_key.created",
                object_type: "api_key",
                object_id: &record.id,
                data: serde_json::json!({ "name": name, "scope": scope, "mode": mode }),
                request_id: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(record)
    }

    /// The live (unrevoked) key with this digest: every API request asks,
    /// so it is answered from memory when it can be (revocation
    /// invalidates it in every instance; unknown digests are not cached).
    pub async fn find_api_key_by_digest(&self, digest: &str) -> StoreResult<Option<Arc<ApiKeyRecord>>> {
        match self.cached_api_key(digest) {
            Ok(record) => Ok(Some(record)),
            // Boxed: the query's state would otherwise be allocated and
            // moved with every request's future, hits included.
            Err(ticket) => Box::pin(self.read_api_key(digest, ticket)).await,
        }
    }

    /// [`find_api_key_by_digest`](Self::find_api_key_by_digest) as far as
    /// memory answers it, without waiting: the key, or what
    /// [`read_api_key`](Self::read_api_key) needs to read it (and cache it
    /// if it may). Counted once in the cache's figures either way.
    pub fn cached_api_key(&self, digest: &str) -> Result<Arc<ApiKeyRecord>, Option<Ticket>> {
        match self.cache.lookup(&self.cache.api_keys, digest) {
            Some(Lookup::Hit(record)) => Ok(record),
            Some(Lookup::Miss(ticket)) => Err(Some(ticket)),
            None => Err(None),
        }
    }

    pub async fn read_api_key(
        &self,
        digest: &str,
        ticket: Option<Ticket>,
    ) -> StoreResult<Option<Arc<ApiKeyRecord>>> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys WHERE digest = $1 AND revoked_at IS NULL");
        let row: Option<Row> = sql!(self, query_as::<Row>(&sql, digest).fetch_optional).db()?;
        let Some(record) = row.map(ApiKeyRecord::try_from).transpose()? else { return Ok(None) };
        let record = Arc::new(record);
        if let Some(ticket) = ticket {
            self.cache.api_keys.fill(digest.to_owned(), ticket, record.clone());
        }
        Ok(Some(record))
    }

    pub async fn list_api_keys(&self) -> StoreResult<Vec<ApiKeyRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM api_keys ORDER BY id");
        let rows: Vec<Row> = sql!(self, query_as::<Row>(&sql).fetch_all).db()?;
        rows.into_iter().map(ApiKeyRecord::try_from).collect()
    }

    /// Revokes a key by id; `false` if no such live key exists.
    pub async fn revoke_api_key(&self, id: &str, actor: &Actor) -> StoreResult<bool> {
        let mut tx = self.begin().await?;
        let digest: Option<String> = sql!(
            tx,
            query_scalar::<String>(
                "UPDATE api_keys SET revoked_at = $1 WHERE id = $2 AND revoked_at IS NULL RETURNING digest",
                now_unix(),
                id
            )
            .fetch_optional
        )
        .db()?;
        let revoked = digest.is_some();
        if let Some(digest) = digest {
            tx.invalidate(CacheKey::ApiKey(digest));
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "api_key.revoked",
                    object_type: "api_key",
                    object_id: id,
                    data: serde_json::json!({}),
                    request_id: None,
                },
            )
            .await?;
        }
        tx.commit().await?;
        Ok(revoked)
    }
}
