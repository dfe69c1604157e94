//! Customers, products, prices, events and webhook endpoints.

use serde_json::{json, Map, Value};

use super::error::{StripeError, StripeResult};
use super::params::Params;
use super::state::{list, new_id, real_now, State};
use super::Ctx;

fn list_params(p: &Params) -> StripeResult<(Option<i64>, Option<&str>, Option<&str>)> {
    Ok((p.int("limit")?, p.nonempty("starting_after")?, p.nonempty("ending_before")?))
}

/// Lists objects of `kind` that pass `keep`, with Stripe's paging.
pub fn list_of(
    state: &State,
    p: &Params,
    kind: &str,
    url: &str,
    keep: impl Fn(&Value) -> bool,
) -> StripeResult<Value> {
    let (limit, after, before) = list_params(p)?;
    let items: Vec<Value> = state.all(kind).into_iter().filter(|o| keep(o)).cloned().collect();
    list(url, items, limit, after, before)
}

const LIST: [&str; 3] = ["limit", "starting_after", "ending_before"];

fn allow_list(p: &Params, extra: &[&str]) -> StripeResult<()> {
    let all: Vec<&str> = LIST.iter().chain(extra).copied().collect();
    p.allow(&all)
}

// ---- customers ----

pub fn create_customer(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "email",
        "name",
        "description",
        "phone",
        "metadata",
        "test_clock",
        "payment_method",
        "invoice_settings",
    ])?;
    let clock = p.nonempty("test_clock")?;
    if let Some(clock) = clock {
        state.fetch("test_helpers.test_clock", clock, "test_clock")?;
    }
    let id = new_id("cus");
    let created = match clock {
        Some(c) => state.get(c).and_then(|c| c["frozen_time"].as_i64()).unwrap_or_else(real_now),
        None => real_now(),
    };
    let customer = json!({
        "id": id,
        "object": "customer",
        "address": null,
        "balance": 0,
        "created": created,
        "currency": null,
        "default_source": null,
        "delinquent": false,
        "description": p.nonempty("description")?,
        "discount": null,
        "email": p.nonempty("email")?,
        "invoice_prefix": id[4..12].to_uppercase(),
        "invoice_settings": { "custom_fields": null, "default_payment_method": null, "footer": null, "rendering_options": null },
        "livemode": false,
        "metadata": p.metadata("metadata")?.unwrap_or_default(),
        "name": p.nonempty("name")?,
        "next_invoice_sequence": 1,
        "phone": p.nonempty("phone")?,
        "preferred_locales": [],
        "shipping": null,
        "tax_exempt": "none",
        "test_clock": clock,
    });
    let customer = state.insert(customer);
    state.emit("customer.created", &customer, None, created);
    Ok(customer)
}

pub fn get_customer(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("customer", ctx.id(), "id")
}

pub fn update_customer(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["email", "name", "description", "phone", "metadata", "invoice_settings"])?;
    let current = state.fetch("customer", ctx.id(), "id")?;
    let mut changes = Map::new();
    for field in ["email", "name", "description", "phone"] {
        if let Some(v) = p.str(field)? {
            changes.insert(field.into(), if v.is_empty() { Value::Null } else { json!(v) });
        }
    }
    if let Some(meta) = p.metadata("metadata")? {
        changes.insert("metadata".into(), merge_metadata(&current["metadata"], meta));
    }
    if let Some(settings) = p.object("invoice_settings")? {
        settings.allow(&["default_payment_method"])?;
        if let Some(pm) = settings.nonempty("default_payment_method")? {
            state.fetch("payment_method", pm, "invoice_settings[default_payment_method]")?;
            let mut s = current["invoice_settings"].clone();
            s["default_payment_method"] = json!(pm);
            changes.insert("invoice_settings".into(), s);
        }
    }
    let now = state.now_for_customer(Some(ctx.id()));
    let (customer, previous) = state.update(ctx.id(), changes);
    if previous.as_object().is_some_and(|m| !m.is_empty()) {
        state.emit("customer.updated", &customer, Some(previous), now);
    }
    Ok(customer)
}

