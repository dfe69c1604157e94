//! What a customer may use, derived from what they pay for.
//!
//! Never hand-edited: active and trialing subscriptions (and `past_due`
//! ones within the grace period) grant their products' entitlements; paid,
//! unrevoked one-time grants add theirs; credits are the sum of a ledger.
//! This module decides; `store::entitlements` reads the inputs and keeps
//! the result.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::catalog::Grants;

/// What a partial refund takes back (`PARTIAL_REFUND_POLICY`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum PartialRefundPolicy {
    /// Credits in proportion to the money returned (rounded so the customer
    /// keeps whole credits they paid for); features and limits stay until
    /// the order is fully refunded.
    #[default]
    Proportional,
    /// Nothing until the order is fully refunded.
    Keep,
    /// Everything, at the first refund.
    RevokeAll,
}

/// The rules fulfilment follows; configured at start-up.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct Policy {
    pub partial_refund: PartialRefundPolicy,
    /// Revoke while a dispute is open (`DISPUTE_REVOKES=open`), or only when
    /// it is lost.
    pub revoke_on_dispute_open: bool,
    /// How long a `past_due` subscription keeps granting.
    pub past_due_grace_seconds: i64,
}

impl Default for Policy {
    fn default() -> Self {
        Self {
            partial_refund: PartialRefundPolicy::Proportional,
            revoke_on_dispute_open: false,
            past_due_grace_seconds: 3 * 86400,
        }
    }
}

/// What an order's grants should be, given the order's status.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GrantState {
    /// Not paid: nothing is granted yet.
    NotYet,
    Active,
    Revoked,
}

/// What an order's grants should be. Money given back decides before the
/// displayed status: a dispute opened on a refunded order must not hand the
/// refunded goods back.
pub fn grant_state(
    order_status: &str,
    amount_refunded: i64,
    amount_total: i64,
    policy: &Policy,
) -> GrantState {
    let fully_refunded = amount_total > 0 && amount_refunded >= amount_total;
    let any_refund_revokes = policy.partial_refund == PartialRefundPolicy::RevokeAll && amount_refunded > 0;
    if !matches!(order_status, "pending" | "canceled" | "payment_failed")
        && (fully_refunded || any_refund_revokes)
    {
        return GrantState::Revoked;
    }
    match order_status {
        "pending" | "canceled" | "payment_failed" => GrantState::NotYet,
        "refunded" | "dispute_lost" => GrantState::Revoked,
        "disputed" if policy.revoke_on_dispute_open => GrantState::Revoked,
        "partially_refunded" if policy.partial_refund == PartialRefundPolicy::RevokeAll => {
            GrantState::Revoked
        }
        _ => GrantState::Active,
    }
}

/// How many of `granted` credits should be taken back, in total.
pub fn credits_to_revoke(
    granted: i64,
    state: GrantState,
    amount_refunded: i64,
    amount_total: i64,
    policy: &Policy,
) -> i64 {
    match state {
        GrantState::Revoked => granted,
        GrantState::NotYet => 0,
        GrantState::Active
            if policy.partial_refund == PartialRefundPolicy::Proportional && amount_total > 0 =>
        {
            // Floor: 1 of 5 credits' worth refunded takes back exactly one;
            // less than one credit's worth takes back none.
            let refunded = amount_refunded.clamp(0, amount_total) as i128;
            ((granted as i128 * refunded) / amount_total as i128) as i64
        }
        GrantState::Active => 0,
    }
}

/// A subscription, as far as entitlements care.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SubscriptionSource {
    pub status: String,
    pub past_due_since: Option<i64>,
    /// The catalog grants of each item's product, with the item's quantity.
    pub items: Vec<(Grants, i64)>,
}

impl SubscriptionSource {
    pub fn grants_now(&self, now: i64, policy: &Policy) -> bool {
        match self.status.as_str() {
            "active" | "trialing" => true,
            "past_due" => {
                self.past_due_since.is_some_and(|since| now < since + policy.past_due_grace_seconds)
            }
            _ => false,
        }
    }
}

/// The customer's entitlements: the document the API serves and tokens carry.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(default)]
pub struct Entitlements {
    pub features: BTreeSet<String>,
    /// Numeric limits; where several sources set one, the largest wins.
    pub limits: BTreeMap<String, i64>,
    /// Credit balances. A negative balance is a debt (credits revoked after
    /// they were spent) and is reported, never hidden.
    pub balances: BTreeMap<String, i64>,
}

impl Entitlements {
    /// Limits do not scale with quantity (three Pro seats are still "Pro,
    /// 50 projects"); only credits are per unit bought.
    fn add(&mut self, grants: &Grants) {
        self.features.extend(grants.features.iter().cloned());
        for (k, v) in &grants.limits {
            let entry = self.limits.entry(k.clone()).or_insert(*v);
            *entry = (*entry).max(*v);
        }
    }
}

