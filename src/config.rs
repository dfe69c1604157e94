//! Configuration: environment variables, the same names as CLI flags, and
//! validation that refuses unsafe combinations before anything starts.
//!
//! Secrets are `SecretString`s: they print as `[REDACTED]` in `Debug`, so a
//! logged config never leaks a key.

use crate::billing::entitlements::{PartialRefundPolicy, Policy};
use std::path::PathBuf;
use std::time::Duration;

use clap::{Args, ValueEnum};
use secrecy::{ExposeSecret, SecretString};

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Environment {
    Development,
    Production,
}

/// How SQLite makes commits durable (see README, "Durability").
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum SqliteSync {
    /// fsync at every commit: acknowledged events survive power loss.
    Full,
    /// fsync at checkpoints: survives a killed process, not power loss.
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Json,
    Pretty,
}

fn secret(raw: &str) -> Result<SecretString, std::convert::Infallible> {
    Ok(SecretString::from(raw.to_owned()))
}

/// A connection URL that may carry a password (`postgres://user:pw@host/db`):
/// usable as a string, but its `Debug` hides the password.
#[derive(Clone, PartialEq, Eq)]
pub struct ConnectionUrl(String);

impl ConnectionUrl {
    pub fn new(url: impl Into<String>) -> Self {
        Self(url.into())
    }

    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`, for messages and logs.
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else { return self.0.clone() };
        let (authority, tail) = rest.split_at(rest.find('/').unwrap_or(rest.len()));
        match authority.rsplit_once('@') {
            Some((userinfo, host)) => {
                let user = userinfo.split(':').next().unwrap_or("");
                let masked = if userinfo.contains(':') { format!("{user}:***") } else { user.to_owned() };
                format!("{scheme}://{masked}@{host}{tail}")
            }
            None => self.0.clone(),
        }
    }
}

impl std::fmt::Debug for ConnectionUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}", self.redacted())
    }
}

/// The database file a `sqlite:` URL names; `None` for other databases and
/// in-memory SQLite.
fn sqlite_file(url: &str) -> Option<PathBuf> {
    let rest = url.strip_prefix("sqlite://").or_else(|| url.strip_prefix("sqlite:"))?;
    let (path, query) = rest.split_once('?').unwrap_or((rest, ""));
    if path.is_empty() || path.contains(":memory:") || query.split('&').any(|kv| kv == "mode=memory") {
        return None;
    }
    Some(PathBuf::from(path))
}

fn connection_url(raw: &str) -> Result<ConnectionUrl, std::convert::Infallible> {
    Ok(ConnectionUrl::new(raw))
}

/// Every setting of a tollgate process. Field docs are the `--help` text.
#[derive(Debug, Clone, Args)]
pub struct Config {
    /// `development` or `production`; production refuses unsafe settings.
    #[arg(long, env = "ENVIRONMENT", value_enum, default_value = "development", global = true)]
    pub environment: Environment,

    /// `sqlite://PATH` or `postgres://…`.
    #[arg(long, env = "DATABASE_URL", default_value = "sqlite://tollgate.db", value_parser = connection_url, hide_env_values = true, global = true)]
    pub database_url: ConnectionUrl,

    /// Connections per database pool.
    #[arg(long, env = "DATABASE_MAX_CONNECTIONS", default_value_t = 10, global = true)]
    pub database_max_connections: u32,

    /// Customers' entitlements and API keys kept in memory per process
    /// (least recently used dropped first); 0 turns the caches off.
    #[arg(long, env = "ENTITLEMENTS_CACHE_CAPACITY", default_value_t = 100_000, global = true)]
    pub entitlements_cache_capacity: usize,

    /// In production, SQLite must be chosen on purpose (one machine, no replicas).
    #[arg(long, env = "ALLOW_SQLITE_IN_PRODUCTION", default_value_t = false, global = true)]
    pub allow_sqlite_in_production: bool,

    /// SQLite durability: `full` (fsync every commit) or `normal`.
    #[arg(long, env = "SQLITE_SYNCHRONOUS", value_enum, default_value = "full", global = true)]
    pub sqlite_synchronous: SqliteSync,

    /// Optional Redis, for state shared across instances.
    #[arg(long, env = "REDIS_URL", value_parser = connection_url, hide_env_values = true, global = true)]
    pub redis_url: Option<ConnectionUrl>,

    /// The catalog file.
    #[arg(long = "catalog", env = "TOLLGATE_CATALOG", default_value = "./tollgate.toml", global = true)]
    pub catalog_path: PathBuf,

    /// Port of the HTTP server.
    #[arg(long, env = "PORT", default_value_t = 8080, global = true)]
    pub port: u16,

    /// Address to listen on.
    #[arg(long, env = "BIND_ADDRESS", default_value = "0.0.0.0", global = true)]
    pub bind_address: String,

