-- What was sold and what the providers say happened to it. Provider facts
-- (payments, refunds, disputes, invoices) are mirrored as the latest snapshot
-- of each provider object; an order's status is recomputed from them, so the
-- final state does not depend on the order in which events arrive.

-- A checkout tollgate started (recorded before the provider session is
-- returned) or one it saw complete at the provider.
CREATE TABLE checkout_sessions (
    id                       TEXT PRIMARY KEY,
    provider                 TEXT NOT NULL,
    provider_session_id      TEXT,
    customer_id              TEXT REFERENCES customers (id),
    mode                     TEXT NOT NULL CHECK (mode IN ('payment', 'subscription')),
    status                   TEXT NOT NULL CHECK (status IN ('open', 'complete', 'expired')),
    payment_status           TEXT,
    order_id                 TEXT,
    provider_subscription_id TEXT,
    url                      TEXT,
    success_url              TEXT,
    cancel_url               TEXT,
    currency                 TEXT,
    amount_total             INTEGER,
    metadata                 TEXT NOT NULL DEFAULT '{}',
    expires_at               INTEGER,
    created_at               INTEGER NOT NULL,
    updated_at               INTEGER NOT NULL
);
CREATE UNIQUE INDEX checkout_sessions_provider ON checkout_sessions (provider, provider_session_id);
CREATE INDEX checkout_sessions_customer ON checkout_sessions (customer_id, id);

CREATE TABLE orders (
    id                           TEXT PRIMARY KEY,
    customer_id                  TEXT NOT NULL REFERENCES customers (id),
    provider                     TEXT NOT NULL,
    status                       TEXT NOT NULL CHECK (status IN ('pending', 'paid', 'fulfilled', 'partially_refunded',
                                     'refunded', 'disputed', 'dispute_lost', 'dispute_won', 'canceled', 'payment_failed')),
    currency                     TEXT NOT NULL,
    amount_total                 INTEGER NOT NULL CHECK (amount_total >= 0),
    amount_refunded              INTEGER NOT NULL DEFAULT 0 CHECK (amount_refunded >= 0),
    checkout_session_id          TEXT REFERENCES checkout_sessions (id),
    provider_checkout_session_id TEXT,
    payment_key                  TEXT,
    paid_at                      INTEGER,
    payment_failed_at            INTEGER,
    canceled_at                  INTEGER,
    metadata                     TEXT NOT NULL DEFAULT '{}',
    created_at                   INTEGER NOT NULL,
    updated_at                   INTEGER NOT NULL
);
CREATE INDEX orders_customer ON orders (customer_id, id);
CREATE UNIQUE INDEX orders_provider_session ON orders (provider, provider_checkout_session_id);
CREATE UNIQUE INDEX orders_payment ON orders (provider, payment_key);

-- A grant's unique key is (order_id, line_no).
CREATE TABLE order_lines (
    order_id          TEXT NOT NULL REFERENCES orders (id),
    line_no           INTEGER NOT NULL,
    price_id          TEXT REFERENCES prices (id),
    product_id        TEXT REFERENCES products (id),
    provider_price_id TEXT,
    description       TEXT,
    quantity          INTEGER NOT NULL CHECK (quantity > 0),
    unit_amount       INTEGER NOT NULL CHECK (unit_amount >= 0),
    amount_total      INTEGER NOT NULL CHECK (amount_total >= 0),
    PRIMARY KEY (order_id, line_no)
);

-- One row per provider payment, keyed by the payment intent (or, for
-- charges made before payment intents existed, the charge).
CREATE TABLE payments (
    provider                 TEXT NOT NULL,
    payment_key              TEXT NOT NULL,
    charge_id                TEXT,
    provider_customer_id     TEXT,
    provider_invoice_id      TEXT,
    status                   TEXT NOT NULL,
    amount                   INTEGER NOT NULL,
    amount_refunded          INTEGER NOT NULL DEFAULT 0,
    currency                 TEXT NOT NULL,
    failure_code             TEXT,
    failure_message          TEXT,
    metadata                 TEXT NOT NULL DEFAULT '{}',
    created_at               INTEGER NOT NULL,
    updated_at               INTEGER NOT NULL,
    PRIMARY KEY (provider, payment_key)
);
CREATE INDEX payments_charge ON payments (provider, charge_id);

