//! Customers: the application's users, keyed by its own id.

use std::collections::BTreeMap;

use serde::Serialize;

use super::audit::{self, Actor, AuditRecord};
use super::{now_unix, sql, Listed, Page, SqlxResultExt, Store, StoreError, StoreResult};
use crate::billing::entitlements::Policy;
use crate::ids::{new_id, ExternalId};

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct CustomerRecord {
    pub id: String,
    pub external_id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    pub metadata: BTreeMap<String, String>,
    /// Provider name → the provider's customer id.
    pub providers: BTreeMap<String, String>,
    pub created_at: i64,
    pub updated_at: i64,
}

#[derive(sqlx::FromRow)]
struct Row {
    id: String,
    external_id: String,
    email: Option<String>,
    name: Option<String>,
    metadata: String,
    created_at: i64,
    updated_at: i64,
}

impl Row {
    fn into_record(self, providers: BTreeMap<String, String>) -> StoreResult<CustomerRecord> {
        Ok(CustomerRecord {
            metadata: serde_json::from_str(&self.metadata)?,
            id: self.id,
            external_id: self.external_id,
            email: self.email,
            name: self.name,
            providers,
            created_at: self.created_at,
            updated_at: self.updated_at,
        })
    }
}

/// The fields an upsert sets. `None` leaves a field as it is; `Some(None)`
/// clears it.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CustomerChanges {
    pub email: Option<Option<String>>,
    pub name: Option<Option<String>>,
    pub metadata: Option<BTreeMap<String, String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Upserted {
    Created(CustomerRecord),
    Updated(CustomerRecord),
    Unchanged(CustomerRecord),
}

impl Upserted {
    pub fn record(&self) -> &CustomerRecord {
        match self {
            Upserted::Created(c) | Upserted::Updated(c) | Upserted::Unchanged(c) => c,
        }
    }
}

const COLUMNS: &str = "id, external_id, email, name, metadata, created_at, updated_at";

