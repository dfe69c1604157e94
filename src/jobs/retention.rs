//! Pruning of data kept only for a while: idempotency keys after their TTL.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::AppState;

#[tracing::instrument(name = "job.retention", skip_all)]
pub async fn run(state: AppState, shutdown: CancellationToken, every: Duration) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        match state.store.prune_idempotency_keys(state.idempotency_ttl_seconds).await {
            Ok(n) => {
                metrics::counter!("retention_pruned_total", "kind" => "idempotency_keys").increment(n);
                if n > 0 {
                    tracing::info!(pruned = n, "idempotency keys pruned");
                }
            }
            Err(e) => tracing::warn!(error = %e, "idempotency key pruning failed; will retry"),
        }
    }
}
