//! Stripe objects as tollgate reads them, from any API version.
//!
//! Stripe moves fields between API versions, and an account's webhooks
//! carry the account's pinned version, which can be years old. Each reader
//! below takes the object as JSON and looks in every place a field has
//! lived (newest first), so one mapping serves payloads from 2017-08-15 to
//! today. Pure functions: no I/O, unit-tested against current shapes, the
//! shapes of `shared/fixtures/stripe/fixtures3.json` and old ones.

use serde_json::Value;

/// Why an object could not be read: it lacks what tollgate cannot do without.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{object} {field}: {problem}")]
pub struct ReadError {
    pub object: &'static str,
    pub field: &'static str,
    pub problem: &'static str,
}

fn missing(object: &'static str, field: &'static str) -> ReadError {
    ReadError { object, field, problem: "missing" }
}

/// An id that may be given as a string or as an expanded object.
pub fn id_of(value: &Value) -> Option<&str> {
    match value {
        Value::String(s) if !s.is_empty() => Some(s),
        Value::Object(o) => o.get("id").and_then(Value::as_str).filter(|s| !s.is_empty()),
        _ => None,
    }
}

fn str_of(value: &Value) -> Option<String> {
    value.as_str().filter(|s| !s.is_empty()).map(str::to_owned)
}

fn int(value: &Value) -> Option<i64> {
    value.as_i64()
}

fn currency(value: &Value) -> String {
    value.as_str().unwrap_or("").to_ascii_lowercase()
}

fn metadata(value: &Value) -> Value {
    match value {
        Value::Object(_) => value.clone(),
        _ => Value::Object(Default::default()),
    }
}

/// One priced item of a subscription.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SubscriptionItem {
    /// The provider price id, or the legacy plan id.
    pub price: Option<String>,
    pub product: Option<String>,
    pub quantity: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Subscription {
    pub id: String,
    pub customer: String,
    pub status: String,
    pub items: Vec<SubscriptionItem>,
    pub current_period_start: Option<i64>,
    pub current_period_end: Option<i64>,
    pub cancel_at_period_end: bool,
    pub cancel_at: Option<i64>,
    pub canceled_at: Option<i64>,
    pub ended_at: Option<i64>,
    pub trial_start: Option<i64>,
    pub trial_end: Option<i64>,
    pub latest_invoice: Option<String>,
    pub metadata: Value,
    pub created: i64,
}

/// The statuses tollgate mirrors; anything else Stripe invents later is
/// read as the nearest one rather than refused.
fn subscription_status(raw: Option<&str>) -> String {
    match raw {
        Some(
            s @ ("incomplete" | "incomplete_expired" | "trialing" | "active" | "past_due" | "unpaid"
            | "paused" | "canceled"),
        ) => s.to_owned(),
        _ => "incomplete".to_owned(),
    }
}

fn item_of(item: &Value) -> SubscriptionItem {
    // `price` since 2020-08-27 (and alongside `plan` before); `plan` only in
    // the oldest payloads.
    let price_obj =
        if item["price"].is_object() || item["price"].is_string() { &item["price"] } else { &item["plan"] };
    SubscriptionItem {
        price: id_of(price_obj).map(str::to_owned),
        product: id_of(&price_obj["product"]).map(str::to_owned),
        quantity: int(&item["quantity"]).unwrap_or(1).max(1),
    }
}