    /// Where users and providers reach tollgate (default http://127.0.0.1:$PORT).
    #[arg(long, env = "PUBLIC_URL", global = true)]
    pub public_url: Option<String>,

    /// Stripe secret key (`sk_test_…` or `sk_live_…`). Unset: the built-in emulator.
    #[arg(long, env = "STRIPE_SECRET_KEY", value_parser = secret, hide_env_values = true, global = true)]
    pub stripe_secret_key: Option<SecretString>,

    /// Stripe webhook signing secrets, comma-separated during rotation.
    #[arg(long, env = "STRIPE_WEBHOOK_SECRET", value_parser = secret, hide_env_values = true, global = true)]
    pub stripe_webhook_secret: Option<SecretString>,

    /// Base URL of Stripe's API (for proxies and the emulator).
    #[arg(long, env = "STRIPE_API_BASE", global = true)]
    pub stripe_api_base: Option<String>,

    /// File the built-in Stripe emulator keeps its state in, so it survives
    /// a restart; `none`: in memory only. Default: beside a SQLite database
    /// file (`tollgate.db.stripe-emulator.json`), none with PostgreSQL.
    #[arg(long, env = "STRIPE_EMULATOR_STATE", global = true)]
    pub stripe_emulator_state: Option<String>,

    /// PayPal REST app client id.
    #[arg(long, env = "PAYPAL_CLIENT_ID", global = true)]
    pub paypal_client_id: Option<String>,

    /// PayPal REST app secret.
    #[arg(long, env = "PAYPAL_CLIENT_SECRET", value_parser = secret, hide_env_values = true, global = true)]
    pub paypal_client_secret: Option<SecretString>,

    /// The PayPal webhook id its signatures are bound to.
    #[arg(long, env = "PAYPAL_WEBHOOK_ID", global = true)]
    pub paypal_webhook_id: Option<String>,

    /// Secret for sessions and CSRF tokens: at least 32 random characters in production.
    #[arg(long, env = "SECRET_KEY", value_parser = secret, hide_env_values = true, global = true)]
    pub secret_key: Option<SecretString>,

    /// Key that signs entitlement tokens: an Ed25519 private key in PKCS#8
    /// PEM, inline or the path of a file, or a random secret of 32+
    /// characters to derive one from. Unset: a key pair is generated at first
    /// start and kept in the database (rotate with `tollgate keys rotate`).
    #[arg(long, env = "JWT_SECRET_KEY", value_parser = secret, hide_env_values = true, global = true)]
    pub jwt_secret_key: Option<SecretString>,

    /// Lifetime of an entitlement token, in seconds.
    #[arg(long, env = "ENTITLEMENT_TOKEN_TTL_SECONDS", default_value_t = 300, global = true)]
    pub entitlement_token_ttl_seconds: u64,

    /// The `aud` claim of entitlement tokens (none if unset).
    #[arg(long, env = "ENTITLEMENT_TOKEN_AUDIENCE", global = true)]
    pub entitlement_token_audience: Option<String>,

    /// How long a retired signing key stays in the JWKS after the last
    /// token it signed expired: the clock skew verifiers allow.
    #[arg(long, env = "ENTITLEMENT_TOKEN_LEEWAY_SECONDS", default_value_t = 60, global = true)]
    pub entitlement_token_leeway_seconds: u64,

    /// Browser origins allowed by CORS, comma-separated; empty means none.
    #[arg(long, env = "ALLOWED_ORIGINS", value_delimiter = ',', global = true)]
    pub allowed_origins: Vec<String>,

    /// Default checkout success URL.
    #[arg(long = "paymentsvc-success-url", env = "PAYMENTSVC_SUCCESS_URL", global = true)]
    pub success_url: Option<String>,

    /// Default checkout cancel URL.
    #[arg(long = "paymentsvc-cancel-url", env = "PAYMENTSVC_CANCEL_URL", global = true)]
    pub cancel_url: Option<String>,

    /// Default customer-portal return URL.
    #[arg(long = "paymentsvc-return-url", env = "PAYMENTSVC_RETURN_URL", global = true)]
    pub return_url: Option<String>,

    /// `error`, `warn`, `info`, `debug`, `trace`, or a tracing filter.
    #[arg(long, env = "LOG_LEVEL", default_value = "info", global = true)]
    pub log_level: String,

    /// `json` or `pretty` (default: json in production, pretty otherwise).
    #[arg(long, env = "LOG_FORMAT", value_enum, global = true)]
    pub log_format: Option<LogFormat>,

    /// Sustained requests per second per API key.
    #[arg(long, env = "RATE_LIMIT_PER_KEY", default_value_t = 100, global = true)]
    pub rate_limit_per_key: u32,

