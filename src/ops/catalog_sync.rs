//! `tollgate catalog sync`: makes Stripe's products and prices match the
//! catalog file, and records which Stripe object each entry maps to.
//!
//! Idempotent: a second run finds everything as it should be and changes
//! nothing. Crash-safe: everything tollgate creates carries
//! `metadata[tollgate_product]` / `metadata[tollgate_price]`, and the current
//! price of an entry holds the lookup key `tollgate_<key>`, so a run that
//! stopped half-way finds what it created instead of creating it again.
//! Stripe prices are immutable: a changed amount, currency or interval means
//! a new price (the lookup key moves to it) and the old one deactivated,
//! kept linked so events about existing subscriptions still map.
//! Entries that name existing Stripe ids are checked, never created or
//! changed; any mismatch stops the sync before it changes anything. What
//! tollgate created for an entry since removed from the file is deactivated.

use std::collections::BTreeMap;

use serde_json::Value;

use crate::billing::catalog::{Catalog, Price, Product};
use crate::providers::stripe::{Form, StripeClient, StripeClientError};
use crate::store::audit::Actor;
use crate::store::Store;

#[derive(Debug, Default, Clone, PartialEq, Eq, serde::Serialize)]
pub struct SyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deactivated: Vec<String>,
    /// Declared Stripe ids found as the catalog describes them.
    pub checked: Vec<String>,
    /// Catalog entries whose current Stripe object changed in tollgate's mapping.
    pub linked: Vec<String>,
}

impl SyncReport {
    pub fn changed_provider(&self) -> bool {
        !(self.created.is_empty() && self.updated.is_empty() && self.deactivated.is_empty())
    }
}

impl std::fmt::Display for SyncReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (verb, items) in [
            ("created", &self.created),
            ("updated", &self.updated),
            ("deactivated", &self.deactivated),
            ("checked", &self.checked),
            ("linked", &self.linked),
        ] {
            for item in items {
                writeln!(f, "  {verb:<11} {item}")?;
            }
        }
        writeln!(
            f,
            "catalog sync: {} created, {} updated, {} deactivated, {} checked",
            self.created.len(),
            self.updated.len(),
            self.deactivated.len(),
            self.checked.len()
        )
    }
}

