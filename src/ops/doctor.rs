//! `tollgate doctor`: SPEC 8's production-readiness checklist, each item
//! checked for real against the running configuration (the provider's API,
//! the database, the backup directory, Redis), never just restated.
//!
//! It changes nothing: the database is opened without migrating (and a
//! missing SQLite file is reported, not created).

use std::time::Duration;

use secrecy::ExposeSecret;
use serde::Serialize;

use super::backup;
use super::drill;
use super::report::{Check, Checks};
use crate::config::{is_weak_secret, Config};
use crate::providers::stripe::StripeClient;
use crate::store::{now_unix, DbKind};

#[derive(Debug, Clone, Serialize)]
pub struct DoctorReport {
    pub ready: bool,
    pub summary: String,
    pub checks: Checks,
}

impl std::fmt::Display for DoctorReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "tollgate doctor: production readiness")?;
        write!(f, "{}", self.checks)?;
        let verdict = if self.ready { "ready" } else { "NOT ready" };
        writeln!(f, "{verdict}: {}", self.summary)
    }
}

const GENERATE: &str = "generate one with `openssl rand -base64 48`";

#[tracing::instrument(name = "ops.doctor", skip_all)]
pub async fn run(config: &Config) -> DoctorReport {
    let mut checks = Checks::default();
    checks.push(if config.is_production() {
        Check::pass("environment", "production")
    } else {
        Check::fail(
            "environment",
            "development: start-up does not refuse unsafe settings",
            "set ENVIRONMENT=production",
        )
    });
    checks.push(stripe_key(config));
    checks.push(webhook_secret(config));
    checks.push(webhook_endpoint(config).await);
    checks.push(match &config.secret_key {
        None => Check::fail("SECRET_KEY", "missing", format!("set SECRET_KEY: {GENERATE}")),
        Some(k) if is_weak_secret(k.expose_secret()) => Check::fail(
            "SECRET_KEY",
            "weak (under 32 characters, repetitive, or a placeholder)",
            format!("replace it: {GENERATE}"),
        ),
        Some(_) => Check::pass("SECRET_KEY", "set and strong"),
    });
    checks.push(paypal(config));
    let (database, migrations, store) = database(config).await;
    checks.push(database_engine(config));
    checks.push(database);
    checks.push(migrations);
    checks.push(signing_key(config, store.as_ref()).await);
    checks.push(backups(config, store.as_ref()).await);
    checks.push(last_drill(config, store.as_ref()).await);
    if let Some(store) = store {
        store.close().await;
    }
    checks.push(cors(config));
    checks.push(match config.public_url.as_deref() {
        Some(u) if u.starts_with("https://") => Check::pass("PUBLIC_URL", format!("{u} (https)")),
        Some(u) => Check::fail(
            "PUBLIC_URL",
            format!("{u} is not https: providers and browsers reach tollgate unencrypted"),
            "serve tollgate behind TLS (see deploy/) and set PUBLIC_URL=https://…",
        ),
        None => Check::fail(
            "PUBLIC_URL",
            format!("unset, so {}: providers cannot reach it", config.public_url()),
            "set PUBLIC_URL to the https:// address providers and users reach",
        ),
    });
    checks.push(redis(config).await);
    checks.push(rate_limits(config));
    let ready = checks.ok();
    DoctorReport { ready, summary: checks.summary(), checks }
}

