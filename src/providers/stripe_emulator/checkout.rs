//! Checkout sessions: a request to pay, completed on the hosted page.

use serde_json::{json, Map, Value};

use super::error::{StripeError, StripeResult};
use super::objects::list_of;
use super::params::Params;
use super::payments::{self, ChargeRequest};
use super::state::{new_id, State};
use super::{billing, Ctx};

const DEFAULT_LIFETIME: i64 = 24 * 3600;

/// Expires open sessions whose time is up, with Stripe's event.
pub fn expire_due(state: &mut State) {
    let due: Vec<(String, i64)> = state
        .all("checkout.session")
        .into_iter()
        .filter(|s| s["status"] == "open")
        .filter_map(|s| {
            let customer = s["customer"].as_str();
            let now = state.now_for_customer(customer);
            (s["expires_at"].as_i64().unwrap_or(i64::MAX) <= now)
                .then(|| (s["id"].as_str().unwrap_or("").to_owned(), now))
        })
        .collect();
    for (id, now) in due {
        expire(state, &id, now);
    }
}

fn expire(state: &mut State, id: &str, now: i64) -> Value {
    let mut changes = Map::new();
    changes.insert("status".into(), json!("expired"));
    changes.insert("url".into(), Value::Null);
    let (session, _) = state.update(id, changes);
    state.emit("checkout.session.expired", &session, None, now);
    session
}

fn with_line_items(state: &State, mut session: Value, p: &Params) -> Value {
    if p.expand().iter().any(|e| e == "line_items") {
        let id = session["id"].as_str().unwrap_or_default().to_owned();
        let items = state.line_items.get(&id).cloned().unwrap_or_default();
        session["line_items"] = json!({
            "object": "list", "data": items, "has_more": false,
            "url": format!("/v1/checkout/sessions/{id}/line_items"),
        });
    }
    session
}