#[derive(Debug, thiserror::Error)]
pub enum CatalogSyncError {
    #[error("{}", .0.join("\n"))]
    Mismatch(Vec<String>),
    #[error("{entry}: {source}")]
    Stripe { entry: String, source: Box<StripeClientError> },
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

fn at(entry: impl Into<String>) -> impl FnOnce(StripeClientError) -> CatalogSyncError {
    let entry = entry.into();
    move |source| CatalogSyncError::Stripe { entry, source: Box::new(source) }
}

const PROVIDER: &str = "stripe";

pub fn lookup_key(price_key: &str) -> String {
    format!("tollgate_{price_key}")
}

/// Syncs the catalog to Stripe (after mirroring it into the database).
#[tracing::instrument(name = "ops.catalog_sync", skip_all)]
pub async fn sync_stripe(
    store: &Store,
    client: &StripeClient,
    catalog: &Catalog,
    actor: &Actor,
) -> Result<SyncReport, CatalogSyncError> {
    store.sync_catalog(catalog, actor).await?;
    let mut report = SyncReport::default();
    check_declared(client, catalog, &mut report).await?;

    let mut stripe_products: BTreeMap<&str, String> = BTreeMap::new();
    let all_products = client.list_all("/v1/products", &[]).await.map_err(at("listing products"))?;
    for product in catalog.products.values() {
        let key = product.id.as_str();
        if let Some(declared) = &product.stripe_product {
            stripe_products.insert(key, declared.clone());
            continue;
        }
        let id = sync_product(store, client, product, &all_products, &mut report).await?;
        if store.set_current_catalog_link(PROVIDER, "product", key, &id, actor).await? {
            report.linked.push(format!("product {key} → {id}"));
        }
        stripe_products.insert(key, id);
    }

    let all_prices = client.list_all("/v1/prices", &[]).await.map_err(at("listing prices"))?;
    for price in catalog.prices.values() {
        if price.stripe_price.is_some() || price.stripe_plan.is_some() {
            continue;
        }
        let key = price.id.as_str();
        let product_id = &stripe_products[price.product.as_str()];
        let id = sync_price(store, client, price, product_id, &all_prices, &mut report).await?;
        if store.set_current_catalog_link(PROVIDER, "price", key, &id, actor).await? {
            report.linked.push(format!("price {key} → {id}"));
        }
    }

    // Entries removed from the file stop being sold at Stripe too, as the
    // database mirror deactivates them (never deletes). Only what tollgate
    // made is touched: a declared id is the team's own object.
    let removed = [
        ("price", "/v1/prices", &all_prices, "tollgate_price"),
        ("product", "/v1/products", &all_products, "tollgate_product"),
    ];
    for (kind, path, all, tag) in removed {
        for object in all.iter().filter(|o| o["active"] == true) {
            let Some(key) = object["metadata"][tag].as_str() else { continue };
            let in_file = match kind {
                "price" => catalog.prices.keys().any(|k| k.as_str() == key),
                _ => catalog.products.keys().any(|k| k.as_str() == key),
            };
            if in_file {
                continue;
            }
            let entry = format!("{kind} {key}");
            let id = object_id(object, &entry)?;
            client
                .post(&format!("{path}/{id}"), &Form::new().set("active", false), None)
                .await
                .map_err(at(&entry))?;
            report.deactivated.push(format!("{entry} ({id}, no longer in the catalog)"));
        }
    }
    Ok(report)
}

/// Every declared id must exist and agree with the catalog; all problems
/// are reported together, before anything is changed.
async fn check_declared(
    client: &StripeClient,
    catalog: &Catalog,
    report: &mut SyncReport,
) -> Result<(), CatalogSyncError> {
    let mut problems = Vec::new();
    for product in catalog.products.values() {
        let Some(id) = &product.stripe_product else { continue };
        let entry = format!("product {}", product.id);
        match client.get(&format!("/v1/products/{id}"), &[]).await {
            Ok(_) => report.checked.push(format!("{entry} = {id}")),
            Err(StripeClientError::Api { status: 404, .. }) => {
                problems.push(format!("{entry}: stripe_product {id:?} does not exist at Stripe"))
            }
            Err(e) => return Err(at(entry)(e)),
        }
    }
    for price in catalog.prices.values() {
        let product = &catalog.products[&price.product];
        for (field, id) in [("stripe_price", &price.stripe_price), ("stripe_plan", &price.stripe_plan)] {
            let Some(id) = id else { continue };
            let entry = format!("price {}", price.id);
            // Stripe serves legacy plans through the prices API under their plan ids.
            match client.get(&format!("/v1/prices/{id}"), &[]).await {
                Ok(found) => {
                    let differences = differences(price, &found, product.stripe_product.as_deref());
                    if differences.is_empty() {
                        report.checked.push(format!("{entry} = {id}"));
                    } else {
                        problems.push(format!("{entry}: {field} {id:?} differs: {}", differences.join("; ")));
                    }
                }
                Err(StripeClientError::Api { status: 404, .. }) => {
                    problems.push(format!("{entry}: {field} {id:?} does not exist at Stripe"))
                }
                Err(e) => return Err(at(entry)(e)),
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CatalogSyncError::Mismatch(problems))
    }
}

/// How a Stripe price differs from a catalog price in what cannot change
/// on a Stripe price: product, currency, amount, one-time or interval.
fn differences(price: &Price, found: &Value, product: Option<&str>) -> Vec<String> {
    let mut out = Vec::new();
    if let Some(product) = product {
        if found["product"] != product {
            out.push(format!("product is {} at Stripe, {product} in the catalog", found["product"]));
        }
    }
    if found["currency"] != price.currency.as_str() {
        out.push(format!(
            "currency is {} at Stripe, {:?} in the catalog",
            found["currency"],
            price.currency.as_str()
        ));
    }
    if found["unit_amount"].as_i64() != Some(price.unit_amount.get()) {
        out.push(format!(
            "amount is {} at Stripe, {} in the catalog",
            found["unit_amount"],
            price.unit_amount.get()
        ));
    }
    let stripe_interval = found["recurring"]["interval"]
        .as_str()
        .map(|i| (i, found["recurring"]["interval_count"].as_i64().unwrap_or(1)));
    let catalog_interval = price.recurring.map(|r| (r.interval.as_str(), i64::from(r.interval_count)));
    if stripe_interval != catalog_interval {
        let show = |i: Option<(&str, i64)>| match i {
            None => "one-time".to_owned(),
            Some((interval, 1)) => format!("every {interval}"),
            Some((interval, n)) => format!("every {n} {interval}s"),
        };
        out.push(format!(
            "interval is {} at Stripe, {} in the catalog",
            show(stripe_interval),
            show(catalog_interval)
        ));
    }
    out
}

async fn sync_product(
    store: &Store,
    client: &StripeClient,
    product: &Product,
    all: &[Value],
    report: &mut SyncReport,
) -> Result<String, CatalogSyncError> {
    let key = product.id.as_str();
    let entry = format!("product {key}");
    let linked = store.current_catalog_link(PROVIDER, "product", key).await?;
    let existing = linked
        .as_deref()
        .and_then(|id| all.iter().find(|p| p["id"] == id))
        .or_else(|| all.iter().find(|p| p["metadata"]["tollgate_product"] == key));
    let Some(existing) = existing else {
        let form = Form::new()
            .set("name", &product.name)
            .set_opt("description", product.description.as_deref())
            .set("active", product.active)
            .metadata([("tollgate_product", key)]);
        let created = client.post("/v1/products", &form, None).await.map_err(at(&entry))?;
        let id = object_id(&created, &entry)?;
        report.created.push(format!("{entry} ({id})"));
        return Ok(id);
    };
    let id = object_id(existing, &entry)?;
    let mut form = Form::new();
    if existing["name"] != product.name.as_str() {
        form = form.set("name", &product.name);
    }
    if existing["description"].as_str() != product.description.as_deref() {
        form = form.set("description", product.description.as_deref().unwrap_or(""));
    }
    if existing["active"].as_bool() != Some(product.active) {
        form = form.set("active", product.active);
    }
    if existing["metadata"]["tollgate_product"] != key {
        form = form.metadata([("tollgate_product", key)]);
    }
    if form != Form::new() {
        client.post(&format!("/v1/products/{id}"), &form, None).await.map_err(at(&entry))?;
        report.updated.push(format!("{entry} ({id})"));
    }
    Ok(id)
}

async fn sync_price(
    store: &Store,
    client: &StripeClient,
    price: &Price,
    product_id: &str,
    all: &[Value],
    report: &mut SyncReport,
) -> Result<String, CatalogSyncError> {
    let key = price.id.as_str();
    let entry = format!("price {key}");
    let lookup = lookup_key(key);
    let linked = store.current_catalog_link(PROVIDER, "price", key).await?;
    let ours = |p: &&Value| {
        p["metadata"]["tollgate_price"] == key
            || p["lookup_key"] == lookup.as_str()
            || linked.as_deref().is_some_and(|l| p["id"] == l)
    };
    let fits = |p: &&Value| differences(price, p, Some(product_id)).is_empty();
    // The linked price if it still fits; else one tollgate made that fits (a
    // crashed run's, or the lookup key's holder); else a new one.
    let current = linked
        .as_deref()
        .and_then(|id| all.iter().find(|p| p["id"] == id))
        .filter(fits)
        .or_else(|| all.iter().filter(ours).filter(fits).find(|p| p["lookup_key"] == lookup.as_str()))
        .or_else(|| all.iter().filter(ours).filter(fits).rfind(|p| p["active"] == true));
    let id = match current {
        None => {
            let mut form = Form::new()
                .set("product", product_id)
                .set("currency", price.currency.as_str())
                .set("unit_amount", price.unit_amount.get())
                .set("active", price.active)
                .set_opt("nickname", price.nickname.as_deref())
                .set("lookup_key", &lookup)
                .set("transfer_lookup_key", true)
                .metadata([("tollgate_price", key)]);
            if let Some(r) = price.recurring {
                form = form
                    .set("recurring[interval]", r.interval.as_str())
                    .set("recurring[interval_count]", r.interval_count);
            }
            let created = client.post("/v1/prices", &form, None).await.map_err(at(&entry))?;
            let id = object_id(&created, &entry)?;
            report.created.push(format!("{entry} ({id})"));
            id
        }
        Some(existing) => {
            let id = object_id(existing, &entry)?;
            let mut form = Form::new();
            if existing["active"].as_bool() != Some(price.active) {
                form = form.set("active", price.active);
            }
            if existing["nickname"].as_str() != price.nickname.as_deref() {
                form = form.set("nickname", price.nickname.as_deref().unwrap_or(""));
            }
            if existing["lookup_key"] != lookup.as_str() {
                form = form.set("lookup_key", &lookup).set("transfer_lookup_key", true);
            }
            if existing["metadata"]["tollgate_price"] != key {
                form = form.metadata([("tollgate_price", key)]);
            }
            if form != Form::new() {
                client.post(&format!("/v1/prices/{id}"), &form, None).await.map_err(at(&entry))?;
                report.updated.push(format!("{entry} ({id})"));
            }
            id
        }
    };
    // Prices this entry had before (replaced, or duplicates a crash left)
    // stop being sold; they stay linked for the events that name them.
    for old in all.iter().filter(ours).filter(|p| p["id"] != id.as_str() && p["active"] == true) {
        let old_id = object_id(old, &entry)?;
        client
            .post(&format!("/v1/prices/{old_id}"), &Form::new().set("active", false), None)
            .await
            .map_err(at(&entry))?;
        report.deactivated.push(format!("{entry} ({old_id}, replaced by {id})"));
    }
    Ok(id)
}

fn object_id(object: &Value, entry: &str) -> Result<String, CatalogSyncError> {
    object["id"].as_str().map(str::to_owned).ok_or_else(|| CatalogSyncError::Stripe {
        entry: entry.to_owned(),
        source: Box::new(StripeClientError::Decode("an object without an id".to_owned())),
    })
}
