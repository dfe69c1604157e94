-- The Idempotency-Key tollgate sends the provider for a refund request or a
-- checkout, derived from the caller's request *and* the row, so a caller's
-- key reused after its lifetime (a new row) is a new request at the
-- provider too, not a replay of the old one. NULL on rows recorded before:
-- they keep the key they were first sent with (see the code for each).
ALTER TABLE refund_requests ADD COLUMN provider_idempotency_key TEXT;
ALTER TABLE checkout_sessions ADD COLUMN provider_idempotency_key TEXT;
