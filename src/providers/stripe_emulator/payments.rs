//! Cards, payment intents, charges, refunds and disputes, with Stripe's test
//! cards behaving as they do on Stripe.

use serde_json::{json, Map, Value};

use super::error::{StripeError, StripeResult};
use super::objects::{list_of, merge_metadata};
use super::params::Params;
use super::state::{new_id, State};
use super::Ctx;

/// What a test card does when charged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CardBehaviour {
    Succeeds,
    /// 4000000000000002: every charge is declined.
    Declined,
    /// 4000000000009995: declined for insufficient funds.
    InsufficientFunds,
    /// 4000000000000341: attaches to a customer, but every charge fails.
    AttachesThenFails,
    /// 4000000000000259: the charge succeeds, then a dispute is opened.
    Disputed,
}

pub fn card_behaviour(number: &str) -> CardBehaviour {
    match number {
        "4000000000000002" => CardBehaviour::Declined,
        "4000000000009995" => CardBehaviour::InsufficientFunds,
        "4000000000000341" => CardBehaviour::AttachesThenFails,
        "4000000000000259" => CardBehaviour::Disputed,
        _ => CardBehaviour::Succeeds,
    }
}

/// Luhn check and a plausible length: what Stripe's card form refuses
/// before anything is charged.
pub fn valid_card_number(number: &str) -> bool {
    if !(12..=19).contains(&number.len()) || !number.bytes().all(|b| b.is_ascii_digit()) {
        return false;
    }
    let sum: u32 = number
        .bytes()
        .rev()
        .enumerate()
        .map(|(i, b)| {
            let d = u32::from(b - b'0');
            if i % 2 == 1 {
                let dd = d * 2;
                if dd > 9 {
                    dd - 9
                } else {
                    dd
                }
            } else {
                d
            }
        })
        .sum();
    sum % 10 == 0
}

fn brand(number: &str) -> &'static str {
    match number.as_bytes().first() {
        Some(b'4') => "visa",
        Some(b'5') | Some(b'2') => "mastercard",
        Some(b'3') => "amex",
        _ => "unknown",
    }
}

/// Creates a card payment method, attached to `customer` when given.
pub fn create_card(
    state: &mut State,
    number: &str,
    customer: Option<&str>,
    email: Option<&str>,
    now: i64,
) -> Value {
    let id = new_id("pm");
    state.cards.insert(id.clone(), number.to_owned());
    let pm = state.insert(json!({
        "id": id,
        "object": "payment_method",
        "billing_details": { "address": null, "email": email, "name": null, "phone": null },
        "card": {
            "brand": brand(number),
            "checks": { "address_line1_check": null, "address_postal_code_check": null, "cvc_check": "pass" },
            "country": "US",
            "exp_month": 12,
            "exp_year": 2034,
            "fingerprint": hex::encode(&sha2_digest(number)[..8]),
            "funding": "credit",
            "last4": &number[number.len() - 4..],
        },
        "created": now,
        "customer": customer,
        "livemode": false,
        "metadata": {},
        "type": "card",
    }));
    if customer.is_some() {
        state.emit("payment_method.attached", &pm, None, now);
    }
    pm
}

fn sha2_digest(s: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(s.as_bytes()).to_vec()
}

/// What to charge.
pub struct ChargeRequest<'a> {
    pub customer: Option<&'a str>,
    pub payment_method: &'a str,
    pub amount: i64,
    pub currency: &'a str,
    pub description: Option<String>,
    pub metadata: Value,
    pub now: i64,
}

/// The payment intent and charge a payment attempt left behind, and the
/// decline if it failed.
pub struct Charged {
    pub payment_intent: Value,
    pub charge: Value,
    pub declined: Option<StripeError>,
}

