//! The emulator's memory: Stripe objects as JSON, in creation order, with
//! the events they produced and the deliveries still owed.
//!
//! Objects are kept as `serde_json::Value` in Stripe's own shapes: the
//! emulator's job is to say what Stripe would say, and a JSON tree lets every
//! field Stripe returns be returned without a Rust type per resource.

use std::collections::{HashMap, VecDeque};
use std::time::Instant;

use rand::Rng;
use serde_json::{json, Map, Value};

use super::error::{StripeError, StripeResult};
use super::CURRENT_API_VERSION;

const ID_ALPHABET: &[u8] = b"0123456789ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz";

/// A Stripe-looking id: `cus_` and 24 random characters.
pub fn new_id(prefix: &str) -> String {
    let mut rng = rand::thread_rng();
    let tail: String = (0..24).map(|_| ID_ALPHABET[rng.gen_range(0..ID_ALPHABET.len())] as char).collect();
    format!("{prefix}_{tail}")
}

pub fn real_now() -> i64 {
    crate::store::now_unix()
}

/// An event delivery owed to an endpoint.
#[derive(Debug, Clone)]
pub struct Delivery {
    pub endpoint_id: String,
    pub event_id: String,
    pub attempt: u32,
    pub due: Instant,
}

#[derive(Debug, Clone)]
pub struct StoredResponse {
    pub fingerprint: String,
    pub status: u16,
    pub body: Value,
}

#[derive(Default, Clone)]
pub struct State {
    objects: HashMap<String, Value>,
    /// Object type → ids in creation order.
    order: HashMap<String, Vec<String>>,
    /// (api key, Idempotency-Key) → the first response.
    pub idempotency: HashMap<(String, String), StoredResponse>,
    /// Payment method id → card number. Kept apart from the object, which
    /// like Stripe's only shows `last4`.
    pub cards: HashMap<String, String>,
    pub deliveries: VecDeque<Delivery>,
    /// Deliveries being attempted, by a number of their own: still owed
    /// until answered, so a state saved meanwhile keeps them.
    pub in_flight: HashMap<u64, Delivery>,
    next_flight: u64,
    /// Checkout session id → its line items (Stripe returns them only on
    /// request).
    pub line_items: HashMap<String, Vec<Value>>,
    /// Subscription id → proration lines waiting for the next invoice.
    pub pending_invoice_items: HashMap<String, Vec<Value>>,
    /// Set by the delivery knobs; read when queueing.
    pub duplicate_deliveries: bool,
}

impl State {
    /// A state holding these objects (as saved by [`State::objects_and_order`]).
    pub fn from_objects(objects: HashMap<String, Value>, order: HashMap<String, Vec<String>>) -> Self {
        State { objects, order, ..State::default() }
    }

    /// Takes the objects and their creation order out, for saving a copy.
    pub fn take_objects_and_order(&mut self) -> (HashMap<String, Value>, HashMap<String, Vec<String>>) {
        (std::mem::take(&mut self.objects), std::mem::take(&mut self.order))
    }

    /// How many objects there are (events included).
    pub fn object_count(&self) -> usize {
        self.objects.len()
    }

    /// Moves a delivery into flight and returns its number.
    pub fn start_flight(&mut self, delivery: Delivery) -> u64 {
        self.next_flight += 1;
        self.in_flight.insert(self.next_flight, delivery);
        self.next_flight
    }

    pub fn insert(&mut self, object: Value) -> Value {
        let id = object["id"].as_str().expect("objects have ids").to_owned();
        let kind = object["object"].as_str().expect("objects have a type").to_owned();
        if !self.objects.contains_key(&id) {
            self.order.entry(kind).or_default().push(id.clone());
        }
        self.objects.insert(id, object.clone());
        object
    }

    pub fn get(&self, id: &str) -> Option<&Value> {
        self.objects.get(id)
    }

    pub fn get_mut(&mut self, id: &str) -> Option<&mut Value> {
        self.objects.get_mut(id)
    }

    /// The object with this id and type, or Stripe's 404.
    pub fn fetch(&self, kind: &str, id: &str, param: &str) -> StripeResult<Value> {
        match self.objects.get(id) {
            Some(o) if o["object"] == kind => Ok(o.clone()),
            _ => Err(StripeError::no_such(&kind.replace(['.', '_'], " "), id, param)),
        }
    }

    pub fn remove(&mut self, id: &str) -> Option<Value> {
        let removed = self.objects.remove(id)?;
        if let Some(ids) = removed["object"].as_str().and_then(|k| self.order.get_mut(k)) {
            ids.retain(|i| i != id);
        }
        Some(removed)
    }

    /// All objects of a type, oldest first.
    pub fn all(&self, kind: &str) -> Vec<&Value> {
        self.order
            .get(kind)
            .map(|ids| ids.iter().filter_map(|i| self.objects.get(i)).collect())
            .unwrap_or_default()
    }

