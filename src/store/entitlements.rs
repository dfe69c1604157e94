//! Fulfilment (grants per paid order line, revoked and restored as the
//! order's status moves), the credits ledger, and the stored entitlements
//! document with its version.
//!
//! Everything here runs inside the transaction of the change that caused
//! it, so a grant, its ledger entries, the new entitlements version and the
//! `entitlements.updated` event commit together or not at all.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::audit::{self, Actor, AuditRecord};
use super::cache::{CacheKey, CustomerEntitlements, Lookup, Ticket};
use super::events::{emit, NewEvent};
use super::orders::Cause;
use super::{now_unix, sql, DbKind, SqlxResultExt, Store, StoreError, StoreResult, Tx};
use crate::billing::catalog::Grants;
use crate::billing::entitlements::{self, Entitlements, GrantState, Policy, SubscriptionSource};
use crate::ids::{new_id, ExternalId};

#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, sqlx::FromRow)]
pub struct GrantRow {
    pub id: String,
    pub customer_id: String,
    pub order_id: String,
    pub line_no: i64,
    pub product_id: String,
    pub quantity: i64,
    pub grants: String,
    pub status: String,
    pub revoked_at: Option<i64>,
    pub revoke_reason: Option<String>,
    pub created_at: i64,
}

const GRANT_COLUMNS: &str =
    "id, customer_id, order_id, line_no, product_id, quantity, grants, status, revoked_at, revoke_reason, created_at";

impl GrantRow {
    pub fn json(&self) -> serde_json::Value {
        json!({
            "id": self.id, "object": "grant", "order": self.order_id, "line": self.line_no,
            "product": self.product_id, "quantity": self.quantity,
            "grants": serde_json::from_str::<serde_json::Value>(&self.grants).unwrap_or_default(),
            "status": self.status, "revoked_at": self.revoked_at, "revoke_reason": self.revoke_reason,
        })
    }
}

pub async fn grants_of_order(tx: &mut Tx, order_id: &str) -> StoreResult<Vec<GrantRow>> {
    let sql = format!("SELECT {GRANT_COLUMNS} FROM grants WHERE order_id = $1 ORDER BY line_no");
    sql!(tx, query_as::<GrantRow>(&sql, order_id).fetch_all).db()
}

/// Brings an order's grants in line with its status: creates them once when
/// it is paid (unique per order line), revokes or restores them as refunds
/// and disputes move it, and adjusts credits through ledger entries. Returns
/// whether grants were created now (the order is fulfilled).
pub async fn sync_order_grants(tx: &mut Tx, cause: Cause<'_>, order_id: &str) -> StoreResult<bool> {
    let (customer_id, status, amount_total, amount_refunded): (String, String, i64, i64) = sql!(
        tx,
        query_as::<(String, String, i64, i64)>(
            "SELECT customer_id, status, amount_total, amount_refunded FROM orders WHERE id = $1",
            order_id
        )
        .fetch_one
    )
    .db()?;
    let state = entitlements::grant_state(&status, amount_refunded, amount_total, cause.policy);
    if state == GrantState::NotYet {
        return Ok(false);
    }
    let mut grants = grants_of_order(tx, order_id).await?;
    let mut created = false;
    if grants.is_empty() {
        created = create_grants(tx, cause, order_id, &customer_id).await?;
        grants = grants_of_order(tx, order_id).await?;
    }
    let mut changed = created;
    for grant in &grants {
        let want = if state == GrantState::Revoked { "revoked" } else { "active" };
        if grant.status != want {
            changed = true;
            let now = now_unix();
            let (revoked_at, reason) =
                if want == "revoked" { (Some(now), Some(status.as_str())) } else { (None, None) };
            sql!(
                tx,
                query(
                    "UPDATE grants SET status = $1, revoked_at = $2, revoke_reason = $3, updated_at = $4 WHERE id = $5",
                    want,
                    revoked_at,
                    reason,
                    now,
                    &grant.id
                )
                .execute
            )
            .db()?;
            let action = if want == "revoked" { "grant.revoked" } else { "grant.restored" };
            audit::append(
                tx,
                AuditRecord {
                    actor: cause.actor,
                    action,
                    object_type: "grant",
                    object_id: &grant.id,
                    data: json!({ "order": order_id, "order_status": status }),
                    request_id: None,
                },
            )
            .await?;
        }
        let frozen: Grants = serde_json::from_str(&grant.grants)?;
        for (key, granted) in &frozen.credits {
            let target =
                entitlements::credits_to_revoke(*granted, state, amount_refunded, amount_total, cause.policy);
            changed |= adjust_revoked_credits(tx, grant, key, target).await?;
        }
    }
    if changed {
        recompute_later(tx, &customer_id, cause.provider_event_id, cause.actor, cause.policy);
    }
    Ok(created)
}

