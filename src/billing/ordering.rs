//! The order in which provider events take effect.
//!
//! Providers deliver out of order, and Stripe's `created` has one-second
//! resolution. Each provider object keeps a watermark: the position of the
//! newest event applied to it. An event at or below the watermark is stale
//! and changes nothing. Within one second the position is decided by what
//! the event says, not when it arrived: a lifecycle rank (created < updated
//! < deleted), then how far along the object's own status is, then the
//! event id, so every delivery order converges on the same final state.

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub created: i64,
    pub lifecycle: u8,
    pub progress: u8,
    pub event_id: String,
}

/// Where an event type sits in its object's life.
pub fn lifecycle_rank(event_type: &str) -> u8 {
    let action = event_type.rsplit('.').next().unwrap_or("");
    match action {
        "created" => 0,
        // An async payment's outcome comes after the completion it follows,
        // often in the same second, with the same session status.
        "deleted"
        | "closed"
        | "expired"
        | "canceled"
        | "async_payment_succeeded"
        | "async_payment_failed" => 3,
        "completed" | "succeeded" | "paid" | "payment_succeeded" | "refunded" => 2,
        _ => 1,
    }
}

/// How far along a status is, for statuses that only move forward within a
/// second (a subscription that is `canceled` was `active` before; a refund
/// that `failed` was `pending` or `succeeded` before).
pub fn progress_rank(status: Option<&str>) -> u8 {
    match status {
        Some("incomplete") => 0,
        Some("trialing") | Some("pending") | Some("requires_action") => 1,
        Some("active") | Some("succeeded") => 2,
        Some("past_due") => 3,
        Some("unpaid") | Some("paused") => 4,
        Some("incomplete_expired") | Some("canceled") | Some("failed") => 5,
        _ => 0,
    }
}

pub fn position(created: i64, event_type: &str, status: Option<&str>, event_id: &str) -> Position {
    Position {
        created,
        lifecycle: lifecycle_rank(event_type),
        progress: progress_rank(status),
        event_id: event_id.to_owned(),
    }
}

/// The position of an object as the provider's API answered tollgate's own
/// call, at the provider's clock `answered_at`; `answer_id` is a fresh,
/// increasing id (`new_id("api")`). The answer already reflects every event
/// the provider emitted before it, including the call's own events, which
/// carry the same second: so it ranks as an update above every event of its
/// second with the same lifecycle and status progress (`~` sorts after
/// `evt_`), and above earlier answers of the same second. An event of the
/// same second that moves the status further (a failed payment making it
/// `past_due`) or ends the object still wins, as it does between events.
///
/// Stripe stamps the events of a customer on a test clock with the clock's
/// frozen time, not the wall clock the answer carries: after the clock has
/// been advanced beyond now an answer ranks below its events (it is not
/// applied; the webhook that follows carries the same state), and events of
/// a clock frozen in the past rank below an answer. Test mode only.
pub fn api_answer_position(answered_at: i64, status: Option<&str>, answer_id: &str) -> Position {
    position(answered_at, "updated", status, &format!("~{answer_id}"))
}

/// Whether an event at `candidate` should be applied over `watermark`.
pub fn supersedes(candidate: &Position, watermark: Option<&Position>) -> bool {
    watermark.is_none_or(|w| candidate > w)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn same_second_lifecycle_converges_on_the_last_state() {
        let created = position(100, "customer.subscription.created", Some("active"), "evt_c");
        let updated = position(100, "customer.subscription.updated", Some("past_due"), "evt_a");
        let deleted = position(100, "customer.subscription.deleted", Some("canceled"), "evt_b");
        assert!(created < updated && updated < deleted);
        assert!(supersedes(&deleted, Some(&updated)));
        assert!(!supersedes(&created, Some(&deleted)));
        assert!(!supersedes(&deleted, Some(&deleted)), "a duplicate is stale");
        // A newer second always wins.
        assert!(position(101, "customer.subscription.created", None, "evt_0") > deleted);
    }

    #[test]
    fn an_api_answer_outranks_its_second_and_yields_to_further_progress() {
        let answer = api_answer_position(200, Some("active"), "api_01");
        let event = |t, kind, status| position(t, kind, Some(status), "evt_z");
        assert!(supersedes(&answer, Some(&event(199, "customer.subscription.deleted", "canceled"))));
        assert!(supersedes(&answer, Some(&event(200, "customer.subscription.updated", "active"))));
        assert!(!supersedes(&event(200, "customer.subscription.updated", "active"), Some(&answer)));
        assert!(supersedes(&event(200, "customer.subscription.updated", "past_due"), Some(&answer)));
        assert!(supersedes(&event(200, "customer.subscription.deleted", "canceled"), Some(&answer)));
        assert!(supersedes(&event(201, "customer.subscription.updated", "active"), Some(&answer)));
        let later = api_answer_position(200, Some("active"), "api_02");
        assert!(supersedes(&later, Some(&answer)), "a later answer in the same second wins");
    }

    proptest! {
        /// Applying a sequence in any order, keeping only events above the
        /// watermark, ends with the same winner as the in-order sequence.
        #[test]
        fn any_delivery_order_ends_in_the_same_state(
            events in proptest::collection::vec((0i64..5, 0usize..3, 0usize..6, "[a-z]{4}"), 1..12),
            seed in any::<u64>(),
        ) {
            let types = ["x.created", "x.updated", "x.deleted"];
            let statuses = ["incomplete", "trialing", "active", "past_due", "unpaid", "canceled"];
            let positions: Vec<Position> = events.iter().map(|(t, k, s, id)| position(*t, types[*k], Some(statuses[*s]), id)).collect();
            let apply = |order: &[Position]| {
                let mut mark: Option<Position> = None;
                for p in order {
                    if supersedes(p, mark.as_ref()) { mark = Some(p.clone()); }
                }
                mark
            };
            let in_order = apply(&positions);
            let mut shuffled = positions.clone();
            // A deterministic shuffle from the seed, with duplicates.
            let mut s = seed;
            for i in (1..shuffled.len()).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                shuffled.swap(i, (s >> 33) as usize % (i + 1));
            }
            shuffled.extend(positions.iter().take(3).cloned());
            prop_assert_eq!(apply(&shuffled), in_order);
        }
    }

    #[test]
    fn a_refund_failing_in_the_second_of_an_api_answer_wins() {
        let answer = api_answer_position(100, Some("succeeded"), "api_1");
        let failed = position(100, "refund.updated", Some("failed"), "evt_1");
        assert!(supersedes(&failed, Some(&answer)));
        assert!(!supersedes(&answer, Some(&failed)));
    }
}