    /// Sustained requests per second per client address.
    #[arg(long, env = "RATE_LIMIT_PER_IP", default_value_t = 20, global = true)]
    pub rate_limit_per_ip: u32,

    /// Requests allowed in a burst above the sustained rate.
    #[arg(long, env = "RATE_LIMIT_BURST", default_value_t = 200, global = true)]
    pub rate_limit_burst: u32,

    /// Accepted age of a provider webhook signature, in seconds, either way.
    #[arg(long, env = "WEBHOOK_TOLERANCE_SECONDS", default_value_t = 300, global = true)]
    pub webhook_tolerance_seconds: u64,

    /// Lets production webhook endpoints resolve to private addresses.
    #[arg(long, env = "ALLOW_PRIVATE_WEBHOOK_TARGETS", default_value_t = false, global = true)]
    pub allow_private_webhook_targets: bool,

    /// Longest a request may run before it is answered 408.
    #[arg(long, env = "REQUEST_TIMEOUT_SECONDS", default_value_t = 30, global = true)]
    pub request_timeout_seconds: u64,

    /// Largest request body accepted on the API, in bytes.
    #[arg(long, env = "MAX_BODY_BYTES", default_value_t = 1024 * 1024, global = true)]
    pub max_body_bytes: usize,

    /// How long an `Idempotency-Key` and its stored response are kept.
    #[arg(long, env = "IDEMPOTENCY_KEY_TTL_HOURS", default_value_t = 24, global = true)]
    pub idempotency_key_ttl_hours: u64,

    /// Apply the object as Stripe has it now (fetched from its API) rather
    /// than the event's snapshot.
    #[arg(long, env = "STRIPE_REFETCH", default_value_t = false, global = true)]
    pub stripe_refetch: bool,

    /// How often to reconcile with the provider's event list (0 turns it off).
    #[arg(long, env = "RECONCILE_INTERVAL_SECONDS", default_value_t = 900, global = true)]
    pub reconcile_interval_seconds: u64,

    /// Attempts before a provider event that keeps failing is marked dead.
    #[arg(long, env = "PROVIDER_EVENT_MAX_ATTEMPTS", default_value_t = 10, global = true)]
    pub provider_event_max_attempts: i64,

    /// Grace period before in-flight requests are abandoned at shutdown.
    #[arg(long, env = "SHUTDOWN_GRACE_SECONDS", default_value_t = 25, global = true)]
    pub shutdown_grace_seconds: u64,

    /// What a partial refund takes back: credits in proportion to the money
    /// returned (`proportional`), nothing until fully refunded (`keep`), or
    /// everything (`revoke_all`).
    #[arg(long, env = "PARTIAL_REFUND_POLICY", value_enum, default_value_t = PartialRefundPolicy::Proportional, global = true)]
    pub partial_refund_policy: PartialRefundPolicy,

    /// Revoke an order's grants as soon as a dispute opens (else only when
    /// it is lost; a won dispute restores them either way).
    #[arg(long, env = "REVOKE_ON_DISPUTE_OPEN", default_value_t = false, global = true)]
    pub revoke_on_dispute_open: bool,

    /// How long a `past_due` subscription keeps granting its entitlements.
    #[arg(long, env = "PAST_DUE_GRACE_HOURS", default_value_t = 72, global = true)]
    pub past_due_grace_hours: u64,

    /// Where `tollgate backup` writes and `restore-drill` and `doctor` look.
    #[arg(long, env = "BACKUP_DIR", default_value = "./backups", global = true)]
    pub backup_dir: PathBuf,

    /// How many backups `tollgate backup` keeps (older ones are deleted).
    #[arg(long, env = "BACKUP_KEEP", default_value_t = 14, global = true)]
    pub backup_keep: usize,

    /// `doctor` fails when the newest backup is older than this.
    #[arg(long, env = "BACKUP_MAX_AGE_HOURS", default_value_t = 26, global = true)]
    pub backup_max_age_hours: u64,

    /// `doctor` fails when the last passed restore drill is older than this.
    #[arg(long, env = "DRILL_MAX_AGE_DAYS", default_value_t = 8, global = true)]
    pub drill_max_age_days: u64,

    /// PostgreSQL server where `restore-drill` creates (and drops) its
    /// scratch database (default: DATABASE_URL's server).
    #[arg(long, env = "DRILL_DATABASE_URL", value_parser = connection_url, hide_env_values = true, global = true)]
    pub drill_database_url: Option<ConnectionUrl>,

    /// How often the retention job prunes (0 turns it off).
    #[arg(long, env = "RETENTION_INTERVAL_SECONDS", default_value_t = 3600, global = true)]
    pub retention_interval_seconds: u64,