CREATE TABLE refunds (
    provider           TEXT NOT NULL,
    provider_refund_id TEXT NOT NULL,
    payment_key        TEXT NOT NULL,
    charge_id          TEXT,
    amount             INTEGER NOT NULL CHECK (amount >= 0),
    currency           TEXT NOT NULL,
    status             TEXT NOT NULL,
    reason             TEXT,
    created_at         INTEGER NOT NULL,
    updated_at         INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_refund_id)
);
CREATE INDEX refunds_payment ON refunds (provider, payment_key);

CREATE TABLE disputes (
    provider            TEXT NOT NULL,
    provider_dispute_id TEXT NOT NULL,
    payment_key         TEXT NOT NULL,
    charge_id           TEXT,
    amount              INTEGER NOT NULL,
    currency            TEXT NOT NULL,
    status              TEXT NOT NULL,
    reason              TEXT,
    created_at          INTEGER NOT NULL,
    updated_at          INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_dispute_id)
);
CREATE INDEX disputes_payment ON disputes (provider, payment_key);

-- The mirror of provider subscriptions. `items` holds every item as JSON;
-- price_id/quantity are the first item's, for the API.
CREATE TABLE subscriptions (
    id                       TEXT PRIMARY KEY,
    provider                 TEXT NOT NULL,
    provider_subscription_id TEXT NOT NULL,
    customer_id              TEXT NOT NULL REFERENCES customers (id),
    status                   TEXT NOT NULL CHECK (status IN ('incomplete', 'incomplete_expired', 'trialing', 'active',
                                 'past_due', 'unpaid', 'paused', 'canceled')),
    price_id                 TEXT REFERENCES prices (id),
    provider_price_id        TEXT,
    quantity                 INTEGER NOT NULL,
    items                    TEXT NOT NULL,
    current_period_start     INTEGER,
    current_period_end       INTEGER,
    cancel_at_period_end     BOOLEAN NOT NULL,
    cancel_at                INTEGER,
    canceled_at              INTEGER,
    ended_at                 INTEGER,
    trial_start              INTEGER,
    trial_end                INTEGER,
    past_due_since           INTEGER,
    latest_invoice_id        TEXT,
    metadata                 TEXT NOT NULL DEFAULT '{}',
    provider_created         INTEGER NOT NULL,
    created_at               INTEGER NOT NULL,
    updated_at               INTEGER NOT NULL,
    UNIQUE (provider, provider_subscription_id)
);
CREATE INDEX subscriptions_customer ON subscriptions (customer_id, id);

CREATE TABLE invoices (
    provider                 TEXT NOT NULL,
    provider_invoice_id      TEXT NOT NULL,
    customer_id              TEXT REFERENCES customers (id),
    provider_subscription_id TEXT,
    status                   TEXT NOT NULL,
    billing_reason           TEXT,
    currency                 TEXT NOT NULL,
    amount_due               INTEGER NOT NULL,
    amount_paid              INTEGER NOT NULL,
    attempt_count            INTEGER NOT NULL DEFAULT 0,
    payment_key              TEXT,
    period_start             INTEGER,
    period_end               INTEGER,
    hosted_invoice_url       TEXT,
    paid_at                  INTEGER,
    last_payment_error       TEXT,
    provider_created         INTEGER NOT NULL,
    created_at               INTEGER NOT NULL,
    updated_at               INTEGER NOT NULL,
    PRIMARY KEY (provider, provider_invoice_id)
);
CREATE INDEX invoices_subscription ON invoices (provider, provider_subscription_id);

-- tollgate's own events (the outbox), written in the transaction of the
-- change they announce. `dedupe_key` makes one-per-fact events (exactly one
-- order.paid per order) a database guarantee.
CREATE TABLE events (
    id                TEXT PRIMARY KEY,
    type              TEXT NOT NULL,
    customer_id       TEXT REFERENCES customers (id),
    object_type       TEXT NOT NULL,
    object_id         TEXT NOT NULL,
    provider_event_id TEXT,
    data              TEXT NOT NULL,
    dedupe_key        TEXT UNIQUE,
    created_at        INTEGER NOT NULL
);
CREATE INDEX events_customer ON events (customer_id, id);
CREATE INDEX events_type ON events (type, id);
CREATE INDEX events_object ON events (object_id, id);
