//! Money: integer minor units and a currency, never floats.

use std::fmt;

use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct InvalidMoney(pub String);

/// A lowercase ISO 4217 code, as Stripe writes it (`usd`, `eur`, `jpy`).
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Currency(String);

impl Currency {
    pub fn parse(raw: &str) -> Result<Self, InvalidMoney> {
        if raw.len() == 3 && raw.chars().all(|c| c.is_ascii_lowercase()) {
            Ok(Self(raw.to_owned()))
        } else {
            Err(InvalidMoney(format!(
                "{raw:?} is not a currency: use a three-letter lowercase ISO code such as \"usd\""
            )))
        }
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl TryFrom<String> for Currency {
    type Error = InvalidMoney;
    fn try_from(value: String) -> Result<Self, Self::Error> {
        Self::parse(&value)
    }
}

impl From<Currency> for String {
    fn from(value: Currency) -> Self {
        value.0
    }
}

impl fmt::Display for Currency {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A non-negative amount in the currency's smallest unit (cents for `usd`,
/// yen for `jpy`). The ceiling is Stripe's: 12 digits.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(try_from = "i64", into = "i64")]
pub struct MinorUnits(i64);

impl MinorUnits {
    pub const MAX: i64 = 999_999_999_999;
    pub const ZERO: MinorUnits = MinorUnits(0);

    pub fn new(amount: i64) -> Result<Self, InvalidMoney> {
        if (0..=Self::MAX).contains(&amount) {
            Ok(Self(amount))
        } else {
            Err(InvalidMoney(format!(
                "amount must be an integer number of minor units between 0 and {}",
                Self::MAX
            )))
        }
    }

    pub fn get(self) -> i64 {
        self.0
    }

    pub fn checked_add(self, other: MinorUnits) -> Option<MinorUnits> {
        self.0.checked_add(other.0).and_then(|v| Self::new(v).ok())
    }

    pub fn checked_sub(self, other: MinorUnits) -> Option<MinorUnits> {
        self.0.checked_sub(other.0).and_then(|v| Self::new(v).ok())
    }

    pub fn checked_mul(self, quantity: i64) -> Option<MinorUnits> {
        self.0.checked_mul(quantity).and_then(|v| Self::new(v).ok())
    }
}

impl TryFrom<i64> for MinorUnits {
    type Error = InvalidMoney;
    fn try_from(value: i64) -> Result<Self, Self::Error> {
        Self::new(value)
    }
}

impl From<MinorUnits> for i64 {
    fn from(value: MinorUnits) -> Self {
        value.0
    }
}

/// An amount together with its currency: `{"amount": 2500, "currency": "usd"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, utoipa::ToSchema)]
pub struct Money {
    /// Integer minor units (cents for usd).
    #[schema(value_type = i64, minimum = 0, example = 2500)]
    pub amount: MinorUnits,
    /// Lowercase ISO 4217 code.
    #[schema(value_type = String, example = "usd")]
    pub currency: Currency,
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn currency_is_three_lowercase_letters() {
        assert!(Currency::parse("usd").is_ok());
        assert!(Currency::parse("USD").is_err());
        assert!(Currency::parse("us").is_err());
        assert!(Currency::parse("usd1").is_err());
    }

    #[test]
    fn money_rejects_negative_and_float_amounts() {
        assert!(serde_json::from_str::<Money>(r#"{"amount":-1,"currency":"usd"}"#).is_err());
        assert!(serde_json::from_str::<Money>(r#"{"amount":10.5,"currency":"usd"}"#).is_err());
        let m: Money = serde_json::from_str(r#"{"amount":2500,"currency":"usd"}"#).unwrap();
        assert_eq!(m.amount.get(), 2500);
    }

    proptest! {
        #[test]
        fn arithmetic_stays_in_range(a in 0..=MinorUnits::MAX, b in 0..=MinorUnits::MAX, q in 0i64..1000) {
            let (a, b) = (MinorUnits::new(a).unwrap(), MinorUnits::new(b).unwrap());
            if let Some(sum) = a.checked_add(b) { prop_assert!(sum.get() <= MinorUnits::MAX); }
            match a.checked_sub(b) {
                Some(diff) => prop_assert_eq!(diff.get(), a.get() - b.get()),
                None => prop_assert!(a < b),
            }
            if let Some(p) = a.checked_mul(q) { prop_assert_eq!(p.get(), a.get() * q); }
        }
    }
}