    /// Updates fields of a stored object and returns the new version along
    /// with Stripe's `previous_attributes` for the event.
    pub fn update(&mut self, id: &str, changes: Map<String, Value>) -> (Value, Value) {
        let object = self.objects.get_mut(id).expect("updated objects exist");
        let mut previous = Map::new();
        for (k, v) in changes {
            let old = object.get(&k).cloned().unwrap_or(Value::Null);
            if old != v {
                previous.insert(k.clone(), old);
                object[&k] = v;
            }
        }
        (object.clone(), Value::Object(previous))
    }

    /// The time as seen by a customer: its test clock's frozen time if it has
    /// one, otherwise the wall clock.
    pub fn now_for_customer(&self, customer: Option<&str>) -> i64 {
        customer
            .and_then(|c| self.objects.get(c))
            .and_then(|c| c["test_clock"].as_str())
            .and_then(|clock| self.objects.get(clock))
            .and_then(|clock| clock["frozen_time"].as_i64())
            .unwrap_or_else(real_now)
    }

    /// Records an event and queues its delivery to every endpoint that wants it.
    pub fn emit(&mut self, kind: &str, object: &Value, previous: Option<Value>, created: i64) -> String {
        let id = new_id("evt");
        let mut object = object.clone();
        strip_private(&mut object);
        let mut data = json!({ "object": object });
        if let Some(prev) = previous.filter(|p| p.as_object().is_some_and(|m| !m.is_empty())) {
            data["previous_attributes"] = prev;
        }
        let endpoints: Vec<String> = self
            .all("webhook_endpoint")
            .into_iter()
            .filter(|e| e["status"] == "enabled")
            .filter(|e| {
                e["enabled_events"].as_array().is_some_and(|evs| evs.iter().any(|ev| ev == "*" || ev == kind))
            })
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect();
        let event = json!({
            "id": id,
            "object": "event",
            "api_version": CURRENT_API_VERSION,
            "created": created,
            "data": data,
            "livemode": false,
            "pending_webhooks": endpoints.len(),
            "request": { "id": null, "idempotency_key": null },
            "type": kind,
            // Retention follows the wall clock, whatever a test clock says.
            "_stored_at": real_now(),
        });
        self.insert(event);
        let copies = if self.duplicate_deliveries { 2 } else { 1 };
        for endpoint_id in endpoints {
            for _ in 0..copies {
                self.deliveries.push_back(Delivery {
                    endpoint_id: endpoint_id.clone(),
                    event_id: id.clone(),
                    attempt: 0,
                    due: Instant::now(),
                });
            }
        }
        id
    }

    /// Drops events older than Stripe's 30-day retention.
    pub fn prune_events(&mut self, now: i64) {
        let cutoff = now - 30 * 86_400;
        let old: Vec<String> = self
            .all("event")
            .into_iter()
            .filter(|e| e["_stored_at"].as_i64().is_some_and(|c| c < cutoff))
            .filter_map(|e| e["id"].as_str().map(str::to_owned))
            .collect();
        for id in old {
            self.remove(&id);
        }
    }
}

/// Stripe's list envelope over `items` (oldest first), newest first, with
/// `limit`, `starting_after` and `ending_before`.
pub fn list(
    url: &str,
    items: Vec<Value>,
    limit: Option<i64>,
    after: Option<&str>,
    before: Option<&str>,
) -> StripeResult<Value> {
    let limit = limit.unwrap_or(10);
    if !(1..=100).contains(&limit) {
        return Err(StripeError::param("limit", "Invalid limit: must be between 1 and 100"));
    }
    let limit = limit as usize;
    let mut newest_first: Vec<Value> = items;
    newest_first.reverse();
    let position = |id: &str, param: &str| {
        newest_first
            .iter()
            .position(|o| o["id"] == id)
            .ok_or_else(|| StripeError::param(param, format!("No such object: '{id}'")))
    };
    let (page, has_more) = match (after, before) {
        (Some(_), Some(_)) => {
            return Err(StripeError::invalid(
                "You may only specify one of these parameters: starting_after, ending_before.",
            ))
        }
        (Some(id), None) => {
            let start = position(id, "starting_after")? + 1;
            let rest = &newest_first[start..];
            (rest.iter().take(limit).cloned().collect::<Vec<_>>(), rest.len() > limit)
        }
        (None, Some(id)) => {
            let end = position(id, "ending_before")?;
            let begin = end.saturating_sub(limit);
            (newest_first[begin..end].to_vec(), begin > 0)
        }
        (None, None) => (newest_first.iter().take(limit).cloned().collect(), newest_first.len() > limit),
    };
    Ok(json!({ "object": "list", "data": page, "has_more": has_more, "url": url }))
}

/// Removes the emulator's bookkeeping fields (`_…`) from an object tree
/// before Stripe's clients see it.
pub fn strip_private(value: &mut Value) {
    match value {
        Value::Object(map) => {
            map.retain(|k, _| !k.starts_with('_'));
            map.values_mut().for_each(strip_private);
        }
        Value::Array(items) => items.iter_mut().for_each(strip_private),
        _ => {}
    }
}