impl Store {
    /// Creates the customer or applies `changes` to it, with an audit entry
    /// for whatever actually changed. Two first upserts racing for one
    /// external id both succeed: the loser retries and becomes an update.
    pub async fn upsert_customer(
        &self,
        external_id: &ExternalId,
        changes: &CustomerChanges,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<Upserted> {
        let mut attempts = 0;
        loop {
            match self.upsert_customer_once(external_id, changes, actor, request_id).await {
                Err(StoreError::Conflict(_)) if attempts < 3 => attempts += 1,
                other => return other,
            }
        }
    }

    async fn upsert_customer_once(
        &self,
        external_id: &ExternalId,
        changes: &CustomerChanges,
        actor: &Actor,
        request_id: Option<&str>,
    ) -> StoreResult<Upserted> {
        let now = now_unix();
        let mut tx = self.begin().await?;
        let lock = match tx.kind() {
            super::DbKind::Postgres => " FOR UPDATE",
            super::DbKind::Sqlite => "",
        };
        let sql =
            format!("SELECT {COLUMNS} FROM customers WHERE external_id = $1 AND deleted_at IS NULL{lock}");
        let existing: Option<Row> =
            sql!(tx, query_as::<Row>(&sql, external_id.as_str()).fetch_optional).db()?;

        let outcome = match existing {
            None => {
                let metadata = changes.metadata.clone().unwrap_or_default();
                let record = CustomerRecord {
                    id: new_id("cust"),
                    external_id: external_id.to_string(),
                    email: changes.email.clone().flatten(),
                    name: changes.name.clone().flatten(),
                    metadata,
                    providers: BTreeMap::new(),
                    created_at: now,
                    updated_at: now,
                };
                sql!(
                    tx,
                    query(
                        "INSERT INTO customers (id, external_id, email, name, metadata, created_at, updated_at) \
                         VALUES ($1, $2, $3, $4, $5, $6, $7)",
                        &record.id,
                        &record.external_id,
                        &record.email,
                        &record.name,
                        serde_json::to_string(&record.metadata)?,
                        now,
                        now
                    )
                    .execute
                )
                .map_err(|e| {
                    if super::is_unique_violation(&e) {
                        StoreError::Conflict("customer was created concurrently; retry".to_owned())
                    } else {
                        StoreError::from_sqlx(e)
                    }
                })?;
                audit::append(
                    &mut tx,
                    AuditRecord {
                        actor,
                        action: "customer.created",
                        object_type: "customer",
                        object_id: &record.id,
                        data: serde_json::json!({
                            "external_id": record.external_id,
                            "email": record.email,
                            "name": record.name,
                            "metadata": record.metadata,
                        }),
                        request_id,
                    },
                )
                .await?;
                Upserted::Created(record)
            }
            Some(row) => {
                let providers = provider_links(&mut tx, &row.id).await?;
                let before = row.into_record(providers)?;
                let mut after = before.clone();
                if let Some(email) = &changes.email {
                    after.email = email.clone();
                }
                if let Some(name) = &changes.name {
                    after.name = name.clone();
                }
                if let Some(metadata) = &changes.metadata {
                    after.metadata = metadata.clone();
                }
                if after == before {
                    Upserted::Unchanged(before)
                } else {
                    after.updated_at = now;
                    sql!(
                        tx,
                        query(
                            "UPDATE customers SET email = $1, name = $2, metadata = $3, updated_at = $4 WHERE id = $5",
                            &after.email,
                            &after.name,
                            serde_json::to_string(&after.metadata)?,
                            now,
                            &after.id
                        )
                        .execute
                    )
                    .db()?;
                    let mut diff = serde_json::Map::new();
                    if after.email != before.email {
                        diff.insert("email".into(), serde_json::json!([before.email, after.email]));
                    }
                    if after.name != before.name {
                        diff.insert("name".into(), serde_json::json!([before.name, after.name]));
                    }
                    if after.metadata != before.metadata {
                        diff.insert("metadata".into(), serde_json::json!([before.metadata, after.metadata]));
                    }
                    audit::append(
                        &mut tx,
                        AuditRecord {
                            actor,
                            action: "customer.updated",
                            object_type: "customer",
                            object_id: &after.id,
                            data: serde_json::json!({ "changes": diff }),
                            request_id,
                        },
                    )
                    .await?;
                    Upserted::Updated(after)
                }
            }
        };
        tx.commit().await?;
        Ok(outcome)
    }

    pub async fn get_customer(&self, external_id: &ExternalId) -> StoreResult<Option<CustomerRecord>> {
        let sql = format!("SELECT {COLUMNS} FROM customers WHERE external_id = $1 AND deleted_at IS NULL");
        let Some(row) = sql!(self, query_as::<Row>(&sql, external_id.as_str()).fetch_optional).db()? else {
            return Ok(None);
        };
        let providers = self.provider_links_for(std::slice::from_ref(&row.id)).await?;
        let links = providers.get(&row.id).cloned().unwrap_or_default();
        Ok(Some(row.into_record(links)?))
    }

    /// Newest first, optionally only those with this email.
    pub async fn list_customers(
        &self,
        page: &Page,
        email: Option<&str>,
    ) -> StoreResult<Listed<CustomerRecord>> {
        self.ensure_cursor("customers", page).await?;
        let (op, order) = if page.is_backwards() { (">", "ASC") } else { ("<", "DESC") };
        let cursor = page.cursor().map(str::to_owned);
        let sql = format!(
            "SELECT {COLUMNS} FROM customers WHERE deleted_at IS NULL \
             AND ($1 IS NULL OR id {op} $1) AND ($2 IS NULL OR email = $2) \
             ORDER BY id {order} LIMIT $3"
        );
        let rows: Vec<Row> =
            sql!(self, query_as::<Row>(&sql, cursor, email, page.fetch_limit()).fetch_all).db()?;
        let listed = page.finish(rows);
        let ids: Vec<String> = listed.data.iter().map(|r| r.id.clone()).collect();
        let mut links = self.provider_links_for(&ids).await?;
        let data = listed
            .data
            .into_iter()
            .map(|row| {
                let l = links.remove(&row.id).unwrap_or_default();
                row.into_record(l)
            })
            .collect::<StoreResult<Vec<_>>>()?;
        Ok(Listed { data, has_more: listed.has_more })
    }

    async fn provider_links_for(
        &self,
        ids: &[String],
    ) -> StoreResult<BTreeMap<String, BTreeMap<String, String>>> {
        let mut out: BTreeMap<String, BTreeMap<String, String>> = BTreeMap::new();
        if ids.is_empty() {
            return Ok(out);
        }
        // A JSON array parameter keeps this one query on both engines,
        // whatever the page size.
        let sql = format!(
            "SELECT customer_id, provider, provider_customer_id FROM provider_customers \
             WHERE {} AND deleted_at IS NULL \
             ORDER BY created_at DESC, provider_customer_id DESC",
            super::in_json_ids(self.kind(), "customer_id", "$1")
        );
        let rows: Vec<(String, String, String)> =
            sql!(self, query_as::<(String, String, String)>(&sql, serde_json::to_string(ids)?).fetch_all)
                .db()?;
        // Newest first, so the oldest live link of a provider is the one shown
        // (the one checkouts use, see `link_provider_customer`).
        for (customer, provider, provider_id) in rows {
            out.entry(customer).or_default().insert(provider, provider_id);
        }
        Ok(out)
    }
}

async fn provider_links(tx: &mut super::Tx, customer_id: &str) -> StoreResult<BTreeMap<String, String>> {
    let rows: Vec<(String, String)> = sql!(
        tx,
        query_as::<(String, String)>(
            "SELECT provider, provider_customer_id FROM provider_customers \
             WHERE customer_id = $1 AND deleted_at IS NULL ORDER BY created_at DESC, provider_customer_id DESC",
            customer_id
        )
        .fetch_all
    )
    .db()?;
    Ok(rows.into_iter().collect())
}

/// A provider's customer as its events describe it.
#[derive(Debug, Clone, Default)]
pub struct ProviderCustomer {
    pub provider: &'static str,
    pub id: String,
    pub email: Option<String>,
    pub name: Option<String>,
    /// `metadata.tollgate_external_id`, set when tollgate created it.
    pub external_id: Option<ExternalId>,
    pub deleted: bool,
}

/// Mirrors a provider customer into tollgate. A customer whose metadata
/// names a tollgate customer is linked to it; one created outside tollgate
/// is adopted (a tollgate customer with the provider id as external id,
/// whose email and name follow the provider's). A deleted provider customer
/// keeps its link, marked deleted, so its late events still find their
/// owner; its tollgate customer remains, since it is the application's user. Called only for events newer than the object's
/// watermark, so any delivery order ends in the same state.
pub async fn apply_provider_customer(
    tx: &mut super::Tx,
    pc: &ProviderCustomer,
    actor: &Actor,
    policy: &Policy,
) -> StoreResult<()> {
    mirror_provider_customer(tx, pc, actor, policy, Link::Unknown).await.map(|_| ())
}

/// What the caller of [`mirror_provider_customer`] knows of the link.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Link {
    Unknown,
    /// Read as absent in this transaction a moment ago. An absent row holds
    /// no lock to take, so reading it again would only cost a round trip;
    /// a link another transaction makes meanwhile is met by the insert
    /// below (`ON CONFLICT DO NOTHING`), which then reads it.
    Absent,
}