fn stripe_key(config: &Config) -> Check {
    const NAME: &str = "STRIPE_SECRET_KEY";
    let Some(key) = &config.stripe_secret_key else {
        return if config.is_production() {
            Check::fail(
                NAME,
                "missing: only the built-in emulator is available",
                "set the live secret key (sk_live_…)",
            )
        } else {
            Check::pass(NAME, "unset: the built-in emulator (development)")
        };
    };
    let key = key.expose_secret();
    if key.to_ascii_lowercase().contains("changeme") {
        return Check::fail(
            NAME,
            "still the placeholder",
            "set the secret key from Stripe's dashboard (sk_live_…)",
        );
    }
    let live = key.starts_with("sk_live_") || key.starts_with("rk_live_");
    let test = key.starts_with("sk_test_") || key.starts_with("rk_test_");
    let prefix = &key[..key.len().min(8)];
    match (config.is_production(), live, test) {
        (true, true, _) => Check::pass(NAME, format!("live key ({prefix}…) in production")),
        (false, _, true) => Check::pass(NAME, format!("test key ({prefix}…) in development")),
        (true, _, true) => Check::fail(NAME, "a test key in production", "use the live key (sk_live_…)"),
        (false, true, _) => Check::fail(
            NAME,
            "a live key in development",
            "use a test key (sk_test_…), or set ENVIRONMENT=production",
        ),
        _ => Check::fail(
            NAME,
            "not a Stripe secret key",
            "use the key from Stripe's dashboard (sk_live_… or rk_live_…)",
        ),
    }
}

fn webhook_secret(config: &Config) -> Check {
    const NAME: &str = "STRIPE_WEBHOOK_SECRET";
    let secrets = config.stripe_webhook_secrets();
    if secrets.is_empty() {
        return if config.uses_stripe_emulator() && !config.is_production() {
            Check::pass(NAME, "unset: the emulator's endpoint is registered at start-up")
        } else {
            Check::fail(
                NAME,
                "missing: provider webhooks cannot be verified",
                "run `tollgate stripe setup`, or copy the endpoint's signing secret (whsec_…) from Stripe's dashboard",
            )
        };
    }
    if secrets.iter().any(|s| s.expose_secret().to_ascii_lowercase().contains("changeme")) {
        return Check::fail(
            NAME,
            "still the placeholder",
            "copy the endpoint's signing secret (whsec_…) from Stripe",
        );
    }
    if secrets.iter().any(|s| !s.expose_secret().starts_with("whsec_")) {
        return Check::fail(
            NAME,
            "a secret that is not a signing secret (whsec_…)",
            "copy the endpoint's signing secret",
        );
    }
    Check::pass(NAME, format!("{} signing secret(s)", secrets.len()))
}

/// Asks the provider which endpoints it delivers to, and with which events.
async fn webhook_endpoint(config: &Config) -> Check {
    const NAME: &str = "webhook endpoint";
    let expected: Vec<String> = ["/webhooks/stripe", "/webhooks/payments"]
        .iter()
        .map(|p| format!("{}{p}", config.public_url()))
        .collect();
    if config.uses_stripe_emulator() && config.is_production() {
        return Check::fail(NAME, "no STRIPE_SECRET_KEY: Stripe cannot be asked", "set STRIPE_SECRET_KEY");
    }
    let client = StripeClient::from_config(config);
    let listed = match client.get("/v1/webhook_endpoints", &[("limit", "100".to_owned())]).await {
        Ok(v) => v,
        Err(e) => {
            return Check::fail(
                NAME,
                format!("could not list the provider's webhook endpoints: {e}"),
                "check the key and network access to STRIPE_API_BASE (for the emulator: is `tollgate serve` running?)",
            )
        }
    };
    let endpoints = listed["data"].as_array().cloned().unwrap_or_default();
    let Some(endpoint) =
        endpoints.iter().find(|e| e["url"].as_str().is_some_and(|u| expected.iter().any(|x| x == u)))
    else {
        return Check::fail(
            NAME,
            format!("none of the provider's {} endpoint(s) points at {}", endpoints.len(), expected[0]),
            format!("run `tollgate stripe setup`, or add {} in Stripe's dashboard", expected[0]),
        );
    };
    let id = endpoint["id"].as_str().unwrap_or("?");
    let url = endpoint["url"].as_str().unwrap_or("?");
    if endpoint["status"].as_str() != Some("enabled") {
        return Check::fail(NAME, format!("{id} ({url}) is disabled"), "enable it in Stripe's dashboard");
    }
    let enabled: Vec<&str> = endpoint["enabled_events"]
        .as_array()
        .map(|a| a.iter().filter_map(|v| v.as_str()).collect())
        .unwrap_or_default();
    let missing: Vec<&str> = if enabled.contains(&"*") {
        Vec::new()
    } else {
        crate::webhooks::apply::STRIPE_HANDLED.iter().copied().filter(|t| !enabled.contains(t)).collect()
    };
    if missing.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{id} enabled for {url} with all {} events tollgate uses",
                crate::webhooks::apply::STRIPE_HANDLED.len()
            ),
        )
    } else {
        Check::fail(
            NAME,
            format!("{id} ({url}) lacks {} event(s): {}", missing.len(), missing.join(", ")),
            "run `tollgate stripe setup`, or add the events to the endpoint in Stripe's dashboard",
        )
    }
}

