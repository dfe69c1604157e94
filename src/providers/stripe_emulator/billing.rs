//! Subscriptions, invoices, renewals, test clocks and the billing portal.
//!
//! Time for a customer on a test clock is the clock's frozen time; advancing
//! the clock replays everything due in between in time order: trial-end
//! notices, renewals, payment retries, cancellations at period end. Failed
//! payments follow Stripe's default: the subscription goes `past_due`, the
//! invoice is retried 3, 5 and 7 days apart, and after the last failure the
//! subscription is canceled.

use serde_json::{json, Map, Value};
use time::OffsetDateTime;

use super::error::{StripeError, StripeResult};
use super::objects::{list_of, merge_metadata};
use super::params::Params;
use super::payments::{self, ChargeRequest};
use super::state::{new_id, real_now, State};
use super::Ctx;

/// Days between payment retries after a renewal fails.
const RETRY_DAYS: [i64; 3] = [3, 5, 7];

/// `ts` moved forward by `count` intervals, by the calendar (a month from
/// 31 January is the last day of February, as Stripe bills).
pub fn add_interval(ts: i64, interval: &str, count: i64) -> i64 {
    let Ok(start) = OffsetDateTime::from_unix_timestamp(ts) else { return ts };
    let months = match interval {
        "day" => return ts + 86_400 * count,
        "week" => return ts + 7 * 86_400 * count,
        "month" => count,
        "year" => 12 * count,
        _ => return ts,
    };
    let total = i64::from(start.year()) * 12 + i64::from(u8::from(start.month())) - 1 + months;
    let (year, month0) = (total.div_euclid(12) as i32, total.rem_euclid(12) as u8);
    let Ok(month) = time::Month::try_from(month0 + 1) else { return ts };
    let last_day = month.length(year);
    let day = start.day().min(last_day);
    time::Date::from_calendar_date(year, month, day)
        .map(|d| d.with_time(start.time()).assume_utc().unix_timestamp())
        .unwrap_or(ts)
}

fn price_interval(price: &Value) -> (String, i64) {
    (
        price["recurring"]["interval"].as_str().unwrap_or("month").to_owned(),
        price["recurring"]["interval_count"].as_i64().unwrap_or(1),
    )
}

/// A price object and how many of it.
pub type PricedQuantity = (Value, i64);

pub struct NewSubscription<'a> {
    pub customer: &'a str,
    pub items: Vec<PricedQuantity>,
    pub trial_days: Option<i64>,
    pub metadata: Value,
    pub payment_method: &'a str,
    pub now: i64,
}

/// Creates a subscription and its first invoice, paid with the payment
/// method (nothing is charged during a trial).
pub fn start_subscription(state: &mut State, new: NewSubscription<'_>) -> StripeResult<(Value, Value)> {
    let sub_id = new_id("sub");
    let now = new.now;
    // One-time prices in a subscription checkout are billed once, on the
    // first invoice; only recurring prices become subscription items.
    let (recurring, one_time): (Vec<PricedQuantity>, Vec<PricedQuantity>) =
        new.items.into_iter().partition(|(price, _)| !price["recurring"].is_null());
    let first_price = recurring.first().map(|(p, _)| p.clone()).unwrap_or(Value::Null);
    let (interval, count) = price_interval(&first_price);
    let trial_end = new.trial_days.map(|d| now + d * 86_400);
    let period_end = trial_end.unwrap_or_else(|| add_interval(now, &interval, count));
    let items: Vec<Value> = recurring
        .iter()
        .map(|(price, quantity)| {
            json!({
                "id": new_id("si"),
                "object": "subscription_item",
                "created": now,
                "current_period_end": period_end,
                "current_period_start": now,
                "discounts": [],
                "metadata": {},
                "price": price,
                "quantity": quantity,
                "subscription": sub_id,
                "tax_rates": [],
            })
        })
        .collect();
    let clock = state.get(new.customer).map(|c| c["test_clock"].clone()).unwrap_or(Value::Null);
    let subscription = json!({
        "id": sub_id,
        "object": "subscription",
        "application": null,
        "billing_cycle_anchor": trial_end.unwrap_or(now),
        "cancel_at": null,
        "cancel_at_period_end": false,
        "canceled_at": null,
        "cancellation_details": { "comment": null, "feedback": null, "reason": null },
        "collection_method": "charge_automatically",
        "created": now,
        "currency": first_price["currency"],
        "customer": new.customer,
        "default_payment_method": new.payment_method,
        "description": null,
        "discounts": [],
        "ended_at": null,
        "items": { "object": "list", "data": items, "has_more": false, "total_count": recurring.len(), "url": format!("/v1/subscription_items?subscription={sub_id}") },
        "latest_invoice": null,
        "livemode": false,
        "metadata": new.metadata,
        "pause_collection": null,
        "start_date": now,
        "status": if trial_end.is_some() { "trialing" } else { "incomplete" },
        "test_clock": clock,
        "trial_end": trial_end,
        "trial_settings": { "end_behavior": { "missing_payment_method": "create_invoice" } },
        "trial_start": trial_end.map(|_| now),
    });
    state.insert(subscription);
    // The card becomes the customer's default, as Checkout does.
    if let Some(customer) = state.get_mut(new.customer) {
        customer["invoice_settings"]["default_payment_method"] = json!(new.payment_method);
    }
    let mut lines = period_lines(state, &sub_id, now, period_end, trial_end.is_some());
    for (price, quantity) in &one_time {
        let unit = price["unit_amount"].as_i64().unwrap_or(0);
        let name = price["product"]
            .as_str()
            .and_then(|p| state.get(p))
            .and_then(|p| p["name"].as_str())
            .unwrap_or("");
        lines.push(json!({
            "id": new_id("il"),
            "object": "line_item",
            "amount": unit * quantity,
            "currency": price["currency"],
            "description": format!("{quantity} × {name}"),
            "livemode": false,
            "metadata": {},
            "parent": null,
            "period": { "end": now, "start": now },
            "pricing": { "price_details": { "price": price["id"], "product": price["product"] }, "type": "price_details" },
            "quantity": quantity,
        }));
    }
    let invoice = create_invoice(state, &sub_id, "subscription_create", lines, now);
    let invoice_id = invoice["id"].as_str().unwrap_or_default().to_owned();
    let mut changes = Map::new();
    changes.insert("latest_invoice".into(), json!(invoice_id));
    state.update(&sub_id, changes);
    let paid = pay_invoice_now(state, &invoice_id, now);
    if let Err(decline) = paid {
        state.remove(&sub_id);
        return Err(decline);
    }
    if trial_end.is_none() {
        let mut changes = Map::new();
        changes.insert("status".into(), json!("active"));
        state.update(&sub_id, changes);
    }
    let subscription = state.get(&sub_id).cloned().unwrap_or(Value::Null);
    state.emit("customer.subscription.created", &subscription, None, now);
    let invoice = state.get(&invoice_id).cloned().unwrap_or(Value::Null);
    Ok((subscription, invoice))
}