/// Derives the entitlements from their sources.
pub fn derive(
    subscriptions: &[SubscriptionSource],
    active_grants: &[Grants],
    balances: &BTreeMap<String, i64>,
    now: i64,
    policy: &Policy,
) -> Entitlements {
    let mut e = Entitlements::default();
    for s in subscriptions.iter().filter(|s| s.grants_now(now, policy)) {
        for (grants, _quantity) in &s.items {
            e.add(grants);
        }
    }
    for g in active_grants {
        e.add(g);
    }
    e.balances = balances.iter().filter(|(_, v)| **v != 0).map(|(k, v)| (k.clone(), *v)).collect();
    e
}

/// A product's grants for `quantity` units bought once: credits are per
/// unit (two 5-card packs are 10 cards), features and limits are not.
pub fn grants_for_quantity(grants: &Grants, quantity: i64) -> Grants {
    let q = quantity.max(1);
    Grants {
        features: grants.features.clone(),
        limits: grants.limits.clone(),
        credits: grants.credits.iter().map(|(k, v)| (k.clone(), v.saturating_mul(q))).collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn grants(features: &[&str], limits: &[(&str, i64)], credits: &[(&str, i64)]) -> Grants {
        Grants {
            features: features.iter().map(|s| s.to_string()).collect(),
            limits: limits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            credits: credits.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
        }
    }

    #[test]
    fn subscriptions_grant_by_status_and_grace() {
        let policy = Policy::default();
        let pro = grants(&["exports"], &[("projects", 50)], &[]);
        let sub = |status: &str, since: Option<i64>| SubscriptionSource {
            status: status.into(),
            past_due_since: since,
            items: vec![(pro.clone(), 1)],
        };
        let now = 1_000_000;
        for (status, since, allowed) in [
            ("active", None, true),
            ("trialing", None, true),
            ("past_due", Some(now - 3600), true),
            ("past_due", Some(now - policy.past_due_grace_seconds), false),
            ("canceled", None, false),
            ("unpaid", None, false),
            ("incomplete_expired", None, false),
            ("incomplete", None, false),
        ] {
            let e = derive(&[sub(status, since)], &[], &BTreeMap::new(), now, &policy);
            assert_eq!(e.features.contains("exports"), allowed, "{status}");
        }
    }

    #[test]
    fn the_largest_limit_wins_and_balances_come_from_the_ledger() {
        let policy = Policy::default();
        let subs = [SubscriptionSource {
            status: "active".into(),
            past_due_since: None,
            items: vec![(grants(&[], &[("seats", 5)], &[]), 2)],
        }];
        let pack = grants(&["cards"], &[("seats", 3)], &[("cards", 5)]);
        let balances = BTreeMap::from([("cards".to_owned(), 4), ("gone".to_owned(), 0)]);
        let e = derive(&subs, &[pack], &balances, 0, &policy);
        assert_eq!(e.limits["seats"], 5, "the largest, not scaled by quantity");
        assert_eq!(e.balances, BTreeMap::from([("cards".to_owned(), 4)]));
        assert!(e.features.contains("cards"));
    }

    #[test]
    fn refunds_and_disputes_revoke_by_policy() {
        let p = Policy::default();
        assert_eq!(grant_state("fulfilled", 0, 1000, &p), GrantState::Active);
        assert_eq!(grant_state("refunded", 1000, 1000, &p), GrantState::Revoked);
        assert_eq!(grant_state("disputed", 0, 1000, &p), GrantState::Active);
        assert_eq!(
            grant_state("disputed", 0, 1000, &Policy { revoke_on_dispute_open: true, ..p }),
            GrantState::Revoked
        );
        assert_eq!(grant_state("dispute_won", 0, 1000, &p), GrantState::Active);
        assert_eq!(grant_state("dispute_lost", 0, 1000, &p), GrantState::Revoked);
        let all = Policy { partial_refund: PartialRefundPolicy::RevokeAll, ..p };
        assert_eq!(grant_state("partially_refunded", 300, 1000, &all), GrantState::Revoked);
        // A dispute on a refunded order does not give the goods back.
        assert_eq!(grant_state("disputed", 1000, 1000, &p), GrantState::Revoked);
        assert_eq!(grant_state("dispute_won", 300, 1000, &all), GrantState::Revoked);
        // 5 credits for 1000: refunding 300 takes back 1, 400 takes back 2.
        assert_eq!(credits_to_revoke(5, GrantState::Active, 300, 1000, &p), 1);
        assert_eq!(credits_to_revoke(5, GrantState::Active, 400, 1000, &p), 2);
        assert_eq!(
            credits_to_revoke(
                5,
                GrantState::Active,
                400,
                1000,
                &Policy { partial_refund: PartialRefundPolicy::Keep, ..p }
            ),
            0
        );
        assert_eq!(credits_to_revoke(5, GrantState::Revoked, 0, 1000, &p), 5);
    }
}