async fn create_grants(
    tx: &mut Tx,
    cause: Cause<'_>,
    order_id: &str,
    customer_id: &str,
) -> StoreResult<bool> {
    let lines: Vec<(i64, Option<String>, i64)> = sql!(
        tx,
        query_as::<(i64, Option<String>, i64)>(
            "SELECT line_no, product_id, quantity FROM order_lines WHERE order_id = $1 ORDER BY line_no",
            order_id
        )
        .fetch_all
    )
    .db()?;
    let now = now_unix();
    let mut any = false;
    for (line_no, product_id, quantity) in lines {
        // A line whose price is not in the catalog grants nothing (doctor
        // lists such ids); it is still part of the order.
        let Some(product_id) = product_id else { continue };
        let product_grants: String = sql!(
            tx,
            query_scalar::<String>("SELECT grants FROM products WHERE id = $1", &product_id).fetch_one
        )
        .db()?;
        let grants = entitlements::grants_for_quantity(&serde_json::from_str(&product_grants)?, quantity);
        if grants.is_empty() {
            continue;
        }
        let id = new_id("grt");
        let inserted = sql!(
            tx,
            query(
                "INSERT INTO grants (id, customer_id, order_id, line_no, product_id, quantity, grants, status, created_at, updated_at) \
                 VALUES ($1, $2, $3, $4, $5, $6, $7, 'active', $8, $8) ON CONFLICT (order_id, line_no) DO NOTHING",
                &id,
                customer_id,
                order_id,
                line_no,
                &product_id,
                quantity,
                serde_json::to_string(&grants)?,
                now
            )
            .execute
        )
        .db()?;
        if inserted == 0 {
            continue;
        }
        any = true;
        for (key, amount) in &grants.credits {
            ledger_entry(tx, customer_id, key, *amount, "grant", Some(&id), &format!("grant:{id}:{key}"))
                .await?;
        }
        audit::append(
            tx,
            AuditRecord {
                actor: cause.actor,
                action: "grant.created",
                object_type: "grant",
                object_id: &id,
                data: json!({ "order": order_id, "line": line_no, "product": product_id, "grants": grants }),
                request_id: None,
            },
        )
        .await?;
    }
    Ok(any)
}

/// Moves the credits taken back from `grant` under `key` to `target`, by
/// appending a revoke or restore entry for the difference.
async fn adjust_revoked_credits(tx: &mut Tx, grant: &GrantRow, key: &str, target: i64) -> StoreResult<bool> {
    let (revoked, entries): (Option<i64>, i64) = sql!(
        tx,
        query_as::<(Option<i64>, i64)>(
            "SELECT CAST(-SUM(amount) AS BIGINT), COUNT(*) FROM credit_ledger WHERE grant_id = $1 AND balance_key = $2 \
             AND kind IN ('revoke', 'restore')",
            &grant.id,
            key
        )
        .fetch_one
    )
    .db()?;
    let revoked = revoked.unwrap_or(0);
    if revoked == target {
        return Ok(false);
    }
    let kind = if target > revoked { "revoke" } else { "restore" };
    let entry_key = format!("adjust:{}:{key}:{}", grant.id, entries + 1);
    ledger_entry(tx, &grant.customer_id, key, revoked - target, kind, Some(&grant.id), &entry_key).await?;
    Ok(true)
}

async fn ledger_entry(
    tx: &mut Tx,
    customer_id: &str,
    key: &str,
    amount: i64,
    kind: &str,
    grant_id: Option<&str>,
    entry_key: &str,
) -> StoreResult<bool> {
    let inserted = sql!(
        tx,
        query(
            "INSERT INTO credit_ledger (id, customer_id, balance_key, amount, kind, grant_id, entry_key, created_at) \
             VALUES ($1, $2, $3, $4, $5, $6, $7, $8) ON CONFLICT (customer_id, entry_key) DO NOTHING",
            new_id("cle"),
            customer_id,
            key,
            amount,
            kind,
            grant_id,
            entry_key,
            now_unix()
        )
        .execute
    )
    .db()?;
    Ok(inserted == 1)
}