    /// Days a processed or ignored provider event is kept (0: forever).
    #[arg(long, env = "RETENTION_PROVIDER_EVENTS_DAYS", default_value_t = 90, global = true)]
    pub retention_provider_events_days: u64,

    /// Days a delivered outbound message is kept (0: forever).
    #[arg(long, env = "RETENTION_DELIVERIES_DAYS", default_value_t = 30, global = true)]
    pub retention_deliveries_days: u64,

    /// Failed webhook verifications one address may make per minute before
    /// its requests are answered 429.
    #[arg(long, env = "RATE_LIMIT_WEBHOOK_FAILURES", default_value_t = 60, global = true)]
    pub rate_limit_webhook_failures: u32,

    /// Longest a rate-limit check waits for Redis, in milliseconds, before
    /// this instance falls back to its own limiter.
    #[arg(long, env = "RATE_LIMIT_REDIS_TIMEOUT_MS", default_value_t = 50, global = true)]
    pub rate_limit_redis_timeout_ms: u64,

    /// Proxies whose `X-Forwarded-For` names the client: CIDRs or addresses,
    /// comma-separated. Empty: the peer address is the client.
    #[arg(long, env = "TRUSTED_PROXIES", value_delimiter = ',', global = true)]
    pub trusted_proxies: Vec<String>,

    /// Prefix of every key tollgate writes to Redis, so several deployments
    /// can share one Redis.
    #[arg(long, env = "REDIS_KEY_PREFIX", default_value = "tollgate:", global = true)]
    pub redis_key_prefix: String,

    /// PEM certificate chain: serve HTTPS directly, without a proxy (with `TLS_KEY`).
    #[arg(long, env = "TLS_CERT", global = true)]
    pub tls_cert: Option<PathBuf>,

    /// PEM private key of `TLS_CERT`.
    #[arg(long, env = "TLS_KEY", global = true)]
    pub tls_key: Option<PathBuf>,

    /// Longest a single call to Stripe may take, in seconds, before it is
    /// abandoned (and retried, if retries remain).
    #[arg(long, env = "STRIPE_TIMEOUT_SECONDS", default_value_t = 10, global = true)]
    pub stripe_timeout_seconds: u64,

    /// Retries of a Stripe call that failed transiently (connection, 429, 5xx).
    #[arg(long, env = "STRIPE_MAX_RETRIES", default_value_t = 2, global = true)]
    pub stripe_max_retries: u32,

    /// Consecutive failed Stripe calls that open the circuit breaker.
    #[arg(long, env = "STRIPE_BREAKER_FAILURES", default_value_t = 5, global = true)]
    pub stripe_breaker_failures: u32,

    /// How long an open breaker refuses calls before one trial call is let through.
    #[arg(long, env = "STRIPE_BREAKER_COOLDOWN_SECONDS", default_value_t = 30, global = true)]
    pub stripe_breaker_cooldown_seconds: u64,
    /// Longest wait for an application webhook endpoint to answer.
    #[arg(long, env = "WEBHOOK_TIMEOUT_SECONDS", default_value_t = 15, global = true)]
    pub webhook_timeout_seconds: u64,

    /// Delays between outbound webhook attempts. Not a setting: always the
    /// spec's schedule, except in tests that need retries to happen now.
    #[arg(skip)]
    pub webhook_retry_schedule: Option<Vec<Duration>>,

    /// How often the outbound delivery workers look for due deliveries when
    /// nothing woke them (retries coming due; a missed wake-up). New events
    /// wake them at once.
    #[arg(long, env = "WEBHOOK_DELIVERY_POLL_MS", default_value_t = 250, global = true)]
    pub webhook_delivery_poll_ms: u64,

    /// Outbound delivery workers in this process (default: 1 on SQLite, 2
    /// on PostgreSQL); 0 leaves sending to other instances.
    #[arg(long, env = "WEBHOOK_DELIVERY_WORKERS", global = true)]
    pub webhook_delivery_workers: Option<u32>,

    /// Inbox workers applying provider events in this process (default: 1
    /// on SQLite, whose one writer gains nothing from more; 2 on
    /// PostgreSQL); 0 leaves applying to other instances.
    #[arg(long, env = "INBOX_WORKERS", global = true)]
    pub inbox_workers: Option<u32>,

    /// Provider events an inbox worker claims and applies in one
    /// transaction: larger batches apply more per second, smaller ones
    /// hold the database (SQLite's one writer) for less time at once.
    #[arg(long, env = "INBOX_BATCH", default_value_t = 64, global = true)]
    pub inbox_batch: u32,
}

