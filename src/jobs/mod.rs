//! Background workers. Each runs until the shared shutdown token is
//! cancelled and finishes the unit of work it is in before stopping.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::AppState;

pub mod abandoned_checkouts;
pub mod grace;
pub mod inbox;
pub mod rate_limits;
pub mod reconcile;
pub mod retention;

/// Runs `work` every `period` (the first time at once) until `shutdown`;
/// a run that overruns delays the next instead of piling up.
pub async fn every<F, Fut>(shutdown: &CancellationToken, period: Duration, mut work: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        work().await;
    }
}

/// `store` with its own connections for `workers` workers on this
/// thread's runtime (see [`Store::with_own_pool`]), waiting for the
/// database rather than sharing the server's pool across runtimes; `None`
/// at shutdown.
async fn own_pool(
    store: &crate::store::Store,
    workers: usize,
    shutdown: &CancellationToken,
) -> Option<crate::store::Store> {
    loop {
        match store.with_own_pool(workers as u32 + 1).await {
            Ok(own) => return Some(own),
            Err(e) => {
                tracing::warn!(error = %e, "workers could not open their database connections; retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return None,
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
            }
        }
    }
}

/// Runs `work` on a thread of its own, with its own single-threaded
/// runtime, and resolves when it ends.
///
/// For the inbox: an applying transaction runs dozens of statements, each
/// a round trip to the database (on SQLite, to the one writer's thread).
/// On the shared runtime each answer waits for a worker thread to come
/// free from request handling before the next statement can go, while the
/// transaction holds its locks (on SQLite the writer, which ingest and
/// delivery recording also need). On its own thread the next statement
/// goes out as soon as the operating system runs it.
async fn on_own_thread<F>(name: &str, work: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(runtime) => runtime,
        Err(e) => {
            tracing::error!(error = %e, "could not start a worker runtime; running on the shared one");
            return work.await;
        }
    };
    let (done, finished) = tokio::sync::oneshot::channel::<()>();
    let spawned = std::thread::Builder::new().name(name.to_owned()).spawn(move || {
        runtime.block_on(work);
        let _ = done.send(());
    });
    match spawned {
        Ok(_) => {
            let _ = finished.await;
        }
        Err(e) => tracing::error!(error = %e, "could not start a worker thread"),
    }
}

/// The running workers, to be awaited at shutdown.
pub struct Workers {
    tasks: JoinSet<()>,
}

impl Workers {
    pub async fn wait(mut self) {
        while self.tasks.join_next().await.is_some() {}
    }
}

