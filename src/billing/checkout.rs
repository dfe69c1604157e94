//! A checkout's cart, checked before anything is recorded or sent to the
//! provider: whatever Stripe would refuse (a recurring price in payment
//! mode, two currencies, a silly quantity) is refused here with an error
//! naming the line, so a bad request writes nothing and costs no provider
//! call.

/// More lines than any real cart; Stripe's own limit is 100.
pub const MAX_LINE_ITEMS: usize = 100;
/// Far above any real purchase, far below an amount that could overflow.
pub const MAX_QUANTITY: i64 = 10_000;
/// Stripe's limit for `subscription_data[trial_period_days]`.
pub const MAX_TRIAL_DAYS: i64 = 730;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "snake_case")]
pub enum Mode {
    /// One-time prices: an order, paid once.
    Payment,
    /// Recurring prices: a subscription.
    Subscription,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Payment => "payment",
            Mode::Subscription => "subscription",
        }
    }
}

/// Subscription statuses that still bill, or may: a customer with one of
/// these to a product is already subscribed to it, and a second checkout
/// for the product is most likely a double click, not a wish to pay twice.
pub const LIVE_SUBSCRIPTION_STATUSES: [&str; 6] =
    ["incomplete", "trialing", "active", "past_due", "unpaid", "paused"];

pub fn is_live_subscription(status: &str) -> bool {
    LIVE_SUBSCRIPTION_STATUSES.contains(&status)
}

/// A catalog price as the cart needs it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartPrice {
    pub id: String,
    pub currency: String,
    pub unit_amount: i64,
    /// `(interval, interval_count)` for a recurring price.
    pub recurring: Option<(String, i64)>,
    /// The price and its product are both active.
    pub active: bool,
}

/// One requested line: the price asked for (`None`: not in the catalog).
#[derive(Debug, Clone)]
pub struct CartLine<'a> {
    pub requested: &'a str,
    pub price: Option<&'a CartPrice>,
    pub quantity: i64,
}

/// A line's money.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LineTotal {
    pub unit_amount: i64,
    pub quantity: i64,
    pub amount_total: i64,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cart {
    pub currency: String,
    pub amount_total: i64,
    pub lines: Vec<LineTotal>,
}

/// What is wrong, and with which parameter (`line_items[2][price]`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CartError {
    pub param: String,
    pub message: String,
}

fn err(param: impl Into<String>, message: impl Into<String>) -> CartError {
    CartError { param: param.into(), message: message.into() }
}

