//! The inbox worker: applies stored provider events, retrying failures with
//! exponential backoff and jitter until they succeed or are dead.

use std::time::Duration;

use rand::Rng;
use tokio_util::sync::CancellationToken;

use crate::store::provider_events::ProviderEventRecord;
use crate::store::Store;
use crate::webhooks::apply::{self, Applied, ApplyError, Marked, Prepared};

#[derive(Debug, Clone)]
pub struct InboxWorkerOptions {
    pub max_attempts: i64,
    pub batch: i64,
    /// Longer than any one event takes; a crashed worker's claims lapse after it.
    pub lease_seconds: i64,
    pub idle_poll: Duration,
    /// The provider's API, for what payloads leave out.
    pub stripe: Option<crate::providers::stripe::StripeClient>,
    /// `STRIPE_REFETCH=true`: apply the provider's current object, not the payload.
    pub refetch: bool,
    pub policy: crate::billing::entitlements::Policy,
}

impl Default for InboxWorkerOptions {
    fn default() -> Self {
        Self {
            max_attempts: 10,
            batch: 64,
            lease_seconds: 15,
            idle_poll: Duration::from_millis(200),
            stripe: None,
            refetch: false,
            policy: Default::default(),
        }
    }
}

/// Seconds before attempt `attempts + 1`: 5 s doubling to an hour, ±20 %.
pub fn backoff_seconds(attempts: i64) -> i64 {
    let base = (5i64 << attempts.clamp(0, 10)).min(3600);
    let jitter = rand::thread_rng().gen_range(-(base / 5)..=(base / 5));
    (base + jitter).max(1)
}

#[tracing::instrument(name = "job.inbox", skip_all)]
pub async fn run(
    store: Store,
    wake: std::sync::Arc<tokio::sync::Notify>,
    options: InboxWorkerOptions,
    shutdown: CancellationToken,
) {
    let mut last_gauge: Option<std::time::Instant> = None;
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let worked = match work_once(&store, &options).await {
            Ok(n) => n > 0,
            Err(e) => {
                tracing::warn!(error = %e, "inbox worker could not claim events; retrying");
                false
            }
        };
        if last_gauge.is_none_or(|t| t.elapsed() >= Duration::from_secs(5)) {
            last_gauge = Some(std::time::Instant::now());
            if let Ok((depth, lag)) = store.inbox_depth().await {
                metrics::gauge!("inbox_depth").set(depth as f64);
                metrics::gauge!("inbox_lag_seconds").set(lag.unwrap_or(0) as f64);
            }
        }
        if !worked {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = wake.notified() => {}
                () = tokio::time::sleep(options.idle_poll) => {}
            }
        }
    }
}