/// The stored entitlements of a customer: its version and document.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredEntitlements {
    pub version: i64,
    pub entitlements: Entitlements,
    pub updated_at: i64,
}

/// A customer whose entitlements sources this transaction changed: their
/// document is recomputed when the transaction writes what it holds (see
/// [`recompute_due`]), once however many changes it made.
#[derive(Debug, Clone)]
pub(crate) struct DueRecompute {
    customer_id: String,
    provider_event_id: Option<String>,
    actor: Actor,
    policy: Policy,
}

/// Notes that `customer_id`'s entitlements sources changed in `tx`. The
/// document is recomputed when the transaction next writes what it holds
/// (before a savepoint, a merge, an event written at once, or at commit),
/// together with every other customer the transaction changed: an inbox
/// batch then reads and writes the documents of its customers in a few
/// statements instead of two per event, and a customer changed twice in
/// one transaction gets one new version, not two.
pub fn recompute_later(
    tx: &mut Tx,
    customer_id: &str,
    provider_event_id: Option<&str>,
    actor: &Actor,
    policy: &Policy,
) {
    let due = DueRecompute {
        customer_id: customer_id.to_owned(),
        provider_event_id: provider_event_id.map(str::to_owned),
        actor: actor.clone(),
        policy: *policy,
    };
    // The latest change names the cause of the new version.
    match tx.entitlements_due.iter_mut().find(|d| d.customer_id == customer_id) {
        Some(existing) => *existing = due,
        None => tx.entitlements_due.push(due),
    }
}

/// Recomputes a customer's entitlements from their sources now (with any
/// other recomputation `tx` has due); if the result differs from what is
/// stored, stores it under the next version and announces
/// `entitlements.updated`.
pub async fn recompute_entitlements(
    tx: &mut Tx,
    customer_id: &str,
    provider_event_id: Option<&str>,
    actor: &Actor,
    policy: &Policy,
) -> StoreResult<StoredEntitlements> {
    recompute_later(tx, customer_id, provider_event_id, actor, policy);
    let mut done = recompute_due(tx).await?;
    done.remove(customer_id)
        .ok_or_else(|| StoreError::Corrupt(format!("customer {customer_id} was not recomputed")))
}