/// The key that signs entitlement tokens: configured and valid (and not a
/// weak secret), or generated, stored sealed, and openable with this
/// `SECRET_KEY`.
async fn signing_key(config: &Config, store: Option<&crate::store::Store>) -> Check {
    const NAME: &str = "signing key";
    const GENPKEY: &str = "`openssl genpkey -algorithm ed25519`";
    if let Some(raw) = &config.jwt_secret_key {
        use crate::tokens::ConfiguredFrom;
        return match crate::tokens::configured_key(raw.expose_secret()) {
            Err(e) => Check::fail(NAME, e.0, format!("fix JWT_SECRET_KEY, e.g. a PEM from {GENPKEY}")),
            Ok((_, ConfiguredFrom::Secret)) if is_weak_secret(raw.expose_secret()) => Check::fail(
                NAME,
                "JWT_SECRET_KEY is a weak secret (short, repetitive or a placeholder)",
                format!("use a PEM key from {GENPKEY}, or unset it to use a generated key pair"),
            ),
            Ok((key, from)) => {
                let from = match from {
                    ConfiguredFrom::Pem | ConfiguredFrom::File => "Ed25519 PEM",
                    ConfiguredFrom::Secret => "derived from a secret",
                };
                Check::pass(NAME, format!("JWT_SECRET_KEY: {from}, kid {}", key.kid()))
            }
        };
    }
    let Some(store) = store else { return Check::skip(NAME, "not checked: no database") };
    let active = match store.active_signing_key().await {
        Ok(Some(row)) => row,
        Ok(None) => return Check::pass(NAME, "none yet: `tollgate serve` generates one at first start"),
        Err(e) => return Check::fail(NAME, e.to_string(), "check the database"),
    };
    let Some(stored) = active.private_key.as_deref() else {
        return Check::fail(
            NAME,
            format!("the active key {} was configured with JWT_SECRET_KEY, which is now unset", active.kid),
            "set JWT_SECRET_KEY again, or run `tollgate keys rotate` to generate one",
        );
    };
    let sealer = crate::tokens::Sealer::new(config.secret_key.as_ref().map(|s| s.expose_secret()));
    if let Err(e) = sealer.open(&active.kid, stored) {
        return Check::fail(
            NAME,
            e.0,
            "restore the SECRET_KEY it was sealed with, or run `tollgate keys rotate`",
        );
    }
    if stored.starts_with("plain:") && config.is_production() {
        return Check::fail(
            NAME,
            format!("the active key {} is stored unencrypted (generated without SECRET_KEY)", active.kid),
            "with SECRET_KEY set, run `tollgate keys rotate`",
        );
    }
    let how = if stored.starts_with("plain:") {
        "stored in clear (no SECRET_KEY)"
    } else {
        "sealed with SECRET_KEY"
    };
    Check::pass(
        NAME,
        format!("generated, {how}, kid {}, created {} ago", active.kid, age(now_unix() - active.created_at)),
    )
}

