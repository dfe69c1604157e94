//! Start-up and shutdown: the one entry point that the binary and the tests
//! share, so tests exercise exactly what production runs.

use std::future::IntoFuture;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::billing::catalog::Catalog;
use crate::config::Config;
use crate::http::{self, AppState, AppStateInner};
use crate::store::audit::Actor;
use crate::store::{Store, StoreOptions};
use crate::{jobs, telemetry};

/// Everything that can stop tollgate from starting, each with a message an
/// operator can act on.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    #[error("configuration: {0}")]
    Config(String),
    #[error(transparent)]
    Catalog(#[from] crate::billing::catalog::CatalogError),
    #[error("database: {0}")]
    Store(#[from] crate::store::StoreError),
    #[error("redis: {0}")]
    Redis(#[from] redis::RedisError),
    #[error("server: {0}")]
    Io(#[from] std::io::Error),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("entitlement token signing key: {0}")]
    SigningKey(#[from] crate::tokens::keys::KeyRingError),
    #[error(transparent)]
    EmulatorState(#[from] crate::providers::stripe_emulator::persist::StateFileError),
}

pub fn store_options(config: &Config) -> StoreOptions {
    StoreOptions {
        max_connections: config.database_max_connections,
        sqlite_full_sync: config.sqlite_synchronous == crate::config::SqliteSync::Full,
        cache_capacity: config.entitlements_cache_capacity,
        ..StoreOptions::default()
    }
}

/// Serves tollgate on `listener` until `shutdown` is cancelled, then stops
/// accepting, lets in-flight requests and jobs finish (within the grace
/// period), and closes the database pools.
pub async fn run(
    config: Config,
    listener: TcpListener,
    shutdown: CancellationToken,
) -> Result<(), StartError> {
    Server::build(config, shutdown).await?.serve(listener).await
}

/// A tollgate ready to serve: configuration validated, database migrated,
/// catalog synced. Split from [`run`] so tests can reach the store.
pub struct Server {
    state: AppState,
    inbox_writers: tokio::task::JoinSet<()>,
    /// Set when tollgate terminates TLS itself (`TLS_CERT`, `TLS_KEY`).
    tls: Option<Arc<tokio_rustls::rustls::ServerConfig>>,
}

impl Server {
    pub async fn build(config: Config, shutdown: CancellationToken) -> Result<Self, StartError> {
        let problems = config.problems();
        let deferred = only_missing_webhook_secret(&problems);
        if !problems.is_empty() && !deferred {
            return Err(StartError::Config(problems.join("; ")));
        }
        let catalog = Catalog::load(&config.catalog_path)?;
        let declared_endpoints = crate::delivery::declared::load(
            &config.catalog_path,
            crate::delivery::TargetPolicy::from_config(&config),
            |name| std::env::var(name).ok(),
        )
        .await
        .map_err(StartError::Config)?;
        let store = Store::connect_and_migrate(config.database_url.expose(), &store_options(&config)).await?;
        // Secrets `tollgate stripe setup` stored, verified beside the configured ones.
        let stored_webhook_secrets = store.provider_webhook_secrets("stripe").await?;
        if deferred && stored_webhook_secrets.is_empty() {
            return Err(StartError::Config(problems.join("; ")));
        }
        let report = store.sync_catalog(&catalog, &Actor::System("catalog")).await?;
        if !report.is_noop() {
            tracing::info!(created = ?report.created, updated = ?report.updated, deactivated = ?report.deactivated, "catalog synced");
        }
        let report =
            store.reconcile_declared_webhook_endpoints(&declared_endpoints, &Actor::System("config")).await?;
        if !report.is_noop() {
            tracing::info!(created = ?report.created, updated = ?report.updated, removed = ?report.removed, "webhook endpoints from the config file reconciled");
        }
        let emulator = config
            .uses_stripe_emulator()
            .then(|| {
                use crate::providers::stripe_emulator::{Emulator, EmulatorConfig};
                tracing::info!(api_base = %format!("{}{}", config.public_url(), http::EMULATOR_PREFIX), "no STRIPE_SECRET_KEY: serving the built-in Stripe emulator");
                Emulator::open(
                    EmulatorConfig {
                        public_url: format!("{}{}", config.public_url(), http::EMULATOR_PREFIX),
                        api_key: None,
                        delivery: Default::default(),
                    },
                    config.stripe_emulator_state_path(),
                )
            })
            .transpose()?;
        let mut stripe_webhook_secrets = config.stripe_webhook_secrets();
        if let (Some(em), true) = (&emulator, stripe_webhook_secrets.is_empty()) {
            // Development with the emulator: register tollgate's own endpoint
            // with it, so its deliveries are verified like Stripe's.
            let url = format!("{}/webhooks/stripe", config.public_url());
            stripe_webhook_secrets.push(secrecy::SecretString::from(em.register_webhook_endpoint(&url)));
        }
        stripe_webhook_secrets.extend(stored_webhook_secrets);
        let writers = match store.kind() {
            crate::store::DbKind::Sqlite => 1,
            crate::store::DbKind::Postgres => 4,
        };
        let (inbox, inbox_writers) = crate::webhooks::inbox::Inbox::start(store.clone(), writers);
        let redis = config.redis_url.as_ref().map(|u| redis::Client::open(u.expose())).transpose()?;
        let shared_limits = redis.clone().map(|client| {
            Arc::new(crate::ratelimit::SharedStore::new(
                client,
                &config.redis_key_prefix,
                Duration::from_millis(config.rate_limit_redis_timeout_ms),
            ))
        });
        let rate_limits = Arc::new(crate::ratelimit::RateLimits::from_config(&config, shared_limits));
        let trusted_proxies = config.trusted_proxies().into();
        let tls = match (&config.tls_cert, &config.tls_key) {
            (Some(cert), Some(key)) => Some(http::tls::server_config(cert, key).map_err(StartError::Tls)?),
            _ => None,
        };
        // One client for the whole process, so its circuit breaker sees every call.
        let stripe = crate::providers::stripe::StripeClient::from_config(&config);
        let keys = crate::tokens::keys::KeyRing::start(store.clone(), &config).await?;
        let state = AppState::new(AppStateInner {
            store,
            metrics: telemetry::metrics_handle(),
            redis,
            shutdown,
            https: config.public_url().starts_with("https://"),
            max_body_bytes: config.max_body_bytes,
            request_timeout_seconds: config.request_timeout_seconds as i64,
            idempotency_ttl_seconds: (config.idempotency_key_ttl_hours * 3600) as i64,
            config: Arc::new(config),
            in_flight: Default::default(),
            request_metrics: Default::default(),
            emulator,
            inbox,
            stripe_webhook_secrets: Arc::new(stripe_webhook_secrets),
            inbox_wake: Arc::new(tokio::sync::Notify::new()),
            rate_limits,
            trusted_proxies,
            stripe,
            keys,
        });
        Ok(Server { state, inbox_writers, tls })
    }

    pub fn store(&self) -> &Store {
        &self.state.store
    }

    /// The router `serve` would run, without sockets or workers: for
    /// measuring the HTTP stack's own cost (`benches/http_stack.rs`).
    pub fn router(&self) -> http::HttpService {
        http::router(self.state.clone())
    }

    pub async fn serve(self, listener: TcpListener) -> Result<(), StartError> {
        let Server { state, mut inbox_writers, tls } = self;
        let shutdown = state.shutdown.clone();
        let store = state.store.clone();
        let grace = Duration::from_secs(state.config.shutdown_grace_seconds);
        let emulator = state.emulator.clone();
        let workers = jobs::spawn_all(&state, shutdown.clone());
        let app = http::router(state);

        let address = listener.local_addr()?;
        let service = axum::ServiceExt::<axum::extract::Request>::into_make_service_with_connect_info::<
            SocketAddr,
        >(app);
        let stop = shutdown.clone().cancelled_owned();
        let mut server: std::pin::Pin<Box<dyn std::future::Future<Output = std::io::Result<()>> + Send>> =
            match tls {
                Some(tls) => {
                    use axum::serve::ListenerExt;
                    tracing::info!(%address, "tollgate listening (HTTPS)");
                    // tap_io gives the TLS listener axum's ConnectInfo<SocketAddr>.
                    let listener = http::tls::TlsListener::new(listener, tls)?.tap_io(|_| {});
                    Box::pin(axum::serve(listener, service).with_graceful_shutdown(stop).into_future())
                }
                None => {
                    tracing::info!(%address, "tollgate listening");
                    Box::pin(axum::serve(listener, service).with_graceful_shutdown(stop).into_future())
                }
            };
        tokio::select! {
            result = &mut server => result?,
            () = shutdown.cancelled() => {
                // Stop accepting at once; give in-flight requests the grace period.
                if tokio::time::timeout(grace, &mut server).await.is_err() {
                    tracing::warn!(grace_seconds = grace.as_secs(), "requests still running after the grace period; exiting anyway");
                }
            }
        }
        // Dropping the server drops the router's state, and with it the
        // requests' handles on the inbox.
        drop(server);
        if tokio::time::timeout(grace, workers.wait()).await.is_err() {
            tracing::warn!("background jobs did not stop within the grace period");
        }
        // Every inbox handle is gone now: the writers store what was queued and stop.
        let drained =
            tokio::time::timeout(grace, async { while inbox_writers.join_next().await.is_some() {} }).await;
        if drained.is_err() {
            tracing::warn!("inbox writers did not drain within the grace period");
        }
        // Requests and jobs have stopped: the emulator's last changes are saved.
        if let Some(em) = emulator {
            let _ = tokio::task::spawn_blocking(move || em.save_now()).await;
        }
        store.close().await;
        tracing::info!("tollgate stopped");
        Ok(())
    }
}

/// Whether the one thing stopping start-up is a missing Stripe webhook
/// secret, which a secret stored by `tollgate stripe setup` resolves.
pub fn only_missing_webhook_secret(problems: &[String]) -> bool {
    problems.len() == 1 && problems[0].starts_with("STRIPE_WEBHOOK_SECRET is missing")
}

/// Resolves on SIGTERM or Ctrl-C and cancels `token`.
pub async fn cancel_on_signal(token: CancellationToken) {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let terminate = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let terminate = std::future::pending::<()>();
    tokio::select! {
        () = ctrl_c => {},
        () = terminate => {},
    }
    tracing::info!("shutdown requested");
    token.cancel();
}