impl Config {
    /// The configuration a process gets with no environment at all: what
    /// tests and embedders start from.
    pub fn defaults() -> Self {
        #[derive(clap::Parser)]
        struct Only {
            #[command(flatten)]
            config: Config,
        }
        // Parse from an empty command line, ignoring the environment, so the
        // defaults live in one place: the attributes above.
        let cmd = <Only as clap::CommandFactory>::command();
        let cmd = cmd.mut_args(|a| a.env(None::<&str>));
        let matches = cmd.get_matches_from(["tollgate"]);
        <Only as clap::FromArgMatches>::from_arg_matches(&matches).expect("defaults parse").config
    }

    /// The fulfilment rules these settings choose.
    pub fn fulfilment_policy(&self) -> Policy {
        Policy {
            partial_refund: self.partial_refund_policy,
            revoke_on_dispute_open: self.revoke_on_dispute_open,
            past_due_grace_seconds: (self.past_due_grace_hours as i64).saturating_mul(3600),
        }
    }

    pub fn public_url(&self) -> String {
        let scheme = if self.serves_tls() { "https" } else { "http" };
        self.public_url
            .clone()
            .unwrap_or_else(|| format!("{scheme}://127.0.0.1:{}", self.port))
            .trim_end_matches('/')
            .to_owned()
    }

    /// Whether tollgate terminates TLS itself (`TLS_CERT` and `TLS_KEY`).
    pub fn serves_tls(&self) -> bool {
        self.tls_cert.is_some() && self.tls_key.is_some()
    }

    /// `TRUSTED_PROXIES` parsed; entries that do not parse are reported by
    /// [`Config::problems`] and left out here.
    pub fn trusted_proxies(&self) -> Vec<ipnet::IpNet> {
        self.trusted_proxies.iter().filter_map(|p| parse_proxy(p).transpose()).flatten().collect()
    }

    pub fn is_production(&self) -> bool {
        self.environment == Environment::Production
    }

    pub fn log_format(&self) -> LogFormat {
        self.log_format.unwrap_or(if self.is_production() { LogFormat::Json } else { LogFormat::Pretty })
    }

    pub fn request_timeout(&self) -> Duration {
        Duration::from_secs(self.request_timeout_seconds.max(1))
    }