/// Charges a card the way Stripe would: a payment intent and a charge, the
/// events for both, and the test card's behaviour (decline, dispute).
pub fn charge(state: &mut State, req: ChargeRequest<'_>) -> Charged {
    let number = state.cards.get(req.payment_method).cloned().unwrap_or_default();
    let behaviour = card_behaviour(&number);
    let decline = match behaviour {
        CardBehaviour::Declined | CardBehaviour::AttachesThenFails => {
            Some(("generic_decline", "Your card was declined."))
        }
        CardBehaviour::InsufficientFunds => Some(("insufficient_funds", "Your card has insufficient funds.")),
        _ => None,
    };
    let pi_id = new_id("pi");
    let ch_id = new_id("ch");
    let pm = state.get(req.payment_method).cloned().unwrap_or(Value::Null);
    let charge = json!({
        "id": ch_id,
        "object": "charge",
        "amount": req.amount,
        "amount_captured": if decline.is_none() { req.amount } else { 0 },
        "amount_refunded": 0,
        "balance_transaction": decline.is_none().then(|| new_id("txn")),
        "billing_details": pm["billing_details"].clone(),
        "captured": decline.is_none(),
        "created": req.now,
        "currency": req.currency,
        "customer": req.customer,
        "description": req.description,
        "disputed": false,
        "failure_code": decline.map(|_| "card_declined"),
        "failure_message": decline.map(|(_, m)| m),
        "livemode": false,
        "metadata": req.metadata.clone(),
        "outcome": {
            "network_status": if decline.is_none() { "approved_by_network" } else { "declined_by_network" },
            "reason": decline.map(|(code, _)| code),
            "risk_level": "normal",
            "seller_message": if decline.is_none() { "Payment complete." } else { "The bank did not return any further details with this decline." },
            "type": if decline.is_none() { "authorized" } else { "issuer_declined" },
        },
        "paid": decline.is_none(),
        "payment_intent": pi_id,
        "payment_method": req.payment_method,
        "payment_method_details": { "card": pm["card"].clone(), "type": "card" },
        "receipt_url": null,
        "refunded": false,
        "status": if decline.is_none() { "succeeded" } else { "failed" },
    });
    let charge = state.insert(charge);
    let last_error = decline.map(|(code, message)| {
        json!({
            "type": "card_error", "code": "card_declined", "decline_code": code, "message": message,
            "charge": ch_id, "payment_method": pm.clone(),
        })
    });
    let intent = json!({
        "id": pi_id,
        "object": "payment_intent",
        "amount": req.amount,
        "amount_capturable": 0,
        "amount_received": if decline.is_none() { req.amount } else { 0 },
        "automatic_payment_methods": null,
        "canceled_at": null,
        "cancellation_reason": null,
        "capture_method": "automatic",
        "client_secret": format!("{pi_id}_secret_{}", &new_id("s")[2..]),
        "confirmation_method": "automatic",
        "created": req.now,
        "currency": req.currency,
        "customer": req.customer,
        "description": req.description,
        "last_payment_error": last_error,
        "latest_charge": ch_id,
        "livemode": false,
        "metadata": req.metadata,
        "next_action": null,
        "payment_method": if decline.is_none() { json!(req.payment_method) } else { Value::Null },
        "payment_method_types": ["card"],
        "status": if decline.is_none() { "succeeded" } else { "requires_payment_method" },
    });
    let intent = state.insert(intent);
    state.emit("payment_intent.created", &intent, None, req.now);
    match decline {
        None => {
            state.emit("charge.succeeded", &charge, None, req.now);
            state.emit("payment_intent.succeeded", &intent, None, req.now);
            if behaviour == CardBehaviour::Disputed {
                open_dispute(state, &ch_id, req.now);
            }
            Charged {
                payment_intent: intent,
                charge: state.get(&ch_id).cloned().unwrap_or(charge),
                declined: None,
            }
        }
        Some((code, message)) => {
            state.emit("charge.failed", &charge, None, req.now);
            state.emit("payment_intent.payment_failed", &intent, None, req.now);
            let error = StripeError::card_declined(code, message)
                .with_extra("charge", json!(ch_id))
                .with_extra("payment_intent", intent.clone());
            Charged { payment_intent: intent, charge, declined: Some(error) }
        }
    }
}

