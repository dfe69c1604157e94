//! The catalog file (`tollgate.toml`): what is for sale and what it grants.
//!
//! The file is the source of truth, kept in version control. Parsing is
//! strict (unknown keys are errors) because a typo in a price is a billing
//! incident, and every problem is reported with the entry it belongs to.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::money::{Currency, MinorUnits};
use crate::ids::CatalogKey;

#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    #[error("cannot read catalog {path}: {source}")]
    Read { path: String, source: std::io::Error },
    #[error("catalog {path}: {message}")]
    Invalid { path: String, message: String },
}

/// What a product gives its buyer: on/off features, numeric limits (the
/// largest wins when several products grant one), and credits (a consumable
/// balance, granted per unit bought).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(deny_unknown_fields)]
pub struct Grants {
    #[serde(default)]
    pub features: BTreeSet<String>,
    #[serde(default)]
    pub limits: BTreeMap<String, i64>,
    #[serde(default)]
    pub credits: BTreeMap<String, i64>,
}

impl Grants {
    pub fn is_empty(&self) -> bool {
        self.features.is_empty() && self.limits.is_empty() && self.credits.is_empty()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
#[serde(rename_all = "lowercase")]
pub enum Interval {
    Day,
    Week,
    Month,
    Year,
}

impl Interval {
    pub fn as_str(self) -> &'static str {
        match self {
            Interval::Day => "day",
            Interval::Week => "week",
            Interval::Month => "month",
            Interval::Year => "year",
        }
    }

    pub fn parse(raw: &str) -> Option<Self> {
        match raw {
            "day" => Some(Interval::Day),
            "week" => Some(Interval::Week),
            "month" => Some(Interval::Month),
            "year" => Some(Interval::Year),
            _ => None,
        }
    }

    /// Stripe's ceiling: a billing period is at most one year.
    fn max_count(self) -> u32 {
        match self {
            Interval::Day => 365,
            Interval::Week => 52,
            Interval::Month => 12,
            Interval::Year => 1,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Recurring {
    pub interval: Interval,
    pub interval_count: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Product {
    pub id: CatalogKey,
    pub name: String,
    pub description: Option<String>,
    pub active: bool,
    pub grants: Grants,
    pub stripe_product: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Price {
    pub id: CatalogKey,
    pub product: CatalogKey,
    pub currency: Currency,
    pub unit_amount: MinorUnits,
    /// `None` for a one-time price.
    pub recurring: Option<Recurring>,
    pub trial_days: Option<u32>,
    pub nickname: Option<String>,
    pub active: bool,
    pub stripe_price: Option<String>,
    /// A legacy Stripe plan id (`plan_…` or a custom string) that events from
    /// older integrations carry instead of a price id.
    pub stripe_plan: Option<String>,
}

#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    pub products: BTreeMap<CatalogKey, Product>,
    pub prices: BTreeMap<CatalogKey, Price>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCatalog {
    #[serde(default)]
    products: BTreeMap<String, RawProduct>,
    #[serde(default)]
    prices: BTreeMap<String, RawPrice>,
    /// Outbound webhook endpoints declared beside the catalog; read and
    /// checked by `delivery::declared`.
    #[serde(default, rename = "webhook_endpoints")]
    _webhook_endpoints: Option<serde::de::IgnoredAny>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawProduct {
    name: String,
    description: Option<String>,
    #[serde(default = "yes")]
    active: bool,
    #[serde(default)]
    features: BTreeSet<String>,
    #[serde(default)]
    limits: BTreeMap<String, i64>,
    #[serde(default)]
    credits: BTreeMap<String, i64>,
    stripe_product: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPrice {
    product: String,
    currency: String,
    amount: i64,
    interval: Option<String>,
    interval_count: Option<u32>,
    trial_days: Option<u32>,
    nickname: Option<String>,
    #[serde(default = "yes")]
    active: bool,
    stripe_price: Option<String>,
    stripe_plan: Option<String>,
}

fn yes() -> bool {
    true
}

impl Catalog {
    pub fn load(path: &std::path::Path) -> Result<Self, CatalogError> {
        let display = path.display().to_string();
        let text = std::fs::read_to_string(path)
            .map_err(|source| CatalogError::Read { path: display.clone(), source })?;
        Self::parse(&text).map_err(|message| CatalogError::Invalid { path: display, message })
    }

    /// Parses and validates catalog text; the error names the offending entry.
    pub fn parse(text: &str) -> Result<Self, String> {
        let raw: RawCatalog = toml::from_str(text).map_err(|e| match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("line {line}: {}", e.message())
            }
            None => e.message().to_owned(),
        })?;
        let mut catalog = Catalog::default();
        let mut provider_ids = BTreeSet::new();
        let mut claim = |id: &Option<String>, owner: &str| -> Result<(), String> {
            match id {
                Some(id) if id.trim().is_empty() => Err(format!("{owner}: provider id is empty")),
                Some(id) if !provider_ids.insert(id.clone()) => {
                    Err(format!("{owner}: provider id {id:?} is used by two catalog entries"))
                }
                _ => Ok(()),
            }
        };

        for (key, p) in raw.products {
            let id = CatalogKey::parse(&key).map_err(|e| e.0)?;
            let owner = format!("product {id}");
            if p.name.trim().is_empty() {
                return Err(format!("{owner}: name is empty"));
            }
            for name in p.features.iter().chain(p.limits.keys()).chain(p.credits.keys()) {
                CatalogKey::parse(name).map_err(|e| format!("{owner}: entitlement {e}"))?;
            }
            if let Some((k, v)) = p.limits.iter().find(|(_, v)| **v < 0) {
                return Err(format!("{owner}: limit {k} is {v}; limits are 0 or more"));
            }
            if let Some((k, v)) = p.credits.iter().find(|(_, v)| **v <= 0) {
                return Err(format!("{owner}: credits {k} is {v}; credits granted must be positive"));
            }
            claim(&p.stripe_product, &owner)?;
            catalog.products.insert(
                id.clone(),
                Product {
                    id,
                    name: p.name,
                    description: p.description,
                    active: p.active,
                    grants: Grants { features: p.features, limits: p.limits, credits: p.credits },
                    stripe_product: p.stripe_product,
                },
            );
        }

        for (key, p) in raw.prices {
            let id = CatalogKey::parse(&key).map_err(|e| e.0)?;
            let owner = format!("price {id}");
            let product = CatalogKey::parse(&p.product).map_err(|e| format!("{owner}: {e}"))?;
            if !catalog.products.contains_key(&product) {
                return Err(format!(
                    "{owner}: product {:?} is not declared under [products]",
                    product.as_str()
                ));
            }
            if catalog.products.contains_key(&id) {
                return Err(format!("{owner}: a product already uses the key {:?}", id.as_str()));
            }
            let currency = Currency::parse(&p.currency).map_err(|e| format!("{owner}: {e}"))?;
            let unit_amount = MinorUnits::new(p.amount).map_err(|e| format!("{owner}: {e}"))?;
            let recurring = match (p.interval.as_deref(), p.interval_count) {
                (None, None) => None,
                (None, Some(_)) => return Err(format!("{owner}: interval_count needs an interval")),
                (Some(raw), count) => {
                    let interval = Interval::parse(raw).ok_or_else(|| {
                        format!("{owner}: interval {raw:?} is not one of day, week, month, year")
                    })?;
                    let count = count.unwrap_or(1);
                    if count == 0 || count > interval.max_count() {
                        return Err(format!(
                            "{owner}: interval_count must be 1 to {} for interval {raw}",
                            interval.max_count()
                        ));
                    }
                    Some(Recurring { interval, interval_count: count })
                }
            };
            if recurring.is_some() && !catalog.products[&product].grants.credits.is_empty() {
                // Credits are a balance bought once; a subscription grants
                // features and limits while it is active. Credits per period
                // would need a refill rule per invoice, which is not built.
                return Err(format!(
                    "{owner}: product {:?} grants credits, which are sold with one-time prices only",
                    product.as_str()
                ));
            }
            if recurring.is_none() && p.trial_days.is_some() {
                return Err(format!("{owner}: trial_days needs a recurring price"));
            }
            if p.trial_days.is_some_and(|d| d == 0 || d > 730) {
                return Err(format!("{owner}: trial_days must be 1 to 730"));
            }
            claim(&p.stripe_price, &owner)?;
            claim(&p.stripe_plan, &owner)?;
            catalog.prices.insert(
                id.clone(),
                Price {
                    id,
                    product,
                    currency,
                    unit_amount,
                    recurring,
                    trial_days: p.trial_days,
                    nickname: p.nickname,
                    active: p.active,
                    stripe_price: p.stripe_price,
                    stripe_plan: p.stripe_plan,
                },
            );
        }
        Ok(catalog)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = r#"
        [products.pro]
        name = "Pro"
        features = ["exports"]
        limits = { projects = 50 }

        [products.cards]
        name = "Card pack"
        credits = { cards = 5 }

        [prices.pro_monthly]
        product = "pro"
        currency = "usd"
        amount = 2500
        interval = "month"
        trial_days = 14

        [prices.cards_5]
        product = "cards"
        currency = "usd"
        amount = 500
    "#;

    #[test]
    fn parses_products_prices_and_grants() {
        let c = Catalog::parse(GOOD).unwrap();
        let pro = &c.products[&CatalogKey::parse("pro").unwrap()];
        assert!(pro.grants.features.contains("exports"));
        assert_eq!(pro.grants.limits["projects"], 50);
        let monthly = &c.prices[&CatalogKey::parse("pro_monthly").unwrap()];
        assert_eq!(monthly.recurring, Some(Recurring { interval: Interval::Month, interval_count: 1 }));
        assert!(c.prices[&CatalogKey::parse("cards_5").unwrap()].recurring.is_none());
    }

    #[test]
    fn the_shipped_example_catalog_is_valid() {
        let text = include_str!("../../tollgate.toml");
        let c = Catalog::parse(text).unwrap();
        assert!(!c.products.is_empty() && !c.prices.is_empty());
    }

    #[track_caller]
    fn rejects(text: &str, needle: &str) {
        let err = Catalog::parse(text).unwrap_err();
        assert!(err.contains(needle), "{err:?} should mention {needle:?}");
    }

    #[test]
    fn rejects_mistakes_naming_the_entry() {
        rejects("[products.pro]\nname = \"P\"\nfeaturs = []", "featurs");
        rejects(
            "[products.pro]\nname=\"P\"\n[prices.x]\nproduct=\"nope\"\ncurrency=\"usd\"\namount=1",
            "price x: product \"nope\"",
        );
        rejects(
            "[products.pro]\nname=\"P\"\n[prices.x]\nproduct=\"pro\"\ncurrency=\"usd\"\namount=-5",
            "price x",
        );
        rejects(
            "[products.pro]\nname=\"P\"\n[prices.x]\nproduct=\"pro\"\ncurrency=\"usd\"\namount=1.5",
            "line 6: invalid type: floating point `1.5`, expected i64",
        );
        rejects(
            "[products.pro]\nname=\"P\"\n[prices.x]\nproduct=\"pro\"\ncurrency=\"USD\"\namount=1",
            "currency",
        );
        rejects(
            "[products.pro]\nname=\"P\"\n[prices.x]\nproduct=\"pro\"\ncurrency=\"usd\"\namount=1\ninterval=\"month\"\ninterval_count=13",
            "interval_count",
        );
        rejects(
            "[products.pro]\nname=\"P\"\n[prices.x]\nproduct=\"pro\"\ncurrency=\"usd\"\namount=1\ntrial_days=3",
            "trial_days",
        );
        rejects("[products.pro]\nname=\"P\"\ncredits={cards=0}", "credits");
        rejects(
            "[products.pack]\nname=\"P\"\ncredits={cards=5}\n[prices.x]\nproduct=\"pack\"\ncurrency=\"usd\"\namount=1\ninterval=\"month\"",
            "one-time prices only",
        );
        rejects(
            "[products.a]\nname=\"A\"\nstripe_product=\"prod_1\"\n[products.b]\nname=\"B\"\nstripe_product=\"prod_1\"",
            "two catalog entries",
        );
        rejects("[products.Pro]\nname=\"P\"", "catalog key");
    }
}