/// One invoice line per subscription item for a period (zero during a trial).
fn period_lines(state: &State, sub_id: &str, start: i64, end: i64, trial: bool) -> Vec<Value> {
    let Some(sub) = state.get(sub_id) else { return Vec::new() };
    sub["items"]["data"]
        .as_array()
        .map(|items| {
            items
                .iter()
                .map(|item| {
                    let quantity = item["quantity"].as_i64().unwrap_or(1);
                    let unit = item["price"]["unit_amount"].as_i64().unwrap_or(0);
                    let amount = if trial { 0 } else { unit * quantity };
                    let name = item["price"]["product"].as_str().and_then(|p| state.get(p)).and_then(|p| p["name"].as_str()).unwrap_or("");
                    json!({
                        "id": new_id("il"),
                        "object": "line_item",
                        "amount": amount,
                        "currency": item["price"]["currency"],
                        "description": if trial { format!("Trial period for {name}") } else { format!("{quantity} × {name}") },
                        "discount_amounts": [],
                        "discountable": true,
                        "livemode": false,
                        "metadata": {},
                        "parent": {
                            "subscription_item_details": { "proration": false, "subscription": sub_id, "subscription_item": item["id"] },
                            "type": "subscription_item_details",
                        },
                        "period": { "end": end, "start": start },
                        "pricing": { "price_details": { "price": item["price"]["id"], "product": item["price"]["product"] }, "type": "price_details", "unit_amount_decimal": unit.to_string() },
                        "quantity": quantity,
                    })
                })
                .collect()
        })
        .unwrap_or_default()
}