/// [`apply_provider_customer`], answering the customer the provider
/// customer is now linked to when this transaction knows it for certain
/// (it found or made the link itself); `None` when another transaction's
/// link won or the link is marked deleted, so the caller reads it.
async fn mirror_provider_customer(
    tx: &mut super::Tx,
    pc: &ProviderCustomer,
    actor: &Actor,
    policy: &Policy,
    known: Link,
) -> StoreResult<Option<String>> {
    let now = now_unix();
    let adopted = pc.external_id.is_none();
    let may_change_link = pc.external_id.is_some() || pc.deleted;
    let linked = match known {
        Link::Absent => None,
        Link::Unknown => linked_customer_locked(tx, pc.provider, &pc.id, may_change_link).await?,
    };
    let mut created_placeholder = false;
    let customer_id = match linked.clone() {
        Some(id) => match &pc.external_id {
            // Adopted before this event said whose it is (another object's
            // event came first): hand it to the application's customer.
            Some(external) => claim_adopted(tx, pc, &id, external, actor, policy).await?,
            None => id,
        },
        None => {
            let external = match &pc.external_id {
                Some(e) => e.clone(),
                None => ExternalId::parse(&pc.id).map_err(|e| StoreError::Corrupt(e.0))?,
            };
            if adopted {
                let (id, created) = adopt_as_placeholder(tx, &external, pc, actor).await?;
                created_placeholder = created;
                id
            } else {
                match live_customer_id(tx, external.as_str()).await? {
                    Some(id) => id,
                    None => {
                        let data = serde_json::json!({ "external_id": external.as_str(), "from_provider": pc.provider, "email": null, "name": null });
                        create_on_providers_word(tx, &external, &None, &None, data, actor).await?
                    }
                }
            }
        }
    };
    // A placeholder just created has the provider's email and name already.
    // Only the provider customer's own event says what its email and name
    // are: another object's event (`Link::Absent`, from
    // `resolve_provider_customer`) knows neither, and would blank what a
    // concurrent `customer.created` just stored (its insert waits for that
    // one and then finds the placeholder made).
    if adopted && !created_placeholder && known == Link::Unknown {
        let changed = sql!(
            tx,
            query(
                "UPDATE customers SET email = $1, name = $2, updated_at = $3 WHERE id = $4 \
                 AND (email IS DISTINCT FROM $1 OR name IS DISTINCT FROM $2)",
                &pc.email,
                &pc.name,
                now,
                &customer_id
            )
            .execute
        )
        .db()?;
        if changed == 1 {
            let data =
                serde_json::json!({ "from_provider": pc.provider, "email": pc.email, "name": pc.name });
            let record = AuditRecord {
                actor,
                action: "customer.updated",
                object_type: "customer",
                object_id: &customer_id,
                data,
                request_id: None,
            };
            audit::append(tx, record).await?;
        }
    }
    let link_data = serde_json::json!({ "provider": pc.provider, "provider_customer_id": pc.id });
    // What the batch read of this link no longer holds.
    tx.provider_links.remove(&(pc.provider.to_owned(), pc.id.clone()));
    if pc.deleted {
        // The link is kept, marked deleted: a late event of this provider
        // customer's subscription or charge must still find its owner rather
        // than adopt a stranger; new checkouts no longer use it.
        let changed = sql!(
            tx,
            query(
                "INSERT INTO provider_customers (provider, provider_customer_id, customer_id, created_at, deleted_at) \
                 VALUES ($1, $2, $3, $4, $4) \
                 ON CONFLICT (provider, provider_customer_id) DO UPDATE SET deleted_at = $4 \
                 WHERE provider_customers.deleted_at IS NULL",
                pc.provider,
                &pc.id,
                &customer_id,
                now
            )
            .execute
        )
        .db()?;
        if changed == 1 {
            let record = AuditRecord {
                actor,
                action: "customer.provider_unlinked",
                object_type: "customer",
                object_id: &customer_id,
                data: link_data,
                request_id: None,
            };
            audit::append(tx, record).await?;
        }
        return Ok(None);
    }
    if linked.is_none() {
        let inserted = if tx.defer_rows {
            // Not linked when the batch read its links. On SQLite the one
            // writer has had the database since, so the insert succeeds
            // unless the application owns a clashing customer; on
            // PostgreSQL another transaction may link it meanwhile. Either
            // clash fails the batch, which is then applied event by event
            // (see `Tx::write_deferred`). Later events of the batch find
            // the link here.
            tx.deferred.links.push(DeferredLink {
                provider: pc.provider.to_owned(),
                provider_customer_id: pc.id.clone(),
                customer_id: customer_id.clone(),
                created_at: now,
            });
            tx.provider_links.insert((pc.provider.to_owned(), pc.id.clone()), Some(customer_id.clone()));
            1
        } else {
            sql!(
                tx,
                query(
                    "INSERT INTO provider_customers (provider, provider_customer_id, customer_id, created_at) \
                     VALUES ($1, $2, $3, $4) ON CONFLICT DO NOTHING",
                    pc.provider,
                    &pc.id,
                    &customer_id,
                    now
                )
                .execute
            )
            .db()?
        };
        if inserted == 1 {
            let record = AuditRecord {
                actor,
                action: "customer.provider_linked",
                object_type: "customer",
                object_id: &customer_id,
                data: link_data,
                request_id: None,
            };
            audit::append(tx, record).await?;
            return Ok(Some(customer_id));
        } else if let (Some(external), Some(other)) =
            (&pc.external_id, linked_customer(tx, pc.provider, &pc.id).await?)
        {
            // Another worker adopted this provider customer while this event
            // was being applied: claim its placeholder now, as if the
            // adoption had come first.
            if other != customer_id {
                claim_adopted(tx, pc, &other, external, actor, policy).await?;
            }
        } else if created_placeholder {
            // Another worker linked this provider customer first: the
            // placeholder made here would be left owning nothing. Start over;
            // the retry finds the link.
            return Err(StoreError::Conflict(format!("provider customer {} linked concurrently", pc.id)));
        }
        return Ok(None);
    }
    Ok(Some(customer_id))
}

