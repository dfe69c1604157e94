-- The inbox: every provider webhook as received, kept durably before it is
-- acknowledged, unique per (provider, provider event id).
CREATE TABLE provider_events (
    id                TEXT COLLATE "C" PRIMARY KEY,
    provider          TEXT NOT NULL,
    provider_event_id TEXT NOT NULL,
    event_type        TEXT NOT NULL,
    object_id         TEXT,
    provider_created  BIGINT NOT NULL,
    api_version       TEXT,
    livemode          BOOLEAN NOT NULL,
    body              TEXT NOT NULL,
    source            TEXT NOT NULL CHECK (source IN ('webhook', 'reconcile')),
    status            TEXT NOT NULL CHECK (status IN ('received', 'processed', 'ignored', 'failed', 'dead')),
    attempts          BIGINT NOT NULL DEFAULT 0,
    last_error        TEXT,
    next_attempt_at   BIGINT NOT NULL,
    locked_until      BIGINT,
    received_at       BIGINT NOT NULL,
    processed_at      BIGINT,
    UNIQUE (provider, provider_event_id)
);
-- Covers the workers' claim and the depth/lag gauges without touching bodies.
CREATE INDEX provider_events_due ON provider_events (status, next_attempt_at, received_at);
CREATE INDEX provider_events_object ON provider_events (provider, object_id);
