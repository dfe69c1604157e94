//! Webhook endpoints tollgate registered with a provider (`tollgate stripe
//! setup`) and their signing secrets. The provider shows a secret only when
//! the endpoint is created, so it is kept here and loaded into the verified
//! set at start-up. Secrets leave this module only as `SecretString`s, which
//! never print.

use secrecy::{ExposeSecret, SecretString};

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, SqlxResultExt, Store, StoreResult};

impl Store {
    /// Stores (or replaces) an endpoint's secret, with its audit entry (which
    /// names the endpoint, never the secret).
    pub async fn save_provider_webhook_endpoint(
        &self,
        provider: &str,
        endpoint_id: &str,
        url: &str,
        secret: &SecretString,
        actor: &Actor,
    ) -> StoreResult<()> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        sql!(
            tx,
            query(
                "INSERT INTO provider_webhook_endpoints (provider, endpoint_id, url, secret, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $5) ON CONFLICT (provider, endpoint_id) DO UPDATE SET \
                 url = excluded.url, secret = excluded.secret, updated_at = excluded.updated_at",
                provider,
                endpoint_id,
                url,
                secret.expose_secret(),
                now
            )
            .execute
        )
        .db()?;
        audit::append(
            &mut tx,
            AuditRecord {
                actor,
                action: "provider.webhook_endpoint.registered",
                object_type: "webhook_endpoint",
                object_id: endpoint_id,
                data: serde_json::json!({ "provider": provider, "url": url }),
                request_id: None,
            },
        )
        .await?;
        tx.commit().await
    }

    /// Whether tollgate holds the secret of this endpoint.
    pub async fn has_provider_webhook_secret(&self, provider: &str, endpoint_id: &str) -> StoreResult<bool> {
        let found = sql!(
            self,
            query_scalar::<String>(
                "SELECT endpoint_id FROM provider_webhook_endpoints WHERE provider = $1 AND endpoint_id = $2",
                provider,
                endpoint_id
            )
            .fetch_optional
        )
        .db()?;
        Ok(found.is_some())
    }

    /// Every stored signing secret of the provider, newest first.
    pub async fn provider_webhook_secrets(&self, provider: &str) -> StoreResult<Vec<SecretString>> {
        let rows: Vec<String> = sql!(
            self,
            query_scalar::<String>(
                "SELECT secret FROM provider_webhook_endpoints WHERE provider = $1 ORDER BY updated_at DESC, endpoint_id",
                provider
            )
            .fetch_all
        )
        .db()?;
        Ok(rows.into_iter().map(SecretString::from).collect())
    }
}