pub fn subscription(obj: &Value) -> Result<Subscription, ReadError> {
    let id = str_of(&obj["id"]).ok_or(missing("subscription", "id"))?;
    let customer = id_of(&obj["customer"]).ok_or(missing("subscription", "customer"))?.to_owned();
    let mut items: Vec<SubscriptionItem> =
        obj["items"]["data"].as_array().map(|a| a.iter().map(item_of).collect()).unwrap_or_default();
    if items.is_empty() && obj["plan"].is_object() {
        // 2017-era single-plan subscriptions: `plan` and `quantity` at the top.
        items.push(item_of(obj));
    }
    // The billing period moved from the subscription to its items in
    // 2025-03-31; read the top level first (older payloads) and fall back to
    // the items (the earliest start, the latest end).
    let first_item = obj["items"]["data"].as_array().and_then(|a| a.first());
    let item_periods = |field: &str| -> Vec<i64> {
        obj["items"]["data"]
            .as_array()
            .map(|a| a.iter().filter_map(|i| int(&i[field])).collect())
            .unwrap_or_default()
    };
    let current_period_start = int(&obj["current_period_start"])
        .or_else(|| item_periods("current_period_start").into_iter().min())
        .or_else(|| first_item.and_then(|i| int(&i["current_period_start"])));
    let current_period_end =
        int(&obj["current_period_end"]).or_else(|| item_periods("current_period_end").into_iter().max());
    Ok(Subscription {
        id,
        customer,
        status: subscription_status(obj["status"].as_str()),
        items,
        current_period_start,
        current_period_end,
        cancel_at_period_end: obj["cancel_at_period_end"].as_bool().unwrap_or(false),
        cancel_at: int(&obj["cancel_at"]),
        canceled_at: int(&obj["canceled_at"]),
        ended_at: int(&obj["ended_at"]),
        trial_start: int(&obj["trial_start"]),
        trial_end: int(&obj["trial_end"]),
        latest_invoice: id_of(&obj["latest_invoice"]).map(str::to_owned),
        metadata: metadata(&obj["metadata"]),
        created: int(&obj["created"])
            .or_else(|| int(&obj["start_date"]))
            .or_else(|| int(&obj["start"]))
            .unwrap_or(0),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Invoice {
    pub id: String,
    pub customer: Option<String>,
    pub subscription: Option<String>,
    pub status: String,
    pub billing_reason: Option<String>,
    pub currency: String,
    pub amount_due: i64,
    pub amount_paid: i64,
    pub attempt_count: i64,
    pub payment_intent: Option<String>,
    pub charge: Option<String>,
    pub period_start: Option<i64>,
    pub period_end: Option<i64>,
    pub hosted_invoice_url: Option<String>,
    pub paid_at: Option<i64>,
    pub created: i64,
}

pub fn invoice(obj: &Value) -> Result<Invoice, ReadError> {
    let id = str_of(&obj["id"]).ok_or(missing("invoice", "id"))?;
    // 2025-03-31 moved `subscription` under `parent.subscription_details`;
    // older versions have it at the top; lines name it in both.
    let subscription = id_of(&obj["parent"]["subscription_details"]["subscription"])
        .or_else(|| id_of(&obj["subscription"]))
        .or_else(|| {
            obj["lines"]["data"].as_array().and_then(|lines| {
                lines.iter().find_map(|l| {
                    id_of(&l["parent"]["subscription_item_details"]["subscription"])
                        .or_else(|| id_of(&l["subscription"]))
                })
            })
        })
        .map(str::to_owned);
    // `status` arrived in 2018-11-08; before it, `paid`/`closed`/`forgiven`.
    let status = match obj["status"].as_str() {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ if obj["paid"] == true => "paid".to_owned(),
        _ if obj["forgiven"] == true => "uncollectible".to_owned(),
        _ => "open".to_owned(),
    };
    let payments = obj["payments"]["data"].as_array();
    let payment_intent = id_of(&obj["payment_intent"])
        .or_else(|| payments.and_then(|p| p.iter().find_map(|p| id_of(&p["payment"]["payment_intent"]))))
        .map(str::to_owned);
    let charge = id_of(&obj["charge"])
        .or_else(|| payments.and_then(|p| p.iter().find_map(|p| id_of(&p["payment"]["charge"]))))
        .map(str::to_owned);
    let paid_at = int(&obj["status_transitions"]["paid_at"]).or_else(|| {
        (status == "paid").then(|| int(&obj["webhooks_delivered_at"]).or(int(&obj["date"]))).flatten()
    });
    Ok(Invoice {
        id,
        customer: id_of(&obj["customer"]).map(str::to_owned),
        subscription,
        status,
        billing_reason: str_of(&obj["billing_reason"]),
        currency: currency(&obj["currency"]),
        amount_due: int(&obj["amount_due"]).unwrap_or(0),
        amount_paid: int(&obj["amount_paid"]).unwrap_or(0),
        attempt_count: int(&obj["attempt_count"]).unwrap_or(0),
        payment_intent,
        charge,
        period_start: int(&obj["period_start"]),
        period_end: int(&obj["period_end"]),
        hosted_invoice_url: str_of(&obj["hosted_invoice_url"]),
        paid_at,
        created: int(&obj["created"]).or_else(|| int(&obj["date"])).unwrap_or(0),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CheckoutSession {
    pub id: String,
    pub mode: String,
    pub status: String,
    pub payment_status: String,
    pub customer: Option<String>,
    pub client_reference_id: Option<String>,
    pub payment_intent: Option<String>,
    pub subscription: Option<String>,
    pub currency: String,
    pub amount_total: Option<i64>,
    pub metadata: Value,
    pub expires_at: Option<i64>,
    /// The email a guest (a session without a customer) paid with.
    pub customer_email: Option<String>,
}

pub fn checkout_session(obj: &Value) -> Result<CheckoutSession, ReadError> {
    let id = str_of(&obj["id"]).ok_or(missing("checkout.session", "id"))?;
    let mode = match obj["mode"].as_str() {
        Some("subscription") => "subscription",
        Some("setup") => "setup",
        // Sessions from before `mode` existed (2019) were payments.
        _ => "payment",
    }
    .to_owned();
    // `payment_status` arrived in 2020-08-27; before async payment methods a
    // completed session was a paid one.
    let payment_status = match obj["payment_status"].as_str() {
        Some(s) if !s.is_empty() => s.to_owned(),
        _ => "paid".to_owned(),
    };
    let status = match obj["status"].as_str() {
        Some(s @ ("open" | "complete" | "expired")) => s.to_owned(),
        _ => "complete".to_owned(),
    };
    Ok(CheckoutSession {
        id,
        mode,
        status,
        payment_status,
        customer: id_of(&obj["customer"]).map(str::to_owned),
        client_reference_id: str_of(&obj["client_reference_id"]),
        payment_intent: id_of(&obj["payment_intent"]).map(str::to_owned),
        subscription: id_of(&obj["subscription"]).map(str::to_owned),
        currency: currency(&obj["currency"]),
        amount_total: int(&obj["amount_total"]),
        metadata: metadata(&obj["metadata"]),
        expires_at: int(&obj["expires_at"]),
        customer_email: str_of(&obj["customer_details"]["email"]).or_else(|| str_of(&obj["customer_email"])),
    })
}

/// A checkout line item (`GET /v1/checkout/sessions/{id}/line_items`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LineItem {
    pub price: Option<String>,
    pub product: Option<String>,
    pub description: Option<String>,
    pub quantity: i64,
    pub unit_amount: i64,
    pub amount_total: i64,
}

pub fn line_item(obj: &Value) -> LineItem {
    let quantity = int(&obj["quantity"]).unwrap_or(1).max(1);
    let amount_total = int(&obj["amount_total"]).or_else(|| int(&obj["amount"])).unwrap_or(0).max(0);
    LineItem {
        price: id_of(&obj["price"]).map(str::to_owned),
        product: id_of(&obj["price"]["product"]).map(str::to_owned),
        description: str_of(&obj["description"]),
        quantity,
        unit_amount: int(&obj["price"]["unit_amount"]).unwrap_or(amount_total / quantity).max(0),
        amount_total,
    }
}

/// A payment: a payment intent or, in the oldest payloads, a bare charge.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Payment {
    /// The payment intent id, or the charge id when there is none.
    pub key: String,
    pub charge: Option<String>,
    pub customer: Option<String>,
    pub invoice: Option<String>,
    pub status: String,
    pub amount: i64,
    /// Known from charges only; `None` leaves the stored figure alone.
    pub amount_refunded: Option<i64>,
    pub currency: String,
    pub failure_code: Option<String>,
    pub failure_message: Option<String>,
    pub metadata: Value,
    pub created: i64,
}

pub fn payment_intent(obj: &Value) -> Result<Payment, ReadError> {
    let key = str_of(&obj["id"]).ok_or(missing("payment_intent", "id"))?;
    let error = &obj["last_payment_error"];
    Ok(Payment {
        key,
        charge: id_of(&obj["latest_charge"])
            .or_else(|| {
                obj["charges"]["data"].as_array().and_then(|c| c.first()).and_then(|c| id_of(&c["id"]))
            })
            .map(str::to_owned),
        customer: id_of(&obj["customer"]).map(str::to_owned),
        invoice: id_of(&obj["invoice"]).map(str::to_owned),
        status: str_of(&obj["status"]).unwrap_or_else(|| "requires_payment_method".to_owned()),
        amount: int(&obj["amount"]).unwrap_or(0),
        amount_refunded: None,
        currency: currency(&obj["currency"]),
        failure_code: str_of(&error["decline_code"]).or_else(|| str_of(&error["code"])),
        failure_message: str_of(&error["message"]),
        metadata: metadata(&obj["metadata"]),
        created: int(&obj["created"]).unwrap_or(0),
    })
}

pub fn charge(obj: &Value) -> Result<Payment, ReadError> {
    let id = str_of(&obj["id"]).ok_or(missing("charge", "id"))?;
    let key = id_of(&obj["payment_intent"]).map(str::to_owned).unwrap_or_else(|| id.clone());
    // Before payment intents a charge's `status` was `succeeded`/`failed`.
    let status = match obj["status"].as_str() {
        Some("succeeded") | Some("paid") => "succeeded",
        Some("failed") => "failed",
        Some("pending") => "processing",
        _ if obj["paid"] == true => "succeeded",
        _ => "failed",
    };
    Ok(Payment {
        key,
        charge: Some(id),
        customer: id_of(&obj["customer"]).map(str::to_owned),
        invoice: id_of(&obj["invoice"]).map(str::to_owned),
        status: status.to_owned(),
        amount: int(&obj["amount"]).unwrap_or(0),
        amount_refunded: Some(int(&obj["amount_refunded"]).unwrap_or(0).max(0)),
        currency: currency(&obj["currency"]),
        failure_code: str_of(&obj["failure_code"]),
        failure_message: str_of(&obj["failure_message"]),
        metadata: metadata(&obj["metadata"]),
        created: int(&obj["created"]).unwrap_or(0),
    })
}

/// The refunds a charge lists (included in charges until 2022-11-15).
pub fn charge_refunds(obj: &Value) -> Vec<Refund> {
    obj["refunds"]["data"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|r| {
                    let mut r = r.clone();
                    // Listed refunds name their charge; fill it in if not.
                    if r["charge"].is_null() {
                        r["charge"] = obj["id"].clone();
                    }
                    if r["payment_intent"].is_null() {
                        r["payment_intent"] = obj["payment_intent"].clone();
                    }
                    refund(&r).ok()
                })
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refund {
    pub id: String,
    /// The payment intent, or the charge when there is none.
    pub payment_key: String,
    pub charge: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub reason: Option<String>,
    pub created: i64,
    /// tollgate's refund request (`rfr_…`) when tollgate asked for it
    /// (`metadata.tollgate_refund_request`).
    pub request: Option<String>,
}

pub fn refund(obj: &Value) -> Result<Refund, ReadError> {
    let id = str_of(&obj["id"]).ok_or(missing("refund", "id"))?;
    let charge = id_of(&obj["charge"]).map(str::to_owned);
    let payment_key = id_of(&obj["payment_intent"])
        .map(str::to_owned)
        .or_else(|| charge.clone())
        .ok_or(missing("refund", "payment_intent"))?;
    Ok(Refund {
        id,
        payment_key,
        charge,
        amount: int(&obj["amount"]).unwrap_or(0).max(0),
        currency: currency(&obj["currency"]),
        // Refunds had no status before 2017 versions settled: they succeeded.
        status: str_of(&obj["status"]).unwrap_or_else(|| "succeeded".to_owned()),
        reason: str_of(&obj["reason"]),
        created: int(&obj["created"]).unwrap_or(0),
        request: str_of(&obj["metadata"]["tollgate_refund_request"]),
    })
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dispute {
    pub id: String,
    pub payment_key: String,
    pub charge: Option<String>,
    pub amount: i64,
    pub currency: String,
    pub status: String,
    pub reason: Option<String>,
    pub created: i64,
}

pub fn dispute(obj: &Value) -> Result<Dispute, ReadError> {
    let id = str_of(&obj["id"]).ok_or(missing("dispute", "id"))?;
    let charge = id_of(&obj["charge"]).map(str::to_owned);
    let payment_key = id_of(&obj["payment_intent"])
        .map(str::to_owned)
        .or_else(|| charge.clone())
        .ok_or(missing("dispute", "charge"))?;
    Ok(Dispute {
        id,
        payment_key,
        charge,
        amount: int(&obj["amount"]).unwrap_or(0).max(0),
        currency: currency(&obj["currency"]),
        status: str_of(&obj["status"]).unwrap_or_else(|| "needs_response".to_owned()),
        reason: str_of(&obj["reason"]),
        created: int(&obj["created"]).unwrap_or(0),
    })
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    fn fixture(name: &str) -> Value {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../shared/fixtures/stripe/fixtures3.json");
        let all: Value =
            serde_json::from_str(&std::fs::read_to_string(path).expect("shared fixtures")).unwrap();
        all["resources"][name].clone()
    }

    #[test]
    fn reads_the_fixture_shapes() {
        let sub = subscription(&fixture("subscription")).unwrap();
        assert_eq!(sub.customer, "cus_QXg1o8vcGmoR32");
        assert_eq!(sub.items[0].price.as_deref(), Some("price_1PgafmB7WZ01zgkW6dKueIc5"));
        assert_eq!(sub.current_period_end, Some(976287773), "item periods are read");
        let inv = invoice(&fixture("invoice")).unwrap();
        assert_eq!(inv.subscription.as_deref(), Some("subscription"), "parent.subscription_details");
        let cs = checkout_session(&fixture("checkout.session")).unwrap();
        assert!(cs.id.starts_with("cs_"));
        assert!(charge(&fixture("charge")).is_ok());
        assert!(refund(&fixture("refund")).is_ok());
        assert!(dispute(&fixture("dispute")).is_ok());
        assert!(payment_intent(&fixture("payment_intent")).is_ok());
    }

    #[test]
    fn reads_2017_08_15_shapes() {
        let inv = invoice(&json!({
            "id": "in_1", "object": "invoice", "customer": "cus_1", "subscription": "sub_1",
            "charge": "ch_1", "paid": true, "closed": true, "amount_due": 900, "currency": "usd", "date": 1500000000
        }))
        .unwrap();
        assert_eq!(inv.subscription.as_deref(), Some("sub_1"));
        assert_eq!(inv.charge.as_deref(), Some("ch_1"));
        assert_eq!(inv.status, "paid");
        assert_eq!(inv.created, 1500000000);
        let sub = subscription(&json!({
            "id": "sub_1", "object": "subscription", "customer": "cus_1", "status": "active",
            "plan": {"id": "gold", "object": "plan", "product": "prod_1"}, "quantity": 3,
            "current_period_start": 10, "current_period_end": 20, "start": 5, "items": {"data": []}
        }))
        .unwrap();
        assert_eq!(
            sub.items,
            vec![SubscriptionItem {
                price: Some("gold".into()),
                product: Some("prod_1".into()),
                quantity: 3
            }]
        );
        assert_eq!((sub.current_period_start, sub.current_period_end, sub.created), (Some(10), Some(20), 5));
        let ch = charge(
            &json!({"id": "ch_1", "object": "charge", "paid": true, "amount": 900, "amount_refunded": 300,
            "currency": "USD", "refunds": {"data": [{"id": "re_1", "amount": 300}]}}),
        )
        .unwrap();
        assert_eq!((ch.key.as_str(), ch.status.as_str(), ch.currency.as_str()), ("ch_1", "succeeded", "usd"));
        let listed =
            charge_refunds(&json!({"id": "ch_1", "refunds": {"data": [{"id": "re_1", "amount": 300}]}}));
        assert_eq!(listed[0].payment_key, "ch_1");
        assert_eq!(listed[0].status, "succeeded");
    }

    #[test]
    fn reads_pre_2025_subscription_and_invoice_shapes() {
        let sub = subscription(&json!({
            "id": "sub_2", "customer": {"id": "cus_2"}, "status": "past_due", "current_period_end": 99,
            "items": {"data": [{"price": {"id": "price_2", "product": "prod_2"}, "quantity": 2}]}, "created": 7
        }))
        .unwrap();
        assert_eq!(sub.customer, "cus_2");
        assert_eq!(sub.current_period_end, Some(99));
        let inv = invoice(&json!({"id": "in_2", "status": "open", "subscription": "sub_2", "payment_intent": "pi_2", "created": 1})).unwrap();
        assert_eq!(
            (inv.subscription.as_deref(), inv.payment_intent.as_deref()),
            (Some("sub_2"), Some("pi_2"))
        );
    }

    #[test]
    fn junk_never_panics() {
        for v in [json!(null), json!(1), json!("x"), json!([]), json!({"id": 5}), json!({"items": "no"})] {
            let _ = subscription(&v);
            let _ = invoice(&v);
            let _ = checkout_session(&v);
            let _ = charge(&v);
            let _ = refund(&v);
            let _ = dispute(&v);
            let _ = payment_intent(&v);
            let _ = line_item(&v);
        }
    }
}
