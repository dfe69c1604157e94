-- Refunds asked for through tollgate's API (`POST /v1/orders/{id}/refunds`).
-- A request is recorded as `pending` before the provider is called, in the
-- transaction that checks what is left to refund, so a refund in flight at
-- the provider (not yet back as an answer or a webhook) already counts
-- against the order: two concurrent requests can never refund more than
-- was paid. It becomes `submitted` once the provider's refund is known (its
-- answer, or its webhook carrying `metadata.tollgate_refund_request`), from
-- then on counted through the `refunds` table; `failed` when the provider
-- refused it or it was never sent.
CREATE TABLE refund_requests (
    id                 TEXT COLLATE "C" PRIMARY KEY,
    order_id           TEXT COLLATE "C" NOT NULL REFERENCES orders (id),
    provider           TEXT NOT NULL,
    amount             BIGINT NOT NULL CHECK (amount > 0),
    currency           TEXT NOT NULL,
    reason             TEXT,
    status             TEXT NOT NULL CHECK (status IN ('pending', 'submitted', 'failed')),
    provider_refund_id TEXT,
    -- The Idempotency-Key sent to the provider: a retry of the same request
    -- finds this row and asks the provider again under the same key.
    idempotency_key    TEXT NOT NULL UNIQUE,
    failure_code       TEXT,
    created_at         BIGINT NOT NULL,
    updated_at         BIGINT NOT NULL
);
CREATE INDEX refund_requests_order ON refund_requests (order_id, status);