fn paypal(config: &Config) -> Check {
    const NAME: &str = "PayPal";
    let Some(id) = &config.paypal_client_id else { return Check::skip(NAME, "not configured") };
    let mut missing = Vec::new();
    if config.paypal_client_secret.is_none() {
        missing.push("PAYPAL_CLIENT_SECRET");
    }
    if config.paypal_webhook_id.is_none() {
        missing.push("PAYPAL_WEBHOOK_ID");
    }
    if missing.is_empty() {
        Check::pass(NAME, format!("client {id} with its secret and webhook id"))
    } else {
        Check::fail(
            NAME,
            format!("{} missing", missing.join(" and ")),
            "copy them from PayPal's developer dashboard",
        )
    }
}

fn database_engine(config: &Config) -> Check {
    const NAME: &str = "database engine";
    match DbKind::from_url(config.database_url.expose()) {
        Ok(DbKind::Postgres) => Check::pass(NAME, "PostgreSQL"),
        Ok(DbKind::Sqlite) if !config.is_production() => Check::pass(NAME, "SQLite (development)"),
        Ok(DbKind::Sqlite) if config.allow_sqlite_in_production => {
            Check::pass(NAME, "SQLite, chosen with ALLOW_SQLITE_IN_PRODUCTION: one machine, no replicas")
        }
        Ok(DbKind::Sqlite) => Check::fail(
            NAME,
            "SQLite in production without ALLOW_SQLITE_IN_PRODUCTION",
            "use PostgreSQL, or set ALLOW_SQLITE_IN_PRODUCTION=true for a single-machine deployment",
        ),
        Err(e) => Check::fail(NAME, e.to_string(), "set DATABASE_URL to postgres://… (or sqlite://PATH)"),
    }
}

async fn database(config: &Config) -> (Check, Check, Option<crate::store::Store>) {
    let not_checked = Check::skip("migrations", "not checked: no database");
    let store = match tokio::time::timeout(Duration::from_secs(10), drill::open_live(config)).await {
        Ok(Ok(Some(store))) => store,
        Ok(Ok(None)) => {
            return (
                Check::fail(
                    "database",
                    format!("{} does not exist", config.database_url.redacted()),
                    "check DATABASE_URL, or run `tollgate migrate` to create it",
                ),
                not_checked,
                None,
            )
        }
        Ok(Err(e)) => {
            return (
                Check::fail("database", e.to_string(), "check DATABASE_URL and the server"),
                not_checked,
                None,
            )
        }
        Err(_) => {
            return (
                Check::fail("database", "no answer within 10 s", "check DATABASE_URL and the server"),
                not_checked,
                None,
            )
        }
    };
    let started = std::time::Instant::now();
    if let Err(e) = store.ping().await {
        store.close().await;
        return (
            Check::fail("database", format!("unreachable: {e}"), "check DATABASE_URL and the server"),
            not_checked,
            None,
        );
    }
    let reachable = Check::pass(
        "database",
        format!("{} reachable ({} ms)", config.database_url.redacted(), started.elapsed().as_millis()),
    );
    let migrations = match store.schema_status().await {
        Ok(s) if s.is_current() => {
            Check::pass("migrations", format!("schema {} (current)", s.expected_version))
        }
        Ok(s) => Check::fail(
            "migrations",
            format!("schema {:?}, this tollgate expects {}", s.applied_version, s.expected_version),
            "run `tollgate migrate`",
        ),
        Err(e) => Check::fail("migrations", e.to_string(), "run `tollgate migrate`"),
    };
    (reachable, migrations, Some(store))
}

fn age(seconds: i64) -> String {
    match seconds.max(0) {
        s if s < 120 => format!("{s} s"),
        s if s < 7200 => format!("{} min", s / 60),
        s if s < 172_800 => format!("{} h", s / 3600),
        s => format!("{} days", s / 86_400),
    }
}

