//! Time alone changes entitlements when a `past_due` subscription's grace
//! period ends; no provider event announces that moment, so this job
//! recomputes the entitlements of customers with past-due subscriptions.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::AppState;

#[tracing::instrument(name = "job.grace", skip_all)]
pub async fn run(state: AppState, shutdown: CancellationToken, every: Duration) {
    let policy = state.config.fulfilment_policy();
    super::every(&shutdown, every, || async {
        match state.store.recompute_past_due_entitlements(&policy).await {
            Ok(n) if n > 0 => tracing::info!(customers = n, "entitlements changed as grace periods ended"),
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "grace-period recomputation failed; will retry"),
        }
    })
    .await;
}