/// Recomputes the entitlements of every customer `tx` has due (see
/// [`recompute_later`]): their sources in one statement, the changed
/// documents in one more per 64, each change under the next version
/// with its `entitlements.updated` event and audit entry. Answers what each
/// customer's document is now. (A merge writes what is due before it
/// moves a placeholder's sources; the placeholder, if the application was
/// told its entitlements, is due again afterwards, for its last version.)
pub(crate) async fn recompute_due(
    tx: &mut Tx,
) -> StoreResult<std::collections::HashMap<String, StoredEntitlements>> {
    // The sources read below, and the events written after this, need the
    // rows held back.
    tx.write_deferred().await?;
    if tx.entitlements_due.is_empty() {
        return Ok(Default::default());
    }
    let mut due = std::mem::take(&mut tx.entitlements_due);
    // Locks are taken in id order, the same in every transaction.
    due.sort_by(|a, b| a.customer_id.cmp(&b.customer_id));
    let now = now_unix();
    let ids: Vec<&str> = due.iter().map(|d| d.customer_id.as_str()).collect();
    // Serialise recomputations of one customer (PostgreSQL; SQLite has one
    // writer): the later one reads what the earlier one committed. The
    // customer row always exists, unlike a first entitlements row, and every
    // writer of a customer's entitlements (this, a debit, a merge) locks it
    // first. It is locked in a statement of its own: the sources must be
    // read after the lock is granted (a statement that locked and joined at
    // once would, after waiting, still see the entitlements row as it was
    // before the other transaction's commit, and number a version twice).
    // The external id names the cache entry a change invalidates.
    let mut locked: std::collections::HashMap<String, String> = Default::default();
    if tx.kind() == DbKind::Postgres {
        let listed = super::in_json_ids(tx.kind(), "id", "$1");
        let sql = format!("SELECT id, external_id FROM customers WHERE {listed} ORDER BY id FOR UPDATE");
        let rows: Vec<(String, String)> =
            sql!(tx, fresh query_as::<(String, String)>(&sql, serde_json::to_string(&ids)?).fetch_all)
                .db()?;
        locked.extend(rows);
    }
    let mut sources = read_sources(tx, &ids, tx.kind() == DbKind::Sqlite).await?;
    let mut products = BTreeMap::new();
    let mut done = std::collections::HashMap::with_capacity(due.len());
    let mut changed: Vec<(&DueRecompute, i64, String, Entitlements, String)> = Vec::new();
    for d in &due {
        let found = sources.remove(&d.customer_id);
        let external_id = match (tx.kind(), &found) {
            (DbKind::Postgres, Some(_)) => locked.remove(&d.customer_id),
            (DbKind::Sqlite, Some(found)) => found.external_id.clone(),
            (_, None) => None,
        };
        let (Some(found), Some(external_id)) = (found, external_id) else {
            // Customers are only ever soft-deleted: a missing row is a bug
            // worth seeing, not a reason to fail the whole transaction.
            tracing::error!(customer = %d.customer_id, "entitlements due for a customer that does not exist; skipped");
            continue;
        };
        let derived = derive_sources(tx, &found, &mut products, &d.policy, now).await?;
        let document = serde_json::to_string(&derived)?;
        match &found.stored {
            Some((version, doc, updated_at)) if *doc == document => {
                done.insert(
                    d.customer_id.clone(),
                    StoredEntitlements { version: *version, entitlements: derived, updated_at: *updated_at },
                );
            }
            stored => {
                let version = stored.as_ref().map(|(v, _, _)| v + 1).unwrap_or(1);
                changed.push((d, version, document, derived, external_id));
            }
        }
    }
    for chunk in super::events::chunked(&changed) {
        let rows = super::value_rows(tx.kind(), chunk.len(), 4);
        let sql = format!(
            "INSERT INTO entitlements (customer_id, version, document, updated_at) VALUES {rows} \
             ON CONFLICT (customer_id) DO UPDATE SET version = excluded.version, document = excluded.document, \
             updated_at = excluded.updated_at"
        );
        macro_rules! bind_rows {
            ($query:expr) => {{
                let mut q = $query;
                for (d, version, document, _, _) in chunk {
                    q = q.bind(&d.customer_id).bind(*version).bind(document).bind(now);
                }
                q
            }};
        }
        match tx.exec() {
            super::Exec::Sqlite(c) => bind_rows!(sqlx::query(&sql)).execute(c).await.map(|_| ()),
            super::Exec::Postgres(c) => bind_rows!(sqlx::query(&sql)).execute(c).await.map(|_| ()),
        }
        .db()?;
    }
    for (d, version, _, derived, external_id) in changed {
        tx.invalidate(CacheKey::Customer(external_id));
        let customer_id = d.customer_id.as_str();
        emit(
            tx,
            NewEvent {
                event_type: "entitlements.updated",
                customer_id: Some(customer_id),
                object_type: "entitlements",
                object_id: customer_id,
                provider_event_id: d.provider_event_id.as_deref(),
                data: json!({ "object": "entitlements", "customer": customer_id, "version": version, "entitlements": derived }),
                dedupe_key: Some(format!("entitlements.updated:{customer_id}:{version}")),
            },
        )
        .await?;
        audit::append(
            tx,
            AuditRecord {
                actor: &d.actor,
                action: "entitlements.updated",
                object_type: "customer",
                object_id: customer_id,
                data: json!({ "version": version }),
                request_id: None,
            },
        )
        .await?;
        done.insert(
            d.customer_id.clone(),
            StoredEntitlements { version, entitlements: derived, updated_at: now },
        );
    }
    Ok(done)
}

/// One customer's entitlement sources as stored, before derivation.
#[derive(Debug, Default)]
struct Sources {
    /// The customer's external id, when asked for.
    external_id: Option<String>,
    /// The stored document: version, document, when updated.
    stored: Option<(i64, String, i64)>,
    /// Live subscriptions: status, past due since, items.
    subscriptions: Vec<(String, Option<i64>, String)>,
    /// Active grants' documents.
    grants: Vec<String>,
    balances: BTreeMap<String, i64>,
}