    /// The configured webhook secrets, in order, for rotation.
    pub fn stripe_webhook_secrets(&self) -> Vec<SecretString> {
        self.stripe_webhook_secret
            .as_ref()
            .map(|s| {
                s.expose_secret()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| SecretString::from(s.to_owned()))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Whether tollgate runs against its own Stripe emulator.
    pub fn uses_stripe_emulator(&self) -> bool {
        self.stripe_secret_key.is_none()
    }

    /// Where the built-in Stripe emulator keeps its state (see
    /// `STRIPE_EMULATOR_STATE`): the setting, else beside a SQLite database
    /// file; `None` keeps it in memory.
    pub fn stripe_emulator_state_path(&self) -> Option<PathBuf> {
        match self.stripe_emulator_state.as_deref().map(str::trim) {
            Some(s) if s.is_empty() || s.eq_ignore_ascii_case("none") => None,
            Some(path) => Some(PathBuf::from(path)),
            None => sqlite_file(self.database_url.expose()).map(|db| {
                let mut name = db.into_os_string();
                name.push(".stripe-emulator.json");
                PathBuf::from(name)
            }),
        }
    }

    /// Every reason this configuration must not start, one line each.
    pub fn problems(&self) -> Vec<String> {
        let mut problems = Vec::new();
        let stripe_key = self.stripe_secret_key.as_ref().map(|k| k.expose_secret().to_owned());
        match self.environment {
            Environment::Production => {
                match stripe_key.as_deref() {
                    Some(k) if k.starts_with("sk_test_") || k.starts_with("rk_test_") => problems.push(
                        "STRIPE_SECRET_KEY is a test key (sk_test_…) but ENVIRONMENT=production: use the live key".to_owned(),
                    ),
                    None => problems.push(
                        "STRIPE_SECRET_KEY is missing: the built-in Stripe emulator is for development only".to_owned(),
                    ),
                    _ => {}
                }
                if stripe_key.is_some() && self.stripe_webhook_secrets().is_empty() {
                    problems.push(
                        "STRIPE_WEBHOOK_SECRET is missing: without it provider webhooks cannot be verified (run `tollgate stripe setup`)"
                            .to_owned(),
                    );
                }
                if self.paypal_client_id.is_some() && self.paypal_webhook_id.is_none() {
                    problems
                        .push("PAYPAL_WEBHOOK_ID is missing: PayPal webhooks cannot be verified".to_owned());
                }
                if self.paypal_client_id.is_some() && self.paypal_client_secret.is_none() {
                    problems.push(
                        "PAYPAL_CLIENT_SECRET is missing: PAYPAL_CLIENT_ID needs its secret".to_owned(),
                    );
                }
                if self.allowed_origins.iter().any(|o| o.trim() == "*") {
                    problems.push(
                        "ALLOWED_ORIGINS contains the wildcard '*' in production: list the exact origins"
                            .to_owned(),
                    );
                }
                match &self.secret_key {
                    None => problems.push(
                        "SECRET_KEY is missing: set at least 32 random characters (e.g. `openssl rand -base64 48`)"
                            .to_owned(),
                    ),
                    Some(k) if is_weak_secret(k.expose_secret()) => problems.push(
                        "SECRET_KEY is weak: use at least 32 random characters (e.g. `openssl rand -base64 48`)".to_owned(),
                    ),
                    _ => {}
                }
                if self.database_url.expose().starts_with("sqlite:") && !self.allow_sqlite_in_production {
                    problems.push(
                        "DATABASE_URL is SQLite in production: use PostgreSQL, or set ALLOW_SQLITE_IN_PRODUCTION=true for a single-machine deployment"
                            .to_owned(),
                    );
                }
            }
            Environment::Development => {
                if stripe_key
                    .as_deref()
                    .is_some_and(|k| k.starts_with("sk_live_") || k.starts_with("rk_live_"))
                {
                    problems.push(
                        "STRIPE_SECRET_KEY is a live key (sk_live_…) but ENVIRONMENT=development: use a test key, or set ENVIRONMENT=production"
                            .to_owned(),
                    );
                }
            }
        }
        if let Some(raw) = &self.jwt_secret_key {
            match crate::tokens::configured_key(raw.expose_secret()) {
                Err(e) => problems.push(e.0),
                Ok((_, crate::tokens::ConfiguredFrom::Secret))
                    if self.is_production() && is_weak_secret(raw.expose_secret()) =>
                {
                    problems.push(
                        "JWT_SECRET_KEY is weak: use an Ed25519 PEM key (`openssl genpkey -algorithm ed25519`) or at least 32 random characters"
                            .to_owned(),
                    )
                }
                Ok(_) => {}
            }
        }
        if !(1..=MAX_ENTITLEMENT_TOKEN_TTL_SECONDS).contains(&self.entitlement_token_ttl_seconds) {
            problems.push(format!(
                "ENTITLEMENT_TOKEN_TTL_SECONDS must be from 1 to {MAX_ENTITLEMENT_TOKEN_TTL_SECONDS}: tokens are short-lived snapshots of entitlements"
            ));
        }
        if self.entitlement_token_leeway_seconds > MAX_ENTITLEMENT_TOKEN_TTL_SECONDS {
            problems.push(format!(
                "ENTITLEMENT_TOKEN_LEEWAY_SECONDS must be at most {MAX_ENTITLEMENT_TOKEN_TTL_SECONDS}"
            ));
        }
        if let Some(url) = &self.public_url {
            if !(url.starts_with("http://") || url.starts_with("https://")) {
                problems.push(format!("PUBLIC_URL {url:?} must start with http:// or https://"));
            }
        }
        if let Err(e) = crate::store::DbKind::from_url(self.database_url.expose()) {
            problems.push(format!("DATABASE_URL: {e}"));
        }
        if (1..MIN_PROVIDER_EVENT_RETENTION_DAYS).contains(&self.retention_provider_events_days) {
            problems.push(format!(
                "RETENTION_PROVIDER_EVENTS_DAYS must be 0 (keep) or at least {MIN_PROVIDER_EVENT_RETENTION_DAYS}: Stripe lists and redelivers events for 30 days, and the inbox is what recognises them"
            ));
        }
        for origin in &self.allowed_origins {
            let o = origin.trim();
            if o != "*" && !(o.starts_with("http://") || o.starts_with("https://")) {
                problems.push(format!(
                    "ALLOWED_ORIGINS entry {o:?} must be an origin such as https://app.example.com"
                ));
            }
        }
        for proxy in &self.trusted_proxies {
            if parse_proxy(proxy).is_err() {
                problems.push(format!(
                    "TRUSTED_PROXIES entry {:?} must be an address or a CIDR such as 10.0.0.0/8",
                    proxy.trim()
                ));
            }
        }
        if self.rate_limit_burst == 0 && (self.rate_limit_per_key > 0 || self.rate_limit_per_ip > 0) {
            problems.push(
                "RATE_LIMIT_BURST is 0: it must be at least 1 (set RATE_LIMIT_PER_KEY=0 and RATE_LIMIT_PER_IP=0 to turn limits off)"
                    .to_owned(),
            );
        }
        match (&self.tls_cert, &self.tls_key) {
            (Some(_), None) => {
                problems.push("TLS_CERT is set without TLS_KEY: set both, or neither".to_owned())
            }
            (None, Some(_)) => {
                problems.push("TLS_KEY is set without TLS_CERT: set both, or neither".to_owned())
            }
            _ => {}
        }
        problems
    }
}

/// A day: an entitlement token is a snapshot that goes stale, and a
/// retired key is published for this long after rotation.
pub const MAX_ENTITLEMENT_TOKEN_TTL_SECONDS: u64 = 86_400;

/// Stripe keeps events listable (and `reconcile` may fetch them again) for
/// 30 days; a pruned event that comes back must still be recognised by the
/// inbox, not only by its object's watermark.
pub const MIN_PROVIDER_EVENT_RETENTION_DAYS: u64 = 31;

/// One `TRUSTED_PROXIES` entry: a CIDR, or a bare address meaning just
/// that address. Empty entries (a trailing comma) are skipped.
fn parse_proxy(raw: &str) -> Result<Option<ipnet::IpNet>, ()> {
    let raw = raw.trim();
    if raw.is_empty() {
        return Ok(None);
    }
    if let Ok(net) = raw.parse::<ipnet::IpNet>() {
        return Ok(Some(net.trunc()));
    }
    raw.parse::<std::net::IpAddr>().map(|ip| Some(ipnet::IpNet::from(ip))).map_err(|_| ())
}

/// Too short, or too few distinct characters to be random, or a placeholder.
pub fn is_weak_secret(secret: &str) -> bool {
    const PLACEHOLDERS: [&str; 6] = ["changeme", "change-me", "secret", "password", "development", "example"];
    let distinct: std::collections::BTreeSet<char> = secret.chars().collect();
    let lower = secret.to_ascii_lowercase();
    secret.len() < 32 || distinct.len() < 10 || PLACEHOLDERS.iter().any(|p| lower.contains(p))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn production() -> Config {
        let mut c = Config::defaults();
        c.environment = Environment::Production;
        c.stripe_secret_key = Some(SecretString::from("sk_live_abc".to_owned()));
        c.stripe_webhook_secret = Some(SecretString::from("whsec_abc".to_owned()));
        c.secret_key = Some(SecretString::from("q8Zr1vX0pL3mN7bK2yT5wE9uJ4hG6fD0sA".to_owned()));
        c.database_url = ConnectionUrl::new("postgres://tollgate:hunter2secret@db/tollgate");
        c.allowed_origins = vec!["https://app.example.com".to_owned()];
        c
    }

    #[track_caller]
    fn refused(c: &Config, needle: &str) {
        let problems = c.problems();
        assert!(
            problems.iter().any(|p| p.contains(needle)),
            "expected a problem mentioning {needle:?}, got {problems:?}"
        );
    }

    #[test]
    fn defaults_are_a_valid_development_setup() {
        let c = Config::defaults();
        assert_eq!(c.environment, Environment::Development);
        assert_eq!(c.port, 8080);
        assert_eq!(c.database_url.expose(), "sqlite://tollgate.db");
        assert!(c.uses_stripe_emulator());
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(c.public_url(), "http://127.0.0.1:8080");
    }

    #[test]
    fn a_good_production_setup_passes() {
        assert!(production().problems().is_empty(), "{:?}", production().problems());
    }

    #[test]
    fn production_refuses_each_unsafe_setting() {
        let mut c = production();
        c.stripe_secret_key = Some(SecretString::from("sk_test_123".to_owned()));
        refused(&c, "test key");

        let mut c = production();
        c.stripe_webhook_secret = None;
        refused(&c, "STRIPE_WEBHOOK_SECRET is missing");

        let mut c = production();
        c.allowed_origins = vec!["*".to_owned()];
        refused(&c, "wildcard");

        let mut c = production();
        c.secret_key = None;
        refused(&c, "SECRET_KEY is missing");

        let mut c = production();
        c.secret_key = Some(SecretString::from("short".to_owned()));
        refused(&c, "SECRET_KEY is weak");

        let mut c = production();
        c.secret_key = Some(SecretString::from("a".repeat(64)));
        refused(&c, "SECRET_KEY is weak");

        let mut c = production();
        c.database_url = ConnectionUrl::new("sqlite://tollgate.db");
        refused(&c, "SQLite in production");
        c.allow_sqlite_in_production = true;
        assert!(c.problems().is_empty());
    }

    #[test]
    fn the_emulator_state_sits_beside_a_sqlite_file_unless_configured() {
        let mut c = Config::defaults();
        let path = |c: &Config| c.stripe_emulator_state_path().map(|p| p.display().to_string());
        assert_eq!(path(&c).as_deref(), Some("tollgate.db.stripe-emulator.json"));
        c.database_url = ConnectionUrl::new("sqlite:///var/lib/tg/app.db?mode=rwc");
        assert_eq!(path(&c).as_deref(), Some("/var/lib/tg/app.db.stripe-emulator.json"));
        c.database_url = ConnectionUrl::new("sqlite::memory:");
        assert_eq!(path(&c), None);
        c.database_url = ConnectionUrl::new("postgres://postgres@127.0.0.1/tg");
        assert_eq!(path(&c), None);
        c.stripe_emulator_state = Some("/tmp/em.json".to_owned());
        assert_eq!(path(&c).as_deref(), Some("/tmp/em.json"));
        c.database_url = ConnectionUrl::new("sqlite://tollgate.db");
        c.stripe_emulator_state = Some("none".to_owned());
        assert_eq!(path(&c), None);
    }

    #[test]
    fn production_never_runs_the_emulator() {
        let mut c = production();
        c.stripe_secret_key = None;
        c.paypal_client_id = Some("paypal-app".to_owned());
        refused(&c, "STRIPE_SECRET_KEY is missing");
        refused(&c, "PAYPAL_WEBHOOK_ID is missing");
        refused(&c, "PAYPAL_CLIENT_SECRET is missing");
    }

    #[test]
    fn provider_events_outlive_stripes_redelivery_window() {
        let mut c = Config::defaults();
        c.retention_provider_events_days = 7;
        refused(&c, "RETENTION_PROVIDER_EVENTS_DAYS");
        c.retention_provider_events_days = 0;
        assert!(c.problems().is_empty(), "0 keeps them forever");
    }

    #[test]
    fn development_refuses_live_keys() {
        let mut c = Config::defaults();
        c.stripe_secret_key = Some(SecretString::from("sk_live_123".to_owned()));
        refused(&c, "live key");
    }

    #[test]
    fn secrets_never_print() {
        let c = production();
        let debug = format!("{c:?}");
        assert!(
            !debug.contains("sk_live_abc") && !debug.contains("whsec_abc") && !debug.contains("q8Zr1vX0")
        );
    }

    #[test]
    fn trusted_proxies_take_cidrs_and_addresses() {
        let mut c = Config::defaults();
        c.trusted_proxies = vec!["10.0.0.0/8".into(), " 192.168.1.7 ".into(), "".into(), "fd00::/8".into()];
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        let parsed: Vec<String> = c.trusted_proxies().iter().map(ToString::to_string).collect();
        assert_eq!(parsed, ["10.0.0.0/8", "192.168.1.7/32", "fd00::/8"]);
        c.trusted_proxies = vec!["10.0.0.0/33".into()];
        refused(&c, "TRUSTED_PROXIES entry");
        c.trusted_proxies = vec!["proxy.internal".into()];
        refused(&c, "TRUSTED_PROXIES entry");
    }

    #[test]
    fn tls_needs_both_files_and_makes_the_default_url_https() {
        let mut c = Config::defaults();
        c.tls_cert = Some(PathBuf::from("cert.pem"));
        refused(&c, "TLS_CERT is set without TLS_KEY");
        c.tls_key = Some(PathBuf::from("key.pem"));
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        assert_eq!(c.public_url(), "https://127.0.0.1:8080");
    }

    #[test]
    fn a_zero_burst_is_refused_while_limits_are_on() {
        let mut c = Config::defaults();
        c.rate_limit_burst = 0;
        refused(&c, "RATE_LIMIT_BURST is 0");
        c.rate_limit_per_key = 0;
        c.rate_limit_per_ip = 0;
        assert!(c.problems().is_empty());
    }

    #[test]
    fn an_invalid_or_weak_jwt_secret_key_is_refused() {
        let mut c = Config::defaults();
        c.jwt_secret_key = Some(SecretString::from("/nonexistent/jwt.pem".to_owned()));
        refused(&c, "cannot read the key file");
        c.jwt_secret_key = Some(SecretString::from("short".to_owned()));
        refused(&c, "JWT_SECRET_KEY must be");
        let mut c = production();
        c.jwt_secret_key = Some(SecretString::from("changeme-changeme-changeme-changeme".to_owned()));
        refused(&c, "JWT_SECRET_KEY is weak");
        c.jwt_secret_key = Some(SecretString::from("4mB9zQ2xLr7Kp0vWc5Ty8Hn3Js6Fd1Ge".to_owned()));
        assert!(c.problems().is_empty(), "{:?}", c.problems());
        c.entitlement_token_ttl_seconds = 0;
        refused(&c, "ENTITLEMENT_TOKEN_TTL_SECONDS");
    }

    #[test]
    fn webhook_secrets_split_for_rotation() {
        let mut c = Config::defaults();
        c.stripe_webhook_secret = Some(SecretString::from("whsec_a, whsec_b,".to_owned()));
        let secrets: Vec<String> =
            c.stripe_webhook_secrets().iter().map(|s| s.expose_secret().to_owned()).collect();
        assert_eq!(secrets, ["whsec_a", "whsec_b"]);
    }
}