/// Stripe's metadata update: keys merge, an empty value deletes a key.
pub fn merge_metadata(current: &Value, update: Map<String, Value>) -> Value {
    if update.is_empty() {
        return json!({});
    }
    let mut merged = current.as_object().cloned().unwrap_or_default();
    for (k, v) in update {
        if v.as_str() == Some("") {
            merged.remove(&k);
        } else {
            merged.insert(k, v);
        }
    }
    Value::Object(merged)
}

pub fn delete_customer(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    let customer = state.fetch("customer", ctx.id(), "id")?;
    let now = state.now_for_customer(Some(ctx.id()));
    // Deleting a customer cancels its subscriptions, as on Stripe.
    let subs: Vec<String> = state
        .all("subscription")
        .into_iter()
        .filter(|s| s["customer"] == ctx.id() && s["status"] != "canceled")
        .filter_map(|s| s["id"].as_str().map(str::to_owned))
        .collect();
    for sub in subs {
        super::billing::end_subscription(state, &sub, now, "cancellation_requested");
    }
    state.remove(ctx.id());
    state.emit("customer.deleted", &customer, None, now);
    Ok(json!({ "id": ctx.id(), "object": "customer", "deleted": true }))
}

pub fn list_customers(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    allow_list(p, &["email", "test_clock"])?;
    let email = p.nonempty("email")?.map(str::to_owned);
    let clock = p.nonempty("test_clock")?.map(str::to_owned);
    list_of(state, p, "customer", "/v1/customers", |c| {
        email.as_ref().is_none_or(|e| c["email"] == e.as_str())
            && clock.as_ref().is_none_or(|k| c["test_clock"] == k.as_str())
    })
}

// ---- products ----

pub fn create_product(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "id",
        "name",
        "description",
        "active",
        "metadata",
        "url",
        "statement_descriptor",
        "unit_label",
    ])?;
    let name = p.required("name")?;
    let id = match p.nonempty("id")? {
        Some(id) if state.get(id).is_some() => {
            return Err(StripeError {
                code: Some("resource_already_exists"),
                ..StripeError::param("id", "Product already exists.")
            })
        }
        Some(id) => id.to_owned(),
        None => new_id("prod"),
    };
    let now = real_now();
    let product = state.insert(json!({
        "id": id,
        "object": "product",
        "active": p.bool("active")?.unwrap_or(true),
        "created": now,
        "default_price": null,
        "description": p.nonempty("description")?,
        "images": [],
        "livemode": false,
        "marketing_features": [],
        "metadata": p.metadata("metadata")?.unwrap_or_default(),
        "name": name,
        "package_dimensions": null,
        "shippable": null,
        "statement_descriptor": p.nonempty("statement_descriptor")?,
        "tax_code": null,
        "type": "service",
        "unit_label": p.nonempty("unit_label")?,
        "updated": now,
        "url": p.nonempty("url")?,
    }));
    state.emit("product.created", &product, None, now);
    Ok(product)
}

pub fn get_product(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("product", ctx.id(), "id")
}

pub fn update_product(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "name",
        "description",
        "active",
        "metadata",
        "default_price",
        "url",
        "statement_descriptor",
        "unit_label",
    ])?;
    let current = state.fetch("product", ctx.id(), "id")?;
    let mut changes = Map::new();
    for field in ["name", "description", "url", "statement_descriptor", "unit_label"] {
        if let Some(v) = p.str(field)? {
            if field == "name" && v.is_empty() {
                return Err(StripeError::param("name", "You must provide a non-empty name."));
            }
            changes.insert(field.into(), if v.is_empty() { Value::Null } else { json!(v) });
        }
    }
    if let Some(active) = p.bool("active")? {
        changes.insert("active".into(), json!(active));
    }
    if let Some(price) = p.nonempty("default_price")? {
        let pr = state.fetch("price", price, "default_price")?;
        if pr["product"] != ctx.id() {
            return Err(StripeError::param(
                "default_price",
                "The default price must belong to this product.",
            ));
        }
        changes.insert("default_price".into(), json!(price));
    }
    if let Some(meta) = p.metadata("metadata")? {
        changes.insert("metadata".into(), merge_metadata(&current["metadata"], meta));
    }
    let now = real_now();
    if !changes.is_empty() {
        changes.insert("updated".into(), json!(now));
    }
    let (product, previous) = state.update(ctx.id(), changes);
    if previous.as_object().is_some_and(|m| m.keys().any(|k| k != "updated")) {
        state.emit("product.updated", &product, Some(previous), now);
    }
    Ok(product)
}

