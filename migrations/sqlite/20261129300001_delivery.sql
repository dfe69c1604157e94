-- Outbound webhooks to the application: where events go, and what became
-- of each one sent. Deliveries are written in the transaction that writes
-- their event (see store::events::emit), so an event is never announced to
-- fewer endpoints than were subscribed when it happened.

CREATE TABLE webhook_endpoints (
    id              TEXT PRIMARY KEY,
    url             TEXT NOT NULL,
    description     TEXT,
    -- A JSON array of event types; ["*"] for every type.
    events          TEXT NOT NULL,
    -- `whsec_…`, needed in clear to sign; never returned after creation.
    secret          TEXT NOT NULL,
    status          TEXT NOT NULL CHECK (status IN ('enabled', 'disabled')),
    disabled_reason TEXT,
    created_at      INTEGER NOT NULL,
    updated_at      INTEGER NOT NULL,
    deleted_at      INTEGER
);

CREATE TABLE deliveries (
    id              TEXT PRIMARY KEY,
    endpoint_id     TEXT NOT NULL REFERENCES webhook_endpoints (id),
    event_id        TEXT NOT NULL REFERENCES events (id),
    -- Copied from the event: ordering is per customer per endpoint.
    customer_id     TEXT,
    status          TEXT NOT NULL CHECK (status IN ('pending', 'succeeded', 'failed', 'dead')),
    attempts        INTEGER NOT NULL DEFAULT 0,
    next_attempt_at INTEGER NOT NULL,
    locked_until    INTEGER,
    last_status     INTEGER,
    last_error      TEXT,
    created_at      INTEGER NOT NULL,
    delivered_at    INTEGER,
    UNIQUE (endpoint_id, event_id)
);
-- The worker's scan: what is due.
CREATE INDEX deliveries_due ON deliveries (next_attempt_at) WHERE status IN ('pending', 'failed');
-- The ordering check: an earlier unfinished delivery for the same customer.
CREATE INDEX deliveries_queue ON deliveries (endpoint_id, customer_id, event_id) WHERE status IN ('pending', 'failed');
CREATE INDEX deliveries_endpoint ON deliveries (endpoint_id, id);

CREATE TABLE delivery_attempts (
    delivery_id   TEXT NOT NULL REFERENCES deliveries (id),
    n             INTEGER NOT NULL,
    at            INTEGER NOT NULL,
    -- The response status; NULL when none came (timeout, refused, blocked).
    status_code   INTEGER,
    duration_ms   INTEGER NOT NULL,
    error         TEXT,
    -- The start of the response body, for whoever debugs the receiver.
    response      TEXT,
    PRIMARY KEY (delivery_id, n)
);
