//! Typed access to a decoded Stripe request, with Stripe's messages for
//! missing, unknown and malformed parameters.

use serde_json::{Map, Value};

use super::error::{StripeError, StripeResult};

#[derive(Debug, Clone, Default)]
pub struct Params(pub Map<String, Value>);

impl Params {
    pub fn new(value: Value) -> Self {
        match value {
            Value::Object(map) => Params(map),
            _ => Params(Map::new()),
        }
    }

    /// Refuses any top-level parameter not in `allowed` (`expand` is always
    /// allowed), as Stripe does.
    pub fn allow(&self, allowed: &[&str]) -> StripeResult<()> {
        match self.0.keys().find(|k| *k != "expand" && !allowed.contains(&k.as_str())) {
            Some(unknown) => Err(StripeError::unknown(unknown)),
            None => Ok(()),
        }
    }

    pub fn str(&self, key: &str) -> StripeResult<Option<&str>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) => Ok(Some(s.as_str())),
            Some(_) => Err(StripeError::param(key, format!("Invalid string: {key} must be a string"))),
        }
    }

    /// A non-empty string; Stripe treats `key=` as "unset".
    pub fn nonempty(&self, key: &str) -> StripeResult<Option<&str>> {
        Ok(self.str(key)?.filter(|s| !s.is_empty()))
    }

    pub fn required(&self, key: &str) -> StripeResult<&str> {
        self.nonempty(key)?.ok_or_else(|| StripeError::missing(key))
    }

    pub fn int(&self, key: &str) -> StripeResult<Option<i64>> {
        match self.nonempty(key)? {
            None => Ok(None),
            Some(s) => s
                .parse::<i64>()
                .map(Some)
                .map_err(|_| StripeError::param(key, format!("Invalid integer: {s}"))),
        }
    }

    pub fn bool(&self, key: &str) -> StripeResult<Option<bool>> {
        match self.nonempty(key)? {
            None => Ok(None),
            Some("true") => Ok(Some(true)),
            Some("false") => Ok(Some(false)),
            Some(s) => Err(StripeError::param(key, format!("Invalid boolean: {s}"))),
        }
    }

    /// A `key[sub]=value` hash of strings (metadata). Stripe limits: 50 keys,
    /// keys up to 40 characters, values up to 500.
    pub fn metadata(&self, key: &str) -> StripeResult<Option<Map<String, Value>>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::String(s)) if s.is_empty() => Ok(Some(Map::new())),
            Some(Value::Object(map)) => {
                if map.len() > 50 {
                    return Err(StripeError::param(key, "Invalid metadata: at most 50 keys"));
                }
                for (k, v) in map {
                    if k.chars().count() > 40 {
                        return Err(StripeError::param(
                            &format!("{key}[{k}]"),
                            "Metadata keys can be at most 40 characters",
                        ));
                    }
                    match v {
                        Value::String(s) if s.chars().count() <= 500 => {}
                        _ => {
                            return Err(StripeError::param(
                                &format!("{key}[{k}]"),
                                "Metadata values must be strings of at most 500 characters",
                            ))
                        }
                    }
                }
                Ok(Some(map.clone()))
            }
            Some(_) => Err(StripeError::param(key, "Invalid hash")),
        }
    }

    pub fn object(&self, key: &str) -> StripeResult<Option<Params>> {
        match self.0.get(key) {
            None => Ok(None),
            Some(Value::Object(map)) => Ok(Some(Params(map.clone()))),
            Some(_) => Err(StripeError::param(key, "Invalid hash")),
        }
    }

    /// An array parameter (`items[0][price]=…` or `events[]=…`).
    pub fn array(&self, key: &str) -> StripeResult<Vec<Value>> {
        match self.0.get(key) {
            None => Ok(Vec::new()),
            Some(Value::Array(items)) => Ok(items.clone()),
            Some(Value::String(s)) if s.is_empty() => Ok(Vec::new()),
            Some(_) => Err(StripeError::param(key, "Invalid array")),
        }
    }

    pub fn expand(&self) -> Vec<String> {
        self.array("expand")
            .unwrap_or_default()
            .into_iter()
            .filter_map(|v| v.as_str().map(str::to_owned))
            .collect()
    }

    /// Merges query-string parameters (GET) into the body's.
    pub fn merge(&mut self, other: Params) {
        self.0.extend(other.0);
    }
}
