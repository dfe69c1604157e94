//! Stored responses for `Idempotency-Key`.
//!
//! A key is claimed before the request runs (state `in_flight`, with a lease)
//! and completed with the response afterwards. A second request with the key
//! either replays the stored response, is told the first is still running,
//! or is told it reused the key for a different request. A lease that
//! outlives any request (the process died mid-request) can be taken over, so
//! a crash never locks a key for its whole lifetime.

use super::{now_unix, sql, SqlxResultExt, Store, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredResponse {
    pub status: u16,
    pub content_type: Option<String>,
    pub body: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// The key is ours: run the request, then `complete` or `release`.
    /// `first`: this claim created it; otherwise an earlier attempt of the
    /// same request ran under it (and failed, or was abandoned) and may
    /// have had effects, so it must stay bound to this request.
    Acquired { first: bool },
    /// The same request already completed: replay this.
    Replay(StoredResponse),
    /// The same request is running now.
    InFlight,
    /// The key was used for a different request.
    Mismatch,
}

#[derive(sqlx::FromRow)]
struct Row {
    fingerprint: String,
    state: String,
    locked_until: i64,
    response_status: Option<i64>,
    response_type: Option<String>,
    response_body: Option<Vec<u8>>,
}

impl Store {
    pub async fn claim_idempotency_key(
        &self,
        api_key_id: &str,
        key: &str,
        fingerprint: &str,
        lease_seconds: i64,
        ttl_seconds: i64,
    ) -> StoreResult<Claim> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        // An expired key is as good as never used.
        sql!(
            tx,
            query(
                "DELETE FROM idempotency_keys WHERE api_key_id = $1 AND idempotency_key = $2 AND created_at < $3",
                api_key_id,
                key,
                now - ttl_seconds
            )
            .execute
        )
        .db()?;
        let inserted = sql!(
            tx,
            query(
                "INSERT INTO idempotency_keys (api_key_id, idempotency_key, fingerprint, state, locked_until, created_at) \
                 VALUES ($1, $2, $3, 'in_flight', $4, $5) ON CONFLICT DO NOTHING",
                api_key_id,
                key,
                fingerprint,
                now + lease_seconds,
                now
            )
            .execute
        )
        .db()?
            == 1;
        if inserted {
            tx.commit().await?;
            return Ok(Claim::Acquired { first: true });
        }
        let lock = match tx.kind() {
            super::DbKind::Postgres => " FOR UPDATE",
            super::DbKind::Sqlite => "",
        };
        let sql = format!(
            "SELECT fingerprint, state, locked_until, response_status, response_type, response_body \
             FROM idempotency_keys WHERE api_key_id = $1 AND idempotency_key = $2{lock}"
        );
        let Some(row) = sql!(tx, query_as::<Row>(&sql, api_key_id, key).fetch_optional).db()? else {
            // Deleted between our insert attempt and the read: let the client retry.
            return Ok(Claim::InFlight);
        };
        let claim = if row.fingerprint != fingerprint {
            Claim::Mismatch
        } else if row.state == "complete" {
            Claim::Replay(StoredResponse {
                status: row.response_status.unwrap_or(200) as u16,
                content_type: row.response_type,
                body: row.response_body.unwrap_or_default(),
            })
        } else if row.locked_until < now {
            sql!(
                tx,
                query(
                    "UPDATE idempotency_keys SET locked_until = $1 WHERE api_key_id = $2 AND idempotency_key = $3",
                    now + lease_seconds,
                    api_key_id,
                    key
                )
                .execute
            )
            .db()?;
            Claim::Acquired { first: false }
        } else {
            Claim::InFlight
        };
        tx.commit().await?;
        Ok(claim)
    }

    pub async fn complete_idempotency_key(
        &self,
        api_key_id: &str,
        key: &str,
        response: &StoredResponse,
    ) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "UPDATE idempotency_keys SET state = 'complete', response_status = $1, response_type = $2, response_body = $3 \
                 WHERE api_key_id = $4 AND idempotency_key = $5",
                i64::from(response.status),
                &response.content_type,
                &response.body,
                api_key_id,
                key
            )
            .execute
        )
        .db()?;
        tx.commit().await
    }

    /// Ends the lease of a claim whose request failed in a way worth
    /// retrying (a 5xx, or the request was abandoned), so the client's retry
    /// with the same key runs the request again at once. The key stays
    /// bound to this request's fingerprint: the failed attempt may have had
    /// effects (a refund the provider made before its answer was lost), so
    /// the key must not be reused for another request within its lifetime.
    pub async fn release_idempotency_key(&self, api_key_id: &str, key: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "UPDATE idempotency_keys SET locked_until = 0 \
                 WHERE api_key_id = $1 AND idempotency_key = $2 AND state = 'in_flight'",
                api_key_id,
                key
            )
            .execute
        )
        .db()?;
        tx.commit().await
    }

    /// Forgets a claim whose request was refused before it had any effect
    /// (409, 429): the key is free for any request, the corrected one
    /// included.
    pub async fn forget_idempotency_key(&self, api_key_id: &str, key: &str) -> StoreResult<()> {
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "DELETE FROM idempotency_keys WHERE api_key_id = $1 AND idempotency_key = $2 AND state = 'in_flight'",
                api_key_id,
                key
            )
            .execute
        )
        .db()?;
        tx.commit().await
    }

    /// Deletes keys older than `ttl_seconds`; returns how many.
    pub async fn prune_idempotency_keys(&self, ttl_seconds: i64) -> StoreResult<u64> {
        let mut tx = self.begin().await?;
        let n = sql!(
            tx,
            query("DELETE FROM idempotency_keys WHERE created_at < $1", now_unix() - ttl_seconds).execute
        )
        .db()?;
        tx.commit().await?;
        Ok(n)
    }
}