fn open_dispute(state: &mut State, charge_id: &str, now: i64) {
    let charge = state.get(charge_id).cloned().unwrap_or(Value::Null);
    let dispute = state.insert(json!({
        "id": new_id("dp"),
        "object": "dispute",
        "amount": charge["amount"],
        "balance_transactions": [],
        "charge": charge_id,
        "created": now,
        "currency": charge["currency"],
        "evidence": { "uncategorized_text": null },
        "evidence_details": { "due_by": now + 7 * 86_400, "has_evidence": false, "past_due": false, "submission_count": 0 },
        "is_charge_refundable": false,
        "livemode": false,
        "metadata": {},
        "payment_intent": charge["payment_intent"],
        "reason": "fraudulent",
        "status": "needs_response",
    }));
    let mut changes = Map::new();
    changes.insert("disputed".into(), json!(true));
    state.update(charge_id, changes);
    state.emit("charge.dispute.created", &dispute, None, now);
}

pub fn get_payment_method(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("payment_method", ctx.id(), "id")
}

pub fn get_payment_intent(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["client_secret"])?;
    state.fetch("payment_intent", ctx.id(), "intent")
}

pub fn list_payment_intents(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before", "customer"])?;
    let customer = p.nonempty("customer")?.map(str::to_owned);
    list_of(state, p, "payment_intent", "/v1/payment_intents", |o| {
        customer.as_ref().is_none_or(|c| o["customer"] == c.as_str())
    })
}

pub fn get_charge(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("charge", ctx.id(), "charge")
}

pub fn list_charges(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before", "customer", "payment_intent"])?;
    let customer = p.nonempty("customer")?.map(str::to_owned);
    let pi = p.nonempty("payment_intent")?.map(str::to_owned);
    list_of(state, p, "charge", "/v1/charges", |o| {
        customer.as_ref().is_none_or(|c| o["customer"] == c.as_str())
            && pi.as_ref().is_none_or(|c| o["payment_intent"] == c.as_str())
    })
}

// ---- refunds ----

pub fn create_refund(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["charge", "payment_intent", "amount", "reason", "metadata"])?;
    let charge_id = match (p.nonempty("charge")?, p.nonempty("payment_intent")?) {
        (Some(c), _) => c.to_owned(),
        (None, Some(pi)) => {
            let intent = state.fetch("payment_intent", pi, "payment_intent")?;
            if intent["status"] != "succeeded" {
                return Err(StripeError::param(
                    "payment_intent",
                    format!("This PaymentIntent ({pi}) does not have a successful charge to refund."),
                ));
            }
            intent["latest_charge"].as_str().unwrap_or_default().to_owned()
        }
        (None, None) => return Err(StripeError::missing("charge")),
    };
    let charge = state.fetch("charge", &charge_id, "charge")?;
    if charge["status"] != "succeeded" {
        return Err(StripeError::param(
            "charge",
            format!("Charge {charge_id} has not succeeded and cannot be refunded."),
        ));
    }
    let total = charge["amount"].as_i64().unwrap_or(0);
    let refunded = charge["amount_refunded"].as_i64().unwrap_or(0);
    let remaining = total - refunded;
    if remaining <= 0 {
        return Err(StripeError {
            code: Some("charge_already_refunded"),
            ..StripeError::param("charge", format!("Charge {charge_id} has already been refunded."))
        });
    }
    let amount = p.int("amount")?.unwrap_or(remaining);
    if amount <= 0 {
        return Err(StripeError::param("amount", "Invalid positive integer"));
    }
    if amount > remaining {
        return Err(StripeError {
            code: Some("amount_too_large"),
            ..StripeError::param(
                "amount",
                format!("Refund amount ({amount}) is greater than unrefunded amount on charge ({remaining})"),
            )
        });
    }
    let reason = p.nonempty("reason")?;
    if let Some(r) = reason {
        if !["duplicate", "fraudulent", "requested_by_customer"].contains(&r) {
            return Err(StripeError::param("reason", format!("Invalid reason: {r}")));
        }
    }
    let customer = charge["customer"].as_str().map(str::to_owned);
    let now = state.now_for_customer(customer.as_deref());
    let refund = state.insert(json!({
        "id": new_id("re"),
        "object": "refund",
        "amount": amount,
        "balance_transaction": new_id("txn"),
        "charge": charge_id,
        "created": now,
        "currency": charge["currency"],
        "destination_details": { "card": { "type": "refund" }, "type": "card" },
        "metadata": p.metadata("metadata")?.unwrap_or_default(),
        "payment_intent": charge["payment_intent"],
        "reason": reason,
        "receipt_number": null,
        "status": "succeeded",
    }));
    let mut changes = Map::new();
    changes.insert("amount_refunded".into(), json!(refunded + amount));
    changes.insert("refunded".into(), json!(refunded + amount == total));
    let (charge, previous) = state.update(&charge_id, changes);
    state.emit("refund.created", &refund, None, now);
    state.emit("charge.refunded", &charge, Some(previous), now);
    Ok(refund)
}

