-- What customers were given, and what they may use now.

-- One grant per paid order line (the unique key makes fulfilment happen once
-- whatever duplicates or races occur). `grants` is the product's grants
-- times the line's quantity, frozen at fulfilment: a later catalog change
-- does not alter what was sold.
CREATE TABLE grants (
    id            TEXT PRIMARY KEY,
    customer_id   TEXT NOT NULL REFERENCES customers (id),
    order_id      TEXT NOT NULL REFERENCES orders (id),
    line_no       INTEGER NOT NULL,
    product_id    TEXT NOT NULL REFERENCES products (id),
    quantity      INTEGER NOT NULL,
    grants        TEXT NOT NULL,
    status        TEXT NOT NULL CHECK (status IN ('active', 'revoked')),
    revoked_at    INTEGER,
    revoke_reason TEXT,
    created_at    INTEGER NOT NULL,
    updated_at    INTEGER NOT NULL,
    UNIQUE (order_id, line_no)
);
CREATE INDEX grants_customer ON grants (customer_id, id);

-- Credits are a ledger, never a mutable number: a balance is the sum of its
-- entries. `entry_key` makes every entry idempotent (a retried debit or a
-- re-run revocation adds nothing).
CREATE TABLE credit_ledger (
    id          TEXT PRIMARY KEY,
    customer_id TEXT NOT NULL REFERENCES customers (id),
    balance_key TEXT NOT NULL,
    amount      INTEGER NOT NULL,
    kind        TEXT NOT NULL CHECK (kind IN ('grant', 'debit', 'revoke', 'restore')),
    grant_id    TEXT REFERENCES grants (id),
    entry_key   TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    UNIQUE (customer_id, entry_key)
);
CREATE INDEX credit_ledger_balance ON credit_ledger (customer_id, balance_key);
CREATE INDEX credit_ledger_grant ON credit_ledger (grant_id);

-- The derived entitlements of each customer, as last computed, with a
-- version that increases whenever the document changes.
CREATE TABLE entitlements (
    customer_id TEXT PRIMARY KEY REFERENCES customers (id),
    version     INTEGER NOT NULL,
    document    TEXT NOT NULL,
    updated_at  INTEGER NOT NULL
);
