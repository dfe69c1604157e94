//! A checkout request that dies between recording its session and hearing
//! from the provider (the process stopped, the client went away and the
//! handler was cancelled) leaves an `open` session without a page and a
//! `pending` order that nothing would ever settle. This job expires such
//! sessions and cancels their orders once no request can still own them.

use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::http::AppState;
use crate::store::audit::Actor;

/// Beyond the request timeout: the time a handler may still be writing its
/// outcome after the timeout fired, and clock skew between instances.
const MARGIN_SECONDS: i64 = 60;

#[tracing::instrument(name = "job.abandoned_checkouts", skip_all)]
pub async fn run(state: AppState, shutdown: CancellationToken, every: Duration) {
    super::every(&shutdown, every, || async {
        let cutoff = crate::store::now_unix() - state.request_timeout_seconds - MARGIN_SECONDS;
        match state.store.expire_abandoned_checkouts(cutoff, &Actor::System("checkout_sweeper")).await {
            Ok(n) if n > 0 => {
                metrics::counter!("checkout_abandoned_total").increment(n);
                tracing::warn!(sessions = n, "expired checkouts abandoned before the provider answered");
            }
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "abandoned-checkout sweep failed; will retry"),
        }
    })
    .await;
}
