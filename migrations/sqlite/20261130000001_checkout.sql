-- Checkouts started through tollgate's API (`POST /v1/checkout/sessions`).
--
-- request_key: derived from the caller's API key and Idempotency-Key, so a
--   retried request finds the session (and order) its first attempt
--   recorded, and reaches the provider as the same request.
-- line_items: the cart as requested (catalog prices and quantities, JSON),
--   for subscription mode, which has no order lines.
-- trial_days: the trial asked for (subscription mode).
-- last_error: why the provider call failed; such a session is `expired` and
--   its order `canceled` until a retry with the same key revives them.
ALTER TABLE checkout_sessions ADD COLUMN request_key TEXT;
ALTER TABLE checkout_sessions ADD COLUMN line_items TEXT;
ALTER TABLE checkout_sessions ADD COLUMN trial_days INTEGER;
ALTER TABLE checkout_sessions ADD COLUMN last_error TEXT;
CREATE UNIQUE INDEX checkout_sessions_request_key ON checkout_sessions (request_key);
