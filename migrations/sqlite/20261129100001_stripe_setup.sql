-- A catalog entry keeps every provider id it ever had (events about old
-- subscriptions still carry a replaced price's id and must map), but only
-- one is current: the one new checkouts use. Replaced ones get superseded_at.
ALTER TABLE provider_catalog_links ADD COLUMN superseded_at INTEGER;

-- Webhook endpoints registered by `tollgate stripe setup`, with the signing
-- secret the provider returned (shown only once, at creation). Their secrets
-- are added to the verified set at start-up.
CREATE TABLE provider_webhook_endpoints (
    provider    TEXT NOT NULL,
    endpoint_id TEXT NOT NULL,
    url         TEXT NOT NULL,
    secret      TEXT NOT NULL,
    created_at  INTEGER NOT NULL,
    updated_at  INTEGER NOT NULL,
    PRIMARY KEY (provider, endpoint_id)
);