pub fn create_session(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "mode",
        "line_items",
        "success_url",
        "cancel_url",
        "customer",
        "customer_email",
        "customer_creation",
        "client_reference_id",
        "metadata",
        "expires_at",
        "subscription_data",
        "payment_intent_data",
        "payment_method_types",
        "allow_promotion_codes",
        "billing_address_collection",
        "locale",
        "ui_mode",
    ])?;
    let mode = p.required("mode")?;
    if !["payment", "subscription"].contains(&mode) {
        return Err(StripeError::param(
            "mode",
            format!("The emulator supports mode `payment` and `subscription`, not `{mode}`."),
        ));
    }
    let success_url = p.required("success_url")?;
    let customer = p.nonempty("customer")?;
    if let Some(c) = customer {
        state.fetch("customer", c, "customer")?;
        if p.nonempty("customer_email")?.is_some() {
            return Err(StripeError::param(
                "customer_email",
                "You may only specify one of these parameters: customer, customer_email.",
            ));
        }
    }
    let now = state.now_for_customer(customer);
    let raw_items = p.array("line_items")?;
    if raw_items.is_empty() {
        return Err(StripeError::missing("line_items"));
    }
    let mut items = Vec::new();
    let mut currency: Option<String> = None;
    let mut interval: Option<(Value, Value)> = None;
    let mut subtotal = 0i64;
    for (i, raw) in raw_items.into_iter().enumerate() {
        let item = Params::new(raw);
        item.allow(&["price", "quantity"])
            .map_err(|e| StripeError { param: e.param.map(|x| format!("line_items[{i}][{x}]")), ..e })?;
        let param = format!("line_items[{i}][price]");
        let price_id = item.nonempty("price")?.ok_or_else(|| StripeError::missing(&param))?;
        let price = state.fetch("price", price_id, &param)?;
        if price["active"] != true {
            return Err(StripeError::param(&param, format!("The price specified ({price_id}) is inactive.")));
        }
        let quantity = item.int("quantity")?.unwrap_or(1);
        if !(1..=999_999).contains(&quantity) {
            return Err(StripeError::param(
                &format!("line_items[{i}][quantity]"),
                "Quantity must be between 1 and 999999.",
            ));
        }
        let price_currency = price["currency"].as_str().unwrap_or("usd").to_owned();
        if currency.get_or_insert_with(|| price_currency.clone()) != &price_currency {
            return Err(StripeError::param(&param, "All line items must be in the same currency."));
        }
        let recurring = !price["recurring"].is_null();
        if mode == "payment" && recurring {
            return Err(StripeError::param(
                &param,
                "You specified `payment` mode but passed a recurring price. Either switch to `subscription` mode or use only one-time prices.",
            ));
        }
        if recurring {
            let this = (price["recurring"]["interval"].clone(), price["recurring"]["interval_count"].clone());
            if interval.get_or_insert_with(|| this.clone()) != &this {
                return Err(StripeError::param(
                    &param,
                    "All recurring prices must have the same billing interval.",
                ));
            }
        }
        let unit = price["unit_amount"].as_i64().unwrap_or(0);
        let amount =
            unit.checked_mul(quantity).ok_or_else(|| StripeError::param(&param, "Amount too large."))?;
        subtotal =
            subtotal.checked_add(amount).ok_or_else(|| StripeError::param(&param, "Amount too large."))?;
        let product_name = price["product"]
            .as_str()
            .and_then(|id| state.get(id))
            .map(|p| p["name"].clone())
            .unwrap_or(Value::Null);
        items.push(json!({
            "id": new_id("li"),
            "object": "item",
            "amount_discount": 0,
            "amount_subtotal": amount,
            "amount_tax": 0,
            "amount_total": amount,
            "currency": price_currency,
            "description": product_name,
            "price": price,
            "quantity": quantity,
        }));
    }
    if mode == "subscription" && interval.is_none() {
        return Err(StripeError::param(
            "line_items",
            "You must provide at least one recurring price in `subscription` mode.",
        ));
    }
    let trial_days = match p.object("subscription_data")? {
        Some(sd) => {
            sd.allow(&["trial_period_days", "metadata", "description"])?;
            if mode != "subscription" {
                return Err(StripeError::param(
                    "subscription_data",
                    "subscription_data can only be used in `subscription` mode.",
                ));
            }
            match sd.int("trial_period_days")? {
                Some(d) if !(1..=730).contains(&d) => {
                    return Err(StripeError::param(
                        "subscription_data[trial_period_days]",
                        "trial_period_days must be between 1 and 730.",
                    ))
                }
                other => other,
            }
        }
        None => None,
    };
    let expires_at = match p.int("expires_at")? {
        Some(t) if t < now + 1800 || t > now + DEFAULT_LIFETIME => {
            return Err(StripeError::param(
                "expires_at",
                "expires_at must be between 30 minutes and 24 hours from now.",
            ))
        }
        Some(t) => t,
        None => now + DEFAULT_LIFETIME,
    };
    if p.nonempty("client_reference_id")?.is_some_and(|c| c.len() > 200) {
        return Err(StripeError::param(
            "client_reference_id",
            "client_reference_id must be at most 200 characters.",
        ));
    }
    let id = format!("cs_test_{}{}", &new_id("x")[2..], &new_id("x")[2..]);
    let session = json!({
        "id": id,
        "object": "checkout.session",
        "after_expiration": null,
        "allow_promotion_codes": null,
        "amount_subtotal": subtotal,
        "amount_total": subtotal,
        "automatic_tax": { "enabled": false, "liability": null, "status": null },
        "billing_address_collection": null,
        "cancel_url": p.nonempty("cancel_url")?,
        "client_reference_id": p.nonempty("client_reference_id")?,
        "client_secret": null,
        "created": now,
        "currency": currency,
        "customer": customer,
        "customer_creation": if customer.is_some() { Value::Null } else { json!(p.nonempty("customer_creation")?.unwrap_or(if mode == "payment" { "if_required" } else { "always" })) },
        "customer_details": null,
        "customer_email": p.nonempty("customer_email")?,
        "expires_at": expires_at,
        "invoice": null,
        "livemode": false,
        "locale": p.nonempty("locale")?,
        "metadata": p.metadata("metadata")?.unwrap_or_default(),
        "mode": mode,
        "payment_intent": null,
        "payment_method_types": ["card"],
        "payment_status": "unpaid",
        "status": "open",
        "submit_type": null,
        "subscription": null,
        "success_url": success_url,
        "total_details": { "amount_discount": 0, "amount_shipping": 0, "amount_tax": 0 },
        "ui_mode": "hosted",
        "url": format!("{}/checkout/{id}", ctx.public_url),
    });
    state.line_items.insert(id.clone(), items);
    // Kept for completion; not part of Stripe's object.
    let mut private = session.clone();
    private["_trial_days"] = json!(trial_days);
    private["_subscription_metadata"] = json!(p
        .object("subscription_data")?
        .map(|sd| sd.metadata("metadata"))
        .transpose()?
        .flatten()
        .unwrap_or_default());
    private["_payment_metadata"] = json!(p
        .object("payment_intent_data")?
        .map(|pd| pd.metadata("metadata"))
        .transpose()?
        .flatten()
        .unwrap_or_default());
    state.insert(private);
    Ok(with_line_items(state, session, p))
}