/// The newest backup, from BACKUP_DIR's manifests or the runs recorded in
/// the database (when backups are taken on another machine).
async fn backups(config: &Config, store: Option<&crate::store::Store>) -> Check {
    const NAME: &str = "backups";
    let dir = &config.backup_dir;
    let on_disk = match backup::list(dir) {
        Ok(found) => found
            .last()
            .map(|f| (f.manifest.created_unix, format!("{} in {}", f.manifest.file, dir.display()))),
        Err(e) => return Check::fail(NAME, e.to_string(), "check BACKUP_DIR"),
    };
    let recorded = match store {
        Some(s) => s.last_ops_run("backup").await.ok().flatten().filter(|r| r.ok).map(|r| {
            let file = serde_json::from_str::<serde_json::Value>(&r.report)
                .ok()
                .and_then(|v| v["file"].as_str().map(str::to_owned));
            (r.finished_at, format!("{} (recorded in the database)", file.unwrap_or_else(|| r.id.clone())))
        }),
        None => None,
    };
    let newest = [on_disk, recorded].into_iter().flatten().max_by_key(|(t, _)| *t);
    let max_age = (config.backup_max_age_hours * 3600) as i64;
    let schedule = "schedule `tollgate backup` (cron or a Kubernetes CronJob, see deploy/)";
    match newest {
        None => Check::fail(
            NAME,
            format!("no backup in {} nor recorded in the database", dir.display()),
            schedule,
        ),
        Some((at, what)) if now_unix() - at > max_age => Check::fail(
            NAME,
            format!(
                "the newest, {what}, is {} old (limit BACKUP_MAX_AGE_HOURS={})",
                age(now_unix() - at),
                config.backup_max_age_hours
            ),
            format!("check the backup schedule; {schedule}"),
        ),
        Some((at, what)) => Check::pass(NAME, format!("newest {what}, {} old", age(now_unix() - at))),
    }
}

async fn last_drill(config: &Config, store: Option<&crate::store::Store>) -> Check {
    const NAME: &str = "restore drill";
    #[derive(serde::Deserialize)]
    struct Recorded {
        finished_at: i64,
        ok: bool,
        #[serde(default)]
        checks: Vec<Check>,
    }
    let from_file = std::fs::read_to_string(config.backup_dir.join(drill::RESULT_FILE))
        .ok()
        .and_then(|t| serde_json::from_str::<Recorded>(&t).ok());
    let from_db = match store {
        Some(s) => s.last_ops_run(drill::RUN_KIND).await.ok().flatten().and_then(|r| {
            serde_json::from_str::<Recorded>(&r.report).ok().map(|rec| Recorded {
                finished_at: r.finished_at,
                ok: r.ok,
                ..rec
            })
        }),
        None => None,
    };
    let newest = [from_file, from_db].into_iter().flatten().max_by_key(|r| r.finished_at);
    let max_age = (config.drill_max_age_days * 86_400) as i64;
    match newest {
        None => Check::fail(
            NAME,
            "no restore drill recorded",
            "run `tollgate restore-drill`, and schedule it weekly",
        ),
        Some(r) if !r.ok => {
            let failed: Vec<String> = r
                .checks
                .iter()
                .filter(|c| c.status == super::report::Status::Fail)
                .map(|c| c.name.clone())
                .collect();
            Check::fail(
                NAME,
                format!(
                    "the last drill, {} ago, FAILED ({})",
                    age(now_unix() - r.finished_at),
                    failed.join(", ")
                ),
                "run `tollgate restore-drill` and fix what it names",
            )
        }
        Some(r) if now_unix() - r.finished_at > max_age => Check::fail(
            NAME,
            format!(
                "the last drill passed {} ago (limit DRILL_MAX_AGE_DAYS={})",
                age(now_unix() - r.finished_at),
                config.drill_max_age_days
            ),
            "run `tollgate restore-drill`, and schedule it weekly",
        ),
        Some(r) => {
            Check::pass(NAME, format!("the last drill passed {} ago", age(now_unix() - r.finished_at)))
        }
    }
}