/// The entitlement sources of `customer_ids`, with each stored document
/// (and the customer's external id if `with_customer`), in one statement
/// whatever their number: every statement is a round trip (on SQLite to
/// the one writer's thread). Writes nothing.
async fn read_sources(
    tx: &mut Tx,
    customer_ids: &[&str],
    with_customer: bool,
) -> StoreResult<std::collections::HashMap<String, Sources>> {
    let mut out: std::collections::HashMap<String, Sources> = Default::default();
    if customer_ids.is_empty() {
        return Ok(out);
    }
    // Each source's rows of the listed customers, `x`: on PostgreSQL each
    // customer looked up in the source's index on its own (a lateral
    // subquery the planner cannot flatten), so the plan does not depend on
    // the tables' sizes and the statement is kept prepared (planned at each
    // run, it was PostgreSQL's largest planning cost in the delivery
    // loadtest; see `super::provider_rows_in`).
    let kind = tx.kind();
    let of_listed = |outer: &str, inner: &str, column: &str| match kind {
        super::DbKind::Sqlite => format!(
            "SELECT {outer} FROM ({}) x",
            inner.replace("{listed}", &format!("{column} IN (SELECT value FROM json_each($1))"))
        ),
        super::DbKind::Postgres => format!(
            "SELECT {outer} FROM jsonb_array_elements_text(CAST($1 AS JSONB)) AS listed(id) \
             CROSS JOIN LATERAL ({} OFFSET 0) x",
            inner.replace("{listed}", &format!("{column} = listed.id"))
        ),
    };
    // Tagged by source, each in its own order: the customer and its stored
    // document, live subscriptions and active grants by id, balances by key.
    let mut branches = vec![
        of_listed(
            "x.customer_id AS customer, 's' AS source, x.id AS ord, x.status AS label, \
             x.past_due_since AS amount, x.items AS document, CAST(NULL AS BIGINT) AS at",
            "SELECT customer_id, id, status, past_due_since, items FROM subscriptions \
             WHERE {listed} AND status IN ('active', 'trialing', 'past_due')",
            "customer_id",
        ),
        of_listed(
            "x.customer_id, 'g', x.id, NULL, NULL, x.grants, NULL",
            "SELECT customer_id, id, grants FROM grants WHERE {listed} AND status = 'active'",
            "customer_id",
        ),
        of_listed(
            "x.customer_id, 'b', x.balance_key, x.balance_key, x.amount, NULL, NULL",
            "SELECT customer_id, balance_key, CAST(SUM(amount) AS BIGINT) AS amount FROM credit_ledger \
             WHERE {listed} GROUP BY customer_id, balance_key",
            "customer_id",
        ),
        of_listed(
            "x.customer_id, 'e', x.customer_id, NULL, x.version, x.document, x.updated_at",
            "SELECT customer_id, version, document, updated_at FROM entitlements WHERE {listed}",
            "customer_id",
        ),
    ];
    if with_customer {
        branches.push(of_listed(
            "x.id, 'c', x.id, x.external_id, NULL, NULL, NULL",
            "SELECT id, external_id FROM customers WHERE {listed}",
            "id",
        ));
    }
    let sql = format!(
        "SELECT customer, source, label, amount, document, at FROM ({}) sources ORDER BY customer, source, ord",
        branches.join(" UNION ALL ")
    );
    type SourceRow = (String, String, Option<String>, Option<i64>, Option<String>, Option<i64>);
    let rows: Vec<SourceRow> =
        sql!(tx, query_as::<SourceRow>(&sql, serde_json::to_string(customer_ids)?).fetch_all).db()?;
    for (customer, source, label, amount, document, at) in rows {
        let s = out.entry(customer).or_default();
        match source.as_str() {
            "s" => s.subscriptions.push((label.unwrap_or_default(), amount, document.unwrap_or_default())),
            "g" => s.grants.push(document.unwrap_or_default()),
            "b" => {
                s.balances.insert(label.unwrap_or_default(), amount.unwrap_or(0));
            }
            "e" => s.stored = Some((amount.unwrap_or(0), document.unwrap_or_default(), at.unwrap_or(0))),
            _ => s.external_id = label,
        }
    }
    if !with_customer {
        // Without the customer rows, a customer with no sources at all is
        // still one (PostgreSQL's lock said which exist).
        for id in customer_ids {
            out.entry((*id).to_owned()).or_default();
        }
    }
    Ok(out)
}