/// Checks a cart for `mode` and totals it.
pub fn check_cart(mode: Mode, lines: &[CartLine<'_>], trial_days: Option<i64>) -> Result<Cart, CartError> {
    if lines.is_empty() {
        return Err(err("line_items", "line_items must list at least one price."));
    }
    if lines.len() > MAX_LINE_ITEMS {
        return Err(err("line_items", format!("line_items may list at most {MAX_LINE_ITEMS} prices.")));
    }
    match (mode, trial_days) {
        (Mode::Payment, Some(_)) => {
            return Err(err("trial_days", "trial_days is only for mode `subscription`."));
        }
        (Mode::Subscription, Some(d)) if !(1..=MAX_TRIAL_DAYS).contains(&d) => {
            return Err(err("trial_days", format!("trial_days must be between 1 and {MAX_TRIAL_DAYS}.")));
        }
        _ => {}
    }
    let mut currency: Option<&str> = None;
    let mut interval: Option<&(String, i64)> = None;
    let mut amount_total: i64 = 0;
    let mut totals = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let param = format!("line_items[{i}][price]");
        let Some(price) = line.price else {
            return Err(err(param, format!("No such price: '{}'. See GET /v1/prices.", line.requested)));
        };
        if !price.active {
            return Err(err(param, format!("The price '{}' is no longer sold (inactive).", price.id)));
        }
        if !(1..=MAX_QUANTITY).contains(&line.quantity) {
            return Err(err(
                format!("line_items[{i}][quantity]"),
                format!("quantity must be between 1 and {MAX_QUANTITY}."),
            ));
        }
        match (mode, &price.recurring) {
            (Mode::Payment, Some(_)) => {
                return Err(err(
                    param,
                    format!(
                        "The price '{}' is recurring; mode `payment` takes one-time prices (use mode `subscription`).",
                        price.id
                    ),
                ))
            }
            (Mode::Subscription, None) => {
                return Err(err(
                    param,
                    format!(
                        "The price '{}' is one-time; mode `subscription` takes recurring prices (use mode `payment`).",
                        price.id
                    ),
                ))
            }
            (Mode::Subscription, Some(r)) => {
                if *interval.get_or_insert(r) != r {
                    return Err(err(param, "All prices of a subscription must renew on the same interval."));
                }
            }
            (Mode::Payment, None) => {}
        }
        if *currency.get_or_insert(&price.currency) != price.currency {
            return Err(err(param, "All prices of a checkout must be in the same currency."));
        }
        let line_total = price
            .unit_amount
            .checked_mul(line.quantity)
            .ok_or_else(|| err(format!("line_items[{i}][quantity]"), "The amount is too large."))?;
        amount_total = amount_total
            .checked_add(line_total)
            .ok_or_else(|| err(format!("line_items[{i}][quantity]"), "The amount is too large."))?;
        totals.push(LineTotal {
            unit_amount: price.unit_amount,
            quantity: line.quantity,
            amount_total: line_total,
        });
    }
    Ok(Cart { currency: currency.unwrap_or_default().to_owned(), amount_total, lines: totals })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_subscriptions_do_not_block_a_new_checkout() {
        for status in ["incomplete", "trialing", "active", "past_due", "unpaid", "paused"] {
            assert!(is_live_subscription(status), "{status}");
        }
        for status in ["canceled", "incomplete_expired", ""] {
            assert!(!is_live_subscription(status), "{status}");
        }
    }

    fn price(id: &str, amount: i64, recurring: Option<&str>) -> CartPrice {
        CartPrice {
            id: id.to_owned(),
            currency: "usd".to_owned(),
            unit_amount: amount,
            recurring: recurring.map(|i| (i.to_owned(), 1)),
            active: true,
        }
    }

    fn line<'a>(p: &'a CartPrice, quantity: i64) -> CartLine<'a> {
        CartLine { requested: &p.id, price: Some(p), quantity }
    }

    #[test]
    fn a_cart_is_totalled_line_by_line() {
        let (a, b) = (price("pack", 500, None), price("book", 1250, None));
        let cart = check_cart(Mode::Payment, &[line(&a, 3), line(&b, 2)], None).unwrap();
        assert_eq!(cart.amount_total, 4000);
        assert_eq!(cart.currency, "usd");
        assert_eq!(cart.lines[1], LineTotal { unit_amount: 1250, quantity: 2, amount_total: 2500 });
    }

    #[test]
    fn each_mistake_names_its_parameter() {
        let (one, monthly, yearly) = (
            price("pack", 500, None),
            price("pro_m", 2900, Some("month")),
            price("pro_y", 29000, Some("year")),
        );
        let mut eur = price("pack_eur", 500, None);
        eur.currency = "eur".into();
        let mut old = price("old", 100, None);
        old.active = false;
        let param = |r: Result<Cart, CartError>| r.unwrap_err().param;
        assert_eq!(param(check_cart(Mode::Payment, &[], None)), "line_items");
        assert_eq!(
            param(check_cart(Mode::Payment, &[line(&one, 1), line(&monthly, 1)], None)),
            "line_items[1][price]"
        );
        assert_eq!(param(check_cart(Mode::Subscription, &[line(&one, 1)], None)), "line_items[0][price]");
        assert_eq!(
            param(check_cart(Mode::Subscription, &[line(&monthly, 1), line(&yearly, 1)], None)),
            "line_items[1][price]"
        );
        assert_eq!(
            param(check_cart(Mode::Payment, &[line(&one, 1), line(&eur, 1)], None)),
            "line_items[1][price]"
        );
        assert_eq!(param(check_cart(Mode::Payment, &[line(&old, 1)], None)), "line_items[0][price]");
        assert_eq!(param(check_cart(Mode::Payment, &[line(&one, 0)], None)), "line_items[0][quantity]");
        assert_eq!(
            param(check_cart(Mode::Payment, &[line(&one, MAX_QUANTITY + 1)], None)),
            "line_items[0][quantity]"
        );
        let unknown = CartLine { requested: "nope", price: None, quantity: 1 };
        assert_eq!(param(check_cart(Mode::Payment, &[unknown], None)), "line_items[0][price]");
        assert_eq!(param(check_cart(Mode::Payment, &[line(&one, 1)], Some(7))), "trial_days");
        assert_eq!(param(check_cart(Mode::Subscription, &[line(&monthly, 1)], Some(0))), "trial_days");
        assert!(check_cart(Mode::Subscription, &[line(&monthly, 2)], Some(14)).is_ok());
        let many: Vec<CartLine> = (0..=MAX_LINE_ITEMS).map(|_| line(&one, 1)).collect();
        assert_eq!(param(check_cart(Mode::Payment, &many, None)), "line_items");
    }

    #[test]
    fn amounts_that_would_overflow_are_refused() {
        let huge = price("huge", i64::MAX / 2, None);
        let r = check_cart(Mode::Payment, &[line(&huge, 3)], None);
        assert_eq!(r.unwrap_err().param, "line_items[0][quantity]");
    }
}
