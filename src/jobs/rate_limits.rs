//! Keeps the local rate limiters small: buckets that are full again are
//! forgotten, so memory does not grow with every address ever seen.

use std::sync::Arc;
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use crate::ratelimit::RateLimits;

#[tracing::instrument(name = "job.rate_limits", skip_all)]
pub async fn run(limits: Arc<RateLimits>, shutdown: CancellationToken, every: Duration) {
    let mut ticks = tokio::time::interval(every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            () = shutdown.cancelled() => return,
            _ = ticks.tick() => limits.prune(),
        }
    }
}
