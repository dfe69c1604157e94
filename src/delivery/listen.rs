//! Cross-instance wake-ups on PostgreSQL: the transaction that queues
//! deliveries also runs `pg_notify('tollgate_deliveries', <instance>)`
//! (see `store::Tx::commit`), and every other instance's listener wakes
//! its delivery workers at once instead of at their next poll. The poll
//! stays as the fallback: a notification sent while a listener was
//! reconnecting is lost, and so is nothing else.
//!
//! The channel is the delivery worker's own; the entitlement cache uses
//! another, so neither wakes the other's work.

use std::sync::Arc;
use std::time::Duration;

use sqlx::postgres::{PgListener, PgPoolOptions};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::store::Store;

pub const CHANNEL: &str = "tollgate_deliveries";

/// Listens until `shutdown`, reconnecting after a lost connection. Does
/// nothing on SQLite (one process writes it, and its commits wake its own
/// worker). The listener has a connection of its own, beside the pool,
/// so it never takes a slot from requests and workers.
#[tracing::instrument(name = "job.delivery_listen", skip_all)]
pub async fn run(store: Store, shutdown: CancellationToken) {
    let Some(options) = store.postgres_pool().map(|p| (*p.connect_options()).clone()) else { return };
    let wake: Arc<Notify> = store.delivery_wake();
    let own = store.instance().to_owned();
    let mut backoff = Duration::from_millis(250);
    loop {
        let connected = async {
            let own_pool = PgPoolOptions::new()
                .max_connections(1)
                .max_lifetime(None)
                .idle_timeout(None)
                .connect_with(options.clone())
                .await?;
            let mut listener = PgListener::connect_with(&own_pool).await?;
            listener.listen(CHANNEL).await?;
            Ok::<_, sqlx::Error>(listener)
        };
        let mut listener = tokio::select! {
            () = shutdown.cancelled() => return,
            r = connected => match r {
                Ok(l) => l,
                Err(e) => {
                    tracing::warn!(error = %e, "cannot listen for delivery wake-ups; polling meanwhile");
                    tokio::select! {
                        () = shutdown.cancelled() => return,
                        () = tokio::time::sleep(backoff) => {}
                    }
                    backoff = (backoff * 2).min(Duration::from_secs(30));
                    continue;
                }
            },
        };
        backoff = Duration::from_millis(250);
        // Whatever was queued while nobody listened is claimable now.
        wake.notify_one();
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                // `recv` reconnects by itself; an error means it could not.
                r = listener.recv() => match r {
                    Ok(n) if n.payload() == own => {}
                    Ok(_) => {
                        metrics::counter!("webhook_delivery_wakeups_total", "source" => "notify").increment(1);
                        wake.notify_waiters();
                        wake.notify_one();
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "delivery wake-up listener lost its connection; reconnecting");
                        break;
                    }
                },
            }
        }
    }
}
