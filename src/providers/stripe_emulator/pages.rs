//! The hosted pages: Checkout (a real form with a card number field and a
//! Pay button) and the billing portal (cancel, switch plan).

use axum::extract::{Path, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use axum::{Form, Router};
use serde::Deserialize;
use serde_json::Value;

use super::{billing, checkout, Emulator};

pub fn router() -> Router<Emulator> {
    Router::new()
        .route("/checkout/{id}", get(checkout_page))
        .route("/checkout/{id}/pay", post(pay))
        .route("/portal/{id}", get(portal_page))
        .route("/portal/{id}/cancel", post(portal_cancel))
        .route("/portal/{id}/switch", post(portal_switch))
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&#39;")
}

fn money(amount: i64, currency: &str) -> String {
    format!("{}.{:02} {}", amount / 100, amount % 100, currency.to_uppercase())
}

fn page(title: &str, body: &str) -> String {
    format!(
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{title}</title>
<meta name="viewport" content="width=device-width, initial-scale=1">
<style>
body {{ font: 16px/1.5 system-ui, sans-serif; background: #f6f9fc; color: #1a1f36; margin: 0; }}
main {{ max-width: 460px; margin: 48px auto; background: #fff; padding: 32px; border-radius: 8px; box-shadow: 0 2px 8px #0001; }}
h1 {{ font-size: 20px; margin-top: 0; }} table {{ width: 100%; border-collapse: collapse; }}
td {{ padding: 6px 0; }} td.r {{ text-align: right; }} .total td {{ font-weight: 700; border-top: 1px solid #e3e8ee; }}
label {{ display: block; margin-top: 14px; font-size: 14px; color: #4f566b; }}
input, select {{ width: 100%; box-sizing: border-box; padding: 10px; font-size: 16px; border: 1px solid #cfd7df; border-radius: 6px; }}
button {{ margin-top: 20px; width: 100%; padding: 12px; font-size: 16px; background: #635bff; color: #fff; border: 0; border-radius: 6px; cursor: pointer; }}
.error {{ background: #fde8e8; color: #9b1c1c; padding: 10px; border-radius: 6px; margin-top: 12px; }}
.note {{ font-size: 13px; color: #697386; }} .sub {{ border: 1px solid #e3e8ee; border-radius: 6px; padding: 12px; margin: 12px 0; }}
</style></head><body><main>{body}</main></body></html>"#
    )
}

fn not_found(what: &str) -> Response {
    (StatusCode::NOT_FOUND, Html(page("Not found", &format!("<h1>{}</h1>", esc(what))))).into_response()
}

fn checkout_html(em: &Emulator, session: &Value, error: Option<&str>) -> String {
    let id = session["id"].as_str().unwrap_or_default();
    let items = em.lock().line_items.get(id).cloned().unwrap_or_default();
    let currency = session["currency"].as_str().unwrap_or("usd");
    let mut rows = String::new();
    for item in &items {
        rows.push_str(&format!(
            "<tr><td>{} × {}</td><td class=r>{}</td></tr>",
            item["quantity"],
            esc(item["description"].as_str().unwrap_or("Item")),
            money(item["amount_total"].as_i64().unwrap_or(0), currency)
        ));
    }
    let recurring = items
        .iter()
        .find_map(|i| i["price"]["recurring"]["interval"].as_str())
        .map(|i| format!(" per {i}"))
        .unwrap_or_default();
    let email_field = if session["customer"].is_null() {
        format!(
            r#"<label for="email">Email</label><input id="email" name="email" type="email" value="{}" autocomplete="email">"#,
            esc(session["customer_email"].as_str().unwrap_or(""))
        )
    } else {
        String::new()
    };
    let cancel = session["cancel_url"]
        .as_str()
        .map(|u| format!(r#"<p class="note"><a href="{}">Cancel and return</a></p>"#, esc(u)))
        .unwrap_or_default();
    let error =
        error.map(|e| format!(r#"<div class="error" role="alert">{}</div>"#, esc(e))).unwrap_or_default();
    let body = format!(
        r#"<h1>Pay tollgate emulator</h1>
<table>{rows}<tr class="total"><td>Total</td><td class=r>{}{recurring}</td></tr></table>
{error}
<form method="post" action="/checkout/{id}/pay" id="payment-form">
{email_field}
<label for="cardnumber">Card number</label>
<input id="cardnumber" name="card_number" inputmode="numeric" autocomplete="cc-number" placeholder="4242 4242 4242 4242" required>
<label for="expiry">Expiry</label><input id="expiry" name="expiry" placeholder="12 / 34" value="12 / 34">
<label for="cvc">CVC</label><input id="cvc" name="cvc" placeholder="123" value="123">
<button type="submit" id="pay">Pay</button>
</form>
<p class="note">Test mode: 4242 4242 4242 4242 succeeds, 4000 0000 0000 0002 is declined.</p>
{cancel}"#,
        money(session["amount_total"].as_i64().unwrap_or(0), currency)
    );
    page("Checkout", &body)
}

fn session(em: &Emulator, id: &str) -> Option<Value> {
    let mut state = em.lock();
    checkout::expire_due(&mut state);
    state.get(id).filter(|s| s["object"] == "checkout.session").cloned()
}

/// The form posts to a path relative to where the emulator is mounted.
fn relative_form(html: String, em: &Emulator) -> String {
    let prefix = em
        .config()
        .public_url
        .split_once("://")
        .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
        .unwrap_or_default();
    html.replace(r#"action="/"#, &format!(r#"action="{prefix}/"#))
}

async fn checkout_page(State(em): State<Emulator>, Path(id): Path<String>) -> Response {
    let Some(s) = session(&em, &id) else { return not_found("No such checkout session") };
    match s["status"].as_str() {
        Some("open") => Html(relative_form(checkout_html(&em, &s, None), &em)).into_response(),
        Some("complete") => {
            Html(page("Paid", "<h1>This checkout session is already paid.</h1>")).into_response()
        }
        _ => (StatusCode::GONE, Html(page("Expired", "<h1>This checkout session has expired.</h1>")))
            .into_response(),
    }
}

#[derive(Deserialize)]
struct PayForm {
    card_number: String,
    email: Option<String>,
}

async fn pay(State(em): State<Emulator>, Path(id): Path<String>, Form(form): Form<PayForm>) -> Response {
    let number: String = form.card_number.chars().filter(|c| !c.is_whitespace() && *c != '-').collect();
    let result = {
        let mut state = em.lock();
        checkout::complete(&mut state, &id, &number, form.email.as_deref())
    };
    em.wake_delivery();
    match result {
        Ok(session) => match checkout::success_redirect(&session) {
            Some(url) => Redirect::to(&url).into_response(),
            None => Html(page("Paid", "<h1>Payment complete.</h1>")).into_response(),
        },
        Err(e) => {
            let Some(s) = session(&em, &id) else { return not_found("No such checkout session") };
            let status = if s["status"] == "open" { StatusCode::PAYMENT_REQUIRED } else { StatusCode::GONE };
            (status, Html(relative_form(checkout_html(&em, &s, Some(&e.message)), &em))).into_response()
        }
    }
}

fn portal(em: &Emulator, id: &str) -> Option<(Value, Vec<Value>, Vec<Value>)> {
    let state = em.lock();
    let session = state.get(id).filter(|s| s["object"] == "billing_portal.session")?.clone();
    let customer = session["customer"].as_str().unwrap_or_default();
    let subs: Vec<Value> = state
        .all("subscription")
        .into_iter()
        .filter(|s| s["customer"] == customer && s["status"] != "canceled")
        .cloned()
        .collect();
    let prices: Vec<Value> = state
        .all("price")
        .into_iter()
        .filter(|p| p["active"] == true && !p["recurring"].is_null())
        .cloned()
        .collect();
    Some((session, subs, prices))
}

async fn portal_page(State(em): State<Emulator>, Path(id): Path<String>) -> Response {
    let Some((session, subs, prices)) = portal(&em, &id) else { return not_found("No such portal session") };
    let mut body = String::from("<h1>Manage your subscription</h1>");
    if subs.is_empty() {
        body.push_str("<p>You have no active subscriptions.</p>");
    }
    for sub in &subs {
        let sid = sub["id"].as_str().unwrap_or_default();
        let item = &sub["items"]["data"][0];
        let price = &item["price"];
        let current = price["id"].as_str().unwrap_or_default();
        let options: String = prices
            .iter()
            .filter(|p| p["id"] != current && p["currency"] == price["currency"])
            .map(|p| {
                let product = p["product"].as_str().unwrap_or_default();
                format!(
                    r#"<option value="{}">{} — {} / {}</option>"#,
                    esc(p["id"].as_str().unwrap_or_default()),
                    esc(p["nickname"].as_str().unwrap_or(product)),
                    money(p["unit_amount"].as_i64().unwrap_or(0), p["currency"].as_str().unwrap_or("usd")),
                    esc(p["recurring"]["interval"].as_str().unwrap_or(""))
                )
            })
            .collect();
        let ending = if sub["cancel_at_period_end"] == true { " — cancels at period end" } else { "" };
        body.push_str(&format!(
            r#"<div class="sub" id="{sid}"><p><b>{}</b> × {}: {} / {} <span class="note">({}{ending})</span></p>"#,
            esc(price["product"].as_str().unwrap_or("")),
            item["quantity"],
            money(price["unit_amount"].as_i64().unwrap_or(0), price["currency"].as_str().unwrap_or("usd")),
            esc(price["recurring"]["interval"].as_str().unwrap_or("")),
            esc(sub["status"].as_str().unwrap_or("")),
        ));
        if !options.is_empty() {
            body.push_str(&format!(
                r#"<form method="post" action="/portal/{id}/switch"><input type="hidden" name="subscription" value="{sid}"><label for="price-{sid}">Switch plan</label><select id="price-{sid}" name="price">{options}</select><button type="submit">Update plan</button></form>"#
            ));
        }
        if sub["cancel_at_period_end"] != true {
            body.push_str(&format!(
                r#"<form method="post" action="/portal/{id}/cancel"><input type="hidden" name="subscription" value="{sid}"><button type="submit">Cancel plan</button></form>"#
            ));
        }
        body.push_str("</div>");
    }
    if let Some(url) = session["return_url"].as_str() {
        body.push_str(&format!(r#"<p><a href="{}">Return</a></p>"#, esc(url)));
    }
    Html(relative_form(page("Billing portal", &body), &em)).into_response()
}

#[derive(Deserialize)]
struct PortalForm {
    subscription: String,
    price: Option<String>,
}

fn portal_action(em: &Emulator, id: &str, form: &PortalForm, switch: bool) -> Response {
    let result = {
        let mut state = em.lock();
        let owner =
            state.get(id).filter(|s| s["object"] == "billing_portal.session").map(|s| s["customer"].clone());
        let sub_owner = state.get(&form.subscription).map(|s| s["customer"].clone());
        match (owner, sub_owner) {
            (Some(a), Some(b)) if a == b => {
                if switch {
                    billing::portal_switch(
                        &mut state,
                        &form.subscription,
                        form.price.as_deref().unwrap_or(""),
                    )
                } else {
                    billing::portal_cancel(&mut state, &form.subscription)
                }
            }
            _ => return not_found("No such subscription for this portal session"),
        }
    };
    em.wake_delivery();
    match result {
        Ok(_) => {
            let prefix = em
                .config()
                .public_url
                .split_once("://")
                .and_then(|(_, rest)| rest.find('/').map(|i| rest[i..].to_owned()))
                .unwrap_or_default();
            Redirect::to(&format!("{prefix}/portal/{id}")).into_response()
        }
        Err(e) => (
            StatusCode::BAD_REQUEST,
            [(header::CONTENT_TYPE, "text/html; charset=utf-8")],
            page("Error", &format!("<div class=error>{}</div>", esc(&e.message))),
        )
            .into_response(),
    }
}

async fn portal_cancel(
    State(em): State<Emulator>,
    Path(id): Path<String>,
    Form(form): Form<PortalForm>,
) -> Response {
    portal_action(&em, &id, &form, false)
}

async fn portal_switch(
    State(em): State<Emulator>,
    Path(id): Path<String>,
    Form(form): Form<PortalForm>,
) -> Response {
    portal_action(&em, &id, &form, true)
}
