//! tollgate's Stripe client: a thin layer over reqwest (rustls) speaking
//! Stripe's form encoding, with a timeout on every call. Written here rather
//! than taken from async-stripe because that crate generates the whole API
//! (a large compile) while tollgate uses a dozen endpoints; retries,
//! idempotency keys and the circuit breaker arrive with the selling issue.

use std::time::Duration;

pub mod objects;

use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;

/// The API version tollgate pins, so payload shapes do not drift.
pub const API_VERSION: &str = "2025-10-29.clover";

#[derive(Debug, thiserror::Error)]
pub enum StripeClientError {
    #[error("Stripe could not be reached: {0}")]
    Unreachable(String),
    #[error("Stripe answered {status}: {message}")]
    Api { status: u16, code: Option<String>, message: String },
    #[error("Stripe's answer was not understood: {0}")]
    Decode(String),
}

#[derive(Clone)]
pub struct StripeClient {
    http: reqwest::Client,
    base: String,
    key: SecretString,
}

impl std::fmt::Debug for StripeClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("StripeClient").field("base", &self.base).finish()
    }
}

impl StripeClient {
    pub fn new(base: &str, key: SecretString) -> Self {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .connect_timeout(Duration::from_secs(3))
            .user_agent(concat!("tollgate/", env!("CARGO_PKG_VERSION")))
            .build()
            .expect("HTTP client builds");
        StripeClient { http, base: base.trim_end_matches('/').to_owned(), key }
    }

    /// The client for this configuration: Stripe itself, or the built-in
    /// emulator when no key is set.
    pub fn from_config(config: &crate::config::Config) -> Self {
        match &config.stripe_secret_key {
            Some(key) => {
                Self::new(config.stripe_api_base.as_deref().unwrap_or("https://api.stripe.com"), key.clone())
            }
            None => Self::new(
                &format!("{}{}", config.public_url(), crate::http::EMULATOR_PREFIX),
                SecretString::from("sk_test_tollgate_emulator".to_owned()),
            ),
        }
    }

    pub async fn get(&self, path: &str, query: &[(&str, String)]) -> Result<Value, StripeClientError> {
        let resp = self
            .http
            .get(format!("{}{path}", self.base))
            .bearer_auth(self.key.expose_secret())
            .header("stripe-version", API_VERSION)
            .query(query)
            .send()
            .await
            .map_err(|e| StripeClientError::Unreachable(e.to_string()))?;
        let status = resp.status();
        let body: Value = resp.json().await.map_err(|e| StripeClientError::Decode(e.to_string()))?;
        if status.is_success() {
            Ok(body)
        } else {
            Err(StripeClientError::Api {
                status: status.as_u16(),
                code: body["error"]["code"].as_str().map(str::to_owned),
                message: body["error"]["message"].as_str().unwrap_or("").to_owned(),
            })
        }
    }

    /// One page of events created at or after `since`, newest first.
    pub async fn list_events(
        &self,
        since: i64,
        starting_after: Option<&str>,
    ) -> Result<(Vec<Value>, bool), StripeClientError> {
        let mut query = vec![("limit", "100".to_owned()), ("created[gte]", since.to_string())];
        if let Some(after) = starting_after {
            query.push(("starting_after", after.to_owned()));
        }
        let page = self.get("/v1/events", &query).await?;
        let data = page["data"]
            .as_array()
            .cloned()
            .ok_or_else(|| StripeClientError::Decode("no data array".into()))?;
        Ok((data, page["has_more"].as_bool().unwrap_or(false)))
    }
}
