//! Entitlement-token signing keys, shared by every instance on the database:
//! the active key, and retired keys kept until their tokens have expired.

use super::audit::{self, Actor, AuditRecord};
use super::{is_unique_violation, now_unix, sql, SqlxResultExt, Store, StoreError, StoreResult};

#[derive(Debug, Clone, PartialEq, Eq, sqlx::FromRow)]
pub struct SigningKeyRow {
    pub kid: String,
    pub algorithm: String,
    /// `generated` (stored with its private key) or `configured` (public half only).
    pub source: String,
    /// base64url of the raw public key.
    pub public_key: String,
    /// Generated keys: the sealed or plain PKCS#8 document.
    pub private_key: Option<String>,
    pub created_at: i64,
    pub retired_at: Option<i64>,
}

impl SigningKeyRow {
    pub fn is_active(&self) -> bool {
        self.retired_at.is_none()
    }
}

/// A key to make active.
#[derive(Debug, Clone)]
pub struct NewSigningKey {
    pub kid: String,
    pub source: &'static str,
    pub public_key: String,
    pub private_key: Option<String>,
}

const COLUMNS: &str = "kid, algorithm, source, public_key, private_key, created_at, retired_at";

/// How long after retirement a key is deleted, beyond its publication
/// window: a margin for instances configured with a longer token lifetime.
const DELETE_MARGIN_SECONDS: i64 = 86_400;

impl Store {
    /// The key that signs now, if any.
    pub async fn active_signing_key(&self) -> StoreResult<Option<SigningKeyRow>> {
        let q = format!("SELECT {COLUMNS} FROM signing_keys WHERE active = 1");
        sql!(self, query_as::<SigningKeyRow>(&q).fetch_optional).db()
    }

    pub async fn signing_key(&self, kid: &str) -> StoreResult<Option<SigningKeyRow>> {
        let q = format!("SELECT {COLUMNS} FROM signing_keys WHERE kid = $1");
        sql!(self, query_as::<SigningKeyRow>(&q, kid).fetch_optional).db()
    }

    /// The keys a verifier may need: the active one, and those retired at
    /// most `window` seconds ago (a token's lifetime plus leeway), newest first.
    pub async fn published_signing_keys(&self, window: i64) -> StoreResult<Vec<SigningKeyRow>> {
        let q = format!(
            "SELECT {COLUMNS} FROM signing_keys WHERE retired_at IS NULL OR retired_at >= $1 \
             ORDER BY retired_at IS NOT NULL, created_at DESC, kid"
        );
        sql!(self, query_as::<SigningKeyRow>(&q, now_unix() - window).fetch_all).db()
    }

    /// The newest generated key that is still published (active, or
    /// retired within `window`): what an instance without `JWT_SECRET_KEY`
    /// signs with while a configured key it does not hold is active.
    pub async fn newest_published_generated_key(&self, window: i64) -> StoreResult<Option<SigningKeyRow>> {
        let q = format!(
            "SELECT {COLUMNS} FROM signing_keys WHERE source = 'generated' AND private_key IS NOT NULL \
             AND (retired_at IS NULL OR retired_at >= $1) ORDER BY created_at DESC, kid LIMIT 1"
        );
        sql!(self, query_as::<SigningKeyRow>(&q, now_unix() - window).fetch_optional).db()
    }

    /// A retired key some instance still signs with (mid-rollout) stays
    /// published: its `retired_at` moves to now, so the JWKS keeps it until
    /// the tokens it signs from here on have expired. Nothing for the
    /// active key. Returns whether it moved (with an audit entry).
    pub async fn keep_signing_key_published(&self, kid: &str, actor: &Actor) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let moved = sql!(
            tx,
            query(
                "UPDATE signing_keys SET retired_at = $1 WHERE kid = $2 AND active IS NULL AND retired_at < $1",
                now,
                kid
            )
            .execute
        )
        .db()?;
        if moved == 0 {
            return Ok(false);
        }
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "signing_key.still_signing",
                object_type: "signing_key",
                object_id: kid,
                data: serde_json::json!({ "published_from": now }),
                request_id: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }

    /// Makes `new` the active key if `replaces` is still the active one
    /// (`None`: no key yet), retiring it, in one transaction with its audit
    /// entry. Returns `false`, changing nothing, when another instance or
    /// operator changed the active key first. Keys retired long before
    /// `window` are deleted on the way.
    pub async fn activate_signing_key(
        &self,
        new: &NewSigningKey,
        replaces: Option<&str>,
        window: i64,
        actor: &Actor,
    ) -> StoreResult<bool> {
        match self.try_activate(new, replaces, window, actor).await {
            Err(StoreError::Database(e)) if is_unique_violation(&e) => Ok(false),
            other => other,
        }
    }

    async fn try_activate(
        &self,
        new: &NewSigningKey,
        replaces: Option<&str>,
        window: i64,
        actor: &Actor,
    ) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let lock = match tx.kind() {
            super::DbKind::Postgres => "SELECT kid FROM signing_keys WHERE active = 1 FOR UPDATE",
            super::DbKind::Sqlite => "SELECT kid FROM signing_keys WHERE active = 1",
        };
        let current = sql!(tx, query_scalar::<String>(lock).fetch_optional).db()?;
        if current.as_deref() != replaces {
            return Ok(false);
        }
        // Only the key this activation replaces is retired: when nothing was
        // active, another instance may have committed its first key since
        // the check above (no row was there to lock on PostgreSQL), and
        // that key must stay; the insert below then meets the unique
        // `active` and this activation yields to it.
        if let Some(replaced) = replaces {
            sql!(
                tx,
                query(
                    "UPDATE signing_keys SET active = NULL, retired_at = $1 WHERE active = 1 AND kid = $2",
                    now,
                    replaced
                )
                .execute
            )
            .db()?;
        }
        // A key recorded before is never made active again: a retired
        // configured key was replaced by a newer one, and going back to it
        // would make instances configured with either flip the active key
        // at every start. Its kid already there is a unique violation: the
        // caller finds the key and signs as a retired one.
        sql!(
            tx,
            query(
                "INSERT INTO signing_keys (kid, algorithm, source, public_key, private_key, active, created_at, retired_at) \
                 VALUES ($1, 'EdDSA', $2, $3, $4, 1, $5, NULL)",
                &new.kid,
                new.source,
                &new.public_key,
                &new.private_key,
                now
            )
            .execute
        )
        .db()?;
        let deleted = sql!(
            tx,
            query(
                "DELETE FROM signing_keys WHERE retired_at IS NOT NULL AND retired_at < $1",
                now - window - DELETE_MARGIN_SECONDS
            )
            .execute
        )
        .db()?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: if replaces.is_some() { "signing_key.rotated" } else { "signing_key.created" },
                object_type: "signing_key",
                object_id: &new.kid,
                data: serde_json::json!({
                    "source": new.source,
                    "retired": replaces,
                    "deleted_expired_keys": deleted,
                }),
                request_id: None,
            },
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}