/// Reads the links of the provider customers an inbox batch names, in one
/// statement, for [`resolve_provider_customer`] to use instead of one round
/// trip per event (a customer's many invoices in one batch read it once);
/// on PostgreSQL they are locked as each read would have locked them. Ones
/// not linked yet are remembered as such.
pub async fn read_links(
    tx: &mut super::Tx,
    provider: &str,
    provider_customer_ids: &[&str],
) -> StoreResult<()> {
    let mut ids = provider_customer_ids.to_vec();
    ids.sort_unstable();
    ids.dedup();
    if ids.is_empty() {
        return Ok(());
    }
    // Ids sorted: on PostgreSQL the links are locked in that order.
    let sql = super::provider_rows_in(
        tx.kind(),
        "provider_customer_id, customer_id",
        "provider_customers",
        "provider_customer_id",
        true,
    );
    let found: Vec<(String, String)> =
        sql!(tx, query_as::<(String, String)>(&sql, provider, serde_json::to_string(&ids)?).fetch_all)
            .db()?;
    let mut found: std::collections::HashMap<String, String> = found.into_iter().collect();
    for id in ids {
        let customer = found.remove(id);
        tx.provider_links.insert((provider.to_owned(), id.to_owned()), customer);
    }
    Ok(())
}

/// The customer a provider customer is linked to. On PostgreSQL the link is
/// held (`FOR SHARE`) until the transaction ends, so a concurrent claim of
/// an adopted placeholder (which moves the link) waits for this one and then
/// moves what it wrote, instead of leaving it on the placeholder.
async fn linked_customer(
    tx: &mut super::Tx,
    provider: &str,
    provider_customer_id: &str,
) -> StoreResult<Option<String>> {
    linked_customer_locked(tx, provider, provider_customer_id, false).await
}

