-- tollgate foundation schema (SQLite). Timestamps are Unix seconds (INTEGER),
-- money is integer minor units, JSON documents are TEXT. Identifiers are
-- prefixed ULIDs, so ordering by id is ordering by creation time.

CREATE TABLE customers (
    id          TEXT PRIMARY KEY,
    external_id TEXT NOT NULL,
    email       TEXT,
    name        TEXT,
    metadata    TEXT NOT NULL DEFAULT '{}',
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    deleted_at  INTEGER
);
-- A deleted customer's external id may be used again by a new customer.
CREATE UNIQUE INDEX customers_external_id ON customers (external_id) WHERE deleted_at IS NULL;
CREATE INDEX customers_email ON customers (email);

-- One provider customer per provider and tollgate customer; a provider id is
-- never linked to two tollgate customers.
CREATE TABLE provider_customers (
    provider             TEXT NOT NULL,
    provider_customer_id TEXT NOT NULL,
    customer_id          TEXT NOT NULL REFERENCES customers (id),
    created_at           INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_customer_id),
    UNIQUE (customer_id, provider)
);

CREATE TABLE products (
    id          TEXT PRIMARY KEY,
    name        TEXT NOT NULL,
    description TEXT,
    active      BOOLEAN NOT NULL,
    grants      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL
);

CREATE TABLE prices (
    id                 TEXT PRIMARY KEY,
    product_id         TEXT NOT NULL REFERENCES products (id),
    currency           TEXT NOT NULL,
    unit_amount        INTEGER NOT NULL CHECK (unit_amount >= 0),
    kind               TEXT NOT NULL CHECK (kind IN ('one_time', 'recurring')),
    recurring_interval TEXT CHECK (recurring_interval IN ('day', 'week', 'month', 'year')),
    interval_count     INTEGER,
    trial_days         INTEGER,
    nickname           TEXT,
    active             BOOLEAN NOT NULL,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL
);
CREATE INDEX prices_product ON prices (product_id);

-- Provider ids that map to catalog entries: declared in the catalog for teams
-- already selling, or recorded by `catalog sync`. Events carrying these ids
-- resolve to the catalog entry through this table.
CREATE TABLE provider_catalog_links (
    provider    TEXT NOT NULL,
    provider_id TEXT NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('product', 'price', 'plan')),
    catalog_id  TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_id)
);
CREATE INDEX provider_catalog_links_catalog ON provider_catalog_links (catalog_id);

CREATE TABLE api_keys (
    id           TEXT PRIMARY KEY,
    name         TEXT NOT NULL,
    scope        TEXT NOT NULL CHECK (scope IN ('read', 'write', 'admin')),
    mode         TEXT NOT NULL CHECK (mode IN ('test', 'live')),
    digest       TEXT NOT NULL UNIQUE,
    prefix       TEXT NOT NULL,
    created_at   INTEGER NOT NULL,
    revoked_at   INTEGER
);

CREATE TABLE idempotency_keys (
    api_key_id      TEXT NOT NULL,
    idempotency_key TEXT NOT NULL,
    fingerprint     TEXT NOT NULL,
    state           TEXT NOT NULL CHECK (state IN ('in_flight', 'complete')),
    locked_until    INTEGER NOT NULL,
    response_status INTEGER,
    response_type   TEXT,
    response_body   BLOB,
    created_at      INTEGER NOT NULL,
    PRIMARY KEY (api_key_id, idempotency_key)
);
CREATE INDEX idempotency_keys_created ON idempotency_keys (created_at);

-- Append-only and hash-chained: each entry's hash covers its fields and the
-- previous hash. audit_head holds the chain's tip; writers lock it so entries
-- are chained in commit order.
CREATE TABLE audit_log (
    seq         INTEGER PRIMARY KEY,
    id          TEXT NOT NULL UNIQUE,
    at          INTEGER NOT NULL,
    actor       TEXT NOT NULL,
    action      TEXT NOT NULL,
    object_type TEXT NOT NULL,
    object_id   TEXT NOT NULL,
    data        TEXT NOT NULL,
    request_id  TEXT,
    prev_hash   TEXT NOT NULL,
    hash        TEXT NOT NULL
);
CREATE INDEX audit_log_object ON audit_log (object_type, object_id);

CREATE TABLE audit_head (
    id   INTEGER PRIMARY KEY CHECK (id = 1),
    seq  INTEGER NOT NULL,
    hash TEXT NOT NULL
);
INSERT INTO audit_head (id, seq, hash)
VALUES (1, 0, '0000000000000000000000000000000000000000000000000000000000000000');

CREATE TRIGGER audit_log_no_update BEFORE UPDATE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
CREATE TRIGGER audit_log_no_delete BEFORE DELETE ON audit_log
BEGIN SELECT RAISE(ABORT, 'audit_log is append-only'); END;