/// Creates and finalises an invoice for a subscription.
fn create_invoice(state: &mut State, sub_id: &str, reason: &str, mut lines: Vec<Value>, now: i64) -> Value {
    let sub = state.get(sub_id).cloned().unwrap_or(Value::Null);
    lines.extend(state.pending_invoice_items.remove(sub_id).unwrap_or_default());
    let total: i64 = lines.iter().filter_map(|l| l["amount"].as_i64()).sum();
    let customer_id = sub["customer"].as_str().unwrap_or_default().to_owned();
    let customer = state.get(&customer_id).cloned().unwrap_or(Value::Null);
    // A credit on the customer's balance (from downgrades) pays first.
    let balance = customer["balance"].as_i64().unwrap_or(0);
    let applied = if balance < 0 { (-balance).min(total.max(0)) } else { 0 };
    let due = (total - applied).max(0);
    let leftover_credit = if total < 0 { balance + total } else { balance + applied };
    if leftover_credit != balance {
        if let Some(c) = state.get_mut(&customer_id) {
            c["balance"] = json!(leftover_credit);
        }
    }
    let count = state.all("invoice").iter().filter(|i| i["customer"] == customer_id.as_str()).count() + 1;
    let id = new_id("in");
    let invoice = json!({
        "id": id,
        "object": "invoice",
        "account_country": "US",
        "account_name": "tollgate emulator",
        "amount_due": due,
        "amount_paid": 0,
        "amount_remaining": due,
        "attempt_count": 0,
        "attempted": false,
        "auto_advance": true,
        "billing_reason": reason,
        "collection_method": "charge_automatically",
        "created": now,
        "currency": sub["currency"],
        "customer": customer_id,
        "customer_email": customer["email"],
        "customer_name": customer["name"],
        "default_payment_method": null,
        "description": null,
        "discounts": [],
        "due_date": null,
        "effective_at": now,
        "ending_balance": leftover_credit.min(0),
        "hosted_invoice_url": null,
        "lines": { "object": "list", "data": lines, "has_more": false, "total_count": lines.len(), "url": format!("/v1/invoices/{id}/lines") },
        "livemode": false,
        "metadata": {},
        "next_payment_attempt": null,
        "number": format!("{}-{count:04}", customer["invoice_prefix"].as_str().unwrap_or("EMU")),
        "parent": {
            "quote_details": null,
            "subscription_details": { "metadata": sub["metadata"], "subscription": sub_id },
            "type": "subscription_details",
        },
        "payments": { "object": "list", "data": [], "has_more": false, "url": format!("/v1/invoice_payments?invoice={id}") },
        // As on Stripe: an invoice's own period is the one that just ended
        // (its lines cover what is billed next).
        "period_end": now,
        "period_start": if reason == "subscription_cycle" { sub["_previous_period_start"].as_i64().unwrap_or(now) } else { now },
        "starting_balance": balance.min(0),
        "status": "open",
        "status_transitions": { "finalized_at": now, "marked_uncollectible_at": null, "paid_at": null, "voided_at": null },
        "subtotal": total,
        "test_clock": sub["test_clock"],
        "total": total,
    });
    let mut draft = invoice.clone();
    draft["status"] = json!("draft");
    draft["status_transitions"]["finalized_at"] = Value::Null;
    state.insert(invoice.clone());
    state.emit("invoice.created", &draft, None, now);
    state.emit("invoice.finalized", &invoice, None, now);
    invoice
}

/// Tries to collect an open invoice with the customer's default card.
fn pay_invoice_now(state: &mut State, invoice_id: &str, now: i64) -> StripeResult<Value> {
    let invoice = state.fetch("invoice", invoice_id, "invoice")?;
    let due = invoice["amount_due"].as_i64().unwrap_or(0);
    let attempts = invoice["attempt_count"].as_i64().unwrap_or(0);
    let mut changes = Map::new();
    if due == 0 {
        changes.insert("status".into(), json!("paid"));
        changes.insert("status_transitions".into(), {
            let mut t = invoice["status_transitions"].clone();
            t["paid_at"] = json!(now);
            t
        });
        let (invoice, _) = state.update(invoice_id, changes);
        state.emit("invoice.paid", &invoice, None, now);
        state.emit("invoice.payment_succeeded", &invoice, None, now);
        return Ok(invoice);
    }
    let sub_id =
        invoice["parent"]["subscription_details"]["subscription"].as_str().unwrap_or_default().to_owned();
    let customer = invoice["customer"].as_str().unwrap_or_default().to_owned();
    let pm = state
        .get(&sub_id)
        .and_then(|s| s["default_payment_method"].as_str())
        .or_else(|| {
            state.get(&customer).and_then(|c| c["invoice_settings"]["default_payment_method"].as_str())
        })
        .map(str::to_owned)
        .ok_or_else(|| StripeError::invalid("The customer has no default payment method."))?;
    let charged = payments::charge(
        state,
        ChargeRequest {
            customer: Some(&customer),
            payment_method: &pm,
            amount: due,
            currency: invoice["currency"].as_str().unwrap_or("usd"),
            description: Some(format!("Invoice {}", invoice["number"].as_str().unwrap_or(""))),
            metadata: json!({}),
            now,
        },
    );
    let mut payments_list = invoice["payments"].clone();
    if let Some(data) = payments_list["data"].as_array_mut() {
        data.push(json!({
            "id": new_id("inpay"),
            "object": "invoice_payment",
            "amount_paid": if charged.declined.is_none() { due } else { 0 },
            "amount_requested": due,
            "created": now,
            "currency": invoice["currency"],
            "invoice": invoice_id,
            "is_default": true,
            "livemode": false,
            "payment": { "payment_intent": charged.payment_intent["id"], "type": "payment_intent" },
            "status": if charged.declined.is_none() { "paid" } else { "open" },
        }));
    }
    changes.insert("payments".into(), payments_list);
    changes.insert("attempt_count".into(), json!(attempts + 1));
    changes.insert("attempted".into(), json!(true));
    match charged.declined {
        None => {
            changes.insert("status".into(), json!("paid"));
            changes.insert("amount_paid".into(), json!(due));
            changes.insert("amount_remaining".into(), json!(0));
            changes.insert("next_payment_attempt".into(), Value::Null);
            let mut t = invoice["status_transitions"].clone();
            t["paid_at"] = json!(now);
            changes.insert("status_transitions".into(), t);
            let (invoice, _) = state.update(invoice_id, changes);
            state.emit("invoice.paid", &invoice, None, now);
            state.emit("invoice.payment_succeeded", &invoice, None, now);
            Ok(invoice)
        }
        Some(decline) => {
            let next = RETRY_DAYS.get(attempts as usize).map(|d| now + d * 86_400);
            changes.insert("next_payment_attempt".into(), json!(next));
            let (invoice, _) = state.update(invoice_id, changes);
            state.emit("invoice.payment_failed", &invoice, None, now);
            Err(decline)
        }
    }
}