/// What `sources` grant at `now`. `products` keeps each product's grants
/// read so far, so a recomputation of many customers reads each once.
async fn derive_sources(
    tx: &mut Tx,
    sources: &Sources,
    products: &mut BTreeMap<String, Grants>,
    policy: &Policy,
    now: i64,
) -> StoreResult<Entitlements> {
    let mut subscriptions = Vec::new();
    for (status, past_due_since, items) in &sources.subscriptions {
        let items: Vec<serde_json::Value> = serde_json::from_str(items)?;
        let mut granted = Vec::new();
        for item in items {
            let Some(product) = item["product"].as_str() else { continue };
            if !products.contains_key(product) {
                let g: Option<String> = sql!(
                    tx,
                    query_scalar::<String>("SELECT grants FROM products WHERE id = $1", product)
                        .fetch_optional
                )
                .db()?;
                products.insert(
                    product.to_owned(),
                    g.map(|g| serde_json::from_str(&g)).transpose()?.unwrap_or_default(),
                );
            }
            granted.push((products[product].clone(), item["quantity"].as_i64().unwrap_or(1)));
        }
        subscriptions.push(SubscriptionSource {
            status: status.clone(),
            past_due_since: *past_due_since,
            items: granted,
        });
    }
    let active =
        sources.grants.iter().map(|g| serde_json::from_str::<Grants>(g)).collect::<Result<Vec<_>, _>>()?;
    Ok(entitlements::derive(&subscriptions, &active, &sources.balances, now, policy))
}

/// Why a debit was refused.
#[derive(Debug, thiserror::Error)]
pub enum DebitError {
    #[error("insufficient balance: {balance} available")]
    Insufficient { balance: i64 },
    #[error(transparent)]
    Store(#[from] StoreError),
}

impl From<sqlx::Error> for DebitError {
    fn from(e: sqlx::Error) -> Self {
        DebitError::Store(StoreError::from_sqlx(e))
    }
}

impl Store {
    /// What an entitlement check reads: the customer an external id names
    /// and its stored entitlements (`None`: no such customer). Answered
    /// from memory when the cache may serve (see [`super::cache`]);
    /// writes never read through here, they read in their transaction.
    pub async fn customer_entitlements(
        &self,
        external: &ExternalId,
    ) -> StoreResult<Option<Arc<CustomerEntitlements>>> {
        let ticket = match self.cache.lookup(&self.cache.entitlements, external.as_str()) {
            Some(Lookup::Hit(found)) => return Ok(Some(found)),
            Some(Lookup::Miss(ticket)) => Some(ticket),
            None => None,
        };
        // Boxed: the queries' state would otherwise be allocated and moved
        // with every check's future, hits included.
        Box::pin(self.read_customer_entitlements(external, ticket)).await
    }

    async fn read_customer_entitlements(
        &self,
        external: &ExternalId,
        ticket: Option<Ticket>,
    ) -> StoreResult<Option<Arc<CustomerEntitlements>>> {
        // Unknown customers are not cached: creating one invalidates nothing.
        let Some(customer) = self.get_customer(external).await? else { return Ok(None) };
        let stored = self.entitlements(&customer.id).await?;
        let found = Arc::new(CustomerEntitlements { customer_id: customer.id, stored });
        if let Some(ticket) = ticket {
            self.cache.entitlements.fill(external.as_str().to_owned(), ticket, found.clone());
        }
        Ok(Some(found))
    }

    /// The stored entitlements (version 0 and nothing for a customer who
    /// never had any).
    pub async fn entitlements(&self, customer_id: &str) -> StoreResult<StoredEntitlements> {
        let row: Option<(i64, String, i64)> = sql!(
            self,
            query_as::<(i64, String, i64)>(
                "SELECT version, document, updated_at FROM entitlements WHERE customer_id = $1",
                customer_id
            )
            .fetch_optional
        )
        .db()?;
        Ok(match row {
            Some((version, doc, updated_at)) => {
                StoredEntitlements { version, entitlements: serde_json::from_str(&doc)?, updated_at }
            }
            None => StoredEntitlements { version: 0, entitlements: Entitlements::default(), updated_at: 0 },
        })
    }

    pub async fn grants_for_customer(&self, customer_id: &str) -> StoreResult<Vec<GrantRow>> {
        let sql = format!("SELECT {GRANT_COLUMNS} FROM grants WHERE customer_id = $1 ORDER BY id");
        sql!(self, query_as::<GrantRow>(&sql, customer_id).fetch_all).db()
    }