pub fn list_products(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    allow_list(p, &["active", "ids"])?;
    let active = p.bool("active")?;
    let ids: Vec<String> = p.array("ids")?.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    list_of(state, p, "product", "/v1/products", |o| {
        active.is_none_or(|a| o["active"] == a)
            && (ids.is_empty() || ids.iter().any(|i| o["id"] == i.as_str()))
    })
}

// ---- prices ----

pub fn create_price(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[
        "product",
        "currency",
        "unit_amount",
        "recurring",
        "active",
        "metadata",
        "nickname",
        "lookup_key",
        "transfer_lookup_key",
        "tax_behavior",
    ])?;
    let product = p.required("product")?;
    let currency = p.required("currency")?.to_ascii_lowercase();
    if currency.len() != 3 || !currency.chars().all(|c| c.is_ascii_lowercase()) {
        return Err(StripeError::param("currency", format!("Invalid currency: {currency}")));
    }
    let amount = p.int("unit_amount")?.ok_or_else(|| StripeError::missing("unit_amount"))?;
    if !(0..=99_999_999_999).contains(&amount) {
        return Err(StripeError::param(
            "unit_amount",
            "Invalid integer: unit_amount must be between 0 and 99999999999",
        ));
    }
    let recurring = match p.object("recurring")? {
        None => Value::Null,
        Some(r) => {
            r.allow(&["interval", "interval_count", "usage_type", "trial_period_days"])?;
            let interval = r.required("interval").map_err(|_| StripeError::missing("recurring[interval]"))?;
            let max = match interval {
                "day" => 365,
                "week" => 52,
                "month" => 12,
                "year" => 1,
                other => {
                    return Err(StripeError::param(
                        "recurring[interval]",
                        format!(
                        "Invalid recurring[interval]: must be one of day, week, month, or year (got {other})"
                    ),
                    ))
                }
            };
            let count = r.int("interval_count")?.unwrap_or(1);
            if !(1..=max).contains(&count) {
                return Err(StripeError::param(
                    "recurring[interval_count]",
                    "The maximum billing period is one year.",
                ));
            }
            json!({
                "interval": interval, "interval_count": count, "meter": null,
                "trial_period_days": r.int("trial_period_days")?, "usage_type": "licensed",
            })
        }
    };
    state.fetch("product", product, "product")?;
    if let Some(key) = p.nonempty("lookup_key")? {
        let holder = state.all("price").iter().find(|pr| pr["lookup_key"] == key).map(|pr| pr["id"].clone());
        match holder {
            // As on Stripe: the key moves to the new price.
            Some(Value::String(id)) if p.bool("transfer_lookup_key")? == Some(true) => {
                let mut changes = Map::new();
                changes.insert("lookup_key".into(), Value::Null);
                state.update(&id, changes);
            }
            Some(_) => {
                return Err(StripeError::param(
                    "lookup_key",
                    format!("A price with lookup_key {key} already exists."),
                ))
            }
            None => {}
        }
    }
    let now = real_now();
    let price = state.insert(json!({
        "id": new_id("price"),
        "object": "price",
        "active": p.bool("active")?.unwrap_or(true),
        "billing_scheme": "per_unit",
        "created": now,
        "currency": currency,
        "custom_unit_amount": null,
        "livemode": false,
        "lookup_key": p.nonempty("lookup_key")?,
        "metadata": p.metadata("metadata")?.unwrap_or_default(),
        "nickname": p.nonempty("nickname")?,
        "product": product,
        "recurring": recurring,
        "tax_behavior": p.nonempty("tax_behavior")?.unwrap_or("unspecified"),
        "tiers_mode": null,
        "transform_quantity": null,
        "type": if recurring.is_null() { "one_time" } else { "recurring" },
        "unit_amount": amount,
        "unit_amount_decimal": amount.to_string(),
    }));
    state.emit("price.created", &price, None, now);
    Ok(price)
}