fn set_status(state: &mut State, sub_id: &str, status: &str, now: i64) {
    let mut changes = Map::new();
    changes.insert("status".into(), json!(status));
    let (sub, previous) = state.update(sub_id, changes);
    if previous.as_object().is_some_and(|m| !m.is_empty()) {
        state.emit("customer.subscription.updated", &sub, Some(previous), now);
    }
}

/// Ends a subscription now, with Stripe's `customer.subscription.deleted`.
pub fn end_subscription(state: &mut State, sub_id: &str, now: i64, reason: &str) -> Value {
    let current = state.get(sub_id).cloned().unwrap_or(Value::Null);
    let mut changes = Map::new();
    changes.insert("status".into(), json!("canceled"));
    changes.insert("canceled_at".into(), current["canceled_at"].as_i64().map_or(json!(now), |t| json!(t)));
    changes.insert("ended_at".into(), json!(now));
    changes.insert("cancel_at_period_end".into(), json!(false));
    let mut details = current["cancellation_details"].clone();
    details["reason"] = json!(reason);
    changes.insert("cancellation_details".into(), details);
    let (sub, _) = state.update(sub_id, changes);
    state.emit("customer.subscription.deleted", &sub, None, now);
    sub
}

/// Starts the next period: a renewal invoice, paid with the default card.
fn renew(state: &mut State, sub_id: &str, at: i64) {
    let sub = state.get(sub_id).cloned().unwrap_or(Value::Null);
    if sub["cancel_at_period_end"] == true {
        end_subscription(state, sub_id, at, "cancellation_requested");
        return;
    }
    let first = &sub["items"]["data"][0];
    let (interval, count) = price_interval(&first["price"]);
    let start = first["current_period_end"].as_i64().unwrap_or(at);
    let end = add_interval(start, &interval, count);
    let previous_status = sub["status"].as_str().unwrap_or("").to_owned();
    let mut items = sub["items"].clone();
    if let Some(data) = items["data"].as_array_mut() {
        for item in data {
            item["current_period_start"] = json!(start);
            item["current_period_end"] = json!(end);
        }
    }
    let mut changes = Map::new();
    changes.insert("items".into(), items);
    changes.insert("_previous_period_start".into(), first["current_period_start"].clone());
    state.update(sub_id, changes);
    let lines = period_lines(state, sub_id, start, end, false);
    let invoice = create_invoice(state, sub_id, "subscription_cycle", lines, at);
    let invoice_id = invoice["id"].as_str().unwrap_or_default().to_owned();
    let mut changes = Map::new();
    changes.insert("latest_invoice".into(), json!(invoice_id));
    let paid = pay_invoice_now(state, &invoice_id, at).is_ok();
    let status = if paid { "active" } else { "past_due" };
    changes.insert("status".into(), json!(status));
    let (sub, mut previous) = state.update(sub_id, changes);
    if previous_status != status {
        previous["status"] = json!(previous_status);
    }
    previous["items"] = json!({ "data": [{ "current_period_start": first["current_period_start"], "current_period_end": first["current_period_end"] }] });
    state.emit("customer.subscription.updated", &sub, Some(previous), at);
}

/// What is due next for the customers on a clock, earliest first.
enum Due {
    TrialWillEnd(String),
    Renewal(String),
    Retry(String),
}