fn cors(config: &Config) -> Check {
    const NAME: &str = "ALLOWED_ORIGINS";
    let origins: Vec<&str> =
        config.allowed_origins.iter().map(|o| o.trim()).filter(|o| !o.is_empty()).collect();
    if origins.contains(&"*") {
        return Check::fail(
            NAME,
            "contains the wildcard '*': any site may call the API from a browser",
            "list the exact origins, e.g. https://app.example.com",
        );
    }
    let bad: Vec<&str> = origins
        .iter()
        .copied()
        .filter(|o| !(o.starts_with("https://") || o.starts_with("http://")))
        .collect();
    if !bad.is_empty() {
        return Check::fail(
            NAME,
            format!("not origins: {}", bad.join(", ")),
            "use scheme://host[:port], e.g. https://app.example.com",
        );
    }
    if origins.is_empty() {
        Check::pass(NAME, "none: browsers cannot call the API cross-origin")
    } else {
        Check::pass(NAME, format!("{} exact origin(s), no wildcard", origins.len()))
    }
}

async fn redis(config: &Config) -> Check {
    const NAME: &str = "Redis persistence";
    let Some(url) = &config.redis_url else { return Check::skip(NAME, "REDIS_URL unset: Redis not used") };
    let fix = "set `appendonly yes` in redis.conf (or CONFIG SET appendonly yes, then CONFIG REWRITE)";
    let probe = async {
        let client = redis::Client::open(url.expose())?;
        let mut conn = client.get_multiplexed_async_connection().await?;
        let appendonly: redis::RedisResult<Vec<String>> =
            redis::cmd("CONFIG").arg("GET").arg("appendonly").query_async(&mut conn).await;
        let save: redis::RedisResult<Vec<String>> =
            redis::cmd("CONFIG").arg("GET").arg("save").query_async(&mut conn).await;
        Ok::<_, redis::RedisError>((appendonly, save))
    };
    match tokio::time::timeout(Duration::from_secs(5), probe).await {
        Err(_) => Check::fail(
            NAME,
            format!("{} did not answer within 5 s", url.redacted()),
            "check REDIS_URL and the server",
        ),
        Ok(Err(e)) => Check::fail(
            NAME,
            format!("{} unreachable: {e}", url.redacted()),
            "check REDIS_URL and the server",
        ),
        // Managed services often disable or rename CONFIG: say so rather than fail.
        Ok(Ok((Err(e), _))) => Check::warn(
            NAME,
            format!("CONFIG is not allowed on this server ({e}), so persistence could not be checked"),
            "make sure the server (or the managed service) keeps an append-only file",
        ),
        Ok(Ok((Ok(appendonly), save))) => {
            let value = appendonly.get(1).map(String::as_str).unwrap_or("");
            let save = save.ok().and_then(|s| s.get(1).cloned()).unwrap_or_default();
            if value == "yes" {
                Check::pass(NAME, "append-only file on")
            } else if save.trim().is_empty() {
                Check::fail(
                    NAME,
                    "off: appendonly no and no snapshots (save \"\"): a restart loses everything",
                    fix,
                )
            } else {
                Check::fail(NAME, format!("appendonly no: only snapshots (save \"{save}\"), writes since the last are lost on restart"), fix)
            }
        }
    }
}

fn rate_limits(config: &Config) -> Check {
    const NAME: &str = "rate limits";
    let zero: Vec<&str> = [
        ("RATE_LIMIT_PER_KEY", config.rate_limit_per_key),
        ("RATE_LIMIT_PER_IP", config.rate_limit_per_ip),
        ("RATE_LIMIT_BURST", config.rate_limit_burst),
    ]
    .iter()
    .filter(|(_, v)| *v == 0)
    .map(|(n, _)| *n)
    .collect();
    if zero.is_empty() {
        Check::pass(
            NAME,
            format!(
                "{}/s per key, {}/s per address, burst {}",
                config.rate_limit_per_key, config.rate_limit_per_ip, config.rate_limit_burst
            ),
        )
    } else {
        Check::fail(NAME, format!("off: {} = 0", zero.join(", ")), "set them above 0 (defaults 100, 20, 200)")
    }
}