pub fn get_refund(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("refund", ctx.id(), "refund")
}

pub fn list_refunds(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before", "charge", "payment_intent"])?;
    let charge = p.nonempty("charge")?.map(str::to_owned);
    let pi = p.nonempty("payment_intent")?.map(str::to_owned);
    list_of(state, p, "refund", "/v1/refunds", |o| {
        charge.as_ref().is_none_or(|c| o["charge"] == c.as_str())
            && pi.as_ref().is_none_or(|c| o["payment_intent"] == c.as_str())
    })
}

// ---- disputes ----

pub fn get_dispute(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("dispute", ctx.id(), "dispute")
}

pub fn list_disputes(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before", "charge", "payment_intent"])?;
    let charge = p.nonempty("charge")?.map(str::to_owned);
    list_of(state, p, "dispute", "/v1/disputes", |o| {
        charge.as_ref().is_none_or(|c| o["charge"] == c.as_str())
    })
}

fn close(state: &mut State, id: &str, status: &str, now: i64) -> Value {
    let mut changes = Map::new();
    changes.insert("status".into(), json!(status));
    let (dispute, previous) = state.update(id, changes);
    state.emit("charge.dispute.closed", &dispute, Some(previous), now);
    dispute
}

/// Submitting evidence settles the dispute the way Stripe's test mode does:
/// `winning_evidence` wins it, `losing_evidence` loses it.
pub fn update_dispute(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["evidence", "metadata", "submit"])?;
    let current = state.fetch("dispute", ctx.id(), "dispute")?;
    if matches!(current["status"].as_str(), Some("won" | "lost")) {
        return Err(StripeError::invalid(format!("Dispute {} is already closed.", ctx.id())));
    }
    let now = state.now_for_customer(None);
    let mut changes = Map::new();
    let mut outcome = None;
    if let Some(evidence) = p.object("evidence")? {
        let text = evidence.nonempty("uncategorized_text")?.map(str::to_owned);
        let mut ev = current["evidence"].clone();
        ev["uncategorized_text"] = json!(text);
        changes.insert("evidence".into(), ev);
        outcome = match text.as_deref() {
            Some("winning_evidence") => Some("won"),
            Some("losing_evidence") => Some("lost"),
            _ => None,
        };
        if outcome.is_none() {
            changes.insert("status".into(), json!("under_review"));
        }
    }
    if let Some(meta) = p.metadata("metadata")? {
        changes.insert("metadata".into(), merge_metadata(&current["metadata"], meta));
    }
    let (dispute, previous) = state.update(ctx.id(), changes);
    state.emit("charge.dispute.updated", &dispute, Some(previous), now);
    Ok(match outcome {
        Some(status) => close(state, ctx.id(), status, now),
        None => dispute,
    })
}

/// Accepting the dispute: it is lost.
pub fn close_dispute(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    let current = state.fetch("dispute", ctx.id(), "dispute")?;
    if matches!(current["status"].as_str(), Some("won" | "lost")) {
        return Err(StripeError::invalid(format!("Dispute {} is already closed.", ctx.id())));
    }
    let now = state.now_for_customer(None);
    Ok(close(state, ctx.id(), "lost", now))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn luhn_accepts_stripe_test_cards_and_rejects_typos() {
        for n in [
            "4242424242424242",
            "4000000000000002",
            "4000000000000341",
            "4000000000000259",
            "5555555555554444",
        ] {
            assert!(valid_card_number(n), "{n}");
        }
        for n in ["4242424242424241", "1234", "42424242424242424242", "4242-4242-4242-4242"] {
            assert!(!valid_card_number(n), "{n}");
        }
    }
}
