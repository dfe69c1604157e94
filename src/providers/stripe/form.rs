//! Request bodies in Stripe's form encoding: flat pairs whose keys carry the
//! nesting in brackets (`metadata[plan]=pro`, `line_items[0][price]=…`,
//! `enabled_events[]=…`).
//!
//! Built as explicit pairs rather than by serialising structs: the serde
//! form crates do not produce Stripe's indexed-array and `[]` syntax (see
//! the emulator's `form.rs`), and explicit keys make every parameter tollgate
//! sends greppable.

/// An ordered list of parameters; encoded by reqwest (serde_urlencoded).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Form(Vec<(String, String)>);

impl Form {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn set(mut self, key: impl Into<String>, value: impl ToString) -> Self {
        self.0.push((key.into(), value.to_string()));
        self
    }

    pub fn set_opt(self, key: impl Into<String>, value: Option<impl ToString>) -> Self {
        match value {
            Some(v) => self.set(key, v),
            None => self,
        }
    }

    /// `metadata[k]=v` for each pair.
    pub fn metadata<K: AsRef<str>, V: ToString>(mut self, pairs: impl IntoIterator<Item = (K, V)>) -> Self {
        for (k, v) in pairs {
            self = self.set(format!("metadata[{}]", k.as_ref()), v);
        }
        self
    }

    /// `name[]=item` for each item: an array parameter.
    pub fn list<V: ToString>(mut self, name: &str, items: impl IntoIterator<Item = V>) -> Self {
        for item in items {
            self = self.set(format!("{name}[]"), item);
        }
        self
    }

    /// `name[i][field]=value` for each item's fields: an array of objects
    /// (`line_items[0][price]`, `line_items[0][quantity]`).
    pub fn objects<'a>(
        mut self,
        name: &str,
        items: impl IntoIterator<Item = &'a [(&'a str, String)]>,
    ) -> Self {
        for (i, fields) in items.into_iter().enumerate() {
            for (field, value) in fields {
                self = self.set(format!("{name}[{i}][{field}]"), value);
            }
        }
        self
    }

    pub fn pairs(&self) -> &[(String, String)] {
        &self.0
    }

    pub fn encode(&self) -> String {
        serde_urlencoded::to_string(&self.0).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::providers::stripe_emulator::form::decode;

    #[test]
    fn bracketed_keys_round_trip_through_stripes_decoding() {
        let form = Form::new()
            .set("mode", "subscription")
            .objects(
                "line_items",
                [
                    &[("price", "price_1".to_owned()), ("quantity", "2".to_owned())][..],
                    &[("price", "price_2".to_owned())][..],
                ],
            )
            .metadata([("tollgate_price", "pro_monthly"), ("a b&c", "x=y")])
            .list("enabled_events", ["invoice.paid", "customer.created"])
            .set_opt("description", None::<&str>);
        let decoded = decode(&form.encode()).unwrap();
        assert_eq!(
            decoded,
            serde_json::json!({
                "mode": "subscription",
                "line_items": [{"price": "price_1", "quantity": "2"}, {"price": "price_2"}],
                "metadata": {"tollgate_price": "pro_monthly", "a b&c": "x=y"},
                "enabled_events": ["invoice.paid", "customer.created"],
            })
        );
    }
}
