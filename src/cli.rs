//! The `tollgate` command line: one binary for the server and every
//! operator task.

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use tokio_util::sync::CancellationToken;

use crate::app::{self, store_options};
use crate::auth::{self, KeyMode, Scope};
use crate::config::Config;
use crate::store::audit::Actor;
use crate::store::Store;
use crate::telemetry;

#[derive(Debug, Parser)]
#[command(name = "tollgate", version, about = "A self-hosted billing gateway")]
pub struct Cli {
    #[command(flatten)]
    pub config: Config,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the HTTP server and background workers.
    Serve,
    /// Apply database migrations and exit.
    Migrate,
    /// Manage API keys.
    #[command(subcommand, name = "api-key")]
    ApiKey(ApiKeyCommand),
    /// Inspect the audit log.
    #[command(subcommand)]
    Audit(AuditCommand),
    /// The keys that sign entitlement tokens.
    #[command(subcommand)]
    Keys(KeysCommand),
    /// Inspect and replay provider events (the webhook inbox).
    #[command(subcommand)]
    Events(EventsCommand),
    /// Store in the inbox every provider event of the window that it lacks.
    Reconcile {
        /// How far back: `3d`, `12h`, `30m`.
        #[arg(long, default_value = "3d")]
        since: String,
    },
    /// Load tests, run against this machine.
    #[command(subcommand)]
    Loadtest(LoadtestCommand),
    /// Take a consistent online backup (SQLite VACUUM INTO, PostgreSQL
    /// pg_dump) with a manifest, keeping the newest BACKUP_KEEP.
    Backup {
        /// Directory for backups (default BACKUP_DIR).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Restore the newest backup into a scratch database, verify it, drop
    /// it; exits non-zero if any check fails.
    RestoreDrill {
        /// Directory of backups (default BACKUP_DIR).
        #[arg(long)]
        dir: Option<std::path::PathBuf>,
    },
    /// Check production readiness; exits 0 only when every check passes.
    Doctor {
        /// Machine-readable output.
        #[arg(long)]
        json: bool,
    },
    /// Run the Stripe emulator alone: Stripe's API at /v1 on PORT, hosted
    /// checkout and portal pages, signed webhook deliveries.
    StripeEmulator {
        /// Deliver due webhook events in random order.
        #[arg(long)]
        shuffle_deliveries: bool,
        /// Deliver every webhook event twice.
        #[arg(long)]
        duplicate_deliveries: bool,
        /// Accept only this secret key (default: any sk_test_ key).
        #[arg(long, env = "EMULATOR_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
        /// Keep the state in FILE across restarts (default:
        /// STRIPE_EMULATOR_STATE if set, else in memory only).
        #[arg(long, value_name = "FILE")]
        state: Option<std::path::PathBuf>,
    },
    /// Exit 0 if tollgate answers 2xx, 1 otherwise: for container health
    /// checks, since the runtime image has no shell or curl.
    Healthcheck {
        /// Default: `http://127.0.0.1:$PORT/livez`.
        #[arg(long)]
        url: Option<String>,
        #[arg(long, default_value_t = 5)]
        timeout_seconds: u64,
    },
    /// The catalog at the provider.
    #[command(subcommand)]
    Catalog(CatalogCommand),
    /// Set-up at Stripe.
    #[command(subcommand)]
    Stripe(StripeCommand),
}

#[derive(Debug, Subcommand)]
pub enum CatalogCommand {
    /// Create or update Stripe's products and prices from the catalog file
    /// and record the mapping; check the ids the catalog names. Idempotent.
    Sync,
}

#[derive(Debug, Subcommand)]
pub enum StripeCommand {
    /// Register `{PUBLIC_URL}/webhooks/stripe` with the event types tollgate
    /// handles (updating an existing endpoint with that URL) and store its
    /// signing secret for verification.
    Setup,
}

#[derive(Debug, Subcommand)]
pub enum ApiKeyCommand {
    /// Create a key and print it once; only its digest is stored.
    Create {
        #[arg(long)]
        name: String,
        #[arg(long, value_enum)]
        scope: Scope,
        /// `tg_test_` or `tg_live_` (default: live in production, test otherwise).
        #[arg(long, value_parser = ["test", "live"])]
        mode: Option<String>,
    },
    /// List keys (never their secrets).
    List {
        #[arg(long)]
        json: bool,
    },
    /// Revoke a key by id (`key_…`); it stops working at once.
    Revoke { id: String },
}

#[derive(Debug, Subcommand)]
pub enum KeysCommand {
    /// Make a new key sign entitlement tokens from now on, on every
    /// instance; the old key stays in the JWKS until its tokens expire.
    Rotate,
    /// The keys in the JWKS now (public halves only).
    List,
}

#[derive(Debug, Subcommand)]
pub enum EventsCommand {
    /// Send events back to be applied: by id (`pe_…`), or every dead one.
    Replay {
        ids: Vec<String>,
        /// Replay every event whose status is `dead`.
        #[arg(long, conflicts_with = "ids")]
        dead: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum LoadtestCommand {
    /// Signed ~3 KB Stripe events against /webhooks/stripe; prints events/s,
    /// p50/p99 latency and status counts, then checks the inbox holds every
    /// acknowledged event.
    Webhooks {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        #[arg(long, default_value_t = 3000)]
        event_bytes: usize,
        /// A running tollgate (default: one started in-process on DATABASE_URL).
        #[arg(long)]
        url: Option<String>,
    },
    /// Signed Stripe subscription events at a steady rate, each making one
    /// outbound webhook to a local endpoint that records its arrival;
    /// prints provider event accepted -> delivery received p50/p99/max,
    /// the achieved rate and the backlog. Fails if a delivery never comes.
    Deliveries {
        /// Provider events per second.
        #[arg(long, default_value_t = 1000)]
        rate: u32,
        /// Seconds of load.
        #[arg(long, default_value_t = 10)]
        duration: u64,
        /// Customers the events cycle through (default: a new one per event).
        #[arg(long)]
        customers: Option<usize>,
        /// Requests in flight at most.
        #[arg(long, default_value_t = 256)]
        connections: usize,
        /// Seconds to wait for the last deliveries.
        #[arg(long, default_value_t = 60)]
        drain: u64,
        /// A running tollgate (default: one started in-process on a scratch
        /// database beside DATABASE_URL: a temporary SQLite file, or a new
        /// PostgreSQL database dropped afterwards).
        #[arg(long, requires = "api_key")]
        url: Option<String>,
        /// An admin API key of the tollgate at --url, to register the receiver.
        #[arg(long, env = "TOLLGATE_API_KEY", hide_env_values = true)]
        api_key: Option<String>,
    },
    /// A bare axum "hello" handler and the entitlement check (GET
    /// /v1/customers/{id}/entitlements/{feature}, API key, rate limits off)
    /// at full speed in one run, then the check at half the bare rate;
    /// prints req/s, p50/p99 and the ratio.
    Entitlements {
        #[arg(long, default_value_t = 64)]
        connections: usize,
        /// Seconds per phase (four phases).
        #[arg(long, default_value_t = 10)]
        duration: u64,
    },
}

#[derive(Debug, Subcommand)]
pub enum AuditCommand {
    /// Recompute the hash chain; exits non-zero if anything was altered.
    Verify,
}

pub async fn main() -> ExitCode {
    let cli = Cli::parse();
    telemetry::init_logging(&cli.config.log_level, cli.config.log_format());
    match dispatch(cli).await {
        Ok(code) => code,
        Err(message) => {
            eprintln!("error: {message}");
            ExitCode::FAILURE
        }
    }
}

async fn open_store(config: &Config) -> Result<Store, String> {
    Store::connect_and_migrate(config.database_url.expose(), &store_options(config))
        .await
        .map_err(|e| e.to_string())
}

async fn dispatch(cli: Cli) -> Result<ExitCode, String> {
    let config = cli.config;
    match cli.command {
        Command::Serve => {
            let mut problems = config.problems();
            if app::only_missing_webhook_secret(&problems) {
                // `tollgate stripe setup` may have stored one: decided once
                // the database is open.
                let store = open_store(&config).await?;
                if !store.provider_webhook_secrets("stripe").await.map_err(|e| e.to_string())?.is_empty() {
                    problems.clear();
                }
                store.close().await;
            }
            if !problems.is_empty() {
                for p in &problems {
                    eprintln!("error: {p}");
                }
                return Ok(ExitCode::from(2));
            }
            let address = format!("{}:{}", config.bind_address, config.port);
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .map_err(|e| format!("cannot listen on {address}: {e}"))?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            app::run(config, listener, shutdown).await.map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Migrate => {
            let store = open_store(&config).await?;
            let status = store.schema_status().await.map_err(|e| e.to_string())?;
            println!(
                "database migrated ({:?}, schema version {})",
                store.kind(),
                status.applied_version.unwrap_or(0)
            );
            store.close().await;
            Ok(ExitCode::SUCCESS)
        }
        Command::Keys(cmd) => {
            let store = open_store(&config).await?;
            let result = keys(&store, &config, cmd).await;
            store.close().await;
            result
        }
        Command::ApiKey(cmd) => {
            let store = open_store(&config).await?;
            let code = api_key(&store, &config, cmd).await?;
            store.close().await;
            Ok(code)
        }
        Command::Events(EventsCommand::Replay { ids, dead }) => {
            let store = open_store(&config).await?;
            let mut targets = ids;
            if dead {
                let mut page = crate::store::Page::first(100);
                loop {
                    let listed =
                        store.list_provider_events(&page, Some("dead")).await.map_err(|e| e.to_string())?;
                    let last = listed.data.last().map(|e| e.id.clone());
                    targets.extend(listed.data.into_iter().map(|e| e.id));
                    match (listed.has_more, last) {
                        (true, Some(last)) => page = crate::store::Page::after(100, last),
                        _ => break,
                    }
                }
            }
            if targets.is_empty() {
                println!("nothing to replay");
            }
            let mut failed = false;
            for id in &targets {
                match store.replay_provider_event(id, &Actor::Cli).await.map_err(|e| e.to_string())? {
                    true => println!("replaying {id}"),
                    false => {
                        failed = true;
                        eprintln!(
                            "error: {id} is not a finished provider event (unknown id, or still pending)"
                        );
                    }
                }
            }
            store.close().await;
            Ok(if failed { ExitCode::FAILURE } else { ExitCode::SUCCESS })
        }
        Command::Reconcile { since } => {
            let window = crate::ops::reconcile::parse_window(&since)
                .ok_or_else(|| format!("--since {since:?}: use a number and d, h, m or s (e.g. 3d)"))?;
            let store = open_store(&config).await?;
            let client = crate::providers::stripe::StripeClient::from_config(&config);
            let report =
                crate::ops::reconcile::reconcile_stripe(&store, &client, crate::store::now_unix() - window)
                    .await
                    .map_err(|e| e.to_string())?;
            store.close().await;
            println!(
                "reconciled: {} events listed by Stripe, {} were missing and are now in the inbox",
                report.seen, report.ingested
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Loadtest(LoadtestCommand::Webhooks { connections, duration, event_bytes, url }) => {
            let load = crate::ops::loadtest::WebhookLoad {
                connections: connections.max(1),
                duration: std::time::Duration::from_secs(duration.max(1)),
                event_bytes,
                url,
            };
            match crate::ops::loadtest::webhooks(config, load).await {
                Ok(report) => {
                    print!("{report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(report) => {
                    print!("{report}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Loadtest(LoadtestCommand::Deliveries {
            rate,
            duration,
            customers,
            connections,
            drain,
            url,
            api_key,
        }) => {
            let load = crate::ops::loadtest::DeliveryLoad {
                rate: rate.max(1),
                duration: std::time::Duration::from_secs(duration.max(1)),
                customers,
                connections: connections.max(1),
                drain: std::time::Duration::from_secs(drain),
                url,
                api_key,
            };
            match crate::ops::loadtest::deliveries(config, load).await {
                Ok(report) => {
                    print!("{report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(report) => {
                    print!("{report}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Loadtest(LoadtestCommand::Entitlements { connections, duration }) => {
            let load = crate::ops::loadtest::EntitlementLoad {
                connections: connections.max(1),
                duration: std::time::Duration::from_secs(duration.max(1)),
            };
            match crate::ops::loadtest::entitlements(config, load).await {
                Ok(report) => {
                    print!("{report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(report) => {
                    print!("{report}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::StripeEmulator { shuffle_deliveries, duplicate_deliveries, api_key, state } => {
            use crate::providers::stripe_emulator::{DeliveryOptions, Emulator, EmulatorConfig};
            let address = format!("{}:{}", config.bind_address, config.port);
            let listener = tokio::net::TcpListener::bind(&address)
                .await
                .map_err(|e| format!("cannot listen on {address}: {e}"))?;
            // Standalone, there is no database to sit beside: a file only when asked.
            let state = match state {
                Some(path) => Some(path),
                None if config.stripe_emulator_state.is_some() => config.stripe_emulator_state_path(),
                None => None,
            };
            let emulator = Emulator::open(
                EmulatorConfig {
                    public_url: config.public_url(),
                    api_key,
                    delivery: DeliveryOptions {
                        shuffle: shuffle_deliveries,
                        duplicate: duplicate_deliveries,
                        ..DeliveryOptions::default()
                    },
                },
                state,
            )
            .map_err(|e| e.to_string())?;
            let shutdown = CancellationToken::new();
            tokio::spawn(app::cancel_on_signal(shutdown.clone()));
            tracing::info!(address = %listener.local_addr().map_err(|e| e.to_string())?, api_base = %config.public_url(), "Stripe emulator listening");
            emulator.serve(listener, shutdown).await.map_err(|e| e.to_string())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { dir } => {
            let dir = dir.unwrap_or_else(|| config.backup_dir.clone());
            let started = crate::store::now_unix();
            let result = crate::ops::backup::backup(&config, &dir, config.backup_keep).await;
            let (ok, report) = match &result {
                Ok(r) => (
                    true,
                    serde_json::json!({ "file": r.manifest.file, "bytes": r.manifest.bytes, "sha256": r.manifest.sha256, "tables": r.manifest.tables }),
                ),
                Err(e) => (false, serde_json::json!({ "error": e.to_string() })),
            };
            // Recorded for `doctor`; a backup stands even if this fails.
            if let Ok(Some(store)) = crate::ops::drill::open_live(&config).await {
                if let Err(e) = store.record_ops_run("backup", started, ok, &report, &Actor::Cli).await {
                    eprintln!("warning: the backup was not recorded in the database: {e}");
                }
                store.close().await;
            }
            let r = result.map_err(|e| format!("backup failed: {e}"))?;
            println!(
                "backup {} ({} bytes, sha256 {}), {} rows in {} tables",
                r.path.display(),
                r.manifest.bytes,
                r.manifest.sha256,
                r.manifest.tables.values().sum::<i64>(),
                r.manifest.tables.len()
            );
            for old in &r.removed {
                println!("removed {old} (BACKUP_KEEP={})", config.backup_keep);
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::RestoreDrill { dir } => {
            let dir = dir.unwrap_or_else(|| config.backup_dir.clone());
            let report = crate::ops::drill::run(&config, &dir).await;
            print!("{report}");
            Ok(if report.ok { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Doctor { json } => {
            let report = crate::ops::doctor::run(&config).await;
            if json {
                println!("{}", serde_json::to_string_pretty(&report).map_err(|e| e.to_string())?);
            } else {
                print!("{report}");
            }
            Ok(if report.ready { ExitCode::SUCCESS } else { ExitCode::FAILURE })
        }
        Command::Healthcheck { url, timeout_seconds } => {
            let url = url.unwrap_or_else(|| format!("http://127.0.0.1:{}/livez", config.port));
            let client = reqwest::Client::builder()
                .timeout(std::time::Duration::from_secs(timeout_seconds.max(1)))
                .build()
                .map_err(|e| e.to_string())?;
            match client.get(&url).send().await {
                Ok(resp) if resp.status().is_success() => {
                    println!("healthy: {url} answered {}", resp.status());
                    Ok(ExitCode::SUCCESS)
                }
                Ok(resp) => {
                    eprintln!("unhealthy: {url} answered {}", resp.status());
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => {
                    eprintln!("unhealthy: {url}: {e}");
                    Ok(ExitCode::FAILURE)
                }
            }
        }
        Command::Catalog(CatalogCommand::Sync) => {
            let catalog =
                crate::billing::catalog::Catalog::load(&config.catalog_path).map_err(|e| e.to_string())?;
            let store = open_store(&config).await?;
            let client = crate::providers::stripe::StripeClient::from_config(&config);
            let result = crate::ops::catalog_sync::sync_stripe(&store, &client, &catalog, &Actor::Cli).await;
            store.close().await;
            match result {
                Ok(report) => {
                    print!("{report}");
                    Ok(ExitCode::SUCCESS)
                }
                Err(crate::ops::catalog_sync::CatalogSyncError::Mismatch(problems)) => {
                    for p in problems {
                        eprintln!("error: {p}");
                    }
                    eprintln!("nothing was changed at Stripe: fix the catalog (or the Stripe objects) and run again");
                    Ok(ExitCode::FAILURE)
                }
                Err(e) => Err(e.to_string()),
            }
        }
        Command::Stripe(StripeCommand::Setup) => {
            let store = open_store(&config).await?;
            let client = crate::providers::stripe::StripeClient::from_config(&config);
            let url = crate::ops::stripe_setup::webhook_url(&config.public_url());
            let result = crate::ops::stripe_setup::setup_stripe(&store, &client, &url, &Actor::Cli).await;
            store.close().await;
            let report = result.map_err(|e| e.to_string())?;
            use crate::ops::stripe_setup::SetupAction;
            let verb = match report.action {
                SetupAction::Created => "registered",
                SetupAction::Updated => "updated",
                SetupAction::Unchanged => "already registered",
            };
            println!("{verb}: {} → {} ({} event types)", report.endpoint_id, report.url, report.event_types);
            if report.secret_stored {
                println!(
                    "Its signing secret is stored in tollgate's database and verified from the next start.\n\
                     To keep secrets in the environment instead, reveal it in Stripe's dashboard (Developers → \
                     Webhooks → {}) and set STRIPE_WEBHOOK_SECRET.",
                    report.endpoint_id
                );
                Ok(ExitCode::SUCCESS)
            } else if !config.stripe_webhook_secrets().is_empty() {
                println!(
                    "Its signing secret is not known to tollgate; STRIPE_WEBHOOK_SECRET is set and is used."
                );
                Ok(ExitCode::SUCCESS)
            } else {
                eprintln!(
                    "error: this endpoint was created outside tollgate and Stripe shows its secret only once: \
                     reveal it in Stripe's dashboard (Developers → Webhooks → {}) and set STRIPE_WEBHOOK_SECRET, \
                     or delete the endpoint and run `tollgate stripe setup` again",
                    report.endpoint_id
                );
                Ok(ExitCode::FAILURE)
            }
        }
        Command::Audit(AuditCommand::Verify) => {
            let store = open_store(&config).await?;
            let report = store.verify_audit_chain().await.map_err(|e| e.to_string())?;
            store.close().await;
            match &report.broken {
                None => {
                    println!("✓ audit chain intact: {} entries, head {}", report.entries, report.head_hash);
                    Ok(ExitCode::SUCCESS)
                }
                Some((seq, problem)) => {
                    println!("✗ audit chain broken at entry {seq}: {problem}");
                    println!("  {} entries before it verified", report.entries);
                    Ok(ExitCode::FAILURE)
                }
            }
        }
    }
}

async fn api_key(store: &Store, config: &Config, cmd: ApiKeyCommand) -> Result<ExitCode, String> {
    match cmd {
        ApiKeyCommand::Create { name, scope, mode } => {
            let name = name.trim();
            if name.is_empty() || name.len() > 100 {
                return Err("--name must be 1 to 100 characters".to_owned());
            }
            let mode = match mode.as_deref() {
                Some("live") => KeyMode::Live,
                Some(_) => KeyMode::Test,
                None if config.is_production() => KeyMode::Live,
                None => KeyMode::Test,
            };
            let key = auth::generate_key(mode);
            let record = store
                .create_api_key(name, scope, mode, &key, &Actor::Cli)
                .await
                .map_err(|e| e.to_string())?;
            eprintln!(
                "Created {} ({}, scope {}). Store the key now: it is not shown again.",
                record.id, name, scope
            );
            println!("{}", auth::reveal(&key));
            Ok(ExitCode::SUCCESS)
        }
        ApiKeyCommand::List { json } => {
            let keys = store.list_api_keys().await.map_err(|e| e.to_string())?;
            if json {
                println!("{}", serde_json::to_string_pretty(&keys).map_err(|e| e.to_string())?);
            } else {
                println!("{:<32} {:<20} {:<6} {:<5} {:<17} status", "id", "name", "scope", "mode", "prefix");
                for k in keys {
                    let status = if k.revoked_at.is_some() { "revoked" } else { "active" };
                    println!(
                        "{:<32} {:<20} {:<6} {:<5} {:<17} {status}",
                        k.id,
                        k.name,
                        k.scope.as_str(),
                        k.mode.as_str(),
                        format!("{}…", k.prefix)
                    );
                }
            }
            Ok(ExitCode::SUCCESS)
        }
        ApiKeyCommand::Revoke { id } => {
            if store.revoke_api_key(&id, &Actor::Cli).await.map_err(|e| e.to_string())? {
                println!("revoked {id}");
                Ok(ExitCode::SUCCESS)
            } else {
                Err(format!("no active API key with id {id}"))
            }
        }
    }
}

async fn keys(store: &Store, config: &Config, cmd: KeysCommand) -> Result<ExitCode, String> {
    match cmd {
        KeysCommand::Rotate => {
            let rotation =
                crate::tokens::keys::rotate(store, config, &Actor::Cli).await.map_err(|e| e.to_string())?;
            println!("new signing key {} is active", rotation.new_kid);
            if let (Some(old), Some(until)) = (rotation.retired_kid, rotation.retired_published_until) {
                println!(
                    "retired {old}: published in the JWKS until {} (its last tokens expire)",
                    rfc3339(until)
                );
            }
            Ok(ExitCode::SUCCESS)
        }
        KeysCommand::List => {
            let window = crate::tokens::keys::signing_key_window(config);
            for key in store.published_signing_keys(window).await.map_err(|e| e.to_string())? {
                let status = match key.retired_at {
                    None => "active".to_owned(),
                    Some(at) => format!("retired {}, published until {}", rfc3339(at), rfc3339(at + window)),
                };
                println!("{}  {}  {}  {status}", key.kid, key.algorithm, key.source);
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn rfc3339(unix: i64) -> String {
    time::OffsetDateTime::from_unix_timestamp(unix)
        .ok()
        .and_then(|t| t.format(&time::format_description::well_known::Rfc3339).ok())
        .unwrap_or_else(|| unix.to_string())
}
