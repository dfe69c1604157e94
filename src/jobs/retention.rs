//! Pruning of data kept only for a while: idempotency keys after their TTL,
//! finished provider events and delivered messages after their retention
//! age. The audit log is never pruned (it is append-only by design and by
//! trigger), and watermarks are their own table, so ordering survives the
//! events that set them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::store::audit::Actor;
use crate::store::ops::days_ago;

#[tracing::instrument(name = "job.retention", skip_all)]
pub async fn run(state: AppState, shutdown: CancellationToken, every: Duration) {
    super::every(&shutdown, every, || async {
        prune_once(&state).await;
    })
    .await;
}

/// One pass over every kind; a failing kind is retried at the next tick
/// and does not stop the others.
pub async fn prune_once(state: &AppState) {
    let actor = Actor::System("retention");
    let config = &state.config;
    let idempotency = state.store.prune_idempotency_keys(state.idempotency_ttl_seconds).await;
    record("idempotency_keys", idempotency);
    if config.retention_provider_events_days > 0 {
        let cutoff = days_ago(config.retention_provider_events_days);
        record("provider_events", state.store.prune_provider_events(cutoff, &actor).await);
    }
    if config.retention_deliveries_days > 0 {
        let cutoff = days_ago(config.retention_deliveries_days);
        record("deliveries", state.store.prune_delivered_messages(cutoff, &actor).await);
    }
    metrics::gauge!("retention_last_run_timestamp_seconds").set(crate::store::now_unix() as f64);
}

fn record(kind: &'static str, result: crate::store::StoreResult<u64>) {
    match result {
        Ok(n) => {
            metrics::counter!("retention_pruned_total", "kind" => kind).increment(n);
            if n > 0 {
                tracing::info!(kind, pruned = n, "retention pruned");
            }
        }
        Err(e) => {
            metrics::counter!("retention_failures_total", "kind" => kind).increment(1);
            tracing::warn!(kind, error = %e, "retention pruning failed; will retry");
        }
    }
}