pub fn spawn_all(state: &AppState, shutdown: CancellationToken) -> Workers {
    let mut tasks = JoinSet::new();
    // Keeps the in-memory caches exact; without it they never serve.
    tasks.spawn(crate::store::cache::sync(state.store.clone(), shutdown.clone()));
    // The Prometheus recorder keeps every histogram sample until it is
    // folded into its buckets, at a scrape or here (`build_recorder` leaves
    // this to its caller): a server no one scrapes grew by 8 bytes per
    // request and per timed operation, for ever. Folding took 0.8–1.8 ms
    // every 5 s under the entitlement loadtest (45,000–90,000 requests/s),
    // time in which the requests queued on that worker waited; so it runs
    // every second, on a fifth of the samples, and off the runtime's
    // workers (where every core is busy the system still shares them).
    let (metrics, token) = (state.metrics.clone(), shutdown.clone());
    tasks.spawn(async move {
        every(&token, Duration::from_secs(1), || {
            let metrics = metrics.clone();
            async move {
                let _ = tokio::task::spawn_blocking(move || metrics.run_upkeep()).await;
            }
        })
        .await
    });
    if state.config.retention_interval_seconds > 0 {
        let every = Duration::from_secs(state.config.retention_interval_seconds);
        tasks.spawn(retention::run(state.clone(), shutdown.clone(), every));
    }
    let workers = match state.store.kind() {
        crate::store::DbKind::Sqlite => 1,
        crate::store::DbKind::Postgres => 2,
    };
    let mut options = inbox::InboxWorkerOptions {
        max_attempts: state.config.provider_event_max_attempts.max(1),
        stripe: Some(state.stripe.clone()),
        refetch: state.config.stripe_refetch,
        policy: state.config.fulfilment_policy(),
        batch: i64::from(state.config.inbox_batch.max(1)),
        ..Default::default()
    };
    let mut appliers = state.config.inbox_workers.map_or(workers, |n| n as usize);
    if state.store.kind() == crate::store::DbKind::Sqlite && appliers > 1 {
        // Its one writer applies one batch at a time, and its claims take
        // no lease: more workers would only read and prepare the same
        // events side by side.
        tracing::warn!(configured = appliers, "INBOX_WORKERS is at most 1 on SQLite; using 1");
        appliers = 1;
    }
    let store = state.store.clone();
    let wake = state.inbox_wake.clone();
    let token = shutdown.clone();
    let applying = async move {
        // Its own connections (see `on_own_thread`): the database's on
        // PostgreSQL, the provider's everywhere. Waits for the database
        // rather than sharing the server's pool across runtimes.
        let store = if appliers == 0 {
            store
        } else {
            match own_pool(&store, appliers, &token).await {
                Some(own) => own,
                None => return,
            }
        };
        options.stripe = options.stripe.as_ref().map(|c| c.with_own_connections());
        // Events an older version deferred may be mappable now.
        let applicable: Vec<&str> = crate::webhooks::apply::STRIPE_HANDLED
            .iter()
            .copied()
            .filter(|t| {
                crate::webhooks::apply::disposition("stripe", t) == crate::webhooks::apply::Disposition::Apply
            })
            .collect();
        if let Err(e) = store.wake_deferred_provider_events("stripe", &applicable).await {
            tracing::warn!(error = %e, "could not wake deferred provider events");
        }
        let mut inner = JoinSet::new();
        for _ in 0..appliers {
            inner.spawn(inbox::run(store.clone(), wake.clone(), options.clone(), token.clone()));
        }
        while inner.join_next().await.is_some() {}
    };
    if appliers > 0 {
        tasks.spawn(on_own_thread("tollgate-inbox", applying));
    } else {
        tasks.spawn(applying);
    }
    tasks.spawn(grace::run(state.clone(), shutdown.clone(), Duration::from_secs(60)));
    tasks.spawn(abandoned_checkouts::run(state.clone(), shutdown.clone(), Duration::from_secs(60)));
    let delivery = crate::delivery::worker::DeliveryOptions::from_config(&state.config);
    let senders = state.config.webhook_delivery_workers.map_or(workers, |n| n as usize);
    if senders > 0 {
        // On a thread of their own too, for the same reason as the inbox:
        // recording attempts holds SQLite's one writer, and a send leaves
        // as soon as its delivery is handed over.
        let (store, token) = (state.store.clone(), shutdown.clone());
        tasks.spawn(on_own_thread("tollgate-delivery", async move {
            let Some(store) = own_pool(&store, senders, &token).await else { return };
            let mut inner = JoinSet::new();
            for _ in 0..senders {
                inner.spawn(crate::delivery::worker::run(store.clone(), delivery.clone(), token.clone()));
            }
            while inner.join_next().await.is_some() {}
        }));
        tasks.spawn(crate::delivery::listen::run(state.store.clone(), shutdown.clone()));
    }
    if state.config.reconcile_interval_seconds > 0 {
        let every = Duration::from_secs(state.config.reconcile_interval_seconds);
        tasks.spawn(reconcile::run(state.clone(), shutdown.clone(), every));
    }
    tasks.spawn(rate_limits::run(state.rate_limits.clone(), shutdown.clone(), Duration::from_secs(60)));
    if let Some(emulator) = &state.emulator {
        tasks.spawn(crate::providers::stripe_emulator::persist::run(emulator.clone(), shutdown.clone()));
        tasks.spawn(crate::providers::stripe_emulator::delivery::run(emulator.clone(), shutdown));
    }
    Workers { tasks }
}