/// The link, held until the transaction ends (PostgreSQL): shared by readers,
/// so a claim that moves the link waits for them and then moves what they
/// wrote; taken for update by a transaction that may change it itself (a
/// claim, a deletion), so two such transactions queue instead of both
/// holding it shared and deadlocking when each tries to change it.
async fn linked_customer_locked(
    tx: &mut super::Tx,
    provider: &str,
    provider_customer_id: &str,
    to_change: bool,
) -> StoreResult<Option<String>> {
    tx.write_deferred().await?;
    let lock = match (tx.kind(), to_change) {
        (super::DbKind::Postgres, true) => " FOR UPDATE",
        (super::DbKind::Postgres, false) => " FOR SHARE",
        (super::DbKind::Sqlite, _) => "",
    };
    let sql = format!(
        "SELECT customer_id FROM provider_customers WHERE provider = $1 AND provider_customer_id = $2{lock}"
    );
    sql!(tx, query_scalar::<String>(&sql, provider, provider_customer_id).fetch_optional).db()
}

/// The tollgate customer behind a provider customer id, as another object's
/// event names it. A provider customer tollgate has not seen yet (its own
/// event may arrive later) is linked now: to the customer `external_id`
/// names (from the object's metadata), else adopted like
/// [`apply_provider_customer`] does.
pub async fn resolve_provider_customer(
    tx: &mut super::Tx,
    provider: &'static str,
    provider_customer_id: &str,
    external_id: Option<ExternalId>,
    actor: &Actor,
    policy: &Policy,
) -> StoreResult<String> {
    let linked = match tx.provider_links.get(&(provider.to_owned(), provider_customer_id.to_owned())) {
        // Read (and on PostgreSQL locked) with the batch's other links, or
        // written by this transaction since.
        Some(known) => known.clone(),
        None => linked_customer(tx, provider, provider_customer_id).await?,
    };
    if let Some(id) = linked {
        return Ok(id);
    }
    let pc = ProviderCustomer {
        provider,
        id: provider_customer_id.to_owned(),
        external_id: external_id.clone(),
        ..Default::default()
    };
    if let Some(id) = mirror_provider_customer(tx, &pc, actor, policy, Link::Absent).await? {
        return Ok(id);
    }
    if let Some(id) = linked_customer(tx, provider, provider_customer_id).await? {
        return Ok(id);
    }
    // Defensive: the link was not made (it cannot be refused since a
    // customer may own several provider customers); the object is still
    // the named customer's.
    let external =
        external_id.map(|e| e.as_str().to_owned()).unwrap_or_else(|| provider_customer_id.to_owned());
    live_customer_id(tx, &external).await?.ok_or_else(|| {
        StoreError::Corrupt(format!("provider customer {provider_customer_id} could not be resolved"))
    })
}