pub fn get_price(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("price", ctx.id(), "id")
}

pub fn update_price(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["active", "metadata", "nickname", "lookup_key", "transfer_lookup_key"])?;
    let current = state.fetch("price", ctx.id(), "id")?;
    if let Some(key) = p.nonempty("lookup_key")? {
        let holder = state
            .all("price")
            .iter()
            .find(|pr| pr["lookup_key"] == key && pr["id"] != ctx.id())
            .map(|pr| pr["id"].clone());
        match holder {
            Some(Value::String(id)) if p.bool("transfer_lookup_key")? == Some(true) => {
                let mut changes = Map::new();
                changes.insert("lookup_key".into(), Value::Null);
                state.update(&id, changes);
            }
            Some(_) => {
                return Err(StripeError::param(
                    "lookup_key",
                    format!("A price with lookup_key {key} already exists."),
                ))
            }
            None => {}
        }
    }
    let mut changes = Map::new();
    if let Some(active) = p.bool("active")? {
        changes.insert("active".into(), json!(active));
    }
    for field in ["nickname", "lookup_key"] {
        if let Some(v) = p.str(field)? {
            changes.insert(field.into(), if v.is_empty() { Value::Null } else { json!(v) });
        }
    }
    if let Some(meta) = p.metadata("metadata")? {
        changes.insert("metadata".into(), merge_metadata(&current["metadata"], meta));
    }
    let (price, previous) = state.update(ctx.id(), changes);
    if previous.as_object().is_some_and(|m| !m.is_empty()) {
        state.emit("price.updated", &price, Some(previous), real_now());
    }
    Ok(price)
}

pub fn list_prices(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    allow_list(p, &["active", "product", "type", "currency", "lookup_keys"])?;
    let active = p.bool("active")?;
    let product = p.nonempty("product")?.map(str::to_owned);
    let kind = p.nonempty("type")?.map(str::to_owned);
    let currency = p.nonempty("currency")?.map(str::to_owned);
    let keys: Vec<String> =
        p.array("lookup_keys")?.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    list_of(state, p, "price", "/v1/prices", |o| {
        active.is_none_or(|a| o["active"] == a)
            && product.as_ref().is_none_or(|x| o["product"] == x.as_str())
            && kind.as_ref().is_none_or(|x| o["type"] == x.as_str())
            && currency.as_ref().is_none_or(|x| o["currency"] == x.as_str())
            && (keys.is_empty() || keys.iter().any(|k| o["lookup_key"] == k.as_str()))
    })
}

// ---- events ----

pub fn get_event(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("event", ctx.id(), "id")
}

pub fn list_events(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    allow_list(p, &["type", "types", "created", "delivery_success"])?;
    state.prune_events(real_now());
    let kind = p.nonempty("type")?.map(str::to_owned);
    let types: Vec<String> = p.array("types")?.iter().filter_map(|v| v.as_str().map(str::to_owned)).collect();
    let (gte, gt, lte, lt) = match p.object("created")? {
        Some(c) => (c.int("gte")?, c.int("gt")?, c.int("lte")?, c.int("lt")?),
        None => match p.int("created")? {
            Some(exact) => (Some(exact), None, Some(exact), None),
            None => (None, None, None, None),
        },
    };
    let matches_type = |t: &str| match &kind {
        // `type` accepts a trailing wildcard: `customer.*`.
        Some(k) if k.ends_with(".*") => t.starts_with(&k[..k.len() - 1]),
        Some(k) => t == k,
        None => true,
    };
    list_of(state, p, "event", "/v1/events", |e| {
        let t = e["type"].as_str().unwrap_or("");
        let c = e["created"].as_i64().unwrap_or(0);
        matches_type(t)
            && (types.is_empty() || types.iter().any(|x| x == t))
            && gte.is_none_or(|g| c >= g)
            && gt.is_none_or(|g| c > g)
            && lte.is_none_or(|l| c <= l)
            && lt.is_none_or(|l| c < l)
    })
}

