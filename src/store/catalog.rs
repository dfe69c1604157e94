//! The catalog as stored: a mirror of `tollgate.toml`, so that orders and
//! grants can reference products and prices with foreign keys, and so that
//! provider ids resolve to catalog entries.

use std::collections::BTreeMap;

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, Listed, Page, SqlxResultExt, Store, StoreResult};
use crate::billing::catalog::{Catalog, Grants, Interval, Recurring};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ProductRecord {
    pub id: String,
    pub name: String,
    pub description: Option<String>,
    pub active: bool,
    pub grants: Grants,
    pub provider_ids: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct PriceRecord {
    pub id: String,
    pub product: String,
    pub currency: String,
    pub unit_amount: i64,
    pub recurring: Option<Recurring>,
    pub trial_days: Option<i64>,
    pub nickname: Option<String>,
    pub active: bool,
    pub provider_ids: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct ProductRow {
    id: String,
    name: String,
    description: Option<String>,
    active: bool,
    grants: String,
    created_at: i64,
    updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct PriceRow {
    id: String,
    product_id: String,
    currency: String,
    unit_amount: i64,
    kind: String,
    recurring_interval: Option<String>,
    interval_count: Option<i64>,
    trial_days: Option<i64>,
    nickname: Option<String>,
    active: bool,
    created_at: i64,
    updated_at: i64,
}

impl PriceRow {
    fn into_record(self, provider_ids: BTreeMap<String, String>) -> StoreResult<PriceRecord> {
        let recurring = match (self.kind.as_str(), self.recurring_interval.as_deref()) {
            ("recurring", Some(interval)) => Some(Recurring {
                interval: Interval::parse(interval)
                    .ok_or_else(|| super::StoreError::Corrupt(format!("price {}: bad interval", self.id)))?,
                interval_count: self.interval_count.unwrap_or(1) as u32,
            }),
            _ => None,
        };
        Ok(PriceRecord {
            id: self.id,
            product: self.product_id,
            currency: self.currency,
            unit_amount: self.unit_amount,
            recurring,
            trial_days: self.trial_days,
            nickname: self.nickname,
            active: self.active,
            provider_ids,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// What a sync changed, for the operator's output.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct CatalogSyncReport {
    pub created: Vec<String>,
    pub updated: Vec<String>,
    pub deactivated: Vec<String>,
}

impl CatalogSyncReport {
    pub fn is_noop(&self) -> bool {
        self.created.is_empty() && self.updated.is_empty() && self.deactivated.is_empty()
    }
}

const PRODUCT_COLUMNS: &str = "id, name, description, active, grants, created_at, updated_at";
const PRICE_COLUMNS: &str =
    "id, product_id, currency, unit_amount, kind, recurring_interval, interval_count, \
     trial_days, nickname, active, created_at, updated_at";

impl Store {
    /// Makes the stored catalog equal the file: entries are created or
    /// updated, and entries no longer in the file are deactivated, never
    /// deleted, because orders and grants keep pointing at them. One
    /// transaction, one audit entry per change; running it twice changes
    /// nothing the second time.
    pub async fn sync_catalog(&self, catalog: &Catalog, actor: &Actor) -> StoreResult<CatalogSyncReport> {
        let now = now_unix();
        let mut report = CatalogSyncReport::default();
        let mut tx = self.begin().await?;
        // Instances starting together must not both plan the same changes:
        // the audit head row is the one lock every writer of history takes
        // (SQLite's writer is already exclusive).
        if tx.kind() == super::DbKind::Postgres {
            sql!(tx, query("SELECT seq FROM audit_head WHERE id = 1 FOR UPDATE").execute).db()?;
        }

        let existing: Vec<ProductRow> =
            sql!(tx, query_as::<ProductRow>(&format!("SELECT {PRODUCT_COLUMNS} FROM products")).fetch_all)
                .db()?;
        let existing: BTreeMap<String, ProductRow> =
            existing.into_iter().map(|r| (r.id.clone(), r)).collect();
        for product in catalog.products.values() {
            let id = product.id.as_str();
            let grants = serde_json::to_string(&product.grants)?;
            let action = match existing.get(id) {
                None => "catalog.product.created",
                Some(row)
                    if row.name == product.name
                        && row.description == product.description
                        && row.active == product.active
                        && serde_json::from_str::<Grants>(&row.grants).ok().as_ref()
                            == Some(&product.grants) =>
                {
                    continue
                }
                Some(_) => "catalog.product.updated",
            };
            sql!(
                tx,
                query(
                    "INSERT INTO products (id, name, description, active, grants, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $6) \
                     ON CONFLICT (id) DO UPDATE SET name = excluded.name, description = excluded.description, \
                     active = excluded.active, grants = excluded.grants, updated_at = excluded.updated_at",
                    id,
                    &product.name,
                    &product.description,
                    product.active,
                    &grants,
                    now
                )
                .execute
            )
            .db()?;
            record(
                &mut tx,
                actor,
                action,
                "product",
                id,
                serde_json::json!({
                    "name": product.name, "active": product.active, "grants": product.grants
                }),
            )
            .await?;
            push(&mut report, action, format!("product {id}"));
        }
        for (id, row) in &existing {
            if row.active && !catalog.products.keys().any(|k| k.as_str() == id) {
                deactivate(&mut tx, "products", id, now).await?;
                record(&mut tx, actor, "catalog.product.deactivated", "product", id, serde_json::json!({}))
                    .await?;
                report.deactivated.push(format!("product {id}"));
            }
        }

        let existing: Vec<PriceRow> =
            sql!(tx, query_as::<PriceRow>(&format!("SELECT {PRICE_COLUMNS} FROM prices")).fetch_all).db()?;
        let existing: BTreeMap<String, PriceRow> = existing.into_iter().map(|r| (r.id.clone(), r)).collect();
        for price in catalog.prices.values() {
            let id = price.id.as_str();
            let kind = if price.recurring.is_some() { "recurring" } else { "one_time" };
            let interval = price.recurring.map(|r| r.interval.as_str());
            let count = price.recurring.map(|r| i64::from(r.interval_count));
            let trial = price.trial_days.map(i64::from);
            let action = match existing.get(id) {
                None => "catalog.price.created",
                Some(row)
                    if row.product_id == price.product.as_str()
                        && row.currency == price.currency.as_str()
                        && row.unit_amount == price.unit_amount.get()
                        && row.kind == kind
                        && row.recurring_interval.as_deref() == interval
                        && row.interval_count == count
                        && row.trial_days == trial
                        && row.nickname == price.nickname
                        && row.active == price.active =>
                {
                    continue
                }
                Some(_) => "catalog.price.updated",
            };
            sql!(
                tx,
                query(
                    "INSERT INTO prices (id, product_id, currency, unit_amount, kind, recurring_interval, interval_count, \
                     trial_days, nickname, active, created_at, updated_at) \
                     VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $11) \
                     ON CONFLICT (id) DO UPDATE SET product_id = excluded.product_id, currency = excluded.currency, \
                     unit_amount = excluded.unit_amount, kind = excluded.kind, recurring_interval = excluded.recurring_interval, \
                     interval_count = excluded.interval_count, trial_days = excluded.trial_days, nickname = excluded.nickname, \
                     active = excluded.active, updated_at = excluded.updated_at",
                    id,
                    price.product.as_str(),
                    price.currency.as_str(),
                    price.unit_amount.get(),
                    kind,
                    interval,
                    count,
                    trial,
                    &price.nickname,
                    price.active,
                    now
                )
                .execute
            )
            .db()?;
            record(
                &mut tx,
                actor,
                action,
                "price",
                id,
                serde_json::json!({
                    "product": price.product, "currency": price.currency, "unit_amount": price.unit_amount,
                    "recurring": price.recurring, "trial_days": price.trial_days, "active": price.active
                }),
            )
            .await?;
            push(&mut report, action, format!("price {id}"));
        }
        for (id, row) in &existing {
            if row.active && !catalog.prices.keys().any(|k| k.as_str() == id) {
                deactivate(&mut tx, "prices", id, now).await?;
                record(&mut tx, actor, "catalog.price.deactivated", "price", id, serde_json::json!({}))
                    .await?;
                report.deactivated.push(format!("price {id}"));
            }
        }

        // Provider ids declared in the file: the file wins for the ids it names.
        let declared = catalog
            .products
            .values()
            .filter_map(|p| p.stripe_product.as_ref().map(|s| (s, "product", p.id.as_str())))
            .chain(catalog.prices.values().flat_map(|p| {
                [
                    p.stripe_price.as_ref().map(|s| (s, "price", p.id.as_str())),
                    p.stripe_plan.as_ref().map(|s| (s, "plan", p.id.as_str())),
                ]
                .into_iter()
                .flatten()
            }));
        for (provider_id, kind, catalog_id) in declared {
            let changed = sql!(
                tx,
                query(
                    "INSERT INTO provider_catalog_links (provider, provider_id, kind, catalog_id, created_at) \
                     VALUES ('stripe', $1, $2, $3, $4) \
                     ON CONFLICT (provider, provider_id) DO UPDATE SET kind = excluded.kind, catalog_id = excluded.catalog_id, \
                     superseded_at = NULL \
                     WHERE provider_catalog_links.kind <> excluded.kind OR provider_catalog_links.catalog_id <> excluded.catalog_id \
                     OR provider_catalog_links.superseded_at IS NOT NULL",
                    provider_id,
                    kind,
                    catalog_id,
                    now
                )
                .execute
            )
            .db()?;
            if changed > 0 {
                tx.catalog_changed();
                record(
                    &mut tx,
                    actor,
                    "catalog.provider_link.set",
                    kind,
                    catalog_id,
                    serde_json::json!({
                        "provider": "stripe", "provider_id": provider_id
                    }),
                )
                .await?;
                report.updated.push(format!("{kind} {catalog_id} ↔ stripe {provider_id}"));
            }
        }

        tx.commit().await?;
        Ok(report)
    }

    pub async fn list_products(
        &self,
        page: &Page,
        active: Option<bool>,
    ) -> StoreResult<Listed<ProductRecord>> {
        let (op, order) = if page.is_backwards() { ("<", "DESC") } else { (">", "ASC") };
        let sql = format!(
            "SELECT {PRODUCT_COLUMNS} FROM products WHERE ($1 IS NULL OR id {op} $1) AND ($2 IS NULL OR active = $2) \
             ORDER BY id {order} LIMIT $3"
        );
        let rows: Vec<ProductRow> =
            sql!(self, query_as::<ProductRow>(&sql, page.cursor(), active, page.fetch_limit()).fetch_all)
                .db()?;
        let listed = page.finish(rows);
        let mut links = self.catalog_links("product").await?;
        let data = listed
            .data
            .into_iter()
            .map(|r| {
                Ok(ProductRecord {
                    grants: serde_json::from_str(&r.grants)?,
                    provider_ids: links.remove(&r.id).unwrap_or_default(),
                    id: r.id,
                    name: r.name,
                    description: r.description,
                    active: r.active,
                    created_at: r.created_at,
                    updated_at: r.updated_at,
                })
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Listed { data, has_more: listed.has_more })
    }

    pub async fn list_prices(&self, page: &Page, filter: &PriceFilter) -> StoreResult<Listed<PriceRecord>> {
        self.ensure_cursor("prices", page).await?;
        let (op, order) = if page.is_backwards() { ("<", "DESC") } else { (">", "ASC") };
        let sql = format!(
            "SELECT {PRICE_COLUMNS} FROM prices WHERE ($1 IS NULL OR id {op} $1) AND ($2 IS NULL OR active = $2) \
             AND ($3 IS NULL OR product_id = $3) AND ($4 IS NULL OR kind = $4) ORDER BY id {order} LIMIT $5"
        );
        let rows: Vec<PriceRow> = sql!(
            self,
            query_as::<PriceRow>(
                &sql,
                page.cursor(),
                filter.active,
                filter.product.as_deref(),
                filter.kind.as_deref(),
                page.fetch_limit()
            )
            .fetch_all
        )
        .db()?;
        let listed = page.finish(rows);
        let mut links = self.catalog_links("price").await?;
        let data = listed
            .data
            .into_iter()
            .map(|r| {
                let ids = links.remove(&r.id).unwrap_or_default();
                r.into_record(ids)
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Listed { data, has_more: listed.has_more })
    }

    /// catalog id → provider → provider id, for one kind of entry.
    async fn catalog_links(&self, kind: &str) -> StoreResult<BTreeMap<String, BTreeMap<String, String>>> {
        let rows: Vec<(String, String, String)> = sql!(
            self,
            query_as::<(String, String, String)>(
                "SELECT catalog_id, provider, provider_id FROM provider_catalog_links \
                 WHERE kind = $1 AND superseded_at IS NULL",
                kind
            )
            .fetch_all
        )
        .db()?;
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        for (catalog_id, provider, provider_id) in rows {
            out.entry(catalog_id).or_default().insert(provider, provider_id);
        }
        Ok(out)
    }
}

impl Store {
    /// The provider id a catalog entry currently maps to, if any.
    pub async fn current_catalog_link(
        &self,
        provider: &str,
        kind: &str,
        catalog_id: &str,
    ) -> StoreResult<Option<String>> {
        sql!(
            self,
            query_scalar::<String>(
                "SELECT provider_id FROM provider_catalog_links WHERE provider = $1 AND kind = $2 \
                 AND catalog_id = $3 AND superseded_at IS NULL ORDER BY created_at DESC, provider_id LIMIT 1",
                provider,
                kind,
                catalog_id
            )
            .fetch_optional
        )
        .db()
    }

    /// Makes `provider_id` the current provider object of a catalog entry
    /// (after `catalog sync` created or found it). Earlier ids stay linked,
    /// marked superseded, so events about them still map. One transaction
    /// with its audit entry; `false` when it was already so.
    pub async fn set_current_catalog_link(
        &self,
        provider: &str,
        kind: &str,
        catalog_id: &str,
        provider_id: &str,
        actor: &Actor,
    ) -> StoreResult<bool> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let linked = sql!(
            tx,
            query(
                "INSERT INTO provider_catalog_links (provider, provider_id, kind, catalog_id, created_at, superseded_at) \
                 VALUES ($1, $2, $3, $4, $5, NULL) \
                 ON CONFLICT (provider, provider_id) DO UPDATE SET kind = excluded.kind, catalog_id = excluded.catalog_id, \
                 superseded_at = NULL \
                 WHERE provider_catalog_links.kind <> excluded.kind OR provider_catalog_links.catalog_id <> excluded.catalog_id \
                 OR provider_catalog_links.superseded_at IS NOT NULL",
                provider,
                provider_id,
                kind,
                catalog_id,
                now
            )
            .execute
        )
        .db()?;
        let superseded = sql!(
            tx,
            query(
                "UPDATE provider_catalog_links SET superseded_at = $1 WHERE provider = $2 AND kind = $3 \
                 AND catalog_id = $4 AND provider_id <> $5 AND superseded_at IS NULL",
                now,
                provider,
                kind,
                catalog_id,
                provider_id
            )
            .execute
        )
        .db()?;
        if linked + superseded == 0 {
            return Ok(false);
        }
        tx.catalog_changed();
        record(
            &mut tx,
            actor,
            "catalog.provider_link.set",
            kind,
            catalog_id,
            serde_json::json!({ "provider": provider, "provider_id": provider_id, "superseded": superseded }),
        )
        .await?;
        tx.commit().await?;
        Ok(true)
    }
}

#[derive(Debug, Clone, Default)]
pub struct PriceFilter {
    pub active: Option<bool>,
    pub product: Option<String>,
    /// `one_time` or `recurring`.
    pub kind: Option<String>,
}

fn push(report: &mut CatalogSyncReport, action: &str, what: String) {
    if action.ends_with(".created") {
        report.created.push(what);
    } else {
        report.updated.push(what);
    }
}

async fn deactivate(tx: &mut super::Tx, table: &str, id: &str, now: i64) -> StoreResult<()> {
    let sql = format!("UPDATE {table} SET active = FALSE, updated_at = $1 WHERE id = $2");
    sql!(tx, query(&sql, now, id).execute).db()?;
    Ok(())
}

async fn record(
    tx: &mut super::Tx,
    actor: &Actor,
    action: &str,
    object_type: &str,
    object_id: &str,
    data: serde_json::Value,
) -> StoreResult<()> {
    audit::append(tx, AuditRecord { actor, action, object_type, object_id, data, request_id: None }).await
}