fn next_due(state: &State, clock: &str, from: i64, until: i64) -> Option<(i64, Due)> {
    let customers: Vec<&str> = state
        .all("customer")
        .into_iter()
        .filter(|c| c["test_clock"] == clock)
        .filter_map(|c| c["id"].as_str())
        .collect();
    let mut best: Option<(i64, Due)> = None;
    let mut consider = |at: i64, due: Due| {
        if at <= until && best.as_ref().is_none_or(|(b, _)| at < *b) {
            best = Some((at, due));
        }
    };
    for sub in state.all("subscription") {
        if !customers.iter().any(|c| sub["customer"] == *c) {
            continue;
        }
        let id = sub["id"].as_str().unwrap_or_default().to_owned();
        match sub["status"].as_str() {
            Some("trialing") => {
                let trial_end = sub["trial_end"].as_i64().unwrap_or(i64::MAX);
                let notice = trial_end - 3 * 86_400;
                if notice > from && sub["_trial_notice_sent"] != true {
                    consider(notice, Due::TrialWillEnd(id.clone()));
                }
                consider(
                    sub["items"]["data"][0]["current_period_end"].as_i64().unwrap_or(i64::MAX),
                    Due::Renewal(id),
                );
            }
            Some("active") => {
                consider(
                    sub["items"]["data"][0]["current_period_end"].as_i64().unwrap_or(i64::MAX),
                    Due::Renewal(id),
                );
            }
            Some("past_due") => {
                let invoice = sub["latest_invoice"].as_str().and_then(|i| state.get(i));
                if let Some(at) =
                    invoice.filter(|i| i["status"] == "open").and_then(|i| i["next_payment_attempt"].as_i64())
                {
                    consider(at, Due::Retry(id));
                }
            }
            _ => {}
        }
    }
    best
}

/// Moves a clock to `target`, running everything due on the way.
fn advance(state: &mut State, clock_id: &str, target: i64) {
    let mut now = state.get(clock_id).and_then(|c| c["frozen_time"].as_i64()).unwrap_or_else(real_now);
    // Bounded: a clock cannot make more than a few thousand things happen.
    for _ in 0..10_000 {
        let Some((at, due)) = next_due(state, clock_id, now, target) else { break };
        now = at.max(now);
        if let Some(clock) = state.get_mut(clock_id) {
            clock["frozen_time"] = json!(now);
        }
        match due {
            Due::TrialWillEnd(sub) => {
                if let Some(s) = state.get_mut(&sub) {
                    s["_trial_notice_sent"] = json!(true);
                }
                let s = state.get(&sub).cloned().unwrap_or(Value::Null);
                state.emit("customer.subscription.trial_will_end", &s, None, now);
            }
            Due::Renewal(sub) => {
                let before = state.get(&sub).map(|s| s["items"]["data"][0]["current_period_end"].clone());
                renew(state, &sub, now);
                let after = state.get(&sub).map(|s| s["items"]["data"][0]["current_period_end"].clone());
                let ended = state.get(&sub).is_some_and(|s| s["status"] == "canceled");
                if before == after && !ended {
                    // A period that does not move would renew forever.
                    tracing::warn!(subscription = %sub, "renewal did not advance the period; stopping the clock here");
                    break;
                }
            }
            Due::Retry(sub) => {
                let invoice =
                    state.get(&sub).and_then(|s| s["latest_invoice"].as_str()).unwrap_or_default().to_owned();
                match pay_invoice_now(state, &invoice, now) {
                    Ok(_) => set_status(state, &sub, "active", now),
                    Err(_) => {
                        let exhausted =
                            state.get(&invoice).is_some_and(|i| i["next_payment_attempt"].is_null());
                        if exhausted {
                            end_subscription(state, &sub, now, "payment_failed");
                        }
                    }
                }
            }
        }
    }
    if let Some(clock) = state.get_mut(clock_id) {
        clock["frozen_time"] = json!(target);
    }
}

// ---- API: subscriptions ----

pub fn get_subscription(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("subscription", ctx.id(), "id")
}

pub fn list_subscriptions(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before", "customer", "status", "price", "test_clock"])?;
    let customer = p.nonempty("customer")?.map(str::to_owned);
    let status = p.nonempty("status")?.map(str::to_owned);
    let price = p.nonempty("price")?.map(str::to_owned);
    let listed = list_of(state, p, "subscription", "/v1/subscriptions", |s| {
        customer.as_ref().is_none_or(|c| s["customer"] == c.as_str())
            && match status.as_deref() {
                // Stripe's default hides canceled subscriptions.
                None => s["status"] != "canceled",
                Some("all") => true,
                Some(st) => s["status"] == st,
            }
            && price.as_ref().is_none_or(|pr| {
                s["items"]["data"]
                    .as_array()
                    .is_some_and(|items| items.iter().any(|i| i["price"]["id"] == pr.as_str()))
            })
    })?;
    Ok(listed)
}

