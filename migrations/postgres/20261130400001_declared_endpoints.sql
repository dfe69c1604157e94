-- Webhook endpoints declared in tollgate.toml ([webhook_endpoints.<key>]):
-- the key ties a row to its declaration, so start-up reconciles them
-- idempotently. NULL for endpoints created through the API.
ALTER TABLE webhook_endpoints ADD COLUMN config_key TEXT COLLATE "C";
-- One live endpoint per declaration; a removed one keeps its key for history.
CREATE UNIQUE INDEX webhook_endpoints_config_key ON webhook_endpoints (config_key)
    WHERE config_key IS NOT NULL AND deleted_at IS NULL;
