//! An order's status, derived from the facts the provider reported.
//!
//! Refunds, disputes and the payment itself are different provider objects
//! whose events arrive in any order. Instead of moving the order through
//! transitions as events arrive (which would depend on arrival order), the
//! order's status is recomputed from everything known about its payment
//! every time any of it changes. The same facts always give the same status.

/// What is known about an order's payment.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OrderFacts {
    pub amount_total: i64,
    pub paid: bool,
    pub payment_failed: bool,
    pub canceled: bool,
    /// The charge's own running total, from its latest snapshot.
    pub charge_amount_refunded: i64,
    /// When that snapshot was reported (the event's `created`).
    pub charge_snapshot_at: i64,
    pub refunds: Vec<RefundFact>,
    /// Each dispute's status.
    pub disputes: Vec<String>,
}

/// One refund as last reported.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RefundFact {
    pub amount: i64,
    pub status: String,
    /// The refund's own `created`.
    pub created: i64,
    /// When its status was reported (the event's `created`).
    pub status_at: i64,
}

impl RefundFact {
    pub fn new(amount: i64, status: &str) -> Self {
        RefundFact { amount, status: status.to_owned(), ..Default::default() }
    }
}

/// Refund statuses that count against the order: money that has left or is
/// leaving. `failed` and `canceled` refunds gave nothing back.
pub fn refund_counts(status: &str) -> bool {
    matches!(status, "succeeded" | "pending" | "requires_action")
}

/// Dispute statuses during which the money is in question.
pub fn dispute_is_open(status: &str) -> bool {
    matches!(status, "warning_needs_response" | "warning_under_review" | "needs_response" | "under_review")
}

impl OrderFacts {
    /// The amount refunded: the larger of the charge's running total and the
    /// sum of the refunds seen, because either may be the newer news. A
    /// refund that existed when the charge snapshot was taken and failed (or
    /// was canceled) after it was still counted by that snapshot: Stripe
    /// gives the money back to the merchant but sends no new charge event,
    /// so it is taken out of the snapshot's total here.
    pub fn amount_refunded(&self) -> i64 {
        let listed: i64 = self.refunds.iter().filter(|r| refund_counts(&r.status)).map(|r| r.amount).sum();
        let reversed_since_snapshot: i64 = self
            .refunds
            .iter()
            .filter(|r| {
                !refund_counts(&r.status)
                    && r.created <= self.charge_snapshot_at
                    && r.status_at > self.charge_snapshot_at
            })
            .map(|r| r.amount)
            .sum();
        (self.charge_amount_refunded - reversed_since_snapshot).max(listed).max(0)
    }

    /// The status, most severe first: a lost dispute outranks a refund,
    /// an open dispute outranks everything but a loss.
    pub fn status(&self) -> &'static str {
        if !self.paid {
            return if self.canceled {
                "canceled"
            } else if self.payment_failed {
                "payment_failed"
            } else {
                "pending"
            };
        }
        let refunded = self.amount_refunded();
        if self.disputes.iter().any(|s| s == "lost") {
            "dispute_lost"
        } else if self.disputes.iter().any(|s| dispute_is_open(s)) {
            "disputed"
        } else if refunded > 0 && refunded >= self.amount_total {
            "refunded"
        } else if refunded > 0 {
            "partially_refunded"
        } else if self.disputes.iter().any(|s| s == "won") {
            "dispute_won"
        } else {
            "paid"
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn paid(total: i64) -> OrderFacts {
        OrderFacts { amount_total: total, paid: true, ..Default::default() }
    }

    #[test]
    fn statuses_follow_the_facts() {
        assert_eq!(OrderFacts::default().status(), "pending");
        assert_eq!(OrderFacts { payment_failed: true, ..Default::default() }.status(), "payment_failed");
        assert_eq!(OrderFacts { canceled: true, ..Default::default() }.status(), "canceled");
        assert_eq!(paid(1000).status(), "paid");
        let partial = OrderFacts {
            refunds: vec![RefundFact::new(300, "succeeded"), RefundFact::new(200, "failed")],
            ..paid(1000)
        };
        assert_eq!((partial.status(), partial.amount_refunded()), ("partially_refunded", 300));
        let full = OrderFacts {
            charge_amount_refunded: 1000,
            refunds: vec![RefundFact::new(300, "succeeded")],
            ..paid(1000)
        };
        assert_eq!((full.status(), full.amount_refunded()), ("refunded", 1000));
        assert_eq!(OrderFacts { disputes: vec!["needs_response".into()], ..paid(1000) }.status(), "disputed");
        assert_eq!(OrderFacts { disputes: vec!["lost".into()], ..full.clone() }.status(), "dispute_lost");
        assert_eq!(OrderFacts { disputes: vec!["won".into()], ..paid(1000) }.status(), "dispute_won");
    }

    #[test]
    fn refund_news_in_any_order_gives_the_same_total() {
        // Charge says 500 after two refunds of 250; the refunds may arrive
        // before or after the charge's snapshot.
        let before = OrderFacts {
            charge_amount_refunded: 0,
            refunds: vec![RefundFact::new(250, "succeeded"), RefundFact::new(250, "succeeded")],
            ..paid(1000)
        };
        let after = OrderFacts { charge_amount_refunded: 500, refunds: vec![], ..paid(1000) };
        assert_eq!(before.amount_refunded(), after.amount_refunded());
    }

    #[test]
    fn a_refund_failing_after_the_charge_snapshot_is_taken_out_of_it() {
        let refund = |status: &str, status_at: i64| RefundFact {
            amount: 300,
            status: status.to_owned(),
            created: 100,
            status_at,
        };
        // The charge at 110 counted the pending refund; it failed at 120.
        let failed_later = OrderFacts {
            charge_amount_refunded: 300,
            charge_snapshot_at: 110,
            refunds: vec![refund("failed", 120)],
            ..paid(1000)
        };
        assert_eq!((failed_later.amount_refunded(), failed_later.status()), (0, "paid"));
        // A snapshot taken after the failure already left it out.
        let snapshot_after = OrderFacts {
            charge_amount_refunded: 200,
            charge_snapshot_at: 130,
            refunds: vec![
                refund("failed", 120),
                RefundFact { created: 125, ..RefundFact::new(200, "succeeded") },
            ],
            ..paid(1000)
        };
        assert_eq!(snapshot_after.amount_refunded(), 200);
        // Still pending: it counts, whichever fact is newer.
        let pending = OrderFacts {
            charge_amount_refunded: 300,
            charge_snapshot_at: 110,
            refunds: vec![refund("pending", 105)],
            ..paid(1000)
        };
        assert_eq!(pending.amount_refunded(), 300);
    }
}