/// Changes price, quantity, cancellation or metadata, with Stripe's
/// proration behaviours.
pub fn update_subscription(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "items",
        "proration_behavior",
        "cancel_at_period_end",
        "metadata",
        "default_payment_method",
        "description",
    ])?;
    let sub = state.fetch("subscription", ctx.id(), "id")?;
    if matches!(sub["status"].as_str(), Some("canceled" | "incomplete_expired")) {
        return Err(StripeError::invalid(format!(
            "A canceled subscription can only update its cancellation_details and metadata. ({})",
            ctx.id()
        )));
    }
    let customer = sub["customer"].as_str().unwrap_or_default().to_owned();
    let now = state.now_for_customer(Some(&customer));
    let proration = p.nonempty("proration_behavior")?.unwrap_or("create_prorations");
    if !["create_prorations", "none", "always_invoice"].contains(&proration) {
        return Err(StripeError::param(
            "proration_behavior",
            format!("Invalid proration_behavior: {proration}"),
        ));
    }
    let mut changes = Map::new();
    if let Some(flag) = p.bool("cancel_at_period_end")? {
        changes.insert("cancel_at_period_end".into(), json!(flag));
        let end = sub["items"]["data"][0]["current_period_end"].clone();
        changes.insert("cancel_at".into(), if flag { end } else { Value::Null });
        changes.insert("canceled_at".into(), if flag { json!(now) } else { Value::Null });
    }
    if let Some(meta) = p.metadata("metadata")? {
        changes.insert("metadata".into(), merge_metadata(&sub["metadata"], meta));
    }
    if let Some(pm) = p.nonempty("default_payment_method")? {
        state.fetch("payment_method", pm, "default_payment_method")?;
        changes.insert("default_payment_method".into(), json!(pm));
    }
    if let Some(d) = p.str("description")? {
        changes.insert("description".into(), json!(d));
    }
    match p.0.get("pause_collection") {
        None => {}
        Some(Value::String(s)) if s.is_empty() => {
            changes.insert("pause_collection".into(), Value::Null);
        }
        Some(_) => {
            let pc = p.object("pause_collection")?.unwrap_or_default();
            let behavior =
                pc.required("behavior").map_err(|_| StripeError::missing("pause_collection[behavior]"))?;
            if !["keep_as_draft", "mark_uncollectible", "void"].contains(&behavior) {
                return Err(StripeError::param(
                    "pause_collection[behavior]",
                    format!("Invalid behavior: {behavior}"),
                ));
            }
            changes.insert(
                "pause_collection".into(),
                json!({ "behavior": behavior, "resumes_at": pc.int("resumes_at")? }),
            );
        }
    }
    let item_changes = p.array("items")?;
    let mut proration_lines = Vec::new();
    if !item_changes.is_empty() {
        let mut items = sub["items"].clone();
        for (i, raw) in item_changes.into_iter().enumerate() {
            let change = Params::new(raw);
            change.allow(&["id", "price", "quantity"])?;
            let data = items["data"].as_array_mut().expect("items list");
            let index = match change.nonempty("id")? {
                Some(id) => data.iter().position(|it| it["id"] == id).ok_or_else(|| {
                    StripeError::no_such("subscription item", id, &format!("items[{i}][id]"))
                })?,
                // Stripe adds an item when no id is given; the emulator
                // supports changing existing items only, and says so.
                None => {
                    return Err(StripeError::param(
                        &format!("items[{i}][id]"),
                        "The emulator changes existing subscription items only: pass items[][id].",
                    ))
                }
            };
            let old = data[index].clone();
            let new_price = match change.nonempty("price")? {
                Some(price_id) => {
                    let price = state.fetch("price", price_id, &format!("items[{i}][price]"))?;
                    if price["recurring"].is_null() {
                        return Err(StripeError::param(
                            &format!("items[{i}][price]"),
                            "The price must be recurring.",
                        ));
                    }
                    if price["currency"] != sub["currency"] {
                        return Err(StripeError::param(
                            &format!("items[{i}][price]"),
                            "The price must be in the subscription's currency.",
                        ));
                    }
                    price
                }
                None => old["price"].clone(),
            };
            let quantity = change.int("quantity")?.unwrap_or(old["quantity"].as_i64().unwrap_or(1));
            if !(1..=999_999).contains(&quantity) {
                return Err(StripeError::param(
                    &format!("items[{i}][quantity]"),
                    "Quantity must be between 1 and 999999.",
                ));
            }
            let old_total =
                old["price"]["unit_amount"].as_i64().unwrap_or(0) * old["quantity"].as_i64().unwrap_or(1);
            let new_total = new_price["unit_amount"].as_i64().unwrap_or(0) * quantity;
            let (start, end) = (
                old["current_period_start"].as_i64().unwrap_or(now),
                old["current_period_end"].as_i64().unwrap_or(now),
            );
            if proration != "none" && sub["status"] != "trialing" && end > start && new_total != old_total {
                let remaining = (end - now).max(0) as f64 / (end - start) as f64;
                let amount = ((new_total - old_total) as f64 * remaining).round() as i64;
                proration_lines.push(json!({
                    "id": new_id("il"),
                    "object": "line_item",
                    "amount": amount,
                    "currency": sub["currency"],
                    "description": if amount >= 0 { "Remaining time on the new plan" } else { "Unused time on the previous plan" },
                    "livemode": false,
                    "metadata": {},
                    "parent": {
                        "subscription_item_details": { "proration": true, "subscription": ctx.id(), "subscription_item": old["id"] },
                        "type": "subscription_item_details",
                    },
                    "period": { "end": end, "start": now },
                    "pricing": { "price_details": { "price": new_price["id"], "product": new_price["product"] }, "type": "price_details" },
                    "quantity": quantity,
                }));
            }
            data[index]["price"] = new_price;
            data[index]["quantity"] = json!(quantity);
        }
        changes.insert("items".into(), items);
    }
    let (updated, previous) = state.update(ctx.id(), changes);
    if !proration_lines.is_empty() {
        match proration {
            "always_invoice" => {
                let invoice = create_invoice(state, ctx.id(), "subscription_update", proration_lines, now);
                let invoice_id = invoice["id"].as_str().unwrap_or_default().to_owned();
                let mut changes = Map::new();
                changes.insert("latest_invoice".into(), json!(invoice_id));
                state.update(ctx.id(), changes);
                if pay_invoice_now(state, &invoice_id, now).is_err() {
                    set_status(state, ctx.id(), "past_due", now);
                }
            }
            _ => state.pending_invoice_items.entry(ctx.id().to_owned()).or_default().extend(proration_lines),
        }
    }
    let updated = state.get(ctx.id()).cloned().unwrap_or(updated);
    if previous.as_object().is_some_and(|m| !m.is_empty()) {
        state.emit("customer.subscription.updated", &updated, Some(previous), now);
    }
    Ok(updated)
}

