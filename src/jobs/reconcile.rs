//! Periodic reconciliation with the provider's event list.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::providers::stripe::StripeClient;

#[tracing::instrument(name = "job.reconcile", skip_all)]
pub async fn run(state: AppState, shutdown: CancellationToken, every: Duration) {
    let client = StripeClient::from_config(&state.config);
    // The first pass looks back a day; later ones overlap the previous pass.
    let mut since = crate::store::now_unix() - 86_400;
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        let started = crate::store::now_unix();
        match crate::ops::reconcile::reconcile_stripe(&state.store, &client, since).await {
            Ok(report) => {
                if report.ingested > 0 {
                    tracing::warn!(
                        ingested = report.ingested,
                        "reconciliation found events the webhooks missed"
                    );
                    state.inbox_wake.notify_one();
                }
                since = started - 600;
            }
            Err(e) => tracing::warn!(error = %e, "reconciliation failed; will retry"),
        }
    }
}
