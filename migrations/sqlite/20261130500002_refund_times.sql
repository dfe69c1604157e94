-- When each refund fact was reported, so that a refund failing after a
-- charge snapshot counted it is taken back out of that snapshot's total, and
-- a newer charge snapshot can correct a refund copied from an older one.
ALTER TABLE refunds ADD COLUMN provider_created INTEGER NOT NULL DEFAULT 0;
ALTER TABLE refunds ADD COLUMN status_at INTEGER NOT NULL DEFAULT 0;
ALTER TABLE payments ADD COLUMN amount_refunded_at INTEGER NOT NULL DEFAULT 0;