// ---- webhook endpoints ----

fn enabled_events(p: &Params) -> StripeResult<Option<Vec<Value>>> {
    let events = p.array("enabled_events")?;
    if events.is_empty() {
        return Ok(None);
    }
    for e in &events {
        let ok = e.as_str().is_some_and(|s| {
            s == "*" || (s.contains('.') && s.len() < 100 && !s.contains(char::is_whitespace))
        });
        if !ok {
            return Err(StripeError::param("enabled_events", format!("Invalid event type: {e}")));
        }
    }
    Ok(Some(events))
}

fn valid_url(url: &str) -> bool {
    (url.starts_with("http://") || url.starts_with("https://"))
        && url.len() < 2048
        && !url.contains(char::is_whitespace)
}

pub fn create_webhook_endpoint(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["url", "enabled_events", "api_version", "description", "metadata", "connect"])?;
    let url = p.required("url")?;
    if !valid_url(url) {
        return Err(StripeError::param("url", format!("Invalid URL: {url}")));
    }
    let events = enabled_events(p)?.ok_or_else(|| StripeError::missing("enabled_events"))?;
    let secret = format!("whsec_{}", &new_id("x")[2..]);
    let endpoint = state.insert(json!({
        "id": new_id("we"),
        "object": "webhook_endpoint",
        "api_version": p.nonempty("api_version")?,
        "application": null,
        "created": real_now(),
        "description": p.nonempty("description")?,
        "enabled_events": events,
        "livemode": false,
        "metadata": p.metadata("metadata")?.unwrap_or_default(),
        "secret": secret,
        "status": "enabled",
        "url": url,
    }));
    Ok(endpoint)
}

/// Stripe shows the secret only when the endpoint is created.
fn without_secret(mut endpoint: Value) -> Value {
    if let Some(m) = endpoint.as_object_mut() {
        m.remove("secret");
    }
    endpoint
}

pub fn get_webhook_endpoint(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("webhook_endpoint", ctx.id(), "id").map(without_secret)
}

pub fn update_webhook_endpoint(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&["url", "enabled_events", "description", "metadata", "disabled"])?;
    let current = state.fetch("webhook_endpoint", ctx.id(), "id")?;
    let mut changes = Map::new();
    if let Some(url) = p.nonempty("url")? {
        if !valid_url(url) {
            return Err(StripeError::param("url", format!("Invalid URL: {url}")));
        }
        changes.insert("url".into(), json!(url));
    }
    if let Some(events) = enabled_events(p)? {
        changes.insert("enabled_events".into(), Value::Array(events));
    }
    if let Some(d) = p.str("description")? {
        changes.insert("description".into(), json!(d));
    }
    if let Some(disabled) = p.bool("disabled")? {
        changes.insert("status".into(), json!(if disabled { "disabled" } else { "enabled" }));
    }
    if let Some(meta) = p.metadata("metadata")? {
        changes.insert("metadata".into(), merge_metadata(&current["metadata"], meta));
    }
    Ok(without_secret(state.update(ctx.id(), changes).0))
}

pub fn delete_webhook_endpoint(state: &mut State, ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    p.allow(&[])?;
    state.fetch("webhook_endpoint", ctx.id(), "id")?;
    state.remove(ctx.id());
    state.deliveries.retain(|d| d.endpoint_id != ctx.id());
    Ok(json!({ "id": ctx.id(), "object": "webhook_endpoint", "deleted": true }))
}

pub fn list_webhook_endpoints(state: &mut State, _ctx: &Ctx, p: &Params) -> StripeResult<Value> {
    allow_list(p, &[])?;
    let mut listed = list_of(state, p, "webhook_endpoint", "/v1/webhook_endpoints", |_| true)?;
    if let Some(items) = listed["data"].as_array_mut() {
        for e in items.iter_mut() {
            *e = without_secret(e.take());
        }
    }
    Ok(listed)
}