/// The owner of a guest payment: a checkout session made outside tollgate
/// without a provider customer (`customer_creation=if_required`). The
/// application's customer its metadata names, else a placeholder whose
/// external id is the session id (as an adopted provider customer's is the
/// provider id), so the order is recorded, fulfilled and findable instead of
/// dropped.
pub async fn adopt_guest(
    tx: &mut super::Tx,
    provider: &str,
    session_id: &str,
    external: Option<ExternalId>,
    email: Option<String>,
    actor: &Actor,
) -> StoreResult<String> {
    let named = external.is_some();
    let external = match external {
        Some(e) => e,
        None => ExternalId::parse(session_id).map_err(|e| StoreError::Corrupt(e.0))?,
    };
    let existing: Option<String> = live_customer_id(tx, external.as_str()).await?;
    if let Some(id) = existing {
        return Ok(id);
    }
    // The application's own customer gets no email from a payment form.
    let email = if named { None } else { email };
    let data = serde_json::json!({ "external_id": external.as_str(), "from_provider": provider, "guest_checkout": session_id, "email": email });
    create_on_providers_word(tx, &external, &email, &None, data, actor).await
}

/// A tollgate customer created because a provider's event named it (an
/// adopted provider customer, a guest, or the application's id in
/// metadata), audited. A concurrent creation is a conflict: the event is
/// applied again and finds the customer.
async fn create_on_providers_word(
    tx: &mut super::Tx,
    external: &ExternalId,
    email: &Option<String>,
    name: &Option<String>,
    audit_data: serde_json::Value,
    actor: &Actor,
) -> StoreResult<String> {
    let id = new_id("cust");
    let now = now_unix();
    sql!(
        tx,
        query(
            "INSERT INTO customers (id, external_id, email, name, metadata, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, '{}', $5, $5)",
            &id,
            external.as_str(),
            email,
            name,
            now
        )
        .execute
    )
    .map_err(|e| {
        if super::is_unique_violation(&e) {
            StoreError::Conflict("customer created concurrently".into())
        } else {
            StoreError::from_sqlx(e)
        }
    })?;
    audit_created(tx, &id, audit_data, actor).await?;
    Ok(id)
}

/// The placeholder of a provider customer created outside tollgate (its
/// external id is the provider's id), with the provider's email and name,
/// and whether this call created it. Such a customer is nearly always new,
/// so it is inserted first, one statement, and read only when an earlier
/// adoption made it already (a concurrent one is waited for by the insert).
async fn adopt_as_placeholder(
    tx: &mut super::Tx,
    external: &ExternalId,
    pc: &ProviderCustomer,
    actor: &Actor,
) -> StoreResult<(String, bool)> {
    let id = new_id("cust");
    if tx.defer_rows {
        // The batch found the provider customer unlinked, so no placeholder
        // of it existed then; a customer the application named with the
        // same id, or (PostgreSQL) a placeholder another transaction made
        // since, fails the batch's deferred write, and the event is then
        // applied alone, finding that customer below.
        tx.deferred.customers.push(DeferredCustomer {
            id: id.clone(),
            external_id: external.as_str().to_owned(),
            email: pc.email.clone(),
            name: pc.name.clone(),
            created_at: now_unix(),
        });
        let data = serde_json::json!({ "external_id": external.as_str(), "from_provider": pc.provider, "email": pc.email, "name": pc.name });
        audit_created(tx, &id, data, actor).await?;
        return Ok((id, true));
    }
    let inserted = sql!(
        tx,
        query(
            "INSERT INTO customers (id, external_id, email, name, metadata, created_at, updated_at) \
             VALUES ($1, $2, $3, $4, '{}', $5, $5) ON CONFLICT (external_id) WHERE deleted_at IS NULL DO NOTHING",
            &id,
            external.as_str(),
            &pc.email,
            &pc.name,
            now_unix()
        )
        .execute
    )
    .db()?;
    if inserted == 1 {
        let data = serde_json::json!({ "external_id": external.as_str(), "from_provider": pc.provider, "email": pc.email, "name": pc.name });
        audit_created(tx, &id, data, actor).await?;
        return Ok((id, true));
    }
    let existing: Option<String> = live_customer_id(tx, external.as_str()).await?;
    // Gone between the two statements (merged away): apply the event again.
    existing
        .map(|id| (id, false))
        .ok_or_else(|| StoreError::Conflict(format!("customer {} changed concurrently", external.as_str())))
}

