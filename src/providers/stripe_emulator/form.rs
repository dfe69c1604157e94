//! Stripe's request encoding: `application/x-www-form-urlencoded` with
//! bracketed keys (`metadata[plan]=pro`, `line_items[0][price]=price_1`,
//! `expand[]=customer`), decoded into a JSON tree of strings.
//!
//! Written here because the serde form crates either reject Stripe's
//! bracket syntax or flatten it differently (numeric keys become maps,
//! `[]` is unsupported), and the emulator must read exactly what Stripe's
//! SDKs send.

use serde_json::{Map, Value};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{message}")]
pub struct FormError {
    pub param: String,
    pub message: String,
}

const MAX_DEPTH: usize = 8;
const MAX_INDEX: usize = 1000;

/// Decodes a form body (or a query string) into nested objects and arrays.
/// Objects whose keys are all array indices become arrays, in index order.
pub fn decode(input: &str) -> Result<Value, FormError> {
    let mut root = Value::Object(Map::new());
    for (key, value) in form_urlencoded::parse(input.as_bytes()) {
        let path = split_key(&key)?;
        insert(&mut root, &path, value.into_owned(), &key)?;
    }
    Ok(normalise(root))
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Segment {
    Key(String),
    /// `[]`: append to an array.
    Push,
}

fn split_key(key: &str) -> Result<Vec<Segment>, FormError> {
    let bad = |why: &str| FormError {
        param: key.to_owned(),
        message: format!("Invalid parameter name {key:?}: {why}"),
    };
    let (head, mut rest) = match key.find('[') {
        Some(i) => (&key[..i], &key[i..]),
        None => (key, ""),
    };
    if head.is_empty() {
        return Err(bad("it must start with a name"));
    }
    let mut path = vec![Segment::Key(head.to_owned())];
    while !rest.is_empty() {
        let Some(inner) = rest.strip_prefix('[') else {
            return Err(bad("expected '['"));
        };
        let Some(close) = inner.find(']') else {
            return Err(bad("unclosed '['"));
        };
        let name = &inner[..close];
        path.push(if name.is_empty() { Segment::Push } else { Segment::Key(name.to_owned()) });
        rest = &inner[close + 1..];
        if path.len() > MAX_DEPTH {
            return Err(bad("nested too deeply"));
        }
    }
    Ok(path)
}

fn insert(node: &mut Value, path: &[Segment], value: String, key: &str) -> Result<(), FormError> {
    let conflict = || FormError {
        param: key.to_owned(),
        message: format!("Invalid parameter {key:?}: it conflicts with another parameter of the same name"),
    };
    let (first, rest) = path.split_first().expect("path is never empty");
    match first {
        Segment::Key(name) => {
            if let Ok(index) = name.parse::<usize>() {
                if index > MAX_INDEX {
                    return Err(FormError {
                        param: key.to_owned(),
                        message: format!("Invalid array index in {key:?}: at most {MAX_INDEX}"),
                    });
                }
            }
            let Value::Object(map) = node else { return Err(conflict()) };
            if rest.is_empty() {
                if map.contains_key(name) && !map[name].is_string() {
                    return Err(conflict());
                }
                map.insert(name.clone(), Value::String(value));
                return Ok(());
            }
            let child = map.entry(name.clone()).or_insert_with(|| match rest[0] {
                Segment::Push => Value::Array(Vec::new()),
                Segment::Key(_) => Value::Object(Map::new()),
            });
            insert(child, rest, value, key)
        }
        Segment::Push => {
            let Value::Array(items) = node else { return Err(conflict()) };
            if items.len() > MAX_INDEX {
                return Err(conflict());
            }
            if rest.is_empty() {
                items.push(Value::String(value));
                return Ok(());
            }
            // `a[][b]=1`: each such key starts a new element.
            let mut child = Value::Object(Map::new());
            insert(&mut child, rest, value, key)?;
            items.push(child);
            Ok(())
        }
    }
}

/// Turns `{"0": …, "1": …}` into `[…, …]`, recursively.
fn normalise(value: Value) -> Value {
    match value {
        Value::Object(map) => {
            let numeric = !map.is_empty() && map.keys().all(|k| k.parse::<usize>().is_ok());
            if numeric {
                let mut entries: Vec<(usize, Value)> =
                    map.into_iter().map(|(k, v)| (k.parse().unwrap_or(0), normalise(v))).collect();
                entries.sort_by_key(|(i, _)| *i);
                Value::Array(entries.into_iter().map(|(_, v)| v).collect())
            } else {
                Value::Object(map.into_iter().map(|(k, v)| (k, normalise(v))).collect())
            }
        }
        Value::Array(items) => Value::Array(items.into_iter().map(normalise).collect()),
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use serde_json::json;

    #[test]
    fn decodes_stripe_bracket_syntax() {
        let v = decode(
            "customer=cus_1&line_items[0][price]=price_a&line_items[0][quantity]=2\
             &line_items[1][price]=price_b&metadata[order]=42&expand[]=customer&expand[]=invoice\
             &mode=payment&name=Ada%20L%C3%B6vel%2Bace",
        )
        .unwrap();
        assert_eq!(
            v,
            json!({
                "customer": "cus_1",
                "line_items": [{"price": "price_a", "quantity": "2"}, {"price": "price_b"}],
                "metadata": {"order": "42"},
                "expand": ["customer", "invoice"],
                "mode": "payment",
                "name": "Ada Lövel+ace",
            })
        );
    }

    #[test]
    fn refuses_conflicting_and_malformed_keys() {
        assert!(decode("a=1&a[b]=2").is_err());
        assert!(decode("a[b]=1&a=2").is_err());
        assert!(decode("a[b=1").is_err());
        assert!(decode("[x]=1").is_err());
        assert!(decode("a[b]c=1").is_err());
        assert!(decode("a[5000]=1").is_err());
        assert!(decode(&format!("a{}=1", "[x]".repeat(10))).is_err());
    }

    #[test]
    fn empty_input_is_an_empty_object() {
        assert_eq!(decode("").unwrap(), json!({}));
    }

    proptest! {
        #[test]
        fn never_panics(input in ".{0,200}") {
            let _ = decode(&input);
        }

        #[test]
        fn flat_pairs_round_trip(pairs in proptest::collection::btree_map("[a-z_]{1,10}", ".{0,20}", 0..8)) {
            let encoded: String = form_urlencoded::Serializer::new(String::new()).extend_pairs(&pairs).finish();
            let v = decode(&encoded).unwrap();
            for (k, val) in &pairs {
                prop_assert_eq!(v[k].as_str(), Some(val.as_str()));
            }
        }
    }
}