/// Claims and applies one batch; returns how many events it handled.
///
/// The batch is applied in one transaction, each event inside its own
/// savepoint: one commit (one fsync, one turn of the audit chain's head)
/// for the batch instead of one per event, while an event that fails is
/// rolled back alone and retried on its own schedule. An event that lost a
/// race with another worker, or a batch whose commit failed, is applied
/// again event by event in its own transaction.
#[tracing::instrument(name = "job.inbox.batch", skip_all)]
pub async fn work_once(store: &Store, options: &InboxWorkerOptions) -> crate::store::StoreResult<usize> {
    let events = store.claim_provider_events(options.batch, options.lease_seconds).await?;
    if events.is_empty() {
        return Ok(0);
    }
    let claimed_at = std::time::Instant::now();
    let stripe = options.stripe.as_ref();
    let mut outcomes: Vec<(&ProviderEventRecord, Result<Applied, ApplyError>)> =
        Vec::with_capacity(events.len());
    let mut ready = Vec::with_capacity(events.len());
    for event in &events {
        match apply::prepare(store, event, stripe, options.refetch).await {
            Ok(Some(prepared)) => ready.push((event, prepared)),
            Ok(None) => outcomes.push((event, Ok(Applied::Deferred))),
            Err(e) => outcomes.push((event, Err(e))),
        }
    }
    // Events to apply again one by one, with their place in the claim: an
    // object's later events follow its conflicted one there, in order, so
    // the newer never passes the older and turns it stale.
    let mut again: Vec<(usize, &ProviderEventRecord)> = Vec::new();
    if !ready.is_empty()
        && store.kind() == crate::store::DbKind::Postgres
        && claimed_at.elapsed() > Duration::from_secs((options.lease_seconds / 3).max(1) as u64)
    {
        // Provider calls (line items, refetches) used much of the lease:
        // keep the batch ours, so no other worker takes its objects. (On
        // SQLite a claim takes no lease; see `claim_provider_events`.)
        let ids: Vec<&str> = ready.iter().map(|(event, _)| event.id.as_str()).collect();
        store.renew_provider_event_leases(&ids, options.lease_seconds).await?;
    }
    let mut ready = match apply_all_or_nothing(store, ready, &options.policy).await {
        Ok(done) => {
            outcomes.extend(done);
            Vec::new()
        }
        Err(ready) => ready,
    };
    if !ready.is_empty() {
        let mut tx = store.begin().await?;
        let mut applied = Vec::with_capacity(ready.len());
        let mut held_back: std::collections::HashSet<(&str, Option<&str>)> = Default::default();
        for (index, (event, prepared)) in ready.drain(..).enumerate() {
            let object = (event.provider.as_str(), event.object_id.as_deref());
            if held_back.contains(&object) {
                again.push((index, event));
                continue;
            }
            let point = tx.savepoint().await?;
            // The unit's events are written inside its savepoint, so a
            // failure writing them fails this event alone.
            let applied_here =
                match apply::apply_in(&mut tx, event, &prepared, Marked::No, &options.policy).await {
                    Ok(outcome) => {
                        crate::store::events::flush(&mut tx).await.map(|()| outcome).map_err(ApplyError::from)
                    }
                    Err(e) => Err(e),
                };
            match applied_here {
                Ok(outcome) => {
                    tx.release(point).await?;
                    applied.push((index, event, Ok(outcome)));
                }
                Err(e) => {
                    tx.rollback_to(point).await?;
                    if e.is_conflict() {
                        held_back.insert(object);
                        again.push((index, event));
                    } else {
                        applied.push((index, event, Err(e)));
                    }
                }
            }
        }
        match tx.commit().await {
            Ok(()) => outcomes.extend(applied.into_iter().map(|(_, event, outcome)| (event, outcome))),
            Err(e) => {
                tracing::warn!(error = %e, events = applied.len(), "inbox batch did not commit; applying its events one by one");
                again.extend(applied.into_iter().map(|(index, event, _)| (index, event)));
            }
        }
    }
    again.sort_by_key(|(index, _)| *index);
    let again = again.into_iter().map(|(_, event)| event);
    for event in again {
        let mut outcome = apply::apply(store, event, stripe, options.refetch, &options.policy).await;
        for _ in 0..3 {
            match &outcome {
                Err(e) if e.is_conflict() => {
                    outcome = apply::apply(store, event, stripe, options.refetch, &options.policy).await
                }
                _ => break,
            }
        }
        outcomes.push((event, outcome));
    }
    let mut handled = 0;
    for (event, outcome) in outcomes {
        if record_outcome(store, event, outcome, options).await? {
            handled += 1;
        }
    }
    Ok(handled)
}

/// What a batch came to, event by event.
type Outcomes<'a> = Vec<(&'a ProviderEventRecord, Result<Applied, ApplyError>)>;