/// `DELETE /v1/subscriptions/{id}`: cancels at once.
pub fn cancel_subscription(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["prorate"])?;
    let sub = state.fetch("subscription", ctx.id(), "id")?;
    if sub["status"] == "canceled" {
        return Err(StripeError::invalid(format!(
            "No such subscription: '{}' is already canceled.",
            ctx.id()
        )));
    }
    let now = state.now_for_customer(sub["customer"].as_str());
    Ok(end_subscription(state, ctx.id(), now, "cancellation_requested"))
}

/// Resumes a paused subscription.
pub fn resume_subscription(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["billing_cycle_anchor", "proration_behavior"])?;
    let sub = state.fetch("subscription", ctx.id(), "id")?;
    if sub["status"] != "paused" {
        return Err(StripeError::invalid("Only subscriptions with status `paused` can be resumed."));
    }
    let now = state.now_for_customer(sub["customer"].as_str());
    let mut changes = Map::new();
    changes.insert("status".into(), json!("active"));
    let (sub, previous) = state.update(ctx.id(), changes);
    state.emit("customer.subscription.resumed", &sub, None, now);
    state.emit("customer.subscription.updated", &sub, Some(previous), now);
    Ok(sub)
}

// ---- API: invoices ----

pub fn get_invoice(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("invoice", ctx.id(), "invoice")
}

pub fn list_invoices(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before", "customer", "subscription", "status"])?;
    let customer = p.nonempty("customer")?.map(str::to_owned);
    let sub = p.nonempty("subscription")?.map(str::to_owned);
    let status = p.nonempty("status")?.map(str::to_owned);
    list_of(state, p, "invoice", "/v1/invoices", |i| {
        customer.as_ref().is_none_or(|c| i["customer"] == c.as_str())
            && sub.as_ref().is_none_or(|s| i["parent"]["subscription_details"]["subscription"] == s.as_str())
            && status.as_ref().is_none_or(|s| i["status"] == s.as_str())
    })
}

/// Collects an open invoice now; a success brings a past-due subscription back.
pub fn pay_invoice(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["payment_method"])?;
    let invoice = state.fetch("invoice", ctx.id(), "invoice")?;
    if invoice["status"] != "open" {
        return Err(StripeError::invalid(format!(
            "Invoice is already {}.",
            invoice["status"].as_str().unwrap_or("")
        )));
    }
    let customer = invoice["customer"].as_str().unwrap_or_default().to_owned();
    let sub_id =
        invoice["parent"]["subscription_details"]["subscription"].as_str().unwrap_or_default().to_owned();
    if let Some(pm) = p.nonempty("payment_method")? {
        state.fetch("payment_method", pm, "payment_method")?;
        if let Some(s) = state.get_mut(&sub_id) {
            s["default_payment_method"] = json!(pm);
        }
    }
    let now = state.now_for_customer(Some(&customer));
    let paid = pay_invoice_now(state, ctx.id(), now)?;
    if state.get(&sub_id).is_some_and(|s| s["status"] == "past_due") {
        set_status(state, &sub_id, "active", now);
    }
    Ok(paid)
}