pub fn get_session(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    expire_due(state);
    let session = state.fetch("checkout.session", ctx.id(), "session")?;
    Ok(with_line_items(state, session, p))
}

pub fn list_sessions(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "limit",
        "starting_after",
        "ending_before",
        "customer",
        "payment_intent",
        "subscription",
        "status",
    ])?;
    expire_due(state);
    let customer = p.nonempty("customer")?.map(str::to_owned);
    let status = p.nonempty("status")?.map(str::to_owned);
    let sub = p.nonempty("subscription")?.map(str::to_owned);
    let listed = list_of(state, p, "checkout.session", "/v1/checkout/sessions", |s| {
        customer.as_ref().is_none_or(|c| s["customer"] == c.as_str())
            && status.as_ref().is_none_or(|c| s["status"] == c.as_str())
            && sub.as_ref().is_none_or(|c| s["subscription"] == c.as_str())
    })?;
    Ok(listed)
}

pub fn session_line_items(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["limit", "starting_after", "ending_before"])?;
    state.fetch("checkout.session", ctx.id(), "session")?;
    let mut items = state.line_items.get(ctx.id()).cloned().unwrap_or_default();
    // `list` shows newest first; line items keep their given order.
    items.reverse();
    super::state::list(
        &format!("/v1/checkout/sessions/{}/line_items", ctx.id()),
        items,
        p.int("limit")?,
        p.nonempty("starting_after")?,
        p.nonempty("ending_before")?,
    )
}

pub fn expire_session(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    let session = state.fetch("checkout.session", ctx.id(), "session")?;
    if session["status"] != "open" {
        return Err(StripeError::invalid(format!(
            "Only Checkout Sessions with a status of `open` can be expired. This session has a status of `{}`.",
            session["status"].as_str().unwrap_or("")
        )));
    }
    let now = state.now_for_customer(session["customer"].as_str());
    Ok(expire(state, ctx.id(), now))
}