/// Applies a whole batch in one transaction without savepoints, its
/// events marked done with one statement: the common case, where nothing
/// fails, costs three round trips per event fewer than a savepoint around
/// each. If any event fails (or the commit does), nothing is kept and the
/// batch comes back, to be applied event by event in savepoints, so the
/// failure is isolated there.
async fn apply_all_or_nothing<'a>(
    store: &Store,
    ready: Vec<(&'a ProviderEventRecord, Prepared)>,
    policy: &crate::billing::entitlements::Policy,
) -> Result<Outcomes<'a>, Vec<(&'a ProviderEventRecord, Prepared)>> {
    if ready.len() < 2 {
        return Err(ready);
    }
    let attempt = async {
        let mut tx = store.begin().await?;
        let applicable: Vec<&str> =
            ready.iter().filter(|(_, p)| p.is_applicable()).map(|(e, _)| e.id.as_str()).collect();
        let won = crate::store::provider_events::mark_processed(&mut tx, &applicable).await?;
        // The watermarks of objects the batch names once move together; an
        // object named twice moves event by event, in the batch's order.
        // `positions` holds, per event, what the batch-wide statements use.
        let mut named: std::collections::HashMap<(&str, &str), usize> = Default::default();
        let positions: Vec<Option<(&str, crate::billing::ordering::Position)>> = ready
            .iter()
            .map(|(event, prepared)| {
                let applies = prepared.is_applicable() && won.contains(&event.id);
                let (object_id, position) = prepared.watermark(event).ok().filter(|_| applies)?;
                *named.entry((event.provider.as_str(), object_id)).or_default() += 1;
                Some((object_id, position))
            })
            .collect();
        let named_once = |provider: &str, object_id: &str| named[&(provider, object_id)] == 1;
        let with_position =
            || ready.iter().zip(&positions).filter_map(|((e, p), pos)| Some((*e, p, pos.as_ref()?)));
        let once: Vec<(&str, &str, &crate::billing::ordering::Position)> = with_position()
            .map(|(event, _, (object_id, position))| (event.provider.as_str(), *object_id, position))
            .filter(|(provider, object_id, _)| named_once(provider, object_id))
            .collect();
        let moved = crate::store::watermarks::advance_many(&mut tx, &once).await?;
        // Links read ahead are held `FOR SHARE` (PostgreSQL) until the
        // commit; a provider customer whose own event is in the batch may
        // have its link taken `FOR UPDATE` by that event, and two batches
        // each upgrading a link the other shares would deadlock. Those are
        // read when their events need them.
        let batch_objects: std::collections::HashSet<&str> =
            ready.iter().filter_map(|(event, _)| event.object_id.as_deref()).collect();
        let customers: Vec<&str> = with_position()
            .filter_map(|(event, prepared, _)| prepared.provider_customer(event))
            .filter(|customer| !batch_objects.contains(customer))
            .collect();
        crate::store::customers::read_links(&mut tx, "stripe", &customers).await?;
        let subscription_event = |event: &ProviderEventRecord| {
            event.provider == "stripe" && event.event_type.starts_with("customer.subscription.")
        };
        // Only objects named once: their watermarks are locked above, so
        // no other transaction (another worker, the API applying Stripe's
        // answer) changes them between this read and their event. An
        // object named twice locks its watermark event by event, and its
        // subscription is read then.
        let subscriptions: Vec<&str> = with_position()
            .filter(|(event, _, (object_id, _))| {
                subscription_event(event) && named_once(&event.provider, object_id)
            })
            .map(|(_, _, (object_id, _))| *object_id)
            .collect();
        crate::store::subscriptions::read_many(&mut tx, "stripe", &subscriptions).await?;
        let mut done: Outcomes<'a> = Vec::with_capacity(ready.len());
        for ((event, prepared), position) in ready.iter().zip(&positions) {
            let marked = match position {
                Some((object_id, _)) if named_once(&event.provider, object_id) => {
                    Marked::WithWatermark(moved.contains(&(event.provider.clone(), (*object_id).to_owned())))
                }
                _ => Marked::Yes,
            };
            // A subscription event's new rows wait to be written with the
            // batch's others; any other event first writes what waits.
            let defer = subscription_event(event);
            if !defer {
                tx.write_deferred().await?;
            }
            tx.defer_rows = defer;
            let outcome = match (prepared.is_applicable(), won.contains(&event.id)) {
                (true, false) => Applied::AlreadyDone,
                (true, true) => apply::apply_in(&mut tx, event, prepared, marked, policy).await?,
                (false, _) => apply::apply_in(&mut tx, event, prepared, Marked::No, policy).await?,
            };
            done.push((*event, Ok(outcome)));
        }
        tx.defer_rows = false;
        tx.commit().await?;
        Ok::<_, ApplyError>(done)
    };
    match attempt.await {
        Ok(done) => Ok(done),
        Err(e) => {
            // Normal now and then (an event that fails, a clash with a
            // concurrent writer); steadily, a batch's work done twice.
            metrics::counter!("inbox_batch_fallbacks_total").increment(1);
            tracing::debug!(error = %e, events = ready.len(), "inbox batch failed as a whole; applying it event by event");
            Err(ready)
        }
    }
}

/// Counts an event's outcome and, for a failure, schedules its retry (or
/// buries it). `false` for an event left waiting (deferred).
async fn record_outcome(
    store: &Store,
    event: &ProviderEventRecord,
    outcome: Result<Applied, ApplyError>,
    options: &InboxWorkerOptions,
) -> crate::store::StoreResult<bool> {
    let label = match &outcome {
        Ok(Applied::Processed) => "processed",
        Ok(Applied::Stale) => "stale",
        Ok(Applied::Ignored) => "ignored",
        Ok(Applied::AlreadyDone) => "already_done",
        Ok(Applied::Deferred) => "deferred",
        Err(_) => "failed",
    };
    metrics::counter!("provider_events_total", "provider" => event.provider.clone(), "outcome" => label)
        .increment(1);
    match outcome {
        Ok(Applied::Deferred) => {
            // Not counted as an attempt; a newer version that maps the
            // type wakes it at start-up.
            store.defer_provider_event(&event.id, i64::MAX / 4).await?;
            Ok(false)
        }
        Ok(_) => Ok(true),
        Err(e) => {
            let attempts = event.attempts + 1;
            let retry_at = (attempts < options.max_attempts)
                .then(|| crate::store::now_unix() + backoff_seconds(attempts));
            if retry_at.is_none() {
                metrics::counter!("provider_events_dead_total", "provider" => event.provider.clone())
                    .increment(1);
                tracing::error!(event = %event.provider_event_id, error = %e, "provider event is dead after {attempts} attempts");
            } else {
                tracing::warn!(event = %event.provider_event_id, error = %e, attempts, "provider event failed; will retry");
            }
            store.fail_provider_event(&event.id, &e.to_string(), retry_at).await?;
            Ok(true)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_and_is_capped() {
        for attempts in 0..20 {
            let b = backoff_seconds(attempts);
            let base = (5i64 << attempts.clamp(0, 10)).min(3600);
            assert!(b >= base - base / 5 && b <= base + base / 5, "{attempts}: {b}");
        }
        assert!(backoff_seconds(20) <= 4320);
    }
}