// ---- API: test clocks ----

/// Stripe's range for timestamps: the year 1970 to 9999.
const MAX_TIMESTAMP: i64 = 253_402_300_799;

fn clock_time(p: &Params) -> StripeResult<i64> {
    let t = p.int("frozen_time")?.ok_or_else(|| StripeError::missing("frozen_time"))?;
    if (0..=MAX_TIMESTAMP).contains(&t) {
        Ok(t)
    } else {
        Err(StripeError::param(
            "frozen_time",
            "frozen_time must be a Unix timestamp in seconds between 1970 and 9999.",
        ))
    }
}

pub fn create_clock(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["frozen_time", "name"])?;
    let frozen = clock_time(p)?;
    let now = real_now();
    Ok(state.insert(json!({
        "id": new_id("clock"),
        "object": "test_helpers.test_clock",
        "created": now,
        "deletes_after": now + 30 * 86_400,
        "frozen_time": frozen,
        "livemode": false,
        "name": p.nonempty("name")?,
        "status": "ready",
        "status_details": {},
    })))
}

pub fn get_clock(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("test_helpers.test_clock", ctx.id(), "test_clock")
}

pub fn list_clocks(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before"])?;
    list_of(state, p, "test_helpers.test_clock", "/v1/test_helpers/test_clocks", |_| true)
}

pub fn delete_clock(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("test_helpers.test_clock", ctx.id(), "test_clock")?;
    state.remove(ctx.id());
    Ok(json!({ "id": ctx.id(), "object": "test_helpers.test_clock", "deleted": true }))
}

/// Advances the clock, running renewals, retries and notices on the way;
/// Stripe does this asynchronously, the emulator before answering (the
/// clock is already `ready` in the response).
pub fn advance_clock(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["frozen_time"])?;
    let clock = state.fetch("test_helpers.test_clock", ctx.id(), "test_clock")?;
    let target = clock_time(p)?;
    let current = clock["frozen_time"].as_i64().unwrap_or(0);
    if target <= current {
        return Err(StripeError::param(
            "frozen_time",
            "The test clock can only be advanced to a time after its current frozen_time.",
        ));
    }
    let mut advancing = clock.clone();
    advancing["status"] = json!("advancing");
    state.emit("test_helpers.test_clock.advancing", &advancing, None, current);
    advance(state, ctx.id(), target);
    let clock = state.fetch("test_helpers.test_clock", ctx.id(), "test_clock")?;
    state.emit("test_helpers.test_clock.ready", &clock, None, target);
    Ok(clock)
}

// ---- API: billing portal ----

pub fn create_portal_session(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["customer", "return_url", "configuration", "locale", "flow_data"])?;
    let customer = p.required("customer")?;
    state.fetch("customer", customer, "customer")?;
    let id = new_id("bps");
    Ok(state.insert(json!({
        "id": id,
        "object": "billing_portal.session",
        "configuration": "bpc_emulator",
        "created": state.now_for_customer(Some(customer)),
        "customer": customer,
        "flow": null,
        "livemode": false,
        "locale": p.nonempty("locale")?,
        "on_behalf_of": null,
        "return_url": p.nonempty("return_url")?,
        "url": format!("{}/portal/{id}", ctx.public_url),
    })))
}

/// Cancels at period end, as the portal's default "Cancel plan" does.
pub fn portal_cancel(state: &mut State, sub_id: &str) -> StripeResult<Value> {
    let ctx = Ctx { version: String::new(), path: vec![sub_id.to_owned()], public_url: String::new() };
    update_subscription(state, &ctx, &Params::new(json!({ "cancel_at_period_end": "true" })))
}

/// Switches the plan with prorations, as the portal's "Update plan" does.
pub fn portal_switch(state: &mut State, sub_id: &str, price: &str) -> StripeResult<Value> {
    let ctx = Ctx { version: String::new(), path: vec![sub_id.to_owned()], public_url: String::new() };
    let item = state.fetch("subscription", sub_id, "subscription")?["items"]["data"][0]["id"].clone();
    update_subscription(
        state,
        &ctx,
        &Params::new(
            json!({ "items": [{ "id": item, "price": price }], "proration_behavior": "create_prorations" }),
        ),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn months_follow_the_calendar() {
        // 2024-01-31 → 2024-02-29 (leap year) → 2024-03-29
        let jan31 = 1_706_659_200;
        let feb = add_interval(jan31, "month", 1);
        assert_eq!(OffsetDateTime::from_unix_timestamp(feb).unwrap().date().to_string(), "2024-02-29");
        let year = add_interval(jan31, "year", 1);
        assert_eq!(OffsetDateTime::from_unix_timestamp(year).unwrap().date().to_string(), "2025-01-31");
        assert_eq!(add_interval(0, "week", 2), 14 * 86_400);
    }
}