/// Pays an open session with a card, as the hosted page's Pay button does.
/// A decline leaves the session open for another attempt.
pub fn complete(state: &mut State, id: &str, card_number: &str, email: Option<&str>) -> StripeResult<Value> {
    expire_due(state);
    let session = state.fetch("checkout.session", id, "session")?;
    if session["status"] != "open" {
        return Err(StripeError::invalid(format!(
            "This Checkout Session is {}.",
            session["status"].as_str().unwrap_or("closed")
        )));
    }
    if !payments::valid_card_number(card_number) {
        return Err(StripeError {
            code: Some("incorrect_number"),
            ..StripeError::card_declined("incorrect_number", "Your card number is incorrect.")
        });
    }
    let email = email.filter(|e| !e.is_empty()).or(session["customer_email"].as_str()).map(str::to_owned);
    let existing_customer = session["customer"].as_str().map(str::to_owned);
    let amount = session["amount_total"].as_i64().unwrap_or(0);
    let currency = session["currency"].as_str().unwrap_or("usd").to_owned();
    let trial_days = session["_trial_days"].as_i64();
    let mode = session["mode"].as_str().unwrap_or("payment").to_owned();

    // A card that will decline is refused before any customer is created,
    // as Checkout does (payment mode still records the failed attempt).
    let behaviour = payments::card_behaviour(card_number);
    let declines_now = matches!(
        behaviour,
        payments::CardBehaviour::Declined
            | payments::CardBehaviour::InsufficientFunds
            | payments::CardBehaviour::AttachesThenFails
    ) && !(mode == "subscription"
        && trial_days.is_some()
        && behaviour == payments::CardBehaviour::AttachesThenFails);
    if declines_now && mode == "subscription" {
        return Err(StripeError::card_declined("generic_decline", "Your card was declined."));
    }

    let customer_id = match existing_customer {
        Some(c) => c,
        None if mode == "payment" && session["customer_creation"] == "if_required" => String::new(),
        None => {
            let customer = super::objects::create_customer(
                state,
                &Ctx { version: String::new(), path: vec![], public_url: String::new() },
                &Params::new(json!({ "email": email.clone().unwrap_or_default() })),
            )?;
            customer["id"].as_str().unwrap_or_default().to_owned()
        }
    };
    let customer = (!customer_id.is_empty()).then_some(customer_id.as_str());
    let now = state.now_for_customer(customer);
    let pm = payments::create_card(state, card_number, customer, email.as_deref(), now);
    let pm_id = pm["id"].as_str().unwrap_or_default().to_owned();

    let mut changes = Map::new();
    match mode.as_str() {
        "payment" => {
            let charged = payments::charge(
                state,
                ChargeRequest {
                    customer,
                    payment_method: &pm_id,
                    amount,
                    currency: &currency,
                    description: None,
                    metadata: session["_payment_metadata"].clone(),
                    now,
                },
            );
            if let Some(decline) = charged.declined {
                return Err(decline);
            }
            changes.insert("payment_intent".into(), charged.payment_intent["id"].clone());
            changes.insert("payment_status".into(), json!("paid"));
        }
        _ => {
            let items = state.line_items.get(id).cloned().unwrap_or_default();
            let (subscription, invoice) = billing::start_subscription(
                state,
                billing::NewSubscription {
                    customer: &customer_id,
                    items: items
                        .iter()
                        .map(|li| (li["price"].clone(), li["quantity"].as_i64().unwrap_or(1)))
                        .collect(),
                    trial_days,
                    metadata: session["_subscription_metadata"].clone(),
                    payment_method: &pm_id,
                    now,
                },
            )?;
            changes.insert("subscription".into(), subscription["id"].clone());
            changes.insert("invoice".into(), invoice["id"].clone());
            let paid = invoice["amount_due"].as_i64().unwrap_or(0) > 0;
            changes.insert("payment_status".into(), json!(if paid { "paid" } else { "no_payment_required" }));
        }
    }
    changes.insert("status".into(), json!("complete"));
    changes.insert("customer".into(), json!(customer));
    changes.insert("url".into(), Value::Null);
    changes.insert(
        "customer_details".into(),
        json!({ "address": null, "email": email, "name": null, "phone": null, "tax_exempt": "none", "tax_ids": [] }),
    );
    let (session, _) = state.update(id, changes);
    state.emit("checkout.session.completed", &session, None, now);
    Ok(session)
}

/// The success URL with Stripe's `{CHECKOUT_SESSION_ID}` template filled in.
pub fn success_redirect(session: &Value) -> Option<String> {
    let id = session["id"].as_str()?;
    session["success_url"].as_str().map(|u| u.replace("{CHECKOUT_SESSION_ID}", id))
}