/// The live customer an external id names.
async fn live_customer_id(tx: &mut super::Tx, external: &str) -> StoreResult<Option<String>> {
    tx.write_deferred().await?;
    sql!(
        tx,
        query_scalar::<String>(
            "SELECT id FROM customers WHERE external_id = $1 AND deleted_at IS NULL",
            external
        )
        .fetch_optional
    )
    .db()
}

async fn audit_created(
    tx: &mut super::Tx,
    id: &str,
    data: serde_json::Value,
    actor: &Actor,
) -> StoreResult<()> {
    let record = AuditRecord {
        actor,
        action: "customer.created",
        object_type: "customer",
        object_id: id,
        data,
        request_id: None,
    };
    audit::append(tx, record).await
}

/// The rows that belong to a customer, re-parented when an adopted
/// placeholder turns out to be an application's customer, each table with
/// the rows it keeps where they are.
/// (Deliveries too: they follow their events, so the application's customer
/// keeps one order of deliveries per endpoint across the merge, and a
/// delivery not yet sent names the application's customer.)
///
/// The placeholder's `entitlements.updated` events stay its own, with their
/// deliveries: each is a snapshot of what the placeholder's id was entitled
/// to, numbered in the placeholder's own sequence, and one not sent yet goes
/// out under that id. Moved, the application customer's events would repeat
/// its first versions, and an unsent one would reach the application as an
/// old version of its customer.
const OWNED_TABLES: &[(&str, &str)] = &[
    ("orders", ""),
    ("subscriptions", ""),
    ("checkout_sessions", ""),
    ("invoices", ""),
    ("grants", ""),
    ("credit_ledger", ""),
    ("events", " AND type <> 'entitlements.updated'"),
    (
        "deliveries",
        " AND NOT EXISTS (SELECT 1 FROM events e WHERE e.id = deliveries.event_id \
         AND e.type = 'entitlements.updated')",
    ),
];