    /// Consumes `amount` credits of `key` atomically: never below zero, and
    /// once per `entry_key` (a retried debit returns the same outcome
    /// without consuming twice). Returns the new entitlements.
    pub async fn debit_balance(
        &self,
        customer_id: &str,
        key: &str,
        amount: i64,
        entry_key: &str,
        actor: &Actor,
        policy: &Policy,
    ) -> Result<StoredEntitlements, DebitError> {
        let mut tx = self.begin().await?;
        // The customer's row first, then its entitlements row: the order in
        // which `recompute_entitlements` (and so every inbox apply) takes
        // them, so a debit and an apply for one customer queue instead of
        // deadlocking. Concurrent debits of one customer queue here too.
        if tx.kind() == DbKind::Postgres {
            sql!(tx, query("SELECT 1 FROM customers WHERE id = $1 FOR UPDATE", customer_id).execute)?;
        }
        let now = now_unix();
        sql!(
            tx,
            query(
                "INSERT INTO entitlements (customer_id, version, document, updated_at) VALUES ($1, 0, '{}', $2) \
                 ON CONFLICT (customer_id) DO NOTHING",
                customer_id,
                now
            )
            .execute
        )?;
        if tx.kind() == DbKind::Postgres {
            sql!(
                tx,
                query("SELECT 1 FROM entitlements WHERE customer_id = $1 FOR UPDATE", customer_id).execute
            )?;
        }
        let done: Option<i64> = sql!(
            tx,
            query_scalar::<i64>(
                "SELECT amount FROM credit_ledger WHERE customer_id = $1 AND entry_key = $2",
                customer_id,
                entry_key
            )
            .fetch_optional
        )?;
        if done.is_none() {
            let balance: Option<i64> = sql!(
                tx,
                query_scalar::<Option<i64>>(
                    "SELECT CAST(SUM(amount) AS BIGINT) FROM credit_ledger WHERE customer_id = $1 AND balance_key = $2",
                    customer_id,
                    key
                )
                .fetch_one
            )?;
            let balance = balance.unwrap_or(0);
            if balance < amount {
                return Err(DebitError::Insufficient { balance });
            }
            ledger_entry(&mut tx, customer_id, key, -amount, "debit", None, entry_key).await?;
            audit::append(
                &mut tx,
                AuditRecord {
                    actor,
                    action: "balance.debited",
                    object_type: "customer",
                    object_id: customer_id,
                    data: json!({ "balance": key, "amount": amount }),
                    request_id: None,
                },
            )
            .await?;
        }
        let stored = recompute_entitlements(&mut tx, customer_id, None, actor, policy).await?;
        tx.commit().await?;
        Ok(stored)
    }

    /// Recomputes every stored entitlements document at the moment it was
    /// stored and returns the customers whose document differs from its
    /// sources (the restore drill's invariant). Writes nothing.
    pub async fn verify_entitlements(&self, policy: &Policy) -> StoreResult<(usize, Vec<String>)> {
        let stored: Vec<(String, String, i64)> = sql!(
            self,
            query_as::<(String, String, i64)>(
                "SELECT customer_id, document, updated_at FROM entitlements ORDER BY customer_id"
            )
            .fetch_all
        )
        .db()?;
        let mut tx = self.begin().await?;
        let mut mismatched = Vec::new();
        let mut products = BTreeMap::new();
        for (customer, document, at) in &stored {
            let sources = read_sources(&mut tx, &[customer.as_str()], false)
                .await?
                .remove(customer)
                .unwrap_or_default();
            let derived = derive_sources(&mut tx, &sources, &mut products, policy, *at).await?;
            let stored: Entitlements = serde_json::from_str(document)?;
            if derived != stored {
                mismatched.push(customer.clone());
            }
        }
        // Dropped without commit: nothing was written anyway.
        drop(tx);
        Ok((stored.len(), mismatched))
    }

    /// Recomputes the entitlements of customers whose past-due grace may
    /// have ended (time alone changes them).
    pub async fn recompute_past_due_entitlements(&self, policy: &Policy) -> StoreResult<usize> {
        let customers: Vec<String> = sql!(
            self,
            query_scalar::<String>(
                "SELECT DISTINCT customer_id FROM subscriptions WHERE status = 'past_due'"
            )
            .fetch_all
        )
        .db()?;
        let mut changed = 0;
        for customer in customers {
            let mut tx = self.begin().await?;
            let before = self.entitlements(&customer).await?.version;
            let after =
                recompute_entitlements(&mut tx, &customer, None, &Actor::System("grace"), policy).await?;
            tx.commit().await?;
            changed += usize::from(after.version != before);
        }
        Ok(changed)
    }
}