/// A provider customer linked to `linked_id`, whose own event now names the
/// application's `external` id. If `linked_id` is a placeholder tollgate
/// adopted (its external id is the provider id), it becomes that customer:
/// renamed when the application has no such customer yet, else merged into
/// it (link and every owned row moved, placeholder deleted). Returns the
/// customer that owns the provider customer now.
async fn claim_adopted(
    tx: &mut super::Tx,
    pc: &ProviderCustomer,
    linked_id: &str,
    external: &ExternalId,
    actor: &Actor,
    policy: &Policy,
) -> StoreResult<String> {
    tx.write_deferred().await?;
    let current: Option<String> = sql!(
        tx,
        query_scalar::<String>("SELECT external_id FROM customers WHERE id = $1", linked_id).fetch_optional
    )
    .db()?;
    if current.as_deref() != Some(pc.id.as_str()) || external.as_str() == pc.id {
        // Not a placeholder: the link stands as the application made it.
        return Ok(linked_id.to_owned());
    }
    let now = now_unix();
    let target: Option<String> = live_customer_id(tx, external.as_str()).await?;
    let Some(target) = target else {
        sql!(
            tx,
            query(
                "UPDATE customers SET external_id = $1, updated_at = $2 WHERE id = $3",
                external.as_str(),
                now,
                linked_id
            )
            .execute
        )
        .db()?;
        // The placeholder's id no longer names a customer; the external id now does.
        tx.invalidate(super::cache::CacheKey::Customer(pc.id.clone()));
        tx.invalidate(super::cache::CacheKey::Customer(external.as_str().to_owned()));
        let data =
            serde_json::json!({ "external_id": external.as_str(), "was": pc.id, "provider": pc.provider });
        let record = AuditRecord {
            actor,
            action: "customer.claimed",
            object_type: "customer",
            object_id: linked_id,
            data,
            request_id: None,
        };
        audit::append(tx, record).await?;
        return Ok(linked_id.to_owned());
    };
    // The placeholder's events move below, those not yet written too.
    super::events::flush(tx).await?;
    tx.owners_changed();
    // Every link of the placeholder moves: the application's customer may
    // own several provider customers, and each keeps finding its owner.
    sql!(
        tx,
        query("UPDATE provider_customers SET customer_id = $1 WHERE customer_id = $2", &target, linked_id)
            .execute
    )
    .db()?;
    for (table, kept) in OWNED_TABLES {
        let sql = format!("UPDATE {table} SET customer_id = $1 WHERE customer_id = $2{kept}");
        sql!(tx, query(&sql, &target, linked_id).execute).db()?;
    }
    sql!(
        tx,
        query("UPDATE customers SET deleted_at = $1, updated_at = $1 WHERE id = $2", now, linked_id).execute
    )
    .db()?;
    // What the placeholder was entitled to is now the application customer's.
    // The application was told the placeholder's entitlements under its id,
    // so it is told, under that id, that they are gone: a last version,
    // derived from the nothing it now owns (none if it was never told).
    let announced: Option<i64> = sql!(
        tx,
        query_scalar::<i64>("SELECT version FROM entitlements WHERE customer_id = $1", linked_id)
            .fetch_optional
    )
    .db()?;
    if announced.is_some() {
        super::entitlements::recompute_later(tx, linked_id, None, actor, policy);
    }
    // The placeholder's id (its external id until now) names no customer any more.
    tx.invalidate(super::cache::CacheKey::Customer(pc.id.clone()));
    super::entitlements::recompute_entitlements(tx, &target, None, actor, policy).await?;
    let data = serde_json::json!({ "merged_into": target, "external_id": external.as_str(), "provider_customer": pc.id });
    let record = AuditRecord {
        actor,
        action: "customer.merged",
        object_type: "customer",
        object_id: linked_id,
        data,
        request_id: None,
    };
    audit::append(tx, record).await?;
    Ok(target)
}

/// A placeholder customer held back by an inbox batch (see `Tx::defer_rows`).
pub(crate) struct DeferredCustomer {
    id: String,
    external_id: String,
    email: Option<String>,
    name: Option<String>,
    created_at: i64,
}

/// A provider customer's link held back by an inbox batch.
pub(crate) struct DeferredLink {
    provider: String,
    provider_customer_id: String,
    customer_id: String,
    created_at: i64,
}

/// Writes the held-back placeholders, then their links. Plain inserts: a
/// conflict is an error, so that the batch is applied again without
/// deferring (see `Tx::write_deferred`).
pub(crate) async fn write_deferred(
    tx: &mut super::Tx,
    customers: &[DeferredCustomer],
    links: &[DeferredLink],
) -> StoreResult<()> {
    for chunk in super::events::chunked(customers) {
        let rows = super::value_rows(tx.kind(), chunk.len(), 7);
        let sql = format!(
            "INSERT INTO customers (id, external_id, email, name, metadata, created_at, updated_at) VALUES {rows}"
        );
        macro_rules! bind_rows {
            ($query:expr) => {{
                let mut q = $query;
                for c in chunk {
                    q = q
                        .bind(&c.id)
                        .bind(&c.external_id)
                        .bind(&c.email)
                        .bind(&c.name)
                        .bind("{}")
                        .bind(c.created_at)
                        .bind(c.created_at);
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
    for chunk in super::events::chunked(links) {
        let rows = super::value_rows(tx.kind(), chunk.len(), 4);
        let sql = format!(
            "INSERT INTO provider_customers (provider, provider_customer_id, customer_id, created_at) VALUES {rows}"
        );
        macro_rules! bind_rows {
            ($query:expr) => {{
                let mut q = $query;
                for l in chunk {
                    q = q
                        .bind(&l.provider)
                        .bind(&l.provider_customer_id)
                        .bind(&l.customer_id)
                        .bind(l.created_at);
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
    Ok(())
}
